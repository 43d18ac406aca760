//! `allowed-uids`: who owns the other end of a loopback TCP connection, from the kernel's own
//! socket table (`/proc/self/net/tcp`, `/proc/self/net/tcp6`): the client's socket is the row
//! whose local address is our peer and whose remote address is us. Read through `self`:
//! `/proc/net` is missing under systemd's `ProcSubset=pid`. The uid is as this process sees
//! it: under `PrivateUsers=` every other uid reads as 65534, so the unit does not set it.

use std::net::{IpAddr, SocketAddr};

pub fn uid_of(peer: SocketAddr, us: SocketAddr) -> Option<u32> {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (local, remote, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
                (same(parse(local)?, peer) && same(parse(remote)?, us)).then(|| uid.parse().ok())?
            })
        })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6), each 32-bit word in host order.
fn parse(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..ip.len() / 8)
        .map(|i| {
            u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16)
                .ok()
                .map(u32::to_ne_bytes)
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Equal, treating IPv4-mapped IPv6 addresses as their IPv4 form.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_owner_of_our_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let us = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(us).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        // SAFETY: geteuid cannot fail.
        assert_eq!(uid_of(peer, us), Some(crate::sys::euid()));
    }

    #[test]
    fn parses_kernel_addresses() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                parse("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
        }
        assert_eq!(parse("zz:1"), None);
    }
}
