//! What the proxy allows. Pure: the request's target, the client's identity
//! and the resolved addresses come in; a verdict with its reason comes out.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::monitor::attribution::Attribution;
use crate::policy::{AllowRule, HostPattern, Mode, Policy, PortRange, L4};

/// Where a client asked to go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// Wire form: ASCII (punycode), lower case, no trailing dot.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Target {
    /// From a CONNECT authority (`host:port`) or an absolute URI's authority
    /// (`default_port` when it has none). Errors say what is wrong.
    pub fn parse(authority: &str, default_port: Option<u16>) -> Result<Target, String> {
        let a: http::uri::Authority = authority
            .parse()
            .map_err(|_| format!("{authority:?} is not host:port"))?;
        let port = a
            .port_u16()
            .or(default_port)
            .ok_or_else(|| format!("{authority:?} has no port"))?;
        if port == 0 {
            return Err("port 0".into());
        }
        let host = a.host();
        if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let ip: Ipv6Addr = v6
                .parse()
                .map_err(|_| format!("{host:?} is not an IPv6 address"))?;
            return Ok(Target {
                host: Host::Ip(IpAddr::V6(ip)),
                port,
            });
        }
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Ok(Target {
                host: Host::Ip(IpAddr::V4(ip)),
                port,
            });
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        // Bounded before IDNA: decoding a long `xn--` label costs time
        // quadratic in its length (the fuzzer found a 1.7 KB label taking
        // 0.3 s). A valid label is at most 63 characters, 4 bytes each.
        if name.len() > 4 * 253 || name.split('.').any(|l| l.len() > 4 * 63) {
            return Err(format!(
                "{:?}… is not a host name",
                crate::text::bounded(host, 64).0
            ));
        }
        let name =
            idna::domain_to_ascii(name).map_err(|_| format!("{host:?} is not a host name"))?;
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!("{host:?} is not a host name"));
        }
        Ok(Target {
            host: Host::Name(name),
            port,
        })
    }
}

/// Why an address is not for an egress proxy to reach, if it is special.
/// Covers the IPv4-embedding IPv6 forms (mapped, compatible, 6to4, NAT64),
/// which reach the same IPv4 address by another spelling.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match (a, b) {
        (0, _) => "\"this network\" (0.0.0.0/8)",
        (10, _) => "private (RFC 1918)",
        (100, 64..=127) => "shared address space / CGNAT (RFC 6598)",
        (127, _) => "loopback",
        (169, 254) => "link-local (cloud metadata such as 169.254.169.254)",
        (172, 16..=31) => "private (RFC 1918)",
        (192, 168) => "private (RFC 1918)",
        (224..=239, _) => "multicast",
        (240..=255, _) => "reserved or broadcast",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return special_v4(v4).map(|_| "an IPv4-mapped form of a special-purpose address");
    }
    match seg[0] {
        0xfc00..=0xfdff => return Some("unique local (RFC 4193)"),
        0xfe80..=0xfebf => return Some("link-local"),
        0xff00..=0xffff => return Some("multicast"),
        0x2002 => {
            return special_v4(embedded(seg[1], seg[2]))
                .map(|_| "a 6to4 form of a special-purpose address")
        }
        _ => {}
    }
    // NAT64: the well-known prefix 64:ff9b::/96 and the local-use 64:ff9b:1::/48.
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return special_v4(embedded(seg[6], seg[7]))
            .map(|_| "a NAT64 form of a special-purpose address");
    }
    if seg[..3] == [0x64, 0xff9b, 1] {
        return Some("local-use NAT64 (RFC 8215)");
    }
    // IPv4-compatible (deprecated ::a.b.c.d).
    if seg[..6] == [0; 6] {
        return special_v4(embedded(seg[6], seg[7]))
            .map(|_| "an IPv4-compatible form of a special-purpose address");
    }
    None
}

/// An `[[allow]]` rule as the proxy sees it.
#[derive(Debug, Clone)]
pub struct ProxyRule {
    pub name: String,
    hosts: Vec<HostPattern>,
    cidrs: Vec<IpNet>,
    ports: Vec<PortRange>,
    users: Vec<u32>,
    groups: Vec<u32>,
    units: Vec<String>,
    /// `[novelty]` tracks this rule: a host only its wildcards allow is
    /// reported (`proxy-new`) the first time an identity asks for it.
    tracked: bool,
}

