//! Backups that outlive their node (docs/backups.md), through a real all-in-one driver: snapshots
//! uploaded into a restic repository, checked with Debian's `restic` (it must list, check and
//! restore every backup without cellar), restored into new volumes, forgotten and pruned; and the
//! faults the issue names: a wrong key, an unreachable repository, a corrupted pack.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cellar::backup::{Backups, Location, RepositoryConfig, Throttle, S3};
use cellar::csi::v1::*;
use cellar::storage::id::PoolName;
use cellar::storage::StorageError;
use common::fs::TestFs;
use common::tree::{assert_is_the_built_tree, assert_same_tree, build_tree, finish, scan};
use common::{from_snapshot, Driver, MIB};

const PASSWORD: &str = "correct horse battery staple";

/// A repository directory and its key, beside a pool configuration naming them.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::Builder::new()
                .prefix("cellar-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn password_file(&self) -> PathBuf {
        let p = self.dir.path().join("key");
        if !p.exists() {
            std::fs::write(&p, format!("{PASSWORD}\n")).expect("key");
        }
        p
    }

    /// A configuration with `pools` (YAML list items) and the repository `offsite` at `repo`.
    fn config(&self, pools: &str, repo: &Path, password_file: &Path) -> PathBuf {
        let yaml = format!(
            "pools:\n{pools}repositories:\n  - name: offsite\n    path: {}\n    passwordFile: {}\n",
            repo.display(),
            password_file.display()
        );
        let p = self.dir.path().join(format!("config-{}.yaml", uuid::Uuid::new_v4()));
        std::fs::write(&p, yaml).expect("config");
        p
    }

    fn dir_pool(&self) -> String {
        format!(
            "  - name: default\n    path: {}\n    layout: dir\n",
            self.dir.path().join("pool").display()
        )
    }

    async fn driver(&self, pools: &str) -> Driver {
        let cfg = self.config(pools, &self.repo(), &self.password_file());
        Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await
    }

    /// `restic` on the repository; panics (naming .ci/run) when restic is missing.
    fn restic(&self, args: &[&str]) -> std::process::Output {
        Command::new("restic")
            .arg("-r")
            .arg(self.repo())
            .arg("--password-file")
            .arg(self.password_file())
            .arg("--no-cache")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("restic is needed by this test and could not run ({e}); CI installs it in .ci/run")
            })
    }

    fn restic_ok(&self, args: &[&str]) -> String {
        let out = self.restic(args);
        assert!(
            out.status.success(),
            "restic {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The restic snapshots' tag lists.
    fn restic_snapshots(&self) -> Vec<serde_json::Value> {
        let out = self.restic_ok(&["snapshots", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("restic snapshots --json")
    }
}

fn backup_params(keep_local: bool) -> HashMap<String, String> {
    let mut p = HashMap::from([("backupRepository".to_string(), "offsite".to_string())]);
    if keep_local {
        p.insert("keepLocal".into(), "true".into());
    }
    p
}

async fn backup(d: &mut Driver, name: &str, source: &str, keep_local: bool) -> Result<Snapshot, tonic::Status> {
    d.ctl
        .create_snapshot(CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            parameters: backup_params(keep_local),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot.expect("snapshot"))
}

/// Polls GetSnapshot until the backup is ready to use (uploaded and checked).
async fn until_ready(d: &mut Driver, id: &str) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = d
            .ctl
            .get_snapshot(GetSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("GetSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        if s.ready_to_use {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "backup {id} not ready after 5 minutes; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn restore(d: &mut Driver, name: &str, bytes: i64, snapshot: &str) -> Result<Volume, tonic::Status> {
    restore_into(d, name, bytes, None, snapshot).await
}

/// A restore into a named pool (the default pool with `None`).
async fn restore_into(
    d: &mut Driver,
    name: &str,
    bytes: i64,
    pool: Option<&str>,
    snapshot: &str,
) -> Result<Volume, tonic::Status> {
    let mut r = common::create_req(name, bytes);
    if let Some(p) = pool {
        r.parameters.insert("pool".into(), p.into());
    }
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_snapshot(snapshot)),
    });
    d.ctl
        .create_volume(r)
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

/// `cellar backup <args> --repository offsite --config <cfg>`.
fn cellar_backup(cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(common::bin())
        .arg("backup")
        .args(args)
        .args(["--repository", "offsite", "--config"])
        .arg(cfg)
        .envs(env.iter().copied())
        .output()
        .expect("cellar backup")
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("entry").path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test]
async fn a_tree_backup_is_restic_readable_restores_whole_elsewhere_and_is_forgotten() {
    let s = Setup::new();
    let mut d = s.driver(&s.dir_pool()).await;
    let v = d.create("pvc-src").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "src").await;
    build_tree(&tg);
    // Stat the source before anything reads it (reads move atimes); its contents after.
    let src_tree = scan(&tg);

    let snap = backup(&mut d, "snap-tree", &v.volume_id, false)
        .await
        .expect("CreateSnapshot");
    assert!(snap.snapshot_id.starts_with("backup:offsite:"), "{}", snap.snapshot_id);
    assert!(!snap.ready_to_use, "a backup is not ready until it is uploaded");
    let again = backup(&mut d, "snap-tree", &v.volume_id, false).await.expect("retry");
    assert_eq!(again.snapshot_id, snap.snapshot_id, "a retry answers the same backup");
    let ready = until_ready(&mut d, &snap.snapshot_id).await;
    assert_eq!(ready.source_volume_id, v.volume_id);
    let src = finish(&tg, src_tree);
    assert_is_the_built_tree(&src);

    // restic, without cellar: lists it, checks the repository, restores its files.
    let snaps = s.restic_snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let key = snap.snapshot_id.rsplit(':').next().expect("key");
    let tags: Vec<String> = serde_json::from_value(snaps[0]["tags"].clone()).expect("tags");
    assert!(tags.contains(&format!("cellar-backup={key}")), "{tags:?}");
    s.restic_ok(&["check", "--read-data"]);
    let out = s.dir.path().join("restic-out");
    let restic_id = snaps[0]["id"].as_str().expect("id").to_string();
    s.restic_ok(&[
        "restore",
        &restic_id,
        "--target",
        out.to_str().expect("utf-8"),
        "--include",
        "/volume/plain",
        "--include",
        "/volume/nested",
    ]);
    assert_eq!(std::fs::read(out.join("volume/plain")).expect("plain"), b"plain text\n");
    assert_eq!(
        std::fs::read(out.join("volume/nested/deeper/deepest/leaf")).expect("leaf"),
        b"leaf\n"
    );

    // The local copy goes once the backup is uploaded (keepLocal is false).
    let snapshots_dir = s.dir.path().join("pool/snapshots");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files_under(&snapshots_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "local snapshot left: {:?}",
            files_under(&snapshots_dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A restore reads the repository: every property of the tree comes back.
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let r = restore(&mut d, "pvc-restored", 64 * MIB, &snap.snapshot_id)
        .await
        .expect("restore from the backup");
    let rs = r.content_source.and_then(|c| c.r#type);
    assert_eq!(
        rs,
        Some(from_snapshot(&snap.snapshot_id)),
        "the volume names its backup"
    );
    let (st2, tg2) = d.mount_rw(&r.volume_id, "restored").await;
    assert_same_tree(&src, &common::tree::observe(&tg2));
    d.unmount_all(&r.volume_id, &st2, &tg2).await;

    // ListSnapshots shows it; DeleteSnapshot forgets it in the repository; a prune keeps the
    // repository clean for restic.
    let listed = listed_snapshots(&mut d).await;
    assert!(listed.entries.iter().any(|e| e
        .snapshot
        .as_ref()
        .is_some_and(|s| s.snapshot_id == snap.snapshot_id && s.ready_to_use)));
    // The CLI sees it too: list, show, and a verify that reads every pack.
    let cli_cfg = s.config(&s.dir_pool(), &s.repo(), &s.password_file());
    let list = cellar_backup(&cli_cfg, &["list", "--json"], &[]);
    assert_eq!(list.status.code(), Some(0));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).expect("list --json");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], snap.snapshot_id.as_str());
    assert_eq!(rows[0]["sourceVolumeId"], v.volume_id.as_str());
    let show = cellar_backup(&cli_cfg, &["show", &snap.snapshot_id], &[]);
    assert!(
        String::from_utf8_lossy(&show.stdout).contains(&v.volume_id),
        "show names the source"
    );
    let verify = cellar_backup(&cli_cfg, &["verify", "--read-data"], &[]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
    assert!(s.restic_snapshots().is_empty(), "the backup is forgotten");
    let cfg = s.config(&s.dir_pool(), &s.repo(), &s.password_file());
    let prune = |keep: &str| {
        let out = cellar_backup(&cfg, &["prune", "--keep-delete-secs", keep], &[]);
        assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
    };
    // What the background prune leaves (unused packs only marked) is clean for restic too.
    prune("82800");
    s.restic_ok(&["check"]);
    prune("0");
    prune("0");
    s.restic_ok(&["check"]);
    let packs = files_under(&s.repo().join("data"))
        .iter()
        .flat_map(|d| files_under(d))
        .count();
    assert_eq!(
        packs, 0,
        "a prune after the last backup is forgotten leaves no data packs"
    );
    d.delete(&r.volume_id).await.expect("delete");
    d.delete(&v.volume_id).await.expect("delete");
}

/// A driver whose pool `img` (image layout, ext4 inside) lies on a fresh xfs (reflink), and a
/// 64 MiB volume `name` in it.
async fn image_volume(s: &Setup, name: &str) -> (TestFs, Driver, Volume) {
    let fs = TestFs::new("xfs", 1024);
    let pool = format!(
        "  - name: img\n    path: {}\n    layout: image\n    fsType: ext4\n",
        fs.path("pool").display()
    );
    let mut d = s.driver(&pool).await;
    let v = d.create_in(name, "img").await;
    (fs, d, v)
}

#[tokio::test]
async fn an_image_backup_restores_the_same_bytes_with_restic_and_cellar() {
    let s = Setup::new();
    let (fs, mut d, v) = image_volume(&s, "pvc-img").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "img").await;
    std::fs::write(tg.join("f"), b"in the image").expect("write");
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let image_of = |volume_id: &str| {
        let key = volume_id.rsplit(':').next().expect("key").to_string();
        fs.path("pool").join("volumes").join(key)
    };
    let src_bytes = std::fs::read(image_of(&v.volume_id)).expect("source image");

    let snap = backup(&mut d, "snap-img", &v.volume_id, true)
        .await
        .expect("CreateSnapshot");
    until_ready(&mut d, &snap.snapshot_id).await;
    let out = s.dir.path().join("restic-out");
    let snaps = s.restic_snapshots();
    let restic_id = snaps[0]["id"].as_str().expect("id").to_string();
    s.restic_ok(&["check", "--read-data"]);
    s.restic_ok(&["restore", &restic_id, "--target", out.to_str().expect("utf-8")]);
    // The image keeps the snapshot's file name (its key), at the snapshot's root.
    assert!(
        std::fs::read(out.join("snap-img")).expect("restored image") == src_bytes,
        "restic restores the image's bytes"
    );

    // keepLocal: the local snapshot stays, and a restore on this node copies it.
    let back = restore_into(&mut d, "pvc-img-back", 64 * MIB, Some("img"), &snap.snapshot_id)
        .await
        .expect("restore");
    assert_eq!(
        std::fs::read(image_of(&back.volume_id)).expect("restored"),
        src_bytes,
        "the restored volume holds the snapshot's bytes"
    );
    assert!(d.log().contains("img"), "driver log present");
    d.delete(&back.volume_id).await.expect("delete");
    d.delete(&v.volume_id).await.expect("delete");
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
    assert!(s.restic_snapshots().is_empty());
}

#[tokio::test]
async fn a_wrong_key_is_failed_precondition_and_an_unreachable_repository_unavailable() {
    let s = Setup::new();
    // Initialise the repository with the right key through one backup.
    {
        let mut d = s.driver(&s.dir_pool()).await;
        let v = d.create("pvc-k").await;
        // An empty volume backs up and restores too (rustic saves no node for an empty tree).
        let snap = backup(&mut d, "snap-k", &v.volume_id, false).await.expect("backup");
        until_ready(&mut d, &snap.snapshot_id).await;
        let r = restore(&mut d, "pvc-k-back", 64 * MIB, &snap.snapshot_id)
            .await
            .expect("restore of an empty volume");
        let (st, tg) = d.mount_rw(&r.volume_id, "k-back").await;
        assert_eq!(
            std::fs::read_dir(&tg).expect("list").count(),
            0,
            "the restored volume is empty"
        );
        d.unmount_all(&r.volume_id, &st, &tg).await;
        d.stop();
    }
    let wrong = s.dir.path().join("wrong-key");
    std::fs::write(&wrong, "not the key\n").expect("key");
    let cfg = s.config(&s.dir_pool(), &s.repo(), &wrong);
    let mut d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    let v = d.create("pvc-k2").await;
    let e = backup(&mut d, "snap-wrong", &v.volume_id, false)
        .await
        .expect_err("wrong key");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("offsite"), "names the repository: {}", e.message());
    d.stop();

    let cfg = s.config(
        &s.dir_pool(),
        Path::new("/nonexistent-share/cellar-backups"),
        &s.password_file(),
    );
    let mut d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    let v = d.create("pvc-k3").await;
    let e = backup(&mut d, "snap-gone", &v.volume_id, false)
        .await
        .expect_err("unreachable");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
    let listed = d
        .ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots answers without the repository")
        .into_inner();
    assert!(
        !listed
            .entries
            .iter()
            .any(|e| e.snapshot.as_ref().is_some_and(|s| s.source_volume_id == v.volume_id)),
        "nothing was cut: {:?}",
        listed.entries
    );
}

#[tokio::test]
async fn a_corrupted_pack_is_data_loss_and_leaves_no_volume() {
    let s = Setup::new();
    let mut d = s.driver(&s.dir_pool()).await;
    let v = d.create("pvc-c").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "c").await;
    let data: Vec<u8> = (0..(3 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(tg.join("data"), &data).expect("write");
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let snap = backup(&mut d, "snap-c", &v.volume_id, false).await.expect("backup");
    until_ready(&mut d, &snap.snapshot_id).await;
    // Flip bytes in the middle of every data pack.
    let mut flipped = 0;
    for sub in files_under(&s.repo().join("data")) {
        for pack in files_under(&sub) {
            let mut b = std::fs::read(&pack).expect("pack");
            if b.len() < 1024 {
                continue;
            }
            let mid = b.len() / 3;
            for x in &mut b[mid..mid + 64] {
                *x ^= 0xa5;
            }
            std::fs::write(&pack, b).expect("corrupt");
            flipped += 1;
        }
    }
    assert!(flipped > 0, "no pack to corrupt");
    let cfg = s.config(&s.dir_pool(), &s.repo(), &s.password_file());
    let verify = cellar_backup(&cfg, &["verify", "--read-data"], &[]);
    assert_eq!(
        verify.status.code(),
        Some(2),
        "verify finds the corruption: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let e = restore(&mut d, "pvc-c-restored", 64 * MIB, &snap.snapshot_id)
        .await
        .expect_err("a corrupted pack");
    assert_eq!(e.code(), tonic::Code::DataLoss, "{}", e.message());
    let vols = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("ListVolumes")
        .into_inner();
    assert_eq!(vols.entries.len(), 1, "only the source volume is left");
    let work = s.dir.path().join("pool/.work");
    assert!(
        files_under(&work).is_empty(),
        "nothing left in .work: {:?}",
        files_under(&work)
    );
}

/// Writes `bytes` of varied data into a new file of a published volume.
fn fill(path: &Path, bytes: usize, seed: u32) {
    let data: Vec<u8> = (0..bytes as u32)
        .map(|i| ((i ^ seed).wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(path, data).expect("write");
}

#[tokio::test]
async fn a_backup_on_s3_is_restic_readable_and_restores() {
    let s3 = common::s3::S3Server::start();
    let s = Setup::new();
    let creds = s.dir.path().join("s3-credentials");
    s3.write_credentials(&creds);
    let yaml = format!(
        "pools:\n{}repositories:\n  - name: offsite\n    s3:\n      endpoint: {}\n      bucket: {}\n      region: {}\n      credentialsFile: {}\n      prefix: cluster-a\n    passwordFile: {}\n",
        s.dir_pool(),
        s3.endpoint(),
        s3.bucket(),
        s3.region(),
        creds.display(),
        s.password_file().display()
    );
    let cfg = s.dir.path().join("s3.yaml");
    std::fs::write(&cfg, yaml).expect("config");
    let mut d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    let v = d.create("pvc-s3").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "s3").await;
    fill(&tg.join("data"), 3 << 20, 7);
    std::fs::write(tg.join("note"), b"on s3").expect("write");
    let want = std::fs::read(tg.join("data")).expect("read");
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let snap = backup(&mut d, "snap-s3", &v.volume_id, false).await.expect("backup");
    until_ready(&mut d, &snap.snapshot_id).await;

    // restic reads the same bucket and prefix, with the same credentials file.
    let out = Command::new("restic")
        .arg("-r")
        .arg(format!("s3:{}/{}/cluster-a", s3.endpoint(), s3.bucket()))
        .arg("--password-file")
        .arg(s.password_file())
        .args(["--no-cache", "check", "--read-data"])
        .envs(common::s3::read_credentials(&creds))
        .output()
        .expect("restic is needed by this test; CI installs it in .ci/run");
    assert!(
        out.status.success(),
        "restic check on S3: {}{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s3.log()
    );

    let r = restore(&mut d, "pvc-s3-back", 64 * MIB, &snap.snapshot_id)
        .await
        .expect("restore");
    let (st2, tg2) = d.mount_rw(&r.volume_id, "s3-back").await;
    assert!(std::fs::read(tg2.join("data")).expect("data") == want, "restored bytes");
    assert_eq!(std::fs::read(tg2.join("note")).expect("note"), b"on s3");
    d.unmount_all(&r.volume_id, &st2, &tg2).await;
}

#[tokio::test]
async fn two_nodes_back_up_into_one_new_repository_at_once() {
    let s = Setup::new();
    let node = |n: &str| {
        format!(
            "  - name: default\n    path: {}\n    layout: dir\n",
            s.dir.path().join(format!("pool-{n}")).display()
        )
    };
    let (c1, c2) = (
        s.config(&node("a"), &s.repo(), &s.password_file()),
        s.config(&node("b"), &s.repo(), &s.password_file()),
    );
    let mut a = Driver::start_with(&["--config", c1.to_str().expect("utf-8"), "--node-id", "node-a"], &[]).await;
    let mut b = Driver::start_with(&["--config", c2.to_str().expect("utf-8"), "--node-id", "node-b"], &[]).await;
    let va = a.create("pvc-a").await;
    let vb = b.create("pvc-b").await;
    for (d, v, seed) in [(&mut a, &va, 1u32), (&mut b, &vb, 2)] {
        let (st, tg) = d.mount_rw(&v.volume_id, "w").await;
        fill(&tg.join("data"), 2 << 20, seed);
        d.unmount_all(&v.volume_id, &st, &tg).await;
    }
    // Both ask at once while the repository does not exist yet: one initialises it; the other
    // is told to retry (ABORTED, as the CO would) and then succeeds.
    async fn until_cut(d: &mut Driver, name: &str, v: &str) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match backup(d, name, v, false).await {
                Ok(s) => return s,
                Err(e) if e.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("backup {name}: {e:?}"),
            }
        }
    }
    let (sa, sb) = tokio::join!(
        until_cut(&mut a, "snap-a", &va.volume_id),
        until_cut(&mut b, "snap-b", &vb.volume_id)
    );
    let (ra, rb) = tokio::join!(
        until_ready(&mut a, &sa.snapshot_id),
        until_ready(&mut b, &sb.snapshot_id)
    );
    assert!(ra.ready_to_use && rb.ready_to_use);
    let snaps = s.restic_snapshots();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert_eq!(files_under(&s.repo().join("keys")).len(), 1, "initialised once");
    s.restic_ok(&["check", "--read-data"]);
    // Each node sees both backups: the repository, not the node, answers for them.
    let listed = a
        .ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<String> = listed
        .entries
        .iter()
        .filter_map(|e| e.snapshot.as_ref())
        .map(|s| s.snapshot_id.clone())
        .collect();
    assert!(
        ids.contains(&sa.snapshot_id) && ids.contains(&sb.snapshot_id),
        "{ids:?}"
    );
    // A backup cut on node-b restores on node-a.
    let r = restore(&mut a, "pvc-from-b", 64 * MIB, &sb.snapshot_id)
        .await
        .expect("restore elsewhere");
    let (st, tg) = a.mount_rw(&r.volume_id, "from-b").await;
    assert_eq!(std::fs::metadata(tg.join("data")).expect("data").len(), 2 << 20);
    a.unmount_all(&r.volume_id, &st, &tg).await;
}

/// kill -9 at each step of an upload and of a restore: the retried call converges, the
/// repository stays clean for restic, and nothing is left behind.
#[tokio::test]
async fn a_killed_upload_or_restore_converges_and_leaves_nothing() {
    let s = Setup::new();
    let mut d = s.driver(&s.dir_pool()).await;
    let v = d.create("pvc-kill").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "kill").await;
    fill(&tg.join("data"), 6 << 20, 3);
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let mut seen = Vec::new();
    for (i, point) in [
        "backup:before-upload",
        "backup:after-upload",
        "backup:checked-copy-written",
        "backup:before-mark",
    ]
    .iter()
    .enumerate()
    {
        d.kill();
        d.spawn(&[("CELLAR_CRASH_AT", point)]).await;
        let name = format!("snap-kill-{i}");
        // The upload thread dies at the point, before or after the cut's answer went out.
        let first = backup(&mut d, &name, &v.volume_id, false).await.ok();
        let status = d.wait_exit();
        assert!(!status.success(), "{point}: the driver should have died");
        d.spawn(&[]).await;
        let snap = backup(&mut d, &name, &v.volume_id, false).await.expect("retry");
        if let Some(f) = first {
            assert_eq!(
                f.snapshot_id, snap.snapshot_id,
                "{point}: the retry names the same backup"
            );
        }
        until_ready(&mut d, &snap.snapshot_id).await;
        seen.push(snap.snapshot_id);
    }
    let snaps = s.restic_snapshots();
    assert_eq!(snaps.len(), 4, "one restic snapshot per backup, none twice: {snaps:?}");
    s.restic_ok(&["check", "--read-data"]);

    // A restore killed mid-stream leaves no volume and no work files; its retry succeeds.
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", "import:mid-stream")]).await;
    let _ = restore(&mut d, "pvc-kill-back", 64 * MIB, &seen[0]).await;
    d.wait_exit();
    d.spawn(&[]).await;
    let r = restore(&mut d, "pvc-kill-back", 64 * MIB, &seen[0])
        .await
        .expect("retried restore");
    let work = s.dir.path().join("pool/.work");
    assert!(
        files_under(&work).is_empty(),
        "nothing left in .work: {:?}",
        files_under(&work)
    );
    let (st, tg) = d.mount_rw(&r.volume_id, "back").await;
    assert_eq!(std::fs::metadata(tg.join("data")).expect("data").len(), 6 << 20);
    d.unmount_all(&r.volume_id, &st, &tg).await;

    // A prune killed after its plan: the repository stays clean, and the next prune finishes.
    for id in &seen[1..] {
        d.ctl
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
    }
    let cfg = s.config(&s.dir_pool(), &s.repo(), &s.password_file());
    let prune = |env: &[(&str, &str)]| cellar_backup(&cfg, &["prune", "--keep-delete-secs", "0"], env);
    let killed = prune(&[("CELLAR_CRASH_AT", "backup:prune-planned")]);
    assert!(
        !killed.status.success(),
        "the prune should have died at its crash point"
    );
    s.restic_ok(&["check", "--read-data"]);
    for _ in 0..2 {
        let out = prune(&[]);
        assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
    }
    s.restic_ok(&["check", "--read-data"]);
    assert_eq!(s.restic_snapshots().len(), 1, "the live backup is kept");
    let out = s.dir.path().join("restic-out");
    s.restic_ok(&["restore", "latest", "--target", out.to_str().expect("utf-8")]);
    assert_eq!(
        std::fs::metadata(out.join("volume/data")).expect("data").len(),
        6 << 20,
        "the live backup's data survives the prunes"
    );
}

/// A tree backup restores into either tree layout: a `dir` volume's backup becomes a `btrfs`
/// subvolume with the same files.
#[tokio::test]
async fn a_dir_backup_restores_into_a_btrfs_volume() {
    let s = Setup::new();
    let fs = TestFs::new("btrfs", 512);
    let pools = format!(
        "{}  - name: bt\n    path: {}\n    layout: btrfs\n",
        s.dir_pool(),
        fs.path("pool").display()
    );
    let mut d = s.driver(&pools).await;
    // Also one kept locally: its local copy is a `dir` snapshot, which cannot become a btrfs
    // subvolume, so that restore reads the repository (it answered INVALID_ARGUMENT before).
    for keep_local in [false, true] {
        let v = d.create(&format!("pvc-tree-{keep_local}")).await;
        let (st, tg) = d.mount_rw(&v.volume_id, "tree").await;
        fill(&tg.join("data"), 1 << 20, 9);
        std::fs::create_dir(tg.join("sub")).expect("mkdir");
        std::fs::write(tg.join("sub/note"), b"into btrfs").expect("write");
        let want = std::fs::read(tg.join("data")).expect("read");
        d.unmount_all(&v.volume_id, &st, &tg).await;
        let snap = backup(&mut d, &format!("snap-tree-bt-{keep_local}"), &v.volume_id, keep_local)
            .await
            .expect("backup");
        until_ready(&mut d, &snap.snapshot_id).await;
        let back = restore_into(
            &mut d,
            &format!("pvc-bt-{keep_local}"),
            64 * MIB,
            Some("bt"),
            &snap.snapshot_id,
        )
        .await
        .unwrap_or_else(|e| panic!("restore into btrfs (kept locally: {keep_local}): {e:?}"));
        assert_eq!(back.volume_context.get("layout").map(String::as_str), Some("btrfs"));
        let (st2, tg2) = d.mount_rw(&back.volume_id, "bt").await;
        assert!(std::fs::read(tg2.join("data")).expect("data") == want, "restored bytes");
        assert_eq!(std::fs::read(tg2.join("sub/note")).expect("note"), b"into btrfs");
        d.unmount_all(&back.volume_id, &st2, &tg2).await;
        d.delete(&back.volume_id).await.expect("delete");
    }
}

/// The second backup of a `dir` volume takes the first as its parent (unchanged files are not read
/// again) and still holds every change: a file rewritten with the same size, a new file, a removed
/// one.
#[tokio::test]
async fn a_second_dir_backup_holds_every_change_since_its_parent() {
    let s = Setup::new();
    let mut d = s.driver(&s.dir_pool()).await;
    let v = d.create("pvc-inc").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "inc").await;
    std::fs::write(tg.join("same-size"), b"first version").expect("write");
    std::fs::write(tg.join("kept"), b"never changes").expect("write");
    std::fs::write(tg.join("removed"), b"goes away").expect("write");
    let first = backup(&mut d, "snap-inc-1", &v.volume_id, false).await.expect("backup");
    until_ready(&mut d, &first.snapshot_id).await;
    std::fs::write(tg.join("same-size"), b"other version").expect("rewrite");
    std::fs::remove_file(tg.join("removed")).expect("remove");
    std::fs::write(tg.join("added"), b"new file").expect("write");
    let second = backup(&mut d, "snap-inc-2", &v.volume_id, false).await.expect("backup");
    until_ready(&mut d, &second.snapshot_id).await;
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let snaps = s.restic_snapshots();
    let second_snap = snaps
        .iter()
        .find(|x| {
            x["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t.as_str() == Some("cellar-name=snap-inc-2")))
        })
        .expect("the second backup in restic");
    assert!(
        second_snap["parent"].is_string(),
        "the second backup names its parent: {second_snap}"
    );
    let r = restore(&mut d, "pvc-inc-back", 64 * MIB, &second.snapshot_id)
        .await
        .expect("restore");
    let (st2, tg2) = d.mount_rw(&r.volume_id, "inc-back").await;
    assert_eq!(std::fs::read(tg2.join("same-size")).expect("read"), b"other version");
    assert_eq!(std::fs::read(tg2.join("kept")).expect("read"), b"never changes");
    assert_eq!(std::fs::read(tg2.join("added")).expect("read"), b"new file");
    assert!(!tg2.join("removed").exists(), "a removed file is not restored");
    d.unmount_all(&r.volume_id, &st2, &tg2).await;
}

/// The driver's own account of an image upload: `(chunks, from_parent, read_bytes)` from its
/// "image chunks written" line for `backup`.
fn image_upload_figures(log: &str, backup: &str) -> (u64, u64, u64) {
    let line = log
        .lines()
        .rfind(|l| l.contains("image chunks written") && l.contains(backup))
        .unwrap_or_else(|| panic!("no upload line for {backup} in the log:\n{log}"));
    let field = |name: &str| -> u64 {
        let at = line
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("{name} in {line}"));
        line[at + name.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    (field("chunks"), field("from_parent"), field("read_bytes"))
}

/// The names in the pool's snapshot directory (records and data).
fn snapshot_entries(pool: &Path) -> Vec<String> {
    let mut names: Vec<String> = files_under(&pool.join("snapshots"))
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// An image's later backups read only the chunks changed block tracking finds changed since the
/// previous one (whose local copy stays as the base, and only it), and each backup still restores
/// with restic to exactly the bytes its snapshot held.
#[tokio::test]
async fn later_image_backups_read_only_what_changed_and_restore_exactly() {
    let s = Setup::new();
    // xfs: snapshots are reflinks, so their extents tell what changed.
    let (fs, mut d, v) = image_volume(&s, "pvc-inc-img").await;
    let pool_dir = fs.path("pool");
    let image = pool_dir
        .join("volumes")
        .join(v.volume_id.rsplit(':').next().expect("key"));
    let (st, tg) = d.mount_rw(&v.volume_id, "inc-img").await;
    fill(&tg.join("data"), 40 * MIB as usize, 7);
    d.unmount_all(&v.volume_id, &st, &tg).await;

    let mut taken: Vec<(String, String, Vec<u8>)> = Vec::new(); // (name, snapshot id, image bytes)
    for round in 0..4u64 {
        if round > 0 {
            // A few small writes: inside one chunk, across a chunk boundary, at the end of the data.
            let (st, tg) = d.mount_rw(&v.volume_id, "inc-img").await;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(tg.join("data"))
                .expect("open");
            use std::os::unix::fs::FileExt;
            for at in [
                round * 3 * MIB as u64 + 4096,
                17 * MIB as u64 - 2048,
                40 * MIB as u64 - 100,
            ] {
                f.write_all_at(&vec![round as u8 + 0x41; 4096.min(40 * MIB as u64 - at) as usize], at)
                    .expect("write");
            }
            f.sync_all().expect("sync");
            drop(f);
            d.unmount_all(&v.volume_id, &st, &tg).await;
        }
        let name = format!("snap-inc-img-{round}");
        let bytes = std::fs::read(&image).expect("image");
        let b = backup(&mut d, &name, &v.volume_id, false).await.expect("backup");
        until_ready(&mut d, &b.snapshot_id).await;
        let (chunks, from_parent, read) = image_upload_figures(&d.log(), &b.snapshot_id);
        assert_eq!(chunks, 64 * MIB as u64 / (512 << 10), "fixed 512 KiB chunks");
        if round == 0 {
            assert_eq!(from_parent, 0, "the first backup has no parent");
            assert!(
                read >= 40 * MIB as u64,
                "the first backup reads the data ({read} bytes)"
            );
        } else {
            assert!(
                read <= 12 * MIB as u64 && from_parent >= chunks / 2,
                "backup {round} reads only what changed: {read} bytes read, {from_parent} of {chunks} chunks from its parent"
            );
        }
        // Only the newest backup's local copy stays (the next one's base).
        assert_eq!(
            snapshot_entries(&pool_dir),
            vec![name.clone(), format!("{name}.json")],
            "after backup {round}"
        );
        taken.push((name, b.snapshot_id, bytes));
    }

    s.restic_ok(&["check", "--read-data"]);
    let snaps = s.restic_snapshots();
    for (i, (name, _, bytes)) in taken.iter().enumerate() {
        let snap = snaps
            .iter()
            .find(|x| {
                x["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t.as_str() == Some(&format!("cellar-name={name}"))))
            })
            .unwrap_or_else(|| panic!("{name} in restic: {snaps:?}"));
        assert_eq!(snap["parent"].is_string(), i > 0, "{name}: parent {snap}");
        let out = s.dir.path().join(format!("restic-out-{i}"));
        s.restic_ok(&[
            "restore",
            snap["id"].as_str().expect("id"),
            "--target",
            out.to_str().expect("utf-8"),
        ]);
        let got = std::fs::read(out.join(name)).expect("restored image");
        assert!(
            got == *bytes,
            "restic restores backup {name} to the bytes of its snapshot"
        );
        std::fs::remove_dir_all(&out).expect("clean");
    }
    // cellar restores the last one from the repository (no kept copy serves it) to the same bytes.
    let (last_name, last_id, last_bytes) = taken.last().expect("backups").clone();
    let back = restore_into(&mut d, "pvc-inc-img-back", 64 * MIB, Some("img"), &last_id)
        .await
        .expect("restore");
    let back_image = pool_dir
        .join("volumes")
        .join(back.volume_id.rsplit(':').next().expect("key"));
    assert!(
        std::fs::read(&back_image).expect("restored") == last_bytes,
        "{last_name} restored by cellar"
    );
    d.delete(&back.volume_id).await.expect("delete");
    // The volume goes, and its base with it; the backups stay in the repository.
    d.delete(&v.volume_id).await.expect("delete");
    assert_eq!(
        snapshot_entries(&pool_dir),
        Vec::<String>::new(),
        "no local copy outlives the volume"
    );
    assert_eq!(s.restic_snapshots().len(), taken.len());
    for (_, id, _) in &taken {
        d.ctl
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
    }
    assert!(s.restic_snapshots().is_empty());
}

/// Bad backup inputs answer with their exact codes and cut nothing; a plain snapshot cannot take
/// a backup's name.
#[tokio::test]
async fn bad_backup_inputs_answer_their_codes() {
    let s = Setup::new();
    let mut d = s.driver(&s.dir_pool()).await;
    let v = d.create("pvc-bad").await;
    let snap = |params: &[(&str, &str)]| CreateSnapshotRequest {
        name: "snap-bad".into(),
        source_volume_id: v.volume_id.clone(),
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    for (params, code) in [
        (vec![("backupRepository", "nowhere")], tonic::Code::InvalidArgument),
        (vec![("backupRepository", "Not_A_Name")], tonic::Code::InvalidArgument),
        (
            vec![("backupRepository", "offsite"), ("keepLocal", "yes")],
            tonic::Code::InvalidArgument,
        ),
        (vec![("keepLocal", "true")], tonic::Code::InvalidArgument),
    ] {
        let e = d.ctl.create_snapshot(snap(&params)).await.expect_err("refused");
        assert_eq!(e.code(), code, "{params:?}: {}", e.message());
    }
    let none = d
        .ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(none.entries.is_empty(), "nothing was cut: {:?}", none.entries);
    for id in [
        "backup:offsite:0f2e4c6a-1b3d-4f5e-8a9b-0c1d2e3f4a5b",
        "backup:nowhere:abc",
        "backup:offsite:../x",
    ] {
        let e = d
            .ctl
            .get_snapshot(GetSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .expect_err("unknown");
        assert_eq!(e.code(), tonic::Code::NotFound, "{id}");
        let e = restore(&mut d, "pvc-from-nothing", 64 * MIB, id)
            .await
            .expect_err("unknown source");
        assert_eq!(e.code(), tonic::Code::NotFound, "{id}: {}", e.message());
        d.ctl
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("deleting what is not there is OK");
    }
    let vols = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(vols.entries.len(), 1, "no volume was made");

    // A plain snapshot under a backup's name asks for another snapshot: ALREADY_EXISTS, while the
    // backup uploads and once it is kept locally.
    let b = backup(&mut d, "snap-kept", &v.volume_id, true).await.expect("backup");
    let plain = CreateSnapshotRequest {
        name: "snap-kept".into(),
        source_volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    for when in ["uploading", "uploaded"] {
        if when == "uploaded" {
            until_ready(&mut d, &b.snapshot_id).await;
        }
        let e = d
            .ctl
            .create_snapshot(plain.clone())
            .await
            .expect_err("another snapshot");
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{when}: {}", e.message());
    }
}

/// GetSnapshot of a backup never answers NOT_FOUND while its upload ends: it looked in the
/// repository (not yet checked there), then for the upload on the nodes (just finished, its record
/// gone), and found neither. The driver waits 400 ms between the two looks
/// (`get-backup:between-looks`), so that an upload ends inside that window; polled without pause.
#[tokio::test]
async fn a_backup_is_never_not_found_while_its_upload_ends() {
    let s = Setup::new();
    let mut d = s.driver(&s.dir_pool()).await;
    d.kill();
    d.spawn(&[("CELLAR_DELAY_AT", "get-backup:between-looks=400")]).await;
    let v = d.create("pvc-poll").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "poll").await;
    for i in 0..3 {
        // New data each time, so each upload takes a while.
        fill(&tg.join(format!("f{i}")), 4 << 20, i);
        let b = backup(&mut d, &format!("poll-{i}"), &v.volume_id, false)
            .await
            .expect("backup");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let got = d
                .ctl
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id: b.snapshot_id.clone(),
                    ..Default::default()
                })
                .await;
            match got {
                Ok(r) if r.get_ref().snapshot.as_ref().is_some_and(|s| s.ready_to_use) => break,
                Ok(_) => {}
                Err(e) => panic!("backup {i}: GetSnapshot while it uploads: {e:?}"),
            }
            assert!(Instant::now() < deadline, "backup {i} not ready");
        }
    }
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

/// DeleteSnapshot of a backup whose upload runs (here at 4 KiB/s, minutes for its 2 MiB) calls
/// the upload off and answers OK at once: it answered ABORTED until the whole upload had run.
/// Nothing of it is left: not listed, no local copy, no restic snapshot (not even a deletion mark,
/// which no node would consume), and a prune leaves a repository that checks.
#[tokio::test]
async fn deleting_a_backup_calls_its_upload_off() {
    let s = Setup::new();
    let cfg = s.config(&s.dir_pool(), &s.repo(), &s.password_file());
    let mut d = Driver::start_with(
        &["--config", cfg.to_str().expect("utf-8"), "--backup-bandwidth", "4K"],
        &[],
    )
    .await;
    let v = d.create("pvc-slow").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "slow").await;
    fill(&tg.join("data"), 2 << 20, 7);
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let b = backup(&mut d, "slow-backup", &v.volume_id, false)
        .await
        .expect("backup");
    assert!(!b.ready_to_use, "the upload runs");
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: b.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot answers OK while the backup uploads");
    assert_not_listed(&mut d, &b.snapshot_id).await;
    assert!(
        snapshot_entries(&s.dir.path().join("pool")).is_empty(),
        "no local copy is left: {:?}",
        snapshot_entries(&s.dir.path().join("pool"))
    );
    // Not even a deletion mark: the node said it held the backup, so no other node may.
    let left = s.restic_snapshots();
    assert!(left.is_empty(), "no restic snapshot of it, nor a mark: {left:?}");
    for _ in 0..2 {
        let out = cellar_backup(&cfg, &["prune", "--keep-delete-secs", "0"], &[]);
        assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
    }
    s.restic_ok(&["check", "--read-data"]);
    d.delete(&v.volume_id).await.expect("DeleteVolume");
}

/// An all-in-one driver on a `dir` pool, a volume `pvc` and its `keepLocal` backup `name`, uploaded.
async fn kept_backup(s: &Setup, pvc: &str, name: &str) -> (Driver, Volume, Snapshot) {
    let mut d = s.driver(&s.dir_pool()).await;
    let v = d.create(pvc).await;
    let b = backup(&mut d, name, &v.volume_id, true).await.expect("backup");
    until_ready(&mut d, &b.snapshot_id).await;
    (d, v, b)
}

/// A node that answers a backup's delete but cannot drop its kept copy (an I/O error on its pool)
/// was told: its error stands (UNAVAILABLE, retried) and no deletion mark is written, which would
/// have answered OK with the copy still on disk and the backup still listed until the node's next
/// look. The retry, the pool sound again, drops the copy at once and leaves nothing.
#[tokio::test]
async fn a_node_that_cannot_drop_its_copy_fails_the_delete_and_marks_nothing() {
    let s = Setup::new();
    let (mut d, v, b) = kept_backup(&s, "pvc-kept", "kept-backup").await;
    let pool = s.dir.path().join("pool");
    assert!(!snapshot_entries(&pool).is_empty(), "the copy is kept");

    d.kill();
    d.spawn(&[("CELLAR_FAIL_AT", "file:rename=EIO")]).await;
    let delete = DeleteSnapshotRequest {
        snapshot_id: b.snapshot_id.clone(),
        ..Default::default()
    };
    let err = d
        .ctl
        .delete_snapshot(delete.clone())
        .await
        .expect_err("the copy cannot be dropped");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        s.restic_snapshots()
            .iter()
            .all(|snap| !snap.to_string().contains("cellar-deleted=")),
        "no deletion mark: {:?}",
        s.restic_snapshots()
    );
    let listed = listed_snapshots(&mut d).await;
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.snapshot.as_ref().is_some_and(|x| x.snapshot_id == b.snapshot_id)),
        "the backup stays listed while its delete fails: {listed:?}"
    );

    d.kill();
    d.spawn(&[]).await;
    d.ctl.delete_snapshot(delete).await.expect("DeleteSnapshot retried");
    assert!(snapshot_entries(&pool).is_empty(), "{:?}", snapshot_entries(&pool));
    assert_not_listed(&mut d, &b.snapshot_id).await;
    let left = s.restic_snapshots();
    assert!(left.is_empty(), "no restic snapshot of it, nor a mark: {left:?}");
    d.delete(&v.volume_id).await.expect("DeleteVolume");
}

