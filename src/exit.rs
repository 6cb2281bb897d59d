//! Exit codes: part of the command line's contract (`egret --help`,
//! README.md). A leaf module, so the commands below `cli` (`report`, `audit`)
//! return them without importing the command line.

pub const OK: u8 = 0;
/// The policy is invalid (check, plan, apply), or nothing was pending (confirm).
pub const INVALID: u8 = 1;
/// Usage error (clap uses it too).
pub const USAGE: u8 = 2;
/// Kernel or system error: netlink refused, missing privileges, I/O.
pub const SYSTEM: u8 = 3;
/// `status`: egret's table is not loaded; `reload`: no `egret run` is running.
pub const NOT_LOADED: u8 = 4;
/// `simulate`, `explain`: a flow would not be allowed (blocked, or logged as would-block).
pub const NOT_ALLOWED: u8 = 5;
