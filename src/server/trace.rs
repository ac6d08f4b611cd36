//! The one place every CSI call is traced: a tower layer on the CSI servers.
//!
//! For each call it logs one line (method, volume or name, duration, code, and the message of a
//! failure), counts it in the metrics, and cuts the status message to
//! [`crate::csi::status::MAX_MESSAGE`] bytes, whichever handler answered (including tonic's own
//! answers, such as UNIMPLEMENTED or a request that does not decode). A call the client gives up on
//! (the response is dropped before its status was sent) is logged and counted as `Canceled`.
//!
//! A handler names the object of its call (a volume ID, or the name of a volume being created)
//! with [`note`]; request bodies, and so secrets, are never logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::{Code, Status};

include!(concat!(env!("OUT_DIR"), "/rpc_methods.rs"));

/// The method a request path names, from the protos' own list; any other path is `unknown`, so a
/// client cannot grow the metrics with names of its choosing.
pub fn method_of(path: &str) -> &'static str {
    RPC_METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or("unknown", |(_, method)| method)
}

/// Calls that report on the plugin rather than on a volume: kubelet and the sidecars ask them every
/// few seconds, so they are logged at debug (and still counted).
fn is_chatter(method: &str) -> bool {
    matches!(
        method,
        "Probe"
            | "GetPluginInfo"
            | "GetPluginCapabilities"
            | "ControllerGetCapabilities"
            | "NodeGetCapabilities"
            | "NodeGetInfo"
            | "GroupControllerGetCapabilities"
    )
}

/// What the handler says its call is about, carried in the request's extensions.
#[derive(Clone, Default)]
pub struct CallNote(Arc<OnceLock<String>>);

/// Names the object (volume ID, volume or snapshot name) of the call `req` belongs to, for its log line.
pub fn note<T>(req: &tonic::Request<T>, object: &str) {
    if let Some(n) = req.extensions().get::<CallNote>() {
        let _ = n.0.set(crate::csi::status::bounded(object).into_owned());
    }
}

/// The layer to put on a CSI server: `Server::builder().layer(TraceLayer)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Traced<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<TracedBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let note = CallNote::default();
        req.extensions_mut().insert(note.clone());
        let mut call = Call {
            method: method_of(req.uri().path()),
            note,
            start: Instant::now(),
            done: false,
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            let mut res = answer.await?;
            // A failure is answered "trailers-only": its status is in the headers.
            if let Some(status) = Status::from_header_map(res.headers()) {
                call.finish(&status, res.headers_mut());
                return Ok(res.map(|body| TracedBody { body, call: None }));
            }
            Ok(res.map(|body| TracedBody { body, call: Some(call) }))
        })
    }
}

/// A response body that finishes its call's trace when the status arrives in its trailers.
pub struct TracedBody<B> {
    body: B,
    call: Option<Call>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for TracedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let mut frame = match polled {
                    Poll::Ready(Some(Ok(f))) => f,
                    _ => unreachable!("matched above"),
                };
                if let (Some(call), Some(trailers)) = (this.call.take(), frame.trailers_mut()) {
                    let status = Status::from_header_map(trailers).unwrap_or_else(|| Status::ok(""));
                    let mut call = call;
                    call.finish(&status, trailers);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                // A body that ends without trailers sent no failure.
                if let Some(mut call) = this.call.take() {
                    call.finish(&Status::ok(""), &mut http::HeaderMap::new());
                }
                polled
            }
            _ => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One call in flight; dropped before it is done means the client cancelled it.
struct Call {
    method: &'static str,
    note: CallNote,
    start: Instant,
    done: bool,
}

impl Call {
    /// Logs and counts the call with `status`, cutting its message in `headers` if it is too long.
    fn finish(&mut self, status: &Status, headers: &mut http::HeaderMap) {
        self.done = true;
        if status.message().len() > crate::csi::status::MAX_MESSAGE {
            let cut = Status::with_details(
                status.code(),
                crate::csi::status::bounded(status.message()).into_owned(),
                status.details().to_vec().into(),
            );
            if cut.add_header(headers).is_err() {
                tracing::warn!(method = self.method, "could not rewrite a long status message");
            }
        }
        let elapsed = self.start.elapsed();
        crate::metrics::record_rpc(self.method, status.code(), elapsed);
        let (method, micros) = (self.method, elapsed.as_micros() as u64);
        let volume = self.note.0.get().map_or("", String::as_str);
        let message = crate::csi::status::bounded(status.message());
        if status.code() == Code::Ok {
            if is_chatter(method) {
                tracing::debug!(method, volume, micros, code = "OK", "rpc");
            } else {
                tracing::info!(method, volume, micros, code = "OK", "rpc");
            }
        } else {
            let code = crate::metrics::code_name(status.code());
            tracing::warn!(method, volume, micros, code, error = &*message, "rpc");
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            let elapsed = self.start.elapsed();
            crate::metrics::record_rpc(self.method, Code::Cancelled, elapsed);
            tracing::warn!(
                method = self.method,
                volume = self.note.0.get().map_or("", String::as_str),
                micros = elapsed.as_micros() as u64,
                code = crate::metrics::code_name(Code::Cancelled),
                error = "the client gave up on the call",
                "rpc"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_protos_methods_and_nothing_else() {
        assert_eq!(method_of("/csi.v1.Node/NodeStageVolume"), "NodeStageVolume");
        assert_eq!(method_of("/csi.v1.Controller/CreateVolume"), "CreateVolume");
        assert_eq!(method_of("/csi.v1.Identity/Probe"), "Probe");
        assert_eq!(method_of("/csi.v1.Controller/NoSuchCall"), "unknown");
        assert_eq!(method_of(&format!("/csi.v1.Node/{}", "x".repeat(4096))), "unknown");
    }
}
