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

/// Removes the pod's ruleset (no error when it is not there).
pub fn pod_ruleset_removal() -> String {
    format!("table inet {POD_TABLE}\ndelete table inet {POD_TABLE}\n")
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
