//! Everything that talks to the kernel. One submodule per interface:
//! `nft` (nf_tables), `notify` (nf_tables' change notifications), `sockets` (sock_diag). Callers use small types from
//! `crate::ruleset`; no netlink detail leaks out.

pub mod features;
pub mod link;
pub mod netlink;
pub mod nft;
pub mod notify;
pub mod sockets;
