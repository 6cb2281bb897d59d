//! `egret doctor`: checks what egret needs from this host and explains each
//! problem with its fix. Read-only: nothing is loaded, bound or written
//! except a probe file in the state dir (removed at once).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::kernel::nft::Nftables;
use crate::pidfile::running_pid;
use crate::policy::{Policy, DEFAULT_LOG_GROUP};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but something deserves attention.
    Warn,
    /// egret cannot do its job until this is fixed.
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it (empty when all is well).
    pub fix: String,
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Where the checks look; tests point them elsewhere.
pub struct Inputs<'a> {
    pub policy: Option<&'a Policy>,
    pub state_dir: &'a Path,
    pub resolv_conf: PathBuf,
    pub nsswitch_conf: PathBuf,
}

pub fn run(inputs: &Inputs<'_>) -> Vec<Check> {
    let group = inputs.policy.map_or(DEFAULT_LOG_GROUP, |p| p.log_group);
    let mut out = vec![
        privileges(),
        nf_tables(),
        nflog(group, inputs.state_dir),
        sock_diag(),
        cgroup_v2(),
        kernel_features(),
        conntrack(),
        clock(),
        state_dir(inputs.state_dir),
    ];
    out.extend(other_firewalls());
    if let Some(p) = inputs.policy {
        out.push(first_day(p, inputs.state_dir));
        out.push(resolver(p, &inputs.resolv_conf));
        if p.dns.is_some() {
            out.push(name_service(&inputs.nsswitch_conf));
            out.push(stub_askers(inputs.state_dir));
            if let Some(c) = local_cache(p) {
                out.push(c);
            }
        }
        if p.scope == crate::policy::Scope::HostAndContainers {
            out.push(container_runtime(p));
            out.push(container_dns(p));
        }
    }
    out
}

/// Where the installed documentation of the audit workflow is.
const AUDIT_DOC: &str = "/usr/share/doc/egret/docs/audit.md";

/// Is the host on the path from audit to enforcement (docs/audit.md)? An
/// audit without the DNS guard learns addresses, which cloud services change
/// under their names; enforcing what no audit informed blocks what the host
/// needs. Advice only: a warning, never a failure.
fn first_day(policy: &Policy, state_dir: &Path) -> Check {
    use crate::policy::Mode;
    let store = crate::monitor::store::Store::open_read_only(state_dir);
    let unreadable = store.is_err();
    let audited = store
        .ok()
        .flatten()
        .and_then(|s| s.run_settings().ok().flatten())
        .filter(|r| r.mode == Mode::Audit.as_str());
    match (policy.mode, policy.dns.is_some()) {
        (Mode::Audit, false) => check(
            "audit path",
            Status::Warn,
            "audit mode without [dns]: the audit learns addresses, not the host names they came from, and `egret suggest` can only write address rules that break when a service moves",
            format!("add a [dns] section (upstream = your resolvers) so the DNS guard names every destination, then let the audit run; see {AUDIT_DOC}"),
        ),
        (Mode::Audit, true) => check(
            "audit path",
            Status::Ok,
            format!("audit mode with the DNS guard: after some normal traffic, `egret suggest --state-dir {} > suggested.toml`, review it, `egret simulate suggested.toml`, then enforce ({AUDIT_DOC})", state_dir.display()),
            "",
        ),
        (Mode::Enforce, _) => match audited {
            Some(r) => check(
                "audit path",
                Status::Ok,
                format!("enforcing; the last audit ran at {} (`egret simulate` replays what it recorded against a policy)", r.at),
                "",
            ),
            None if unreadable => check(
                "audit path",
                Status::Warn,
                format!("enforce mode; whether an audit ran cannot be told: the store in {} cannot be read (run as root)", state_dir.display()),
                format!("see {AUDIT_DOC} for the way from audit to enforcement"),
            ),
            None => check(
                "audit path",
                Status::Warn,
                format!("enforce mode, but no audit was ever recorded in {}: traffic this host needs and no rule allows is blocked", state_dir.display()),
                format!("run with mode = \"audit\" and [dns] first, then `egret suggest` and `egret simulate` before enforcing; see {AUDIT_DOC}"),
            ),
        },
    }
}

/// glibc reads resolv.conf only for the `dns` source of nsswitch.conf's
/// `hosts:` line. `resolve` (libnss-resolve, which Debian installs with
/// systemd-resolved) before it asks systemd-resolved over its own socket, so
/// every lookup reaches the guard as resolved's; other sources (files,
/// myhostname, mdns4_minimal) resolve nothing through DNS.
fn name_service(nsswitch: &Path) -> Check {
    const NAME: &str = "nsswitch";
    let text = std::fs::read_to_string(nsswitch).unwrap_or_default();
    let sources: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split('#').next()?.trim().strip_prefix("hosts:"))
        .flat_map(|l| l.split_whitespace())
        .filter(|w| !w.starts_with('['))
        .collect();
    let resolve = sources.iter().position(|s| *s == "resolve");
    let dns = sources.iter().position(|s| *s == "dns");
    let resolved_first = match (resolve, dns) {
        (Some(r), Some(d)) => r < d,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if resolved_first {
        check(
            NAME,
            Status::Warn,
            format!("{}'s hosts line asks systemd-resolved (`resolve`) before resolv.conf (`dns`): programs' lookups reach the guard as systemd-resolved's, not their own", nsswitch.display()),
            "remove `resolve [!UNAVAIL=return]` from the hosts line (e.g. `hosts: files myhostname dns`); docs/dns.md, \"systemd-resolved\"",
        )
    } else {
        check(
            NAME,
            Status::Ok,
            format!(
                "{}: programs resolve through resolv.conf",
                nsswitch.display()
            ),
            "",
        )
    }
}

