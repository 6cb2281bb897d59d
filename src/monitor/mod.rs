//! The blocked-egress monitor behind `egret run`: kernel log messages →
//! decoded packets → attribution → incidents → stdout (ECS JSON), SQLite,
//! with loss accounting against the kernel's own counters.
//!
//! Data flow: `nflog` (reader thread) → channel → the loop of `crate::run`:
//! `attribution` → `incident` → `event` → stdout + `store`; `accounting`
//! reconciles `nflog`'s counters with the ruleset's log counters. The loop,
//! and the services `egret run` starts beside it, live in `crate::run`.

pub mod accounting;
pub mod attribution;
pub mod books;
pub mod containers;
pub mod event;
pub mod flood;
pub mod held;
pub mod incident;
pub mod names;
pub mod nflog;
pub mod novelty;
pub mod packet;
pub mod store;
pub mod systemd;
pub mod tamper;
