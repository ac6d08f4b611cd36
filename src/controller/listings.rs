//! What the controller knows of each agent's volumes: the agent's last complete listing, kept up
//! to date with the creates and deletes made through this controller, and an index of the CSI
//! names in it.
//!
//! The listings serve three things:
//! - While an agent cannot be reached, ListVolumes and ControllerGetVolume answer from its last
//!   listing with an abnormal condition, rather than failing for every volume or leaving that
//!   agent's volumes out (which reads as deleted).
//! - CreateVolume finds a name already taken without asking every node: a node whose listing is
//!   known to be whole is answered for by the index, and only the others are asked (at once, each
//!   call with its deadline). A listing is known to be whole when it was taken since the node
//!   registered, no call to the node since ended without an answer (a create that timed out may
//!   still have made its volume), and the bytes its volumes provision, pool by pool, are those the
//!   node's last heartbeat reports: a volume made or deleted by someone else (another controller
//!   replica) changes that figure, and the node is asked again until it is listed again.
//! - ListVolumes pages are cut from the listings without copying a record: a page names a
//!   listing and a position in it.
//!
//! Memory: one [`VolumeSummary`] per volume (what a listing shows, not the whole record: about a
//! third of its size), shared by the listing, the index and the pages.
//!
//! Order: everything is sorted by the text of the volume id, the order page tokens name. (The
//! typed id orders `node-1` before `node-10`, its text the other way round: a listing sorted one
//! way and searched the other skips and repeats volumes.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::storage::engine::{Condition, PoolStatus};
use crate::storage::id::{NodeId, PoolName};
use crate::storage::record::{ContentSource, Layout, VolumeRecord};

/// A listing that disagrees with the node's heartbeat is taken again at most this often: right
/// after a create the heartbeat lags behind the listing for up to an interval, and asking the
/// node by name meanwhile is enough.
pub const RELIST_AFTER: Duration = Duration::from_secs(10);

static HEALTHY: Condition = Condition {
    abnormal: false,
    message: String::new(),
};

/// What the controller keeps of a listed volume: what ListVolumes and ControllerGetVolume show
/// and what the listings' bookkeeping needs. The agent holds the record; a create with a name
/// already taken goes to that agent, which compares the request with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSummary {
    /// The volume id as text: what pages are sorted by and tokens name.
    id: Box<str>,
    name: Box<str>,
    pub capacity_bytes: u64,
    pub layout: Layout,
    source: Option<Box<ContentSource>>,
    /// `None` while healthy, as nearly every volume is.
    condition: Option<Box<Condition>>,
}

impl VolumeSummary {
    pub fn new(r: &VolumeRecord, condition: &Condition) -> VolumeSummary {
        VolumeSummary {
            id: r.id.to_string().into(),
            name: r.name.as_str().into(),
            capacity_bytes: r.capacity_bytes,
            layout: r.layout,
            source: r.source.clone().map(Box::new),
            condition: (condition != &HEALTHY).then(|| Box::new(condition.clone())),
        }
    }

    /// A volume just made: healthy.
    pub fn made(r: &VolumeRecord) -> VolumeSummary {
        VolumeSummary::new(r, &HEALTHY)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> Option<&ContentSource> {
        self.source.as_deref()
    }

    pub fn condition(&self) -> &Condition {
        self.condition.as_deref().unwrap_or(&HEALTHY)
    }

    pub fn with_condition(mut self, condition: Condition) -> VolumeSummary {
        self.condition = (condition != HEALTHY).then(|| Box::new(condition));
        self
    }

    /// A shared pool's volume (`shared:<pool>:<key>`), reachable from every node.
    pub fn is_shared(&self) -> bool {
        self.id.starts_with("shared:")
    }

    /// The pool, read from the id's text (`local:<node>:<pool>:<key>` or `shared:<pool>:<key>`;
    /// neither node nor pool names hold a colon).
    pub fn pool(&self) -> &str {
        let mut parts = self.id.split(':');
        if parts.next() == Some("local") {
            parts.next();
        }
        parts.next().unwrap_or_default()
    }
}

/// One agent's volumes as it last listed them, sorted by id.
#[derive(Clone)]
pub struct Listing {
    pub at: Instant,
    pub volumes: Arc<Vec<VolumeSummary>>,
    /// Sum of the capacities of the node's own (local) volumes, by pool: what its heartbeat
    /// reports as `provisioned_bytes`. Shared pools are left out: their figure counts volumes a
    /// node's listing need not hold, and the shared pools' agent is always asked.
    provisioned: BTreeMap<String, u64>,
    /// A call to the agent ended without an answer since: it may hold a volume not listed here.
    unsure: bool,
    /// The node's own pools that were not open when it was listed: their volumes are kept from
    /// the listing before, and their figures are not compared with the heartbeat's.
    shut: Vec<Box<str>>,
}

impl Listing {
    fn new(at: Instant, volumes: Vec<VolumeSummary>) -> Listing {
        let mut listing = Listing {
            at,
            volumes: Arc::new(Vec::new()),
            provisioned: BTreeMap::new(),
            unsure: false,
            shut: Vec::new(),
        };
        for v in &volumes {
            listing.provision(v, true);
        }
        listing.volumes = Arc::new(volumes);
        listing
    }

