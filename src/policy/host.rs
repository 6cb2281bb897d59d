//! Host-name patterns (`hosts = ["deb.debian.org", "*.debian.org", "s3.*.amazonaws.com"]`).
//!
//! Names are compared in their IDNA (punycode) form, lower case, without the
//! trailing dot: the form DNS queries carry on the wire. A leading `*.` matches
//! one or more labels (any subdomain, never the apex); a `*` label anywhere
//! else matches exactly one label.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Label {
    Exact(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPattern {
    /// `*.` at the front: one or more labels.
    subdomains: bool,
    /// The labels after the leading `*.` (if any), left to right.
    labels: Vec<Label>,
}

impl HostPattern {
    /// Parses a pattern as a user wrote it. The error says what is wrong.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let trimmed = text.trim();
        let name = trimmed.strip_suffix('.').unwrap_or(trimmed);
        if name.is_empty() {
            return Err("empty host name".into());
        }
        let (subdomains, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None if name == "*" => {
                return Err("\"*\" alone would allow every name".into());
            }
            None => (false, name),
        };
        let mut labels = Vec::new();
        for label in rest.split('.') {
            if label == "*" {
                labels.push(Label::Any);
                continue;
            }
            if label.contains('*') {
                return Err(format!(
                    "{label:?}: a '*' must be a whole label, such as \"*.example.com\" or \"s3.*.amazonaws.com\""
                ));
            }
            labels.push(Label::Exact(ascii_label(label)?));
        }
        if !labels.iter().any(|l| matches!(l, Label::Exact(_))) {
            return Err("a pattern needs at least one label that is not '*'".into());
        }
        let p = HostPattern { subdomains, labels };
        if p.to_string().len() > 253 {
            return Err("a host name is at most 253 characters".into());
        }
        Ok(p)
    }

    /// A pattern that matches more than one name (`*.example.com`,
    /// `s3.*.amazonaws.com`), as opposed to a name the operator wrote out.
    pub fn is_wildcard(&self) -> bool {
        self.subdomains || self.labels.iter().any(|l| matches!(l, Label::Any))
    }

    /// Does `name` (wire form: ASCII, any case, trailing dot allowed) match?
    /// On every query's path, so it walks the labels right to left without allocating.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        let mut have = name.rsplit('.');
        for want in self.labels.iter().rev() {
            let ok = match (have.next(), want) {
                (None, _) => false,
                (Some(h), Label::Any) => !h.is_empty(),
                (Some(h), Label::Exact(w)) => h.eq_ignore_ascii_case(w),
            };
            if !ok {
                return false;
            }
        }
        match have.next() {
            None => !self.subdomains,
            Some(h) => self.subdomains && !h.is_empty(),
        }
    }
}

/// One label in IDNA ASCII form, lower case; errors say why it is not a DNS label.
fn ascii_label(label: &str) -> Result<String, String> {
    if label.is_empty() {
        return Err("empty label (two dots in a row?)".into());
    }
    let ascii = if label.is_ascii() {
        label.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(label)
            .map_err(|_| format!("{label:?} is not a valid internationalised name"))?
    };
    if ascii.len() > 63 {
        return Err(format!("label {ascii:?} is longer than 63 characters"));
    }
    if !ascii
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "{label:?} is not a DNS label: letters, digits, '-' and '_' only"
        ));
    }
    if ascii.starts_with('-') || ascii.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(ascii)
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subdomains {
            f.write_str("*.")?;
        }
        for (i, l) in self.labels.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match l {
                Label::Any => f.write_str("*")?,
                Label::Exact(s) => f.write_str(s)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_names_match_case_insensitively_with_or_without_the_trailing_dot() {
        let pat = p("Deb.Debian.org.");
        assert_eq!(pat.to_string(), "deb.debian.org");
        assert!(pat.matches("deb.debian.org"));
        assert!(pat.matches("DEB.debian.ORG."));
        assert!(!pat.matches("debian.org"));
        assert!(!pat.matches("x.deb.debian.org"));
        assert!(!pat.matches("deb.debian.org.evil.test"));
    }

    #[test]
    fn leading_wildcard_is_any_depth_but_never_the_apex() {
        let pat = p("*.debian.org");
        assert!(pat.matches("deb.debian.org"));
        assert!(pat.matches("a.b.c.debian.org."));
        assert!(!pat.matches("debian.org"));
        assert!(!pat.matches("notdebian.org"));
        assert!(!pat.matches("debian.org.evil.test"));
    }

    #[test]
    fn inner_wildcard_is_exactly_one_label() {
        let pat = p("s3.*.amazonaws.com");
        assert!(pat.matches("s3.eu-west-1.amazonaws.com"));
        assert!(!pat.matches("s3.amazonaws.com"));
        assert!(!pat.matches("s3.a.b.amazonaws.com"));
        assert!(!pat.matches("x.s3.eu-west-1.amazonaws.com"));
        let both = p("*.s3.*.amazonaws.com");
        assert!(both.matches("bucket.s3.eu-west-1.amazonaws.com"));
        assert!(!both.matches("s3.eu-west-1.amazonaws.com"));
    }

    #[test]
    fn wildcards_are_told_from_written_out_names() {
        assert!(p("*.example.com").is_wildcard());
        assert!(p("s3.*.amazonaws.com").is_wildcard());
        assert!(!p("api.example.com").is_wildcard());
    }

    #[test]
    fn internationalised_names_compare_in_punycode() {
        let pat = p("bücher.example");
        assert_eq!(pat.to_string(), "xn--bcher-kva.example");
        assert!(pat.matches("xn--bcher-kva.example"));
        assert!(pat.matches("XN--BCHER-KVA.example."));
        assert!(p("*.BÜCHER.example").matches("www.xn--bcher-kva.example"));
    }

    #[test]
    fn invalid_patterns_say_why() {
        for (bad, why) in [
            ("", "empty"),
            ("*", "every name"),
            ("*.*", "not '*'"),
            ("foo*.example.com", "whole label"),
            ("a..b", "empty label"),
            ("exa mple.com", "not a DNS label"),
            ("-bad.example", "starts or ends"),
            (&format!("{}.com", "a".repeat(64)), "63"),
        ] {
            let e = HostPattern::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
