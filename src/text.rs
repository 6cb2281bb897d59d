//! Text an attacker can shape (command lines, executable paths, cgroup
//! paths, host and DNS names, HTTP methods): bounded where it enters egret,
//! escaped where a terminal shows it. One place, so every reader of `/proc`,
//! every server and every human-readable printer applies the same rules.
//!
//! Caps are measured in the bytes the text takes inside a JSON string (a
//! control character, a quote or a backslash counts as its escape), so a
//! bounded field cannot grow past its cap when an event is written out.

use std::borrow::Cow;

/// `process.command_line` (the arguments joined by spaces).
pub const COMMAND_LINE_MAX: usize = 4096;
/// `process.executable`, `egret.cgroup` (and the unit taken from it).
pub const PATH_MAX: usize = 4096;
/// Host names, DNS names, container names and images.
pub const NAME_MAX: usize = 1024;
/// `process.name` (the kernel's comm is 15 bytes), HTTP methods.
pub const SHORT_MAX: usize = 64;

/// What `c` costs inside a JSON string.
fn json_cost(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The longest prefix of `s` (whole characters) that fits in `max` JSON bytes.
fn fitting(s: &str, max: usize) -> usize {
    let mut used = 0;
    for (at, c) in s.char_indices() {
        used += json_cost(c);
        if used > max {
            return at;
        }
    }
    s.len()
}

/// Cuts `s` to at most `max` JSON bytes; true if it was cut.
pub fn bound(s: &mut String, max: usize) -> bool {
    let keep = fitting(s, max);
    if keep < s.len() {
        s.truncate(keep);
        true
    } else {
        false
    }
}

/// `s` cut to at most `max` JSON bytes, and whether it was cut.
pub fn bounded(s: &str, max: usize) -> (&str, bool) {
    let keep = fitting(s, max);
    (&s[..keep], keep < s.len())
}

/// Characters a terminal may act on: C0 controls (ESC, CR, LF, BS...), DEL,
/// C1 controls (CSI, OSC as single code points) and the bidirectional
/// overrides and isolates that reorder what is displayed.
fn unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` safe to print on a terminal or in a one-line comment: every control
/// character and bidi override written as a visible escape (`\x1b`,
/// `\u{202e}`); nothing else changes, so ordinary text stays as it was.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_for_terminal) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !unsafe_for_terminal(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// Text of several lines made by egret around strings it was given (the
/// operator's flow in `explain`): each line made printable, newlines kept.
pub fn printable_lines(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|l| match l.strip_suffix('\n') {
            Some(l) => format!("{}\n", printable(l)),
            None => printable(l).into_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_count_json_escapes_and_keep_whole_characters() {
        let mut s = "abcdef".to_string();
        assert!(!bound(&mut s, 6));
        assert!(bound(&mut s, 4));
        assert_eq!(s, "abcd");
        // é is 2 bytes: never cut in half.
        assert_eq!(bounded("aé", 2), ("a", true));
        // A control character costs its \u00XX escape.
        assert_eq!(bounded("\u{1}\u{1}", 11), ("\u{1}", true));
        let long = "\u{1b}".repeat(10_000);
        let (cut, was) = bounded(&long, 4096);
        assert!(was);
        assert!(serde_json::to_string(cut).unwrap().len() <= 4096 + 2);
        for s in [
            "plain",
            "quo\"te\\",
            "tab\tnew\nline",
            "ünï",
            "\u{7f}\u{9b}",
        ] {
            for max in 0..20 {
                let (cut, _) = bounded(s, max);
                assert!(serde_json::to_string(cut).unwrap().len() <= max + 2);
            }
        }
    }

    #[test]
    fn printable_escapes_what_a_terminal_acts_on() {
        assert!(matches!(printable("/usr/bin/python3"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b\nc"),
            "a\\x1b]0;pwned\\x07b\\x0ac"
        );
        assert_eq!(printable("\u{7f}\u{9b}31m"), "\\x7f\\x9b31m");
        assert_eq!(printable("abc\u{202e}fdp.exe"), "abc\\u{202e}fdp.exe");
        assert_eq!(printable_lines("a\u{1b}\nb\n"), "a\\x1b\nb\n");
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let p = printable(&c.to_string()).into_owned();
            assert!(!p.chars().any(unsafe_for_terminal), "{c:?}");
        }
    }
}
