//! Compiles the .proto files with protox (pure Rust, no `protoc` needed) and generates the
//! prost messages and tonic clients/servers.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "workload.proto",
    "authorization.proto",
    "zds.proto",
    "ca.proto",
    "discovery.proto",
    "trellis/waypoint/v1/l7.proto",
    "http_status.proto",
    "ext_authz.proto",
    "otlp_trace.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    println!("cargo:rerun-if-changed=proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root])?;
    let mut config = tonic_prost_build::Config::new();
    // Gives every message a `prost::Name` impl, so type URLs come from the descriptors
    // (`type.googleapis.com/<package>.<Message>`) instead of hand-written strings.
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");
    // One generated file that nests the packages as modules (istio::workload::zds, ...).
    config.include_file("trellis_protos.rs");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
