//! Reading stored NAR bytes into memory, where `sendfile` (see `server::sendfile`) cannot be
//! used: a client connection without its segments, and readers of a fill that read its file.

use std::fs::File;

use bytes::Bytes;
use tokio::sync::mpsc;

/// What readers receive: chunks, or an error that must abort the client's response.
pub type ByteStream = mpsc::Receiver<std::io::Result<Bytes>>;

/// Chunk size for stored files: larger than a fill's, since the bytes are all there.
const FILE_CHUNK: usize = 256 * 1024;
/// The first chunk is small, so the first bytes leave before a whole chunk is read.
const FIRST_CHUNK: usize = 64 * 1024;

/// Reads exactly `len` bytes at `pos`, into a reused buffer and without zeroing it first.
pub fn read_at(file: &File, pos: u64, len: usize) -> std::io::Result<Bytes> {
    let mut buf = super::buffers::take(len);
    crate::sys::read_exact_at(file, pos, len, &mut buf)?;
    Ok(super::buffers::freeze(buf))
}

/// Streams a stored file (or a byte range of it) from disk: each chunk is read on a short
/// blocking task and sent asynchronously, so no thread waits on a slow client.
pub fn stream_file(file: File, start: u64, end: u64) -> ByteStream {
    let (tx, rx) = mpsc::channel(2);
    let file = std::sync::Arc::new(file);
    tokio::spawn(async move {
        let mut pos = start;
        while pos < end {
            let chunk = if pos == start {
                FIRST_CHUNK
            } else {
                FILE_CHUNK
            };
            let len = (end - pos).min(chunk as u64) as usize;
            let file = file.clone();
            let read = tokio::task::spawn_blocking(move || read_at(&file, pos, len))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let failed = read.is_err();
            if tx.send(read).await.is_err() || failed {
                return;
            }
            pos += len as u64;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn streams_exactly_the_range_asked_for_and_reports_a_short_file() {
        let mut file = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..3 * FILE_CHUNK as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        file.write_all(&bytes).unwrap();
        for (start, end) in [
            (0, bytes.len()),
            (5, FILE_CHUNK + 7),
            (FILE_CHUNK, FILE_CHUNK),
        ] {
            let mut rx = stream_file(file.try_clone().unwrap(), start as u64, end as u64);
            let mut got = Vec::new();
            while let Some(chunk) = rx.recv().await {
                got.extend_from_slice(&chunk.unwrap());
            }
            assert_eq!(got, bytes[start..end], "{start}..{end}");
        }
        let mut rx = stream_file(file, 0, bytes.len() as u64 + 1);
        let mut last = None;
        while let Some(chunk) = rx.recv().await {
            last = Some(chunk);
        }
        assert!(
            last.unwrap().is_err(),
            "a file shorter than promised is an error"
        );
    }
}
