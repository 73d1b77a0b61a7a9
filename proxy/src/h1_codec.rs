//! HTTP/1.1 as it travels on an HTTP/1.1 link between two sidecars: heads
//! written and parsed, bodies framed. Both ends are weft, so the codec is
//! strict: it writes one way and refuses anything else it reads, since a
//! message it half-understands is how requests are smuggled (RFC 9112
//! 6.3, 11.2).
//!
//! - A request has no body or one `Content-Length` of at most
//!   `MAX_REQUEST_BODY`; never `Transfer-Encoding`. Larger and streamed
//!   bodies travel on the HTTP/2 link.
//! - A response has a `Content-Length`, or `Transfer-Encoding: chunked`
//!   alone, or no body by its status or the request's method. Never an
//!   interim (1xx) answer, and never a body read to the connection's end.
//!
//! The server sidecar also speaks it to its own app, whose answers are
//! taken as an HTTP/1.1 server may give them (`Speaker::App`): interim
//! answers (skipped by the reader), HTTP/1.0, and bodies that end with
//! the connection. Its requests go in origin form.
//! - Heads are at most `MAX_HEAD` (as the HTTP/2 link's header list),
//!   obsolete line folding is refused (httparse's default), and each name
//!   and value must be valid for `http`'s types.

use std::fmt::Write as _;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

/// The most a message head may take.
pub const MAX_HEAD: usize = 16 << 10;
/// The most header fields a head may have.
const MAX_HEADERS: usize = 100;
/// The largest request body an HTTP/1.1 link carries: the server sidecar
/// takes it whole before calling the app, so one read usually holds it.
pub const MAX_REQUEST_BODY: u64 = 64 << 10;
/// The longest chunk-size line taken (hex digits and extensions).
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("a message head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("a message head that does not parse: {0}")]
    Unparsable(String),
    #[error("a header field that is not valid")]
    BadHeader,
    #[error("a request target that is not valid")]
    BadTarget,
    #[error("a Content-Length that is not valid, or more than one")]
    BadLength,
    #[error("a request body of {0} bytes, over the link's {MAX_REQUEST_BODY}")]
    BodyTooLarge(u64),
    #[error("a request with Transfer-Encoding (the link frames requests by length)")]
    TransferEncodedRequest,
    #[error("a response with a Transfer-Encoding other than chunked alone, or with a length too")]
    BadTransferEncoding,
    #[error("an interim (1xx) response")]
    Interim,
    #[error("a response with no length")]
    NoLength,
    #[error("a chunk that does not parse")]
    BadChunk,
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Read to the connection's end (only an app's answer).
    UntilClose,
}

/// Who answers: a peer sidecar is held to the link's framing; the app
/// behind this sidecar is read as HTTP/1.1 servers answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaker {
    Sidecar,
    App,
}

/// A parsed request head: its parts, its body's length, and the head's
/// length in the buffer.
#[derive(Debug)]
pub struct RequestHead {
    pub parts: http::request::Parts,
    pub body: u64,
    pub length: usize,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub parts: http::response::Parts,
    pub framing: Framing,
    pub length: usize,
    /// Whether the connection may carry another exchange after this one.
    pub keep_alive: bool,
}

fn unparsable(err: httparse::Error) -> WireError {
    WireError::Unparsable(err.to_string())
}

/// A head still arriving: `None`, or refused once it is too long.
fn partial<T>(read: usize) -> Result<Option<T>, WireError> {
    match read > MAX_HEAD {
        true => Err(WireError::HeadTooLarge),
        false => Ok(None),
    }
}

/// Room a request's map keeps for the fields a sidecar adds to it (trace
/// context and request id, or the caller's identity), so adding them does
/// not grow it. A response gets none: `http` sizes a map in powers of
/// two, and the next is a large allocation.
const ADDED_FIELDS: usize = 2;

/// Slots of the names `header_name` keeps.
const NAME_SLOTS: usize = 64;

thread_local! {
    /// Header names met lately, each in the slot a hash of its bytes
    /// picks (the sidecar's runtime has one thread). An app's own names
    /// (`x-...`) are not among `http`'s standard ones: made from bytes,
    /// each would be allocated again in every message.
    static NAMES: std::cell::RefCell<[Option<HeaderName>; NAME_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; NAME_SLOTS]) };
}

