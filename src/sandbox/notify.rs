//! systemd notifications (`Type=notify`): READY, STATUS, WATCHDOG, STOPPING.
//! The socket is connected before the sandbox is applied (Landlock scoping
//! would refuse a later connect to an abstract `NOTIFY_SOCKET`).

use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;

static SOCKET: OnceLock<Option<UnixDatagram>> = OnceLock::new();

/// Connects to `$NOTIFY_SOCKET` if set. Call before the sandbox.
pub fn init() {
    SOCKET.get_or_init(|| {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let sock = UnixDatagram::unbound().ok()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let r = if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.connect_addr(&a))
        } else {
            sock.connect(&path)
        };
        r.ok().map(|_| sock)
    });
}

/// Sends one notification (no-op outside systemd).
pub fn notify(state: &str) {
    if let Some(Some(s)) = SOCKET.get() {
        if let Err(e) = s.send(state.as_bytes()) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// The watchdog interval requested by systemd, halved, if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(std::time::Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_to_a_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: single-threaded at this point of this test binary's use of the variable.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        super::init();
        super::notify("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }
}
