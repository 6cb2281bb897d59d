//! Datagrams in batches: recvmmsg(2) and sendmmsg(2) through nix. Under load
//! the guard's cost is mostly system calls (a perf profile of cache hits:
//! 80% kernel); one call for up to `BATCH` queries, and one for their
//! answers, is where its throughput comes from.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;

pub const BATCH: usize = 32;
/// Queries are small; a bigger one arrives truncated and gets FORMERR.
pub const SLOT: usize = 4096;

pub struct Received {
    pub len: usize,
    pub peer: SocketAddr,
    pub truncated: bool,
}

pub struct Batcher {
    bufs: Vec<[u8; SLOT]>,
    headers: MultiHeaders<SockaddrStorage>,
    out_headers: MultiHeaders<SockaddrStorage>,
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher {
            bufs: vec![[0u8; SLOT]; BATCH],
            headers: MultiHeaders::preallocate(BATCH, None),
            out_headers: MultiHeaders::preallocate(BATCH, None),
        }
    }
}

fn to_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

impl Batcher {
    /// Waits for datagrams and takes up to `BATCH` of them in one call.
    pub async fn recv(&mut self, sock: &UdpSocket) -> io::Result<Vec<Received>> {
        loop {
            sock.readable().await?;
            let (bufs, headers) = (&mut self.bufs, &mut self.headers);
            let got = sock.try_io(Interest::READABLE, || {
                let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
                    .iter_mut()
                    .map(|b| [IoSliceMut::new(&mut b[..])])
                    .collect();
                let results = recvmmsg(
                    sock.as_raw_fd(),
                    headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map_err(to_io)?;
                Ok(results
                    .filter_map(|r| {
                        Some(Received {
                            len: r.bytes,
                            peer: r.address.as_ref().and_then(socket_addr)?,
                            truncated: r.flags.contains(MsgFlags::MSG_TRUNC),
                        })
                    })
                    .collect::<Vec<_>>())
            });
            match got {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The bytes of datagram `i` of the last `recv`.
    pub fn data(&self, i: usize, len: usize) -> &[u8] {
        &self.bufs[i][..len.min(SLOT)]
    }

    /// Sends the replies, as many per call as the socket takes; what is left
    /// when the socket is full waits for it.
    pub async fn send(
        &mut self,
        sock: &UdpSocket,
        replies: &[(Vec<u8>, SocketAddr)],
    ) -> io::Result<()> {
        let mut at = 0;
        while at < replies.len() {
            let chunk = &replies[at..replies.len().min(at + BATCH)];
            let headers = &mut self.out_headers;
            let sent = sock.try_io(Interest::WRITABLE, || {
                let slices: Vec<[IoSlice<'_>; 1]> =
                    chunk.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
                let addrs: Vec<Option<SockaddrStorage>> = chunk
                    .iter()
                    .map(|(_, a)| Some(SockaddrStorage::from(*a)))
                    .collect();
                let results = sendmmsg(
                    sock.as_raw_fd(),
                    headers,
                    slices.iter(),
                    addrs,
                    [],
                    MsgFlags::MSG_DONTWAIT,
                )
                .map_err(to_io)?;
                Ok(results.count())
            });
            match sent {
                Ok(0) => sock.writable().await?,
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.writable().await?,
                // A client that went away (ICMP unreachable) must not stop the others.
                Err(_) => at += 1,
            }
        }
        Ok(())
    }
}
