//! Audit to policy: the recorded would-be-blocked flows become a policy
//! (`suggest`), candidate policies are replayed against them (`simulate`),
//! single flows are explained (`explain`) and policies linted (`check --lint`).
//! All of it rests on [`evaluate`], the compiled ruleset's semantics in userspace.

pub mod commands;
pub mod evaluate;
pub mod explain;
pub mod lint;
pub mod policy_text;
pub mod recorded;
pub mod simulate;
pub mod suggest;