/// The header name `raw` spells, in any case: the one kept in its slot if
/// that is it, else made (and kept in the slot instead).
fn header_name(raw: &[u8]) -> Result<HeaderName, WireError> {
    if raw.is_empty() {
        return Err(WireError::BadHeader);
    }
    // Every byte counts: names of one length often share their ends
    // (`content-length`, `x-weft-target`...). `| 0x20` folds the case.
    let hash = raw.iter().fold(raw.len() as u32, |hash, byte| {
        (hash.rotate_left(5) ^ u32::from(byte | 0x20)).wrapping_mul(0x9e37_79b9)
    });
    let slot = (hash >> 16) as usize % NAME_SLOTS;
    NAMES.with_borrow_mut(|names| {
        // A valid name, lowercase, equal but for the case of its letters:
        // `raw` is valid too, and names the same field.
        if let Some(kept) = &names[slot]
            && kept.as_str().as_bytes().eq_ignore_ascii_case(raw)
        {
            return Ok(kept.clone());
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| WireError::BadHeader)?;
        names[slot] = Some(name.clone());
        Ok(name)
    })
}

/// The same bytes as `part`, a slice of `parsed`, taken from `head`, a
/// copy of `parsed`'s start: shared, not copied again.
fn shared(parsed: &[u8], head: &Bytes, part: &[u8]) -> Bytes {
    let at = (part.as_ptr() as usize).wrapping_sub(parsed.as_ptr() as usize);
    match head.get(at..at + part.len()) {
        Some(_) => head.slice(at..at + part.len()),
        // Not from `parsed` (httparse hands out only its slices).
        None => Bytes::copy_from_slice(part),
    }
}

/// The header fields of a head, as `http` holds them. `fields` point into
/// `parsed`, whose start `head` copies: values are slices of that one
/// copy, so a head costs one allocation for its values, not one a field.
fn header_map(
    parsed: &[u8],
    head: &Bytes,
    fields: &[httparse::Header<'_>],
    room: usize,
) -> Result<HeaderMap, WireError> {
    let mut headers = HeaderMap::with_capacity(fields.len() + room);
    for field in fields {
        let name = header_name(field.name.as_bytes())?;
        let value = HeaderValue::from_maybe_shared(shared(parsed, head, field.value))
            .map_err(|_| WireError::BadHeader)?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The one `Content-Length` of `headers`, if any.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, WireError> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(WireError::BadLength);
    }
    let digits = value.as_bytes();
    // Digits only: `+5`, ` 5` or `0x5` parse elsewhere, and two parsers
    // that disagree on a length are a smuggling channel.
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(WireError::BadLength);
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .map(Some)
        .ok_or(WireError::BadLength)
}

/// Parses a request head from the start of `buf`; `None` while it is
/// still arriving.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, WireError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(length) = parsed.parse(buf).map_err(unparsable)? else {
        return partial(buf.len());
    };
    if parsed.version != Some(1) {
        return Err(WireError::Unparsable("not HTTP/1.1".into()));
    }
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(WireError::BadTarget)?;
    let head = Bytes::copy_from_slice(&buf[..length]);
    let uri = parsed
        .path
        .and_then(|p| Uri::from_maybe_shared(shared(buf, &head, p.as_bytes())).ok())
        .ok_or(WireError::BadTarget)?;
    let headers = header_map(buf, &head, parsed.headers, ADDED_FIELDS)?;
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(WireError::TransferEncodedRequest);
    }
    let body = content_length(&headers)?.unwrap_or(0);
    if body > MAX_REQUEST_BODY {
        return Err(WireError::BodyTooLarge(body));
    }
    let mut request = http::Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    let (parts, ()) = request.into_parts();
    Ok(Some(RequestHead {
        parts,
        body,
        length,
    }))
}

