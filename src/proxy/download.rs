//! The plumbing under the decisions of `proxy`: moving an upstream body into a fill or a
//! pass-through, gathering frames into chunks, giving up on a stalled upstream.

use std::sync::Arc;

use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::store::{
    freeze_buffer, take_buffer, ChunkSink, FillWriter, PassThrough, SinkError, BODY_IDLE_TIMEOUT,
    CHUNK,
};
use crate::upstream::{Answer, Upstream, UpstreamError};

/// Downloads `source` into a fill; runs to its end whoever is still reading. A body that
/// breaks off (a site killed mid-NAR, a reset) goes on once from where it stopped, straight
/// from the upstream (`Range`): the bytes already sent to Nix cannot be taken back.
pub async fn fill(
    up: Arc<Upstream>,
    source: url::Url,
    mut writer: Box<FillWriter>,
    metrics: Arc<Metrics>,
) {
    let response = match up.fetch(&source, Method::GET).await {
        Ok(Answer::Found(response)) => response,
        Ok(Answer::Missing) => return writer.missing(),
        Err(e) => return writer.fail(&e.to_string()),
    };
    if let Err(reason) = writer.start(content_length(&response)) {
        return writer.fail(&reason.to_string());
    }
    let mut body = response.into_body();
    let mut resumed = false;
    loop {
        match copy_body(body, &mut *writer).await {
            Ok(_) => {
                metrics.fetched(writer.written());
                return writer.finish().await;
            }
            Err(Copy::Broke(reason)) if !resumed => {
                resumed = true;
                let offset = writer.written();
                tracing::info!(nar = %source.path(), offset, reason, "NAR body broke off; asking the upstream for the rest");
                match up.fetch_rest(&source, offset).await {
                    Ok(rest) => body = rest.into_body(),
                    Err(e) => {
                        metrics.upstream_body_failed();
                        return writer.fail(&format!("{reason}; {e}"));
                    }
                }
            }
            Err(stopped) => {
                metrics.upstream_body_failed();
                return writer.fail(&stopped.to_string());
            }
        }
    }
}

/// Feeds a fill with an upstream's answer, already asked for (with whatever credential);
/// the bytes the upstream sent.
pub async fn fill_from(
    answer: Result<Answer, UpstreamError>,
    mut writer: Box<FillWriter>,
    metrics: Arc<Metrics>,
) -> u64 {
    let response = match answer {
        Ok(Answer::Found(response)) => response,
        Ok(Answer::Missing) => {
            writer.missing();
            return 0;
        }
        Err(e) => {
            writer.fail(&e.to_string());
            return 0;
        }
    };
    if let Err(reason) = writer.start(content_length(&response)) {
        writer.fail(&reason.to_string());
        return 0;
    }
    match copy_body(response.into_body(), &mut *writer).await {
        Ok(n) => {
            metrics.fetched(n);
            writer.finish().await;
            n
        }
        Err(stopped) => {
            metrics.upstream_body_failed();
            writer.fail(&stopped.to_string());
            0
        }
    }
}

/// Streams an upstream body through to one client, checked but not stored.
pub async fn pass_through(
    response: http::Response<Incoming>,
    mut sink: PassThrough,
    metrics: Arc<Metrics>,
) {
    let outcome = copy_body(response.into_body(), &mut sink).await;
    if let Ok(n) = outcome {
        metrics.fetched(n);
    }
    sink.finish(outcome.err().map(|stopped| stopped.to_string()))
        .await
}

pub fn content_length<B>(response: &http::Response<B>) -> Option<u64> {
    response
        .headers()
        .get("content-length")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The body's next frame if it is there already (`None`: not yet).
#[allow(clippy::type_complexity)]
fn ready_frame(
    body: &mut Incoming,
) -> Option<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match hyper::body::Body::poll_frame(std::pin::Pin::new(body), &mut cx) {
        std::task::Poll::Ready(frame) => Some(frame),
        std::task::Poll::Pending => None,
    }
}

/// Copies an upstream body into a sink, giving up when it stalls. Returns the bytes copied.
/// TLS hands over ~16 KiB frames; whatever is already there is gathered into one chunk (up to
/// 256 KiB) so the sink hashes, writes and wakes its readers once per chunk, not per frame.
/// A frame that comes alone (a slow upstream) goes on as it is: a gathering buffer per slow
/// download made memory grow with the number of downloads.
async fn copy_body(mut body: Incoming, sink: &mut impl ChunkSink) -> Result<u64, Copy> {
    let mut copied = 0u64;
    let mut pending = Gathered::default();
    loop {
        // Take a frame that is ready now; before waiting for one, pass on what was gathered.
        let frame = match ready_frame(&mut body) {
            Some(frame) => frame,
            None => {
                if let Some(chunk) = pending.take() {
                    sink.write(chunk).await.map_err(Copy::Refused)?;
                }
                tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame())
                    .await
                    .map_err(|_| {
                        Copy::Broke(format!(
                            "upstream stalled for {}s",
                            BODY_IDLE_TIMEOUT.as_secs()
                        ))
                    })?
            }
        };
        match frame {
            None => {
                if let Some(chunk) = pending.take() {
                    sink.write(chunk).await.map_err(Copy::Refused)?;
                }
                return Ok(copied);
            }
            Some(Err(e)) => return Err(Copy::Broke(format!("upstream body failed: {e}"))),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    copied += data.len() as u64;
                    if let Some(full) = pending.add(data) {
                        sink.write(full).await.map_err(Copy::Refused)?;
                    }
                }
            }
        }
    }
}

/// Why a copy stopped short.
#[derive(Debug, thiserror::Error)]
enum Copy {
    /// The body broke off or stalled: the rest may be asked for again.
    #[error("{0}")]
    Broke(String),
    /// The sink refused a chunk (the bytes do not match, the client went away).
    #[error(transparent)]
    Refused(SinkError),
}

/// Frames gathered into a chunk: one frame is kept as it is; a buffer is taken only once a
/// second one arrives.
#[derive(Default)]
enum Gathered {
    #[default]
    Empty,
    One(bytes::Bytes),
    Many(Vec<u8>),
}

impl Gathered {
    /// Adds a frame; returns a full chunk to pass on first, if adding it would overflow.
    fn add(&mut self, data: bytes::Bytes) -> Option<bytes::Bytes> {
        let len = self.len();
        let full = (len > 0 && len + data.len() > CHUNK)
            .then(|| self.take())
            .flatten();
        *self = match std::mem::take(self) {
            Gathered::Empty => Gathered::One(data),
            Gathered::One(first) => {
                let mut buf = take_buffer(CHUNK);
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                Gathered::Many(buf)
            }
            Gathered::Many(mut buf) => {
                buf.extend_from_slice(&data);
                Gathered::Many(buf)
            }
        };
        full
    }

    fn len(&self) -> usize {
        match self {
            Gathered::Empty => 0,
            Gathered::One(b) => b.len(),
            Gathered::Many(buf) => buf.len(),
        }
    }

    fn take(&mut self) -> Option<bytes::Bytes> {
        match std::mem::take(self) {
            Gathered::Empty => None,
            Gathered::One(b) => Some(b),
            Gathered::Many(buf) => Some(freeze_buffer(buf)),
        }
    }
}
