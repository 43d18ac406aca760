//! `nix copy --to http://127.0.0.1:37515`: Nix uploads each NAR file (`PUT /nar/<file>`),
//! then its narinfo (`PUT /<hash>.narinfo`). The file is kept in the staging directory as it
//! comes; the narinfo is checked against it (FileHash/FileSize of the file, NarHash/NarSize
//! of the NAR inside), the NAR joins the local cache (so local pulls hit at once), and the
//! path is queued. Nix hears 200 only once the queue has it on disk. What is refused is a
//! [`Refusal`]; the listener says which status that is.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256 as Hasher};
use std::io::Read;

use super::info::PathInfo;
use super::queue::Origin;
use super::{Pusher, Refusal};
use crate::nix::nar_check::{check_nar, CheckError, Expected};
use crate::nix::narinfo::NarInfo;
use crate::nix::request::is_file_name;
use crate::store::{NarSource, NewNarInfo};

/// A staged upload must move at least this fast on average (after the first minute), so a
/// body trickling a byte now and then cannot hold its connection and its room for ever.
const MIN_UPLOAD_RATE: u64 = 256 * 1024;
const UPLOAD_GRACE: Duration = Duration::from_secs(60);

impl Pusher {
    /// Whether Nix need not upload `nar/<file>`: it is staged, or in the local cache.
    pub fn has_nar(&self, file: &str) -> bool {
        is_file_name(file)
            && (self.staging.join(file).is_file()
                || self.store.stored(&format!("nar/{file}")).is_some())
    }

    /// Keeps the body of `PUT /nar/<file>` (of `length` bytes, from its Content-Length) in the
    /// staging directory, counted against the cache's limits. A file of that name already
    /// staged is never replaced: what a narinfo was checked against is what gets uploaded.
    pub async fn put_nar<B>(
        &self,
        file: &str,
        length: Option<u64>,
        mut body: B,
    ) -> Result<(), Refusal>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        if !is_file_name(file) {
            return Err(Refusal::invalid("not a NAR file name"));
        }
        let length = length.ok_or(Refusal::NoLength)?;
        let held = self.hold_staging(length)?;
        let tmp = self.staging_tmp(file);
        let deadline = UPLOAD_GRACE + Duration::from_secs(length / MIN_UPLOAD_RATE);
        let result: Result<bool, Refusal> = async {
            use tokio::io::AsyncWriteExt;
            let mut out = private_file(&tmp)
                .await
                .map_err(|e| Refusal::failed(format!("cannot stage the upload: {e}")))?;
            let mut written = 0u64;
            let receive = async {
                while let Some(frame) = body.frame().await {
                    let frame = frame
                        .map_err(|e| Refusal::invalid(format!("the upload broke off: {e}")))?;
                    if let Ok(data) = frame.into_data() {
                        written += data.len() as u64;
                        if written > length {
                            return Err(Refusal::invalid(
                                "the body is longer than its Content-Length",
                            ));
                        }
                        out.write_all(&data).await.map_err(|e| {
                            Refusal::failed(format!("cannot stage the upload: {e}"))
                        })?;
                    }
                }
                Ok(())
            };
            tokio::time::timeout(deadline, receive)
                .await
                .map_err(|_| Refusal::TooSlow(deadline.as_secs()))??;
            if written != length {
                return Err(Refusal::invalid(format!(
                    "{written} bytes came of {length}"
                )));
            }
            drop(out);
            let (from, to) = (tmp.clone(), self.staging.join(file));
            tokio::task::spawn_blocking(move || publish_new(&from, &to))
                .await
                .map_err(Refusal::failed)?
                .map_err(|e| Refusal::failed(format!("cannot stage the upload: {e}")))
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        if result? {
            self.keep_staged(file, held);
        }
        Ok(())
    }

    /// Room for `bytes` more staged bytes: within the staging cap and the cache's limits.
    fn hold_staging(&self, bytes: u64) -> Result<crate::store::Held, Refusal> {
        let full = Refusal::NoRoom;
        let staged = self.staged_bytes();
        let cap = self.store.limits().max_size / 2;
        if staged.saturating_add(bytes) > cap {
            return Err(full(format!(
                "uploads waiting to be pushed hold {staged} bytes; {bytes} more would pass the staging cap of {cap} (half of max-cache-size)"
            )));
        }
        self.store
            .hold(bytes)
            .map_err(|e| full(format!("cannot stage {bytes} bytes: {e}")))
    }

    /// A fresh temporary name for `file` in the staging directory.
    fn staging_tmp(&self, file: &str) -> PathBuf {
        self.staging
            .join(format!(".tmp-{}-{file}", fastrand::u64(..)))
    }

