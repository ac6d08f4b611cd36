//! CSI v1.13 health: how our volume conditions read as `VolumeHealth` entries, and the health
//! capabilities, advertised only on request (docs/health.md).
//!
//! The 1.12 `VolumeCondition` and the 1.13 entries are two views of one condition: the message is
//! the same text, and the status and reason say which fault it is. Conditions made on this
//! process carry their fault as a type; those that crossed the agent wire carry only their
//! message, so [`engine_fault`] recognises them by the words their producer always puts in.

use super::status::bounded;
use super::v1::node_get_storage_health_response::StorageBackendHealth;
use super::v1::volume_health::VolumeHealthEntry;
use super::v1::{
    controller_service_capability, node_service_capability, StorageHealthErrorType, VolumeCondition, VolumeHealth,
    VolumeHealthErrorType,
};
use crate::storage::engine::{self, Condition};

/// One known fault of a volume: its 1.13 status and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub status: VolumeHealthErrorType,
    pub reason: &'static str,
}

impl Fault {
    pub const fn inaccessible(reason: &'static str) -> Fault {
        Fault {
            status: VolumeHealthErrorType::Inaccessible,
            reason,
        }
    }

    pub const fn degraded(reason: &'static str) -> Fault {
        Fault {
            status: VolumeHealthErrorType::Degraded,
            reason,
        }
    }
}

/// The volume has no record where its id says it lives.
pub const NO_RECORD: Fault = Fault::inaccessible("VolumeNotFound");
/// The record is there, its data (directory, subvolume, image file) is not.
pub const DATA_MISSING: Fault = Fault::inaccessible("DataMissing");
/// A dir volume holds more than its capacity (dir does not enforce it).
pub const OVER_CAPACITY: Fault = Fault::degraded("OverCapacity");
/// A dir volume's tree is deeper than a copy takes: its snapshots and clones are refused, and its
/// use is counted down to that depth only.
pub const TREE_TOO_DEEP: Fault = Fault::degraded("TreeTooDeep");
/// The node that holds the volume does not answer; the answer is its last listing.
pub const NODE_UNREACHABLE: Fault = Fault::inaccessible("NodeUnreachable");

/// A condition together with the fault that made it abnormal (`None`: healthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub fault: Option<Fault>,
    pub message: String,
}

impl Finding {
    pub fn healthy(message: impl Into<String>) -> Finding {
        Finding {
            fault: None,
            message: message.into(),
        }
    }

    pub fn abnormal(fault: Fault, message: impl Into<String>) -> Finding {
        Finding {
            fault: Some(fault),
            message: message.into(),
        }
    }

    /// The 1.13 view: no entry when healthy, one entry naming the fault otherwise.
    pub fn volume_health(&self, volume_id: &str) -> VolumeHealth {
        VolumeHealth {
            volume_id: volume_id.to_string(),
            health_statuses: self
                .fault
                .iter()
                .map(|f| VolumeHealthEntry {
                    status: f.status as i32,
                    reason: f.reason.to_string(),
                    message: bounded(&self.message).into_owned(),
                })
                .collect(),
        }
    }
}

/// The 1.12 view of the same finding.
impl From<Finding> for VolumeCondition {
    fn from(f: Finding) -> VolumeCondition {
        VolumeCondition {
            abnormal: f.fault.is_some(),
            message: f.message,
        }
    }
}

/// Recognises the fault of a condition made by `LocalEngine::condition`, here or on another node.
pub fn engine_fault(c: &Condition) -> Option<Fault> {
    if !c.abnormal {
        None
    } else if c.message.contains(engine::NO_RECORD) {
        Some(NO_RECORD)
    } else if c.message.contains(engine::UNENFORCED_CAPACITY) {
        Some(OVER_CAPACITY)
    } else if c.message.contains(engine::TOO_DEEP_TO_COPY) {
        Some(TREE_TOO_DEEP)
    } else {
        Some(DATA_MISSING)
    }
}

/// A condition the controller answers with: an engine's, or its own for an unreachable node.
pub fn controller_finding(c: &Condition) -> Finding {
    let fault = if c.abnormal && c.message.starts_with(crate::controller::UNREACHABLE) {
        Some(NODE_UNREACHABLE)
    } else {
        engine_fault(c)
    };
    Finding {
        fault,
        message: c.message.clone(),
    }
}

/// One condition of a storage backend seen from a node.
pub fn backend(status: StorageHealthErrorType, reason: &str, message: &str) -> StorageBackendHealth {
    StorageBackendHealth {
        status: status as i32,
        reason: reason.to_string(),
        message: bounded(message).into_owned(),
        volume_capability: None,
    }
}

