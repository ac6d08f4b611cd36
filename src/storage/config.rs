//! The pool configuration file (YAML). With no file, one local `dir` pool named `default` lives under
//! `<data-dir>/pools/default`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::id::PoolName;
use super::record::Layout;
use crate::sys::fstools::FsType;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Local,
    Shared,
}

/// What DeleteVolume does with a volume's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeletePolicy {
    #[default]
    Delete,
    Retain,
    Archive,
}

impl DeletePolicy {
    pub fn parse(s: &str) -> Option<DeletePolicy> {
        match s {
            "delete" => Some(DeletePolicy::Delete),
            "retain" => Some(DeletePolicy::Retain),
            "archive" => Some(DeletePolicy::Archive),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: PoolName,
    pub backend: Backend,
    pub path: PathBuf,
    pub default_layout: Layout,
    pub layouts: Vec<Layout>,
    pub delete_policy: DeletePolicy,
    /// Filesystem made inside `image` volumes when the request names none.
    pub fs_type: FsType,
    /// Shared pools that cellar mounts itself (on the controller and on every node, always with
    /// these options), at `path`.
    pub share: Option<Share>,
    /// Shared pools: how a volume's directory is named from the PVC (see docs/shared.md).
    pub name_template: Option<String>,
    /// Shared pools: how long an image volume's lease lasts unrenewed before another node may take
    /// the volume over (see storage/lease.rs).
    pub lease_seconds: u64,
}

impl PoolConfig {
    /// A pool on a filesystem every node mounts, rather than one node's own disk.
    pub fn is_shared(&self) -> bool {
        self.backend == Backend::Shared
    }
}

/// Default lease time of image volumes on shared pools.
pub const DEFAULT_LEASE_SECONDS: u64 = 30;

/// A shared filesystem cellar mounts: `mount -t <fs_type> -o <options> <source> <path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub source: String,
    pub fs_type: String,
    pub options: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub pools: Vec<PoolConfig>,
    /// The pool used when a StorageClass names none.
    pub default_pool: PoolName,
    /// Backup repositories (docs/backups.md), by the name a VolumeSnapshotClass gives.
    pub repositories: Vec<crate::backup::RepositoryConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileConfig {
    #[serde(default)]
    default_pool: Option<String>,
    pools: Vec<FilePool>,
    #[serde(default)]
    repositories: Vec<crate::backup::FileRepository>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePool {
    name: String,
    #[serde(default = "local")]
    backend: Backend,
    path: Option<PathBuf>,
    #[serde(default)]
    layout: Option<String>,
    #[serde(default)]
    layouts: Vec<String>,
    #[serde(default)]
    delete_policy: DeletePolicy,
    #[serde(default)]
    fs_type: Option<String>,
    /// Shared pools mounted by cellar: what to mount.
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    mount_options: Vec<String>,
    /// Shared pools: the filesystem made inside image volumes (fsType names the share's type there).
    #[serde(default)]
    image_fs_type: Option<String>,
    #[serde(default)]
    name_template: Option<String>,
    #[serde(default)]
    lease_seconds: Option<u64>,
}

fn local() -> Backend {
    Backend::Local
}

/// Whether a configured path is absolute and has no `..`: the chart mounts a pool's directory from
/// the host when its path lies under the data directory, compared as written, so
/// `/var/lib/cellar/../../srv/data` would pass that test and put the pool in the container's own
/// filesystem, gone with the container.
pub fn plain_absolute(path: &Path) -> bool {
    path.is_absolute() && !path.components().any(|c| c == std::path::Component::ParentDir)
}

/// Refuses pools whose directories overlap, and pools that hold the data dir or lie in its node
/// state, compared as written (a pool's open compares the real directories: [`super::pool`]'s
/// mark). A pool's start removes what no record of its own names in its `volumes`, `snapshots`,
/// `.work` and `.trash`: a pool at the same path, holding another, or inside what another
/// manages ([`super::pool::reaches_into`]) loses that pool's volumes, copies in progress or whole
/// root there, and where it does not, each lists and answers for the other's volumes. A pool in
/// another's root beside those (`/data` and `/data/fast`) is kept apart by the static volumes'
/// checks and allowed.
fn separate_places(pools: &[PoolConfig], data_dir: &Path) -> Result<(), String> {
    // The node's mount state, and its pools' rosters and the marks it remembers.
    let node_state = [data_dir.join("node"), data_dir.join("rosters")];
    for (i, p) in pools.iter().enumerate() {
        let (name, path) = (p.name.as_str(), p.path.display());
        for q in &pools[..i] {
            let other = q.name.as_str();
            if p.path == q.path {
                return Err(format!(
                    "pools '{other}' and '{name}' have the same path '{path}': give each pool a directory of its own"
                ));
            }
            let (outer, inner) = match (p.path.starts_with(&q.path), q.path.starts_with(&p.path)) {
                (true, _) => (&q.path, &p.path),
                (_, true) => (&p.path, &q.path),
                _ => continue,
            };
            if super::pool::reaches_into(outer, inner) {
                return Err(format!(
                    "pools '{other}' and '{name}' overlap ('{}' and '{path}'): one holds the other in its volumes, snapshots or dot-directories, which its start clears of what it did not record; give each pool a directory of its own, beside the other",
                    q.path.display()
                ));
            }
        }
        if data_dir.starts_with(&p.path) {
            return Err(format!(
                "pool '{name}': path '{path}' holds the data dir '{}' (this node's state, the default place of other pools): give the pool a directory beside it, such as '{}'",
                data_dir.display(),
                data_dir.join("pools").join(name).display()
            ));
        }
        if let Some(state) = node_state.iter().find(|s| p.path.starts_with(s)) {
            return Err(format!(
                "pool '{name}': path '{path}' lies in '{}', this node's state: give the pool a directory outside it, such as '{}'",
                state.display(),
                data_dir.join("pools").join(name).display()
            ));
        }
    }
    Ok(())
}

impl Config {
    pub fn default_for(data_dir: &Path) -> Config {
        let name = PoolName::parse("default").expect("'default' is a valid pool name");
        Config {
            pools: vec![PoolConfig {
                path: data_dir.join("pools").join("default"),
                name: name.clone(),
                backend: Backend::Local,
                default_layout: Layout::Dir,
                layouts: vec![Layout::Dir],
                delete_policy: DeletePolicy::Delete,
                fs_type: FsType::Ext4,
                share: None,
                name_template: None,
                lease_seconds: DEFAULT_LEASE_SECONDS,
            }],
            default_pool: name,
            repositories: Vec::new(),
        }
    }

    pub fn load(path: &Path, data_dir: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, data_dir)
    }

    pub fn parse(text: &str, path: &Path, data_dir: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: FileConfig = serde_yaml_ng::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if file.pools.is_empty() {
            return Err(invalid("no pools: list at least one under 'pools'".into()));
        }
        let mut pools: Vec<PoolConfig> = Vec::new();
        for p in file.pools {
            let name = PoolName::parse(&p.name).map_err(|e| invalid(e.0))?;
            if pools.iter().any(|q| q.name == name) {
                return Err(invalid(format!("pool '{}' is listed twice", p.name)));
            }
            let shared = p.backend == Backend::Shared;
            if !shared
                && (p.source.is_some()
                    || !p.mount_options.is_empty()
                    || p.name_template.is_some()
                    || p.image_fs_type.is_some()
                    || p.lease_seconds.is_some())
            {
                return Err(invalid(format!(
                    "pool '{}': source, mountOptions, nameTemplate, imageFsType and leaseSeconds belong to shared pools (backend: shared); a local pool's image filesystem is fsType",
                    p.name
                )));
            }
            let parse_layout = |s: &str| {
                Layout::parse(s).ok_or_else(|| {
                    invalid(format!(
                        "pool '{}': unknown layout '{s}' (known: dir, btrfs, image)",
                        p.name
                    ))
                })
            };
            let mut layouts = p
                .layouts
                .iter()
                .map(|s| parse_layout(s))
                .collect::<Result<Vec<_>, _>>()?;
            let default_layout = match &p.layout {
                Some(l) => parse_layout(l)?,
                None => layouts.first().copied().unwrap_or(Layout::Dir),
            };
            if !layouts.contains(&default_layout) {
                layouts.push(default_layout);
            }
            let share = match (&p.source, shared) {
                (Some(source), true) => {
                    let fs = p.fs_type.clone().ok_or_else(|| {
                        invalid(format!(
                            "pool '{}': a source needs its fsType (nfs, glusterfs, ceph ...)",
                            p.name
                        ))
                    })?;
                    Some(Share {
                        source: source.clone(),
                        fs_type: fs,
                        options: p.mount_options.join(","),
                    })
                }
                (None, true) if p.path.is_none() => {
                    return Err(invalid(format!(
                        "pool '{}': a shared pool needs a path (already mounted on every node) or a source to mount",
                        p.name
                    )))
                }
                _ => None,
            };
            if let Some(t) = &p.name_template {
                super::naming::check_template(t)
                    .map_err(|e| invalid(format!("pool '{}': nameTemplate: {e}", p.name)))?;
            }
            if shared && layouts.contains(&Layout::Btrfs) {
                return Err(invalid(format!(
                    "pool '{}': shared pools serve the dir and image layouts (btrfs is local only)",
                    p.name
                )));
            }
            let path = match p.path {
                Some(path) if plain_absolute(&path) => path,
                Some(path) => {
                    return Err(invalid(format!(
                        "pool '{}': path '{}' must be absolute, without '..'",
                        p.name,
                        path.display()
                    )))
                }
                None if share.is_some() => data_dir.join("shares").join(name.as_str()),
                None => data_dir.join("pools").join(name.as_str()),
            };
            let image_fs = if shared { &p.image_fs_type } else { &p.fs_type };
            let fs_type = match image_fs {
                None => FsType::Ext4,
                Some(f) => FsType::parse(f)
                    .ok_or_else(|| invalid(format!("pool '{}': unknown fsType '{f}' (known: ext4, xfs)", p.name)))?,
            };
            let lease_seconds = p.lease_seconds.unwrap_or(DEFAULT_LEASE_SECONDS);
            if !(3..=3600).contains(&lease_seconds) {
                return Err(invalid(format!(
                    "pool '{}': leaseSeconds {lease_seconds} is out of range (3 to 3600)",
                    p.name
                )));
            }
            pools.push(PoolConfig {
                lease_seconds,
                fs_type,
                share,
                name_template: p.name_template.clone(),
                name,
                backend: p.backend,
                path,
                default_layout,
                layouts,
                delete_policy: p.delete_policy,
            });
        }
        separate_places(&pools, data_dir).map_err(invalid)?;
        let default_pool = match file.default_pool {
            Some(d) => {
                let d = PoolName::parse(&d).map_err(|e| invalid(e.0))?;
                if !pools.iter().any(|p| p.name == d) {
                    return Err(invalid(format!("defaultPool '{}' is not one of the pools", d.as_str())));
                }
                d
            }
            None => pools[0].name.clone(),
        };
        let repositories = crate::backup::RepositoryConfig::from_file(file.repositories).map_err(invalid)?;
        Ok(Config {
            pools,
            default_pool,
            repositories,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("pools.yaml"), Path::new("/var/lib/cellar"))
    }

    #[test]
    fn minimal_pool_gets_defaults() {
        let c = parse("pools:\n  - name: fast\n").unwrap();
        assert_eq!(c.pools[0].path, PathBuf::from("/var/lib/cellar/pools/fast"));
        assert_eq!(c.pools[0].default_layout, Layout::Dir);
        assert_eq!(c.default_pool.as_str(), "fast");
    }

    #[test]
    fn full_pool_entry_parses() {
        let c = parse(
            "defaultPool: img\npools:\n  - name: fast\n    layout: btrfs\n    layouts: [btrfs, dir]\n  - name: img\n    path: /srv/img\n    layout: image\n    fsType: xfs\n    deletePolicy: archive\n",
        )
        .unwrap();
        assert_eq!(c.default_pool.as_str(), "img");
        assert_eq!(c.pools[0].layouts, vec![Layout::Btrfs, Layout::Dir]);
        assert_eq!(c.pools[1].fs_type, FsType::Xfs);
        assert_eq!(c.pools[1].delete_policy, DeletePolicy::Archive);
    }

    #[test]
    fn shared_pools_take_a_path_or_a_source() {
        let c = parse(
            "pools:\n  - name: nfs\n    backend: shared\n    source: 10.0.0.1:/export\n    fsType: nfs\n    mountOptions: [nfsvers=4.1, hard]\n    nameTemplate: \"${pvc.namespace}-${pvc.name}\"\n  - name: cephfs\n    backend: shared\n    path: /mnt/cephfs/k8s\n",
        )
        .unwrap();
        let share = c.pools[0].share.clone().unwrap();
        assert_eq!(share.options, "nfsvers=4.1,hard");
        assert_eq!(c.pools[0].path, PathBuf::from("/var/lib/cellar/shares/nfs"));
        assert!(c.pools[1].share.is_none());
        assert_eq!(c.pools[1].lease_seconds, DEFAULT_LEASE_SECONDS);
        let c = parse("pools:\n  - name: s\n    backend: shared\n    path: /x\n    leaseSeconds: 5\n").unwrap();
        assert_eq!(c.pools[0].lease_seconds, 5);
        for bad in ["leaseSeconds: 1", "leaseSeconds: 100000", "leaseSeconds: -3"] {
            assert!(
                parse(&format!(
                    "pools:\n  - name: s\n    backend: shared\n    path: /x\n    {bad}\n"
                ))
                .is_err(),
                "{bad}"
            );
        }
        assert!(
            parse("pools:\n  - name: s\n    path: /x\n    leaseSeconds: 5\n").is_err(),
            "a lease time on a local pool"
        );
        assert!(
            parse("pools:\n  - name: s\n    backend: shared\n").is_err(),
            "path or source"
        );
        assert!(
            parse("pools:\n  - name: s\n    backend: shared\n    source: x:/y\n").is_err(),
            "fsType"
        );
        assert!(
            parse("pools:\n  - name: s\n    source: x:/y\n    fsType: nfs\n").is_err(),
            "local"
        );
        assert!(parse("pools:\n  - name: s\n    backend: shared\n    path: /x\n    layout: btrfs\n").is_err());
        assert!(
            parse("pools:\n  - name: s\n    backend: shared\n    path: /x\n    nameTemplate: \"a/${pvc.name}\"\n")
                .is_err()
        );
    }

    #[test]
    fn image_fs_type_on_a_local_pool_is_refused() {
        // docs/pools.md: the shared pools' keys are errors on a local pool. A local pool's image
        // filesystem is `fsType`; `imageFsType` there was once ignored, making ext4 where xfs was meant.
        let e = parse("pools:\n  - name: s\n    path: /x\n    layout: image\n    imageFsType: xfs\n")
            .expect_err("imageFsType on a local pool")
            .to_string();
        assert!(e.contains("imageFsType"), "{e}");
        let c = parse("pools:\n  - name: s\n    backend: shared\n    path: /x\n    imageFsType: xfs\n").unwrap();
        assert_eq!(c.pools[0].fs_type, FsType::Xfs);
    }

    #[test]
    fn pools_sharing_a_directory_are_refused() {
        for (a, b, why) in [
            ("/data", "/data", "have the same path '/data'"),
            ("/data/", "/data", "have the same path"),
            ("/data", "/data/./volumes", "overlap"),
            ("/data/volumes/x", "/data", "overlap"),
            ("/data", "/data/.trash/x", "overlap"),
            ("/data", "/data/Snapshots", "overlap"),
        ] {
            let e = parse(&format!(
                "pools:\n  - name: a\n    path: {a}\n  - name: b\n    backend: shared\n    path: {b}\n"
            ))
            .expect_err("one directory, two pools")
            .to_string();
            assert!(e.contains("pools 'a' and 'b'") && e.contains(why), "{e}");
        }
        // A pool without a path has its place under the data dir, compared the same.
        let e = parse("pools:\n  - name: a\n  - name: b\n    path: /var/lib/cellar/pools/a/snapshots/b\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlap ('/var/lib/cellar/pools/a' and"), "{e}");
        // Beside each other, or one in the other's root outside what that one manages.
        for (a, b) in [
            ("/data/a", "/data/ab"),
            ("/data", "/data/fast"),
            ("/data", "/data/retained-not"),
        ] {
            assert!(
                parse(&format!(
                    "pools:\n  - name: a\n    path: {a}\n  - name: b\n    path: {b}\n"
                ))
                .is_ok(),
                "{a} {b}"
            );
        }
    }

    #[test]
    fn a_pool_holding_the_data_dir_or_inside_its_node_state_is_refused() {
        for path in ["/", "/var/lib", "/var/lib/cellar"] {
            let e = parse(&format!("pools:\n  - name: a\n    path: {path}\n"))
                .expect_err(path)
                .to_string();
            assert!(
                e.contains("holds the data dir '/var/lib/cellar'") && e.contains("'/var/lib/cellar/pools/a'"),
                "{e}"
            );
        }
        for path in [
            "/var/lib/cellar/node",
            "/var/lib/cellar/node/pool",
            "/var/lib/cellar/rosters/p",
        ] {
            let e = parse(&format!("pools:\n  - name: a\n    path: {path}\n"))
                .expect_err(path)
                .to_string();
            assert!(e.contains("this node's state"), "{e}");
        }
        assert!(parse("pools:\n  - name: a\n    path: /var/lib/cellar/nodes\n").is_ok());
        assert!(parse("pools:\n  - name: a\n    path: /var/lib/cellar-pools\n").is_ok());
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("pools:\n  - name: fast\n    colour: blue\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn relative_paths_and_duplicates_are_refused() {
        assert!(parse("pools:\n  - name: a\n    path: rel\n").is_err());
        let e = parse("pools:\n  - name: a\n    path: /var/lib/cellar/../../srv/data\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("without '..'"), "{e}");
        assert!(parse("pools:\n  - name: a\n    path: /srv/data..old\n").is_ok());
        let e =
            parse("pools:\n  - name: a\nrepositories:\n  - name: r\n    path: /backups/../etc\n    passwordFile: /k\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("repository 'r'") && e.contains("without '..'"), "{e}");
        assert!(
            parse("pools:\n  - name: a\nrepositories:\n  - name: r\n    path: /backups\n    passwordFile: /k\n")
                .is_ok()
        );
        assert!(parse("pools:\n  - name: a\n  - name: a\n").is_err());
        assert!(parse("pools:\n  - name: a\n    layout: zfs\n").is_err());
        assert!(parse("pools:\n  - name: a\n    deletePolicy: keep\n").is_err());
        assert!(parse("pools:\n  - name: a\n    fsType: zfs\n").is_err());
    }
}
