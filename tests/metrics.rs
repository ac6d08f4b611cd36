//! `--metrics-listen`: /metrics scraped while a real driver answers calls, /healthz and /readyz.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cellar::csi::v1::*;
use common::*;
use tonic::Code;

/// Starts a driver serving metrics on a free loopback port, and finds the port in its log.
async fn start(extra: &[&str]) -> (Driver, u16) {
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let d = Driver::start_with(&args, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.log();
        let port = log
            .lines()
            .find(|l| l.contains("metrics listening"))
            .and_then(|l| l.split("addr=127.0.0.1:").nth(1))
            .and_then(|p| p.trim().parse::<u16>().ok());
        if let Some(port) = port {
            return (d, port);
        }
        assert!(Instant::now() < deadline, "no metrics address in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

fn get(port: u16, path: &str) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    Reply {
        status,
        content_type,
        body: body.to_string(),
    }
}

fn scrape(port: u16) -> String {
    let r = get(port, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// The value of the sample written exactly as `series` (name and labels), or 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(0.0)
}

/// Every sample line of a metric family (name followed by `{`).
fn series<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}{{");
    text.lines().filter(|l| l.starts_with(&prefix)).collect()
}

fn label_names(sample: &str) -> BTreeSet<String> {
    let labels = sample
        .split_once('{')
        .and_then(|(_, r)| r.split_once('}'))
        .expect("labels")
        .0;
    labels
        .split("\",")
        .map(|kv| kv.split_once('=').expect("key=value").0.to_string())
        .collect()
}

fn requests(method: &str, code: &str) -> String {
    format!("cellar_csi_requests_total{{method=\"{method}\",code=\"{code}\"}}")
}

async fn get_volume(d: &mut Driver, id: &str) -> Code {
    code(
        d.ctl
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: id.to_string(),
            })
            .await,
    )
}

#[tokio::test]
async fn healthz_answers_ok() {
    let (_d, port) = start(&[]).await;
    let r = get(port, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
}

#[tokio::test]
async fn readyz_is_ready_once_the_pools_are_open() {
    let (d, port) = start(&[]).await;
    let r = get(port, "/readyz");
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let log = d.log();
    assert!(!log.contains("WARN"), "a normal start warns about nothing:\n{log}");
}

#[tokio::test]
async fn readyz_is_unavailable_while_a_pool_cannot_be_opened() {
    // A btrfs pool on a directory that is not btrfs cannot be opened.
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("pools.yaml");
    let path = cfgdir.path().join("not-btrfs");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: default\n  - name: fast\n    path: {}\n    layout: btrfs\n",
            path.display()
        ),
    )
    .unwrap();
    let (d, port) = start(&["--config", cfg.to_str().unwrap()]).await;
    let r = get(port, "/readyz");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("pool 'fast' cannot be used"), "{}", r.body);
    assert!(!r.body.contains("not open yet"), "the pools are open: {}", r.body);
    // Half working is alive: liveness must not restart a driver whose other pools serve.
    assert_eq!(get(port, "/healthz").status, 200);
    let log = d.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not ready") && l.contains("pool 'fast' cannot be used"))
        .collect();
    assert_eq!(warned.len(), 1, "one warning at the default level:\n{log}");
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
}

/// A pool that cannot be opened at start (its disk not mounted yet, its share's server down) is
/// tried again in the background: once it can be opened the driver is ready and serves it, with
/// no restart.
#[tokio::test]
async fn a_pool_that_could_not_be_opened_is_served_once_it_can_be() {
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("pools.yaml");
    let path = cfgdir.path().join("late");
    std::fs::write(&path, b"the disk is not mounted yet").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: default\n  - name: late\n    path: {}\n",
            path.display()
        ),
    )
    .unwrap();
    let (mut d, port) = start(&["--config", cfg.to_str().unwrap()]).await;
    let in_late = || {
        let mut r = create_req("pvc-late", 1 << 20);
        r.parameters.insert("pool".into(), "late".into());
        r
    };
    let r = get(port, "/readyz");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("pool 'late' cannot be used"), "{}", r.body);
    let refused = d.ctl.create_volume(in_late()).await.expect_err("its pool is not open");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    // A guard, not a timing: the driver tries every 10 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(port, "/readyz").status != 200 {
        assert!(Instant::now() < deadline, "never ready:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let probe = d.id.probe(ProbeRequest {}).await.expect("probe").into_inner();
    assert_eq!(probe.ready, Some(true));
    let made = d
        .ctl
        .create_volume(in_late())
        .await
        .expect("a volume in the pool")
        .into_inner();
    let id = made.volume.expect("volume").volume_id;
    assert!(id.contains(":late:"), "{id}");
    assert!(path.join("volumes").is_dir(), "the pool's directories are made");
    let log = d.log();
    assert!(log.contains("pool opened"), "{log}");
    assert!(log.contains("recovered") && log.contains("pool/late"), "{log}");
}

