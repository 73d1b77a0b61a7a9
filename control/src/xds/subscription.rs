//! What one stream owes a proxy for one resource type, as plain state with
//! pure methods: a subscription (fresh, or a reconnect that says which
//! versions it has), the next response, and the proxy's ACK or NACK.
//!
//! Changes are walked straight off the table's version log with a cursor,
//! so a proxy catching up on the whole mesh costs a position, not a list of
//! names. Only the difference computed for a reconnecting proxy is a list,
//! and it is released once sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Bound;

use bytes::Bytes;
use tonic::Status;
use weft_xds_proto::encoded::EncodedDeltaResponse;

use super::CHUNK;
use crate::model::{Entry, Table};

pub struct Subscription {
    pub type_url: &'static str,
    /// Every change up to this model version is sent, or is in the pass
    /// under way.
    frontier: u64,
    /// The pass under way: where it continues in the log, and the version
    /// it goes up to. Later changes are the next pass's.
    cursor: Option<(Bound<(u64, String)>, u64)>,
    /// Names to send (current body) or to remove, before the cursor's pass.
    pending: VecDeque<String>,
    /// The nonce of the response the proxy has not answered yet, and the
    /// model version it brings the proxy to.
    in_flight: Option<(String, u64)>,
    /// The model version of the last response the proxy acknowledged
    /// (for `weftctl proxy-status`).
    acked: u64,
    /// The model version of the last response sent, and when.
    sent: u64,
    pushed_at: Option<std::time::Instant>,
    /// A response has been sent on this subscription.
    answered_once: bool,
}

/// Whether services wait this pass: a workload response is unanswered.
/// Within a pass workloads go first (the proxy's order), so a service
/// and the endpoints of the same change reach the proxy in that order,
/// and a service never waits more than one answer.
pub fn services_wait(subscriptions: &[&Subscription]) -> bool {
    subscriptions
        .iter()
        .any(|s| s.type_url == weft_xds_proto::type_url::WORKLOAD && s.awaiting_answer())
}

impl Subscription {
    /// A subscription at model `version`. `known` is what the proxy says it
    /// has (name → version): empty for a fresh proxy, which is sent the
    /// whole log; otherwise it is sent what differs, and removals of what
    /// it has that is gone.
    pub fn new(
        type_url: &'static str,
        version: u64,
        table: &Table,
        known: &HashMap<String, String>,
    ) -> Self {
        let mut subscription = Subscription {
            type_url,
            frontier: version,
            cursor: None,
            pending: VecDeque::new(),
            in_flight: None,
            acked: 0,
            sent: 0,
            pushed_at: None,
            // A proxy that names what it holds has had its first answer.
            answered_once: !known.is_empty(),
        };
        if known.is_empty() {
            subscription.cursor = Some((Bound::Included((0, String::new())), version));
            return subscription;
        }
        let mut differing: Vec<&String> = table
            .live()
            .filter(|(name, entry)| {
                entry.body.is_some() && Some(&entry.body_version) != known.get(*name)
            })
            .map(|(name, _)| name)
            .collect();
        differing.sort();
        let mut seen = HashSet::new();
        let gone = known
            .keys()
            .filter(|name| table.get(name).is_none_or(|e| e.body.is_none()));
        for name in differing.into_iter().chain(gone) {
            if seen.insert(name) {
                subscription.pending.push_back(name.clone());
            }
        }
        subscription
    }

    /// A resubscription replaces this one but keeps its unanswered
    /// response: the proxy's answer to it is still to come.
    pub fn replace(&mut self, mut next: Subscription) {
        next.in_flight = self.in_flight.take();
        (next.sent, next.acked, next.pushed_at) = (self.sent, self.acked, self.pushed_at);
        *self = next;
    }

    /// The proxy answered `nonce` (`accepted`: an ACK, else a NACK); true
    /// if it was the response in flight, which frees the way for the next.
    pub fn answered(&mut self, nonce: &str, accepted: bool) -> bool {
        match self.in_flight.take() {
            Some((sent, version)) if sent == nonce => {
                if accepted {
                    self.acked = version;
                }
                true
            }
            other => {
                self.in_flight = other;
                false
            }
        }
    }

    /// The model version the proxy holds everything of this type up to,
    /// when nothing is in flight or still owed; `None` while a response
    /// is unanswered or a pass is under way.
    pub fn settled(&self) -> Option<u64> {
        (self.in_flight.is_none() && self.pending.is_empty() && self.cursor.is_none())
            .then_some(self.frontier)
    }

    /// Whether a response is sent and not answered yet.
    pub fn awaiting_answer(&self) -> bool {
        self.in_flight.is_some()
    }

    /// When the last response was sent.
    pub fn last_push(&self) -> Option<std::time::Instant> {
        self.pushed_at
    }

