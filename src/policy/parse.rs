//! TOML → [`Policy`], with every problem reported as `file:line:col`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::diagnostic::Diagnostic;
use super::{
    AllowRule, BlockAction, DnsConfig, HostPattern, Mode, Origin, Policy, PolicyErrors, PortRange,
    ProxyConfig, Refusal, Scope, Via, DEFAULT_CONTAINER_INTERFACES, DEFAULT_LOG_GROUP,
    DEFAULT_MARK, DEFAULT_METRICS_LISTEN, L4, RESERVED_RULE_NAMES,
};

/// Resolves user and group names to ids. The system implementation asks NSS;
/// tests use a fixed table.
pub trait Accounts {
    fn uid(&self, name: &str) -> Option<u32>;
    fn gid(&self, name: &str) -> Option<u32>;
}

/// Accounts from the system's name service (passwd, group, LDAP, ...).
pub struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn uid(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }
    fn gid(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMain {
    mode: Option<Spanned<Mode>>,
    block: Option<Spanned<BlockAction>>,
    log_group: Option<Spanned<i64>>,
    mark: Option<Spanned<i64>>,
    dns: Option<Spanned<RawDns>>,
    proxy: Option<Spanned<RawProxy>>,
    metrics: Option<Spanned<RawMetrics>>,
    api: Option<Spanned<RawApi>>,
    scope: Option<Spanned<Scope>>,
    restore_table: Option<bool>,
    heartbeat: Option<Spanned<String>>,
    severity: Option<super::alerts::RawSeverity>,
    #[serde(default)]
    alerts: Vec<super::alerts::RawAlert>,
    container_interfaces: Option<Vec<Spanned<String>>>,
    container_runtime: Option<Spanned<String>>,
    novelty: Option<RawNovelty>,
    #[serde(default)]
    include: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    listen: Option<Spanned<String>>,
    #[serde(default)]
    upstream: Vec<Spanned<String>>,
    refuse: Option<Spanned<Refusal>>,
    ttl_floor: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    intercept: Option<Spanned<bool>>,
    revalidate: Option<bool>,
    container_listen: Option<Spanned<String>>,
    cache_user: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNovelty {
    enabled: Option<bool>,
    learn: Option<Spanned<String>>,
    kernel_timeout: Option<Spanned<String>>,
    set_size: Option<Spanned<i64>>,
    #[serde(default)]
    exclude_rules: Vec<Spanned<String>>,
    #[serde(default)]
    exclude_identities: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<Spanned<String>>,
    dashboard: Option<bool>,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<Spanned<String>>,
    require_sni: Option<bool>,
    ssrf_guard: Option<bool>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    max_per_client: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
}

/// A drop-in file (from `include`) holds rules only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDropIn {
    #[serde(default)]
    allow: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    comment: Option<String>,
    #[serde(default)]
    cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    via: Option<Spanned<Via>>,
    protocol: Option<Spanned<toml::Value>>,
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    users: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    groups: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    units: Vec<Spanned<String>>,
    mode: Option<Spanned<Mode>>,
    /// `novelty = false`: this rule's first-seen flows are not reported.
    novelty: Option<bool>,
}

/// Reads and validates the policy at `path`, with its includes.
pub fn load(path: &Path, accounts: &dyn Accounts) -> Result<Policy, PolicyErrors> {
    let source = std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![Diagnostic::at(
            path,
            "",
            None,
            format!("cannot read policy file: {e}"),
        )
        .with_hint(
            "pass the path of an existing policy file, e.g. /etc/egret/policy.toml",
        )])
    })?;
    parse_str(&source, path, accounts)
}

/// Validates policy text that was read from `path` (used to name errors and to
/// resolve `include` patterns relative to its directory).
pub fn parse_str(
    source: &str,
    path: &Path,
    accounts: &dyn Accounts,
) -> Result<Policy, PolicyErrors> {
    parse_with(source, path, accounts, &mut |p| std::fs::read_to_string(p))
}

