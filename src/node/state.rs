//! What this node has staged and published, per volume.
//!
//! Written before each mount (the intent) and after each unmount, so a crash at any point leaves a
//! state the retried call converges from, and nothing is ever unmounted that we did not mount.
//! Durable against a crash of the process only: a reboot clears the mounts it describes anyway.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::storage::record::AccessMode;
use crate::sys::files::{Durability, Files};
use crate::sys::mount::BindFlags;
use crate::sys::SysError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub path: PathBuf,
    pub read_only: bool,
    /// image layout: the file the loop device is attached to, found again after a restart.
    #[serde(default)]
    pub backing: Option<PathBuf>,
    /// Tree layouts: what the stage bound (a static volume's `subdir` and `mountOptions`), so
    /// that a staging mount gone stale is bound again exactly so. `None` in a state written by
    /// an earlier release.
    #[serde(default)]
    pub bound: Option<StagedBind>,
    /// A block volume's stage: its loop device only, nothing mounted at the staging path (so
    /// nothing there is ever unmounted). `false` in a state written by an earlier release.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block: bool,
    /// The staging path with its symbolic links resolved when it was staged: an unstage whose
    /// path resolves elsewhere by then unmounts nothing (as [`Published::real`]). `None` in a
    /// state written by an earlier release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real: Option<Resolved>,
}

/// A path with its symbolic links resolved, in the boot it was resolved in. After a reboot
/// nothing the driver mounted is mounted any more, so where the path led then says nothing (a
/// kubelet directory moved to another disk behind a symlink must not make an unpublish fail for
/// ever).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub path: PathBuf,
    /// [`crate::sys::boot_id`] when it was resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
}

impl Resolved {
    /// `path` as it resolves now, in this boot: its parent resolved, its own name kept (the path
    /// is a mountpoint, which may be a dead share's that cannot be looked at; what is swapped for
    /// a symlink is a directory on the way to it).
    pub fn now(files: &dyn Files, path: &Path) -> Option<Resolved> {
        Some(Resolved {
            path: Resolved::of(files, path).ok()??,
            boot: crate::sys::boot_id(),
        })
    }

    /// `path` with its parent resolved; `None` when it has no parent or the parent is gone.
    pub fn of(files: &dyn Files, path: &Path) -> Result<Option<PathBuf>, SysError> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(None);
        };
        if files.entry(parent)? == crate::sys::files::Entry::Missing {
            return Ok(None);
        }
        Ok(Some(files.resolve(parent)?.join(name)))
    }

    /// Whether it was resolved in this boot (a record of another boot, or of an unknown one,
    /// says nothing of the mounts now).
    pub fn this_boot(&self) -> bool {
        self.boot.is_some() && self.boot == crate::sys::boot_id()
    }
}

/// The directory below a tree volume's data that a stage bound, and the flags it bound it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBind {
    pub subdir: PathBuf,
    pub flags: BindFlags,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub access: AccessMode,
    pub flags: BindFlags,
    /// We made the target directory, so we remove it on unpublish.
    pub created: bool,
    /// A read-only publish of a block volume staged read-write: the read-only loop device attached
    /// for it alone (a read-only bind of a device node does not stop writes to the device).
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// The target with its symbolic links resolved when it was published: an unpublish whose
    /// target resolves elsewhere by then (a directory on the way replaced by a symlink) unmounts
    /// nothing. `None` in a state written by an earlier release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real: Option<Resolved>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMounts {
    pub volume_id: String,
    pub staged: Option<Staged>,
    pub published: BTreeMap<PathBuf, Published>,
}

impl VolumeMounts {
    fn is_empty(&self) -> bool {
        self.staged.is_none() && self.published.is_empty()
    }
}

pub struct NodeState {
    dir: PathBuf,
    /// `dir` with its symbolic links resolved, once, at open (the path guard's, on every call).
    real_dir: PathBuf,
    /// Where the state files are read and written (real, or a test's recording fake).
    files: Arc<dyn Files>,
    cache: Mutex<HashMap<String, VolumeMounts>>,
}

impl NodeState {
    pub fn open(dir: &Path, files: Arc<dyn Files>) -> Result<NodeState, SysError> {
        files.mkdir_all(dir)?;
        let mut cache = HashMap::new();
        for p in files.list_dir(dir)? {
            if p.extension().is_some_and(|x| x == "json") {
                if let Some(bytes) = files.read_optional(&p)? {
                    if let Ok(m) = serde_json::from_slice::<VolumeMounts>(&bytes) {
                        cache.insert(m.volume_id.clone(), m);
                    }
                }
            }
        }
        Ok(NodeState {
            dir: dir.to_path_buf(),
            real_dir: files.resolve(dir)?,
            files,
            cache: Mutex::new(cache),
        })
    }

    fn file(&self, volume_id: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(volume_id.as_bytes()));
        self.dir.join(format!("{}.json", &h[..32]))
    }

    pub fn get(&self, volume_id: &str) -> VolumeMounts {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(volume_id).cloned().unwrap_or_else(|| VolumeMounts {
            volume_id: volume_id.to_string(),
            ..Default::default()
        })
    }

    pub fn all(&self) -> Vec<VolumeMounts> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.values().cloned().collect()
    }

    pub fn put(&self, m: VolumeMounts) -> Result<(), SysError> {
        let path = self.file(&m.volume_id);
        if m.is_empty() {
            self.files.remove_file_if_exists(&path)?;
        } else {
            let bytes = serde_json::to_vec(&m).map_err(|e| SysError::io("encode", &path, std::io::Error::other(e)))?;
            self.files.write_atomic(&path, &bytes, Durability::ProcessCrash)?;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_empty() {
            cache.remove(&m.volume_id);
        } else {
            cache.insert(m.volume_id.clone(), m);
        }
        Ok(())
    }
}

impl NodeState {
    /// The directory of the mount records, its symbolic links resolved when it was opened.
    pub fn real_dir(&self) -> &Path {
        &self.real_dir
    }

    /// A volume staged or published at a path strictly above `path` (one of `paths`, the given
    /// and the resolved spelling): a mount at `path` would land inside that volume's data.
    pub fn mounted_above(&self, paths: &[&Path]) -> Option<(String, PathBuf)> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.values().find_map(|m| {
            m.staged
                .iter()
                .map(|s| &s.path)
                .chain(m.published.keys())
                .find(|at| paths.iter().any(|p| p != at && p.starts_with(at)))
                .map(|at| (m.volume_id.clone(), at.clone()))
        })
    }

    /// Where a volume is staged or published on this node.
    pub fn mounted_at(&self, volume_id: &str) -> Vec<PathBuf> {
        let m = self.get(volume_id);
        m.published.keys().cloned().chain(m.staged.map(|s| s.path)).collect()
    }
}