/// Whether a response to a `method` request with `status` has no body
/// whatever its head says (RFC 9112 6.3).
pub fn bodiless(method: &Method, status: StatusCode) -> bool {
    *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Parses a response head from the start of `buf`, for a request whose
/// method was `method`, from `speaker`; `None` while it is still
/// arriving. An app's interim answer (100, 103) is returned as it is, for
/// the reader to skip.
pub fn parse_response(
    buf: &[u8],
    method: &Method,
    speaker: Speaker,
) -> Result<Option<ResponseHead>, WireError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(length) = parsed.parse(buf).map_err(unparsable)? else {
        return partial(buf.len());
    };
    let http11 = parsed.version == Some(1);
    if !http11 && speaker == Speaker::Sidecar {
        return Err(WireError::Unparsable("not HTTP/1.1".into()));
    }
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| WireError::Unparsable("a bad status".into()))?;
    // A switch of protocols nobody asked for (upgrades never come this
    // way) would leave the connection speaking something else.
    if status.is_informational()
        && (speaker == Speaker::Sidecar || status == StatusCode::SWITCHING_PROTOCOLS)
    {
        return Err(WireError::Interim);
    }
    let head = Bytes::copy_from_slice(&buf[..length]);
    let headers = header_map(buf, &head, parsed.headers, 0)?;
    let chunked = match headers.get_all(header::TRANSFER_ENCODING).iter().count() {
        0 => false,
        1 if headers[header::TRANSFER_ENCODING]
            .as_bytes()
            .eq_ignore_ascii_case(b"chunked")
            && !headers.contains_key(header::CONTENT_LENGTH) =>
        {
            true
        }
        _ => return Err(WireError::BadTransferEncoding),
    };
    let framing = if bodiless(method, status) {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else {
        match (content_length(&headers)?, speaker) {
            (Some(length), _) => Framing::Length(length),
            (None, Speaker::App) => Framing::UntilClose,
            (None, Speaker::Sidecar) => return Err(WireError::NoLength),
        }
    };
    let keep_alive = http11 && framing != Framing::UntilClose && !closes(&headers);
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = headers;
    let (parts, ()) = response.into_parts();
    Ok(Some(ResponseHead {
        parts,
        framing,
        length,
        keep_alive,
    }))
}

fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

fn put_fields(out: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        put_field(out, name, value);
    }
}

/// Writes a request head for a body of `body` bytes: `headers`, then the
/// link's `own` fields; the target in origin form for the app, absolute
/// for a peer sidecar. `headers` must hold no hop-by-hop fields (the
/// caller strips them); the length and the host are the codec's to
/// write, and any in `headers` are left out.
pub fn put_request_head(
    out: &mut BytesMut,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    own: &[(HeaderName, &HeaderValue)],
    body: usize,
    to: Speaker,
) {
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    match to {
        Speaker::Sidecar => {
            let _ = write!(out, "{uri}");
        }
        Speaker::App => out.put_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes()),
    }
    out.put_slice(b" HTTP/1.1\r\n");
    if let Some(authority) = uri.authority() {
        out.put_slice(b"host: ");
        out.put_slice(authority.as_str().as_bytes());
        out.put_slice(b"\r\n");
    }
    for (name, value) in headers {
        // The framing and the host are the codec's to write.
        let own_field = name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || (name == header::HOST && uri.authority().is_some());
        if !own_field {
            put_field(out, name, value);
        }
    }
    for (name, value) in own {
        put_field(out, name, value);
    }
    if body > 0 || method_expects_length(method) {
        out.put_slice(b"content-length: ");
        let _ = write!(out, "{body}");
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

/// Methods whose requests say their length even when it is zero, as
/// HTTP/1.1 clients do (a server may wait for a body otherwise).
fn method_expects_length(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Writes a response head with `framing` (`None`: the status or method
/// says there is no body, and the app's own length field is kept);
/// `close` says the connection ends after it. The framing and hop-by-hop
/// fields of `headers` are the codec's: any there are replaced.
pub fn put_response_head(
    out: &mut BytesMut,
    parts: &http::response::Parts,
    framing: Option<Framing>,
    close: bool,
) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(parts.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    out.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        let framing_field = name == header::TRANSFER_ENCODING
            || (framing.is_some() && name == header::CONTENT_LENGTH)
            || name == header::CONNECTION;
        if !framing_field {
            put_field(out, name, value);
        }
    }
    match framing {
        Some(Framing::Length(length)) => {
            out.put_slice(b"content-length: ");
            let _ = write!(out, "{length}");
            out.put_slice(b"\r\n");
        }
        Some(Framing::Chunked) => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Some(Framing::UntilClose) | None => {}
    }
    if close {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

/// Whether a head asks for the connection to end after this message.
pub fn closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// One chunk of a chunked body.
pub fn put_chunk(out: &mut BytesMut, data: &[u8]) {
    if data.is_empty() {
        // A zero-size chunk would end the body.
        return;
    }
    let _ = write!(out, "{:x}\r\n", data.len());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// The end of a chunked body, with its trailer fields.
pub fn put_last_chunk(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
    out.put_slice(b"0\r\n");
    if let Some(trailers) = trailers {
        put_fields(out, trailers);
    }
    out.put_slice(b"\r\n");
}

/// What a chunked body gave next.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The body ended, with these trailer fields (maybe none).
    End(HeaderMap),
    /// More bytes are needed.
    Short,
}

/// Reads a chunked body from a buffer that fills as it arrives.
#[derive(Debug, Default)]
pub struct Dechunk {
    /// Bytes left of the chunk being read; `None` between chunks.
    left: Option<u64>,
}

impl Dechunk {
    /// Takes what it can from the front of `buf`.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self.left {
                Some(0) => {
                    // The CRLF after a chunk's data.
                    if buf.len() < 2 {
                        return Ok(Decoded::Short);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::BadChunk);
                    }
                    buf.advance(2);
                    self.left = None;
                }
                Some(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::Short);
                    }
                    let n = (left.min(buf.len() as u64)) as usize;
                    self.left = Some(left - n as u64);
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                None => {
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        return match buf.len() > MAX_CHUNK_LINE {
                            true => Err(WireError::BadChunk),
                            false => Ok(Decoded::Short),
                        };
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(WireError::BadChunk);
                    }
                    let size = chunk_size(&buf[..end])?;
                    if size == 0 {
                        return self.trailers(buf);
                    }
                    buf.advance(end + 2);
                    self.left = Some(size);
                }
            }
        }
    }

    /// The last chunk's line and the trailer section after it, once all
    /// of it is in `buf`.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        let line = buf
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(WireError::BadChunk)?;
        let section = &buf[line + 2..];
        if section.starts_with(b"\r\n") {
            buf.advance(line + 4);
            return Ok(Decoded::End(HeaderMap::new()));
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(section, &mut fields).map_err(|_| WireError::BadChunk)? {
            httparse::Status::Partial => partial::<()>(section.len()).map(|_| Decoded::Short),
            httparse::Status::Complete((taken, fields)) => {
                let copy = Bytes::copy_from_slice(&section[..taken]);
                let trailers = header_map(section, &copy, fields, 0)?;
                buf.advance(line + 2 + taken);
                Ok(Decoded::End(trailers))
            }
        }
    }
}

