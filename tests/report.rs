//! `cellar report`, run on the node as an operator would: it finds a planted orphan of every kind,
//! changes nothing without --fix, and `--fix` removes exactly what it listed, whether the driver runs
//! or not, while the real volumes and their data keep working.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cellar::csi::v1::*;
use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A loop device the test attached; detached on drop, also when the test fails.
struct LoopGuard(String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if attached(&self.0).is_some() {
            let _ = Command::new("losetup").args(["--detach", &self.0]).status();
        }
    }
}

/// The backing file of a loop device, while it is attached.
fn attached(dev: &str) -> Option<String> {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()
}

/// A mount the test made; lazily unmounted on drop when still there.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if mounts_under(&self.0).contains(&self.0) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// What a node looks like in use: a volume staged and published at kubelet's paths (with data), a
/// second volume, and a snapshot.
struct Scene {
    live: String,
    kubelet: PathBuf,
    staging: PathBuf,
    target: PathBuf,
}

async fn scene(d: &mut Driver) -> Scene {
    let kubelet = d.path("kubelet");
    let live = d.create("pvc-live").await.volume_id;
    d.create("pvc-gone").await;
    d.snapshot("snap-live", &live).await.expect("snapshot");
    let hash = hex::encode(Sha256::digest(live.as_bytes()));
    let staging = kubelet.join(format!("plugins/kubernetes.io/csi/cellar.csi.dev/{hash}/globalmount"));
    let target = kubelet.join("pods/pod-1/volumes/kubernetes.io~csi/pv-live/mount");
    std::fs::create_dir_all(&staging).expect("staging dir");
    std::fs::create_dir_all(target.parent().expect("parent")).expect("pod dir");
    d.stage(&live, &staging).await.expect("stage");
    d.publish(&live, &staging, &target, rwo(), false)
        .await
        .expect("publish");
    std::fs::write(target.join("greeting"), b"hello").expect("write through the pod's mount");
    Scene {
        live,
        kubelet,
        staging,
        target,
    }
}

/// One orphan of every kind, planted as a crash or a careless hand would leave it.
struct Planted {
    /// (kind, path) of every finding the report must list.
    expected: BTreeSet<(String, PathBuf)>,
    /// Pool entries `--fix` must remove, and nothing else.
    entries: Vec<PathBuf>,
    stray_mount: PathBuf,
    loop_dev: String,
    _loop: LoopGuard,
    _mount: MountGuard,
}

fn plant(d: &Driver, s: &Scene) -> Planted {
    let pool = d.pool_dir();
    let orphan_dir = pool.join("volumes/orphan-dir");
    std::fs::create_dir(&orphan_dir).expect("plant orphan dir");
    std::fs::write(orphan_dir.join("data"), b"left behind").expect("plant orphan data");
    let orphan_file = pool.join("volumes/orphan-file");
    std::fs::write(&orphan_file, vec![0u8; 4096]).expect("plant orphan file");
    let orphan_snap = pool.join("snapshots/orphan-snap");
    std::fs::create_dir(&orphan_snap).expect("plant orphan snapshot");
    std::fs::remove_dir_all(pool.join("volumes/pvc-gone")).expect("remove a volume's data");
    let backing = pool.join("volumes/loop-backing");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(1 << 20))
        .expect("plant a backing file");
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .expect("losetup (util-linux) is needed by this test");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let loop_guard = LoopGuard(loop_dev.clone());
    let stray_mount = s.kubelet.join("pods/pod-2/volumes/kubernetes.io~csi/pv-stray/mount");
    std::fs::create_dir_all(&stray_mount).expect("stray mount point");
    nix::mount::mount(
        Some(&pool.join("volumes/pvc-live")),
        &stray_mount,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount");
    let mount_guard = MountGuard(stray_mount.clone());
    let work = pool.join(".work/volumes-half");
    std::fs::create_dir(&work).expect("plant .work leftover");
    std::fs::write(work.join("part"), b"half a copy").expect("plant .work data");
    let trash = pool.join(".trash/pvc-old-0123");
    std::fs::create_dir(&trash).expect("plant .trash leftover");
    let record = pool.join("volumes/pvc-gone.json");

    let e = |kind: &str, p: &Path| (kind.to_string(), p.to_path_buf());
    Planted {
        expected: BTreeSet::from([
            e("orphan-directory", &orphan_dir),
            e("orphan-file", &orphan_file),
            e("orphan-file", &backing),
            e("orphan-directory", &orphan_snap),
            e("record-without-data", &record),
            e("stray-loop-device", Path::new(&loop_dev)),
            e("stray-mount", &stray_mount),
            e("work-leftover", &work),
            e("trash-leftover", &trash),
        ]),
        entries: vec![orphan_dir, orphan_file, backing, orphan_snap, record, work, trash],
        stray_mount,
        loop_dev,
        _loop: loop_guard,
        _mount: mount_guard,
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

fn report(d: &Driver, args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(bin())
        .arg("report")
        .arg("--data-dir")
        .arg(d.data_dir())
        .arg("--kubelet-dir")
        .arg(d.path("kubelet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cellar report");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("answer");
    let out = child.wait_with_output().expect("report output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn findings(v: &Value) -> BTreeSet<(String, PathBuf)> {
    v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().expect("kind").to_string(),
                PathBuf::from(f["path"].as_str().expect("path")),
            )
        })
        .collect()
}

/// Every entry under a directory, never following a link.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        if std::fs::symlink_metadata(&p).expect("lstat").is_dir() {
            for e in std::fs::read_dir(&p).expect("readdir") {
                stack.push(e.expect("entry").path());
            }
        }
        out.insert(p);
    }
    out
}

