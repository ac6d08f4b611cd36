//! The CSI behaviour csi-sanity checks, and the bad inputs of the foundation issue, each as one test
//! asserting the exact gRPC code. Runs against a real all-in-one process with real mounts.

mod common;

use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::*;
use common::*;
use tonic::Code;

// ---------------------------------------------------------------- Identity

#[tokio::test]
async fn plugin_info_names_the_driver_and_version() {
    let mut d = Driver::start().await;
    let r =
        d.id.get_plugin_info(GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.name, "cellar.csi.dev");
    assert_eq!(r.vendor_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn plugin_capabilities_offer_controller_topology_and_online_expansion() {
    use plugin_capability::{service, volume_expansion, Type};
    let mut d = Driver::start().await;
    let caps =
        d.id.get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(service::Type::ControllerService as i32)));
    assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(Type::VolumeExpansion(e)) if e.r#type == volume_expansion::Type::Online as i32)));
}

#[tokio::test]
async fn probe_is_ready_once_pools_are_open() {
    let mut d = Driver::start().await;
    let r = d.id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(r.ready, Some(true));
}

// ---------------------------------------------------------------- CreateVolume

#[tokio::test]
async fn create_without_name_is_invalid_argument() {
    let mut d = Driver::start().await;
    let r = d.ctl.create_volume(create_req("", 64 * MIB)).await;
    assert_eq!(code(r), Code::InvalidArgument);
}

#[tokio::test]
async fn create_without_capabilities_is_invalid_argument() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-nocaps", 64 * MIB);
    req.volume_capabilities.clear();
    assert_eq!(code(d.ctl.create_volume(req).await), Code::InvalidArgument);
}

#[tokio::test]
async fn create_returns_exact_capacity_topology_and_a_directory() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-exact", 64 * MIB);
    req.capacity_range = Some(CapacityRange {
        required_bytes: 64 * MIB,
        limit_bytes: 64 * MIB,
    });
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert_eq!(v.volume_id, "local:node-1:default:pvc-exact");
    assert_eq!(
        v.accessible_topology[0]
            .segments
            .get("topology.cellar.csi.dev/node")
            .map(String::as_str),
        Some(NODE)
    );
    assert!(d.pool_dir().join("volumes/pvc-exact").is_dir());
    assert!(d.pool_dir().join("volumes/pvc-exact.json").is_file());
}

#[tokio::test]
async fn create_without_capacity_gets_the_default_size() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-default-size", 0);
    req.capacity_range = None;
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.capacity_bytes, 1 << 30);
}

#[tokio::test]
async fn create_same_name_same_request_returns_same_volume() {
    let mut d = Driver::start().await;
    let a = d.create("pvc-twice").await;
    let b = d.create("pvc-twice").await;
    assert_eq!(a.volume_id, b.volume_id);
    assert_eq!(a.capacity_bytes, b.capacity_bytes);
}

#[tokio::test]
async fn create_same_name_other_size_is_already_exists() {
    let mut d = Driver::start().await;
    d.create("pvc-size").await;
    let mut req = create_req("pvc-size", 128 * MIB);
    req.capacity_range.as_mut().unwrap().limit_bytes = 128 * MIB;
    assert_eq!(code(d.ctl.create_volume(req).await), Code::AlreadyExists);
}

#[tokio::test]
async fn create_same_name_other_capability_is_already_exists() {
    let mut d = Driver::start().await;
    d.create("pvc-cap").await;
    let mut req = create_req("pvc-cap", 64 * MIB);
    req.volume_capabilities = vec![mount_cap(Mode::SingleNodeReaderOnly)];
    assert_eq!(code(d.ctl.create_volume(req).await), Code::AlreadyExists);
}

#[tokio::test]
async fn create_same_name_other_source_is_already_exists() {
    let mut d = Driver::start().await;
    let src = d.create("pvc-src").await;
    d.create("pvc-plain").await;
    let mut req = create_req("pvc-plain", 64 * MIB);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: src.volume_id,
            },
        )),
    });
    assert_eq!(code(d.ctl.create_volume(req).await), Code::AlreadyExists);
}

#[tokio::test]
async fn create_with_maximum_length_name_works() {
    let mut d = Driver::start().await;
    let name = format!("pvc-{}", "a".repeat(124));
    assert_eq!(name.len(), 128);
    let v = d.create(&name).await;
    assert!(v.volume_id.ends_with(&name));
}

#[tokio::test]
async fn create_with_limit_below_required_is_out_of_range() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-range", 64 * MIB);
    req.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    assert_eq!(code(d.ctl.create_volume(req).await), Code::OutOfRange);
}

#[tokio::test]
async fn create_with_negative_capacity_is_out_of_range() {
    let mut d = Driver::start().await;
    assert_eq!(
        code(d.ctl.create_volume(create_req("pvc-neg", -1)).await),
        Code::OutOfRange
    );
}

#[tokio::test]
async fn create_beyond_the_pool_is_resource_exhausted() {
    let mut d = Driver::start().await;
    let r = d.ctl.create_volume(create_req("pvc-huge", i64::MAX / 2)).await;
    assert_eq!(code(r), Code::ResourceExhausted);
    assert!(!d.pool_dir().join("volumes/pvc-huge").exists(), "nothing half-made");
}

#[tokio::test]
async fn create_multi_node_writer_on_local_pool_is_invalid_argument_naming_the_mode() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-rwx", 64 * MIB);
    req.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    let e = d.ctl.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("shared pool"), "{}", e.message());
}

