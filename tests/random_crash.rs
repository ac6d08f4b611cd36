//! The randomized crash tester: seeded, reproducible sequences of every CSI call on every layout
//! (`dir`, `btrfs`, `image`) against the real driver, with the driver killed at a random named crash
//! point before some steps and every call retried as kubelet and the sidecars would. After every step
//! it checks the invariants of DESIGN.md: mounted data is never deleted, every record names its own
//! data, nothing leaks and every call converges. Some snapshots are backups into a restic repository
//! (invariant 7): the tester waits for their uploads at random points and at the end of each seed,
//! and then checks them with `restic` itself. A failure prints `seed N failed at step K` and the
//! step log; rerun one seed with `CELLAR_CRASH_SEEDS=N cargo test --features crash-points --test random_crash`
//! (docs/design.md, "Randomized crash tester", has the other knobs).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellar::crash::Rng;
use cellar::csi::v1::*;
use common::fs::{loops_under, TestFs};
use common::*;
use tonic::Code;

/// Seeds 1-12, then seeds that once failed: 213 (a node's I/O error on a kept backup copy's
/// delete was taken for an unreachable node; the copy stayed, and a listing showed it after the
/// backup was forgotten), 333 (a backup's forget failed after its copy's record went, the driver
/// restarted, and the retry answered that the node held nothing: a deletion mark nobody clears).
const SEEDS: [u64; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 213, 333];
const STEPS: usize = 50;
/// Attempts of one call before it counts as not converging.
const ATTEMPTS: usize = 20;
/// Above this many volumes the tester prefers deleting to creating, to keep the pools small.
const MAX_VOLUMES: usize = 8;
const MARKER: &str = "marker";
/// The backup repository every backup goes to, and its key.
const REPOSITORY: &str = "offsite";
const PASSWORD: &str = "random crash tester";
/// How long a call that waits on an upload (DeleteSnapshot of a backup answers ABORTED while it
/// runs; a restore from a backup not yet ready answers FAILED_PRECONDITION) is retried, and how long
/// the uploads of a step may take before they count as not converging.
const UPLOAD_WAIT: Duration = Duration::from_secs(120);
/// The chance, after each step, that the tester waits for every upload and checks the backups
/// strictly (ready, local copies); `restic` is asked after prunes and at the end of every seed.
const SETTLE_PERCENT: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layout {
    Dir,
    Btrfs,
    Image,
}

const LAYOUTS: [Layout; 3] = [Layout::Dir, Layout::Btrfs, Layout::Image];

impl Layout {
    fn pool(self) -> &'static str {
        match self {
            Layout::Dir => "default",
            Layout::Btrfs => "bt",
            Layout::Image => "img",
        }
    }
    /// Whether the data lies in the pool as a directory the test can read without mounting it.
    fn readable_in_pool(self) -> bool {
        self != Layout::Image
    }
}

#[derive(Clone, Debug)]
struct Vol {
    id: String,
    layout: Layout,
    bytes: i64,
    marker: String,
    staged: Option<PathBuf>,
    published: Option<PathBuf>,
    /// The publish is read-only (the pod cannot write through it).
    read_only: bool,
}

#[derive(Clone, Debug)]
struct Snap {
    id: String,
    layout: Layout,
    /// The source's size when the snapshot was taken: a restore needs at least this much.
    bytes: i64,
    source: String,
    marker: String,
    /// A snapshot that is also a backup into the repository.
    backup: Option<Backup>,
    /// The group snapshot it is a member of: deleted with the group, never alone.
    group: Option<String>,
}

#[derive(Clone, Copy, Debug)]
struct Backup {
    keep_local: bool,
    /// ListSnapshots has called it ready to use: from then on it must stay so, and restore.
    ready: bool,
}

impl Snap {
    /// Whether the pool holds the local snapshot (record and data) once its upload is done.
    fn kept_in_pool(&self) -> bool {
        self.backup.is_none_or(|b| b.keep_local)
    }

    /// Whether the pool may keep the local snapshot of an uploaded backup without keepLocal: an
    /// image volume's newest uploaded backup stays as the base its next backup is compared with
    /// (at most one per volume, none once the volume is deleted: checked in `check`).
    fn may_stay_as_base(&self) -> bool {
        self.layout == Layout::Image && self.backup.is_some_and(|b| !b.keep_local)
    }
}

/// A group snapshot: its id and its members' snapshot names.
#[derive(Clone, Debug)]
struct Group {
    id: String,
    members: Vec<String>,
}

/// What should exist, by name.
#[derive(Default)]
struct Model {
    vols: BTreeMap<String, Vol>,
    snaps: BTreeMap<String, Snap>,
    groups: BTreeMap<String, Group>,
    next: usize,
}

/// A CreateVolume: empty, or a copy of `source`.
#[derive(Clone, Debug)]
struct NewVolume {
    name: String,
    layout: Layout,
    bytes: i64,
    source: Option<volume_content_source::Type>,
}

/// One CSI call, kept so that it can be sent again.
#[derive(Clone, Debug)]
enum Call {
    Create(NewVolume),
    Snapshot {
        name: String,
        source: String,
        /// A backup into the repository (`Some(keep_local)`).
        backup: Option<bool>,
    },
    Expand {
        id: String,
        bytes: i64,
    },
    Modify {
        id: String,
        key: &'static str,
        value: &'static str,
    },
    Stage {
        id: String,
        staging: PathBuf,
    },
    Publish {
        id: String,
        staging: PathBuf,
        target: PathBuf,
        read_only: bool,
    },
    Unpublish {
        id: String,
        target: PathBuf,
    },
    Unstage {
        id: String,
        staging: PathBuf,
    },
    DeleteVolume {
        id: String,
    },
    DeleteSnapshot {
        id: String,
    },
    /// CreateVolumeGroupSnapshot of `sources` (volume ids); `per-volume` consistency unless
    /// every member is an image.
    Group {
        name: String,
        sources: Vec<String>,
        per_volume: bool,
    },
    DeleteGroup {
        id: String,
        snapshots: Vec<String>,
    },
    /// `cellar backup prune` of the repository, as the controller's pruner runs it; with
    /// `keep_delete_secs: 0` only once every upload has finished (docs/backups.md).
    Prune {
        config: PathBuf,
        keep_delete_secs: u64,
    },
}

