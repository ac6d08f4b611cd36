//! CreateVolume and its copies: the plan (every check before anything is made), the making, the
//! record, and imports and exports of a volume's data between nodes.

use super::capacity::room_hint;
use super::*;

impl LocalEngine {
    pub fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
        let p = match self.plan(&req)? {
            Plan::Exists(rec) => return Ok(rec),
            Plan::New(p) => p,
        };
        let (pool, key, _held) = (p.pool, p.key.clone(), p.hold());
        let made = match req.source.as_ref().and_then(Source::backup) {
            Some(b) => self.restore_planned(p, &req, b),
            None => self.make_volume(p, &req),
        };
        self.undo_unrecorded(pool, Kind::Volume, &key, made)
    }

    /// Makes a planned volume's data and its record.
    pub(super) fn make_volume(&self, mut p: Planned<'_>, req: &NewVolume) -> Result<VolumeRecord, StorageError> {
        let pool = p.pool;
        let data = pool.data_path(Kind::Volume, &p.key);
        let fs_bytes = match &req.source {
            None => {
                let fs = FsType::parse(&p.fs_type).unwrap_or(pool.config.fs_type);
                let made = layout::create_empty(pool, &p.key, p.layout, p.capacity, req.mode, fs)?;
                if layout::of(p.layout).is_tree() {
                    set_owner(pool, &data, req.owner)?;
                }
                made.fs_bytes
            }
            Some(src) => {
                // Its own id names no volume yet (the plan found none under this name): NOT_FOUND,
                // where taking its lock a second time would answer ABORTED to every retry.
                if matches!(src, Source::Volume(v) if *v == p.id) {
                    return Err(StorageError::VolumeNotFound(format!(
                        "{} (the source; a volume cannot be made from itself)",
                        p.id
                    )));
                }
                let from = self.source_data(src)?;
                same_kind(p.layout, req.mode, p.capacity, from.layout, from.mode, from.size)?;
                if layout::of(p.layout).has_filesystem() && req.mode == VolumeMode::Filesystem {
                    p.fs_type = copy_fs_type(pool, &from.path, &req.fs_type)?;
                }
                layout::create_copy(pool, Kind::Volume, &p.key, p.layout, &from.path, true, false)?;
                layout::of(p.layout).set_capacity(pool, &data, p.capacity)?;
                from.fs_bytes
            }
        };
        self.record_new(p, req, fs_bytes)
    }

    /// Everything CreateVolume checks before it makes anything: the pool, layout, modes, size and
    /// room; the volume's key, id and lock; or the volume already made under that name.
    pub(super) fn plan(&self, req: &NewVolume) -> Result<Plan<'_>, StorageError> {
        let pool_name = req.pool.clone().unwrap_or_else(|| self.default_pool.clone());
        // A volume of this name in a pool that is not open, as its roster recorded it: the create
        // answers it once the pool opens. Until then UNAVAILABLE, which the provisioner retries
        // and keeps tracking (a final error would have it forget the volume, left behind if the
        // PVC is deleted meanwhile).
        // (Not a shared pool that now has the local pool's name: the name is another pool's.)
        let asked_local = self.pools.0.get(&pool_name).is_none_or(|slot| !slot.config.is_shared());
        if let Some(r) = self
            .store
            .shut_named(&req.name)
            .filter(|r| r.id.0.pool == pool_name && asked_local)
        {
            let why = self.shut_why(&pool_name).unwrap_or_default();
            return Err(StorageError::Unavailable(format!(
                "volume '{}' ({}) is in pool '{}' of node {}, which is not open ({why}): its create answers once the pool opens",
                crate::csi::status::bounded(&req.name),
                r.id,
                pool_name.as_str(),
                self.node.as_str()
            )));
        }
        let pool = self.pool(&pool_name)?;
        let layout = req.layout.unwrap_or(pool.config.default_layout);
        let ops = layout::of(layout);
        if !pool.config.layouts.contains(&layout) {
            return Err(StorageError::LayoutNotAllowed {
                layout: layout.as_str().into(),
                pool: pool_name.as_str().into(),
                allowed: pool
                    .config
                    .layouts
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if pool.shared() {
            let multi = |m: &&AccessMode| {
                matches!(
                    m,
                    AccessMode::MultiNodeReaderOnly
                        | AccessMode::MultiNodeSingleWriter
                        | AccessMode::MultiNodeMultiWriter
                )
            };
            if let Some(m) = req.access_modes.iter().find(multi).filter(|_| ops.single_node()) {
                return Err(StorageError::Unsupported(format!(
                    "access mode {m:?} needs layout 'dir': a volume of layout '{}' is used on one node at a time",
                    layout.as_str()
                )));
            }
        } else if let Some(m) = req.access_modes.iter().find(|m| !m.served_by_local_pool()) {
            return Err(StorageError::Unsupported(format!(
                "access mode {m:?} needs a shared pool; pool '{}' is local (local pools serve single-node modes and MULTI_NODE_READER_ONLY)",
                pool_name.as_str()
            )));
        }
        if req.mode == VolumeMode::Block && !ops.serves_block() {
            return Err(StorageError::Unsupported(format!(
                "volume mode Block needs layout 'image'; layout '{}' serves Filesystem volumes only",
                layout.as_str()
            )));
        }
        let fs_type = match (ops.has_filesystem(), req.mode) {
            (true, VolumeMode::Filesystem) => {
                let fs = if req.fs_type.is_empty() {
                    pool.config.fs_type
                } else {
                    FsType::parse(&req.fs_type).ok_or_else(|| {
                        StorageError::Unsupported(format!(
                            "filesystem type '{}' cannot be made inside an image volume (use ext4 or xfs)",
                            req.fs_type
                        ))
                    })?
                };
                fs.as_str().to_string()
            }
            (true, VolumeMode::Block) => String::new(),
            _ => req.fs_type.clone(),
        };
        if req.mutable.compression.is_some() && !ops.compresses() {
            return Err(StorageError::Unsupported(format!(
                "compression applies to btrfs volumes; this volume's layout is '{}'",
                layout.as_str()
            )));
        }
        let mut capacity = req.capacity.choose()?;
        if let Some(fs) = FsType::parse(&fs_type).filter(|_| ops.has_filesystem() && req.source.is_none()) {
            // A filesystem has a smallest size: round up to it within the limit, never past it.
            let min = fs.min_bytes();
            if capacity < min {
                if req.capacity.limit != 0 && req.capacity.limit < min {
                    return Err(StorageError::OutOfRange(format!(
                        "an {fs} filesystem needs at least {min} bytes ({} MiB); limit_bytes is {}: raise it or use another filesystem type",
                        min >> 20,
                        req.capacity.limit
                    )));
                }
                capacity = min;
            }
        }
        let key = self.key_for(pool, req)?;
        let id = self.volume_id(&pool_name, &key);
        let held = self.take(Kind::Volume, &pool_name, &key, &id.to_string())?;

        let source = match &req.source {
            None => None,
            Some(Source::Snapshot(s)) => Some(ContentSource::Snapshot(s.clone())),
            Some(Source::Volume(v)) => Some(ContentSource::Volume(v.clone())),
            Some(Source::Backup(b)) => Some(ContentSource::Backup(b.clone())),
        };
        if let Some(existing) = self.volume(&id) {
            // A copy's filesystem is its source's, whatever the pool's default.
            let fs_type = if req.source.is_some() && req.fs_type.is_empty() {
                existing.fs_type.clone()
            } else {
                fs_type
            };
            return same_volume(&existing, req, layout, &fs_type, &source).map(|()| Plan::Exists(existing));
        }

        // Data of this very volume left by a create that died before its record (whole in place,
        // or half-made in `.work`) is reused or replaced by this one: it does not take room from it.
        let leftover = pool
            .sys
            .files
            .allocated_upto(&pool.data_path(Kind::Volume, &key), u64::MAX)
            .bytes
            + pool
                .sys
                .files
                .allocated_upto(&pool.work_path(Kind::Volume, &key), u64::MAX)
                .bytes;
        // Named with its node: in split mode this answer reaches the scheduler through the
        // controller, and says which node is full.
        let place = match self.location_of(&pool_name) {
            Location::Local(n) => format!("pool '{}' on node {}", pool_name.as_str(), n.as_str()),
            Location::Shared => format!("shared pool '{}'", pool_name.as_str()),
        };
        let promised = self.promise(pool, layout, capacity, leftover, |room| {
            StorageError::Exhausted(format!(
                "{place} can give {room} more bytes to {} volumes, the volume needs {capacity}{}",
                layout.as_str(),
                room_hint(layout)
            ))
        })?;

        Ok(Plan::New(Planned {
            pool,
            key,
            id,
            layout,
            capacity,
            fs_type,
            source,
            held: std::sync::Arc::new(held),
            _promised: promised,
        }))
    }

    /// Writes the record of a volume whose data is in place, then indexes it.
    pub(super) fn record_new(
        &self,
        p: Planned<'_>,
        req: &NewVolume,
        fs_bytes: u64,
    ) -> Result<VolumeRecord, StorageError> {
        let data = p.pool.data_path(Kind::Volume, &p.key);
        let ext4 = FsType::parse(&p.fs_type) == Some(FsType::Ext4);
        if p.pool.shared() && ext4 && req.mode == VolumeMode::Filesystem && req.source.is_some() {
            // A copy (a clone, a restore, an import from another node or a backup: every one names
            // its source) carries its source's filesystem as it is: one made on a local pool, or
            // before shared images had multi-mount protection, gets it here, before any node can
            // stage it. One made empty here has it from mkfs.
            if p.pool.sys.filesystems.guard_shared(&data)? {
                tracing::info!(volume = %p.id, "gave the copied ext4 filesystem multi-mount protection");
            }
        }
        if let Some(c) = &req.mutable.compression {
            p.pool
                .sys
                .subvolumes
                .set_compression(&data, Some(c.as_str()).filter(|c| *c != "none"))?;
        }
        crash::point("create-volume:before-record");
        let (secs, _) = now();
        let rec = VolumeRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            id: p.id.clone(),
            layout: p.layout,
            capacity_bytes: p.capacity,
            mode: req.mode,
            access_modes: req.access_modes.clone(),
            fs_type: p.fs_type,
            parameters: req.parameters.clone(),
            source: p.source,
            created_unix_secs: secs,
            delete_policy: req.mutable.delete_policy.or(req.delete_policy),
            compression: req.mutable.compression.clone().filter(|c| c != "none"),
            fs_bytes,
        };
        self.store.put_volume(p.pool, &p.key, &rec)?;
        crash::point("create-volume:after-record");
        Ok(rec)
    }

    /// Creates a volume from another node's data, streamed in `frames` (see `transfer`): built and
    /// checked whole in `.work`, moved into place, and only then recorded. A stream that breaks off
    /// or fails a check leaves nothing behind; the retry starts over. A name already made answers
    /// with its volume without reading the stream.
    pub fn import_volume(
        &self,
        req: NewVolume,
        frames: &mut dyn Iterator<Item = Result<Frame, StorageError>>,
    ) -> Result<VolumeRecord, StorageError> {
        let p = match self.plan(&req)? {
            Plan::Exists(rec) => return Ok(rec),
            Plan::New(p) => p,
        };
        let (pool, key, _held) = (p.pool, p.key.clone(), p.hold());
        let made = self.import_planned(p, &req, frames);
        self.undo_unrecorded(pool, Kind::Volume, &key, made)
    }

    /// Streams a planned volume's data from another node into place, then records it.
    pub(super) fn import_planned(
        &self,
        mut p: Planned<'_>,
        req: &NewVolume,
        frames: &mut dyn Iterator<Item = Result<Frame, StorageError>>,
    ) -> Result<VolumeRecord, StorageError> {
        let cut = |what: &str| StorageError::Transfer(format!("the stream ended before its {what}"));
        let header = match frames.next() {
            Some(Ok(Frame::Header(h))) => h,
            Some(Ok(_)) => return Err(StorageError::Transfer("the stream does not start with a header".into())),
            Some(Err(e)) => return Err(e),
            None => return Err(cut("header")),
        };
        same_kind(
            p.layout,
            req.mode,
            p.capacity,
            header.layout,
            header.mode,
            header.capacity_bytes,
        )?;
        if header.length > p.capacity {
            return Err(StorageError::OutOfRange(format!(
                "the source's image is {} bytes long but the new volume asks for {}",
                header.length, p.capacity
            )));
        }
        let data = p.pool.data_path(Kind::Volume, &p.key);
        layout::clear_leftover(p.pool, Kind::Volume, &p.key)?;
        {
            let work = p.pool.work_path(Kind::Volume, &p.key);
            if p.pool.sys.files.entry(&work)? != files::Entry::Missing {
                layout::purge(&p.pool.sys, &work)?;
            }
            tracing::info!(volume = %p.id, layout = p.layout.as_str(), "import from another node started");
            // A tree may legitimately hold more than its capacity (dir volumes do not enforce it,
            // btrfs compresses): it may bring that much, or half the pool's free room if more.
            // Past that the source (another node, or a restore) is refused before it fills the pool.
            let budget = p.capacity.max(self.room(p.pool, p.layout).unwrap_or(0) / 2);
            let imported = (|| -> Result<(), StorageError> {
                let mut import = Import::start(&header, budget, &work, &p.pool.sys)?;
                loop {
                    let f = frames.next().ok_or_else(|| cut("end"))??;
                    let end = matches!(f, Frame::End { .. });
                    import.frame(f)?;
                    if end {
                        break;
                    }
                }
                import.finish(header.length)?;
                crash::point("import:before-rename");
                p.pool.sys.files.rename(&work, &data)?;
                Ok(p.pool.sys.files.sync_dir(&p.pool.collection_dir(Kind::Volume))?)
            })();
            if let Err(e) = imported {
                // What came so far goes with the failure: a caller that gives up never retries,
                // and the copy may be as large as the volume (a crash leaves it to the start's sweep).
                if p.pool.sys.files.entry(&work).ok() != Some(files::Entry::Missing) {
                    if let Err(left) = layout::purge(&p.pool.sys, &work) {
                        tracing::warn!(path = %work.display(), error = %left, "a failed import's copy is left for the next import of that name or the next start");
                    }
                }
                return Err(e);
            }
            tracing::info!(volume = %p.id, "import from another node checked and in place");
        }
        if layout::of(p.layout).has_filesystem() && req.mode == VolumeMode::Filesystem {
            p.fs_type = copy_fs_type(p.pool, &data, &req.fs_type)?;
        }
        layout::of(p.layout).set_capacity(p.pool, &data, p.capacity)?;
        // The filesystem came from another node or a backup: whoever sent it chose its contents and
        // the size its header claims. Recorded as not yet grown (fs_bytes 0), it is checked before
        // the kernel mounts it, at every stage until a read-write one grows it: an ext4 grown
        // offline by `e2fsck -f -p` (which also replays its journal), an xfs or a read-only stage
        // by `xfs_repair -n` / `e2fsck -f -n` after its journal or log is replayed
        // (`NodeService::check_first`), whatever the header said.
        self.record_new(p, req, 0)
    }

    /// Streams a volume's or snapshot's data to `send` (see `transfer`), holding its lock so that
    /// it cannot be deleted meanwhile. A snapshot is read as it is (read-only); a live volume as
    /// the local clone reads it: a directory tree in place, an image crash-consistent, and a btrfs
    /// subvolume through a read-only snapshot taken for the transfer.
    pub fn export(&self, src: &Source, send: &mut transfer::SendFrame<'_>) -> Result<(), StorageError> {
        let from = self.source_data(src)?;
        let header = Header {
            layout: from.layout,
            mode: from.mode,
            capacity_bytes: from.size,
            fs_bytes: from.fs_bytes,
            length: 0,
        };
        let Source::Volume(v) = src else {
            return transfer::export(header, &from.path, send);
        };
        let pool = self
            .locate_for_call(&v.0)?
            .ok_or_else(|| StorageError::VolumeNotFound(v.to_string()))?;
        let at = pool
            .work_dir()
            .join(format!("export-{}-{}", v.0.key.as_str(), uuid::Uuid::new_v4().simple()));
        let Some(frozen) = layout::of(from.layout).frozen_view(pool, &from.path, &at)? else {
            return transfer::export(header, &from.path, send);
        };
        let sent = transfer::export(header, &frozen, send);
        if let Err(e) = layout::purge(&pool.sys, &frozen) {
            tracing::warn!(path = %frozen.display(), error = %e, "could not drop the snapshot taken for an export; the next start clears it");
        }
        sent
    }

    /// The key a new volume is stored under. A name seen before keeps its key; a local volume's key
    /// is its name's; a shared volume's comes from the pool's name template, told apart from any
    /// other volume's that the template would give the same name.
    pub(super) fn key_for(&self, pool: &Pool, req: &NewVolume) -> Result<Key, StorageError> {
        // A name of a pool that is not open is taken too: made again in another pool, the name
        // would have two volumes once that pool opens.
        let known = self
            .store
            .id_named(&req.name)
            .or_else(|| self.store.shut_named(&req.name).map(|r| r.id.to_string()));
        if let Some(id) = known.filter(|id| !self.is_shared_id(id) || self.volume_named(&req.name).is_some()) {
            let id = VolumeId::parse(&id).map_err(|e| StorageError::Conflict(e.0))?;
            // (A local pool left out of the configuration may have its name on a shared one.)
            let shared_id = matches!(id.0.location, crate::storage::id::Location::Shared);
            if id.0.pool != pool.config.name || shared_id != pool.shared() {
                return Err(StorageError::Conflict(format!(
                    "volume '{}' already exists in pool '{}'",
                    req.name,
                    id.0.pool.as_str()
                )));
            }
            return Ok(id.0.key);
        }
        if !pool.shared() {
            return Ok(Key::from_name(&req.name));
        }
        let key = crate::storage::naming::key_for(&req.name, pool.config.name_template.as_deref(), &req.parameters);
        // Read from the share: another controller replica may have made either volume. A key
        // retired by another volume's delete is taken too (`Pool::retired_path`). The record
        // first, then the note: a delete writes the note before it removes the record, so a record
        // found gone means its note is there to be read.
        let taken = |k: &Key| -> Result<bool, StorageError> {
            if self
                .volume(&self.volume_id(&pool.config.name, k))
                .is_some_and(|r| r.name != req.name)
            {
                return Ok(true);
            }
            crash::point("create:between-key-reads");
            // What cellar did not write there (put on the share by a node) takes the key too.
            let retired = match pool.sys.files.read_optional(&pool.retired_path(k)) {
                Err(e) if e.is_not_ours() => return Ok(true),
                read => read?,
            };
            Ok(retired.is_some_and(|by| by != req.name.as_bytes()))
        };
        Ok(if taken(&key)? {
            crate::storage::naming::disambiguate(&key, &req.name)
        } else {
            key
        })
    }
}

