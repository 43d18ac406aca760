//! SPIFFE Workload API: a JWT-SVID for the audience from the local agent (SPIRE, or any
//! implementation of the API), over gRPC on a unix socket.
//!
//! The one call needed is unary, `SpiffeWorkloadAPI/FetchJWTSVID` with
//! `JWTSVIDRequest { repeated string audience = 1; string spiffe_id = 2; }` answered by
//! `JWTSVIDResponse { repeated JWTSVID svids = 1; }`, `JWTSVID { string spiffe_id = 1;
//! string svid = 2; string hint = 3; }`. gRPC is HTTP/2 with length-prefixed messages and the
//! status in trailers, so it is spoken here with hyper and a few lines of protobuf instead of
//! a gRPC stack (tonic, prost, a build script) for two messages. Every call carries the
//! `workload.spiffe.io: true` metadata the API requires (agents refuse calls without it).

use super::FetchError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::RawToken;
use crate::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ANSWER: usize = 1024 * 1024;
pub const METHOD_PATH: &str = "/SpiffeWorkloadAPI/FetchJWTSVID";

/// The socket from the configuration, else `SPIFFE_ENDPOINT_SOCKET` (`unix:///path` or
/// `unix:/path`, as the SPIFFE spec writes it).
pub fn socket_path(configured: Option<&Path>) -> Result<PathBuf, FetchError> {
    if let Some(path) = configured {
        return Ok(path.to_path_buf());
    }
    let value = std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| {
        FetchError::NoToken(
            "SPIFFE_ENDPOINT_SOCKET is not set and no `socket` is configured".into(),
        )
    })?;
    parse_endpoint(&value)
}

fn parse_endpoint(value: &str) -> Result<PathBuf, FetchError> {
    let path = value
        .strip_prefix("unix://")
        .or_else(|| value.strip_prefix("unix:"))
        .ok_or_else(|| {
            FetchError::NoToken(format!(
                "SPIFFE_ENDPOINT_SOCKET `{value}` is not a unix: address (tcp is not supported)"
            ))
        })?;
    if !path.starts_with('/') {
        return Err(FetchError::NoToken(format!(
            "SPIFFE_ENDPOINT_SOCKET `{value}` does not name an absolute path"
        )));
    }
    Ok(PathBuf::from(path))
}

pub async fn fetch(socket: Option<&Path>, audience: &str) -> Result<RawToken, FetchError> {
    let path = socket_path(socket)?;
    tokio::time::timeout(TIMEOUT, fetch_from(&path, audience))
        .await
        .map_err(|_| {
            FetchError::NoToken(format!(
                "the SPIFFE Workload API at {} did not answer within {}s",
                path.display(),
                TIMEOUT.as_secs()
            ))
        })?
}

