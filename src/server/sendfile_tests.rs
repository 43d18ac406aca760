//! Tests of `server/sendfile.rs` (a sibling file, so the module itself stays short).

use super::*;
use std::io::Write as _;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1 connection served the way `server::serve` does it (its builder): `/file` is
/// the whole file as a [`FileBody`] claiming `claimed` bytes, `/follow` the same file as a
/// [`FollowBody`] whose fill hands out `claimed` bytes while the response announces only
/// half of them, `/text` an ordinary body.
async fn serve_one(file: File, claimed: u64) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let segments = Arc::new(Segments::default());
        let service = {
            let segments = segments.clone();
            hyper::service::service_fn(move |request: http::Request<_>| {
                let file = file.try_clone().unwrap();
                let served = Counter::default();
                let path = request.uri().path();
                let body: BoxBody<Bytes, io::Error> = if path == "/file" {
                    FileBody::new(file, (0, claimed), segments.clone(), served).boxed()
                } else if path == "/follow" {
                    let (tx, pieces) = tokio::sync::mpsc::channel(4);
                    tokio::spawn(async move {
                        let mut pos = 0;
                        while pos < claimed {
                            let len = (claimed - pos).min(CHUNK as u64 / 2) as usize;
                            let _ = tx.send(Ok(Piece::File { pos, len })).await;
                            pos += len as u64;
                        }
                    });
                    let announced = claimed / 2 + 12345;
                    let body =
                        FollowBody::new(file, pieces, Some(announced), segments.clone(), served);
                    let mut response = http::Response::new(body.boxed());
                    response
                        .headers_mut()
                        .insert("content-length", announced.into());
                    return std::future::ready(Ok::<_, std::convert::Infallible>(response));
                } else {
                    Full::new(Bytes::from_static(b"hello"))
                        .map_err(|never| match never {})
                        .boxed()
                };
                std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(body)))
            })
        };
        let io = hyper_util::rt::TokioIo::new(SendfileStream::new(tcp, segments));
        let _ = crate::server::connection_builder()
            .serve_connection(io, service)
            .await;
    });
    addr
}

/// Reads one response: its body, or what arrived of it before the connection ended.
async fn read_response(tcp: &mut TcpStream, pending: &mut Vec<u8>) -> (usize, Vec<u8>) {
    let mut buf = vec![0u8; 1 << 16];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        pending.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(pending[..head_end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    pending.drain(..head_end);
    while pending.len() < length {
        let n = tcp.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
    }
    let body: Vec<u8> = pending.drain(..length.min(pending.len())).collect();
    (length, body)
}

fn file_of(bytes: &[u8]) -> File {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    file
}

#[tokio::test]
async fn pipelined_responses_get_exactly_their_own_bytes() {
    let bytes: Vec<u8> = (0..2 * CHUNK as u32 + 12345)
        .map(|i| (i % 251) as u8)
        .collect();
    let addr = serve_one(file_of(&bytes), bytes.len() as u64).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let get = |path| format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    let requests = [get("/file"), get("/text"), get("/file"), get("/text")].concat();
    tcp.write_all(requests.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    for expected in [&bytes[..], b"hello", &bytes[..], b"hello"] {
        let (_, body) = read_response(&mut tcp, &mut pending).await;
        assert!(body == expected, "a body of {} bytes", body.len());
    }
}

#[tokio::test]
async fn a_file_shorter_than_its_size_ends_the_connection_short() {
    let bytes = vec![7u8; 1000];
    let addr = serve_one(file_of(&bytes), 5000).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /file HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (length, body) = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!(length, 5000);
    assert_eq!(body, bytes, "the bytes there are, then the end");
}

#[tokio::test]
async fn a_fill_longer_than_its_response_closes_the_connection_and_never_leaks_into_the_next() {
    let bytes: Vec<u8> = (0..3 * CHUNK as u32).map(|i| (i % 253) as u8).collect();
    let addr = serve_one(file_of(&bytes), bytes.len() as u64).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let requests = "GET /follow HTTP/1.1\r\nhost: x\r\n\r\nGET /text HTTP/1.1\r\nhost: x\r\n\r\n";
    tcp.write_all(requests.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    let (length, body) = read_response(&mut tcp, &mut pending).await;
    assert_eq!(length, bytes.len() / 2 + 12345);
    assert!(
        body.len() < length,
        "the response is cut short, not complete"
    );
    assert_eq!(body, bytes[..body.len()], "and carries only its own bytes");
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(
        rest.is_empty() && pending.is_empty(),
        "nothing follows on that connection: {} more bytes",
        rest.len() + pending.len()
    );
}

#[tokio::test]
async fn a_placeholder_out_of_step_with_its_segment_is_an_error() {
    let (client, server) = tokio::io::duplex(1);
    drop(client);
    drop(server);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = TcpStream::connect(listener.local_addr().unwrap());
    let (tcp, _) = tokio::join!(listener.accept(), connect);
    let segments = Arc::new(Segments::default());
    let placeholders = Placeholders::new(file_of(&[1u8; 64]), segments.clone(), Counter::default());
    let first = placeholders.frame(0, 32).into_data().unwrap();
    let second = placeholders.frame(32, 32).into_data().unwrap();
    let mut stream = SendfileStream::new(tcp.unwrap().0, segments);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let write = Pin::new(&mut stream).poll_write(&mut cx, &second);
    assert!(
        matches!(write, Poll::Ready(Err(_))),
        "the second frame's bytes while the first is unwritten"
    );
    let write = Pin::new(&mut stream).poll_write(&mut cx, &first[..16]);
    assert!(matches!(write, Poll::Ready(Ok(16))), "{write:?}");
    let write = Pin::new(&mut stream).poll_write(&mut cx, &first[..16]);
    assert!(matches!(write, Poll::Ready(Err(_))), "the same bytes twice");
}

#[test]
fn only_the_placeholder_region_is_a_placeholder() {
    assert!(is_placeholder(&PLACEHOLDER[2 * CHUNK - 1..]));
    assert!(!is_placeholder(&PLACEHOLDER[..0]));
    assert!(!is_placeholder(&[0u8; 16]));
}