/// An uploaded backup is listed from its repository alone: a node's kept copy of a backup the
/// repository no longer holds (its node drops it on seeing the deletion mark, then clears the
/// mark, so a listing that reads the nodes before the marks saw it) is not listed, nor found by
/// its id. Here restic
/// forgets the backup behind cellar's back; DeleteSnapshot still drops the copy.
#[tokio::test]
async fn a_kept_copy_of_a_backup_its_repository_no_longer_holds_is_not_listed() {
    let s = Setup::new();
    let (mut d, v, b) = kept_backup(&s, "pvc-copy", "copy-backup").await;
    let pool = s.dir.path().join("pool");
    let restic_ids: Vec<String> = s
        .restic_snapshots()
        .iter()
        .map(|snap| snap["id"].as_str().expect("restic id").to_string())
        .collect();
    assert_eq!(restic_ids.len(), 1, "one restic snapshot: {restic_ids:?}");
    s.restic_ok(&["forget", &restic_ids[0]]);
    assert!(!snapshot_entries(&pool).is_empty(), "the node still keeps its copy");
    assert_not_listed(&mut d, &b.snapshot_id).await;
    // Nor found by its id, as the snapshotter asks (ListSnapshots filtered).
    let one = d
        .ctl
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: b.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("ListSnapshots of one id")
        .into_inner();
    assert!(one.entries.is_empty(), "{:?}", one.entries);
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: b.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
    assert!(snapshot_entries(&pool).is_empty(), "{:?}", snapshot_entries(&pool));
    assert!(s.restic_snapshots().is_empty(), "no mark: {:?}", s.restic_snapshots());
    d.delete(&v.volume_id).await.expect("DeleteVolume");
}

