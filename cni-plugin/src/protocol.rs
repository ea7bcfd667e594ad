//! The plugin → agent protocol: one JSON request and one JSON reply per connection over
//! the agent's unix stream socket. Small and versionless on purpose: the plugin and the
//! agent ship together (the agent installs the plugin binary).

use serde::{Deserialize, Serialize};

/// Default path of the agent's socket for the plugin.
pub const DEFAULT_SOCKET: &str = "/var/run/trellis/cni.sock";

/// Largest request or reply accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the plugin tells the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (empty on a DEL after the namespace is gone).
    pub netns: String,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID` (may be empty with old runtimes).
    pub uid: String,
    /// The pod's addresses from the previous plugins' result (CIDR notation stripped).
    pub ips: Vec<String>,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReply {
    /// Whether the request was handled.
    pub ok: bool,
    /// Whether the pod is captured now (ADD, CHECK).
    pub captured: bool,
    /// Why not, when `ok` is false.
    #[serde(default)]
    pub error: String,
    /// ADD: the agent could not decide yet whether the pod is in the mesh (the control
    /// plane has not told it about the pod yet). The plugin fails the ADD (the runtime
    /// retries) unless `failOpen` is set.
    #[serde(default)]
    pub undecided: bool,
}
