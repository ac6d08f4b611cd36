//! What this node has staged and published, per volume.
//!
//! Written before each mount (the intent) and after each unmount, so a crash at any point leaves a
//! state the retried call converges from, and nothing is ever unmounted that we did not mount.
//! Durable against a crash of the process only: a reboot clears the mounts it describes anyway.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// State files found at open that could not be read as a volume's mounts, by path. Each is
    /// kept as it is, and the volume it belongs to counts as mounted where nobody knows: see
    /// [`NodeState::unreadable`].
    unreadable: Mutex<BTreeMap<PathBuf, Held>>,
}

/// The boot id of the machine when the state was last opened (see [`NodeState::open`]).
const BOOT_MARK: &str = "boot";

/// A state file that could not be read (an I/O error, not JSON, or JSON this release cannot read
/// as a volume's mounts: a later release's, or edited by hand).
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// Why, as the reader said.
    pub why: String,
    /// The volume it names, when its JSON still has a `volume_id` string. Otherwise its name, the
    /// hash of the volume id, still tells which volume it belongs to.
    pub volume_id: Option<String>,
    /// Where its JSON still says the volume is staged and published (a later release's file, or
    /// one edited by hand), for the path guard. Nothing for a file that is not JSON: torn, or
    /// failing to read.
    pub paths: Vec<PathBuf>,
}

/// An unreadable state file as the node holds it, with what it learned of its volume since.
#[derive(Debug, Clone)]
struct Held {
    file: Unreadable,
    /// The volume whose id the file's name is the hash of, found in a lease this node holds (see
    /// [`NodeState::name_unreadable`]): a torn file names no volume, but its volume's lease must
    /// be renewed all the same.
    leased: Option<String>,
    /// The lease directories already searched for that lease. This node takes no new lease of a
    /// volume whose state cannot be read, so one search of each directory is enough.
    searched: BTreeSet<PathBuf>,
}

impl Held {
    fn new(file: Unreadable) -> Held {
        Held {
            file,
            leased: None,
            searched: BTreeSet::new(),
        }
    }

    /// The volume the file belongs to, when known.
    fn volume_id(&self) -> Option<&str> {
        self.file.volume_id.as_deref().or(self.leased.as_deref())
    }
}

/// The extension a state file that could not be read at the first start after a reboot is given.
const SET_ASIDE: &str = "json.unreadable";

/// What a node's state directory holds, read without changing anything: what
/// [`NodeState::open`] starts from, and what `cellar report` lists.
pub struct Survey {
    pub mounts: Vec<VolumeMounts>,
    /// The files that cannot be read, by path.
    pub unreadable: BTreeMap<PathBuf, Unreadable>,
    /// Files set aside at a first start after a reboot (`<name>.json.unreadable`).
    pub set_aside: Vec<PathBuf>,
    /// No process has opened the state since the machine booted: the mounts every file records
    /// went with an earlier boot, and the next open sets the unreadable files aside.
    pub earlier_boot: bool,
    boot: Option<String>,
}

