//! `nix copy --to http://127.0.0.1:37515`: Nix uploads each NAR file (`PUT /nar/<file>`),
//! then its narinfo (`PUT /<hash>.narinfo`). The file is kept in the staging directory as it
//! comes; the narinfo is checked against it (FileHash/FileSize of the file, NarHash/NarSize
//! of the NAR inside), the NAR joins the local cache (so local pulls hit at once), and the
//! path is queued. Nix hears 200 only once the queue has it on disk.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256 as Hasher};
use std::io::Read;

use super::info::PathInfo;
use super::queue::Origin;
use super::Pusher;
use crate::nix::narinfo::{NarInfo, MAX_NARINFO_BYTES};
use crate::nix::request::is_file_name;
use crate::store::check::{check_nar, Expected};
use crate::store::fill::ChunkSink;
use crate::store::{NarSource, NewNarInfo, Slot};

pub type Refusal = (StatusCode, String);

fn bad(reason: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, reason.into())
}

fn internal(reason: impl Into<String>) -> Refusal {
    (StatusCode::INTERNAL_SERVER_ERROR, reason.into())
}

impl Pusher {
    /// Whether Nix need not upload `nar/<file>`: it is staged, or in the local cache.
    pub fn has_nar(&self, file: &str) -> bool {
        is_file_name(file)
            && (self.staging.join(file).is_file()
                || self.store.stored(&format!("nar/{file}")).is_some())
    }

    /// Keeps the body of `PUT /nar/<file>` in the staging directory.
    pub async fn put_nar(
        &self,
        file: &str,
        mut body: hyper::body::Incoming,
    ) -> Result<(), Refusal> {
        if !is_file_name(file) {
            return Err(bad("not a NAR file name"));
        }
        let tmp = self.staging_tmp(file);
        let result: Result<(), Refusal> = async {
            use tokio::io::AsyncWriteExt;
            let mut out = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| internal(format!("cannot stage the upload: {e}")))?;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| bad(format!("the upload broke off: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    out.write_all(&data)
                        .await
                        .map_err(|e| internal(format!("cannot stage the upload: {e}")))?;
                }
            }
            drop(out);
            let (from, to) = (tmp.clone(), self.staging.join(file));
            tokio::task::spawn_blocking(move || publish(&from, &to))
                .await
                .map_err(|e| internal(e.to_string()))?
                .map_err(|e| internal(format!("cannot stage the upload: {e}")))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// A fresh temporary name for `file` in the staging directory.
    fn staging_tmp(&self, file: &str) -> PathBuf {
        self.staging
            .join(format!(".tmp-{}-{file}", fastrand::u64(..)))
    }

    /// Checks the narinfo of `PUT /<hash>.narinfo` against the staged NAR, caches both and
    /// queues the path for `targets`.
    pub async fn put_narinfo(
        &self,
        hash: &str,
        body: hyper::body::Incoming,
        targets: &[std::sync::Arc<super::Target>],
    ) -> Result<(), Refusal> {
        let text =
            crate::http::read_limited(body, MAX_NARINFO_BYTES, std::time::Duration::from_secs(30))
                .await
                .map_err(bad)?;
        let text = String::from_utf8(text.to_vec()).map_err(|_| bad("the narinfo is not UTF-8"))?;
        let info = NarInfo::parse(text.as_bytes()).map_err(|e| bad(e.to_string()))?;
        if info.hash_part() != hash {
            return Err(bad(format!(
                "the narinfo is for {}, not {hash}",
                info.store_path
            )));
        }
        let file = info
            .url
            .strip_prefix("nar/")
            .filter(|f| is_file_name(f))
            .ok_or_else(|| bad(format!("URL `{}` is not nar/<file>", info.url)))?
            .to_string();
        let staged = self.staging.join(&file);
        if !staged.is_file() {
            // Nix skips the upload of a NAR the listener already has (its HEAD said so): a
            // file in the local cache is staged from there, and checked like an upload.
            let Some((mut cached, _)) = self.store.stored(&format!("nar/{file}")) else {
                return Err(bad(format!(
                    "{} was not uploaded before its narinfo (PUT /nar/{file} first)",
                    info.url
                )));
            };
            let (tmp, to) = (self.staging_tmp(&file), staged.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let copied = std::fs::File::create(&tmp)
                    .and_then(|mut out| std::io::copy(&mut cached, &mut out))
                    .and_then(|_| publish(&tmp, &to));
                if copied.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                copied
            })
            .await
            .map_err(|e| internal(e.to_string()))?
            .map_err(|e| internal(format!("cannot stage the cached NAR: {e}")))?;
        }
        let expected = Expected::from_narinfo(&info);
        let checked = {
            let (staged, expected) = (staged.clone(), expected.clone());
            tokio::task::spawn_blocking(move || check_staged(&staged, &expected))
                .await
                .map_err(|e| internal(e.to_string()))?
        };
        if let Err(reason) = checked {
            let _ = std::fs::remove_file(&staged);
            return Err(bad(format!(
                "{} does not match this narinfo: {reason}",
                info.url
            )));
        }
        self.cache_locally(hash, &text, &info, &file, &staged, &expected)
            .await;
        let path = PathInfo::from_narinfo(&info, &text);
        let origin = Origin::Staged {
            file,
            compression: info.compression.clone(),
            narinfo: text,
        };
        self.enqueue(targets, vec![(path, origin)])
            .await
            .map_err(internal)?;
        Ok(())
    }

    /// Records the narinfo and stores the NAR in the local cache, as if pulled. A failure
    /// here costs a later local pull a download, nothing more: it is logged, not refused.
    async fn cache_locally(
        &self,
        hash: &str,
        text: &str,
        info: &NarInfo,
        file: &str,
        staged: &Path,
        expected: &Expected,
    ) {
        let key = format!("nar/{file}");
        let source = NarSource {
            upstream: self.targets[0].name.clone(),
            url: key.clone(),
            expected: expected.clone(),
        };
        self.store
            .put_narinfos(&[NewNarInfo::new(&self.partition, hash, text, &key, source)]);
        let Slot::Lead(mut writer, _reader) = self.store.fill(&key, expected) else {
            return; // stored already, or being stored, or no room
        };
        let Ok(mut from) = std::fs::File::open(staged) else {
            return writer.fail("the staged upload vanished");
        };
        let _ = writer.start(expected.file_len().or(info.file_size));
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = writer.write(Bytes::copy_from_slice(&buf[..n])).await {
                        tracing::warn!(nar = %key, error = %e, "could not cache a pushed NAR");
                        return;
                    }
                }
                Err(e) => return writer.fail(&format!("reading the staged upload: {e}")),
            }
        }
        writer.finish().await;
    }
}

/// Makes the fully written `tmp` the staged file `to`, durably: the bytes, then the rename
/// (the queue will point at that name).
fn publish(tmp: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, to)?;
    match to.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// FileHash/FileSize of the file as uploaded, then NarHash/NarSize of the NAR inside.
fn check_staged(path: &Path, expected: &Expected) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let (mut hasher, mut len, mut buf) = (Hasher::new(), 0u64, vec![0u8; 256 * 1024]);
    loop {
        let n = file.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
    if let Some(size) = expected.file_size.filter(|s| *s != len) {
        return Err(format!("it is {len} bytes, FileSize says {size}"));
    }
    let sha: [u8; 32] = hasher.finalize().into();
    if expected.file_hash.is_some_and(|h| h.0 != sha) {
        return Err("its SHA-256 is not FileHash".into());
    }
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    check_nar(&mut file, expected)?;
    Ok(())
}