async fn fetch_from(path: &Path, audience: &str) -> Result<RawToken, FetchError> {
    let shown = path.display();
    let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        FetchError::NoToken(format!(
            "cannot reach the SPIFFE Workload API at {shown}: {e}"
        ))
    })?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| {
                FetchError::NoToken(format!("SPIFFE Workload API at {shown}: HTTP/2: {e}"))
            })?;
    tokio::spawn(connection);
    let request = hyper::Request::post(format!("http://localhost{METHOD_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("workload.spiffe.io", "true")
        .body(Full::new(frame(&jwt_svid_request(audience))))
        .map_err(|e| FetchError::NoToken(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| FetchError::NoToken(format!("SPIFFE Workload API at {shown}: {e}")))?;
    let (parts, body) = response.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| {
            FetchError::NoToken(format!(
                "SPIFFE Workload API at {shown}: reading the answer: {e}"
            ))
        })?;
    // A failing call may answer with headers only ("trailers-only"); else the status is in
    // the trailers.
    let status_from = |map: &http::HeaderMap| {
        map.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = status_from(&trailers).or_else(|| status_from(&parts.headers));
    if parts.status != http::StatusCode::OK {
        return Err(FetchError::NoToken(format!(
            "SPIFFE Workload API at {shown} answered HTTP {}",
            parts.status
        )));
    }
    match status.as_deref() {
        Some("0") => {}
        Some(code) => {
            let message = trailers
                .get("grpc-message")
                .or_else(|| parts.headers.get("grpc-message"))
                .and_then(|v| v.to_str().ok())
                .map(percent_decode)
                .unwrap_or_default();
            let hint = if code == "7" {
                " (is this workload registered with an entry that matches it?)"
            } else {
                ""
            };
            return Err(FetchError::NoToken(format!(
                "SPIFFE Workload API refused FetchJWTSVID: gRPC status {code} {message}{hint}"
            )));
        }
        None => {
            return Err(FetchError::NoToken(
                "SPIFFE Workload API answered without a gRPC status".into(),
            ))
        }
    }
    let message = unframe(&collected.to_bytes())?;
    let svid = first_svid(&message)?;
    super::jwt::claims(&svid)
        .map_err(|e| FetchError::NoToken(format!("SPIFFE Workload API: the JWT-SVID: {e}")))?;
    Ok(RawToken::new(Secret::new(svid)))
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("m={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| crate::http::snippet(v.as_bytes()))
        .unwrap_or_default()
}

/// A gRPC message on the wire: uncompressed flag, big-endian length, the message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The one message of a unary answer.
pub fn unframe(body: &[u8]) -> Result<Bytes, FetchError> {
    if body.len() < 5 {
        return Err(FetchError::NoToken(
            "SPIFFE Workload API answered no message".into(),
        ));
    }
    if body[0] != 0 {
        return Err(FetchError::NoToken(
            "SPIFFE Workload API answered a compressed message".into(),
        ));
    }
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let message = body.get(5..5 + length).ok_or(FetchError::NoToken(
        "SPIFFE Workload API answered a truncated message".into(),
    ))?;
    Ok(Bytes::copy_from_slice(message))
}

pub fn jwt_svid_request(audience: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, audience.as_bytes());
    out
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The fields of a protobuf message as (number, bytes) for the length-delimited ones;
/// others are skipped.
pub fn length_delimited_fields(mut data: &[u8]) -> Result<Vec<(u64, &[u8])>, FetchError> {
    fn varint(data: &mut &[u8]) -> Result<u64, FetchError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = data
                .split_first()
                .ok_or(FetchError::NoToken("truncated protobuf varint".into()))?;
            *data = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(FetchError::NoToken("protobuf varint too long".into()))
    }
    let mut fields = Vec::new();
    while !data.is_empty() {
        let key = varint(&mut data)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut data)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let length = varint(&mut data)? as usize;
                let value = data
                    .get(..length)
                    .ok_or(FetchError::NoToken("truncated protobuf field".into()))?;
                fields.push((key >> 3, value));
                length
            }
            other => {
                return Err(FetchError::NoToken(format!(
                    "protobuf wire type {other} is not expected here"
                )))
            }
        };
        data = data
            .get(skip..)
            .ok_or(FetchError::NoToken("truncated protobuf field".into()))?;
    }
    Ok(fields)
}

/// The `svid` of the first JWT-SVID in a `JWTSVIDResponse`.
fn first_svid(message: &[u8]) -> Result<String, FetchError> {
    let bad = |e: FetchError| {
        FetchError::NoToken(format!(
            "SPIFFE Workload API answered a malformed JWTSVIDResponse: {e}"
        ))
    };
    let first = length_delimited_fields(message)
        .map_err(bad)?
        .into_iter()
        .find(|(field, _)| *field == 1)
        .ok_or(FetchError::NoToken(
            "SPIFFE Workload API answered no JWT-SVID".into(),
        ))?
        .1;
    let svid = length_delimited_fields(first)
        .map_err(bad)?
        .into_iter()
        .find(|(field, _)| *field == 2)
        .ok_or(FetchError::NoToken(
            "SPIFFE Workload API answered a JWT-SVID without its token".into(),
        ))?
        .1;
    String::from_utf8(svid.to_vec())
        .map_err(|_| FetchError::NoToken("the JWT-SVID is not text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_as_the_spec_writes_them() {
        assert_eq!(
            parse_endpoint("unix:///run/spire/agent.sock").unwrap(),
            PathBuf::from("/run/spire/agent.sock")
        );
        assert_eq!(
            parse_endpoint("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert!(parse_endpoint("tcp://127.0.0.1:8081").is_err());
        assert!(parse_endpoint("unix:relative").is_err());
    }

    #[test]
    fn protobuf_round_trip_and_truncation() {
        // JWTSVIDResponse { svids: [JWTSVID { spiffe_id: "spiffe://x/y", svid: "a.b.c", hint: "h" }] }
        let mut svid = Vec::new();
        put_bytes(&mut svid, 1, b"spiffe://x/y");
        put_bytes(&mut svid, 2, b"a.b.c");
        put_bytes(&mut svid, 3, b"h");
        let mut response = Vec::new();
        put_bytes(&mut response, 1, &svid);
        assert_eq!(first_svid(&response).unwrap(), "a.b.c");
        assert!(first_svid(&response[..response.len() - 1]).is_err());
        assert!(first_svid(&[]).is_err());
        let request = jwt_svid_request("https://cache.test");
        assert_eq!(
            length_delimited_fields(&request).unwrap(),
            vec![(1, b"https://cache.test".as_slice())]
        );
        let framed = frame(&request);
        assert_eq!(unframe(&framed).unwrap(), request);
        assert!(unframe(&framed[..framed.len() - 1]).is_err());
    }
}