    /// Counts a local volume in (or out of) its pool's provisioned bytes.
    fn provision(&mut self, v: &VolumeSummary, add: bool) {
        if v.is_shared() {
            return;
        }
        let bytes = self.provisioned.entry(v.pool().to_string()).or_insert(0);
        *bytes = if add {
            bytes.saturating_add(v.capacity_bytes)
        } else {
            bytes.saturating_sub(v.capacity_bytes)
        };
    }

    /// Whether the node's heartbeat provisions what this listing holds, local pool by local pool.
    fn agrees_with(&self, reported: &[PoolStatus]) -> bool {
        let local = || reported.iter().filter(|p| !p.shared);
        let listed_pools_reported = self.provisioned.iter().all(|(pool, bytes)| {
            *bytes == 0 || local().any(|p| p.name.as_str() == pool) || self.shut.iter().any(|s| **s == **pool)
        });
        listed_pools_reported
            && local().all(|p| self.provisioned.get(p.name.as_str()).copied().unwrap_or(0) == p.provisioned_bytes)
    }
}

#[derive(Default)]
struct Inner {
    by_agent: HashMap<String, Listing>,
    /// CSI name → the agents whose listings hold it, the first to list it first. A node can list
    /// a volume of its own under another node's name: it joins that name's holders, and it never
    /// takes the entry over or drops the other holders.
    names: HashMap<Box<str>, Vec<Arc<str>>>,
    /// Agents being listed again in the background.
    relisting: HashSet<String>,
    /// Per agent, how many creates, deletes and doubts this controller recorded: a listing asked
    /// for before one of them may miss it, and is stored as unsure.
    edits: HashMap<String, u64>,
    /// CSI name → the agent a create of it was sent to and that gave no answer (at most
    /// [`MAX_LOST`]): the retry goes back there (see [`Listings::lost_on`]).
    lost: HashMap<Box<str>, Arc<str>>,
}

/// Bound on the creates remembered as unanswered: each holds a name and a node's name.
pub const MAX_LOST: usize = 4096;

impl Inner {
    fn edited(&mut self, key: &str) {
        *self.edits.entry(key.to_string()).or_insert(0) += 1;
    }

    fn unindex(&mut self, key: &str) {
        let names: Vec<Box<str>> = match self.by_agent.get(key) {
            Some(old) => old.volumes.iter().map(|v| v.name.clone()).collect(),
            None => return,
        };
        for name in names {
            self.unname(&name, key);
        }
    }

    /// `key` holds a volume named `name` (after the holders before it).
    fn name(&mut self, name: Box<str>, key: &Arc<str>) {
        let holders = self.names.entry(name).or_default();
        if !holders.iter().any(|k| k == key) {
            holders.push(key.clone());
        }
    }

    /// `key` no longer holds a volume named `name`; the other holders stay.
    fn unname(&mut self, name: &str, key: &str) {
        if let Some(holders) = self.names.get_mut(name) {
            holders.retain(|k| &**k != key);
            if holders.is_empty() {
                self.names.remove(name);
            }
        }
    }
}

/// Every agent's listing, by listing key (the node's name, or the shared pools').
#[derive(Default)]
pub struct Listings {
    inner: Mutex<Inner>,
}

impl Listings {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the agent's edits stand: take it before asking for a listing, and give it to
    /// [`Listings::replace`].
    pub fn edits(&self, key: &str) -> u64 {
        self.lock().edits.get(key).copied().unwrap_or(0)
    }

