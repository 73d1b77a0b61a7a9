//! Delta responses whose resources are encoded ahead of time.
//!
//! A control plane sends the same resource to every proxy. Encoding its
//! `Resource` wrapper (name, version, the body in an `Any`) once per change,
//! and handing each response the finished bytes, makes a proxy's sync a
//! copy rather than four allocations and an encoding per resource.
//! Protobuf encodes a repeated message field and a repeated bytes field the
//! same way (tag, length, bytes), so `EncodedDeltaResponse` is
//! `DeltaDiscoveryResponse` on the wire, and proxies decode it as that.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{
    DecodeContext, WireType, decode_varint, encode_key, encode_varint, encoded_len_varint, key_len,
    skip_field, string,
};

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse` whose resources are
/// already-encoded `Resource`s (see [`encode_resource`]), kept as the
/// response's field 2 in one buffer: building a response copies each
/// resource once, with no allocation or reference count per resource. The
/// fields weft does not send are left out (and skipped when decoding).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedDeltaResponse {
    pub system_version_info: String,
    pub type_url: String,
    pub nonce: String,
    pub removed_resources: Vec<String>,
    /// Field 2, each entry as on the wire: key, length, `Resource`.
    resources: BytesMut,
    count: usize,
    resource_bytes: usize,
}

impl EncodedDeltaResponse {
    /// An empty response of `type_url` at `system_version_info`.
    pub fn new(type_url: &str, system_version_info: String, nonce: String) -> Self {
        EncodedDeltaResponse {
            system_version_info,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        }
    }

    /// Makes room for `count` more resources of `bytes` in all, so that
    /// adding them does not grow the buffer step by step.
    pub fn reserve(&mut self, count: usize, bytes: usize) {
        // A key byte and a length of at most three bytes (under 2 MiB)
        // each; a longer one only makes the buffer grow once more.
        self.resources.reserve(bytes + count * 4);
    }

    /// Adds one encoded `Resource`.
    pub fn push_resource(&mut self, resource: &[u8]) {
        put_field(2, resource, &mut self.resources);
        self.count += 1;
        self.resource_bytes += resource.len();
    }

    /// How many resources it carries.
    pub fn resource_count(&self) -> usize {
        self.count
    }

    /// The resources' bytes, their framing in the response left out.
    pub fn resource_bytes(&self) -> usize {
        self.resource_bytes
    }

    /// Each encoded `Resource`, in order.
    pub fn resources(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.resources[..];
        std::iter::from_fn(move || {
            // Entries were framed by `push_resource`: one key byte (field 2
            // of a length-delimited type), a length, the resource.
            let mut cursor = rest.get(1..)?;
            let len = usize::try_from(decode_varint(&mut cursor).ok()?).ok()?;
            let resource = cursor.get(..len)?;
            rest = &cursor[len..];
            Some(resource)
        })
    }
}

impl prost::Message for EncodedDeltaResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.system_version_info.is_empty() {
            string::encode(1, &self.system_version_info, buf);
        }
        buf.put_slice(&self.resources);
        if !self.type_url.is_empty() {
            string::encode(4, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            string::encode(5, &self.nonce, buf);
        }
        string::encode_repeated(6, &self.removed_resources, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            1 => string::merge(wire_type, &mut self.system_version_info, buf, ctx),
            2 => {
                let mut resource = Bytes::new();
                prost::encoding::bytes::merge(wire_type, &mut resource, buf, ctx)?;
                self.push_resource(&resource);
                Ok(())
            }
            4 => string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => string::merge(wire_type, &mut self.nonce, buf, ctx),
            6 => string::merge_repeated(wire_type, &mut self.removed_resources, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let text = |tag, value: &String| {
            if value.is_empty() {
                0
            } else {
                string::encoded_len(tag, value)
            }
        };
        text(1, &self.system_version_info)
            + self.resources.len()
            + text(4, &self.type_url)
            + text(5, &self.nonce)
            + string::encoded_len_repeated(6, &self.removed_resources)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_field(tag: u32, value: &[u8], buf: &mut BytesMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

/// A `Resource` named `name` at `version`, its body in an `Any` of
/// `type_url`, encoded. The body is written last, so it is the final
/// `body.len()` bytes of the result and can be shared from it.
pub fn encode_resource(name: &str, version: &str, type_url: &str, body: &[u8]) -> Bytes {
    let any_len = field_len(1, type_url.len()) + field_len(2, body.len());
    let len = field_len(3, name.len()) + field_len(1, version.len()) + field_len(2, any_len);
    let mut buf = BytesMut::with_capacity(len);
    // Fields in any order are one message to every decoder; this one puts
    // the body at the end.
    put_field(3, name.as_bytes(), &mut buf);
    put_field(1, version.as_bytes(), &mut buf);
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(any_len as u64, &mut buf);
    put_field(1, type_url.as_bytes(), &mut buf);
    put_field(2, body, &mut buf);
    buf.freeze()
}

/// The ADS server with delta responses of [`EncodedDeltaResponse`]; the
/// typed client in `discovery` talks to it.
pub mod ads {
    include!(concat!(
        env!("OUT_DIR"),
        "/envoy.service.discovery.v3.AggregatedDiscoveryService.rs"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{DeltaDiscoveryResponse, Resource};
    use prost::Message;

    #[test]
    fn an_encoded_resource_decodes_as_the_resource_with_its_body_last() {
        let body = b"\x0a\x03abc\x12\x00 a workload's bytes".repeat(20);
        let encoded = encode_resource("c1/ns/pod-1", "00ff", crate::type_url::WORKLOAD, &body);
        let resource = Resource::decode(encoded.clone()).expect("decodes");
        assert_eq!(resource.name, "c1/ns/pod-1");
        assert_eq!(resource.version, "00ff");
        let any = resource.resource.expect("has a body");
        assert_eq!(any.type_url, crate::type_url::WORKLOAD);
        assert_eq!(any.value, body);
        assert_eq!(&encoded[encoded.len() - body.len()..], &body[..]);
        // An empty body is still a present `Any`, not a missing one.
        let empty = Resource::decode(encode_resource("n", "v", "t", b"")).expect("decodes");
        assert_eq!(empty.resource.map(|a| a.value), Some(Vec::new()));
    }

    /// What Envoy's message adds that weft does not send is skipped, and a
    /// length past the end is an error, not a panic.
    #[test]
    fn an_encoded_response_skips_unknown_fields_and_refuses_a_short_buffer() {
        let full = DeltaDiscoveryResponse {
            nonce: "9".into(),
            resource_errors: vec![Default::default()],
            control_plane: Some(Default::default()),
            ..Default::default()
        };
        let decoded = EncodedDeltaResponse::decode(full.encode_to_vec().as_slice()).unwrap();
        assert_eq!((decoded.nonce.as_str(), decoded.resource_count()), ("9", 0));
        // Field 2 claiming 100 bytes with 3 present.
        assert!(EncodedDeltaResponse::decode(&b"\x12\x64abc"[..]).is_err());
    }

    #[test]
    fn an_encoded_response_is_a_delta_response_on_the_wire() {
        let resources = [("a", &b"one"[..]), ("b", &b""[..])];
        let mut response = EncodedDeltaResponse {
            system_version_info: "7".into(),
            type_url: "t/x".into(),
            nonce: "3".into(),
            removed_resources: vec!["gone".into()],
            ..Default::default()
        };
        let encoded: Vec<Bytes> = resources
            .iter()
            .map(|(name, body)| encode_resource(name, "v1", "t/x", body))
            .collect();
        for resource in &encoded {
            response.push_resource(resource);
        }
        assert_eq!(response.resource_count(), 2);
        let wire = response.encode_to_vec();
        assert_eq!(wire.len(), response.encoded_len());
        // Decoded again as itself, it is the same response, resources and all.
        let again = EncodedDeltaResponse::decode(wire.as_slice()).expect("decodes as itself");
        assert_eq!(again, response);
        assert!(again.resources().eq(encoded.iter().map(|r| &r[..])));
        let decoded =
            DeltaDiscoveryResponse::decode(wire.as_slice()).expect("decodes as Envoy's message");
        assert_eq!(decoded.system_version_info, "7");
        assert_eq!(decoded.type_url, "t/x");
        assert_eq!(decoded.nonce, "3");
        assert_eq!(decoded.removed_resources, vec!["gone".to_string()]);
        let got: Vec<(String, Vec<u8>)> = decoded
            .resources
            .into_iter()
            .map(|r| (r.name, r.resource.map(|a| a.value).unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            vec![("a".into(), b"one".to_vec()), ("b".into(), Vec::new())]
        );
    }
}
