//! Changed block tracking (the CSI SnapshotMetadata service) on a real loop-backed xfs pool with
//! reflink: the ranges GetMetadataDelta reports are checked against a byte-by-byte diff of the two
//! snapshot files (every changed byte inside a reported range, and no more than twice the changed
//! bytes in all), GetMetadataAllocated against the snapshot's non-zero bytes, paging by
//! starting_offset and max_results, and the codes of the spec for bad input.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cellar::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::*;
use common::fs::TestFs;
use common::*;
use tonic::transport::Channel;
use tonic::Code;

const GIB: u64 = 1 << 30;
const BLOCK: u64 = 4096;

/// A driver serving an image pool on xfs (reflink) and a dir pool.
async fn driver(fs: &TestFs) -> (Driver, tempfile::TempDir) {
    let dir_pool = fs.path("dirpool");
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "pools:\n  - name: img\n    path: {}\n    layout: image\n  - name: plain\n    path: {}\n    layout: dir\n",
        fs.path("pool").display(),
        dir_pool.display()
    );
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(&cfg, yaml).expect("config");
    let d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    (d, cfgdir)
}

async fn metadata(d: &Driver) -> SnapshotMetadataClient<Channel> {
    SnapshotMetadataClient::new(cellar::client::connect(&d.endpoint()).await.expect("connect"))
}

async fn volume(d: &mut Driver, name: &str, pool: &str, bytes: u64, block: bool) -> String {
    let mut r = create_req(name, bytes as i64);
    r.parameters.insert("pool".into(), pool.into());
    if block {
        r.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    }
    let v = d.ctl.create_volume(r).await.expect("CreateVolume");
    v.into_inner().volume.expect("volume").volume_id
}

async fn snapshot(d: &mut Driver, name: &str, volume: &str) -> String {
    d.snapshot(name, volume).await.expect("CreateSnapshot").snapshot_id
}

/// A snapshot's file in the image pool (the id ends in its key).
fn snapshot_file(fs: &TestFs, id: &str) -> PathBuf {
    let key = id.rsplit(':').next().expect("key");
    fs.path("pool").join("snapshots").join(key)
}

/// An answer: the messages' ranges in order, checked for the invariants every answer keeps.
struct Answer {
    ranges: Vec<(u64, u64)>,
    messages: usize,
    largest_message: usize,
    capacity: u64,
}

impl Answer {
    fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// Whether `[start, end)` lies inside one reported range (ranges are sorted and apart).
    fn covers(&self, start: u64, end: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.0 <= start);
        i > 0 && {
            let (s, l) = self.ranges[i - 1];
            s <= start && end <= s + l
        }
    }
}

fn answer(parts: Vec<(i32, i64, Vec<BlockMetadata>)>) -> Answer {
    let capacity = parts.first().map(|p| p.1).expect("at least one message");
    let mut ranges = Vec::new();
    let mut largest_message = 0;
    for (style, cap, blocks) in &parts {
        assert_eq!(*style, BlockMetadataType::VariableLength as i32);
        assert_eq!(*cap, capacity, "the capacity is the same in every message");
        largest_message = largest_message.max(blocks.len());
        ranges.extend(blocks.iter().map(|b| (b.byte_offset as u64, b.size_bytes as u64)));
    }
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "ranges in order, apart and merged: {w:?}");
    }
    for r in &ranges {
        assert!(r.1 > 0 && r.0 + r.1 <= capacity as u64, "range {r:?} inside the volume");
    }
    Answer {
        ranges,
        messages: parts.len(),
        largest_message,
        capacity: capacity as u64,
    }
}

/// Asks for the allocated ranges of `target` (no base) or the changes from `base` to it.
async fn ask(
    c: &mut SnapshotMetadataClient<Channel>,
    base: Option<&str>,
    target: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Answer, tonic::Status> {
    let mut parts = Vec::new();
    if let Some(base) = base {
        let req = GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset,
            max_results,
            ..Default::default()
        };
        let mut s = c.get_metadata_delta(req).await?.into_inner();
        while let Some(m) = s.message().await? {
            parts.push((m.block_metadata_type, m.volume_capacity_bytes, m.block_metadata));
        }
    } else {
        let req = GetMetadataAllocatedRequest {
            snapshot_id: target.into(),
            starting_offset,
            max_results,
            ..Default::default()
        };
        let mut s = c.get_metadata_allocated(req).await?.into_inner();
        while let Some(m) = s.message().await? {
            parts.push((m.block_metadata_type, m.volume_capacity_bytes, m.block_metadata));
        }
    }
    Ok(answer(parts))
}

