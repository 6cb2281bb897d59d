//! The egress proxy behind `[proxy]`: an HTTP/1.1 forward proxy inside
//! `egret run` that decides by host name with the same `[[allow]]` rules,
//! refuses special-purpose addresses (SSRF guard), can require the TLS server
//! name to match, and reports what it refuses as incidents (`proxy-denied`).
//!
//! Data flow: request → `decision::Target` → `decision::ProxyRules`
//! (candidates, client identity when a rule names users/groups/units,
//! resolution, address check) → upstream (marked socket) → tunnel or forward;
//! refusals → `ProxyDenial` → the monitor's pipeline.

pub mod decision;
mod local;
pub mod relay;
pub mod server;
pub mod sni;

pub use decision::special_purpose;
pub use server::{Proxy, ProxyDenial, ProxyState, ProxyStats};
