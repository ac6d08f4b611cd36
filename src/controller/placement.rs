//! Where a new volume goes: the decision, apart from gathering the figures it is made from (the
//! nodes' last heartbeats, in `ControllerService::place`), so it is tested without any node.

use crate::csi::v1::TopologyRequirement;
use crate::storage::engine::NewVolume;
use crate::storage::id::NodeId;

use super::error::ControllerError;
use super::request;

/// Bytes a node's pool can still give a volume of the requested layout, or `None` when the node has
/// no such pool or it does not allow that layout.
pub(super) fn room_for(pools: &[crate::storage::engine::PoolStatus], spec: &NewVolume) -> Option<u64> {
    let p = pools.iter().find(|p| match &spec.pool {
        Some(name) => *name == p.name,
        None => p.is_default,
    })?;
    let layout = spec.layout.unwrap_or(p.default_layout);
    if !p.layouts.contains(&layout) {
        return None;
    }
    Some(if crate::storage::layout::of(layout).reserves_capacity() {
        p.image_allocatable_bytes
    } else {
        p.available_bytes
    })
}

/// Whether a node may take a volume the scheduler placed: with preferred topologies (the
/// scheduler's choice under WaitForFirstConsumer), only a node they name; without, any node.
pub(super) fn chosen(req: Option<&TopologyRequirement>, node: &NodeId) -> bool {
    let preferred = req.map(|r| r.preferred.as_slice()).unwrap_or_default();
    preferred.is_empty()
        || preferred
            .iter()
            .any(|t| request::topology_node(t).is_none_or(|x| x == node.as_str()))
}

