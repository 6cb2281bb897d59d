//! The policy model: what a user wrote in `policy.toml`, validated.
//!
//! Invariant: this module does no I/O except reading the policy files themselves
//! (and asking an [`Accounts`] for user and group ids). Everything else is pure,
//! so it is unit- and property-tested without a kernel.

mod alerts;
mod diagnostic;
mod files;
mod host;
mod parse;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use alerts::{
    AlertSink, ExecConfig, HttpTarget, OtlpConfig, Severity, SeverityRules, SinkKind, SyslogConfig,
    SyslogTarget, WebhookConfig, WebhookFormat, ACTIONS,
};
pub use diagnostic::{Diagnostic, PolicyErrors};
pub use files::{load_strict, unsafe_files, LoadError, UnsafeFile};
pub use host::HostPattern;
pub use parse::{load, parse_str, Accounts, SystemAccounts};

/// The NFLOG group egret logs to unless the policy says otherwise.
pub const DEFAULT_LOG_GROUP: u16 = 5;
/// The firewall mark on egret's own upstream sockets (DNS guard, proxy) unless
/// the policy says otherwise: "egrt" in ASCII. Setting a mark needs
/// CAP_NET_ADMIN, so ordinary processes cannot borrow the guard's exemption.
pub const DEFAULT_MARK: u32 = 0x6567_7274;
/// The mark a local cache behind the guard puts on its upstream queries:
/// the conntrack mark the guard's query to it carried (dnsmasq
/// `--conntrack`), set by the ruleset from the guard's own `mark`. Distinct
/// from `mark`, so it opens DNS and nothing else: the proxy's and alert
/// sinks' marked sockets do not carry it.
pub fn cache_mark(mark: u32) -> u32 {
    mark ^ 1
}

/// The rule name events carry for packets caught by the final rule (the one no policy rule is).
pub const DEFAULT_RULE: &str = "default";
/// Rule names egret uses for its own log rules; a policy rule may not take them.
pub const RESERVED_RULE_NAMES: &[&str] = &[DEFAULT_RULE, "dns-bypass", "dns-guard", "containers"];

/// A whole, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub block: BlockAction,
    pub log_group: u16,
    /// Firewall mark of egret's own upstream sockets.
    pub mark: u32,
    /// The DNS guard, when the policy has a `[dns]` section.
    pub dns: Option<DnsConfig>,
    /// The egress proxy, when the policy has a `[proxy]` section.
    pub proxy: Option<ProxyConfig>,
    /// The Prometheus endpoint, when the policy has a `[metrics]` section.
    pub metrics: Option<SocketAddr>,
    /// The read-only API and dashboard, when the policy has an `[api]` section.
    pub api: Option<ApiConfig>,
    /// Re-apply the policy when egret's table is deleted or changed by
    /// something else (it is always reported).
    pub restore_table: bool,
    /// Emit a `heartbeat` event this often, so a silent host can be told
    /// apart from a dead daemon. `None`: no heartbeat.
    pub heartbeat: Option<Duration>,
    /// `[severity]`: how incidents are graded (docs/alerts.md).
    pub severity: SeverityRules,
    /// `[[alerts]]`: where events are pushed (webhook, syslog, exec, otlp).
    pub alerts: Vec<AlertSink>,
    /// What egret filters: this host's own sockets, or also what local
    /// container bridges forward.
    pub scope: Scope,
    /// With `Scope::HostAndContainers`: the bridge interfaces containers sit
    /// behind (`docker0`, `br-*`, ...).
    pub container_interfaces: Vec<String>,
    /// With `Scope::HostAndContainers`: the Docker-API socket that names
    /// containers by address. `None`: the usual Docker, then podman, socket.
    pub container_runtime: Option<PathBuf>,
    /// `[novelty]`: first-seen allowed flows (docs/policy.md).
    pub novelty: Novelty,
    pub rules: Vec<AllowRule>,
}

/// `[novelty]`: report what an allow rule lets through for the first time
/// per identity. The kernel filters what it already reported (a dynamic set
/// per rule and family); egret's store holds the long memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Novelty {
    pub enabled: bool,
    /// Rules not tracked: `novelty = false` on the rule, or `exclude_rules`.
    pub exclude_rules: Vec<String>,
    /// Identities never reported (an executable path, `unit:NAME`, `uid:N`).
    pub exclude_identities: Vec<String>,
    /// After the first start with novelty on, flows are recorded but not
    /// alerted for this long (so a new install is not a flood).
    pub learn: Duration,
    /// How long the kernel remembers a reported flow key; after that its
    /// next packet is logged once more and the store decides.
    pub kernel_timeout: Duration,
    /// Elements per novelty set (per rule and family); past it new flows
    /// are accepted uncounted by the kernel filter but counted as overflow.
    pub set_size: u32,
}

