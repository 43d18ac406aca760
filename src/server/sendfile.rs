//! NAR bytes on disk go from the page cache to the socket with `sendfile(2)`, without passing
//! through our memory: on the warm path the two copies (file -> buffer -> socket) were two
//! thirds of the CPU, and a herd of clients following one download multiplies them.
//!
//! hyper writes every body itself, so the bytes have to pass through it; they do so as
//! *placeholders*. A body here yields slices of one never-read zeroed region instead of file
//! bytes, and registers with the connection's [`Segments`] which file range each stands for.
//! The connection's stream, [`SendfileStream`], recognises those slices by address when hyper
//! writes them and sends the same number of bytes from the front registered range instead.
//! HTTP/1 writes one connection's bytes in order, so a FIFO of ranges maps every placeholder
//! byte to exactly one file byte. This relies on hyper queueing body chunks as they are (its
//! `writev` strategy, set in `server::connection_builder`) rather than copying them, and on the
//! bodies never yielding more than the length their response announced (hyper would cut the
//! frame and keep the connection). Each segment's placeholders come from its own half of the
//! region, so a placeholder that is not its segment's next byte, or has no range to stand for,
//! is an error that closes the connection: never zeros or another file's bytes on the wire.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::store::{Piece, PieceStream};
use prometheus_client::metrics::counter::Counter;

/// Bytes per placeholder, and so at most per `sendfile` call (nginx's default
/// `sendfile_max_chunk` too): large enough that syscalls do not show, small enough that one
/// fast client does not hold a worker thread for long.
pub const CHUNK: usize = 2 * 1024 * 1024;

/// The placeholder region: two halves, used by a connection's segments in turn, so the
/// address of a placeholder byte says which segment it stands for. Allocated zeroed and
/// never read or written, so it stays untouched virtual memory; only its addresses matter.
static PLACEHOLDER: LazyLock<Bytes> = LazyLock::new(|| Bytes::from(vec![0u8; 2 * CHUNK]));

fn is_placeholder(slice: &[u8]) -> bool {
    let region = PLACEHOLDER.as_ptr_range();
    !slice.is_empty() && region.contains(&slice.as_ptr())
}

/// File ranges standing behind a connection's placeholders, in the order they are written.
#[derive(Default)]
pub struct Segments(Mutex<Queue>);

#[derive(Default)]
struct Queue {
    segments: VecDeque<Segment>,
    /// Segments registered so far: the half of the region the next one uses.
    registered: usize,
}

struct Segment {
    file: Arc<File>,
    pos: u64,
    left: u64,
    /// The address its next placeholder byte must have.
    next: usize,
}

/// What both bodies share: the file their placeholders stand for, and where to register them.
struct Placeholders {
    file: Arc<File>,
    segments: Arc<Segments>,
    served: Counter,
}

impl Placeholders {
    fn new(file: File, segments: Arc<Segments>, served: Counter) -> Placeholders {
        let file = Arc::new(file);
        Placeholders {
            file,
            segments,
            served,
        }
    }

    /// A frame of placeholder bytes for `len` (at most [`CHUNK`]) bytes of the file at `pos`.
    /// Called as the frame goes to hyper, so ranges queue in the order bytes are written.
    fn frame(&self, pos: u64, len: usize) -> Frame<Bytes> {
        let mut queue = self.segments.0.lock().unwrap();
        let start = (queue.registered % 2) * CHUNK;
        queue.registered += 1;
        let slice = PLACEHOLDER.slice(start..start + len);
        queue.segments.push_back(Segment {
            file: self.file.clone(),
            pos,
            left: len as u64,
            next: slice.as_ptr() as usize,
        });
        self.served.inc_by(len as u64);
        Frame::data(slice)
    }
}

/// The range `[pos, end)` of a stored file, as a response body for an HTTP/1 connection.
pub struct FileBody {
    placeholders: Placeholders,
    pos: u64,
    end: u64,
}