/// Did queries reach the guard through a local resolver? The guard counts
/// the askers it recognises as one (systemd-resolved, dnsmasq...) in its
/// books; each such query lost the program that asked.
fn stub_askers(state_dir: &Path) -> Check {
    use crate::monitor::books::LocalResolver;
    const NAME: &str = "dns askers";
    let books = crate::monitor::store::Store::open_read_only(state_dir)
        .ok()
        .flatten()
        .and_then(|s| s.books().ok().flatten());
    let Some((books, guard)) = books.and_then(|b| b.dns_guard.map(|g| (b, g))) else {
        return check(
            NAME,
            Status::Ok,
            format!("no books of a DNS guard in {} yet: who asks the guard is checked once egret run has served queries", state_dir.display()),
            "",
        );
    };
    let stubs = guard.via_stub;
    if stubs.total() == 0 {
        return check(
            NAME,
            Status::Ok,
            format!(
                "none of the {} queries the guard served (books of {}) came through a local resolver",
                guard.queries, books.updated_at
            ),
            "",
        );
    }
    let by: Vec<String> = LocalResolver::ALL
        .iter()
        .filter(|r| stubs.get(**r) > 0)
        .map(|r| format!("{} {}", r.name(), stubs.get(*r)))
        .collect();
    check(
        NAME,
        Status::Warn,
        format!(
            "{} of the {} queries the guard served (books of {}) were asked by a local resolver ({}): for those the guard sees the resolver, not the program that asked, so refused names and DNS callbacks are reported as the resolver's and per-identity decisions lose their subject",
            stubs.total(),
            guard.queries,
            books.updated_at,
            by.join(", ")
        ),
        "point programs at the guard itself and keep local resolvers out of their path (docs/dns.md, \"Programs must ask the guard\")",
    )
}

/// With `scope = "host+containers"`: can egret name the containers? Asks the
/// runtime's Docker-compatible API for `/_ping`, as `egret run` would ask for
/// its containers. Optional: without it events name the bridge and address.
fn container_runtime(policy: &Policy) -> Check {
    let sockets: Vec<PathBuf> = match &policy.container_runtime {
        Some(p) => vec![p.clone()],
        None => crate::monitor::containers::DEFAULT_SOCKETS
            .iter()
            .map(PathBuf::from)
            .collect(),
    };
    let mut tried = Vec::new();
    for socket in &sockets {
        match ping(socket) {
            Ok(()) => {
                return check(
                    "container runtime",
                    Status::Ok,
                    format!("{} answers: container names are known", socket.display()),
                    "",
                )
            }
            Err(e) => tried.push(format!("{}: {e}", socket.display())),
        }
    }
    check(
        "container runtime",
        Status::Warn,
        format!(
            "no container runtime answers ({}): events of forwarded traffic will name the bridge and address, not the container",
            tried.join("; ")
        ),
        "start Docker or podman's API service (podman.socket), or set container_runtime = \"/path/to/api.sock\" in the policy; egret needs read access to that socket",
    )
}

fn ping(socket: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let status = String::from_utf8_lossy(&head[..n]);
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(std::io::Error::other(format!("answered HTTP {code}"))),
        None => Err(std::io::Error::other("not an HTTP answer")),
    }
}

fn privileges() -> Check {
    const CAP_NET_ADMIN: u32 = 12;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    if eff & (1 << CAP_NET_ADMIN) != 0 {
        check("privileges", Status::Ok, "CAP_NET_ADMIN is effective", "")
    } else {
        check(
            "privileges",
            Status::Fail,
            "CAP_NET_ADMIN is not effective: egret cannot load rules or read NFLOG",
            "run as root, or with the capabilities of packaging/egret.service (docs/deployment.md)",
        )
    }
}

fn nf_tables() -> Check {
    match Nftables::open().and_then(|mut n| n.logged_packets()) {
        Ok(Some(_)) => check("nf_tables", Status::Ok, "nf_tables answers; egret's table is loaded", ""),
        Ok(None) => check("nf_tables", Status::Ok, "nf_tables answers; egret's table is not loaded", ""),
        Err(e) => check(
            "nf_tables",
            Status::Fail,
            format!("nf_tables does not answer: {e}"),
            "use a kernel with CONFIG_NF_TABLES (every Debian/Ubuntu/RHEL kernel has it) and load nf_tables (modprobe nf_tables)",
        ),
    }
}

