//! `cellar csi`: a CSI client for operators, against any CSI driver's Unix socket.

pub mod bench;

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::csi::v1::controller_client::ControllerClient;
use crate::csi::v1::identity_client::IdentityClient;
use crate::csi::v1::node_client::NodeClient;
use crate::csi::v1::volume_capability::access_mode::Mode;
use crate::csi::v1::*;

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// The driver's socket.
    #[arg(long, default_value = "unix:///run/cellar/csi.sock", env = "CSI_ENDPOINT")]
    pub endpoint: String,
    #[command(subcommand)]
    pub command: CsiCommand,
}

#[derive(Subcommand, Debug)]
pub enum CsiCommand {
    /// Plugin name, version, capabilities and node info.
    Info,
    /// CreateVolume.
    Create {
        name: String,
        /// Size in bytes, or with a K/M/G/T suffix (powers of 1024).
        #[arg(long, default_value = "1G")]
        size: String,
        /// A StorageClass parameter, key=value (repeatable).
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// Access mode: rwo, rwop, rox, rwx, or a CSI mode name.
        #[arg(long, default_value = "rwo")]
        access: String,
        #[arg(long)]
        from_snapshot: Option<String>,
        #[arg(long)]
        from_volume: Option<String>,
        /// A topology segment the volume must be accessible from, key=value (repeatable), sent
        /// as both requisite and preferred, as WaitForFirstConsumer sends the selected node.
        #[arg(long = "topology", value_parser = key_value)]
        topology: Vec<(String, String)>,
    },
    /// DeleteVolume.
    Delete { volume_id: String },
    /// ListVolumes (all pages).
    List,
    /// ControllerGetVolume.
    Get { volume_id: String },
    /// GetCapacity.
    Capacity {
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
    },
    /// NodeStageVolume.
    Stage {
        volume_id: String,
        staging_path: PathBuf,
        #[arg(long, default_value = "rwo")]
        access: String,
    },
    /// NodeUnstageVolume.
    Unstage { volume_id: String, staging_path: PathBuf },
    /// NodePublishVolume.
    Publish {
        volume_id: String,
        #[arg(long)]
        staging_path: PathBuf,
        #[arg(long)]
        target: PathBuf,
        #[arg(long)]
        readonly: bool,
        #[arg(long, default_value = "rwo")]
        access: String,
        /// A mount option for the bind (repeatable), e.g. noexec.
        #[arg(long = "mount-flag")]
        mount_flags: Vec<String>,
    },
    /// NodeUnpublishVolume.
    Unpublish { volume_id: String, target: PathBuf },
    /// NodeGetVolumeStats.
    Stats { volume_id: String, path: PathBuf },
    /// ControllerExpandVolume, then NodeExpandVolume when a path is given.
    Expand {
        volume_id: String,
        size: String,
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// CreateSnapshot.
    Snapshot { name: String, source_volume_id: String },
    /// DeleteSnapshot.
    DeleteSnapshot { snapshot_id: String },
    /// ListSnapshots (all pages).
    Snapshots,
    /// Drives volumes through create, stage, publish, unpublish, unstage, delete and reports latency.
    Bench(bench::BenchArgs),
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not key=value"))
}

/// Parses `10G`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1i64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 1073741824, 512M, 10G)"))
}

pub fn parse_access(s: &str) -> Result<Mode, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "rwo" | "single_node_writer" => Mode::SingleNodeWriter,
        "rwop" | "single_node_single_writer" => Mode::SingleNodeSingleWriter,
        "single_node_multi_writer" => Mode::SingleNodeMultiWriter,
        "single_node_reader_only" => Mode::SingleNodeReaderOnly,
        "rox" | "multi_node_reader_only" => Mode::MultiNodeReaderOnly,
        "rwx" | "multi_node_multi_writer" => Mode::MultiNodeMultiWriter,
        "multi_node_single_writer" => Mode::MultiNodeSingleWriter,
        other => {
            return Err(format!(
                "unknown access mode '{other}' (rwo, rwop, rox, rwx or a CSI mode name)"
            ))
        }
    })
}

pub fn mount_capability(mode: Mode, flags: Vec<String>) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: String::new(),
            mount_flags: flags,
            volume_mount_group: String::new(),
        })),
    }
}

/// Connects to a CSI endpoint over its Unix socket.
pub async fn connect(endpoint: &str) -> Result<Channel, String> {
    let path = crate::server::socket_path(endpoint).map_err(|e| e.to_string())?;
    Endpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))
}

