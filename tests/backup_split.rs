//! Backups in split mode, the whole story of the issue's "done when": a PostgreSQL volume on
//! node-1 backed up while pgbench runs, node-1 stopped and its data dir and pool wiped, the volume
//! restored on node-2 from the backup, PostgreSQL recovering there with every committed row.
//!
//! A real `cellar controller` and two `cellar node` processes on loopback with TLS
//! (`common::cluster`); each node's pool is on its own loop-mounted XFS; the repository is a
//! directory every process is configured with (the shared mount of a real cluster). The
//! controller only initialises the repository and reads its snapshot list: node-1 uploads, node-2
//! reads the repository itself. restic, without cellar, checks the repository at the end.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cellar::csi::v1::*;
use common::cluster::{node_topology, Cluster, Spec};
use common::fs::{loops_under, TestFs};
use common::postgres::{pg, postgres_dir, start_pgbench, Postgres, PG_BIN};
use common::{from_snapshot, mounts_under, rwo, stage_rwo, unstage_from, MIB};

const PASSWORD: &str = "correct horse battery staple";
const BYTES: i64 = 256 * MIB;
/// Rows committed before pgbench starts: all of them must come back.
const KNOWN_ROWS: u64 = 10_000;
/// Keeps the WAL well inside the volume while pgbench runs.
const PG_SETTINGS: &[&str] = &["max_wal_size=32MB", "min_wal_size=8MB"];

/// The shared mount: the repository `offsite` and its key, at the same path for every process.
struct Shared {
    dir: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("key"), format!("{PASSWORD}\n")).expect("key");
        Shared { dir }
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key")
    }

    /// The `repositories:` section of every process's configuration.
    fn repositories(&self) -> String {
        format!(
            "repositories:\n  - name: offsite\n    path: {}\n    passwordFile: {}\n",
            self.repo().display(),
            self.key().display()
        )
    }
}

fn backup_req(name: &str, source: &str, freeze: bool) -> CreateSnapshotRequest {
    let mut parameters = HashMap::from([("backupRepository".to_string(), "offsite".to_string())]);
    if freeze {
        parameters.insert("freeze".into(), "true".into());
    }
    CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        parameters,
        ..Default::default()
    }
}

/// Polls GetSnapshot until the backup is uploaded and checked (two minutes at most).
async fn until_ready(c: &Cluster, id: &str, mut still: impl FnMut()) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = get_snapshot(c, id).await;
        if s.ready_to_use {
            return s;
        }
        still();
        assert!(
            Instant::now() < deadline,
            "the backup was not ready after 2 minutes\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fails at once, naming the package, when a tool the story needs is missing.
fn require_tools() {
    for tool in ["initdb", "postgres", "pg_ctl", "psql", "pgbench", "pg_isready"] {
        assert!(
            Path::new(PG_BIN).join(tool).exists(),
            "{PG_BIN}/{tool} is needed by this test; CI installs postgresql-15 in .ci/run"
        );
    }
    let restic = Command::new("restic").arg("version").output();
    assert!(
        restic.as_ref().is_ok_and(|o| o.status.success()),
        "restic is needed by this test ({restic:?}); CI installs it in .ci/run"
    );
}

/// A volume request for the image layout, placed as WaitForFirstConsumer places it: both nodes
/// allowed, the scheduler's node preferred.
fn image_req(name: &str, on: &str, source: Option<&str>) -> CreateVolumeRequest {
    let mut r = common::create_req(name, BYTES);
    r.parameters.insert("layout".into(), "image".into());
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("node-1"), node_topology("node-2")],
        preferred: vec![node_topology(on)],
    });
    r.volume_content_source = source.map(|s| VolumeContentSource {
        r#type: Some(from_snapshot(s)),
    });
    r
}

async fn publish(c: &Cluster, i: usize, id: &str, staging: &Path, target: &Path) {
    stage_rwo(&mut c.node(i).await, id, staging)
        .await
        .unwrap_or_else(|e| panic!("stage on node-{}: {e}\n{}", i + 1, c.logs()));
    c.node(i)
        .await
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(rwo()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("publish on node-{}: {e}\n{}", i + 1, c.logs()));
}

