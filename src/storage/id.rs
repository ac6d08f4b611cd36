//! Self-describing volume and snapshot IDs, and the names they are built from.
//!
//! Volumes: `local:<node>:<pool>:<key>` and `shared:<pool>:<key>`.
//! Snapshots: the same with a `snap:` prefix; group snapshots with `group:`. Every part is checked
//! against a narrow grammar, so a key is always exactly one safe path component and can never
//! leave its pool.

use std::fmt;

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(pub String);

fn check(kind: &str, s: &str, max: usize, ok: impl Fn(usize, char) -> bool) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max {
        return Err(IdError(format!("{kind} must be 1 to {max} bytes, got {}", s.len())));
    }
    match s.char_indices().find(|(i, c)| !ok(*i, *c)) {
        Some((_, c)) => Err(IdError(format!(
            "{kind} '{s}' has a character that is not allowed: {c:?}"
        ))),
        None => Ok(()),
    }
}

/// A Kubernetes node name (DNS subdomain characters; never a ':').
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check("node id", s, 253, |i, c| {
            c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '-' | '.' | '_'))
        })?;
        Ok(NodeId(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A pool name: lower-case letters, digits and '-'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolName(String);

impl PoolName {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check("pool name", s, 63, |i, c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || (i > 0 && c == '-')
        })?;
        Ok(PoolName(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The on-disk name of a volume or snapshot inside its pool: one path component.
///
/// A CSI name that is already a safe component (`pvc-<uid>`, the Kubernetes case) is used as is, so
/// an operator recognises it on disk. Any other name maps to `_h` + 32 hex digits of its SHA-256;
/// plain keys never start with '_', so the two forms cannot collide. Names ending in `.json` are
/// hashed too, so a key never looks like another key's record file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

const MAX_PLAIN_KEY: usize = 128;

impl Key {
    pub fn from_name(name: &str) -> Key {
        if Self::is_plain(name) {
            Key(name.to_string())
        } else {
            let digest = Sha256::digest(name.as_bytes());
            Key(format!("_h{}", &hex::encode(digest)[..32]))
        }
    }

    /// A plain key never ends in `.json`, so `<key>.json` (its record) can never be another key's data.
    fn is_plain(s: &str) -> bool {
        !s.is_empty()
            && !s.ends_with(".json")
            && s.len() <= MAX_PLAIN_KEY
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    }

    fn is_hashed(s: &str) -> bool {
        s.len() == 34 && s.starts_with("_h") && s[2..].chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
    }

    pub fn parse(s: &str) -> Result<Key, IdError> {
        if Self::is_plain(s) || Self::is_hashed(s) {
            Ok(Key(s.to_string()))
        } else {
            Err(IdError(format!(
                "'{s}' is not a volume key: expected letters, digits, '-', '_' or '.' (at most {MAX_PLAIN_KEY}, starting with a letter or digit)"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a volume's pool lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    Local(NodeId),
    Shared,
}

/// The parts common to volume and snapshot IDs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub location: Location,
    pub pool: PoolName,
    pub key: Key,
}

impl ObjectId {
    fn parse(s: &str, what: &str) -> Result<Self, IdError> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || {
            IdError(format!(
                "'{s}' is not a cellar {what} ID: expected local:<node>:<pool>:<name> or shared:<pool>:<name>"
            ))
        };
        let (location, pool, key) = match parts.as_slice() {
            ["local", node, pool, key] => (Location::Local(NodeId::parse(node).map_err(|_| bad())?), pool, key),
            ["shared", pool, key] => (Location::Shared, pool, key),
            _ => return Err(bad()),
        };
        Ok(ObjectId {
            location,
            pool: PoolName::parse(pool).map_err(|_| bad())?,
            key: Key::parse(key).map_err(|_| bad())?,
        })
    }

    /// The id after `<prefix>:` (snapshots, group snapshots).
    fn parse_prefixed(s: &str, prefix: &str, what: &str) -> Result<Self, IdError> {
        let rest = s
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(|| {
                IdError(format!(
                    "'{s}' is not a cellar {what} ID: expected {prefix}:local:<node>:<pool>:<name>"
                ))
            })?;
        Self::parse(rest, what)
    }

    pub fn node(&self) -> Option<&NodeId> {
        match &self.location {
            Location::Local(n) => Some(n),
            Location::Shared => None,
        }
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::Local(n) => write!(f, "local:{}:{}:{}", n.0, self.pool.0, self.key.0),
            Location::Shared => write!(f, "shared:{}:{}", self.pool.0, self.key.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub ObjectId);

impl VolumeId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        ObjectId::parse(s, "volume").map(VolumeId)
    }

    /// A volume of a shared pool, reachable from every node.
    pub fn is_shared(&self) -> bool {
        self.0.location == Location::Shared
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub ObjectId);

impl SnapshotId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        ObjectId::parse_prefixed(s, "snap", "snapshot").map(SnapshotId)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "snap:{}", self.0)
    }
}

/// A group snapshot: `group:` and the place of its record (the pool of its first member, by id
/// order), e.g. `group:local:<node>:<pool>:<name>`. Its members are ordinary snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub ObjectId);

impl GroupId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        ObjectId::parse_prefixed(s, "group", "group snapshot").map(GroupId)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group:{}", self.0)
    }
}

/// A snapshot that is also a backup: `backup:<repository>:<key>`. It names the repository, not a
/// node, so it stays usable when the node that cut it is gone (docs/backups.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupId {
    repository: PoolName,
    key: String,
}

impl BackupId {
    pub fn new(repository: PoolName, key: &str) -> Result<Self, IdError> {
        check("backup key", key, 64, |_, c| c.is_ascii_hexdigit() || c == '-')?;
        Ok(BackupId {
            repository,
            key: key.to_string(),
        })
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let rest = s
            .strip_prefix("backup:")
            .ok_or_else(|| IdError(format!("backup id '{s}' does not start with 'backup:'")))?;
        let (repo, key) = rest
            .split_once(':')
            .ok_or_else(|| IdError(format!("backup id '{s}' is not backup:<repository>:<key>")))?;
        let repo = PoolName::parse(repo).map_err(|e| IdError(format!("backup id '{s}': {}", e.0)))?;
        BackupId::new(repo, key)
    }

    /// A new key, for a new backup.
    pub fn fresh(repository: PoolName) -> Self {
        BackupId {
            repository,
            key: uuid::Uuid::new_v4().to_string(),
        }
    }

    pub fn repository(&self) -> &PoolName {
        &self.repository
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backup:{}:{}", self.repository.as_str(), self.key)
    }
}

/// Records hold typed ids: on disk (and in JSON) each is its string form, and a record whose id
/// does not parse is corrupt rather than read as some other object's.
macro_rules! id_as_string {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t>::parse(&s).map_err(|e| serde::de::Error::custom(e.0))
            }
        }
    )*};
}

