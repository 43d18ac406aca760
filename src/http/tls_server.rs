//! The server side of TLS for our listeners (the exchange, the site): a certificate and key
//! from PEM files, picked up again when they change (certificates are rotated in place).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// A TLS acceptor for HTTP/1.1 with the certificate and key in these PEM files.
pub fn acceptor(cert: PathBuf, key: PathBuf) -> Result<tokio_rustls::TlsAcceptor, String> {
    let resolver = Reloading::new(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The certificate and key, read again when either file changes (looked at at most once a
/// second, on a handshake); a change that does not load keeps the old pair, with a warning.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    certified: Arc<rustls::sign::CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf) -> Result<Reloading, String> {
        let certified = load_pair(&cert, &key)?;
        let stamps = (modified(&cert), modified(&key));
        Ok(Reloading {
            cert,
            key,
            current: RwLock::new(Loaded {
                certified,
                stamps,
                checked: Instant::now(),
            }),
        })
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_pair(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let private = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{} holds no private key", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, signing)))
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let due = self.current.read().unwrap().checked.elapsed() >= Duration::from_secs(1);
        if due {
            let mut current = self.current.write().unwrap();
            current.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != current.stamps {
                current.stamps = stamps;
                match load_pair(&self.cert, &self.key) {
                    Ok(certified) => {
                        tracing::info!("TLS certificate reloaded");
                        current.certified = certified;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the old one")
                    }
                }
            }
        }
        Some(self.current.read().unwrap().certified.clone())
    }
}
