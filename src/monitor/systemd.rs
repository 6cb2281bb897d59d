//! systemd's readiness protocol (sd_notify(3)) without libsystemd: one
//! datagram to `$NOTIFY_SOCKET` per state change. Nothing happens when egret
//! does not run under systemd.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

use tracing::debug;

pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket (the usual case): "@name".
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        debug!("sd_notify({state:?}): {e}");
    }
}
