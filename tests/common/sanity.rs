//! Running the upstream csi-sanity binary: finding it, judging its output the same way everywhere
//! (no failure, and no skip but for capabilities cellar deliberately does not offer), and its own
//! connect race.

use std::path::PathBuf;
use std::process::Output;

/// The skip reasons csi-sanity prints for capabilities cellar deliberately does not advertise.
pub const HONEST_SKIPS: &[&str] = &[
    "ControllerPublishVolume not supported",
    "ControllerUnpublishVolume not supported",
    "Controller Publish, UnpublishVolume not supported",
];

/// The csi-sanity binary: `CSI_SANITY`, else `csi-sanity` on PATH. Without one the caller's run is
/// not done (said on stderr), unless CELLAR_REQUIRE_CSI_SANITY makes that an error.
pub fn find(what: &str) -> Option<PathBuf> {
    let found = std::env::var_os("CSI_SANITY").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("csi-sanity"))
                .find(|p| p.is_file())
        })
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CELLAR_REQUIRE_CSI_SANITY").is_none(),
            "CELLAR_REQUIRE_CSI_SANITY is set but no csi-sanity is on PATH"
        );
        eprintln!("csi-sanity not on PATH: {what} not done here (tests/conformance.rs covers its cases)");
    }
    found
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs csi-sanity through `run` and asserts the verdict: success, a summary line, and skips only
/// from HONEST_SKIPS. csi-sanity's own connect (utils.Connect) can miss the channel turning READY
/// and wait a minute for a change that never comes, failing the spec it was for with "Connection
/// timed out"; only when every failure is that, the run is repeated once. Returns the summary.
pub fn judge(what: &str, mut run: impl FnMut() -> Output) -> String {
    let mut out = run();
    let mut all = text(&out);
    let failed = all.lines().filter(|l| l.starts_with("  [FAIL] ")).count();
    if !out.status.success() && failed > 0 && all.matches("s: \"Connection timed out\"").count() == failed {
        eprintln!("csi-sanity ({what}) lost {failed} spec(s) to its own connect race; running it again");
        out = run();
        all = text(&out);
    }
    let lines: Vec<&str> = all.lines().collect();
    let around = |at: usize, before: usize, after: usize| {
        lines[at.saturating_sub(before)..(at + after).min(lines.len())].join("\n")
    };
    let first_failure = lines.iter().position(|l| l.contains("[FAILED]")).unwrap_or(lines.len());
    assert!(
        out.status.success(),
        "csi-sanity ({what}) failed; the first failure:\n{}\n...\n{}",
        around(first_failure, 30, 30),
        around(lines.len(), 80, 0)
    );
    let summary: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("Passed") && l.contains("Failed"))
        .collect();
    assert!(
        !summary.is_empty(),
        "no csi-sanity summary line:\n{}",
        around(lines.len(), 40, 0)
    );
    let bad_skips: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("[SKIPPED] ") && !l.starts_with("[SKIPPED] in ") && !l.starts_with("[SKIPPED] ["))
        .filter(|l| !HONEST_SKIPS.iter().any(|h| l.contains(h)))
        .collect();
    assert!(
        bad_skips.is_empty(),
        "csi-sanity ({what}) skipped specs for capabilities cellar offers: {bad_skips:?}"
    );
    let summary = summary.join(" | ");
    eprintln!("csi-sanity ({what}): {summary}");
    summary
}
