//! DNS for lab pods: the resolver their sidecars forward names outside
//! the mesh to (in a real cluster, the cluster's DNS), and a way to ask a
//! pod's sidecar for a name as the pod's applications would.
//!
//! The lab's resolver knows one zone, `example.lab`: every name in it is
//! `192.0.2.1` (TEST-NET-1, never routed); any other name does not exist.
//! It runs in the lab's router namespace, where the pods' sidecars reach
//! it; nothing in the lab resolves names on the machine's own resolver.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use simple_dns::rdata::{A, RData};
use simple_dns::{
    CLASS, Name, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, ResourceRecord, TYPE,
};
use tokio::net::UdpSocket;

/// The lab resolver's zone and the address of every name in it.
pub const ZONE: &str = "example.lab";
pub const ZONE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The lab resolver's answer to `query`, if it is one.
pub fn upstream_answer(query: &[u8]) -> Option<Vec<u8>> {
    let packet = Packet::parse(query).ok()?;
    let question = packet.questions.first()?.clone();
    let name = question
        .qname
        .to_string()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut reply = Packet::new_reply(packet.id());
    let in_zone = name == ZONE || name.ends_with(&format!(".{ZONE}"));
    if !in_zone {
        *reply.rcode_mut() = RCODE::NameError;
    } else if question.qtype == QTYPE::TYPE(TYPE::A) {
        reply.answers.push(ResourceRecord::new(
            question.qname.clone(),
            CLASS::IN,
            60,
            RData::A(A {
                address: u32::from(ZONE_ADDRESS),
            }),
        ));
    }
    reply.questions.push(question);
    reply.build_bytes_vec_compressed().ok()
}

/// Serves the lab resolver on `socket` until the task is dropped.
pub async fn serve_upstream(socket: UdpSocket) {
    let mut buffer = [0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        if let Some(reply) = upstream_answer(&buffer[..n]) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// An A query for `name`.
pub fn query(name: &str, id: u16) -> Result<Vec<u8>, String> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new(name).map_err(|e| e.to_string())?,
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    packet.build_bytes_vec().map_err(|e| e.to_string())
}

/// The addresses of an answer, or its error code.
pub fn addresses(answer: &[u8]) -> Result<Vec<Ipv4Addr>, String> {
    let packet = Packet::parse(answer).map_err(|e| e.to_string())?;
    if packet.rcode() != RCODE::NoError {
        return Err(format!("{:?}", packet.rcode()));
    }
    Ok(packet
        .answers
        .iter()
        .filter_map(|r| match &r.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect())
}

/// Resolves `name` from inside the lab pod whose directory is `pod_dir`,
/// as its applications do: a query to `server` (any address on port 53
/// is captured into the pod's sidecar; on a loopback lab, give the
/// sidecar's own DNS address).
pub async fn resolve_from_pod(
    pod_dir: &std::path::Path,
    server: SocketAddr,
    name: &str,
) -> Result<Vec<Ipv4Addr>, String> {
    let netns_name = std::fs::read_to_string(pod_dir.join("netns"))
        .map_err(|e| format!("{} is not a running lab pod: {e}", pod_dir.display()))?
        .trim()
        .to_string();
    let question = query(name, 0x5eed)?;
    let answer = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        if !netns_name.is_empty() {
            crate::netns::enter(&netns_name).map_err(|e| format!("{e:#}"))?;
        }
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        socket
            .send_to(&question, server)
            .map_err(|e| format!("send: {e}"))?;
        let mut buffer = [0u8; 4096];
        let n = socket
            .recv(&mut buffer)
            .map_err(|e| format!("no answer: {e}"))?;
        Ok(buffer[..n].to_vec())
    })
    .await
    .map_err(|e| e.to_string())??;
    addresses(&answer)
}

/// The first address `name` resolves to from the pod, asked again
/// every 100 ms until it resolves (a name the mesh has just learned) or
/// `timeout` passes.
pub async fn resolve_until(
    pod_dir: &std::path::Path,
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Ipv4Addr, String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = resolve_from_pod(pod_dir, server, name).await;
        if let Ok(found) = &last
            && let Some(ip) = found.first()
        {
            return Ok(*ip);
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{name} did not resolve within {} s: {last:?}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_zone_resolves_and_nothing_else_does() {
        let answer = upstream_answer(&query("www.example.lab", 7).unwrap()).unwrap();
        assert_eq!(addresses(&answer).unwrap(), [ZONE_ADDRESS]);
        let answer = upstream_answer(&query("example.com", 7).unwrap()).unwrap();
        assert_eq!(addresses(&answer).unwrap_err(), "NameError");
        assert!(upstream_answer(b"junk").is_none());
    }
}
