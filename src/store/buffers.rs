//! Reused buffers for NAR bytes. A fresh buffer per chunk costs a page fault and a zeroed page
//! per 4 KiB when it is first written: a tenth of the CPU of both the warm read path and the
//! cold fill path when measured. Buffers come back here once the last `Bytes` of them drops.

use std::sync::Mutex;

use bytes::Bytes;

static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// At most this many spare buffers are kept (4 MiB at the usual size).
const SPARE_LIMIT: usize = 16;
/// Every buffer gets at least this capacity (a fill's chunk), so any spare one fits any use
/// without growing. Larger, and every download in flight held a MiB or more.
const CAPACITY: usize = 256 * 1024;

/// An empty buffer with room for at least `len` bytes, reused if one is spare.
pub fn take(len: usize) -> Vec<u8> {
    let mut buf = SPARE.lock().unwrap().pop().unwrap_or_default();
    buf.clear();
    buf.reserve(len.max(CAPACITY));
    buf
}

/// The buffer's bytes; the buffer goes back to the spares when the last clone drops.
pub fn freeze(buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Loaned(buf))
}

struct Loaned(Vec<u8>);

impl AsRef<[u8]> for Loaned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Loaned {
    fn drop(&mut self) {
        let mut spare = SPARE.lock().unwrap();
        if spare.len() < SPARE_LIMIT {
            spare.push(std::mem::take(&mut self.0));
        }
    }
}

/// Hands memory freed after a burst of downloads back to the system. glibc keeps freed heap
/// memory for reuse, so RSS stayed at its peak long after the load ended; this trims it, at
/// most once a second, when the last download ends.
pub fn trim_when_idle() {
    #[cfg(target_env = "gnu")]
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = crate::clock::unix_now();
        if LAST.swap(now, Ordering::Relaxed) != now {
            let trim = crate::sys::trim_malloc;
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(trim)),
                Err(_) => trim(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_stay_readable_while_a_slice_lives_and_spares_come_back_empty() {
        let mut buf = take(10);
        buf.extend_from_slice(b"hello");
        let bytes = freeze(buf);
        let part = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(&part[..], b"el");
        drop(part);
        let again = take(2 * CAPACITY);
        assert!(again.is_empty() && again.capacity() >= 2 * CAPACITY);
    }
}
