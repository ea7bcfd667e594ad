//! The end-to-end test cluster of Trellis, and the test app that runs in it.
//!
//! A [`Cluster`] is a set of nodes, each a Linux network namespace, joined by an underlay
//! bridge in a namespace of the cluster's own; pods are network namespaces attached to their
//! node by the real CNI reference plugins (`bridge` + `host-local`), invoked through the CNI
//! protocol exactly as a container runtime does, from a network configuration *list* so that
//! Trellis's own plugin can be chained after them. Real binaries run inside pods and nodes
//! with their output in a per-test log folder.
//!
//! It must not leak: every namespace, link, IPAM lease and process goes at teardown, when a
//! test panics, on SIGINT/SIGTERM, and (for a test process that was killed outright) at the
//! next cluster's start. It needs root and fails loudly without it; it never skips.
//! Traffic stays inside the cluster's namespaces.

pub mod app;
mod cleanup;
mod cluster;
pub mod cni;
mod exec;
pub mod mesh;
mod netns;

pub use cleanup::{NAME_PREFIX, STATE_ROOT, our_netns, sweep_stale};
pub use cluster::{
    CNI_PLUGIN_DIR, Cluster, ClusterBuilder, NETWORK_NAME, Node, Pod, PodCreated, Underlay,
};
pub use exec::Proc;
pub use netns::{Netns, in_netns, wait_tcp};

use std::path::Path;

use anyhow::{Result, bail};

/// Checks that end-to-end tests can run here: root, `ip`, the CNI reference plugins.
/// The error says what is missing and how to get it.
pub fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "end-to-end tests need root: they create network namespaces, veth links and run \
             CNI plugins. Run the README's test command as root: sudo ./scripts/test-all.sh"
        );
    }
    let needs = [
        ("/usr/sbin/ip", "iproute2"),
        ("/usr/sbin/sysctl", "procps"),
        ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ];
    for (path, package) in needs {
        if !Path::new(path).exists() {
            bail!(
                "{path} is missing: install the Debian package {package} (apt-get install {package}), or run ./scripts/test-all.sh, which installs it"
            );
        }
    }
    Ok(())
}

/// Runs `body` on a fresh cluster of `nodes` nodes and tears it down. On an error or a panic
/// the test fails with the error, and the log folder is kept and its tails printed.
pub fn with_cluster(test_name: &str, nodes: usize, body: impl FnOnce(&Cluster) -> Result<()>) {
    run_on(Cluster::builder(test_name).nodes(nodes), test_name, body)
}

/// [`with_cluster`] on a dual-stack cluster (pods get IPv4 and IPv6 addresses).
pub fn with_dual_stack_cluster(
    test_name: &str,
    nodes: usize,
    body: impl FnOnce(&Cluster) -> Result<()>,
) {
    run_on(
        Cluster::builder(test_name).nodes(nodes).dual_stack(),
        test_name,
        body,
    )
}

fn run_on(builder: ClusterBuilder, test_name: &str, body: impl FnOnce(&Cluster) -> Result<()>) {
    let cluster = match builder.build() {
        Ok(c) => c,
        Err(e) => panic!("cannot build the test cluster: {e:#}"),
    };
    if let Err(e) = body(&cluster) {
        cluster.mark_failed();
        let report = cluster.report();
        let teardown = cluster.teardown();
        drop(cluster);
        panic!("{test_name} failed: {e:#}\nteardown: {teardown:?}\n{report}");
    }
    if let Err(e) = cluster.teardown() {
        cluster.mark_failed();
        panic!("{test_name}: {e:#}");
    }
}
