//! egret: a default-deny egress firewall that turns every blocked outbound
//! attempt into an intrusion signal. See docs/architecture.md for the map.

pub mod alert;
pub mod api;
pub mod apply;
pub mod audit;
pub mod cgroup;
pub mod cli;
pub mod dns;
pub mod doctor;
pub mod exit;
pub mod kernel;
pub mod local_http;
pub mod monitor;
pub mod pidfile;
pub mod policy;
pub mod proxy;
pub mod report;
pub mod ruleset;
pub mod run;
pub mod text;
