//! A small S3 server over a directory for cellar's tests: s3s-fs's `FileSystem` (a bucket is a
//! directory below the root, an object a file) behind s3s's HTTP handling and SigV4 checks, on
//! plain HTTP, path-style requests only.
//!
//! Why not the `s3s-fs` binary itself: s3s-fs 0.14.1 takes the empty `delimiter=` that restic's S3
//! client (minio-go) sends for a recursive listing as a delimiter, so `restic check` and
//! `restic list packs` see no pack below `data/` and report the repository broken. S3 treats an
//! empty delimiter as none; the two listing calls below do the same and hand everything else to
//! s3s-fs unchanged.
//!
//! Usage: cellar-s3-server --host 127.0.0.1 --port PORT --access-key KEY --secret-key SECRET ROOT
//! (the same flags as s3s-fs; `--version` prints the versions).

use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result};
use s3s_fs::FileSystem;

struct Server {
    fs: FileSystem,
}

/// An empty delimiter means "no delimiter" in S3.
fn no_empty_delimiter(d: &mut Option<Delimiter>) {
    if d.as_deref() == Some("") {
        *d = None;
    }
}

/// Implements `S3` for `Server` by handing each listed operation to s3s-fs as it is, besides the
/// two listings, which drop an empty delimiter first.
macro_rules! server_impl {
    ($($op:ident($input:ident) -> $output:ident;)*) => {
        #[async_trait::async_trait]
        impl S3 for Server {
            $(
                async fn $op(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.fs.$op(req).await
                }
            )*

            async fn list_objects(&self, mut req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
                no_empty_delimiter(&mut req.input.delimiter);
                self.fs.list_objects(req).await
            }

            async fn list_objects_v2(
                &self,
                mut req: S3Request<ListObjectsV2Input>,
            ) -> S3Result<S3Response<ListObjectsV2Output>> {
                no_empty_delimiter(&mut req.input.delimiter);
                self.fs.list_objects_v2(req).await
            }
        }
    };
}

// Every operation s3s-fs 0.14.1 implements.
server_impl! {
    create_bucket(CreateBucketInput) -> CreateBucketOutput;
    copy_object(CopyObjectInput) -> CopyObjectOutput;
    delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
    delete_object(DeleteObjectInput) -> DeleteObjectOutput;
    delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
    get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
    get_object(GetObjectInput) -> GetObjectOutput;
    head_bucket(HeadBucketInput) -> HeadBucketOutput;
    head_object(HeadObjectInput) -> HeadObjectOutput;
    list_buckets(ListBucketsInput) -> ListBucketsOutput;
    put_object(PutObjectInput) -> PutObjectOutput;
    create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
    upload_part(UploadPartInput) -> UploadPartOutput;
    upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
    list_parts(ListPartsInput) -> ListPartsOutput;
    complete_multipart_upload(CompleteMultipartUploadInput) -> CompleteMultipartUploadOutput;
    abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
}

struct Opts {
    host: String,
    port: u16,
    access_key: String,
    secret_key: String,
    root: PathBuf,
}

fn usage(msg: &str) -> ! {
    eprintln!("cellar-s3-server: {msg}");
    eprintln!("usage: cellar-s3-server --host HOST --port PORT --access-key KEY --secret-key SECRET ROOT");
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut args = std::env::args().skip(1);
    let (mut host, mut port, mut ak, mut sk, mut root) = (None, None, None, None, None);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--version" => {
                println!("cellar-s3-server {} (s3s-fs 0.14.1)", env!("CARGO_PKG_VERSION"));
                std::process::exit(0)
            }
            "--host" => host = Some(value()),
            "--port" => port = Some(value().parse().unwrap_or_else(|_| usage("--port is not a port number"))),
            "--access-key" => ak = Some(value()),
            "--secret-key" => sk = Some(value()),
            s if s.starts_with('-') => usage(&format!("unknown flag {s}")),
            _ if root.is_none() => root = Some(PathBuf::from(a)),
            _ => usage("more than one ROOT"),
        }
    }
    Opts {
        host: host.unwrap_or_else(|| "127.0.0.1".into()),
        port: port.unwrap_or_else(|| usage("--port is required")),
        access_key: ak.unwrap_or_else(|| usage("--access-key is required")),
        secret_key: sk.unwrap_or_else(|| usage("--secret-key is required")),
        root: root.unwrap_or_else(|| usage("ROOT is required")),
    }
}

#[tokio::main]
async fn main() {
    let opts = parse_args();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .init();
    let fs = FileSystem::new(&opts.root).unwrap_or_else(|e| usage(&format!("{}: {e:?}", opts.root.display())));
    let mut b = S3ServiceBuilder::new(Server { fs });
    b.set_auth(SimpleAuth::from_single(opts.access_key, opts.secret_key));
    let service = b.build();

    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .unwrap_or_else(|e| usage(&format!("listen on {}:{}: {e}", opts.host, opts.port)));
    eprintln!(
        "cellar-s3-server: listening on http://{}",
        listener.local_addr().expect("address")
    );
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cellar-s3-server: accept: {e}");
                continue;
            }
        };
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
