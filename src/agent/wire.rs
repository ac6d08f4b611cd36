//! The agent protocol on the wire: the generated `cellar.agent.v1` types, and the one place where
//! records, requests, pool statuses and storage errors turn into messages and back.
//!
//! Encoding never fails. Decoding checks what our own types guarantee (known enum values, valid
//! pool names and IDs) and says which field was wrong; the server answers such a request with
//! INVALID_ARGUMENT, the client treats such a reply as an internal error naming the node.

use std::io;
use std::path::PathBuf;

use prost::Message;
use tonic::codegen::Bytes;
use tonic::{Code, Status};

use crate::storage::config::DeletePolicy;
use crate::storage::engine::{CapacityRange, Condition, Mutable, NewGroup, NewVolume, Ownership, PoolStatus, Source};
use crate::storage::id::{BackupId, GroupId, NodeId, PoolName, SnapshotId, StaticId, VolumeId};
use crate::storage::record::{
    AccessMode, ContentSource, GroupMember, GroupRecord, Layout, SnapshotRecord, VolumeMode, VolumeRecord,
};
use crate::storage::transfer::{Frame, Header};
use crate::storage::StorageError;
use crate::sys::tree::Meta;
use crate::sys::SysError;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cellar.agent.v1");
}

use v1::storage_failure::{self as failure, Kind};

/// A message that does not hold what it must, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn bad(field: &str, why: impl std::fmt::Display) -> WireError {
    WireError(format!("{field}: {why}"))
}

fn required<T>(field: &str, m: Option<T>) -> Result<T, WireError> {
    m.ok_or_else(|| bad(field, "is required"))
}

// --- enums -------------------------------------------------------------------------------------

impl From<Layout> for v1::Layout {
    fn from(l: Layout) -> Self {
        match l {
            Layout::Dir => v1::Layout::Dir,
            Layout::Btrfs => v1::Layout::Btrfs,
            Layout::Image => v1::Layout::Image,
        }
    }
}

/// A layout field where UNSPECIFIED means "not set".
fn optional_layout(field: &str, raw: i32) -> Result<Option<Layout>, WireError> {
    match v1::Layout::try_from(raw) {
        Ok(v1::Layout::Unspecified) => Ok(None),
        Ok(v1::Layout::Dir) => Ok(Some(Layout::Dir)),
        Ok(v1::Layout::Btrfs) => Ok(Some(Layout::Btrfs)),
        Ok(v1::Layout::Image) => Ok(Some(Layout::Image)),
        Err(_) => Err(bad(field, format!("{raw} is not a layout"))),
    }
}

fn layout(field: &str, raw: i32) -> Result<Layout, WireError> {
    optional_layout(field, raw)?.ok_or_else(|| bad(field, "is required"))
}

impl From<VolumeMode> for v1::VolumeMode {
    fn from(m: VolumeMode) -> Self {
        match m {
            VolumeMode::Filesystem => v1::VolumeMode::Filesystem,
            VolumeMode::Block => v1::VolumeMode::Block,
        }
    }
}

fn volume_mode(field: &str, raw: i32) -> Result<VolumeMode, WireError> {
    match v1::VolumeMode::try_from(raw) {
        Ok(v1::VolumeMode::Filesystem) => Ok(VolumeMode::Filesystem),
        Ok(v1::VolumeMode::Block) => Ok(VolumeMode::Block),
        Ok(v1::VolumeMode::Unspecified) => Err(bad(field, "is required")),
        Err(_) => Err(bad(field, format!("{raw} is not a volume mode"))),
    }
}

impl From<AccessMode> for v1::AccessMode {
    fn from(m: AccessMode) -> Self {
        match m {
            AccessMode::SingleNodeWriter => v1::AccessMode::SingleNodeWriter,
            AccessMode::SingleNodeReaderOnly => v1::AccessMode::SingleNodeReaderOnly,
            AccessMode::SingleNodeSingleWriter => v1::AccessMode::SingleNodeSingleWriter,
            AccessMode::SingleNodeMultiWriter => v1::AccessMode::SingleNodeMultiWriter,
            AccessMode::MultiNodeReaderOnly => v1::AccessMode::MultiNodeReaderOnly,
            AccessMode::MultiNodeSingleWriter => v1::AccessMode::MultiNodeSingleWriter,
            AccessMode::MultiNodeMultiWriter => v1::AccessMode::MultiNodeMultiWriter,
        }
    }
}

fn access_modes(field: &str, raw: &[i32]) -> Result<Vec<AccessMode>, WireError> {
    raw.iter()
        .map(|&m| match v1::AccessMode::try_from(m) {
            Ok(v1::AccessMode::SingleNodeWriter) => Ok(AccessMode::SingleNodeWriter),
            Ok(v1::AccessMode::SingleNodeReaderOnly) => Ok(AccessMode::SingleNodeReaderOnly),
            Ok(v1::AccessMode::SingleNodeSingleWriter) => Ok(AccessMode::SingleNodeSingleWriter),
            Ok(v1::AccessMode::SingleNodeMultiWriter) => Ok(AccessMode::SingleNodeMultiWriter),
            Ok(v1::AccessMode::MultiNodeReaderOnly) => Ok(AccessMode::MultiNodeReaderOnly),
            Ok(v1::AccessMode::MultiNodeSingleWriter) => Ok(AccessMode::MultiNodeSingleWriter),
            Ok(v1::AccessMode::MultiNodeMultiWriter) => Ok(AccessMode::MultiNodeMultiWriter),
            Ok(v1::AccessMode::Unspecified) | Err(_) => Err(bad(field, format!("{m} is not an access mode"))),
        })
        .collect()
}

fn delete_policy_to(p: Option<DeletePolicy>) -> i32 {
    let p = match p {
        None => v1::DeletePolicy::Unspecified,
        Some(DeletePolicy::Delete) => v1::DeletePolicy::Delete,
        Some(DeletePolicy::Retain) => v1::DeletePolicy::Retain,
        Some(DeletePolicy::Archive) => v1::DeletePolicy::Archive,
    };
    p as i32
}

fn delete_policy(field: &str, raw: i32) -> Result<Option<DeletePolicy>, WireError> {
    match v1::DeletePolicy::try_from(raw) {
        Ok(v1::DeletePolicy::Unspecified) => Ok(None),
        Ok(v1::DeletePolicy::Delete) => Ok(Some(DeletePolicy::Delete)),
        Ok(v1::DeletePolicy::Retain) => Ok(Some(DeletePolicy::Retain)),
        Ok(v1::DeletePolicy::Archive) => Ok(Some(DeletePolicy::Archive)),
        Err(_) => Err(bad(field, format!("{raw} is not a delete policy"))),
    }
}

// --- IDs and names -----------------------------------------------------------------------------