async fn unpublish(c: &Cluster, i: usize, id: &str, staging: &Path, target: &Path) {
    c.node(i)
        .await
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("unpublish");
    unstage_from(&mut c.node(i).await, id, staging).await.expect("unstage");
}

async fn get_snapshot(c: &Cluster, id: &str) -> Snapshot {
    c.ctl()
        .await
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("GetSnapshot {id}: {e}\n{}", c.logs()))
        .into_inner()
        .snapshot
        .expect("snapshot")
}

fn count(server: &Postgres, table: &str) -> u64 {
    server
        .sql(&format!("select count(*) from {table}"))
        .parse()
        .expect("a count")
}

/// What the known table holds: its row count and a digest of every row, in order.
fn known_digest(server: &Postgres) -> String {
    server.sql("select count(*) || ' ' || md5(string_agg(i || ':' || v, ',' order by i)) from known")
}

/// `restic` on the repository, which must succeed; returns its standard output.
fn restic(repo: &Path, key: &Path, args: &[&str]) -> String {
    let out = Command::new("restic")
        .arg("-r")
        .arg(repo)
        .arg("--password-file")
        .arg(key)
        .arg("--no-cache")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("restic is needed by this test and could not run ({e}); CI installs it"));
    assert!(
        out.status.success(),
        "restic {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn postgresql_backed_up_on_node_1_under_pgbench_recovers_on_node_2_after_node_1_is_wiped() {
    use std::os::unix::fs::PermissionsExt;
    let started = Instant::now();
    require_tools();
    let shared = Shared::new();
    let (repo, key) = (shared.repo(), shared.key());
    // Each node's own disk; declared before the cluster, so dropped after it.
    let disk2 = TestFs::new("xfs", 1024);
    let mut disk1 = Some(TestFs::new("xfs", 1024));
    let pool1 = disk1.as_ref().expect("disk").path("pool");
    let mut c = Cluster::start(Spec {
        layouts: Some("dir, image"),
        // node-1 counts as down 1.5 s after it dies, not 30 s.
        controller_args: vec!["--heartbeat-interval".into(), "500ms".into()],
        repositories: Some(shared.repositories()),
        ..Spec::nodes(vec![Some(pool1.clone()), Some(disk2.path("pool"))])
    })
    .await;
    // The postgres user walks down to the mounts and its socket.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sockets = c.dir.path().join("pg-socket");
    postgres_dir(&sockets);
    let socket = sockets.display().to_string();

    // ---- node-1: PostgreSQL on an image volume, pgbench writing.
    let v = c
        .ctl()
        .await
        .create_volume(image_req("pvc-pg", "node-1", None))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume: {e}\n{}", c.logs()))
        .into_inner()
        .volume
        .expect("volume");
    assert!(v.volume_id.starts_with("local:node-1:"), "{}", v.volume_id);
    let (st1, tg1) = (c.dir.path().join("stage-1"), c.dir.path().join("target-1"));
    publish(&c, 0, &v.volume_id, &st1, &tg1).await;
    let pgdata = tg1.join("pg");
    postgres_dir(&pgdata);
    pg(
        "initdb",
        &[
            "-D",
            &pgdata.display().to_string(),
            "--wal-segsize=1",
            "-A",
            "trust",
            "-U",
            "postgres",
        ],
    );
    let server = Postgres::start_with(&pgdata, &sockets, &sockets.join("pg-node-1.log"), PG_SETTINGS).await;
    server.sql(&format!(
        "create table known (i int primary key, v text not null); \
         insert into known select g, md5(g::text) from generate_series(1, {KNOWN_ROWS}) g"
    ));
    let known = known_digest(&server);
    assert!(known.starts_with(&format!("{KNOWN_ROWS} ")), "{known}");
    pg(
        "pgbench",
        &["-h", &socket, "-p", "5432", "-U", "postgres", "-i", "-q", "postgres"],
    );
    let mut bench = start_pgbench(&socket, 2);
    while count(&server, "pgbench_history") < 200 {
        assert!(bench.try_wait().expect("wait").is_none(), "pgbench stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // ---- the backup, cut frozen while pgbench runs. Every transaction committed before the call
    // is in it; none committed after it returned can be.
    let committed_before = count(&server, "pgbench_history");
    let snap = c
        .ctl()
        .await
        .create_snapshot(backup_req("snap-pg", &v.volume_id, true))
        .await
        .unwrap_or_else(|e| panic!("CreateSnapshot: {e}\n{}", c.logs()))
        .into_inner()
        .snapshot
        .expect("snapshot");
    let committed_after = count(&server, "pgbench_history");
    assert!(snap.snapshot_id.starts_with("backup:offsite:"), "{}", snap.snapshot_id);
    // Thawed: pgbench goes on committing while node-1 uploads.
    while count(&server, "pgbench_history") < committed_after + 50 {
        assert!(bench.try_wait().expect("wait").is_none(), "pgbench stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = until_ready(&c, &snap.snapshot_id, || {
        assert!(bench.try_wait().expect("wait").is_none(), "pgbench stopped")
    })
    .await;
    assert_eq!(ready.source_volume_id, v.volume_id);
    let uploaded_at = started.elapsed();
    bench.kill().expect("stop pgbench");
    bench.wait().expect("reap pgbench");
    server.stop();
    unpublish(&c, 0, &v.volume_id, &st1, &tg1).await;

    // ---- node-1 is lost: its process killed, its data dir and its pool's disk wiped.
    c.kill_node(0);
    let disk = disk1.take().expect("disk");
    assert!(
        loops_under(&disk.mnt).is_empty() && mounts_under(&disk.mnt) == vec![disk.mnt.clone()],
        "node-1 left its volume attached: {:?} {:?}",
        loops_under(&disk.mnt),
        mounts_under(&disk.mnt)
    );
    drop(disk);
    assert!(!pool1.exists(), "node-1's pool is gone with its disk");
    std::fs::remove_dir_all(c.dir.path().join("node-1")).expect("wipe node-1's data dir");

    // The repository answers for the backup without node-1 (once the controller counts node-1 as
    // down: until then GetSnapshot and ListSnapshots ask it too and answer UNAVAILABLE, see
    // an_uploaded_backup_answers_get_snapshot_while_its_node_is_unreachable).
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        let r = c
            .ctl()
            .await
            .list_snapshots(ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("ListSnapshots without node-1: {e}\n{}", c.logs()),
        }
    };
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.snapshot.as_ref().is_some_and(|s| s.ready_to_use)),
        "{listed:?}"
    );
    assert!(get_snapshot(&c, &snap.snapshot_id).await.ready_to_use);

    // ---- node-2: the volume restored from the backup, PostgreSQL recovering on it.
    let r = c
        .ctl()
        .await
        .create_volume(image_req("pvc-pg-restored", "node-2", Some(&snap.snapshot_id)))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume from the backup: {e}\n{}", c.logs()))
        .into_inner()
        .volume
        .expect("volume");
    assert!(r.volume_id.starts_with("local:node-2:"), "{}", r.volume_id);
    let (st2, tg2) = (c.dir.path().join("stage-2"), c.dir.path().join("target-2"));
    publish(&c, 1, &r.volume_id, &st2, &tg2).await;
    let log2 = sockets.join("pg-node-2.log");
    let server = Postgres::start_with(&tg2.join("pg"), &sockets, &log2, PG_SETTINGS).await;
    let restored_known = known_digest(&server);
    let done = count(&server, "pgbench_history");
    // TPC-B keeps the balances of all accounts (and all tellers) summing to the history's deltas:
    // a torn image, or a transaction half replayed, breaks that (or the start).
    let accounts = server.sql("select sum(abalance) from pgbench_accounts");
    let tellers = server.sql("select sum(tbalance) from pgbench_tellers");
    let history = server.sql("select coalesce(sum(delta), 0) from pgbench_history");
    server.stop();
    let pg_log = std::fs::read_to_string(&log2).unwrap_or_default();
    unpublish(&c, 1, &r.volume_id, &st2, &tg2).await;
    c.ctl()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: r.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume of the restored volume");

    assert!(
        pg_log.contains("automatic recovery in progress"),
        "PostgreSQL on node-2 did not run crash recovery: the image was not cut from a running server?\n{pg_log}"
    );
    assert_eq!(restored_known, known, "every known row, unchanged");
    assert_eq!(accounts, history, "accounts against history");
    assert_eq!(tellers, history, "tellers against history");
    assert!(
        (committed_before..=committed_after).contains(&done),
        "the restored history holds {done} transactions: every one committed before the cut \
         ({committed_before}) and none committed after CreateSnapshot returned ({committed_after})"
    );

    // ---- restic, without cellar: the backup is there under its key, the repository checks.
    let restic_key = snap.snapshot_id.rsplit(':').next().expect("key");
    let snaps = restic(&repo, &key, &["snapshots", "--json"]);
    assert!(
        snaps.contains(&format!("cellar-backup={restic_key}")),
        "restic lists the backup: {snaps}"
    );
    restic(&repo, &key, &["check", "--read-data"]);
    eprintln!(
        "backup of {done} pgbench transactions (committed before the cut: {committed_before}, \
         when CreateSnapshot returned: {committed_after}) ready at {:.1?}; whole story {:.1?}",
        uploaded_at,
        started.elapsed()
    );
}