/// Node capabilities of 1.13 health: served always, advertised only when asked, since csi-sanity
/// v5.4 refuses capability values it does not know.
pub fn node_capabilities(advertise: bool) -> &'static [node_service_capability::rpc::Type] {
    use node_service_capability::rpc::Type;
    if advertise {
        &[Type::GetVolumeHealth, Type::GetStorageHealth]
    } else {
        &[]
    }
}

/// Controller capabilities of 1.13 health, under the same rule as the node's.
pub fn controller_capabilities(advertise: bool) -> &'static [controller_service_capability::rpc::Type] {
    use controller_service_capability::rpc::Type;
    if advertise {
        &[Type::ListVolumeHealth, Type::GetVolumeHealth]
    } else {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abnormal(message: String) -> Condition {
        Condition {
            abnormal: true,
            message,
        }
    }

    #[test]
    fn engine_conditions_keep_their_fault_across_the_wire() {
        let over = abnormal(format!(
            "volume x holds 9 bytes, capacity 1; {}",
            engine::UNENFORCED_CAPACITY
        ));
        assert_eq!(engine_fault(&over), Some(OVER_CAPACITY));
        let gone = abnormal(format!("volume x {} n1", engine::NO_RECORD));
        assert_eq!(engine_fault(&gone), Some(NO_RECORD));
        let deep = abnormal(format!("volume x {} (1000 levels at most)", engine::TOO_DEEP_TO_COPY));
        assert_eq!(engine_fault(&deep), Some(TREE_TOO_DEEP));
        assert_eq!(
            engine_fault(&abnormal("directory /p/x is missing".into())),
            Some(DATA_MISSING)
        );
        let fine = Condition {
            abnormal: false,
            message: "volume data is present".into(),
        };
        assert_eq!(engine_fault(&fine), None);
    }

    #[test]
    fn both_views_carry_the_same_message() {
        let f = Finding::abnormal(OVER_CAPACITY, "too big");
        let h = f.volume_health("v");
        assert_eq!(h.health_statuses.len(), 1);
        assert_eq!(h.health_statuses[0].status, VolumeHealthErrorType::Degraded as i32);
        assert_eq!(h.health_statuses[0].reason, "OverCapacity");
        let c = VolumeCondition::from(f);
        assert!(c.abnormal);
        assert_eq!(c.message, h.health_statuses[0].message);
        assert!(Finding::healthy("ok").volume_health("v").health_statuses.is_empty());
    }

    /// The numbers a kubelet or health monitor built on the CSI v1.13 Go bindings reads: a wrong
    /// enum value would report a degraded volume as inaccessible (or lost) without any error.
    #[test]
    fn health_wire_numbers_are_those_of_csi_1_13() {
        use prost::Message;
        assert_eq!(VolumeHealthErrorType::UnknownVolumeHealthType as i32, 0);
        assert_eq!(VolumeHealthErrorType::Degraded as i32, 1);
        assert_eq!(VolumeHealthErrorType::Inaccessible as i32, 2);
        assert_eq!(VolumeHealthErrorType::DataLoss as i32, 3);
        assert_eq!(StorageHealthErrorType::StorageUnreachable as i32, 1);
        assert_eq!(StorageHealthErrorType::StorageDegraded as i32, 2);
        assert_eq!(controller_service_capability::rpc::Type::ListVolumeHealth as i32, 16);
        assert_eq!(controller_service_capability::rpc::Type::GetVolumeHealth as i32, 17);
        assert_eq!(node_service_capability::rpc::Type::GetVolumeHealth as i32, 7);
        assert_eq!(node_service_capability::rpc::Type::GetStorageHealth as i32, 8);

        // VolumeHealth{volume_id = 1, health_statuses = 2{status = 1, reason = 2, message = 3}}.
        let h = Finding::abnormal(OVER_CAPACITY, "m").volume_health("v");
        let mut want = vec![0x0a, 1, b'v', 0x12, 19, 0x08, 1, 0x12, 12];
        want.extend_from_slice(b"OverCapacity");
        want.extend_from_slice(&[0x1a, 1, b'm']);
        assert_eq!(h.encode_to_vec(), want);

        // NodeGetStorageHealthResponse{backend_health = 1{status = 1, reason = 2, message = 3}}.
        let r = super::super::v1::NodeGetStorageHealthResponse {
            backend_health: vec![backend(StorageHealthErrorType::StorageDegraded, "R", "m")],
        };
        assert_eq!(r.encode_to_vec(), [0x0a, 8, 0x08, 2, 0x12, 1, b'R', 0x1a, 1, b'm']);
    }

    #[test]
    fn health_capabilities_only_when_asked() {
        assert!(node_capabilities(false).is_empty());
        assert!(controller_capabilities(false).is_empty());
        assert_eq!(node_capabilities(true).len(), 2);
        assert_eq!(controller_capabilities(true).len(), 2);
    }
}
