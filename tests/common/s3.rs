//! A real S3 server on loopback for the backup tests: `.ci/s3-server` (s3s-fs 0.14.1 from crates.io
//! behind s3s's SigV4 checks, with the listing fix restic needs), which `.ci/run` builds once into
//! `/var/cache/cellar-ci/s3` and names by `CELLAR_S3_SERVER`. Each server gets a fresh directory
//! below `/tmp/cellar-test-s3-*`, a free 127.0.0.1 port, fixed keys and one bucket.
//!
//! Only path-style requests are served (no virtual-host domain is configured), so a client that
//! falls back to virtual-host style fails here instead of passing by accident. On drop the server
//! is killed and its directory removed.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use super::cluster::{free_port, spawn_program_logged};
use super::kill_child;

pub const ACCESS_KEY: &str = "cellar-test-access";
pub const SECRET_KEY: &str = "cellar-test-secret-0123456789";
pub const BUCKET: &str = "cellar-backups";
/// The server accepts any region in a signature; clients still need one to sign with.
pub const REGION: &str = "us-east-1";

pub struct S3Server {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

/// The server binary: `$CELLAR_S3_SERVER`, which must exist. There is no fallback and no skip, so a
/// machine without it fails every test that needs it and says how to fix that.
pub fn server_binary() -> PathBuf {
    let how = "it is .ci/s3-server, which .ci/run builds into /var/cache/cellar-ci/s3 \
               (cargo install --locked --root /var/cache/cellar-ci/s3 --path .ci/s3-server) \
               and exports as CELLAR_S3_SERVER=/var/cache/cellar-ci/s3/bin/cellar-s3-server";
    let p = std::env::var_os("CELLAR_S3_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("CELLAR_S3_SERVER is not set: the S3 tests need a real S3 server; {how}"));
    assert!(p.is_file(), "CELLAR_S3_SERVER={} does not exist; {how}", p.display());
    p
}

impl S3Server {
    /// Starts the server and returns once it accepts connections (at most 20 s).
    pub fn start() -> S3Server {
        let program = server_binary();
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-s3-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        // The server keeps a bucket as a directory directly below its root (its CreateBucket is a
        // mkdir), so the bucket exists before the first request.
        std::fs::create_dir_all(data.join(BUCKET)).expect("bucket directory");
        let port = free_port();
        let args = vec![
            "--host".to_string(),
            "127.0.0.1".to_string(),
            "--port".to_string(),
            port.to_string(),
            "--access-key".to_string(),
            ACCESS_KEY.to_string(),
            "--secret-key".to_string(),
            SECRET_KEY.to_string(),
            data.display().to_string(),
        ];
        let child = spawn_program_logged(&program, &dir.path().join("s3.log"), args, &[("RUST_LOG", "info")]);
        let mut s = S3Server {
            dir,
            child: Some(child),
            port,
        };
        s.wait_listening();
        s
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(st) = child.try_wait().expect("wait") {
                panic!("the S3 server exited during start-up ({st}); its log:\n{}", self.log());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the S3 server did not listen on 127.0.0.1:{} within 20 s; its log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:<port>`: plain HTTP, path-style.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    pub fn region(&self) -> &'static str {
        REGION
    }

    /// The bucket's directory on disk, to look at what clients stored without going through S3.
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("data").join(BUCKET)
    }

    /// A scratch path below the server's temporary directory (removed with it).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3.log")).unwrap_or_default()
    }

    /// Writes the credentials file that cellar's `s3.credentialsFile` names, for this server's keys,
    /// at `path` (mode 0600). The format, one `KEY=value` per line: `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (both required), `AWS_SESSION_TOKEN` (optional); blank lines and lines
    /// starting with `#` are ignored; the value is everything after the first `=`, verbatim (no
    /// quotes, no `export`). It is the env-file that `restic` and the AWS tools read from the
    /// environment, so an operator can restore by hand with the same file.
    pub fn write_credentials(&self, path: &Path) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        write!(
            f,
            "# S3 credentials for cellar's backups (s3.credentialsFile)\n\
             AWS_ACCESS_KEY_ID={ACCESS_KEY}\n\
             AWS_SECRET_ACCESS_KEY={SECRET_KEY}\n"
        )
        .expect("write credentials");
    }

    /// [`Self::write_credentials`] into the server's directory; returns the file's path.
    pub fn credentials_file(&self) -> PathBuf {
        let p = self.path("s3-credentials.env");
        self.write_credentials(&p);
        p
    }
}

/// Reads a credentials file in the format of [`S3Server::write_credentials`] into its pairs, in
/// order; a line that is not blank, a comment or `KEY=value` fails the test.
pub fn read_credentials(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not KEY=value: {l:?}", path.display()));
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}
