//! Runs the upstream csi-sanity suite against all-in-one when a `csi-sanity` binary is on PATH (or
//! named by CSI_SANITY). It must pass with no failure, and every skipped spec must be one gated on a
//! capability cellar does not offer. Without the binary this test says so and passes: the Rust
//! conformance suite (tests/conformance.rs) covers the same behaviour. Set CELLAR_REQUIRE_CSI_SANITY=1
//! to make a missing binary an error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fs::TestFs;
use common::*;

fn sanity_or_note() -> Option<PathBuf> {
    common::sanity::find("upstream conformance run")
}

/// Runs csi-sanity against `d` with `params` as the StorageClass parameters of every volume.
fn run_sanity(sanity: &Path, d: &Driver, params: &str, size: i64, expand: i64) {
    let params_file = d.path("sanity-params.yaml");
    std::fs::write(&params_file, params).expect("params file");
    common::sanity::judge(params, || {
        Command::new("timeout")
            .arg("600")
            .arg(sanity)
            .arg(format!("--csi.endpoint={}", d.endpoint()))
            .arg(format!("--csi.mountdir={}", d.path("sanity-mnt").display()))
            .arg(format!("--csi.stagingdir={}", d.path("sanity-stg").display()))
            .arg(format!("--csi.testvolumesize={size}"))
            .arg(format!("--csi.testvolumeexpandsize={expand}"))
            .arg(format!("--csi.testvolumeparameters={}", params_file.display()))
            .args(["--ginkgo.no-color", "--ginkgo.v"])
            .output()
            .expect("run csi-sanity")
    });
}

#[tokio::test]
async fn csi_sanity_passes_against_all_in_one() {
    let Some(sanity) = sanity_or_note() else { return };
    let d = Driver::start().await;
    run_sanity(&sanity, &d, "{}\n", 64 * MIB, 96 * MIB);
}

async fn with_pool(kind: &str, layout: &str) -> (TestFs, Driver) {
    let fs = TestFs::new(kind, 2048);
    let cfg = fs.dir.path().join("pools.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: p\n    path: {}\n    layout: {layout}\n",
            fs.path("pool").display()
        ),
    )
    .expect("config");
    let d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    (fs, d)
}

#[tokio::test]
async fn csi_sanity_passes_on_a_btrfs_pool() {
    let Some(sanity) = sanity_or_note() else { return };
    let (_fs, d) = with_pool("btrfs", "btrfs").await;
    run_sanity(&sanity, &d, "pool: p\nlayout: btrfs\n", 64 * MIB, 96 * MIB);
}

#[tokio::test]
async fn csi_sanity_passes_on_an_image_pool() {
    let Some(sanity) = sanity_or_note() else { return };
    let (_fs, d) = with_pool("xfs", "image").await;
    run_sanity(&sanity, &d, "pool: p\nlayout: image\n", 64 * MIB, 96 * MIB);
}

#[tokio::test]
async fn csi_sanity_passes_on_a_shared_pool() {
    let Some(sanity) = sanity_or_note() else { return };
    // A real network filesystem, mounted on the "node" by the operator (`path`).
    let g = common::gluster::Gluster::start();
    let share = g.mount(None);
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: default\n  - name: s\n    backend: shared\n    path: {}\n    layouts: [dir, image]\n",
            share.join("pool").display()
        ),
    )
    .expect("config");
    let d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    run_sanity(&sanity, &d, "pool: s\n", 64 * MIB, 96 * MIB);
    drop(d);
}