/// [`parse_str`], reading drop-ins with `read` (the strict loader's checked reads).
pub(super) fn parse_with(
    source: &str,
    path: &Path,
    accounts: &dyn Accounts,
    read: &mut dyn FnMut(&Path) -> std::io::Result<String>,
) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let raw: RawMain = match toml::from_str(source) {
        Ok(raw) => raw,
        Err(e) => return Err(PolicyErrors(vec![toml_error(path, source, &e, false)])),
    };

    let mode = raw.mode.map(|m| m.into_inner()).unwrap_or(Mode::Enforce);
    let block = raw
        .block
        .map(|b| b.into_inner())
        .unwrap_or(BlockAction::Drop);
    let log_group = match raw.log_group {
        None => DEFAULT_LOG_GROUP,
        Some(g) => match u16::try_from(*g.get_ref()) {
            Ok(g) => g,
            Err(_) => {
                errors.push(
                    Diagnostic::at(
                        path,
                        source,
                        Some(g.span()),
                        format!("log_group {} is out of range", g.get_ref()),
                    )
                    .with_hint("an NFLOG group is a number from 0 to 65535"),
                );
                DEFAULT_LOG_GROUP
            }
        },
    };

    let mark = match raw.mark {
        None => DEFAULT_MARK,
        Some(m) => match u32::try_from(*m.get_ref()) {
            Ok(v) if v != 0 => v,
            _ => {
                errors.push(
                    Diagnostic::at(
                        path,
                        source,
                        Some(m.span()),
                        format!("mark {} is out of range", m.get_ref()),
                    )
                    .with_hint("a firewall mark is a number from 1 to 4294967295, e.g. 0x65677274"),
                );
                DEFAULT_MARK
            }
        },
    };
    let dns = raw
        .dns
        .as_ref()
        .map(|d| dns_config(path, source, d, accounts, &mut errors));
    if let (Some(d), Some(raw_dns)) = (&dns, &raw.dns) {
        // The cache's mark is derived from egret's; it must not be 0 (every
        // unmarked packet) for a local cache to be exempted by it.
        if !d.local_upstream().is_empty() && super::cache_mark(mark) == 0 {
            errors.push(
                Diagnostic::at(
                    path,
                    source,
                    Some(raw_dns.span()),
                    format!("with a local cache as upstream, mark {mark:#x} leaves the cache's mark ({mark:#x} xor 1) at 0"),
                )
                .with_hint("choose another mark, e.g. the default 0x65677274"),
            );
        }
    }
    let proxy = raw
        .proxy
        .as_ref()
        .map(|p| proxy_config(path, source, p, &mut errors));
    let mut listen = |l: &Option<Spanned<String>>, default: &str, loopback_only: bool| {
        let default = default
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        listen_field(l, default, loopback_only).unwrap_or_else(|(span, msg, hint)| {
            errors.push(Diagnostic::at(path, source, Some(span), msg).with_hint(&hint));
            default
        })
    };
    let metrics = raw
        .metrics
        .as_ref()
        .map(|m| listen(&m.get_ref().listen, DEFAULT_METRICS_LISTEN, false));
    let api = raw.api.as_ref().map(|a| super::ApiConfig {
        listen: listen(&a.get_ref().listen, super::DEFAULT_API_LISTEN, true),
        dashboard: a.get_ref().dashboard.unwrap_or(false),
        group: a
            .get_ref()
            .group
            .clone()
            .unwrap_or_else(|| super::DEFAULT_API_GROUP.to_string()),
    });

    let heartbeat = match duration_field(&raw.heartbeat, std::time::Duration::ZERO, false) {
        Ok(d) if d.is_zero() => None,
        Ok(d) => Some(d),
        Err((span, msg)) => {
            errors.push(
                Diagnostic::at(path, source, Some(span), msg)
                    .with_hint("write a duration such as \"5m\" or \"1h\""),
            );
            None
        }
    };
    let severity = raw
        .severity
        .as_ref()
        .map(|s| super::alerts::severity_rules(path, source, s, &mut errors))
        .unwrap_or_default();
    let alerts = super::alerts::alert_sinks(path, source, &raw.alerts, &mut errors);
    let scope = raw.scope.as_ref().map(|s| *s.get_ref()).unwrap_or_default();
    let mut container_interfaces = Vec::new();
    match &raw.container_interfaces {
        None => {
            container_interfaces.extend(DEFAULT_CONTAINER_INTERFACES.iter().map(|s| s.to_string()))
        }
        Some(list) => {
            for i in list {
                let name = i.get_ref();
                let stem = name.strip_suffix('*').unwrap_or(name);
                let ok = !stem.is_empty()
                    && name.len() <= 15
                    && !stem.contains(['*', '/', ' ', '"'])
                    && stem.is_ascii();
                if ok {
                    container_interfaces.push(name.clone());
                } else {
                    errors.push(
                        Diagnostic::at(path, source, Some(i.span()), format!("invalid interface name {name:?}"))
                            .with_hint("an interface name of up to 15 characters, or a prefix ending in * such as \"br-*\""),
                    );
                }
            }
        }
    }
    if scope == Scope::Host && raw.container_interfaces.is_some() {
        if let Some(first) = raw.container_interfaces.as_ref().and_then(|l| l.first()) {
            errors.push(
                Diagnostic::at(
                    path,
                    source,
                    Some(first.span()),
                    "container_interfaces needs scope = \"host+containers\"",
                )
                .with_hint(
                    "set scope = \"host+containers\" to filter what container bridges forward",
                ),
            );
        }
    }

    let container_runtime = raw.container_runtime.as_ref().and_then(|r| {
        let p = r.get_ref();
        let problem = if scope == Scope::Host {
            Some((
                "container_runtime needs scope = \"host+containers\"",
                "set scope = \"host+containers\"; the runtime only names containers whose forwarded traffic egret sees",
            ))
        } else if !p.starts_with('/') {
            Some((
                "container_runtime must be an absolute path to a unix socket",
                "e.g. \"/var/run/docker.sock\" or \"/run/podman/podman.sock\"",
            ))
        } else {
            None
        };
        match problem {
            Some((message, hint)) => {
                errors.push(
                    Diagnostic::at(path, source, Some(r.span()), message).with_hint(hint),
                );
                None
            }
            None => Some(PathBuf::from(p)),
        }
    });

    let mut checker = RuleChecker {
        accounts,
        read,
        names: HashMap::new(),
        rules: Vec::new(),
        errors,
        hosts_without_dns: Vec::new(),
        no_novelty: Vec::new(),
    };
    for rule in raw.allow {
        checker.rule(path, source, rule);
    }
    for pattern in &raw.include {
        for file in checker.expand_include(path, source, pattern) {
            checker.drop_in(&file);
        }
    }

    for (file, src, span, via) in std::mem::take(&mut checker.hosts_without_dns) {
        match via {
            Via::Proxy if proxy.is_none() => checker.err(
                &file,
                &src,
                span,
                "via = \"proxy\" needs the proxy",
                "add a [proxy] section (see docs/proxy.md)",
            ),
            Via::Any if dns.is_none() && proxy.is_none() => checker.err(
                &file,
                &src,
                span,
                "host names need the DNS guard or the proxy",
                "add a [dns] section with the upstream resolvers (docs/dns.md) or a [proxy] section (docs/proxy.md)",
            ),
            _ => {}
        }
    }

    let mut novelty = raw
        .novelty
        .as_ref()
        .map(|n| novelty_config(path, source, n, &mut checker.errors))
        .unwrap_or_default();
    if let Some(n) = &raw.novelty {
        for r in &n.exclude_rules {
            if !checker.rules.iter().any(|a| &a.name == r.get_ref()) {
                checker.err(
                    path,
                    source,
                    r.span(),
                    format!("exclude_rules names no rule: {:?}", r.get_ref()),
                    "name an [[allow]] rule of this policy, or remove it",
                );
            }
        }
    }
    novelty.exclude_rules.append(&mut checker.no_novelty);
    novelty.exclude_rules.sort();
    novelty.exclude_rules.dedup();

    if checker.errors.is_empty() {
        Ok(Policy {
            mode,
            block,
            log_group,
            mark,
            dns,
            proxy,
            metrics,
            api,
            restore_table: raw.restore_table.unwrap_or(false),
            heartbeat,
            severity,
            alerts,
            scope,
            container_interfaces: if scope == Scope::HostAndContainers {
                container_interfaces
            } else {
                Vec::new()
            },
            container_runtime,
            novelty,
            rules: checker.rules,
        })
    } else {
        Err(PolicyErrors(checker.errors))
    }
}

/// `[novelty]`, its errors pushed to `errors`.
fn novelty_config(
    path: &Path,
    source: &str,
    raw: &RawNovelty,
    errors: &mut Vec<Diagnostic>,
) -> super::Novelty {
    let d = super::Novelty::default();
    let mut duration = |v: &Option<Spanned<String>>, default, zero_ok| {
        duration_field(v, default, zero_ok).unwrap_or_else(|(span, msg)| {
            errors.push(
                Diagnostic::at(path, source, Some(span), msg)
                    .with_hint("write a duration such as \"7d\" or \"1h\""),
            );
            default
        })
    };
    let learn = duration(&raw.learn, d.learn, true);
    let kernel_timeout = duration(&raw.kernel_timeout, d.kernel_timeout, false);
    // The kernel takes a dynset timeout in milliseconds; egret writes whole
    // seconds, and a day is plenty for a filter the store stands behind.
    let mut out_of_range = |span, what: String, hint: &str| {
        errors.push(
            Diagnostic::at(path, source, Some(span), format!("{what} is out of range"))
                .with_hint(hint),
        );
    };
    let kernel_timeout = if kernel_timeout.as_secs() == 0 || kernel_timeout.as_secs() > 7 * 86_400 {
        if let Some(t) = &raw.kernel_timeout {
            out_of_range(
                t.span(),
                format!("kernel_timeout {:?}", t.get_ref()),
                "from \"1s\" to \"7d\"",
            );
        }
        d.kernel_timeout
    } else {
        std::time::Duration::from_secs(kernel_timeout.as_secs())
    };
    let set_size = match &raw.set_size {
        None => d.set_size,
        Some(n) => match u32::try_from(*n.get_ref()) {
            Ok(v) if (1..=16_777_216).contains(&v) => v,
            _ => {
                out_of_range(
                    n.span(),
                    format!("set_size {}", n.get_ref()),
                    "from 1 to 16777216 elements per rule and address family",
                );
                d.set_size
            }
        },
    };
    super::Novelty {
        enabled: raw.enabled.unwrap_or(true),
        exclude_rules: raw
            .exclude_rules
            .iter()
            .map(|r| r.get_ref().clone())
            .collect(),
        exclude_identities: raw
            .exclude_identities
            .iter()
            .map(|r| r.get_ref().clone())
            .collect(),
        learn,
        kernel_timeout,
        set_size,
    }
}

