//! Talking to the upstream resolvers: one query, over UDP then TCP, from a
//! fresh socket with a random port and id and egret's firewall mark; only an
//! answer with that id and the same question is accepted. Also a plain A+AAAA
//! lookup for the proxy.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Message, Query as Question};
use hickory_proto::rr::{Name, RecordType};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tracing::debug;

use super::message::{self, Incoming, Query};

const UDP_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(4);

/// Asks the upstream resolvers in order; UDP first (TCP when the client used
/// TCP or the answer was truncated). Only a response that matches our random
/// id and the question is accepted.
pub async fn exchange(
    upstreams: &[SocketAddr],
    mark: u32,
    q: &Query,
    tcp: bool,
) -> Option<Message> {
    let id = random_id();
    // Re-encoded (not the client's bytes), with our id in the header's first
    // two bytes (RFC 1035 4.1.1) rather than on a copy of the message.
    let mut bytes = q.message.to_vec().ok()?;
    bytes.get_mut(..2)?.copy_from_slice(&id.to_be_bytes());
    let ex = Exchange {
        bytes: &bytes,
        id,
        query: q,
        mark,
    };
    for &upstream in upstreams {
        if !tcp {
            match tokio::time::timeout(UDP_UPSTREAM_TIMEOUT, ex.udp(upstream)).await {
                Ok(Ok(m)) if !m.truncated() => return Some(m),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    debug!(%upstream, "DNS upstream over UDP: {e}");
                    continue;
                }
                Err(_) => {
                    debug!(%upstream, "DNS upstream over UDP timed out");
                    continue;
                }
            }
        }
        match tokio::time::timeout(TCP_UPSTREAM_TIMEOUT, ex.tcp(upstream)).await {
            Ok(Ok(m)) => return Some(m),
            Ok(Err(e)) => debug!(%upstream, "DNS upstream over TCP: {e}"),
            Err(_) => debug!(%upstream, "DNS upstream over TCP timed out"),
        }
    }
    None
}

fn expected(bytes: &[u8], id: u16, q: &Query) -> Option<Message> {
    let m = Message::from_vec(bytes).ok()?;
    (m.id() == id && message::answers(q, &m)).then_some(m)
}

/// One upstream exchange: our copy of the query, its id, and the mark.
struct Exchange<'a> {
    bytes: &'a [u8],
    id: u16,
    query: &'a Query,
    mark: u32,
}

impl Exchange<'_> {
    async fn udp(&self, upstream: SocketAddr) -> io::Result<Message> {
        let family = match upstream {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        // Created non-blocking; connect(2) binds a random source port, as
        // bind to port 0 would, so neither bind(2) nor a flag change is needed.
        let fd = socket(
            family,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        set_mark(fd.as_raw_fd(), self.mark)?;
        connect(fd.as_raw_fd(), &SockaddrStorage::from(upstream))?;
        let sock = UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
        sock.send(self.bytes).await?;
        // Not zeroed: recv_buf fills only what arrived.
        let mut buf = Vec::with_capacity(65_535);
        loop {
            buf.clear();
            let n = sock.recv_buf(&mut buf).await?;
            // Anything else (a stray or spoofed datagram) is ignored.
            if let Some(m) = expected(&buf[..n], self.id, self.query) {
                return Ok(m);
            }
        }
    }

    async fn tcp(&self, upstream: SocketAddr) -> io::Result<Message> {
        let sock = match upstream {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        set_mark(sock.as_raw_fd(), self.mark)?;
        let mut stream = sock.connect(upstream).await?;
        let len = u16::try_from(self.bytes.len()).map_err(io::Error::other)?;
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(self.bytes).await?;
        let n = stream.read_u16().await? as usize;
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).await?;
        expected(&buf, self.id, self.query)
            .ok_or_else(|| io::Error::other("the answer does not match the query"))
    }
}

pub fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    // 0 is no mark (a policy's mark is never 0): `egret explain` asks the
    // guard without privileges.
    if mark == 0 {
        return Ok(());
    }
    // SAFETY: fd is a live socket owned by the caller; the option value is a u32.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &mark as *const u32 as *const libc::c_void,
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A query id an off-path attacker cannot guess (with the random source port).
fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: writes at most 2 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 2, 0) };
    if n != 2 {
        // getrandom(2) does not fail for 2 bytes once the pool is up; fall back anyway.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return (t ^ (t >> 16)) as u16;
    }
    u16::from_ne_bytes(b)
}

/// The addresses of `name` (A and AAAA, CNAMEs followed) with their TTLs,
/// asked of `upstreams` with `mark`.
pub async fn lookup(
    upstreams: &[SocketAddr],
    mark: u32,
    name: &str,
) -> io::Result<Vec<(IpAddr, u32)>> {
    let fqdn = Name::from_str(name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut out = Vec::new();
    let mut answered = false;
    for qtype in [RecordType::A, RecordType::AAAA] {
        let mut m = Message::new();
        m.set_recursion_desired(true);
        m.add_query(Question::query(fqdn.clone(), qtype));
        let bytes = m.to_vec().map_err(io::Error::other)?;
        let Incoming::Query(q) = message::parse(&bytes) else {
            return Err(io::Error::other("could not build a query"));
        };
        if let Some(resp) = exchange(upstreams, mark, &q, false).await {
            answered = true;
            out.extend(message::addresses(&resp, &q.name));
        }
    }
    if !answered {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no upstream resolver answered",
        ));
    }
    Ok(out)
}