impl Call {
    /// Sends the call once; a create answers the id it made.
    async fn send(&self, d: &mut Driver) -> Result<String, tonic::Status> {
        match self {
            Call::Create(v) => {
                let mut r = create_req(&v.name, v.bytes);
                r.parameters.insert("pool".into(), v.layout.pool().into());
                r.volume_content_source = v.source.clone().map(|t| VolumeContentSource { r#type: Some(t) });
                let v = d.ctl.create_volume(r).await?.into_inner().volume;
                Ok(v.map(|v| v.volume_id).unwrap_or_default())
            }
            Call::Snapshot {
                name,
                source,
                backup: None,
            } => d.snapshot(name, source).await.map(|s| s.snapshot_id),
            Call::Snapshot {
                name,
                source,
                backup: Some(keep_local),
            } => {
                let mut parameters =
                    std::collections::HashMap::from([("backupRepository".to_string(), REPOSITORY.to_string())]);
                if *keep_local {
                    parameters.insert("keepLocal".into(), "true".into());
                }
                d.ctl
                    .create_snapshot(CreateSnapshotRequest {
                        name: name.clone(),
                        source_volume_id: source.clone(),
                        parameters,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().snapshot.map(|s| s.snapshot_id).unwrap_or_default())
            }
            Call::Group {
                name,
                sources,
                per_volume,
            } => {
                let mut g = group_controller_client::GroupControllerClient::new(
                    cellar::client::connect(&d.endpoint()).await.expect("connect"),
                );
                let mut parameters = std::collections::HashMap::new();
                if *per_volume {
                    parameters.insert("consistency".to_string(), "per-volume".to_string());
                }
                let got = g
                    .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                        name: name.clone(),
                        source_volume_ids: sources.clone(),
                        parameters,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .group_snapshot
                    .unwrap_or_default();
                // The group's id, then `source=snapshot` for each member.
                let mut out = got.group_snapshot_id;
                for m in got.snapshots {
                    out.push_str(&format!("\n{}={}", m.source_volume_id, m.snapshot_id));
                }
                Ok(out)
            }
            Call::DeleteGroup { id, snapshots } => {
                let mut g = group_controller_client::GroupControllerClient::new(
                    cellar::client::connect(&d.endpoint()).await.expect("connect"),
                );
                g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id.clone(),
                    snapshot_ids: snapshots.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| String::new())
            }
            Call::Prune {
                config,
                keep_delete_secs,
            } => {
                let out = prune(config, *keep_delete_secs, None).await;
                if out.status.success() {
                    Ok(String::new())
                } else {
                    // A failed prune is tried again, as the pruner does next time.
                    Err(tonic::Status::internal(format!(
                        "cellar backup prune: {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )))
                }
            }
            Call::Expand { id, bytes } => d
                .ctl
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: *bytes,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map(|_| String::new()),
            Call::Modify { id, key, value } => d
                .ctl
                .controller_modify_volume(ControllerModifyVolumeRequest {
                    volume_id: id.clone(),
                    mutable_parameters: [(key.to_string(), value.to_string())].into(),
                    ..Default::default()
                })
                .await
                .map(|_| String::new()),
            Call::Stage { id, staging } => {
                std::fs::create_dir_all(staging).expect("kubelet makes the staging directory");
                d.stage(id, staging).await.map(|_| String::new())
            }
            Call::Publish {
                id,
                staging,
                target,
                read_only,
            } => {
                // kubelet makes the pod's volume directory; the driver makes the target in it.
                std::fs::create_dir_all(target.parent().expect("target in a pod directory")).expect("pod directory");
                d.publish(id, staging, target, rwo(), *read_only)
                    .await
                    .map(|_| String::new())
            }
            Call::Unpublish { id, target } => d.unpublish(id, target).await.map(|_| String::new()),
            Call::Unstage { id, staging } => d.unstage(id, staging).await.map(|_| String::new()),
            Call::DeleteVolume { id } => d.delete(id).await.map(|_| String::new()),
            Call::DeleteSnapshot { id } => d
                .ctl
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| String::new()),
        }
    }

    /// One line for the step log, with names instead of whole ids.
    fn describe(&self) -> String {
        let short = |id: &str| id.rsplit(':').next().unwrap_or(id).to_string();
        match self {
            Call::Create(v) => {
                let from = match &v.source {
                    None => String::new(),
                    Some(volume_content_source::Type::Volume(v)) => format!(" clone of {}", short(&v.volume_id)),
                    Some(volume_content_source::Type::Snapshot(s)) => format!(" restore of {}", short(&s.snapshot_id)),
                };
                format!("create {} {:?} {} MiB{from}", v.name, v.layout, v.bytes / MIB)
            }
            Call::Snapshot {
                name,
                source,
                backup: None,
            } => format!("snapshot {name} of {}", short(source)),
            Call::Snapshot {
                name,
                source,
                backup: Some(keep),
            } => format!(
                "backup {name} of {}{}",
                short(source),
                if *keep { " keepLocal" } else { "" }
            ),
            Call::Expand { id, bytes } => format!("expand {} to {} MiB", short(id), bytes / MIB),
            Call::Modify { id, key, value } => format!("modify {} {key}={value}", short(id)),
            Call::Stage { id, .. } => format!("stage {}", short(id)),
            Call::Publish { id, read_only, .. } => {
                format!("publish {}{}", short(id), if *read_only { " read-only" } else { "" })
            }
            Call::Unpublish { id, .. } => format!("unpublish {}", short(id)),
            Call::Unstage { id, .. } => format!("unstage {}", short(id)),
            Call::DeleteVolume { id } => format!("delete volume {}", short(id)),
            Call::DeleteSnapshot { id } => format!("delete snapshot {}", short(id)),
            Call::Prune { keep_delete_secs, .. } => format!("prune (keep-delete {keep_delete_secs} s)"),
            Call::Group {
                name,
                sources,
                per_volume,
            } => format!(
                "group snapshot {name} of {}{}",
                sources.iter().map(|s| short(s)).collect::<Vec<_>>().join(", "),
                if *per_volume { " per-volume" } else { "" }
            ),
            Call::DeleteGroup { id, .. } => format!("delete group snapshot {}", short(id)),
        }
    }

    /// Whether the call may have to wait for an upload: DeleteSnapshot of a backup (ABORTED while
    /// it uploads) and a restore from a backup (FAILED_PRECONDITION until it is ready).
    fn waits_on_upload(&self) -> bool {
        match self {
            Call::DeleteSnapshot { id } => id.starts_with("backup:"),
            Call::Create(NewVolume {
                source: Some(volume_content_source::Type::Snapshot(s)),
                ..
            }) => s.snapshot_id.starts_with("backup:"),
            _ => false,
        }
    }

    /// The crash points this call can reach.
    fn points(&self) -> &'static [&'static str] {
        match self {
            Call::Create(NewVolume { source: None, .. }) => &["create-volume:before-record", "image:before-rename"],
            // A restore from a backup streams it from the repository (or copies a kept local copy).
            Call::Create(_) if self.waits_on_upload() => &[
                "import:mid-stream",
                "import:before-rename",
                "copy:before-rename",
                "create-volume:before-record",
            ],
            Call::Create(_) => &["copy:before-rename", "create-volume:before-record"],
            Call::Snapshot { backup: None, .. } => &["create-snapshot:before-record", "copy:before-rename"],
            // The backup:* points are reached by the upload thread after the call has answered.
            Call::Snapshot { backup: Some(_), .. } => &[
                "create-snapshot:before-record",
                "backup:before-upload",
                "backup:after-upload",
                "backup:checked-copy-written",
                "backup:before-mark",
            ],
            Call::Prune { .. } => &["backup:prune-planned"],
            Call::Group { per_volume: false, .. } => {
                &["group:before-records", "group:before-group-record", "group:frozen"]
            }
            Call::Group { .. } => &["group:before-records", "group:before-group-record"],
            Call::DeleteGroup { .. } => &["delete-group:before-record", "delete:after-trash"],
            Call::Expand { .. } => &["expand:before-record"],
            Call::Stage { .. } => &["stage:before-attach", "stage:after-attach", "stage:before-mount"],
            Call::Publish { .. } => &["publish:before-mount"],
            Call::Unpublish { .. } => &["unpublish:after-unmount"],
            Call::Unstage { .. } => &["unstage:before-detach"],
            Call::DeleteVolume { .. } | Call::DeleteSnapshot { .. } => &["delete:after-trash"],
            Call::Modify { .. } => &[],
        }
    }
}

/// Writes `marker` into a volume's directory, as a pod would, and syncs it.
fn write_synced(dir: &Path, marker: &str) -> Checked {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(MARKER)).map_err(|e| format!("write marker: {e}"))?;
    f.write_all(marker.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write marker: {e}"))
}

/// Failures a step may meet instead of a crash (`CELLAR_FAIL_AT`): a full disk at the record or the
/// copy, a failing device, an interrupted write or copy, a loop device that cannot be had, and any
/// file creation, fsync, rename or directory creation failing (every one, while the step's driver
/// runs; removals are not failed, so the call's undo can run).
const FAILURES: [&str; 11] = [
    "record:write=ENOSPC",
    "record:write=EIO",
    "record:write=EINTR",
    "copy:data=EIO",
    "copy:data=EINTR",
    "btrfs:snapshot=ENOSPC",
    "loop:attach=ENXIO",
    "file:create=ENOSPC",
    "file:fsync=EIO",
    "file:rename=EIO",
    "file:mkdir=EDQUOT",
];

/// What a step is armed with before it runs.
#[derive(Debug, Clone, Copy)]
enum Arm {
    /// The driver dies at this crash point.
    Crash(&'static str),
    /// This step fails with this errno (`point=ERRNO`); the caller retries or gives up.
    Fail(&'static str, bool),
}

const ALL_POINTS: [&str; 23] = [
    "backup:after-upload",
    "backup:before-mark",
    "backup:before-upload",
    "backup:checked-copy-written",
    "backup:prune-planned",
    "copy:before-rename",
    "create-snapshot:before-record",
    "create-volume:before-record",
    "delete-group:before-record",
    "delete:after-trash",
    "expand:before-record",
    "group:before-group-record",
    "group:before-records",
    "group:frozen",
    "image:before-rename",
    "import:before-rename",
    "import:mid-stream",
    "publish:before-mount",
    "stage:after-attach",
    "stage:before-attach",
    "stage:before-mount",
    "unpublish:after-unmount",
    "unstage:before-detach",
];

/// A restore from a backup that is not yet ready to use: the provisioner tries again later.
fn still_uploading(call: &Call, s: &tonic::Status) -> bool {
    call.waits_on_upload() && s.code() == Code::FailedPrecondition && s.message().contains("still uploading")
}

/// Whether a seed takes backups: every third one. Once a seed has a repository, every
/// ListSnapshots opens it (its key's scrypt costs about half a second) and uploads, restores and
/// `restic` calls take seconds; backups in every seed would make the default run several minutes
/// longer.
fn backups_in(seed: u64) -> bool {
    seed % 3 == 0
}

/// Codes after which kubelet and the sidecars send the same call again.
fn transient(c: Code) -> bool {
    matches!(
        c,
        Code::Aborted | Code::Unavailable | Code::Unknown | Code::Internal | Code::DeadlineExceeded
    )
}

struct Run {
    seed: u64,
    rng: Rng,
    d: Driver,
    /// The pool configuration, the repository and its key.
    cfg: tempfile::TempDir,
    pools: BTreeMap<Layout, PathBuf>,
    model: Model,
    log: Vec<String>,
    step: usize,
    /// The last step pruned the repository.
    pruned: bool,
    /// ListSnapshots may have changed since it was last compared with the model.
    list_due: bool,
    /// This seed takes backups ([`backups_in`]).
    backups: bool,
    /// No upload runs: the checks allow no upload in progress.
    settled: bool,
    // Kept last: the filesystems are unmounted after the driver is gone.
    _btrfs: TestFs,
    _xfs: TestFs,
    _dir_pool: tempfile::TempDir,
}

/// How much of the repository `check_backups` asks restic about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restic {
    No,
    /// `restic snapshots` (one per live backup key, none for deleted ones) and `restic check`.
    Check,
    /// The same with `restic check --read-data`.
    ReadData,
}

/// A violation, described for the report.
type Checked = Result<(), String>;

impl Run {
    async fn new(seed: u64) -> Run {
        let btrfs = TestFs::new("btrfs", 512);
        let xfs = TestFs::new("xfs", 1024);
        let dir_pool = tempfile::tempdir().expect("tempdir");
        let pools = BTreeMap::from([
            (Layout::Dir, dir_pool.path().join("pool")),
            (Layout::Btrfs, btrfs.path("pool")),
            (Layout::Image, xfs.path("pool")),
        ]);
        let cfg = tempfile::tempdir().expect("tempdir");
        let key = cfg.path().join("key");
        std::fs::write(&key, format!("{PASSWORD}\n")).expect("key");
        let yaml = format!(
            "pools:\n  - name: default\n    path: {}\n    layout: dir\n  - name: bt\n    path: {}\n    layout: btrfs\n  - name: img\n    path: {}\n    layout: image\n    fsType: ext4\nrepositories:\n  - name: {REPOSITORY}\n    path: {}\n    passwordFile: {}\n",
            pools[&Layout::Dir].display(),
            pools[&Layout::Btrfs].display(),
            pools[&Layout::Image].display(),
            cfg.path().join("repo").display(),
            key.display()
        );
        std::fs::write(cfg.path().join("config.yaml"), yaml).expect("config");
        let config = cfg.path().join("config.yaml");
        let d = Driver::start_with(&["--config", config.to_str().expect("utf-8")], &[]).await;
        Run {
            seed,
            rng: Rng(seed),
            d,
            cfg,
            pools,
            model: Model::default(),
            log: Vec::new(),
            step: 0,
            pruned: false,
            list_due: true,
            backups: backups_in(seed),
            settled: false,
            _btrfs: btrfs,
            _xfs: xfs,
            _dir_pool: dir_pool,
        }
    }

    fn fail(&self, what: String) -> String {
        format!(
            "seed {} failed at step {}: {what}\nstep log:\n{}\ndriver log (tail):\n{}",
            self.seed,
            self.step,
            self.log.join("\n"),
            tail(&self.d.log(), 15)
        )
    }

    /// Sends `call` until it succeeds or answers a definitive error.
    /// A call that waits on an upload is retried for up to [`UPLOAD_WAIT`] instead, and a restore
    /// from a backup the model has not yet seen ready also after FAILED_PRECONDITION "still
    /// uploading" (the provisioner retries every error).
    async fn converge(&mut self, call: &Call) -> Result<Result<String, tonic::Status>, String> {
        let waits = call.waits_on_upload();
        let started = Instant::now();
        let mut last;
        let mut attempt = 0;
        loop {
            match call.send(&mut self.d).await {
                Err(s) if transient(s.code()) => last = Some(s),
                Err(s) if still_uploading(call, &s) => {
                    if let Some(n) = self
                        .restored_backup(call)
                        .filter(|n| self.model.snaps[n].backup.is_some_and(|b| b.ready))
                    {
                        return Err(format!(
                            "{call:?}: backup {n} was ready to use, but the restore answered {:?}: {}",
                            s.code(),
                            s.message()
                        ));
                    }
                    last = Some(s);
                }
                done => return Ok(done),
            }
            attempt += 1;
            if waits {
                if started.elapsed() > UPLOAD_WAIT {
                    return Err(format!(
                        "{call:?} did not converge in {UPLOAD_WAIT:?} ({attempt} attempts); last: {last:?}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            } else {
                if attempt >= ATTEMPTS {
                    return Err(format!(
                        "{call:?} did not converge in {ATTEMPTS} attempts; last: {last:?}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(10 << attempt.min(4))).await;
            }
        }
    }

    /// The model's name of the backup a restore reads.
    fn restored_backup(&self, call: &Call) -> Option<String> {
        let Call::Create(NewVolume {
            source: Some(volume_content_source::Type::Snapshot(s)),
            ..
        }) = call
        else {
            return None;
        };
        self.model
            .snaps
            .iter()
            .find(|(_, x)| x.id == s.snapshot_id)
            .map(|(n, _)| n.clone())
    }

    /// Runs `call`, with the driver armed to die at a crash point first when `point` is given, then
    /// restarted clean; returns whether it crashed and the converged outcome (`retry` may change the
    /// call sent after a crash, as a re-created object would).
    async fn run(
        &mut self,
        call: Call,
        arm: Option<Arm>,
        retry: Option<Call>,
    ) -> Result<(bool, Call, Result<String, tonic::Status>), String> {
        if matches!(
            call,
            Call::Snapshot { .. } | Call::DeleteSnapshot { .. } | Call::Group { .. } | Call::DeleteGroup { .. }
        ) {
            self.list_due = true;
        }
        let point = match arm {
            None => {
                let out = self.converge(&call).await?;
                return Ok((false, call, out));
            }
            Some(Arm::Fail(spec, give_up)) => {
                // One attempt meets the failure; then the disk is healthy again and the caller
                // retries, or gives up (a provisioner whose PVC was deleted never comes back).
                self.d.kill();
                self.d.spawn(&[("CELLAR_FAIL_AT", spec)]).await;
                let first = call.send(&mut self.d).await;
                // A failed call cleans up after itself before it answers: checked on the driver
                // that answered, before a restart's sweep could tidy what it left. A failed
                // removal (delete, unpublish, unstage; a group's delete may have removed some of
                // its members) may have done part of its work or all of
                // it (the record went, the directory's sync failed; the unmount was done, the
                // state's write failed): its retry, which always comes, finishes; the check
                // after it applies.
                // Nor when every rename fails: the undo moves what the call made into the trash
                // by a rename (it stays for the name's next call, or the next start's sweep).
                let undone = !spec.starts_with("file:rename")
                    && !matches!(
                        call,
                        Call::DeleteVolume { .. }
                            | Call::DeleteSnapshot { .. }
                            | Call::DeleteGroup { .. }
                            | Call::Unpublish { .. }
                            | Call::Unstage { .. }
                    );
                if let (Err(s), true) = (&first, undone) {
                    self.check()
                        .await
                        .map_err(|e| format!("after {spec} failed the call ({:?}), before a restart: {e}", s.code()))?;
                }
                self.d.kill();
                self.d.spawn(&[]).await;
                return match first {
                    Ok(v) => Ok((false, call, Ok(v))),
                    Err(s) if give_up => Ok((false, call, Err(s))),
                    Err(_) => {
                        let out = self.converge(&call).await?;
                        Ok((false, call, out))
                    }
                };
            }
            Some(Arm::Crash(point)) => point,
        };
        if let Call::Prune {
            config,
            keep_delete_secs,
        } = &call
        {
            // The prune runs in its own process: that one dies at the point, the driver lives on.
            let out = prune(config, *keep_delete_secs, Some(point)).await;
            let crashed = String::from_utf8_lossy(&out.stderr).contains("reached: aborting");
            if out.status.success() {
                return Ok((false, call, Ok(String::new())));
            }
            let out = self.converge(&call).await?;
            return Ok((crashed, call, out));
        }
        // The backup:* points are reached by upload threads, after the call has answered (its
        // own upload) or whenever an armed start resumes one: the retry is then the same call,
        // which has made its object already.
        let background = point.starts_with("backup:");
        self.d.kill();
        let crashes = |d: &Driver| d.log().matches("reached: aborting").count();
        let before = crashes(&self.d);
        if self.d.try_spawn(&[("CELLAR_CRASH_AT", point)]).await.is_err() {
            // An upload resumed at start reached the point before the call could be sent.
            self.d.spawn(&[]).await;
            let out = self.converge(&call).await?;
            return Ok((true, call, out));
        }
        let first = call.send(&mut self.d).await;
        if background {
            // Give the uploads the time to reach the point, or to finish without reaching it.
            let started = Instant::now();
            while crashes(&self.d) == before && !self.pending_uploads().is_empty() && started.elapsed() < UPLOAD_WAIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let crashed = crashes(&self.d) > before;
        if crashed {
            self.d.wait_exit();
        } else {
            self.d.kill();
        }
        self.d.spawn(&[]).await;
        match first {
            Ok(v) if !crashed => Ok((false, call, Ok(v))),
            Err(s) if !crashed && !transient(s.code()) && !still_uploading(&call, &s) => Ok((false, call, Err(s))),
            _ => {
                let call = if crashed && !background {
                    retry.unwrap_or(call)
                } else {
                    call
                };
                let out = self.converge(&call).await?;
                Ok((crashed, call, out))
            }
        }
    }

    /// The crash points any step may be armed with: those of backups and restores only in the
    /// seeds that take backups (the other seeds replay the sequences they always had).
    fn all_points(&self) -> Vec<&'static str> {
        ALL_POINTS
            .into_iter()
            .filter(|p| self.backups || !(p.starts_with("backup:") || p.starts_with("import:")))
            .collect()
    }

    fn name(&mut self, prefix: &str) -> String {
        self.model.next += 1;
        format!("{prefix}-{}", self.model.next)
    }

    fn create(&mut self, layout: Layout, bytes: i64, source: Option<volume_content_source::Type>) -> Call {
        Call::Create(NewVolume {
            name: self.name("pvc"),
            layout,
            bytes,
            source,
        })
    }

    fn vols_where(&self, f: impl Fn(&Vol) -> bool) -> Vec<String> {
        self.model
            .vols
            .iter()
            .filter(|(_, v)| f(v))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Reads a volume's marker: through its publish path, from the pool, or (image) by staging and
    /// publishing it for a moment at a private path.
    async fn read_marker(&mut self, name: &str) -> Result<String, String> {
        let v = self.model.vols[name].clone();
        if let Some(p) = &v.published {
            return std::fs::read_to_string(p.join(MARKER)).map_err(|e| format!("{name}: marker at {p:?}: {e}"));
        }
        if v.layout.readable_in_pool() {
            let p = self.pools[&v.layout].join("volumes").join(name).join(MARKER);
            return std::fs::read_to_string(&p).map_err(|e| format!("{name}: marker at {p:?}: {e}"));
        }
        let (staging, target) = (self.d.path("peek-staging"), self.d.path("peek-target"));
        let staging = v.staged.clone().unwrap_or(staging);
        let mut steps = vec![];
        if v.staged.is_none() {
            steps.push(Call::Stage {
                id: v.id.clone(),
                staging: staging.clone(),
            });
        }
        // A look only: published read-only.
        steps.push(Call::Publish {
            id: v.id.clone(),
            staging: staging.clone(),
            target: target.clone(),
            read_only: true,
        });
        for c in &steps {
            self.converge(c).await?.map_err(|s| format!("peek {c:?}: {s:?}"))?;
        }
        let read = std::fs::read_to_string(target.join(MARKER)).map_err(|e| format!("{name}: marker: {e}"));
        let mut undo = vec![Call::Unpublish {
            id: v.id.clone(),
            target,
        }];
        if v.staged.is_none() {
            undo.push(Call::Unstage {
                id: v.id.clone(),
                staging,
            });
        }
        for c in &undo {
            self.converge(c).await?.map_err(|s| format!("peek {c:?}: {s:?}"))?;
        }
        read
    }

    /// Writes a new volume's marker, as a pod would, and syncs it.
    async fn write_marker(&mut self, name: &str, marker: &str) -> Checked {
        let v = self.model.vols[name].clone();
        let write = |dir: &Path| write_synced(dir, marker);
        if v.layout.readable_in_pool() {
            return write(&self.pools[&v.layout].join("volumes").join(name));
        }
        let (staging, target) = (self.d.path("peek-staging"), self.d.path("peek-target"));
        let setup = [
            Call::Stage {
                id: v.id.clone(),
                staging: staging.clone(),
            },
            Call::Publish {
                id: v.id.clone(),
                staging: staging.clone(),
                target: target.clone(),
                read_only: false,
            },
        ];
        for c in &setup {
            self.converge(c).await?.map_err(|s| format!("marker {c:?}: {s:?}"))?;
        }
        write(&target)?;
        let undo = [
            Call::Unpublish {
                id: v.id.clone(),
                target,
            },
            Call::Unstage {
                id: v.id.clone(),
                staging,
            },
        ];
        for c in &undo {
            self.converge(c).await?.map_err(|s| format!("marker {c:?}: {s:?}"))?;
        }
        Ok(())
    }

    /// One random step: choose a call the model allows, maybe arm a crash, run and check it.
    async fn step(&mut self) -> Checked {
        let staged = self.vols_where(|v| v.staged.is_some() && v.published.is_none());
        let published = self.vols_where(|v| v.published.is_some());
        let writable = self.vols_where(|v| v.published.is_some() && !v.read_only);
        let idle = self.vols_where(|v| v.staged.is_none());
        let all = self.vols_where(|_| true);
        let snaps: Vec<String> = self.model.snaps.keys().cloned().collect();
        // A group's members are deleted with it (DeleteSnapshot refuses one alone).
        let deletable: Vec<String> = self
            .model
            .snaps
            .iter()
            .filter(|(_, s)| s.group.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        let full = all.len() >= MAX_VOLUMES;
        let has_backups = self.model.snaps.values().any(|s| s.backup.is_some());
        if has_backups && self.rng.chance(4) {
            // A prune: removing at once (keep-delete 0) only while no upload runs, as documented;
            // else it only marks unused packs, whatever runs meanwhile.
            let keep_delete_secs = if self.rng.chance(50) {
                self.settle().await?;
                0
            } else {
                3600
            };
            let call = Call::Prune {
                config: self.cfg.path().join("config.yaml"),
                keep_delete_secs,
            };
            return self.run_step(call).await;
        }
        if all.len() >= 2 && self.rng.chance(5) {
            // Two or three volumes at one point in time; per-volume unless all are images.
            let mut pick = all.clone();
            let n = 2 + self.rng.below(2);
            let mut sources = Vec::new();
            while sources.len() < n && !pick.is_empty() {
                let i = self.rng.below(pick.len());
                sources.push(self.model.vols[&pick.remove(i)].id.clone());
            }
            let per_volume = sources
                .iter()
                .any(|id| self.vol_by_id(id).is_some_and(|(_, v)| v.layout != Layout::Image));
            let call = Call::Group {
                name: self.name("group"),
                sources,
                per_volume,
            };
            return self.run_step(call).await;
        }
        if !self.model.groups.is_empty() && self.rng.chance(6) {
            let names: Vec<String> = self.model.groups.keys().cloned().collect();
            let g = self.model.groups[self.rng.pick(&names)].clone();
            let snapshots = g.members.iter().map(|m| self.model.snaps[m].id.clone()).collect();
            let call = Call::DeleteGroup { id: g.id, snapshots };
            return self.run_step(call).await;
        }
        if !writable.is_empty() && self.rng.chance(12) {
            // A pod writes into its volume (and syncs, as a database does): snapshots, clones
            // and backups made after hold the new marker, those made before the old one; an
            // incremental backup that reused its parent's data would restore the old one.
            let n = self.rng.pick(&writable).clone();
            let marker = format!("seed {} volume {n} step {}", self.seed, self.step);
            let v = self.model.vols.get_mut(&n).expect("published volume");
            write_synced(v.published.as_ref().expect("published"), &marker)?;
            v.marker = marker;
            self.log
                .push(format!("{:>3}: the pod of {n} writes a new marker", self.step));
            return Ok(());
        }
        let choice = self.rng.below(100);
        let call = match choice {
            0..=11 if !full => {
                let layout = *self.rng.pick(&LAYOUTS);
                self.create(layout, 32 * MIB, None)
            }
            12..=19 if !full && !all.is_empty() => {
                let src = self.rng.pick(&all).clone();
                let v = &self.model.vols[&src];
                let (layout, bytes, id) = (v.layout, v.bytes, v.id.clone());
                self.create(layout, bytes, Some(from_volume(&id)))
            }
            20..=29 if !all.is_empty() => {
                let src = self.rng.pick(&all).clone();
                // A third are backups, half of those keeping their local copy.
                let backup = if self.backups && self.rng.chance(33) {
                    Some(self.rng.chance(50))
                } else {
                    None
                };
                Call::Snapshot {
                    name: self.name(if backup.is_some() { "backup" } else { "snap" }),
                    source: self.model.vols[&src].id.clone(),
                    backup,
                }
            }
            30..=37 if !full && !snaps.is_empty() => {
                let s = self.model.snaps[self.rng.pick(&snaps)].clone();
                let bytes = s.bytes + if self.rng.chance(30) { 16 * MIB } else { 0 };
                self.create(s.layout, bytes, Some(from_snapshot(&s.id)))
            }
            38..=43 if !all.is_empty() => {
                let v = &self.model.vols[self.rng.pick(&all)];
                Call::Expand {
                    id: v.id.clone(),
                    bytes: v.bytes + 16 * MIB,
                }
            }
            44..=47 if !all.is_empty() => {
                let v = &self.model.vols[self.rng.pick(&all)];
                let (key, value) = if v.layout == Layout::Btrfs && self.rng.chance(50) {
                    ("compression", "zstd")
                } else {
                    ("deletePolicy", "delete")
                };
                Call::Modify {
                    id: v.id.clone(),
                    key,
                    value,
                }
            }
            48..=59 if !idle.is_empty() => {
                let n = self.rng.pick(&idle).clone();
                Call::Stage {
                    id: self.model.vols[&n].id.clone(),
                    staging: self.d.path(&format!("stage-{n}")),
                }
            }
            60..=69 if !staged.is_empty() => {
                let n = self.rng.pick(&staged).clone();
                let v = &self.model.vols[&n];
                let read_only = self.rng.chance(25);
                Call::Publish {
                    id: v.id.clone(),
                    staging: v.staged.clone().expect("staged"),
                    target: self.d.path(&format!("pod-{n}/mount")),
                    read_only,
                }
            }
            70..=75 if !published.is_empty() => {
                let v = &self.model.vols[self.rng.pick(&published)];
                Call::Unpublish {
                    id: v.id.clone(),
                    target: v.published.clone().expect("published"),
                }
            }
            76..=81 if !staged.is_empty() => {
                let v = &self.model.vols[self.rng.pick(&staged)];
                Call::Unstage {
                    id: v.id.clone(),
                    staging: v.staged.clone().expect("staged"),
                }
            }
            // Deleting a staged or published volume on purpose: it must be refused.
            82..=85 if !staged.is_empty() || !published.is_empty() => {
                let inuse: Vec<String> = staged.iter().chain(&published).cloned().collect();
                Call::DeleteVolume {
                    id: self.model.vols[self.rng.pick(&inuse)].id.clone(),
                }
            }
            86..=93 if !idle.is_empty() => Call::DeleteVolume {
                id: self.model.vols[self.rng.pick(&idle)].id.clone(),
            },
            94..=99 if !deletable.is_empty() => Call::DeleteSnapshot {
                id: self.model.snaps[self.rng.pick(&deletable)].id.clone(),
            },
            _ if !idle.is_empty() && full => Call::DeleteVolume {
                id: self.model.vols[self.rng.pick(&idle)].id.clone(),
            },
            _ => {
                let layout = *self.rng.pick(&LAYOUTS);
                if full {
                    // Everything is in use: free one instead.
                    if let Some(n) = published.first() {
                        let v = &self.model.vols[n];
                        Call::Unpublish {
                            id: v.id.clone(),
                            target: v.published.clone().expect("published"),
                        }
                    } else {
                        let v = &self.model.vols[&staged[0]];
                        Call::Unstage {
                            id: v.id.clone(),
                            staging: v.staged.clone().expect("staged"),
                        }
                    }
                } else {
                    self.create(layout, 32 * MIB, None)
                }
            }
        };
        self.run_step(call).await
    }

    /// Arms, runs, logs and applies one step's call.
    async fn run_step(&mut self, call: Call) -> Checked {
        let arm = if self.rng.chance(35) {
            let own = call.points();
            let all = self.all_points();
            let list: &[&'static str] = if !own.is_empty() && self.rng.chance(75) {
                own
            } else {
                &all
            };
            let point = *self.rng.pick(list);
            Some(Arm::Crash(point))
        } else if self.rng.chance(15) {
            let spec = *self.rng.pick(&FAILURES);
            // Only the provisioner and the snapshotter may stop retrying (their object was deleted);
            // kubelet and the resizer retry until the call succeeds.
            let may_give_up = matches!(call, Call::Create(_) | Call::Snapshot { .. } | Call::Group { .. });
            Some(Arm::Fail(spec, may_give_up && self.rng.chance(50)))
        } else {
            None
        };
        // After a crash a copy's name may come back for another source of the same layout, as a
        // deleted and re-created VolumeSnapshot or PVC would; a failed mount may be torn down.
        let retry = self.after_crash(&call);
        let desc = call.describe();
        let (crashed, sent, out) = self.run(call, arm, retry).await?;
        let code = out.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        self.log.push(format!(
            "{:>3}: {desc}{}{} -> {code:?}",
            self.step,
            match arm {
                Some(Arm::Crash(p)) => format!(" [armed {p}]"),
                Some(Arm::Fail(f, true)) => format!(" [failing {f}; caller gives up]"),
                Some(Arm::Fail(f, false)) => format!(" [failing {f}; retried]"),
                None => String::new(),
            },
            if crashed {
                format!(" [crashed; retried as {}]", sent.describe())
            } else {
                String::new()
            },
        ));
        if matches!(arm, Some(Arm::Fail(_, true))) && out.is_err() {
            return Ok(()); // nothing was made, as far as the caller knows: the checks say if anything was
        }
        self.apply(sent, out).await
    }

    /// What is sent after a crash instead of the same call, sometimes: a copy or snapshot of the same
    /// name from another volume of the layout (half of the time), or the teardown of a failed mount.
    fn after_crash(&mut self, call: &Call) -> Option<Call> {
        // kubelet gives up on a pod whose mount failed and tears it down instead.
        match call {
            Call::Stage { id, staging } if self.rng.chance(30) => {
                return Some(Call::Unstage {
                    id: id.clone(),
                    staging: staging.clone(),
                })
            }
            Call::Publish { id, target, .. } if self.rng.chance(30) => {
                return Some(Call::Unpublish {
                    id: id.clone(),
                    target: target.clone(),
                })
            }
            _ => {}
        }
        let (layout, src) = match call {
            Call::Create(NewVolume {
                layout,
                source: Some(volume_content_source::Type::Volume(s)),
                ..
            }) => (*layout, s.volume_id.clone()),
            Call::Snapshot { source, .. } => (
                self.model.vols.values().find(|v| &v.id == source)?.layout,
                source.clone(),
            ),
            _ => return None,
        };
        let others: Vec<Vol> = self
            .model
            .vols
            .values()
            .filter(|v| v.layout == layout && v.id != src)
            .cloned()
            .collect();
        if others.is_empty() || !self.rng.chance(50) {
            return None;
        }
        let o = self.rng.pick(&others).clone();
        Some(match call.clone() {
            Call::Create(v) => Call::Create(NewVolume {
                bytes: v.bytes.max(o.bytes),
                source: Some(from_volume(&o.id)),
                ..v
            }),
            Call::Snapshot { name, backup, .. } => Call::Snapshot {
                name,
                source: o.id,
                backup,
            },
            other => other,
        })
    }

    fn vol_by_id(&self, id: &str) -> Option<(String, Vol)> {
        self.model
            .vols
            .iter()
            .find(|(_, v)| v.id == id)
            .map(|(n, v)| (n.clone(), v.clone()))
    }

    /// The marker a new volume holds: its own, or its source's.
    fn expected_marker(&self, new: &NewVolume) -> Result<String, String> {
        match &new.source {
            None => Ok(format!("seed {} volume {}", self.seed, new.name)),
            Some(volume_content_source::Type::Volume(s)) => self
                .vol_by_id(&s.volume_id)
                .map(|(_, v)| v.marker)
                .ok_or_else(|| "clone of an unknown volume".to_string()),
            Some(volume_content_source::Type::Snapshot(s)) => self
                .model
                .snaps
                .values()
                .find(|x| x.id == s.snapshot_id)
                .map(|x| x.marker.clone())
                .ok_or_else(|| "restore of an unknown snapshot".to_string()),
        }
    }

    /// Checks the outcome against the model and updates the model.
    async fn apply(&mut self, call: Call, out: Result<String, tonic::Status>) -> Checked {
        let code = out.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        let unexpected = |s: &tonic::Status| format!("{call:?} answered {:?}: {}", s.code(), s.message());
        match &call {
            // A crash point comes before the record: the retry, even from another source, must make it.
            Call::Create(new) => {
                let marker = self.expected_marker(new)?;
                let id = out.map_err(|s| unexpected(&s))?;
                let vol = Vol {
                    id,
                    layout: new.layout,
                    bytes: new.bytes,
                    marker: marker.clone(),
                    staged: None,
                    published: None,
                    read_only: false,
                };
                self.model.vols.insert(new.name.clone(), vol);
                if new.source.is_none() {
                    self.write_marker(&new.name, &marker).await?;
                } else {
                    let got = self.read_marker(&new.name).await?;
                    if got != marker {
                        return Err(format!(
                            "{} was made from {:?} and holds '{got}', not '{marker}'",
                            new.name, new.source
                        ));
                    }
                }
            }
            Call::Snapshot { name, source, backup } => {
                let (_, v) = self.vol_by_id(source).ok_or("snapshot of an unknown volume")?;
                let id = out.map_err(|s| unexpected(&s))?;
                if backup.is_some() != id.starts_with(&format!("backup:{REPOSITORY}:")) {
                    return Err(format!("{call:?} answered the id {id}"));
                }
                self.model.snaps.insert(
                    name.clone(),
                    Snap {
                        id,
                        layout: v.layout,
                        bytes: v.bytes,
                        source: source.clone(),
                        marker: v.marker,
                        backup: backup.map(|keep_local| Backup {
                            keep_local,
                            ready: false,
                        }),
                        group: None,
                    },
                );
            }
            Call::Group { name, sources, .. } => {
                let out = out.map_err(|s| unexpected(&s))?;
                let mut lines = out.lines();
                let id = lines.next().unwrap_or_default().to_string();
                let mut members = Vec::new();
                for line in lines {
                    let (source, snapshot) = line.split_once('=').ok_or("a member without its source")?;
                    let (vname, v) = self.vol_by_id(source).ok_or("group member of an unknown volume")?;
                    // A member is named by the group and its volume's key (its name here).
                    let member = format!("{name}-{vname}");
                    members.push(member.clone());
                    self.model.snaps.insert(
                        member,
                        Snap {
                            id: snapshot.to_string(),
                            layout: v.layout,
                            bytes: v.bytes,
                            source: source.to_string(),
                            marker: v.marker,
                            backup: None,
                            group: Some(name.clone()),
                        },
                    );
                }
                if members.len() != sources.len() {
                    return Err(format!("{call:?} answered {} members", members.len()));
                }
                self.model.groups.insert(name.clone(), Group { id, members });
            }
            Call::DeleteGroup { id, .. } => {
                out.map_err(|s| unexpected(&s))?;
                let name = self
                    .model
                    .groups
                    .iter()
                    .find(|(_, g)| &g.id == id)
                    .map(|(n, _)| n.clone())
                    .ok_or("delete of an unknown group")?;
                let g = self.model.groups.remove(&name).expect("group");
                for m in g.members {
                    self.model.snaps.remove(&m);
                }
            }
            Call::Prune { .. } => {
                out.map_err(|s| unexpected(&s))?;
                self.pruned = true;
            }
            Call::Expand { id, bytes } => {
                out.map_err(|s| unexpected(&s))?;
                let (n, _) = self.vol_by_id(id).ok_or("unknown volume")?;
                self.model.vols.get_mut(&n).expect("volume").bytes = *bytes;
            }
            Call::Modify { .. } => {
                out.map_err(|s| unexpected(&s))?;
            }
            Call::Stage { id, staging } => {
                out.map_err(|s| unexpected(&s))?;
                let (n, _) = self.vol_by_id(id).ok_or("unknown volume")?;
                self.model.vols.get_mut(&n).expect("volume").staged = Some(staging.clone());
            }
            Call::Publish {
                id, target, read_only, ..
            } => {
                out.map_err(|s| unexpected(&s))?;
                let (n, _) = self.vol_by_id(id).ok_or("unknown volume")?;
                let v = self.model.vols.get_mut(&n).expect("volume");
                v.published = Some(target.clone());
                v.read_only = *read_only;
            }
            Call::Unpublish { id, target } => {
                out.map_err(|s| unexpected(&s))?;
                if target.exists() {
                    return Err(format!("unpublish left the target {target:?}"));
                }
                let (n, _) = self.vol_by_id(id).ok_or("unknown volume")?;
                let v = self.model.vols.get_mut(&n).expect("volume");
                v.published = None;
                v.read_only = false;
            }
            Call::Unstage { id, .. } => {
                out.map_err(|s| unexpected(&s))?;
                let (n, _) = self.vol_by_id(id).ok_or("unknown volume")?;
                self.model.vols.get_mut(&n).expect("volume").staged = None;
            }
            Call::DeleteVolume { id } => {
                let (n, v) = self.vol_by_id(id).ok_or("unknown volume")?;
                let in_use = v.staged.is_some() || v.published.is_some();
                match (in_use, code) {
                    (true, Code::FailedPrecondition) => {}
                    (false, Code::Ok) => {
                        self.model.vols.remove(&n);
                    }
                    _ => {
                        return Err(format!(
                            "DeleteVolume of {n} (staged {:?}, published {:?}) answered {code:?}: {:?}",
                            v.staged,
                            v.published,
                            out.err().map(|s| s.message().to_string())
                        ))
                    }
                }
            }
            Call::DeleteSnapshot { id } => {
                out.map_err(|s| unexpected(&s))?;
                self.model.snaps.retain(|_, s| &s.id != id);
            }
        }
        Ok(())
    }

    /// The invariants, on the converged state after a step.
    async fn check(&mut self) -> Checked {
        // 1. Published data is still there, read as the pod reads it.
        for (n, v) in &self.model.vols {
            if let Some(p) = &v.published {
                let got = std::fs::read_to_string(p.join(MARKER))
                    .map_err(|e| format!("published volume {n}: marker at {p:?} unreadable: {e}"))?;
                if got != v.marker {
                    return Err(format!("published volume {n} holds '{got}', not '{}'", v.marker));
                }
                // A read-only publish refuses the pod's writes.
                if v.read_only {
                    let probe = p.join("probe");
                    match std::fs::write(&probe, b"x") {
                        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
                        Ok(()) => {
                            let _ = std::fs::remove_file(&probe);
                            return Err(format!("the read-only publish of {n} at {p:?} is writable"));
                        }
                        Err(e) => return Err(format!("read-only publish of {n}: write answered {e}, not EROFS")),
                    }
                }
            }
        }
        // 2. Every record names its own data.
        for (n, v) in &self.model.vols {
            if v.layout.readable_in_pool() && v.published.is_none() {
                let p = self.pools[&v.layout].join("volumes").join(n).join(MARKER);
                let got = std::fs::read_to_string(&p).map_err(|e| format!("volume {n}: {p:?}: {e}"))?;
                if got != v.marker {
                    return Err(format!("volume {n} holds '{got}', not '{}'", v.marker));
                }
            }
        }
        for (n, s) in &self.model.snaps {
            // A backup's local copy goes once it is uploaded, unless it is kept.
            if s.layout.readable_in_pool() && s.kept_in_pool() {
                let p = self.pools[&s.layout].join("snapshots").join(n).join(MARKER);
                let got = std::fs::read_to_string(&p).map_err(|e| format!("snapshot {n}: {p:?}: {e}"))?;
                if got != s.marker {
                    return Err(format!("snapshot {n} holds '{got}', not '{}'", s.marker));
                }
            }
        }
        // Once the repository exists every ListSnapshots opens it (its key's scrypt costs about half
        // a second): then the listing is compared after snapshot calls and where the backups are
        // checked, not after every step (the pools' records are, above and below).
        if std::mem::take(&mut self.list_due) || !self.repo().join("config").exists() {
            self.check_listing().await?;
        }
        // 3. Nothing leaks: group records are the model's groups (in their first member's pool).
        let mut records: BTreeSet<String> = BTreeSet::new();
        for pool in self.pools.values() {
            records.extend(
                entries(&pool.join("groups"))
                    .into_iter()
                    .filter(|e| !e.starts_with('.')),
            );
        }
        let want: BTreeSet<String> = self.model.groups.keys().map(|n| format!("{n}.json")).collect();
        if records != want {
            return Err(format!("group records {records:?}, model groups {want:?}"));
        }
        let volumes = self
            .d
            .ctl
            .list_volumes(ListVolumesRequest::default())
            .await
            .map_err(|s| format!("ListVolumes: {s:?}"))?
            .into_inner();
        let listed: BTreeSet<String> = volumes
            .entries
            .into_iter()
            .filter_map(|e| e.volume)
            .map(|v| v.volume_id)
            .collect();
        let want: BTreeSet<String> = self.model.vols.values().map(|v| v.id.clone()).collect();
        if listed != want {
            return Err(format!("ListVolumes {listed:?}, model {want:?}"));
        }
        let mounts: BTreeSet<PathBuf> = mounts_under(self.d.dir.path()).into_iter().collect();
        let want: BTreeSet<PathBuf> = self
            .model
            .vols
            .values()
            .flat_map(|v| v.staged.iter().chain(&v.published).cloned())
            .collect();
        if mounts != want {
            return Err(format!("mounts {mounts:?}, model {want:?}"));
        }
        let loops = loops_under(&self.pools[&Layout::Image]);
        let staged_images = self
            .model
            .vols
            .values()
            .filter(|v| v.layout == Layout::Image && v.staged.is_some())
            .count();
        if loops.len() != staged_images {
            return Err(format!("loop devices {loops:?}, {staged_images} image volumes staged"));
        }
        for layout in LAYOUTS {
            let pool = &self.pools[&layout];
            for scratch in [".work", ".trash"] {
                // An upload thread removing a backup's local copy moves it through the trash
                // (`snapshots-<name>-<uuid>`) while this runs; once settled, nothing may be there.
                let left: Vec<String> = entries(&pool.join(scratch))
                    .into_iter()
                    .filter(|e| {
                        self.settled
                            || scratch != ".trash"
                            || !self.model.snaps.iter().any(|(n, s)| {
                                s.layout == layout && s.backup.is_some() && e.starts_with(&format!("snapshots-{n}-"))
                            })
                    })
                    .collect();
                if !left.is_empty() {
                    return Err(format!("{} left in {scratch}: {left:?}", layout.pool()));
                }
            }
            let vols = self
                .model
                .vols
                .iter()
                .filter(|(_, v)| v.layout == layout)
                .map(|(n, _)| n);
            let snaps = self
                .model
                .snaps
                .iter()
                .filter(|(_, s)| s.layout == layout && s.kept_in_pool())
                .map(|(n, _)| n);
            // While uploads run (not after `settle`), a backup whose local copy goes may still have it
            // (or part of it), and any backup's record may be being rewritten (its temporary file):
            // `check_backups` checks the local copy is gone, and this check, after `settle`, that
            // no temporary file is left.
            let going: BTreeSet<String> = self
                .model
                .snaps
                .iter()
                .filter(|(_, s)| (!self.settled || s.may_stay_as_base()) && s.layout == layout && s.backup.is_some())
                .flat_map(|(n, s)| {
                    let mut names = if self.settled {
                        vec![]
                    } else {
                        vec![format!(".{n}.json.tmp")]
                    };
                    if !s.kept_in_pool() {
                        names.extend([n.clone(), format!("{n}.json")]);
                    }
                    names
                })
                .collect();
            if self.settled {
                // Bases: at most one per volume, none for a deleted volume, each a whole pair.
                let present = entries(&pool.join("snapshots"));
                let mut per_volume: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
                for (n, s) in self
                    .model
                    .snaps
                    .iter()
                    .filter(|(_, s)| s.layout == layout && s.may_stay_as_base())
                {
                    let (data, record) = (present.contains(n), present.contains(&format!("{n}.json")));
                    if data != record {
                        return Err(format!("base {n}: data {data}, record {record}"));
                    }
                    if data {
                        per_volume.entry(s.source.as_str()).or_default().push(n);
                    }
                }
                for (volume, bases) in per_volume {
                    let alive = self.model.vols.values().any(|v| v.id == volume);
                    if bases.len() > 1 || !alive {
                        return Err(format!(
                            "volume {volume} ({}) keeps the local copies {bases:?} of uploaded backups; at most its newest may stay while it exists",
                            if alive { "alive" } else { "deleted" }
                        ));
                    }
                }
            }
            for (kind, names) in [
                ("volumes", vols.cloned().collect::<Vec<_>>()),
                ("snapshots", snaps.cloned().collect()),
            ] {
                let want: Vec<String> = names
                    .iter()
                    .flat_map(|n| [n.clone(), format!("{n}.json")])
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let got: Vec<String> = entries(&pool.join(kind))
                    .into_iter()
                    .filter(|e| kind != "snapshots" || !going.contains(e))
                    .collect();
                if got != want {
                    return Err(format!(
                        "{}/{kind} holds {got:?}, records and data of the model are {want:?}",
                        layout.pool()
                    ));
                }
            }
        }
        Ok(())
    }

    /// ListSnapshots names the model's snapshots and sources; a backup, once listed ready to use,
    /// stays so (the model notes which are).
    async fn check_listing(&mut self) -> Checked {
        let listed = self
            .d
            .ctl
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .map_err(|s| format!("ListSnapshots: {s:?}"))?
            .into_inner();
        let listed: Vec<Snapshot> = listed.entries.into_iter().filter_map(|e| e.snapshot).collect();
        for s in &listed {
            if let Some((n, snap)) = self.model.snaps.iter_mut().find(|(_, x)| x.id == s.snapshot_id) {
                if let Some(b) = &mut snap.backup {
                    if b.ready && !s.ready_to_use {
                        return Err(format!("backup {n} was ready to use and is listed not ready now"));
                    }
                    b.ready |= s.ready_to_use;
                }
            }
        }
        let listed: BTreeMap<String, String> = listed
            .into_iter()
            .map(|s| (s.snapshot_id, s.source_volume_id))
            .collect();
        let want: BTreeMap<String, String> = self
            .model
            .snaps
            .values()
            .map(|s| (s.id.clone(), s.source.clone()))
            .collect();
        if listed != want {
            return Err(format!("ListSnapshots (id -> source) {listed:?}, model {want:?}"));
        }
        Ok(())
    }

    /// The local snapshots whose backup is still to upload, or whose local copy is still to go:
    /// read from their records in the pools.
    /// An uploaded image backup's copy may stay as its volume's base: pending only while its
    /// volume has another such copy, or no longer exists.
    fn pending_uploads(&self) -> Vec<String> {
        let mut pending = Vec::new();
        for pool in self.pools.values() {
            let mut bases: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for e in entries(&pool.join("snapshots")) {
                let Some(name) = e.strip_suffix(".json") else { continue };
                let Ok(text) = std::fs::read_to_string(pool.join("snapshots").join(&e)) else {
                    continue; // removed meanwhile
                };
                let rec: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let mark = &rec["backup"];
                if !mark.is_object() || (mark["uploaded"] == true && mark["keep_local"] == true) {
                    continue;
                }
                let source = rec["source_volume_id"].as_str().unwrap_or_default();
                if mark["uploaded"] == true && rec["layout"] == "image" && !source.is_empty() {
                    bases.entry(source.to_string()).or_default().push(name.to_string());
                } else {
                    pending.push(name.to_string());
                }
            }
            for (source, names) in bases {
                let key = source.rsplit(':').next().unwrap_or_default();
                if names.len() > 1 || !pool.join("volumes").join(format!("{key}.json")).exists() {
                    pending.extend(names);
                }
            }
        }
        pending
    }

    /// Waits until every upload has finished (and every local copy that goes is gone).
    async fn settle(&mut self) -> Checked {
        let started = Instant::now();
        loop {
            let pending = self.pending_uploads();
            if pending.is_empty() {
                return Ok(());
            }
            if started.elapsed() > UPLOAD_WAIT {
                return Err(format!("uploads not finished after {UPLOAD_WAIT:?}: {pending:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn repo(&self) -> PathBuf {
        self.cfg.path().join("repo")
    }

    /// `restic` on the repository; a missing restic fails the test.
    fn restic(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new("restic")
            .arg("-r")
            .arg(self.repo())
            .arg("--password-file")
            .arg(self.cfg.path().join("key"))
            .arg("--no-cache")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("the crash tester checks backups with restic, which could not run: {e}"));
        if !out.status.success() {
            return Err(format!(
                "restic {args:?}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Invariant 7, once every upload has finished (and just after `check` compared ListSnapshots,
    /// which notes the backups listed ready): every backup of the model is listed ready and its
    /// local copy is kept only with keepLocal; then, as far as `restic` says (each call costs a
    /// second or more), the repository holds exactly one restic snapshot per live backup and none
    /// for deleted ones, and `restic check` finds it clean.
    async fn check_backups(&mut self, restic: Restic) -> Checked {
        for (n, s) in &self.model.snaps {
            if let Some(b) = &s.backup {
                if !b.ready {
                    return Err(format!(
                        "backup {n} ({}) is not listed ready to use once its upload is done",
                        s.id
                    ));
                }
                if !b.keep_local && !s.may_stay_as_base() {
                    let dir = self.pools[&s.layout].join("snapshots");
                    let left: Vec<String> = entries(&dir)
                        .into_iter()
                        .filter(|e| *e == *n || *e == format!("{n}.json"))
                        .collect();
                    if !left.is_empty() {
                        return Err(format!("backup {n} is uploaded but its local copy is left: {left:?}"));
                    }
                }
            }
        }
        if restic == Restic::No {
            return Ok(());
        }
        let claim = self.cfg.path().join(".repo.cellar-init");
        if claim.exists() {
            return Err(format!("the repository's initialisation claim {claim:?} is left"));
        }
        let want: BTreeMap<String, usize> = self
            .model
            .snaps
            .values()
            .filter(|s| s.backup.is_some())
            .map(|s| (s.id.rsplit(':').next().expect("key").to_string(), 1))
            .collect();
        if !self.repo().join("config").exists() {
            // No backup was asked for yet in this seed.
            return match want.is_empty() {
                true => Ok(()),
                false => Err(format!("backups {want:?} but no repository at {:?}", self.repo())),
            };
        }
        let out = self.restic(&["snapshots", "--json", "--no-lock"])?;
        let snaps: Vec<serde_json::Value> =
            serde_json::from_str(&out).map_err(|e| format!("restic snapshots --json: {e}: {out}"))?;
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for s in &snaps {
            let tags: Vec<String> = serde_json::from_value(s["tags"].clone()).unwrap_or_default();
            let keys: Vec<&str> = tags.iter().filter_map(|t| t.strip_prefix("cellar-backup=")).collect();
            if keys.len() != 1 {
                return Err(format!("restic snapshot {} has the tags {tags:?}", s["id"]));
            }
            *got.entry(keys[0].to_string()).or_default() += 1;
        }
        if got != want {
            return Err(format!(
                "the repository holds restic snapshots per backup key {got:?}; the model's live backups are {want:?}"
            ));
        }
        match restic {
            Restic::Check => drop(self.restic(&["check"])?),
            Restic::ReadData => drop(self.restic(&["check", "--read-data"])?),
            Restic::No => {}
        }
        Ok(())
    }

    /// Unpublishes, unstages and deletes everything, then checks that nothing is left.
    async fn teardown(&mut self) -> Checked {
        let vols: Vec<(String, Vol)> = self.model.vols.clone().into_iter().collect();
        for (_, v) in &vols {
            if let Some(t) = &v.published {
                self.apply_clean(Call::Unpublish {
                    id: v.id.clone(),
                    target: t.clone(),
                })
                .await?;
            }
            if let Some(s) = &v.staged {
                self.apply_clean(Call::Unstage {
                    id: v.id.clone(),
                    staging: s.clone(),
                })
                .await?;
            }
        }
        for g in self.model.groups.clone().into_values() {
            let snapshots = g.members.iter().map(|m| self.model.snaps[m].id.clone()).collect();
            self.apply_clean(Call::DeleteGroup { id: g.id, snapshots }).await?;
        }
        for s in self.model.snaps.clone().into_values() {
            self.apply_clean(Call::DeleteSnapshot { id: s.id }).await?;
        }
        for (_, v) in vols {
            self.apply_clean(Call::DeleteVolume { id: v.id }).await?;
        }
        self.check().await?;
        // The repository has forgotten every backup: two prunes (the first marks what is unused,
        // the second removes it) remove every pack, also those that killed uploads left (a restic
        // snapshot left over would keep its tree's pack).
        self.settle().await?;
        self.check_backups(Restic::No).await?;
        if self.repo().join("config").exists() {
            for _ in 0..2 {
                self.apply_clean(Call::Prune {
                    config: self.cfg.path().join("config.yaml"),
                    keep_delete_secs: 0,
                })
                .await?;
            }
            self.restic(&["check"])?;
            let packs: Vec<String> = entries(&self.repo().join("data"))
                .iter()
                .flat_map(|d| entries(&self.repo().join("data").join(d)))
                .collect();
            if !packs.is_empty() {
                return Err(format!(
                    "every backup is forgotten and pruned, but the repository keeps the packs {packs:?}"
                ));
            }
        }
        Ok(())
    }

    async fn settle_and_check(&mut self, restic: Restic) -> Checked {
        self.settle().await?;
        self.list_due = true;
        self.settled = true;
        let checked = self.check().await;
        self.settled = false;
        checked?;
        self.check_backups(restic).await
    }

    async fn apply_clean(&mut self, call: Call) -> Checked {
        self.list_due = true;
        self.log.push(format!("end: {}", call.describe()));
        let out = self.converge(&call).await?;
        self.apply(call, out).await
    }
}

/// `cellar backup prune` on the tester's configuration, maybe armed with a crash point.
async fn prune(config: &Path, keep_delete_secs: u64, crash_at: Option<&str>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args(["backup", "prune", "--repository", REPOSITORY, "--keep-delete-secs"])
        .arg(keep_delete_secs.to_string())
        .arg("--config")
        .arg(config)
        .env("CELLAR_LOG", "info");
    if let Some(p) = crash_at {
        cmd.env("CELLAR_CRASH_AT", p);
    }
    cmd.output().await.expect("cellar backup prune")
}

/// `CELLAR_CRASH_SEEDS`: a comma-separated list of seeds or ranges (one seed reruns as it
/// failed), or `count:N` for the seeds 1 to N.
fn seeds() -> Vec<u64> {
    seeds_from_env("CELLAR_CRASH_SEEDS", &SEEDS)
}

/// Runs one seed; a violation panics with the report while the driver and filesystems still exist,
/// so that their clean-up on drop does not hide it.
async fn run_seed(seed: u64, steps: usize) {
    let mut r = Run::new(seed).await;
    while r.step < steps {
        if let Err(e) = r.step().await {
            panic!("{}", r.fail(e));
        }
        if let Err(e) = r.check().await {
            panic!("{}", r.fail(e));
        }
        // Now and then, and after every prune: wait for the uploads and check the backups
        // strictly; `restic check` after a prune (the only step that removes repository data).
        let pruned = std::mem::take(&mut r.pruned);
        if pruned || (r.backups && r.rng.chance(SETTLE_PERCENT)) {
            let restic = if pruned { Restic::Check } else { Restic::No };
            if let Err(e) = r.settle_and_check(restic).await {
                panic!("{}", r.fail(e));
            }
        }
        r.step += 1;
    }
    if let Err(e) = r.settle_and_check(Restic::ReadData).await {
        panic!("{}", r.fail(format!("at the end: {e}")));
    }
    if let Err(e) = r.teardown().await {
        panic!("{}", r.fail(format!("at teardown: {e}")));
    }
    if std::env::var("CELLAR_CRASH_LOG").is_ok() {
        eprintln!("seed {seed} step log:\n{}", r.log.join("\n"));
    }
}

#[tokio::test]
async fn random_calls_with_crashes_keep_every_invariant() {
    if !cfg!(feature = "crash-points") {
        panic!("the crash tester needs the crash points: `cargo test --features crash-points --test random_crash`");
    }
    // The backups are checked with restic itself: without it the test fails, it never skips.
    match std::process::Command::new("restic").arg("version").output() {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "the crash tester checks backups with restic (Debian: apt-get install restic); `restic version`: {other:?}"
        ),
    }
    let steps = std::env::var("CELLAR_CRASH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEPS);
    for seed in seeds() {
        let started = std::time::Instant::now();
        run_seed(seed, steps).await;
        eprintln!("seed {seed}: {steps} steps in {:?}", started.elapsed());
    }
}