impl Survey {
    pub fn read(dir: &Path, files: &dyn Files) -> Result<Survey, SysError> {
        let boot = crate::sys::boot_id();
        let earlier_boot = boot.is_some()
            && files
                .read_optional(&dir.join(BOOT_MARK))?
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                != boot;
        let mut survey = Survey {
            mounts: Vec::new(),
            unreadable: BTreeMap::new(),
            set_aside: Vec::new(),
            earlier_boot,
            boot,
        };
        for p in files.list_dir(dir)? {
            let name = p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
            if name.ends_with(&format!(".{SET_ASIDE}")) {
                survey.set_aside.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match read(files, &p) {
                Read::Gone => {}
                Read::Mounts(m) => survey.mounts.push(m),
                Read::Unreadable(u) => {
                    survey.unreadable.insert(p, u);
                }
            }
        }
        survey.set_aside.sort();
        Ok(survey)
    }

    /// The file that cannot be read that keeps `volume_id` from deletes and node calls, if any
    /// (as [`NodeState::unreadable`] finds it; none after a reboot, which sets them aside).
    pub fn unreadable_of(&self, volume_id: &str) -> Option<&Path> {
        let own = file_name(volume_id);
        self.unreadable
            .iter()
            .filter(|_| !self.earlier_boot)
            .find(|(p, u)| p.file_name().is_some_and(|n| *n == *own) || u.volume_id.as_deref() == Some(volume_id))
            .map(|(p, _)| p.as_path())
    }
}

/// The name of a volume's state file: the hash of its id (which may hold any character).
fn file_name(volume_id: &str) -> String {
    let h = hex::encode(Sha256::digest(volume_id.as_bytes()));
    format!("{}.json", &h[..32])
}

/// What reading one state file found.
enum Read {
    Gone,
    Mounts(VolumeMounts),
    Unreadable(Unreadable),
}

impl NodeState {
    /// Reads every state file in `dir`. One that cannot be read is not skipped: forgetting it
    /// would forget that its volume is staged or published here, and a DeleteVolume would then
    /// remove data mounted into a pod, and an unpublish or unstage would answer OK unmounting
    /// nothing. It is kept as it is, logged, and its volume is refused every node call and every
    /// delete until the file is repaired or removed by hand ([`NodeState::unreadable`]).
    ///
    /// Except at the first open since the machine booted (the boot id in `dir/boot` is another's):
    /// then what any file records is mounted no more, and a file torn by the crash that ended that
    /// boot (the state is written without fsync) is renamed `<name>.json.unreadable` and logged,
    /// not held against its volume.
    pub fn open(dir: &Path, files: Arc<dyn Files>) -> Result<NodeState, SysError> {
        files.mkdir_all(dir)?;
        let survey = Survey::read(dir, &*files)?;
        let cache = survey.mounts.into_iter().map(|m| (m.volume_id.clone(), m)).collect();
        let mut unreadable = BTreeMap::new();
        for (p, u) in survey.unreadable {
            if survey.earlier_boot {
                // Torn by a machine crash (the state is written without fsync), or spoiled
                // otherwise: what it recorded is mounted no more. Set aside for the operator,
                // out of the way of the volume's next stage.
                let aside = p.with_extension(SET_ASIDE);
                files.rename(&p, &aside)?;
                tracing::warn!(
                    file = %aside.display(),
                    volume = u.volume_id.as_deref().unwrap_or("unknown"),
                    error = u.why,
                    "a mount state file written before the machine's last boot cannot be read; \
                     the mounts it recorded are gone with that boot: set aside"
                );
            } else {
                tracing::error!(
                    file = %p.display(),
                    volume = u.volume_id.as_deref().unwrap_or("unknown"),
                    error = u.why,
                    "cannot read this node's mount state of a volume: the volume is refused \
                     deletes and node calls until the file is repaired or removed (after \
                     unmounting what it recorded by hand)"
                );
                unreadable.insert(p, Held::new(u));
            }
        }
        if let Some(b) = survey.boot.filter(|_| survey.earlier_boot) {
            files.write_atomic(&dir.join(BOOT_MARK), b.as_bytes(), Durability::ProcessCrash)?;
        }
        Ok(NodeState {
            dir: dir.to_path_buf(),
            real_dir: files.resolve(dir)?,
            files,
            cache: Mutex::new(cache),
            unreadable: Mutex::new(unreadable),
        })
    }

