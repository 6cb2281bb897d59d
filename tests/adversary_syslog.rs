//! Syslog as stock daemons see it, and forged records: a real rsyslogd (its
//! own config, sockets and files in a temp dir, run in the collector's
//! namespace; never the system's daemon or /dev/log) receives egret's alerts
//! on a local socket (imuxsock), over UDP (imudp) and TCP (imtcp). The
//! blocked process is an unprivileged program whose executable name carries
//! CR, LF, ESC and a whole fake syslog header: each transport must still
//! deliver exactly one record, with egret's program name and pid, and the
//! fields rsyslog extracts itself. Then the same with a real journald, run
//! privately (its own mount and network namespaces, a tmpfs on /run and
//! /var/log), reading the local record into its own fields.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The forged record the attacker tries to start inside its executable name.
const FORGED_TAG: &str = "forged";

/// rsyslogd writes one line per record: what a relay or a file reader that
/// splits on newlines sees. The parser's escaping of control characters on
/// receive is off, so a raw CR/LF from egret would show up as a split line
/// (that is what an unescaping relay does). Fields are tab-separated, the
/// message last; `$!` holds what rsyslog extracted (RFC 5424 structured data
/// by mmpstrucdata, the local record's CEE JSON by parse_json).
fn rsyslog_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"global(workDirectory="{d}" parser.escapeControlCharactersOnReceive="off")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{d}/log")
module(load="imudp")
input(type="imudp" address="{B4}" port="5514")
module(load="imtcp")
input(type="imtcp" address="{B4}" port="6601")
module(load="mmpstrucdata")
template(name="fields" type="list") {{
  property(name="inputname") constant(value="\t")
  property(name="programname") constant(value="\t")
  property(name="procid") constant(value="\t")
  property(name="msgid") constant(value="\t")
  property(name="syslogseverity") constant(value="\t")
  property(name="$!") constant(value="\t")
  property(name="structured-data") constant(value="\t")
  property(name="msg") constant(value="\n")
}}
action(type="mmpstrucdata")
if re_match($msg, '@cee: [{{].*[}}]$') then {{
  set $.cee = re_extract($msg, '@cee: ([{{].*[}}])$', 0, 1, "");
  set $.ok = parse_json($.cee, "\$!cee");
}}
action(type="omfile" file="{d}/out" template="fields")
"#
    )
}

struct Record {
    input: String,
    program: String,
    procid: String,
    msgid: String,
    severity: String,
    fields: Value,
    sd: String,
    msg: String,
}

/// Every line of rsyslogd's output; a line that is not a whole record (a
/// split) is returned as an error.
fn records(out: &Path) -> Vec<Result<Record, String>> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(8, '\t').collect();
            if f.len() != 8 {
                return Err(l.to_string());
            }
            Ok(Record {
                input: f[0].into(),
                program: f[1].into(),
                procid: f[2].into(),
                msgid: f[3].into(),
                severity: f[4].into(),
                fields: match f[5] {
                    "" => Value::Null,
                    j => serde_json::from_str(j).map_err(|e| format!("{e}: {l}"))?,
                },
                sd: f[6].into(),
                // RFC 5424's BOM stays in rsyslog's msg.
                msg: f[7].trim_start_matches([' ', '\u{feff}']).into(),
            })
        })
        .collect()
}

