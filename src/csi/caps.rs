//! Capability tables and the translation between CSI capabilities and our own types.

use std::collections::BTreeSet;

use super::status::RequestError;
use super::v1::volume_capability::access_mode::Mode;
use super::v1::volume_capability::AccessType;
use super::v1::{self, VolumeCapability};
use crate::storage::record::{AccessMode, VolumeMode};
use crate::sys::mount::BindFlags;

/// A volume capability parsed at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub mode: VolumeMode,
    pub access: AccessMode,
    pub fs_type: String,
    pub flags: BindFlags,
}

/// Filesystem types a capability may name; the dir layout takes its host's and ignores the name.
pub const FS_TYPES: &[&str] = &["", "ext4", "xfs", "btrfs"];

pub fn access_mode(m: i32) -> Result<AccessMode, RequestError> {
    Ok(match Mode::try_from(m).unwrap_or(Mode::Unknown) {
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly => AccessMode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter => AccessMode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter => AccessMode::MultiNodeMultiWriter,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        Mode::Unknown => {
            return Err(RequestError::invalid(format!(
                "access mode {m} is not a known CSI access mode"
            )))
        }
    })
}

pub fn to_csi_mode(m: AccessMode) -> Mode {
    match m {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    }
}

/// Mount options a bind mount can honour; anything else is refused rather than silently dropped.
pub fn bind_flags(options: &[String]) -> Result<BindFlags, RequestError> {
    let mut f = BindFlags::default();
    for o in options
        .iter()
        .flat_map(|o| o.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        match o {
            "ro" => f.read_only = true,
            "rw" => f.read_only = false,
            "nosuid" => f.nosuid = true,
            "nodev" => f.nodev = true,
            "noexec" => f.noexec = true,
            "noatime" => f.noatime = true,
            "nodiratime" => f.nodiratime = true,
            "relatime" => f.relatime = true,
            "strictatime" => f.strictatime = true,
            "suid" | "dev" | "exec" | "atime" | "diratime" | "bind" | "defaults" => {}
            other => {
                return Err(RequestError::invalid(format!(
                    "mount option '{other}' cannot be applied to a bind mount; supported: ro, rw, nosuid, nodev, noexec, noatime, nodiratime, relatime, strictatime"
                )))
            }
        }
    }
    Ok(f)
}

pub fn capability(c: &VolumeCapability) -> Result<Capability, RequestError> {
    let access = access_mode(c.access_mode.as_ref().map(|a| a.mode).unwrap_or(0))?;
    match &c.access_type {
        Some(AccessType::Mount(m)) => {
            if !FS_TYPES.contains(&m.fs_type.as_str()) {
                return Err(RequestError::invalid(format!(
                    "filesystem type '{}' is not supported (supported: ext4, xfs, btrfs)",
                    m.fs_type
                )));
            }
            Ok(Capability {
                mode: VolumeMode::Filesystem,
                access,
                fs_type: m.fs_type.clone(),
                flags: bind_flags(&m.mount_flags)?,
            })
        }
        Some(AccessType::Block(_)) => Ok(Capability {
            mode: VolumeMode::Block,
            access,
            fs_type: String::new(),
            flags: BindFlags::default(),
        }),
        None => Err(RequestError::invalid(
            "volume capability needs an access type (mount or block)",
        )),
    }
}

pub fn capabilities(cs: &[VolumeCapability]) -> Result<Vec<Capability>, RequestError> {
    if cs.is_empty() {
        return Err(RequestError::Missing("volume_capabilities"));
    }
    cs.iter().map(capability).collect()
}

/// The modes, volume mode and fs type shared by a list of capabilities (as one volume must serve).
pub fn summarize(caps: &[Capability]) -> Result<(VolumeMode, Vec<AccessMode>, String), RequestError> {
    let mode = caps[0].mode;
    if caps.iter().any(|c| c.mode != mode) {
        return Err(RequestError::invalid(
            "a volume is either Filesystem or Block, not both",
        ));
    }
    let fs: BTreeSet<&str> = caps
        .iter()
        .map(|c| c.fs_type.as_str())
        .filter(|s| !s.is_empty())
        .collect();
    if fs.len() > 1 {
        return Err(RequestError::invalid("capabilities name different filesystem types"));
    }
    let modes: BTreeSet<AccessMode> = caps.iter().map(|c| c.access).collect();
    Ok((
        mode,
        modes.into_iter().collect(),
        fs.into_iter().next().unwrap_or("").to_string(),
    ))
}

/// Builds the CSI capability that describes a recorded volume.
pub fn to_csi(mode: VolumeMode, access: AccessMode, fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(v1::volume_capability::AccessMode {
            mode: to_csi_mode(access) as i32,
        }),
        access_type: Some(match mode {
            VolumeMode::Block => AccessType::Block(v1::volume_capability::BlockVolume {}),
            VolumeMode::Filesystem => AccessType::Mount(v1::volume_capability::MountVolume {
                fs_type: fs_type.to_string(),
                ..Default::default()
            }),
        }),
    }
}