/// Who holds the NFLOG group (`kernel::nflog::group_holder`): free, egret
/// run, or another program.
fn nflog(group: u16, state_dir: &Path) -> Check {
    let Ok(holder) = crate::kernel::nflog::group_holder(group) else {
        return check(
            "nflog",
            Status::Ok,
            format!("nfnetlink_log is not loaded yet; it loads when egret binds group {group}"),
            "",
        );
    };
    let ours = running_pid(state_dir);
    let Some(port) = holder else {
        return check(
            "nflog",
            Status::Ok,
            format!("NFLOG group {group} is free"),
            "",
        );
    };
    let pid = crate::kernel::nflog::port_owner(port);
    if let Some(pid) = pid.filter(|p| ours.is_some_and(|o| o as u32 == *p)) {
        return check(
            "nflog",
            Status::Ok,
            format!("NFLOG group {group} is read by egret run (pid {pid})"),
            "",
        );
    }
    let who = pid
        .and_then(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some(format!("{} (pid {pid})", comm.trim()))
        })
        .unwrap_or_else(|| format!("netlink port {port}"));
    check(
        "nflog",
        Status::Fail,
        format!("NFLOG group {group} is taken by {who}: egret's blocked-packet events would go there"),
        "stop the other consumer (ulogd2? another egret run with another --state-dir?), or set log_group in the policy to a free group",
    )
}

fn sock_diag() -> Check {
    match crate::kernel::sockets::probe() {
        Ok(_) => check(
            "sock_diag",
            Status::Ok,
            "sock_diag answers: blocked packets can be traced to processes",
            "",
        ),
        Err(e) => check(
            "sock_diag",
            Status::Warn,
            format!("sock_diag is not available ({e}): events will name users, not processes"),
            "load inet_diag, tcp_diag and udp_diag (modprobe)",
        ),
    }
}

fn cgroup_v2() -> Check {
    match crate::cgroup::cgroup2_root() {
        Some(root) => check(
            "cgroup v2",
            Status::Ok,
            format!(
                "a cgroup v2 hierarchy is mounted at {}: unit rules work",
                root.display()
            ),
            "",
        ),
        None => check(
            "cgroup v2",
            Status::Warn,
            "no cgroup v2 hierarchy: `units` rules cannot match and events name no unit",
            "boot with systemd.unified_cgroup_hierarchy=1 (the default since Debian 11 and RHEL 9)",
        ),
    }
}

/// What this kernel's nf_tables can do, by version (docs/deployment.md "Kernels").
fn kernel_features() -> Check {
    use crate::kernel::features;
    let release = features::running_release();
    let (have, lack): (Vec<_>, Vec<_>) = features::ALL
        .iter()
        .partition(|f| features::has(**f, &release));
    let list = |fs: &[&features::Feature]| {
        fs.iter()
            .map(|f| format!("{} ({})", f.name, f.used_by))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if lack.is_empty() {
        check(
            "kernel features",
            Status::Ok,
            format!(
                "Linux {release} has every feature egret uses: {}",
                list(&have)
            ),
            "",
        )
    } else {
        check(
            "kernel features",
            Status::Warn,
            format!(
                "Linux {release} lacks {}: `egret apply`/`run` refuse a policy that uses them",
                list(&lack)
            ),
            "boot Linux 5.13 or newer (Debian 12 ships 6.1) to use them",
        )
    }
}

fn conntrack() -> Check {
    if Path::new("/proc/sys/net/netfilter/nf_conntrack_count").exists() {
        check("conntrack", Status::Ok, "connection tracking is active", "")
    } else {
        check(
            "conntrack",
            Status::Ok,
            "connection tracking is not active yet; egret's ruleset turns it on (ct state)",
            "",
        )
    }
}

fn clock() -> Check {
    // 2024-01-01: a clock before this is wrong, and so would every timestamp be.
    let floor = UNIX_EPOCH + Duration::from_secs(1_704_067_200);
    if SystemTime::now() >= floor {
        check("clock", Status::Ok, "the clock is plausible", "")
    } else {
        check(
            "clock",
            Status::Fail,
            "the clock is before 2024: event timestamps would be wrong",
            "set the time (systemd-timesyncd, chrony)",
        )
    }
}

fn state_dir(dir: &Path) -> Check {
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    // Made as `egret run` makes it (0750 whatever the umask), should doctor come first.
    let result = crate::monitor::store::prepare_state_dir(dir, None)
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
        .and_then(|()| std::fs::write(&probe, b"probe"))
        .and_then(|()| std::fs::remove_file(&probe));
    match result {
        Ok(()) => check("state dir", Status::Ok, format!("{} is writable", dir.display()), ""),
        Err(e) => check(
            "state dir",
            Status::Fail,
            format!("cannot write in {}: {e}", dir.display()),
            "create it writable by egret (the unit's StateDirectory=egret does), or pass --state-dir",
        ),
    }
}

/// ufw and firewalld filter egress too when told to: both must allow a flow.
fn other_firewalls() -> Vec<Check> {
    let mut out = Vec::new();
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let ufw_on = read("/etc/ufw/ufw.conf")
        .lines()
        .any(|l| l.trim() == "ENABLED=yes");
    let ufw_deny_out = read("/etc/default/ufw")
        .lines()
        .any(|l| l.trim().starts_with("DEFAULT_OUTPUT_POLICY=") && !l.contains("ACCEPT"));
    if ufw_on && ufw_deny_out {
        out.push(check(
            "ufw",
            Status::Warn,
            "ufw is enabled with a default-deny output policy: a flow must be allowed by both ufw and egret",
            "set DEFAULT_OUTPUT_POLICY=\"ACCEPT\" in /etc/default/ufw and let egret decide egress",
        ));
    }
    let firewalld = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "firewalld")
            })
        })
        .unwrap_or(false);
    if firewalld {
        out.push(check(
            "firewalld",
            Status::Warn,
            "firewalld is running; if its policies restrict egress, a flow must be allowed by both",
            "keep firewalld's egress open (the default) and let egret decide egress",
        ));
    }
    out
}

