//! The container image: the Dockerfile and deploy/image/build-rootfs.sh (the same image built
//! without an engine or a registry) must install the same Debian release, the same packages and the
//! binary at the same path; and the rootfs the script builds must run cellar and every tool the
//! driver spawns.
//!
//! The build test runs debootstrap against Debian's mirror (about a minute here, with the packages
//! cached in /var/cache/cellar-image/debs after the first run); it needs root, debootstrap and
//! umoci, which .ci/run installs, and fails when they are missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The Dockerfile's instructions, continuation lines joined and comments dropped, grouped by stage.
fn dockerfile_stages(text: &str) -> Vec<Vec<String>> {
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for i in instructions {
        if i.to_ascii_uppercase().starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("the Dockerfile starts with FROM").push(i);
    }
    stages
}

/// Package names after `apt-get install` in a RUN instruction, up to the next `&&`.
fn apt_packages(run: &str) -> Vec<String> {
    let mut out = Vec::new();
    for segment in run.split("&&") {
        let words: Vec<&str> = segment.split_whitespace().collect();
        if let Some(at) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
            out.extend(
                words[at + 2..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    .map(|w| w.to_string()),
            );
        }
    }
    out
}

/// A `NAME=value` assignment at the start of a line of the script.
fn script_var(script: &str, name: &str) -> String {
    script
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("build-rootfs.sh sets no {name}"))
        .trim()
        .to_owned()
}

/// The script's `PACKAGES=( ... )` array.
fn script_packages(script: &str) -> Vec<String> {
    let start = script
        .find("\nPACKAGES=(")
        .expect("build-rootfs.sh has a PACKAGES=( ... ) array");
    let body = &script[start + "\nPACKAGES=(".len()..];
    let body = &body[..body.find(')').expect("PACKAGES closes")];
    body.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .flat_map(|l| l.split_whitespace())
        .map(str::to_owned)
        .collect()
}

#[test]
fn image_scripts_are_valid_bash() {
    for script in [
        "deploy/image/build-rootfs.sh",
        "deploy/render.sh",
        "deploy/gen-certs.sh",
    ] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(repo().join(script))
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn dockerfile_and_rootfs_script_build_the_same_image() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    let script = read("deploy/image/build-rootfs.sh");

    // Same Debian release.
    let suite = script_var(&script, "SUITE");
    let runtime = stages.last().expect("runtime stage");
    assert_eq!(
        runtime[0],
        format!("FROM debian:{suite}-slim"),
        "runtime base vs build-rootfs.sh SUITE"
    );
    let build_from = &stages[0][0];
    assert!(
        build_from.contains(&format!("-{suite} ")) || build_from.ends_with(&format!("-{suite}")),
        "the build stage uses the runtime's release (same glibc): {build_from}"
    );

    // Same packages: one list may not gain what the other lacks.
    let docker: Vec<String> = runtime
        .iter()
        .filter(|i| i.starts_with("RUN "))
        .flat_map(|i| apt_packages(i))
        .collect();
    let rootfs = script_packages(&script);
    let as_set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(as_set(&docker).len(), docker.len(), "Dockerfile lists a package twice");
    assert_eq!(
        as_set(&rootfs).len(),
        rootfs.len(),
        "build-rootfs.sh lists a package twice"
    );
    assert_eq!(
        as_set(&docker),
        as_set(&rootfs),
        "the Dockerfile's runtime packages and build-rootfs.sh's PACKAGES differ"
    );
    // The tools the driver spawns, and the mount helpers of the shared filesystems docs/shared.md names.
    for needed in [
        "util-linux",
        "mount",
        "e2fsprogs",
        "xfsprogs",
        "btrfs-progs",
        "nfs-common",
        "glusterfs-client",
        "ceph-common",
        "ca-certificates",
    ] {
        assert!(rootfs.iter().any(|p| p == needed), "{needed} is not installed");
    }
    assert!(
        runtime.iter().any(|i| i.contains("--no-install-recommends")),
        "debootstrap installs no Recommends; neither may the Dockerfile"
    );

    // Same binary path and entrypoint.
    let binary = script_var(&script, "BINARY_PATH");
    assert!(
        runtime
            .iter()
            .any(|i| i.starts_with("COPY --from=") && i.ends_with(&format!(" {binary}"))),
        "the Dockerfile copies the binary to {binary}"
    );
    assert!(runtime.contains(&format!("ENTRYPOINT [\"{binary}\"]")));
    assert!(script.contains("--config.entrypoint \"$BINARY_PATH\""));
}