#[tokio::test]
async fn create_single_node_modes_and_rox_on_local_pool_work() {
    let mut d = Driver::start().await;
    for (i, m) in [
        Mode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
        Mode::MultiNodeReaderOnly,
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = create_req(&format!("pvc-mode-{i}"), 64 * MIB);
        req.volume_capabilities = vec![mount_cap(m)];
        assert_eq!(code(d.ctl.create_volume(req).await), Code::Ok, "{m:?}");
    }
}

#[tokio::test]
async fn create_block_on_dir_layout_is_invalid_argument() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-block", 64 * MIB);
    req.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    assert_eq!(code(d.ctl.create_volume(req).await), Code::InvalidArgument);
}

#[tokio::test]
async fn create_with_unknown_parameter_pool_or_layout_is_invalid_argument() {
    let mut d = Driver::start().await;
    for (k, v) in [
        ("colour", "blue"),
        ("pool", "nope"),
        ("layout", "zfs"),
        ("layout", "btrfs"),
    ] {
        let mut req = create_req("pvc-param", 64 * MIB);
        req.parameters.insert(k.into(), v.into());
        let e = d.ctl.create_volume(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{k}={v}: {}", e.message());
    }
}

#[tokio::test]
async fn create_keeps_sidecar_metadata_parameters() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-meta", 64 * MIB);
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    req.parameters.insert("pool".into(), "default".into());
    assert_eq!(code(d.ctl.create_volume(req).await), Code::Ok);
}

#[tokio::test]
async fn create_with_unknown_fs_type_is_invalid_argument() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-fs", 64 * MIB);
    req.volume_capabilities = vec![VolumeCapability {
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: "zfs".into(),
            ..Default::default()
        })),
    }];
    assert_eq!(code(d.ctl.create_volume(req).await), Code::InvalidArgument);
}

#[tokio::test]
async fn create_with_mutable_parameters_is_invalid_argument() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-vac", 64 * MIB);
    req.mutable_parameters.insert("XXX_FakeKey".into(), "x".into());
    assert_eq!(code(d.ctl.create_volume(req).await), Code::InvalidArgument);
}

#[tokio::test]
async fn create_on_a_requisite_topology_without_this_node_is_resource_exhausted() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-topo", 64 * MIB);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: [("topology.cellar.csi.dev/node".to_string(), "elsewhere".to_string())].into(),
        }],
        preferred: vec![],
    });
    assert_eq!(code(d.ctl.create_volume(req).await), Code::ResourceExhausted);
}

#[tokio::test]
async fn create_on_this_nodes_topology_works() {
    let mut d = Driver::start().await;
    let info = d.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    let mut req = create_req("pvc-here", 64 * MIB);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![info.accessible_topology.clone().unwrap()],
        preferred: vec![info.accessible_topology.unwrap()],
    });
    assert_eq!(code(d.ctl.create_volume(req).await), Code::Ok);
}

#[tokio::test]
async fn create_from_missing_snapshot_or_volume_is_not_found() {
    let mut d = Driver::start().await;
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    for src in [
        Type::Snapshot(SnapshotSource {
            snapshot_id: "non-existing-snapshot-id".into(),
        }),
        Type::Snapshot(SnapshotSource {
            snapshot_id: "snap:local:node-1:default:nope".into(),
        }),
        Type::Volume(VolumeSource {
            volume_id: "fake-vol-id".into(),
        }),
        Type::Volume(VolumeSource {
            volume_id: "local:node-1:default:nope".into(),
        }),
    ] {
        let mut req = create_req("pvc-from-nothing", 64 * MIB);
        req.volume_content_source = Some(VolumeContentSource { r#type: Some(src) });
        assert_eq!(code(d.ctl.create_volume(req).await), Code::NotFound);
    }
}

#[tokio::test]
async fn create_from_snapshot_returns_content_source_and_copies_data() {
    let mut d = Driver::start().await;
    let src = d.create("pvc-orig").await;
    let (st, tg) = d.mount_rw(&src.volume_id, "orig").await;
    std::fs::write(tg.join("hello"), b"world").unwrap();
    let snap = d.snapshot("snap-1", &src.volume_id).await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, src.volume_id);
    assert!(snap.creation_time.is_some());
    let mut req = create_req("pvc-restored", 64 * MIB);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert!(v.content_source.is_some());
    let (st2, tg2) = d.mount_rw(&v.volume_id, "restored").await;
    assert_eq!(std::fs::read(tg2.join("hello")).unwrap(), b"world");
    d.unmount_all(&v.volume_id, &st2, &tg2).await;
    d.unmount_all(&src.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn create_from_snapshot_smaller_than_source_is_out_of_range() {
    let mut d = Driver::start().await;
    let src = d.create("pvc-big").await;
    let snap = d.snapshot("snap-big", &src.volume_id).await.unwrap();
    let mut req = create_req("pvc-small", MIB);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id,
            },
        )),
    });
    assert_eq!(code(d.ctl.create_volume(req).await), Code::OutOfRange);
}

// ---------------------------------------------------------------- DeleteVolume