    /// Stores a complete listing of an agent, asked for when its edits stood at `edits`, in place
    /// of the one before. An edit since (a create or delete through this controller that the
    /// answer may or may not show) leaves it unsure. The volumes of the node's pools that are
    /// `shut` (not open, so not in the answer) stay as the listing before had them, abnormal:
    /// they exist, and a retried create of one of their names must find it, not make another.
    pub fn replace(
        &self,
        key: &str,
        at: Instant,
        edits: u64,
        volumes: Vec<(VolumeRecord, Condition)>,
        shut: &[(PoolName, String)],
    ) -> Listing {
        // Collected from a borrow, not `into_iter`: an in-place collect would keep the records'
        // allocation (five times the summaries' size) for as long as the listing lives.
        let mut volumes: Vec<VolumeSummary> = volumes.iter().map(|(r, c)| VolumeSummary::new(r, c)).collect();
        // The old listing is read under the lock only for a node with a shut pool; the summaries
        // are built and sorted outside it (a full ListVolumes replaces every node's at once).
        if let Some(old) = self.get(key).filter(|_| !shut.is_empty()) {
            let listed: std::collections::HashSet<&str> = volumes.iter().map(|v| v.id()).collect();
            // A shut pool the node lists volumes of itself (from its roster) is listed as the
            // node says: a volume deleted since through another replica is not brought back.
            let rostered: std::collections::HashSet<&str> =
                volumes.iter().filter(|v| !v.is_shared()).map(|v| v.pool()).collect();
            let kept: Vec<VolumeSummary> = old
                .volumes
                .iter()
                .filter(|v| !v.is_shared() && !listed.contains(v.id()) && !rostered.contains(v.pool()))
                .filter_map(|v| {
                    let (pool, why) = shut.iter().find(|(p, _)| p.as_str() == v.pool())?;
                    Some(v.clone().with_condition(Condition::shown_while_shut(pool, key, why)))
                })
                .collect();
            volumes.extend(kept);
        }
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        let mut listing = Listing::new(at, volumes);
        listing.shut = shut.iter().map(|(p, _)| p.as_str().into()).collect();
        let mut inner = self.lock();
        listing.unsure = inner.edits.get(key).copied().unwrap_or(0) != edits;
        // Only the names it no longer lists leave, and only new ones join at the back: a holder
        // that keeps listing a name keeps its place, so the true holder's next listing does not
        // hand the name to another node that lists it too.
        let listed: std::collections::HashSet<&str> = listing.volumes.iter().map(|v| v.name()).collect();
        let dropped: Vec<Box<str>> = match inner.by_agent.get(key) {
            Some(old) => old
                .volumes
                .iter()
                .filter(|v| !listed.contains(v.name()))
                .map(|v| v.name.clone())
                .collect(),
            None => Vec::new(),
        };
        for name in dropped {
            inner.unname(&name, key);
        }
        let shared: Arc<str> = Arc::from(key);
        for v in listing.volumes.iter() {
            inner.name(v.name.clone(), &shared);
        }
        inner.by_agent.insert(key.to_string(), listing.clone());
        listing
    }

    pub fn get(&self, key: &str) -> Option<Listing> {
        self.lock().by_agent.get(key).cloned()
    }

    /// A volume this controller created on an agent: its listing (if any) holds it from now on.
    pub fn add(&self, key: &str, rec: &VolumeRecord) {
        let mut inner = self.lock();
        inner.edited(key);
        let Some(l) = inner.by_agent.get_mut(key) else { return };
        let made = VolumeSummary::made(rec);
        let volumes = Arc::make_mut(&mut l.volumes);
        let replaced = match volumes.binary_search_by(|v| v.id.cmp(&made.id)) {
            Ok(i) => Some(std::mem::replace(&mut volumes[i], made.clone())),
            Err(i) => {
                volumes.insert(i, made.clone());
                None
            }
        };
        if let Some(old) = replaced {
            l.provision(&old, false);
        }
        l.provision(&made, true);
        inner.name(made.name, &Arc::from(key));
    }

