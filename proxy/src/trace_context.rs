//! Trace headers on each HTTP request a sidecar carries: the W3C
//! `traceparent` (its trace id kept, this hop's own span made the parent
//! of the next), `tracestate` untouched, and `x-request-id`, made where
//! missing. Each sidecar is a span of its own, so a trace shows both hops;
//! no span is exported, and a request without a trace starts one here
//! (not sampled, as nothing records it).
//!
//! What arrives is untrusted: a `traceparent` that is not exactly the
//! version-00 form (lowercase hex, ids not all zero) is replaced, not
//! repaired; an `x-request-id` that is not a short visible token is too.

use http::{HeaderMap, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const REQUEST_ID: &str = "x-request-id";
/// The longest `x-request-id` kept as it came.
const MAX_REQUEST_ID: usize = 128;

/// This hop's place in the trace, for the access log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: String,
    pub span_id: String,
    /// The caller's span, when the request came with one.
    pub parent_id: Option<String>,
    pub request_id: String,
}

/// A random trace id (16 bytes) or span id (8), as lowercase hex; never
/// all zeros, which W3C reserves.
fn random_hex(bytes: usize) -> String {
    loop {
        let value: u128 = rand::random();
        let value = if bytes == 16 {
            value
        } else {
            value & u128::from(u64::MAX)
        };
        if value != 0 {
            return format!("{value:0width$x}", width = bytes * 2);
        }
    }
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && text.bytes().any(|b| b != b'0')
}

/// (trace id, parent span id, flags) of a valid version-00 `traceparent`.
fn parse(value: &str) -> Option<(&str, &str, &str)> {
    let mut parts = value.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" || !is_hex(trace, 32) || !is_hex(parent, 16) {
        return None;
    }
    (flags.len() == 2 && flags.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((trace, parent, flags))
}

/// A UUID v4, as Envoy makes `x-request-id`.
fn uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn usable_request_id(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    (!text.is_empty() && text.len() <= MAX_REQUEST_ID && text.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(text)
}

/// Makes this hop a span of the request's trace (starting one where it
/// has none) and gives it a request id where it has none; returns the ids.
pub fn on_request(headers: &mut HeaderMap) -> TraceIds {
    let span_id = random_hex(8);
    let (trace_id, parent_id, flags) = match headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
    {
        Some((trace, parent, flags)) => (
            trace.to_string(),
            Some(parent.to_string()),
            flags.to_string(),
        ),
        None => (random_hex(16), None, "00".to_string()),
    };
    if let Ok(value) = HeaderValue::from_str(&format!("00-{trace_id}-{span_id}-{flags}")) {
        headers.insert(TRACEPARENT, value);
    }
    let request_id = match headers.get(REQUEST_ID).and_then(usable_request_id) {
        Some(id) => id.to_string(),
        None => {
            let id = uuid();
            if let Ok(value) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID, value);
            }
            id
        }
    };
    TraceIds {
        trace_id,
        span_id,
        parent_id,
        request_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_continued_with_this_hop_as_the_parent_and_ids_made_where_missing() {
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert("tracestate", HeaderValue::from_static("vendor=x"));
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        let ids = on_request(&mut headers);
        assert_eq!(ids.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ids.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(ids.request_id, "abc-123");
        let sent = headers[TRACEPARENT].to_str().unwrap();
        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", ids.span_id)
        );
        assert_ne!(ids.span_id, "00f067aa0ba902b7");
        assert_eq!(headers["tracestate"], "vendor=x");

        // The next hop continues it, under this hop's span.
        let next = on_request(&mut headers);
        assert_eq!(next.trace_id, ids.trace_id);
        assert_eq!(next.parent_id.as_deref(), Some(ids.span_id.as_str()));
    }

    #[test]
    fn missing_or_forged_headers_are_replaced_not_repaired() {
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "garbage",
        ] {
            let mut headers = HeaderMap::new();
            if !bad.is_empty() {
                headers.insert(TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            }
            headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
            let ids = on_request(&mut headers);
            assert!(is_hex(&ids.trace_id, 32), "{bad}");
            assert_eq!(ids.parent_id, None, "{bad}");
            assert!(
                parse(headers[TRACEPARENT].to_str().unwrap()).is_some(),
                "{bad}"
            );
            assert!(
                headers[TRACEPARENT].to_str().unwrap().ends_with("-00"),
                "{bad}"
            );
            assert_eq!(ids.request_id.len(), 36);
            assert_eq!(&ids.request_id[14..15], "4", "a UUID v4");
        }
    }
}
