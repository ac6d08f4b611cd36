//! TLS material for the e2e environment: the cluster's CA, the controller's certificate and the
//! one all nodes share, each used both as server and client (docs/split-mode.md, "TLS";
//! docs/security.md), plus a second, unrelated CA for the callers that must be refused.

use std::path::{Path, PathBuf};

pub use cellar::agent::tls::AGENT_SERVER_NAME as AGENT_NAME;

pub use crate::common::certs::Authority;

/// A process's role, and so its certificate: the controller's names the controller's host, the
/// one all nodes share names `cellar-agent` (docs/security.md).
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Controller,
    Node,
}

impl Role {
    fn stem(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Node => "node",
        }
    }
}

fn files(dir: &Path, role: Role) -> [PathBuf; 3] {
    let stem = role.stem();
    [
        dir.join("ca.pem"),
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    ]
}

/// Writes the cluster's CA and the two certificates, the controller's for `controller_sans` and
/// the nodes' for `node_sans`, into `dir`.
pub fn write(dir: &Path, controller_sans: &[&str], node_sans: &[&str]) {
    Authority::new("cellar e2e CA").write(
        dir,
        &[
            (Role::Controller.stem(), controller_sans),
            (Role::Node.stem(), node_sans),
        ],
    );
}

/// A role's PEM files as read back: CA, certificate, key.
pub fn read(dir: &Path, role: Role) -> [String; 3] {
    files(dir, role).map(|f| std::fs::read_to_string(f).expect("read TLS file"))
}

/// A role's PEM files: certificate, key.
pub fn pair(dir: &Path, role: Role) -> [PathBuf; 2] {
    let [_, cert, key] = files(dir, role);
    [cert, key]
}

/// The `--tls-*` flags of a process of `role`.
pub fn args(dir: &Path, role: Role) -> Vec<String> {
    let [ca, cert, key] = files(dir, role);
    vec![
        format!("--tls-ca={}", ca.display()),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ]
}