#[tokio::test]
async fn delete_without_id_is_invalid_argument() {
    let mut d = Driver::start().await;
    assert_eq!(
        code(d.ctl.delete_volume(DeleteVolumeRequest::default()).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn delete_unknown_or_foreign_id_is_ok() {
    let mut d = Driver::start().await;
    for id in [
        "fake-vol-id",
        "local:node-1:default:never",
        "local:other:default:x",
        "shared:nfs:x",
    ] {
        assert_eq!(code(d.delete(id).await.map(tonic::Response::new)), Code::Ok, "{id}");
    }
}

#[tokio::test]
async fn delete_removes_data_and_record_and_is_idempotent() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-del").await;
    d.delete(&v.volume_id).await.unwrap();
    d.delete(&v.volume_id).await.unwrap();
    assert!(!d.pool_dir().join("volumes/pvc-del").exists());
    assert!(!d.pool_dir().join("volumes/pvc-del.json").exists());
    assert_eq!(std::fs::read_dir(d.pool_dir().join(".trash")).unwrap().count(), 0);
    let again = d.create("pvc-del").await;
    assert_eq!(again.volume_id, v.volume_id, "a name is reusable after delete");
}

// ---------------------------------------------------------------- ValidateVolumeCapabilities

#[tokio::test]
async fn validate_requires_id_and_capabilities() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-val").await;
    let r = d.ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
        volume_capabilities: vec![rwo()],
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::InvalidArgument);
    let r = d.ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id,
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::InvalidArgument);
}

#[tokio::test]
async fn validate_unknown_volume_is_not_found() {
    let mut d = Driver::start().await;
    let r = d.ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
        volume_id: "local:node-1:default:nope".into(),
        volume_capabilities: vec![rwo()],
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::NotFound);
}

#[tokio::test]
async fn validate_confirms_local_modes_and_refuses_rwx() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-val2").await;
    let ok = d
        .ctl
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![rwo()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 1);
    let no = d
        .ctl
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id,
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());
}

fn fs_cap(mode: Mode, fs_type: &str, flags: &[&str]) -> VolumeCapability {
    let mut c = cellar::client::mount_capability(mode, flags.iter().map(|f| f.to_string()).collect());
    if let Some(volume_capability::AccessType::Mount(m)) = c.access_type.as_mut() {
        m.fs_type = fs_type.into();
    }
    c
}

/// The spec: `confirmed` only if every capability is supported; one cellar does not offer (a
/// filesystem or mount option it cannot honour) is not confirmed, with a message, not an error. The
/// parameters and context it confirms are the volume's: others are not confirmed either.
#[tokio::test]
async fn validate_confirms_only_what_the_volume_was_made_with() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-val3", 64 * MIB);
    req.parameters.insert("deletePolicy".into(), "retain".into());
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    let validate = |caps: Vec<VolumeCapability>, params: &[(&str, &str)], ctx: &[(&str, &str)]| {
        ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: caps,
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            volume_context: ctx.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    };
    for (what, caps) in [
        (
            "an unknown filesystem",
            vec![fs_cap(Mode::SingleNodeWriter, "ntfs", &[])],
        ),
        (
            "a mount option no bind mount honours",
            vec![fs_cap(Mode::SingleNodeWriter, "", &["sync"])],
        ),
        (
            "one of two",
            vec![rwo(), fs_cap(Mode::SingleNodeWriter, "", &["uid=3"])],
        ),
    ] {
        let r = d.ctl.validate_volume_capabilities(validate(caps, &[], &[])).await;
        let r = r.unwrap_or_else(|e| panic!("{what}: {e:?}")).into_inner();
        assert!(r.confirmed.is_none(), "{what}: {r:?}");
        assert!(!r.message.is_empty(), "{what}");
    }
    for (what, params, ctx) in [
        ("another pool", vec![("pool", "other")], vec![]),
        ("another layout", vec![("layout", "btrfs")], vec![]),
        ("another delete policy", vec![("deletePolicy", "delete")], vec![]),
        ("a parameter it was not made with", vec![("uid", "1000")], vec![]),
        ("another context", vec![], vec![("pool", "other")]),
    ] {
        let r = d
            .ctl
            .validate_volume_capabilities(validate(vec![rwo()], &params, &ctx))
            .await;
        let r = r.unwrap_or_else(|e| panic!("{what}: {e:?}")).into_inner();
        assert!(r.confirmed.is_none(), "{what}: {r:?}");
        assert!(!r.message.is_empty(), "{what}");
    }
    // Its own parameters (the pool and layout it got by default included), the context CreateVolume
    // answered and the sidecars' keys are confirmed.
    let ctx: Vec<(&str, &str)> = v.volume_context.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let params = [
        ("deletePolicy", "retain"),
        ("pool", v.volume_context["pool"].as_str()),
        ("layout", v.volume_context["layout"].as_str()),
        ("csi.storage.k8s.io/pvc/name", "anything"),
    ];
    let r = d
        .ctl
        .validate_volume_capabilities(validate(vec![rwo()], &params, &ctx))
        .await;
    let confirmed = r.unwrap().into_inner().confirmed.expect("confirmed");
    assert_eq!(confirmed.parameters.len(), params.len());
    assert_eq!(confirmed.volume_context, v.volume_context);
}