pub fn volume_id(field: &str, raw: &str) -> Result<VolumeId, WireError> {
    if raw.is_empty() {
        return Err(bad(field, "is required"));
    }
    VolumeId::parse(raw).map_err(|e| bad(field, e))
}

pub fn snapshot_id(field: &str, raw: &str) -> Result<SnapshotId, WireError> {
    if raw.is_empty() {
        return Err(bad(field, "is required"));
    }
    SnapshotId::parse(raw).map_err(|e| bad(field, e))
}

pub fn backup_id(field: &str, raw: &str) -> Result<BackupId, WireError> {
    if raw.is_empty() {
        return Err(bad(field, "is required"));
    }
    BackupId::parse(raw).map_err(|e| bad(field, e))
}

pub fn group_id(field: &str, raw: &str) -> Result<GroupId, WireError> {
    if raw.is_empty() {
        return Err(bad(field, "is required"));
    }
    GroupId::parse(raw).map_err(|e| bad(field, e))
}

pub fn static_id(field: &str, raw: &str) -> Result<StaticId, WireError> {
    StaticId::parse(raw).map_err(|e| bad(field, e))
}

pub fn node_id(field: &str, raw: &str) -> Result<NodeId, WireError> {
    NodeId::parse(raw).map_err(|e| bad(field, e))
}

pub fn pool_name(field: &str, raw: &str) -> Result<PoolName, WireError> {
    PoolName::parse(raw).map_err(|e| bad(field, e))
}

/// A CSI name, the idempotency key of creates.
pub fn name(field: &str, raw: String) -> Result<String, WireError> {
    if raw.is_empty() {
        return Err(bad(field, "is required"));
    }
    short(field, raw, MAX_NAME)
}

// --- records -----------------------------------------------------------------------------------

/// The longest CSI name a record may carry. CSI allows 128 bytes, Kubernetes names 253: a record
/// naming more is a bad answer, never a name the controller keeps (its listings hold each name).
pub const MAX_NAME: usize = 1024;
/// The longest filesystem type a record may carry (`ext4`, `xfs`; CSI's strings are 128 bytes).
pub const MAX_FS_TYPE: usize = 128;
/// The most parameters a record may carry, and their bytes (keys and values) in all: the
/// controller takes only its own few keys and the sidecars' (`csi.storage.k8s.io/*`). Protobuf
/// decodes each map entry of a few bytes into two strings in a tree: unbounded, one record of
/// 44,000 tiny entries cost the controller 4 MiB.
pub const MAX_PARAMETERS: usize = 64;
pub const MAX_PARAMETER_BYTES: usize = 16 << 10;

/// A text field of a record, at most `max` bytes.
fn short(field: &str, raw: String, max: usize) -> Result<String, WireError> {
    if raw.len() > max {
        return Err(bad(field, format!("is {} bytes, more than {max}", raw.len())));
    }
    Ok(raw)
}

