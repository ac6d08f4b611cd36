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

/// What [`FaultProxy`] does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Hands it to the server and its answer back.
    Pass,
    /// Answers 500 without asking the server (a store failing before it did anything).
    Fail,
    /// Hands it to the server, then answers 500 instead of the server's answer (a store that
    /// did the work and then failed to say so).
    FailAfter,
    /// Hands it to the server, then answers the server's head and the first half of its body,
    /// with a Content-Length saying that half is all (a proxy or middlebox truncating): a
    /// well-formed answer, short of what was asked.
    Truncate,
    /// Hands it to the server, then answers the server's head and the first half of its body,
    /// and closes the connection (a connection cut mid-body).
    Cut,
    /// Takes the request and never answers (a store or a network that holds it): the
    /// connection stays open, silent, until the proxy is dropped.
    Hang,
}

/// The head of one request as [`FaultProxy`] sees it: `GET /bucket/key?query HTTP/1.1`.
pub struct Seen<'a> {
    pub method: &'a str,
    /// The target, percent-encoded as sent (path and query).
    pub target: &'a str,
}

type Rule = dyn Fn(&Seen<'_>) -> Fault + Send + Sync;

/// An HTTP proxy on 127.0.0.1 in front of an [`S3Server`] that fails the requests a rule picks:
/// cellar's S3 client talks to it as to the store (its requests are forwarded byte for byte, so
/// their signatures still check). One connection to the server per request. Stops on drop.
pub struct FaultProxy {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rule: std::sync::Arc<std::sync::Mutex<std::sync::Arc<Rule>>>,
    /// Requests that were failed, as `METHOD target`.
    pub failed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let pass: Arc<Rule> = Arc::new(|_: &Seen<'_>| Fault::Pass);
        let rule = Arc::new(Mutex::new(pass));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let (stop2, rule2, failed2) = (stop.clone(), rule.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (rule, failed) = (rule2.clone(), failed2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, upstream, &rule, &failed);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FaultProxy {
            port,
            stop,
            rule,
            failed,
        }
    }

    /// `http://127.0.0.1:<port>`: give it as the repository's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on each request gets what `rule` says.
    pub fn set(&self, rule: impl Fn(&Seen<'_>) -> Fault + Send + Sync + 'static) {
        *self.rule.lock().expect("rule") = std::sync::Arc::new(rule);
    }

    /// Every request passes again.
    pub fn heal(&self) {
        self.set(|_| Fault::Pass);
    }

    pub fn failed(&self) -> Vec<String> {
        self.failed.lock().expect("failed").clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Reads one HTTP message head (through the blank line) and its body, when it has a
/// Content-Length or is chunked; `None` at a clean end of the connection.
fn read_message(r: &mut impl std::io::BufRead, has_body: bool) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(if head.is_empty() {
                None
            } else {
                Some((head, Vec::new()))
            });
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let mut body = Vec::new();
    // A HEAD's answer and a 204 name a length but carry nothing.
    let status = head.split(' ').nth(1).unwrap_or("");
    if !has_body || status == "204" || status == "304" {
        return Ok(Some((head, body)));
    }
    if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        std::io::Read::read_exact(r, &mut body)?;
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            body.extend_from_slice(size.as_bytes());
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            let mut chunk = vec![0u8; n + 2];
            std::io::Read::read_exact(r, &mut chunk)?;
            body.extend_from_slice(&chunk);
            if n == 0 {
                break;
            }
        }
    }
    Ok(Some((head, body)))
}

/// An HTTP message head with its Content-Length set to `len`.
fn with_length(head: &str, len: usize) -> String {
    head.split_inclusive("\r\n")
        .map(|line| match line.split_once(':') {
            Some((k, _)) if k.trim().eq_ignore_ascii_case("content-length") => format!("{k}: {len}\r\n"),
            _ => line.to_string(),
        })
        .collect()
}

/// Whether a held connection can be let go: its client closed it.
fn hang_over(conn: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    conn.set_nonblocking(true).ok();
    let over = matches!(conn.peek(&mut byte), Ok(0))
        || matches!(conn.peek(&mut byte), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock);
    conn.set_nonblocking(false).ok();
    over
}

fn serve(
    conn: TcpStream,
    upstream: u16,
    rule: &std::sync::Mutex<std::sync::Arc<Rule>>,
    failed: &std::sync::Mutex<Vec<String>>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some((head, body)) = read_message(&mut reader, true)? {
        let first = head.lines().next().unwrap_or_default().to_string();
        let mut parts = first.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let rule = rule.lock().expect("rule").clone();
        let fault = rule(&Seen { method, target });
        if fault != Fault::Pass {
            failed.lock().expect("failed").push(format!("{method} {target}"));
        }
        let answer = match fault {
            Fault::Hang => {
                while !hang_over(&out) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Ok(());
            }
            Fault::Fail => None,
            _ => {
                let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
                up.write_all(head.as_bytes())?;
                up.write_all(&body)?;
                let mut up_reader = std::io::BufReader::new(up);
                let answer = read_message(&mut up_reader, method != "HEAD")?;
                match (fault, answer) {
                    (Fault::Truncate, Some((h, mut b))) => {
                        b.truncate(b.len() / 2);
                        Some((with_length(&h, b.len()), b))
                    }
                    (Fault::Cut, Some((h, b))) => {
                        out.write_all(h.as_bytes())?;
                        out.write_all(&b[..b.len() / 2])?;
                        out.flush()?;
                        return Ok(());
                    }
                    (Fault::Pass, answer) => answer,
                    _ => None,
                }
            }
        };
        match answer {
            Some((h, b)) => {
                out.write_all(h.as_bytes())?;
                out.write_all(&b)?;
            }
            None => {
                let text = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code>\
                            <Message>injected by the test's proxy</Message></Error>";
                write!(
                    out,
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{text}",
                    text.len()
                )?;
            }
        }
        out.flush()?;
    }
    Ok(())
}
