//! The pools of an engine: every configured pool this process uses, open or not yet. A pool that
//! could not be opened at start (a share whose server was down, a disk not mounted yet) is tried
//! again in the background ([`LocalEngine::start_reopener`]) and, once open, stays open for the
//! life of the process. The set of pools never changes and an open pool is never replaced, so a
//! `&Pool` lives as long as the engine and no call holds a lock to use one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::{lock, LocalEngine};
use crate::storage::config::PoolConfig;
use crate::storage::id::PoolName;
use crate::storage::pool::Pool;
use crate::storage::roster::Roster;
use crate::storage::StorageError;

/// How long a pool that could not be opened waits before the next try.
pub(super) const REOPEN_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Slot {
    pub(super) config: PoolConfig,
    /// Whether this process owns the pool (see [`Pool::open_as`]).
    pub(super) owner: bool,
    open: OnceLock<Pool>,
    /// Why the last try to open it failed, while it is not open.
    why: Mutex<String>,
    /// Held by a try to open it.
    trying: Mutex<()>,
    /// Its root as configured and as it resolved at start, while it is not open
    /// ([`LocalEngine::pool_managing`]); empty for a pool that opened at start.
    pub(super) roots: Vec<PathBuf>,
}

impl Slot {
    pub(super) fn opened(config: PoolConfig, owner: bool, pool: Pool) -> Slot {
        let open = OnceLock::new();
        let _ = open.set(pool);
        Slot {
            config,
            owner,
            open,
            why: Mutex::new(String::new()),
            trying: Mutex::new(()),
            roots: Vec::new(),
        }
    }

    pub(super) fn broken(config: PoolConfig, owner: bool, why: String, roots: Vec<PathBuf>) -> Slot {
        Slot {
            config,
            owner,
            open: OnceLock::new(),
            why: Mutex::new(why),
            trying: Mutex::new(()),
            roots,
        }
    }

    pub(super) fn pool(&self) -> Option<&Pool> {
        self.open.get()
    }

    /// Why it is not open; `None` once it is.
    pub(super) fn why(&self) -> Option<String> {
        match self.open.get() {
            Some(_) => None,
            None => Some(lock(&self.why).clone()),
        }
    }
}

/// The pools by name; the lookups see open pools only.
#[derive(Default)]
pub(super) struct Pools(pub(super) BTreeMap<PoolName, Slot>);

impl Pools {
    pub(super) fn get(&self, name: &PoolName) -> Option<&Pool> {
        self.0.get(name).and_then(Slot::pool)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&PoolName, &Pool)> {
        self.0.iter().filter_map(|(n, s)| s.pool().map(|p| (n, p)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Pool> {
        self.iter().map(|(_, p)| p)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &PoolName> {
        self.iter().map(|(n, _)| n)
    }

    /// The pools not open (yet), with why.
    pub(super) fn broken(&self) -> impl Iterator<Item = (&PoolName, &Slot, String)> {
        self.0.iter().filter_map(|(n, s)| s.why().map(|why| (n, s, why)))
    }
}

impl LocalEngine {
    /// Tries once more to open each pool that is not open, as its start would have: its records
    /// are read into the store before any call can see it. Answers the pools that opened now.
    pub fn reopen_broken(&self) -> Vec<PoolName> {
        let opened: Vec<PoolName> = self
            .pools
            .0
            .iter()
            .filter(|(name, slot)| self.reopen(name, slot))
            .map(|(name, _)| name.clone())
            .collect();
        if !opened.is_empty() {
            self.resume_uploads_if_started();
        }
        opened
    }

    /// One try to open the pool of `slot`, unless it is open or another try runs: whether it
    /// opened now.
    fn reopen(&self, name: &PoolName, slot: &Slot) -> bool {
        let Ok(_one_at_a_time) = slot.trying.try_lock() else {
            return false;
        };
        if slot.pool().is_some() {
            return false;
        }
        match self.open_later(slot) {
            Ok(pool) => {
                let opened = slot.open.set(pool).is_ok();
                self.store.opened(name);
                if opened {
                    tracing::info!(pool = name.as_str(), "pool opened; its volumes are served again");
                }
                opened
            }
            Err(e) => {
                let why = e.to_string();
                let mut last = lock(&slot.why);
                if *last != why {
                    tracing::warn!(
                        pool = name.as_str(),
                        error = why,
                        "pool still cannot be opened; trying again"
                    );
                    *last = why;
                }
                false
            }
        }
    }

    fn open_later(&self, slot: &Slot) -> Result<Pool, StorageError> {
        let pool = open_pool(&slot.config, &self.node, slot.owner, &self.sys, self.store.roster())?;
        self.store.add(&pool)?;
        self.thaw_left_frozen_in(&pool);
        crate::crash::point("reopen:before-open");
        Ok(pool)
    }

    /// Uploads of snapshots in pools that opened late, as a start would resume them (only in a
    /// process that started its uploads).
    fn resume_uploads_if_started(&self) {
        if self.me.get().is_some() {
            self.resume_uploads();
        }
    }

    /// Tries to open each pool that is not open every [`REOPEN_EVERY`], in the background, each
    /// on a thread of its own (a share whose server hangs a try holds up only its own pool), and
    /// calls `opened` with each that opens; each thread ends when its pool is open or the engine
    /// is dropped.
    pub fn start_reopener(self: &std::sync::Arc<Self>, opened: impl Fn(&PoolName) + Send + Sync + 'static) {
        let opened = std::sync::Arc::new(opened);
        for (name, _, _) in self.pools.broken() {
            let (weak, name, opened) = (std::sync::Arc::downgrade(self), name.clone(), opened.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("cellar-reopen-{}", name.as_str()))
                .spawn(move || loop {
                    let name = &name;
                    std::thread::sleep(REOPEN_EVERY);
                    let Some(engine) = weak.upgrade() else { return };
                    let Some(slot) = engine.pools.0.get(name) else { return };
                    if engine.reopen(name, slot) {
                        engine.resume_uploads_if_started();
                    }
                    // Open, by this try or another (`reopen_broken`): told once, then done.
                    if slot.pool().is_some() {
                        opened(name);
                        return;
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start retrying a pool that did not open; a restart opens it");
            }
        }
    }
}

/// Opens a pool ([`Pool::open_as`]); a local one, with the node's rosters kept, only where its
/// directory is the pool this node opened there before, and marked as such once open
/// (`storage/roster.rs`).
pub(super) fn open_pool(
    config: &PoolConfig,
    node: &crate::storage::id::NodeId,
    owner: bool,
    sys: &crate::sys::StorageSys,
    roster: Option<&Roster>,
) -> Result<Pool, StorageError> {
    let roster = roster.filter(|_| !config.is_shared());
    if let Some(r) = roster {
        r.check_identity(&config.name, &config.path)?;
    }
    let pool = Pool::open_as(config.clone(), node, owner, sys.clone())?;
    if let Some(r) = roster {
        r.settle_identity(&config.name, &config.path)?;
    }
    Ok(pool)
}