/// ControllerExpandVolume and NodeExpandVolume with a capability the volume cannot serve: the
/// spec's "Exceeds capabilities", INVALID_ARGUMENT for both; nothing grows.
#[tokio::test]
async fn expand_with_a_capability_the_volume_cannot_serve_is_invalid_argument() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-expcap").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "expcap").await;
    let grow = |cap: &VolumeCapability| ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 128 * MIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    for cap in [block_cap(Mode::SingleNodeWriter), mount_cap(Mode::MultiNodeMultiWriter)] {
        let r = d.ctl.controller_expand_volume(grow(&cap));
        assert_eq!(code(r.await), Code::InvalidArgument, "{cap:?}");
        let r = d.node.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        });
        assert_eq!(code(r.await), Code::InvalidArgument, "{cap:?}");
    }
    let got = d.ctl.controller_get_volume(ControllerGetVolumeRequest {
        volume_id: v.volume_id.clone(),
    });
    let got = got.await.unwrap().into_inner().volume.unwrap();
    assert_eq!(got.capacity_bytes, 64 * MIB, "nothing grew");
    // Its own capability: grown.
    let r = d.ctl.controller_expand_volume(grow(&rwo())).await;
    assert_eq!(r.unwrap().into_inner().capacity_bytes, 128 * MIB);
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

// ---------------------------------------------------------------- ListVolumes / GetVolume / Capacity

#[tokio::test]
async fn list_volumes_shows_new_and_hides_deleted() {
    let mut d = Driver::start().await;
    let n0 = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .len();
    let v = d.create("sanity").await;
    let l = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.entries.len(), n0 + 1);
    let st = l.entries[0].status.clone().unwrap();
    assert!(!st.volume_condition.unwrap().abnormal);
    d.delete(&v.volume_id).await.unwrap();
    let n2 = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .len();
    assert_eq!(n2, n0);
}

#[tokio::test]
async fn list_volumes_paginates_without_gaps_or_repeats() {
    let mut d = Driver::start().await;
    for i in 0..5 {
        d.create(&format!("pvc-page-{i}")).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = d
            .ctl
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        seen.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5);
    assert_eq!(seen.len(), 5);
}

#[tokio::test]
async fn list_volumes_token_survives_deleting_the_last_listed_volume() {
    let mut d = Driver::start().await;
    for i in 0..3 {
        d.create(&format!("pvc-tok-{i}")).await;
    }
    let r = d
        .ctl
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let last = r.entries[1].volume.clone().unwrap().volume_id;
    d.delete(&last).await.unwrap();
    d.create("pvc-tok-9").await;
    let rest = d
        .ctl
        .list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: r.next_token,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = rest.entries.into_iter().map(|e| e.volume.unwrap().volume_id).collect();
    assert_eq!(
        ids,
        vec!["local:node-1:default:pvc-tok-2", "local:node-1:default:pvc-tok-9"]
    );
}

#[tokio::test]
async fn list_volumes_with_foreign_token_is_aborted() {
    let mut d = Driver::start().await;
    let r = d.ctl.list_volumes(ListVolumesRequest {
        max_entries: 0,
        starting_token: "invalid-token".into(),
    });
    assert_eq!(code(r.await), Code::Aborted);
}

#[tokio::test]
async fn get_volume_reports_condition_and_unknown_is_not_found() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-get").await;
    let r = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.status.unwrap().volume_condition.unwrap().abnormal);
    std::fs::remove_dir(d.pool_dir().join("volumes/pvc-get")).unwrap();
    let r = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id })
        .await
        .unwrap()
        .into_inner();
    let c = r.status.unwrap().volume_condition.unwrap();
    assert!(c.abnormal, "missing data is abnormal");
    let r = d.ctl.controller_get_volume(ControllerGetVolumeRequest {
        volume_id: "local:node-1:default:nope".into(),
    });
    assert_eq!(code(r.await), Code::NotFound);
    let r = d.ctl.controller_get_volume(ControllerGetVolumeRequest::default());
    assert_eq!(code(r.await), Code::InvalidArgument);
}

#[tokio::test]
async fn get_capacity_reports_pool_free_space_and_zero_elsewhere() {
    let mut d = Driver::start().await;
    let all = d
        .ctl
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.available_capacity > 0);
    let other = d
        .ctl
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(Topology {
                segments: [("topology.cellar.csi.dev/node".to_string(), "elsewhere".to_string())].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.available_capacity, 0);
    let rwx = d
        .ctl
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rwx.available_capacity, 0, "no local pool serves RWX");
    // The default pool is a dir pool: it makes no Block volume, so it has no room for one.
    let block = d.ctl.get_capacity(GetCapacityRequest {
        volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    });
    let block = block.await.unwrap().into_inner();
    assert_eq!(block.available_capacity, 0, "a dir pool serves no Block volume");
    assert_eq!(block.maximum_volume_size, Some(0));
    let bad = d.ctl.get_capacity(GetCapacityRequest {
        parameters: [("pool".to_string(), "nope".to_string())].into(),
        ..Default::default()
    });
    let bad = bad.await.unwrap().into_inner();
    assert_eq!(bad.available_capacity, 0, "an unknown pool has no capacity");
}

#[tokio::test]
async fn controller_capabilities_are_the_documented_set() {
    use controller_service_capability::{rpc::Type as T, Type};
    let mut d = Driver::start().await;
    let caps = d
        .ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let got: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|Type::Rpc(r)| r.r#type))
        .collect();
    for t in [
        T::CreateDeleteVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::CreateDeleteSnapshot,
        T::ListSnapshots,
        T::CloneVolume,
        T::ExpandVolume,
        T::VolumeCondition,
        T::GetVolume,
        T::SingleNodeMultiWriter,
    ] {
        assert!(got.contains(&(t as i32)), "{t:?}");
    }
    assert!(
        !got.contains(&(T::PublishUnpublishVolume as i32)),
        "nothing needs attaching"
    );
}