    /// A volume deleted through this controller leaves every listing.
    pub fn remove(&self, id: &str) {
        let mut inner = self.lock();
        let mut gone = Vec::new();
        for (key, l) in inner.by_agent.iter_mut() {
            if let Ok(i) = l.volumes.binary_search_by(|v| v.id().cmp(id)) {
                let v = Arc::make_mut(&mut l.volumes).remove(i);
                l.provision(&v, false);
                gone.push((key.clone(), v.name));
            }
        }
        for (key, name) in gone {
            inner.unname(&name, &key);
            inner.edited(&key);
        }
    }

    /// A call to the agent ended without an answer: until it is listed again, the index does not
    /// answer for it.
    pub fn doubt(&self, key: &str) {
        let mut inner = self.lock();
        inner.edited(key);
        if let Some(l) = inner.by_agent.get_mut(key) {
            l.unsure = true;
        }
    }

    /// A create of `name` sent to the agent `key` ended without an answer: the agent may have
    /// made the volume. Remembered (the oldest is not kept apart: past [`MAX_LOST`] an arbitrary
    /// one is forgotten, logged) until a create of that name is answered. A name longer than any
    /// agent takes ([`crate::agent::wire::MAX_NAME`]) names no volume and is not kept.
    pub fn lost_create(&self, name: &str, key: &str) {
        if name.len() > crate::agent::wire::MAX_NAME {
            return;
        }
        let mut inner = self.lock();
        if inner.lost.len() >= MAX_LOST && !inner.lost.contains_key(name) {
            if let Some(old) = inner.lost.keys().next().cloned() {
                tracing::warn!(
                    volume = &*old,
                    "too many creates without an answer to remember; a retry of this one is placed anew"
                );
                inner.lost.remove(&old);
            }
        }
        inner.lost.insert(name.into(), Arc::from(key));
    }

    /// The agent a create of `name` was last sent to without an answer, if any.
    pub fn lost_on(&self, name: &str) -> Option<String> {
        self.lock().lost.get(name).map(|k| k.to_string())
    }

    /// A create of `name` was answered (made, or refused for good): nothing is in doubt about it.
    pub fn answered(&self, name: &str) {
        self.lock().lost.remove(name);
    }

    /// Whether the index answers for this agent's names: it was listed, nothing is in doubt since,
    /// and its heartbeat (`reported`; `None`: the agent sends none) agrees with the listing.
    pub fn whole(&self, key: &str, reported: Option<&[PoolStatus]>) -> bool {
        let inner = self.lock();
        match (inner.by_agent.get(key), reported) {
            (Some(l), Some(pools)) => !l.unsure && l.agrees_with(pools),
            _ => false,
        }
    }

    /// Whether the agent should be listed again (no listing, one in doubt, or one older than
    /// [`RELIST_AFTER`]) and no one is listing it now; if so, the caller lists it and calls
    /// [`Listings::relisted`] when done.
    pub fn start_relisting(&self, key: &str) -> bool {
        let mut inner = self.lock();
        let due = inner
            .by_agent
            .get(key)
            .is_none_or(|l| l.unsure || l.at.elapsed() >= RELIST_AFTER);
        due && inner.relisting.insert(key.to_string())
    }

    pub fn relisted(&self, key: &str) {
        self.lock().relisting.remove(key);
    }

    /// The listed agent holding a volume of this name (its listing key), with the volume. When
    /// several list one name (a node listing a volume of its own under another's name), the one
    /// that listed it first answers: a later claim cannot take a name over.
    pub fn named(&self, name: &str) -> Option<(String, VolumeSummary)> {
        let inner = self.lock();
        let key = inner.names.get(name)?.first()?;
        let l = inner.by_agent.get(&**key)?;
        let v = l.volumes.iter().find(|v| v.name() == name)?;
        Some((key.to_string(), v.clone()))
    }

    /// A volume as last listed, with when its agent was listed.
    pub fn find(&self, id: &str) -> Option<(VolumeSummary, Instant)> {
        let inner = self.lock();
        inner.by_agent.values().find_map(|l| {
            let i = l.volumes.binary_search_by(|v| v.id().cmp(id)).ok()?;
            Some((l.volumes[i].clone(), l.at))
        })
    }

