//! The few Kubernetes API calls enrolment makes, with the controller pod's own service-account
//! credentials: a TokenReview, reading and creating the Secrets that hold the CAs, and reading,
//! creating and replacing the ConfigMap that publishes the cluster CA's certificate.
//!
//! One HTTP/1.1 request per connection over rustls (the hyper and rustls tonic already brings),
//! each bounded in time and in the size of the answer. The token file is read again for every
//! request: kubelet rotates it in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls;

/// Where a pod finds its service account's credentials.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// The largest answer read from the API server.
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes API server: set --kube-api or run in a pod (KUBERNETES_SERVICE_HOST)")]
    NoServer,
    #[error("--kube-api {0}: must be https://HOST[:PORT]")]
    BadServer(String),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not usable: {reason}")]
    Unusable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the Kubernetes API server {server} cannot be reached: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("the Kubernetes API answered {method} {path} with HTTP {code}: {message}")]
    Refused {
        method: &'static str,
        path: String,
        code: u16,
        message: String,
    },
    #[error("the Kubernetes API's answer to {path} is not understood: {reason}")]
    Answer { path: String, reason: String },
}

/// Where the API server is and the credentials to call it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// `https://HOST:PORT`; `None`: from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT.
    pub server: Option<String>,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

/// A client of one API server.
pub struct Kube {
    /// HOST:PORT to connect to, and the name its certificate must carry.
    authority: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token_file: PathBuf,
    timeout: Duration,
}

/// What a TokenReview found out about a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Review {
    #[serde(default)]
    pub authenticated: bool,
    /// Why the token was not accepted, when it was not.
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub user: ReviewedUser,
    /// The audiences the token is valid for, among those asked for.
    #[serde(default)]
    pub audiences: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ReviewedUser {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// A Secret's data, decoded.
pub type SecretData = BTreeMap<String, Vec<u8>>;
/// A ConfigMap's data.
pub type ConfigMapData = BTreeMap<String, String>;

/// An object of the core API, labelled as cellar's, holding `data`.
fn object(kind: &str, namespace: &str, name: &str, data: &impl serde::Serialize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "cellar"},
        },
        "data": data,
    })
}

/// What a create found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    /// The object already exists (someone else made it first).
    AlreadyExists,
}