#[tokio::test]
async fn controller_publish_is_unimplemented() {
    let mut d = Driver::start().await;
    let r = d
        .ctl
        .controller_publish_volume(ControllerPublishVolumeRequest::default());
    assert_eq!(code(r.await), Code::Unimplemented);
}

// ---------------------------------------------------------------- Expand

#[tokio::test]
async fn expand_requires_id_and_range() {
    let mut d = Driver::start().await;
    let r = d.ctl.controller_expand_volume(ControllerExpandVolumeRequest {
        capacity_range: Some(CapacityRange {
            required_bytes: MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::InvalidArgument);
    let v = d.create("pvc-exp0").await;
    let r = d.ctl.controller_expand_volume(ControllerExpandVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::InvalidArgument);
}

#[tokio::test]
async fn expand_reports_exact_new_size_and_refuses_to_shrink() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-exp").await;
    let req = |b: i64| ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: b,
            limit_bytes: b,
        }),
        ..Default::default()
    };
    let r = d
        .ctl
        .controller_expand_volume(req(96 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 96 * MIB);
    assert!(!r.node_expansion_required);
    let again = d
        .ctl
        .controller_expand_volume(req(96 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.capacity_bytes, 96 * MIB, "repeating an expansion is OK");
    assert_eq!(
        code(d.ctl.controller_expand_volume(req(32 * MIB)).await),
        Code::OutOfRange
    );
    let unknown = ControllerExpandVolumeRequest {
        volume_id: "local:node-1:default:nope".into(),
        ..req(96 * MIB)
    };
    assert_eq!(code(d.ctl.controller_expand_volume(unknown).await), Code::NotFound);
}

// ---------------------------------------------------------------- Snapshots

#[tokio::test]
async fn create_snapshot_requires_name_and_source() {
    let mut d = Driver::start().await;
    assert_eq!(
        code(d.snapshot("", "testId").await.map(tonic::Response::new)),
        Code::InvalidArgument
    );
    assert_eq!(
        code(d.snapshot("name", "").await.map(tonic::Response::new)),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn create_snapshot_of_unknown_volume_is_not_found() {
    let mut d = Driver::start().await;
    let r = d.snapshot("snap-x", "local:node-1:default:nope").await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::NotFound);
}

#[tokio::test]
async fn create_snapshot_twice_is_ok_and_other_source_is_already_exists() {
    let mut d = Driver::start().await;
    let a = d.create("pvc-sa").await;
    let b = d.create("pvc-sb").await;
    let s1 = d.snapshot("snap-same", &a.volume_id).await.unwrap();
    let s2 = d.snapshot("snap-same", &a.volume_id).await.unwrap();
    assert_eq!(s1.snapshot_id, s2.snapshot_id);
    assert_eq!(s1.creation_time, s2.creation_time);
    let r = d.snapshot("snap-same", &b.volume_id).await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::AlreadyExists);
}

#[tokio::test]
async fn create_snapshot_with_unknown_parameter_is_invalid_argument() {
    let mut d = Driver::start().await;
    let a = d.create("pvc-sp").await;
    let r = d.ctl.create_snapshot(CreateSnapshotRequest {
        name: "snap-p".into(),
        source_volume_id: a.volume_id,
        parameters: [("colour".to_string(), "blue".to_string())].into(),
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::InvalidArgument);
}

#[tokio::test]
async fn delete_snapshot_requires_id_and_unknown_is_ok() {
    let mut d = Driver::start().await;
    let r = d.ctl.delete_snapshot(DeleteSnapshotRequest::default());
    assert_eq!(code(r.await), Code::InvalidArgument);
    for id in ["reallyfakesnapshotid", "snap:local:node-1:default:none"] {
        let r = d.ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        });
        assert_eq!(code(r.await), Code::Ok);
    }
}