#[tokio::test]
async fn healthz_fails_once_the_csi_socket_is_gone() {
    let (d, port) = start(&[]).await;
    assert_eq!(get(port, "/healthz").status, 200);
    std::fs::remove_file(d.socket()).unwrap();
    let r = get(port, "/healthz");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("csi.sock"), "{}", r.body);
}

/// A node process whose controller refuses connections: alive, not ready, and saying why.
#[tokio::test]
async fn a_node_that_cannot_register_is_alive_and_says_why_it_is_not_ready() {
    require_root();
    let dir = tempfile::Builder::new().prefix("cellar-test-").tempdir().unwrap();
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let socket = dir.path().join("csi.sock");
    let mut child = Some(
        std::process::Command::new(bin())
            .args(["node", "--insecure", "--node-id", "node-1"])
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            // Port 1 on loopback: nothing listens, every registration is refused.
            .args(["--controller", "127.0.0.1:1", "--agent-listen", "127.0.0.1:0"])
            .args(["--agent-advertise", "127.0.0.1:9", "--metrics-listen", "127.0.0.1:0"])
            // The heartbeat's debug line marks each failed round; the rest stays at the default.
            .env("CELLAR_LOG", "info,cellar::agent::heartbeat=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cellar node"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let (port, reply) = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let port = text
            .lines()
            .find(|l| l.contains("metrics listening"))
            .and_then(|l| l.split("addr=127.0.0.1:").nth(1))
            .and_then(|p| p.trim().parse::<u16>().ok());
        if let Some(port) = port.filter(|_| socket.exists()) {
            let r = get(port, "/readyz");
            if r.body.contains("cannot register") {
                break (port, r);
            }
        }
        assert!(Instant::now() < deadline, "no registration failure reported:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("127.0.0.1:1"), "{}", reply.body);
    assert!(!reply.body.contains("pools"), "the pools are open: {}", reply.body);
    assert_eq!(get(port, "/healthz").status, 200, "alive: liveness must not restart it");
    // Several failed rounds later, the cause is still logged once, at the default level.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        if text.matches("controller not reachable yet").count() >= 3 {
            break text;
        }
        assert!(Instant::now() < deadline, "fewer than three heartbeat rounds:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let warned = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot register with the controller 127.0.0.1:1"))
        .count();
    assert_eq!(warned, 1, "once per change, not per retry:\n{text}");
    kill_child(&mut child);
}

#[tokio::test]
async fn other_paths_are_not_found() {
    let (_d, port) = start(&[]).await;
    assert_eq!(get(port, "/metrics/../secret").status, 404);
}

#[tokio::test]
async fn metrics_are_openmetrics_text_from_the_prometheus_client() {
    let (_d, port) = start(&[]).await;
    let r = get(port, "/metrics");
    assert_eq!(
        r.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
    assert!(
        r.body
            .contains("cellar_build_info{version=\"0.1.0\",role=\"all-in-one\"} 1\n"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn counters_move_with_calls_by_method_and_code() {
    let (mut d, port) = start(&[]).await;
    let before = scrape(port);
    d.create("pvc-count").await;
    assert_eq!(
        get_volume(&mut d, "local:node-1:default:pvc-nope").await,
        Code::NotFound
    );
    assert_eq!(
        get_volume(&mut d, "local:node-1:default:pvc-nope").await,
        Code::NotFound
    );
    assert_eq!(
        code(d.ctl.create_volume(create_req("", 64 * MIB)).await),
        Code::InvalidArgument
    );
    let after = scrape(port);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(&requests("CreateVolume", "OK")), 1.0, "{after}");
    assert_eq!(delta(&requests("ControllerGetVolume", "NotFound")), 2.0, "{after}");
    assert_eq!(delta(&requests("CreateVolume", "InvalidArgument")), 1.0, "{after}");
    assert_eq!(delta(&requests("ControllerGetVolume", "OK")), 0.0, "{after}");
}

#[tokio::test]
async fn latency_histogram_has_one_observation_per_call() {
    let (mut d, port) = start(&[]).await;
    for name in ["pvc-h1", "pvc-h2", "pvc-h3"] {
        d.create(name).await;
    }
    let m = scrape(port);
    let h = "cellar_csi_request_duration_seconds";
    assert_eq!(value(&m, &format!("{h}_count{{method=\"CreateVolume\"}}")), 3.0, "{m}");
    assert_eq!(
        value(&m, &format!("{h}_bucket{{le=\"+Inf\",method=\"CreateVolume\"}}")),
        3.0,
        "{m}"
    );
    assert!(value(&m, &format!("{h}_sum{{method=\"CreateVolume\"}}")) > 0.0, "{m}");
}

#[tokio::test]
async fn rpc_label_sets_never_carry_request_values() {
    let (mut d, port) = start(&[]).await;
    for i in 0..20 {
        d.create(&format!("pvc-many-{i}")).await;
        get_volume(&mut d, &format!("local:node-1:default:pvc-missing-{i}")).await;
    }
    let m = scrape(port);
    let rpc = series(&m, "cellar_csi_requests_total");
    // The OK series of every method, at zero until called, and the one NotFound series.
    let methods = cellar::metrics::CONTROLLER_METHODS.len() + cellar::metrics::NODE_METHODS.len();
    assert_eq!(rpc.len(), methods + 1, "one series per (method, code): {rpc:?}");
    assert!(rpc
        .iter()
        .all(|s| label_names(s) == BTreeSet::from(["method".into(), "code".into()])));
    assert!(!m.contains("pvc-many") && !m.contains("pvc-missing"), "{m}");
}

#[tokio::test]
async fn per_volume_series_exist_only_for_volumes_attached_here() {
    let (mut d, port) = start(&[]).await;
    for i in 0..5 {
        d.create(&format!("pvc-idle-{i}")).await;
    }
    let v = d.create("pvc-attached").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "attached").await;
    let m = scrape(port);
    let capacity = series(&m, "cellar_volume_capacity_bytes");
    assert_eq!(
        capacity,
        [format!(
            "cellar_volume_capacity_bytes{{volume_id=\"{}\"}} {}",
            v.volume_id,
            64 * MIB
        )]
    );
    assert_eq!(series(&m, "cellar_volume_used_bytes").len(), 1, "{m}");
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn pool_gauges_count_volumes_snapshots_and_bytes() {
    let (mut d, port) = start(&[]).await;
    let a = d.create("pvc-pool-a").await;
    d.create("pvc-pool-b").await;
    d.snapshot("snap-pool", &a.volume_id).await.expect("snapshot");
    let m = scrape(port);
    assert_eq!(value(&m, "cellar_volumes{pool=\"default\",layout=\"dir\"}"), 2.0, "{m}");
    assert_eq!(
        value(&m, "cellar_snapshots{pool=\"default\",layout=\"dir\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        value(&m, "cellar_pool_provisioned_bytes{pool=\"default\"}"),
        (128 * MIB) as f64
    );
    let total = value(&m, "cellar_pool_total_bytes{pool=\"default\"}");
    let free = value(&m, "cellar_pool_free_bytes{pool=\"default\"}");
    assert!(total > 0.0 && free > 0.0 && free <= total, "total {total}, free {free}");
}

#[tokio::test]
async fn used_bytes_follow_what_the_workload_writes() {
    let (mut d, port) = start(&[]).await;
    let v = d.create("pvc-used").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "used").await;
    std::fs::write(target.join("blob"), vec![7u8; 4 << 20]).unwrap();
    let m = scrape(port);
    let used = value(
        &m,
        &format!("cellar_volume_used_bytes{{volume_id=\"{}\"}}", v.volume_id),
    );
    assert!(used >= (4 << 20) as f64, "{m}");
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

#[tokio::test]
async fn a_volume_whose_data_vanished_counts_as_abnormal() {
    let (mut d, port) = start(&[]).await;
    d.create("pvc-fine").await;
    d.create("pvc-vanished").await;
    std::fs::remove_dir(d.pool_dir().join("volumes/pvc-vanished")).unwrap();
    let m = scrape(port);
    assert_eq!(value(&m, "cellar_volumes_abnormal{pool=\"default\"}"), 1.0, "{m}");
}

#[tokio::test]
async fn a_mount_removed_behind_the_drivers_back_counts_as_stale() {
    let (mut d, port) = start(&[]).await;
    let v = d.create("pvc-stale").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "stale").await;
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).expect("unmount the target");
    let m = scrape(port);
    assert_eq!(value(&m, "cellar_node_stale_mounts{kind=\"published\"}"), 1.0, "{m}");
    assert_eq!(value(&m, "cellar_node_stale_mounts{kind=\"staged\"}"), 0.0, "{m}");
    d.unmount_all(&v.volume_id, &staging, &target).await;
}

/// TCP ports the process listens on, from its socket descriptors and the kernel's socket tables.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().expect("port");
                ports.push(u16::from_str_radix(port, 16).expect("hex port"));
            }
        }
    }
    ports
}

