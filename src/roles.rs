//! Starting a role: open the pools, build the services, serve until a signal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::transport::Server;

use crate::agent::{LocalAgent, SingleNode};
use crate::controller::ControllerService;
use crate::csi::v1::controller_server::ControllerServer;
use crate::csi::v1::identity_server::IdentityServer;
use crate::csi::v1::node_server::NodeServer as NodeGrpc;
use crate::identity::IdentityService;
use crate::node::state::NodeState;
use crate::node::{NodeServer, NodeService};
use crate::server::{self, ServeError};
use crate::storage::config::{Config, ConfigError};
use crate::storage::engine::LocalEngine;
use crate::storage::id::NodeId;
use crate::storage::locks::InFlight;
use crate::storage::StorageError;
use crate::sys::mount::LinuxMounter;

#[derive(Debug, Clone)]
pub struct AllInOne {
    pub endpoint: String,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub driver_name: String,
    pub max_volumes_per_node: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("--node-id: {0}")]
    NodeId(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening pools: {0}")]
    Storage(#[from] StorageError),
    #[error("node state: {0}")]
    State(#[from] crate::sys::SysError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

pub fn load_config(config: Option<&PathBuf>, data_dir: &std::path::Path) -> Result<Config, ConfigError> {
    match config {
        Some(p) => Config::load(p, data_dir),
        None => Ok(Config::default_for(data_dir)),
    }
}

pub async fn all_in_one(o: AllInOne) -> Result<(), RoleError> {
    let node = NodeId::parse(&o.node_id).map_err(|e| RoleError::NodeId(e.0))?;
    let config = load_config(o.config.as_ref(), &o.data_dir)?;
    let socket = server::socket_path(&o.endpoint)?;
    let listener = server::bind(&socket)?;
    let ready = Arc::new(AtomicBool::new(false));

    let engine = Arc::new(LocalEngine::open(node.clone(), &config)?);
    let state = Arc::new(NodeState::open(&o.data_dir.join("node"))?);
    // A pool that could not be opened keeps Probe not-ready; the others still serve.
    ready.store(engine.ready(), Ordering::Release);
    for (pool, reason) in engine.broken_pools() {
        tracing::error!(pool = pool.as_str(), reason, "pool not open");
    }
    tracing::info!(
        node = node.as_str(),
        socket = %socket.display(),
        pools = ?engine.pool_names().iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "all-in-one ready"
    );

    let identity = IdentityService {
        name: o.driver_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ready,
        controller: true,
    };
    let controller = ControllerService {
        directory: Arc::new(SingleNode(Arc::new(LocalAgent::new(engine.clone())))),
    };
    let node_svc = NodeService {
        node,
        engine,
        mounter: Arc::new(LinuxMounter::default()),
        state,
        in_flight: InFlight::default(),
        max_volumes: o.max_volumes_per_node,
    };
    let router = Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(controller))
        .add_service(NodeGrpc::new(NodeServer(Arc::new(node_svc))));
    Ok(server::serve_until_signal(router, listener, &socket).await?)
}