#[tokio::test]
async fn list_snapshots_filters_and_paginates() {
    let mut d = Driver::start().await;
    let mut snaps = Vec::new();
    for i in 0..3 {
        let v = d.create(&format!("pvc-ls-{i}")).await;
        snaps.push(d.snapshot(&format!("snap-ls-{i}"), &v.volume_id).await.unwrap());
    }
    let by_id = d
        .ctl
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: snaps[1].snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(
        by_id.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        snaps[1].snapshot_id
    );
    let by_src = d
        .ctl
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: snaps[2].source_volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_src.entries.len(), 1);
    for (sid, vid) in [("none-exist-id", ""), ("", "fake-vol-id-1")] {
        let none = d
            .ctl
            .list_snapshots(ListSnapshotsRequest {
                snapshot_id: sid.into(),
                source_volume_id: vid.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(none.entries.is_empty());
    }
    let p1 = d
        .ctl
        .list_snapshots(ListSnapshotsRequest {
            max_entries: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    let p2 = d
        .ctl
        .list_snapshots(ListSnapshotsRequest {
            starting_token: p1.next_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    let bad = d.ctl.list_snapshots(ListSnapshotsRequest {
        starting_token: "invalid-token".into(),
        ..Default::default()
    });
    assert_eq!(code(bad.await), Code::Aborted);
}

#[tokio::test]
async fn get_snapshot_finds_it_and_unknown_is_not_found() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-gs").await;
    let s = d.snapshot("snap-gs", &v.volume_id).await.unwrap();
    let got = d
        .ctl
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap().snapshot_id, s.snapshot_id);
    for (id, want) in [("none-exist-id", Code::NotFound), ("", Code::InvalidArgument)] {
        let r = d.ctl.get_snapshot(GetSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        });
        assert_eq!(code(r.await), want);
    }
}

// ---------------------------------------------------------------- Node: stage / publish

#[tokio::test]
async fn node_info_reports_id_topology_and_limit() {
    let mut d = Driver::start_with(&["--max-volumes-per-node", "250"], &[]).await;
    let r = d.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(r.node_id, NODE);
    assert_eq!(r.max_volumes_per_node, 250);
    assert_eq!(
        r.accessible_topology
            .unwrap()
            .segments
            .get("topology.cellar.csi.dev/node")
            .map(String::as_str),
        Some(NODE)
    );
}

#[tokio::test]
async fn stage_and_publish_check_arguments_before_existence() {
    let mut d = Driver::start().await;
    let t = d.path("t");
    let s = d.path("s");
    let cases: Vec<(NodePublishVolumeRequest, Code)> = vec![
        (NodePublishVolumeRequest::default(), Code::InvalidArgument),
        (
            NodePublishVolumeRequest {
                volume_id: "fake".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            NodePublishVolumeRequest {
                volume_id: "fake".into(),
                target_path: t.display().to_string(),
                staging_target_path: s.display().to_string(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            NodePublishVolumeRequest {
                volume_id: "fake".into(),
                target_path: t.display().to_string(),
                staging_target_path: s.display().to_string(),
                volume_capability: Some(rwo()),
                ..Default::default()
            },
            Code::NotFound,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(code(d.node.node_publish_volume(req).await), want);
    }
    assert_eq!(
        code(d.node.node_stage_volume(NodeStageVolumeRequest::default()).await),
        Code::InvalidArgument
    );
    let v = d.create("pvc-stage-nocap").await;
    let r = d.node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.volume_id,
        staging_target_path: s.display().to_string(),
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::InvalidArgument);
    let r = d.stage("local:node-1:default:nope", &s).await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::NotFound);
}

#[tokio::test]
async fn publish_makes_the_volume_visible_and_unpublish_removes_the_target() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-pub").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "pub").await;
    std::fs::write(target.join("f"), b"data").unwrap();
    assert_eq!(std::fs::read(d.pool_dir().join("volumes/pvc-pub/f")).unwrap(), b"data");
    assert_eq!(mounts_under(d.dir.path()).len(), 2);
    d.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(!target.exists(), "the target directory we made is removed");
    d.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(mounts_under(d.dir.path()).is_empty());
    assert!(staging.is_dir(), "the staging directory belongs to the CO and stays");
}

#[tokio::test]
async fn stage_and_publish_ten_times_are_ok() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-idem").await;
    let staging = d.path("idem-staging");
    let target = d.path("idem-target");
    std::fs::create_dir_all(&staging).unwrap();
    for _ in 0..10 {
        d.stage(&v.volume_id, &staging).await.unwrap();
    }
    for _ in 0..10 {
        d.publish(&v.volume_id, &staging, &target, rwo(), false).await.unwrap();
    }
    assert_eq!(mounts_under(d.dir.path()).len(), 2, "no stacked mounts");
    for _ in 0..3 {
        d.unpublish(&v.volume_id, &target).await.unwrap();
        d.unstage(&v.volume_id, &staging).await.unwrap();
    }
}

#[tokio::test]
async fn publish_without_stage_is_failed_precondition() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-nostage").await;
    let staging = d.path("nostage-staging");
    std::fs::create_dir_all(&staging).unwrap();
    let r = d
        .publish(&v.volume_id, &staging, &d.path("nostage-target"), rwo(), false)
        .await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::FailedPrecondition);
    assert!(!d.path("nostage-target").exists());
}

#[tokio::test]
async fn publish_read_only_is_enforced() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-ro").await;
    let staging = d.path("ro-staging");
    let target = d.path("ro-target");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage(&v.volume_id, &staging).await.unwrap();
    d.publish(&v.volume_id, &staging, &target, rwo(), true).await.unwrap();
    let e = std::fs::write(target.join("x"), b"no").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    std::fs::write(staging.join("y"), b"yes").unwrap();
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn publish_reader_only_mode_is_read_only_even_without_flag() {
    let mut d = Driver::start().await;
    let mut req = create_req("pvc-rox", 64 * MIB);
    req.volume_capabilities = vec![mount_cap(Mode::MultiNodeReaderOnly)];
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    let staging = d.path("rox-staging");
    let target = d.path("rox-target");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage_as(&v.volume_id, &staging, mount_cap(Mode::MultiNodeReaderOnly))
        .await
        .unwrap();
    d.publish(
        &v.volume_id,
        &staging,
        &target,
        mount_cap(Mode::MultiNodeReaderOnly),
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::write(target.join("x"), b"no").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn publish_honours_mount_flags() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-flags").await;
    let staging = d.path("flags-staging");
    let target = d.path("flags-target");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage(&v.volume_id, &staging).await.unwrap();
    let cap = cellar::client::mount_capability(Mode::SingleNodeWriter, vec!["noexec".into(), "nosuid".into()]);
    d.publish(&v.volume_id, &staging, &target, cap, false).await.unwrap();
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let m = cellar::sys::mountinfo::parse(&table)
        .into_iter()
        .find(|m| m.mount_point == target)
        .unwrap();
    assert!(m.options.split(',').any(|o| o == "noexec"), "{}", m.options);
    assert!(m.options.split(',').any(|o| o == "nosuid"), "{}", m.options);
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn publish_with_unsupported_mount_flag_is_invalid_argument() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-badflag").await;
    let staging = d.path("bf-staging");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage(&v.volume_id, &staging).await.unwrap();
    let cap = cellar::client::mount_capability(Mode::SingleNodeWriter, vec!["uid=5".into()]);
    let r = d
        .publish(&v.volume_id, &staging, &d.path("bf-target"), cap, false)
        .await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::InvalidArgument);
    d.unstage(&v.volume_id, &staging).await.unwrap();
}

