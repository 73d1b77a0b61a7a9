//! Who is calling: the admin token from the kubeconfig the server writes, or
//! a ServiceAccount token that this server issued (TokenRequest, or a legacy
//! `kubernetes.io/service-account-token` Secret).
//!
//! ServiceAccount tokens are JWTs signed with HMAC-SHA256 under a key only
//! this server holds. The real API server signs with RS256 and publishes a
//! JWKS; nothing in weft verifies tokens offline (the control plane asks the
//! API server through TokenReview, as Istio does), so a symmetric key is
//! enough here and keeps the lab free of key management.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// The audience of tokens meant for the API server itself.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum User {
    Admin,
    ServiceAccount { namespace: String, name: String },
}

impl User {
    pub fn username(&self) -> String {
        match self {
            User::Admin => "weft-lab-admin".into(),
            User::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    pub iat: u64,
    pub nbf: u64,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ServiceAccountRef,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub name: String,
    pub uid: String,
}

pub struct Authenticator {
    admin_token: String,
    key: hmac::Key,
}

impl Authenticator {
    pub fn new(admin_token: String, signing_secret: &[u8]) -> Self {
        Authenticator {
            admin_token,
            key: hmac::Key::new(hmac::HMAC_SHA256, signing_secret),
        }
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Signs a token for a service account. `ttl` None makes a token that
    /// never expires (legacy Secret tokens).
    pub fn issue(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        audiences: Vec<String>,
        ttl: Option<Duration>,
    ) -> (String, Option<SystemTime>) {
        let now = SystemTime::now();
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let expiry = ttl.map(|ttl| now + ttl);
        let claims = Claims {
            iss: ISSUER.into(),
            sub: format!("system:serviceaccount:{namespace}:{name}"),
            aud: audiences,
            exp: expiry.map(secs),
            iat: secs(now),
            nbf: secs(now),
            kubernetes: KubernetesClaims {
                namespace: namespace.into(),
                serviceaccount: ServiceAccountRef {
                    name: name.into(),
                    uid: uid.into(),
                },
            },
        };
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        // Claims are plain strings and numbers; serialising cannot fail.
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signing_input = format!("{header}.{body}");
        let signature = hmac::sign(&self.key, signing_input.as_bytes());
        (
            format!(
                "{signing_input}.{}",
                URL_SAFE_NO_PAD.encode(signature.as_ref())
            ),
            expiry,
        )
    }

    /// Checks a ServiceAccount token's signature, time window and audience.
    /// `audiences` empty means "the API server's own audience". The caller
    /// still checks that the service account exists with the token's uid.
    pub fn verify(&self, token: &str, audiences: &[String]) -> Result<Claims, String> {
        let mut parts = token.split('.');
        let (Some(header), Some(body), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "malformed signature")?;
        hmac::verify(&self.key, format!("{header}.{body}").as_bytes(), &signature)
            .map_err(|_| "invalid signature")?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("malformed claims")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if claims.exp.is_some_and(|exp| now >= exp) {
            return Err("token has expired".into());
        }
        if now + 60 < claims.nbf {
            return Err("token is not valid yet".into());
        }
        let wanted: Vec<&str> = if audiences.is_empty() {
            vec![API_AUDIENCE]
        } else {
            audiences.iter().map(String::as_str).collect()
        };
        if !claims.aud.iter().any(|a| wanted.contains(&a.as_str())) {
            return Err(format!(
                "token audiences {:?} do not include any of {:?}",
                claims.aud, wanted
            ));
        }
        Ok(claims)
    }

    /// The caller of a request, from its bearer token. Service accounts are
    /// resolved by `lookup_uid`, so a token outlives its account only until
    /// the account is deleted.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        lookup_uid: impl Fn(&str, &str) -> Option<String>,
    ) -> Option<User> {
        let token = bearer?;
        if constant_time_eq(token.as_bytes(), self.admin_token.as_bytes()) {
            return Some(User::Admin);
        }
        let claims = self.verify(token, &[]).ok()?;
        let ns = &claims.kubernetes.namespace;
        let name = &claims.kubernetes.serviceaccount.name;
        (lookup_uid(ns, name)? == claims.kubernetes.serviceaccount.uid).then(|| {
            User::ServiceAccount {
                namespace: ns.clone(),
                name: name.clone(),
            }
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new("admin-secret".into(), b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn issued_tokens_verify_for_their_audience_only() {
        let a = auth();
        let (token, expiry) = a.issue(
            "weft-system",
            "weft-control",
            "uid-1",
            vec!["weft".into()],
            Some(Duration::from_secs(600)),
        );
        assert!(expiry.is_some());
        let claims = a.verify(&token, &["weft".into()]).unwrap();
        assert_eq!(claims.sub, "system:serviceaccount:weft-system:weft-control");
        assert!(a.verify(&token, &["other".into()]).is_err());
        assert!(a.verify(&token, &[]).is_err(), "not an API token");
    }

    #[test]
    fn tampered_expired_and_foreign_tokens_fail() {
        let a = auth();
        let (token, _) = a.issue(
            "ns",
            "sa",
            "u",
            vec![API_AUDIENCE.into()],
            Some(Duration::from_secs(600)),
        );
        let mut tampered = token.clone();
        tampered.push('x');
        assert!(a.verify(&tampered, &[]).is_err());
        let other = Authenticator::new("x".into(), b"another key entirely, 32 bytes!!");
        assert!(other.verify(&token, &[]).is_err());
        let (expired, _) = a.issue(
            "ns",
            "sa",
            "u",
            vec![API_AUDIENCE.into()],
            Some(Duration::ZERO),
        );
        assert_eq!(a.verify(&expired, &[]).unwrap_err(), "token has expired");
        assert!(a.verify("garbage", &[]).is_err());
        assert!(a.verify("a.b.c", &[]).is_err());
    }

    #[test]
    fn authenticate_checks_the_account_still_exists() {
        let a = auth();
        assert_eq!(
            a.authenticate(Some("admin-secret"), |_, _| None),
            Some(User::Admin)
        );
        assert_eq!(a.authenticate(Some("admin-secreT"), |_, _| None), None);
        assert_eq!(a.authenticate(None, |_, _| None), None);
        let (token, _) = a.issue("ns", "sa", "u1", vec![API_AUDIENCE.into()], None);
        let user = a.authenticate(Some(&token), |_, _| Some("u1".into()));
        assert_eq!(user.unwrap().username(), "system:serviceaccount:ns:sa");
        assert_eq!(
            a.authenticate(Some(&token), |_, _| None),
            None,
            "deleted account"
        );
        assert_eq!(
            a.authenticate(Some(&token), |_, _| Some("u2".into())),
            None,
            "recreated account"
        );
    }
}
