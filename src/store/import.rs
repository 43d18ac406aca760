//! Taking a NAR file that is already on this machine (an upload staged by push) into the
//! cache, as if it had been downloaded.

use std::fs::File;

use super::{Expected, Slot, Store};
use crate::store::ChunkSink;

impl Store {
    /// Stores `file` (a NAR file exactly as served) as the NAR `key`, checked against
    /// `expected` like a download. It is a fill like any other, fed from the file: pulls of
    /// `key` meanwhile join it, the file is read and the index committed on blocking threads,
    /// and a key already stored (or being stored) is left as it is. A failure is logged: it
    /// costs a later pull a download, nothing more.
    pub async fn import(&self, key: &str, expected: &Expected, file: File) {
        let len = match file.metadata() {
            Ok(meta) => meta.len(),
            Err(e) => return tracing::warn!(nar = %key, error = %e, "cannot import a NAR"),
        };
        let Slot::Lead(mut writer, _reader) = self.fill(key, expected) else {
            return; // stored already, or being stored, or no room
        };
        if let Err(reason) = writer.start(Some(len)) {
            return writer.fail(&reason.to_string());
        }
        let mut chunks = super::stream_file(file, 0, len);
        while let Some(chunk) = chunks.recv().await {
            let written = match chunk {
                Ok(chunk) => writer.write(chunk).await.map_err(|e| e.to_string()),
                Err(e) => Err(format!("reading the file to import: {e}")),
            };
            if let Err(reason) = written {
                return writer.fail(&reason);
            }
        }
        writer.finish().await;
    }
}
