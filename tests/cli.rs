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

/// `cellar csi ARGS... --endpoint E -o json`: global flags after the command, JSON parsed.
fn csi_json(d: &Driver, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin())
        .arg("csi")
        .args(args)
        .args(["--endpoint", &d.endpoint(), "-o", "json"])
        .output()
        .expect("run cellar csi");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}):\n{stdout}"))
}

#[tokio::test]
async fn csi_client_walks_a_volume_through_its_life() {
    let d = Driver::start().await;
    let (ok, info) = csi(&d, &["info"]);
    assert!(ok && info.contains("cellar.csi.dev"), "{info}");
    assert!(
        info.lines().any(|l| l.starts_with("ready") && l.ends_with("yes")),
        "{info}"
    );
    assert!(!info.contains("r#type") && !info.contains('{'), "no debug dump: {info}");
    let (ok, out) = csi(&d, &["create", "pvc-cli", "--size", "64M"]);
    let id = "local:node-1:default:pvc-cli";
    assert!(ok && out == format!("{id}\n"), "create prints the id alone: {out:?}");
    let (ok, out) = csi(&d, &["list"]);
    assert!(ok, "{out}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(header, ["VOLUME ID", "CAPACITY", "TOPOLOGY", "CONDITION"], "{out}");
    let row = lines
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not listed: {out}"));
    assert!(
        row.contains("64 MiB") && row.contains("node=node-1") && row.ends_with("ok"),
        "{row}"
    );
    let staging = d.path("cli-staging");
    let target = d.path("cli-target");
    std::fs::create_dir_all(&staging).unwrap();
    let (ok, out) = csi(&d, &["stage", id, staging.to_str().unwrap()]);
    assert!(ok && out == format!("staged {id}\n"), "{out}");
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
    assert!(
        ok && out.starts_with("UNIT") && out.contains("\nbytes ") && out.contains("iB"),
        "{out}"
    );
    assert!(out.contains("condition: ok"), "{out}");
    let (ok, out) = csi(&d, &["snapshot", "snap-cli", id]);
    assert!(ok && out == "snap:local:node-1:default:snap-cli\n", "{out:?}");
    let (ok, out) = csi(&d, &["snapshots"]);
    assert!(
        ok && out.starts_with("SNAPSHOT ID") && out.contains("snap-cli"),
        "{out}"
    );
    let (ok, out) = csi(&d, &["get-snapshot", "snap:local:node-1:default:snap-cli"]);
    assert!(ok && out.contains(id) && out.contains("yes"), "{out}");
    let (ok, out) = csi(&d, &["expand", id, "128M", "--path", target.to_str().unwrap()]);
    assert!(ok && out == format!("expanded {id} to 128 MiB\n"), "{out:?}");
    let (ok, out) = csi(&d, &["modify", id, "--param", "deletePolicy=retain"]);
    assert!(ok && out == format!("modified {id}\n"), "{out}");
    let (ok, out) = csi(&d, &["get", id]);
    assert!(ok && out.contains("128 MiB") && out.contains("condition"), "{out}");
    assert!(csi(&d, &["unpublish", id, target.to_str().unwrap()]).0);
    assert!(csi(&d, &["unstage", id, staging.to_str().unwrap()]).0);
    assert!(csi(&d, &["delete-snapshot", "snap:local:node-1:default:snap-cli"]).0);
    let (ok, out) = csi(&d, &["delete", id]);
    assert!(ok && out == format!("deleted {id}\n"), "{out}");
    let (ok, out) = csi(&d, &["list"]);
    assert!(ok && !out.contains(id), "{out}");
}

/// `-o json` on every command, with the global flags after the command: the CSI fields, in bytes.
#[tokio::test]
async fn every_command_answers_json_and_takes_global_flags_anywhere() {
    let d = Driver::start().await;
    let info = csi_json(&d, &["info"]);
    assert_eq!(info["name"], "cellar.csi.dev");
    assert_eq!(info["ready"], true);
    assert_eq!(info["node"]["node_id"], "node-1");
    assert!(info["controller_capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "CREATE_DELETE_VOLUME"));
    let v = csi_json(&d, &["create", "pvc-json", "--size", "32M", "--fs-type", "ext4"]);
    let id = v["volume_id"].as_str().expect("volume_id").to_owned();
    assert_eq!(v["capacity_bytes"], 32 << 20);
    let list = csi_json(&d, &["list"]);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["volume_id"] == id.as_str())
        .expect("listed");
    assert_eq!(entry["volume_condition"]["abnormal"], false);
    assert_eq!(csi_json(&d, &["get", &id])["capacity_bytes"], 32 << 20);
    assert!(csi_json(&d, &["capacity"])["available_capacity"].as_i64().unwrap() > 0);
    let staging = d.path("json-staging");
    let target = d.path("json-target");
    std::fs::create_dir_all(&staging).unwrap();
    assert_eq!(
        csi_json(&d, &["stage", &id, staging.to_str().unwrap()])["volume_id"],
        id.as_str()
    );
    let publish = [
        "publish",
        &id,
        "--staging-path",
        staging.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ];
    assert_eq!(csi_json(&d, &publish)["volume_id"], id.as_str());
    let stats = csi_json(&d, &["stats", &id, target.to_str().unwrap()]);
    assert!(
        stats["usage"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["unit"] == "BYTES" && u["used"].as_i64() > Some(0)),
        "{stats}"
    );
    let e = csi_json(&d, &["expand", &id, "48M"]);
    assert_eq!(
        (e["capacity_bytes"].as_i64(), e["node_expanded"].as_bool()),
        (Some(48 << 20), Some(false))
    );
    assert_eq!(
        csi_json(&d, &["modify", &id, "--param", "deletePolicy=retain"])["volume_id"],
        id.as_str()
    );
    let s = csi_json(&d, &["snapshot", "snap-json", &id]);
    let snap = s["snapshot_id"].as_str().expect("snapshot_id").to_owned();
    assert_eq!(
        (s["source_volume_id"].as_str(), s["ready_to_use"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    assert!(s["creation_time"].as_str().unwrap().ends_with('Z'), "{s}");
    assert_eq!(csi_json(&d, &["get-snapshot", &snap])["snapshot_id"], snap.as_str());
    let snaps = csi_json(&d, &["snapshots", "--source-volume-id", &id]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(1), "{snaps}");
    assert_eq!(csi_json(&d, &["delete-snapshot", &snap])["snapshot_id"], snap.as_str());
    assert_eq!(
        csi_json(&d, &["unpublish", &id, target.to_str().unwrap()])["volume_id"],
        id.as_str()
    );
    assert_eq!(
        csi_json(&d, &["unstage", &id, staging.to_str().unwrap()])["volume_id"],
        id.as_str()
    );
    assert_eq!(csi_json(&d, &["delete", &id])["volume_id"], id.as_str());
}

/// `--fs-type` and `--block` reach the driver: a type it does not make is refused by name, and a
/// raw block volume of an image pool is published as a block device.
#[tokio::test]
async fn fs_type_and_block_flags_reach_the_driver() {
    let fs = common::fs::TestFs::new("ext4", 256);
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: img\n    path: {}\n    layout: image\n",
            fs.path("pool").display()
        ),
    )
    .unwrap();
    let d = Driver::start_with(&["--config", cfg.to_str().unwrap()], &[]).await;
    let (ok, out) = csi(&d, &["create", "pvc-zfs", "--size", "16M", "--fs-type", "zfs"]);
    assert!(!ok && out.contains("InvalidArgument") && out.contains("'zfs'"), "{out}");
    let (ok, out) = csi(&d, &["create", "pvc-raw", "--size", "16M", "--block"]);
    assert!(ok, "{out}");
    let id = out.trim().to_owned();
    let staging = d.path("raw-staging");
    std::fs::create_dir_all(&staging).unwrap();
    let (ok, out) = csi(&d, &["stage", &id, staging.to_str().unwrap(), "--block"]);
    assert!(ok, "{out}");
    let target = d.path("raw-publish/pod");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, b"").unwrap();
    let publish = [
        "publish",
        &id,
        "--block",
        "--staging-path",
        staging.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ];
    let (ok, out) = csi(&d, &publish);
    assert!(ok, "{out}");
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata(&target).unwrap().file_type().is_block_device(),
        "a block device is published"
    );
    assert!(csi(&d, &["unpublish", &id, target.to_str().unwrap()]).0);
    assert!(csi(&d, &["unstage", &id, staging.to_str().unwrap()]).0);
    assert!(csi(&d, &["delete", &id]).0);
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

/// `cellar ARGS...` with its stdout going to `stdout`: exit code (None: killed by a signal) and stderr.
fn cellar_into(stdout: std::process::Stdio, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(args)
        .stdout(stdout)
        .output()
        .expect("run cellar");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn dev_full() -> std::process::Stdio {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full")
        .into()
}

/// A pipe whose reader is already gone, as `cellar ... | head -0` once head has exited.
fn closed_pipe() -> std::process::Stdio {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    writer.into()
}

#[tokio::test]
async fn an_answer_that_cannot_be_written_is_an_error_saying_the_call_was_done_not_a_crash() {
    let d = Driver::start().await;
    let endpoint = d.endpoint();
    for out in ["table", "json"] {
        let name = format!("pvc-full-{out}");
        let (code, err) = cellar_into(
            dev_full(),
            &[
                "csi",
                "--endpoint",
                &endpoint,
                "-o",
                out,
                "create",
                &name,
                "--size",
                "16M",
            ],
        );
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(code, Some(1), "a plain failure, not a panic (101) or an abort: {err}");
        assert!(
            err.contains("cellar: the command ran to completion, but its output could not be written to stdout: No space left on device"),
            "{err}"
        );
        let id = format!("local:node-1:default:{name}");
        let (ok, list) = csi(&d, &["list"]);
        assert!(ok && list.contains(&id), "the volume was created all the same: {list}");
        assert!(csi(&d, &["delete", &id]).0);
    }
}

#[tokio::test]
async fn a_reader_that_closed_the_pipe_ends_the_command_quietly() {
    let d = Driver::start().await;
    let endpoint = d.endpoint();
    let (code, err) = cellar_into(closed_pipe(), &["csi", "--endpoint", &endpoint, "create", "pvc-pipe"]);
    assert_eq!(
        (code, err.as_str()),
        (Some(0), ""),
        "the volume is made, nothing more to say"
    );
    let id = "local:node-1:default:pvc-pipe";
    let (code, err) = cellar_into(closed_pipe(), &["csi", "--endpoint", &endpoint, "list"]);
    assert_eq!((code, err.as_str()), (Some(0), ""));
    let (ok, list) = csi(&d, &["list"]);
    assert!(ok && list.contains(id), "{list}");
    assert!(csi(&d, &["delete", id]).0);
}

/// `cellar backup` needs no driver: its answers go through the same checked write.
#[test]
fn backup_answers_that_cannot_be_written_are_errors_and_a_closed_pipe_is_quiet() {
    let dir = tempfile::Builder::new().prefix("cellar-test-").tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "secret\n").unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "pools:\n  - name: default\n    path: {}\n    layout: dir\nrepositories:\n  - name: offsite\n    path: {}\n    passwordFile: {}\n",
            dir.path().join("pool").display(),
            dir.path().join("repo").display(),
            password.display()
        ),
    )
    .unwrap();
    let args = [
        "backup",
        "list",
        "--repository",
        "offsite",
        "--config",
        config.to_str().unwrap(),
    ];
    for json in [false, true] {
        let args: Vec<&str> = args.iter().copied().chain(json.then_some("--json")).collect();
        let (code, err) = cellar_into(dev_full(), &args);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("cellar backup: the command ran to completion, but its output could not be written to stdout"),
            "{err}"
        );
        let (code, err) = cellar_into(closed_pipe(), &args);
        assert_eq!((code, err.as_str()), (Some(0), ""));
    }
}

