//! `cellar report`: what this node's pools hold, and what on disk, among the loop devices and in the
//! mount table no record and no node state explains. Read-only unless `--fix`.
//!
//! It reads the pools directly (records, directories, `/proc/self/mountinfo`, `/sys/block`), never over
//! CSI, so it works whether the driver runs or not. It never opens a pool the way the driver does (that
//! purges `.work` and `.trash`) and never creates anything. Whether the driver runs is read from the
//! data dir's lock ([`crate::roles::LOCK_FILE`]); while it runs, what may belong to a call in progress is
//! listed but left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::node::state::Survey;
use crate::roles::{self, DataDirLock};
use crate::storage::config::{Backend, ConfigError, PoolConfig};
use crate::storage::id::{Key, VolumeId};
use crate::storage::pool::{Kind, Mark, MARK};
use crate::storage::record::{self, Layout, SnapshotRecord, VolumeRecord};
use crate::storage::roster::Roster;
use crate::storage::StorageError;
use crate::sys::files::{self, Files, LinuxFiles};
use crate::sys::mountinfo::{self, MountEntry};
use crate::sys::SysError;

/// A btrfs subvolume's root directory always has this inode number.
pub const BTRFS_SUBVOLUME_INO: u64 = 256;

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// The driver's data dir (node state, default pool paths, lock).
    #[arg(long, default_value = "/var/lib/cellar")]
    pub data_dir: PathBuf,
    /// The driver's pool configuration, when it runs with one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kubelet's root directory: mounts under its CSI paths are checked.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// Remove what the report lists: unmount stray mounts, detach stray loop devices, remove orphan
    /// entries. Asks for confirmation first.
    #[arg(long)]
    pub fix: bool,
    /// With --fix: do not ask.
    #[arg(long, requires = "fix")]
    pub yes: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// While the driver runs, --fix leaves entries changed less than this many seconds ago: they may
    /// belong to a call in progress.
    #[arg(long, default_value_t = 60)]
    pub min_age: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("writing the report: {0}")]
    Output(#[source] std::io::Error),
    #[error("encoding the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing listed, or everything listed was fixed.
    Clean,
    /// Findings remain: listed without `--fix`, declined, kept or failed.
    FindingsRemain,
}

