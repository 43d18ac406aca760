//! The systemd notify protocol, without a library: readiness, stopping, and watchdog pings as
//! datagrams to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn send(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    // Never block the runtime on a reader that does not keep up: drop the message instead.
    let _ = socket.set_nonblocking(true);
    let target = target.to_string_lossy().into_owned();
    let sent = match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &target),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}

/// The listeners are bound and the cache index is open.
pub fn ready() {
    send("READY=1\nSTATUS=serving");
}

pub fn stopping() {
    send("STOPPING=1");
}

/// Pings the watchdog at half the interval systemd asked for (`WatchdogSec=`), for as long as
/// the runtime's timer keeps running (a wedged runtime stops the pings and gets restarted) and
/// the daemon serves.
pub fn spawn_watchdog(tasks: &crate::tasks::Tasks) {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let interval = Duration::from_micros(usec) / 2;
    tasks.spawn_until_stopped(async move {
        loop {
            send("WATCHDOG=1");
            tokio::time::sleep(interval).await;
        }
    });
}
