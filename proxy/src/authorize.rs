//! Who calls this pod, and whether they may: the caller as the inbound
//! side knows it (what its certificate proved, where it connects from),
//! the check of a connection or request against this pod's compiled
//! policy, and the answer a denied request gets, as Envoy gives it
//! (`403 RBAC: access denied`, or gRPC PERMISSION_DENIED). Every decision
//! made under a policy is counted; AUDIT and dry-run matches are logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use weft_certs::Identity;

use crate::authorization::{Action, Attributes, Decision, HttpAttributes, InboundPolicy};
use crate::http::{Body, full};
use crate::metrics::{AuthorizationLabels, Metrics, Peer, TrafficLabels};
use crate::name::Name;

/// The body Envoy's RBAC filter answers with; clients and tests look for it.
pub const DENIED: &str = "RBAC: access denied";

/// A caller of this pod. Made once per connection and cloned for each
/// of its requests: shared, so that a clone allocates nothing.
#[derive(Clone, Debug)]
pub struct Caller {
    identity: Option<Arc<Identity>>,
    /// `identity` as Istio writes principals (`td/ns/<ns>/sa/<sa>`), made
    /// once per connection.
    principal: Option<Arc<str>>,
    /// The caller as metrics name it, also made once per connection, so
    /// that counting a request allocates nothing.
    peer: Peer,
    /// `identity` as the app is told it (`x-weft-peer-identity`), made
    /// once per connection rather than formatted for each request.
    identity_header: Option<http::HeaderValue>,
    pub address: IpAddr,
}

impl Caller {
    pub fn new(identity: Option<Identity>, address: IpAddr) -> Self {
        let principal = identity.as_ref().map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
            .into()
        });
        let identity_header = identity
            .as_ref()
            .and_then(|id| http::HeaderValue::try_from(id.to_string()).ok());
        Caller {
            peer: Peer::caller(identity.as_ref()),
            identity_header,
            identity: identity.map(Arc::new),
            principal,
            address,
        }
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// A caller without a proven identity (plaintext, tools).
    pub fn unproven(address: IpAddr) -> Self {
        Caller::new(None, address)
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_deref()
    }

    pub fn identity_header(&self) -> Option<&http::HeaderValue> {
        self.identity_header.as_ref()
    }

    pub fn attributes<'a>(&'a self, port: u16, http: Option<HttpAttributes<'a>>) -> Attributes<'a> {
        Attributes {
            principal: self.principal.as_deref(),
            namespace: self.identity.as_ref().map(|id| id.namespace.as_str()),
            source: self.address,
            port,
            http,
        }
    }
}

/// Checks a connection or request to `target` against `policy`, and
/// counts and logs what it decided.
pub fn check(
    policy: &InboundPolicy,
    request: &Attributes,
    target: SocketAddr,
    metrics: &Metrics,
    labels: &TrafficLabels,
) -> Decision {
    let decision = policy.check(request);
    let what = if request.http.is_some() {
        "request"
    } else {
        "connection"
    };
    for report in policy.reports(request) {
        let outcome = match (report.policy.dry_run, report.policy.action) {
            (false, _) => "audited",
            (true, Action::Deny) => "dry_run_denied",
            (true, _) => "dry_run_matched",
        };
        tracing::info!(policy = %report.policy.name, rule = report.rule, outcome, caller = ?request.principal, source = %request.source, %target, "authorization: {what} matched an audit or dry-run policy");
        count(metrics, labels, report.policy.name.clone(), outcome);
    }
    let outcome = if decision.allowed() {
        "allowed"
    } else {
        tracing::debug!(?decision, caller = ?request.principal, source = %request.source, %target, "authorization: {what} denied");
        "denied"
    };
    count(metrics, labels, decision.policy(), outcome);
    decision
}

fn count(metrics: &Metrics, labels: &TrafficLabels, policy: Name, decision: &'static str) {
    metrics
        .authorization
        .get_or_create(&AuthorizationLabels {
            traffic: labels.clone(),
            policy,
            decision,
        })
        .inc();
}

/// The answer to a denied request: gRPC callers get PERMISSION_DENIED in
/// a trailers-only response, others a 403.
pub fn denied<B>(request: &Request<B>) -> Response<Body> {
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut response = if grpc {
        let mut response = Response::new(full(""));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("7"));
        headers.insert("grpc-message", HeaderValue::from_static(DENIED));
        response
    } else {
        let mut response = Response::new(full(DENIED));
        *response.status_mut() = StatusCode::FORBIDDEN;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    response.headers_mut().insert(
        "x-weft-error",
        HeaderValue::from_static("denied by authorization policy"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_named_as_istio_writes_principals() {
        let id = Identity::new("cluster.local", "demo", "client").unwrap();
        let caller = Caller::new(Some(id), "10.0.0.1".parse().unwrap());
        let attributes = caller.attributes(8080, None);
        assert_eq!(
            attributes.principal,
            Some("cluster.local/ns/demo/sa/client")
        );
        assert_eq!(attributes.namespace, Some("demo"));
        let plain = Caller::unproven("10.0.0.2".parse().unwrap());
        assert_eq!(plain.attributes(80, None).principal, None);
    }

    /// Each request of a connection clones its caller: the clone shares
    /// the identity and principal instead of copying their strings.
    #[test]
    fn a_callers_clone_shares_what_it_names() {
        let id = Identity::new("cluster.local", "demo", "client").unwrap();
        let caller = Caller::new(Some(id), "10.0.0.1".parse().unwrap());
        let clone = caller.clone();
        let (a, b) = (caller.identity().unwrap(), clone.identity().unwrap());
        assert!(std::ptr::eq(a.namespace.as_ptr(), b.namespace.as_ptr()));
        let principal = |c: &Caller| c.attributes(80, None).principal.unwrap().as_ptr();
        assert!(std::ptr::eq(principal(&caller), principal(&clone)));
    }

    #[test]
    fn denials_answer_as_envoy_does() {
        let plain = Request::builder().body(()).unwrap();
        let response = denied(&plain);
        assert_eq!(response.status(), 403);
        let grpc = Request::builder()
            .header(CONTENT_TYPE, "application/grpc+proto")
            .body(())
            .unwrap();
        let response = denied(&grpc);
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["grpc-status"], "7");
        assert_eq!(response.headers()["grpc-message"], DENIED);
    }
}