impl FileBody {
    pub fn new(
        file: File,
        (pos, end): (u64, u64),
        segments: Arc<Segments>,
        served: Counter,
    ) -> FileBody {
        let placeholders = Placeholders::new(file, segments, served);
        FileBody {
            placeholders,
            pos,
            end,
        }
    }
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.pos == self.end {
            return Poll::Ready(None);
        }
        let len = (self.end - self.pos).min(CHUNK as u64) as usize;
        let frame = self.placeholders.frame(self.pos, len);
        self.pos += len as u64;
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.pos == self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

/// A file still being filled, read along as it becomes readable, as a response body for an
/// HTTP/1 connection. An error in the fill aborts the response; so does a fill that would
/// give more bytes than the response announced (hyper would cut the frame and keep the
/// connection, leaving the rest of its range queued for the next response).
pub struct FollowBody {
    placeholders: Placeholders,
    pieces: PieceStream,
    /// Bytes the response may still carry, when it announced a length.
    left: Option<u64>,
}

impl FollowBody {
    pub fn new(
        file: File,
        pieces: PieceStream,
        length: Option<u64>,
        segments: Arc<Segments>,
        served: Counter,
    ) -> FollowBody {
        let placeholders = Placeholders::new(file, segments, served);
        FollowBody {
            placeholders,
            pieces,
            left: length,
        }
    }
}

impl hyper::body::Body for FollowBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let piece = match ready!(self.pieces.poll_recv(cx)) {
            Some(Ok(piece)) => piece,
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => return Poll::Ready(None),
        };
        let len = piece.size() as u64;
        if let Some(left) = &mut self.left {
            if len > *left {
                return Poll::Ready(Some(Err(io::Error::other(
                    "the file grew past the length announced",
                ))));
            }
            *left -= len;
        }
        Poll::Ready(Some(Ok(match piece {
            Piece::File { pos, len } => self.placeholders.frame(pos, len),
            Piece::Bytes(bytes) => {
                self.placeholders.served.inc_by(bytes.len() as u64);
                Frame::data(bytes)
            }
        })))
    }
}

/// A client connection that writes placeholders as `sendfile` from their registered files.
pub struct SendfileStream {
    tcp: TcpStream,
    segments: Arc<Segments>,
}

impl SendfileStream {
    pub fn new(tcp: TcpStream, segments: Arc<Segments>) -> SendfileStream {
        SendfileStream { tcp, segments }
    }

    /// Sends up to `want` bytes of the front registered file for the placeholder bytes at
    /// `at`. Bytes that are not the front segment's next ones (a frame hyper cut short left
    /// the rest of its range behind) end the connection: never another range's bytes.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        at: *const u8,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        let mut queue = self.segments.0.lock().unwrap();
        let Some(segment) = queue.segments.front_mut() else {
            return Poll::Ready(Err(io::Error::other(
                "placeholder bytes with no file range registered for them",
            )));
        };
        if segment.next != at as usize {
            return Poll::Ready(Err(io::Error::other(
                "placeholder bytes out of step with their file ranges",
            )));
        }
        let want = want.min(segment.left.try_into().unwrap_or(usize::MAX));
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                let mut offset = segment.pos;
                crate::sys::sendfile(&self.tcp, &segment.file, &mut offset, want)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stored file is shorter than its recorded size",
                    )))
                }
                Ok(n) => {
                    segment.pos += n as u64;
                    segment.left -= n as u64;
                    segment.next += n;
                    if segment.left == 0 {
                        queue.segments.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if is_placeholder(buf) {
            return self.poll_sendfile(cx, buf.as_ptr(), buf.len());
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    /// Writes the leading run of ordinary slices with one `writev`, or the leading run of
    /// placeholders with one `sendfile`; hyper calls again for the rest.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let bufs = &bufs[first..];
        if is_placeholder(&bufs[0]) {
            let want = bufs
                .iter()
                .take_while(|b| is_placeholder(b))
                .map(|b| b.len())
                .sum();
            return self.poll_sendfile(cx, bufs[0].as_ptr(), want);
        }
        let ordinary = bufs
            .iter()
            .position(|b| is_placeholder(b))
            .unwrap_or(bufs.len());
        Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..ordinary])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "sendfile_tests.rs"]
mod tests;
