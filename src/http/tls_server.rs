//! The server side of TLS for our listeners (the exchange, the site): a certificate and key
//! from PEM files, picked up again when they change (certificates are rotated in place).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::ServerTlsError;
use std::time::{Duration, Instant, SystemTime};

/// A TLS acceptor for HTTP/1.1 with the certificate and key in these PEM files.
pub fn acceptor(cert: PathBuf, key: PathBuf) -> Result<tokio_rustls::TlsAcceptor, ServerTlsError> {
    let resolver = Reloading::new(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
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
    fn new(cert: PathBuf, key: PathBuf) -> Result<Reloading, ServerTlsError> {
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
) -> Result<Arc<rustls::sign::CertifiedKey>, ServerTlsError> {
    let failed = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |e: &dyn std::fmt::Display| ServerTlsError::File {
            path,
            detail: e.to_string(),
        }
    };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| failed(p)(&e));
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(cert)(&e))?;
    if certs.is_empty() {
        return Err(ServerTlsError::NoCertificate(cert.to_path_buf()));
    }
    let private = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| failed(key)(&e))?
        .ok_or_else(|| ServerTlsError::NoKey(key.to_path_buf()))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&private).map_err(|e| failed(key)(&e))?;
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
