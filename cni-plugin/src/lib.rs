//! Trellis's CNI plugin (`trellis-cni`) and node agent (`trellis-node-agent`).
//!
//! The plugin runs chained after the node's network plugin and asks the agent to enroll
//! each new pod; the agent installs the pod's capture rules and hands the pod's network
//! namespace to ztunnel over ZDS. Nothing here carries traffic: it only decides which pod's
//! traffic goes through ztunnel, and makes it so.

pub mod agent;
pub mod install;
pub mod plugin;
pub mod protocol;
pub mod removal;
pub mod rules;