// ---------------------------------------------------------------- what a report holds

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub data_dir: PathBuf,
    pub kubelet_dir: PathBuf,
    pub driver_running: bool,
    pub pools: Vec<PoolReport>,
    pub findings: Vec<Finding>,
    /// Mounts the node state records that the kernel does not have. Not findings: kubelet's next
    /// unpublish or unstage clears them, and the driver reports them as abnormal volume conditions.
    pub stale_mounts: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<Vec<FixResult>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolReport {
    pub name: String,
    pub path: PathBuf,
    pub exists: bool,
    pub volumes: Vec<VolumeLine>,
    pub snapshots: Vec<SnapshotLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeLine {
    pub id: String,
    pub name: String,
    pub layout: Layout,
    pub capacity_bytes: u64,
    pub data: DataState,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotLine {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub data: DataState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataState {
    Present,
    Missing,
    WrongType,
}

/// What an entry is, by its type, never following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryType {
    Directory,
    /// A btrfs subvolume (a directory with inode 256 on btrfs): the btrfs layout's volumes.
    Subvolume,
    /// A regular file: the image layout's volumes.
    File,
    Symlink,
    Other,
}

pub fn entry_type(ft: fs::FileType, ino: u64, on_btrfs: bool) -> EntryType {
    if ft.is_dir() {
        if on_btrfs && ino == BTRFS_SUBVOLUME_INO {
            EntryType::Subvolume
        } else {
            EntryType::Directory
        }
    } else if ft.is_file() {
        EntryType::File
    } else if ft.is_symlink() {
        EntryType::Symlink
    } else {
        EntryType::Other
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// Data under `volumes/` or `snapshots/` that no record names.
    OrphanDirectory,
    OrphanSubvolume,
    OrphanFile,
    OrphanSymlink,
    OrphanOther,
    /// A record's temporary file left by a crash between its write and its rename.
    TempRecord,
    /// A record whose data is gone.
    RecordWithoutData,
    /// A record that cannot be parsed.
    CorruptRecord,
    /// A record whose data is there but is not what its layout makes (a symlink, a file for `dir`...).
    WrongDataType,
    /// A half-built copy in `.work`.
    WorkLeftover,
    /// Half-deleted data in `.trash`.
    TrashLeftover,
    /// A loop device backed by a file inside a pool that is no volume's data.
    StrayLoopDevice,
    /// A mount of pool data that no node state explains.
    StrayMount,
    /// A node state file the driver cannot read: its volume is refused deletes and node calls.
    UnreadableNodeState,
    /// A node state file that could not be read at the first start after a reboot, set aside.
    SetAsideNodeState,
}

impl FindingKind {
    fn as_str(self) -> &'static str {
        match self {
            FindingKind::OrphanDirectory => "orphan-directory",
            FindingKind::OrphanSubvolume => "orphan-subvolume",
            FindingKind::OrphanFile => "orphan-file",
            FindingKind::OrphanSymlink => "orphan-symlink",
            FindingKind::OrphanOther => "orphan-other",
            FindingKind::TempRecord => "temp-record",
            FindingKind::RecordWithoutData => "record-without-data",
            FindingKind::CorruptRecord => "corrupt-record",
            FindingKind::WrongDataType => "wrong-data-type",
            FindingKind::WorkLeftover => "work-leftover",
            FindingKind::TrashLeftover => "trash-leftover",
            FindingKind::StrayLoopDevice => "stray-loop-device",
            FindingKind::StrayMount => "stray-mount",
            FindingKind::UnreadableNodeState => "unreadable-node-state",
            FindingKind::SetAsideNodeState => "set-aside-node-state",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Remove,
    Unmount,
    Detach,
    /// Listed for a person to look at; `--fix` never touches it.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub pool: Option<String>,
    /// What `--fix` acts on: the entry, the loop device (`/dev/loopN`) or the mount point.
    pub path: PathBuf,
    pub detail: String,
    pub action: Action,
    /// For a stray mount: its id in mountinfo, so `--fix` unmounts that mount and no other.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_id: Option<u32>,
    /// Why `--fix` leaves it this time, when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}

impl Finding {
    fn fixable(&self) -> bool {
        self.action != Action::None && self.kept.is_none()
    }

    /// The same thing found again (a re-scan just before fixing).
    fn same(&self, other: &Finding) -> bool {
        self.kind == other.kind && self.path == other.path && self.detail == other.detail
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FixResult {
    pub kind: FindingKind,
    pub path: PathBuf,
    pub outcome: FixOutcome,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FixOutcome {
    Done,
    Skipped,
    Failed,
}

// ---------------------------------------------------------------- where things are read from

/// Where the report reads the host's state; parameters so that tests can point elsewhere.
#[derive(Debug, Clone)]
pub struct Host {
    pub mountinfo: PathBuf,
    pub sys_block: PathBuf,
    pub dev: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            mountinfo: PathBuf::from(mountinfo::SELF),
            sys_block: PathBuf::from("/sys/block"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// A pool as the report sees it: where it is configured, where it really is, and which filesystem
/// (mount) holds it. Its inner layout is the one `storage::pool` documents, read without opening the
/// pool (opening purges `.work` and `.trash`).
#[derive(Debug, Clone)]
struct PoolSite {
    config: PoolConfig,
    /// The pool directory with symlinks resolved, as the kernel names paths in mountinfo and loops.
    real_root: PathBuf,
    /// The mount holding the pool, and the pool's path inside that filesystem.
    mount: Option<(MountEntry, PathBuf)>,
    /// Why the directory is not the pool this node opened there, when it is not: its findings are
    /// listed and kept.
    not_ours: Option<String>,
}

impl PoolSite {
    fn name(&self) -> String {
        self.config.name.as_str().to_string()
    }

    fn root(&self) -> &Path {
        &self.config.path
    }

    fn collection_dir(&self, kind: Kind) -> PathBuf {
        self.root().join(match kind {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
        })
    }

    fn data_path(&self, kind: Kind, key: &Key) -> PathBuf {
        self.collection_dir(kind).join(key.as_str())
    }

    fn work_dir(&self) -> PathBuf {
        self.root().join(".work")
    }

    fn trash_dir(&self) -> PathBuf {
        self.root().join(".trash")
    }

    /// The four directories whose entries the report may list, and `--fix` may remove.
    fn entry_dirs(&self) -> [PathBuf; 4] {
        [
            self.collection_dir(Kind::Volume),
            self.collection_dir(Kind::Snapshot),
            self.work_dir(),
            self.trash_dir(),
        ]
    }

    fn on_btrfs(&self) -> bool {
        self.mount.as_ref().is_some_and(|(m, _)| m.fs_type == "btrfs")
    }

    /// The path inside the pool that a mount shows, when the mount is of this pool's filesystem.
    fn shows(&self, m: &MountEntry) -> Option<PathBuf> {
        let (pm, fs_path) = self.mount.as_ref()?;
        if m.fs_type != pm.fs_type || m.source != pm.source {
            return None;
        }
        let rel = m.root.strip_prefix(fs_path).ok()?.to_path_buf();
        // A device source names one filesystem (and btrfs subvolumes each have a device number of
        // their own, so only the source can tell). For tmpfs and the like the device numbers must
        // match; they are read only for these candidates, never for another driver's network mount
        // that could hang a stat.
        if m.source.starts_with("/dev/") {
            return Some(rel);
        }
        let same_fs = match (fs::metadata(&m.mount_point), fs::metadata(&self.real_root)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => false,
        };
        same_fs.then_some(rel)
    }
}

/// The mount a path lives on: the deepest mount point above it, the topmost one if stacked.
fn mount_of<'a>(path: &Path, mounts: &'a [MountEntry]) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .and_then(|deepest| mounts.iter().rev().find(|m| m.mount_point == deepest.mount_point))
}

/// Whether a mount point is where kubelet has CSI volumes staged or published.
pub fn under_kubelet_csi(kubelet: &Path, p: &Path) -> bool {
    if let Ok(rest) = p.strip_prefix(kubelet.join("plugins/kubernetes.io/csi")) {
        return rest.components().next().is_some();
    }
    let Ok(rest) = p.strip_prefix(kubelet.join("pods")) else {
        return false;
    };
    let parts: Vec<_> = rest.components().map(|c| c.as_os_str().to_owned()).collect();
    parts.len() >= 4 && parts[1] == "volumes" && parts[2] == "kubernetes.io~csi"
}

fn age(md: &fs::Metadata) -> Duration {
    let changed = SystemTime::UNIX_EPOCH + Duration::new(md.ctime().max(0) as u64, md.ctime_nsec().max(0) as u32);
    SystemTime::now().duration_since(changed).unwrap_or_default()
}

// ---------------------------------------------------------------- scanning

struct Scan<'a> {
    args: &'a ReportArgs,
    host: &'a Host,
    running: bool,
    mounts: Vec<MountEntry>,
    sites: Vec<PoolSite>,
    findings: Vec<Finding>,
    /// Where volume data is, resolved, for every volume record (parsed or not): a loop device backed by
    /// one of these is a volume's.
    volume_data: BTreeSet<PathBuf>,
    /// The id of each volume whose record parsed, by pool and key.
    volume_ids: BTreeMap<(String, String), String>,
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SysError + 'a {
    move |e| SysError::io(step, path, e)
}

/// Everything the report shows, read now.
pub fn scan(args: &ReportArgs, host: &Host, running: bool) -> Result<Report, ReportError> {
    let config = roles::load_config(args.config.as_ref(), &args.data_dir)?;
    // The mount table first, the node state after: the driver records a mount before making it, so
    // every mount seen here is already in the state read next.
    let mounts = mountinfo::read(&host.mountinfo)?;
    let node_dir = args.data_dir.join("node");
    // Read as it is: opening it as the driver does would set files aside after a reboot.
    let state = match LinuxFiles.entry(&node_dir)? {
        files::Entry::Dir => Some(Survey::read(&node_dir, &LinuxFiles)?),
        _ => None,
    };
    let sites = sites(&config.pools, &mounts, &rosters(args));
    let mut s = Scan {
        args,
        host,
        running,
        mounts,
        sites,
        findings: Vec::new(),
        volume_data: BTreeSet::new(),
        volume_ids: BTreeMap::new(),
    };
    let mut pools = Vec::new();
    for i in 0..s.sites.len() {
        pools.push(s.pool(i)?);
    }
    if let Some(survey) = &state {
        s.node_state(survey);
    }
    s.stray_mounts(state.as_ref());
    s.stray_loops()?;
    s.keep_what_holds_mounts();

    let mounted: BTreeSet<&Path> = s.mounts.iter().map(|m| m.mount_point.as_path()).collect();
    let is_mounted = |p: &Path| mounted.contains(p) || fs::canonicalize(p).is_ok_and(|r| mounted.contains(r.as_path()));
    let mut stale_mounts = Vec::new();
    for m in state.iter().flat_map(|s| &s.mounts) {
        let staged = m.staged.iter().map(|st| &st.path);
        stale_mounts.extend(staged.chain(m.published.keys()).filter(|p| !is_mounted(p)).cloned());
    }
    stale_mounts.sort();
    Ok(Report {
        data_dir: args.data_dir.clone(),
        kubelet_dir: args.kubelet_dir.clone(),
        driver_running: running,
        pools,
        findings: s.findings,
        stale_mounts,
        fix: None,
    })
}

/// The node's rosters, where it remembers the pools it opened.
fn rosters(args: &ReportArgs) -> Roster {
    Roster::new(&args.data_dir.join("rosters"), std::sync::Arc::new(LinuxFiles))
}

/// Why pool `pc`'s directory is not the pool this node opened there, if it is not: it must hold
/// the pool's mark with the id the node remembers (`storage/roster.rs`). A disk that is not
/// mounted leaves the empty directory below; another program's directory, another disk or another
/// node's pool holds what looks like orphans to `--fix`, and is none of this node's to remove.
fn not_ours(pc: &PoolConfig, roster: &Roster) -> Option<String> {
    let root = pc.path.display();
    let name = pc.name.as_str();
    let leave = "--fix removes nothing there; start the driver, which opens the pool there or says why it does not";
    let remembered = roster.remembered(&pc.name);
    let mark = match Mark::read(&LinuxFiles, &pc.path) {
        Ok(Some(Some(m))) => m,
        Ok(Some(None)) => return Some(format!("{root}/{MARK} does not parse; {leave}")),
        Ok(None) => {
            return Some(format!(
                "{root} lacks pool '{name}''s mark ({MARK}): it is not a pool this node opened (its disk may not be mounted, or the directory is another program's); {leave}"
            ))
        }
        Err(e) => return Some(format!("{root}/{MARK} cannot be read ({e}); {leave}")),
    };
    if mark.pool != name || mark.backend != Backend::Local {
        return Some(format!(
            "{root} is marked as pool '{}' ({:?}), not as the local pool '{name}'; {leave}",
            mark.pool, mark.backend
        ));
    }
    match (remembered, mark.id) {
        (Some(known), Some(id)) if known == id => None,
        (Some(known), id) => Some(format!(
            "{root} holds pool '{name}''s mark with id {}, not the id {known} this node remembers: another disk is mounted there; {leave}",
            id.unwrap_or_default()
        )),
        (None, _) => Some(format!(
            "this node has not opened pool '{name}' at {root} (it remembers no id for it: {} is missing); {leave}",
            roster.identity_path(&pc.name).display()
        )),
    }
}

fn sites(pools: &[PoolConfig], mounts: &[MountEntry], roster: &Roster) -> Vec<PoolSite> {
    pools
        .iter()
        .filter(|p| p.backend == Backend::Local)
        .map(|pc| {
            let real_root = fs::canonicalize(&pc.path).unwrap_or_else(|_| pc.path.clone());
            let mount = mount_of(&real_root, mounts).and_then(|m| {
                let rel = real_root.strip_prefix(&m.mount_point).ok()?;
                Some((m.clone(), m.root.join(rel)))
            });
            PoolSite {
                not_ours: not_ours(pc, roster),
                config: pc.clone(),
                real_root,
                mount,
            }
        })
        .collect()
}

/// An entry of a collection directory, read once.
struct Listed {
    name: String,
    path: PathBuf,
    md: fs::Metadata,
}

fn list(dir: &Path) -> Result<Vec<Listed>, SysError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SysError::io("read directory", dir, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io("read directory", dir))?;
        let path = e.path();
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // gone meanwhile
            Err(e) => return Err(SysError::io("lstat", &path, e)),
        };
        out.push(Listed {
            name: e.file_name().to_string_lossy().into_owned(),
            path,
            md,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

impl Scan<'_> {
    fn finding(&mut self, kind: FindingKind, pool: &str, path: &Path, detail: String, action: Action) -> usize {
        // Nothing is removed from a directory that is not this node's pool.
        let kept = self
            .sites
            .iter()
            .find(|s| s.name() == pool)
            .and_then(|s| s.not_ours.clone());
        self.findings.push(Finding {
            kind,
            pool: Some(pool.to_string()),
            path: path.to_path_buf(),
            detail,
            action,
            mount_id: None,
            kept,
        });
        self.findings.len() - 1
    }

    /// While the driver runs, an entry changed moments ago may be a call in progress.
    fn keep_if_young(&mut self, i: usize, md: &fs::Metadata) {
        let a = age(md);
        if self.running && a < Duration::from_secs(self.args.min_age) {
            self.findings[i].kept = Some(format!(
                "changed {}s ago while the driver runs: it may belong to a call in progress (--min-age {})",
                a.as_secs(),
                self.args.min_age
            ));
        }
    }

    fn pool(&mut self, i: usize) -> Result<PoolReport, ReportError> {
        let site = self.sites[i].clone();
        let name = site.name();
        let mut report = PoolReport {
            name: name.clone(),
            path: site.root().to_path_buf(),
            exists: LinuxFiles.entry(site.root())? == files::Entry::Dir,
            volumes: Vec::new(),
            snapshots: Vec::new(),
        };
        if !report.exists {
            return Ok(report);
        }
        for kind in [Kind::Volume, Kind::Snapshot] {
            self.collection(&site, kind, &mut report)?;
        }
        for (dir, kind, what) in [
            (
                site.work_dir(),
                FindingKind::WorkLeftover,
                "a copy that was never finished",
            ),
            (
                site.trash_dir(),
                FindingKind::TrashLeftover,
                "data whose delete was never finished",
            ),
        ] {
            for e in list(&dir)? {
                let t = entry_type(e.md.file_type(), e.md.ino(), site.on_btrfs());
                let i = self.finding(kind, &name, &e.path, format!("{what} ({t:?})"), Action::Remove);
                if self.running {
                    self.findings[i].kept = Some(
                        "the running driver may be using it; it empties .work and .trash itself when it starts".into(),
                    );
                }
            }
        }
        Ok(report)
    }

    fn collection(&mut self, site: &PoolSite, kind: Kind, report: &mut PoolReport) -> Result<(), ReportError> {
        let name = site.name();
        let entries = list(&site.collection_dir(kind))?;
        // Keys whose record exists, parsed or not: their data is explained.
        let mut recorded: BTreeSet<String> = BTreeSet::new();
        for e in entries.iter().filter(|e| e.md.file_type().is_file()) {
            let Some(stem) = e.name.strip_suffix(".json") else {
                continue;
            };
            let Ok(key) = Key::parse(stem) else { continue };
            recorded.insert(stem.to_string());
            if kind == Kind::Volume {
                self.volume_data.insert(site.real_root.join("volumes").join(stem));
            }
            let data_path = site.data_path(kind, &key);
            let data = fs::symlink_metadata(&data_path)
                .ok()
                .map(|md| entry_type(md.file_type(), md.ino(), site.on_btrfs()));
            let loaded = match kind {
                Kind::Volume => record::load::<VolumeRecord>(&LinuxFiles, &e.path).map(|r| r.map(Record::Volume)),
                Kind::Snapshot => record::load::<SnapshotRecord>(&LinuxFiles, &e.path).map(|r| r.map(Record::Snapshot)),
            };
            let rec = match loaded {
                Ok(Some(r)) => r,
                Ok(None) => continue, // removed meanwhile
                Err(StorageError::Corrupt { reason, .. }) => {
                    self.finding(
                        FindingKind::CorruptRecord,
                        &name,
                        &e.path,
                        format!("cannot be parsed ({reason}); it may describe a live volume: inspect it by hand"),
                        Action::None,
                    );
                    continue;
                }
                Err(other) => return Err(other.into()),
            };
            let expected: &[EntryType] = match &rec {
                Record::Volume(v) => expected_data(v.layout),
                Record::Snapshot(s) => expected_data(s.layout),
            };
            let state = match data {
                None => DataState::Missing,
                Some(t) if expected.contains(&t) => DataState::Present,
                Some(_) => DataState::WrongType,
            };
            match state {
                DataState::Missing => {
                    let i = self.finding(
                        FindingKind::RecordWithoutData,
                        &name,
                        &e.path,
                        format!("{} has no data at {}", rec.id(), data_path.display()),
                        Action::Remove,
                    );
                    if self.running {
                        self.findings[i].kept = Some(format!(
                            "the running driver holds this record in memory: delete it through CSI ({}), or stop \
                             the driver and run --fix again",
                            rec.delete_hint()
                        ));
                    }
                }
                DataState::WrongType => {
                    self.finding(
                        FindingKind::WrongDataType,
                        &name,
                        &data_path,
                        format!(
                            "{} expects {expected:?}, found {:?}",
                            rec.id(),
                            data.unwrap_or(EntryType::Other)
                        ),
                        Action::None,
                    );
                }
                DataState::Present => {}
            }
            if let Record::Volume(v) = &rec {
                self.volume_ids
                    .insert((name.clone(), stem.to_string()), v.id.to_string());
            }
            match rec {
                Record::Volume(v) => report.volumes.push(VolumeLine {
                    id: v.id.to_string(),
                    name: v.name,
                    layout: v.layout,
                    capacity_bytes: v.capacity_bytes,
                    data: state,
                }),
                Record::Snapshot(s) => report.snapshots.push(SnapshotLine {
                    id: s.id.to_string(),
                    name: s.name,
                    source_volume_id: s.source_volume_id.to_string(),
                    size_bytes: s.size_bytes,
                    data: state,
                }),
            }
        }
        for e in &entries {
            let is_record =
                e.md.file_type().is_file() && e.name.strip_suffix(".json").is_some_and(|s| recorded.contains(s));
            if is_record || recorded.contains(&e.name) {
                continue;
            }
            let t = entry_type(e.md.file_type(), e.md.ino(), site.on_btrfs());
            let temp = t == EntryType::File && e.name.starts_with('.') && e.name.ends_with(".json.tmp");
            let (kind, detail) = match t {
                _ if temp => (
                    FindingKind::TempRecord,
                    "a record's temporary file, never renamed into place",
                ),
                EntryType::Directory => (FindingKind::OrphanDirectory, "a directory no record names"),
                EntryType::Subvolume => (FindingKind::OrphanSubvolume, "a btrfs subvolume no record names"),
                EntryType::File => (FindingKind::OrphanFile, "a file (image) no record names"),
                EntryType::Symlink => (FindingKind::OrphanSymlink, "a symlink no record names (never followed)"),
                EntryType::Other => (FindingKind::OrphanOther, "a special file no record names"),
            };
            let i = self.finding(kind, &name, &e.path, detail.into(), Action::Remove);
            self.keep_if_young(i, &e.md);
        }
        report.volumes.sort_by(|a, b| a.id.cmp(&b.id));
        report.snapshots.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(())
    }

    /// The node's state files that cannot be read, and those set aside after a reboot: nothing
    /// `--fix` touches (what they record is known to nobody), each saying what to do by hand.
    fn node_state(&mut self, survey: &Survey) {
        const DOC: &str = "docs/design.md, \"Node mount state\"";
        for (path, u) in &survey.unreadable {
            let volume = u.volume_id.as_deref().map_or_else(
                || "the volume whose id hashes to this file's name".to_string(),
                |v| format!("volume {v}"),
            );
            let detail = if survey.earlier_boot {
                format!(
                    "cannot be read ({}); written before the machine's last boot, so the mounts it recorded of \
                     {volume} are gone: the driver sets it aside at its next start",
                    u.why
                )
            } else {
                format!(
                    "cannot be read ({}); it records where {volume} is staged and published, and the driver \
                     refuses that volume's deletes and node calls until it is repaired or removed: unmount what \
                     is left of the volume by hand (findmnt, losetup -j on its image) once no pod uses it, then \
                     remove the file, or repair it ({DOC})",
                    u.why
                )
            };
            self.node_finding(FindingKind::UnreadableNodeState, path, detail);
        }
        for path in &survey.set_aside {
            let detail = format!(
                "could not be read at the driver's first start after a reboot, and was set aside; the mounts it \
                 recorded went with that boot: look at it if you wish, then remove it ({DOC})"
            );
            self.node_finding(FindingKind::SetAsideNodeState, path, detail);
        }
    }

    fn node_finding(&mut self, kind: FindingKind, path: &Path, detail: String) {
        self.findings.push(Finding {
            kind,
            pool: None,
            path: path.to_path_buf(),
            detail,
            action: Action::None,
            mount_id: None,
            kept: None,
        });
    }

    /// Mounts of pool data under a pool or kubelet's CSI paths that no node state explains. One
    /// that may be of a volume whose state file cannot be read is kept: a pod may be using it.
    fn stray_mounts(&mut self, survey: Option<&Survey>) {
        let state = survey.map_or(&[][..], |s| &s.mounts[..]);
        let mounts = self.mounts.clone();
        // The kernel names mount points with symlinks resolved; kubelet's paths may hold some.
        let kubelet = fs::canonicalize(&self.args.kubelet_dir).unwrap_or_else(|_| self.args.kubelet_dir.clone());
        // Every path the node state records a mount at (as recorded, and resolved), with its volume.
        let mut recorded: Vec<(PathBuf, &str)> = Vec::new();
        for v in state {
            for p in v.staged.iter().map(|s| &s.path).chain(v.published.keys()) {
                recorded.push((p.clone(), v.volume_id.as_str()));
                if let Ok(real) = fs::canonicalize(p) {
                    recorded.push((real, v.volume_id.as_str()));
                }
            }
        }
        recorded.sort();
        recorded.dedup();
        for m in &mounts {
            let in_pool = self
                .sites
                .iter()
                .any(|s| m.mount_point.starts_with(&s.real_root) && m.mount_point != s.real_root);
            if !in_pool && !under_kubelet_csi(&kubelet, &m.mount_point) {
                continue;
            }
            let Some((site, rel)) = self.sites.iter().find_map(|s| s.shows(m).map(|rel| (s, rel))) else {
                continue; // not our data: another driver's volume, or a foreign mount
            };
            // The driver mounts a volume's data at the paths the node state records for it, and never
            // mounts anything inside a pool.
            let first = recorded.partition_point(|(p, _)| p < &m.mount_point);
            let explained = !in_pool
                && recorded[first..]
                    .iter()
                    .take_while(|(p, _)| *p == m.mount_point)
                    .any(|(_, volume_id)| {
                        VolumeId::parse(volume_id).is_ok_and(|id| {
                            id.0.pool == site.config.name && rel == Path::new("volumes").join(id.0.key.as_str())
                        })
                    });
            if !explained {
                let name = site.name();
                let detail = format!(
                    "mount {} shows {} of pool '{name}'; no node state explains it",
                    m.mount_id,
                    site.root().join(&rel).display(),
                );
                let i = self.finding(FindingKind::StrayMount, &name, &m.mount_point, detail, Action::Unmount);
                self.findings[i].mount_id = Some(m.mount_id);
                let unreadable = survey.and_then(|s| self.unreadable_holder(s, &name, &rel)).map(|file| {
                    format!(
                        "it may be a mount of the volume whose node state {} cannot be read: repair or remove that \
                         file first",
                        file.display()
                    )
                });
                // Kept also when it is in a directory that is not this node's pool.
                if unreadable.is_some() {
                    self.findings[i].kept = unreadable;
                }
            }
        }
    }

    /// The unreadable node state file of the volume whose data (`rel` in pool `pool`) a mount
    /// shows; when that volume cannot be told (no record read), any unreadable file.
    fn unreadable_holder<'s>(&self, survey: &'s Survey, pool: &str, rel: &Path) -> Option<&'s Path> {
        let key = rel.strip_prefix("volumes").ok()?.components().next()?;
        let id = self
            .volume_ids
            .get(&(pool.to_string(), key.as_os_str().to_string_lossy().into_owned()));
        match id {
            Some(id) => survey.unreadable_of(id),
            None => survey
                .unreadable
                .keys()
                .find(|_| !survey.earlier_boot)
                .map(PathBuf::as_path),
        }
    }

    /// Loop devices backed by a file inside a pool that is not the data of a volume with a record.
    fn stray_loops(&mut self) -> Result<(), ReportError> {
        let sites = self.sites.clone();
        for (dev, backing) in loop_devices(&self.host.sys_block)? {
            let deleted = backing.ends_with(" (deleted)");
            let file = PathBuf::from(backing.trim_end_matches(" (deleted)"));
            let Some(site) = sites.iter().find(|s| file.starts_with(&s.real_root)) else {
                continue;
            };
            if deleted || !self.volume_data.contains(&file) {
                let detail = format!("backed by {backing}, which is no volume's data");
                let path = self.host.dev.join(&dev);
                self.finding(
                    FindingKind::StrayLoopDevice,
                    &site.name(),
                    &path,
                    detail,
                    Action::Detach,
                );
            }
        }
        Ok(())
    }

    /// An entry to remove with a mount inside it would be removed through that mount: it is kept
    /// unless that mount is itself a stray one that `--fix` unmounts first.
    fn keep_what_holds_mounts(&mut self) {
        let strays: BTreeSet<PathBuf> = self
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::StrayMount && f.kept.is_none())
            .map(|f| f.path.clone())
            .collect();
        for f in self.findings.iter_mut().filter(|f| f.action == Action::Remove) {
            let real = resolved(&f.path);
            let held = self
                .mounts
                .iter()
                .find(|m| m.mount_point.starts_with(&real) && !strays.contains(&m.mount_point));
            if let (Some(m), None) = (held, &f.kept) {
                f.kept = Some(format!(
                    "{} is mounted inside it: unmount it first",
                    m.mount_point.display()
                ));
            }
        }
    }
}

/// What a layout's data is on disk.
fn expected_data(layout: Layout) -> &'static [EntryType] {
    match layout {
        // A dir volume copied onto btrfs by hand may be a subvolume; the driver serves it all the same.
        Layout::Dir => &[EntryType::Directory, EntryType::Subvolume],
        Layout::Btrfs => &[EntryType::Subvolume],
        Layout::Image => &[EntryType::File],
    }
}

enum Record {
    Volume(VolumeRecord),
    Snapshot(SnapshotRecord),
}

impl Record {
    fn id(&self) -> String {
        match self {
            Record::Volume(v) => v.id.to_string(),
            Record::Snapshot(s) => s.id.to_string(),
        }
    }

    fn delete_hint(&self) -> String {
        match self {
            Record::Volume(v) => format!("cellar csi delete {}", v.id),
            Record::Snapshot(s) => format!("cellar csi delete-snapshot {}", s.id),
        }
    }
}

/// Attached loop devices and their backing files (`/sys/block/loopN/loop/backing_file`).
fn loop_devices(sys_block: &Path) -> Result<Vec<(String, String)>, SysError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(sys_block) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(SysError::io("read directory", sys_block, e)),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let file = e.path().join("loop/backing_file");
        if let Some(bytes) = LinuxFiles.read_optional(&file)? {
            let backing = String::from_utf8_lossy(&bytes).trim_end_matches('\n').to_string();
            out.push((name, backing));
        }
    }
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------- fixing

fn act(f: &Finding, sites: &[PoolSite]) -> Result<String, String> {
    let err = |e: SysError| e.to_string();
    match f.action {
        Action::Unmount => {
            use crate::sys::mount::Mounter;
            crate::sys::mount::LinuxMounter::default()
                .unmount(&f.path)
                .map_err(err)?;
            Ok(format!("unmounted {}", f.path.display()))
        }
        Action::Detach => {
            let dev = crate::sys::loopdev::attachments()
                .map_err(err)?
                .into_iter()
                .map(|a| a.device)
                .find(|d| d.path == f.path)
                .ok_or_else(|| format!("{} is no longer attached", f.path.display()))?;
            crate::sys::loopdev::detach(&dev).map_err(err)?;
            Ok(format!("detached {}", f.path.display()))
        }
        Action::Remove => {
            // Only what lies in one of the four directories of a pool, never the pool or above it.
            let inside = sites.iter().any(|p| {
                let dirs = p.entry_dirs();
                f.path.parent().is_some_and(|parent| dirs.iter().any(|d| d == parent))
            });
            if !inside {
                return Err(format!("{} is not inside a pool: refused", f.path.display()));
            }
            // A btrfs volume's subvolume waits in the trash too (a delete cut short): btrfs drops
            // it in one step, where a walk file by file would be slow or refused.
            if f.kind == FindingKind::OrphanSubvolume || crate::sys::btrfs::is_subvolume(&f.path).unwrap_or(false) {
                crate::sys::btrfs::delete_subvolume(&f.path).map_err(err)?;
            } else {
                LinuxFiles.remove_tree(&f.path).map_err(err)?;
            }
            if let Some(dir) = f.path.parent() {
                LinuxFiles.sync_dir(dir).map_err(err)?;
            }
            Ok(format!("removed {}", f.path.display()))
        }
        Action::None => Err("nothing to do".into()),
    }
}

/// Fixes the `listed` findings that a fresh scan still finds, fixable, in the same state: exactly what
/// was shown, never something that appeared or changed since.
fn fix(listed: &[Finding], fresh: &Report, args: &ReportArgs, host: &Host) -> Vec<FixResult> {
    let pools = match roles::load_config(args.config.as_ref(), &args.data_dir) {
        Ok(c) => sites(&c.pools, &[], &rosters(args)),
        Err(_) => Vec::new(), // then nothing is inside a pool, and nothing is removed
    };
    let order = |f: &Finding| match f.action {
        Action::Unmount => 0,
        Action::Detach => 1,
        _ => 2,
    };
    let mut todo: Vec<&Finding> = listed.iter().filter(|f| f.fixable()).collect();
    // Mounts first, deepest first, then loop devices, then entries (no longer holding mounts).
    todo.sort_by_key(|f| (order(f), std::cmp::Reverse(f.path.components().count())));
    let mut results = Vec::new();
    for f in todo {
        let result = |outcome, message| FixResult {
            kind: f.kind,
            path: f.path.clone(),
            outcome,
            message,
        };
        let now = fresh.findings.iter().find(|g| g.same(f));
        let skip = match now {
            None => Some("no longer found".to_string()),
            Some(g) if !g.fixable() => Some(g.kept.clone().unwrap_or_else(|| "not fixable now".into())),
            Some(_) => None,
        };
        if let Some(why) = skip {
            results.push(result(FixOutcome::Skipped, why));
            continue;
        }
        if f.action == Action::Unmount {
            if let Some(why) = covered(f, host) {
                results.push(result(FixOutcome::Skipped, why));
                continue;
            }
        }
        if f.action == Action::Remove {
            if let Some(why) = holds_mount(&f.path, host) {
                results.push(result(FixOutcome::Skipped, why));
                continue;
            }
        }
        match act(f, &pools) {
            Ok(msg) => results.push(result(FixOutcome::Done, msg)),
            Err(msg) => results.push(result(FixOutcome::Failed, msg)),
        }
    }
    results
}

/// Whether the listed mount is no longer the topmost at its path (unmount would remove another).
fn covered(f: &Finding, host: &Host) -> Option<String> {
    let mounts = match mountinfo::read(&host.mountinfo) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    let top = mounts.iter().rev().find(|m| m.mount_point == f.path)?;
    (Some(top.mount_id) != f.mount_id).then(|| format!("another mount (id {}) is stacked on top of it", top.mount_id))
}

/// A path with its directory's symlinks resolved, the entry itself not followed (it may be a
/// planted symlink), as the kernel names mount points.
fn resolved(path: &Path) -> PathBuf {
    match (path.parent().map(fs::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// A mount at or below a path about to be removed, read just before removing it.
fn holds_mount(path: &Path, host: &Host) -> Option<String> {
    let real = resolved(path);
    match mountinfo::read(&host.mountinfo) {
        Ok(mounts) => mounts
            .iter()
            .find(|m| m.mount_point.starts_with(&real))
            .map(|m| format!("{} is mounted inside it", m.mount_point.display())),
        Err(e) => Some(e.to_string()),
    }
}

// ---------------------------------------------------------------- the command

/// Whether a driver holds the data dir now. The lock is only tried, never waited for, and released at
/// once; a driver starting in that instant retries (see [`crate::roles::all_in_one`]).
fn driver_running(data_dir: &Path) -> Result<bool, SysError> {
    Ok(matches!(roles::lock_data_dir(data_dir, false)?, DataDirLock::InUse))
}

pub fn run(args: ReportArgs) -> Result<Outcome, ReportError> {
    run_with(
        &args,
        &Host::default(),
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    )
}

pub fn run_with(
    args: &ReportArgs,
    host: &Host,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<Outcome, ReportError> {
    let mut report = scan(args, host, driver_running(&args.data_dir)?)?;
    if !args.json {
        shown(write!(out, "{}", human(&report)))?;
    }
    let fixable: Vec<Finding> = report.findings.iter().filter(|f| f.fixable()).cloned().collect();
    let mut remaining = report.findings.len();
    if args.fix && !fixable.is_empty() {
        let go = args.yes || confirm(fixable.len(), input)?;
        if go {
            // Held through the fix when the driver is stopped, so it cannot start half-way.
            let lock = roles::lock_data_dir(&args.data_dir, false)?;
            let fresh = scan(args, host, matches!(lock, DataDirLock::InUse))?;
            let results = fix(&fixable, &fresh, args, host);
            drop(lock);
            remaining -= results.iter().filter(|r| r.outcome == FixOutcome::Done).count();
            if !args.json {
                for r in &results {
                    let word = match r.outcome {
                        FixOutcome::Done => "",
                        FixOutcome::Skipped => "skipped: ",
                        FixOutcome::Failed => "FAILED: ",
                    };
                    shown(writeln!(out, "{word}{} ({})", r.message, r.path.display()))?;
                }
            }
            report.fix = Some(results);
        } else {
            eprintln!("nothing changed");
        }
    }
    if args.json {
        shown(serde_json::to_writer_pretty(&mut *out, &report).map_err(std::io::Error::from))?;
        shown(writeln!(out))?;
    }
    Ok(if remaining == 0 {
        Outcome::Clean
    } else {
        Outcome::FindingsRemain
    })
}

/// A write of the report: a reader that closed the pipe (`cellar report | head`) wanted no more,
/// which is not a failure of the report (its exit code still says what was found, and a `--fix`
/// goes on); any other write error is.
fn shown(written: std::io::Result<()>) -> Result<(), ReportError> {
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(ReportError::Output),
    }
}

fn confirm(n: usize, input: &mut dyn BufRead) -> Result<bool, ReportError> {
    eprint!("fix the {n} finding(s) marked for unmount, detach or remove above? [y/N] ");
    let mut line = String::new();
    input.read_line(&mut line).map_err(ReportError::Output)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

// ---------------------------------------------------------------- the human-readable form

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from(" ");
        for (c, w) in cells.iter().zip(&widths) {
            s.push_str(&format!(" {c:<w$} "));
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(|c| c.as_str()).collect()));
    }
    out
}

fn data_word(d: DataState) -> &'static str {
    match d {
        DataState::Present => "present",
        DataState::Missing => "MISSING",
        DataState::WrongType => "WRONG TYPE",
    }
}

pub fn human(r: &Report) -> String {
    let mut out = format!(
        "cellar report: data dir {}, driver {}\n",
        r.data_dir.display(),
        if r.driver_running { "running" } else { "stopped" }
    );
    for p in &r.pools {
        out.push_str(&format!(
            "\npool {} ({}): {} volume(s), {} snapshot(s){}\n",
            p.name,
            p.path.display(),
            p.volumes.len(),
            p.snapshots.len(),
            if p.exists { "" } else { ", DIRECTORY MISSING" }
        ));
        if !p.volumes.is_empty() {
            let rows: Vec<Vec<String>> = p
                .volumes
                .iter()
                .map(|v| {
                    vec![
                        v.id.clone(),
                        v.layout.as_str().into(),
                        size(v.capacity_bytes),
                        data_word(v.data).into(),
                    ]
                })
                .collect();
            out.push_str(&table(&["VOLUME", "LAYOUT", "CAPACITY", "DATA"], &rows));
        }
        if !p.snapshots.is_empty() {
            let rows: Vec<Vec<String>> = p
                .snapshots
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.source_volume_id.clone(),
                        size(s.size_bytes),
                        data_word(s.data).into(),
                    ]
                })
                .collect();
            out.push_str(&table(&["SNAPSHOT", "SOURCE", "SIZE", "DATA"], &rows));
        }
    }
    out.push_str(&format!("\nfindings: {}\n", r.findings.len()));
    if !r.findings.is_empty() {
        let rows: Vec<Vec<String>> = r
            .findings
            .iter()
            .map(|f| {
                let action = match (f.action, &f.kept) {
                    (Action::None, _) => "-",
                    (_, Some(_)) => "keep",
                    (Action::Remove, None) => "remove",
                    (Action::Unmount, None) => "unmount",
                    (Action::Detach, None) => "detach",
                };
                let detail = match &f.kept {
                    Some(why) => format!("{}; kept: {why}", f.detail),
                    None => f.detail.clone(),
                };
                vec![
                    f.kind.as_str().into(),
                    f.pool.clone().unwrap_or_default(),
                    f.path.display().to_string(),
                    action.into(),
                    detail,
                ]
            })
            .collect();
        out.push_str(&table(&["KIND", "POOL", "PATH", "FIX", "DETAIL"], &rows));
    }
    if !r.stale_mounts.is_empty() {
        out.push_str(&format!(
            "\nstale mounts: {} (recorded by the node state, absent from the kernel; kubelet's next unpublish or \
             unstage clears them)\n",
            r.stale_mounts.len()
        ));
        for p in &r.stale_mounts {
            out.push_str(&format!("  {}\n", p.display()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(id: u32, root: &str, at: &str, fs_type: &str, source: &str) -> MountEntry {
        MountEntry {
            mount_id: id,
            dev: "0:1".into(),
            root: root.into(),
            mount_point: at.into(),
            options: "rw".into(),
            fs_type: fs_type.into(),
            source: source.into(),
        }
    }

    #[test]
    fn a_directory_with_inode_256_is_a_subvolume_only_on_btrfs() {
        let dir = tempfile::tempdir().unwrap();
        let ft = fs::symlink_metadata(dir.path()).unwrap().file_type();
        assert_eq!(entry_type(ft, 256, true), EntryType::Subvolume);
        assert_eq!(entry_type(ft, 256, false), EntryType::Directory);
        assert_eq!(entry_type(ft, 257, true), EntryType::Directory);
    }

    #[test]
    fn kubelet_csi_paths_are_stage_and_pod_volume_paths_only() {
        let k = Path::new("/var/lib/kubelet");
        assert!(under_kubelet_csi(
            k,
            Path::new("/var/lib/kubelet/plugins/kubernetes.io/csi/cellar.csi.dev/abc/globalmount")
        ));
        assert!(under_kubelet_csi(
            k,
            Path::new("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pv/mount")
        ));
        assert!(!under_kubelet_csi(
            k,
            Path::new("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~nfs/pv")
        ));
        assert!(!under_kubelet_csi(
            k,
            Path::new("/var/lib/kubelet/plugins/kubernetes.io/csi")
        ));
        assert!(!under_kubelet_csi(k, Path::new("/var/lib/other")));
    }

    #[test]
    fn the_mount_of_a_path_is_the_deepest_and_topmost() {
        let mounts = [
            mount(1, "/", "/", "ext4", "/dev/vda"),
            mount(2, "/", "/data", "xfs", "/dev/vdb"),
            mount(3, "/", "/data", "btrfs", "/dev/vdc"),
            mount(4, "/", "/datastore", "ext4", "/dev/vdd"),
        ];
        let m = mount_of(Path::new("/data/pools/a"), &mounts).unwrap();
        assert_eq!(m.mount_id, 3);
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(size(64 << 20), "64 MiB");
        assert_eq!(size(1536 << 20), "1.5 GiB");
        assert_eq!(size(12), "12 B");
    }

    #[test]
    fn a_stacked_mount_is_recognised_from_its_listed_id() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("mountinfo");
        fs::write(
            &table,
            "10 1 8:1 / / rw - ext4 /dev/vda rw\n\
             20 10 8:1 /p/volumes/a /k/t rw - ext4 /dev/vda rw\n\
             21 10 8:1 /p/volumes/b /k/t rw - ext4 /dev/vda rw\n",
        )
        .unwrap();
        let host = Host {
            mountinfo: table,
            ..Host::default()
        };
        let f = |id: u32| Finding {
            kind: FindingKind::StrayMount,
            pool: None,
            path: "/k/t".into(),
            detail: format!("mount {id} shows /p/volumes/x of pool 'p'; no node state explains it"),
            action: Action::Unmount,
            mount_id: Some(id),
            kept: None,
        };
        assert_eq!(covered(&f(21), &host), None);
        assert_eq!(
            covered(&f(20), &host),
            Some("another mount (id 21) is stacked on top of it".into())
        );
    }
}
