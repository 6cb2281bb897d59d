//! Minimal netlink plumbing for nfnetlink: a message builder with nested
//! attributes, an attribute iterator, and a socket that sends one batch as one
//! datagram and collects acks and errors.

use std::io;
use std::os::fd::AsRawFd;

use netlink_sys::{Socket, SocketAddr};

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// Builds a stream of netlink messages into one buffer.
#[derive(Default)]
pub struct MsgBuilder {
    pub buf: Vec<u8>,
    msg_start: usize,
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

impl MsgBuilder {
    pub fn with_capacity(n: usize) -> MsgBuilder {
        MsgBuilder {
            buf: Vec::with_capacity(n),
            msg_start: 0,
        }
    }

    /// Starts a netfilter message: nlmsghdr + nfgenmsg.
    pub fn begin(&mut self, msg_type: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
        self.msg_start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    pub fn end(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Bytes written since the current message began.
    pub fn message_len(&self) -> usize {
        self.buf.len() - self.msg_start
    }

    pub fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len() + pad4(len) - len, 0);
    }

    pub fn attr_str(&mut self, kind: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(kind, &v);
    }

    pub fn attr_u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    pub fn attr_u64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_be_bytes());
    }

    /// Opens a nested attribute; close it with [`MsgBuilder::nest_end`].
    pub fn nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub fn nest_end(&mut self, at: usize) {
        let len = self.buf.len() - at;
        debug_assert!(len <= u16::MAX as usize, "nested attribute too long");
        self.buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }
}

/// A parsed netlink message header and its payload (after nlmsghdr).
pub struct RawMsg<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    /// The netlink port of the socket that sent it (for nf_tables
    /// notifications: the socket that committed the change).
    pub port: u32,
    pub payload: &'a [u8],
}

/// Splits a receive buffer into messages; stops at the first malformed one.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = RawMsg<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < 16 || len > buf.len() {
            return None;
        }
        let msg = RawMsg {
            msg_type: u16::from_ne_bytes(buf[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(buf[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(buf[8..12].try_into().ok()?),
            port: u32::from_ne_bytes(buf[12..16].try_into().ok()?),
            payload: &buf[16..len],
        };
        buf = &buf[pad4(len).min(buf.len())..];
        Some(msg)
    })
}

/// Iterates attributes: (type without flags, value).
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[pad4(len).min(buf.len())..];
        Some((kind, value))
    })
}

pub fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

pub fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

pub fn c_str(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// An error the kernel returned for one message of a request.
#[derive(Debug, thiserror::Error)]
#[error("{}{}", io::Error::from_raw_os_error(*.errno), .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct KernelError {
    pub errno: i32,
    pub detail: Option<String>,
    pub seq: u32,
}

pub struct NetlinkSocket {
    sock: Socket,
    buf: Vec<u8>,
}

