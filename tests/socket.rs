//! The CSI socket's limits: connections that say nothing are closed after the idle timeout, the
//! number of connections is capped, and the accept loop backs off when the process runs out of
//! file descriptors; through all of it Probe still answers. And any gRPC client gets in, whatever
//! `:authority` it sends (Python's grpcio from Debian, package python3-grpcio, plays the C core).

mod common;

use std::time::{Duration, Instant};

use cellar::csi::v1::identity_client::IdentityClient;
use cellar::csi::v1::ProbeRequest;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Waits (at most 60 s) until the server closes `conn`: a read returns end of file.
async fn closed_by_server(conn: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // The server's HTTP/2 preface: it still has to hear from us.
            Ok(Ok(_)) => {}
            Err(_) if Instant::now() > deadline => return false,
            Err(_) => {}
        }
    }
}

async fn probe_on_a_new_connection(d: &Driver) {
    let mut id = IdentityClient::new(connect_socket(&d.socket()).await);
    let ready = id.probe(ProbeRequest {}).await.expect("Probe").into_inner().ready;
    assert_eq!(ready, Some(true));
}

#[tokio::test]
async fn idle_connections_are_dropped_and_probe_still_answers() {
    let d = Driver::start_with(
        &["--csi-idle-timeout", "1s", "--csi-max-connections", "8"],
        &[("CELLAR_LOG", "cellar=debug")],
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(UnixStream::connect(d.socket()).await.expect("connect"));
    }
    // More connections than the cap, each saying nothing: they are closed in turn and a new
    // client gets in.
    probe_on_a_new_connection(&d).await;
    for (i, conn) in idle.iter_mut().enumerate() {
        assert!(closed_by_server(conn).await, "idle connection {i} is still open");
    }
    probe_on_a_new_connection(&d).await;
    assert!(d.log().contains(IDLE_CLOSE), "{}", d.log());
}

/// What the driver logs (at debug) when it closes a silent connection.
const IDLE_CLOSE: &str = "closing a connection idle for 1s";

#[tokio::test]
async fn a_live_client_that_stays_idle_keeps_its_connection() {
    let mut d = Driver::start_with(&["--csi-idle-timeout", "1s"], &[("CELLAR_LOG", "cellar=debug")]).await;
    let mut id = d.id.clone();
    id.probe(ProbeRequest {}).await.expect("Probe");
    // Longer than the idle timeout: the client answers the server's pings meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    id.probe(ProbeRequest {}).await.expect("Probe on the same connection");
    d.stop();
    assert!(
        !d.log().contains(IDLE_CLOSE),
        "a client answering pings was taken for idle:\n{}",
        d.log()
    );
}

/// Lowers the driver's open-file limit to what it uses now plus a few, so that accept(2) fails with
/// EMFILE: the accept loop backs off (and says so once) instead of spinning, and serves again once
/// descriptors are free.
#[tokio::test]
async fn the_accept_loop_backs_off_when_out_of_file_descriptors_and_recovers() {
    let d = Driver::start_with(&["--csi-max-connections", "1000"], &[]).await;
    let pid = d.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").count();
    let limit = (open + 4).to_string();
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");

    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log().contains("cannot accept on the CSI socket; backing off") {
        assert!(Instant::now() < deadline, "no back-off:\n{}", d.log());
        if held.len() < 64 {
            held.push(UnixStream::connect(d.socket()).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    probe_on_a_new_connection(&d).await;
    let warnings = d.log().matches("backing off").count();
    assert!(warnings >= 1, "{}", d.log());
}

/// Debian's python3-grpcio lives in the system interpreter's dist-packages.
const PYTHON: &str = "/usr/bin/python3";

/// Three Probes and a GetPluginInfo on one grpcio channel to `target` (so the later calls refer to
/// the :authority the first one added to the HPACK table), with `grpc.default_authority` set to
/// `authority` when given; prints one line per call.
const GRPCIO_CALLS: &str = r#"
import sys, grpc
target, authority = sys.argv[1], sys.argv[2]
options = [("grpc.default_authority", authority)] if authority else []
channel = grpc.insecure_channel(target, options=options)
for method in ["Probe", "Probe", "Probe", "GetPluginInfo"]:
    call = channel.unary_unary("/csi.v1.Identity/" + method)
    try:
        print("OK", method, call(b"", timeout=20).hex())
    except grpc.RpcError as e:
        print("ERR", method, e.code(), e.details())
"#;

/// gRPC clients on the C core send a Unix socket's path as `:authority` (percent-encoded, with or
/// without its leading slash, depending on the version); Go clients send `localhost`. Every form is
/// served, on several calls of one connection.
#[tokio::test]
async fn grpc_c_core_clients_are_served_whatever_authority_they_send() {
    let d = Driver::start().await;
    let socket = d.socket().display().to_string();
    let encoded = socket.trim_start_matches('/').replace('/', "%2F");
    for authority in [
        String::new(),
        encoded.clone(),
        format!("%2F{encoded}"),
        socket.clone(),
        "localhost".to_string(),
    ] {
        let out = std::process::Command::new(PYTHON)
            .args(["-c", GRPCIO_CALLS, &format!("unix://{socket}"), &authority])
            .output()
            .expect("/usr/bin/python3 (with python3-grpcio, as .ci/run installs)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{authority:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{authority:?}: {text}");
        for line in &lines[..3] {
            // ProbeResponse { ready: Some(true) }
            assert_eq!(*line, "OK Probe 0a020801", "{authority:?}: {text}");
        }
        assert!(lines[3].starts_with("OK GetPluginInfo 0a"), "{authority:?}: {text}");
    }
}

/// A TCP port (the agent's, the registry's) gives one peer address at most `max_per_peer`
/// connections at once: what one host opens past it is closed at once, while another host still
/// gets in, and a place freed is taken again.
#[tokio::test]
async fn one_peer_address_cannot_take_every_connection_of_a_tcp_port() {
    use tokio::net::{TcpListener, TcpSocket, TcpStream};
    use tokio_stream::StreamExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = cellar::server::SocketLimits {
        idle_timeout: Duration::from_secs(60),
        max_connections: 10,
        max_per_peer: 2,
    };
    let mut accepted = cellar::server::incoming_tcp(listener, limits, "the test port");
    let from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().expect("ip");
        async move {
            let s = TcpSocket::new_v4().expect("socket");
            s.bind(std::net::SocketAddr::new(ip, 0)).expect("bind the client");
            s.connect(addr).await.expect("connect")
        }
    };
    let closed = |mut c: TcpStream| async move {
        let mut buf = [0u8; 8];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    };
    let (mut clients, mut conns) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        clients.push(from("127.0.0.1").await);
        conns.push(accepted.next().await.expect("accepted").expect("a connection"));
    }
    let third = from("127.0.0.1").await;
    assert!(
        closed(third).await,
        "a third connection from one address is closed at once"
    );
    let _other = from("127.0.0.2").await;
    let got = accepted.next().await.expect("accepted").expect("a connection");
    assert_eq!(
        got_peer(&got),
        "127.0.0.2".parse::<std::net::IpAddr>().unwrap(),
        "another address still gets in"
    );
    // One of the first address's connections closes: its place is free again.
    conns.pop();
    let _again = from("127.0.0.1").await;
    let got = accepted.next().await.expect("accepted").expect("a connection");
    assert_eq!(got_peer(&got), "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
}

fn got_peer(c: &cellar::server::Connection<tokio::net::TcpStream>) -> std::net::IpAddr {
    use tonic::transport::server::Connected;
    c.connect_info().remote_addr().expect("remote").ip()
}