async fn allocated(
    c: &mut SnapshotMetadataClient<Channel>,
    snap: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Answer, tonic::Status> {
    ask(c, None, snap, starting_offset, max_results).await
}

async fn delta(
    c: &mut SnapshotMetadataClient<Channel>,
    base: &str,
    target: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Answer, tonic::Status> {
    ask(c, Some(base), target, starting_offset, max_results).await
}

/// A random number below `n`, from the kernel.
fn below(n: u64) -> u64 {
    let b = random_bytes(8);
    u64::from_le_bytes(b.try_into().expect("8 bytes")) % n
}

/// Random bytes from the kernel: a change never writes what was there by chance.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .expect("/dev/urandom")
        .read_exact(&mut buf)
        .expect("random bytes");
    buf
}

/// Writes random data at block-aligned random places of `dev` until `bytes` are written, in
/// writes of 1 to `max_blocks` blocks; then flushes it.
fn scatter(dev: &Path, size: u64, bytes: u64, max_blocks: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).expect("open device");
    let mut written = 0;
    while written < bytes {
        let len = (1 + below(max_blocks)) * BLOCK;
        let at = below((size - len) / BLOCK) * BLOCK;
        f.write_all_at(&random_bytes(len as usize), at).expect("write");
        written += len;
    }
    f.sync_all().expect("fsync device");
}

/// What a byte-by-byte comparison of two snapshot files found.
#[derive(Default)]
struct Diff {
    changed_bytes: u64,
    /// Per changed block: the first and past-the-last changed byte.
    changed: Vec<(u64, u64)>,
    /// Blocks of the target holding a byte that is not zero.
    nonzero: Vec<u64>,
}

/// One pass over both files, 1 MiB at a time; blocks are compared whole first (memcmp), bytes
/// only in blocks that differ.
fn diff(base: &Path, target: &Path) -> Diff {
    const CHUNK: usize = 1 << 20;
    let (a, b) = (
        std::fs::File::open(base).expect("base"),
        std::fs::File::open(target).expect("target"),
    );
    let len = b.metadata().expect("stat").len();
    let zero = vec![0u8; BLOCK as usize];
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut d = Diff::default();
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        a.read_exact_at(&mut ba[..n], off).expect("read base");
        b.read_exact_at(&mut bb[..n], off).expect("read target");
        for (i, (x, y)) in ba[..n]
            .chunks(BLOCK as usize)
            .zip(bb[..n].chunks(BLOCK as usize))
            .enumerate()
        {
            let at = off + (i as u64) * BLOCK;
            if y != &zero[..y.len()] {
                d.nonzero.push(at);
            }
            if x == y {
                continue;
            }
            let differing: Vec<usize> = (0..x.len()).filter(|&j| x[j] != y[j]).collect();
            d.changed_bytes += differing.len() as u64;
            let (first, last) = (differing[0] as u64, *differing.last().expect("one") as u64);
            d.changed.push((at + first, at + last + 1));
        }
        off += n as u64;
    }
    d
}

/// Stages and publishes a raw block volume; the device file the pod would see.
async fn publish_block(d: &mut Driver, id: &str, name: &str) -> (PathBuf, PathBuf) {
    let cap = block_cap(Mode::SingleNodeWriter);
    let staging = d.path(&format!("{name}-staging"));
    std::fs::create_dir_all(&staging).expect("staging dir");
    d.stage_as(id, &staging, cap.clone()).await.expect("stage");
    let target = d.path(&format!("{name}-device"));
    d.publish(id, &staging, &target, cap, false).await.expect("publish");
    (staging, target)
}

// ------------------------------------------------------------------ the ranges against the data