/// A shared volume's backup uploading in one controller replica, deleted through the other (a
/// leader change while it uploads): the other replica cannot reach the upload's off switch, so
/// it answers ABORTED and writes a deletion mark, which the uploading replica's upload sees within
/// its look (30 s) and is called off by. The delete's retry then answers OK, and nothing stays: no
/// local copy on the share, no backup, no mark, and a prune leaves a checked repository.
#[tokio::test]
async fn a_delete_through_another_replica_calls_the_upload_off() {
    let s = Setup::new();
    let share = s.dir.path().join("share");
    std::fs::create_dir_all(&share).expect("share");
    let pools = format!(
        "  - name: default\n  - name: share\n    backend: shared\n    path: {}\n    layout: dir\n",
        share.display()
    );
    let cfg_a = s.config(&pools, &s.repo(), &s.password_file());
    let cfg_b = s.config(&pools, &s.repo(), &s.password_file());
    let mut a = Driver::start_with(
        &[
            "--config",
            cfg_a.to_str().expect("utf-8"),
            "--node-id",
            "node-a",
            "--backup-bandwidth",
            "4K",
        ],
        &[],
    )
    .await;
    let mut b = Driver::start_with(
        &["--config", cfg_b.to_str().expect("utf-8"), "--node-id", "node-b"],
        &[],
    )
    .await;
    let v = a.create_in("pvc-shared-slow", "share").await;
    let (st, tg) = a.mount_rw(&v.volume_id, "slow").await;
    // Data that does not compress: its upload runs over four minutes at 4 KiB/s.
    std::fs::write(tg.join("data"), common::noise(1 << 20)).expect("write");
    a.unmount_all(&v.volume_id, &st, &tg).await;
    let snap = backup(&mut a, "shared-slow-backup", &v.volume_id, false)
        .await
        .expect("backup");
    assert!(!snap.ready_to_use, "the upload runs");
    let delete = || DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    };
    let first = b
        .ctl
        .delete_snapshot(delete())
        .await
        .expect_err("the other replica's upload holds the snapshot");
    assert_eq!(first.code(), tonic::Code::Aborted, "{first:?}");
    assert!(first.message().contains("another controller replica"), "{first:?}");
    // The CO retries; the upload sees the mark within its look and lets the snapshot go.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match b.ctl.delete_snapshot(delete()).await {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("the delete's retry: {e:?} (the whole upload would take over four minutes)"),
        }
    }
    for d in [&mut a, &mut b] {
        assert_not_listed(d, &snap.snapshot_id).await;
    }
    assert!(
        snapshot_entries(&share).is_empty(),
        "no copy is left on the share: {:?}",
        snapshot_entries(&share)
    );
    let left = s.restic_snapshots();
    assert!(
        left.is_empty(),
        "no restic snapshot of it, nor a deletion mark: {left:?}"
    );
    for _ in 0..2 {
        let out = cellar_backup(&cfg_b, &["prune", "--keep-delete-secs", "0"], &[]);
        assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
    }
    s.restic_ok(&["check", "--read-data"]);
    b.delete(&v.volume_id).await.expect("DeleteVolume");
}

