//! Property tests (issue 17) of the CNI plugin's input: arbitrary stdin (random bytes, or a
//! network configuration with fields dropped, retyped or garbled) and arbitrary `CNI_*`
//! variables (`CNI_ARGS` included). Invariants: no panic; a failure is a spec error object
//! (a known code, a message) in a supported version; nothing is ever reported as success
//! for ADD or CHECK unless the configuration asked to fail open (the agent is never
//! reachable here: its socket path does not exist). `FUZZ_CASES` sets the number of cases
//! (default 256); shrunk failures are kept in `proptest-regressions/`.

use proptest::prelude::*;
use serde_json::{Value, json};
use trellis_cni_plugin::plugin::{Env, SUPPORTED_VERSIONS, run};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A JSON value of any shape, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A configuration like the runtime passes, with random edits.
fn conf() -> impl Strategy<Value = Vec<u8>> {
    let base = json!({
        "cniVersion": "1.0.0",
        "name": "kindnet",
        "type": "trellis-cni",
        "agentSocket": "/nonexistent/trellis-cni-properties/agent.sock",
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                       "ips": [{"address": "10.244.1.5/24", "interface": 0}]},
        "timeoutMs": 50,
    });
    let keys = [
        "cniVersion",
        "name",
        "type",
        "prevResult",
        "failOpen",
        "timeoutMs",
    ];
    (
        proptest::collection::vec((0..keys.len(), any_json(), any::<bool>()), 0..4),
        any::<bool>(),
    )
        .prop_map(move |(edits, fail_open)| {
            let mut c = base.clone();
            for (k, v, drop) in edits {
                if drop {
                    c.as_object_mut().unwrap().remove(keys[k]);
                } else {
                    c[keys[k]] = v;
                }
            }
            if fail_open {
                c["failOpen"] = Value::from(true);
            }
            // The agent is never reachable: whatever the edits, its socket does not exist.
            c["agentSocket"] = Value::from("/nonexistent/trellis-cni-properties/agent.sock");
            serde_json::to_vec(&c).unwrap()
        })
}

fn stdin() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        conf(),
        (conf(), any::<prop::sample::Index>())
            .prop_map(|(b, i)| b[..i.index(b.len() + 1)].to_vec()),
    ]
}

fn env() -> impl Strategy<Value = Env> {
    let command = prop_oneof![
        Just(None),
        prop::sample::select(vec!["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"])
            .prop_map(|c| Some(c.to_string())),
        ".{0,8}".prop_map(Some),
    ];
    let opt = |re: &'static str| prop_oneof![Just(None), re.prop_map(Some)];
    let args = prop_oneof![
        Just(None),
        Just(Some(
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1".to_string()
        )),
        "[=;A-Z_a-z0-9]{0,40}".prop_map(Some),
        ".{0,40}".prop_map(Some),
    ];
    (
        command,
        opt("[0-9a-f]{0,16}"),
        opt("/var/run/netns/[a-z]{0,8}|.{0,12}"),
        opt("eth0|.{0,6}"),
        args,
    )
        .prop_map(|(command, container_id, netns, ifname, args)| Env {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_input_is_answered_by_the_spec_never_by_a_panic(env in env(), stdin in stdin()) {
        let fail_open = serde_json::from_slice::<Value>(&stdin)
            .ok()
            .and_then(|v| v.get("failOpen").and_then(Value::as_bool))
            .unwrap_or(false);
        match run(&env, &stdin) {
            Ok(out) => {
                let command = env.command.as_deref().unwrap_or("");
                prop_assert!(
                    !matches!(command, "ADD" | "CHECK") || fail_open,
                    "{command} succeeded without the agent and without failOpen: {out:?}"
                );
            }
            Err((e, version)) => {
                prop_assert!(SUPPORTED_VERSIONS.contains(&version.as_str()) || !version.is_empty());
                prop_assert!(
                    matches!(e.code, 1..=7 | 11 | 50 | 100..=199),
                    "code {} is not the spec's or ours: {e:?}",
                    e.code
                );
                prop_assert!(!e.msg.is_empty());
                let j = e.to_json(&version);
                prop_assert_eq!(j["code"].as_u64(), Some(u64::from(e.code)));
            }
        }
    }
}
