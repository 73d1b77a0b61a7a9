//! Access logs: one JSON line per HTTP request, on standard output (the
//! proxy's own logs go to standard error), by both sidecars of a request:
//! `outbound` at the caller's, `inbound` at the destination's. Field names
//! follow Envoy's access-log operators where one exists
//! (`start_time`, `duration`, `method`, `authority`, `path`, `protocol`,
//! `response_code`, `bytes_received`, `bytes_sent`, `upstream_cluster`,
//! `upstream_host`, `request_id`), plus the mesh's own: the workload that
//! served, both identities and the trace ids.
//!
//! A line is written when the response body ends (or is dropped), so
//! `bytes_sent` and `duration` cover the whole exchange. Lines go through
//! a bounded queue to one writer thread: a slow stdout never holds a
//! request, and a line that finds the queue full is dropped and counted
//! (`weft_proxy_access_log_dropped_total`), never silently.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::Response;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use serde_json::json;

use crate::http::{Body, BodyError};
use crate::trace_context::TraceIds;

/// Lines waiting for the writer at most.
const QUEUE: usize = 4096;

#[derive(Debug)]
pub struct AccessLog {
    lines: SyncSender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// A log written to standard output by a thread of its own.
    pub fn to_stdout(dropped: Counter) -> Arc<Self> {
        let (lines, queue) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(queue, std::io::stdout()))
            .map_err(
                |err| tracing::warn!(%err, "no access log writer thread; lines will be dropped"),
            )
            .ok();
        Arc::new(AccessLog { lines, dropped })
    }

    /// A log whose lines a test reads back.
    pub fn to_channel(dropped: Counter) -> (Arc<Self>, Receiver<String>) {
        let (lines, queue) = std::sync::mpsc::sync_channel(QUEUE);
        (Arc::new(AccessLog { lines, dropped }), queue)
    }

    fn write(&self, line: String) {
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn write_lines(queue: Receiver<String>, out: impl std::io::Write) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = queue.recv() {
        let _ = writeln!(out, "{line}");
        // Flushed whenever the queue is empty: lines appear at once when
        // traffic is light, in batches when it is not.
        while let Ok(line) = queue.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

/// What is known of a request when it starts.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub direction: &'static str,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub user_agent: Option<String>,
    /// The request body's declared length (`content-length`).
    pub bytes_received: Option<u64>,
    pub trace: TraceIds,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
}

/// Which endpoint served a request, as the response carries it from
/// where the endpoint was picked to where the line is written.
#[derive(Clone, Debug, Default)]
pub struct Upstream {
    /// The service (`outbound|80||echo.demo.svc.cluster.local`, as Envoy
    /// names clusters) or, inbound, the app.
    pub cluster: String,
    pub host: String,
    pub workload: Option<String>,
    pub identity: Option<String>,
}

impl Entry {
    /// What `request` says of itself, as this hop sees it.
    pub fn of<B>(
        direction: &'static str,
        request: &http::Request<B>,
        trace: TraceIds,
        source_identity: Option<String>,
        destination_identity: Option<String>,
    ) -> Entry {
        let header = |name: http::header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Entry {
            direction,
            method: request.method().to_string(),
            authority: request
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| header(http::header::HOST))
                .unwrap_or_default(),
            path: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            protocol: match request.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            user_agent: header(http::header::USER_AGENT),
            bytes_received: header(http::header::CONTENT_LENGTH).and_then(|l| l.parse().ok()),
            trace,
            source_identity,
            destination_identity,
        }
    }

    fn line(
        &self,
        started: SystemTime,
        duration_ms: u128,
        response_code: u16,
        bytes_sent: u64,
        upstream: Option<&Upstream>,
    ) -> String {
        let destination_identity = self
            .destination_identity
            .as_deref()
            .or(upstream.and_then(|u| u.identity.as_deref()));
        json!({
            "start_time": k8s_time(started),
            "direction": self.direction,
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "protocol": self.protocol,
            "response_code": response_code,
            "bytes_received": self.bytes_received,
            "bytes_sent": bytes_sent,
            "duration": duration_ms,
            "upstream_cluster": upstream.map(|u| u.cluster.as_str()),
            "upstream_host": upstream.map(|u| u.host.as_str()),
            "upstream_workload": upstream.and_then(|u| u.workload.as_deref()),
            "source_identity": self.source_identity,
            "destination_identity": destination_identity,
            "user_agent": self.user_agent,
            "request_id": self.trace.request_id(),
            "trace_id": self.trace.trace_id(),
            "span_id": self.trace.span_id(),
            "parent_span_id": self.trace.parent_id(),
        })
        .to_string()
    }
}

