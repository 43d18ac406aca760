//! DNS rebinding: a web page whose name an attacker re-points at 127.0.0.1 could read this
//! machine's view from a browser. Browsers send the page's name as `Host`, so only requests
//! naming a loopback address, `localhost`, or the address the connection arrived on are
//! answered; the rest get 421.

use std::net::{IpAddr, SocketAddr};

use http::{header, Request, Response, StatusCode};

use super::body::{self, Body};

/// The 421 answer for a request whose `Host` is not ours, or `None` to serve it.
pub fn refusal<B>(request: &Request<B>, local: SocketAddr) -> Option<Response<Body>> {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{0}"))
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if host.is_none_or(|host| allowed(host, local)) {
        return None;
    }
    tracing::warn!(
        host = host.unwrap_or_default(),
        "request refused: Host is not a loopback or listen address"
    );
    let text = "nix-sidecar answers only requests for a loopback address, localhost or its listen address\n";
    Some(
        Response::builder()
            .status(StatusCode::MISDIRECTED_REQUEST)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONTENT_LENGTH, text.len())
            .body(body::full(text))
            .unwrap(),
    )
}

fn allowed(host: &str, local: SocketAddr) -> bool {
    let (name, port) = split_port(host);
    let port_ok = port.is_none_or(|p| p == Some(local.port()));
    if name.eq_ignore_ascii_case("localhost") {
        return port_ok;
    }
    let Ok(ip) = name.parse::<IpAddr>() else {
        return false;
    };
    port_ok
        && (ip.is_loopback() || ip == local.ip() || ip.to_canonical() == local.ip().to_canonical())
}

/// `name[:port]` or `[v6][:port]`; the port is `Some(None)` when it does not parse.
fn split_port(host: &str) -> (&str, Option<Option<u16>>) {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, tail)) => (v6, tail.strip_prefix(':')),
            None => return (host, None),
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => (name, Some(port)),
            _ => (host, None),
        },
    };
    (name, port.map(|p| p.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn only_loopback_names_and_the_listen_address_are_answered() {
        let local = "127.0.0.1:37515".parse().unwrap();
        for host in [
            "127.0.0.1:37515",
            "127.0.0.1",
            "localhost:37515",
            "LOCALHOST",
            "127.0.0.2:37515",
            "[::1]:37515",
            "[::1]",
        ] {
            assert!(allowed(host, local), "{host}");
        }
        for host in [
            "evil.example:37515",
            "localhost.evil.example",
            "127.0.0.1:80",
            "localhost:1",
            "10.0.0.1:37515",
            "127.0.0.1:x",
            "",
        ] {
            assert!(!allowed(host, local), "{host}");
        }
        let remote = "192.0.2.7:37515".parse().unwrap();
        assert!(allowed("192.0.2.7:37515", remote), "a listen address");
        assert!(!allowed("192.0.2.8:37515", remote));
    }
}
