//! What the proxy reads from a client before deciding: the request target
//! (CONNECT authority or absolute URL, as hyper hands it over) and, with
//! require_sni, the first TLS record of a tunnel. Never a panic.
#![no_main]

use egret::proxy::decision::Target;
use egret::proxy::sni;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Target::parse(text, None);
        let _ = Target::parse(text, Some(80));
        if let Ok(uri) = text.parse::<http::Uri>() {
            if let Some(a) = uri.authority() {
                let _ = Target::parse(a.as_str(), Some(80));
            }
        }
    }
    let _ = sni::server_name(data);
});
