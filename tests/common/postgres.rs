//! PostgreSQL 15 (Debian's postgresql-15) on a test's volumes: its tools run as the `postgres`
//! user, a server on a Unix socket only, as a child of the test. A missing tool or user fails the
//! test, naming the package CI installs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL tool, to run as the `postgres` user (a direct child of the test, so it is reaped).
pub fn as_postgres(tool: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let user = nix::unistd::User::from_name("postgres")
        .expect("passwd")
        .expect("a postgres user (CI installs postgresql-15)");
    let mut cmd = Command::new(Path::new(PG_BIN).join(tool));
    cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw()).current_dir("/");
    cmd
}

/// Runs a PostgreSQL tool as the `postgres` user and returns its output; a failure fails the test,
/// showing `log` (a server's log) when there is one.
pub fn pg_logged(tool: &str, args: &[&str], log: Option<&Path>) -> String {
    let out = as_postgres(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} could not run ({e}); CI installs postgresql-15"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .unwrap_or_default()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn pg(tool: &str, args: &[&str]) -> String {
    pg_logged(tool, args, None)
}

/// A server on a Unix socket only, in `socket_dir`, a child of the test: it is reaped, where a
/// zombie's pid would still look alive to the restored server's check of `postmaster.pid`.
pub struct Postgres {
    pub data: PathBuf,
    pub socket_dir: String,
    child: Child,
    pub log: PathBuf,
}

impl Postgres {
    pub async fn start(data: &Path, socket_dir: &Path, log: &Path) -> Postgres {
        Self::start_with(data, socket_dir, log, &[]).await
    }

    /// [`Postgres::start`] with server settings (`name=value`, each passed as `-c`).
    pub async fn start_with(data: &Path, socket_dir: &Path, log: &Path, settings: &[&str]) -> Postgres {
        let socket_dir = socket_dir.display().to_string();
        let out = std::fs::File::create(log).expect("log");
        let mut child = as_postgres("postgres")
            .arg("-D")
            .arg(data)
            .args(["-k", &socket_dir, "-c", "listen_addresses=", "-p", "5432"])
            .args(settings.iter().flat_map(|s| ["-c", s]))
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("postgres");
        let ready = || {
            Command::new(Path::new(PG_BIN).join("pg_isready"))
                .args(["-q", "-h", &socket_dir, "-p", "5432"])
                .status()
                .is_ok_and(|s| s.success())
        };
        while !ready() {
            if let Some(st) = child.try_wait().expect("wait") {
                panic!(
                    "postgres exited ({st}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Postgres {
            data: data.to_path_buf(),
            socket_dir,
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn sql(&self, query: &str) -> String {
        pg(
            "psql",
            &["-h", &self.socket_dir, "-p", "5432", "-U", "postgres", "-XAtc", query],
        )
    }

    pub fn stop(mut self) {
        pg_logged(
            "pg_ctl",
            &["-D", &self.data.display().to_string(), "-w", "-m", "fast", "stop"],
            Some(&self.log),
        );
        self.child.wait().expect("reap postgres");
    }
}

impl Drop for Postgres {
    /// A failed test stops its server at once, so the volumes can be unmounted.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            let _ = self.child.wait();
        }
    }
}

/// A directory the `postgres` user owns.
pub fn postgres_dir(path: &Path) {
    std::fs::create_dir_all(path).expect("mkdir");
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success());
}

/// `pgbench` writing TPC-B transactions with `clients` connections until it is killed (at most
/// ten minutes), against a database `pgbench -i` initialised.
pub fn start_pgbench(socket_dir: &str, clients: u32) -> Child {
    as_postgres("pgbench")
        .args(["-h", socket_dir, "-p", "5432", "-U", "postgres", "-n", "-c"])
        .arg(clients.to_string())
        .args(["-T", "600", "postgres"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pgbench (CI installs postgresql-15)")
}
