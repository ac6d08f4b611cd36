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

/// The script's `<name>=( ... )` array (LOCAL_PACKAGES, SHARED_PACKAGES).
fn script_packages(script: &str, name: &str) -> Vec<String> {
    let open = format!("\n{name}=(");
    let start = script
        .find(&open)
        .unwrap_or_else(|| panic!("build-rootfs.sh has no {name}=( ... ) array"));
    let body = &script[start + open.len()..];
    let body = &body[..body.find(')').expect("the array closes")];
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

/// The stage a `FROM ... AS <name>` line names.
fn stage<'a>(stages: &'a [Vec<String>], name: &str) -> &'a [String] {
    stages
        .iter()
        .find(|s| s[0].ends_with(&format!(" AS {name}")))
        .unwrap_or_else(|| panic!("the Dockerfile has no stage {name}"))
}

/// Packages a stage's RUN instructions install.
fn stage_packages(stage: &[String]) -> Vec<String> {
    stage
        .iter()
        .filter(|i| i.starts_with("RUN "))
        .flat_map(|i| apt_packages(i))
        .collect()
}

/// The Dockerfile's `local` and `full` (default) runtime stages and build-rootfs.sh's `--local-only`
/// and full images have the same Debian release, packages, binary path and entrypoint.
#[test]
fn dockerfile_and_rootfs_script_build_the_same_images() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    assert!(stages.len() >= 3, "a build stage and two runtime stages");
    let script = read("deploy/image/build-rootfs.sh");

    // Same Debian release; `full` is the last stage (the default target) and adds to `local`.
    let suite = script_var(&script, "SUITE");
    let local = stage(&stages, "local");
    let full = stage(&stages, "full");
    assert_eq!(
        local[0],
        format!("FROM debian:{suite}-slim AS local"),
        "local base vs SUITE"
    );
    assert_eq!(full[0], "FROM local AS full");
    assert_eq!(
        stages.last().map(|s| s[0].as_str()),
        Some("FROM local AS full"),
        "full is the default"
    );
    let build_from = &stages[0][0];
    assert!(
        build_from.contains(&format!("-{suite} ")) || build_from.ends_with(&format!("-{suite}")),
        "the build stage uses the runtime's release (same glibc): {build_from}"
    );

    // Same packages: neither list may gain what the other lacks, variant by variant.
    let as_set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    let all_docker: Vec<String> = stages.iter().flat_map(|s| stage_packages(s)).collect();
    for (docker, name) in [
        (stage_packages(local), "LOCAL_PACKAGES"),
        (stage_packages(full), "SHARED_PACKAGES"),
    ] {
        let rootfs = script_packages(&script, name);
        assert_eq!(
            as_set(&docker).len(),
            docker.len(),
            "the Dockerfile lists a package twice"
        );
        assert_eq!(
            as_set(&rootfs).len(),
            rootfs.len(),
            "build-rootfs.sh lists a package twice"
        );
        assert_eq!(
            as_set(&docker),
            as_set(&rootfs),
            "the Dockerfile's stage and build-rootfs.sh's {name} differ"
        );
    }
    let local_packages = script_packages(&script, "LOCAL_PACKAGES");
    let shared_packages = script_packages(&script, "SHARED_PACKAGES");
    // The tools the driver spawns in every variant; the mount helpers of docs/shared.md in the full one.
    for needed in [
        "util-linux",
        "mount",
        "e2fsprogs",
        "xfsprogs",
        "btrfs-progs",
        "ca-certificates",
    ] {
        assert!(
            local_packages.iter().any(|p| p == needed),
            "{needed} is not in the local variant"
        );
    }
    for needed in ["nfs-common", "glusterfs-client", "ceph-common", "cifs-utils"] {
        assert!(
            shared_packages.iter().any(|p| p == needed),
            "{needed} is not in the full variant"
        );
        assert!(
            !local_packages.iter().any(|p| p == needed),
            "{needed} is in the local-only variant"
        );
    }
    assert!(
        all_docker
            .iter()
            .all(|p| !p.starts_with("gcc-") && !p.starts_with("libc6-dev")),
        "no cross toolchain in a runtime stage: {all_docker:?}"
    );
    for s in [local, full] {
        assert!(
            s.iter()
                .filter(|i| i.contains("apt-get install"))
                .all(|i| i.contains("--no-install-recommends")),
            "debootstrap installs no Recommends; neither may the Dockerfile"
        );
    }

    // Same binary path and entrypoint (full inherits both from local).
    let binary = script_var(&script, "BINARY_PATH");
    assert!(
        local
            .iter()
            .any(|i| i.starts_with("COPY --from=build") && i.ends_with(&format!(" {binary}"))),
        "the Dockerfile copies the binary to {binary}"
    );
    assert!(local.contains(&format!("ENTRYPOINT [\"{binary}\"]")));
    assert!(script.contains("--config.entrypoint \"$BINARY_PATH\""));
}

