//! An egress proxy double on loopback, as squid or a corporate proxy behaves: `CONNECT
//! host:port` opens a tunnel (after checking `Proxy-Authorization` when credentials are
//! required, else 407), and an absolute-form request (`GET http://host/path`) is forwarded
//! to its host. It records the first request line of every connection, and whether it was
//! authorised. Destinations must be loopback addresses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct ProxyDouble {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ProxyDouble {
    /// `credentials`: `user:password` the proxy requires, if any.
    pub async fn start(credentials: Option<&str>) -> ProxyDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let expected = credentials.map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (log, expected) = (log.clone(), expected.clone());
                tokio::spawn(async move {
                    let _ = relay(client, &log, expected.as_deref()).await;
                });
            }
        });
        ProxyDouble { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The first request line of every connection, e.g. `CONNECT 127.0.0.1:443`.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn relay(
    mut client: TcpStream,
    log: &Mutex<Vec<String>>,
    expected_auth: Option<&str>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let request_line = text.lines().next().unwrap_or("").to_string();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authorised = text.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("proxy-authorization") && Some(value.trim()) == expected_auth
        })
    });
    log.lock().unwrap().push(format!(
        "{method} {target}{}",
        if authorised { " (authorised)" } else { "" }
    ));
    if method == "CONNECT" {
        if expected_auth.is_some() && !authorised {
            client
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        }
        let mut upstream = connect_loopback(target).await?;
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        return Ok(());
    }
    // Absolute form: forward the request as it came (origin servers accept absolute form).
    let Some(rest) = target.strip_prefix("http://") else {
        client
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let authority = rest.split('/').next().unwrap_or("");
    let mut upstream = connect_loopback(authority).await?;
    upstream.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

async fn connect_loopback(authority: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| std::io::Error::other(format!("not an address: {authority}")))?;
    assert!(
        addr.ip().is_loopback(),
        "the proxy double only reaches loopback"
    );
    TcpStream::connect(addr).await
}