/// A record's parameters, within [`MAX_PARAMETERS`] and [`MAX_PARAMETER_BYTES`].
fn parameters(
    field: &str,
    p: std::collections::BTreeMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, WireError> {
    let bytes: usize = p.iter().map(|(k, v)| k.len() + v.len()).sum();
    if p.len() > MAX_PARAMETERS || bytes > MAX_PARAMETER_BYTES {
        return Err(bad(
            field,
            format!(
                "holds {} entries of {bytes} bytes, more than {MAX_PARAMETERS} or {MAX_PARAMETER_BYTES}",
                p.len()
            ),
        ));
    }
    Ok(p)
}

impl From<&ContentSource> for v1::ContentSource {
    fn from(s: &ContentSource) -> Self {
        use v1::content_source::Kind;
        v1::ContentSource {
            kind: Some(match s {
                ContentSource::Snapshot(id) => Kind::SnapshotId(id.to_string()),
                ContentSource::Volume(id) => Kind::VolumeId(id.to_string()),
                ContentSource::Backup(id) => Kind::BackupId(id.to_string()),
            }),
        }
    }
}

fn content_source(field: &str, m: v1::ContentSource) -> Result<ContentSource, WireError> {
    use v1::content_source::Kind;
    match m.kind {
        Some(Kind::SnapshotId(id)) => Ok(ContentSource::Snapshot(snapshot_id(field, &id)?)),
        Some(Kind::VolumeId(id)) => Ok(ContentSource::Volume(volume_id(field, &id)?)),
        Some(Kind::BackupId(id)) => Ok(ContentSource::Backup(backup_id(field, &id)?)),
        None => Err(bad(field, "names neither a snapshot nor a volume")),
    }
}

impl From<&VolumeRecord> for v1::VolumeRecord {
    fn from(r: &VolumeRecord) -> Self {
        v1::VolumeRecord {
            version: r.version,
            name: r.name.clone(),
            id: r.id.to_string(),
            layout: v1::Layout::from(r.layout) as i32,
            capacity_bytes: r.capacity_bytes,
            mode: v1::VolumeMode::from(r.mode) as i32,
            access_modes: r.access_modes.iter().map(|&m| v1::AccessMode::from(m) as i32).collect(),
            fs_type: r.fs_type.clone(),
            parameters: r.parameters.clone(),
            source: r.source.as_ref().map(v1::ContentSource::from),
            created_unix_secs: r.created_unix_secs,
            delete_policy: delete_policy_to(r.delete_policy),
            compression: r.compression.clone(),
            fs_bytes: r.fs_bytes,
        }
    }
}

impl TryFrom<v1::VolumeRecord> for VolumeRecord {
    type Error = WireError;
    fn try_from(m: v1::VolumeRecord) -> Result<Self, WireError> {
        Ok(VolumeRecord {
            version: m.version,
            layout: layout("volume.layout", m.layout)?,
            mode: volume_mode("volume.mode", m.mode)?,
            access_modes: access_modes("volume.access_modes", &m.access_modes)?,
            source: m.source.map(|s| content_source("volume.source", s)).transpose()?,
            delete_policy: delete_policy("volume.delete_policy", m.delete_policy)?,
            id: volume_id("volume.id", &m.id)?,
            name: short("volume.name", m.name, MAX_NAME)?,
            capacity_bytes: m.capacity_bytes,
            fs_type: short("volume.fs_type", m.fs_type, MAX_FS_TYPE)?,
            parameters: parameters("volume.parameters", m.parameters)?,
            created_unix_secs: m.created_unix_secs,
            compression: m.compression,
            fs_bytes: m.fs_bytes,
        })
    }
}

impl From<&SnapshotRecord> for v1::SnapshotRecord {
    fn from(r: &SnapshotRecord) -> Self {
        v1::SnapshotRecord {
            version: r.version,
            name: r.name.clone(),
            id: r.id.to_string(),
            source_volume_id: r.source_volume_id.to_string(),
            size_bytes: r.size_bytes,
            created_unix_secs: r.created_unix_secs,
            created_nanos: r.created_nanos,
            layout: v1::Layout::from(r.layout) as i32,
            mode: v1::VolumeMode::from(r.mode) as i32,
            fs_bytes: r.fs_bytes,
            group_snapshot_id: r.group.as_ref().map(ToString::to_string).unwrap_or_default(),
            backup_id: r.backup.as_ref().map(|b| b.id.to_string()).unwrap_or_default(),
            backup_keep_local: r.backup.as_ref().is_some_and(|b| b.keep_local),
            backup_uploaded: r.backup.as_ref().is_some_and(|b| b.uploaded),
        }
    }
}

impl TryFrom<v1::SnapshotRecord> for SnapshotRecord {
    type Error = WireError;
    fn try_from(m: v1::SnapshotRecord) -> Result<Self, WireError> {
        Ok(SnapshotRecord {
            version: m.version,
            layout: layout("snapshot.layout", m.layout)?,
            mode: volume_mode("snapshot.mode", m.mode)?,
            id: snapshot_id("snapshot.id", &m.id)?,
            source_volume_id: volume_id("snapshot.source_volume_id", &m.source_volume_id)?,
            group: Some(m.group_snapshot_id.as_str())
                .filter(|g| !g.is_empty())
                .map(|g| group_id("snapshot.group_snapshot_id", g))
                .transpose()?,
            backup: Some(m.backup_id.as_str())
                .filter(|b| !b.is_empty())
                .map(|b| backup_id("snapshot.backup_id", b))
                .transpose()?
                .map(|id| crate::storage::record::BackupMark {
                    id,
                    keep_local: m.backup_keep_local,
                    uploaded: m.backup_uploaded,
                }),
            name: short("snapshot.name", m.name, MAX_NAME)?,
            size_bytes: m.size_bytes,
            created_unix_secs: m.created_unix_secs,
            created_nanos: m.created_nanos,
            fs_bytes: m.fs_bytes,
        })
    }
}

impl From<&GroupRecord> for v1::GroupRecord {
    fn from(r: &GroupRecord) -> Self {
        v1::GroupRecord {
            version: r.version,
            name: r.name.clone(),
            id: r.id.to_string(),
            members: r
                .members
                .iter()
                .map(|m| v1::GroupMember {
                    volume_id: m.volume_id.to_string(),
                    snapshot_id: m.snapshot_id.to_string(),
                    size_bytes: m.size_bytes,
                })
                .collect(),
            parameters: r.parameters.clone(),
            created_unix_secs: r.created_unix_secs,
            created_nanos: r.created_nanos,
        }
    }
}

impl TryFrom<v1::GroupRecord> for GroupRecord {
    type Error = WireError;
    fn try_from(m: v1::GroupRecord) -> Result<Self, WireError> {
        Ok(GroupRecord {
            version: m.version,
            id: group_id("group.id", &m.id)?,
            name: short("group.name", m.name, MAX_NAME)?,
            members: m
                .members
                .into_iter()
                .map(|g| {
                    Ok(GroupMember {
                        volume_id: volume_id("group.members.volume_id", &g.volume_id)?,
                        snapshot_id: snapshot_id("group.members.snapshot_id", &g.snapshot_id)?,
                        size_bytes: g.size_bytes,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            parameters: parameters("group.parameters", m.parameters)?,
            created_unix_secs: m.created_unix_secs,
            created_nanos: m.created_nanos,
        })
    }
}

impl From<&NewGroup> for v1::CreateGroupRequest {
    fn from(r: &NewGroup) -> Self {
        v1::CreateGroupRequest {
            name: r.name.clone(),
            volume_ids: r.members.iter().map(ToString::to_string).collect(),
            parameters: r.parameters.clone(),
            per_volume: r.per_volume,
            freeze_timeout_millis: r.freeze_timeout.as_millis() as u64,
        }
    }
}

impl TryFrom<v1::CreateGroupRequest> for NewGroup {
    type Error = WireError;
    fn try_from(m: v1::CreateGroupRequest) -> Result<Self, WireError> {
        let members = m
            .volume_ids
            .iter()
            .map(|v| volume_id("volume_ids", v))
            .collect::<Result<Vec<_>, _>>()?;
        if members.is_empty() {
            return Err(bad("volume_ids", "is required"));
        }
        if m.freeze_timeout_millis == 0 {
            return Err(bad("freeze_timeout_millis", "is required"));
        }
        Ok(NewGroup {
            name: name("name", m.name)?,
            members,
            parameters: parameters("parameters", m.parameters)?,
            per_volume: m.per_volume,
            freeze_timeout: std::time::Duration::from_millis(m.freeze_timeout_millis),
        })
    }
}

impl From<&Condition> for v1::Condition {
    fn from(c: &Condition) -> Self {
        v1::Condition {
            abnormal: c.abnormal,
            message: c.message.clone(),
        }
    }
}

/// A node's condition of a volume: its message is cut to [`crate::csi::status::MAX_MESSAGE`], as
/// every message the controller passes on is (it reaches ListVolumes and the health monitor).
impl From<v1::Condition> for Condition {
    fn from(c: v1::Condition) -> Self {
        let message = match crate::csi::status::bounded(&c.message) {
            std::borrow::Cow::Borrowed(_) => c.message,
            cut => cut.into_owned(),
        };
        Condition {
            abnormal: c.abnormal,
            message,
        }
    }
}

pub fn volume_with_condition(r: &VolumeRecord, c: &Condition) -> v1::VolumeWithCondition {
    v1::VolumeWithCondition {
        volume: Some(r.into()),
        condition: Some(c.into()),
    }
}

pub fn volume_and_condition(m: v1::VolumeWithCondition) -> Result<(VolumeRecord, Condition), WireError> {
    let r = required("volume", m.volume)?.try_into()?;
    let c = required("condition", m.condition)?.into();
    Ok((r, c))
}

impl From<&PoolStatus> for v1::PoolStatus {
    fn from(p: &PoolStatus) -> Self {
        v1::PoolStatus {
            name: p.name.as_str().to_string(),
            is_default: p.is_default,
            default_layout: v1::Layout::from(p.default_layout) as i32,
            layouts: p.layouts.iter().map(|&l| v1::Layout::from(l) as i32).collect(),
            total_bytes: p.total_bytes,
            available_bytes: p.available_bytes,
            image_allocatable_bytes: p.image_allocatable_bytes,
            provisioned_bytes: p.provisioned_bytes,
            shared: p.shared,
        }
    }
}

impl TryFrom<v1::PoolStatus> for PoolStatus {
    type Error = WireError;
    fn try_from(m: v1::PoolStatus) -> Result<Self, WireError> {
        Ok(PoolStatus {
            name: pool_name("pool.name", &m.name)?,
            is_default: m.is_default,
            default_layout: layout("pool.default_layout", m.default_layout)?,
            layouts: m
                .layouts
                .iter()
                .map(|&l| layout("pool.layouts", l))
                .collect::<Result<_, _>>()?,
            total_bytes: m.total_bytes,
            available_bytes: m.available_bytes,
            image_allocatable_bytes: m.image_allocatable_bytes,
            provisioned_bytes: m.provisioned_bytes,
            shared: m.shared,
        })
    }
}

pub fn pools(m: Vec<v1::PoolStatus>) -> Result<Vec<PoolStatus>, WireError> {
    m.into_iter().map(PoolStatus::try_from).collect()
}

// --- requests ----------------------------------------------------------------------------------

impl From<CapacityRange> for v1::CapacityRange {
    fn from(c: CapacityRange) -> Self {
        v1::CapacityRange {
            required_bytes: c.required,
            limit_bytes: c.limit,
        }
    }
}

/// An absent range asks for nothing in particular, like an empty CSI capacity range.
pub fn capacity(m: Option<v1::CapacityRange>) -> CapacityRange {
    m.map(|c| CapacityRange {
        required: c.required_bytes,
        limit: c.limit_bytes,
    })
    .unwrap_or_default()
}

impl From<&Mutable> for v1::MutableParameters {
    fn from(m: &Mutable) -> Self {
        v1::MutableParameters {
            compression: m.compression.clone(),
            delete_policy: delete_policy_to(m.delete_policy),
        }
    }
}

pub fn mutable(m: Option<v1::MutableParameters>) -> Result<Mutable, WireError> {
    let Some(m) = m else {
        return Ok(Mutable::default());
    };
    Ok(Mutable {
        delete_policy: delete_policy("mutable_parameters.delete_policy", m.delete_policy)?,
        compression: m.compression,
    })
}

impl From<Ownership> for v1::Ownership {
    fn from(o: Ownership) -> Self {
        v1::Ownership {
            uid: o.uid,
            gid: o.gid,
            mode: o.mode,
        }
    }
}

/// An absent ownership leaves every field to the default.
pub fn ownership(m: Option<v1::Ownership>) -> Ownership {
    m.map(|o| Ownership {
        uid: o.uid,
        gid: o.gid,
        mode: o.mode,
    })
    .unwrap_or_default()
}

impl From<&Source> for v1::ContentSource {
    fn from(s: &Source) -> Self {
        use v1::content_source::Kind;
        v1::ContentSource {
            kind: Some(match s {
                Source::Snapshot(id) => Kind::SnapshotId(id.to_string()),
                Source::Volume(id) => Kind::VolumeId(id.to_string()),
                Source::Backup(id) => Kind::BackupId(id.to_string()),
            }),
        }
    }
}

pub fn source(m: v1::ContentSource) -> Result<Source, WireError> {
    use v1::content_source::Kind;
    match m.kind {
        Some(Kind::SnapshotId(id)) => Ok(Source::Snapshot(snapshot_id("source.snapshot_id", &id)?)),
        Some(Kind::VolumeId(id)) => Ok(Source::Volume(volume_id("source.volume_id", &id)?)),
        Some(Kind::BackupId(id)) => Ok(Source::Backup(backup_id("source.backup_id", &id)?)),
        None => Err(bad("source", "names neither a snapshot nor a volume")),
    }
}

impl From<&NewVolume> for v1::CreateVolumeRequest {
    fn from(v: &NewVolume) -> Self {
        v1::CreateVolumeRequest {
            name: v.name.clone(),
            pool: v.pool.as_ref().map(|p| p.as_str().to_string()),
            layout: v.layout.map_or(v1::Layout::Unspecified, v1::Layout::from) as i32,
            capacity: Some(v.capacity.into()),
            mode: v1::VolumeMode::from(v.mode) as i32,
            access_modes: v.access_modes.iter().map(|&m| v1::AccessMode::from(m) as i32).collect(),
            fs_type: v.fs_type.clone(),
            parameters: v.parameters.clone(),
            source: v.source.as_ref().map(v1::ContentSource::from),
            delete_policy: delete_policy_to(v.delete_policy),
            mutable_parameters: Some((&v.mutable).into()),
            owner: Some(v.owner.into()),
        }
    }
}

impl TryFrom<v1::CreateVolumeRequest> for NewVolume {
    type Error = WireError;
    fn try_from(m: v1::CreateVolumeRequest) -> Result<Self, WireError> {
        Ok(NewVolume {
            name: name("name", m.name)?,
            pool: m.pool.as_deref().map(|p| pool_name("pool", p)).transpose()?,
            layout: optional_layout("layout", m.layout)?,
            capacity: capacity(m.capacity),
            mode: volume_mode("mode", m.mode)?,
            access_modes: access_modes("access_modes", &m.access_modes)?,
            fs_type: short("fs_type", m.fs_type, MAX_FS_TYPE)?,
            parameters: parameters("parameters", m.parameters)?,
            source: m.source.map(source).transpose()?,
            delete_policy: delete_policy("delete_policy", m.delete_policy)?,
            mutable: mutable(m.mutable_parameters)?,
            owner: ownership(m.owner),
        })
    }
}

// --- copies between nodes -----------------------------------------------------------------------

impl From<Meta> for v1::EntryMeta {
    fn from(m: Meta) -> Self {
        v1::EntryMeta {
            uid: m.uid,
            gid: m.gid,
            mode: m.mode,
            atime_secs: m.atime.0,
            atime_nanos: m.atime.1 as i32,
            mtime_secs: m.mtime.0,
            mtime_nanos: m.mtime.1 as i32,
            xattrs: m
                .xattrs
                .into_iter()
                .map(|(name, value)| v1::Xattr { name, value })
                .collect(),
        }
    }
}

fn entry_meta(field: &str, m: Option<v1::EntryMeta>) -> Result<Meta, WireError> {
    let m = required(field, m)?;
    Ok(Meta {
        uid: m.uid,
        gid: m.gid,
        mode: m.mode,
        atime: (m.atime_secs, m.atime_nanos as i64),
        mtime: (m.mtime_secs, m.mtime_nanos as i64),
        xattrs: m.xattrs.into_iter().map(|x| (x.name, x.value)).collect(),
    })
}

fn sha256(field: &str, raw: Vec<u8>) -> Result<[u8; 32], WireError> {
    raw.try_into().map_err(|_| bad(field, "is not 32 bytes"))
}

impl From<Frame> for v1::DataFrame {
    fn from(f: Frame) -> Self {
        use v1::data_frame::{self as df, Kind};
        let kind = match f {
            Frame::Header(h) => Kind::Header(df::Header {
                layout: v1::Layout::from(h.layout) as i32,
                mode: v1::VolumeMode::from(h.mode) as i32,
                capacity_bytes: h.capacity_bytes,
                fs_bytes: h.fs_bytes,
                length: h.length,
            }),
            Frame::Dir { name } => Kind::Dir(df::Dir { name }),
            Frame::Leave { meta } => Kind::Leave(df::Leave {
                meta: Some(meta.into()),
            }),
            Frame::File { name, meta, size, link } => Kind::File(df::File {
                name,
                meta: Some(meta.into()),
                size,
                link,
            }),
            Frame::HardLink { name, link } => Kind::HardLink(df::HardLink { name, link }),
            Frame::Symlink { name, target, meta } => Kind::Symlink(df::Symlink {
                name,
                target,
                meta: Some(meta.into()),
            }),
            Frame::Special { name, mode, rdev, meta } => Kind::Special(df::Special {
                name,
                mode,
                rdev,
                meta: Some(meta.into()),
            }),
            Frame::Chunk { offset, data, checksum } => Kind::Chunk(df::Chunk {
                offset,
                data,
                sha256: checksum.to_vec(),
            }),
            Frame::End { frames, bytes, digest } => Kind::End(df::End {
                frames,
                bytes,
                sha256: digest.to_vec(),
            }),
        };
        v1::DataFrame { kind: Some(kind) }
    }
}

impl TryFrom<v1::DataFrame> for Frame {
    type Error = WireError;
    fn try_from(m: v1::DataFrame) -> Result<Self, WireError> {
        use v1::data_frame::Kind;
        Ok(match required("frame", m.kind)? {
            Kind::Header(h) => Frame::Header(Header {
                layout: layout("header.layout", h.layout)?,
                mode: volume_mode("header.mode", h.mode)?,
                capacity_bytes: h.capacity_bytes,
                fs_bytes: h.fs_bytes,
                length: h.length,
            }),
            Kind::Dir(d) => Frame::Dir { name: d.name },
            Kind::Leave(l) => Frame::Leave {
                meta: entry_meta("leave.meta", l.meta)?,
            },
            Kind::File(f) => Frame::File {
                name: f.name,
                meta: entry_meta("file.meta", f.meta)?,
                size: f.size,
                link: f.link,
            },
            Kind::HardLink(h) => Frame::HardLink {
                name: h.name,
                link: h.link,
            },
            Kind::Symlink(l) => Frame::Symlink {
                name: l.name,
                target: l.target,
                meta: entry_meta("symlink.meta", l.meta)?,
            },
            Kind::Special(x) => Frame::Special {
                name: x.name,
                mode: x.mode,
                rdev: x.rdev,
                meta: entry_meta("special.meta", x.meta)?,
            },
            Kind::Chunk(c) => Frame::Chunk {
                offset: c.offset,
                data: c.data,
                checksum: sha256("chunk.sha256", c.sha256)?,
            },
            Kind::End(e) => Frame::End {
                frames: e.frames,
                bytes: e.bytes,
                digest: sha256("end.sha256", e.sha256)?,
            },
        })
    }
}

// --- errors ------------------------------------------------------------------------------------

/// The `type_url` of a [`v1::StorageFailure`] packed in a `google.protobuf.Any`.
pub const STORAGE_FAILURE_TYPE: &str = "type.googleapis.com/cellar.agent.v1.StorageFailure";

/// `google.rpc.Status`, the conventional content of grpc-status-details-bin, so that generic tools
/// (grpcurl) can read our details too.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

impl From<&StorageError> for v1::StorageFailure {
    fn from(e: &StorageError) -> Self {
        let kind = match e {
            StorageError::UnknownPool { name, known } => Kind::UnknownPool(failure::UnknownPool {
                name: name.clone(),
                known: known.clone(),
            }),
            StorageError::LayoutNotAllowed { layout, pool, allowed } => {
                Kind::LayoutNotAllowed(failure::LayoutNotAllowed {
                    layout: layout.clone(),
                    pool: pool.clone(),
                    allowed: allowed.clone(),
                })
            }
            StorageError::VolumeNotFound(s) => Kind::VolumeNotFound(s.clone()),
            StorageError::SnapshotNotFound(s) => Kind::SnapshotNotFound(s.clone()),
            StorageError::Conflict(s) => Kind::Conflict(s.clone()),
            StorageError::OutOfRange(s) => Kind::OutOfRange(s.clone()),
            StorageError::Exhausted(s) => Kind::Exhausted(s.clone()),
            StorageError::Busy(s) => Kind::Busy(s.clone()),
            StorageError::Transfer(s) => Kind::Transfer(s.clone()),
            StorageError::Unsupported(s) => Kind::Unsupported(s.clone()),
            StorageError::WrongNode { pool, owner } => Kind::WrongNode(failure::WrongNode {
                pool: pool.clone(),
                owner: owner.clone(),
            }),
            StorageError::PoolUnusable(s) => Kind::PoolUnusable(s.clone()),
            StorageError::PoolBroken { pool, reason } => Kind::PoolBroken(failure::PoolBroken {
                pool: pool.clone(),
                reason: reason.clone(),
            }),
            StorageError::InUse(s) => Kind::InUse(s.clone()),
            StorageError::Unavailable(s) => Kind::Unavailable(s.clone()),
            StorageError::NotTogether(s) => Kind::NotTogether(s.clone()),
            StorageError::Aborted(s) => Kind::Aborted(s.clone()),
            StorageError::DataLoss(s) => Kind::DataLoss(s.clone()),
            StorageError::Corrupt { path, reason } => Kind::Corrupt(failure::Corrupt {
                path: path.to_string_lossy().into_owned(),
                reason: reason.clone(),
            }),
            StorageError::Sys(SysError::Io { step, path, source }) => Kind::SysIo(failure::SysIo {
                step: step.to_string(),
                path: path.to_string_lossy().into_owned(),
                errno: source.raw_os_error().unwrap_or(0),
                detail: source.to_string(),
            }),
            StorageError::Sys(SysError::Tool { tool, status, stderr }) => Kind::SysTool(failure::SysTool {
                tool: tool.clone(),
                status: status.clone(),
                stderr: stderr.clone(),
            }),
            StorageError::ContentRefused(s) => Kind::ContentRefused(s.clone()),
            StorageError::Sys(SysError::TooLarge(t)) => Kind::ContentRefused(t.to_string()),
        };
        v1::StorageFailure { kind: Some(kind) }
    }
}

/// Rebuilds the node's error. A failed syscall keeps its errno (so its gRPC code) and gains the
/// node's name, since the controller's operator reads it far from the node.
pub fn storage_error(node: &NodeId, f: v1::StorageFailure) -> Option<StorageError> {
    Some(match f.kind? {
        Kind::UnknownPool(p) => StorageError::UnknownPool {
            name: p.name,
            known: p.known,
        },
        Kind::LayoutNotAllowed(l) => StorageError::LayoutNotAllowed {
            layout: l.layout,
            pool: l.pool,
            allowed: l.allowed,
        },
        Kind::VolumeNotFound(s) => StorageError::VolumeNotFound(s),
        Kind::SnapshotNotFound(s) => StorageError::SnapshotNotFound(s),
        Kind::Conflict(s) => StorageError::Conflict(s),
        Kind::OutOfRange(s) => StorageError::OutOfRange(s),
        Kind::Exhausted(s) => StorageError::Exhausted(s),
        Kind::Busy(s) => StorageError::Busy(s),
        Kind::Transfer(s) => StorageError::Transfer(s),
        Kind::Unsupported(s) => StorageError::Unsupported(s),
        Kind::WrongNode(w) => StorageError::WrongNode {
            pool: w.pool,
            owner: w.owner,
        },
        Kind::PoolUnusable(s) => StorageError::PoolUnusable(s),
        Kind::PoolBroken(p) => StorageError::pool_shut_on(p.pool, &p.reason, node),
        Kind::InUse(s) => StorageError::InUse(s),
        Kind::Unavailable(s) => StorageError::Unavailable(s),
        Kind::NotTogether(s) => StorageError::NotTogether(s),
        Kind::Aborted(s) => StorageError::Aborted(s),
        Kind::DataLoss(s) => StorageError::DataLoss(s),
        Kind::ContentRefused(s) => StorageError::ContentRefused(s),
        Kind::Corrupt(c) => StorageError::Corrupt {
            path: PathBuf::from(c.path),
            reason: c.reason,
        },
        Kind::SysIo(s) => {
            let source = if s.errno != 0 {
                io::Error::from_raw_os_error(s.errno)
            } else {
                io::Error::other(s.detail)
            };
            let path = format!("{}: {} {}", node.as_str(), s.step, s.path);
            StorageError::Sys(SysError::io("on node", path, source))
        }
        Kind::SysTool(t) => StorageError::Sys(SysError::Tool {
            tool: format!("{} on node {}", t.tool, node.as_str()),
            status: t.status,
            stderr: t.stderr,
        }),
    })
}

/// The status the agent answers a failed call with: the code and message every other cellar
/// service gives (`csi::status`), plus the failure itself for the controller to rebuild.
pub fn status(e: StorageError) -> Status {
    let failure = v1::StorageFailure::from(&e);
    let plain = Status::from(e);
    let details = RpcStatus {
        code: plain.code() as i32,
        message: plain.message().to_string(),
        details: vec![prost_types::Any {
            type_url: STORAGE_FAILURE_TYPE.to_string(),
            value: failure.encode_to_vec(),
        }],
    };
    Status::with_details(plain.code(), plain.message(), Bytes::from(details.encode_to_vec()))
}

/// The failure an agent packed into a status, if it packed one.
pub fn failure(s: &Status) -> Option<v1::StorageFailure> {
    if s.details().is_empty() {
        return None;
    }
    let rpc = RpcStatus::decode(s.details()).ok()?;
    rpc.details
        .iter()
        .find(|a| a.type_url == STORAGE_FAILURE_TYPE)
        .and_then(|a| v1::StorageFailure::decode(a.value.as_slice()).ok())
}

/// Whether a code says the node could not be reached or did not answer in time; every other code
/// is an answer.
pub fn is_unreachable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn node() -> NodeId {
        NodeId::parse("node-1").unwrap()
    }

    fn full_volume() -> VolumeRecord {
        VolumeRecord {
            version: 1,
            name: "pvc-1".into(),
            id: VolumeId::parse("local:node-1:fast:pvc-1").unwrap(),
            layout: Layout::Btrfs,
            capacity_bytes: 5 << 30,
            mode: VolumeMode::Filesystem,
            access_modes: vec![AccessMode::SingleNodeSingleWriter, AccessMode::MultiNodeReaderOnly],
            fs_type: "btrfs".into(),
            parameters: BTreeMap::from([("pool".into(), "fast".into()), ("layout".into(), "btrfs".into())]),
            source: Some(ContentSource::Snapshot(
                SnapshotId::parse("snap:local:node-1:fast:s1").unwrap(),
            )),
            created_unix_secs: 1_700_000_000,
            delete_policy: Some(DeletePolicy::Archive),
            compression: Some("zstd".into()),
            fs_bytes: 123,
        }
    }

    #[test]
    fn volume_record_round_trips() {
        let r = full_volume();
        let back = VolumeRecord::try_from(v1::VolumeRecord::from(&r)).unwrap();
        assert_eq!(back, r);
        let bare = VolumeRecord {
            source: Some(ContentSource::Volume(
                VolumeId::parse("local:node-1:fast:pvc-0").unwrap(),
            )),
            delete_policy: None,
            compression: None,
            parameters: BTreeMap::new(),
            access_modes: vec![],
            mode: VolumeMode::Block,
            layout: Layout::Image,
            ..r
        };
        assert_eq!(VolumeRecord::try_from(v1::VolumeRecord::from(&bare)).unwrap(), bare);
    }

    #[test]
    fn volume_record_round_trips_through_bytes() {
        let r = full_volume();
        let bytes = v1::VolumeRecord::from(&r).encode_to_vec();
        let m = v1::VolumeRecord::decode(bytes.as_slice()).unwrap();
        assert_eq!(VolumeRecord::try_from(m).unwrap(), r);
    }

    #[test]
    fn snapshot_record_round_trips() {
        let s = SnapshotRecord {
            version: 1,
            name: "snapshot-1".into(),
            id: SnapshotId::parse("snap:local:node-1:fast:snapshot-1").unwrap(),
            source_volume_id: VolumeId::parse("local:node-1:fast:pvc-1").unwrap(),
            size_bytes: 1 << 30,
            created_unix_secs: 1_700_000_001,
            created_nanos: 999_999_999,
            layout: Layout::Image,
            mode: VolumeMode::Block,
            fs_bytes: 77,
            group: Some(GroupId::parse("group:local:node-1:fast:groupsnapshot-1").unwrap()),
            backup: Some(crate::storage::record::BackupMark {
                id: BackupId::parse("backup:offsite:0f2e4c6a-1b3d-4f5e-8a9b-0c1d2e3f4a5b").unwrap(),
                keep_local: true,
                uploaded: false,
            }),
        };
        assert_eq!(SnapshotRecord::try_from(v1::SnapshotRecord::from(&s)).unwrap(), s);
        let alone = SnapshotRecord {
            group: None,
            backup: None,
            ..s
        };
        assert_eq!(
            SnapshotRecord::try_from(v1::SnapshotRecord::from(&alone)).unwrap(),
            alone
        );
    }

    #[test]
    fn group_records_and_requests_round_trip() {
        let g = GroupRecord {
            version: 1,
            name: "groupsnapshot-1".into(),
            id: GroupId::parse("group:local:node-1:fast:groupsnapshot-1").unwrap(),
            members: vec![GroupMember {
                volume_id: VolumeId::parse("local:node-1:fast:pvc-1").unwrap(),
                snapshot_id: SnapshotId::parse("snap:local:node-1:fast:groupsnapshot-1-pvc-1").unwrap(),
                size_bytes: 1 << 30,
            }],
            parameters: [("consistency".to_string(), "group".to_string())].into(),
            created_unix_secs: 1_700_000_001,
            created_nanos: 5,
        };
        assert_eq!(GroupRecord::try_from(v1::GroupRecord::from(&g)).unwrap(), g);
        let req = NewGroup {
            name: "groupsnapshot-1".into(),
            members: vec![VolumeId::parse("local:node-1:fast:pvc-1").unwrap()],
            parameters: Default::default(),
            per_volume: true,
            freeze_timeout: std::time::Duration::from_secs(30),
        };
        assert_eq!(NewGroup::try_from(v1::CreateGroupRequest::from(&req)).unwrap(), req);
    }

    #[test]
    fn volume_with_condition_round_trips() {
        let r = full_volume();
        let c = Condition {
            abnormal: true,
            message: "data directory is missing".into(),
        };
        let (r2, c2) = volume_and_condition(volume_with_condition(&r, &c)).unwrap();
        assert_eq!((r2, c2), (r, c));
    }

    /// A node's record was decoded whatever its fields held: one record's parameters map of
    /// 44,000 tiny entries cost the controller some 4 MiB, and a condition message of 400 KiB went
    /// on whole into ListVolumes. Past its bounds a record is a bad answer; a message is cut.
    #[test]
    fn a_record_past_the_bounds_of_its_fields_is_refused_and_a_long_condition_is_cut() {
        let within = full_volume();
        assert!(VolumeRecord::try_from(v1::VolumeRecord::from(&within)).is_ok());
        let past = |change: &dyn Fn(&mut VolumeRecord)| {
            let mut r = within.clone();
            change(&mut r);
            VolumeRecord::try_from(v1::VolumeRecord::from(&r)).unwrap_err().0
        };
        let e = past(&|r| r.name = "n".repeat(MAX_NAME + 1));
        assert!(e.starts_with("volume.name"), "{e}");
        let e = past(&|r| r.fs_type = "f".repeat(MAX_FS_TYPE + 1));
        assert!(e.starts_with("volume.fs_type"), "{e}");
        let e = past(&|r| r.parameters = (0..=MAX_PARAMETERS).map(|i| (i.to_string(), String::new())).collect());
        assert!(e.starts_with("volume.parameters"), "{e}");
        let e = past(&|r| r.parameters = [("k".to_string(), "v".repeat(MAX_PARAMETER_BYTES))].into());
        assert!(e.starts_with("volume.parameters"), "{e}");
        let snap = v1::SnapshotRecord {
            name: "s".repeat(MAX_NAME + 1),
            id: "snap:local:node-1:fast:s".into(),
            source_volume_id: "local:node-1:fast:pvc-1".into(),
            layout: v1::Layout::Dir as i32,
            mode: v1::VolumeMode::from(VolumeMode::Filesystem) as i32,
            ..Default::default()
        };
        assert!(SnapshotRecord::try_from(snap)
            .unwrap_err()
            .0
            .starts_with("snapshot.name"));

        let loud = v1::Condition {
            abnormal: true,
            message: "y".repeat(400 << 10),
        };
        let cut = Condition::from(loud);
        assert!(cut.abnormal);
        assert!(
            cut.message.len() <= crate::csi::status::MAX_MESSAGE + 64,
            "{}",
            cut.message.len()
        );
        assert!(cut.message.ends_with(&format!("({} bytes in all)", 400 << 10)));
    }

    #[test]
    fn pool_status_round_trips() {
        let p = PoolStatus {
            name: PoolName::parse("fast").unwrap(),
            is_default: true,
            default_layout: Layout::Image,
            layouts: vec![Layout::Dir, Layout::Image],
            total_bytes: 100,
            available_bytes: 40,
            image_allocatable_bytes: 30,
            provisioned_bytes: 70,
            shared: true,
        };
        assert_eq!(PoolStatus::try_from(v1::PoolStatus::from(&p)).unwrap(), p);
    }

    #[test]
    fn new_volume_round_trips_with_every_field() {
        let v = NewVolume {
            name: "pvc-9".into(),
            pool: Some(PoolName::parse("fast").unwrap()),
            layout: Some(Layout::Image),
            capacity: CapacityRange {
                required: 1 << 30,
                limit: 2 << 30,
            },
            mode: VolumeMode::Block,
            access_modes: vec![AccessMode::SingleNodeWriter],
            fs_type: "xfs".into(),
            parameters: BTreeMap::from([("layout".into(), "image".into())]),
            source: Some(Source::Volume(VolumeId::parse("local:node-1:fast:pvc-1").unwrap())),
            delete_policy: Some(DeletePolicy::Retain),
            mutable: Mutable {
                compression: Some("none".into()),
                delete_policy: Some(DeletePolicy::Delete),
            },
            owner: Ownership {
                uid: Some(1000),
                gid: Some(0),
                mode: Some(0o2775),
            },
        };
        let back = NewVolume::try_from(v1::CreateVolumeRequest::from(&v)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{v:?}"));

        let defaults = NewVolume {
            pool: None,
            layout: None,
            capacity: CapacityRange::default(),
            source: Some(Source::Snapshot(SnapshotId::parse("snap:local:node-1:fast:s").unwrap())),
            delete_policy: None,
            mutable: Mutable::default(),
            owner: Ownership::default(),
            ..v
        };
        let back = NewVolume::try_from(v1::CreateVolumeRequest::from(&defaults)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn every_frame_round_trips() {
        let meta = Meta {
            uid: 1,
            gid: 2,
            mode: 0o4755,
            atime: (10, 999_999_999),
            mtime: (-5, 1),
            xattrs: vec![(b"user.a".to_vec(), vec![0, 255]), (b"trusted.b".to_vec(), vec![])],
        };
        let frames = vec![
            Frame::Header(Header {
                layout: Layout::Btrfs,
                mode: VolumeMode::Filesystem,
                capacity_bytes: 7,
                fs_bytes: 6,
                length: 0,
            }),
            Frame::Dir {
                name: b"d\xff".to_vec(),
            },
            Frame::File {
                name: b"f".to_vec(),
                meta: meta.clone(),
                size: 9,
                link: Some(3),
            },
            Frame::File {
                name: b"g".to_vec(),
                meta: meta.clone(),
                size: 0,
                link: None,
            },
            Frame::HardLink {
                name: b"h".to_vec(),
                link: 3,
            },
            Frame::Symlink {
                name: b"s".to_vec(),
                target: b"/etc/passwd".to_vec(),
                meta: meta.clone(),
            },
            Frame::Special {
                name: b"p".to_vec(),
                mode: libc::S_IFIFO | 0o600,
                rdev: 0,
                meta: meta.clone(),
            },
            Frame::Chunk {
                offset: 4096,
                data: b"data".to_vec(),
                checksum: crate::storage::transfer::chunk_checksum(4096, b"data"),
            },
            Frame::Leave { meta },
            Frame::End {
                frames: 9,
                bytes: 4,
                digest: [7; 32],
            },
        ];
        for f in frames {
            let bytes = v1::DataFrame::from(f.clone()).encode_to_vec();
            let back = Frame::try_from(v1::DataFrame::decode(bytes.as_slice()).unwrap()).unwrap();
            assert_eq!(back, f);
        }
        let short = v1::DataFrame {
            kind: Some(v1::data_frame::Kind::End(v1::data_frame::End {
                frames: 1,
                bytes: 0,
                sha256: vec![1; 31],
            })),
        };
        assert!(Frame::try_from(short).unwrap_err().0.starts_with("end.sha256"));
    }

    #[test]
    fn create_request_with_bad_fields_names_the_field() {
        let ok = v1::CreateVolumeRequest {
            name: "pvc-1".into(),
            mode: v1::VolumeMode::Filesystem as i32,
            ..Default::default()
        };
        assert!(NewVolume::try_from(ok.clone()).is_ok());
        let cases = [
            (
                v1::CreateVolumeRequest {
                    name: String::new(),
                    ..ok.clone()
                },
                "name",
            ),
            (v1::CreateVolumeRequest { mode: 0, ..ok.clone() }, "mode"),
            (
                v1::CreateVolumeRequest {
                    layout: 42,
                    ..ok.clone()
                },
                "layout",
            ),
            (
                v1::CreateVolumeRequest {
                    access_modes: vec![0],
                    ..ok.clone()
                },
                "access_modes",
            ),
            (
                v1::CreateVolumeRequest {
                    pool: Some("../x".into()),
                    ..ok.clone()
                },
                "pool",
            ),
            (
                v1::CreateVolumeRequest {
                    source: Some(v1::ContentSource {
                        kind: Some(v1::content_source::Kind::VolumeId("local:n:p:..".into())),
                    }),
                    ..ok.clone()
                },
                "source.volume_id",
            ),
            (
                v1::CreateVolumeRequest {
                    delete_policy: 9,
                    ..ok.clone()
                },
                "delete_policy",
            ),
        ];
        for (m, field) in cases {
            let e = NewVolume::try_from(m).unwrap_err();
            assert!(e.0.starts_with(field), "{e} should name {field}");
        }
    }

    fn every_error() -> Vec<StorageError> {
        vec![
            StorageError::UnknownPool {
                name: "x".into(),
                known: "default, fast".into(),
            },
            StorageError::LayoutNotAllowed {
                layout: "btrfs".into(),
                pool: "default".into(),
                allowed: "dir".into(),
            },
            StorageError::VolumeNotFound("local:node-1:default:v".into()),
            StorageError::SnapshotNotFound("snap:local:node-1:default:s".into()),
            StorageError::Conflict("other size".into()),
            StorageError::OutOfRange("too big".into()),
            StorageError::Exhausted("pool full".into()),
            StorageError::Busy("pvc-1".into()),
            StorageError::Transfer("bad checksum".into()),
            StorageError::Unsupported("Block needs image".into()),
            StorageError::WrongNode {
                pool: "fast".into(),
                owner: "node-2".into(),
            },
            StorageError::PoolUnusable("not btrfs".into()),
            StorageError::PoolBroken {
                pool: "fast".into(),
                reason: "gone".into(),
            },
            StorageError::InUse("published".into()),
            StorageError::Corrupt {
                path: "/data/x.json".into(),
                reason: "eof".into(),
            },
            StorageError::Sys(SysError::io(
                "statfs",
                "/mnt/share",
                io::Error::from_raw_os_error(libc::ESTALE),
            )),
            StorageError::Sys(SysError::io(
                "mkdir",
                "/data/v",
                io::Error::from_raw_os_error(libc::ENOSPC),
            )),
            StorageError::Sys(SysError::io("copy", "/data/v", io::Error::other("short read"))),
            StorageError::Sys(SysError::Tool {
                tool: "mkfs.xfs".into(),
                status: "exit status: 1".into(),
                stderr: "bad".into(),
            }),
            StorageError::ContentRefused("the tree at /data/v is deeper than 1000 levels".into()),
            StorageError::Sys(SysError::TooLarge(crate::sys::tree::TooLarge::Xattrs {
                root: "/data/v".into(),
                entry: "f".into(),
            })),
        ]
    }

    /// Content a copy does not take is the caller's to change, on the node and at the controller
    /// alike: INTERNAL (a driver bug, retried for ever) nowhere on the way.
    #[test]
    fn content_a_copy_refuses_is_failed_precondition_across_the_wire() {
        let deep = crate::sys::tree::TooLarge::Depth {
            root: "/data/v".into(),
            entry: std::iter::repeat_n("d".repeat(250), 1001).collect(),
        };
        let sent = status(StorageError::from(SysError::from(deep)));
        assert_eq!(sent.code(), Code::FailedPrecondition, "{}", sent.message());
        let back = storage_error(&node(), failure(&sent).expect("failure in details")).unwrap();
        assert!(matches!(back, StorageError::ContentRefused(_)), "{back:?}");
        let answered = Status::from(back);
        assert_eq!(answered.code(), Code::FailedPrecondition);
        assert!(answered.message().contains("flatten it"), "{}", answered.message());
        // The path 250 KB long is cut: the message fits in the header that carries it.
        assert!(sent.details().len() < 4096, "{} bytes of details", sent.details().len());
    }

    #[test]
    fn every_storage_error_comes_back_with_its_code() {
        for e in every_error() {
            let shown = e.to_string();
            let sent = status(e);
            let back = storage_error(&node(), failure(&sent).expect("failure in details")).unwrap();
            let again = Status::from(back);
            assert_eq!(again.code(), sent.code(), "{shown}");
            if !matches!(
                failure(&sent).and_then(|f| f.kind),
                Some(Kind::SysIo(_) | Kind::SysTool(_) | Kind::PoolBroken(_))
            ) {
                assert_eq!(again.message(), shown);
            } else {
                assert!(again.message().contains("node-1"), "{}", again.message());
            }
        }
    }

    #[test]
    fn status_without_details_has_no_failure() {
        assert!(failure(&Status::not_found("x")).is_none());
        assert!(failure(&Status::with_details(Code::Internal, "x", Bytes::from_static(b"\xff"))).is_none());
    }
}