// ------------------------------------------------------------------ bugs found on the way

/// Split mode with TLS, as the story above runs it: the agents and the registry serve TLS. Since
/// the backups linked rustic_backend (opendal, reqwest), rustls is built with both its `ring` and
/// its `aws-lc-rs` provider, no provider is installed at start, and the first TLS server panics
/// choosing one ("Could not automatically determine the process-level CryptoProvider"): no node
/// registers.
#[tokio::test]
async fn split_mode_with_tls_starts_with_the_backup_dependencies_linked() {
    let c = Cluster::start(Spec::nodes(vec![None])).await;
    assert!(!c.logs().contains("CryptoProvider"), "{}", c.logs());
}

/// Two nodes (no TLS) configured with the repository, and a 16 MiB volume `pvc` on node-1.
async fn two_nodes_and_a_volume_on_node_1(pvc: &str, insecure: bool) -> (Shared, Cluster, Volume) {
    two_nodes_and_a_volume_on_node_1_with(pvc, insecure, vec![]).await
}

/// As [`two_nodes_and_a_volume_on_node_1`], the controller started with `controller_args`.
async fn two_nodes_and_a_volume_on_node_1_with(
    pvc: &str,
    insecure: bool,
    controller_args: Vec<String>,
) -> (Shared, Cluster, Volume) {
    let shared = Shared::new();
    let c = Cluster::start(Spec {
        insecure,
        repositories: Some(shared.repositories()),
        controller_args,
        ..Spec::nodes(vec![None, None])
    })
    .await;
    let mut r = common::create_req(pvc, 16 * MIB);
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("node-1")],
        preferred: vec![node_topology("node-1")],
    });
    let v = c
        .ctl()
        .await
        .create_volume(r)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    (shared, c, v)
}

