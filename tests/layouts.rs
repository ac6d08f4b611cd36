//! The btrfs and image layouts on real loop-backed btrfs, xfs and ext4 pools made by the tests:
//! enforced capacity, online growth, raw block, snapshots and clones, pool checks and crash recovery.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::*;
use common::fs::{loops_under, TestFs};
use common::start_with_pools as driver;
use common::*;
use tonic::Code;

fn req(name: &str, bytes: i64, pool: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes);
    r.parameters.insert("pool".into(), pool.into());
    r
}

fn block_req(name: &str, bytes: i64, pool: &str) -> CreateVolumeRequest {
    let mut r = req(name, bytes, pool);
    r.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    r
}

/// Writes 1 MiB chunks to `file` until `limit` bytes or an error; returns bytes written and the error.
fn fill(file: &Path, limit: u64) -> (u64, Option<i32>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .expect("open fill file");
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0;
    while written < limit {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_all()) {
            return (written, e.raw_os_error());
        }
        written += chunk.len() as u64;
    }
    (written, None)
}

fn write_synced(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(bytes).expect("write");
    f.sync_all().expect("fsync");
}

fn total_bytes(path: &Path) -> u64 {
    cellar::sys::statfs::usage(path).expect("statfs").total_bytes
}

async fn expand(d: &mut Driver, id: &str, bytes: i64) -> ControllerExpandVolumeResponse {
    d.ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume")
        .into_inner()
}

async fn node_expand(
    d: &mut Driver,
    id: &str,
    path: &Path,
    bytes: i64,
) -> Result<NodeExpandVolumeResponse, tonic::Status> {
    d.node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn stats(d: &mut Driver, id: &str, path: &Path) -> NodeGetVolumeStatsResponse {
    d.node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner()
}

async fn restore(d: &mut Driver, name: &str, bytes: i64, pool: &str, source: volume_content_source::Type) -> Volume {
    let mut r = req(name, bytes, pool);
    r.volume_content_source = Some(VolumeContentSource { r#type: Some(source) });
    d.ctl
        .create_volume(r)
        .await
        .expect("create from source")
        .into_inner()
        .volume
        .expect("volume")
}

fn snap_src(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: id.into() })
}

fn vol_src(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: id.into() })
}

// ------------------------------------------------------------------ btrfs

#[tokio::test]
async fn btrfs_volume_is_a_subvolume_whose_limit_stops_writes() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _c) = driver(&[("fast", &fs.path("pool"), "btrfs", "")]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-b1", 64 * MIB, "fast"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let data = fs.path("pool/volumes/pvc-b1");
    let ino = std::fs::metadata(&data)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    assert_eq!(ino, 256, "a btrfs volume is a subvolume");
    let (st, tg) = d.mount_rw(&v.volume_id, "b1").await;
    let (written, err) = fill(&tg.join("big"), 256 << 20);
    assert_eq!(err, Some(libc::EDQUOT), "writes stop at the limit");
    assert!(((48 << 20)..=(64 << 20)).contains(&written), "{written}");
    std::fs::write(fs.path("pool/outside"), b"the rest of the pool still takes writes").unwrap();
    let s = stats(&mut d, &v.volume_id, &tg).await;
    assert_eq!(s.usage[0].total, 64 * MIB, "capacity is the qgroup limit, not the pool");
    assert!(s.usage[0].used as u64 >= written, "{} < {written}", s.usage[0].used);
    d.unmount_all(&v.volume_id, &st, &tg).await;
    d.delete(&v.volume_id).await.unwrap();
    assert!(!data.exists());
}