/// ListSnapshots through `d`, whole.
async fn listed_snapshots(d: &mut Driver) -> ListSnapshotsResponse {
    d.ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner()
}

/// Asserts that ListSnapshots through `d` does not list snapshot `id` (deleted).
async fn assert_not_listed(d: &mut Driver, id: &str) {
    let listed = listed_snapshots(d).await;
    assert!(
        listed
            .entries
            .iter()
            .all(|e| e.snapshot.as_ref().is_none_or(|s| s.snapshot_id != id)),
        "the deleted snapshot {id} is not listed"
    );
}

/// Repository `name` at `prefix` of the S3 test server, as a controller process is given it.
fn s3_repository(s3: &common::s3::S3Server, s: &Setup, name: &PoolName, prefix: &str) -> RepositoryConfig {
    RepositoryConfig {
        name: name.clone(),
        location: Location::S3(S3 {
            endpoint: s3.endpoint(),
            bucket: s3.bucket().to_string(),
            region: s3.region().to_string(),
            credentials_file: s3.credentials_file(),
            prefix: Some(prefix.to_string()),
            timeout_seconds: None,
        }),
        password_file: s.password_file(),
    }
}

/// A pack left in an S3 repository that has no index yet (an upload killed, or called off, before
/// any upload into it wrote one): rustic's prune does nothing without an index, so the prune
/// removes such packs itself once older than keep-delete, by the time the S3 listing carries.
#[test]
fn a_pack_left_in_an_s3_repository_without_an_index_is_pruned() {
    let s3 = common::s3::S3Server::start();
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    let b = Backups::new(vec![s3_repository(&s3, &s, &name, "orphans")], Throttle::unlimited());
    b.open_or_init(&name, true).expect("init");
    let bucket = s3.bucket_dir().join("orphans").join("data").join("ab");
    std::fs::create_dir_all(&bucket).expect("pack directory");
    let pack = bucket.join(format!("ab{}", "0".repeat(62)));
    std::fs::write(&pack, vec![1u8; 4096]).expect("pack");
    b.prune(&name, Duration::from_secs(3600)).expect("prune");
    assert!(pack.exists(), "a young pack stays (an upload may be writing its index)");
    b.prune(&name, Duration::ZERO).expect("prune");
    assert!(!pack.exists(), "a pack no index names goes: {}", s3.log());
}

