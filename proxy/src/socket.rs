//! What a captured socket can tell about itself: the destination the
//! capture rules redirected it from, and its own address written the same
//! way whether the listener is IPv4 or dual-stack.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The address a redirected connection was originally sent to.
fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    // On a dual-stack listener an IPv4 connection shows an IPv4-mapped
    // local address; its original destination is an IPv4 one.
    let address = match local_address(stream)? {
        SocketAddr::V4(_) => socket.original_dst_v4()?,
        SocketAddr::V6(_) => socket.original_dst_v6()?,
    };
    address
        .as_socket()
        .map(canonical)
        .ok_or_else(|| std::io::Error::other("the original destination is not an IP address"))
}

/// A connection's local address, IPv4-mapped IPv6 written as IPv4.
fn local_address(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    stream.local_addr().map(canonical)
}

/// Whether a connection was redirected to the listener by the capture
/// rules: one that was not reports its own local address as the original
/// destination, and serving it would connect to ourselves again and again.
pub fn redirected(stream: &TcpStream) -> std::io::Result<Option<SocketAddr>> {
    let original = original_destination(stream)?;
    Ok((original != local_address(stream)?).then_some(original))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_read_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