    /// Why `volume_id` cannot be worked on: its state file was found unreadable at open and still
    /// is, so this node does not know where the volume is staged or published (a message for
    /// FAILED_PRECONDITION, naming the file and what to do). Read again at every ask: a file
    /// removed since is forgotten, and one repaired is taken in, without a restart.
    pub fn unreadable(&self, volume_id: &str) -> Option<String> {
        let own = self.file(volume_id);
        let mut bad = self.unreadable.lock().unwrap_or_else(|p| p.into_inner());
        let path = bad
            .iter()
            .find(|(p, h)| **p == own || h.file.volume_id.as_deref() == Some(volume_id))
            .map(|(p, _)| p.clone())?;
        match read(&*self.files, &path) {
            Read::Gone => {
                tracing::info!(file = %path.display(), volume = volume_id, "unreadable mount state removed; the volume is usable again");
                bad.remove(&path);
                None
            }
            Read::Mounts(m) if m.volume_id == volume_id && path == own => {
                tracing::info!(file = %path.display(), volume = volume_id, "mount state repaired; read again");
                bad.remove(&path);
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.insert(m.volume_id.clone(), m);
                None
            }
            Read::Mounts(m) => Some(Self::refusal(
                volume_id,
                &path,
                &format!(
                    "it now names volume {}, and volume {volume_id}'s state belongs in {}",
                    m.volume_id,
                    own.display()
                ),
            )),
            Read::Unreadable(u) => {
                let message = Self::refusal(volume_id, &path, &u.why);
                // What was learned of its volume stays: the file is still the same volume's.
                if let Some(held) = bad.get_mut(&path) {
                    held.file = u;
                }
                Some(message)
            }
        }
    }

    fn refusal(volume_id: &str, path: &Path, why: &str) -> String {
        format!(
            "this node's record of where volume {volume_id} is staged and published, {}, cannot be \
             read ({why}): the node does not know whether the volume is mounted, so it neither \
             deletes it nor stages, publishes, unpublishes or unstages it. Unmount what is left of \
             it on this node by hand (findmnt, losetup -j on its image) once no pod uses it, then \
             remove the file (or repair it); the next call reads it again",
            path.display()
        )
    }

    fn file(&self, volume_id: &str) -> PathBuf {
        self.dir.join(file_name(volume_id))
    }

    /// The volumes whose state files cannot be read, as far as they are known: named by the
    /// file's JSON, or by a lease this node holds ([`NodeState::name_unreadable`]). What a file
    /// says is not read again here: ask [`NodeState::unreadable`] whether it still holds.
    pub fn unreadable_volumes(&self) -> Vec<String> {
        let bad = self.unreadable.lock().unwrap_or_else(|p| p.into_inner());
        bad.values().filter_map(|h| h.volume_id().map(str::to_string)).collect()
    }

    /// Whether an unreadable file that names no volume has yet to be looked for among the leases
    /// in `dir` (one shared pool's).
    pub fn unnamed_unreadable(&self, dir: &Path) -> bool {
        let bad = self.unreadable.lock().unwrap_or_else(|p| p.into_inner());
        bad.values()
            .any(|h| h.volume_id().is_none() && !h.searched.contains(dir))
    }

    /// Takes in what a search of lease directory `dir` found: `held`, the volumes whose leases
    /// there name this node. An unreadable file named by the hash of one of them is that volume's
    /// (which may still be staged here, so its lease is kept); the others are not looked for in
    /// `dir` again.
    pub fn name_unreadable(&self, dir: &Path, held: &[String]) {
        let named: Vec<(PathBuf, &String)> = held.iter().map(|v| (self.file(v), v)).collect();
        let mut bad = self.unreadable.lock().unwrap_or_else(|p| p.into_inner());
        for (path, h) in bad.iter_mut().filter(|(_, h)| h.volume_id().is_none()) {
            h.leased = named.iter().find(|(p, _)| p == path).map(|(_, v)| v.to_string());
            h.searched.insert(dir.to_path_buf());
        }
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
        // Never over a file that could not be read: what it recorded would be lost for good.
        if self
            .unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&path)
        {
            return Err(SysError::io(
                "write mount state (the file there could not be read; repair or remove it first)",
                &path,
                std::io::Error::from_raw_os_error(libc::EUCLEAN),
            ));
        }
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
    /// A file that cannot be read counts with the paths its JSON still names (the volume named as
    /// its id, or as the file where that is not known); of one that is not JSON nothing is known.
    pub fn mounted_above(&self, paths: &[&Path]) -> Option<(String, PathBuf)> {
        let inside = |at: &&PathBuf| paths.iter().any(|p| p != at && p.starts_with(at));
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let readable = cache.values().find_map(|m| {
            m.staged
                .iter()
                .map(|s| &s.path)
                .chain(m.published.keys())
                .find(inside)
                .map(|at| (m.volume_id.clone(), at.clone()))
        });
        drop(cache);
        readable.or_else(|| {
            let bad = self.unreadable.lock().unwrap_or_else(|p| p.into_inner());
            bad.iter().find_map(|(file, h)| {
                let volume = h.volume_id().map_or_else(
                    || format!("<the one of unreadable state file {}>", file.display()),
                    str::to_string,
                );
                h.file.paths.iter().find(inside).map(|at| (volume, at.clone()))
            })
        })
    }