    /// The model versions of the last response sent and of the last one
    /// acknowledged.
    pub fn sent_and_acked(&self) -> (u64, u64) {
        (self.sent, self.acked)
    }

    /// The next response for the table at model `version`, numbered
    /// `nonce`, of at most `CHUNK` resources and removals; `None` when
    /// nothing is owed. A proxy whose frontier fell below the table's
    /// floor (removals forgotten) must resync.
    pub fn next_response(
        &mut self,
        version: u64,
        table: &Table,
        nonce: u64,
    ) -> Result<Option<EncodedDeltaResponse>, Status> {
        if self.in_flight.is_some() {
            return Ok(None);
        }
        if self.pending.is_empty() && self.cursor.is_none() && version > self.frontier {
            if self.frontier < table.floor() {
                return Err(Status::aborted(
                    "this proxy fell behind the removals the server remembers; reconnect to resync",
                ));
            }
            self.cursor = Some((Bound::Included((self.frontier + 1, String::new())), version));
            self.frontier = version;
        }
        if self.pending.is_empty() && self.cursor.is_none() && self.answered_once {
            return Ok(None);
        }
        let mut response =
            EncodedDeltaResponse::new(self.type_url, version.to_string(), nonce.to_string());
        while size(&response) < CHUNK {
            let Some(name) = self.pending.pop_front() else {
                break;
            };
            self.add(&name, table.get(&name), &mut response);
        }
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
        if let Some((start, upto)) = self.cursor.take() {
            self.cursor = self.walk(table, start, upto, &mut response);
        }
        // The first response goes out even when empty: it tells the proxy
        // that it has everything of this type, which for security policy
        // is "there is none", not "not yet known".
        if size(&response) == 0 && self.answered_once {
            return Ok(None);
        }
        self.answered_once = true;
        self.in_flight = Some((response.nonce.clone(), version));
        self.sent = version;
        self.pushed_at = Some(std::time::Instant::now());
        Ok(Some(response))
    }

    /// Adds the log's changes from `start` up to version `upto` while the
    /// response has room; returns where the pass continues, if it does.
    fn walk(
        &self,
        table: &Table,
        start: Bound<(u64, String)>,
        upto: u64,
        response: &mut EncodedDeltaResponse,
    ) -> Option<(Bound<(u64, String)>, u64)> {
        let room = CHUNK.saturating_sub(size(response));
        // The entries this response takes, gathered first so that its
        // buffer is sized once rather than grown (and copied) as it fills.
        let mut batch = Vec::with_capacity(room);
        let mut complete = true;
        for (version, name, resource) in table.log_from(start.clone()) {
            if version > upto {
                break;
            }
            if batch.len() == room {
                complete = false;
                break;
            }
            batch.push((version, name, resource));
        }
        let resources = batch.iter().filter_map(|(_, _, r)| r.map(Bytes::len));
        response.reserve(resources.clone().count(), resources.sum());
        for (_, name, resource) in &batch {
            match resource {
                Some(resource) => response.push_resource(resource),
                None => response.removed_resources.push((*name).clone()),
            }
        }
        if complete {
            return None;
        }
        // Named once the pass stops rather than after each entry.
        Some(match batch.last() {
            Some((version, name, _)) => (Bound::Excluded((*version, (*name).clone())), upto),
            None => (start, upto),
        })
    }

    /// Adds `name` as the table has it now. Resources were encoded when
    /// they changed; each response copies the bytes.
    fn add(&self, name: &str, entry: Option<&Entry>, response: &mut EncodedDeltaResponse) {
        match entry.filter(|e| e.body.is_some()) {
            Some(entry) => response.push_resource(&entry.resource),
            // Removed, or compacted away meanwhile: gone either way.
            None => response.removed_resources.push(name.to_string()),
        }
    }
}

