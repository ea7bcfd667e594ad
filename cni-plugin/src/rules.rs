//! The capture rules: an nftables ruleset inside each enrolled pod's network namespace,
//! and on the node the SNAT rule that makes health probes recognisable. Why each rule is
//! there is in docs/capture.md.
//!
//! nftables rather than iptables: a whole table is replaced in one `nft -f` transaction
//! (the kernel applies it atomically or not at all), one `inet` table covers IPv4 and IPv6,
//! and nothing else in the pod uses it, so our table is ours alone.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

/// Mark on ztunnel's own sockets.
pub const ZTUNNEL_MARK: u32 = 0x539;
/// The source address of health probes from the node.
pub const PROBE_SOURCE: &str = "169.254.7.127";
/// Our table in each pod.
pub const POD_TABLE: &str = "trellis";
/// Our table on the node.
pub const NODE_TABLE: &str = "trellis-node";

/// The pod's ruleset (replaces any earlier version of our table).
pub fn pod_ruleset() -> String {
    format!(
        r#"table inet {POD_TABLE}
delete table inet {POD_TABLE}
table inet {POD_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    meta mark {ZTUNNEL_MARK:#x} return
    ip saddr {PROBE_SOURCE} return
    iifname "lo" return
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {ZTUNNEL_MARK:#x} return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :15001
  }}
}}
"#
    )
}

/// Connection mark of connections ztunnel opens to the app with the client's address.
pub const RETURN_MARK: u32 = 0x111;
/// The routing table that delivers those connections' replies back to ztunnel.
pub const RETURN_ROUTE_TABLE: u32 = 100;
/// Our nftables table for that return path, in each pod.
pub const RETURN_TABLE: &str = "trellis-return";

/// The return path of connections ztunnel opens to the app *as the client* (IP_TRANSPARENT,
/// bound to the client's address, so the app sees who really called). The app's replies
/// are addressed to the client, whose address is not in the pod: without this they would
/// leave by the pod's default route. ztunnel's packets reach the app over `lo` carrying
/// ztunnel's mark; their connection is marked `RETURN_MARK`; the app's packets of such a
/// connection get that mark back, and a policy rule routes marked packets to `lo`, where
/// ztunnel's socket takes them. Installed before ztunnel serves the pod.
pub fn pod_return_ruleset() -> String {
    format!(
        r#"table inet {RETURN_TABLE}
delete table inet {RETURN_TABLE}
table inet {RETURN_TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "lo" meta mark {ZTUNNEL_MARK:#x} ct mark set {RETURN_MARK:#x}
  }}
  chain output {{
    type route hook output priority mangle; policy accept;
    ct mark {RETURN_MARK:#x} meta mark set {RETURN_MARK:#x}
  }}
}}
"#
    )
}

/// Installs the return path (see [`pod_return_ruleset`]) in the pod at `netns`:
/// the nftables table, and for IPv4 (and IPv6 where the pod has it) the policy rule and the
/// local route. Idempotent.
pub fn install_return_path(netns: &Path) -> Result<(), String> {
    apply(Some(netns), &pod_return_ruleset())?;
    let rule = |family: &str, verb: &str| return_rule(netns, family, verb);
    let route = |family: &str, all: &str| {
        let table = RETURN_ROUTE_TABLE.to_string();
        ip(
            netns,
            &[
                family, "route", "replace", "local", all, "dev", "lo", "table", &table,
            ],
        )
    };
    // Replace rather than duplicate: delete (absent is fine), then add.
    let _ = rule("-4", "del");
    rule("-4", "add")?;
    route("-4", "0.0.0.0/0")?;
    // IPv6 may be disabled in the pod: then there is nothing to route back.
    let _ = rule("-6", "del");
    if rule("-6", "add").is_ok() {
        let _ = route("-6", "::/0");
    }
    Ok(())
}

/// Removes the return path (absent parts are fine).
pub fn remove_return_path(netns: &Path) -> Result<(), String> {
    apply(Some(netns), &table_removal(RETURN_TABLE))?;
    let table = RETURN_ROUTE_TABLE.to_string();
    for family in ["-4", "-6"] {
        let _ = return_rule(netns, family, "del");
        let _ = ip(netns, &[family, "route", "flush", "table", &table]);
    }
    Ok(())
}

/// `ip rule add|del` of the return path's policy rule.
fn return_rule(netns: &Path, family: &str, verb: &str) -> Result<(), String> {
    let mark = format!("{RETURN_MARK:#x}/0xfff");
    let table = RETURN_ROUTE_TABLE.to_string();
    ip(
        netns,
        &[
            family, "rule", verb, "fwmark", &mark, "pref", "32764", "lookup", &table,
        ],
    )
}

/// A ruleset that removes our `inet` table `name` (no error when it is not there: the
/// table is declared first).
fn table_removal(name: &str) -> String {
    format!("table inet {name}\ndelete table inet {name}\n")
}

/// Runs `ip ARGS` inside the network namespace at `netns`.
fn ip(netns: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (is iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes the pod's ruleset (no error when it is not there).
pub fn pod_ruleset_removal() -> String {
    table_removal(POD_TABLE)
}

/// The node's table: probes from the node to enrolled pods leave with the probe source.
pub fn node_ruleset(pod_ips: &[IpAddr]) -> String {
    let v4: Vec<String> = pod_ips
        .iter()
        .filter(|ip| ip.is_ipv4())
        .map(ToString::to_string)
        .collect();
    let elements = if v4.is_empty() {
        String::new()
    } else {
        format!("    elements = {{ {} }}\n", v4.join(", "))
    };
    format!(
        r#"table ip {NODE_TABLE}
delete table ip {NODE_TABLE}
table ip {NODE_TABLE} {{
  set enrolled {{
    type ipv4_addr
{elements}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr @enrolled fib saddr type local meta l4proto tcp snat ip to {PROBE_SOURCE}
  }}
}}
"#
    )
}

/// Whether the capture table is installed in the network namespace at `netns` (what a node
/// agent that lost its state finds on the node).
pub fn capture_installed(netns: &Path) -> Result<bool, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["nft", "list", "table", "inet", POD_TABLE])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nft (is the nftables package installed?): {e}"))?;
    if out.status.success() {
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    // nft says "No such file or directory" for a table that does not exist.
    if err.contains("No such file or directory") || err.contains("does not exist") {
        Ok(false)
    } else {
        Err(format!(
            "nft list table failed ({}): {}",
            out.status,
            err.trim()
        ))
    }
}

/// Applies `ruleset` with `nft -f -`, inside the network namespace at `netns` (or the
/// agent's own when `None`).
pub fn apply(netns: Option<&Path>, ruleset: &str) -> Result<(), String> {
    let mut cmd = match netns {
        Some(path) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", path.display())).arg("nft");
            c
        }
        None => Command::new("nft"),
    };
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run nft (is the nftables package installed?): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| format!("writing the ruleset to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_ruleset_replaces_itself_and_lets_ztunnel_and_probes_through() {
        let r = pod_ruleset();
        assert!(r.starts_with("table inet trellis\ndelete table inet trellis\n"));
        assert!(r.contains("meta mark 0x539 return"));
        assert!(r.contains("ip saddr 169.254.7.127 return"));
        assert!(r.contains("tcp dport 15008 return"));
        assert!(r.contains("redirect to :15006"));
        assert!(r.contains("redirect to :15001"));
        let n = node_ruleset(&["10.244.1.2".parse().unwrap(), "fd00::1".parse().unwrap()]);
        assert!(n.contains("elements = { 10.244.1.2 }"), "{n}");
        assert!(!node_ruleset(&[]).contains("elements"));
    }
}