impl Kube {
    pub fn new(config: &KubeConfig) -> Result<Kube, KubeError> {
        let server = match &config.server {
            Some(s) => s.clone(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NoServer)?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                // An IPv6 service address needs brackets in a URL.
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let (authority, host) = parse_server(&server)?;
        let server_name = ServerName::try_from(host.clone()).map_err(|_| KubeError::BadServer(server.clone()))?;
        let pem = std::fs::read(&config.ca_file).map_err(|source| KubeError::Read {
            what: "the API server's CA file",
            path: config.ca_file.clone(),
            source,
        })?;
        let tls = client_config(&pem).map_err(|reason| KubeError::Unusable {
            what: "the API server's CA file",
            path: config.ca_file.clone(),
            reason,
        })?;
        read_token(&config.token_file)?;
        Ok(Kube {
            authority,
            server_name,
            tls: Arc::new(tls),
            token_file: config.token_file.clone(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Asks the API server who `token` belongs to, for `audience`.
    pub async fn token_review(&self, token: &str, audience: &str) -> Result<Review, KubeError> {
        let path = "/apis/authentication.k8s.io/v1/tokenreviews";
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        });
        let (code, answer) = self.call("POST", path, Some(body)).await?;
        if code != 200 && code != 201 {
            return Err(refused("POST", path, code, &answer));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            status: Review,
        }
        serde_json::from_slice::<Answer>(&answer)
            .map(|a| a.status)
            .map_err(|e| KubeError::Answer {
                path: path.into(),
                reason: e.to_string(),
            })
    }

    /// A Secret's data, or `None` when there is no such Secret.
    pub async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, KubeError> {
        let Some((path, data)) = self.data_of(namespace, "secrets", name).await? else {
            return Ok(None);
        };
        data.into_iter()
            .map(|(k, v)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|e| KubeError::Answer {
                        path: path.clone(),
                        reason: format!("data.{k}: {e}"),
                    })?;
                Ok((k, bytes))
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// Creates a Secret of `type_` holding `data`, labelled as cellar's; one that exists already
    /// is left as it is.
    pub async fn create_secret(
        &self,
        namespace: &str,
        name: &str,
        type_: &str,
        data: &SecretData,
    ) -> Result<Created, KubeError> {
        let encoded: BTreeMap<&str, String> = data
            .iter()
            .map(|(k, v)| (k.as_str(), base64::engine::general_purpose::STANDARD.encode(v)))
            .collect();
        let mut body = object("Secret", namespace, name, &encoded);
        body["type"] = type_.into();
        self.create(namespace, "secrets", body).await
    }

    /// A ConfigMap's data, or `None` when there is no such ConfigMap.
    pub async fn config_map(&self, namespace: &str, name: &str) -> Result<Option<ConfigMapData>, KubeError> {
        Ok(self.data_of(namespace, "configmaps", name).await?.map(|(_, data)| data))
    }

    /// Creates a ConfigMap holding `data`, labelled as cellar's; one that exists already is left
    /// as it is.
    pub async fn create_config_map(
        &self,
        namespace: &str,
        name: &str,
        data: &ConfigMapData,
    ) -> Result<Created, KubeError> {
        self.create(namespace, "configmaps", object("ConfigMap", namespace, name, data))
            .await
    }

    /// Replaces what a ConfigMap holds with `data` (an unconditional update, which ConfigMaps
    /// allow: the last writer wins, and every replica writes the same).
    pub async fn replace_config_map(&self, namespace: &str, name: &str, data: &ConfigMapData) -> Result<(), KubeError> {
        let path = format!("/api/v1/namespaces/{namespace}/configmaps/{name}");
        let body = object("ConfigMap", namespace, name, data);
        let (code, answer) = self.call("PUT", &path, Some(body)).await?;
        match code {
            200 | 201 => Ok(()),
            _ => Err(refused("PUT", &path, code, &answer)),
        }
    }

    /// The `data` of an object of the core API (`secrets`, `configmaps`), with the path read, or
    /// `None` when there is no such object.
    async fn data_of(
        &self,
        namespace: &str,
        plural: &str,
        name: &str,
    ) -> Result<Option<(String, BTreeMap<String, String>)>, KubeError> {
        let path = format!("/api/v1/namespaces/{namespace}/{plural}/{name}");
        let (code, answer) = self.call("GET", &path, None).await?;
        match code {
            200 => {}
            404 => return Ok(None),
            _ => return Err(refused("GET", &path, code, &answer)),
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            data: BTreeMap<String, String>,
        }
        let a: Answer = serde_json::from_slice(&answer).map_err(|e| KubeError::Answer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some((path, a.data)))
    }

    /// Creates an object of the core API; one that exists already is left as it is.
    async fn create(&self, namespace: &str, plural: &str, body: serde_json::Value) -> Result<Created, KubeError> {
        let path = format!("/api/v1/namespaces/{namespace}/{plural}");
        let (code, answer) = self.call("POST", &path, Some(body)).await?;
        match code {
            200 | 201 => Ok(Created::Created),
            409 => Ok(Created::AlreadyExists),
            _ => Err(refused("POST", &path, code, &answer)),
        }
    }

    /// One request on a new connection, bounded by the timeout: the status and the body.
    async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        let unreachable = |reason: String| KubeError::Unreachable {
            server: self.authority.clone(),
            reason,
        };
        let token = read_token(&self.token_file)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(format!("bad request: {e}")))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let driver = tokio::spawn(conn);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let code = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            driver.abort();
            Ok((code, bytes.to_vec()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
    }
}

/// `https://HOST[:PORT]` → (`HOST:PORT`, `HOST`), the host without brackets.
fn parse_server(server: &str) -> Result<(String, String), KubeError> {
    let bad = || KubeError::BadServer(server.to_string());
    let rest = server.strip_prefix("https://").ok_or_else(bad)?.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p,
            None if after.is_empty() => "443",
            None => return Err(bad()),
        };
        (host.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (rest.to_string(), "443"),
        }
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((authority, host))
}

fn client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("bad PEM ({e})"))?;
        roots.add(cert).map_err(|e| format!("not a CA certificate ({e})"))?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn read_token(path: &Path) -> Result<String, KubeError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeError::Read {
        what: "the service-account token",
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() || token.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(KubeError::Unusable {
            what: "the service-account token",
            path: path.to_path_buf(),
            reason: "empty, or not one line".into(),
        });
    }
    Ok(token.to_string())
}

/// An error answer, with the API's own message (a `Status` object) when there is one, bounded.
fn refused(method: &'static str, path: &str, code: u16, answer: &[u8]) -> KubeError {
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        message: String,
    }
    let message = serde_json::from_slice::<Status>(answer)
        .map(|s| s.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(answer).into_owned());
    let message: String = message.chars().take(512).collect();
    KubeError::Refused {
        method,
        path: path.to_string(),
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_https_host_and_port() {
        assert_eq!(
            parse_server("https://10.96.0.1:443").unwrap(),
            ("10.96.0.1:443".into(), "10.96.0.1".into())
        );
        assert_eq!(
            parse_server("https://kubernetes.default.svc").unwrap(),
            ("kubernetes.default.svc:443".into(), "kubernetes.default.svc".into())
        );
        assert_eq!(
            parse_server("https://[fd00::1]:6443/").unwrap(),
            ("[fd00::1]:6443".into(), "fd00::1".into())
        );
        for bad in [
            "http://10.0.0.1",
            "https://",
            "https://h:x",
            "https://h/api",
            "10.0.0.1:443",
        ] {
            assert!(parse_server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_file_must_hold_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "abc.def.ghi\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), "abc.def.ghi");
        std::fs::write(&p, "  \n").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("empty"));
        std::fs::write(&p, "a b").unwrap();
        assert!(read_token(&p).is_err());
    }
}
