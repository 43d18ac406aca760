//! The few operating-system calls the standard library does not offer, as safe functions.
//! The only module allowed `unsafe` (the crate denies it everywhere else): each block is a
//! plain syscall whose arguments are checked here.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Lets a write to a closed pipe end the process quietly, as command-line tools do (Rust
/// ignores SIGPIPE by default, which turns `nix-sidecar ... | head` into an error).
pub fn die_quietly_on_closed_pipes() {
    // SAFETY: restoring a signal's default disposition; no handler is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Two malloc arenas, not one per thread that ever allocated, and large buffers mapped and
/// unmapped whole. Call before other threads exist (glibc reads these when arenas are made).
pub fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
    }
}

/// Hands free heap memory back to the system (glibc keeps it otherwise).
pub fn trim_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit on open files to the hard limit.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a properly initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Lowers the calling thread's scheduling priority to the lowest (nice 19).
pub fn lower_this_threads_priority() {
    // SAFETY: changes only this thread's own priority.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
    }
}

/// Appends exactly `len` bytes read at `pos` to `buf` (whose capacity it uses without zeroing
/// it first).
pub fn read_exact_at(file: &File, pos: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
    let start = buf.len();
    buf.reserve(len);
    while buf.len() < start + len {
        let (filled, offset) = (buf.len(), pos + (buf.len() - start) as u64);
        let spare = &mut buf.spare_capacity_mut()[..start + len - filled];
        // SAFETY: pread writes at most `spare.len()` bytes into the spare capacity, which is
        // owned, allocated memory.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                offset as libc::off_t,
            )
        };
        match read {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            // SAFETY: pread initialised exactly `n` bytes after `filled`.
            n if n > 0 => unsafe { buf.set_len(filled + n as usize) },
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Sends up to `count` bytes of `file` from `*offset` to `socket` in the kernel, advancing
/// `offset`; the bytes sent.
pub fn sendfile(
    socket: &impl AsRawFd,
    file: &File,
    offset: &mut u64,
    count: usize,
) -> io::Result<usize> {
    let mut off = *offset as libc::off_t;
    // SAFETY: both descriptors are open for the duration of the call; the kernel reads from
    // the file and writes to the socket, touching none of our memory except `off`.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    *offset = off as u64;
    Ok(n as usize)
}

/// Free bytes for unprivileged users on the file system holding `dir`.
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data, for which all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}
