//! Moving a tunnel's bytes. Small messages are copied through a small
//! buffer; once a read fills it (a bulk transfer), the rest of the burst goes
//! socket → pipe → socket with splice(2), so the payload never enters user
//! space. Buffers and pipes exist only while data flows and are dropped when
//! the socket runs dry, so idle tunnels hold neither: 10,000 idle tunnels cost
//! little more than their sockets. An idle timer closes tunnels with no
//! traffic either way.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// How much one splice moves at most (the pipe is grown to this if allowed).
const CHUNK: usize = 1 << 20;
/// A read that fills this is taken as the start of a bulk transfer.
const SMALL: usize = 16 * 1024;

/// Relays until both directions ended, or nothing moved for `idle`.
pub async fn relay(client: &TcpStream, upstream: &TcpStream, idle: Duration) -> io::Result<()> {
    let start = Instant::now();
    let activity = AtomicU64::new(0);
    let both = async {
        tokio::try_join!(
            pump(client, upstream, &activity, start),
            pump(upstream, client, &activity, start)
        )
    };
    tokio::select! {
        r = both => r.map(|_| ()),
        _ = watchdog(&activity, start, idle) => Ok(()),
    }
}

/// One direction. On EOF the write side of `to` is shut down (a half close
/// passes through the tunnel).
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let state = match copy_small(from, to, activity, start).await? {
            Moved::Bulk => splice_burst(from, to, activity, start).await?,
            other => other,
        };
        if state == Moved::End {
            shutdown_write(to);
            return Ok(());
        }
    }
}

/// Where a direction stands after moving what was there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    /// The socket ran dry: wait for it to become readable.
    Dry,
    /// A read filled the small buffer: more is coming, splice it.
    Bulk,
    /// End of stream.
    End,
}

/// Copies through a small buffer until dry, the end, or a full read.
async fn copy_small(
    from: &TcpStream,
    to: &TcpStream,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<Moved> {
    let mut buf = Vec::with_capacity(SMALL);
    loop {
        buf.clear();
        let n = match from.try_read_buf(&mut buf) {
            Ok(0) => return Ok(Moved::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Moved::Dry),
            Err(e) => return Err(e),
        };
        write_all(to, &buf[..n]).await?;
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if n == SMALL {
            return Ok(Moved::Bulk);
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Splices until the socket runs dry or the stream ends.
async fn splice_burst(
    from: &TcpStream,
    to: &TcpStream,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<Moved> {
    let pipe = Pipe::new()?;
    loop {
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        });
        let n = match moved {
            Ok(0) => return Ok(Moved::End),
            Ok(n) => n,
            // Dry: wait for more without holding the pipe.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Moved::Dry),
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn watchdog(activity: &AtomicU64, start: Instant, idle: Duration) {
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let since = start.elapsed().saturating_sub(last);
        if since >= idle {
            return;
        }
        tokio::time::sleep(idle - since).await;
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves more per call; refused above the system's limit, harmless.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Pipe { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, no offsets (NULL): the kernel moves up to
    // `len` bytes between them.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn shutdown_write(s: &TcpStream) {
    // SAFETY: shutdown(2) on a live socket; failure (already closed) is harmless.
    unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) };
}