#[test]
fn dockerfile_build_stage_copies_what_the_build_reads() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    let build = stages[0].join("\n");
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "proto", "src"] {
        assert!(
            build
                .lines()
                .any(|l| l.starts_with("COPY ") && l.split_whitespace().any(|w| w == needed)),
            "the build stage does not copy {needed}"
        );
        assert!(repo().join(needed).exists(), "{needed} is gone: update the Dockerfile");
    }
    assert!(build.contains("cargo build --release --locked"));
    // The toolchain is at least the crate's rust-version.
    let cargo = read("Cargo.toml");
    let want = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version");
    let from = &stages[0][0];
    let tag = from.split(':').nth(1).expect("rust image tag");
    let have = tag.split('-').next().expect("version");
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().expect("number")).collect() };
    assert!(parse(have) >= parse(&want), "rust {have} < rust-version {want}");
    // Nothing the build copies is excluded from the context.
    let ignore = read(".dockerignore");
    for l in ignore.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let l = l.trim().trim_end_matches('/');
        assert!(
            !["Cargo.toml", "Cargo.lock", "build.rs", "proto", "src"].contains(&l),
            ".dockerignore excludes {l}"
        );
    }
}

fn require(tool: &str) {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(tool).is_file());
    assert!(found, "{tool} is missing: apt-get install {tool} (.ci/run installs it)");
}

fn chroot(rootfs: &Path, cmd: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(rootfs)
        .args(cmd)
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .expect("chroot");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} in the image failed ({}): {text}",
        out.status
    );
    text
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m == &d || m.starts_with(&format!("{d}/")))
        .collect()
}

#[test]
fn rootfs_image_runs_cellar_and_every_tool() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "debootstrap and chroot need root (CI runs as root)"
    );
    require("debootstrap");
    require("umoci");
    let dir = tempfile::Builder::new()
        .prefix("cellar-test-image-")
        .tempdir()
        .expect("tempdir");
    let started = Instant::now();
    let out = Command::new(repo().join("deploy/image/build-rootfs.sh"))
        .arg("--out")
        .arg(dir.path())
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_cellar"))
        .args(["--tag", "test"])
        .output()
        .expect("build-rootfs.sh");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "build-rootfs.sh failed:\n{log}");
    eprintln!("build-rootfs.sh took {:.0?}:\n{log}", started.elapsed());
    assert!(
        mounts_under(dir.path()).is_empty(),
        "the build left mounts: {:?}",
        mounts_under(dir.path())
    );

    let rootfs = dir.path().join("rootfs");
    let version = chroot(&rootfs, &["/usr/local/bin/cellar", "--version"]);
    assert_eq!(version.trim(), format!("cellar {}", env!("CARGO_PKG_VERSION")));
    for (cmd, says) in [
        (&["mkfs.ext4", "-V"][..], "mke2fs"),
        (&["mkfs.xfs", "-V"], "mkfs.xfs version"),
        (&["btrfs", "--version"], "btrfs-progs"),
        (&["mount", "--version"], "util-linux"),
        (&["losetup", "--version"], "util-linux"),
        (&["e2fsck", "-V"], "e2fsck"),
        (&["xfs_growfs", "-V"], "xfs_growfs version"),
        (&["mount.nfs", "-V"], "nfs-utils"),
        (&["mount.glusterfs", "-V"], "glusterfs"),
        (&["mount.cifs", "-V"], "mount.cifs"),
    ] {
        let text = chroot(&rootfs, cmd);
        assert!(text.contains(says), "{cmd:?}: {text}");
    }
    // Tools with no version flag: present and executable.
    for tool in ["resize2fs", "mkfs.btrfs", "mount.ceph", "umount"] {
        chroot(&rootfs, &["sh", "-c", &format!("test -x \"$(command -v {tool})\"")]);
    }

    // The OCI archive: one image whose config starts cellar, and whose layer holds the binary.
    let archive = dir.path().join("cellar-oci.tar");
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).expect("mkdir");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-xf")
        .arg(&archive)
        .status()
        .expect("tar");
    assert!(status.success(), "cellar-oci.tar is not a tar");
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .expect("JSON")
    };
    let blob = |digest: &serde_json::Value| {
        let d = digest
            .as_str()
            .expect("digest")
            .strip_prefix("sha256:")
            .expect("sha256");
        layout.join("blobs/sha256").join(d)
    };
    assert_eq!(json(layout.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = json(layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["annotations"]["org.opencontainers.image.ref.name"], "test");
    let manifest = json(blob(&manifests[0]["digest"]));
    let config = json(blob(&manifest["config"]["digest"]));
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/cellar"])
    );
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer: the whole rootfs");
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(blob(&layers[0]["digest"]))
        .output()
        .expect("tar");
    let listing = String::from_utf8_lossy(&listing.stdout);
    for path in [
        "usr/local/bin/cellar",
        "usr/sbin/mkfs.xfs",
        "usr/sbin/mount.nfs",
        "usr/bin/mount",
    ] {
        assert!(
            listing.lines().any(|l| l.trim_start_matches("./") == path),
            "{path} is not in the image's layer"
        );
    }
}