/// With `[dns]`, local resolvers must ask the guard, or every lookup is
/// blocked as `dns-bypass`.
fn resolver(policy: &Policy, resolv_conf: &Path) -> Check {
    let Some(dns) = &policy.dns else {
        return check(
            "resolver",
            Status::Ok,
            "no [dns]: the system resolver is not egret's concern",
            "",
        );
    };
    let servers: Vec<IpAddr> = std::fs::read_to_string(resolv_conf)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let guard = dns.listen.ip();
    let is_guard = |ip: &IpAddr| *ip == guard || (guard.is_unspecified() && ip.is_loopback());
    let list = |ips: &[IpAddr]| {
        ips.iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if servers.is_empty() && !dns.intercept {
        return check(
            "resolver",
            Status::Fail,
            format!("{} names no nameserver (glibc then asks 127.0.0.1 on its own), not the DNS guard on {}", resolv_conf.display(), dns.listen),
            "point /etc/resolv.conf at the guard (docs/dns.md), or set intercept = true in [dns]",
        );
    }
    let remote: Vec<IpAddr> = servers
        .iter()
        .filter(|ip| !ip.is_loopback() && !is_guard(ip))
        .copied()
        .collect();
    if !remote.is_empty() && !dns.intercept {
        return check(
            "resolver",
            Status::Fail,
            format!(
                "the system resolver asks {} instead of the DNS guard on {}: those lookups will be blocked (dns-bypass)",
                list(&remote),
                dns.listen
            ),
            "point /etc/resolv.conf at the guard (docs/dns.md), or set intercept = true in [dns]",
        );
    }
    // The guard's own local cache: only the guard may ask it.
    let cache: Vec<IpAddr> = servers
        .iter()
        .filter(|ip| !is_guard(ip) && dns.local_upstream().iter().any(|a| a.ip() == **ip))
        .copied()
        .collect();
    if !cache.is_empty() {
        return check(
            "resolver",
            Status::Fail,
            format!(
                "programs ask {}, the DNS guard's local cache, instead of the guard on {}: only the guard may ask it, so those lookups are blocked (dns-bypass)",
                list(&cache),
                dns.listen
            ),
            "point /etc/resolv.conf at the guard (docs/dns.md, \"A local cache behind the guard\")",
        );
    }
    // A local resolver in front of the guard (systemd-resolved's stub,
    // dnsmasq, unbound): lookups work if it forwards to the guard, but the
    // guard then sees it, not the program that asked.
    let local: Vec<IpAddr> = servers
        .iter()
        .filter(|ip| ip.is_loopback() && !is_guard(ip))
        .copied()
        .collect();
    if local.is_empty() {
        return if dns.intercept && servers.is_empty() {
            check(
                "resolver",
                Status::Ok,
                "intercept = true: plain DNS goes to the guard whatever the configuration",
                "",
            )
        } else if dns.intercept && !remote.is_empty() {
            check(
                "resolver",
                Status::Ok,
                format!(
                    "intercept = true: queries to {} are answered by the guard (the asker is not always found for those; pointing programs at the guard is better)",
                    list(&remote)
                ),
                "",
            )
        } else {
            check(
                "resolver",
                Status::Ok,
                format!("programs ask the DNS guard on {} directly", dns.listen),
                "",
            )
        };
    }
    let resolved_stub: IpAddr = [127, 0, 0, 53].into();
    if local == [resolved_stub] && !dns.intercept {
        // systemd-resolved's stub: where resolved forwards to decides
        // whether its lookups work at all.
        let upstream: Vec<IpAddr> = std::fs::read_to_string("/run/systemd/resolve/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let others: Vec<IpAddr> = upstream
            .iter()
            .filter(|ip| !is_guard(ip))
            .copied()
            .collect();
        if upstream.is_empty() || !others.is_empty() {
            return check(
                "resolver",
                Status::Fail,
                format!(
                    "the system resolver (through systemd-resolved) asks {} instead of the DNS guard on {}: those lookups will be blocked (dns-bypass)",
                    if others.is_empty() { "nobody".to_string() } else { list(&others) },
                    dns.listen
                ),
                "point programs at the guard itself (docs/dns.md, \"systemd-resolved\")",
            );
        }
    }
    check(
        "resolver",
        Status::Warn,
        format!(
            "programs ask {} (a local resolver{}) instead of the DNS guard on {}: if it forwards to the guard, every query reaches the guard from that resolver and events name it, not the program that asked; if it does not, its lookups are blocked (dns-bypass)",
            list(&local),
            if local.contains(&resolved_stub) { ": 127.0.0.53 is systemd-resolved's stub" } else { "" },
            dns.listen
        ),
        "make the guard the address programs ask (docs/dns.md, \"Programs must ask the guard\")",
    )
}

/// What listens on a local upstream's address and port: the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheProcess {
    pid: u32,
    uid: u32,
    /// `comm`: dnsmasq, unbound, systemd-resolve...
    name: String,
    /// dnsmasq: whether its upstream queries carry the conntrack mark of
    /// the query they answer (`dnsmasq_marks`), else why not.
    marks: Result<(), &'static str>,
}

/// With a local cache as the guard's upstream (programs -> guard -> cache):
/// something must listen there, and its upstream queries must be able to
/// leave: dnsmasq with `--conntrack` (the cache mark), or the cache's user
/// named in `cache_user`. `None` without a local upstream.
fn local_cache(policy: &Policy) -> Option<Check> {
    let dns = policy.dns.as_ref()?;
    let local = dns.local_upstream();
    if local.is_empty() {
        return None;
    }
    let found: Vec<(std::net::SocketAddr, Option<CacheProcess>)> =
        local.iter().map(|a| (*a, cache_process(*a))).collect();
    Some(judge_local_cache(policy, &found))
}

fn judge_local_cache(
    policy: &Policy,
    found: &[(std::net::SocketAddr, Option<CacheProcess>)],
) -> Check {
    const NAME: &str = "dns cache";
    let cache_user = policy.dns.as_ref().and_then(|d| d.cache_user);
    let mark = crate::policy::cache_mark(policy.mark);
    let mut ok = Vec::new();
    for (addr, p) in found {
        let Some(p) = p else {
            return check(
                NAME,
                Status::Fail,
                format!("the DNS guard's upstream {addr} is on this host, but nothing listens there: every lookup fails"),
                "start the local cache on that address (docs/dns.md, \"A local cache behind the guard\"), or fix [dns] upstream",
            );
        };
        let who = format!(
            "{} (pid {}) on {addr}",
            crate::text::printable(&p.name),
            p.pid
        );
        if p.name == "dnsmasq" && p.marks.is_ok() {
            ok.push(format!("{who} copies the guard's conntrack mark onto its upstream queries (--conntrack): they carry {mark:#010x} and leave"));
        } else if cache_user == Some(p.uid) {
            let resolved = p.name.starts_with("systemd-resolve");
            if resolved {
                return check(
                    NAME,
                    Status::Warn,
                    format!("{who}: its upstream queries leave as its user's (cache_user = {}); but any local user can ask systemd-resolved through its D-Bus and varlink API, which no firewall rule sees, so names can be resolved around the guard", p.uid),
                    "use dnsmasq with --conntrack as the guard's local cache (docs/dns.md, \"A local cache behind the guard\")",
                );
            }
            ok.push(format!(
                "{who}: its upstream queries leave as its user's (cache_user = {})",
                p.uid
            ));
        } else if let (true, Err(why)) = (p.name == "dnsmasq", p.marks) {
            return check(
                NAME,
                Status::Warn,
                format!("{who} {why}, so they are blocked (dns-bypass) and lookups of allowed names fail"),
                "run dnsmasq with `conntrack` and `bind-dynamic` (not `bind-interfaces`) and restart it (docs/dns.md, \"A local cache behind the guard\")",
            );
        } else {
            return check(
                NAME,
                Status::Warn,
                format!("{who} cannot carry the cache mark ({mark:#010x}) and its user (uid {}) is not [dns] cache_user: its upstream queries are blocked (dns-bypass), so lookups of allowed names fail", p.uid),
                "use dnsmasq with --conntrack, or set [dns] cache_user to the cache's user (docs/dns.md, \"A local cache behind the guard\")",
            );
        }
    }
    check(
        NAME,
        Status::Ok,
        format!(
            "programs -> the DNS guard -> its local cache: {}; only the guard may ask the cache",
            ok.join("; ")
        ),
        "",
    )
}

/// The process holding a UDP socket bound to `addr` (or to the wildcard
/// on its port) in this network namespace.
fn cache_process(addr: std::net::SocketAddr) -> Option<CacheProcess> {
    let inode = udp_socket_inode(addr)?;
    let wanted = format!("socket:[{inode}]");
    let pid = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())
                })
        })?;
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX);
    let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let marks = if name == "dnsmasq" {
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        let list = |d: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect()
        };
        dnsmasq_marks(&dnsmasq_options(&cmdline, &read, &list))
    } else {
        Err("is not dnsmasq")
    };
    Some(CacheProcess {
        pid,
        uid,
        name,
        marks,
    })
}