/// A pod may make btrfs subvolumes inside a `dir` volume on a btrfs pool, read-only snapshots among
/// them, whose files no unlink removes: DeleteVolume failed INTERNAL (EROFS) on every retry and the
/// data stayed in the pool's trash for good. They are deleted as subvolumes now, and nothing is left.
#[tokio::test]
async fn a_dir_volume_holding_read_only_subvolumes_is_deleted_whole() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _c) = driver(&[("plain", &fs.path("pool"), "dir", "")]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-nest", 64 * MIB, "plain"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "nest").await;
    cellar::sys::btrfs::create_subvolume(&tg.join("s")).unwrap();
    write_synced(&tg.join("s/f"), b"a pod's file");
    cellar::sys::btrfs::create_subvolume(&tg.join("s/inner")).unwrap();
    std::fs::create_dir(tg.join("deeper")).unwrap();
    cellar::sys::btrfs::snapshot(&tg.join("s"), &tg.join("deeper/ro"), true).unwrap();
    cellar::sys::btrfs::snapshot(&tg.join("s"), &tg.join("ro"), true).unwrap();
    d.unmount_all(&v.volume_id, &st, &tg).await;
    d.delete(&v.volume_id).await.expect("DeleteVolume");
    let left: Vec<_> = ["pool/volumes/pvc-nest", "pool/.trash"]
        .iter()
        .filter_map(|p| std::fs::read_dir(fs.path(p)).ok().map(|d| (p, d.count())))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!fs.path("pool/volumes/pvc-nest").exists());
}

/// A pod makes a btrfs subvolume inside its btrfs volume (no privileges needed): btrfs counts it
/// in a qgroup of its own, outside the volume's limit, and a snapshot of the volume holds it as an
/// empty directory. The volume is reported abnormal, saying so, and a snapshot (or clone) is
/// FAILED_PRECONDITION instead of a copy silently without that data; once it is gone, both work.
#[tokio::test]
async fn a_btrfs_volume_holding_a_nested_subvolume_is_abnormal_and_not_copied_without_it() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _c) = driver(&[("fast", &fs.path("pool"), "btrfs", "")]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-n1", 32 * MIB, "fast"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let condition = |d: &mut Driver| {
        let id = v.volume_id.clone();
        let mut ctl = d.ctl.clone();
        async move {
            ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: id })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
                .volume_condition
                .unwrap()
        }
    };
    let (st, tg) = d.mount_rw(&v.volume_id, "n1").await;
    assert!(!condition(&mut d).await.abnormal);
    cellar::sys::btrfs::create_subvolume(&tg.join("engine")).unwrap();
    write_synced(&tg.join("engine/layer"), &vec![7u8; 4 << 20]);
    let c = condition(&mut d).await;
    assert!(c.abnormal && c.message.contains("nested btrfs subvolume"), "{c:?}");
    let e = d
        .snapshot("snap-n1", &v.volume_id)
        .await
        .expect_err("a snapshot without the nested data");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("nested btrfs subvolume"), "{}", e.message());
    let clone = d
        .ctl
        .create_volume({
            let mut r = req("pvc-n1-clone", 32 * MIB, "fast");
            r.volume_content_source = Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Volume(
                    volume_content_source::VolumeSource {
                        volume_id: v.volume_id.clone(),
                    },
                )),
            });
            r
        })
        .await
        .expect_err("a clone without the nested data");
    assert_eq!(clone.code(), Code::FailedPrecondition, "{}", clone.message());
    assert!(!fs.path("pool/snapshots/snap-n1").exists() && !fs.path("pool/volumes/pvc-n1-clone").exists());
    cellar::sys::btrfs::delete_subvolume(&tg.join("engine")).unwrap();
    assert!(!condition(&mut d).await.abnormal);
    let s = d
        .snapshot("snap-n1", &v.volume_id)
        .await
        .expect("a snapshot once it is gone");
    d.unmount_all(&v.volume_id, &st, &tg).await;
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    d.delete(&v.volume_id).await.unwrap();
}

