//! Watches: newline-delimited JSON events, resumable from a resourceVersion,
//! with bookmarks, `sendInitialEvents` streaming lists and the real server's
//! 410-in-a-200 answer for a version that history no longer covers.
//!
//! Every watch shares the store's broadcast; an event is serialised once and
//! the same bytes go to every watch that wants them, so the cost of a change
//! grows with the number of watches only by a pointer copy each.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::Shared;
use super::present::{Body, json_response, presented_json};
use super::resources::ResourceInfo;
use super::selector::{FieldSelector, LabelSelector, matches};
use super::status::ApiError;
use super::store::{Event, EventType, Object, event_line};

/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(15);
/// The real server's default request timeout for watches is 30 to 60 minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

pub struct WatchRequest {
    pub info: Arc<ResourceInfo>,
    pub version: String,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub resource_version: Option<String>,
    pub send_initial_events: bool,
    pub bookmarks: bool,
    pub timeout: Duration,
}

/// Which events a watch passes, and how it frames them.
struct Filter {
    info: Arc<ResourceInfo>,
    version: String,
    api_version: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    /// The line this watch sends for an event, if any. A modification that
    /// moves an object into or out of a label selector's set is an ADDED or a
    /// DELETED for that watch, as on the real server.
    fn line_for(&self, event: &Event) -> Option<Bytes> {
        if event.key != self.info.key
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != event.namespace)
            || !self.fields.matches(&event.namespace, &event.name)
        {
            return None;
        }
        let selected = |o: &Object| self.labels.matches(|k| o.label(k));
        let now = selected(&event.object);
        let kind = match event.kind {
            EventType::Modified if !self.labels.is_empty() => {
                let before = event.previous.as_deref().is_some_and(selected);
                match (before, now) {
                    (true, true) => EventType::Modified,
                    (false, true) => EventType::Added,
                    (true, false) => EventType::Deleted,
                    (false, false) => return None,
                }
            }
            kind => {
                if !now {
                    return None;
                }
                kind
            }
        };
        if kind == event.kind && *event.object.api_version == *self.api_version {
            Some(event.line.clone())
        } else {
            let json = presented_json(&event.object, &self.info, &self.version);
            Some(event_line(kind.as_str(), &json))
        }
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object =
            json!({"kind": self.info.kind, "apiVersion": self.api_version, "metadata": metadata});
        event_line("BOOKMARK", &serde_json::to_vec(&object).unwrap_or_default())
    }
}

fn error_stream(err: &ApiError) -> http::Response<Body> {
    let line = event_line(
        "ERROR",
        &serde_json::to_vec(&err.to_status()).unwrap_or_default(),
    );
    let body = StreamBody::new(futures::stream::once(async move {
        Ok::<_, Infallible>(Frame::data(line))
    }));
    streaming_response(BodyExt::boxed_unsync(body))
}

fn streaming_response(body: Body) -> http::Response<Body> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .unwrap_or_else(|_| json_response(500, &ApiError::internal("response").to_status()))
}

pub async fn serve(
    shared: Arc<Shared>,
    request: WatchRequest,
) -> Result<http::Response<Body>, ApiError> {
    // Held back while a test has paused watches (to force a 410 on resume).
    let mut paused = shared.watch_pause.subscribe();
    while *paused.borrow_and_update() {
        if paused.changed().await.is_err() {
            break;
        }
    }
    let mut closing = shared.watch_close.subscribe();
    closing.borrow_and_update();

    let filter = Filter {
        api_version: request.info.api_version(&request.version),
        version: request.version.clone(),
        info: request.info.clone(),
        namespace: request.namespace.clone(),
        labels: request.labels,
        fields: request.fields,
    };
    let (pending, receiver, start_rv) = {
        let state = shared.lock();
        let current = state.store.current_rv();
        let from = match request.resource_version.as_deref() {
            None | Some("") | Some("0") => None,
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version {text:?}"))
            })?),
        };
        match from {
            // No version: the current state as ADDED events, then changes.
            None => {
                let mut lines: VecDeque<Bytes> = state
                    .store
                    .list(&filter.info.key, filter.namespace.as_deref(), None)
                    .filter(|(id, o)| matches(id, o, &filter.labels, &filter.fields))
                    .map(|(_, o)| {
                        event_line("ADDED", &presented_json(o, &filter.info, &filter.version))
                    })
                    .collect();
                if request.send_initial_events {
                    lines.push_back(filter.bookmark(current, true));
                }
                let (_, receiver) = state.store.watch_from(current)?;
                (lines, receiver, current)
            }
            Some(since) => match state.store.watch_from(since) {
                Ok((replay, receiver)) => {
                    let lines = replay.iter().filter_map(|e| filter.line_for(e)).collect();
                    let last = replay.last().map_or(since, |e| e.rv);
                    (lines, receiver, last)
                }
                Err(err) if err.code == 410 => return Ok(error_stream(&err)),
                Err(err) => return Err(err),
            },
        }
    };

    struct Watch {
        filter: Filter,
        pending: VecDeque<Bytes>,
        receiver: tokio::sync::broadcast::Receiver<Arc<Event>>,
        closing: tokio::sync::watch::Receiver<u64>,
        deadline: Instant,
        bookmarks: Option<tokio::time::Interval>,
        last_rv: u64,
    }
    let mut bookmarks = request
        .bookmarks
        .then(|| tokio::time::interval_at(Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY));
    if let Some(interval) = &mut bookmarks {
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let watch = Watch {
        filter,
        pending,
        receiver,
        closing,
        deadline: Instant::now() + request.timeout,
        bookmarks,
        last_rv: start_rv,
    };
    let stream = futures::stream::unfold(watch, |mut w| async move {
        if let Some(line) = w.pending.pop_front() {
            return Some((line, w));
        }
        loop {
            let tick = async {
                match &mut w.bookmarks {
                    Some(interval) => {
                        interval.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                received = w.receiver.recv() => match received {
                    Ok(event) => {
                        if event.rv <= w.last_rv {
                            continue;
                        }
                        w.last_rv = event.rv;
                        if let Some(line) = w.filter.line_for(&event) {
                            return Some((line, w));
                        }
                    }
                    // Too far behind, or the server is going away: end the
                    // stream and let the client resume from its last version.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return None,
                },
                _ = tick => {
                    let line = w.filter.bookmark(w.last_rv, false);
                    return Some((line, w));
                }
                _ = tokio::time::sleep_until(w.deadline) => return None,
                _ = w.closing.changed() => return None,
            }
        }
    });
    let body = StreamBody::new(stream.map(|line| Ok::<_, Infallible>(Frame::data(line))));
    Ok(streaming_response(BodyExt::boxed_unsync(body)))
}
