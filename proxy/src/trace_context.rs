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

use http::{HeaderMap, HeaderName, HeaderValue};

// Names made once: inserting by a `&str` name copies it every time.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest `x-request-id` kept as it came.
const MAX_REQUEST_ID: usize = 128;

/// This hop's place in the trace, for the access log: ids kept as the
/// hex they travel as, in place (a request pays no allocation for them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceIds {
    trace: [u8; 32],
    span: [u8; 16],
    /// The caller's span, when the request came with one.
    parent: Option<[u8; 16]>,
    request_id: HeaderValue,
}

impl Default for TraceIds {
    fn default() -> Self {
        TraceIds {
            trace: [b'0'; 32],
            span: [b'0'; 16],
            parent: None,
            request_id: HeaderValue::from_static(""),
        }
    }
}

fn text(hex: &[u8]) -> &str {
    // Only ever lowercase hex digits, written here or checked on the way in.
    std::str::from_utf8(hex).unwrap_or("")
}

impl TraceIds {
    pub fn trace_id(&self) -> &str {
        text(&self.trace)
    }

    pub fn span_id(&self) -> &str {
        text(&self.span)
    }

    pub fn parent_id(&self) -> Option<&str> {
        self.parent.as_ref().map(|p| text(p))
    }

    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `value`'s low `out.len() * 4` bits as lowercase hex.
fn write_hex(mut value: u128, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// A random id as hex into `out` (32 digits for a trace, 16 for a span);
/// never all zeros, which W3C reserves.
fn random_id(out: &mut [u8]) {
    let bits = out.len() as u32 * 4;
    loop {
        let value: u128 = rand::random::<u128>() >> (128 - bits);
        if value != 0 {
            write_hex(value, out);
            return;
        }
    }
}

fn is_hex(text: &[u8], len: usize) -> bool {
    text.len() == len
        && text
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && text.iter().any(|b| *b != b'0')
}

/// (trace id, parent span id, flags) of a valid version-00 `traceparent`.
fn parse(value: &[u8]) -> Option<([u8; 32], [u8; 16], [u8; 2])> {
    // 00-<32 hex>-<16 hex>-<2 hex>: 55 bytes exactly.
    if value.len() != 55 || &value[..3] != b"00-" || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let (trace, parent, flags) = (&value[3..35], &value[36..52], &value[53..55]);
    if !is_hex(trace, 32) || !is_hex(parent, 16) || !flags.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    Some((
        trace.try_into().ok()?,
        parent.try_into().ok()?,
        flags.try_into().ok()?,
    ))
}

/// A UUID v4, as Envoy makes `x-request-id`.
fn uuid() -> HeaderValue {
    let mut bits: u128 = rand::random();
    // Version 4, variant 10.
    bits = (bits & !(0xf << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    let mut hex = [0u8; 32];
    write_hex(bits, &mut hex);
    let mut out = [b'-'; 36];
    out[..8].copy_from_slice(&hex[..8]);
    out[9..13].copy_from_slice(&hex[8..12]);
    out[14..18].copy_from_slice(&hex[12..16]);
    out[19..23].copy_from_slice(&hex[16..20]);
    out[24..].copy_from_slice(&hex[20..]);
    // The id is both sent and kept for the log. A value made from a
    // `Vec` allocates its shared count at its first clone; one made from
    // an owner has it from the start, in the same allocation.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn usable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID && bytes.iter().all(u8::is_ascii_graphic)
}

/// Makes this hop a span of the request's trace (starting one where it
/// has none) and gives it a request id where it has none; returns the ids.
pub fn on_request(headers: &mut HeaderMap) -> TraceIds {
    let mut ids = TraceIds::default();
    random_id(&mut ids.span);
    let flags = match headers.get(TRACEPARENT).and_then(|v| parse(v.as_bytes())) {
        Some((trace, parent, flags)) => {
            ids.trace = trace;
            ids.parent = Some(parent);
            flags
        }
        None => {
            random_id(&mut ids.trace);
            *b"00"
        }
    };
    let mut sent = [b'-'; 55];
    sent[..2].copy_from_slice(b"00");
    sent[3..35].copy_from_slice(&ids.trace);
    sent[36..52].copy_from_slice(&ids.span);
    sent[53..].copy_from_slice(&flags);
    if let Ok(value) = HeaderValue::from_bytes(&sent) {
        headers.insert(TRACEPARENT, value);
    }
    ids.request_id = match headers.get(REQUEST_ID).filter(|v| usable_request_id(v)) {
        Some(id) => id.clone(),
        None => {
            let id = uuid();
            headers.insert(REQUEST_ID, id.clone());
            id
        }
    };
    ids
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
        assert_eq!(ids.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ids.parent_id(), Some("00f067aa0ba902b7"));
        assert_eq!(ids.request_id(), "abc-123");
        let sent = headers[TRACEPARENT].to_str().unwrap();
        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", ids.span_id())
        );
        assert_ne!(ids.span_id(), "00f067aa0ba902b7");
        assert_eq!(headers["tracestate"], "vendor=x");

        // The next hop continues it, under this hop's span.
        let next = on_request(&mut headers);
        assert_eq!(next.trace_id(), ids.trace_id());
        assert_eq!(next.parent_id(), Some(ids.span_id()));
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
            assert!(is_hex(ids.trace_id().as_bytes(), 32), "{bad}");
            assert_eq!(ids.parent_id(), None, "{bad}");
            assert!(parse(headers[TRACEPARENT].as_bytes()).is_some(), "{bad}");
            assert!(
                headers[TRACEPARENT].to_str().unwrap().ends_with("-00"),
                "{bad}"
            );
            assert_eq!(ids.request_id().len(), 36);
            assert_eq!(&ids.request_id()[14..15], "4", "a UUID v4");
            assert!(
                matches!(&ids.request_id()[19..20], "8" | "9" | "a" | "b"),
                "variant 10"
            );
        }
    }
}