fn toml_error(path: &Path, source: &str, e: &toml::de::Error, drop_in: bool) -> Diagnostic {
    let message = e.message().trim().to_string();
    let d = Diagnostic::at(path, source, e.span(), message.clone());
    if drop_in && message.starts_with("unknown field") {
        d.with_hint("an included file may only hold [[allow]] rules; set mode, block and log_group in the main policy")
    } else if message.starts_with("unknown field") {
        d.with_hint("see docs/policy.md for the keys a policy and a rule accept")
    } else {
        d
    }
}

struct RuleChecker<'a> {
    accounts: &'a dyn Accounts,
    read: &'a mut dyn FnMut(&Path) -> std::io::Result<String>,
    /// Rule name → where it was first defined.
    names: HashMap<String, (PathBuf, usize)>,
    rules: Vec<AllowRule>,
    errors: Vec<Diagnostic>,
    /// Where `hosts` (or `via`) appeared, checked against `[dns]` and `[proxy]` at the end.
    hosts_without_dns: Vec<(PathBuf, String, Range<usize>, Via)>,
    /// Rules with `novelty = false`.
    no_novelty: Vec<String>,
}

impl RuleChecker<'_> {
    fn err(
        &mut self,
        path: &Path,
        source: &str,
        span: Range<usize>,
        message: impl Into<String>,
        hint: &str,
    ) {
        let mut d = Diagnostic::at(path, source, Some(span), message);
        if !hint.is_empty() {
            d = d.with_hint(hint);
        }
        self.errors.push(d);
    }

    fn expand_include(
        &mut self,
        path: &Path,
        source: &str,
        pattern: &Spanned<String>,
    ) -> Vec<PathBuf> {
        let base = path.parent().unwrap_or(Path::new("."));
        let text = base.join(pattern.get_ref()).to_string_lossy().to_string();
        let is_glob = pattern.get_ref().contains(['*', '?', '[']);
        match super::files::include_matches(path, pattern.get_ref()) {
            Ok(files) if files.is_empty() && !is_glob => {
                self.err(
                    path,
                    source,
                    pattern.span(),
                    format!("included file {text} does not exist"),
                    "use a glob such as \"policy.d/*.toml\" to include files that may be absent",
                );
                Vec::new()
            }
            Ok(files) => files,
            Err(e) => {
                self.err(
                    path,
                    source,
                    pattern.span(),
                    format!("invalid include pattern: {e}"),
                    "",
                );
                Vec::new()
            }
        }
    }

    fn drop_in(&mut self, file: &Path) {
        let source = match (self.read)(file) {
            Ok(s) => s,
            Err(e) => {
                self.errors.push(Diagnostic::at(
                    file,
                    "",
                    None,
                    format!("cannot read included file: {e}"),
                ));
                return;
            }
        };
        match toml::from_str::<RawDropIn>(&source) {
            Ok(raw) => {
                for rule in raw.allow {
                    self.rule(file, &source, rule);
                }
            }
            Err(e) => self.errors.push(toml_error(file, &source, &e, true)),
        }
    }

    fn rule(&mut self, path: &Path, source: &str, raw: RawRule) {
        let errors_before = self.errors.len();
        let name_span = raw.name.span();
        let name = raw.name.get_ref().clone();
        let (line, _) = super::diagnostic::line_column(source, name_span.start);

        if RESERVED_RULE_NAMES.contains(&name.as_str()) {
            self.err(path, source, name_span.clone(), format!("rule name {name:?} is reserved"), "egret reports its own rules under \"default\", \"dns-bypass\" and \"dns-guard\"; choose another name");
        } else if !valid_rule_name(&name) {
            self.err(path, source, name_span.clone(), format!("invalid rule name {name:?}"), "a rule name is 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or digit");
        } else if let Some((first_file, first_line)) = self.names.get(&name) {
            let hint = format!(
                "first defined at {}:{}; rule names must be unique",
                first_file.display(),
                first_line
            );
            self.err(
                path,
                source,
                name_span.clone(),
                format!("rule {name:?} is defined twice"),
                &hint,
            );
        } else {
            self.names.insert(name.clone(), (path.to_path_buf(), line));
        }

        let mut cidrs = Vec::new();
        for c in &raw.cidrs {
            match parse_cidr(c.get_ref()) {
                Ok(net) => cidrs.push(net),
                Err((msg, hint)) => self.err(path, source, c.span(), msg, &hint),
            }
        }
        cidrs.sort();
        cidrs.dedup();

        let mut hosts = Vec::new();
        for h in &raw.hosts {
            match HostPattern::parse(h.get_ref()) {
                Ok(p) => hosts.push(p),
                Err(msg) => self.err(path, source, h.span(), format!("invalid host pattern {:?}: {msg}", h.get_ref()), "write a name such as \"deb.debian.org\", \"*.debian.org\" (any subdomain) or \"s3.*.amazonaws.com\" (one label)"),
            }
        }
        hosts.sort();
        hosts.dedup();
        let via = raw.via.as_ref().map(|v| *v.get_ref()).unwrap_or_default();
        if let Some(v) = raw
            .via
            .as_ref()
            .filter(|_| raw.hosts.is_empty() && raw.cidrs.is_empty())
        {
            self.err(
                path,
                source,
                v.span(),
                "via applies to hosts and cidrs, and this rule has neither",
                "remove via, or add hosts = [...] or cidrs = [...]",
            );
        }
        // via = "proxy" on cidrs: the proxy may reach them (even private
        // addresses, past its SSRF guard), nothing reaches them directly.
        let span = match (&raw.via, raw.hosts.first()) {
            (Some(v), _) if via == Via::Proxy && !raw.cidrs.is_empty() => Some(v.span()),
            (Some(v), Some(_)) if via == Via::Proxy => Some(v.span()),
            (_, Some(h)) => Some(h.span()),
            _ => None,
        };
        if let Some(span) = span {
            self.hosts_without_dns
                .push((path.to_path_buf(), source.to_string(), span, via));
        }

        let protocols = match &raw.protocol {
            None => vec![L4::Tcp],
            Some(p) => self.protocols(path, source, p),
        };

        let mut ports = Vec::new();
        for p in &raw.ports {
            match parse_port(p.get_ref()) {
                Ok(r) => ports.push(r),
                Err(msg) => self.err(
                    path,
                    source,
                    p.span(),
                    msg,
                    "a port is a number from 1 to 65535, or a range like \"8000-8100\"",
                ),
            }
        }
        ports.sort();
        ports.dedup();
        if !ports.is_empty() && (protocols.is_empty() || protocols.contains(&L4::Icmp)) {
            let span = raw
                .protocol
                .as_ref()
                .map(|p| p.span())
                .unwrap_or_else(|| raw.ports[0].span());
            self.err(
                path,
                source,
                span,
                "ports only apply to tcp and udp",
                "set protocol = \"tcp\", \"udp\" or [\"tcp\", \"udp\"], or remove ports",
            );
        }

        let users = self.ids(path, source, &raw.users, "user", |a, n| a.uid(n));
        let groups = self.ids(path, source, &raw.groups, "group", |a, n| a.gid(n));

        let mut units = Vec::new();
        for u in &raw.units {
            match normalize_unit(u.get_ref()) {
                Some(unit) => units.push(unit),
                None => self.err(path, source, u.span(), format!("invalid unit {:?}", u.get_ref()), "write a systemd unit such as \"borg.service\" or a cgroup v2 path such as \"system.slice/borg.service\""),
            }
        }
        units.sort();
        units.dedup();

        let has_subject = !(raw.users.is_empty() && raw.groups.is_empty() && raw.units.is_empty());
        if let Some(m) = &raw.mode {
            if !has_subject {
                self.err(path, source, m.span(), "a per-rule mode needs users, groups or units", "a rule's mode applies to what its subject sends that no rule allows; without a subject use the policy-wide `mode`");
            }
        }
        if raw.cidrs.is_empty() && raw.hosts.is_empty() && raw.ports.is_empty() && !has_subject {
            self.err(
                path,
                source,
                name_span,
                format!("rule {name:?} is empty: it names no cidrs, hosts, ports, users, groups or units"),
                "to allow all egress deliberately, write cidrs = [\"0.0.0.0/0\", \"::/0\"]",
            );
        }

        if self.errors.len() == errors_before {
            if raw.novelty == Some(false) {
                self.no_novelty.push(name.clone());
            }
            self.rules.push(AllowRule {
                name,
                comment: raw.comment,
                cidrs,
                hosts,
                via,
                protocols,
                ports,
                users,
                groups,
                units,
                mode: raw.mode.map(|m| m.into_inner()),
                origin: Origin {
                    file: path.to_path_buf(),
                    line,
                },
            });
        }
    }

    fn protocols(&mut self, path: &Path, source: &str, value: &Spanned<toml::Value>) -> Vec<L4> {
        let names: Vec<&str> = match value.get_ref() {
            toml::Value::String(s) => vec![s.as_str()],
            toml::Value::Array(items) if items.iter().all(|i| i.is_str()) => {
                items.iter().filter_map(|i| i.as_str()).collect()
            }
            _ => {
                self.err(
                    path,
                    source,
                    value.span(),
                    "protocol must be a string or a list of strings",
                    "use \"tcp\", \"udp\", \"icmp\", \"any\" or a list such as [\"tcp\", \"udp\"]",
                );
                return vec![L4::Tcp];
            }
        };
        let mut out = Vec::new();
        for n in &names {
            match n.to_ascii_lowercase().as_str() {
                "tcp" => out.push(L4::Tcp),
                "udp" => out.push(L4::Udp),
                "icmp" | "icmpv6" | "ipv6-icmp" => out.push(L4::Icmp),
                "any" if names.len() == 1 => return Vec::new(),
                "any" => {
                    self.err(
                        path,
                        source,
                        value.span(),
                        "\"any\" cannot be combined with other protocols",
                        "write protocol = \"any\" alone",
                    );
                }
                other => self.err(
                    path,
                    source,
                    value.span(),
                    format!("unknown protocol {other:?}"),
                    "use \"tcp\", \"udp\", \"icmp\" or \"any\"",
                ),
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn ids(
        &mut self,
        path: &Path,
        source: &str,
        values: &[Spanned<toml::Value>],
        what: &str,
        lookup: impl Fn(&dyn Accounts, &str) -> Option<u32>,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        for v in values {
            match v.get_ref() {
                toml::Value::Integer(n) => match u32::try_from(*n) {
                    Ok(id) if id != u32::MAX => ids.push(id),
                    _ => self.err(
                        path,
                        source,
                        v.span(),
                        format!("{what} id {n} is out of range"),
                        "ids are numbers from 0 to 4294967294",
                    ),
                },
                toml::Value::String(name) => match lookup(self.accounts, name) {
                    Some(id) => ids.push(id),
                    None => {
                        let hint = format!("create the {what} first, or write its numeric id");
                        self.err(
                            path,
                            source,
                            v.span(),
                            format!("unknown {what} {name:?}"),
                            &hint,
                        );
                    }
                },
                _ => {
                    let hint = format!("write a {what} name such as \"backup\" or a numeric id");
                    self.err(
                        path,
                        source,
                        v.span(),
                        format!("{what}s must be names or numeric ids"),
                        &hint,
                    );
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

fn dns_config(
    path: &Path,
    source: &str,
    raw: &Spanned<RawDns>,
    accounts: &dyn Accounts,
    errors: &mut Vec<Diagnostic>,
) -> DnsConfig {
    let mut err = |span: Range<usize>, msg: String, hint: &str| {
        errors.push(Diagnostic::at(path, source, Some(span), msg).with_hint(hint));
    };
    let d = raw.get_ref();
    let listen = match &d.listen {
        None => DnsConfig::DEFAULT_LISTEN.parse().ok(),
        Some(l) => match parse_socket_addr(l.get_ref()) {
            Some(a) => Some(a),
            None => {
                err(
                    l.span(),
                    format!("invalid listen address {:?}", l.get_ref()),
                    "write an address and port such as \"127.0.0.1:53\" or \"[::1]:53\"",
                );
                None
            }
        },
    };
    let mut upstream = Vec::new();
    for u in &d.upstream {
        match parse_socket_addr(u.get_ref()) {
            Some(a) if Some(a) == listen => err(u.span(), format!("upstream {a} is the guard itself"), "name the resolvers the guard forwards to, not its own listen address"),
            Some(a) => upstream.push(a),
            None => err(u.span(), format!("invalid upstream resolver {:?}", u.get_ref()), "write an IP address, optionally with a port: \"192.0.2.53\", \"192.0.2.53:5353\", \"[2001:db8::53]:53\""),
        }
    }
    if let Some(l) = listen.filter(|l| l.ip().is_unspecified()) {
        // A guard on the wildcard holds its port on every local address, so
        // a cache cannot share it, and the ruleset could not tell the two apart.
        for u in &d.upstream {
            let Some(a) = parse_socket_addr(u.get_ref()) else {
                continue;
            };
            if a.ip().is_loopback() && a.port() == l.port() {
                err(u.span(), format!("the guard listens on {l}, every local address: a local cache at {a} cannot share port {}", l.port()), "give the local cache another port (e.g. \"127.0.0.2:5353\"), or the guard a specific address (\"127.0.0.1:53\")");
            }
        }
    }
    if d.upstream.is_empty() {
        err(
            raw.span(),
            "[dns] needs at least one upstream resolver".into(),
            "add upstream = [\"192.0.2.53\"] with your network's resolvers",
        );
    }
    let mut duration = |v: &Option<Spanned<String>>, default| {
        duration_field(v, default, true).unwrap_or_else(|(span, msg)| {
            err(
                span,
                msg,
                "write a duration such as \"30s\", \"5m\" or \"1h\"",
            );
            default
        })
    };
    let ttl_floor = duration(&d.ttl_floor, DnsConfig::DEFAULT_TTL_FLOOR);
    let grace = duration(&d.grace, DnsConfig::DEFAULT_GRACE);
    let default_container_listen = SocketAddr::from(([0, 0, 0, 0], 10053));
    let container_listen = match &d.container_listen {
        None => default_container_listen,
        Some(l) => match parse_socket_addr(l.get_ref()) {
            Some(a)
                if a.ip().is_unspecified()
                    && Some(a.port()) != listen.map(|l| l.port())
                    && a.port() != 0 =>
            {
                a
            }
            _ => {
                err(
                    l.span(),
                    format!("invalid container_listen {:?}", l.get_ref()),
                    "write a wildcard address and a port the guard's listen does not use, such as \"0.0.0.0:10053\" or \"[::]:10053\" (the redirect sends container DNS to the bridge's own address)",
                );
                default_container_listen
            }
        },
    };
    let cache_user = d.cache_user.as_ref().and_then(|u| {
        let name = u.get_ref();
        let uid = name.parse::<u32>().ok().or_else(|| accounts.uid(name));
        if uid.is_none() {
            err(u.span(), format!("unknown user {name:?}"), "name the user the local cache runs as (unbound: \"unbound\", systemd-resolved: \"systemd-resolve\")");
        }
        if !upstream.iter().any(|a| a.ip().is_loopback()) {
            err(u.span(), "cache_user names the user of a local cache, but no upstream is on this host".into(), "list the cache's loopback address in upstream (e.g. \"127.0.0.53\"), or remove cache_user");
        }
        uid
    });
    let intercept = d.intercept.as_ref().is_some_and(|i| *i.get_ref());
    if let (Some(i), Some(l)) = (&d.intercept, listen) {
        if *i.get_ref() && !(l.ip().is_loopback() || l.ip().is_unspecified()) {
            errors.push(
                Diagnostic::at(
                    path,
                    source,
                    Some(i.span()),
                    format!("intercept redirects DNS to this host, but the guard listens on {l}"),
                )
                .with_hint(
                    "listen on 127.0.0.1 (or 0.0.0.0, or ::1 / :: for IPv6) to use intercept",
                ),
            );
        }
    }
    DnsConfig {
        container_listen,
        listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 53))),
        upstream,
        refuse: d
            .refuse
            .as_ref()
            .map(|r| *r.get_ref())
            .unwrap_or(Refusal::Refused),
        ttl_floor,
        grace,
        intercept,
        revalidate: d.revalidate.unwrap_or(true),
        cache_user,
    }
}

fn proxy_config(
    path: &Path,
    source: &str,
    raw: &Spanned<RawProxy>,
    errors: &mut Vec<Diagnostic>,
) -> ProxyConfig {
    let mut err = |span: Range<usize>, msg: String, hint: &str| {
        errors.push(Diagnostic::at(path, source, Some(span), msg).with_hint(hint));
    };
    let p = raw.get_ref();
    let default_listen = SocketAddr::from(([127, 0, 0, 1], 3128));
    let listen =
        listen_field(&p.listen, default_listen, false).unwrap_or_else(|(span, msg, hint)| {
            err(span, msg, &hint);
            default_listen
        });
    let mut duration = |v: &Option<Spanned<String>>, default| {
        duration_field(v, default, false).unwrap_or_else(|(span, msg)| {
            err(span, msg, "write a duration such as \"10s\" or \"5m\"");
            default
        })
    };
    let connect_timeout = duration(&p.connect_timeout, ProxyConfig::DEFAULT_CONNECT_TIMEOUT);
    let idle_timeout = duration(&p.idle_timeout, ProxyConfig::DEFAULT_IDLE_TIMEOUT);
    let mut count = |v: &Option<Spanned<i64>>, default| match v {
        None => default,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                errors.push(
                    Diagnostic::at(
                        path,
                        source,
                        Some(n.span()),
                        format!("{} is not a positive number", n.get_ref()),
                    )
                    .with_hint("limits are counts of connections, 1 or more"),
                );
                default
            }
        },
    };
    ProxyConfig {
        listen,
        require_sni: p.require_sni.unwrap_or(false),
        ssrf_guard: p.ssrf_guard.unwrap_or(true),
        connect_timeout,
        idle_timeout,
        max_connections: count(&p.max_connections, ProxyConfig::DEFAULT_MAX_CONNECTIONS),
        max_per_client: count(&p.max_per_client, ProxyConfig::DEFAULT_MAX_PER_CLIENT),
        threads: count(&p.threads, 1),
    }
}

/// An optional `listen` address (`default` when absent); `loopback_only` for
/// endpoints that show who talks where. Err: (span, message, hint).
fn listen_field(
    value: &Option<Spanned<String>>,
    default: SocketAddr,
    loopback_only: bool,
) -> Result<SocketAddr, (Range<usize>, String, String)> {
    let Some(l) = value else {
        return Ok(default);
    };
    let example = format!("\"127.0.0.1:{}\"", default.port());
    match l.get_ref().trim().parse::<SocketAddr>() {
        Ok(a) if loopback_only && !a.ip().is_loopback() => Err((
            l.span(),
            format!("this listens on loopback only, not {:?}", l.get_ref()),
            format!(
                "use {example} or \"[::1]:{}\" and reach it remotely through an SSH tunnel",
                default.port()
            ),
        )),
        Ok(a) => Ok(a),
        Err(_) => Err((
            l.span(),
            format!("invalid listen address {:?}", l.get_ref()),
            format!("write an address and port such as {example}"),
        )),
    }
}

/// A duration key (`"30s"`, `"5m"`): `default` when absent, or where and why it is invalid.
pub(super) fn duration_field(
    v: &Option<Spanned<String>>,
    default: std::time::Duration,
    zero_ok: bool,
) -> Result<std::time::Duration, (Range<usize>, String)> {
    let Some(t) = v else { return Ok(default) };
    match humantime::parse_duration(t.get_ref()) {
        Ok(d) if zero_ok || !d.is_zero() => Ok(d),
        Ok(_) => Err((
            t.span(),
            format!("invalid duration {:?}: must be more than zero", t.get_ref()),
        )),
        Err(e) => Err((t.span(), format!("invalid duration {:?}: {e}", t.get_ref()))),
    }
}

/// `192.0.2.53`, `192.0.2.53:5353`, `2001:db8::53`, `[2001:db8::53]:5353` (port 53 by default).
fn parse_socket_addr(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    text.parse::<SocketAddr>().ok().or_else(|| {
        text.parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

fn valid_rule_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Parses `10.0.0.0/8`, `192.0.2.7` (a host) or `2001:db8::/32`.
pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, (String, String)> {
    let text = text.trim();
    if text.contains('/') {
        let net: IpNet = text.parse().map_err(|_| {
            (format!("invalid CIDR {text:?}"), "write an address with a prefix length, such as \"10.20.0.0/16\" or \"2001:db8::/32\"".to_string())
        })?;
        if net.trunc() != net {
            return Err((
                format!("{text} has host bits set"),
                format!("did you mean \"{}\"?", net.trunc()),
            ));
        }
        Ok(net)
    } else {
        let addr: IpAddr = text.parse().map_err(|_| {
            (
                format!("invalid address {text:?}"),
                "write an IPv4 or IPv6 address, or a CIDR such as \"10.20.0.0/16\"".to_string(),
            )
        })?;
        Ok(IpNet::from(addr))
    }
}

fn parse_port(value: &toml::Value) -> Result<PortRange, String> {
    fn one(n: i64) -> Result<u16, String> {
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("port {n} is out of range")),
        }
    }
    fn text_port(s: &str) -> Result<u16, String> {
        let n: i64 = s
            .trim()
            .parse()
            .map_err(|_| format!("invalid port {s:?}"))?;
        one(n)
    }
    match value {
        toml::Value::Integer(n) => one(*n).map(|p| PortRange { first: p, last: p }),
        toml::Value::String(s) => {
            let (first, last) = match s.split_once('-') {
                Some((a, b)) => (text_port(a)?, text_port(b)?),
                None => {
                    let p = text_port(s)?;
                    (p, p)
                }
            };
            if first > last {
                return Err(format!("port range {s:?} is reversed"));
            }
            Ok(PortRange { first, last })
        }
        other => Err(format!("expected a port, found {}", other.type_str())),
    }
}

/// `borg.service`, `system.slice/borg.service` or `/system.slice/borg.service`.
fn normalize_unit(unit: &str) -> Option<String> {
    let trimmed = unit.trim().trim_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    if trimmed.chars().any(|c| c.is_control() || c == '"') {
        return None;
    }
    Some(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) struct FakeAccounts;
    impl Accounts for FakeAccounts {
        fn uid(&self, name: &str) -> Option<u32> {
            match name {
                "root" => Some(0),
                "backup" => Some(34),
                "nobody" => Some(65534),
                _ => None,
            }
        }
        fn gid(&self, name: &str) -> Option<u32> {
            match name {
                "staff" => Some(50),
                _ => None,
            }
        }
    }

    fn parse(text: &str) -> Result<Policy, PolicyErrors> {
        parse_str(text, Path::new("/etc/egret/policy.toml"), &FakeAccounts)
    }

    fn first_error(text: &str) -> Diagnostic {
        parse(text)
            .expect_err("policy should be invalid")
            .0
            .remove(0)
    }

    #[test]
    fn the_documented_example_parses() {
        let p = parse(
            r#"
mode = "enforce"

[[allow]]
name = "backups"
cidrs = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32"]
protocol = "tcp"
ports = [22, "8000-8100"]
users = ["backup", 0]
groups = ["staff"]
units = ["borg.service"]
"#,
        )
        .expect("valid");
        assert_eq!(p.mode, Mode::Enforce);
        let r = &p.rules[0];
        assert_eq!(r.name, "backups");
        assert_eq!(r.cidrs.len(), 3);
        assert_eq!(
            r.ports,
            vec![
                PortRange {
                    first: 22,
                    last: 22
                },
                PortRange {
                    first: 8000,
                    last: 8100
                }
            ]
        );
        assert_eq!(r.users, vec![0, 34]);
        assert_eq!(r.groups, vec![50]);
        assert_eq!(r.units, vec!["borg.service".to_string()]);
        assert_eq!(r.protocols, vec![L4::Tcp]);
        assert_eq!(r.origin.line, 5);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let d = first_error("[[allow]]\nname = \"a\"\ncidr = [\"10.0.0.0/8\"]\n");
        assert_eq!((d.line, d.column), (3, 1));
        assert!(d.message.contains("unknown field `cidr`"), "{}", d.message);
    }

    #[test]
    fn bad_cidr_points_at_the_value() {
        let d =
            first_error("[[allow]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\", \"10.0.0.300/8\"]\n");
        assert_eq!((d.line, d.column), (3, 24));
        assert!(d.message.contains("invalid CIDR"));
    }

    #[test]
    fn host_bits_are_an_error_with_a_suggestion() {
        let d = first_error("[[allow]]\nname = \"a\"\ncidrs = [\"10.1.2.3/8\"]\n");
        assert_eq!(d.hint.as_deref(), Some("did you mean \"10.0.0.0/8\"?"));
    }

    #[test]
    fn bad_ports() {
        for (ports, needle) in [
            ("[0]", "out of range"),
            ("[70000]", "out of range"),
            ("[\"9-3\"]", "reversed"),
            ("[\"x\"]", "invalid port"),
            ("[true]", "expected a port"),
        ] {
            let d = first_error(&format!(
                "[[allow]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\nports = {ports}\n"
            ));
            assert!(d.message.contains(needle), "{ports}: {}", d.message);
            assert_eq!(d.line, 4);
        }
    }

    #[test]
    fn ports_need_tcp_or_udp() {
        let d = first_error(
            "[[allow]]\nname = \"a\"\nprotocol = \"icmp\"\nports = [1]\ncidrs = [\"10.0.0.0/8\"]\n",
        );
        assert!(d.message.contains("ports only apply"));
        assert_eq!(d.line, 3);
    }

    #[test]
    fn unknown_user_and_group() {
        let errs = parse("[[allow]]\nname = \"a\"\nusers = [\"ghost\"]\ngroups = [\"nogroup\"]\n")
            .unwrap_err()
            .0;
        assert_eq!(errs.len(), 2);
        assert_eq!((errs[0].line, errs[0].column), (3, 10));
        assert!(errs[0].message.contains("unknown user \"ghost\""));
        assert!(errs[1].message.contains("unknown group"));
    }

    #[test]
    fn dns_section_and_host_rules() {
        let p = parse(
            "[dns]\nlisten = \"127.0.0.1:5353\"\nupstream = [\"192.0.2.53\", \"[2001:db8::53]:5300\"]\nrefuse = \"nxdomain\"\nttl_floor = \"5s\"\ngrace = \"2m\"\n\n[[allow]]\nname = \"debian\"\nhosts = [\"Deb.Debian.org.\", \"*.debian.org\"]\nports = [80, 443]\n",
        )
        .unwrap();
        let dns = p.dns.unwrap();
        assert_eq!(dns.listen, "127.0.0.1:5353".parse().unwrap());
        assert_eq!(
            dns.upstream,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:5300".parse().unwrap()
            ]
        );
        assert_eq!(dns.refuse, Refusal::Nxdomain);
        assert_eq!(dns.set_timeout(1), std::time::Duration::from_secs(125));
        assert_eq!(dns.set_timeout(600), std::time::Duration::from_secs(720));
        let hosts: Vec<String> = p.rules[0].hosts.iter().map(|h| h.to_string()).collect();
        assert_eq!(hosts, ["deb.debian.org", "*.debian.org"]);
        assert!(p.rules[0].allows_host("ftp.debian.org."));
        assert!(!p.rules[0].allows_host("debian.org"));
        assert_eq!(p.mark, DEFAULT_MARK);
    }

    #[test]
    fn dns_and_host_errors_name_line_and_column() {
        let d = first_error("[[allow]]\nname = \"a\"\nhosts = [\"x.example\"]\n");
        assert!(d.message.contains("need the DNS guard"), "{}", d.message);
        assert_eq!((d.line, d.column), (3, 10));
        let d = first_error("[dns]\nupstream = [\"192.0.2.1\"]\n[[allow]]\nname = \"a\"\nhosts = [\"ok.example\", \"bad*.example\"]\n");
        assert!(
            d.message.contains("invalid host pattern \"bad*.example\""),
            "{}",
            d.message
        );
        assert_eq!((d.line, d.column), (5, 24));
        let d = first_error("[dns]\nupstream = [\"not-an-ip\"]\n");
        assert!(d.message.contains("invalid upstream resolver"));
        assert_eq!((d.line, d.column), (2, 13));
        let d = first_error("[dns]\nlisten = \"127.0.0.1:53\"\n");
        assert!(d.message.contains("at least one upstream"), "{}", d.message);
        let d = first_error("[dns]\nupstream = [\"192.0.2.1\"]\ngrace = \"soon\"\n");
        assert!(d.message.contains("invalid duration"));
        assert_eq!((d.line, d.column), (3, 9));
        let d = first_error("[dns]\nupstream = [\"192.0.2.1\"]\ncache = 1\n");
        assert!(d.message.contains("unknown field `cache`"), "{}", d.message);
        let d = first_error("[[allow]]\nname = \"dns-bypass\"\nports = [1]\n");
        assert!(d.message.contains("reserved"));
        let d = first_error("mark = 0\n");
        assert!(d.message.contains("mark 0 is out of range"));
        let errs = parse("[novelty]\nkernel_timeout = \"8d\"\nset_size = 0\n")
            .expect_err("out of range")
            .0;
        let found: Vec<(&str, usize, usize)> = errs
            .iter()
            .map(|d| (d.message.as_str(), d.line, d.column))
            .collect();
        assert_eq!(
            found,
            [
                ("kernel_timeout \"8d\" is out of range", 2, 18),
                ("set_size 0 is out of range", 3, 12),
            ]
        );
    }

    #[test]
    fn proxy_section_and_via() {
        let p = parse("[proxy]\nlisten = \"127.0.0.1:8888\"\nrequire_sni = true\nidle_timeout = \"30s\"\nmax_per_client = 5\n[[allow]]\nname = \"web\"\nhosts = [\"example.com\"]\nvia = \"proxy\"\n").unwrap();
        let px = p.proxy.clone().unwrap();
        assert_eq!(px.listen, "127.0.0.1:8888".parse().unwrap());
        assert!(px.require_sni && px.ssrf_guard);
        assert_eq!(px.idle_timeout, std::time::Duration::from_secs(30));
        assert_eq!(
            (px.max_per_client, px.max_connections),
            (5, ProxyConfig::DEFAULT_MAX_CONNECTIONS)
        );
        assert_eq!(p.rules[0].via, Via::Proxy);
        assert_eq!(
            p.host_rules().count(),
            0,
            "the DNS guard does not answer for proxy-only rules"
        );

        let d = first_error("[[allow]]\nname = \"a\"\nhosts = [\"x.example\"]\nvia = \"proxy\"\n");
        assert!(d.message.contains("needs the proxy"), "{}", d.message);
        assert_eq!((d.line, d.column), (4, 7));
        let d = first_error("[proxy]\n[[allow]]\nname = \"a\"\nports = [1]\nvia = \"proxy\"\n");
        assert!(d.message.contains("this rule has neither"), "{}", d.message);
        // An internal service behind the proxy: its addresses, proxy only.
        let p = parse("[proxy]\n[[allow]]\nname = \"wiki\"\ncidrs = [\"10.2.0.5\"]\nports = [443]\nvia = \"proxy\"\n").unwrap();
        assert_eq!(p.rules[0].via, Via::Proxy);
        let d =
            first_error("[[allow]]\nname = \"wiki\"\ncidrs = [\"10.2.0.5\"]\nvia = \"proxy\"\n");
        assert!(d.message.contains("needs the proxy"), "{}", d.message);
        let d = first_error("[proxy]\nmax_connections = 0\n");
        assert!(d.message.contains("not a positive number"), "{}", d.message);
        let d = first_error("[proxy]\nlisten = \"nowhere\"\n");
        assert!(
            d.message.contains("invalid listen address"),
            "{}",
            d.message
        );
        // Hosts with only a proxy are fine without via: they are reachable through it.
        assert!(parse("[proxy]\n[[allow]]\nname = \"a\"\nhosts = [\"x.example\"]\n").is_ok());
    }

    #[test]
    fn api_section_is_loopback_only_and_the_dashboard_opt_in() {
        let api = parse("[api]\n").unwrap().api.unwrap();
        assert_eq!(api.listen, "127.0.0.1:9465".parse().unwrap());
        assert!(!api.dashboard);
        assert_eq!(parse("").unwrap().api, None, "off by default");
        let api = parse("[api]\nlisten = \"[::1]:8080\"\ndashboard = true\n")
            .unwrap()
            .api
            .unwrap();
        assert_eq!((api.listen.port(), api.dashboard), (8080, true));
        let d = first_error("[api]\nlisten = \"0.0.0.0:9465\"\n");
        assert!(d.message.contains("loopback only"), "{}", d.message);
        assert_eq!((d.line, d.column), (2, 10));
        let d = first_error("[api]\nlisten = \"here\"\n");
        assert!(
            d.message.contains("invalid listen address"),
            "{}",
            d.message
        );
        let d = first_error("[api]\nport = 1\n");
        assert!(d.message.contains("unknown field"), "{}", d.message);
    }

    #[test]
    fn api_group_defaults_to_egret() {
        let p = parse("[api]\n").unwrap();
        assert_eq!(p.api.as_ref().unwrap().group, "egret");
        assert_eq!(p.access_group(), "egret");
        let p = parse("[api]\ngroup = \"ops\"\n").unwrap();
        assert_eq!(p.access_group(), "ops");
        assert_eq!(parse("").unwrap().access_group(), "egret", "without [api]");
    }

    #[test]
    fn metrics_section() {
        assert_eq!(
            parse("[metrics]\n").unwrap().metrics,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(parse("").unwrap().metrics, None, "off by default");
        let d = first_error("[metrics]\nlisten = \"localhost\"\n");
        assert!(d.message.contains("invalid listen address"));
        assert_eq!((d.line, d.column), (2, 10));
        assert!(first_error("[metrics]\nport = 1\n")
            .message
            .contains("unknown field"));
    }

    /// A local cache as upstream: its user by name or number (and only with
    /// a local upstream); a guard on the wildcard cannot share its port; the
    /// cache's mark (mark xor 1) may not be 0.
    #[test]
    fn a_local_cache_upstream_and_its_user() {
        let p = parse("[dns]\nupstream = [\"127.0.0.53\"]\ncache_user = \"backup\"\n").unwrap();
        let dns = p.dns.unwrap();
        assert_eq!(dns.cache_user, Some(34));
        assert_eq!(
            dns.local_upstream(),
            ["127.0.0.53:53".parse::<SocketAddr>().unwrap()]
        );
        let p =
            parse("[dns]\nupstream = [\"127.0.0.2:5353\", \"192.0.2.53\"]\ncache_user = \"991\"\n")
                .unwrap();
        assert_eq!(p.dns.unwrap().cache_user, Some(991));
        let d = first_error("[dns]\nupstream = [\"127.0.0.53\"]\ncache_user = \"no-such-user\"\n");
        assert!(d.message.contains("unknown user"), "{}", d.message);
        let d = first_error("[dns]\nupstream = [\"192.0.2.53\"]\ncache_user = \"backup\"\n");
        assert!(
            d.message.contains("no upstream is on this host"),
            "{}",
            d.message
        );
        let d = first_error("[dns]\nlisten = \"0.0.0.0:53\"\nupstream = [\"127.0.0.2\"]\n");
        assert!(d.message.contains("cannot share port 53"), "{}", d.message);
        assert!(parse("[dns]\nlisten = \"0.0.0.0:53\"\nupstream = [\"127.0.0.2:5353\"]\n").is_ok());
        let d = first_error("mark = 1\n[dns]\nupstream = [\"127.0.0.2\"]\n");
        assert!(d.message.contains("cache's mark"), "{}", d.message);
        assert!(parse("mark = 1\n[dns]\nupstream = [\"192.0.2.53\"]\n").is_ok());
    }

    #[test]
    fn container_listen_is_a_wildcard_on_a_port_of_its_own() {
        let dns = |extra: &str| format!("[dns]\nupstream = [\"192.0.2.53\"]\n{extra}");
        let p = parse(&dns("")).unwrap();
        assert_eq!(
            p.dns.unwrap().container_listen,
            "0.0.0.0:10053".parse().unwrap()
        );
        let p = parse(&dns("container_listen = \"[::]:5300\"\n")).unwrap();
        assert_eq!(
            p.dns.unwrap().container_listen,
            "[::]:5300".parse().unwrap()
        );
        // The redirect picks the bridge's address: a fixed one cannot work.
        for bad in ["10.0.0.1:10053", "0.0.0.0:53", "0.0.0.0:0", "nonsense"] {
            let d = first_error(&dns(&format!("container_listen = \"{bad}\"\n")));
            assert!(
                d.message.contains("invalid container_listen"),
                "{bad}: {}",
                d.message
            );
            assert_eq!(d.line, 3, "{bad}");
        }
    }

    #[test]
    fn scope_and_container_interfaces() {
        let p = parse("scope = \"host+containers\"\n").unwrap();
        assert_eq!(p.scope, Scope::HostAndContainers);
        assert!(p.container_interfaces.contains(&"docker0".to_string()));
        let p =
            parse("scope = \"host+containers\"\ncontainer_interfaces = [\"lxcbr0\", \"veth*\"]\n")
                .unwrap();
        assert_eq!(p.container_interfaces, ["lxcbr0", "veth*"]);
        assert!(parse("").unwrap().container_interfaces.is_empty());
        let d = first_error("scope = \"host+containers\"\ncontainer_interfaces = [\"a*b\"]\n");
        assert!(
            d.message.contains("invalid interface name"),
            "{}",
            d.message
        );
        assert_eq!((d.line, d.column), (2, 25));
        let p =
            parse("scope = \"host+containers\"\ncontainer_runtime = \"/run/podman/podman.sock\"\n")
                .unwrap();
        assert_eq!(
            p.container_runtime.as_deref(),
            Some(Path::new("/run/podman/podman.sock"))
        );
        assert_eq!(
            parse("scope = \"host+containers\"\n")
                .unwrap()
                .container_runtime,
            None
        );
        let d = first_error("scope = \"host+containers\"\ncontainer_runtime = \"docker.sock\"\n");
        assert!(d.message.contains("absolute path"), "{}", d.message);
        let d = first_error("container_runtime = \"/var/run/docker.sock\"\n");
        assert!(d.message.contains("needs scope"), "{}", d.message);
        let d = first_error("container_interfaces = [\"docker0\"]\n");
        assert!(d.message.contains("needs scope"), "{}", d.message);
        assert!(first_error("scope = \"everything\"\n")
            .message
            .contains("unknown variant"));
    }

    #[test]
    fn heartbeat_and_restore_table() {
        let p = parse("heartbeat = \"5m\"\nrestore_table = true\n").unwrap();
        assert_eq!(p.heartbeat, Some(std::time::Duration::from_secs(300)));
        assert!(p.restore_table);
        let p = parse("").unwrap();
        assert_eq!((p.heartbeat, p.restore_table), (None, false));
        let d = first_error("heartbeat = \"0s\"\n");
        assert!(d.message.contains("more than zero"), "{}", d.message);
        assert_eq!((d.line, d.column), (1, 13));
    }

    #[test]
    fn empty_rule_is_an_error() {
        let d = first_error("[[allow]]\nname = \"nothing\"\nprotocol = \"udp\"\n");
        assert!(d.message.contains("is empty"));
        assert_eq!((d.line, d.column), (2, 8));
    }

    #[test]
    fn duplicate_names_point_at_the_first() {
        let d = first_error(
            "[[allow]]\nname = \"a\"\nports = [1]\n[[allow]]\nname = \"a\"\nports = [2]\n",
        );
        assert_eq!(d.line, 5);
        assert!(d.hint.unwrap().contains("policy.toml:2"));
    }

    #[test]
    fn missing_name_is_reported() {
        let d = first_error("[[allow]]\nports = [1]\n");
        assert!(d.message.contains("missing field `name`"), "{}", d.message);
    }

    #[test]
    fn bad_mode_value() {
        let d = first_error("mode = \"enforcing\"\n");
        assert!(d.message.contains("unknown variant"), "{}", d.message);
        assert_eq!((d.line, d.column), (1, 8));
    }

    #[test]
    fn rule_mode_needs_a_subject() {
        let d = first_error("[[allow]]\nname = \"a\"\nports = [1]\nmode = \"audit\"\n");
        assert!(d.message.contains("per-rule mode"));
        assert!(parse("[[allow]]\nname = \"a\"\nusers = [0]\nmode = \"audit\"\n").is_ok());
    }

    #[test]
    fn protocol_lists_and_any() {
        let p = parse("[[allow]]\nname = \"dns\"\nprotocol = [\"udp\", \"tcp\"]\nports = [53]\ncidrs=[\"192.0.2.53\"]\n[[allow]]\nname = \"all\"\nprotocol = \"any\"\ncidrs = [\"10.0.0.0/8\"]\n").unwrap();
        assert_eq!(p.rules[0].protocols, vec![L4::Tcp, L4::Udp]);
        assert!(p.rules[1].protocols.is_empty());
        let d = first_error(
            "[[allow]]\nname = \"a\"\nprotocol = [\"any\", \"tcp\"]\ncidrs = [\"10.0.0.0/8\"]\n",
        );
        assert!(d.message.contains("cannot be combined"));
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let errs = parse(
            "log_group = 70000\n[[allow]]\nname = \"a b\"\ncidrs = [\"nope\"]\nports = [0]\n",
        )
        .unwrap_err()
        .0;
        assert_eq!(errs.len(), 4, "{errs:?}");
    }

    #[test]
    fn includes_merge_and_catch_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("policy.toml");
        std::fs::create_dir(dir.path().join("policy.d")).unwrap();
        std::fs::write(
            &main,
            "include = [\"policy.d/*.toml\"]\n[[allow]]\nname = \"a\"\nports = [1]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("policy.d/10-b.toml"),
            "[[allow]]\nname = \"b\"\nports = [2]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("policy.d/20-c.toml"),
            "[[allow]]\nname = \"c\"\nports = [3]\n",
        )
        .unwrap();
        let p = load(&main, &FakeAccounts).unwrap();
        let names: Vec<_> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);

        std::fs::write(
            dir.path().join("policy.d/30-dup.toml"),
            "[[allow]]\nname = \"b\"\nports = [4]\n",
        )
        .unwrap();
        let d = load(&main, &FakeAccounts).unwrap_err().0.remove(0);
        assert!(d.file.ends_with("policy.d/30-dup.toml"));
        assert!(d.message.contains("defined twice"));

        std::fs::write(
            dir.path().join("policy.d/30-dup.toml"),
            "mode = \"audit\"\n",
        )
        .unwrap();
        let d = load(&main, &FakeAccounts).unwrap_err().0.remove(0);
        assert!(d.hint.unwrap().contains("included file may only hold"));
    }

    #[test]
    fn a_missing_literal_include_is_an_error() {
        let d = first_error("include = [\"nope.toml\"]\n");
        assert!(d.message.contains("does not exist"));
    }

    #[test]
    fn units_are_normalized() {
        let p = parse(
            "[[allow]]\nname = \"a\"\nunits = [\"/system.slice/x.service\", \"y.service\"]\n",
        )
        .unwrap();
        assert_eq!(
            p.rules[0].units,
            vec![
                "system.slice/x.service".to_string(),
                "y.service".to_string()
            ]
        );
        let d = first_error("[[allow]]\nname = \"a\"\nunits = [\"../etc\"]\n");
        assert!(d.message.contains("invalid unit"));
    }
}
