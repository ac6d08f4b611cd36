//! The pool configuration file (YAML). With no file, one local `dir` pool named `default` lives under
//! `<data-dir>/pools/default`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::id::PoolName;
use super::record::Layout;
use crate::sys::fstools::FsType;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub pools: Vec<PoolConfig>,
    /// The pool used when a StorageClass names none.
    pub default_pool: PoolName,
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
}

fn local() -> Backend {
    Backend::Local
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
            }],
            default_pool: name,
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
            if p.backend == Backend::Shared {
                return Err(invalid(format!(
                    "pool '{}': the shared backend is not available in this version",
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
            let path = match p.path {
                Some(path) if path.is_absolute() => path,
                Some(path) => {
                    return Err(invalid(format!(
                        "pool '{}': path '{}' must be absolute",
                        p.name,
                        path.display()
                    )))
                }
                None => data_dir.join("pools").join(name.as_str()),
            };
            let fs_type = match &p.fs_type {
                None => FsType::Ext4,
                Some(f) => FsType::parse(f)
                    .ok_or_else(|| invalid(format!("pool '{}': unknown fsType '{f}' (known: ext4, xfs)", p.name)))?,
            };
            pools.push(PoolConfig {
                fs_type,
                name,
                backend: p.backend,
                path,
                default_layout,
                layouts,
                delete_policy: p.delete_policy,
            });
        }
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
        Ok(Config { pools, default_pool })
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
        assert!(parse("pools:\n  - name: a\n  - name: a\n").is_err());
        assert!(parse("pools:\n  - name: a\n    layout: zfs\n").is_err());
        assert!(parse("pools:\n  - name: a\n    deletePolicy: keep\n").is_err());
        assert!(parse("pools:\n  - name: a\n    fsType: zfs\n").is_err());
    }
}