/// A CreateVolume that passed every check and holds its volume's lock, not made yet.
pub(super) struct Planned<'a> {
    pool: &'a Pool,
    key: Key,
    pub(super) id: VolumeId,
    pub(super) layout: Layout,
    capacity: u64,
    fs_type: String,
    source: Option<ContentSource>,
    /// The volume's lock: shared with the caller, which keeps it until a failed attempt's undo is
    /// done (else another call could take the name and make its data, which the undo would remove).
    held: std::sync::Arc<Held>,
    /// The room its capacity takes, promised until it is recorded.
    _promised: super::capacity::Promise<'a>,
}

impl Planned<'_> {
    /// The lock, kept by the caller past the making (see the field).
    fn hold(&self) -> std::sync::Arc<Held> {
        self.held.clone()
    }
}

pub(super) enum Plan<'a> {
    /// The same request made this volume before.
    Exists(VolumeRecord),
    New(Planned<'a>),
}

/// A copy keeps its source's layout and mode and needs at least its capacity.
pub(super) fn same_kind(
    layout: Layout,
    mode: VolumeMode,
    capacity: u64,
    from_layout: Layout,
    from_mode: VolumeMode,
    from_size: u64,
) -> Result<(), StorageError> {
    if from_layout != layout || from_mode != mode {
        return Err(StorageError::Unsupported(format!(
            "a {mode:?} volume of layout '{}' can only be made from a source of the same layout and \
             mode; the source is a {from_mode:?} volume of layout '{}'",
            layout.as_str(),
            from_layout.as_str(),
        )));
    }
    if from_size > capacity {
        return Err(StorageError::OutOfRange(format!(
            "the source holds {from_size} bytes of capacity but the new volume asks for {capacity}"
        )));
    }
    Ok(())
}