impl NetlinkSocket {
    pub fn open(protocol: isize) -> io::Result<NetlinkSocket> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        let fd = sock.as_raw_fd();
        for opt in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid fd and a pointer to a c_int of the stated size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_NETLINK,
                    opt,
                    &one as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
        }
        Ok(NetlinkSocket {
            sock,
            buf: vec![0; 1 << 20],
        })
    }

    /// This socket's netlink port id.
    pub fn port(&self) -> io::Result<u32> {
        let mut addr = SocketAddr::new(0, 0);
        self.sock.get_address(&mut addr)?;
        Ok(addr.port_number())
    }

    /// Joins multicast group `group` (e.g. nf_tables' change notifications).
    pub fn join_group(&self, group: u32) -> io::Result<()> {
        self.sock.add_membership(group)
    }

    pub fn raw_fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    /// Raises the socket's send or receive buffer beyond the sysctl limit
    /// (CAP_NET_ADMIN), falling back to the ordinary option.
    pub fn force_buffer(&self, send: bool, bytes: usize) {
        let (force, plain) = if send {
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)
        } else {
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)
        };
        let v = bytes.min(i32::MAX as usize) as libc::c_int;
        let size = std::mem::size_of::<libc::c_int>() as u32;
        // SAFETY: valid fd, pointer to a c_int of `size` bytes.
        let rc = unsafe {
            libc::setsockopt(
                self.raw_fd(),
                libc::SOL_SOCKET,
                force,
                &v as *const _ as *const libc::c_void,
                size,
            )
        };
        if rc != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    self.raw_fd(),
                    libc::SOL_SOCKET,
                    plain,
                    &v as *const _ as *const libc::c_void,
                    size,
                )
            };
        }
    }

    pub fn send(&self, data: &[u8]) -> io::Result<()> {
        let n = self.sock.send(data, 0)?;
        if n != data.len() {
            return Err(io::Error::other(format!(
                "netlink short send: {n} of {} bytes",
                data.len()
            )));
        }
        Ok(())
    }

    /// Receives until the ack (or error) for `last_seq` arrives. Returns the
    /// first error the kernel reported for any message of the request.
    pub fn wait_ack(&mut self, last_seq: u32) -> io::Result<Result<(), KernelError>> {
        let mut first_error = None;
        loop {
            let n = self.recv()?;
            for msg in messages(&self.buf[..n]) {
                if msg.msg_type != NLMSG_ERROR {
                    continue;
                }
                let err = parse_error(&msg);
                if err.errno != 0 && first_error.is_none() {
                    first_error = Some(KernelError {
                        errno: err.errno,
                        detail: err.detail,
                        seq: msg.seq,
                    });
                }
                if msg.seq == last_seq {
                    return Ok(first_error.map_or(Ok(()), Err));
                }
            }
        }
    }

    /// Sends a dump request and hands every reply message's payload to `each`.
    pub fn dump(
        &mut self,
        request: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> io::Result<Result<(), KernelError>> {
        self.send(request)?;
        // Replies to earlier requests (a late ack) are not ours: match on seq.
        let seq = request
            .get(8..12)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .unwrap_or(0);
        loop {
            let n = self.recv()?;
            for msg in messages(&self.buf[..n]).filter(|m| m.seq == seq) {
                match msg.msg_type {
                    NLMSG_DONE => return Ok(Ok(())),
                    NLMSG_ERROR => {
                        let err = parse_error(&msg);
                        if err.errno == 0 {
                            return Ok(Ok(()));
                        }
                        return Ok(Err(KernelError {
                            errno: err.errno,
                            detail: err.detail,
                            seq: msg.seq,
                        }));
                    }
                    t => {
                        each(t, msg.payload);
                        if msg.flags & NLM_F_MULTI == 0 {
                            return Ok(Ok(()));
                        }
                    }
                }
            }
        }
    }

    /// One non-blocking receive into `buf`: `WouldBlock` when the queue is
    /// empty, and the kernel's ENOBUFS (an overrun happened) as an error.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: valid fd; buf is a writable region of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Waits until the socket is readable or `timeout` passes.
    pub fn wait_readable(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        match rc {
            n if n > 0 => Ok(true),
            0 => Ok(false),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn recv(&mut self) -> io::Result<usize> {
        loop {
            match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

struct AckOrError {
    errno: i32,
    detail: Option<String>,
}

fn parse_error(msg: &RawMsg<'_>) -> AckOrError {
    let code = msg
        .payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(-libc::EIO);
    let mut detail = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // With NETLINK_CAP_ACK the echoed request is just its 16-byte header.
        let orig_len = msg
            .payload
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .unwrap_or(16) as usize;
        let tlv_start = 4 + if msg.flags & 0x100 != 0 {
            16
        } else {
            orig_len.max(16)
        };
        if let Some(tlvs) = msg.payload.get(pad4(tlv_start)..) {
            detail = attrs(tlvs)
                .find(|(k, _)| *k == NLMSGERR_ATTR_MSG)
                .map(|(_, v)| c_str(v));
        }
    }
    AckOrError {
        errno: -code,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_and_parser_agree() {
        let mut b = MsgBuilder::default();
        b.begin(0x0a00, NLM_F_REQUEST, 7, 1, 0);
        b.attr_str(1, "egret");
        let n = b.nest(4);
        b.attr_u32(1, 3);
        b.attr(2, &[1, 2, 3]);
        b.nest_end(n);
        b.end();
        let msgs: Vec<_> = messages(&b.buf).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].seq, 7);
        let a: Vec<_> = attrs(&msgs[0].payload[4..]).collect();
        assert_eq!(a.len(), 2);
        assert_eq!(c_str(a[0].1), "egret");
        let inner: Vec<_> = attrs(a[1].1).collect();
        assert_eq!(be_u32(inner[0].1), Some(3));
        assert_eq!(inner[1].1, &[1, 2, 3]);
    }

    #[test]
    fn truncated_input_never_panics() {
        let mut b = MsgBuilder::default();
        b.begin(1, 0, 1, 0, 0);
        b.attr_str(1, "x");
        b.end();
        for cut in 0..b.buf.len() {
            let _ = messages(&b.buf[..cut]).count();
            let _ = attrs(&b.buf[..cut]).count();
        }
    }
}