    /// Keeps the listings `keep` says to keep (given the key and the listing).
    pub fn retain(&self, mut keep: impl FnMut(&str, &Listing) -> bool) {
        let mut inner = self.lock();
        let dropped: Vec<String> = inner
            .by_agent
            .iter()
            .filter(|(k, l)| !keep(k, l))
            .map(|(k, _)| k.clone())
            .collect();
        for k in dropped {
            inner.unindex(&k);
            inner.by_agent.remove(&k);
            inner.edits.remove(&k);
        }
    }
}

/// The volumes of one agent in a ListVolumes answer: its listing, and the condition every one of
/// them has when the agent could not be reached (else each volume's own).
pub struct Part {
    pub node: NodeId,
    pub volumes: Arc<Vec<VolumeSummary>>,
    pub condition: Option<Condition>,
}

/// One volume of a ListVolumes answer: a position in a [`Part`].
#[derive(Clone)]
pub struct Listed {
    part: Arc<Part>,
    i: u32,
}

impl Listed {
    /// Every volume of `parts`, sorted by id.
    pub fn all(parts: Vec<Part>) -> Vec<Listed> {
        let mut all = Vec::with_capacity(parts.iter().map(|p| p.volumes.len()).sum());
        for part in parts {
            let part = Arc::new(part);
            for i in 0..part.volumes.len() {
                all.push(Listed {
                    part: part.clone(),
                    i: i as u32,
                });
            }
        }
        all.sort_by(|a, b| a.volume().id.cmp(&b.volume().id));
        all
    }

    pub fn volume(&self) -> &VolumeSummary {
        &self.part.volumes[self.i as usize]
    }

    pub fn condition(&self) -> &Condition {
        self.part
            .condition
            .as_ref()
            .unwrap_or_else(|| self.volume().condition())
    }

