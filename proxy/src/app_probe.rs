//! The app's probes, run by the sidecar. Injection points the kubelet's
//! liveness, readiness and startup probes at 15020
//! (`/app-health/<container>/<livez|readyz|startupz>`) and hands the
//! original checks to the sidecar (`WEFT_APP_PROBES`), so the app's
//! serving port can stay captured: otherwise it would have to be left out
//! of inbound capture for the kubelet, and plaintext from anywhere would
//! reach the app there. Each check runs as the kubelet would run it: an
//! HTTP(S) GET that must answer 2xx or 3xx, a TCP connect, or a gRPC
//! health check that must say SERVING, within the probe's timeout.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};

use crate::http::{Body, full};

/// The port the kubelet probes.
pub const APP_HEALTH_PORT: u16 = 15020;

// Fields a check does not know stop the sidecar at start rather than being
// ignored: a probe that silently checks something else is worse than none.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Check {
    http_get: Option<HttpGet>,
    tcp_socket: Option<TcpSocket>,
    grpc: Option<Grpc>,
    #[serde(default = "one_second")]
    timeout_seconds: u64,
}

fn one_second() -> u64 {
    1
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpGet {
    /// Only empty: a probe of another host stays the kubelet's.
    #[serde(default)]
    host: String,
    path: Option<String>,
    port: u16,
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<NameValue>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpSocket {
    /// Only empty, as for HTTP.
    #[serde(default)]
    host: String,
    port: u16,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Grpc {
    port: u16,
    service: Option<String>,
}

/// The checks by path, and where the app is.
#[derive(Debug)]
pub struct AppProbes {
    checks: BTreeMap<String, Check>,
    app: IpAddr,
}

impl AppProbes {
    /// From `WEFT_APP_PROBES` (a JSON object: path → Kubernetes probe
    /// handler with a numeric port, and its `timeoutSeconds`).
    pub fn from_json(text: &str, app: IpAddr) -> Result<Self> {
        let checks: BTreeMap<String, Check> = if text.trim().is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_str(text).context("WEFT_APP_PROBES is not a map of probes")?
        };
        for (path, check) in &checks {
            let handlers = [
                check.http_get.is_some(),
                check.tcp_socket.is_some(),
                check.grpc.is_some(),
            ];
            if handlers.iter().filter(|h| **h).count() != 1 {
                bail!("WEFT_APP_PROBES: {path} needs exactly one of httpGet, tcpSocket, grpc");
            }
            let host = [
                check.http_get.as_ref().map(|h| h.host.as_str()),
                check.tcp_socket.as_ref().map(|t| t.host.as_str()),
            ];
            if host.into_iter().flatten().any(|h| !h.is_empty()) {
                bail!(
                    "WEFT_APP_PROBES: {path} probes another host; only the pod's own app is probed here"
                );
            }
        }
        Ok(AppProbes { checks, app })
    }

    pub fn len(&self) -> usize {
        self.checks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Runs the check for `path`: `None` when there is none.
    pub async fn run(&self, path: &str) -> Option<Result<(), String>> {
        let check = self.checks.get(path)?;
        let timeout = Duration::from_secs(check.timeout_seconds.max(1));
        let outcome = tokio::time::timeout(timeout, self.run_check(check)).await;
        Some(match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("{err:#}")),
            Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
        })
    }

    async fn run_check(&self, check: &Check) -> Result<()> {
        if let Some(tcp) = &check.tcp_socket {
            TcpStream::connect(SocketAddr::new(self.app, tcp.port)).await?;
            return Ok(());
        }
        if let Some(get) = &check.http_get {
            return self.http_get(get).await;
        }
        if let Some(grpc) = &check.grpc {
            return self.grpc_health(grpc).await;
        }
        bail!("no check")
    }

    async fn http_get(&self, get: &HttpGet) -> Result<()> {
        let address = SocketAddr::new(self.app, get.port);
        let tcp = TcpStream::connect(address).await?;
        let path = get.path.as_deref().unwrap_or("/");
        let mut request = Request::get(if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        })
        .header(header::HOST, address.to_string())
        .header(header::USER_AGENT, "kube-probe/weft")
        .header(header::ACCEPT, "*/*")
        .body(crate::http::empty())?;
        for NameValue { name, value } in &get.http_headers {
            let (Ok(name), Ok(value)) = (
                header::HeaderName::try_from(name.as_str()),
                header::HeaderValue::try_from(value.as_str()),
            ) else {
                bail!("the probe header {name:?} is not valid");
            };
            request.headers_mut().insert(name, value);
        }
        let https = get
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let status = if https {
            // As the kubelet does, an HTTPS probe does not verify the app's
            // certificate: it asks whether the app answers, not who it is.
            let name = rustls_pki_types::ServerName::IpAddress(self.app.into());
            let tls = tokio_rustls::TlsConnector::from(insecure_tls()?)
                .connect(name, tcp)
                .await?;
            send_http1(tls, request).await?
        } else {
            send_http1(tcp, request).await?
        };
        if !(200..400).contains(&status.as_u16()) {
            bail!("the app answered {status}");
        }
        Ok(())
    }

    async fn grpc_health(&self, grpc: &Grpc) -> Result<()> {
        let tcp = TcpStream::connect(SocketAddr::new(self.app, grpc.port)).await?;
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(crate::task::Executor, TokioIo::new(tcp)).await?;
        crate::task::spawn(async move {
            let _ = connection.await;
        });
        let message = prost::Message::encode_to_vec(&HealthCheckRequest {
            service: grpc.service.clone().unwrap_or_default(),
        });
        let mut frame = BytesMut::with_capacity(5 + message.len());
        frame.put_u8(0);
        frame.put_u32(message.len() as u32);
        frame.put_slice(&message);
        let request = Request::post(format!(
            "http://{}/grpc.health.v1.Health/Check",
            SocketAddr::new(self.app, grpc.port)
        ))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(full(frame.freeze()))?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            bail!("the app answered {}", response.status());
        }
        let collected = response.into_body().collect().await?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let body = collected.to_bytes();
        let code = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0");
        if code != "0" {
            bail!("the health check failed with gRPC status {code}");
        }
        let reply: HealthCheckResponse = prost::Message::decode(body.get(5..).unwrap_or_default())
            .context("the health answer is not a HealthCheckResponse")?;
        if reply.status != SERVING {
            bail!("the app reports status {} (not SERVING)", reply.status);
        }
        Ok(())
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;

async fn send_http1<S>(stream: S, request: Request<Body>) -> Result<StatusCode>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await?;
    crate::task::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.send_request(request).await?.status())
}