/// rsyslogd in `ns`, its inputs ready (a probe from logger came through each).
fn rsyslogd(ns: &Netns, dir: &Path) -> Spawned {
    let conf = dir.join("rsyslog.conf");
    std::fs::write(&conf, rsyslog_conf(dir)).unwrap();
    let check = ns
        .cmd("rsyslogd", &["-N1", "-f", conf.to_str().unwrap()])
        .output()
        .expect("rsyslogd (Debian package rsyslog, scripts/deps.sh)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let pid = dir.join("rsyslogd.pid");
    let child = ns
        .cmd(
            "rsyslogd",
            &[
                "-n",
                "-f",
                conf.to_str().unwrap(),
                "-i",
                pid.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("rsyslogd");
    let daemon = Spawned(child);
    let out = dir.join("out");
    let sock = dir.join("log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for args in [
            vec!["--socket", sock.to_str().unwrap()],
            vec!["--udp", "--server", B4, "--port", "5514"],
            vec!["--tcp", "--octet-count", "--server", B4, "--port", "6601"],
        ] {
            let mut a = args.clone();
            a.extend(["-t", "probe", "ready"]);
            let _ = ns.cmd("logger", &a).stderr(Stdio::null()).status();
        }
        let seen: Vec<String> = records(&out)
            .into_iter()
            .flatten()
            .filter(|r| r.program == "probe")
            .map(|r| r.input)
            .collect();
        if ["imuxsock", "imudp", "imtcp"]
            .iter()
            .all(|i| seen.iter().any(|s| s == i))
        {
            return daemon;
        }
        assert!(
            Instant::now() < deadline,
            "rsyslogd's inputs never came up: {}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// nobody connects to B4:1389 from a copy of the Python interpreter whose
/// name is a syslog record of its own (/proc/PID/exe, and so
/// process.executable, is this path). `dir` must be world-readable.
fn hostile_attempt(ns: &Netns, dir: &Path) -> (Spawned, u64) {
    let name = format!("py\r\n<11>Dec  1 00:00:00 {FORGED_TAG}[1]: \u{1b}[31mroot login ok\u{85}");
    let exe = dir.join(&name);
    std::fs::copy("/usr/bin/python3", &exe).unwrap();
    let peer = peer_script();
    let mut child = ns
        .as_nobody(
            exe.to_str().unwrap(),
            &[peer.to_str().unwrap(), "try-tcp", B4, "1389"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid = line.trim().parse().expect("the peer prints its pid");
    (Spawned(child), pid)
}

#[test]
fn a_control_laden_executable_name_yields_one_parsed_record_per_transport() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // nobody runs the hostile program from here.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let _rsyslogd = rsyslogd(&pair.b, dir);
    let policy = PolicyFile::new(&format!(
        r#"
mode = "enforce"

[[alerts]]
name = "local"
type = "syslog"
target = "unix://{}/log"

[[alerts]]
name = "siem-udp"
type = "syslog"
target = "udp://{B4}:5514"

[[alerts]]
name = "siem-tcp"
type = "syslog"
target = "tcp://{B4}:6601"
"#,
        dir.display()
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);

    let (child, attacker) = hostile_attempt(&pair.a, dir);
    let e = daemon.wait_event(10, "for the blocked attempt", |e| {
        at(e, "/destination/port") == 1389 && at(e, "/process/pid") == attacker
    });
    let executable = at(&e, "/process/executable").as_str().unwrap().to_string();
    assert!(executable.contains('\n'), "the name reached the event: {e}");

    let out = dir.join("out");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ours = |r: &Record| r.program != "probe";
    loop {
        let all = records(&out);
        let done = ["imuxsock", "imudp", "imtcp"].iter().all(|i| {
            all.iter()
                .flatten()
                .any(|r| ours(r) && r.input == *i && r.msg.contains(":1389/tcp"))
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rsyslogd did not get the alert on every input:\n{}\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            daemon.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let a late second (forged) record land before counting.
    std::thread::sleep(Duration::from_millis(500));
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let all = records(&out);
    assert!(
        all.iter().all(|r| r.is_ok()),
        "a record was split (a raw control character got through):\n{text}"
    );
    let all: Vec<Record> = all.into_iter().flatten().filter(ours).collect();
    assert!(
        all.iter()
            .all(|r| r.program != FORGED_TAG && !r.msg.contains('\u{1b}')),
        "forged record or raw escape:\n{text}"
    );
    let egret_pid = all[0].procid.clone();
    let exe_of = std::fs::read_link(format!("/proc/{egret_pid}/exe")).unwrap();
    assert_eq!(
        exe_of,
        std::fs::canonicalize(egret_bin()).unwrap(),
        "procid is egret run's pid"
    );
    for input in ["imuxsock", "imudp", "imtcp"] {
        let got: Vec<&Record> = all
            .iter()
            .filter(|r| r.input == input && r.msg.contains(":1389/tcp"))
            .collect();
        assert_eq!(got.len(), 1, "exactly one record on {input}:\n{text}");
        let r = got[0];
        assert_eq!(r.program, "egret", "{input}: {text}");
        assert_eq!(r.procid, egret_pid, "{input}");
        assert_eq!(r.severity, "3", "high is err, {input}");
        assert!(
            r.msg.starts_with("blocked ") && r.msg.contains("py\\x0d\\x0a<11>Dec"),
            "{input}: {}",
            r.msg
        );
        // The fields, as rsyslog itself extracted them.
        let fields = if input == "imuxsock" {
            assert_eq!(r.msgid, "-", "syslog(3) records have no msgid");
            assert_eq!(r.sd, "-");
            r.fields["cee"].clone()
        } else {
            assert_eq!(r.msgid, "blocked", "{input}");
            assert!(r.sd.starts_with("[egret@32473 "), "{input}: {}", r.sd);
            r.fields["rfc5424-sd"]["egret@32473"].clone()
        };
        assert_eq!(fields["action"], "blocked", "{input}: {fields}");
        assert_eq!(fields["dport"].to_string().trim_matches('"'), "1389");
        assert_eq!(
            fields["pid"].to_string().trim_matches('"'),
            attacker.to_string()
        );
        assert_eq!(fields["user"], "nobody", "{input}");
        let exe_field = fields["executable"].as_str().unwrap().to_string();
        if input == "imuxsock" {
            // JSON carries the exact name.
            assert_eq!(exe_field, executable);
        } else {
            assert!(
                exe_field.contains("py\\x0d\\x0a<11>") && !exe_field.chars().any(char::is_control),
                "{input}: {exe_field:?}"
            );
        }
    }
    drop(child);
}

/// What journald filed from its syslog socket, as journalctl's JSON.
fn journal_syslog_records(pid: u32) -> Vec<Value> {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--"])
        .args([
            "journalctl",
            "-D",
            "/run/log/journal",
            "-o",
            "json",
            "--no-pager",
        ])
        .arg("_TRANSPORT=syslog")
        .output()
        .expect("journalctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn journald_files_a_local_record_under_egret_with_its_pid_once() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (_journald, jpid) = private_journald();
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"journal\"\ntype = \"syslog\"\ntarget = \"unix:///proc/{jpid}/root/run/systemd/journal/dev-log\"\n"
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let (attempt, attacker) = hostile_attempt(&pair.a, dir);
    daemon.wait_event(10, "for the blocked attempt", |e| {
        at(e, "/destination/port") == 1389 && at(e, "/process/pid") == attacker
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let ours = |r: &Value| {
        r["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains(":1389/tcp"))
    };
    let records = loop {
        let records = journal_syslog_records(jpid);
        if records.iter().any(ours) {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "journald filed no record of the alert: {records:#?}\n{}",
            daemon.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_millis(500));
    let records = journal_syslog_records(jpid)
        .into_iter()
        .chain(records)
        .collect::<Vec<_>>();
    assert!(
        records.iter().all(|r| r["SYSLOG_IDENTIFIER"] == "egret"),
        "a record under another identifier (forged?): {records:#?}"
    );
    let ours: Vec<&Value> = records.iter().filter(|r| ours(r)).collect();
    let r = ours[0];
    assert!(
        ours.iter().all(|o| o["__CURSOR"] == r["__CURSOR"]),
        "exactly one record: {ours:#?}"
    );
    let egret_pid = r["SYSLOG_PID"].as_str().unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{egret_pid}/exe")).unwrap(),
        std::fs::canonicalize(egret_bin()).unwrap(),
        "SYSLOG_PID is egret run's pid"
    );
    assert_eq!(r["PRIORITY"], "3", "high is err");
    let message = r["MESSAGE"].as_str().unwrap();
    assert!(
        message.starts_with("blocked ") && message.contains("py\\x0d\\x0a<11>Dec"),
        "{message}"
    );
    let (_, fields) = message.split_once(" @cee: ").expect("the CEE fields");
    let fields: Value = serde_json::from_str(fields).unwrap();
    assert_eq!(fields["pid"], attacker);
    assert_eq!(fields["action"], "blocked");
    drop(attempt);
}
