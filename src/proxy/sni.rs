//! `require_sni`: the server name in a TLS ClientHello, read with tls-parser
//! from the first bytes a client sends into a CONNECT tunnel. Nothing is
//! decrypted; the bytes are forwarded unchanged once checked.

use tls_parser::{
    parse_tls_extensions, parse_tls_plaintext, SNIType, TlsExtension, TlsMessage,
    TlsMessageHandshake,
};

/// TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
const HANDSHAKE: u8 = 22;
/// The largest plaintext record (RFC 8446 5.1).
pub const MAX_RECORD: usize = RECORD_HEADER + (1 << 14);

#[derive(Debug, PartialEq, Eq)]
pub enum Sni {
    /// Not enough bytes yet for the first record.
    Incomplete,
    /// The ClientHello names this server (lower case, no trailing dot).
    Name(String),
    /// Not TLS, not a ClientHello in one record, or no server name.
    Missing(&'static str),
}

/// Looks at the first TLS record in `buf`.
pub fn server_name(buf: &[u8]) -> Sni {
    if buf.len() < RECORD_HEADER {
        return Sni::Incomplete;
    }
    if buf[0] != HANDSHAKE {
        return Sni::Missing("the tunnel did not start with a TLS handshake");
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf.len() < RECORD_HEADER + len {
        return Sni::Incomplete;
    }
    let Ok((_, record)) = parse_tls_plaintext(&buf[..RECORD_HEADER + len]) else {
        return Sni::Missing("no complete ClientHello in the first TLS record");
    };
    for msg in &record.msg {
        if let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = msg {
            let Some(ext) = hello.ext else {
                return Sni::Missing("the ClientHello has no extensions");
            };
            let Ok((_, exts)) = parse_tls_extensions(ext) else {
                return Sni::Missing("the ClientHello's extensions do not parse");
            };
            for e in exts {
                if let TlsExtension::SNI(names) = e {
                    for (kind, name) in names {
                        if kind == SNIType::HostName {
                            if let Ok(n) = std::str::from_utf8(name) {
                                let n = n.strip_suffix('.').unwrap_or(n);
                                return Sni::Name(n.to_ascii_lowercase());
                            }
                        }
                    }
                }
            }
            return Sni::Missing("the ClientHello names no server (no SNI)");
        }
    }
    Sni::Missing("the first TLS record is not a ClientHello")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2 ClientHello with one SNI entry, built by hand for the
    /// test (the code under test reads it with tls-parser).
    pub fn client_hello(name: &str) -> Vec<u8> {
        let n = name.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes()); // server_name_list length
        sni.push(0); // host_name
        sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
        sni.extend_from_slice(n);
        let mut ext = Vec::new();
        ext.extend_from_slice(&0u16.to_be_bytes()); // server_name
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // compression: null
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1]; // client_hello
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_server_name_is_read_and_partial_input_waits() {
        let hello = client_hello("WWW.Example.com");
        assert_eq!(server_name(&hello), Sni::Name("www.example.com".into()));
        for cut in [0, 3, 5, hello.len() - 1] {
            assert_eq!(server_name(&hello[..cut]), Sni::Incomplete, "{cut}");
        }
    }

    #[test]
    fn not_tls_or_no_name_is_missing() {
        assert!(matches!(
            server_name(b"GET / HTTP/1.1\r\n\r\n"),
            Sni::Missing(_)
        ));
        let mut hello = client_hello("a.example");
        hello[9..].fill(0);
        assert!(matches!(server_name(&hello), Sni::Missing(_)));
    }
}
