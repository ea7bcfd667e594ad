//! Configuration: the objects users write and the cluster state Trellis reads, whatever
//! their source (a directory of YAML manifests, later the Kubernetes API).

pub mod authz;
pub mod destination;
pub mod dir;
pub mod gateway;
pub mod istio;
pub mod kube;
pub mod l7policy;
pub mod load;
pub mod local_traffic;
pub mod model;
pub mod routes;
pub mod snapshot;
