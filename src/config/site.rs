//! `[site]`: the second listener through which other sidecars at this site pull (README, "A
//! site cache for a fleet"). TLS is required unless it listens on loopback only: machines
//! send it their tokens.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FileSite {
    listen: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    allow_from: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub listen: Vec<SocketAddr>,
    /// Certificate chain and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Source networks admitted (empty: any).
    pub allow_from: Vec<Network>,
}

/// An address block written `10.0.0.0/8` (or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Option<Network> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Network { addr, prefix })
    }

    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

pub(super) fn check(file: FileSite) -> Result<SiteConfig, ConfigError> {
    let listen = file
        .listen
        .ok_or_else(|| invalid("site.listen", "is required in [site]"))?
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    format!("site.listen[{i}]"),
                    format!("`{text}` is not an address:port"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if listen.is_empty() {
        return Err(invalid("site.listen", "needs at least one address"));
    }
    let tls = match (file.tls_cert, file.tls_key) {
        (Some(cert), Some(key)) => {
            for (key_name, path) in [("site.tls-cert", &cert), ("site.tls-key", &key)] {
                if !path.is_file() {
                    return Err(invalid(
                        key_name,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
            Some((cert, key))
        }
        (None, None) => None,
        (Some(_), None) => return Err(invalid("site.tls-key", "is required with site.tls-cert")),
        (None, Some(_)) => return Err(invalid("site.tls-cert", "is required with site.tls-key")),
    };
    if let (None, Some(addr)) = (&tls, listen.iter().find(|a| !a.ip().is_loopback())) {
        return Err(invalid(
            "site.tls-cert",
            format!("is required to listen on {addr}: machines send the site their tokens"),
        ));
    }
    let allow_from = file
        .allow_from
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, text)| {
            Network::parse(text).ok_or_else(|| {
                invalid(
                    format!("site.allow-from[{i}]"),
                    format!("`{text}` is not a network such as \"10.0.0.0/8\" or an address"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SiteConfig {
        listen,
        tls,
        allow_from,
    })
}

#[cfg(test)]
mod tests {
    use super::Network;

    #[test]
    fn networks_hold_what_their_prefix_says() {
        let net = Network::parse("10.0.0.0/8").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let one = Network::parse("192.168.1.7").unwrap();
        assert!(one.contains("192.168.1.7".parse().unwrap()));
        assert!(!one.contains("192.168.1.8".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Network::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "fd00::/129", "host/8", "10.0.0.0/x", ""] {
            assert!(Network::parse(bad).is_none(), "{bad}");
        }
    }
}
