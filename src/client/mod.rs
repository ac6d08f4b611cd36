//! `cellar csi`: a CSI client for operators, against any CSI driver's Unix socket.

pub mod bench;
pub mod output;

use output::Format;

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
    /// The driver's socket, unix:///path or a plain path; accepted before or after the command.
    #[arg(
        long,
        global = true,
        default_value = "unix:///run/cellar/csi.sock",
        env = "CSI_ENDPOINT"
    )]
    pub endpoint: String,
    /// Output: `table` (aligned columns and sizes in KiB/MiB/GiB, for people) or `json` (the CSI
    /// messages' fields, sizes in bytes, for scripts).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: CsiCommand,
}

/// How a volume is presented, for create, stage and publish.
#[derive(Args, Debug, Clone)]
pub struct AccessArgs {
    /// Access mode: rwo, rwop, rox, rwx, or a CSI mode name (e.g. single_node_multi_writer).
    #[arg(long, default_value = "rwo")]
    pub access: String,
    /// A raw block volume (volumeMode: Block) instead of a filesystem.
    #[arg(long, conflicts_with_all = ["fs_type", "mount_flags"])]
    pub block: bool,
    /// The filesystem an image volume is made with or mounted as (ext4, xfs); empty: the pool's.
    #[arg(long, value_name = "TYPE")]
    pub fs_type: Option<String>,
    /// A mount option (repeatable), e.g. noexec.
    #[arg(long = "mount-flag", value_name = "OPTION")]
    pub mount_flags: Vec<String>,
}

