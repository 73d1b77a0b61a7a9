//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

use crate::error::CertError;

/// The identity of a workload, as carried in its certificate's URI SAN and in
/// `weft.mesh.v1.Identity`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

const SCHEME: &str = "spiffe://";

impl Identity {
    /// Builds an identity, checking each part the way the SPIFFE spec and
    /// Kubernetes name rules require.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, CertError> {
        let identity = Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        let uri = identity.to_string();
        if !valid_trust_domain(&identity.trust_domain)
            || !valid_segment(&identity.namespace)
            || !valid_segment(&identity.service_account)
        {
            return Err(CertError::NotSpiffe(uri));
        }
        Ok(identity)
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let not_spiffe = || CertError::NotSpiffe(s.to_string());
        let rest = s.strip_prefix(SCHEME).ok_or_else(not_spiffe)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(not_spiffe());
        };
        Identity::new(td, ns, sa).map_err(|_| not_spiffe())
    }
}

/// SPIFFE trust domains: lowercase letters, digits, '.', '-', '_'.
fn valid_trust_domain(td: &str) -> bool {
    lowercase_name(td, 255, b"-._")
}

/// Non-empty, at most `max` bytes, and only lowercase letters, digits and
/// the bytes in `also`.
fn lowercase_name(text: &str, max: usize, also: &[u8]) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || also.contains(&b))
}

/// Kubernetes namespace and service account names, which are also valid
/// SPIFFE path segments: DNS-1123 subdomain characters.
fn valid_segment(segment: &str) -> bool {
    lowercase_name(segment, 253, b"-.")
        && !segment.starts_with(['-', '.'])
        && !segment.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_a_spiffe_id() {
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/echo".parse().unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "demo");
        assert_eq!(id.service_account, "echo");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/echo");
    }

    #[test]
    fn refuses_what_is_not_a_workload_spiffe_id() {
        for bad in [
            "",
            "https://cluster.local/ns/demo/sa/echo",
            "spiffe://cluster.local/ns/demo",
            "spiffe://cluster.local/ns/demo/sa/echo/extra",
            "spiffe://cluster.local/sa/echo/ns/demo",
            "spiffe:///ns/demo/sa/echo",
            "spiffe://Cluster.Local/ns/demo/sa/echo",
            "spiffe://cluster.local/ns//sa/echo",
            "spiffe://cluster.local/ns/de mo/sa/echo",
            "spiffe://cluster.local/ns/-demo/sa/echo",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "accepted {bad:?}");
        }
    }
}
