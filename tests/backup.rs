//! Backups that outlive their node (docs/backups.md), through a real all-in-one driver: snapshots
//! uploaded into a restic repository, checked with Debian's `restic` (it must list, check and
//! restore every backup without cellar), restored into new volumes, forgotten and pruned; and the
//! faults the issue names: a wrong key, an unreachable repository, a corrupted pack.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cellar::csi::v1::*;
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
    let mut r = common::create_req(name, bytes);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_snapshot(snapshot)),
    });
    d.ctl
        .create_volume(r)
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
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
    let listed = d
        .ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner();
    assert!(listed.entries.iter().any(|e| e
        .snapshot
        .as_ref()
        .is_some_and(|s| s.snapshot_id == snap.snapshot_id && s.ready_to_use)));
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
    assert!(s.restic_snapshots().is_empty(), "the backup is forgotten");
    let cfg = s.config(&s.dir_pool(), &s.repo(), &s.password_file());
    for _ in 0..2 {
        let out = Command::new(common::bin())
            .args([
                "backup",
                "prune",
                "--repository",
                "offsite",
                "--keep-delete-secs",
                "0",
                "--config",
            ])
            .arg(&cfg)
            .output()
            .expect("cellar backup prune");
        assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
    }
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

#[tokio::test]
async fn an_image_backup_restores_the_same_bytes_with_restic_and_cellar() {
    let s = Setup::new();
    let fs = TestFs::new("xfs", 1024);
    let pool = format!(
        "  - name: img\n    path: {}\n    layout: image\n    fsType: ext4\n",
        fs.path("pool").display()
    );
    let mut d = s.driver(&pool).await;
    let mut req = common::create_req("pvc-img", 64 * MIB);
    req.parameters.insert("pool".into(), "img".into());
    let v = d
        .ctl
        .create_volume(req)
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
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
    let mut r = common::create_req("pvc-img-back", 64 * MIB);
    r.parameters.insert("pool".into(), "img".into());
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_snapshot(&snap.snapshot_id)),
    });
    let back = d
        .ctl
        .create_volume(r)
        .await
        .expect("restore")
        .into_inner()
        .volume
        .expect("volume");
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
        let snap = backup(&mut d, "snap-k", &v.volume_id, false).await.expect("backup");
        until_ready(&mut d, &snap.snapshot_id).await;
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