#[tokio::test]
async fn csi_client_to_a_missing_socket_says_no_driver_listens_there() {
    require_root();
    let out = Command::new(bin())
        .args(["csi", "info", "--endpoint", "unix:///nonexistent/cellar.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no CSI driver listening at /nonexistent/cellar.sock: No such file or directory"),
        "{err}"
    );
}

#[tokio::test]
async fn csi_client_to_a_socket_nobody_serves_says_it_refuses() {
    require_root();
    let dir = tempfile::Builder::new().prefix("cellar-test-").tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    // A socket file left by a process that is gone: connecting is refused.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let out = Command::new(bin())
        .args(["csi", "--endpoint"])
        .arg(&socket)
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("no CSI driver listening at {}: Connection refused", socket.display());
    assert!(err.contains(&want), "{err}");
}

/// Whether a line holds a `<placeholder>` (letters, digits, `-`, `_` between angle brackets).
fn has_placeholder(line: &str) -> bool {
    line.split('<').skip(1).any(|rest| {
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        !word.is_empty() && rest[word.len()..].starts_with('>')
    })
}

/// Every shell block of the README and docs/ can be pasted into a shell: no comment after a line
/// continuation (which ends the command there) and nothing bash cannot parse.
#[test]
fn shell_blocks_in_the_docs_can_be_pasted() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut blocks = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut lines = text.lines().enumerate();
        while let Some((start, line)) = lines.next() {
            if !matches!(line.trim(), "```sh" | "```bash" | "```shell") {
                continue;
            }
            let block: Vec<&str> = lines
                .by_ref()
                .map(|(_, l)| l)
                .take_while(|l| l.trim() != "```")
                .collect();
            blocks += 1;
            let at = format!("{}:{}", f.display(), start + 1);
            for l in &block {
                assert!(
                    !l.contains(" [--") && !has_placeholder(l) && !l.contains("REGISTRY/"),
                    "{at}: a placeholder does not paste (show a real value, or fence a synopsis as ``` not ```sh): {l}"
                );
                if let Some((_, after)) = l.split_once("\\ ") {
                    assert!(
                        !after.trim_start().starts_with('#'),
                        "{at}: a comment after a line continuation breaks the command: {l}"
                    );
                }
            }
            let out = Command::new("bash")
                .arg("-n")
                .arg("-c")
                .arg(block.join("\n"))
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "{at}: bash cannot parse the block: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(blocks >= 20, "only {blocks} shell blocks found");
}