#[tokio::test]
async fn btrfs_expansion_raises_the_limit_online() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _c) = driver(&[("fast", &fs.path("pool"), "btrfs", "")]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-b2", 32 * MIB, "fast"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "b2").await;
    let (first, err) = fill(&tg.join("a"), 256 << 20);
    assert_eq!(err, Some(libc::EDQUOT));
    let r = expand(&mut d, &v.volume_id, 96 * MIB).await;
    assert_eq!(r.capacity_bytes, 96 * MIB);
    assert!(!r.node_expansion_required, "a qgroup limit needs no node step");
    let (more, err) = fill(&tg.join("b"), 256 << 20);
    assert_eq!(err, Some(libc::EDQUOT));
    assert!(
        more >= 48 << 20,
        "after expansion {more} more bytes fit (first {first})"
    );
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn btrfs_snapshot_restore_and_clone_keep_content() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _c) = driver(&[("fast", &fs.path("pool"), "btrfs", "")]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-b3", 64 * MIB, "fast"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "b3").await;
    std::fs::write(tg.join("f"), b"version 1").unwrap();
    let snap = d.snapshot("snap-b3", &v.volume_id).await.unwrap();
    std::fs::write(tg.join("f"), b"version 2").unwrap();
    let snapdir = fs.path("pool/snapshots/snap-b3");
    assert_eq!(
        std::fs::metadata(&snapdir)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
        256
    );
    assert_eq!(
        std::fs::write(snapdir.join("x"), b"").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    let r = restore(&mut d, "pvc-b3r", 64 * MIB, "fast", snap_src(&snap.snapshot_id)).await;
    let c = restore(&mut d, "pvc-b3c", 64 * MIB, "fast", vol_src(&v.volume_id)).await;
    let (st2, tg2) = d.mount_rw(&r.volume_id, "b3r").await;
    let (st3, tg3) = d.mount_rw(&c.volume_id, "b3c").await;
    assert_eq!(std::fs::read(tg2.join("f")).unwrap(), b"version 1");
    assert_eq!(std::fs::read(tg3.join("f")).unwrap(), b"version 2");
    std::fs::write(tg2.join("f"), b"the restore is writable").unwrap();
    let (_, err) = fill(&tg2.join("big"), 256 << 20);
    assert_eq!(err, Some(libc::EDQUOT), "a restored volume has its own limit");
    for (id, s, t) in [
        (&r.volume_id, &st2, &tg2),
        (&c.volume_id, &st3, &tg3),
        (&v.volume_id, &st, &tg),
    ] {
        d.unmount_all(id, s, t).await;
    }
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!snapdir.exists(), "a read-only snapshot is deleted as a subvolume");
}

#[tokio::test]
async fn btrfs_block_volume_is_invalid_argument() {
    let fs = TestFs::new("btrfs", 256);
    let (mut d, _c) = driver(&[("fast", &fs.path("pool"), "btrfs", "")]).await;
    let r = d.ctl.create_volume(block_req("pvc-bb", 16 * MIB, "fast")).await;
    assert_eq!(code(r), Code::InvalidArgument);
}

