//! The generated CSI v1.12 types and services, the one place errors become gRPC codes, and the
//! translation of CSI capabilities into our own types.

pub mod caps;
pub mod health;
pub mod status;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// The topology key every node reports and every local volume is pinned by.
pub const TOPOLOGY_NODE_KEY: &str = "topology.cellar.csi.dev/node";