impl AccessArgs {
    fn capability(&self) -> Result<VolumeCapability, String> {
        let mode = parse_access(&self.access)?;
        Ok(if self.block {
            block_capability(mode)
        } else {
            let mut c = mount_capability(mode, self.mount_flags.clone());
            if let Some(volume_capability::AccessType::Mount(m)) = c.access_type.as_mut() {
                m.fs_type = self.fs_type.clone().unwrap_or_default();
            }
            c
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum CsiCommand {
    /// Plugin name, version, readiness, capabilities and node info.
    Info,
    /// CreateVolume; prints the new volume's id.
    Create {
        /// The volume's name (the CO's idempotency key, e.g. pvc-<uid>).
        name: String,
        /// Size in bytes, or with a K/M/G/T suffix (powers of 1024).
        #[arg(long, default_value = "1G")]
        size: String,
        /// A StorageClass parameter, key=value (repeatable), e.g. pool=fast, layout=image.
        #[arg(long = "param", value_parser = key_value, value_name = "KEY=VALUE")]
        params: Vec<(String, String)>,
        #[command(flatten)]
        access: AccessArgs,
        /// Restore this snapshot into the new volume.
        #[arg(long, value_name = "SNAPSHOT_ID", conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume into the new volume.
        #[arg(long, value_name = "VOLUME_ID")]
        from_volume: Option<String>,
        /// A topology segment the volume must be accessible from, key=value (repeatable), sent
        /// as both requisite and preferred, as WaitForFirstConsumer sends the selected node.
        #[arg(long = "topology", value_parser = key_value, value_name = "KEY=VALUE")]
        topology: Vec<(String, String)>,
    },
    /// DeleteVolume.
    Delete {
        /// The volume to delete.
        volume_id: String,
    },
    /// ListVolumes (all pages), with each volume's condition.
    List,
    /// ControllerGetVolume: a volume, its nodes and its condition.
    Get {
        /// The volume to show.
        volume_id: String,
    },
    /// GetCapacity: what a new volume with these parameters can take.
    Capacity {
        /// A StorageClass parameter, key=value (repeatable), e.g. pool=fast, layout=image.
        #[arg(long = "param", value_parser = key_value, value_name = "KEY=VALUE")]
        params: Vec<(String, String)>,
    },
    /// NodeStageVolume.
    Stage {
        /// The volume to stage.
        volume_id: String,
        /// Where to stage it (kubelet's globalmount; must exist).
        staging_path: PathBuf,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// NodeUnstageVolume.
    Unstage {
        /// The staged volume.
        volume_id: String,
        /// Where it is staged.
        staging_path: PathBuf,
    },
    /// NodePublishVolume.
    Publish {
        /// The volume to publish.
        volume_id: String,
        /// Where it is staged.
        #[arg(long)]
        staging_path: PathBuf,
        /// Where the pod sees it: a directory, or a file for --block.
        #[arg(long)]
        target: PathBuf,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        /// The published volume.
        volume_id: String,
        /// Where it is published.
        target: PathBuf,
    },
    /// NodeGetVolumeStats: bytes and inodes used, and the volume's condition.
    Stats {
        /// The volume.
        volume_id: String,
        /// A path where it is published or staged.
        path: PathBuf,
    },
    /// ControllerExpandVolume, then NodeExpandVolume when a path is given.
    Expand {
        /// The volume to grow.
        volume_id: String,
        /// The new size, in bytes or with a K/M/G/T suffix.
        size: String,
        /// Where it is published (or staged): also grow its filesystem there.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// ControllerModifyVolume: change mutable parameters (compression, deletePolicy).
    Modify {
        /// The volume to change.
        volume_id: String,
        /// A mutable parameter, key=value (repeatable), e.g. deletePolicy=retain.
        #[arg(long = "param", value_parser = key_value, value_name = "KEY=VALUE", required = true)]
        params: Vec<(String, String)>,
    },
    /// CreateSnapshot; prints the new snapshot's id.
    Snapshot {
        /// The snapshot's name (the CO's idempotency key).
        name: String,
        /// The volume to snapshot.
        source_volume_id: String,
        /// A VolumeSnapshotClass parameter, key=value (repeatable), e.g. freeze=true.
        #[arg(long = "param", value_parser = key_value, value_name = "KEY=VALUE")]
        params: Vec<(String, String)>,
    },
    /// GetSnapshot.
    GetSnapshot {
        /// The snapshot to show.
        snapshot_id: String,
    },
    /// DeleteSnapshot.
    DeleteSnapshot {
        /// The snapshot to delete.
        snapshot_id: String,
    },
    /// ListSnapshots (all pages).
    Snapshots {
        /// Only the snapshots of this volume.
        #[arg(long, value_name = "VOLUME_ID")]
        source_volume_id: Option<String>,
    },
    /// SnapshotMetadata: the allocated byte ranges of a snapshot (GetMetadataAllocated), or with
    /// --base the ranges changed since an earlier snapshot of the same volume (GetMetadataDelta).
    Blocks {
        /// The snapshot to describe (the later one, with --base).
        snapshot_id: String,
        /// An earlier snapshot of the same volume: list what changed since it.
        #[arg(long, value_name = "SNAPSHOT_ID")]
        base: Option<String>,
        /// The first byte to report from (to resume an interrupted listing).
        #[arg(long, default_value_t = 0, value_name = "BYTES")]
        starting_offset: i64,
        /// Ranges per streamed message; 0 lets the driver choose.
        #[arg(long, default_value_t = 0, value_name = "N")]
        max_results: i32,
    },
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

pub fn block_capability(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(volume_capability::AccessType::Block(volume_capability::BlockVolume {})),
    }
}

/// Connects to a CSI endpoint over its Unix socket. A socket that is missing or refuses is said so,
/// with the system's reason, before any call is tried.
pub async fn connect(endpoint: &str) -> Result<Channel, String> {
    let path = crate::server::socket_path(endpoint).map_err(|e| e.to_string())?;
    if let Err(e) = UnixStream::connect(&path).await {
        return Err(format!("no CSI driver listening at {}: {e}", path.display()));
    }
    Endpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))
}

/// A failed call, as the operator reads it: the gRPC code and the driver's message.
fn failed(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn capacity_range(bytes: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: bytes,
        limit_bytes: 0,
    })
}

pub async fn run(args: CsiArgs) -> Result<(), String> {
    let out = args.output;
    if let CsiCommand::Bench(b) = args.command {
        return bench::run(&args.endpoint, b, out).await;
    }
    let channel = connect(&args.endpoint).await?;
    let mut ctl = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel.clone());
    match args.command {
        CsiCommand::Info => info(IdentityClient::new(channel), ctl, node, out).await,
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
            let v = ctl
                .create_volume(CreateVolumeRequest {
                    name,
                    capacity_range: capacity_range(parse_size(&size)?),
                    volume_capabilities: vec![access.capability()?],
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
                .await
                .map_err(failed)?
                .into_inner()
                .volume
                .unwrap_or_default();
            output::emit(out, output::volume(&v), || format!("{}\n", v.volume_id))?;
            Ok(())
        }
        CsiCommand::Delete { volume_id } => {
            ctl.delete_volume(DeleteVolumeRequest {
                volume_id: volume_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
            done(out, "deleted", "volume_id", &volume_id)?;
            Ok(())
        }
        CsiCommand::List => {
            let mut entries = Vec::new();
            let mut token = String::new();
            loop {
                let r = ctl
                    .list_volumes(ListVolumesRequest {
                        max_entries: 500,
                        starting_token: token,
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                entries.extend(r.entries);
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            let json = entries
                .iter()
                .map(|e| {
                    let mut v = output::volume(&e.volume.clone().unwrap_or_default());
                    let status = e.status.as_ref();
                    v["published_node_ids"] = serde_json::json!(status.map(|s| s.published_node_ids.clone()));
                    v["volume_condition"] = output::condition(status.and_then(|s| s.volume_condition.as_ref()));
                    v
                })
                .collect();
            output::emit(out, serde_json::Value::Array(json), || {
                let mut t = output::Table::new(&["VOLUME ID", "CAPACITY", "TOPOLOGY", "CONDITION"]);
                for e in &entries {
                    let v = e.volume.clone().unwrap_or_default();
                    let cond = e.status.as_ref().and_then(|s| s.volume_condition.as_ref());
                    t.row(vec![
                        v.volume_id,
                        output::size(v.capacity_bytes),
                        output::topology_text(&v.accessible_topology),
                        output::condition_text(cond),
                    ]);
                }
                t.render()
            })?;
            Ok(())
        }
        CsiCommand::Get { volume_id } => {
            let r = ctl
                .controller_get_volume(ControllerGetVolumeRequest { volume_id })
                .await
                .map_err(failed)?
                .into_inner();
            let v = r.volume.unwrap_or_default();
            let status = r.status.unwrap_or_default();
            let mut json = output::volume(&v);
            json["published_node_ids"] = serde_json::json!(status.published_node_ids);
            json["volume_condition"] = output::condition(status.volume_condition.as_ref());
            output::emit(out, json, || {
                let mut context: Vec<String> = v.volume_context.iter().map(|(k, v)| format!("{k}={v}")).collect();
                context.sort();
                output::fields(&[
                    ("volume id", v.volume_id.clone()),
                    ("capacity", output::size(v.capacity_bytes)),
                    ("topology", output::topology_text(&v.accessible_topology)),
                    ("published on", list_or_dash(&status.published_node_ids)),
                    ("condition", output::condition_text(status.volume_condition.as_ref())),
                    ("context", list_or_dash(&context)),
                ])
            })?;
            Ok(())
        }
        CsiCommand::Capacity { params } => {
            let r = ctl
                .get_capacity(GetCapacityRequest {
                    parameters: params.into_iter().collect(),
                    ..Default::default()
                })
                .await
                .map_err(failed)?
                .into_inner();
            let json = serde_json::json!({
                "available_capacity": r.available_capacity,
                "maximum_volume_size": r.maximum_volume_size,
                "minimum_volume_size": r.minimum_volume_size,
            });
            output::emit(out, json, || {
                let opt = |v: Option<i64>| v.map(output::size).unwrap_or_else(|| "-".into());
                output::fields(&[
                    ("available", output::size(r.available_capacity)),
                    ("largest volume", opt(r.maximum_volume_size)),
                    ("smallest volume", opt(r.minimum_volume_size)),
                ])
            })?;
            Ok(())
        }
        CsiCommand::Stage {
            volume_id,
            staging_path,
            access,
        } => {
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging_path.display().to_string(),
                volume_capability: Some(access.capability()?),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
            done(out, "staged", "volume_id", &volume_id)?;
            Ok(())
        }
        CsiCommand::Unstage {
            volume_id,
            staging_path,
        } => {
            node.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging_path.display().to_string(),
            })
            .await
            .map_err(failed)?;
            done(out, "unstaged", "volume_id", &volume_id)?;
            Ok(())
        }
        CsiCommand::Publish {
            volume_id,
            staging_path,
            target,
            readonly,
            access,
        } => {
            node.node_publish_volume(NodePublishVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging_path.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(access.capability()?),
                readonly,
                ..Default::default()
            })
            .await
            .map_err(failed)?;
            done(out, "published", "volume_id", &volume_id)?;
            Ok(())
        }
        CsiCommand::Unpublish { volume_id, target } => {
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target.display().to_string(),
            })
            .await
            .map_err(failed)?;
            done(out, "unpublished", "volume_id", &volume_id)?;
            Ok(())
        }
        CsiCommand::Stats { volume_id, path } => {
            let r = node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path.display().to_string(),
                    staging_target_path: String::new(),
                })
                .await
                .map_err(failed)?
                .into_inner();
            let json = serde_json::json!({
                "usage": r.usage.iter().map(output::usage).collect::<Vec<_>>(),
                "volume_condition": output::condition(r.volume_condition.as_ref()),
            });
            output::emit(out, json, || {
                let mut t = output::Table::new(&["UNIT", "TOTAL", "USED", "AVAILABLE"]);
                for u in &r.usage {
                    let bytes = u.unit == volume_usage::Unit::Bytes as i32;
                    let show = |n: i64| if bytes { output::size(n) } else { n.to_string() };
                    t.row(vec![
                        if bytes { "bytes" } else { "inodes" }.into(),
                        show(u.total),
                        show(u.used),
                        show(u.available),
                    ]);
                }
                format!(
                    "{}\ncondition: {}\n",
                    t.render(),
                    output::condition_text(r.volume_condition.as_ref())
                )
            })?;
            Ok(())
        }
        CsiCommand::Expand { volume_id, size, path } => {
            let bytes = parse_size(&size)?;
            let c = ctl
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: volume_id.clone(),
                    capacity_range: capacity_range(bytes),
                    ..Default::default()
                })
                .await
                .map_err(failed)?
                .into_inner();
            let mut capacity = c.capacity_bytes;
            let mut node_expanded = false;
            if let Some(p) = path {
                capacity = node
                    .node_expand_volume(NodeExpandVolumeRequest {
                        volume_id: volume_id.clone(),
                        volume_path: p.display().to_string(),
                        capacity_range: capacity_range(bytes),
                        ..Default::default()
                    })
                    .await
                    .map_err(failed)?
                    .into_inner()
                    .capacity_bytes;
                node_expanded = true;
            }
            let json = serde_json::json!({
                "volume_id": volume_id,
                "capacity_bytes": capacity,
                "node_expansion_required": c.node_expansion_required,
                "node_expanded": node_expanded,
            });
            output::emit(out, json, || {
                let pending = if c.node_expansion_required && !node_expanded {
                    " (its filesystem grows at the next NodeExpandVolume: pass --path)"
                } else {
                    ""
                };
                format!("expanded {volume_id} to {}{pending}\n", output::size(capacity))
            })?;
            Ok(())
        }
        CsiCommand::Modify { volume_id, params } => {
            ctl.controller_modify_volume(ControllerModifyVolumeRequest {
                volume_id: volume_id.clone(),
                mutable_parameters: params.into_iter().collect(),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
            done(out, "modified", "volume_id", &volume_id)?;
            Ok(())
        }
        CsiCommand::Snapshot {
            name,
            source_volume_id,
            params,
        } => {
            let s = ctl
                .create_snapshot(CreateSnapshotRequest {
                    name,
                    source_volume_id,
                    parameters: params.into_iter().collect(),
                    ..Default::default()
                })
                .await
                .map_err(failed)?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            output::emit(out, output::snapshot(&s), || format!("{}\n", s.snapshot_id))?;
            Ok(())
        }
        CsiCommand::GetSnapshot { snapshot_id } => {
            let s = ctl
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id,
                    ..Default::default()
                })
                .await
                .map_err(failed)?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            output::emit(out, output::snapshot(&s), || {
                output::snapshot_table(std::slice::from_ref(&s))
            })?;
            Ok(())
        }
        CsiCommand::DeleteSnapshot { snapshot_id } => {
            ctl.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
            done(out, "deleted", "snapshot_id", &snapshot_id)?;
            Ok(())
        }
        CsiCommand::Snapshots { source_volume_id } => {
            let mut snaps = Vec::new();
            let mut token = String::new();
            loop {
                let r = ctl
                    .list_snapshots(ListSnapshotsRequest {
                        max_entries: 500,
                        starting_token: token,
                        source_volume_id: source_volume_id.clone().unwrap_or_default(),
                        ..Default::default()
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                snaps.extend(r.entries.into_iter().filter_map(|e| e.snapshot));
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            let json = serde_json::Value::Array(snaps.iter().map(output::snapshot).collect());
            output::emit(out, json, || output::snapshot_table(&snaps))?;
            Ok(())
        }
        CsiCommand::Blocks {
            snapshot_id,
            base,
            starting_offset,
            max_results,
        } => blocks(channel, snapshot_id, base, starting_offset, max_results, out).await,
        CsiCommand::Bench(_) => Ok(()), // run above, before connecting
    }
}

/// `blocks`: every message of the stream gathered, then one table (or JSON document).
async fn blocks(
    channel: Channel,
    snapshot_id: String,
    base: Option<String>,
    starting_offset: i64,
    max_results: i32,
    out: output::Format,
) -> Result<(), String> {
    use crate::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
    let mut client = SnapshotMetadataClient::new(channel);
    let mut capacity = 0;
    let mut ranges: Vec<BlockMetadata> = Vec::new();
    if let Some(base_snapshot_id) = base {
        let req = GetMetadataDeltaRequest {
            base_snapshot_id,
            target_snapshot_id: snapshot_id,
            starting_offset,
            max_results,
            ..Default::default()
        };
        let mut s = client.get_metadata_delta(req).await.map_err(failed)?.into_inner();
        while let Some(m) = s.message().await.map_err(failed)? {
            capacity = m.volume_capacity_bytes;
            ranges.extend(m.block_metadata);
        }
    } else {
        let req = GetMetadataAllocatedRequest {
            snapshot_id,
            starting_offset,
            max_results,
            ..Default::default()
        };
        let mut s = client.get_metadata_allocated(req).await.map_err(failed)?.into_inner();
        while let Some(m) = s.message().await.map_err(failed)? {
            capacity = m.volume_capacity_bytes;
            ranges.extend(m.block_metadata);
        }
    }
    let total: i64 = ranges.iter().map(|r| r.size_bytes).sum();
    let json = serde_json::json!({
        "volume_capacity_bytes": capacity,
        "block_metadata": ranges
            .iter()
            .map(|r| serde_json::json!({"byte_offset": r.byte_offset, "size_bytes": r.size_bytes}))
            .collect::<Vec<_>>(),
    });
    output::emit(out, json, || {
        let mut t = output::Table::new(&["OFFSET", "LENGTH", "SIZE"]);
        for r in &ranges {
            t.row(vec![
                r.byte_offset.to_string(),
                r.size_bytes.to_string(),
                output::size(r.size_bytes),
            ]);
        }
        format!(
            "{}{} ranges, {} of a {} volume\n",
            t.render(),
            ranges.len(),
            output::size(total),
            output::size(capacity)
        )
    })?;
    Ok(())
}

/// The answer of a call that returns nothing: `<verb> <id>`, or `{"<key>": "<id>"}`.
fn done(out: output::Format, verb: &str, key: &str, id: &str) -> Result<(), String> {
    output::emit(out, serde_json::json!({ key: id }), || format!("{verb} {id}\n"))
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// `cellar csi info`: Identity, then whichever of Controller and Node the plugin serves.
async fn info(
    mut id: IdentityClient<Channel>,
    mut ctl: ControllerClient<Channel>,
    mut node: NodeClient<Channel>,
    out: output::Format,
) -> Result<(), String> {
    use plugin_capability::Type as PluginType;
    let plugin = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .map_err(failed)?
        .into_inner();
    let plugin_caps: Vec<String> = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .map_err(failed)?
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match c.r#type.as_ref()? {
            PluginType::Service(s) => plugin_capability::service::Type::try_from(s.r#type)
                .ok()
                .map(|t| t.as_str_name().to_string()),
            PluginType::VolumeExpansion(v) => plugin_capability::volume_expansion::Type::try_from(v.r#type)
                .ok()
                .map(|t| format!("VOLUME_EXPANSION_{}", t.as_str_name())),
        })
        .collect();
    let ready = id.probe(ProbeRequest {}).await.map_err(failed)?.into_inner().ready;
    // A node-only or controller-only plugin answers just one of these; show what it has.
    let controller_caps: Option<Vec<String>> = ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .ok()
        .map(|r| {
            r.into_inner()
                .capabilities
                .iter()
                .filter_map(|c| match c.r#type.as_ref()? {
                    controller_service_capability::Type::Rpc(r) => {
                        controller_service_capability::rpc::Type::try_from(r.r#type)
                            .ok()
                            .map(|t| t.as_str_name().to_string())
                    }
                })
                .collect()
        });
    let node_caps: Option<Vec<String>> = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .ok()
        .map(|r| {
            r.into_inner()
                .capabilities
                .iter()
                .filter_map(|c| match c.r#type.as_ref()? {
                    node_service_capability::Type::Rpc(r) => node_service_capability::rpc::Type::try_from(r.r#type)
                        .ok()
                        .map(|t| t.as_str_name().to_string()),
                })
                .collect()
        });
    let node_info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .ok()
        .map(|r| r.into_inner());
    let json = serde_json::json!({
        "name": plugin.name,
        "vendor_version": plugin.vendor_version,
        "manifest": plugin.manifest,
        "ready": ready,
        "plugin_capabilities": plugin_caps,
        "controller_capabilities": controller_caps,
        "node_capabilities": node_caps,
        "node": node_info.as_ref().map(|n| serde_json::json!({
            "node_id": n.node_id,
            "max_volumes_per_node": n.max_volumes_per_node,
            "accessible_topology": n.accessible_topology.as_ref().map(|t| t.segments.clone()),
        })),
    });
    output::emit(out, json, || {
        let caps = |c: &Option<Vec<String>>| match c {
            Some(c) => c.join(", "),
            None => "- (not served)".into(),
        };
        let ready = match ready {
            Some(true) => "yes".to_string(),
            Some(false) => "no (see the driver's /readyz or log for why)".to_string(),
            None => "unknown".to_string(),
        };
        let mut pairs = vec![
            ("name", plugin.name.clone()),
            ("version", plugin.vendor_version.clone()),
            ("ready", ready),
            ("plugin capabilities", plugin_caps.join(", ")),
            ("controller capabilities", caps(&controller_caps)),
            ("node capabilities", caps(&node_caps)),
        ];
        if let Some(n) = &node_info {
            pairs.push(("node", n.node_id.clone()));
            pairs.push(("topology", output::topology_text(n.accessible_topology.as_slice())));
            let max = match n.max_volumes_per_node {
                0 => "no limit".to_string(),
                m => m.to_string(),
            };
            pairs.push(("max volumes", max));
        }
        output::fields(&pairs)
    })?;
    Ok(())
}