/// Restarts the driver if needed and takes the live volume down the way kubelet would.
async fn finish(d: &mut Driver, s: &Scene, restart: bool) {
    if restart {
        d.spawn(&[]).await;
    }
    d.unmount_all(&s.live, &s.staging, &s.target).await;
}

#[tokio::test]
async fn report_lists_a_planted_orphan_of_every_kind_and_changes_nothing() {
    let mut d = Driver::start().await;
    let s = scene(&mut d).await;
    d.kill();
    let p = plant(&d, &s);
    let before = tree(&d.pool_dir());

    let r = report(&d, &["--json"], "");
    assert_eq!(r.code, 2, "findings are exit code 2: {}", r.stderr);
    let v = r.json();
    assert_eq!(findings(&v), p.expected);
    assert_eq!(v["driver_running"], false);
    assert_eq!(tree(&d.pool_dir()), before, "a report without --fix changed the pool");
    assert!(mounts_under(&p.stray_mount).contains(&p.stray_mount));
    assert!(attached(&p.loop_dev).is_some());
    drop(p);
    finish(&mut d, &s, true).await;
}

#[tokio::test]
async fn report_shows_volumes_snapshots_and_findings_in_tables() {
    let mut d = Driver::start().await;
    let s = scene(&mut d).await;
    d.kill();
    let p = plant(&d, &s);

    let r = report(&d, &[], "");
    assert_eq!(r.code, 2, "{}", r.stderr);
    let pool_line = format!("pool default ({}): 2 volume(s), 1 snapshot(s)", d.pool_dir().display());
    assert!(r.stdout.contains(&pool_line), "{}", r.stdout);
    assert!(r.stdout.contains("findings: 9\n"), "{}", r.stdout);
    for (kind, path) in &p.expected {
        let row = r
            .stdout
            .lines()
            .find(|l| l.contains(&format!(" {} ", path.display())))
            .unwrap_or_else(|| panic!("no row for {}:\n{}", path.display(), r.stdout));
        assert!(row.trim_start().starts_with(kind.as_str()), "{row}");
    }
    drop(p);
    finish(&mut d, &s, true).await;
}