/// `call` through each of `processes` in a thread of its own, all started at one instant; the
/// answers in their order.
fn at_once<T: Send>(processes: &[Backups], call: impl Fn(&Backups) -> T + Sync) -> Vec<T> {
    let start = std::sync::Barrier::new(processes.len());
    std::thread::scope(|sc| {
        let runs: Vec<_> = processes
            .iter()
            .map(|b| {
                let (start, call) = (&start, &call);
                sc.spawn(move || {
                    start.wait();
                    call(b)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("call thread")).collect()
    })
}

/// Two controller processes initialising one new S3 repository at the same instant (a snapshotter
/// leader change during the first backup): S3 has no lock file, so each writes a claim under
/// `cellar-init/` and goes on only when it sees no other. At most one initialises; the other opens
/// what it made or answers ABORTED (the CO retries). Never two keys with two master keys, which would
/// leave the repository readable with one of them only.
#[test]
fn two_controllers_initialising_one_new_s3_repository_leave_one_key() {
    let s3 = common::s3::S3Server::start();
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    for round in 0..8 {
        let prefix = format!("race-{round}");
        let cfg = s3_repository(&s3, &s, &name, &prefix);
        let controllers: Vec<Backups> = (0..2)
            .map(|_| Backups::new(vec![cfg.clone()], Throttle::unlimited()))
            .collect();
        let outcomes = at_once(&controllers, |b| b.open_or_init(&name, true).map(drop));
        // Each opened it, or answered what the CO retries: ABORTED (the other's claim), or
        // UNAVAILABLE (the test server answers a listing racing a write with a passing 500).
        for o in &outcomes {
            assert!(
                matches!(o, Ok(()) | Err(StorageError::Busy(_) | StorageError::Unavailable(_))),
                "round {round}: an initialisation answered {o:?}"
            );
        }
        // The CO's retry: each controller opens the repository in the end.
        for b in &controllers {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match b.open_or_init(&name, true) {
                    Ok(_) => break,
                    Err(StorageError::Busy(_) | StorageError::Unavailable(_)) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => panic!("round {round}: the retry answered {e:?}"),
                }
            }
        }
        let root = s3.bucket_dir().join(&prefix);
        let keys: Vec<_> = std::fs::read_dir(root.join("keys"))
            .expect("keys")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(keys.len(), 1, "round {round}: one key, not {keys:?}");
        assert!(
            !root.join("cellar-init").exists()
                || std::fs::read_dir(root.join("cellar-init"))
                    .expect("claims")
                    .next()
                    .is_none(),
            "round {round}: no claim is left behind"
        );
        // A third process, a node, opens it with the password too.
        Backups::new(vec![cfg], Throttle::unlimited())
            .open(&name)
            .unwrap_or_else(|e| panic!("round {round}: a node cannot open it: {e:?}"));
    }
}

/// Another process's claim on initialising an S3 repository holds a first backup off (ABORTED,
/// nothing written) while it is recent; one left by a killed process is removed once it is stale.
#[test]
fn an_s3_init_claim_holds_others_off_until_it_is_stale() {
    let s3 = common::s3::S3Server::start();
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    let cfg = s3_repository(&s3, &s, &name, "claimed");
    let claims = s3.bucket_dir().join("claimed").join("cellar-init");
    std::fs::create_dir_all(&claims).expect("claims");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_millis();
    // Something not cellar's there is no one's claim, and stays.
    let junk = claims.join("notes.txt");
    std::fs::write(&junk, b"x").expect("junk");
    let recent = claims.join(format!("{now:020}-another"));
    std::fs::write(&recent, b"x").expect("claim");
    let claims_left = || -> Vec<PathBuf> {
        let mut left: Vec<_> = std::fs::read_dir(&claims)
            .expect("claims")
            .flatten()
            .map(|e| e.path())
            .collect();
        left.sort();
        left
    };
    let b = Backups::new(vec![cfg], Throttle::unlimited());
    match b.open_or_init(&name, true) {
        Err(StorageError::Busy(m)) => assert!(m.contains("another process is initialising"), "{m}"),
        other => panic!(
            "a recent claim of another process: want ABORTED, got {:?}",
            other.map(drop)
        ),
    }
    assert_eq!(
        claims_left(),
        vec![recent.clone(), junk.clone()],
        "the refused claimant takes its own claim back"
    );
    assert!(
        !s3.bucket_dir().join("claimed").join("config").exists(),
        "nothing initialised"
    );
    // The same claim eleven minutes older: a killed process's, removed, and the init goes on.
    std::fs::remove_file(&recent).expect("remove");
    let stale = claims.join(format!("{:020}-killed", now - 11 * 60 * 1000));
    std::fs::write(&stale, b"x").expect("claim");
    // And one dated a year ahead: no clock is that far off; it would otherwise never go stale.
    let ahead = claims.join(format!("{:020}-planted", now + 365 * 24 * 3600 * 1000));
    std::fs::write(&ahead, b"x").expect("claim");
    b.open_or_init(&name, true).expect("stale claims are passed over");
    assert!(s3.bucket_dir().join("claimed").join("config").exists(), "initialised");
    assert_eq!(claims_left(), vec![junk], "no claim left, and nothing else removed");
}

/// A backup restores only as what it holds: a raw block image as a block volume, a filesystem
/// image as a filesystem of the same type, neither into a pool without its layout nor into less
/// than its capacity; each refusal with its code and nothing made. Then the right restores work.
#[tokio::test]
async fn a_backup_restores_only_into_its_own_layout_mode_and_filesystem() {
    use cellar::csi::v1::volume_capability::access_mode::Mode;
    let s = Setup::new();
    let fs = TestFs::new("xfs", 1024);
    let pools = format!(
        "  - name: img\n    path: {}\n    layout: image\n    fsType: ext4\n{}",
        fs.path("pool").display(),
        s.dir_pool()
    );
    let mut d = s.driver(&pools).await;
    let block = || cellar::client::block_capability(Mode::SingleNodeWriter);
    let mount = |fs_type: &str| {
        let mut c = cellar::client::mount_capability(Mode::SingleNodeWriter, vec![]);
        if let Some(volume_capability::AccessType::Mount(m)) = c.access_type.as_mut() {
            m.fs_type = fs_type.into();
        }
        c
    };
    let request = |name: &str, pool: &str, cap: VolumeCapability, limit: i64| {
        let mut r = common::create_req(name, 64 * MIB);
        r.capacity_range = Some(CapacityRange {
            required_bytes: if limit > 0 { limit } else { 64 * MIB },
            limit_bytes: limit,
        });
        r.parameters.insert("pool".into(), pool.into());
        r.volume_capabilities = vec![cap];
        r
    };
    let raw = d
        .ctl
        .create_volume(request("pvc-raw", "img", block(), 0))
        .await
        .expect("block volume")
        .into_inner()
        .volume
        .expect("volume");
    let ext4 = d
        .ctl
        .create_volume(request("pvc-ext4", "img", mount(""), 0))
        .await
        .expect("filesystem volume")
        .into_inner()
        .volume
        .expect("volume");
    let raw_backup = backup(&mut d, "snap-raw", &raw.volume_id, false).await.expect("backup");
    let ext4_backup = backup(&mut d, "snap-ext4", &ext4.volume_id, false)
        .await
        .expect("backup");
    until_ready(&mut d, &raw_backup.snapshot_id).await;
    until_ready(&mut d, &ext4_backup.snapshot_id).await;
    let from = |mut r: CreateVolumeRequest, snapshot: &Snapshot| {
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(from_snapshot(&snapshot.snapshot_id)),
        });
        r
    };
    use tonic::Code;
    for (what, r, code) in [
        (
            "a block backup as a filesystem",
            from(request("r1", "img", mount(""), 0), &raw_backup),
            Code::InvalidArgument,
        ),
        (
            "a block backup into a dir pool",
            from(request("r2", "default", block(), 0), &raw_backup),
            Code::InvalidArgument,
        ),
        (
            "a block backup into half its capacity",
            from(request("r3", "img", block(), 32 * MIB), &raw_backup),
            Code::OutOfRange,
        ),
        (
            "a filesystem backup as a block volume",
            from(request("r4", "img", block(), 0), &ext4_backup),
            Code::InvalidArgument,
        ),
        (
            "an ext4 backup as xfs",
            from(request("r5", "img", mount("xfs"), 0), &ext4_backup),
            Code::InvalidArgument,
        ),
        (
            "an image backup into a dir pool",
            from(request("r6", "default", mount(""), 0), &ext4_backup),
            Code::InvalidArgument,
        ),
    ] {
        let e = d.ctl.create_volume(r).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {}", e.message());
    }
    let listed = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.entries.len(), 2, "no refused restore made a volume");
    for (r, snapshot) in [
        (request("pvc-raw-back", "img", block(), 0), &raw_backup),
        (request("pvc-ext4-back", "img", mount("ext4"), 0), &ext4_backup),
    ] {
        let v = d
            .ctl
            .create_volume(from(r, snapshot))
            .await
            .expect("the right restore")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(v.capacity_bytes, 64 * MIB);
    }
}

