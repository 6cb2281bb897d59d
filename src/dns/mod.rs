//! The DNS guard behind `[dns]`: a forwarder inside `egret run` that answers
//! only names some rule allows, writes their addresses into the rules' kernel
//! sets before the client sees the answer, and reports every other name as
//! an incident (`dns-refused`): DNS callbacks are how Log4Shell scanners
//! found vulnerable hosts.
//!
//! Data flow: query → `message::parse` → host patterns (policy) → refuse and
//! report, or `cache` / upstream → `message::addresses` → `sets` (kernel,
//! with TTLs) → reply. `sets::RecentNames` lets the monitor name the host
//! behind a blocked address.

mod batch;
pub mod cache;
pub mod guard;
pub mod message;
pub mod revalidate;
pub mod sets;
pub mod upstream;

pub use guard::{Guard, GuardConfig, GuardStats, RefusedQuery, Revalidation};
pub use sets::RecentNames;