    pub fn node(&self) -> &NodeId {
        &self.part.node
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::record::{Layout, VolumeMode};

    fn rec(node: &str, name: &str, bytes: u64) -> VolumeRecord {
        VolumeRecord {
            version: 1,
            name: name.into(),
            id: crate::storage::id::VolumeId::parse(&format!("local:{node}:default:{name}")).expect("volume id"),
            layout: Layout::Dir,
            capacity_bytes: bytes,
            mode: VolumeMode::Filesystem,
            access_modes: vec![],
            fs_type: String::new(),
            parameters: Default::default(),
            source: None,
            created_unix_secs: 0,
            delete_policy: None,
            compression: None,
            fs_bytes: 0,
        }
    }

    /// A whole listing of healthy volumes, taken now.
    fn listed(l: &Listings, key: &str, recs: Vec<VolumeRecord>) -> Listing {
        l.replace(
            key,
            Instant::now(),
            l.edits(key),
            recs.into_iter().map(|r| (r, ok())).collect(),
            &[],
        )
    }

    fn ok() -> Condition {
        Condition {
            abnormal: false,
            message: String::new(),
        }
    }

    fn reported(provisioned: u64) -> Vec<PoolStatus> {
        vec![PoolStatus {
            name: PoolName::parse("default").unwrap(),
            is_default: true,
            default_layout: Layout::Dir,
            layouts: vec![Layout::Dir],
            total_bytes: 1000,
            available_bytes: 1000 - provisioned,
            image_allocatable_bytes: 1000 - provisioned,
            provisioned_bytes: provisioned,
            shared: false,
        }]
    }

    #[test]
    fn a_shut_pools_volumes_stay_listed_abnormal_and_named_while_the_listing_is_whole() {
        let l = Listings::default();
        let (a, b) = (rec("n1", "a", 10), rec("n1", "b", 20));
        l.replace(
            "n1",
            Instant::now(),
            l.edits("n1"),
            vec![(a.clone(), ok()), (b, ok())],
            &[],
        );
        // The node restarts with pool `default` shut: its answer holds none of the pool's volumes.
        let shut = [(
            PoolName::parse("default").unwrap(),
            "the disk is not mounted".to_string(),
        )];
        let listing = l.replace("n1", Instant::now(), l.edits("n1"), vec![], &shut);
        let kept: Vec<(&str, bool)> = listing
            .volumes
            .iter()
            .map(|v| (v.id(), v.condition().abnormal))
            .collect();
        assert_eq!(kept, [("local:n1:default:a", true), ("local:n1:default:b", true)]);
        let why = &listing.volumes[0].condition().message;
        assert!(
            why.contains("pool 'default' of node n1 is not open (the disk is not mounted)"),
            "{why}"
        );
        assert!(
            matches!(l.named("b"), Some((k, _)) if k == "n1"),
            "the name stays taken"
        );
        assert!(
            l.whole("n1", Some(&[])),
            "the heartbeat reports no figure for a shut pool"
        );
        // Listed again while still shut: kept again, not twice.
        let listing = l.replace("n1", Instant::now(), l.edits("n1"), vec![], &shut);
        assert_eq!(listing.volumes.len(), 2);
        // A node that lists the shut pool's volumes itself (from its roster) is believed: `b`,
        // deleted meanwhile through another replica, does not come back from the listing before.
        let shown = Condition::shown_while_shut(&shut[0].0, "n1", &shut[0].1);
        let listing = l.replace("n1", Instant::now(), l.edits("n1"), vec![(a.clone(), shown)], &shut);
        let ids: Vec<&str> = listing.volumes.iter().map(|v| v.id()).collect();
        assert_eq!(ids, ["local:n1:default:a"]);
        assert!(l.named("b").is_none(), "its name is free");
        // The pool opened: the node's answer is the listing, healthy again.
        let listing = l.replace("n1", Instant::now(), l.edits("n1"), vec![(a, ok())], &[]);
        assert_eq!(listing.volumes.len(), 1);
        assert!(!listing.volumes[0].condition().abnormal);
        assert!(l.named("b").is_none());
        assert!(l.whole("n1", Some(&reported(10))));
    }

    #[test]
    fn a_create_without_an_answer_is_remembered_by_name_within_a_bound() {
        let l = Listings::default();
        l.lost_create("pvc-1", "n1");
        assert_eq!(l.lost_on("pvc-1").as_deref(), Some("n1"));
        l.lost_create("pvc-1", "n2");
        assert_eq!(
            l.lost_on("pvc-1").as_deref(),
            Some("n2"),
            "the last node it was sent to"
        );
        l.answered("pvc-1");
        assert_eq!(l.lost_on("pvc-1"), None);
        for i in 0..MAX_LOST + 10 {
            l.lost_create(&format!("pvc-{i}"), "n1");
        }
        assert_eq!(l.lock().lost.len(), MAX_LOST);
        assert_eq!(
            l.lost_on(&format!("pvc-{}", MAX_LOST + 9)).as_deref(),
            Some("n1"),
            "the newest is kept"
        );
        let long = "x".repeat(crate::agent::wire::MAX_NAME + 1);
        l.lost_create(&long, "n1");
        assert_eq!(l.lost_on(&long), None, "a name no agent takes is not kept");
    }

    #[test]
    fn a_listing_answers_for_names_while_the_heartbeat_agrees() {
        let l = Listings::default();
        l.replace(
            "n1",
            Instant::now(),
            l.edits("n1"),
            vec![(rec("n1", "a", 10), ok()), (rec("n1", "b", 20), ok())],
            &[],
        );
        assert!(l.whole("n1", Some(&reported(30))));
        assert!(matches!(l.named("b"), Some((k, r)) if k == "n1" && r.capacity_bytes == 20));
        assert!(l.named("c").is_none());
        // Someone else made a volume there: the heartbeat provisions more than the listing holds.
        assert!(!l.whole("n1", Some(&reported(40))));
        // No heartbeat figures at all (the shared pools' agent): never answered for.
        assert!(!l.whole("n1", None));
        assert!(!l.whole("n2", Some(&reported(0))), "never listed");
    }

    #[test]
    fn a_shared_pools_figure_does_not_count_against_a_nodes_listing() {
        let l = Listings::default();
        listed(&l, "n1", vec![rec("n1", "a", 10)]);
        let mut pools = reported(10);
        let mut share = pools[0].clone();
        share.name = PoolName::parse("nfs").unwrap();
        share.shared = true;
        share.provisioned_bytes = 999;
        pools.push(share);
        assert!(l.whole("n1", Some(&pools)));
    }

    #[test]
    fn own_creates_and_deletes_keep_the_listing_and_the_index_current() {
        let l = Listings::default();
        listed(&l, "n1", vec![rec("n1", "a", 10)]);
        l.add("n1", &rec("n1", "b", 5));
        assert!(matches!(l.named("b"), Some((k, _)) if k == "n1"));
        assert!(l.whole("n1", Some(&reported(15))));
        l.remove("local:n1:default:a");
        assert!(l.named("a").is_none());
        assert!(l.whole("n1", Some(&reported(5))));
        assert_eq!(l.get("n1").unwrap().volumes.len(), 1);
    }

    #[test]
    fn a_call_in_doubt_stops_the_index_answering_until_the_node_is_listed_again() {
        let l = Listings::default();
        l.replace("n1", Instant::now(), l.edits("n1"), vec![], &[]);
        l.doubt("n1");
        assert!(!l.whole("n1", Some(&reported(0))));
        assert!(l.start_relisting("n1"));
        assert!(!l.start_relisting("n1"), "one listing at a time");
        l.replace("n1", Instant::now(), l.edits("n1"), vec![], &[]);
        l.relisted("n1");
        assert!(l.whole("n1", Some(&reported(0))));
        assert!(!l.start_relisting("n1"), "fresh and certain: nothing to do");
    }

    #[test]
    fn a_listing_asked_for_before_a_create_is_unsure() {
        let l = Listings::default();
        let before = l.edits("n1");
        l.add("n1", &rec("n1", "a", 1));
        l.replace("n1", Instant::now(), before, vec![], &[]);
        assert!(
            !l.whole("n1", Some(&reported(0))),
            "the answer may have missed the create"
        );
    }

    #[test]
    fn a_new_listing_drops_the_names_of_the_old_one() {
        let l = Listings::default();
        l.replace(
            "n1",
            Instant::now(),
            l.edits("n1"),
            vec![(rec("n1", "a", 1), ok())],
            &[],
        );
        l.replace(
            "n1",
            Instant::now(),
            l.edits("n1"),
            vec![(rec("n1", "b", 1), ok())],
            &[],
        );
        assert!(l.named("a").is_none());
        assert!(l.named("b").is_some());
        l.retain(|_, _| false);
        assert!(l.named("b").is_none());
    }

    /// The name index believed the last listing naming a name: node-1 listing a volume of its
    /// own under node-2's name took the entry over, and once node-1 listed it no more the name was
    /// not indexed at all, though node-2 (whole, so never asked) still held it; a retried
    /// CreateVolume then placed a second volume of that name.
    #[test]
    fn a_node_listing_another_nodes_name_neither_takes_it_over_nor_drops_it() {
        let l = Listings::default();
        l.replace(
            "n2",
            Instant::now(),
            l.edits("n2"),
            vec![(rec("n2", "victim", 1), ok())],
            &[],
        );
        l.replace(
            "n1",
            Instant::now(),
            l.edits("n1"),
            vec![(rec("n1", "victim", 1), ok())],
            &[],
        );
        assert!(
            matches!(l.named("victim"), Some((k, _)) if k == "n2"),
            "the first holder answers"
        );
        // Every listing used to unindex a node's names and add them again at the back: the true
        // holder's next listing (a relist, any ListVolumes) put node-1 first.
        l.replace(
            "n2",
            Instant::now(),
            l.edits("n2"),
            vec![(rec("n2", "victim", 1), ok())],
            &[],
        );
        assert!(
            matches!(l.named("victim"), Some((k, _)) if k == "n2"),
            "node-2 listed again keeps its place"
        );
        l.replace("n1", Instant::now(), l.edits("n1"), vec![], &[]);
        assert!(matches!(l.named("victim"), Some((k, _)) if k == "n2"), "still node-2's");
        l.replace(
            "n1",
            Instant::now(),
            l.edits("n1"),
            vec![(rec("n1", "victim", 1), ok())],
            &[],
        );
        l.remove("local:n1:default:victim");
        assert!(
            matches!(l.named("victim"), Some((k, _)) if k == "n2"),
            "a delete on n1 leaves n2's"
        );
        l.retain(|k, _| k != "n1");
        assert!(matches!(l.named("victim"), Some((k, _)) if k == "n2"));
        l.remove("local:n2:default:victim");
        assert!(l.named("victim").is_none());
    }

    fn summary(node: &str, name: &str) -> VolumeSummary {
        VolumeSummary::made(&rec(node, name, 1))
    }

    #[test]
    fn pages_share_the_records_and_come_sorted_by_id() {
        let parts = vec![
            Part {
                node: NodeId::parse("n2").unwrap(),
                volumes: Arc::new(vec![summary("n2", "a")]),
                condition: Some(Condition {
                    abnormal: true,
                    message: "cannot be checked".into(),
                }),
            },
            Part {
                node: NodeId::parse("n1").unwrap(),
                volumes: Arc::new(vec![summary("n1", "a"), summary("n1", "b")]),
                condition: None,
            },
        ];
        let all = Listed::all(parts);
        let ids: Vec<&str> = all.iter().map(|l| l.volume().id()).collect();
        assert_eq!(ids, ["local:n1:default:a", "local:n1:default:b", "local:n2:default:a"]);
        assert!(all[2].condition().abnormal && !all[0].condition().abnormal);
        assert_eq!(all[2].node().as_str(), "n2");
    }

    #[test]
    fn paging_one_at_a_time_lists_every_volume_once_when_node_and_pool_names_prefix_each_other() {
        // The typed id sorts n1 before n10 and pool "p" before "p-1"; the text the pages are cut
        // by sorts them the other way round.
        let rec_in = |node: &str, pool: &str, name: &str| {
            let mut r = rec(node, name, 1);
            r.id = crate::storage::id::VolumeId::parse(&format!("local:{node}:{pool}:{name}")).unwrap();
            r
        };
        let n1 = vec![rec_in("n1", "p", "a"), rec_in("n1", "p-1", "a"), rec_in("n1", "p", "b")];
        let n10 = vec![rec_in("n10", "p", "a")];
        let l = Listings::default();
        let parts: Vec<Part> = [("n1", n1), ("n10", n10)]
            .into_iter()
            .map(|(node, recs)| Part {
                node: NodeId::parse(node).unwrap(),
                volumes: l
                    .replace(
                        node,
                        Instant::now(),
                        0,
                        recs.into_iter().map(|r| (r, ok())).collect(),
                        &[],
                    )
                    .volumes,
                condition: None,
            })
            .collect();
        let all = Listed::all(parts);
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) =
                crate::controller::page::page_sorted(&all, |l| l.volume().id().to_string(), &token, 1).unwrap();
            seen.extend(page.iter().map(|l| l.volume().id().to_string()));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        let mut want: Vec<String> = all.iter().map(|l| l.volume().id().to_string()).collect();
        want.sort();
        assert_eq!(seen, want, "every volume once, in the order of the id's text");
        // The listing's own searches find each of them too.
        for id in &want {
            assert!(l.find(id).is_some(), "{id} found");
        }
        l.remove("local:n1:p-1:a");
        assert!(l.find("local:n1:p-1:a").is_none(), "removed");
        assert_eq!(l.get("n1").unwrap().volumes.len(), 2);
    }

    #[test]
    fn a_summary_keeps_what_a_listing_shows() {
        let mut r = rec("n1", "a", 7);
        r.source = Some(ContentSource::Volume(
            crate::storage::id::VolumeId::parse("local:n1:default:src").unwrap(),
        ));
        let healthy = VolumeSummary::made(&r);
        assert_eq!(healthy.id(), "local:n1:default:a");
        assert_eq!(
            (healthy.name(), healthy.pool(), healthy.capacity_bytes),
            ("a", "default", 7)
        );
        assert!(!healthy.is_shared() && !healthy.condition().abnormal);
        assert_eq!(healthy.source(), r.source.as_ref());
        let sick = Condition {
            abnormal: true,
            message: "gone".into(),
        };
        assert_eq!(VolumeSummary::new(&r, &sick).condition(), &sick);
        let mut shared = rec("n1", "s", 1);
        shared.id = crate::storage::id::VolumeId::parse("shared:nfs:s").unwrap();
        let shared = VolumeSummary::made(&shared);
        assert!(shared.is_shared());
        assert_eq!(shared.pool(), "nfs");
    }
}