/// A `dir` backup's meta, for uploads made through the library in the S3 fault tests.
fn s3_dir_meta(name: &str) -> cellar::backup::BackupMeta {
    cellar::backup::BackupMeta {
        name: name.into(),
        source_volume_id: "local:node-1:default:pvc-1".into(),
        layout: cellar::storage::record::Layout::Dir,
        mode: cellar::storage::record::VolumeMode::Filesystem,
        capacity_bytes: 1 << 20,
        fs_bytes: 0,
        length: 0,
        node: "node-1".into(),
        path: cellar::backup::TREE_PATH.into(),
        root: None,
        chunk_bytes: None,
    }
}

/// Repository `name` at `prefix`, reached through `proxy` in front of the S3 test server.
fn s3_repository_via(
    s3: &common::s3::S3Server,
    proxy: &common::s3::FaultProxy,
    s: &Setup,
    name: &PoolName,
    prefix: &str,
) -> RepositoryConfig {
    let mut cfg = s3_repository(s3, s, name, prefix);
    if let Location::S3(loc) = &mut cfg.location {
        loc.endpoint = proxy.endpoint();
    }
    cfg
}

/// Reads a backup whole, as a restore does; the first failure.
fn restore_whole(b: &Backups, id: &cellar::storage::id::BackupId) -> Result<(), StorageError> {
    let frames = cellar::backup::restore::frames(b, id, cellar::storage::record::Layout::Dir)?;
    for f in frames {
        f?;
    }
    Ok(())
}