#[tokio::test]
async fn without_the_flag_no_port_is_opened() {
    let d = Driver::start().await;
    assert_eq!(listening_ports(d.pid()), Vec::<u16>::new());
}

#[tokio::test]
async fn with_the_flag_exactly_the_metrics_port_is_opened() {
    let (d, port) = start(&[]).await;
    assert_eq!(listening_ports(d.pid()), vec![port]);
}

/// Before any call, every series a dashboard or a ratio alert divides by is there at 0, so they
/// read 0 instead of "no data".
#[tokio::test]
async fn every_family_is_exported_at_zero_before_the_first_call() {
    let (_d, port) = start(&[]).await;
    let m = scrape(port);
    for method in cellar::metrics::CONTROLLER_METHODS
        .iter()
        .chain(&cellar::metrics::NODE_METHODS)
    {
        for series in [
            requests(method, "OK"),
            format!("cellar_csi_request_duration_seconds_count{{method=\"{method}\"}}"),
        ] {
            assert!(m.contains(&format!("{series} 0\n")), "{series} missing:\n{m}");
        }
    }
    for series in [
        "cellar_snapshots{pool=\"default\",layout=\"dir\"} 0\n",
        "cellar_volumes{pool=\"default\",layout=\"dir\"} 0\n",
        "cellar_volumes_abnormal{pool=\"default\"} 0\n",
    ] {
        assert!(m.contains(series), "{series} missing:\n{m}");
    }
}