fn insecure_tls() -> Result<Arc<rustls::ClientConfig>> {
    let provider = weft_certs::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts whatever certificate the app shows (HTTPS probes only).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One answer for the kubelet.
async fn answer(probes: &AppProbes, path: &str) -> Response<Body> {
    let (status, text) = match probes.run(path).await {
        None => (StatusCode::NOT_FOUND, "no such probe\n".to_string()),
        Some(Ok(())) => (StatusCode::OK, "ok\n".to_string()),
        Some(Err(why)) => {
            tracing::debug!(path, %why, "app probe failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    };
    let mut response = Response::new(full(Bytes::from(text)));
    *response.status_mut() = status;
    response
}

/// Serves 15020 until the task is aborted. Only the listed paths run a
/// check, against the pod's own app; nothing a caller sends chooses the
/// address, port or path that is probed.
pub async fn serve(listener: TcpListener, probes: Arc<AppProbes>) {
    crate::http::serve_http1(listener, move |request: Request<hyper::body::Incoming>| {
        let probes = probes.clone();
        async move { answer(&probes, request.uri().path()).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use serde_json::json;

    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// An app that answers HTTP/1 `/ok` with 200 and everything else with
    /// 500 (over TLS when `tls` is given); returns its port.
    async fn http_app(tls: Option<Arc<rustls::ServerConfig>>) -> u16 {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |r: Request<hyper::body::Incoming>| async move {
                            let ok = r.uri().path() == "/ok"
                                && r.headers().get("x-probe").is_some_and(|v| v == "yes");
                            let mut response = Response::new(crate::http::empty());
                            *response.status_mut() = if ok {
                                StatusCode::OK
                            } else {
                                StatusCode::INTERNAL_SERVER_ERROR
                            };
                            Ok::<_, Infallible>(response)
                        },
                    );
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(tls) => {
                            let stream = tokio_rustls::TlsAcceptor::from(tls)
                                .accept(tcp)
                                .await
                                .unwrap();
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        port
    }

    /// A gRPC health service that reports `status` for every service.
    async fn grpc_app(status: i32) -> u16 {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |r: Request<hyper::body::Incoming>| async move {
                            assert_eq!(r.uri().path(), "/grpc.health.v1.Health/Check");
                            let message =
                                prost::Message::encode_to_vec(&HealthCheckResponse { status });
                            let mut frame = BytesMut::new();
                            frame.put_u8(0);
                            frame.put_u32(message.len() as u32);
                            frame.put_slice(&message);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let frames = tokio_stream::iter([
                                Ok::<_, Infallible>(Frame::data(frame.freeze())),
                                Ok(Frame::trailers(trailers)),
                            ]);
                            let mut response = Response::new(StreamBody::new(frames));
                            response
                                .headers_mut()
                                .insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
                            Ok::<_, Infallible>(response)
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(crate::task::Executor)
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        port
    }

    fn probes(checks: serde_json::Value) -> AppProbes {
        AppProbes::from_json(&checks.to_string(), LOCAL).unwrap()
    }

    #[tokio::test]
    async fn each_kind_of_check_runs_as_the_kubelet_would() {
        let http = http_app(None).await;
        let ca = weft_certs::CertificateAuthority::generate_root(
            "cluster.local",
            &weft_certs::CaParams::valid_for("app", Duration::from_secs(3600)),
        )
        .unwrap();
        let (chain, key) = ca
            .issue_serving(&["app"], &[], Duration::from_secs(3600))
            .unwrap();
        let tls = weft_certs::tls::ServingCert::from_pem(&chain, &key)
            .unwrap()
            .server_config(&[])
            .unwrap();
        let https = http_app(Some(tls)).await;
        let (serving, not_serving) = (grpc_app(SERVING).await, grpc_app(2).await);
        let closed = {
            let l = std::net::TcpListener::bind((LOCAL, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let header = json!([{"name": "x-probe", "value": "yes"}]);
        let probes = probes(json!({
            "/http/ok": {"httpGet": {"path": "/ok", "port": http, "httpHeaders": header}},
            "/http/bad": {"httpGet": {"path": "/bad", "port": http, "httpHeaders": header}},
            "/https/ok": {"httpGet": {"path": "/ok", "port": https, "scheme": "HTTPS", "httpHeaders": header}},
            "/tcp/open": {"tcpSocket": {"port": http}},
            "/tcp/closed": {"tcpSocket": {"port": closed}},
            "/grpc/serving": {"grpc": {"port": serving}},
            "/grpc/not": {"grpc": {"port": not_serving, "service": "x"}},
        }));
        assert_eq!(probes.run("/http/ok").await, Some(Ok(())));
        assert!(
            probes
                .run("/http/bad")
                .await
                .unwrap()
                .unwrap_err()
                .contains("500")
        );
        assert_eq!(probes.run("/https/ok").await, Some(Ok(())));
        assert_eq!(probes.run("/tcp/open").await, Some(Ok(())));
        assert!(probes.run("/tcp/closed").await.unwrap().is_err());
        assert_eq!(probes.run("/grpc/serving").await, Some(Ok(())));
        assert!(
            probes
                .run("/grpc/not")
                .await
                .unwrap()
                .unwrap_err()
                .contains("SERVING")
        );
        assert_eq!(probes.run("/nothing").await, None);
    }

    #[tokio::test]
    async fn the_kubelet_asks_15020_and_gets_the_verdict() {
        let http = http_app(None).await;
        let probes = Arc::new(probes(json!({
            "/app-health/app/readyz": {"httpGet": {"path": "/ok", "port": http, "httpHeaders": [{"name": "x-probe", "value": "yes"}]}},
            "/app-health/app/livez": {"httpGet": {"path": "/down", "port": http}},
        })));
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, probes));
        for (path, expected) in [
            ("/app-health/app/readyz", 200),
            ("/app-health/app/livez", 503),
            ("/app-health/other/readyz", 404),
        ] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let request = Request::get(path)
                .header(header::HOST, "x")
                .body(crate::http::empty())
                .unwrap();
            assert_eq!(
                send_http1(tcp, request).await.unwrap().as_u16(),
                expected,
                "{path}"
            );
        }
    }

    #[test]
    fn a_probe_list_that_makes_no_sense_is_refused_at_start() {
        assert!(AppProbes::from_json("", LOCAL).unwrap().is_empty());
        assert!(AppProbes::from_json("[1]", LOCAL).is_err());
        let two = json!({"/p": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}});
        assert!(AppProbes::from_json(&two.to_string(), LOCAL).is_err());
        let none = json!({"/p": {"timeoutSeconds": 2}});
        assert!(AppProbes::from_json(&none.to_string(), LOCAL).is_err());
        // Nothing is ignored: an unknown field, or another host, is refused.
        let unknown = json!({"/p": {"tcpSocket": {"port": 1}, "exec": {"command": ["true"]}}});
        let err = AppProbes::from_json(&unknown.to_string(), LOCAL).unwrap_err();
        assert!(format!("{err:#}").contains("exec"), "{err:#}");
        let elsewhere = json!({"/p": {"httpGet": {"host": "10.0.0.9", "port": 80}}});
        assert!(AppProbes::from_json(&elsewhere.to_string(), LOCAL).is_err());
        let own = json!({"/p": {"httpGet": {"host": "", "port": 80, "scheme": "HTTP"}}});
        assert_eq!(
            AppProbes::from_json(&own.to_string(), LOCAL).unwrap().len(),
            1
        );
    }
}
