//! The binary cache's answers: narinfos, NARs (whole, ranges, sendfile from the store), and
//! what Nix is told when an upstream fails (503 with Retry-After, or 502).

use std::sync::Arc;

use http::{header, Response, StatusCode};
use http_body_util::BodyExt;

use super::body::{self, text, typed, Body};
use super::sendfile::{self, FileBody, FollowBody, Segments};
use super::Site;
use crate::proxy::{Content, Failure, NarAnswer, NarInfoAnswer};
use crate::store::stream_file;

pub(super) fn narinfo(answer: NarInfoAnswer, path: &str) -> Response<Body> {
    match answer {
        NarInfoAnswer::Found(text) => typed(StatusCode::OK, "text/x-nix-narinfo", text),
        NarInfoAnswer::Missing => text(StatusCode::NOT_FOUND, "not in any upstream's view\n"),
        NarInfoAnswer::Untrusted(reason) | NarInfoAnswer::Unknown(reason) => {
            text(StatusCode::NOT_FOUND, format!("{reason}\n"))
        }
        NarInfoAnswer::Failed(failure) => failed(path, &failure),
    }
}

/// The status of a failure: the one place it is decided (README, "What Nix is told").
fn status_of(failure: &Failure) -> StatusCode {
    match failure {
        Failure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Failure::Broken(_) => StatusCode::BAD_GATEWAY,
    }
}

/// How long Nix is asked to wait before asking again after a 503 (current Nix honours it).
const RETRY_AFTER_SECS: u32 = 5;

pub(super) fn failed(path: &str, failure: &Failure) -> Response<Body> {
    let mut response = text(
        status_of(failure),
        format!(
            "nix-sidecar cannot answer {path} now:\n{}\n",
            failure.reason()
        ),
    );
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
    }
    response
}

pub(super) fn nar_response(
    site: &Site,
    answer: NarAnswer,
    range: Option<&str>,
    segments: Option<Arc<Segments>>,
    path: &str,
) -> Response<Body> {
    let content = match answer {
        NarAnswer::Found(content) => content,
        NarAnswer::Missing => return text(StatusCode::NOT_FOUND, "not in any upstream's view\n"),
        NarAnswer::Failed(failure) => return failed(path, &failure),
    };
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/x-nix-nar")
        .header(header::ACCEPT_RANGES, "bytes");
    match content {
        Content::Head(len) => with_length(builder, len).body(body::empty()).unwrap(),
        Content::Stream(len, rx) => with_length(builder, len)
            .body(body::stream(rx, site.metrics.served()))
            .unwrap(),
        // From the page cache straight to the socket where the connection can (HTTP/1), read
        // through our buffers otherwise.
        Content::Filling(len, reader) => {
            let body = match (segments, reader.file()) {
                (Some(segments), Ok(file)) => {
                    let pieces = reader.pieces(sendfile::CHUNK);
                    FollowBody::new(file, pieces, len, segments, site.metrics.served()).boxed()
                }
                _ => body::stream(reader.stream(), site.metrics.served()),
            };
            with_length(builder, len).body(body).unwrap()
        }
        Content::File(file, size) => {
            let file_body = |start, end| match segments {
                Some(segments) => {
                    FileBody::new(file, (start, end), segments, site.metrics.served()).boxed()
                }
                None => body::stream(stream_file(file, start, end), site.metrics.served()),
            };
            match parse_range(range, size) {
                Ok(None) => builder
                    .header(header::CONTENT_LENGTH, size)
                    .body(file_body(0, size))
                    .unwrap(),
                Ok(Some((start, end))) => builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_LENGTH, end - start)
                    .header(
                        header::CONTENT_RANGE,
                        format!("bytes {start}-{}/{size}", end - 1),
                    )
                    .body(file_body(start, end))
                    .unwrap(),
                Err(Unsatisfiable) => Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(body::empty())
                    .unwrap(),
            }
        }
    }
}

fn with_length(builder: http::response::Builder, len: Option<u64>) -> http::response::Builder {
    match len {
        Some(len) => builder.header(header::CONTENT_LENGTH, len),
        None => builder,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// One `bytes=` range as `[start, end)`. `Ok(None)`: no or an ignorable header (multiple
/// ranges are answered with the whole file, which RFC 9110 allows).
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let suffix: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if suffix == 0 {
            return Err(Unsatisfiable);
        }
        (size.saturating_sub(suffix), size)
    } else {
        let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| Unsatisfiable)?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if range.0 >= range.1 {
        return Err(Unsatisfiable);
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::{parse_range, Unsatisfiable};

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Ok(Some((0, 5))));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some((5, 10))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 10))));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some((8, 10))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
    }
}
