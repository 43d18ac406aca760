//! Test doubles and fixtures shared by the integration tests. Everything listens on
//! 127.0.0.1 only, on ephemeral ports.
#![allow(dead_code)]

pub mod attic;
pub mod cloud;
pub mod http;
pub mod issuer;
pub mod nix;
pub mod proxy;
pub mod sidecar;
pub mod spiffe;
pub mod tls;
pub mod upstream;
pub mod world;

/// A loopback address that refuses connections for as long as the test process runs: a socket
/// bound there that never listens. Binding a listener and dropping it would free the port for
/// the next ephemeral bind, and a double of a test running in parallel could then answer on it.
pub fn refusing_addr() -> std::net::SocketAddr {
    held_loopback_socket(false)
}

/// A loopback port kept for a daemon of this test to listen on, even across its restarts: as
/// [`refusing_addr`], bound with SO_REUSEADDR, so the daemon (tokio sets it too) may bind and
/// listen beside it while no ephemeral bind of a test running in parallel is given the port.
pub fn reserved_port() -> u16 {
    held_loopback_socket(true).port()
}

/// Binds a TCP socket on 127.0.0.1 that never listens and is never closed.
fn held_loopback_socket(reuseaddr: bool) -> std::net::SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(reuseaddr).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

/// The bytes of the files directly in `dir` (0 when it cannot be read).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Raises this process's open-file limit to its hard limit (tests that hold many sockets need
/// it; nix-sidecar raises its own); the limit now in force.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

/// Spawns `command`, trying again while its program is "busy": a binary this test process has
/// just copied (to run it as another user, or in another root) may still be open for writing in
/// a child that another test thread forked at that moment, until that child execs.
pub fn spawn_copied(command: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The bytes of the cache's files (`tmp/`, then `nars/`), each file once. Two directory
/// listings are not one instant, so the order matters: listing `nars/` first counted a file
/// an eviction removed right after, plus the new download the freed room went to in `tmp/`
/// (a 10-minute soak saw 64 bytes over the limit that way, while the daemon's own count and
/// the files at the end agreed). Listed `tmp/` first, a file is counted at most once, by
/// inode, however it moves meanwhile.
pub fn cache_bytes(cache: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut sizes = std::collections::HashMap::new();
    for dir in ["tmp", "nars"] {
        let Ok(entries) = std::fs::read_dir(cache.join(dir)) else {
            continue;
        };
        for meta in entries.filter_map(|e| e.ok()?.metadata().ok()) {
            let size = sizes.entry(meta.ino()).or_insert(0);
            *size = meta.len().max(*size);
        }
    }
    sizes.values().sum()
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