    /// Checks the narinfo of `PUT /<hash>.narinfo` (its body, `text`) against the staged NAR,
    /// caches both (when the narinfo is one a pull would trust) and queues the path for
    /// `targets`.
    pub async fn put_narinfo(
        &self,
        hash: &str,
        text: Bytes,
        targets: &[std::sync::Arc<super::Target>],
    ) -> Result<(), Refusal> {
        let text = String::from_utf8(text.to_vec())
            .map_err(|_| Refusal::invalid("the narinfo is not UTF-8"))?;
        let mut info =
            NarInfo::parse(text.as_bytes()).map_err(|e| Refusal::invalid(e.to_string()))?;
        if info.hash_part() != hash {
            return Err(Refusal::invalid(format!(
                "the narinfo is for {}, not {hash}",
                info.store_path
            )));
        }
        if info.file_hash.is_none() && info.compression != "none" {
            return Err(Refusal::invalid(
                "a compressed NAR's narinfo needs FileHash",
            ));
        }
        let file = info
            .url
            .strip_prefix("nar/")
            .filter(|f| is_file_name(f))
            .ok_or_else(|| Refusal::invalid(format!("URL `{}` is not nar/<file>", info.url)))?
            .to_string();
        // From here until it is queued, no finished upload takes the file away.
        let _claim = self.claim(&file);
        let staged = self.staging.join(&file);
        if !staged.is_file() {
            self.stage_cached(&info, &file).await?;
        }
        let expected = Expected::from_narinfo(&info);
        let checked = {
            let (staged, expected) = (staged.clone(), expected.clone());
            tokio::task::spawn_blocking(move || check_staged(&staged, &expected))
                .await
                .map_err(Refusal::failed)?
        };
        if let Err(reason) = checked {
            self.unstage(&file);
            return Err(Refusal::invalid(format!(
                "{} does not match this narinfo: {reason}",
                info.url
            )));
        }
        let text = match &self.trust.signer {
            Some(signer) if !self.trust.keys.verify(&info) => {
                let signed = signer.sign_narinfo(&text, &info);
                info = NarInfo::parse(signed.as_bytes()).map_err(Refusal::failed)?;
                signed
            }
            _ => text,
        };
        if self.trust.serves(&info) {
            self.cache_locally(hash, &text, &file, &staged, &expected)
                .await;
        } else {
            tracing::warn!(path = %info.store_path, "a pushed narinfo has no valid signature by a trusted key: queued for upload, not served locally (push-signing-key-file signs local builds)");
        }
        let path = PathInfo::from_narinfo(&info, &text);
        let origin = Origin::Staged {
            file,
            compression: info.compression.clone(),
            narinfo: text,
        };
        self.enqueue(targets, vec![(path, origin)])
            .await
            .map_err(Refusal::failed)?;
        Ok(())
    }

    /// Nix skips the upload of a NAR the listener already has (its HEAD said so): a file in
    /// the local cache is staged from there, and checked like an upload.
    async fn stage_cached(&self, info: &NarInfo, file: &str) -> Result<(), Refusal> {
        let Some((mut cached, size)) = self.store.stored(&format!("nar/{file}")) else {
            return Err(Refusal::invalid(format!(
                "{} was not uploaded before its narinfo (PUT /nar/{file} first)",
                info.url
            )));
        };
        let held = self.hold_staging(size)?;
        let (tmp, to) = (self.staging_tmp(file), self.staging.join(file));
        let staged = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let copied = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut out| std::io::copy(&mut cached, &mut out))
                .and_then(|_| publish_new(&tmp, &to));
            let _ = std::fs::remove_file(&tmp);
            copied
        })
        .await
        .map_err(Refusal::failed)?
        .map_err(|e| Refusal::failed(format!("cannot stage the cached NAR: {e}")))?;
        if staged {
            self.keep_staged(file, held);
        }
        Ok(())
    }

    /// Records the narinfo and stores the NAR in the local cache, as if pulled. A failure
    /// here costs a later local pull a download, nothing more: it is logged, not refused.
    async fn cache_locally(
        &self,
        hash: &str,
        text: &str,
        file: &str,
        staged: &Path,
        expected: &Expected,
    ) {
        let key = format!("nar/{file}");
        let target = &self.targets[0];
        // Where a pull finds the bytes again once evicted: the upstream the path goes to
        // (a plain HTTP cache keeps the name; see docs/push.md for Attic).
        let Some(url) = target.resolve(&key) else {
            return;
        };
        let source = NarSource {
            upstream: target.name.clone(),
            url: url.to_string(),
            expected: expected.clone(),
        };
        let new = NewNarInfo::new(&self.partition, hash, text, &key, source);
        let (store, partition, hash) =
            (self.store.clone(), self.partition.clone(), hash.to_string());
        // Whatever the local cache holds for this path already (an upstream's signed narinfo,
        // or an earlier push) stays: a push adds, it never replaces.
        let recorded = tokio::task::spawn_blocking(move || {
            store.narinfo(&partition, &hash).is_none() && {
                store.put_narinfos(&[new]);
                true
            }
        })
        .await;
        if !matches!(recorded, Ok(true)) {
            return;
        }
        match std::fs::File::open(staged) {
            Ok(from) => self.store.import(&key, expected, from).await,
            Err(e) => tracing::warn!(nar = %key, error = %e, "could not cache a pushed NAR"),
        }
    }
}

/// Makes the fully written `tmp` the staged file `to`, durably (the queue will point at that
/// name), unless `to` exists: a staged file is never replaced (a link, unlike a rename, fails
/// on an existing name). Whether `to` is the new file; `tmp` is left for the caller to remove.
fn publish_new(tmp: &Path, to: &Path) -> std::io::Result<bool> {
    std::fs::File::open(tmp)?.sync_all()?;
    match std::fs::hard_link(tmp, to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(true)
}

/// A new file only this process's user can read.
async fn private_file(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
}

/// FileHash/FileSize of the file as uploaded, then NarHash/NarSize of the NAR inside.
fn check_staged(path: &Path, expected: &Expected) -> Result<(), CheckError> {
    let read = |e: std::io::Error| CheckError::Read(e.to_string());
    let mut file = std::fs::File::open(path).map_err(read)?;
    let (mut hasher, mut len, mut buf) = (Hasher::new(), 0u64, vec![0u8; 256 * 1024]);
    loop {
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
    if let Some(size) = expected.file_size.filter(|s| *s != len) {
        return Err(CheckError::WrongSize {
            sent: len,
            field: "FileSize",
            size,
        });
    }
    let sha: [u8; 32] = hasher.finalize().into();
    if expected.file_hash.is_some_and(|h| h.0 != sha) {
        return Err(CheckError::WrongFileHash("FileHash"));
    }
    let mut file = std::fs::File::open(path).map_err(read)?;
    check_nar(&mut file, expected)
}