/// The inode of the UDP socket bound to `addr`, or to the wildcard
/// address of its family on its port (`/proc/net/udp`, `udp6`).
fn udp_socket_inode(addr: std::net::SocketAddr) -> Option<u64> {
    let (file, hex) = match addr.ip() {
        IpAddr::V4(a) => (
            "/proc/net/udp",
            format!("{:08X}", u32::from_ne_bytes(a.octets())),
        ),
        IpAddr::V6(a) => (
            "/proc/net/udp6",
            a.octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect(),
        ),
    };
    let port = format!("{:04X}", addr.port());
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (a, p) = f.get(1)?.split_once(':')?;
            let bound = a == hex || a.chars().all(|c| c == '0');
            (bound && p == port)
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
}

/// The option names (long form, without `--` or a value) dnsmasq run with
/// `cmdline` has on: from its command line and its configuration
/// (`--conf-file`/`-C`, else /etc/dnsmasq.conf; `--conf-dir`/`-7` and
/// `conf-dir=` lines, one level).
fn dnsmasq_options(
    cmdline: &[String],
    read: &dyn Fn(&Path) -> Option<String>,
    list: &dyn Fn(&Path) -> Vec<PathBuf>,
) -> std::collections::BTreeSet<String> {
    let mut on = std::collections::BTreeSet::new();
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut args = cmdline.iter().skip(1).peekable();
    while let Some(a) = args.next() {
        let mut value = |long: &str, short: &str| -> Option<String> {
            if let Some(v) = a.strip_prefix(&format!("{long}=")) {
                return Some(v.to_string());
            }
            if a == long || a == short {
                return args.next().cloned();
            }
            a.strip_prefix(short)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        if let Some(f) = value("--conf-file", "-C") {
            files.push(PathBuf::from(f));
        } else if let Some(d) = value("--conf-dir", "-7") {
            dirs.push(d);
        } else if a == "-z" {
            on.insert("bind-interfaces".to_string());
        } else if let Some(long) = a.strip_prefix("--") {
            on.insert(long.split('=').next().unwrap_or_default().to_string());
        }
    }
    if files.is_empty() {
        files.push(PathBuf::from("/etc/dnsmasq.conf"));
    }
    let mut texts: Vec<String> = files.iter().filter_map(|f| read(f)).collect();
    for t in &texts {
        dirs.extend(
            t.lines()
                .filter_map(|l| l.trim().strip_prefix("conf-dir="))
                .map(str::to_string),
        );
    }
    for d in dirs {
        // `DIR,.ext,...` leaves out those suffixes; `DIR,*.conf` keeps only those.
        let mut parts = d.split(',');
        let dir = parts.next().unwrap_or_default();
        let filters: Vec<&str> = parts.collect();
        for f in list(Path::new(dir)) {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let keep_only: Vec<&str> = filters.iter().filter_map(|x| x.strip_prefix('*')).collect();
            let skip = name.starts_with('.')
                || name.ends_with('~')
                || filters
                    .iter()
                    .any(|x| !x.starts_with('*') && name.ends_with(x))
                || (!keep_only.is_empty() && !keep_only.iter().any(|x| name.ends_with(x)));
            if !skip {
                texts.extend(read(&f));
            }
        }
    }
    for line in texts.iter().flat_map(|t| t.lines()) {
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            on.insert(
                line.split('=')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            );
        }
    }
    on
}