/// Uploads a `dir` backup of one 300 kB file into repository `name` of `b`, as key `key`.
fn s3_upload(b: &Backups, s: &Setup, name: &PoolName, key: &str) -> cellar::storage::id::BackupId {
    let data = s.dir.path().join(format!("data-{key}"));
    std::fs::create_dir(&data).expect("data");
    std::fs::write(data.join("f"), vec![7u8; 300_000]).expect("file");
    let id = cellar::storage::id::BackupId::new(name.clone(), key).expect("id");
    cellar::backup::upload::upload(b, &id, &s3_dir_meta(key), &data, None, &Default::default()).expect("upload");
    id
}

/// An S3 store that fails every listing of `snapshots/` (after its retries: throttling, an
/// outage of its listing service, a page cut off): rustic's S3 backend answered such a listing
/// as an empty one. The prune then took every backup for gone and marked every pack, so that
/// each backup restored DATA_LOSS until the next prune with a whole listing (and its packs were
/// removed for good by a prune `keep-delete` later that failed the same way); a listing answered
/// no backup; a delete forgot nothing and answered OK. Each now answers UNAVAILABLE and changes
/// nothing.
#[test]
fn a_failed_s3_listing_fails_the_prune_list_and_delete_instead_of_reading_as_empty() {
    use common::s3::{Fault, FaultProxy};
    let s3 = common::s3::S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    let cfg = s3_repository_via(&s3, &proxy, &s, &name, "listing");
    let b = Backups::new(vec![cfg.clone()], Throttle::unlimited());
    b.open_or_init(&name, true).expect("init");
    let id = s3_upload(&b, &s, &name, "0123456789abcdef");
    restore_whole(&b, &id).expect("restore");
    // The backup's packs are older than the prune's keep-delete below.
    std::thread::sleep(Duration::from_millis(1100));
    proxy.set(|r| {
        let listing = r.method == "GET" && r.target.contains("list-type=2");
        match listing && r.target.contains("listing/snapshots/") {
            true => Fault::Fail,
            false => Fault::Pass,
        }
    });
    let other = Backups::new(vec![cfg], Throttle::unlimited());
    match other.prune(&name, Duration::from_secs(1)) {
        Err(StorageError::Unavailable(_)) => {}
        done => panic!("a prune that cannot list the backups: want UNAVAILABLE, got {done:?}"),
    }
    assert!(!proxy.failed().is_empty(), "the listings were failed");
    match other.list(&name) {
        Err(StorageError::Unavailable(_)) => {}
        listed => panic!(
            "a listing that failed: want UNAVAILABLE, got {:?}",
            listed.map(|l| l.len())
        ),
    }
    match other.forget(&id) {
        Err(StorageError::Unavailable(_)) => {}
        done => panic!("a delete that cannot list the backups: want UNAVAILABLE, got {done:?}"),
    }
    proxy.heal();
    restore_whole(&other, &id).expect("the backup restores: nothing of it was marked");
    assert_eq!(other.list(&name).expect("list").len(), 1, "the backup is still there");
}

/// A store that takes a request and never answers (a stuck server, a network that drops the
/// replies of a connection it let open): S3's client had no time bound, so a restore waited for
/// ever (holding its volume's lock: every retry of the CreateVolume was ABORTED), and so did a
/// listing, an upload, and the background prune, which then pruned no repository again. Now a
/// request unanswered for the repository's `timeoutSeconds` is tried again, and then the call
/// answers UNAVAILABLE.
#[test]
fn an_s3_store_that_never_answers_fails_a_restore_and_a_listing_instead_of_holding_them() {
    use common::s3::{Fault, FaultProxy};
    let s3 = common::s3::S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    let mut cfg = s3_repository_via(&s3, &proxy, &s, &name, "silent");
    if let Location::S3(loc) = &mut cfg.location {
        loc.timeout_seconds = Some(1);
    }
    let b = std::sync::Arc::new(Backups::new(vec![cfg], Throttle::unlimited()));
    b.open_or_init(&name, true).expect("init");
    let id = s3_upload(&b, &s, &name, "0123456789abcdef");
    restore_whole(&b, &id).expect("restore");
    // Each call runs beside the test, which gives up on it after a minute: without a bound it
    // never answers (the proxy holds the request until it is dropped).
    let answer = |what: &'static str, call: Box<dyn FnOnce() -> Result<(), StorageError> + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(call());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{what} still waits on a store that never answers"))
    };
    proxy.set(|r| match r.target.contains("/silent/data/") {
        true => Fault::Hang,
        false => Fault::Pass,
    });
    let (b2, id2) = (b.clone(), id.clone());
    match answer("a restore", Box::new(move || restore_whole(&b2, &id2))) {
        Err(StorageError::Unavailable(_)) => {}
        other => panic!("a restore from a store that never answers: want UNAVAILABLE, got {other:?}"),
    }
    proxy.set(|r| match r.target.contains("list-type=2") {
        true => Fault::Hang,
        false => Fault::Pass,
    });
    let (b2, name2) = (b.clone(), name.clone());
    match answer("a listing", Box::new(move || b2.list(&name2).map(drop))) {
        Err(StorageError::Unavailable(_)) => {}
        other => panic!("a listing of a store that never answers: want UNAVAILABLE, got {other:?}"),
    }
    proxy.heal();
    restore_whole(&b, &id).expect("the backup restores once the store answers");
}

/// Bytes that repeat nowhere (and hold no run of zeros a restore would leave as a hole).
fn varied(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (((i ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(2_654_435_761) >> 11) as u8) | 1)
        .collect()
}