#[tokio::test]
async fn btrfs_compression_is_a_mutable_parameter() {
    let fs = TestFs::new("btrfs", 256);
    let other = tempfile::tempdir().unwrap();
    let (mut d, _c) = driver(&[
        ("fast", &fs.path("pool"), "btrfs", ""),
        ("plain", other.path(), "dir", ""),
    ])
    .await;
    let v = d
        .ctl
        .create_volume(req("pvc-z", 16 * MIB, "fast"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let modify = |id: &str, k: &str, val: &str| ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: [(k.to_string(), val.to_string())].into(),
        ..Default::default()
    };
    d.ctl
        .controller_modify_volume(modify(&v.volume_id, "compression", "zstd"))
        .await
        .unwrap();
    let prop = Command::new("btrfs")
        .args([
            "property",
            "get",
            fs.path("pool/volumes/pvc-z").to_str().unwrap(),
            "compression",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&prop.stdout).contains("zstd"), "{:?}", prop);
    let got = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.volume.is_some());
    for (k, val, want) in [
        ("compression", "brotli", Code::InvalidArgument),
        ("colour", "blue", Code::InvalidArgument),
    ] {
        assert_eq!(
            code(d.ctl.controller_modify_volume(modify(&v.volume_id, k, val)).await),
            want
        );
    }
    let empty = ControllerModifyVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(d.ctl.controller_modify_volume(empty).await),
        Code::Ok,
        "no parameters is a no-op"
    );
    let nf = modify("local:node-1:fast:nope", "compression", "zstd");
    assert_eq!(code(d.ctl.controller_modify_volume(nf).await), Code::NotFound);
    // Arguments before existence: bad parameters for a volume that is not there are still bad.
    let bad = modify("local:node-1:fast:nope", "compression", "brotli");
    assert_eq!(code(d.ctl.controller_modify_volume(bad).await), Code::InvalidArgument);
    let dv = d
        .ctl
        .create_volume(req("pvc-plain", 16 * MIB, "plain"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        code(
            d.ctl
                .controller_modify_volume(modify(&dv.volume_id, "compression", "zstd"))
                .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn btrfs_layout_on_a_pool_that_is_not_btrfs_keeps_probe_not_ready() {
    let fs = TestFs::new("ext4", 128);
    let other = tempfile::tempdir().unwrap();
    let (mut d, _c) = driver(&[
        ("fast", &fs.path("pool"), "btrfs", ""),
        ("plain", other.path(), "dir", ""),
    ])
    .await;
    let p = d.id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(p.ready, Some(false));
    let e = d.ctl.create_volume(req("pvc-nb", 16 * MIB, "fast")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("not btrfs"), "{}", e.message());
    assert_eq!(
        code(d.ctl.create_volume(req("pvc-ok", 16 * MIB, "plain")).await),
        Code::Ok,
        "other pools still serve"
    );
}

// ------------------------------------------------------------------ image

const IMAGE_EXT4: &str = "fsType: ext4";
const IMAGE_XFS: &str = "fsType: xfs";

#[tokio::test]
async fn image_ext4_volume_stops_writes_at_capacity_and_grows() {
    let fs = TestFs::new("xfs", 1024);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-i1", 64 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let data = fs.path("pool/volumes/pvc-i1");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 64 << 20);
    let (st, tg) = d.mount_rw(&v.volume_id, "i1").await;
    assert_eq!(
        loops_under(&fs.path("pool")).len(),
        1,
        "one loop device for the staged image"
    );
    let (written, err) = fill(&tg.join("big"), 256 << 20);
    assert_eq!(err, Some(libc::ENOSPC));
    assert!(written < 64 << 20);
    let before = total_bytes(&tg);
    let r = expand(&mut d, &v.volume_id, 128 * MIB).await;
    assert!(r.node_expansion_required);
    // Grown online (OK with the new capacity) where the kernel lets ext4 grow while mounted; else
    // FAILED_PRECONDITION ("Volume in use"), never OK with the old size.
    match node_expand(&mut d, &v.volume_id, &tg, 128 * MIB).await {
        Ok(ne) => assert_eq!(ne.capacity_bytes, 128 * MIB),
        Err(e) => {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("next stage"), "{e:?}");
        }
    }
    // Online or at the next stage: after a restage the filesystem has its new size either way.
    d.unmount_all(&v.volume_id, &st, &tg).await;
    assert!(
        loops_under(&fs.path("pool")).is_empty(),
        "unstage detaches the loop device"
    );
    let (st, tg) = d.mount_rw(&v.volume_id, "i1b").await;
    let after = total_bytes(&tg);
    assert!(after > before + (48 << 20), "{before} -> {after}");
    let (more, _) = fill(&tg.join("more"), 256 << 20);
    assert!(more >= 48 << 20, "{more}");
    let s = stats(&mut d, &v.volume_id, &tg).await;
    assert!(!s.volume_condition.unwrap().abnormal);
    d.unmount_all(&v.volume_id, &st, &tg).await;
    d.delete(&v.volume_id).await.unwrap();
    assert!(!data.exists());
}

/// An image volume holds one filesystem: ValidateVolumeCapabilities does not confirm another, and
/// ControllerExpandVolume with a capability naming another is INVALID_ARGUMENT ("Exceeds
/// capabilities"); its own, or none named, is served.
#[tokio::test]
async fn image_volume_is_not_confirmed_or_grown_as_another_filesystem() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-ifs", 64 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let as_fs = |fs_type: &str| {
        let mut c = rwo();
        if let Some(volume_capability::AccessType::Mount(m)) = c.access_type.as_mut() {
            m.fs_type = fs_type.into();
        }
        c
    };
    for (fs_type, confirmed) in [("xfs", false), ("ext4", true), ("", true)] {
        let r = d
            .ctl
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.clone(),
                volume_capabilities: vec![as_fs(fs_type)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.confirmed.is_some(), confirmed, "{fs_type}: {r:?}");
    }
    let grow = |fs_type: &str, bytes: i64| ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capability: Some(as_fs(fs_type)),
        ..Default::default()
    };
    let err = d.ctl.controller_expand_volume(grow("xfs", 96 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        std::fs::metadata(fs.path("pool/volumes/pvc-ifs")).unwrap().len(),
        64 << 20,
        "not grown"
    );
    let r = d
        .ctl
        .controller_expand_volume(grow("ext4", 96 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 96 * MIB);
    // An image pool has room for Block volumes (a dir pool has none: tests/conformance.rs).
    let cap = d.ctl.get_capacity(GetCapacityRequest {
        volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
        parameters: [("pool".to_string(), "img".to_string())].into(),
        ..Default::default()
    });
    assert!(cap.await.unwrap().into_inner().available_capacity > 0);
    d.delete(&v.volume_id).await.unwrap();
}

#[tokio::test]
async fn image_xfs_volume_grows_online() {
    let fs = TestFs::new("xfs", 2048);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_XFS)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-x1", 320 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "x1").await;
    let before = total_bytes(&tg);
    expand(&mut d, &v.volume_id, 640 * MIB).await;
    let ne = node_expand(&mut d, &v.volume_id, &tg, 640 * MIB).await.unwrap();
    assert_eq!(ne.capacity_bytes, 640 * MIB);
    let after = total_bytes(&tg);
    assert!(
        after > before + (256 << 20),
        "xfs grew while mounted: {before} -> {after}"
    );
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn image_block_volume_is_read_and_written_through_the_device_and_grows() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", "")]).await;
    let bcap = block_cap(Mode::SingleNodeWriter);
    let v = d
        .ctl
        .create_volume(block_req("pvc-blk", 16 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = d.path("blk-staging");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage_as(&v.volume_id, &staging, bcap.clone()).await.unwrap();
    let target = d.path("blk-publish");
    d.publish(&v.volume_id, &staging, &target, bcap.clone(), false)
        .await
        .unwrap();
    use std::os::unix::fs::FileTypeExt;
    let ft = std::fs::metadata(&target).unwrap().file_type();
    assert!(ft.is_block_device(), "the device is bound onto the target file");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let rw = |off: u64| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0u8; pattern.len()];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut back).unwrap();
        back
    };
    assert_eq!(rw(8 << 20), pattern);
    let r = expand(&mut d, &v.volume_id, 32 * MIB).await;
    assert!(r.node_expansion_required);
    let ne = node_expand(&mut d, &v.volume_id, &target, 32 * MIB).await.unwrap();
    assert_eq!(ne.capacity_bytes, 32 * MIB);
    assert_eq!(rw(24 << 20), pattern, "the grown part of the device is usable");
    let s = stats(&mut d, &v.volume_id, &target).await;
    assert_eq!(s.usage[0].total, 32 * MIB);
    let mut again = block_req("pvc-blk", 16 * MIB, "img");
    again.capacity_range.as_mut().unwrap().limit_bytes = 16 * MIB;
    assert_eq!(
        code(d.ctl.create_volume(again).await),
        Code::AlreadyExists,
        "the volume is now above that limit"
    );
    let e = d.node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    });
    assert_eq!(
        code(e.await),
        Code::FailedPrecondition,
        "no detach while the device is published"
    );
    d.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(!target.exists());
    d.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(loops_under(&fs.path("pool")).is_empty());
}