/// Picks the node for a volume of `wanted` bytes among `rooms` (each ranked candidate with the room
/// its pool has for the volume, `None` when unknown or the pool cannot take it), as the request's
/// topology and whether each node's agent `answers` allow.
pub(super) fn pick(
    mut rooms: Vec<(NodeId, Option<u64>)>,
    req: Option<&TopologyRequirement>,
    wanted: u64,
    answers: impl Fn(&NodeId) -> bool,
) -> Result<NodeId, ControllerError> {
    if req.is_none_or(|r| r.preferred.is_empty()) {
        if rooms.is_empty() {
            return Err(ControllerError::NoRoom(
                "no node in the requisite topology can hold this volume".into(),
            ));
        }
        // Free to choose: a node whose agent did not answer its last call is passed over
        // while another can take the volume (its heartbeat's figures say nothing of that).
        if rooms.iter().any(|(n, _)| answers(n)) {
            rooms.retain(|(n, _)| answers(n));
        }
        rooms.sort_by_key(|r| std::cmp::Reverse(r.1));
    } else {
        // The scheduler chose: only a preferred node may take the volume, in the order given.
        rooms.retain(|(n, _)| chosen(req, n));
        if rooms.is_empty() {
            // The node the scheduler chose is not registered here (its agent is not running or
            // not yet enrolled; also when no node is available at all) or outside the requisite
            // topology: the scheduler must choose again, which RESOURCE_EXHAUSTED asks of the
            // provisioner.
            let named: Vec<&str> = req
                .map(|r| r.preferred.iter().filter_map(request::topology_node).collect())
                .unwrap_or_default();
            return Err(ControllerError::NoRoom(if named.is_empty() {
                "no node in the preferred topology can take the volume: no registered node is in \
                 the requisite topology"
                    .to_string()
            } else {
                format!(
                    "no node in the preferred topology can take the volume: {} {} not registered \
                     with the controller or not in the requisite topology",
                    named.join(", "),
                    if named.len() == 1 { "is" } else { "are" },
                )
            }));
        }
    }
    if let Some((n, _)) = rooms.iter().find(|(_, room)| room.is_some_and(|r| r >= wanted)) {
        return Ok(n.clone());
    }
    // A pool that does not exist or a layout it does not allow is the node's to explain.
    if let Some((n, None)) = rooms.first() {
        return Ok(n.clone());
    }
    // So is the only candidate's lack of room: its own check is current (the figures here
    // are its last heartbeat's, up to an interval old) and exact (the data of a copy of this very volume that died
    // before its record gives its room back to the retry).
    if let [(n, Some(_))] = rooms.as_slice() {
        return Ok(n.clone());
    }
    Err(ControllerError::NoRoom(format!(
        "no candidate node has {wanted} bytes free in the pool ({})",
        rooms
            .iter()
            .map(|(n, r)| format!(
                "{}: {}",
                n.as_str(),
                r.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into())
            ))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::v1::Topology;
    use crate::storage::engine::PoolStatus;
    use crate::storage::id::PoolName;
    use crate::storage::record::Layout;

    const GIB: u64 = 1 << 30;

    fn n(s: &str) -> NodeId {
        NodeId::parse(s).expect("node id")
    }

    fn rooms(r: &[(&str, Option<u64>)]) -> Vec<(NodeId, Option<u64>)> {
        r.iter().map(|(name, room)| (n(name), *room)).collect()
    }

    fn everyone(_: &NodeId) -> bool {
        true
    }

    fn preferring(nodes: &[&str]) -> TopologyRequirement {
        let t: Vec<Topology> = nodes.iter().map(|x| request::node_topology(&n(x))).collect();
        TopologyRequirement {
            requisite: t.clone(),
            preferred: t,
        }
    }

    fn pool(name: &str, default: bool, layouts: &[Layout], free: u64, image_free: u64) -> PoolStatus {
        PoolStatus {
            name: PoolName::parse(name).expect("pool name"),
            is_default: default,
            default_layout: layouts[0],
            layouts: layouts.to_vec(),
            total_bytes: 100 * GIB,
            available_bytes: free,
            image_allocatable_bytes: image_free,
            provisioned_bytes: 0,
            shared: false,
        }
    }

    fn spec(pool: Option<&str>, layout: Option<Layout>) -> NewVolume {
        NewVolume {
            pool: pool.map(|p| PoolName::parse(p).expect("pool name")),
            ..NewVolume::plain("pvc", layout, GIB)
        }
    }

    #[test]
    fn free_to_choose_the_node_with_the_most_room_that_answers_wins() {
        let r = rooms(&[("a", Some(2 * GIB)), ("b", Some(9 * GIB)), ("c", Some(5 * GIB))]);
        assert_eq!(pick(r.clone(), None, GIB, everyone).expect("placed"), n("b"));
        // b's agent did not answer its last call: passed over while another can take it.
        assert_eq!(pick(r, None, GIB, |x| x != &n("b")).expect("placed"), n("c"));
        // When no node answers, the figures alone decide.
        let r = rooms(&[("a", Some(2 * GIB)), ("b", Some(9 * GIB))]);
        assert_eq!(pick(r, None, GIB, |_| false).expect("placed"), n("b"));
    }

    #[test]
    fn the_schedulers_choice_is_kept_in_its_order_even_with_less_room() {
        let r = rooms(&[("a", Some(9 * GIB)), ("b", Some(2 * GIB)), ("c", Some(5 * GIB))]);
        let req = preferring(&["b", "c"]);
        assert_eq!(pick(r.clone(), Some(&req), GIB, everyone).expect("placed"), n("b"));
        // b is full: the next preferred node, never the unpreferred one with the most room.
        let r = rooms(&[("a", Some(9 * GIB)), ("b", Some(0)), ("c", Some(5 * GIB))]);
        assert_eq!(pick(r, Some(&req), GIB, everyone).expect("placed"), n("c"));
    }

    #[test]
    fn a_lone_candidate_or_one_with_unknown_room_answers_for_itself() {
        // Its own check is exact and current; the heartbeat's figures may be old.
        let r = rooms(&[("a", Some(0))]);
        assert_eq!(pick(r, None, GIB, everyone).expect("placed"), n("a"));
        // No such pool or layout there: the node explains the refusal itself.
        let r = rooms(&[("a", None)]);
        assert_eq!(pick(r, None, GIB, everyone).expect("placed"), n("a"));
    }

    #[test]
    fn no_room_anywhere_is_no_room_naming_every_candidate() {
        let r = rooms(&[("a", Some(GIB / 2)), ("b", Some(0))]);
        let e = pick(r, None, GIB, everyone).expect_err("nowhere fits");
        let msg = e.to_string();
        assert!(matches!(e, ControllerError::NoRoom(_)), "{msg}");
        assert!(msg.contains("a: 536870912") && msg.contains("b: 0"), "{msg}");
    }

    #[test]
    fn a_preferred_node_that_is_not_a_candidate_is_named_in_the_refusal() {
        // The scheduler chose c, which has no agent here: no other node may take the volume, and
        // the refusal says which node was asked for instead of listing nothing.
        let r = rooms(&[("a", Some(9 * GIB)), ("b", Some(9 * GIB))]);
        let e = pick(r, Some(&preferring(&["c"])), GIB, everyone).expect_err("c is not a candidate");
        let msg = e.to_string();
        assert!(matches!(e, ControllerError::NoRoom(_)), "{msg}");
        assert!(
            msg.contains("preferred topology") && msg.contains("c is not registered"),
            "{msg}"
        );
        assert!(!msg.contains("()"), "{msg}");
        // No candidate at all and a preferred segment that names no node: still a sentence.
        let zone = TopologyRequirement {
            preferred: vec![Topology {
                segments: [("topology.kubernetes.io/zone".to_string(), "a".to_string())].into(),
            }],
            ..Default::default()
        };
        let e = pick(Vec::new(), Some(&zone), GIB, everyone).expect_err("no candidate");
        assert!(e.to_string().contains("no registered node"), "{e}");
    }

    #[test]
    fn no_candidate_at_all_names_the_chosen_node_or_says_none_can_hold_the_volume() {
        let e = pick(Vec::new(), Some(&preferring(&["c"])), GIB, everyone).expect_err("no candidate");
        assert!(matches!(e, ControllerError::NoRoom(_)), "{e}");
        assert!(e.to_string().contains("c is not registered"), "{e}");
        let e = pick(Vec::new(), None, GIB, everyone).expect_err("no candidate");
        assert!(matches!(e, ControllerError::NoRoom(_)), "{e}");
        assert!(e.to_string().contains("no node in the requisite topology"), "{e}");
    }

    #[test]
    fn room_is_the_named_or_default_pools_for_the_layout_asked() {
        let pools = [
            pool("fast", true, &[Layout::Dir, Layout::Image], 7 * GIB, 3 * GIB),
            pool("big", false, &[Layout::Dir], 50 * GIB, 50 * GIB),
        ];
        assert_eq!(room_for(&pools, &spec(None, None)), Some(7 * GIB), "default pool, dir");
        assert_eq!(
            room_for(&pools, &spec(None, Some(Layout::Image))),
            Some(3 * GIB),
            "images count what existing images may still grow into"
        );
        assert_eq!(room_for(&pools, &spec(Some("big"), None)), Some(50 * GIB));
        assert_eq!(
            room_for(&pools, &spec(Some("big"), Some(Layout::Image))),
            None,
            "layout not allowed"
        );
        assert_eq!(room_for(&pools, &spec(Some("none"), None)), None, "no such pool");
    }
}