/// Once uploaded, a backup is the repository's: GetSnapshot answers for it while the node that
/// cut it cannot be reached (src/controller/backup.rs: "whether or not the node that cut it
/// exists"), also before the controller counts that node as down (3 heartbeats, 30 s by default).
/// TLS plays no part here.
#[tokio::test]
async fn an_uploaded_backup_answers_get_snapshot_while_its_node_is_unreachable() {
    let (_shared, mut c, v) = two_nodes_and_a_volume_on_node_1("pvc-small", true).await;
    let snap = c
        .ctl()
        .await
        .create_snapshot(backup_req("snap-small", &v.volume_id, false))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    until_ready(&c, &snap.snapshot_id, || {}).await;
    c.kill_node(0);
    let got = c
        .ctl()
        .await
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    assert!(
        got.as_ref()
            .is_ok_and(|g| g.get_ref().snapshot.as_ref().is_some_and(|s| s.ready_to_use)),
        "GetSnapshot of an uploaded backup with its node unreachable: {got:?}"
    );
}

/// DeleteSnapshot of `id` through the controller, retried as the CO does while the controller
/// waits for its nodes to report after its start (two heartbeats; a minute at most).
async fn delete_snapshot(c: &Cluster, id: &str) -> Result<(), tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match delete_snapshot_once(c, id).await {
            Err(e) if e.message().contains("not every node has reported") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            done => return done,
        }
    }
}