/// What one round on a raw block volume of `size` bytes in a pool on `fs` found: a quarter of the
/// device written, a snapshot, 1% of it rewritten at random places in writes of 4 to 64 KiB, a second
/// snapshot; the delta and the second snapshot's allocated ranges against the byte-by-byte diff.
/// Every changed byte must be in a reported range and every non-zero block reported allocated.
async fn block_round(fs: &TestFs, size: u64) -> (Answer, Answer, Diff) {
    let (mut d, _cfg) = driver(fs).await;
    let v = volume(&mut d, "pvc-cbt-blk", "img", size, true).await;
    let (staging, device) = publish_block(&mut d, &v, "blk").await;
    scatter(&device, size, size / 4, 256);
    let base = snapshot(&mut d, "snap-cbt-1", &v).await;
    scatter(&device, size, size / 100, 16);
    let target = snapshot(&mut d, "snap-cbt-2", &v).await;
    d.unmount_all(&v, &staging, &device).await;

    let mut c = metadata(&d).await;
    let changes = delta(&mut c, &base, &target, 0, 0).await.expect("GetMetadataDelta");
    let alloc = allocated(&mut c, &target, 0, 0).await.expect("GetMetadataAllocated");
    assert_eq!((changes.capacity, alloc.capacity), (size, size));
    let found = diff(&snapshot_file(fs, &base), &snapshot_file(fs, &target));
    eprintln!(
        "{}: {} bytes changed; {} reported changed in {} ranges; {} reported allocated",
        fs.kind,
        found.changed_bytes,
        changes.total(),
        changes.ranges.len(),
        alloc.total()
    );
    assert!(
        found.changed_bytes > size / 200,
        "the test changed {} bytes",
        found.changed_bytes
    );
    for &(s, e) in &found.changed {
        assert!(changes.covers(s, e), "changed bytes {s}..{e} are in no reported range");
    }
    for &b in &found.nonzero {
        assert!(
            alloc.covers(b, b + BLOCK),
            "non-zero block at {b} is not reported allocated"
        );
    }
    (changes, alloc, found)
}

#[tokio::test]
async fn delta_of_a_block_volume_covers_every_changed_byte_within_twice_the_change() {
    let fs = TestFs::new("xfs", 3072);
    let (changes, alloc, found) = block_round(&fs, GIB).await;
    assert!(
        changes.total() <= 2 * found.changed_bytes,
        "{} bytes reported changed for {} changed bytes",
        changes.total(),
        found.changed_bytes
    );
    // The holes are not reported: about 26% of the volume holds data.
    assert!(alloc.total() < GIB / 3, "{} bytes reported allocated", alloc.total());
}

#[tokio::test]
async fn on_a_btrfs_pool_the_delta_is_as_fine_as_on_xfs() {
    let fs = TestFs::new("btrfs", 1024);
    let (changes, _, found) = block_round(&fs, 256 * MIB as u64).await;
    assert!(
        changes.total() <= 2 * found.changed_bytes,
        "{} bytes reported changed for {} changed bytes",
        changes.total(),
        found.changed_bytes
    );
}

#[tokio::test]
async fn on_a_pool_without_reflink_the_delta_is_every_data_range() {
    // ext4 has no reflink: snapshots are sparse copies sharing nothing, so nothing can be told
    // unchanged; the delta is still correct, every data range of either snapshot.
    let fs = TestFs::new("ext4", 1024);
    let (changes, alloc, _) = block_round(&fs, 256 * MIB as u64).await;
    assert!(
        changes.total() >= alloc.total(),
        "{} < {}",
        changes.total(),
        alloc.total()
    );
}

#[tokio::test]
async fn delta_of_a_filesystem_image_covers_every_changed_byte() {
    let fs = TestFs::new("xfs", 2048);
    let (mut d, _cfg) = driver(&fs).await;
    let v = volume(&mut d, "pvc-cbt-fs", "img", GIB, false).await;
    let (staging, target_dir) = d.mount_rw(&v, "fs").await;
    let file = target_dir.join("data");
    let size = 128 << 20;
    std::fs::write(&file, random_bytes(size as usize)).expect("write file");
    std::fs::File::open(&file).expect("open").sync_all().expect("fsync");
    let base = snapshot(&mut d, "snap-fs-1", &v).await;
    scatter(&file, size, size / 100, 16);
    let target = snapshot(&mut d, "snap-fs-2", &v).await;
    d.unmount_all(&v, &staging, &target_dir).await;

    let mut c = metadata(&d).await;
    let changes = delta(&mut c, &base, &target, 0, 0).await.expect("GetMetadataDelta");
    let found = diff(&snapshot_file(&fs, &base), &snapshot_file(&fs, &target));
    assert!(found.changed_bytes > size / 200);
    for &(s, e) in &found.changed {
        assert!(changes.covers(s, e), "changed bytes {s}..{e} are in no reported range");
    }
    // The file's blocks that changed, and the filesystem's own writes (journal, inode), no more.
    assert!(changes.total() < GIB / 20, "{} bytes reported changed", changes.total());
}

// ------------------------------------------------------------------ paging