fn show<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), String> {
    match r {
        Ok(r) => {
            println!("{:#?}", r.into_inner());
            Ok(())
        }
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

pub async fn run(args: CsiArgs) -> Result<(), String> {
    let channel = connect(&args.endpoint).await?;
    let mut id = IdentityClient::new(channel.clone());
    let mut ctl = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel.clone());
    match args.command {
        CsiCommand::Info => {
            show(id.get_plugin_info(GetPluginInfoRequest {}).await)?;
            show(id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await)?;
            show(id.probe(ProbeRequest {}).await)?;
            // A node-only or controller-only plugin answers just one of these; show what it has.
            let _ = show(
                ctl.controller_get_capabilities(ControllerGetCapabilitiesRequest {})
                    .await,
            );
            let _ = show(node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await);
            show(node.node_get_info(NodeGetInfoRequest {}).await)
        }
        CsiCommand::Create {
            name,
            size,
            params,
            access,
            from_snapshot,
            from_volume,
            topology,
        } => {
            use volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(VolumeContentSource {
                    r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: s })),
                }),
                (None, Some(v)) => Some(VolumeContentSource {
                    r#type: Some(Type::Volume(VolumeSource { volume_id: v })),
                }),
                _ => None,
            };
            show(
                ctl.create_volume(CreateVolumeRequest {
                    name,
                    capacity_range: Some(CapacityRange {
                        required_bytes: parse_size(&size)?,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_capability(parse_access(&access)?, vec![])],
                    parameters: params.into_iter().collect::<HashMap<_, _>>(),
                    volume_content_source: source,
                    accessibility_requirements: (!topology.is_empty()).then(|| {
                        let t = Topology {
                            segments: topology.into_iter().collect(),
                        };
                        TopologyRequirement {
                            requisite: vec![t.clone()],
                            preferred: vec![t],
                        }
                    }),
                    ..Default::default()
                })
                .await,
            )
        }
        CsiCommand::Delete { volume_id } => show(
            ctl.delete_volume(DeleteVolumeRequest {
                volume_id,
                ..Default::default()
            })
            .await,
        ),
        CsiCommand::List => {
            let mut token = String::new();
            loop {
                let r = ctl
                    .list_volumes(ListVolumesRequest {
                        max_entries: 500,
                        starting_token: token,
                    })
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                for e in r.entries {
                    if let Some(v) = e.volume {
                        let cond = e.status.and_then(|s| s.volume_condition);
                        let health = match cond {
                            Some(c) if c.abnormal => format!("ABNORMAL: {}", c.message),
                            _ => "ok".into(),
                        };
                        println!("{}\t{}\t{}", v.volume_id, v.capacity_bytes, health);
                    }
                }
                if r.next_token.is_empty() {
                    return Ok(());
                }
                token = r.next_token;
            }
        }
        CsiCommand::Get { volume_id } => show(
            ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id })
                .await,
        ),
        CsiCommand::Capacity { params } => show(
            ctl.get_capacity(GetCapacityRequest {
                parameters: params.into_iter().collect(),
                ..Default::default()
            })
            .await,
        ),
        CsiCommand::Stage {
            volume_id,
            staging_path,
            access,
        } => show(
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id,
                staging_target_path: staging_path.display().to_string(),
                volume_capability: Some(mount_capability(parse_access(&access)?, vec![])),
                ..Default::default()
            })
            .await,
        ),
        CsiCommand::Unstage {
            volume_id,
            staging_path,
        } => show(
            node.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id,
                staging_target_path: staging_path.display().to_string(),
            })
            .await,
        ),
        CsiCommand::Publish {
            volume_id,
            staging_path,
            target,
            readonly,
            access,
            mount_flags,
        } => show(
            node.node_publish_volume(NodePublishVolumeRequest {
                volume_id,
                staging_target_path: staging_path.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(mount_capability(parse_access(&access)?, mount_flags)),
                readonly,
                ..Default::default()
            })
            .await,
        ),
        CsiCommand::Unpublish { volume_id, target } => show(
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id,
                target_path: target.display().to_string(),
            })
            .await,
        ),
        CsiCommand::Stats { volume_id, path } => show(
            node.node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id,
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await,
        ),
        CsiCommand::Expand { volume_id, size, path } => {
            let bytes = parse_size(&size)?;
            show(
                ctl.controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: volume_id.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: bytes,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            )?;
            match path {
                Some(p) => show(
                    node.node_expand_volume(NodeExpandVolumeRequest {
                        volume_id,
                        volume_path: p.display().to_string(),
                        capacity_range: Some(CapacityRange {
                            required_bytes: bytes,
                            limit_bytes: 0,
                        }),
                        ..Default::default()
                    })
                    .await,
                ),
                None => Ok(()),
            }
        }
        CsiCommand::Snapshot { name, source_volume_id } => show(
            ctl.create_snapshot(CreateSnapshotRequest {
                name,
                source_volume_id,
                ..Default::default()
            })
            .await,
        ),
        CsiCommand::DeleteSnapshot { snapshot_id } => show(
            ctl.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id,
                ..Default::default()
            })
            .await,
        ),
        CsiCommand::Snapshots => {
            let mut token = String::new();
            loop {
                let r = ctl
                    .list_snapshots(ListSnapshotsRequest {
                        max_entries: 500,
                        starting_token: token,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                for e in r.entries {
                    if let Some(s) = e.snapshot {
                        println!("{}\t{}\t{}", s.snapshot_id, s.source_volume_id, s.size_bytes);
                    }
                }
                if r.next_token.is_empty() {
                    return Ok(());
                }
                token = r.next_token;
            }
        }
        CsiCommand::Bench(b) => bench::run(&args.endpoint, b).await,
    }
}