/// A chunk-size line's size; its extensions are ignored (RFC 9112 7.1.1).
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(WireError::BadChunk);
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or(WireError::BadChunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> Result<Option<RequestHead>, WireError> {
        parse_request(head.as_bytes())
    }

    #[test]
    fn a_request_written_is_read_back_the_same() {
        let mut headers = HeaderMap::new();
        headers.append("accept", HeaderValue::from_static("a"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.append("accept", HeaderValue::from_static("b"));
        let uri: Uri = "http://echo.demo:80/path?q=1".parse().unwrap();
        let mut out = BytesMut::new();
        let target = HeaderValue::from_static("10.0.0.1:8080");
        let own = [(HeaderName::from_static("x-weft-target"), &target)];
        put_request_head(
            &mut out,
            &Method::POST,
            &uri,
            &headers,
            &own,
            5,
            Speaker::Sidecar,
        );
        out.put_slice(b"hello");
        let head = parse_request(&out).unwrap().unwrap();
        assert_eq!(head.parts.method, Method::POST);
        assert_eq!(head.parts.uri, uri);
        assert_eq!(head.body, 5);
        assert_eq!(&out[head.length..], b"hello");
        assert_eq!(head.parts.headers["host"], "echo.demo:80");
        assert_eq!(head.parts.headers.get_all("accept").iter().count(), 2);
        assert_eq!(head.parts.headers["x-weft-target"], "10.0.0.1:8080");

        assert!(
            request("GET http://a/ HTTP/1.1\r\nhost: a\r\n")
                .unwrap()
                .is_none(),
            "a head still arriving"
        );
    }

    #[test]
    fn fields_are_read_by_name_in_any_case_and_their_values_whole() {
        // More names than the kept slots, in both cases, each twice: the
        // names kept and those made anew must come out the same.
        let names: Vec<String> = (0..NAME_SLOTS + 20)
            .map(|n| format!("x-App-{n}"))
            .chain(["Content-Length", "X-Weft-Target", "content-length"].map(String::from))
            .collect();
        for round in 0..2 {
            let mut head = String::from("GET /p?q HTTP/1.1\r\nhost: a\r\n");
            for (n, name) in names.iter().enumerate() {
                let name = match round {
                    0 => name.clone(),
                    _ => name.to_uppercase(),
                };
                if name.eq_ignore_ascii_case("content-length") {
                    continue;
                }
                head += &format!("{name}: value {n}\r\n");
            }
            head += "content-length: 0\r\n\r\n";
            let parsed = request(&head).unwrap().unwrap().parts;
            assert_eq!(parsed.uri, "/p?q");
            for (n, name) in names.iter().enumerate() {
                if name.eq_ignore_ascii_case("content-length") {
                    continue;
                }
                let wanted = HeaderName::from_bytes(name.as_bytes()).unwrap();
                assert_eq!(parsed.headers[&wanted], format!("value {n}").as_str());
            }
            assert_eq!(parsed.headers[header::CONTENT_LENGTH], "0");
            assert_eq!(parsed.headers.len(), names.len() - 2 + 1 + 1);
        }
    }

    #[test]
    fn requests_the_link_does_not_frame_are_refused() {
        let refused = [
            (
                "POST http://a/ HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
                WireError::TransferEncodedRequest,
            ),
            (
                "POST http://a/ HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                WireError::TransferEncodedRequest,
            ),
            (
                "POST http://a/ HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                WireError::BadLength,
            ),
            (
                "POST http://a/ HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
                WireError::BadLength,
            ),
            (
                "POST http://a/ HTTP/1.1\r\ncontent-length: +5\r\n\r\n",
                WireError::BadLength,
            ),
            (
                "POST http://a/ HTTP/1.1\r\ncontent-length: 0x5\r\n\r\n",
                WireError::BadLength,
            ),
            (
                "POST http://a/ HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n",
                WireError::BadLength,
            ),
            (
                "POST http://a/ HTTP/1.1\r\ncontent-length: 65537\r\n\r\n",
                WireError::BodyTooLarge(65537),
            ),
        ];
        for (head, error) in refused {
            assert_eq!(request(head).unwrap_err(), error, "{head:?}");
        }
        for garbage in [
            "GET http://a/ HTTP/1.0\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nx-folded: a\r\n b\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nbad name: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nx: a\rb\r\n\r\n",
            "\x16\x03\x01garbage\r\n\r\n",
        ] {
            assert!(request(garbage).is_err(), "{garbage:?}");
        }
        let mut long = String::from("GET http://a/ HTTP/1.1\r\n");
        while long.len() <= MAX_HEAD {
            long.push_str(&format!("x-filler: {}\r\n", "a".repeat(400)));
        }
        assert_eq!(request(&long).unwrap_err(), WireError::HeadTooLarge);
    }

    fn response(head: &str, method: &Method) -> Result<Option<ResponseHead>, WireError> {
        parse_response(head.as_bytes(), method, Speaker::Sidecar)
    }

    #[test]
    fn a_response_is_framed_by_its_length_its_chunks_or_its_status() {
        let framing =
            |head: &str, method: &Method| response(head, method).unwrap().unwrap().framing;
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", &Method::GET),
            Framing::Length(3)
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
                &Method::GET
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n",
                &Method::HEAD
            ),
            Framing::Length(0),
            "a HEAD answer has no body whatever its length says"
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\n\r\n", &Method::GET),
            Framing::Length(0)
        );
        let refused = [
            ("HTTP/1.1 100 Continue\r\n\r\n", WireError::Interim),
            ("HTTP/1.1 200 OK\r\n\r\n", WireError::NoLength),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                WireError::BadTransferEncoding,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                WireError::BadTransferEncoding,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
                WireError::BadTransferEncoding,
            ),
        ];
        for (head, error) in refused {
            assert_eq!(response(head, &Method::GET).unwrap_err(), error, "{head:?}");
        }
    }

    #[test]
    fn an_apps_answer_is_read_as_http11_servers_give_it() {
        let app = |head: &str| parse_response(head.as_bytes(), &Method::GET, Speaker::App);
        let interim = app("HTTP/1.1 100 Continue\r\n\r\n").unwrap().unwrap();
        assert_eq!(interim.parts.status, 100, "returned for the reader to skip");
        let until_close = app("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(until_close.framing, Framing::UntilClose);
        assert!(!until_close.keep_alive);
        let old = app("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(old.framing, Framing::Length(2));
        assert!(!old.keep_alive, "an HTTP/1.0 answer ends its connection");
        let closing = app("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!closing.keep_alive);
        assert_eq!(
            app("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n").unwrap_err(),
            WireError::Interim,
            "a switch nobody asked for"
        );
        assert_eq!(
            app("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap_err(),
            WireError::BadTransferEncoding,
            "two framings is how answers are smuggled"
        );

        let mut out = BytesMut::new();
        let uri: Uri = "http://echo.demo:80/path?q=1".parse().unwrap();
        put_request_head(
            &mut out,
            &Method::GET,
            &uri,
            &HeaderMap::new(),
            &[],
            0,
            Speaker::App,
        );
        assert!(
            out.starts_with(b"GET /path?q=1 HTTP/1.1\r\nhost: echo.demo:80\r\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_response_head_says_its_framing_and_nothing_of_the_apps() {
        let mut answer = http::Response::new(());
        answer
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("99"));
        answer
            .headers_mut()
            .insert("connection", HeaderValue::from_static("keep-alive"));
        answer
            .headers_mut()
            .insert("x-app", HeaderValue::from_static("1"));
        let (parts, ()) = answer.into_parts();
        let mut out = BytesMut::new();
        put_response_head(&mut out, &parts, Some(Framing::Chunked), true);
        let head = parse_response(&out, &Method::GET, Speaker::Sidecar)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(!head.parts.headers.contains_key("content-length"));
        assert!(closes(&head.parts.headers));
        assert_eq!(head.parts.headers["x-app"], "1");

        let mut out = BytesMut::new();
        put_response_head(&mut out, &parts, None, false);
        let head = parse_response(&out, &Method::HEAD, Speaker::Sidecar)
            .unwrap()
            .unwrap();
        assert_eq!(
            head.parts.headers["content-length"], "99",
            "a HEAD answer keeps the app's length"
        );
        assert!(!closes(&head.parts.headers));
    }

    #[test]
    fn chunks_are_read_as_they_arrive_with_their_trailers() {
        let mut out = BytesMut::new();
        put_chunk(&mut out, b"hello ");
        put_chunk(&mut out, b"");
        put_chunk(&mut out, b"world");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("7"));
        put_last_chunk(&mut out, Some(&trailers));
        out.put_slice(b"NEXT");
        let whole = out.freeze();
        // Fed a byte at a time, as the slowest peer would send it.
        let mut buf = BytesMut::new();
        let mut dechunk = Dechunk::default();
        let mut body = Vec::new();
        let mut end = None;
        for byte in whole.iter() {
            buf.put_u8(*byte);
            loop {
                match dechunk.next(&mut buf).unwrap() {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::Short => break,
                    Decoded::End(fields) => {
                        end = Some(fields);
                        break;
                    }
                }
            }
            if end.is_some() {
                break;
            }
        }
        assert_eq!(body, b"hello world");
        assert_eq!(end.unwrap()["x-sum"], "7");
        assert!(buf.is_empty(), "nothing past the body is taken");

        let mut plain = BytesMut::from(&b"3;ext=1\r\nabc\r\n0\r\n\r\nNEXT"[..]);
        let mut dechunk = Dechunk::default();
        assert_eq!(
            dechunk.next(&mut plain).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(
            dechunk.next(&mut plain).unwrap(),
            Decoded::End(HeaderMap::new())
        );
        assert_eq!(&plain[..], b"NEXT");
    }

    #[test]
    fn chunks_that_do_not_parse_are_refused() {
        for bad in [
            &b"z\r\n"[..],
            b"-1\r\n",
            b"ffffffffffffffffff\r\n",
            b"3\r\nabcX\r\n",
            b"\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            let mut dechunk = Dechunk::default();
            let mut result = dechunk.next(&mut buf);
            while let Ok(Decoded::Data(_)) = result {
                result = dechunk.next(&mut buf);
            }
            assert_eq!(result, Err(WireError::BadChunk), "{bad:?}");
        }
        let mut endless = BytesMut::from(&[b'1'; MAX_CHUNK_LINE + 1][..]);
        assert_eq!(
            Dechunk::default().next(&mut endless),
            Err(WireError::BadChunk)
        );
    }
}