/// A 64 MiB raw block volume with data in 16 places and two snapshots, two of its places rewritten
/// between them.
async fn small_pair(d: &mut Driver, name: &str) -> (String, String, String) {
    let v = volume(d, name, "img", 64 * MIB as u64, true).await;
    let (staging, device) = publish_block(d, &v, name).await;
    let f = std::fs::OpenOptions::new().write(true).open(&device).expect("device");
    for i in 0..16u64 {
        f.write_all_at(&random_bytes(64 << 10), i * (4 << 20)).expect("write");
    }
    f.sync_all().expect("fsync");
    let base = snapshot(d, &format!("{name}-a"), &v).await;
    for i in [3u64, 9] {
        f.write_all_at(&random_bytes(8 << 10), i * (4 << 20) + (16 << 10))
            .expect("write");
    }
    f.sync_all().expect("fsync");
    drop(f);
    let target = snapshot(d, &format!("{name}-b"), &v).await;
    d.unmount_all(&v, &staging, &device).await;
    (v, base, target)
}

#[tokio::test]
async fn max_results_bounds_every_message_and_starting_offset_resumes() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _cfg) = driver(&fs).await;
    let (_, base, target) = small_pair(&mut d, "pvc-page").await;
    let mut c = metadata(&d).await;

    let whole = allocated(&mut c, &target, 0, 0).await.expect("allocated");
    assert_eq!(whole.ranges.len(), 16, "{:?}", whole.ranges);
    let paged = allocated(&mut c, &target, 0, 3).await.expect("allocated");
    assert_eq!(paged.largest_message, 3);
    assert_eq!(paged.messages, 6);
    assert_eq!(paged.ranges, whole.ranges);

    // Resuming inside the fifth range: it is cut there, and the rest follows as before.
    let from = whole.ranges[4].0 + BLOCK;
    let resumed = allocated(&mut c, &target, from as i64, 0).await.expect("allocated");
    let mut expected = vec![(from, whole.ranges[4].1 - BLOCK)];
    expected.extend(&whole.ranges[5..]);
    assert_eq!(resumed.ranges, expected);

    let changed = delta(&mut c, &base, &target, 0, 1).await.expect("delta");
    assert_eq!(changed.messages, 2);
    let places: Vec<u64> = changed.ranges.iter().map(|r| r.0 / (4 << 20)).collect();
    assert_eq!(places, [3, 9]);
    let later = delta(&mut c, &base, &target, (13 << 20) as i64, 0)
        .await
        .expect("delta");
    assert_eq!(later.ranges, changed.ranges[1..]);
    // Past every change: one empty message, still telling the capacity.
    let none = delta(&mut c, &base, &target, (60 << 20) as i64, 0)
        .await
        .expect("delta");
    assert_eq!((none.messages, none.ranges.len(), none.capacity), (1, 0, 64 << 20));
}

/// `cellar csi blocks`: the same ranges as the service, as JSON for scripts or a table for people.
#[tokio::test]
async fn the_cli_lists_allocated_and_changed_blocks() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _cfg) = driver(&fs).await;
    let (_, base, target) = small_pair(&mut d, "pvc-cli").await;
    let mut c = metadata(&d).await;
    let want = delta(&mut c, &base, &target, 0, 0).await.expect("delta").ranges;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(["csi", "--endpoint", &d.endpoint(), "blocks"])
            .args(args)
            .output()
            .expect("run cellar csi blocks");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let json: serde_json::Value =
        serde_json::from_str(&cli(&[&target, "--base", &base, "--max-results", "1", "-o", "json"])).expect("JSON");
    assert_eq!(json["volume_capacity_bytes"], 64 * MIB);
    let got: Vec<(u64, u64)> = json["block_metadata"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            (
                r["byte_offset"].as_u64().expect("offset"),
                r["size_bytes"].as_u64().expect("size"),
            )
        })
        .collect();
    assert_eq!(got, want);
    let table = cli(&[&target]);
    assert!(table.starts_with("OFFSET"), "{table}");
    assert!(table.contains("16 ranges, 1 MiB of a 64 MiB volume"), "{table}");
}

// ------------------------------------------------------------------ bad input

#[tokio::test]
async fn unknown_snapshots_are_not_found_and_missing_ones_invalid_argument() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _cfg) = driver(&fs).await;
    let (_, base, _) = small_pair(&mut d, "pvc-nf").await;
    let mut c = metadata(&d).await;
    for unknown in [
        "snap:local:node-1:img:nobody",
        "snap:local:other-node:img:nobody",
        "snap:shared:img:nobody",
        "snap:local:node-1:plain:nobody",
        "local:node-1:img:nobody",
        "not an id",
        "snap:local:node-1:img:../../etc",
    ] {
        let a = allocated(&mut c, unknown, 0, 0).await.err().map(|s| s.code());
        assert_eq!(a, Some(Code::NotFound), "allocated {unknown}");
        let t = delta(&mut c, &base, unknown, 0, 0).await.err().map(|s| s.code());
        assert_eq!(t, Some(Code::NotFound), "delta to {unknown}");
        let b = delta(&mut c, unknown, &base, 0, 0).await.err().map(|s| s.code());
        assert_eq!(b, Some(Code::NotFound), "delta from {unknown}");
    }
    let missing = [
        allocated(&mut c, "", 0, 0).await.err(),
        delta(&mut c, "", &base, 0, 0).await.err(),
        delta(&mut c, &base, "", 0, 0).await.err(),
    ];
    for m in missing {
        assert_eq!(m.map(|s| s.code()), Some(Code::InvalidArgument));
    }
}