pub const DEFAULT_NOVELTY_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_NOVELTY_SET_SIZE: u32 = 65_536;

/// Without `[novelty]`: off, so a policy written before it (and its
/// alerts) behaves as it did; an empty `[novelty]` section turns it on.
impl Default for Novelty {
    fn default() -> Self {
        Novelty {
            enabled: false,
            exclude_rules: Vec::new(),
            exclude_identities: Vec::new(),
            learn: Duration::ZERO,
            kernel_timeout: DEFAULT_NOVELTY_TIMEOUT,
            set_size: DEFAULT_NOVELTY_SET_SIZE,
        }
    }
}

impl Novelty {
    /// Whether rule `name`'s accepted flows are tracked.
    pub fn tracks(&self, name: &str) -> bool {
        self.enabled && !self.exclude_rules.iter().any(|r| r == name)
    }
}

/// `[dns]`: the guard that turns host names into kernel set elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Where local resolvers send their queries (UDP and TCP).
    pub listen: SocketAddr,
    /// The real resolvers, tried in order.
    pub upstream: Vec<SocketAddr>,
    /// The answer for a name no rule allows.
    pub refuse: Refusal,
    /// Addresses stay in the kernel sets at least this long...
    pub ttl_floor: Duration,
    /// ...plus this, after the record's TTL (clients cache past the TTL).
    pub grace: Duration,
    /// Redirect plain DNS (port 53) sent anywhere to the guard, so no
    /// resolver configuration is needed.
    pub intercept: bool,
    /// A blocked packet to an address the guard once allowed for a name asks
    /// the upstream again and lets it through if the name still has it
    /// (`dns::revalidate`).
    pub revalidate: bool,
    /// scope = "host+containers": where container bridges' DNS is redirected
    /// (a wildcard address; the redirect picks the bridge's own address).
    pub container_listen: SocketAddr,
    /// A local cache behind the guard that cannot carry the cache mark
    /// (unbound, systemd-resolved): its user's DNS queries may leave.
    pub cache_user: Option<u32>,
}

impl DnsConfig {
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:53";
    pub const DEFAULT_CONTAINER_LISTEN: &'static str = "0.0.0.0:10053";
    pub const DEFAULT_TTL_FLOOR: Duration = Duration::from_secs(60);
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

    /// The upstream resolvers on this host (loopback addresses): a local
    /// cache behind the guard (programs -> guard -> cache -> world).
    pub fn local_upstream(&self) -> Vec<SocketAddr> {
        self.upstream
            .iter()
            .filter(|a| a.ip().is_loopback())
            .copied()
            .collect()
    }

    /// How long an address answered with `ttl` stays in a rule's set.
    pub fn set_timeout(&self, ttl: u32) -> Duration {
        Duration::from_secs(ttl as u64).max(self.ttl_floor) + self.grace
    }
}

/// `[proxy]`: the HTTP(S) forward proxy that decides by host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// CONNECT to port 443: the TLS ClientHello's SNI must equal the CONNECT host.
    pub require_sni: bool,
    /// Refuse loopback, private, link-local, CGNAT, multicast (and their
    /// IPv6-embedded forms) unless a rule's `cidrs` cover the address.
    pub ssrf_guard: bool,
    pub connect_timeout: Duration,
    /// A tunnel or connection with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// Open tunnels and connections, in all.
    pub max_connections: usize,
    /// Open tunnels and connections per client address.
    pub max_per_client: usize,
    /// Serving threads (each with its own listening socket). One is the most
    /// efficient per request; more help only when cores are idle.
    pub threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Scope {
    /// This host's own sockets (the output hook).
    #[default]
    #[serde(rename = "host")]
    Host,
    /// Also traffic forwarded from container bridges (the forward hook).
    #[serde(rename = "host+containers")]
    HostAndContainers,
}

/// Bridges of Docker (default and user networks), podman, CNI and libvirt.
pub const DEFAULT_CONTAINER_INTERFACES: &[&str] = &["docker0", "br-*", "podman*", "cni*", "virbr*"];

/// `[api]`: egret's local, read-only HTTP API and (opt-in) dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Always a loopback address: the API shows who talks where.
    pub listen: SocketAddr,
    pub dashboard: bool,
    /// Besides root, only members of this group may use the API (and read
    /// the state directory, which egret gives to this group).
    pub group: String,
}

/// The group of `[api]` and of the state directory unless told otherwise
/// (the Debian package creates it).
pub const DEFAULT_API_GROUP: &str = "egret";

impl Policy {
    /// The group that may read what egret recorded (the API and the state dir).
    pub fn access_group(&self) -> &str {
        self.api
            .as_ref()
            .map_or(DEFAULT_API_GROUP, |a| a.group.as_str())
    }
}

