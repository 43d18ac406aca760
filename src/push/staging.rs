//! The staging directory's books: which files Nix uploaded are kept, the room each holds in
//! the cache's budget, the files a narinfo PUT is checking (claimed), and the sweeps that
//! remove what no queued path needs.

use std::collections::HashSet;
use std::time::Duration;

use super::{staged_file, Pusher};

/// A staged file with no narinfo for this long is an abandoned upload, and is removed.
pub(super) const ORPHAN_AFTER: Duration = Duration::from_secs(600);

impl Pusher {
    /// Keeps `file` staged until the guard is dropped (see `claimed`).
    pub(super) fn claim(&self, file: &str) -> Claim<'_> {
        *self
            .claimed
            .lock()
            .unwrap()
            .entry(file.to_string())
            .or_default() += 1;
        Claim {
            pusher: self,
            file: file.to_string(),
        }
    }

    /// Counts a newly staged file against the cache's budget until it is removed.
    pub(super) fn keep_staged(&self, file: &str, held: crate::store::Held) {
        self.staged.lock().unwrap().insert(file.to_string(), held);
    }

    /// Removes a staged file and gives its room back.
    pub(super) fn unstage(&self, file: &str) {
        let _ = std::fs::remove_file(self.staging.join(file));
        self.staged.lock().unwrap().remove(file);
    }

    /// Bytes of staged files.
    pub fn staged_bytes(&self) -> u64 {
        self.staged
            .lock()
            .unwrap()
            .values()
            .map(|h| h.bytes())
            .sum()
    }

    /// Counts the staged files found at start-up against the cache's budget.
    pub(super) fn hold_staged_files(&self) {
        let Ok(dir) = std::fs::read_dir(&self.staging) else {
            return;
        };
        for file in dir.flatten() {
            let (Ok(meta), Some(name)) =
                (file.metadata(), file.file_name().to_str().map(String::from))
            else {
                continue;
            };
            let held = self.store.hold_existing(meta.len());
            self.keep_staged(&name, held);
        }
    }

    /// Removes staged files that no queued path needs and whose narinfo did not come within
    /// [`ORPHAN_AFTER`] (an upload Nix abandoned).
    pub(super) fn remove_orphans(&self) {
        let needed: HashSet<String> = {
            let state = self.state.lock().unwrap();
            state
                .live
                .values()
                .filter_map(|l| staged_file(&l.entry).cloned())
                .collect()
        };
        let files: Vec<String> = self.staged.lock().unwrap().keys().cloned().collect();
        for file in files {
            let age = std::fs::metadata(self.staging.join(&file))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            let claimed = self.claimed.lock().unwrap().contains_key(&file);
            if !needed.contains(&file) && !claimed && age.is_none_or(|a| a >= ORPHAN_AFTER) {
                tracing::info!(file, "removing an uploaded NAR whose narinfo never came");
                self.unstage(&file);
            }
        }
    }

    /// Removes staged files no queued path needs (a NAR whose narinfo never came).
    pub(super) fn remove_stray_files(&self) {
        let state = self.state.lock().unwrap();
        let needed: HashSet<&str> = state
            .live
            .values()
            .filter_map(|l| staged_file(&l.entry).map(String::as_str))
            .collect();
        let Ok(dir) = std::fs::read_dir(&self.staging) else {
            return;
        };
        for file in dir.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if !needed.contains(name.as_str()) {
                let _ = std::fs::remove_file(file.path());
            }
        }
    }
}

pub(super) struct Claim<'a> {
    pusher: &'a Pusher,
    file: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claimed = self.pusher.claimed.lock().unwrap();
        if let Some(n) = claimed.get_mut(&self.file) {
            *n -= 1;
            if *n == 0 {
                claimed.remove(&self.file);
            }
        }
    }
}
