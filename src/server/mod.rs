//! Serving gRPC on a Unix socket: stale-socket removal, bounded connections, any client's
//! `:authority` ([`authority`]), graceful shutdown on SIGTERM/SIGINT, and the one log line every
//! RPC gets.

pub mod authority;
pub mod trace;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::Server;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint '{0}' must be unix:///absolute/path.sock")]
    Endpoint(String),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of a `unix://` endpoint (also accepts `unix:/path` and a bare absolute path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(ServeError::Endpoint(endpoint.to_string()));
    }
    Ok(path)
}

/// Binds the socket, replacing a stale one left by a crash (only a socket is ever removed).
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )))
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(err)
}

/// Limits on a CSI socket's connections. Its callers (kubelet, the sidecars) are few and keep their
/// connections alive by answering the server's HTTP/2 pings; anything else must not pile up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketLimits {
    /// A connection from which nothing has been read for this long is closed, whether the server
    /// waits to read from it or to write to it (a peer that never reads its answers). The server
    /// pings every quarter of it, so a live gRPC client, which answers, is never idle, even while a
    /// long call runs; a socket that says nothing (or stopped answering) is dropped.
    pub idle_timeout: Duration,
    /// At most this many connections at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// At most this many of them from one peer address (TCP only; 0: no such limit): a connection
    /// past it is closed as soon as it is accepted, so one host (a compromised node answering the
    /// pings of hundreds of connections) cannot take every place from the others.
    pub max_per_peer: usize,
}

impl Default for SocketLimits {
    fn default() -> Self {
        SocketLimits {
            idle_timeout: Duration::from_secs(120),
            max_connections: 128,
            max_per_peer: 0,
        }
    }
}

impl SocketLimits {
    /// A CSI server builder whose HTTP/2 pings keep live clients from counting as idle, and whose
    /// every call passes through the one trace layer ([`trace`]).
    pub fn server_builder(&self) -> Server<CsiLayers> {
        let ping = (self.idle_timeout / 4).max(Duration::from_millis(100));
        Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(ping))
            .http2_keepalive_timeout(Some(ping.min(Duration::from_secs(20))))
            .layer(trace::TraceLayer)
    }
}

/// Calls one connection may have open at once (HTTP/2 streams; a client past it waits for a
/// call to end). tonic leaves them unlimited; the sidecars run up to 100 calls at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The longest pause of the accept loop when the process is out of file descriptors or memory.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The layers of every CSI server: the trace layer.
pub type CsiLayers = tower::layer::util::Stack<trace::TraceLayer, tower::layer::util::Identity>;

/// A listening socket whose connections [`incoming`] and [`incoming_tcp`] bound.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    /// The next connection, with its peer's address where it has one.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Io, Option<IpAddr>)>>;
}

impl Listener for UnixListener {
    type Io = UnixStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(UnixStream, Option<IpAddr>)>> {
        UnixListener::poll_accept(self, cx).map_ok(|(stream, _)| (stream, None))
    }
}

impl Listener for TcpListener {
    type Io = TcpStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, Option<IpAddr>)>> {
        TcpListener::poll_accept(self, cx).map_ok(|(stream, peer)| {
            // Small gRPC messages go out at once.
            let _ = stream.set_nodelay(true);
            (stream, Some(peer.ip()))
        })
    }
}

/// The connections accepted on a CSI socket, within `limits`, each with any client's
/// `:authority` made acceptable. The accept loop stops with the stream.
pub fn incoming(listener: UnixListener, limits: SocketLimits) -> ReceiverStream<io::Result<Connection<UnixStream>>> {
    spawn_accept(listener, limits, "the CSI socket", true)
}

/// The connections accepted on a TCP port (the agent's, the registry's), within `limits`; TLS is
/// the server's, on top. The accept loop stops with the stream.
pub fn incoming_tcp(
    listener: TcpListener,
    limits: SocketLimits,
    what: &'static str,
) -> ReceiverStream<io::Result<Connection<TcpStream>>> {
    spawn_accept(listener, limits, what, false)
}

fn spawn_accept<L: Listener>(
    listener: L,
    limits: SocketLimits,
    what: &'static str,
    rewrite: bool,
) -> ReceiverStream<io::Result<Connection<L::Io>>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(accept(listener, limits, what, rewrite, tx));
    ReceiverStream::new(rx)
}

