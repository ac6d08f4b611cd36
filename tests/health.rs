//! CSI 1.13 volume health against a real all-in-one process: the exact codes of bad input, and
//! that the 1.13 RPCs and the 1.12 VolumeCondition report the same condition (docs/health.md).

mod common;

use cellar::csi::v1::node_get_storage_health_response::StorageBackendHealth;
use cellar::csi::v1::volume_health::VolumeHealthEntry;
use cellar::csi::v1::*;
use common::*;
use tonic::Code;

const UNKNOWN: &str = "local:node-1:default:nope";

impl Driver {
    async fn node_health(
        &mut self,
        volume_id: &str,
        staging: &str,
        publish: &str,
    ) -> Result<VolumeHealth, tonic::Status> {
        self.node
            .node_get_volume_health(NodeGetVolumeHealthRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.to_string(),
                volume_publish_path: publish.to_string(),
            })
            .await
            .map(|r| r.into_inner().volume_health.expect("volume_health"))
    }

    async fn controller_health(&mut self, volume_id: &str) -> Result<VolumeHealth, tonic::Status> {
        self.ctl
            .controller_get_volume_health(ControllerGetVolumeHealthRequest {
                volume_id: volume_id.to_string(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().volume_health.expect("volume_health"))
    }

    async fn get_volume_condition(&mut self, volume_id: &str) -> VolumeCondition {
        self.ctl
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: volume_id.to_string(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner()
            .status
            .and_then(|s| s.volume_condition)
            .expect("volume_condition")
    }

    async fn list_health(
        &mut self,
        max_entries: i32,
        token: &str,
    ) -> Result<ControllerListVolumeHealthResponse, tonic::Status> {
        self.ctl
            .controller_list_volume_health(ControllerListVolumeHealthRequest {
                max_entries,
                starting_token: token.to_string(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// The one entry of an abnormal volume.
fn only_entry(h: &VolumeHealth) -> &VolumeHealthEntry {
    assert_eq!(h.health_statuses.len(), 1, "{h:?}");
    &h.health_statuses[0]
}

fn status_of(e: &VolumeHealthEntry) -> VolumeHealthErrorType {
    VolumeHealthErrorType::try_from(e.status).expect("a known status")
}

// ---------------------------------------------------------------- bad input

#[tokio::test]
async fn node_volume_health_without_volume_id_is_invalid_argument() {
    let mut d = Driver::start().await;
    let staging = d.path("s").display().to_string();
    assert_eq!(
        code(d.node_health("", &staging, "").await.map(tonic::Response::new)),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn node_volume_health_of_unknown_volume_is_not_found() {
    let mut d = Driver::start().await;
    let staging = d.path("s");
    std::fs::create_dir_all(&staging).unwrap();
    for id in [UNKNOWN, "fake-vol-id"] {
        let r = d.node_health(id, &staging.display().to_string(), "").await;
        assert_eq!(code(r.map(tonic::Response::new)), Code::NotFound, "{id}");
        let r = d.node_health(id, "", "").await;
        assert_eq!(code(r.map(tonic::Response::new)), Code::NotFound, "{id} without paths");
    }
}

#[tokio::test]
async fn node_volume_health_with_a_nul_in_a_path_is_invalid_argument() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-h-nul").await;
    let r = d.node_health(&v.volume_id, "/tmp/a\0b", "").await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::InvalidArgument);
}

#[tokio::test]
async fn controller_volume_health_without_volume_id_is_invalid_argument() {
    let mut d = Driver::start().await;
    assert_eq!(
        code(d.controller_health("").await.map(tonic::Response::new)),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn controller_volume_health_of_unknown_volume_is_not_found() {
    let mut d = Driver::start().await;
    for id in [UNKNOWN, "fake-vol-id", "local:node-9:default:x"] {
        assert_eq!(
            code(d.controller_health(id).await.map(tonic::Response::new)),
            Code::NotFound,
            "{id}"
        );
    }
}

#[tokio::test]
async fn list_volume_health_with_negative_max_entries_is_invalid_argument() {
    let mut d = Driver::start().await;
    assert_eq!(
        code(d.list_health(-1, "").await.map(tonic::Response::new)),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn list_volume_health_with_a_foreign_token_is_aborted() {
    let mut d = Driver::start().await;
    d.create("pvc-h-token").await;
    assert_eq!(
        code(d.list_health(1, "not-ours").await.map(tonic::Response::new)),
        Code::Aborted
    );
}

// ---------------------------------------------------------------- healthy and abnormal volumes

#[tokio::test]
async fn a_healthy_staged_volume_is_healthy_in_every_view() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-h-ok").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "hok").await;
    for (s, p) in [
        (staging.display().to_string(), String::new()),
        (staging.display().to_string(), target.display().to_string()),
        (String::new(), String::new()),
    ] {
        let h = d.node_health(&v.volume_id, &s, &p).await.unwrap();
        assert_eq!(h.volume_id, v.volume_id);
        assert!(h.health_statuses.is_empty(), "{s} {p}: {h:?}");
    }
    let h = d.controller_health(&v.volume_id).await.unwrap();
    assert_eq!(h.volume_id, v.volume_id);
    assert!(h.health_statuses.is_empty(), "{h:?}");
    assert!(
        !d.stats(&v.volume_id, &target)
            .await
            .unwrap()
            .volume_condition
            .unwrap()
            .abnormal
    );
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn a_staging_mount_removed_behind_the_drivers_back_is_inaccessible_in_both_versions() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-h-umount").await;
    let staging = d.path("hum-staging");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage(&v.volume_id, &staging).await.unwrap();
    nix::mount::umount(&staging).expect("umount the staging path");

    let h = d
        .node_health(&v.volume_id, &staging.display().to_string(), "")
        .await
        .unwrap();
    let e = only_entry(&h);
    assert_eq!(status_of(e), VolumeHealthErrorType::Inaccessible);
    assert_eq!(e.reason, "NotMounted");
    let old = d.stats(&v.volume_id, &staging).await.unwrap().volume_condition.unwrap();
    assert!(old.abnormal);
    assert_eq!(old.message, e.message, "1.12 and 1.13 report one condition");
    // Asked with no path, the node looks where it staged the volume.
    let h = d.node_health(&v.volume_id, "", "").await.unwrap();
    assert_eq!(only_entry(&h).reason, "NotMounted");
    d.unstage(&v.volume_id, &staging).await.unwrap();
}

#[tokio::test]
async fn a_publish_path_that_does_not_exist_is_inaccessible() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-h-nopath").await;
    let missing = d.path("never-published");
    let h = d
        .node_health(&v.volume_id, "", &missing.display().to_string())
        .await
        .unwrap();
    let e = only_entry(&h);
    assert_eq!(status_of(e), VolumeHealthErrorType::Inaccessible);
    assert!(e.message.contains("does not exist"), "{}", e.message);
}

#[tokio::test]
async fn a_dir_volume_over_its_capacity_is_degraded_in_both_versions() {
    let mut d = Driver::start().await;
    let v = d
        .ctl
        .create_volume(create_req("pvc-h-over", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (staging, target) = d.mount_rw(&v.volume_id, "hover").await;
    let bytes = vec![7u8; (v.capacity_bytes + 2 * MIB) as usize];
    std::fs::write(target.join("big"), &bytes).unwrap();
    nix::unistd::sync();

    let node = d
        .node_health(
            &v.volume_id,
            &staging.display().to_string(),
            &target.display().to_string(),
        )
        .await
        .unwrap();
    let e = only_entry(&node).clone();
    assert_eq!(status_of(&e), VolumeHealthErrorType::Degraded);
    assert_eq!(e.reason, "OverCapacity");
    let old = d.stats(&v.volume_id, &target).await.unwrap().volume_condition.unwrap();
    assert!(old.abnormal);
    assert_eq!(old.message, e.message);

    let ctl = d.controller_health(&v.volume_id).await.unwrap();
    let ce = only_entry(&ctl);
    assert_eq!(status_of(ce), VolumeHealthErrorType::Degraded);
    assert_eq!(ce.reason, "OverCapacity");
    let old = d.get_volume_condition(&v.volume_id).await;
    assert!(old.abnormal);
    assert_eq!(old.message, ce.message);

    let listed = d.list_health(0, "").await.unwrap();
    let mine = listed
        .entries
        .iter()
        .find(|h| h.volume_id == v.volume_id)
        .expect("listed");
    assert_eq!(only_entry(mine).reason, "OverCapacity");
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn missing_data_is_inaccessible_from_the_controller_as_in_get_volume() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-h-gone").await;
    std::fs::remove_dir(d.pool_dir().join("volumes/pvc-h-gone")).unwrap();
    let h = d.controller_health(&v.volume_id).await.unwrap();
    let e = only_entry(&h);
    assert_eq!(status_of(e), VolumeHealthErrorType::Inaccessible);
    assert_eq!(e.reason, "DataMissing");
    assert_eq!(d.get_volume_condition(&v.volume_id).await.message, e.message);
}

// ---------------------------------------------------------------- listing

#[tokio::test]
async fn list_volume_health_lists_every_volume_page_by_page() {
    let mut d = Driver::start().await;
    let mut want = Vec::new();
    for i in 0..5 {
        want.push(d.create(&format!("pvc-h-list-{i}")).await.volume_id);
    }
    want.sort();
    let mut got = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = d.list_health(2, &token).await.unwrap();
        assert!(r.entries.len() <= 2);
        for h in &r.entries {
            assert!(h.health_statuses.is_empty(), "{h:?}");
        }
        got.extend(r.entries.into_iter().map(|h| h.volume_id));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(got, want);
    assert_eq!(pages, 3);
    let all = d.list_health(0, "").await.unwrap();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
}

// ---------------------------------------------------------------- storage

async fn storage_health(d: &mut Driver) -> Vec<StorageBackendHealth> {
    d.node
        .node_get_storage_health(NodeGetStorageHealthRequest::default())
        .await
        .expect("NodeGetStorageHealth")
        .into_inner()
        .backend_health
}

#[tokio::test]
async fn storage_health_of_a_node_whose_pools_open_has_nothing_unreachable() {
    let mut d = Driver::start().await;
    let got = storage_health(&mut d).await;
    // Only a nearly full disk under the test's directory may show (as degraded, never unreachable).
    assert!(
        got.iter()
            .all(|b| b.status == StorageHealthErrorType::StorageDegraded as i32 && b.reason == "PoolNearlyFull"),
        "{got:?}"
    );
}

#[tokio::test]
async fn storage_health_names_a_pool_that_cannot_be_opened() {
    // A btrfs pool on a directory that is not btrfs cannot be opened; the driver serves the others.
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("pools.yaml");
    let path = cfgdir.path().join("not-btrfs");
    let yaml = format!(
        "pools:\n  - name: default\n  - name: fast\n    path: {}\n    layout: btrfs\n",
        path.display()
    );
    std::fs::write(&cfg, yaml).unwrap();
    let mut d = Driver::start_with(&["--config", cfg.to_str().unwrap()], &[]).await;
    let got = storage_health(&mut d).await;
    let broken: Vec<_> = got.iter().filter(|b| b.reason == "PoolBroken").collect();
    assert_eq!(broken.len(), 1, "{got:?}");
    assert_eq!(broken[0].status, StorageHealthErrorType::StorageUnreachable as i32);
    assert!(broken[0].message.contains("pool 'fast'"), "{}", broken[0].message);
}

/// A pool whose room can no longer be read (its directory moved away after the start) is named;
/// before, NodeGetStorageHealth failed whole and named nothing, not even the other findings.
#[tokio::test]
async fn storage_health_names_a_pool_whose_room_cannot_be_read() {
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("pools.yaml");
    let path = cfgdir.path().join("other");
    let yaml = format!(
        "pools:\n  - name: default\n  - name: other\n    path: {}\n",
        path.display()
    );
    std::fs::write(&cfg, yaml).unwrap();
    let mut d = Driver::start_with(&["--config", cfg.to_str().unwrap()], &[]).await;
    std::fs::rename(&path, cfgdir.path().join("moved-away")).unwrap();
    let got = storage_health(&mut d).await;
    let unreadable: Vec<_> = got.iter().filter(|b| b.reason == "PoolUnreadable").collect();
    assert_eq!(unreadable.len(), 1, "{got:?}");
    assert_eq!(unreadable[0].status, StorageHealthErrorType::StorageUnreachable as i32);
    assert!(
        unreadable[0].message.contains("pool 'other'"),
        "{}",
        unreadable[0].message
    );
}

// ---------------------------------------------------------------- capabilities

async fn health_capabilities(d: &mut Driver) -> (bool, bool, bool, bool) {
    use controller_service_capability::rpc::Type as C;
    use node_service_capability::rpc::Type as N;
    let node: Vec<i32> = d
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("NodeGetCapabilities")
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|node_service_capability::Type::Rpc(r)| r.r#type))
        .collect();
    let ctl: Vec<i32> = d
        .ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .expect("ControllerGetCapabilities")
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    (
        node.contains(&(N::GetVolumeHealth as i32)),
        node.contains(&(N::GetStorageHealth as i32)),
        ctl.contains(&(C::GetVolumeHealth as i32)),
        ctl.contains(&(C::ListVolumeHealth as i32)),
    )
}

#[tokio::test]
async fn health_capabilities_are_not_advertised_by_default() {
    let mut d = Driver::start().await;
    assert_eq!(health_capabilities(&mut d).await, (false, false, false, false));
}

#[tokio::test]
async fn health_capabilities_are_advertised_with_the_flag() {
    let mut d = Driver::start_with(&["--advertise-volume-health"], &[]).await;
    assert_eq!(health_capabilities(&mut d).await, (true, true, true, true));
}
