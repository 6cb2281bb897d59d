//! Moving a tunnel's bytes. Small messages are copied through a small
//! buffer; once a read fills it (a bulk transfer), the rest of the burst goes
//! socket → pipe → socket with splice(2), so the payload never enters user
//! space, and the direction keeps splicing while its bursts stay big.
//! Tunnels hold no buffer or pipe while idle: a pipe is taken for a burst
//! and given back, empty, to a small per-thread pool when the socket runs
//! dry, so 10,000 idle tunnels cost little more than their sockets. When no
//! pipe can be had (descriptors exhausted), the burst is copied instead. An
//! idle timer closes tunnels with no traffic either way.

use std::cell::RefCell;
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
/// Empty pipes kept per thread for the next burst (two descriptors each).
const POOL: usize = 16;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

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
    // After a big burst the next one is likely big too: splice it from its
    // first byte rather than copying a buffer's worth first.
    let mut bulk = false;
    loop {
        from.readable().await?;
        let burst = if bulk {
            Moved::Bulk
        } else {
            copy(from, to, activity, start, true).await?
        };
        let burst = match burst {
            Moved::Bulk => match Pipe::take() {
                Some(pipe) => {
                    let burst = splice_burst(from, to, &pipe, activity, start).await?;
                    // Empty again (every burst is written out in full): reusable.
                    pipe.give_back();
                    burst
                }
                None => copy(from, to, activity, start, false).await?,
            },
            other => other,
        };
        match burst {
            Moved::End => {
                shutdown_write(to);
                return Ok(());
            }
            Moved::Dry => bulk = false,
            Moved::Bulk => bulk = true,
        }
    }
}

/// Where a direction stands after moving what was there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    /// The socket ran dry: wait for it to become readable.
    Dry,
    /// More is coming: a read filled the small buffer, or a burst that ran
    /// dry moved at least that much.
    Bulk,
    /// End of stream (already shut down or moved: the caller shuts `to`).
    End,
}

/// Copies through a small buffer until dry or the end, or (with
/// `until_full`) until a read fills the buffer.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    activity: &AtomicU64,
    start: Instant,
    until_full: bool,
) -> io::Result<Moved> {
    let mut buf = Vec::with_capacity(SMALL);
    let mut moved = 0;
    loop {
        buf.clear();
        let n = match from.try_read_buf(&mut buf) {
            Ok(0) => return Ok(Moved::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(dry(moved)),
            Err(e) => return Err(e),
        };
        write_all(to, &buf[..n]).await?;
        moved += n;
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if until_full && n == SMALL {
            return Ok(Moved::Bulk);
        }
    }
}

/// How a burst of `moved` bytes that ran dry counts.
fn dry(moved: usize) -> Moved {
    if moved >= SMALL {
        Moved::Bulk
    } else {
        Moved::Dry
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

/// Splices until the socket runs dry or the stream ends; the pipe is empty
/// whenever this returns Ok.
async fn splice_burst(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<Moved> {
    let mut moved = 0;
    loop {
        let got = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        });
        let n = match got {
            Ok(0) => return Ok(Moved::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(dry(moved)),
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
        moved += n;
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
    /// A pipe from this thread's pool, or a new one; None when none can be
    /// made (the caller copies instead).
    fn take() -> Option<Pipe> {
        if let Some(p) = PIPES.with(|pool| pool.borrow_mut().pop()) {
            return Some(p);
        }
        match Pipe::new() {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::debug!("proxy: no pipe for a burst, copying it: {e}");
                None
            }
        }
    }

    /// Back to the pool (the pipe must be empty), or closed if it is full.
    fn give_back(self) {
        PIPES.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL {
                pool.push(self);
            }
        });
    }

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
