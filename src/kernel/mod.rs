//! Everything that talks to the kernel over netlink; nothing else opens a
//! netlink socket. One submodule per interface: `nft` (nf_tables), `notify`
//! (nf_tables' change notifications), `nflog` (nfnetlink_log), `sockets`
//! (sock_diag), `route` (rtnetlink address changes), on `netlink` (messages,
//! attributes, the socket). Callers use small types from `crate::ruleset` and
//! plain structs; no netlink detail leaks out.

pub mod features;
pub mod link;
pub mod netlink;
pub mod nflog;
pub mod nft;
pub mod notify;
pub mod route;
pub mod sockets;