#[tokio::test]
async fn fix_yes_removes_exactly_the_orphans_and_the_volumes_keep_working() {
    let mut d = Driver::start().await;
    let s = scene(&mut d).await;
    d.kill();
    let p = plant(&d, &s);
    let before = tree(&d.pool_dir());

    let r = report(&d, &["--fix", "--yes", "--json"], "");
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let fixed = r.json()["fix"].as_array().expect("fix results").clone();
    assert_eq!(fixed.len(), 9, "{fixed:?}");
    assert!(fixed.iter().all(|f| f["outcome"] == "done"), "{fixed:?}");

    let gone: BTreeSet<PathBuf> = before
        .iter()
        .filter(|q| p.entries.iter().any(|e| q.starts_with(e)))
        .cloned()
        .collect();
    let expected: BTreeSet<PathBuf> = before.difference(&gone).cloned().collect();
    assert_eq!(
        tree(&d.pool_dir()),
        expected,
        "--fix removed more or less than it listed"
    );
    assert_eq!(attached(&p.loop_dev), None, "the stray loop device is still attached");
    assert_eq!(
        mounts_under(&s.kubelet).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([s.staging.clone(), s.target.clone()]),
        "only the stray mount is gone"
    );
    let again = report(&d, &["--json"], "");
    assert_eq!((again.code, findings(&again.json()).len()), (0, 0), "{}", again.stdout);

    d.spawn(&[]).await;
    assert_eq!(std::fs::read(s.target.join("greeting")).unwrap(), b"hello");
    let stats = d
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: s.live.clone(),
            volume_path: s.target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));
    finish(&mut d, &s, false).await;
    d.delete(&s.live).await.expect("delete the live volume");
}