impl ProxyRule {
    fn from_rule(r: &AllowRule, tracked: bool) -> Option<ProxyRule> {
        // The proxy carries TCP only.
        if !(r.protocols.is_empty() || r.protocols.contains(&L4::Tcp)) {
            return None;
        }
        Some(ProxyRule {
            name: r.name.clone(),
            hosts: r.hosts.clone(),
            cidrs: r.cidrs.clone(),
            ports: r.ports.clone(),
            users: r.users.clone(),
            groups: r.groups.clone(),
            units: r.units.clone(),
            tracked,
        })
    }

    fn port_ok(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| p.first <= port && port <= p.last)
    }

    pub fn has_subject(&self) -> bool {
        !(self.users.is_empty() && self.groups.is_empty() && self.units.is_empty())
    }

    /// Does the client match the rule's users, groups and units (all that are set)?
    pub fn subject_ok(&self, who: &Attribution) -> bool {
        let users = self.users.is_empty() || who.uid.is_some_and(|u| self.users.contains(&u));
        let groups = self.groups.is_empty() || who.gid.is_some_and(|g| self.groups.contains(&g));
        let units = self.units.is_empty() || self.units.iter().any(|u| in_unit(who, u));
        users && groups && units
    }

    fn names(&self, host: &Host) -> bool {
        match host {
            Host::Name(n) => self.hosts.iter().any(|h| h.matches(n)),
            Host::Ip(ip) => self.covers(*ip),
        }
    }

    fn covers(&self, ip: IpAddr) -> bool {
        self.cidrs.iter().any(|c| c.contains(&ip))
    }
}

/// A unit (`nginx.service`) or cgroup path (`system.slice/nginx.service`) of the client.
fn in_unit(who: &Attribution, unit: &str) -> bool {
    if who.unit.as_deref() == Some(unit) {
        return true;
    }
    let Some(cg) = who.cgroup.as_deref() else {
        return false;
    };
    if unit.contains('/') {
        let cg = cg.trim_start_matches('/');
        cg == unit || cg.starts_with(&format!("{unit}/"))
    } else {
        cg.split('/').any(|c| c == unit)
    }
}

/// The proxy's view of the policy. Swapped whole on reload.
#[derive(Debug, Clone)]
pub struct ProxyRules {
    pub rules: Vec<ProxyRule>,
    pub audit: bool,
    pub ssrf_guard: bool,
}

impl ProxyRules {
    pub fn from_policy(p: &Policy) -> ProxyRules {
        ProxyRules {
            rules: p
                .rules
                .iter()
                .filter_map(|r| ProxyRule::from_rule(r, p.novelty.tracks(&r.name)))
                .collect(),
            audit: p.mode == Mode::Audit,
            ssrf_guard: p.proxy.as_ref().map_or(true, |x| x.ssrf_guard),
        }
    }

    /// Rules that allow this target (name pattern, or an IP literal in their
    /// cidrs, and the port), before the client and addresses are known.
    pub fn candidates(&self, t: &Target) -> Vec<&ProxyRule> {
        self.rules
            .iter()
            .filter(|r| r.port_ok(t.port) && r.names(&t.host))
            .collect()
    }