/// Backup `id` restored as a restore reads it: each top-level file's bytes by name.
fn restored_files(
    b: &Backups,
    id: &cellar::storage::id::BackupId,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StorageError> {
    use cellar::storage::transfer::Frame;
    let mut files = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for f in cellar::backup::restore::frames(b, id, cellar::storage::record::Layout::Dir)? {
        match f? {
            Frame::File { name, size, .. } => {
                let name = String::from_utf8_lossy(&name).into_owned();
                files.insert(name.clone(), vec![0u8; size as usize]);
                current = Some(name);
            }
            Frame::Chunk { offset, data, .. } => {
                let file = files
                    .get_mut(current.as_deref().expect("a chunk follows its file"))
                    .expect("file");
                file[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            }
            _ => {}
        }
    }
    Ok(files)
}

/// Uploads a `dir` backup holding `files` (name, bytes) into repository `name` as key `key`.
fn upload_files(
    b: &Backups,
    s: &Setup,
    name: &PoolName,
    key: &str,
    files: &std::collections::BTreeMap<String, Vec<u8>>,
) -> cellar::storage::id::BackupId {
    let data = s.dir.path().join(format!("data-{key}"));
    std::fs::create_dir(&data).expect("data");
    for (file, bytes) in files {
        std::fs::write(data.join(file), bytes).expect("file");
    }
    let id = cellar::storage::id::BackupId::new(name.clone(), key).expect("id");
    cellar::backup::upload::upload(b, &id, &s3_dir_meta(key), &data, None, &Default::default()).expect("upload");
    id
}

/// Repository `offsite` in the setup's directory, as a process is given it.
fn path_repository(s: &Setup) -> RepositoryConfig {
    RepositoryConfig {
        name: PoolName::parse("offsite").expect("name"),
        location: Location::Path(s.repo()),
        password_file: s.password_file(),
    }
}

/// Two prunes of one repository at once, round after round, through two processes' views of it
/// (two controller replicas, or the background pruner and `cellar backup prune`), with backups
/// made and forgotten between the rounds so that each prune marks, repacks and removes packs. A
/// prune either does its work or is told to retry (ABORTED: another prune holds the
/// repository); the prune after each round succeeds; every kept backup is still listed and
/// restores byte for byte; and `check --read-data` finds every pack the index names.
/// (UNAVAILABLE is allowed on S3 only: the test server answers a listing racing a write with a
/// passing 500.)
fn two_prunes_at_once_keep_every_kept_backup(cfg: RepositoryConfig, s: &Setup, store_may_fail: bool) {
    let name = cfg.name.clone();
    let replicas: Vec<Backups> = (0..2)
        .map(|_| Backups::new(vec![cfg.clone()], Throttle::unlimited()))
        .collect();
    replicas[0].open_or_init(&name, true).expect("init");
    let mut kept: Vec<(
        cellar::storage::id::BackupId,
        std::collections::BTreeMap<String, Vec<u8>>,
    )> = Vec::new();
    for round in 0..4u32 {
        // Two backups share a file: forgetting one leaves its pack half used (repacked), and its
        // trees unused (marked, then removed).
        let shared = varied(300_000, round * 10 + 1);
        let made: Vec<_> = ["aaaa", "bbbb"]
            .iter()
            .enumerate()
            .map(|(i, suffix)| {
                let files = std::collections::BTreeMap::from([
                    ("shared".to_string(), shared.clone()),
                    ("own".to_string(), varied(200_000, round * 10 + 2 + i as u32)),
                ]);
                let key = format!("{round:04}-{suffix}");
                (
                    upload_files(&replicas[round as usize % 2], s, &name, &key, &files),
                    files,
                )
            })
            .collect();
        let (forgotten, _) = &made[0];
        replicas[0].forget(forgotten).expect("forget");
        kept.push(made[1].clone());
        if round == 2 {
            // A kept backup of an earlier round goes too: its packs are marked while others stay.
            let (old, _) = kept.remove(0);
            replicas[1].forget(&old).expect("forget");
        }
        let outcomes = at_once(&replicas, |b| b.prune(&name, Duration::ZERO));
        for o in &outcomes {
            match o {
                Ok(_) => {}
                Err(StorageError::Busy(m)) if m.contains("another process is pruning it") => {}
                Err(StorageError::Unavailable(_)) if store_may_fail => {}
                other => panic!("round {round}: a prune beside another answered {other:?}"),
            }
        }
        assert!(
            outcomes.iter().any(|o| o.is_ok()) || store_may_fail,
            "round {round}: one of two prunes does its work: {outcomes:?}"
        );
        let after = replicas[round as usize % 2].prune(&name, Duration::ZERO);
        assert!(
            after.is_ok(),
            "round {round}: the prune after the race answered {after:?}"
        );
        let listed: Vec<_> = replicas[0]
            .list(&name)
            .expect("list")
            .into_iter()
            .map(|b| b.id)
            .collect();
        for (id, files) in &kept {
            assert!(
                listed.contains(id),
                "round {round}: kept backup {id} is listed: {listed:?}"
            );
            let restored =
                restored_files(&replicas[1], id).unwrap_or_else(|e| panic!("round {round}: restore {id}: {e:?}"));
            assert!(restored == *files, "round {round}: backup {id} restores byte for byte");
        }
        let checked = replicas[1].verify(&name, true).expect("verify");
        assert!(
            checked.errors.is_empty(),
            "round {round}: the repository checks clean: {:?}",
            checked.errors
        );
    }
}

#[test]
fn two_prunes_at_once_on_a_path_repository_keep_every_kept_backup() {
    let s = Setup::new();
    two_prunes_at_once_keep_every_kept_backup(path_repository(&s), &s, false);
}

#[test]
fn two_prunes_at_once_on_an_s3_repository_keep_every_kept_backup() {
    let s3 = common::s3::S3Server::start();
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    two_prunes_at_once_keep_every_kept_backup(s3_repository(&s3, &s, &name, "pruned"), &s, true);
}

/// Cuts every pack file below `data` (a repository's `data/`, on disk) to its first 16 bytes:
/// packs really shorter than their index says. Answers how many were cut.
fn cut_packs(data: &Path) -> usize {
    let mut cut = 0;
    for bucket in files_under(data) {
        for pack in files_under(&bucket) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&pack)
                .and_then(|f| f.set_len(16))
                .expect("cut a pack");
            cut += 1;
        }
    }
    cut
}

/// A read of a pack that comes back short is the way to the store's doing (a proxy that truncates
/// an answer, a connection cut mid-body) until the pack itself is short: it is read again (one
/// short answer failed the restore at once before), a restore that keeps getting short answers
/// is UNAVAILABLE (the CO retries), never DATA_LOSS; and a pack really shorter than its index
/// says is DATA_LOSS (it was UNAVAILABLE, retried for ever).
#[test]
fn a_short_read_from_s3_is_retried_or_unavailable_and_only_a_short_pack_is_data_loss() {
    use common::s3::{Fault, FaultProxy};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let s3 = common::s3::S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    let b = Backups::new(
        vec![s3_repository_via(&s3, &proxy, &s, &name, "short")],
        Throttle::unlimited(),
    );
    b.open_or_init(&name, true).expect("init");
    let id = s3_upload(&b, &s, &name, "0123456789abcdef");
    restore_whole(&b, &id).expect("restore");
    let pack_read = |r: &common::s3::Seen<'_>| r.method == "GET" && r.target.contains("/short/data/");
    for fault in [Fault::Truncate, Fault::Cut] {
        // One answer cut short: read again, and the restore goes through.
        let left = std::sync::Arc::new(AtomicUsize::new(1));
        let once = left.clone();
        proxy.set(move |r| {
            match pack_read(r)
                && once
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                true => fault,
                false => Fault::Pass,
            }
        });
        restore_whole(&b, &id).unwrap_or_else(|e| panic!("{fault:?} once: the read again restores, got {e:?}"));
        assert_eq!(left.load(Ordering::SeqCst), 0, "{fault:?}: a pack's read was cut short");
        // Every answer cut short: UNAVAILABLE, the pack is whole.
        proxy.set(move |r| match pack_read(r) {
            true => fault,
            false => Fault::Pass,
        });
        match restore_whole(&b, &id) {
            Err(StorageError::Unavailable(m)) => assert!(!m.is_empty()),
            other => panic!("{fault:?} every time: want UNAVAILABLE, got {other:?}"),
        }
    }
    proxy.heal();
    restore_whole(&b, &id).expect("the backup restores once answers are whole");
    assert!(
        cut_packs(&s3.bucket_dir().join("short").join("data")) > 0,
        "packs to cut"
    );
    match restore_whole(&b, &id) {
        Err(StorageError::DataLoss(m)) => assert!(m.contains("bytes long"), "{m}"),
        other => panic!("a pack shorter than its index says: want DATA_LOSS, got {other:?}"),
    }
}

/// A pack of a `path` repository really shorter than its index says (a share that lost its
/// tail) is DATA_LOSS, not a repository that cannot be reached (UNAVAILABLE, retried for ever).
#[test]
fn a_pack_shorter_than_its_index_in_a_path_repository_is_data_loss() {
    let s = Setup::new();
    let name = PoolName::parse("offsite").expect("name");
    let b = Backups::new(vec![path_repository(&s)], Throttle::unlimited());
    b.open_or_init(&name, true).expect("init");
    let id = s3_upload(&b, &s, &name, "0123456789abcdef");
    restore_whole(&b, &id).expect("restore");
    assert!(cut_packs(&s.repo().join("data")) > 0, "packs to cut");
    match restore_whole(&b, &id) {
        Err(StorageError::DataLoss(m)) => assert!(m.contains("bytes long"), "{m}"),
        other => panic!("a pack shorter than its index says: want DATA_LOSS, got {other:?}"),
    }
}