#[tokio::test]
async fn image_snapshot_restore_and_clone_keep_content_with_reflink() {
    let fs = TestFs::new("xfs", 1024);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-is", 64 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "is").await;
    // Snapshots are crash-consistent: what is synced is in them, as after a power cut.
    write_synced(&tg.join("f"), b"at snapshot time");
    let snap = d.snapshot("snap-is", &v.volume_id).await.unwrap();
    write_synced(&tg.join("f"), b"later");
    let r = restore(&mut d, "pvc-isr", 96 * MIB, "img", snap_src(&snap.snapshot_id)).await;
    let c = restore(&mut d, "pvc-isc", 64 * MIB, "img", vol_src(&v.volume_id)).await;
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let (st2, tg2) = d.mount_rw(&r.volume_id, "isr").await;
    let (st3, tg3) = d.mount_rw(&c.volume_id, "isc").await;
    assert_eq!(std::fs::read(tg2.join("f")).unwrap(), b"at snapshot time");
    assert_eq!(std::fs::read(tg3.join("f")).unwrap(), b"later");
    assert!(
        total_bytes(&tg2) > 80 << 20,
        "a restore into a larger volume has the larger filesystem"
    );
    d.unmount_all(&r.volume_id, &st2, &tg2).await;
    d.unmount_all(&c.volume_id, &st3, &tg3).await;
}