/// The build stage runs on the build machine and cross-compiles for the target architecture,
/// instead of compiling under emulation.
#[test]
fn dockerfile_cross_compiles_instead_of_emulating() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    let build = &stages[0];
    assert!(build[0].starts_with("FROM --platform=$BUILDPLATFORM "), "{}", build[0]);
    let text = build.join("\n");
    for needed in [
        "ARG TARGETARCH",
        "ARG BUILDARCH",
        "aarch64-unknown-linux-gnu",
        "gcc-$gnu",
        "rustup target add",
        "--target \"$triple\"",
        "_LINKER=$gnu-gcc",
    ] {
        assert!(text.contains(needed), "the build stage lacks {needed}");
    }
    for s in &stages[1..] {
        assert!(
            !s[0].contains("--platform"),
            "runtime stages are of the target platform: {}",
            s[0]
        );
    }
}

/// What `cargo build --release` reads: the sources, and build.rs's protos and link order.
const BUILD_READS: [&str; 6] = ["Cargo.toml", "Cargo.lock", "build.rs", "proto", "src", "link"];

#[test]
fn dockerfile_build_stage_copies_what_the_build_reads() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    let build = stages[0].join("\n");
    for needed in BUILD_READS {
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
        assert!(!BUILD_READS.contains(&l), ".dockerignore excludes {l}");
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

/// Runs build-rootfs.sh into a fresh directory with the test's binary; the directory goes on drop.
fn build_rootfs(extra: &[&str]) -> tempfile::TempDir {
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
        .args(extra)
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
    dir
}

/// The local-only variant runs cellar and the layouts' tools, and holds no shared filesystem client.
#[test]
fn local_only_rootfs_has_the_layout_tools_and_no_shared_filesystem_clients() {
    let dir = build_rootfs(&["--local-only", "--no-oci"]);
    let rootfs = dir.path().join("rootfs");
    let version = chroot(&rootfs, &["/usr/local/bin/cellar", "--version"]);
    assert_eq!(version.trim(), format!("cellar {}", env!("CARGO_PKG_VERSION")));
    for tool in [
        "mkfs.ext4",
        "mkfs.xfs",
        "mkfs.btrfs",
        "btrfs",
        "losetup",
        "resize2fs",
        "xfs_growfs",
        "e2fsck",
    ] {
        chroot(&rootfs, &["sh", "-c", &format!("test -x \"$(command -v {tool})\"")]);
    }
    for helper in ["mount.nfs", "mount.glusterfs", "mount.ceph", "mount.cifs"] {
        chroot(&rootfs, &["sh", "-c", &format!("! command -v {helper}")]);
    }
    let du = Command::new("du").arg("-sm").arg(&rootfs).output().expect("du");
    eprintln!(
        "local-only rootfs: {} MiB",
        String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    assert!(
        !dir.path().join("cellar-oci.tar").exists(),
        "--no-oci writes no archive"
    );
}

#[test]
fn rootfs_image_runs_cellar_and_every_tool() {
    let dir = build_rootfs(&[]);
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

/// Two builds sharing a package cache take turns: while another build holds the cache, the script
/// waits before debootstrap starts (debootstrap downloads into the cache with no lock of its own, and
/// the last CI run failed extracting a .deb the other build was still writing).
#[test]
fn builds_sharing_a_package_cache_take_turns() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    assert!(
        nix::unistd::geteuid().is_root(),
        "build-rootfs.sh needs root (CI runs as root)"
    );
    require("debootstrap");
    let cache = tempfile::tempdir().expect("tempdir");
    let out = tempfile::tempdir().expect("tempdir");
    let lockfile = std::fs::File::create(cache.path().join(".lock")).expect("lock file");
    let held = nix::fcntl::Flock::lock(lockfile, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("take the cache lock");
    let mut child = Command::new(repo().join("deploy/image/build-rootfs.sh"))
        .arg("--out")
        .arg(out.path())
        .arg("--cache")
        .arg(cache.path())
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_cellar"))
        .args(["--no-oci", "--local-only"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("build-rootfs.sh");
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut seen = Vec::new();
    let mut waited = false;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("read stdout");
        seen.push(line.clone());
        if line.starts_with("== waiting for") {
            waited = true;
            break;
        }
        if line.starts_with("== debootstrap") {
            break;
        }
    }
    // Whatever happened, the build stops here: it must not download anything into this test's cache.
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    drop(held);
    assert!(
        waited,
        "the build did not wait for the held cache; it printed: {seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("== debootstrap")),
        "debootstrap started while another build held the cache: {seen:?}"
    );
    let rootfs = out.path().join("rootfs");
    let populated = std::fs::read_dir(&rootfs)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    assert!(!populated, "the waiting build wrote into {}", rootfs.display());
}
