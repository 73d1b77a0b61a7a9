//! HTTP/1.1 upgrades (WebSocket, and anything else sent with `Connection:
//! upgrade`) on HTTP ports. The mesh carries HTTP as HTTP/2 between
//! sidecars, which has no `Upgrade`; an upgrade request instead goes to
//! one endpoint through a TCP tunnel (the HBONE CONNECT of a TCP port, or
//! a plain connection to a workload without a sidecar), as the application
//! wrote it, and when the endpoint answers `101 Switching Protocols` the
//! two upgraded connections are joined byte for byte.

use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::{Body, error};
use crate::metrics::{Peer, RequestLabels, TrafficLabels};
use crate::outbound::Outbound;

/// Whether a request asks to switch protocols on its connection.
pub fn requested<B>(request: &Request<B>) -> bool {
    request.version() == http::Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Sends an upgrade request to an endpoint of `host:port` and, on 101,
/// joins the client's connection to the endpoint's.
pub async fn forward(
    outbound: &Outbound,
    host: &str,
    port: u16,
    authority: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let (pick, stream) = match outbound.connect_tcp(host, port).await {
        Ok(connected) => connected,
        Err(err) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("{err:#}")),
    };
    let (response, joined) = match relay(stream, authority, request).await {
        Ok(relayed) => relayed,
        Err(err) => return error(StatusCode::BAD_GATEWAY, &err),
    };
    let destination = pick.workload.as_deref().map(Peer::of).unwrap_or_default();
    let labels = RequestLabels {
        traffic: TrafficLabels::new("source", &outbound.me(), &pick.service_name(), &destination),
        response_code: response.status().as_u16(),
    };
    outbound
        .metrics
        .request(labels.clone(), start.elapsed().as_secs_f64());
    if let Some(joined) = joined {
        let metrics = outbound.metrics.clone();
        let labels = labels.traffic;
        metrics.tcp_opened.get_or_create(&labels).inc();
        crate::task::spawn(async move {
            // Holds the endpoint's in-flight count while the upgraded
            // connection lives.
            let _pick = pick;
            let (sent, received) = joined.await;
            metrics.tcp(&labels, sent, received);
        });
    }
    response
}

/// Sends `request` (an upgrade) over `stream`, in origin form. Returns the
/// answer for the client and, when it is a 101, the future that carries
/// the switched connection's bytes both ways (bytes sent, received).
pub async fn relay<S>(
    stream: S,
    authority: &str,
    mut request: Request<Incoming>,
) -> Result<
    (
        Response<Body>,
        Option<impl Future<Output = (u64, u64)> + Send + use<S>>,
    ),
    String,
>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    crate::task::spawn(connection.with_upgrades());
    let client_side = hyper::upgrade::on(&mut request);
    let (mut parts, body) = request.into_parts();
    // Origin form for the endpoint, whatever form the client used (an
    // explicit-proxy client sends absolute form).
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    if !parts.headers.contains_key(header::HOST)
        && let Ok(value) = HeaderValue::from_str(authority)
    {
        parts.headers.insert(header::HOST, value);
    }
    let mut response = sender
        .send_request(Request::from_parts(parts, body.boxed()))
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused: an ordinary answer, and the exchange is over.
        return Ok((response.map(|b| b.boxed()), None));
    }
    let endpoint_side = hyper::upgrade::on(&mut response);
    let joined = async move {
        match tokio::try_join!(client_side, endpoint_side) {
            Ok((client, endpoint)) => {
                let (mut client, mut endpoint) = (TokioIo::new(client), TokioIo::new(endpoint));
                tokio::io::copy_bidirectional(&mut client, &mut endpoint)
                    .await
                    .unwrap_or_default()
            }
            Err(err) => {
                tracing::debug!("an upgrade did not complete: {err}");
                (0, 0)
            }
        }
    };
    let mut reply = Response::new(crate::http::empty());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *reply.headers_mut() = response.headers().clone();
    Ok((reply, Some(joined)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http11_requests_with_connection_upgrade_are_upgrades() {
        let request = |version, connection: &str| {
            Request::builder()
                .version(version)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, connection)
                .body(())
                .unwrap()
        };
        assert!(requested(&request(http::Version::HTTP_11, "Upgrade")));
        assert!(requested(&request(
            http::Version::HTTP_11,
            "keep-alive, upgrade"
        )));
        assert!(!requested(&request(http::Version::HTTP_11, "keep-alive")));
        assert!(!requested(&request(http::Version::HTTP_2, "upgrade")));
        let plain = Request::builder().body(()).unwrap();
        assert!(!requested(&plain));
    }
}
