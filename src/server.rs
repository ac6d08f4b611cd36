//! Serving gRPC on a Unix socket: stale-socket removal, graceful shutdown on SIGTERM/SIGINT, and
//! the one log line every RPC gets.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Status};

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

pub fn incoming(listener: UnixListener) -> UnixListenerStream {
    UnixListenerStream::new(listener)
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
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

/// Serves `router` on `listener` until SIGTERM/SIGINT or until `restart` resolves (the process is
/// to be started again, e.g. to load rotated certificates), lets in-flight calls finish (bounded),
/// and removes the socket.
pub async fn serve_until_signal(
    router: tonic::transport::server::Router,
    listener: UnixListener,
    socket: &Path,
    restart: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming(listener), async {
        let _ = stop_rx.await;
    });
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = async { tokio::select! { _ = shutdown_signal() => {}, _ = restart => {} } } => {
            let _ = stop_tx.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("in-flight calls did not finish within {SHUTDOWN_GRACE:?}; exiting");
                    Ok(())
                }
            }
        }
    };
    let _ = std::fs::remove_file(socket);
    tracing::info!(socket = %socket.display(), "stopped; socket removed");
    result.map_err(ServeError::from)
}

/// Runs one RPC, logs it once (method, volume or name, duration, code) and counts it in the
/// metrics. Request bodies, and so secrets, are never logged. A call the client gives up on (its
/// future is dropped mid-way) is logged and counted as `Canceled`.
pub async fn traced<T>(
    method: &'static str,
    object: &str,
    fut: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let mut call = Call {
        method,
        object,
        start: Instant::now(),
        done: false,
    };
    let result = fut.await.map_err(crate::csi::status::bound);
    let object = &*crate::csi::status::bounded(object);
    call.done = true;
    let elapsed = call.start.elapsed();
    let micros = elapsed.as_micros() as u64;
    match &result {
        Ok(_) => {
            crate::metrics::record_rpc(method, Code::Ok, elapsed);
            tracing::info!(method, volume = object, micros, code = "OK", "rpc");
        }
        Err(s) => {
            crate::metrics::record_rpc(method, s.code(), elapsed);
            let code = crate::metrics::code_name(s.code());
            tracing::warn!(method, volume = object, micros, code, error = s.message(), "rpc");
        }
    }
    result
}

/// One call in flight; dropped before it is done means the client cancelled it.
struct Call<'a> {
    method: &'static str,
    object: &'a str,
    start: Instant,
    done: bool,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.done {
            let elapsed = self.start.elapsed();
            crate::metrics::record_rpc(self.method, Code::Cancelled, elapsed);
            let micros = elapsed.as_micros() as u64;
            tracing::warn!(
                method = self.method,
                volume = self.object,
                micros,
                code = crate::metrics::code_name(Code::Cancelled),
                error = "the client gave up on the call",
                "rpc"
            );
        }
    }
}
