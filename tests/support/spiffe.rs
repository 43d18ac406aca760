//! A SPIFFE Workload API double: gRPC (HTTP/2, prior knowledge) on a unix socket, serving
//! `SpiffeWorkloadAPI/FetchJWTSVID` as a SPIRE agent does. It refuses calls without the
//! `workload.spiffe.io: true` metadata (InvalidArgument, "security header missing from
//! request"), and a request without an audience. Its protobuf handling is written here,
//! independently of the product's, so the two cannot share a mistake.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::http::Body;
use super::issuer::Issuer;

pub struct WorkloadApi {
    pub socket: PathBuf,
    state: Arc<State>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct State {
    issuer: Issuer,
    spiffe_id: String,
    lifetime: AtomicI64,
    calls: AtomicUsize,
    refused: AtomicUsize,
    issued: Mutex<Vec<String>>,
}

impl WorkloadApi {
    pub async fn start(dir: &Path, issuer: &Issuer, spiffe_id: &str) -> WorkloadApi {
        let api = WorkloadApi {
            socket: dir.join("agent.sock"),
            state: Arc::new(State {
                issuer: issuer.clone(),
                spiffe_id: spiffe_id.into(),
                lifetime: AtomicI64::new(300),
                calls: AtomicUsize::new(0),
                refused: AtomicUsize::new(0),
                issued: Mutex::default(),
            }),
            task: Mutex::new(None),
        };
        api.resume();
        api
    }

    /// `SPIFFE_ENDPOINT_SOCKET` as the agent's users are given it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn set_lifetime(&self, secs: i64) {
        self.state.lifetime.store(secs, Ordering::SeqCst);
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Every JWT-SVID handed out, in order.
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }

    /// The agent goes away: the socket is closed and removed.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// The agent comes (back) on the same path.
    pub fn resume(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener = tokio::net::UnixListener::bind(&self.socket).unwrap();
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A gRPC answer: an optional message, then the status in trailers.
fn grpc(message: Option<Vec<u8>>, status: u32, text: &str) -> Response<Body> {
    let mut frames = VecDeque::new();
    if let Some(message) = message {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        frames.push_back(Frame::data(Bytes::from(framed)));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.to_string().parse().unwrap());
    if !text.is_empty() {
        trailers.insert("grpc-message", text.replace(' ', "%20").parse().unwrap());
    }
    frames.push_back(Frame::trailers(trailers));
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(Frames(frames).boxed())
        .unwrap()
}

/// A body of ready frames (data, then trailers).
struct Frames(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let refuse = |status: u32, text: &str| {
        state.refused.fetch_add(1, Ordering::SeqCst);
        grpc(None, status, text)
    };
    if req.uri().path() != "/SpiffeWorkloadAPI/FetchJWTSVID" {
        return refuse(12, "unknown method");
    }
    if req
        .headers()
        .get("workload.spiffe.io")
        .map(|v| v.as_bytes())
        != Some(b"true")
    {
        return refuse(3, "security header missing from request");
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    if body.len() < 5 || body[0] != 0 {
        return refuse(3, "malformed request");
    }
    let audiences = strings_of_field(&body[5..], 1);
    let Some(audience) = audiences.first() else {
        return refuse(3, "audience must be specified");
    };
    let lifetime = state.lifetime.load(Ordering::SeqCst);
    let svid = state
        .issuer
        .mint(&state.spiffe_id, audience, lifetime, true);
    state.issued.lock().unwrap().push(svid.clone());
    let mut jwt_svid = Vec::new();
    put(&mut jwt_svid, 1, state.spiffe_id.as_bytes());
    put(&mut jwt_svid, 2, svid.as_bytes());
    let mut response = Vec::new();
    put(&mut response, 1, &jwt_svid);
    grpc(Some(response), 0, "")
}

/// Length-delimited protobuf field with a one- or two-byte length.
fn put(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    let n = bytes.len();
    assert!(n < 1 << 14);
    if n < 0x80 {
        out.push(n as u8);
    } else {
        out.push((n & 0x7f) as u8 | 0x80);
        out.push((n >> 7) as u8);
    }
    out.extend_from_slice(bytes);
}

/// The string values of a repeated string field (length-delimited fields only).
fn strings_of_field(mut data: &[u8], wanted: u8) -> Vec<String> {
    let mut found = Vec::new();
    while data.len() >= 2 {
        let key = data[0];
        let (mut n, mut used) = (0usize, 0usize);
        for (i, byte) in data[1..].iter().enumerate() {
            n |= ((byte & 0x7f) as usize) << (7 * i);
            used = i + 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let start = 1 + used;
        let Some(value) = data.get(start..start + n) else {
            break;
        };
        if key == wanted << 3 | 2 {
            found.push(String::from_utf8_lossy(value).into_owned());
        }
        data = &data[start + n..];
    }
    found
}
