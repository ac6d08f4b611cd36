//! The driver's log: one line per RPC with method, volume, duration and code, in text or JSON, and
//! never a trace of the secrets a request carries, at any level.

mod common;

use std::collections::HashMap;

use cellar::csi::v1::*;
use common::*;

/// Secrets as the sidecars pass them: a unique marker in values and in a key.
fn secrets(marker: &str) -> HashMap<String, String> {
    HashMap::from([
        ("password".to_string(), marker.to_string()),
        (format!("key-{marker}"), format!("value-{marker}")),
    ])
}

/// Calls every RPC that takes secrets, successful and failing, each carrying the marker.
async fn calls_with_secrets(d: &mut Driver, marker: &str) {
    let mut create = create_req("pvc-secret", 64 * MIB);
    create.secrets = secrets(marker);
    let vol = d
        .ctl
        .create_volume(create)
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    let mut refused = create_req("pvc-refused", 64 * MIB);
    refused.secrets = secrets(marker);
    refused.parameters.insert("colour".into(), "blue".into());
    assert!(
        d.ctl.create_volume(refused).await.is_err(),
        "an unknown parameter is refused"
    );

    let staging = d.path("secret-staging");
    let target = d.path("secret-target");
    std::fs::create_dir_all(&staging).expect("staging dir");
    d.node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(rwo()),
            secrets: secrets(marker),
            ..Default::default()
        })
        .await
        .expect("stage");
    d.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(rwo()),
            secrets: secrets(marker),
            ..Default::default()
        })
        .await
        .expect("publish");
    let snap = d
        .ctl
        .create_snapshot(CreateSnapshotRequest {
            name: "snap-secret".into(),
            source_volume_id: vol.volume_id.clone(),
            secrets: secrets(marker),
            ..Default::default()
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    d.ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            secrets: secrets(marker),
            ..Default::default()
        })
        .await
        .expect("expand");
    d.unmount_all(&vol.volume_id, &staging, &target).await;
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            secrets: secrets(marker),
        })
        .await
        .expect("delete snapshot");
    d.ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id,
            secrets: secrets(marker),
        })
        .await
        .expect("delete");
}

fn marker() -> String {
    format!("s3cret-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn secrets_never_reach_the_text_log_at_trace_level() {
    let marker = marker();
    let mut d = Driver::start_with(&[], &[("CELLAR_LOG", "trace")]).await;
    calls_with_secrets(&mut d, &marker).await;
    // Each event is written before the call answers: the log is complete here.
    let log = d.log();
    assert!(log.contains("TRACE"), "the log was not at trace level:\n{log}");
    assert!(log.contains("method=\"NodePublishVolume\""), "{log}");
    assert!(!log.contains(&marker), "a secret reached the log:\n{log}");
}

#[tokio::test]
async fn secrets_never_reach_the_json_log_at_trace_level() {
    let marker = marker();
    let mut d = Driver::start_with(&["--log-format", "json"], &[("CELLAR_LOG", "trace")]).await;
    calls_with_secrets(&mut d, &marker).await;
    // Each event is written before the call answers: the log is complete here.
    let log = d.log();
    assert!(
        log.contains("\"level\":\"TRACE\""),
        "the log was not at trace level:\n{log}"
    );
    assert!(log.contains("\"method\":\"NodePublishVolume\""), "{log}");
    assert!(!log.contains(&marker), "a secret reached the log:\n{log}");
}

/// The JSON lines of the log that describe an RPC.
fn rpc_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["message"] == "rpc")
        .collect()
}

#[tokio::test]
async fn every_rpc_is_logged_once_with_method_volume_duration_and_code() {
    let mut d = Driver::start_with(&["--log-format", "json"], &[]).await;
    let v = d.create("pvc-logged").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "logged").await;
    d.unmount_all(&v.volume_id, &staging, &target).await;
    let lines = rpc_lines(&d.log());
    let methods: Vec<&str> = lines.iter().map(|l| l["method"].as_str().expect("method")).collect();
    assert_eq!(
        methods,
        [
            "CreateVolume",
            "NodeStageVolume",
            "NodePublishVolume",
            "NodeUnpublishVolume",
            "NodeUnstageVolume"
        ]
    );
    let publish = &lines[2];
    assert_eq!(publish["volume"], v.volume_id.as_str());
    assert_eq!(publish["code"], "OK");
    assert!(publish["micros"].is_u64(), "{publish}");
}

#[tokio::test]
async fn a_failed_rpc_is_logged_with_its_code_and_error() {
    let mut d = Driver::start_with(&["--log-format", "json"], &[]).await;
    let id = "local:node-1:default:pvc-absent";
    let r = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.into() })
        .await;
    assert_eq!(code(r), tonic::Code::NotFound);
    let lines = rpc_lines(&d.log());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["level"], "WARN");
    assert_eq!(lines[0]["method"], "ControllerGetVolume");
    assert_eq!(lines[0]["volume"], id);
    assert_eq!(lines[0]["code"], "NotFound");
    assert_eq!(lines[0]["error"], format!("volume {id} not found"));
}

#[tokio::test]
async fn text_logs_written_to_a_file_have_no_colour_codes() {
    let mut d = Driver::start().await;
    d.create("pvc-plain").await;
    let log = d.log();
    assert!(log.contains("method=\"CreateVolume\""), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log:?}");
}

#[tokio::test]
async fn calls_that_no_handler_names_are_logged_by_the_trace_layer() {
    // ControllerPublishVolume is not offered: its handler answers at once without naming a volume,
    // and the one trace layer on the socket still logs and counts it.
    let mut d = Driver::start_with(&["--log-format", "json"], &[]).await;
    let r = d
        .ctl
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: "pvc-never-attached".into(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), tonic::Code::Unimplemented);
    let lines = rpc_lines(&d.log());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["method"], "ControllerPublishVolume");
    assert_eq!(lines[0]["code"], "Unimplemented");
}
