//! The compressions Nix writes NARs in (none, xz, bzip2, zstd, gzip, br), as writers that
//! decompress into a sink: the NarHash check (`nar_check.rs`) and push's NAR feed use them.

use std::io::Write;

/// Why no decoder could be made.
#[derive(Debug, thiserror::Error)]
pub enum Undecodable {
    #[error("`{0}` is not a compression Nix writes (none, xz, bzip2, zstd, gzip, br)")]
    Unknown(String),
    #[error("cannot start decompressing: {0}")]
    Broken(String),
}

/// A writer that decompresses what it is given into `sink`. `flush` ends the stream: it
/// fails if the stream was cut short.
pub fn decoder<W: Write + Send + 'static>(
    compression: &str,
    sink: W,
) -> Result<Box<dyn Write + Send>, Undecodable> {
    Ok(match compression {
        "none" | "" => Box::new(sink),
        "xz" => Box::new(FinishOnDrop(Some(xz2::write::XzDecoder::new(sink)))),
        "bzip2" => Box::new(BzipWriter {
            state: bzip2::Decompress::new(false),
            out: vec![0; 64 * 1024],
            sink,
            ended: false,
        }),
        "zstd" => Box::new(
            zstd::stream::write::Decoder::new(sink)
                .map_err(|e| Undecodable::Broken(e.to_string()))?,
        ),
        "gzip" => Box::new(FinishOnDrop(Some(flate2::write::GzDecoder::new(sink)))),
        "br" => Box::new(FinishOnDrop(Some(brotli::DecompressorWriter::new(
            sink,
            64 * 1024,
        )))),
        other => return Err(Undecodable::Unknown(other.to_string())),
    })
}

/// The xz write-decoder flushes its tail on `finish`; dropping calls it.
struct FinishOnDrop<W: Finish>(Option<W>);

trait Finish: Write {
    fn finish_stream(self) -> std::io::Result<()>;
}

impl<W: Write> Finish for flate2::write::GzDecoder<W> {
    fn finish_stream(self) -> std::io::Result<()> {
        self.finish().map(drop)
    }
}

impl<W: Write> Finish for brotli::DecompressorWriter<W> {
    fn finish_stream(self) -> std::io::Result<()> {
        self.into_inner()
            .map(drop)
            .map_err(|_| std::io::Error::other("brotli stream is truncated"))
    }
}

impl<W: Write> Finish for xz2::write::XzDecoder<W> {
    fn finish_stream(mut self) -> std::io::Result<()> {
        self.finish().map(drop)
    }
}

/// bzip2 through its low-level API: `bzip2::write::BzDecoder` spins forever when dropped
/// after a truncated stream, and truncated streams are exactly what lying upstreams send.
struct BzipWriter<W> {
    state: bzip2::Decompress,
    out: Vec<u8>,
    sink: W,
    ended: bool,
}

impl<W: Write> Write for BzipWriter<W> {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let total = buf.len();
        loop {
            let (in_before, out_before) = (self.state.total_in(), self.state.total_out());
            let status = self
                .state
                .decompress(buf, &mut self.out)
                .map_err(std::io::Error::other)?;
            let consumed = (self.state.total_in() - in_before) as usize;
            let produced = (self.state.total_out() - out_before) as usize;
            self.sink.write_all(&self.out[..produced])?;
            buf = &buf[consumed..];
            self.ended |= status == bzip2::Status::StreamEnd;
            if self.ended && !buf.is_empty() {
                return Err(std::io::Error::other(
                    "bytes after the end of the bzip2 stream",
                ));
            }
            if (buf.is_empty() && produced < self.out.len()) || (consumed == 0 && produced == 0) {
                return Ok(total);
            }
        }
    }
    /// Called once at the end: the stream must have reached its end marker.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.ended {
            Ok(())
        } else {
            Err(std::io::Error::other("bzip2 stream is truncated"))
        }
    }
}

impl<W: Finish> Write for FinishOnDrop<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.as_mut().expect("not finished").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.take() {
            Some(inner) => inner.finish_stream(),
            None => Ok(()),
        }
    }
}

impl<W: Finish> Drop for FinishOnDrop<W> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            let _ = inner.finish_stream();
        }
    }
}