#[tokio::test]
async fn publish_same_target_other_readonly_is_already_exists() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-incompat").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "incompat").await;
    let r = d.publish(&v.volume_id, &staging, &target, rwo(), true).await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::AlreadyExists);
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn single_node_single_writer_second_target_is_failed_precondition() {
    let mut d = Driver::start().await;
    let rwop = mount_cap(Mode::SingleNodeSingleWriter);
    let mut req = create_req("pvc-rwop", 64 * MIB);
    req.volume_capabilities = vec![rwop.clone()];
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    let staging = d.path("rwop-staging");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage_as(&v.volume_id, &staging, rwop.clone()).await.unwrap();
    let t1 = d.path("rwop-1");
    let t2 = d.path("rwop-2");
    d.publish(&v.volume_id, &staging, &t1, rwop.clone(), false)
        .await
        .unwrap();
    let r = d.publish(&v.volume_id, &staging, &t2, rwop.clone(), false).await;
    assert_eq!(code(r.map(tonic::Response::new)), Code::FailedPrecondition);
    assert!(!t2.exists());
    d.unpublish(&v.volume_id, &t1).await.unwrap();
    d.publish(&v.volume_id, &staging, &t2, rwop, false).await.unwrap();
    d.unmount_all(&v.volume_id, &staging, &t2).await;
}

#[tokio::test]
async fn single_node_multi_writer_publishes_to_many_targets() {
    let mut d = Driver::start().await;
    let cap = mount_cap(Mode::SingleNodeMultiWriter);
    let mut req = create_req("pvc-snmw", 64 * MIB);
    req.volume_capabilities = vec![cap.clone()];
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    let staging = d.path("snmw-staging");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage_as(&v.volume_id, &staging, cap.clone()).await.unwrap();
    for t in ["snmw-1", "snmw-2"] {
        d.publish(&v.volume_id, &staging, &d.path(t), cap.clone(), false)
            .await
            .unwrap();
    }
    std::fs::write(d.path("snmw-1").join("a"), b"1").unwrap();
    assert_eq!(std::fs::read(d.path("snmw-2").join("a")).unwrap(), b"1");
    for t in ["snmw-1", "snmw-2"] {
        d.unpublish(&v.volume_id, &d.path(t)).await.unwrap();
    }
    d.unstage(&v.volume_id, &staging).await.unwrap();
}

#[tokio::test]
async fn unpublish_and_unstage_of_unknown_things_are_ok_and_touch_nothing() {
    let mut d = Driver::start().await;
    let stranger = d.path("not-ours");
    std::fs::create_dir_all(&stranger).unwrap();
    d.unpublish("local:node-1:default:never", &stranger).await.unwrap();
    d.unstage("fake-vol-id", &stranger).await.unwrap();
    assert!(stranger.is_dir(), "a directory we did not make is left alone");
    assert_eq!(
        code(
            d.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    let r = d.node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: "x".into(),
        ..Default::default()
    });
    assert_eq!(code(r.await), Code::InvalidArgument);
}

#[tokio::test]
async fn stats_report_bytes_and_inodes_and_missing_things_are_not_found() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-stats").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "stats").await;
    let r = d
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.usage.len(), 2);
    assert!(r.usage[0].total > 0);
    assert!(!r.volume_condition.unwrap().abnormal);
    for (vid, path, want) in [
        ("", "/x", Code::InvalidArgument),
        (v.volume_id.as_str(), "", Code::InvalidArgument),
        ("fake-vol-id", "some/path", Code::NotFound),
        (v.volume_id.as_str(), "some/path", Code::NotFound),
        (v.volume_id.as_str(), "/nonexistent/cellar/path", Code::NotFound),
    ] {
        let r = d.node.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vid.into(),
            volume_path: path.into(),
            ..Default::default()
        });
        assert_eq!(code(r.await), want, "{vid} {path}");
    }
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

