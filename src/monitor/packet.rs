//! Decodes the first bytes of a logged packet (L3 + L4 headers) into a flow.
//! Input comes from the kernel but is treated as untrusted: any length or
//! field may be short or wrong, and decoding never panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A decoded packet's 5-tuple: what its headers say about the connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IANA protocol number of the transport header (after IPv6 extension headers).
    pub protocol: u8,
    /// Ports for TCP/UDP, (type, code) for ICMP/ICMPv6, none otherwise or when truncated.
    pub l4: L4Header,
}

/// What the transport header says (not the protocol a policy rule names: that is `policy::L4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4Header {
    Ports { src: u16, dst: u16 },
    Icmp { kind: u8, code: u8 },
    None,
}

impl Flow {
    pub fn src_port(&self) -> Option<u16> {
        match self.l4 {
            L4Header::Ports { src, .. } => Some(src),
            _ => None,
        }
    }
    pub fn dst_port(&self) -> Option<u16> {
        match self.l4 {
            L4Header::Ports { dst, .. } => Some(dst),
            _ => None,
        }
    }
    /// ECS `network.transport`.
    pub fn transport(&self) -> String {
        transport_name(self.protocol)
    }
    /// ECS `network.type`.
    pub fn network_type(&self) -> &'static str {
        match self.dst {
            IpAddr::V4(_) => "ipv4",
            IpAddr::V6(_) => "ipv6",
        }
    }
}

pub fn transport_name(protocol: u8) -> String {
    match protocol {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet too short for its IP header")]
    Truncated,
    #[error("not an IPv4 or IPv6 packet (version {0})")]
    Version(u8),
}

/// Decodes an IPv4 or IPv6 packet starting at the network header.
pub fn decode(data: &[u8]) -> Result<Flow, DecodeError> {
    let first = *data.first().ok_or(DecodeError::Truncated)?;
    match first >> 4 {
        4 => decode_v4(data),
        6 => decode_v6(data),
        v => Err(DecodeError::Version(v)),
    }
}

fn decode_v4(d: &[u8]) -> Result<Flow, DecodeError> {
    if d.len() < 20 {
        return Err(DecodeError::Truncated);
    }
    let ihl = usize::from(d[0] & 0x0f) * 4;
    let protocol = d[9];
    let src = Ipv4Addr::new(d[12], d[13], d[14], d[15]);
    let dst = Ipv4Addr::new(d[16], d[17], d[18], d[19]);
    // Only the first fragment carries the transport header.
    let fragment_offset = u16::from_be_bytes([d[6], d[7]]) & 0x1fff;
    let l4 = if ihl < 20 || fragment_offset != 0 {
        L4Header::None
    } else {
        transport(protocol, d.get(ihl..).unwrap_or(&[]))
    };
    Ok(Flow {
        src: src.into(),
        dst: dst.into(),
        protocol,
        l4,
    })
}

fn decode_v6(d: &[u8]) -> Result<Flow, DecodeError> {
    if d.len() < 40 {
        return Err(DecodeError::Truncated);
    }
    let addr = |at: usize| -> Ipv6Addr {
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[at..at + 16]);
        Ipv6Addr::from(b)
    };
    let (src, dst) = (addr(8), addr(24));
    let mut next = d[6];
    let mut at = 40;
    // Walk extension headers (bounded: each one advances at least 8 bytes).
    let mut l4 = L4Header::None;
    loop {
        match next {
            // hop-by-hop, routing, destination options
            0 | 43 | 60 => {
                let Some(h) = d.get(at..at + 2) else { break };
                next = h[0];
                at += (usize::from(h[1]) + 1) * 8;
            }
            44 => {
                let Some(h) = d.get(at..at + 4) else { break };
                next = h[0];
                let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                at += 8;
                if offset != 0 {
                    break;
                }
            }
            51 => {
                let Some(h) = d.get(at..at + 2) else { break };
                next = h[0];
                at += (usize::from(h[1]) + 2) * 4;
            }
            _ => {
                l4 = transport(next, d.get(at..).unwrap_or(&[]));
                break;
            }
        }
    }
    Ok(Flow {
        src: src.into(),
        dst: dst.into(),
        protocol: next,
        l4,
    })
}

fn transport(protocol: u8, h: &[u8]) -> L4Header {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | 132 | 136 if h.len() >= 4 => L4Header::Ports {
            src: u16::from_be_bytes([h[0], h[1]]),
            dst: u16::from_be_bytes([h[2], h[3]]),
        },
        IPPROTO_ICMP | IPPROTO_ICMPV6 if h.len() >= 2 => L4Header::Icmp {
            kind: h[0],
            code: h[1],
        },
        _ => L4Header::None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn ipv4_udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 8, 0, 0]);
        p
    }

    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, rest.len() as u8, next, 64];
        p.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(rest);
        p
    }

    #[test]
    fn ipv4_udp_ports() {
        let f = decode(&ipv4_udp([10, 0, 0, 1], [192, 0, 2, 9], 40000, 53)).unwrap();
        assert_eq!(f.dst, "192.0.2.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            f.l4,
            L4Header::Ports {
                src: 40000,
                dst: 53
            }
        );
        assert_eq!(f.transport(), "udp");
        assert_eq!(f.network_type(), "ipv4");
    }

    #[test]
    fn ipv4_later_fragment_has_no_ports() {
        let mut p = ipv4_udp([10, 0, 0, 1], [192, 0, 2, 9], 1, 2);
        p[7] = 10;
        assert_eq!(decode(&p).unwrap().l4, L4Header::None);
    }

    #[test]
    fn ipv6_tcp_behind_an_extension_header() {
        // hop-by-hop (8 bytes, next = TCP), then TCP ports 5555 -> 1389
        let mut rest = vec![IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
        rest.extend_from_slice(&[0x15, 0xb3, 0x05, 0x6d]);
        let f = decode(&ipv6(0, &rest)).unwrap();
        assert_eq!(f.protocol, IPPROTO_TCP);
        assert_eq!(f.dst_port(), Some(1389));
        assert_eq!(f.src_port(), Some(5555));
    }

    #[test]
    fn icmpv6_type_and_code() {
        let f = decode(&ipv6(IPPROTO_ICMPV6, &[128, 0, 0, 0])).unwrap();
        assert_eq!(f.l4, L4Header::Icmp { kind: 128, code: 0 });
        assert_eq!(f.transport(), "ipv6-icmp");
    }

    #[test]
    fn other_protocols_and_garbage() {
        let mut gre = ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        gre[9] = 47;
        let f = decode(&gre).unwrap();
        assert_eq!(
            (f.protocol, f.l4, f.transport()),
            (47, L4Header::None, "47".to_string())
        );
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x45, 0]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x15; 60]), Err(DecodeError::Version(1)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
        }

        #[test]
        fn every_truncation_of_a_real_packet_is_safe(cut in 0usize..48) {
            let mut rest = vec![IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
            rest.extend_from_slice(&[0x15, 0xb3, 0x05, 0x6d]);
            let p = ipv6(0, &rest);
            let _ = decode(&p[..cut.min(p.len())]);
        }
    }
}