/// Whether a repeated CreateVolume asks for the volume that exists (OK) or another one (ALREADY_EXISTS).
pub(super) fn same_volume(
    existing: &VolumeRecord,
    req: &NewVolume,
    layout: Layout,
    fs_type: &str,
    source: &Option<ContentSource>,
) -> Result<(), StorageError> {
    let conflict = |what: &str| {
        Err(StorageError::Conflict(format!(
            "volume '{}' already exists with another {what}",
            req.name
        )))
    };
    if existing.name != req.name {
        // Another name whose key came out the same (a shared pool's name template), taken by a
        // call that ran first: never answer one name with another's data. A retry picks a key
        // of its own, now that this one is seen taken.
        return Err(StorageError::Aborted(format!(
            "volume '{}' was to be stored where volume '{}' was just made; retry",
            req.name, existing.name
        )));
    }
    if !req.capacity.admits(existing.capacity_bytes) {
        return Err(StorageError::Conflict(format!(
            "volume '{}' already exists with {} bytes, outside the requested range",
            req.name, existing.capacity_bytes
        )));
    }
    let mut a = existing.access_modes.clone();
    let mut b = req.access_modes.clone();
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    if a != b || existing.mode != req.mode || existing.fs_type != fs_type {
        return conflict("capability");
    }
    if existing.layout != layout || existing.parameters != req.parameters {
        return conflict("set of parameters");
    }
    if existing.source != *source {
        return conflict("content source");
    }
    Ok(())
}