#[tokio::test]
async fn image_on_a_pool_without_reflink_copies_sparsely() {
    let fs = TestFs::new("ext4", 1024);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-sp", 256 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let snap = d.snapshot("snap-sp", &v.volume_id).await.unwrap();
    let alloc = |p: PathBuf| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    let src = alloc(fs.path("pool/volumes/pvc-sp"));
    let copy = alloc(fs.path("pool/snapshots/snap-sp"));
    assert_eq!(
        std::fs::metadata(fs.path("pool/snapshots/snap-sp")).unwrap().len(),
        256 << 20
    );
    assert!(
        copy <= src + (1 << 20),
        "holes stay holes: source {src} bytes allocated, copy {copy}"
    );
    let r = restore(&mut d, "pvc-spr", 256 * MIB, "img", snap_src(&snap.snapshot_id)).await;
    let (st, tg) = d.mount_rw(&r.volume_id, "spr").await;
    assert!(
        tg.join("lost+found").is_dir(),
        "the restored image holds the ext4 filesystem"
    );
    d.unmount_all(&r.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn image_capacity_holds_back_what_images_may_still_grow_into() {
    let fs = TestFs::new("xfs", 1024);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let cap = |d: &mut Driver| {
        let mut ctl = d.ctl.clone();
        async move {
            ctl.get_capacity(GetCapacityRequest {
                parameters: [("pool".to_string(), "img".to_string())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .available_capacity
        }
    };
    let before = cap(&mut d).await;
    d.ctl.create_volume(req("pvc-c1", 300 * MIB, "img")).await.unwrap();
    let after = cap(&mut d).await;
    assert!(
        before - after >= 280 * MIB,
        "{before} -> {after}: the new image's unallocated capacity is held back"
    );
    let too_big = d.ctl.create_volume(req("pvc-c2", after + 64 * MIB, "img")).await;
    assert_eq!(code(too_big), Code::ResourceExhausted);
    assert!(!fs.path("pool/volumes/pvc-c2").exists());
    assert_eq!(
        std::fs::read_dir(fs.path("pool/.work")).unwrap().count(),
        0,
        "nothing half-made"
    );
}

#[tokio::test]
async fn image_rejects_filesystems_it_cannot_make() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", "")]).await;
    let mut r = req("pvc-fs", 64 * MIB, "img");
    r.parameters.insert("csi.storage.k8s.io/fstype".into(), "btrfs".into());
    let e = d.ctl.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("ext4 or xfs"), "{}", e.message());
    let mut r = req("pvc-lay", 64 * MIB, "img");
    r.parameters.insert("layout".into(), "btrfs".into());
    let e = d.ctl.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("allowed: image"), "{}", e.message());
}

#[tokio::test]
async fn deleting_a_staged_image_is_failed_precondition() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-ds", 32 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "ds").await;
    assert_eq!(
        code(d.delete(&v.volume_id).await.map(tonic::Response::new)),
        Code::FailedPrecondition
    );
    d.unmount_all(&v.volume_id, &st, &tg).await;
    d.delete(&v.volume_id).await.unwrap();
}

#[tokio::test]
async fn delete_policies_retain_and_archive_keep_the_data() {
    let pool = tempfile::tempdir().unwrap();
    let (mut d, _c) = driver(&[("keep", pool.path(), "dir", "deletePolicy: retain")]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-keep", 16 * MIB, "keep"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    std::fs::write(pool.path().join("volumes/pvc-keep/f"), b"precious").unwrap();
    d.delete(&v.volume_id).await.unwrap();
    assert_eq!(
        std::fs::read(pool.path().join("retained/pvc-keep/f")).unwrap(),
        b"precious"
    );
    assert!(pool.path().join("retained/pvc-keep.json").is_file());
    let l = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(l.entries.is_empty(), "a retained volume is no longer a live volume");
    let mut r = req("pvc-arch", 16 * MIB, "keep");
    r.parameters.insert("deletePolicy".into(), "archive".into());
    let a = d.ctl.create_volume(r).await.unwrap().into_inner().volume.unwrap();
    std::fs::write(pool.path().join("volumes/pvc-arch/f"), b"old").unwrap();
    d.delete(&a.volume_id).await.unwrap();
    let archived: Vec<String> = std::fs::read_dir(pool.path().join("archive"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json"))
        .collect();
    assert_eq!(archived.len(), 1);
    assert!(archived[0].starts_with("pvc-arch-"), "{archived:?}");
    let m = d
        .ctl
        .create_volume(req("pvc-mod", 16 * MIB, "keep"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    d.ctl
        .controller_modify_volume(ControllerModifyVolumeRequest {
            volume_id: m.volume_id.clone(),
            mutable_parameters: [("deletePolicy".to_string(), "delete".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    d.delete(&m.volume_id).await.unwrap();
    assert!(
        !pool.path().join("retained/pvc-mod").exists(),
        "modified to delete: gone"
    );
}

// ------------------------------------------------------------------ crashes and restarts

#[tokio::test]
async fn crash_after_attach_during_stage_leaks_no_loop_device() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-cs", 32 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = d.path("cs-staging");
    std::fs::create_dir_all(&staging).unwrap();
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", "stage:after-attach")]).await;
    assert!(d.stage(&v.volume_id, &staging).await.is_err());
    assert!(!d.wait_exit().success());
    d.spawn(&[]).await;
    d.stage(&v.volume_id, &staging).await.unwrap();
    assert_eq!(
        loops_under(&fs.path("pool")).len(),
        1,
        "the device from before the crash is reused"
    );
    d.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(loops_under(&fs.path("pool")).is_empty());
}

#[tokio::test]
async fn a_restart_finds_loop_devices_again_from_their_files() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-rs", 32 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "rs").await;
    std::fs::write(tg.join("f"), b"kept").unwrap();
    d.kill();
    d.spawn(&[]).await;
    let s = stats(&mut d, &v.volume_id, &tg).await;
    assert!(!s.volume_condition.unwrap().abnormal);
    d.unmount_all(&v.volume_id, &st, &tg).await;
    assert!(loops_under(&fs.path("pool")).is_empty());
}

#[tokio::test]
async fn crash_during_expand_then_retry_converges() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-ce", 32 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", "expand:before-record")]).await;
    let r = d
        .ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    assert!(r.is_err());
    assert!(!d.wait_exit().success());
    d.spawn(&[]).await;
    let r = expand(&mut d, &v.volume_id, 64 * MIB).await;
    assert_eq!(r.capacity_bytes, 64 * MIB);
    assert_eq!(
        std::fs::metadata(fs.path("pool/volumes/pvc-ce")).unwrap().len(),
        64 << 20
    );
    let (st, tg) = d.mount_rw(&v.volume_id, "ce").await;
    assert!(total_bytes(&tg) > 48 << 20, "the filesystem grew at stage");
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn snapshot_freeze_parameter_makes_a_filesystem_consistent_copy_and_is_validated() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let v = d
        .ctl
        .create_volume(req("pvc-fz", 64 * MIB, "img"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = d.mount_rw(&v.volume_id, "fz").await;
    std::fs::write(tg.join("f"), b"frozen").unwrap();
    let snap = |name: &str, freeze: &str| CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: v.volume_id.clone(),
        parameters: [("freeze".to_string(), freeze.to_string())].into(),
        ..Default::default()
    };
    let s = d
        .ctl
        .create_snapshot(snap("snap-fz", "true"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    std::fs::write(tg.join("after"), b"the filesystem is thawed again").unwrap();
    assert_eq!(
        code(d.ctl.create_snapshot(snap("snap-bad", "banana")).await),
        Code::InvalidArgument
    );
    d.unmount_all(&v.volume_id, &st, &tg).await;
    // A frozen copy is clean: e2fsck finds nothing to recover or repair.
    let copy = fs.path("pool/snapshots/snap-fz");
    let out = Command::new("e2fsck").args(["-n", "-f"]).arg(&copy).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let r = restore(&mut d, "pvc-fzr", 64 * MIB, "img", snap_src(&s.snapshot_id)).await;
    let (st2, tg2) = d.mount_rw(&r.volume_id, "fzr").await;
    assert_eq!(std::fs::read(tg2.join("f")).unwrap(), b"frozen");
    d.unmount_all(&r.volume_id, &st2, &tg2).await;
}
