//! `cellar csi`: the operator's client, driven as an operator would from a shell.

mod common;

use std::process::Command;

use common::*;

fn csi(d: &Driver, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .arg("csi")
        .arg("--endpoint")
        .arg(d.endpoint())
        .args(args)
        .output()
        .expect("run cellar csi");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn csi_client_walks_a_volume_through_its_life() {
    let d = Driver::start().await;
    let (ok, info) = csi(&d, &["info"]);
    assert!(ok && info.contains("cellar.csi.dev"), "{info}");
    let (ok, out) = csi(&d, &["create", "pvc-cli", "--size", "64M"]);
    assert!(ok && out.contains("local:node-1:default:pvc-cli"), "{out}");
    let id = "local:node-1:default:pvc-cli";
    let (ok, out) = csi(&d, &["list"]);
    assert!(ok && out.contains(id) && out.contains("67108864"), "{out}");
    let staging = d.path("cli-staging");
    let target = d.path("cli-target");
    std::fs::create_dir_all(&staging).unwrap();
    assert!(csi(&d, &["stage", id, staging.to_str().unwrap()]).0);
    let (ok, out) = csi(
        &d,
        &[
            "publish",
            id,
            "--staging-path",
            staging.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    std::fs::write(target.join("f"), b"x").unwrap();
    let (ok, out) = csi(&d, &["stats", id, target.to_str().unwrap()]);
    assert!(ok && out.contains("Bytes"), "{out}");
    let (ok, out) = csi(&d, &["snapshot", "snap-cli", id]);
    assert!(ok && out.contains("snap:local:node-1:default:snap-cli"), "{out}");
    let (ok, out) = csi(&d, &["snapshots"]);
    assert!(ok && out.contains("snap-cli"), "{out}");
    let (ok, out) = csi(&d, &["expand", id, "128M", "--path", target.to_str().unwrap()]);
    assert!(ok && out.contains("134217728"), "{out}");
    assert!(csi(&d, &["unpublish", id, target.to_str().unwrap()]).0);
    assert!(csi(&d, &["unstage", id, staging.to_str().unwrap()]).0);
    assert!(csi(&d, &["delete-snapshot", "snap:local:node-1:default:snap-cli"]).0);
    assert!(csi(&d, &["delete", id]).0);
    let (ok, out) = csi(&d, &["list"]);
    assert!(ok && !out.contains(id), "{out}");
}

#[tokio::test]
async fn csi_client_reports_the_error_code_and_exits_non_zero() {
    let d = Driver::start().await;
    let (ok, out) = csi(&d, &["get", "local:node-1:default:nope"]);
    assert!(!ok);
    assert!(out.contains("NotFound"), "{out}");
}

#[tokio::test]
async fn bench_drives_volumes_and_reports_percentiles_leaving_nothing() {
    let d = Driver::start().await;
    let pid = d.pid().to_string();
    let work = d.path("bench");
    std::fs::create_dir_all(&work).unwrap();
    let (ok, out) = csi(
        &d,
        &[
            "bench",
            "--volumes",
            "12",
            "--concurrency",
            "3",
            "--background",
            "4",
            "--work-dir",
            work.to_str().unwrap(),
            "--driver-pid",
            &pid,
        ],
    );
    assert!(ok, "{out}");
    for rpc in [
        "CreateVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
        "DeleteVolume",
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(rpc))
            .unwrap_or_else(|| panic!("no {rpc} line: {out}"));
        assert!(line.split_whitespace().nth(1) == Some("12"), "{line}");
    }
    assert!(out.contains("rpc/s"), "{out}");
    assert!(out.contains("driver peak RSS"), "{out}");
    assert!(mounts_under(d.dir.path()).is_empty());
    let left: Vec<_> = std::fs::read_dir(d.pool_dir().join("volumes")).unwrap().collect();
    assert!(left.is_empty(), "bench left volumes: {left:?}");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "bench left directories");
}

#[tokio::test]
async fn csi_client_to_a_missing_socket_fails_clearly() {
    require_root();
    let out = Command::new(bin())
        .args(["csi", "--endpoint", "unix:///nonexistent/cellar.sock", "info"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
