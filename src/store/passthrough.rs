//! Serving a NAR the cache cannot take (disk full, no narinfo known): the bytes go straight
//! to the client, still verified, and the stream is cut on a mismatch.

use bytes::Bytes;
use tokio::sync::mpsc;

use super::check::Verifier;
use super::fill::ChunkSink;
use super::read::ByteStream;
use super::Expected;
use super::{CheckError, SinkError, Store};

/// Pass-through for when the cache cannot take the file (disk full, no narinfo known):
/// verifies what it can and aborts the client's stream on a mismatch.
pub struct PassThrough {
    store: Store,
    check: Option<Verifier>,
    /// The length told to the client, a hard cap; and what came so far.
    length: Option<u64>,
    received: u64,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    /// The latest chunk, held back until the next one arrives or the check passes, so a
    /// wrong NAR never reaches the client whole.
    held: Option<Bytes>,
}

impl PassThrough {
    /// Refuses a NAR whose narinfo promises what cannot be checked (an unknown compression
    /// without FileHash): nothing a narinfo named passes unverified.
    pub fn new(
        store: &Store,
        expected: Option<&Expected>,
        length: Option<u64>,
    ) -> Result<(PassThrough, ByteStream), CheckError> {
        let (tx, rx) = mpsc::channel(4);
        let check = expected.map(Verifier::start).transpose()?;
        Ok((
            PassThrough {
                store: store.clone(),
                check,
                length,
                received: 0,
                tx,
                held: None,
            },
            rx,
        ))
    }

    /// Ends the stream: `failed` says why the upstream body did not come whole, if it did not.
    pub async fn finish(mut self, failed: Option<String>) {
        let outcome = match failed {
            Some(reason) => Err(reason),
            None => match self.length {
                Some(length) if length != self.received => Err(format!(
                    "upstream sent {} bytes of the {length} announced",
                    self.received
                )),
                _ => Ok(()),
            },
        };
        let outcome = match (outcome, self.check.take()) {
            (Ok(()), Some(check)) => check.finish().await.map(drop).map_err(|e| {
                self.store.count_verification_failure();
                e.to_string()
            }),
            (outcome, _) => outcome,
        };
        let last = match outcome {
            Ok(()) => match self.held.take() {
                Some(chunk) => Ok(chunk),
                None => return,
            },
            Err(reason) => {
                tracing::warn!(reason, "pass-through NAR failed");
                Err(std::io::Error::other(reason))
            }
        };
        let _ = self.tx.send(last).await;
    }
}

impl ChunkSink for PassThrough {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.received += chunk.len() as u64;
        if let Some(length) = self.length.filter(|l| self.received > *l) {
            self.store.count_verification_failure();
            return Err(SinkError::Overlong(length));
        }
        if let Some(check) = &mut self.check {
            check
                .update(chunk.clone())
                .await
                .inspect_err(|_| self.store.count_verification_failure())?;
        }
        match self.held.replace(chunk) {
            Some(previous) => self
                .tx
                .send(Ok(previous))
                .await
                .map_err(|_| SinkError::ClientGone),
            None => Ok(()),
        }
    }
}