/// The filesystem a copy of the image at `src` has: its source's. A request that names another one
/// is refused (the copy would never mount as what its record says). `pool` is the copy's (a source
/// of this node shares its node's filesystem calls).
pub(super) fn copy_fs_type(pool: &Pool, src: &std::path::Path, asked: &str) -> Result<String, StorageError> {
    let found = pool.sys.filesystems.probe(src)?.ok_or_else(|| {
        StorageError::Unsupported(format!(
            "the source image {} holds no ext4 or xfs filesystem to copy",
            src.display()
        ))
    })?;
    if !asked.is_empty() && asked != found.as_str() {
        return Err(StorageError::Unsupported(format!(
            "a copy keeps its source's filesystem: the source is {found}, the request asks for '{asked}' \
             (leave fsType unset, or set it to {found})"
        )));
    }
    Ok(found.as_str().to_string())
}

/// Gives a new directory volume the owner and mode a StorageClass asked for.
pub(super) fn set_owner(pool: &Pool, dir: &std::path::Path, o: Ownership) -> Result<(), StorageError> {
    if o.uid.is_some() || o.gid.is_some() {
        pool.sys.files.set_owner(dir, o.uid, o.gid)?;
    }
    if let Some(mode) = o.mode {
        pool.sys.files.set_mode(dir, mode)?;
    }
    Ok(())
}