/// DeleteSnapshot of `id` through the controller, asked once.
async fn delete_snapshot_once(c: &Cluster, id: &str) -> Result<(), tonic::Status> {
    c.ctl()
        .await
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// Asserts that ListSnapshots through the controller lists nothing.
async fn assert_nothing_listed(c: &Cluster) {
    let listed = c
        .ctl()
        .await
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner();
    assert!(listed.entries.is_empty(), "{:?}", listed.entries);
}

/// A `keepLocal` backup of `volume`, once uploaded.
async fn kept_backup(c: &Cluster, name: &str, volume: &str) -> Snapshot {
    let mut req = backup_req(name, volume, false);
    req.parameters.insert("keepLocal".into(), "true".into());
    let kept = c
        .ctl()
        .await
        .create_snapshot(req)
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    until_ready(c, &kept.snapshot_id, || {}).await;
    kept
}

/// Two nodes (no TLS), the controller heartbeating every `heartbeat`, and an uploaded
/// `keepLocal` backup `snap-<name>` of volume `pvc-<name>` on node-1.
async fn a_kept_backup_on_node_1(name: &str, heartbeat: &str) -> (Shared, Cluster, Snapshot) {
    let args = vec!["--heartbeat-interval".into(), heartbeat.into()];
    let (shared, c, v) = two_nodes_and_a_volume_on_node_1_with(&format!("pvc-{name}"), false, args).await;
    let kept = kept_backup(&c, &format!("snap-{name}"), &v.volume_id).await;
    (shared, c, kept)
}

/// The backups a restic listing of the repository holds as cellar backups, and cellar's
/// deletion marks.
fn backups_and_marks(shared: &Shared) -> (usize, usize) {
    let out = restic(&shared.repo(), &shared.key(), &["snapshots", "--json"]);
    let snaps: Vec<serde_json::Value> = serde_json::from_str(&out).expect("restic json");
    let tagged = |prefix: &str| {
        snaps
            .iter()
            .filter(|s| {
                s["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t.as_str().is_some_and(|t| t.starts_with(prefix))))
            })
            .count()
    };
    (tagged("cellar-backup="), tagged("cellar-deleted="))
}

/// What node `i`'s default pool holds in `snapshots/` (entries starting with '.' are work files).
fn local_snapshots(c: &Cluster, i: usize) -> Vec<String> {
    std::fs::read_dir(c.pool_dir(i).join("snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (two minutes at most) until node-1 holds no local snapshot and the repository no mark.
async fn until_dropped_with_marks(c: &Cluster, shared: &Shared) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !local_snapshots(c, 0).iter().all(|e| e.starts_with('.')) || backups_and_marks(shared).1 > 0 {
        assert!(
            Instant::now() < deadline,
            "node-1 kept {:?}, the repository holds {:?}\n{}",
            local_snapshots(c, 0),
            backups_and_marks(shared),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Over TLS, as the chart runs it: DeleteSnapshot of a backup node-1 still uploads (2 MiB at
/// 4 KiB/s: minutes) answers OK at once; node-1 calls the upload off and answers that it held the
/// backup, so the controller writes no deletion mark (one no node would ever consume), and
/// nothing of the backup is left on the node or in the repository.
#[tokio::test]
async fn a_delete_calls_off_a_nodes_upload_and_leaves_no_mark() {
    let shared = Shared::new();
    let c = Cluster::start(Spec {
        repositories: Some(shared.repositories()),
        node_args: vec!["--backup-bandwidth".into(), "4K".into()],
        ..Spec::nodes(vec![None])
    })
    .await;
    let v = c
        .ctl()
        .await
        .create_volume(common::create_req("pvc-slow", 16 * MIB))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let key = v.volume_id.rsplit(':').next().expect("key");
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(c.pool_dir(0).join("volumes").join(key).join("data"), data).expect("data");
    let snap = c
        .ctl()
        .await
        .create_snapshot(backup_req("snap-slow", &v.volume_id, false))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert!(!snap.ready_to_use, "the upload runs");
    delete_snapshot(&c, &snap.snapshot_id)
        .await
        .unwrap_or_else(|e| panic!("DeleteSnapshot while the backup uploads: {e:?}\n{}", c.logs()));
    assert!(
        local_snapshots(&c, 0).iter().all(|e| e.starts_with('.')),
        "node-1 keeps {:?}",
        local_snapshots(&c, 0)
    );
    assert_eq!(
        backups_and_marks(&shared),
        (0, 0),
        "no backup and no mark in the repository"
    );
}

/// A backup deleted while the node holding part of it is down: an upload the node had not
/// finished, and a copy it keeps locally. DeleteSnapshot answers OK (a backup outlives its
/// node), and when the node is back it drops both instead of uploading the first again, which
/// left a ready backup no VolumeSnapshot names and that nothing would ever delete. Over TLS, as
/// the chart runs it: the marks carry the controller's seal.
#[tokio::test]
async fn a_backup_deleted_while_its_node_is_down_is_not_uploaded_when_it_returns() {
    let (shared, mut c, v) = two_nodes_and_a_volume_on_node_1("pvc-away", false).await;
    let snapshot = |name: &str, keep: bool| {
        let mut req = backup_req(name, &v.volume_id, false);
        if keep {
            req.parameters.insert("keepLocal".into(), "true".into());
        }
        req
    };
    let kept = c
        .ctl()
        .await
        .create_snapshot(snapshot("snap-kept", true))
        .await
        .expect("CreateSnapshot kept")
        .into_inner()
        .snapshot
        .expect("snapshot");
    until_ready(&c, &kept.snapshot_id, || {}).await;
    // node-1 again, dying as its next upload has written its data and pending snapshot.
    c.kill_node(0);
    c.start_node_with(0, &[("CELLAR_CRASH_AT", "backup:after-upload")]);
    c.wait_registered().await;
    let cut = c
        .ctl()
        .await
        .create_snapshot(snapshot("snap-cut", false))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.log_of(0).contains("crash point backup:after-upload reached") {
        assert!(
            Instant::now() < deadline,
            "node-1 never reached its crash point\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.kill_node(0);
    assert!(
        local_snapshots(&c, 0).len() >= 2,
        "both local snapshots are on node-1: {:?}",
        local_snapshots(&c, 0)
    );
    for id in [&cut.snapshot_id, &kept.snapshot_id] {
        delete_snapshot(&c, id)
            .await
            .unwrap_or_else(|e| panic!("DeleteSnapshot {id} with its node down: {e:?}"));
    }
    assert_eq!(backups_and_marks(&shared), (0, 2), "forgotten, and a mark for each");
    // The marks (and the trees cellar wrote for them) are sound for restic.
    restic(&shared.repo(), &shared.key(), &["check", "--read-data"]);
    // node-1 back: it drops both and their marks, and uploads nothing.
    c.start_node(0);
    until_dropped_with_marks(&c, &shared).await;
    assert_eq!(
        backups_and_marks(&shared),
        (0, 0),
        "no backup uploaded again\n{}",
        c.logs()
    );
    assert_nothing_listed(&c).await;
}

/// A kept backup deleted once the controller counts its node as down: the controller no longer
/// asks that node at all (it asks only nodes that heartbeat), yet the node keeps a copy. The
/// repository names the node that cut the backup, so a deletion mark is written for it, and when
/// the node is back it drops its copy and the mark; without the mark the copy stayed on its disk
/// for good, a backup nobody lists or deletes.
#[tokio::test]
async fn a_kept_backup_deleted_after_its_node_counts_as_down_is_dropped_when_it_returns() {
    // node-1 counts as down 1.5 s after it dies, not 30 s.
    let (shared, mut c, kept) = a_kept_backup_on_node_1("gone", "500ms").await;
    c.kill_node(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c.logs().contains("node missed its heartbeats") {
        assert!(Instant::now() < deadline, "node-1 never counted as down\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    delete_snapshot(&c, &kept.snapshot_id)
        .await
        .unwrap_or_else(|e| panic!("DeleteSnapshot with its node down: {e:?}\n{}", c.logs()));
    assert_eq!(backups_and_marks(&shared), (0, 1), "forgotten, and a mark for node-1");
    c.start_node(0);
    until_dropped_with_marks(&c, &shared).await;
    assert_nothing_listed(&c).await;
}

/// Every node holds the repository's key, so any node can write a snapshot tagged as a deletion
/// mark; over TLS a node drops its part of a backup only for a mark the controller sealed. Here
/// the forger is restic itself: node-1, restarted (it looks at its kept copies then), keeps its
/// copy and the backup stays ready; the controller's own mark, written beside the forged one when
/// the backup is deleted with node-1 down, still has node-1 drop it when it is back.
#[tokio::test]
async fn a_deletion_mark_the_controller_did_not_seal_drops_nothing() {
    let (shared, mut c, v) = two_nodes_and_a_volume_on_node_1("pvc-forged", false).await;
    let kept = kept_backup(&c, "snap-forged", &v.volume_id).await;
    let key = kept.snapshot_id.rsplit(':').next().expect("key").to_string();
    let empty = tempfile::tempdir().expect("tempdir");
    restic(
        &shared.repo(),
        &shared.key(),
        &[
            "backup",
            "--tag",
            &format!("cellar-deleted={key}"),
            &empty.path().display().to_string(),
        ],
    );
    assert_eq!(backups_and_marks(&shared), (1, 1));
    let held = local_snapshots(&c, 0);
    assert!(held.iter().any(|e| !e.starts_with('.')), "the kept copy: {held:?}");

    c.kill_node(0);
    c.start_node(0);
    c.wait_registered().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.log_of(0).contains("not sealed by the controller") {
        assert!(
            Instant::now() < deadline,
            "node-1 never looked at the forged mark\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(local_snapshots(&c, 0), held, "the kept copy stays");
    assert_eq!(backups_and_marks(&shared), (1, 1), "the backup stays in the repository");
    assert!(get_snapshot(&c, &kept.snapshot_id).await.ready_to_use);

    c.kill_node(0);
    delete_snapshot(&c, &kept.snapshot_id)
        .await
        .expect("DeleteSnapshot with its node down");
    assert_eq!(
        backups_and_marks(&shared),
        (0, 2),
        "forgotten, and the controller's mark beside the forged one"
    );
    c.start_node(0);
    until_dropped_with_marks(&c, &shared).await;
}

/// Right after a controller start, a node that is up may not have called in yet. A delete of a
/// backup whose node has not reported answers UNAVAILABLE then rather than write a deletion mark
/// for it (a mark nobody clears when the node holds nothing, kept 90 days); the CO's retry, once
/// the node is back, asks it, and the node drops its kept copy with no mark at all.
#[tokio::test]
async fn a_delete_right_after_a_controller_start_waits_for_the_nodes_to_report() {
    // The controller settles for two heartbeats (20 s here) after it starts: room for the first
    // delete to arrive before, on a loaded machine too.
    let (shared, mut c, kept) = a_kept_backup_on_node_1("restart", "10s").await;
    c.kill_node(0);
    c.kill_controller();
    c.start_controller();
    let early = delete_snapshot_once(&c, &kept.snapshot_id).await;
    assert!(
        early.as_ref().is_err_and(|e| e.code() == tonic::Code::Unavailable && e.message().contains("not every node has reported")),
        "a delete before node-1 reported: {early:?}\n{}",
        c.logs()
    );
    assert_eq!(backups_and_marks(&shared), (1, 0), "the backup stays, and no mark");
    c.start_node(0);
    c.wait_registered().await;
    delete_snapshot_once(&c, &kept.snapshot_id)
        .await
        .unwrap_or_else(|e| panic!("DeleteSnapshot with node-1 back: {e:?}\n{}", c.logs()));
    assert_eq!(backups_and_marks(&shared), (0, 0), "forgotten, with no mark");
    assert!(
        local_snapshots(&c, 0).iter().all(|e| e.starts_with('.')),
        "node-1 keeps {:?}",
        local_snapshots(&c, 0)
    );
    assert_nothing_listed(&c).await;
}