/// An image pool's free bytes are what GetCapacity offers for an image volume (free space minus
/// what the images may still grow into), and the per-layout figure is GetCapacity's for each layout.
#[tokio::test]
async fn pool_free_bytes_are_what_get_capacity_offers() {
    let fs = common::fs::TestFs::new("ext4", 512);
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: img\n    path: {}\n    layout: image\n    layouts: [image, dir]\n",
            fs.path("pool").display()
        ),
    )
    .unwrap();
    let (mut d, port) = start(&["--config", cfg.to_str().unwrap()]).await;
    let mut req = create_req("pvc-img-free", 128 * MIB);
    req.parameters = [("pool".to_string(), "img".to_string())].into();
    d.ctl.create_volume(req).await.expect("CreateVolume of an image volume");
    let mut offered = BTreeMap::new();
    for layout in ["image", "dir"] {
        let r = d
            .ctl
            .get_capacity(GetCapacityRequest {
                parameters: [
                    ("pool".to_string(), "img".to_string()),
                    ("layout".to_string(), layout.to_string()),
                ]
                .into(),
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner();
        offered.insert(layout, r.available_capacity as f64);
    }
    let m = scrape(port);
    assert!(
        offered["dir"] - offered["image"] > (100 * MIB) as f64,
        "the image's unwritten room is held back: {offered:?}"
    );
    assert_eq!(
        value(&m, "cellar_pool_free_bytes{pool=\"img\"}"),
        offered["image"],
        "{m}"
    );
    for layout in ["image", "dir"] {
        let series = format!("cellar_pool_allocatable_bytes{{pool=\"img\",layout=\"{layout}\"}}");
        assert_eq!(value(&m, &series), offered[layout], "{series}:\n{m}");
    }
}
