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