id_as_string!(VolumeId, SnapshotId, GroupId, BackupId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_kept_on_disk() {
        assert_eq!(Key::from_name("pvc-0a1b-2c3d").as_str(), "pvc-0a1b-2c3d");
    }

    #[test]
    fn unsafe_names_are_hashed_into_one_component() {
        for name in [
            "../etc",
            "a/b",
            "/abs",
            ".hidden",
            "",
            "x y",
            "ü",
            "x.json",
            &"n".repeat(300),
        ] {
            let k = Key::from_name(name);
            assert!(k.as_str().starts_with("_h"), "{name}");
            assert!(!k.as_str().contains('/'));
            assert_eq!(Key::parse(k.as_str()).unwrap(), k);
        }
        assert_ne!(Key::from_name("a/b"), Key::from_name("a/c"));
    }

    #[test]
    fn ids_round_trip() {
        let id = VolumeId::parse("local:node-1:default:pvc-1").unwrap();
        assert_eq!(id.to_string(), "local:node-1:default:pvc-1");
        assert_eq!(id.0.node().unwrap().as_str(), "node-1");
        let s = SnapshotId::parse("snap:shared:nfs:snap-1").unwrap();
        assert_eq!(s.to_string(), "snap:shared:nfs:snap-1");
    }

    #[test]
    fn ids_that_try_to_escape_are_rejected() {
        for bad in [
            "local:n:default:..",
            "local:n:default:.",
            "local:n:default:a/b",
            "local:n:default:/etc",
            "local:n:../x:v",
            "local:n:default:v:extra",
            "shared:default",
            "nfs:default:v",
            "",
            "local:n:Default:v",
            "local::default:v",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad}");
        }
        assert!(SnapshotId::parse("local:n:default:v").is_err());
        assert!(GroupId::parse("snap:local:n:default:v").is_err());
        assert!(GroupId::parse("group:local:n:default:../v").is_err());
    }

    #[test]
    fn group_ids_round_trip() {
        let g = GroupId::parse("group:local:node-1:default:groupsnapshot-1").unwrap();
        assert_eq!(g.to_string(), "group:local:node-1:default:groupsnapshot-1");
        assert_eq!(g.0.node().unwrap().as_str(), "node-1");
    }
}

/// A static volume: an existing directory of a shared pool, named in a PV's volumeHandle as
/// `static:<pool>:<relative/path>` (no `..`, no `.`, no empty or absolute part).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StaticId {
    pub pool: PoolName,
    pub path: std::path::PathBuf,
}

impl StaticId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let bad = |why: &str| {
            IdError(format!(
                "'{s}' is not a static volume handle ({why}): expected static:<pool>:<relative/path>"
            ))
        };
        let rest = s.strip_prefix("static:").ok_or_else(|| bad("no static: prefix"))?;
        let (pool, path) = rest.split_once(':').ok_or_else(|| bad("no pool"))?;
        let pool = PoolName::parse(pool).map_err(|_| bad("bad pool name"))?;
        Ok(StaticId {
            pool,
            path: relative_path(path).map_err(|e| bad(&e))?,
        })
    }
}

impl fmt::Display for StaticId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "static:{}:{}", self.pool.0, self.path.display())
    }
}

/// A relative path whose every part is a plain name: what a user may name below a pool.
pub fn relative_path(p: &str) -> Result<std::path::PathBuf, String> {
    if p.is_empty() || p.len() > 1024 {
        return Err("the path must be 1 to 1024 bytes".into());
    }
    if p.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    let parts: Vec<&str> = p.split('/').collect();
    if parts.iter().any(|c| c.is_empty() || *c == "." || *c == "..") {
        return Err("every part must be a plain name (no '', '.', '..' or leading '/')".into());
    }
    Ok(std::path::PathBuf::from(p))
}

#[cfg(test)]
mod static_tests {
    use super::*;

    #[test]
    fn static_handles_name_paths_below_their_pool() {
        let s = StaticId::parse("static:nfs:datasets/imagenet").unwrap();
        assert_eq!(s.pool.as_str(), "nfs");
        assert_eq!(s.path, std::path::PathBuf::from("datasets/imagenet"));
        assert_eq!(s.to_string(), "static:nfs:datasets/imagenet");
        for bad in [
            "static:nfs:",
            "static:nfs:/etc",
            "static:nfs:a/../b",
            "static:nfs:a//b",
            "static:nfs:.",
            "static:NFS:a",
            "nfs:a",
            "static:nfs",
        ] {
            assert!(StaticId::parse(bad).is_err(), "{bad}");
        }
    }
}
