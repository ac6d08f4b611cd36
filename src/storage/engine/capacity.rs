//! Sizes and room: what a pool can still hold, expand and modify, and each volume's condition.

use super::*;

impl LocalEngine {
    /// Bytes a new volume of `layout` can still take in `pool`. Image volumes may grow into all of
    /// their capacity, so what existing images have not yet allocated is held back for them.
    pub(super) fn room(&self, pool: &Pool, layout: Layout) -> Result<u64, StorageError> {
        let avail = usage(pool)?.available_bytes;
        if !layout::of(layout).reserves_capacity() {
            return Ok(avail);
        }
        if pool.shared() {
            self.refresh_shared(); // images another replica made hold room too
        }
        Ok(avail.saturating_sub(self.held_back(pool)))
    }

    /// Checks that `bytes` fit in the room a `layout` volume can still take in `pool` (plus
    /// `own`: what this very volume already holds there), and promises them until the returned
    /// guard drops, once the call has recorded its size (or failed). Two creates or expands that
    /// run at once then never both take the same free space. `refuse` words the answer when they
    /// do not fit, given the room.
    pub(super) fn promise<'a>(
        &'a self,
        pool: &Pool,
        layout: Layout,
        bytes: u64,
        own: u64,
        refuse: impl FnOnce(u64) -> StorageError,
    ) -> Result<Promise<'a>, StorageError> {
        let name = &pool.config.name;
        let counter = lock(&self.promised).entry(name.clone()).or_default().clone();
        let mut promised = lock(&counter);
        let room = self.room(pool, layout)?.saturating_sub(*promised).saturating_add(own);
        if bytes > room {
            return Err(refuse(room));
        }
        // Only layouts whose volumes hold their capacity back take from the room (a `dir`
        // volume's capacity is not enforced, a btrfs one's is a qgroup limit on shared space).
        let bytes = if layout::of(layout).reserves_capacity() {
            bytes
        } else {
            0
        };
        *promised += bytes;
        drop(promised);
        Ok(Promise {
            promised: counter,
            bytes,
            _engine: std::marker::PhantomData,
        })
    }

    /// What existing volumes of a pool may still grow into, held back from new ones.
    pub(super) fn held_back(&self, pool: &Pool) -> u64 {
        // The volumes are gathered under the records' lock and measured after it (on a pool with
        // reflinks each image's extents are read): no record look-up waits on the disk.
        let reserving = self
            .store
            .fold_prefix(&self.id_prefix(pool), Vec::new(), |mut all, id, r| {
                let ops = layout::of(r.layout);
                if let Some(v) = VolumeId::parse(id).ok().filter(|_| ops.reserves_capacity()) {
                    all.push((r.layout, r.capacity_bytes, v.0.key));
                }
                all
            });
        reserving
            .into_iter()
            .map(|(l, capacity, key)| layout::of(l).holds_back(pool, capacity, &pool.data_path(Kind::Volume, &key)))
            .sum()
    }

    /// A volume of this node, locked for a change: its pool, the lock, and its record.
    pub(super) fn for_change(&self, id: &VolumeId) -> Result<(&Pool, Held, VolumeRecord), StorageError> {
        let shown = id.to_string();
        let pool = self
            .locate_for_call(&id.0)?
            .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
        let held = self.take(Kind::Volume, &id.0.pool, &id.0.key, &shown)?;
        // A shared pool's record is read now, and a failed read fails the change: a cached copy
        // written back would undo another replica's change (its delete policy, say).
        let rec = match pool.shared() {
            true => layout::volume_record_now(pool, &id.0.key, &shown)?,
            false => self.volume(id),
        };
        Ok((pool, held, rec.ok_or(StorageError::VolumeNotFound(shown))?))
    }

    /// Writes a changed volume record durably, then updates the index.
    pub(super) fn save(&self, pool: &Pool, id: &VolumeId, rec: &VolumeRecord) -> Result<(), StorageError> {
        self.store.put_volume(pool, &id.0.key, rec)
    }

    /// Grows a volume; the flag says whether the node must grow a filesystem too.
    pub fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<(VolumeRecord, bool), StorageError> {
        let shown = id.to_string();
        let (pool, _held, mut rec) = self.for_change(id)?;
        let node_step = layout::of(rec.layout).has_filesystem();
        if range.required == 0 {
            // Only a limit: the volume already is what it will be, if the limit admits it.
            if range.admits(rec.capacity_bytes) {
                return Ok((rec, node_step));
            }
            return Err(StorageError::OutOfRange(format!(
                "volume {shown} has {} bytes, above the limit of {}; volumes cannot shrink",
                rec.capacity_bytes, range.limit
            )));
        }
        let wanted = range.choose()?;
        if wanted <= rec.capacity_bytes {
            if wanted == rec.capacity_bytes || range.admits(rec.capacity_bytes) {
                return Ok((rec, node_step)); // already at least as large and within the limit
            }
            return Err(StorageError::OutOfRange(format!(
                "volume {shown} has {} bytes; volumes cannot shrink (asked for {wanted})",
                rec.capacity_bytes
            )));
        }
        // Invariant 3: every size change is checked against the pool and the room left in it.
        let u = usage(pool)?;
        if wanted > u.total_bytes {
            return Err(StorageError::OutOfRange(format!(
                "volume {shown} cannot grow to {wanted} bytes: pool '{}' holds {} bytes in all",
                id.0.pool.as_str(),
                u.total_bytes
            )));
        }
        let more = wanted - rec.capacity_bytes;
        let _promised = self.promise(pool, rec.layout, more, 0, |room| {
            StorageError::Exhausted(format!(
                "pool '{}' can give {room} more bytes to {} volumes; growing {shown} to {wanted} needs {more}{}",
                id.0.pool.as_str(),
                rec.layout.as_str(),
                room_hint(rec.layout)
            ))
        })?;
        layout::of(rec.layout).set_capacity(pool, &pool.data_path(Kind::Volume, &id.0.key), wanted)?;
        crash::point("expand:before-record");
        rec.capacity_bytes = wanted;
        self.save(pool, id, &rec)?;
        Ok((rec, node_step))
    }

    /// Changes a volume's mutable parameters (ControllerModifyVolume).
    pub fn modify_volume(&self, id: &VolumeId, m: &Mutable) -> Result<VolumeRecord, StorageError> {
        let shown = id.to_string();
        let (pool, _held, mut rec) = self.for_change(id)?;
        if let Some(c) = &m.compression {
            if !layout::of(rec.layout).compresses() {
                return Err(StorageError::Unsupported(format!(
                    "compression applies to btrfs volumes; volume {shown} has layout '{}'",
                    rec.layout.as_str()
                )));
            }
            let data = pool.data_path(Kind::Volume, &id.0.key);
            let before = rec.compression.clone();
            pool.sys
                .subvolumes
                .set_compression(&data, Some(c.as_str()).filter(|c| *c != "none"))?;
            rec.compression = Some(c.clone()).filter(|c| c != "none");
            if let Some(p) = m.delete_policy {
                rec.delete_policy = Some(p);
            }
            // A modify that fails changes nothing: the property goes back as the record has it.
            if let Err(e) = self.save(pool, id, &rec) {
                if let Err(undo) = pool.sys.subvolumes.set_compression(&data, before.as_deref()) {
                    tracing::warn!(volume = %shown, error = %undo, "could not set the volume's compression back after its record failed to save");
                }
                return Err(e);
            }
            return Ok(rec);
        }
        if let Some(p) = m.delete_policy {
            rec.delete_policy = Some(p);
        }
        self.save(pool, id, &rec)?;
        Ok(rec)
    }

    /// Records the size the filesystem inside an image volume now has (the node grew it).
    pub fn set_fs_bytes(&self, id: &VolumeId, bytes: u64) -> Result<(), StorageError> {
        let (pool, _held, mut rec) = self.for_change(id)?;
        if rec.fs_bytes == bytes {
            return Ok(());
        }
        rec.fs_bytes = bytes;
        self.save(pool, id, &rec)
    }

    pub fn condition(&self, id: &VolumeId) -> Condition {
        let (rec, data) = match self.volume_data(id) {
            Ok(found) => found,
            Err(e @ StorageError::PoolBroken { .. }) => {
                return Condition {
                    abnormal: true,
                    message: e.to_string(),
                }
            }
            Err(_) => {
                return Condition {
                    abnormal: true,
                    message: format!("volume {id} {NO_RECORD} {}", self.node.as_str()),
                }
            }
        };
        let pool = self.locate(&id.0);
        if let Some(message) = pool.and_then(|pool| layout::fault(pool, rec.layout, &data)) {
            return Condition {
                abnormal: true,
                message,
            };
        }
        if let (Some(pool), false) = (pool, layout::of(rec.layout).enforces_capacity()) {
            let counted = self.dir_bytes(pool, id, &data, rec.capacity_bytes);
            let held = counted.bytes;
            if counted.too_deep {
                return Condition {
                    abnormal: true,
                    message: format!(
                        "volume {id} {TOO_DEEP_TO_COPY} ({} levels at most): a snapshot, clone or backup \
                         of it is refused until the tree is flattened, and its use is counted down to that \
                         depth only ({held} bytes of its {} capacity)",
                        crate::sys::tree::MAX_DEPTH,
                        rec.capacity_bytes
                    ),
                };
            }
            if held > rec.capacity_bytes {
                return Condition {
                    abnormal: true,
                    message: format!(
                        "volume {id} holds {held} bytes, capacity {}; {UNENFORCED_CAPACITY} \
                         (use layout btrfs or image for a hard limit)",
                        rec.capacity_bytes
                    ),
                };
            }
        }
        Condition {
            abnormal: false,
            message: "volume data is present".into(),
        }
    }

    /// Bytes a dir volume holds, counted at most every `DIR_USAGE_TTL` per volume (a walk of the
    /// whole tree) and only until it passes the capacity, or down to the depth a walk goes.
    pub(super) fn dir_bytes(
        &self,
        pool: &Pool,
        id: &VolumeId,
        data: &std::path::Path,
        capacity: u64,
    ) -> crate::sys::tree::Allocated {
        let key = id.to_string();
        if let Some((at, bytes)) = lock(&self.dir_usage).get(&key) {
            if at.elapsed() < DIR_USAGE_TTL {
                return *bytes;
            }
        }
        let bytes = pool.sys.files.allocated_upto(data, capacity.saturating_add(1));
        let mut cache = lock(&self.dir_usage);
        if cache.len() > 100_000 {
            cache.clear(); // bounded: a cache, not a record
        }
        cache.insert(key, (std::time::Instant::now(), bytes));
        bytes
    }

    /// A page of the listing: at most `n` volumes whose ids come after `after`, in id order, with
    /// their conditions (only theirs are worked out). The first page (`after` empty) reads the
    /// shared pools' records again, as a whole listing does. The volumes of local pools that are
    /// not open are in it as their rosters last recorded them, abnormal.
    pub fn volumes_after(&self, after: &str, n: usize) -> Vec<(VolumeRecord, Condition)> {
        if after.is_empty() {
            self.refresh_shared();
        }
        let mut page = super::with_shut(
            self.store.volumes_after(after, n),
            self.store.shut_volumes_after(after, n),
        );
        page.truncate(n);
        page.into_iter().map(|r| self.with_condition(r)).collect()
    }

    /// Every volume with its condition, in id order: those of shut pools as last recorded.
    pub fn volumes_with_condition(&self) -> Vec<(VolumeRecord, Condition)> {
        super::with_shut(self.volumes(), self.store.shut_volumes())
            .into_iter()
            .map(|r| self.with_condition(r))
            .collect()
    }

    /// A volume for a look-up (ControllerGetVolume), with its condition: one of a local pool that
    /// is not open as its roster last recorded it, abnormal, saying so; FAILED_PRECONDITION for
    /// one the roster does not hold.
    pub fn volume_with_condition(&self, id: &VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError> {
        match self.volume_for_call(id) {
            Ok(found) => Ok(found.map(|r| (r, self.condition(id)))),
            Err(e @ StorageError::PoolBroken { .. }) => match self.store.shut_volume(&id.to_string()) {
                Some(r) => Ok(Some(self.with_condition(r))),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// A listed volume with its condition; one of a local pool that is not open (listed from its
    /// roster) says so, naming this node.
    fn with_condition(&self, r: VolumeRecord) -> (VolumeRecord, Condition) {
        let shut = match &r.id.0.location {
            Location::Local(_) => self.shut_why(&r.id.0.pool),
            Location::Shared => None,
        };
        let c = match shut {
            Some(why) => Condition::shown_while_shut(&r.id.0.pool, self.node.as_str(), &why),
            None => self.condition(&r.id),
        };
        (r, c)
    }

    /// Every pool's status; the first pool whose filesystem cannot be read fails the whole (what
    /// the controller's calls about pools want: GetCapacity of a dead share is UNAVAILABLE, and a
    /// heartbeat then sends the last figures it read).
    pub fn pool_status(&self) -> Result<Vec<PoolStatus>, StorageError> {
        self.pools.values().map(|p| self.status(p)).collect()
    }

    /// Each pool's status on its own, by name: one pool whose filesystem cannot be read (its
    /// directory moved away, its share gone) costs only its own figures, not the others'.
    pub fn pool_statuses(&self) -> Vec<(PoolName, Result<PoolStatus, StorageError>)> {
        self.pools
            .values()
            .map(|p| (p.config.name.clone(), self.status(p)))
            .collect()
    }

    fn status(&self, p: &Pool) -> Result<PoolStatus, StorageError> {
        let u = usage(p)?;
        let provisioned = self
            .store
            .fold_prefix(&self.id_prefix(p), 0u64, |sum, _, r| sum + r.capacity_bytes);
        Ok(PoolStatus {
            name: p.config.name.clone(),
            is_default: p.config.name == self.default_pool,
            default_layout: p.config.default_layout,
            layouts: p.config.layouts.clone(),
            total_bytes: u.total_bytes,
            available_bytes: u.available_bytes,
            image_allocatable_bytes: u.available_bytes.saturating_sub(self.held_back(p)),
            provisioned_bytes: provisioned,
            shared: p.shared(),
        })
    }
}

/// What a room refusal adds for layouts that hold room back (so a full-looking pool is explained).
pub(super) fn room_hint(l: Layout) -> &'static str {
    if layout::of(l).reserves_capacity() {
        " (image volumes reserve their whole capacity, and existing images hold back what they may still \
         grow into; see docs/pools.md)"
    } else {
        ""
    }
}

/// statfs of a pool; on a share it is bounded in time, so a server that is gone answers UNAVAILABLE
/// instead of hanging the call.
pub(super) fn usage(pool: &Pool) -> Result<statfs::FsUsage, StorageError> {
    Ok(if pool.shared() {
        crate::sys::share::usage(pool.root())?
    } else {
        statfs::usage(pool.root())?
    })
}

/// Room promised to one create or expand until it has recorded its size ([`LocalEngine::promise`]).
pub(super) struct Promise<'a> {
    /// Its pool's promised bytes.
    promised: std::sync::Arc<Mutex<u64>>,
    bytes: u64,
    _engine: std::marker::PhantomData<&'a LocalEngine>,
}

impl Drop for Promise<'_> {
    fn drop(&mut self) {
        let mut promised = lock(&self.promised);
        *promised = promised.saturating_sub(self.bytes);
    }
}
