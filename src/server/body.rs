//! Response bodies: whole buffers (and the plain answers made of them), and streams fed
//! through a bounded channel (so a slow client slows its producer instead of growing memory). An error in a stream aborts the
//! response, so a client never sees a short NAR as complete.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::store::ByteStream;
use prometheus_client::metrics::counter::Counter;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A whole answer of `content_type` with its length.
pub fn typed(
    status: http::StatusCode,
    content_type: &'static str,
    body: String,
) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(full(body))
        .unwrap()
}

/// A whole plain-text answer (what Nix shows of a failure).
pub fn text(status: http::StatusCode, body: impl Into<String>) -> http::Response<Body> {
    typed(status, "text/plain; charset=utf-8", body.into())
}

/// A body from a channel of chunks; `served` counts the bytes sent.
pub fn stream(rx: ByteStream, served: Counter) -> Body {
    crate::http::ChannelBody::new(rx).counted(served).boxed()
}

/// A progress answer: a line of JSON per chunk of `rx`, as it comes.
pub fn ndjson(rx: ByteStream) -> http::Response<Body> {
    http::Response::builder()
        .status(http::StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(stream(rx, Counter::default()))
        .unwrap()
}