    /// Where a volume is staged or published on this node.
    pub fn mounted_at(&self, volume_id: &str) -> Vec<PathBuf> {
        let m = self.get(volume_id);
        m.published.keys().cloned().chain(m.staged.map(|s| s.path)).collect()
    }
}

/// One state file, read: gone meanwhile, a volume's mounts, or why it cannot be read.
fn read(files: &dyn Files, path: &Path) -> Read {
    let bytes = match files.read_optional(path) {
        Ok(None) => return Read::Gone,
        Ok(Some(b)) => b,
        Err(e) => {
            return Read::Unreadable(Unreadable {
                why: e.to_string(),
                volume_id: None,
                paths: Vec::new(),
            })
        }
    };
    match serde_json::from_slice::<VolumeMounts>(&bytes) {
        Ok(m) => Read::Mounts(m),
        Err(e) => {
            let json = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
            Read::Unreadable(Unreadable {
                why: format!("{} bytes that are not this release's mount state: {e}", bytes.len()),
                volume_id: json
                    .as_ref()
                    .and_then(|v| v.get("volume_id")?.as_str().map(str::to_string)),
                paths: json.as_ref().map(recorded_paths).unwrap_or_default(),
            })
        }
    }
}

/// The mount paths a state file's JSON names where this release keeps them (`staged.path`, the
/// keys of `published`), read from JSON this release cannot otherwise read. Only absolute paths:
/// anything else is no path the node could have mounted at.
fn recorded_paths(json: &serde_json::Value) -> Vec<PathBuf> {
    let staged = json.get("staged").and_then(|s| s.get("path")?.as_str());
    let published = json.get("published").and_then(|p| p.as_object());
    staged
        .into_iter()
        .chain(published.into_iter().flat_map(|p| p.keys().map(String::as_str)))
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::files::RecordingFiles;

    fn staged(volume_id: &str) -> VolumeMounts {
        VolumeMounts {
            volume_id: volume_id.into(),
            staged: Some(Staged {
                path: "/stage".into(),
                read_only: false,
                backing: None,
                bound: None,
                block: false,
                real: None,
            }),
            published: BTreeMap::new(),
        }
    }

    /// A state dir where volumes `a` and `b` are staged; and `a`'s file.
    fn a_and_b_staged() -> (tempfile::TempDir, Arc<RecordingFiles>, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Arc::new(RecordingFiles::default());
        let state = NodeState::open(dir.path(), files.clone()).expect("open");
        state.put(staged("local:n1:default:a")).expect("put");
        state.put(staged("local:n1:default:b")).expect("put");
        let a = state.file("local:n1:default:a");
        (dir, files, a)
    }

    /// A state file that cannot be read at start (EIO here) does not stop the node (it stopped
    /// every volume's calls), nor is it forgotten: its volume is refused while the file still
    /// cannot be read, the file is neither written over nor removed, and once it reads again its
    /// mounts are taken in.
    #[test]
    fn a_state_file_that_fails_to_read_is_kept_and_read_again() {
        let (dir, files, a) = a_and_b_staged();
        files.fail_next_at("read_optional", &a, libc::EIO);
        let state = NodeState::open(dir.path(), files.clone()).expect("the node starts");
        assert!(state.get("local:n1:default:b").staged.is_some(), "the others are read");
        assert_eq!(state.unreadable("local:n1:default:b"), None);
        files.fail_next_at("read_optional", &a, libc::EIO);
        let why = state.unreadable("local:n1:default:a").expect("refused");
        assert!(why.contains(&a.display().to_string()), "{why}");
        let mut cleared = staged("local:n1:default:a");
        cleared.staged = None;
        state.put(cleared).expect_err("never written over");
        assert!(a.exists(), "nor removed");
        // The disk answers again: the next ask reads it and takes it in.
        assert_eq!(state.unreadable("local:n1:default:a"), None, "it reads again");
        assert!(state.get("local:n1:default:a").staged.is_some(), "and is taken in");
    }

    /// At the first start after a reboot, a torn state file (a machine crash: the state is written
    /// without fsync) describes mounts the reboot removed: it is set aside, not held against its
    /// volume. Without a reboot between, the same file is held.
    #[test]
    fn a_state_file_torn_before_the_last_boot_is_set_aside() {
        if crate::sys::boot_id().is_none() {
            return; // no boot id to tell boots apart: every unreadable file is held
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Arc::new(RecordingFiles::default());
        let state = NodeState::open(dir.path(), files.clone()).expect("open");
        state.put(staged("local:n1:default:a")).expect("put");
        let a = state.file("local:n1:default:a");
        std::fs::write(&a, b"").expect("torn");
        let state = NodeState::open(dir.path(), files.clone()).expect("open");
        assert!(state.unreadable("local:n1:default:a").is_some(), "same boot: held");
        std::fs::write(dir.path().join(BOOT_MARK), b"another-boot").expect("mark");
        let state = NodeState::open(dir.path(), files.clone()).expect("open");
        assert_eq!(state.unreadable("local:n1:default:a"), None, "earlier boot: set aside");
        assert!(!a.exists());
        assert!(a.with_extension("json.unreadable").exists(), "kept for the operator");
        state
            .put(staged("local:n1:default:a"))
            .expect("the volume stages again");
        let again = NodeState::open(dir.path(), files).expect("open");
        assert!(again.get("local:n1:default:a").staged.is_some());
    }

    /// A survey (`cellar report`) reads the state as it is: after a reboot it sets no torn file
    /// aside and marks no boot, which are the driver's to do at its next start.
    #[test]
    fn a_survey_changes_nothing() {
        let (dir, files, a) = a_and_b_staged();
        std::fs::write(&a, b"{").expect("torn");
        let aside = dir.path().join("0123.json.unreadable");
        std::fs::write(&aside, b"").expect("set aside earlier");
        let survey = Survey::read(dir.path(), &*files).expect("survey");
        assert_eq!(survey.mounts, vec![staged("local:n1:default:b")]);
        assert_eq!(survey.unreadable.keys().collect::<Vec<_>>(), vec![&a]);
        assert_eq!(survey.set_aside, vec![aside.clone()]);
        assert_eq!(survey.unreadable_of("local:n1:default:a"), Some(a.as_path()));
        assert_eq!(survey.unreadable_of("local:n1:default:b"), None);
        if crate::sys::boot_id().is_none() {
            return; // no boot id to tell boots apart
        }
        std::fs::write(dir.path().join(BOOT_MARK), b"another-boot").expect("mark");
        let survey = Survey::read(dir.path(), &*files).expect("survey");
        assert!(survey.earlier_boot);
        assert_eq!(
            survey.unreadable_of("local:n1:default:a"),
            None,
            "its mounts went with the boot"
        );
        assert!(a.exists() && aside.exists(), "nothing renamed or removed");
        assert_eq!(
            std::fs::read(dir.path().join(BOOT_MARK)).expect("mark"),
            b"another-boot"
        );
    }
}
