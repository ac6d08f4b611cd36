//! The S3 test server of tests/common/s3.rs, checked with the `restic` CLI (Debian's, installed by
//! .ci/run): a repository initialised, backed up to, checked with every pack read back and restored
//! over plain HTTP with path-style requests, using the keys of the credentials file the harness
//! writes (the format cellar's `s3.credentialsFile` reads). The backup tests rely on this server; if
//! restic is happy with it, a failure there is cellar's.
//!
//! Run alone with `cargo test --features crash-points --test s3_server`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::s3::{read_credentials, S3Server};

const PASSWORD: &str = "cellar-test-repository-password";

/// `restic` from PATH; missing, the test fails and says where it comes from.
fn restic() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("restic"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("restic not found on PATH: apt-get install restic (.ci/run installs it)"))
}

/// Runs restic on `repo` with the environment it reads its secrets from; fails the test, with
/// restic's output and the server's log, unless it succeeds.
fn run(s3: &S3Server, repo: &str, env: &[(String, String)], args: &[&str]) -> Output {
    let out = Command::new(restic())
        .arg("--repo")
        .arg(repo)
        // The local cache would live in ~/.cache/restic, outside the test's directory.
        .arg("--no-cache")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RESTIC_PASSWORD", PASSWORD)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run restic");
    assert!(
        out.status.success(),
        "restic {args:?} failed ({}):\n{}{}\nS3 server log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s3.log()
    );
    out
}

/// Every regular file below `root` by relative path, with its bytes.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(root).expect("below root").to_path_buf();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

#[test]
fn restic_backs_up_to_and_restores_from_the_s3_test_server() {
    let s3 = S3Server::start();
    let repo = format!("s3:{}/{}/restic", s3.endpoint(), s3.bucket());
    let env = read_credentials(&s3.credentials_file());
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);

    // A few small files, an empty one, and 3 MiB of incompressible bytes (more than one chunk).
    let src = s3.path("source");
    std::fs::create_dir_all(src.join("nested/deeper")).expect("source dirs");
    std::fs::write(src.join("hello.txt"), b"hello from cellar\n").expect("write");
    std::fs::write(src.join("empty"), b"").expect("write");
    std::fs::write(src.join("nested/deeper/notes.txt"), "line\n".repeat(1000)).expect("write");
    let noise = common::noise(3 << 20);
    std::fs::write(src.join("nested/noise.bin"), &noise).expect("write");

    // Version 2 (compression) is what restic 0.14 makes by default and what rustic_core writes;
    // said explicitly so that a newer or older restic cannot change the format under the test.
    run(&s3, &repo, &env, &["init", "--repository-version", "2"]);
    let config = run(&s3, &repo, &env, &["cat", "config"]);
    let config = String::from_utf8_lossy(&config.stdout);
    assert!(
        config.contains("\"version\": 2"),
        "not a version 2 repository: {config}"
    );
    // The objects went where path-style requests put them: the bucket's directory on the server.
    assert!(
        s3.bucket_dir().join("restic/config").is_file(),
        "no restic/config in the bucket's directory"
    );

    run(
        &s3,
        &repo,
        &env,
        &["backup", "--host", "cellar-test", src.to_str().expect("utf-8")],
    );
    // check lists data/ recursively, the listing plain s3s-fs gets wrong for restic (it then calls
    // every pack missing); --read-data also reads each pack back.
    run(&s3, &repo, &env, &["check", "--read-data"]);
    let target = s3.path("restored");
    run(
        &s3,
        &repo,
        &env,
        &["restore", "latest", "--target", target.to_str().expect("utf-8")],
    );

    // restore puts the backed-up absolute path below the target.
    let restored = target.join(src.strip_prefix("/").expect("absolute"));
    let want = files(&src);
    let got = files(&restored);
    assert_eq!(want.len(), 4);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "restored a different set of files"
    );
    for (rel, bytes) in &want {
        assert!(got[rel] == *bytes, "{} restored with different bytes", rel.display());
    }
}

#[test]
fn the_server_refuses_a_wrong_secret() {
    // The keys are really checked: a test that passes with any key would not catch a client that
    // signs with the wrong credentials or none.
    let s3 = S3Server::start();
    let repo = format!("s3:{}/{}/restic", s3.endpoint(), s3.bucket());
    let out = Command::new(restic())
        .args(["--repo", &repo, "--no-cache", "init", "--repository-version", "2"])
        .env_clear()
        .env("RESTIC_PASSWORD", PASSWORD)
        .env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .expect("run restic");
    assert!(!out.status.success(), "restic init succeeded with a wrong secret key");
    assert!(!s3.bucket_dir().join("restic/config").exists());
}