#[tokio::test]
async fn a_delta_between_snapshots_of_different_volumes_is_invalid_argument() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _cfg) = driver(&fs).await;
    let (_, a, _) = small_pair(&mut d, "pvc-one").await;
    let (_, _, b) = small_pair(&mut d, "pvc-two").await;
    let mut c = metadata(&d).await;
    let r = delta(&mut c, &a, &b, 0, 0).await.err().expect("refused");
    assert_eq!(r.code(), Code::InvalidArgument);
    assert!(
        r.message().contains("pvc-one") && r.message().contains("pvc-two"),
        "{}",
        r.message()
    );
}

#[tokio::test]
async fn offsets_past_the_end_are_out_of_range_and_negative_values_invalid_argument() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _cfg) = driver(&fs).await;
    let (_, base, target) = small_pair(&mut d, "pvc-off").await;
    let mut c = metadata(&d).await;
    let end = 64 * MIB;
    let code_of = |r: Result<Answer, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code_of(allocated(&mut c, &target, end, 0).await),
        Some(Code::OutOfRange)
    );
    assert_eq!(
        code_of(delta(&mut c, &base, &target, end + 1, 0).await),
        Some(Code::OutOfRange)
    );
    assert_eq!(
        code_of(allocated(&mut c, &target, -1, 0).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code_of(delta(&mut c, &base, &target, -4096, 0).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code_of(allocated(&mut c, &target, 0, -1).await),
        Some(Code::InvalidArgument)
    );
    // The last byte is a valid start.
    assert!(allocated(&mut c, &target, end - 1, 0).await.is_ok());
}

#[tokio::test]
async fn snapshots_of_dir_volumes_are_failed_precondition() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _cfg) = driver(&fs).await;
    let v = volume(&mut d, "pvc-dir", "plain", 64 * MIB as u64, false).await;
    let a = snapshot(&mut d, "snap-dir-1", &v).await;
    let b = snapshot(&mut d, "snap-dir-2", &v).await;
    let mut c = metadata(&d).await;
    let r = allocated(&mut c, &a, 0, 0).await.err().expect("refused");
    assert_eq!(r.code(), Code::FailedPrecondition);
    assert!(r.message().contains("image volumes only"), "{}", r.message());
    let r = delta(&mut c, &a, &b, 0, 0).await.err().expect("refused");
    assert_eq!(r.code(), Code::FailedPrecondition);
}

/// A backup's handle names a snapshot that exists (in its repository): FAILED_PRECONDITION (back
/// it up in full), not NOT_FOUND ("re-check that it exists").
#[tokio::test]
async fn a_backups_handle_is_failed_precondition_not_not_found() {
    let fs = TestFs::new("xfs", 512);
    let (mut d, _cfg) = driver(&fs).await;
    let (_, base, _) = small_pair(&mut d, "pvc-bk").await;
    let mut c = metadata(&d).await;
    let backup = "backup:offsite:0a1b2c3d-0000-4000-8000-000000000001";
    let answers = [
        allocated(&mut c, backup, 0, 0).await.err(),
        delta(&mut c, &base, backup, 0, 0).await.err(),
        delta(&mut c, backup, &base, 0, 0).await.err(),
    ];
    for r in answers {
        let r = r.expect("refused");
        assert_eq!(r.code(), Code::FailedPrecondition, "{}", r.message());
        assert!(r.message().contains("is a backup"), "{}", r.message());
    }
}

// ------------------------------------------------------------------ the capability

#[tokio::test]
async fn the_service_is_advertised_as_a_plugin_capability() {
    use plugin_capability::service;
    let metadata_service = Some(plugin_capability::Type::Service(plugin_capability::Service {
        r#type: service::Type::SnapshotMetadataService as i32,
    }));
    let mut d = Driver::start().await;
    let caps = d.id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await;
    let caps = caps.expect("GetPluginCapabilities").into_inner().capabilities;
    assert!(caps.iter().any(|c| c.r#type == metadata_service), "{caps:?}");
}
