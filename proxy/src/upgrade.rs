//! HTTP/1.1 upgrades on HTTP ports: WebSocket, and whatever else the
//! operator allows (`WEFT_ALLOWED_UPGRADES`). Any other `Upgrade` (h2c
//! above all, which would let a caller speak HTTP/2 to the app past every
//! header the sidecar sets) is dropped as the hop-by-hop header it is, and
//! the request is served as an ordinary one. The mesh carries HTTP as HTTP/2 between
//! sidecars, which has no `Upgrade`; an upgrade request instead goes to
//! one endpoint through a TCP tunnel (the HBONE CONNECT of a TCP port, or
//! a plain connection to a workload without a sidecar), as the application
//! wrote it, and when the endpoint answers `101 Switching Protocols` the
//! two upgraded connections are joined byte for byte.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::Body;

/// The upgrade protocols relayed (case-insensitive).
#[derive(Clone, Debug)]
pub struct Upgrades(std::sync::Arc<[String]>);

impl Default for Upgrades {
    fn default() -> Self {
        Upgrades::from_list("websocket")
    }
}

impl Upgrades {
    /// From a comma-separated list; `h2c` is never relayed, even if listed.
    pub fn from_list(list: &str) -> Self {
        Upgrades(
            list.split(',')
                .map(|p| p.trim().to_ascii_lowercase())
                .filter(|p| !p.is_empty() && p != "h2c")
                .collect(),
        )
    }

    /// Whether a request asks to switch its connection to protocols that
    /// are all allowed.
    pub fn requested<B>(&self, request: &Request<B>) -> bool {
        let mut protocols = request
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("\0").split(','))
            .map(|p| {
                let name = p.trim().split('/').next().unwrap_or_default();
                self.0
                    .iter()
                    .any(|allowed| name.eq_ignore_ascii_case(allowed))
            })
            .peekable();
        request.version() == http::Version::HTTP_11
            && protocols.peek().is_some()
            && protocols.all(|allowed| allowed)
            && request
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
    }
}

/// Sends `request` (an upgrade) over `stream`, in origin form. Returns the
/// answer for the client and, when it is a 101, the future that carries
/// the switched connection's bytes both ways (bytes sent, received).
pub async fn relay<S>(
    stream: S,
    authority: &str,
    mut request: Request<Body>,
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
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused: an ordinary answer, and the exchange is over.
        return Ok((response.map(crate::http::boxed), None));
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
    fn only_allowed_http11_upgrades_are_relayed() {
        let request = |version, upgrade: &str, connection: &str| {
            Request::builder()
                .version(version)
                .header(header::UPGRADE, upgrade)
                .header(header::CONNECTION, connection)
                .body(())
                .unwrap()
        };
        let allowed = Upgrades::default();
        let v11 = http::Version::HTTP_11;
        assert!(allowed.requested(&request(v11, "websocket", "Upgrade")));
        assert!(allowed.requested(&request(v11, "WebSocket", "keep-alive, upgrade")));
        assert!(!allowed.requested(&request(v11, "websocket", "keep-alive")));
        assert!(!allowed.requested(&request(http::Version::HTTP_2, "websocket", "upgrade")));
        assert!(!allowed.requested(&request(v11, "h2c", "Upgrade, HTTP2-Settings")));
        assert!(!allowed.requested(&request(v11, "websocket, h2c", "upgrade")));
        assert!(!allowed.requested(&request(v11, "tls/1.2", "upgrade")));
        let plain = Request::builder().body(()).unwrap();
        assert!(!allowed.requested(&plain));
        // An operator's list, where h2c stays out whatever it says.
        let custom = Upgrades::from_list("websocket, spdy ,h2c");
        assert!(custom.requested(&request(v11, "SPDY/3.1", "upgrade")));
        assert!(!custom.requested(&request(v11, "h2c", "upgrade")));
    }
}