fn size(response: &EncodedDeltaResponse) -> usize {
    response.resource_count() + response.removed_resources.len()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use weft_xds_proto::prost::Message;
    use weft_xds_proto::type_url::WORKLOAD;

    use super::*;
    use crate::model::resource_version;

    fn table(entries: &[(&str, Option<&'static [u8]>, u64)]) -> Table {
        let mut table = Table::new(WORKLOAD);
        for (name, body, version) in entries {
            table.upsert(name, body.map(Bytes::from_static), *version);
        }
        table
    }

    /// What a proxy reads: the names sent and the names removed.
    fn names(response: &EncodedDeltaResponse) -> (Vec<String>, Vec<&str>) {
        use weft_xds_proto::discovery::Resource;
        (
            response
                .resources()
                .map(|r| Resource::decode(r).expect("a resource").name)
                .collect(),
            response
                .removed_resources
                .iter()
                .map(String::as_str)
                .collect(),
        )
    }

    #[test]
    fn a_fresh_proxy_gets_everything_then_only_what_changed_after_each_ack() {
        let mut t = table(&[("a", Some(b"1"), 1), ("b", Some(b"2"), 2)]);
        let mut s = Subscription::new(WORKLOAD, 2, &t, &HashMap::new());
        let first = s.next_response(2, &t, 1).unwrap().unwrap();
        assert_eq!(names(&first).0, ["a", "b"]);
        assert!(names(&first).1.is_empty());
        // Each resource as a proxy decodes it: its version and its body in
        // an `Any` of the table's type.
        let a =
            weft_xds_proto::discovery::Resource::decode(first.resources().next().unwrap()).unwrap();
        assert_eq!(a.version, resource_version(b"1"));
        let any = a.resource.unwrap();
        assert_eq!(
            (any.type_url.as_str(), any.value.as_slice()),
            (WORKLOAD, &b"1"[..])
        );
        assert_eq!(t.get("a").unwrap().body.as_deref(), Some(&b"1"[..]));
        assert!(
            s.next_response(2, &t, 2).unwrap().is_none(),
            "one in flight"
        );
        assert!(!s.answered("7", true), "another nonce frees nothing");
        assert!(s.answered("1", true));
        assert!(s.next_response(2, &t, 2).unwrap().is_none(), "nothing owed");
        t.upsert("a", None, 3);
        t.upsert("c", Some(Bytes::from_static(b"3")), 3);
        let next = s.next_response(3, &t, 2).unwrap().unwrap();
        assert_eq!(names(&next).0, ["c"]);
        assert_eq!(names(&next).1, ["a"]);
        assert_eq!(next.system_version_info, "3");
    }

    #[test]
    fn a_reconnecting_proxy_gets_what_differs_and_removals_of_what_is_gone() {
        let t = table(&[("a", Some(b"1"), 1), ("b", Some(b"2"), 1), ("c", None, 1)]);
        let known: HashMap<String, String> = [
            ("a".to_string(), resource_version(b"1")),
            ("b".to_string(), "stale".to_string()),
            ("c".to_string(), "old".to_string()),
            ("x".to_string(), "old".to_string()),
        ]
        .into();
        let mut s = Subscription::new(WORKLOAD, 1, &t, &known);
        let response = s.next_response(1, &t, 1).unwrap().unwrap();
        let (mut removed, sent) = (names(&response).1, names(&response).0);
        removed.sort();
        assert_eq!(sent, ["b"]);
        assert_eq!(removed, ["c", "x"]);
    }

    #[test]
    fn a_large_mesh_goes_in_chunks_and_a_resubscription_keeps_the_unanswered() {
        let mut t = Table::new(WORKLOAD);
        for i in 0..(CHUNK + 5) {
            t.upsert(&format!("w{i:04}"), Some(Bytes::from_static(b"x")), 1);
        }
        let mut s = Subscription::new(WORKLOAD, 1, &t, &HashMap::new());
        let first = s.next_response(1, &t, 1).unwrap().unwrap();
        assert_eq!(size(&first), CHUNK);
        s.replace(Subscription::new(WORKLOAD, 1, &t, &HashMap::new()));
        assert!(s.in_flight.is_some(), "the answer to nonce 1 is still due");
        assert!(s.answered("1", true));
        let second = s.next_response(1, &t, 2).unwrap().unwrap();
        assert_eq!(size(&second), CHUNK, "the new subscription starts over");
    }

    /// While a workload response is unanswered, services wait: a new
    /// service's name never reaches a proxy before its endpoints.
    #[test]
    fn services_wait_while_workloads_are_unanswered() {
        let t = table(&[("w", Some(b"x"), 1)]);
        let mut workloads = Subscription::new(WORKLOAD, 1, &t, &HashMap::new());
        let services = Subscription::new(weft_xds_proto::type_url::SERVICE, 1, &t, &HashMap::new());
        assert!(!services_wait(&[&workloads, &services]));
        workloads.next_response(1, &t, 1).unwrap().unwrap();
        assert!(services_wait(&[&workloads, &services]));
        assert!(workloads.answered("1", true));
        assert!(!services_wait(&[&workloads, &services]));
        // A proxy that takes no workloads holds nothing back.
        assert!(!services_wait(&[&services]));
    }

    #[test]
    fn a_proxy_behind_the_forgotten_removals_must_resync() {
        let mut t = Table::new(WORKLOAD);
        // Enough removals that the oldest are compacted and the floor rises.
        for i in 0..100_010u64 {
            let name = format!("w{i}");
            t.upsert(&name, Some(Bytes::from_static(b"x")), 1);
            t.upsert(&name, None, 2 + i);
        }
        let up_to_date = table(&[("a", Some(b"1"), 1)]);
        let known = [("a".to_string(), resource_version(b"1"))].into();
        let mut s = Subscription::new(WORKLOAD, 1, &up_to_date, &known);
        assert!(s.next_response(1, &up_to_date, 1).unwrap().is_none());
        let err = s.next_response(200_000, &t, 1).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
    }
}