async fn accept<L: Listener>(
    mut listener: L,
    limits: SocketLimits,
    what: &'static str,
    rewrite: bool,
    tx: mpsc::Sender<io::Result<Connection<L::Io>>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let peers = Peers::default();
    let mut backoff: Option<Duration> = None;
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = tx.closed() => return,
        };
        let accepted = tokio::select! {
            accepted = std::future::poll_fn(|cx| listener.poll_accept(cx)) => accepted,
            _ = tx.closed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = None;
                let place = match peer.filter(|_| limits.max_per_peer > 0) {
                    None => None,
                    Some(ip) => match peers.take(ip, limits.max_per_peer) {
                        Some(place) => Some(place),
                        None => {
                            tracing::debug!(peer = %ip, "{what}: closing a connection past {} from one peer", limits.max_per_peer);
                            drop(stream); // and its slot, with it
                            continue;
                        }
                    },
                };
                let mut conn = Connection::new(stream, slot, limits.idle_timeout, rewrite);
                conn._peer = place;
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
            // Retrying at once would spin: wait, longer each time, until a descriptor is free.
            Err(e) if out_of_resources(&e) => {
                let wait = backoff.map_or(Duration::from_millis(10), |b| (b * 2).min(MAX_ACCEPT_BACKOFF));
                if backoff.is_none() {
                    tracing::warn!(error = %e, "cannot accept on {what}; backing off until resources are free");
                }
                backoff = Some(wait);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tx.closed() => return,
                }
            }
            Err(e) => tracing::debug!(error = %e, "accept on {what} failed"),
        }
    }
}

/// Errors of accept(2) that repeat until the process or the system frees something.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One accepted connection: holds its place among the `max_connections` until it closes, reads
/// as closed (EOF) and fails a blocked write once nothing has been read from it for the idle
/// timeout, and (a CSI socket's)
/// hands h2 the client's bytes with any `:authority` made acceptable.
pub struct Connection<S> {
    stream: S,
    _slot: OwnedSemaphorePermit,
    /// Its place among its peer's `max_per_peer`.
    _peer: Option<PeerPlace>,
    idle: Idle,
    rewrite: Option<authority::AuthorityRewrite>,
    eof: bool,
}

impl<S> Connection<S> {
    fn new(stream: S, slot: OwnedSemaphorePermit, idle_timeout: Duration, rewrite: bool) -> Connection<S> {
        Connection {
            stream,
            _slot: slot,
            _peer: None,
            idle: Idle {
                deadline: Box::pin(tokio::time::sleep(idle_timeout)),
                timeout: idle_timeout,
            },
            rewrite: rewrite.then(authority::AuthorityRewrite::default),
            eof: false,
        }
    }
}

/// How many places (connections, or calls in flight) each peer address holds now.
#[derive(Default, Clone)]
pub struct Peers(Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>);

/// One place among its peer's, given back when dropped.
pub struct PeerPlace(Peers, IpAddr);