    /// May the proxy connect to `ip` for this client? Public addresses: yes.
    /// Special-purpose ones, and this host's own (`local`: any address of its
    /// interfaces, which reaches its services like loopback does), only when
    /// some rule's `cidrs` cover them (with the port and the client), never
    /// because of a host name alone.
    pub fn address_ok(
        &self,
        ip: IpAddr,
        port: u16,
        who: Option<&Attribution>,
        local: bool,
    ) -> Result<(), &'static str> {
        if !self.ssrf_guard {
            return Ok(());
        }
        let why = match special_purpose(ip) {
            Some(why) => why,
            None if local => "an address of this host",
            None => return Ok(()),
        };
        let covered = self.rules.iter().any(|r| {
            r.port_ok(port)
                && r.covers(ip)
                && (!r.has_subject() || who.is_some_and(|w| r.subject_ok(w)))
        });
        if covered {
            Ok(())
        } else {
            Err(why)
        }
    }

    /// The wildcard of rule `rule` that alone allowed `t`'s host (a name),
    /// when `[novelty]` tracks that rule and no rule writes the host out
    /// (`monitor::names::watched`): then the request is `proxy-new` the first
    /// time its identity asks for it.
    pub fn watched(&self, rule: &str, t: &Target) -> Option<&HostPattern> {
        let Host::Name(name) = &t.host else {
            return None;
        };
        if !self.rules.iter().any(|r| r.name == rule && r.tracked) {
            return None;
        }
        let rules = self
            .rules
            .iter()
            .map(|r| (r.name.as_str(), &r.hosts[..], r.name == rule));
        crate::monitor::names::watched(rules, name).map(|(_, p)| p)
    }

    /// Do special-purpose addresses need the client's identity to be judged?
    pub fn cidr_rules_need_subject(&self) -> bool {
        self.rules
            .iter()
            .any(|r| !r.cidrs.is_empty() && r.has_subject())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse_str, Accounts};

    struct Ids;
    impl Accounts for Ids {
        fn uid(&self, n: &str) -> Option<u32> {
            (n == "app").then_some(1000)
        }
        fn gid(&self, _: &str) -> Option<u32> {
            None
        }
    }

    fn rules(text: &str) -> ProxyRules {
        let p = parse_str(
            &format!("[proxy]\n{text}"),
            std::path::Path::new("p.toml"),
            &Ids,
        )
        .unwrap();
        ProxyRules::from_policy(&p)
    }

    fn t(s: &str) -> Target {
        Target::parse(s, Some(80)).unwrap()
    }

    #[test]
    fn only_a_tracked_rules_wildcard_makes_a_proxy_host_novel() {
        let r = rules(
            "[novelty]\nexclude_rules = [\"quiet\"]\n\
             [[allow]]\nname = \"gh\"\nhosts = [\"*.githubusercontent.com\", \"api.github.com\"]\nports = [443]\n\
             [[allow]]\nname = \"named\"\nhosts = [\"raw.githubusercontent.com\"]\nports = [443]\n\
             [[allow]]\nname = \"quiet\"\nhosts = [\"*.cdn.test\"]\nports = [443]\n",
        );
        let w = |rule: &str, target: &str| r.watched(rule, &t(target)).map(|p| p.to_string());
        assert_eq!(
            w("gh", "gist.githubusercontent.com:443").as_deref(),
            Some("*.githubusercontent.com")
        );
        assert_eq!(w("gh", "api.github.com:443"), None, "written out");
        assert_eq!(
            w("gh", "raw.githubusercontent.com:443"),
            None,
            "another rule names it"
        );
        assert_eq!(w("quiet", "x.cdn.test:443"), None, "excluded rule");
        assert_eq!(w("gh", "192.0.2.7:443"), None, "an address is no name");
    }

    #[test]
    fn overlong_names_are_refused_before_idna_decodes_them() {
        let label = format!("xn--{}", "e".repeat(2000));
        let err = Target::parse(&format!("{label}.test:443"), None).unwrap_err();
        assert!(
            err.len() < 200,
            "the message quotes a bounded prefix: {err}"
        );
        assert!(Target::parse(&format!("{}.test:443", "a".repeat(64)), None).is_err());
        assert!(Target::parse(&format!("{}.test:443", "a".repeat(63)), None).is_ok());
    }

    #[test]
    fn targets_parse_names_ips_and_default_ports() {
        assert_eq!(
            t("Example.COM.:443"),
            Target {
                host: Host::Name("example.com".into()),
                port: 443
            }
        );
        assert_eq!(t("example.com").port, 80);
        assert_eq!(
            t("[2001:db8::1]:8443").host,
            Host::Ip("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            t("192.0.2.7:443").host,
            Host::Ip("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            t("XN--BCHER-KVA.example:443").host,
            Host::Name("xn--bcher-kva.example".into())
        );
        assert!(
            Target::parse("bücher.example:443", None).is_err(),
            "clients send punycode"
        );
        for bad in [
            "",
            ":443",
            "exa mple.com:443",
            "a..b:443",
            "[::1:443",
            "host:0",
            "host:99999",
        ] {
            assert!(Target::parse(bad, None).is_err(), "{bad:?}");
        }
        assert!(
            Target::parse("example.com", None).is_err(),
            "CONNECT needs a port"
        );
    }

    #[test]
    fn special_purpose_addresses_in_every_spelling() {
        for (ip, special) in [
            ("10.1.2.3", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.0.1", true),
            ("100.64.0.1", true),
            ("100.128.0.1", false),
            ("127.0.0.1", true),
            ("169.254.169.254", true),
            ("224.0.0.1", true),
            ("255.255.255.255", true),
            ("0.0.0.0", true),
            ("198.51.100.7", false),
            ("8.8.8.8", false),
            ("::1", true),
            ("::", true),
            ("fd00::1", true),
            ("fe80::1", true),
            ("ff02::1", true),
            ("::ffff:10.0.0.1", true),
            ("::ffff:8.8.8.8", false),
            ("::ffff:169.254.169.254", true),
            ("2002:a9fe:a9fe::1", true),
            ("2002:0808:0808::1", false),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b::808:808", false),
            ("64:ff9b:1::1", true),
            ("::7f00:1", true),
            ("2001:db8::1", false),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(special_purpose(ip).is_some(), special, "{ip}");
        }
    }

    #[test]
    fn host_rules_match_names_and_ports_cidr_rules_match_literals() {
        let r = rules(
            "[[allow]]\nname = \"web\"\nhosts = [\"*.example.com\"]\nports = [443]\nvia = \"proxy\"\n\
             [[allow]]\nname = \"lan\"\ncidrs = [\"10.9.0.0/16\"]\nports = [8080]\n",
        );
        assert_eq!(r.candidates(&t("www.example.com:443"))[0].name, "web");
        assert!(r.candidates(&t("www.example.com:80")).is_empty());
        assert!(r.candidates(&t("example.com:443")).is_empty());
        assert_eq!(r.candidates(&t("10.9.1.1:8080"))[0].name, "lan");
        assert!(r.candidates(&t("10.8.1.1:8080")).is_empty());
    }

    #[test]
    fn a_host_name_alone_never_opens_a_private_address() {
        let r = rules(
            "[[allow]]\nname = \"web\"\nhosts = [\"*.example.com\"]\nvia = \"proxy\"\n\
             [[allow]]\nname = \"lan\"\ncidrs = [\"10.9.0.0/16\"]\nports = [8080]\n",
        );
        let private: IpAddr = "10.1.0.5".parse().unwrap();
        assert!(r
            .address_ok(private, 443, None, false)
            .unwrap_err()
            .contains("RFC 1918"));
        assert!(r
            .address_ok("198.51.100.7".parse().unwrap(), 443, None, false)
            .is_ok());
        // Covered by a cidrs rule, on its port only.
        assert!(r
            .address_ok("10.9.0.5".parse().unwrap(), 8080, None, false)
            .is_ok());
        assert!(r
            .address_ok("10.9.0.5".parse().unwrap(), 443, None, false)
            .is_err());
        assert!(r
            .address_ok("169.254.169.254".parse().unwrap(), 80, None, false)
            .is_err());
        // The host's own public address is refused like loopback.
        let own: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(
            r.address_ok(own, 443, None, true),
            Err("an address of this host")
        );
    }

    #[test]
    fn subjects_match_users_and_units() {
        let r = rules("[[allow]]\nname = \"web\"\nhosts = [\"example.com\"]\nusers = [\"app\"]\nunits = [\"web.service\"]\nvia = \"proxy\"\n");
        let rule = &r.rules[0];
        let mut who = Attribution::unknown();
        who.uid = Some(1000);
        assert!(!rule.subject_ok(&who), "unit unknown");
        who.cgroup = Some("/system.slice/web.service".into());
        assert!(rule.subject_ok(&who));
        who.uid = Some(1001);
        assert!(!rule.subject_ok(&who));
    }

    // suite-gaps: `via = "proxy"` on cidrs (no code change here: the proxy
    // already honours every rule's cidrs; the kernel side drops the direct path).
    #[test]
    fn proxy_only_cidrs_are_reachable_through_the_proxy() {
        let r = rules(
            "[[allow]]\nname = \"wiki\"\ncidrs = [\"10.2.0.5\"]\nports = [8080]\nvia = \"proxy\"\n",
        );
        let ip: IpAddr = "10.2.0.5".parse().unwrap();
        assert_eq!(r.candidates(&t("10.2.0.5:8080")).len(), 1);
        assert!(
            r.address_ok(ip, 8080, None, false).is_ok(),
            "covered past the SSRF guard"
        );
        assert!(
            r.address_ok(ip, 22, None, false).is_err(),
            "only the rule's ports"
        );
        assert!(r
            .address_ok("10.2.0.6".parse().unwrap(), 8080, None, false)
            .is_err());
    }
}
