//! Who owns the other end of a connection, asked of the kernel for that exact connection:
//! one `NETLINK_SOCK_DIAG` (inet_diag) lookup of the client socket's 4-tuple, made once when
//! the connection is accepted. The answer counts only if the socket found is ESTABLISHED and
//! has an inode: a client that has already closed leaves a time-wait entry the kernel reports
//! as uid 0 with inode 0, and a scan of `/proc/net/tcp` that took it for the owner let any
//! user be root (see the threat model). The cost is one round trip to the kernel, whatever the
//! number of sockets on the machine.
//!
//! The uid is as this process's user namespace sees it: under `PrivateUsers=` every other
//! uid reads as 65534, so the unit does not set it. The socket family must be allowed
//! (`RestrictAddressFamilies=... AF_NETLINK`).

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_ESTABLISHED};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// Why a connection's owner is not known: such a connection gets no uid (never "uid 0").
#[derive(Debug, thiserror::Error)]
pub enum Unknown {
    #[error("the two ends are of different address families")]
    Families,
    #[error(
        "cannot ask the kernel (NETLINK_SOCK_DIAG; RestrictAddressFamilies needs AF_NETLINK): {0}"
    )]
    Netlink(std::io::Error),
    #[error("the kernel knows no such connection (closed already, or not on this machine)")]
    NotFound,
    #[error("the client's socket is no longer established (state {0})")]
    NotEstablished(u8),
    #[error("the client's socket has no owner (inode 0)")]
    Orphan,
    #[error("the kernel's answer does not parse")]
    Garbled,
}

/// The uid owning the client socket of the TCP connection from `peer` to `us`.
pub fn uid_of(peer: SocketAddr, us: SocketAddr) -> Result<u32, Unknown> {
    let (peer, us) = (canonical(peer), canonical(us));
    let family = match (peer.ip(), us.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => return Err(Unknown::Families),
    };
    // The client's socket: its local end is our peer, its remote end is us.
    let wanted = SocketId {
        source_port: peer.port(),
        destination_port: us.port(),
        source_address: peer.ip(),
        destination_address: us.ip(),
        interface_id: 0,
        // INET_DIAG_NOCOOKIE: match by the 4-tuple alone.
        cookie: [0xff; 8],
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: wanted.clone(),
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);

    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(Unknown::Netlink)?;
    socket.bind_auto().map_err(Unknown::Netlink)?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(Unknown::Netlink)?;
    socket.send(&out, 0).map_err(Unknown::Netlink)?;
    // The kernel answers within the send: a reply that is not queued by now never comes.
    socket.set_non_blocking(true).map_err(Unknown::Netlink)?;
    let mut reply = Vec::with_capacity(4096);
    socket.recv(&mut reply, 0).map_err(Unknown::Netlink)?;

    let message =
        NetlinkMessage::<SockDiagMessage>::deserialize(&reply).map_err(|_| Unknown::Garbled)?;
    let response = match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => response,
        NetlinkPayload::Error(_) => return Err(Unknown::NotFound),
        _ => return Err(Unknown::Garbled),
    };
    let found = &response.header;
    let id = &found.socket_id;
    let same_tuple = id.source_port == wanted.source_port
        && id.destination_port == wanted.destination_port
        && id.source_address == wanted.source_address
        && id.destination_address == wanted.destination_address;
    if !same_tuple {
        return Err(Unknown::NotFound);
    }
    if found.state != TCP_ESTABLISHED {
        return Err(Unknown::NotEstablished(found.state));
    }
    if found.inode == 0 {
        return Err(Unknown::Orphan);
    }
    Ok(found.uid)
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of an IPv4 client) as IPv4:
/// the client's own socket is an IPv4 one.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        bind: &str,
    ) -> Option<(
        std::net::TcpStream,
        std::net::TcpStream,
        SocketAddr,
        SocketAddr,
    )> {
        let listener = std::net::TcpListener::bind(bind).ok()?;
        let us = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(us).unwrap();
        let (conn, peer) = listener.accept().unwrap();
        Some((client, conn, peer, us))
    }

    #[test]
    fn finds_the_owner_of_our_own_connection_over_ipv4_and_ipv6() {
        let (client, _conn, peer, us) = pair("127.0.0.1:0").unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(uid_of(peer, us).unwrap(), crate::sys::euid());
        if let Some((_client, _conn, peer, us)) = pair("[::1]:0") {
            assert_eq!(uid_of(peer, us).unwrap(), crate::sys::euid());
        }
    }

    #[test]
    fn a_closed_client_has_no_owner() {
        let (client, conn, peer, us) = pair("127.0.0.1:0").unwrap();
        drop(client);
        // The client's socket goes FIN_WAIT2 at once and time-wait once we close too.
        let first = uid_of(peer, us);
        assert!(
            matches!(first, Err(Unknown::NotEstablished(_))),
            "{first:?}"
        );
        drop(conn);
        let after = uid_of(peer, us);
        assert!(after.is_err(), "{after:?}");
    }

    #[test]
    fn a_connection_that_does_not_exist_has_no_owner() {
        let us: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(uid_of(peer, us), Err(Unknown::NotFound)));
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert!(matches!(uid_of(v6, us), Err(Unknown::Families)));
    }

    #[test]
    fn mapped_addresses_are_their_ipv4_form() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1:80".parse().unwrap());
    }
}