/// A path that exists but where the volume was never staged or published: the spec's "volume does
/// not exist on specified volume_path", NOT_FOUND (not an abnormal condition of the volume).
#[tokio::test]
async fn stats_of_a_path_the_volume_was_never_at_are_not_found() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-stats2").await;
    let plain = d.path("plain-dir");
    std::fs::create_dir_all(&plain).unwrap();
    let err = d.stats(&v.volume_id, &plain).await.expect_err("not the volume's path");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // The volume staged elsewhere changes nothing.
    let (staging, target) = d.mount_rw(&v.volume_id, "stats2").await;
    let err = d.stats(&v.volume_id, &plain).await.expect_err("still not its path");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn node_expand_after_publish_is_ok_and_checks_arguments() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-nexp").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "nexp").await;
    let r = d
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 64 * MIB);
    for (vid, path, want) in [
        ("", target.display().to_string(), Code::InvalidArgument),
        (v.volume_id.as_str(), String::new(), Code::InvalidArgument),
        ("fake-vol-id", "some/path".to_string(), Code::NotFound),
    ] {
        let r = d.node.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: vid.into(),
            volume_path: path,
            ..Default::default()
        });
        assert_eq!(code(r.await), want);
    }
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn node_capabilities_include_stage_stats_expand_condition() {
    use node_service_capability::{rpc::Type as T, Type};
    let mut d = Driver::start().await;
    let caps = d
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let got: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|Type::Rpc(r)| r.r#type))
        .collect();
    for t in [
        T::StageUnstageVolume,
        T::GetVolumeStats,
        T::ExpandVolume,
        T::VolumeCondition,
        T::SingleNodeMultiWriter,
    ] {
        assert!(got.contains(&(t as i32)), "{t:?}");
    }
}

// ---------------------------------------------------------------- Concurrency and lifecycle

#[tokio::test]
async fn calls_on_different_volumes_run_in_parallel() {
    let d = Driver::start().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut ctl = d.ctl.clone();
        tasks.push(tokio::spawn(async move {
            ctl.create_volume(create_req(&format!("pvc-par-{i}"), 64 * MIB))
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut ctl = d.ctl.clone();
    let n = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .len();
    assert_eq!(n, 16);
}

#[tokio::test]
async fn a_busy_volume_answers_aborted() {
    // A 200 MiB file makes the snapshot copy slow enough to overlap a second call on its volume.
    let mut d = Driver::start().await;
    let v = d.create("pvc-busy").await;
    let f = std::fs::File::create(d.pool_dir().join("volumes/pvc-busy/big")).unwrap();
    let mut w = std::io::BufWriter::new(f);
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..200 {
        std::io::Write::write_all(&mut w, &chunk).unwrap();
    }
    drop(w);
    let mut ctl = d.ctl.clone();
    let vid = v.volume_id.clone();
    let snap = tokio::spawn(async move {
        let req = CreateSnapshotRequest {
            name: "snap-busy".into(),
            source_volume_id: vid,
            ..Default::default()
        };
        loop {
            match ctl.create_snapshot(req.clone()).await {
                // One of the expands below took the lock first: retry, as a CO does.
                Err(s) if s.code() == Code::Aborted => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
                other => return other,
            }
        }
    });
    // Expanding to the current size is a no-op that takes the same per-volume lock.
    let same = ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 64 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let mut saw_aborted = false;
    while !snap.is_finished() {
        match d.ctl.controller_expand_volume(same.clone()).await {
            Err(s) if s.code() == Code::Aborted => {
                saw_aborted = true;
                break;
            }
            Err(s) => panic!("unexpected {:?}: {}", s.code(), s.message()),
            Ok(_) => {}
        }
    }
    snap.await.unwrap().unwrap();
    assert!(
        saw_aborted,
        "a call during a snapshot copy of its volume must answer ABORTED"
    );
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Driver::start().await;
    let st = d.stop();
    assert!(st.success(), "{st}");
    assert!(!d.socket().exists());
}

#[tokio::test]
async fn a_stale_socket_is_replaced_at_start() {
    let mut d = Driver::start().await;
    d.kill();
    assert!(d.socket().exists(), "SIGKILL leaves the socket");
    d.spawn(&[]).await;
    assert!(d.id.probe(ProbeRequest {}).await.is_ok());
}

#[tokio::test]
async fn state_survives_a_restart() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-restart").await;
    let s = d.snapshot("snap-restart", &v.volume_id).await.unwrap();
    let (staging, target) = d.mount_rw(&v.volume_id, "restart").await;
    d.kill();
    d.spawn(&[]).await;
    let got = d.create("pvc-restart").await;
    assert_eq!(got.volume_id, v.volume_id);
    let l = d
        .ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.entries[0].snapshot.as_ref().unwrap().snapshot_id, s.snapshot_id);
    d.unmount_all(&v.volume_id, &staging, &target).await;
    assert!(!target.exists());
}

#[tokio::test]
async fn a_config_file_with_errors_exits_non_zero_naming_the_line() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pools.yaml");
    std::fs::write(&cfg, "pools:\n  - name: fast\n    colour: blue\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["all-in-one", "--node-id", "n", "--endpoint"])
        .arg(format!("unix://{}/s.sock", dir.path().display()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
}

#[tokio::test]
async fn a_config_file_adds_pools() {
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("pools.yaml");
    let fast = cfgdir.path().join("fast");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: default\n  - name: fast\n    path: {}\n",
            fast.display()
        ),
    )
    .unwrap();
    let mut d = Driver::start_with(&["--config", cfg.to_str().unwrap()], &[]).await;
    let mut req = create_req("pvc-fast", 64 * MIB);
    req.parameters.insert("pool".into(), "fast".into());
    let v = d.ctl.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.volume_id, "local:node-1:fast:pvc-fast");
    assert!(fast.join("volumes/pvc-fast").is_dir());
    let mut other = create_req("pvc-fast", 64 * MIB);
    other.parameters.insert("pool".into(), "default".into());
    assert_eq!(
        code(d.ctl.create_volume(other).await),
        Code::AlreadyExists,
        "one name, one volume"
    );
}