/// RFC 3339 with milliseconds, UTC, as Envoy writes `%START_TIME%`.
fn k8s_time(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    let days = secs / 86_400;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil from days (Howard Hinnant's algorithm), to avoid a date crate
    // in every sidecar.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

/// `response` with its body counted, and `entry` logged when the body
/// ends or is dropped.
pub fn log_when_done(
    log: &Arc<AccessLog>,
    entry: Entry,
    started: (SystemTime, Instant),
    response: Response<Body>,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    let upstream = parts.extensions.remove::<Upstream>();
    let logged = Logged {
        inner: body,
        sent: 0,
        pending: Some(Pending {
            log: log.clone(),
            entry,
            started,
            code: parts.status.as_u16(),
            upstream,
        }),
    };
    Response::from_parts(parts, http_body_util::BodyExt::boxed(logged))
}

struct Pending {
    log: Arc<AccessLog>,
    entry: Entry,
    started: (SystemTime, Instant),
    code: u16,
    upstream: Option<Upstream>,
}

struct Logged {
    inner: Body,
    sent: u64,
    pending: Option<Pending>,
}

impl Logged {
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            let line = p.entry.line(
                p.started.0,
                p.started.1.elapsed().as_millis(),
                p.code,
                self.sent,
                p.upstream.as_ref(),
            );
            p.log.write(line);
        }
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn times_are_rfc_3339_utc_with_milliseconds() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_572_400_123);
        assert_eq!(k8s_time(at), "2025-12-01T07:00:00.123Z");
        assert_eq!(k8s_time(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(k8s_time(leap), "2000-02-29T00:00:00.000Z");
    }

    #[tokio::test]
    async fn a_line_is_written_when_the_body_ends_with_its_bytes_and_upstream() {
        let (log, lines) = AccessLog::to_channel(Counter::default());
        let mut response = Response::new(crate::http::full("hello, world"));
        response.extensions_mut().insert(Upstream {
            cluster: "outbound|80||echo.demo.svc.cluster.local".into(),
            host: "10.1.0.5:8080".into(),
            workload: Some("c1/demo/echo-v1".into()),
            identity: Some("spiffe://cluster.local/ns/demo/sa/echo".into()),
        });
        let entry = Entry {
            direction: "outbound",
            method: "GET".into(),
            authority: "echo.demo.svc.cluster.local".into(),
            path: "/".into(),
            protocol: "HTTP/1.1",
            trace: {
                let mut headers = http::HeaderMap::new();
                headers.insert(
                    crate::trace_context::TRACEPARENT,
                    http::HeaderValue::from_static(
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    ),
                );
                headers.insert(
                    crate::trace_context::REQUEST_ID,
                    http::HeaderValue::from_static("r-1"),
                );
                crate::trace_context::on_request(&mut headers)
            },
            source_identity: Some("spiffe://cluster.local/ns/demo/sa/client".into()),
            ..Default::default()
        };
        let response = log_when_done(&log, entry, (SystemTime::now(), Instant::now()), response);
        assert!(lines.try_recv().is_err(), "not before the body is read");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello, world");
        let line: serde_json::Value = serde_json::from_str(&lines.try_recv().unwrap()).unwrap();
        assert_eq!(line["response_code"], 200);
        assert_eq!(line["bytes_sent"], 12);
        assert_eq!(line["upstream_workload"], "c1/demo/echo-v1");
        assert_eq!(
            line["destination_identity"],
            "spiffe://cluster.local/ns/demo/sa/echo"
        );
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["request_id"], "r-1");
        assert!(lines.try_recv().is_err(), "one line per request");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dropped = Counter::default();
        let (log, _lines) = AccessLog::to_channel(dropped.clone());
        for n in 0..QUEUE + 3 {
            log.write(n.to_string());
        }
        assert_eq!(dropped.get(), 3);
    }
}