/// Where `[api]` listens unless told otherwise.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9465";

/// Where `[metrics]` listens unless told otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

impl ProxyConfig {
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:3128";
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
    pub const DEFAULT_MAX_PER_CLIENT: usize = 10_000;
}

/// How a rule's `hosts` may be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Directly (addresses from the DNS guard in the kernel sets) and through the proxy.
    #[default]
    Any,
    /// Only through the proxy: no addresses in the kernel sets.
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    /// RCODE 5: the client knows it was refused and does not retry elsewhere.
    Refused,
    /// RCODE 3: the name "does not exist".
    Nxdomain,
}

impl Policy {
    /// The policy `egret run` uses when none is given: audit mode, nothing allowed
    /// beyond the baseline, so a new user sees what the server really talks to.
    pub fn audit_default() -> Policy {
        Policy {
            mode: Mode::Audit,
            block: BlockAction::Drop,
            log_group: DEFAULT_LOG_GROUP,
            mark: DEFAULT_MARK,
            dns: None,
            proxy: None,
            metrics: None,
            api: None,
            restore_table: false,
            heartbeat: None,
            severity: SeverityRules::default(),
            alerts: Vec::new(),
            scope: Scope::Host,
            container_interfaces: Vec::new(),
            container_runtime: None,
            novelty: Novelty::default(),
            rules: Vec::new(),
        }
    }

    /// Rules whose hosts the DNS guard answers for (and puts in kernel sets).
    pub fn host_rules(&self) -> impl Iterator<Item = &AllowRule> {
        self.rules
            .iter()
            .filter(|r| !r.hosts.is_empty() && r.via == Via::Any)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Block what no rule allows, and log it.
    Enforce,
    /// Log what would be blocked; block nothing.
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a blocked packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockAction {
    /// Silently drop. The default: a blocked TCP connect stays in SYN-SENT where it
    /// can be attributed to its process, and the SYN retries show the attempt persists.
    Drop,
    /// TCP reset / ICMP administratively prohibited: the client fails fast.
    Reject,
}

/// Layer-4 protocol a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum L4 {
    Tcp,
    Udp,
    /// ICMP for IPv4 and ICMPv6 for IPv6.
    Icmp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
            L4::Icmp => "icmp",
        }
    }
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Where a rule was written, for messages and `plan` comments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

/// One `[[allow]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub name: String,
    pub comment: Option<String>,
    /// Destination networks. With `hosts`, the rule allows both; with
    /// neither, any destination.
    pub cidrs: Vec<IpNet>,
    /// Destination host names: the DNS guard puts what they resolve to in the
    /// rule's sets.
    pub hosts: Vec<HostPattern>,
    /// `via = "proxy"`: the hosts are reachable only through the proxy.
    pub via: Via,
    /// Protocols; empty means any protocol.
    pub protocols: Vec<L4>,
    /// Destination ports; empty means all ports.
    pub ports: Vec<PortRange>,
    /// Socket owner uids; empty means any user.
    pub users: Vec<u32>,
    pub groups: Vec<u32>,
    /// systemd units or cgroup v2 paths (relative to the cgroup2 root).
    pub units: Vec<String>,
    /// Per-rule mode: applies to traffic of this rule's subject (users, groups,
    /// units) that no rule allows. `None` follows the policy's mode.
    pub mode: Option<Mode>,
    pub origin: Origin,
}

/// Accounts that know no names: for tests whose policies use numeric ids.
#[cfg(test)]
pub(crate) struct NoAccounts;

#[cfg(test)]
impl Accounts for NoAccounts {
    fn uid(&self, _: &str) -> Option<u32> {
        None
    }
    fn gid(&self, _: &str) -> Option<u32> {
        None
    }
}

impl AllowRule {
    /// A TCP rule to anywhere from anyone, for tests to narrow.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str) -> AllowRule {
        AllowRule {
            name: name.into(),
            comment: None,
            cidrs: vec![],
            hosts: vec![],
            via: Via::Any,
            protocols: vec![L4::Tcp],
            ports: vec![],
            users: vec![],
            groups: vec![],
            units: vec![],
            mode: None,
            origin: Origin {
                file: std::path::PathBuf::from("p.toml"),
                line: 1,
            },
        }
    }

    /// True when the rule names who may send (users, groups or units).
    pub fn has_subject(&self) -> bool {
        !(self.users.is_empty() && self.groups.is_empty() && self.units.is_empty())
    }

    /// True when `name` (wire form) matches one of the rule's host patterns.
    pub fn allows_host(&self, name: &str) -> bool {
        self.hosts.iter().any(|h| h.matches(name))
    }
}