/// How dnsmasq `options` hand the guard's mark on: `Ok` when its upstream
/// queries carry it, else why not. Measured with dnsmasq 2.90: with
/// `bind-interfaces` (and not `bind-dynamic`) it does not know the address
/// a query came to, so its conntrack lookup fails ("Conntrack connection
/// mark retrieval failed") and its upstream queries carry no mark.
fn dnsmasq_marks(options: &std::collections::BTreeSet<String>) -> Result<(), &'static str> {
    if !options.contains("conntrack") {
        return Err("runs without --conntrack: its upstream queries carry no mark");
    }
    if options.contains("bind-interfaces") && !options.contains("bind-dynamic") {
        return Err("has --conntrack but also bind-interfaces, with which it cannot find a query's conntrack entry: its upstream queries carry no mark");
    }
    Ok(())
}

/// With `scope = "host+containers"`: does containers' DNS reach the guard?
/// The loaded table must redirect the bridges' DNS to the guard's container
/// port, something must listen there, and podman's aardvark-dns (which the
/// redirect bypasses) is pointed out.
fn container_dns(policy: &Policy) -> Check {
    let live = Nftables::open().and_then(|mut n| n.read());
    let listening = policy
        .dns
        .as_ref()
        .is_some_and(|d| udp_listening(d.container_listen.port()));
    // Only one serving this network namespace's bridges.
    let here = std::fs::read_link("/proc/self/ns/net").ok();
    let aardvark = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "aardvark-dns")
                && here.is_some()
                && std::fs::read_link(e.path().join("ns/net")).ok() == here
        });
    judge_container_dns(
        policy,
        live.as_ref().ok().and_then(|l| l.as_ref()),
        listening,
        aardvark,
    )
}

/// Is a UDP socket bound to `port` on the wildcard address (this namespace)?
fn udp_listening(port: u16) -> bool {
    let wanted = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|local| local.split_once(':'))
                    .is_some_and(|(addr, p)| {
                        format!(":{p}") == wanted && addr.chars().all(|c| c == '0')
                    })
            })
    })
}

