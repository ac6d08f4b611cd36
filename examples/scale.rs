//! The scale bench (bench/scale.sh): one real `cellar controller` against many simulated nodes in
//! this process (real agent service, real mutual TLS, a certificate per node, real heartbeats),
//! each holding preloaded volumes. Prints the controller's CPU while the nodes only heartbeat,
//! CreateVolume p50/p99, a full ListVolumes, GetCapacity and the controller's peak RSS, all measured
//! through the controller's CSI socket.
//!
//! Environment: CELLAR_BIN (default target/release/cellar), NODES (1000), VOLUMES (100 per node),
//! CREATES (1000), PAGE (ListVolumes page size, 1000), LISTS (full listings, 3), IDLE (seconds of
//! heartbeats only, 10).

#[path = "../tests/common/certs.rs"]
#[allow(dead_code)]
mod certs;
#[path = "../tests/scale/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../tests/common/ports.rs"]
mod ports;
#[path = "../tests/scale/sim.rs"]
#[allow(dead_code)]
mod sim;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cluster::{capacity, create_request, list_all, node_name, Options, ScaleCluster, GIB};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The `q` quantile of sorted samples (nearest rank).
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
async fn main() {
    let bin = std::env::var("CELLAR_BIN").unwrap_or_else(|_| "target/release/cellar".into());
    let nodes = env_or("NODES", 1000);
    let volumes = env_or("VOLUMES", 100);
    let creates = env_or("CREATES", 1000);
    let page = env_or("PAGE", 1000) as i32;
    let lists = env_or("LISTS", 3);

    let started = Instant::now();
    let options = Options::new(&bin, nodes, volumes);
    let interval = options.heartbeat_interval;
    let c = ScaleCluster::start(options).await;
    let registered = started.elapsed();
    // Release builds abort on panic, so `ScaleCluster`'s Drop would not run: a failed measurement
    // still stops the controller and removes the cluster's directory.
    let (pid, dir) = (c.controller_pid(), c.path().to_path_buf());
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }));
    println!(
        "controller pid {}; {nodes} nodes x {volumes} volumes registered in {registered:.1?}",
        c.controller_pid()
    );
    let rss = |c: &ScaleCluster| format!("{:.1} MiB", c.rss_kib() as f64 / 1024.0);
    println!("controller RSS after registration: {}", rss(&c));
    // What the heartbeats alone cost the controller: every node beats once per interval.
    let idle = Duration::from_secs(env_or("IDLE", 10) as u64);
    let (cpu, t) = (c.cpu_seconds(), Instant::now());
    tokio::time::sleep(idle).await;
    println!(
        "controller CPU while the nodes only heartbeat (every {interval:?}, over {idle:?}): {:.1}% of a core",
        100.0 * (c.cpu_seconds() - cpu) / t.elapsed().as_secs_f64()
    );
    let mut csi = c.csi().await;

    // A first full listing fills whatever the controller caches per node; it is reported apart.
    let t = Instant::now();
    let first = list_all(&mut csi, page).await.expect("first ListVolumes");
    let first_time = t.elapsed();
    let expected = nodes * volumes;
    let ids: HashSet<&str> = first.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(first.len(), expected, "volumes listed");
    assert_eq!(ids.len(), expected, "each volume listed once");
    drop(ids);
    drop(first);
    println!("controller RSS after the first ListVolumes: {}", rss(&c));

    let mut create_times = Vec::with_capacity(creates);
    for i in 0..creates {
        let req = create_request(&format!("pvc-bench-{i:06}"), GIB, None);
        let t = Instant::now();
        csi.create_volume(req).await.expect("CreateVolume");
        create_times.push(t.elapsed());
    }
    create_times.sort();

    let mut list_times = Vec::new();
    for _ in 0..lists {
        let t = Instant::now();
        let all = list_all(&mut csi, page).await.expect("ListVolumes");
        list_times.push(t.elapsed());
        assert_eq!(all.len(), expected + creates, "volumes listed after the creates");
    }
    list_times.sort();

    let mut capacity_times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        capacity(&mut csi).await.expect("GetCapacity");
        capacity_times.push(t.elapsed());
    }
    capacity_times.sort();

    let on = node_name(nodes / 2);
    let mut placed_times = Vec::new();
    for i in 0..creates.min(200) {
        let req = create_request(&format!("pvc-placed-{i:06}"), GIB, Some(&on));
        let t = Instant::now();
        csi.create_volume(req)
            .await
            .expect("CreateVolume with a preferred node");
        placed_times.push(t.elapsed());
    }
    placed_times.sort();

    println!("{:<44} {:>12} {:>12} {:>12}", "measure", "p50", "p99", "max");
    let row = |name: &str, s: &[Duration]| {
        println!(
            "{:<44} {:>12} {:>12} {:>12}",
            name,
            ms(quantile(s, 0.5)),
            ms(quantile(s, 0.99)),
            ms(*s.last().expect("samples"))
        )
    };
    row(&format!("CreateVolume, free placement (n={creates})"), &create_times);
    row(
        &format!("CreateVolume, preferred node (n={})", placed_times.len()),
        &placed_times,
    );
    row(
        &format!("GetCapacity, all nodes (n={})", capacity_times.len()),
        &capacity_times,
    );
    row(
        &format!(
            "ListVolumes, all {} volumes, pages of {page} (n={lists})",
            expected + creates
        ),
        &list_times,
    );
    println!("{:<44} {:>12}", "first ListVolumes after start", ms(first_time));
    println!(
        "controller RSS: peak (VmHWM) {:.1} MiB, now {:.1} MiB",
        c.peak_rss_kib() as f64 / 1024.0,
        c.rss_kib() as f64 / 1024.0
    );
}