impl Peers {
    /// A place for `ip`, if it holds fewer than `max`.
    pub fn take(&self, ip: IpAddr, max: usize) -> Option<PeerPlace> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerPlace(self.clone(), ip))
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut held = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// How long a connection may stay silent.
struct Idle {
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Idle {
    /// Something was read: the deadline starts again.
    fn heard(&mut self) {
        let next = tokio::time::Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    /// Whether the deadline has passed (then the connection reads as closed).
    fn over(&mut self, cx: &mut Context<'_>) -> bool {
        let over = self.deadline.as_mut().poll(cx).is_ready();
        if over {
            tracing::debug!("closing a connection idle for {:?}", self.timeout);
        }
        over
    }
}

impl<S: Connected> Connected for Connection<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Connection<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(rewrite) = this.rewrite.as_mut() else {
            let before = buf.filled().len();
            return match Pin::new(&mut this.stream).poll_read(cx, buf) {
                Poll::Ready(r) => {
                    if buf.filled().len() > before {
                        this.idle.heard();
                    }
                    Poll::Ready(r)
                }
                Poll::Pending if this.idle.over(cx) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            };
        };
        loop {
            if rewrite.has_output() {
                buf.put_slice(&rewrite.take(buf.remaining()));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 8192];
            let mut read = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    rewrite.feed(read.filled())?;
                    this.idle.heard();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if this.idle.over(cx) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S> Connection<S> {
    /// A write that cannot go on while nothing has been read for the idle timeout fails: a peer
    /// that sends requests and never reads the answers gives its place back, however full its
    /// socket keeps the server's side.
    fn stalled<T>(&mut self, cx: &mut Context<'_>, write: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match write {
            Poll::Pending if self.idle.over(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing and said nothing for {:?}", self.idle.timeout),
            ))),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let write = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.stalled(cx, write)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flush = Pin::new(&mut this.stream).poll_flush(cx);
        this.stalled(cx, flush)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let write = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.stalled(cx, write)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

type ShutdownSignals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

/// The handlers [`listen_for_shutdown`] installed, until [`shutdown_signal`] takes them.
static SIGNALS: std::sync::Mutex<Option<ShutdownSignals>> = std::sync::Mutex::new(None);

fn shutdown_signals() -> Option<ShutdownSignals> {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => None,
    }
}

/// Installs the SIGTERM and SIGINT handlers now, before the socket is bound: a handler installed
/// only when the server first ran left a moment after the socket appeared in which a SIGTERM
/// (kubelet, a test, an operator) killed the process outright, socket and all. Called in a Tokio
/// runtime; a signal that arrives from now on ends [`shutdown_signal`].
pub fn listen_for_shutdown() {
    let mut held = SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
    if held.is_none() {
        *held = shutdown_signals();
    }
}

/// Resolves on the first SIGTERM or SIGINT (since [`listen_for_shutdown`], when it was called).
pub async fn shutdown_signal() {
    let taken = SIGNALS.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some((mut term, mut int)) = taken.or_else(shutdown_signals) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight calls"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight calls"),
    }
}

/// How long in-flight calls may take to finish after SIGTERM. Clients such as kubelet keep their
/// connection open, so waiting for connections to close would never end; storage steps are
/// crash-safe, so a call cut off here is simply retried.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` (built on [`SocketLimits::server_builder`]) on `listener` within `limits` until
/// SIGTERM/SIGINT or until `restart` resolves (the process is to be started again, e.g. to load
/// rotated certificates), lets in-flight calls finish (bounded), and removes the socket.
pub async fn serve_until_signal(
    router: tonic::transport::server::Router<CsiLayers>,
    listener: UnixListener,
    limits: SocketLimits,
    socket: &Path,
    restart: impl Future<Output = ()>,
) -> Result<Stopped, ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    crate::crash::serving();
    let server = router.serve_with_incoming_shutdown(incoming(listener, limits), async {
        let _ = stop_rx.await;
    });
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r.map(|_| Stopped::Signalled),
        why = async { tokio::select! { _ = shutdown_signal() => Stopped::Signalled, _ = restart => Stopped::Restart } } => {
            let _ = stop_tx.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r.map(|_| why),
                Err(_) => {
                    tracing::warn!("in-flight calls did not finish within {SHUTDOWN_GRACE:?}; exiting");
                    Ok(why)
                }
            }
        }
    };
    let _ = std::fs::remove_file(socket);
    tracing::info!(socket = %socket.display(), "stopped; socket removed");
    result.map_err(ServeError::from)
}

/// Why a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM or SIGINT (or the server ended by itself): the process exits.
    Signalled,
    /// Rotated or renewed certificates: the process starts again in place (`exec` of itself, the
    /// same process id), so that its container, and the processes it started (the FUSE daemon
    /// of a share it mounted), carry on, and kubelet's restart back-off is not paid.
    Restart,
}

#[cfg(test)]
mod tests {
    /// A SIGTERM that arrives after [`super::listen_for_shutdown`] but before anything waits for
    /// it (the moment between binding the socket and the server's first run) ends the wait that
    /// comes later. Without the early handler the default action kills the process (this test
    /// binary with it).
    #[tokio::test]
    async fn a_sigterm_before_the_server_runs_is_kept_for_it() {
        super::listen_for_shutdown();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise");
        tokio::time::timeout(std::time::Duration::from_secs(60), super::shutdown_signal())
            .await
            .expect("the SIGTERM sent before the wait ends it");
    }
}