fn judge_container_dns(
    policy: &Policy,
    live: Option<&crate::ruleset::Ruleset>,
    listening: bool,
    aardvark: bool,
) -> Check {
    const NAME: &str = "container dns";
    let Some(dns) = &policy.dns else {
        return check(
            NAME,
            Status::Warn,
            "no [dns]: containers resolve with whatever their runtime gave them, so `hosts` rules never open anything for them and their DNS callbacks are not reported",
            "add a [dns] section: containers' DNS (UDP and TCP 53) is then redirected to the guard (docs/deployment.md)",
        );
    };
    let port = dns.container_listen.port();
    let redirect = live.and_then(|rs| {
        rs.chains
            .iter()
            .find(|c| c.name == crate::ruleset::CONTAINER_DNS_CHAIN)
    });
    let redirected_to = redirect.and_then(|c| {
        c.rules.iter().find_map(|r| match r.verdict {
            Some(crate::ruleset::Verdict::Redirect(p)) => Some(p),
            _ => None,
        })
    });
    // A table an older egret loaded redirects aardvark-dns's queries too.
    let resolvers_kept = redirect.is_some_and(|c| {
        c.rules
            .iter()
            .any(|r| r.matches.contains(&crate::ruleset::Match::BoundSocket))
    });
    let podman = match (aardvark, resolvers_kept || live.is_none()) {
        (false, _) => "",
        (true, true) => " podman's aardvark-dns is running: it answers the containers of its networks (container names included) and forwards other names from this host, so the guard sees those as aardvark-dns's queries, and refused ones name aardvark-dns, not the container (docs/deployment.md)",
        (true, false) => " podman's aardvark-dns is running: the loaded table redirects queries to it from containers to the guard too, so container names of podman networks do not resolve (docs/deployment.md)",
    };
    match (live, redirected_to) {
        (None, _) => check(
            NAME,
            Status::Warn,
            format!("egret's table is not loaded: containers' DNS is not redirected to the guard yet{podman}"),
            "start `egret run` with this policy",
        ),
        (Some(_), None) => check(
            NAME,
            Status::Fail,
            format!("the loaded table does not redirect the container bridges' DNS to the guard: containers resolve around it and their lookups are blocked (dns-bypass){podman}"),
            "load this policy (`egret reload`, or restart `egret run`)",
        ),
        (Some(_), Some(p)) if p != port => check(
            NAME,
            Status::Fail,
            format!("the loaded table redirects containers' DNS to port {p}, the policy's container_listen is port {port}"),
            "restart `egret run` with this policy",
        ),
        (Some(_), Some(_)) if !listening => check(
            NAME,
            Status::Fail,
            format!("containers' DNS is redirected to port {port}, where nothing listens: containers resolve nothing{podman}"),
            "start `egret run` (it listens there); if another program holds the port, set [dns] container_listen to a free one",
        ),
        (Some(_), Some(_)) => check(
            NAME,
            if aardvark { Status::Warn } else { Status::Ok },
            format!(
                "DNS from {} is redirected to the guard on port {port}{podman}",
                policy.container_interfaces.join(", ")
            ),
            if aardvark {
                "let aardvark-dns's forwards reach the guard (the host's resolver is the guard, or [dns] intercept = true); for reports naming the container, create podman networks with --disable-dns (containers then ask the guard, and address each other by IP)"
            } else {
                ""
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse_str, SystemAccounts};

    fn policy(text: &str) -> Policy {
        parse_str(text, Path::new("p.toml"), &SystemAccounts).unwrap()
    }

    #[test]
    fn the_resolver_must_point_at_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let p = policy("[dns]\nupstream = [\"192.0.2.53\"]\n");
        std::fs::write(&conf, "search example\nnameserver 127.0.0.1\n").unwrap();
        assert_eq!(resolver(&p, &conf).status, Status::Ok);
        std::fs::write(&conf, "nameserver 192.0.2.53\nnameserver 127.0.0.1\n").unwrap();
        let c = resolver(&p, &conf);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail.contains("192.0.2.53") && c.fix.contains("intercept"),
            "{c:?}"
        );
        let intercept = policy("[dns]\nupstream = [\"192.0.2.53\"]\nintercept = true\n");
        assert_eq!(resolver(&intercept, &conf).status, Status::Ok);
        assert_eq!(resolver(&policy(""), &conf).status, Status::Ok);
    }

    /// A local resolver in front of the guard works but hides the asker: a
    /// warning; the guard on the stub's own address is what docs/dns.md
    /// recommends.
    #[test]
    fn a_local_resolver_in_front_of_the_guard_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, "nameserver 127.0.0.2\nsearch corp.example\n").unwrap();
        let p = policy("[dns]\nupstream = [\"192.0.2.53\"]\n");
        let c = resolver(&p, &conf);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(
            c.detail.contains("127.0.0.2") && c.detail.contains("not the program that asked"),
            "{c:?}"
        );
        let intercept = policy("[dns]\nupstream = [\"192.0.2.53\"]\nintercept = true\n");
        std::fs::write(&conf, "nameserver 127.0.0.53\n").unwrap();
        let c = resolver(&intercept, &conf);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("systemd-resolved's stub"), "{c:?}");
        let on_stub = policy("[dns]\nlisten = \"127.0.0.53:53\"\nupstream = [\"192.0.2.53\"]\n");
        assert_eq!(resolver(&on_stub, &conf).status, Status::Ok);
        let wildcard = policy("[dns]\nlisten = \"0.0.0.0:53\"\nupstream = [\"192.0.2.53\"]\n");
        assert_eq!(resolver(&wildcard, &conf).status, Status::Ok);
    }

    /// The guard's local cache: dnsmasq with --conntrack, or the cache's
    /// user named in cache_user, is the supported layout; dnsmasq without
    /// it, another cache, nothing listening, or systemd-resolved (its API
    /// resolves for anyone) are not. Programs asking the cache fail.
    #[test]
    fn a_local_cache_behind_the_guard() {
        let p = policy("[dns]\nupstream = [\"127.0.0.2\"]\n");
        let at: std::net::SocketAddr = "127.0.0.2:53".parse().unwrap();
        let cache = |name: &str, uid: u32, marks: bool| {
            Some(CacheProcess {
                pid: 42,
                uid,
                name: name.into(),
                marks: if marks {
                    Ok(())
                } else {
                    Err("runs without --conntrack: its upstream queries carry no mark")
                },
            })
        };
        let c = judge_local_cache(&p, &[(at, cache("dnsmasq", 0, true))]);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.contains("0x65677275"), "{c:?}");
        let c = judge_local_cache(&p, &[(at, cache("dnsmasq", 0, false))]);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("without --conntrack"), "{c:?}");
        let c = judge_local_cache(&p, &[(at, cache("unbound", 107, false))]);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.fix.contains("cache_user"), "{c:?}");
        assert_eq!(judge_local_cache(&p, &[(at, None)]).status, Status::Fail);

        let with_user = policy("[dns]\nupstream = [\"127.0.0.2\"]\ncache_user = \"107\"\n");
        let c = judge_local_cache(&with_user, &[(at, cache("unbound", 107, false))]);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        let c = judge_local_cache(&with_user, &[(at, cache("systemd-resolve", 107, false))]);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("varlink"), "{c:?}");
        assert!(local_cache(&policy("[dns]\nupstream = [\"192.0.2.53\"]\n")).is_none());

        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, "nameserver 127.0.0.2\n").unwrap();
        let c = resolver(&p, &conf);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("local cache"), "{c:?}");
        std::fs::write(&conf, "nameserver 127.0.0.1\n").unwrap();
        assert_eq!(resolver(&p, &conf).status, Status::Ok);
    }

    #[test]
    fn dnsmasq_conntrack_from_its_command_line_or_files() {
        let files: std::collections::HashMap<&str, &str> = [
            (
                "/etc/dnsmasq.conf",
                "# conntrack\nconf-dir=/etc/dnsmasq.d/,*.conf\n",
            ),
            (
                "/etc/dnsmasq.d/a.conf",
                "server=/corp.test/10.0.0.1\nbind-dynamic\n",
            ),
            ("/etc/dnsmasq.d/b.conf", " conntrack \n"),
            ("/etc/dnsmasq.d/b.conf.bak", "conntrack\n"),
            ("/other.conf", "conntrack\nbind-interfaces\n"),
        ]
        .into_iter()
        .collect();
        let read = |p: &Path| files.get(p.to_str()?).map(|s| s.to_string());
        let list = |d: &Path| -> Vec<PathBuf> {
            files
                .keys()
                .map(|k| PathBuf::from(*k))
                .filter(|f| f.parent() == Some(d))
                .collect()
        };
        let marks = |args: &[&str]| {
            let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            dnsmasq_marks(&dnsmasq_options(&v, &read, &list))
        };
        assert!(marks(&["dnsmasq", "-C/dev/null", "--conntrack"]).is_ok());
        assert!(
            marks(&["dnsmasq", "-k"]).is_ok(),
            "via /etc/dnsmasq.conf's conf-dir"
        );
        assert!(marks(&["dnsmasq", "-C/dev/null"]).is_err());
        assert!(marks(&[
            "dnsmasq",
            "--conf-file=/dev/null",
            "-7",
            "/etc/dnsmasq.d,.bak,b.conf"
        ])
        .is_err());
        assert!(marks(&[
            "dnsmasq",
            "--conf-file=/dev/null",
            "--conf-dir=/etc/dnsmasq.d"
        ])
        .is_ok());
        // bind-interfaces defeats the conntrack lookup; bind-dynamic does not.
        let why = marks(&["dnsmasq", "--conf-file=/other.conf"]).unwrap_err();
        assert!(why.contains("bind-interfaces"), "{why}");
        assert!(marks(&["dnsmasq", "-C", "/dev/null", "--conntrack", "-z"]).is_err());
        assert!(marks(&["dnsmasq", "-C", "/other.conf", "--bind-dynamic"]).is_ok());
    }

    #[test]
    fn nss_resolve_before_dns_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nsswitch.conf");
        let status = |text: &str| {
            std::fs::write(&conf, text).unwrap();
            name_service(&conf).status
        };
        let debian = "passwd: files systemd\nhosts:          files resolve [!UNAVAIL=return] dns myhostname\n";
        assert_eq!(status(debian), Status::Warn);
        assert_eq!(status("hosts: files resolve\n"), Status::Warn);
        assert_eq!(
            status("hosts: files mdns4_minimal [NOTFOUND=return] dns\n"),
            Status::Ok
        );
        assert_eq!(status("hosts: files dns resolve\n"), Status::Ok);
        assert_eq!(
            status("# hosts: files resolve\nhosts: files dns\n"),
            Status::Ok
        );
        assert_eq!(status(""), Status::Ok);
    }

    #[test]
    fn container_dns_needs_the_redirect_and_a_listener() {
        let p = policy("scope = \"host+containers\"\n[dns]\nupstream = [\"192.0.2.53\"]\n");
        let loaded = crate::ruleset::compile(&p, &Default::default());
        let c = judge_container_dns(&p, Some(&loaded), true, false);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.contains("port 10053"), "{c:?}");
        assert_eq!(
            judge_container_dns(&p, Some(&loaded), false, false).status,
            Status::Fail
        );
        let c = judge_container_dns(&p, Some(&loaded), true, true);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("forwards other names"), "{c:?}");
        assert_eq!(
            judge_container_dns(&p, None, true, false).status,
            Status::Warn
        );
        // A table without the redirect (another policy, an older egret).
        let host_only = policy("[dns]\nupstream = [\"192.0.2.53\"]\n");
        let other = crate::ruleset::compile(&host_only, &Default::default());
        assert_eq!(
            judge_container_dns(&p, Some(&other), true, false).status,
            Status::Fail
        );
        let no_dns = policy("scope = \"host+containers\"\n");
        assert_eq!(
            judge_container_dns(&no_dns, None, false, false).status,
            Status::Warn
        );
    }

    #[test]
    fn an_unwritable_state_dir_fails() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(state_dir(dir.path()).status, Status::Ok);
        let c = state_dir(&file.join("state"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("--state-dir"));
    }
}