/// A reader that closed the pipe (`cellar report --fix --yes | head -1`) wanted no more output:
/// the report used to fail (exit 1) at its first write, before the fix it was asked for. It now
/// goes on, fixes, and its exit code says what is left.
#[tokio::test]
async fn a_closed_output_pipe_neither_fails_the_report_nor_stops_its_fix() {
    let mut d = Driver::start().await;
    let s = scene(&mut d).await;
    d.kill();
    let p = plant(&d, &s);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let status = Command::new(bin())
        .arg("report")
        .arg("--data-dir")
        .arg(d.data_dir())
        .arg("--kubelet-dir")
        .arg(d.path("kubelet"))
        .args(["--fix", "--yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run cellar report");
    assert_eq!(
        status.status.code(),
        Some(0),
        "every finding fixed, though nothing could be shown: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let again = report(&d, &["--json"], "");
    assert_eq!((again.code, findings(&again.json()).len()), (0, 0), "{}", again.stdout);
    drop(p);
    d.spawn(&[]).await;
    finish(&mut d, &s, false).await;
    d.delete(&s.live).await.expect("delete the live volume");
}

#[tokio::test]
async fn fix_asks_first_and_an_answer_other_than_yes_changes_nothing() {
    let mut d = Driver::start().await;
    d.create("pvc-kept").await;
    d.kill();
    let orphan = d.pool_dir().join("volumes/orphan-asked");
    std::fs::create_dir(&orphan).unwrap();

    let r = report(&d, &["--fix"], "n\n");
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("[y/N]"), "{}", r.stderr);
    assert!(orphan.is_dir(), "removed without a yes");
}

#[tokio::test]
async fn while_the_driver_runs_fix_leaves_work_trash_and_records_to_it() {
    let mut d = Driver::start().await;
    d.create("pvc-gone").await;
    let pool = d.pool_dir();
    std::fs::remove_dir(pool.join("volumes/pvc-gone")).unwrap();
    let work = pool.join(".work/volumes-busy");
    std::fs::create_dir(&work).unwrap();
    let trash = pool.join(".trash/pvc-busy-0123");
    std::fs::create_dir(&trash).unwrap();

    let r = report(&d, &["--fix", "--yes", "--json", "--min-age", "0"], "");
    assert_eq!(r.code, 2, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["driver_running"], true);
    let kept: Vec<&str> = v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kept"].is_string())
        .map(|f| f["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kept, ["record-without-data", "work-leftover", "trash-leftover"]);
    assert!(pool.join("volumes/pvc-gone.json").is_file() && work.is_dir() && trash.is_dir());
}

#[tokio::test]
async fn while_the_driver_runs_an_orphan_is_kept_until_it_is_older_than_min_age() {
    let d = Driver::start().await;
    let orphan = d.pool_dir().join("volumes/orphan-young");
    std::fs::create_dir(&orphan).unwrap();

    let young = report(&d, &["--fix", "--yes", "--json"], "");
    assert_eq!(young.code, 2, "{}", young.stderr);
    assert!(
        orphan.is_dir(),
        "an entry changed moments ago was removed while the driver runs"
    );

    let old_enough = report(&d, &["--fix", "--yes", "--json", "--min-age", "0"], "");
    assert_eq!(old_enough.code, 0, "{}", old_enough.stdout);
    assert!(!orphan.exists());
}

#[tokio::test]
async fn a_second_driver_on_the_same_data_dir_refuses_to_start() {
    let d = Driver::start().await;
    let out = Command::new(bin())
        .args(["all-in-one", "--node-id", NODE, "--endpoint"])
        .arg(format!("unix://{}", d.path("second.sock").display()))
        .arg("--data-dir")
        .arg(d.data_dir())
        .output()
        .expect("run a second driver");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another cellar process"), "{err}");
}

#[tokio::test]
async fn fix_removes_a_planted_symlink_and_never_what_it_points_to() {
    let mut d = Driver::start().await;
    d.create("pvc-kept").await;
    d.kill();
    let outside = d.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"not the pool's").unwrap();
    let link = d.pool_dir().join("volumes/evil");
    std::os::unix::fs::symlink(&outside, &link).unwrap();

    let r = report(&d, &["--fix", "--yes", "--json"], "");
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(
        findings(&r.json()),
        BTreeSet::from([("orphan-symlink".to_string(), link.clone())])
    );
    assert!(std::fs::symlink_metadata(&link).is_err(), "the symlink is still there");
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"not the pool's");
}

/// A node state file the driver cannot read keeps its volume from deletes and node calls until an
/// operator repairs or removes it, and one set aside after a reboot waits for the operator too:
/// both are listed, naming the file and what to do, and `--fix` touches neither. The volume's
/// mounts, which no readable state explains any more, are listed as stray but kept: a pod may be
/// using them (`--fix` unmounted them from under it).
#[tokio::test]
async fn unreadable_node_state_files_are_listed_and_their_volumes_mounts_are_kept() {
    let mut d = Driver::start().await;
    let s = scene(&mut d).await;
    d.kill();
    let node = d.data_dir().join("node");
    let hash = hex::encode(Sha256::digest(s.live.as_bytes()));
    let file = node.join(format!("{}.json", &hash[..32]));
    let good = std::fs::read(&file).expect("the live volume's state");
    std::fs::write(&file, &good[..good.len() / 2]).expect("tear it");
    let aside = node.join("0123456789abcdef0123456789abcdef.json.unreadable");
    std::fs::write(&aside, b"{\"volume_id\":").expect("a file set aside after a reboot");

    let r = report(&d, &["--json"], "");
    assert_eq!(r.code, 2, "{}", r.stderr);
    let v = r.json();
    let e = |kind: &str, p: &Path| (kind.to_string(), p.to_path_buf());
    assert_eq!(
        findings(&v),
        BTreeSet::from([
            e("unreadable-node-state", &file),
            e("set-aside-node-state", &aside),
            e("stray-mount", &s.staging),
            e("stray-mount", &s.target),
        ])
    );
    for f in v["findings"].as_array().expect("findings") {
        let (kind, detail) = (f["kind"].as_str().expect("kind"), f["detail"].as_str().expect("detail"));
        match kind {
            "unreadable-node-state" => assert!(
                detail.contains("remove the file, or repair it") && detail.contains("docs/design.md"),
                "{detail}"
            ),
            "set-aside-node-state" => assert!(detail.contains("then remove it"), "{detail}"),
            _ => assert!(
                f["kept"]
                    .as_str()
                    .is_some_and(|k| k.contains(&file.display().to_string())),
                "a mount of the volume whose state cannot be read, not kept: {f}"
            ),
        }
        if kind != "stray-mount" {
            assert_eq!(f["action"], "none", "{f}");
        }
    }

    let r = report(&d, &["--fix", "--yes", "--json"], "");
    assert_eq!(r.code, 2, "findings remain: {}\n{}", r.stdout, r.stderr);
    assert_eq!(
        mounts_under(&s.kubelet).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([s.staging.clone(), s.target.clone()]),
        "--fix unmounted a volume a pod may be using"
    );
    assert_eq!(
        std::fs::read(s.target.join("greeting")).expect("the pod's data"),
        b"hello"
    );
    assert_eq!(std::fs::read(&file).expect("kept"), &good[..good.len() / 2]);
    assert!(aside.exists(), "kept");

    std::fs::write(&file, &good).expect("repair");
    std::fs::remove_file(&aside).expect("remove");
    finish(&mut d, &s, true).await;
}

/// `--fix` removes only from the pool this node opened: a directory in the pool's place that lacks
/// its mark (the disk not mounted, and the mount point holding someone's files) or holds another
/// disk's mark had its "orphans" removed, as the driver's own start no longer would.
#[tokio::test]
async fn fix_removes_nothing_from_a_directory_that_is_not_the_pool_this_node_opened() {
    let mut d = Driver::start().await;
    let kept = d.create("pvc-kept").await.volume_id;
    d.kill();
    let pool = d.pool_dir();
    let away = d.path("pool-away");
    let kept_as = |r: &Run, path: &Path, why: &str| {
        assert_eq!(r.code, 2, "findings remain: {}\n{}", r.stdout, r.stderr);
        let v = r.json();
        let f = v["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .find(|f| f["path"].as_str() == Some(path.to_str().expect("utf-8")))
            .unwrap_or_else(|| panic!("{} is not listed: {}", path.display(), r.stdout))
            .clone();
        let kept = f["kept"].as_str().unwrap_or_else(|| panic!("not kept: {f}"));
        assert!(kept.contains(why), "{kept}");
        assert!(kept.contains("--fix removes nothing there"), "{kept}");
    };

    // The disk is not mounted: its mount point holds a user's files in a `volumes` directory.
    std::fs::rename(&pool, &away).expect("move the pool away");
    std::fs::create_dir_all(pool.join("volumes/photos")).expect("a user's directory");
    std::fs::write(pool.join("volumes/photos/cat.jpg"), b"a user's photo").expect("a user's file");
    // And a mount of it at a kubelet path, which no node state explains.
    let shown = d.path("kubelet/pods/pod-9/volumes/kubernetes.io~csi/pv-photos/mount");
    std::fs::create_dir_all(&shown).expect("mount point");
    nix::mount::mount(
        Some(&pool.join("volumes/photos")),
        &shown,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount");
    let guard = MountGuard(shown.clone());
    let r = report(&d, &["--fix", "--yes", "--json"], "");
    kept_as(&r, &pool.join("volumes/photos"), "lacks pool 'default''s mark");
    kept_as(&r, &shown, "lacks pool 'default''s mark");
    assert!(
        mounts_under(&shown).contains(&shown),
        "unmounted from another program's directory"
    );
    drop(guard);
    assert_eq!(
        std::fs::read(pool.join("volumes/photos/cat.jpg")).expect("the user's file"),
        b"a user's photo"
    );
    std::fs::remove_dir_all(&pool).expect("clear the mount point");
    std::fs::rename(&away, &pool).expect("mount the disk again");

    // Another disk with this pool's name: its mark holds another id.
    let mark = pool.join(".cellar-pool");
    let ours = std::fs::read(&mark).expect("the pool's mark");
    let mut other: Value = serde_json::from_slice(&ours).expect("mark JSON");
    other["id"] = Value::from("0123456789abcdef0123456789abcdef");
    std::fs::write(&mark, serde_json::to_vec(&other).expect("JSON")).expect("another disk's mark");
    let orphan = pool.join("volumes/orphan-dir");
    std::fs::create_dir(&orphan).expect("an orphan");
    let r = report(&d, &["--fix", "--yes", "--json"], "");
    kept_as(&r, &orphan, "another disk is mounted there");
    assert!(orphan.is_dir(), "removed from another disk");

    // The pool's own disk: the same orphan goes.
    std::fs::write(&mark, &ours).expect("the pool's mark back");
    let r = report(&d, &["--fix", "--yes", "--json"], "");
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(!orphan.exists(), "an orphan of the pool itself is removed");
    d.spawn(&[]).await;
    d.delete(&kept).await.expect("the pool opens and serves its volume");
}
