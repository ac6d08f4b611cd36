//! `cellar backup list|show|verify|prune --repository NAME`: the repositories of a pool
//! configuration, read from a shell (a node or the controller pod, or any machine with the same
//! configuration and credentials). Nothing here needs the driver to run.

use std::path::PathBuf;
use std::time::Duration;

use super::{Backups, Throttle};
use crate::storage::config::Config;
use crate::storage::id::{BackupId, PoolName};

/// When the controller prunes its repositories in the background (all-in-one and controller).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct PruneSchedule {
    /// Prune every backup repository this often, in seconds (0: never; `cellar backup prune`
    /// still does).
    #[arg(long, value_name = "SECONDS", default_value_t = 6 * 3600)]
    pub backup_prune_every: u64,
    /// A pack found unused is removed only by a prune this many seconds later; uploads must
    /// finish within it (docs/backups.md).
    #[arg(long, value_name = "SECONDS", default_value_t = 23 * 3600)]
    pub backup_keep_delete: u64,
}

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: BackupCommand,
    /// The driver's pool configuration (its `repositories:`); the default is where the chart mounts it.
    #[arg(long, global = true, default_value = "/etc/cellar/pools.yaml")]
    pub config: PathBuf,
    /// The repository, by its name in the configuration.
    #[arg(long, global = true, default_value = "")]
    pub repository: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum BackupCommand {
    /// cellar's backups in the repository: id, source volume, size, time, restic snapshot.
    List,
    /// One backup, by its snapshot id (backup:<repository>:<key>).
    Show {
        /// The backup's snapshot id, as ListSnapshots and `cellar backup list` show it.
        id: String,
    },
    /// Check the repository (restic's `check`); with --read-data, read and check every pack.
    Verify {
        /// Also read every pack and check its contents (slow: reads the whole repository).
        #[arg(long)]
        read_data: bool,
    },
    /// Remove data no backup references (two phases: see docs/backups.md).
    Prune {
        /// Unused packs are removed only by a prune at least this many seconds after they were
        /// first found unused; uploads must finish within it.
        #[arg(long, default_value_t = 23 * 3600)]
        keep_delete_secs: u64,
    },
}

/// A backup's state as the listing shows it.
fn state(pending: bool) -> &'static str {
    match pending {
        true => "pending",
        false => "ready",
    }
}

fn row(b: &super::BackupInfo, pending: bool) -> serde_json::Value {
    serde_json::json!({
        "id": b.id.to_string(),
        "state": state(pending),
        "name": b.meta.name,
        "sourceVolumeId": b.meta.source_volume_id,
        "layout": b.meta.layout.as_str(),
        "sizeBytes": b.meta.capacity_bytes,
        "dataBytes": b.bytes,
        "node": b.meta.node,
        "createdUnixSecs": b.created_unix_secs,
        "resticSnapshot": b.snapshot,
    })
}

/// Runs the command; `Ok(false)` when it found errors (verify).
pub fn run(args: BackupArgs) -> Result<bool, String> {
    let config = Config::load(&args.config, std::path::Path::new("/var/lib/cellar")).map_err(|e| e.to_string())?;
    let backups = Backups::new(config.repositories, Throttle::unlimited());
    let name = PoolName::parse(&args.repository).map_err(|e| format!("--repository: {}", e.0))?;
    backups.config(&name).map_err(|e| e.to_string())?;
    let print = |v: serde_json::Value, text: String| match args.json {
        true => crate::client::output::print(&format!("{v}\n")),
        false => crate::client::output::print(&text),
    };
    match args.command {
        BackupCommand::List => {
            // Pending ones too (an upload under way, or one a crash left for its retry): they
            // hold data a prune keeps, and only their node's retry makes them ready or removes them.
            let all = backups.list_all(&name).map_err(|e| e.to_string())?;
            let mut text = format!(
                "{:<58} {:<8} {:<40} {:>12} {:<10}\n",
                "ID", "STATE", "SOURCE VOLUME", "SIZE", "SNAPSHOT"
            );
            for (b, pending) in &all {
                text += &format!(
                    "{:<58} {:<8} {:<40} {:>12} {:<10}\n",
                    b.id.to_string(),
                    state(*pending),
                    b.meta.source_volume_id,
                    b.meta.capacity_bytes,
                    &b.snapshot[..b.snapshot.len().min(8)]
                );
            }
            print(
                serde_json::Value::Array(all.iter().map(|(b, pending)| row(b, *pending)).collect()),
                text,
            )?;
            Ok(true)
        }
        BackupCommand::Show { id } => {
            let id = BackupId::parse(&id).map_err(|e| e.0)?;
            if *id.repository() != name {
                return Err(format!(
                    "{id} is in repository '{}', not '{}'",
                    id.repository().as_str(),
                    name.as_str()
                ));
            }
            let (b, pending) = match backups.find(&id).map_err(|e| e.to_string())? {
                Some(b) => (b, false),
                None => (
                    backups
                        .find_even_pending(&id)
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| format!("backup {id} not found"))?,
                    true,
                ),
            };
            let v = row(&b, pending);
            let text = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
            print(v, text)?;
            Ok(true)
        }
        BackupCommand::Verify { read_data } => {
            let v = backups.verify(&name, read_data).map_err(|e| e.to_string())?;
            let mut text = String::new();
            for e in &v.errors {
                text += &format!("error: {e}\n");
            }
            for w in &v.warnings {
                text += &format!("warning: {w}\n");
            }
            text += &format!(
                "{}: {} errors, {} warnings\n",
                if v.errors.is_empty() { "ok" } else { "FAILED" },
                v.errors.len(),
                v.warnings.len()
            );
            print(serde_json::json!({"errors": v.errors, "warnings": v.warnings}), text)?;
            Ok(v.errors.is_empty())
        }
        BackupCommand::Prune { keep_delete_secs } => {
            let p = backups
                .prune(&name, Duration::from_secs(keep_delete_secs))
                .map_err(|e| e.to_string())?;
            print(
                serde_json::json!({"packsMarked": p.packs_marked, "packsRemoved": p.packs_removed, "packsRepacked": p.packs_repacked, "packsRecovered": p.packs_recovered}),
                format!(
                    "pruned: {} packs marked unused, {} removed, {} repacked, {} recovered\n",
                    p.packs_marked, p.packs_removed, p.packs_repacked, p.packs_recovered
                ),
            )?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/backups.md runs `cellar backup list --repository offsite` in the controller pod with no
    /// --config: the default must be the file the chart mounts there (and in the node pods).
    #[test]
    fn the_default_config_is_the_one_the_chart_mounts() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            backup: BackupArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["cellar-backup", "list", "--repository", "offsite"])
            .expect("parses");
        assert_eq!(cli.backup.config, PathBuf::from("/etc/cellar/pools.yaml"));
        for template in [
            include_str!("../../charts/cellar/templates/controller-deployment.yaml"),
            include_str!("../../charts/cellar/templates/node-daemonset.yaml"),
        ] {
            assert!(template.contains("--config=/etc/cellar/pools.yaml"));
        }
    }
}
