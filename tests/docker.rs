//! Coexistence with a real Docker daemon (Debian's docker.io), run inside a
//! network namespace this test creates, in a mount namespace of its own and
//! with all its state in a temporary directory: the machine's root network
//! namespace, /var/lib/docker and /run/docker are never touched.
//!
//! egret with scope = "host+containers" and the daemon's socket: a
//! container's allowed connection passes, a blocked one is reported with the
//! container's name, id and image; Docker's own rules keep working (a
//! published port, container to container on the bridge) and stay as Docker
//! wrote them through `egret apply`, `egret run` and `egret remove`; and
//! Docker rewriting its rules on restart leaves egret's table as it was.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::runtime::*;
use common::*;

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "egret-test/busybox:1";
/// The host namespace's uplink, and the outside namespace's two servers.
const HOST_UP: &str = "10.77.0.1";
const ALLOWED: &str = "10.77.0.2";
const BLOCKED: &str = "10.77.0.3";

fn require_docker() {
    for (path, package) in [
        (DOCKERD, "docker.io"),
        (DOCKER, "docker.io"),
        ("/bin/busybox", "busybox-static"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: this test runs a real Docker daemon; install {package} (scripts/deps.sh does)"
        );
    }
}

/// The daemon's major version, as it answers.
fn server_major(d: &Dockerd) -> u32 {
    let v = d.client_ok(&["version", "--format", "{{.Server.Version}}"]);
    v.split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// Debian trixie's dockerd (Docker 26 and later), unpacked by
/// scripts/fetch-docker-trixie.sh (or `EGRET_DOCKERD`); `None`, with the
/// reason printed, when it is not there.
fn newer_dockerd() -> Option<PathBuf> {
    let path = std::env::var_os("EGRET_DOCKERD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/docker-trixie/root/usr/sbin/dockerd")
        });
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipped: no newer dockerd at {} (scripts/fetch-docker-trixie.sh unpacks Debian trixie's docker.io there)",
            path.display()
        );
        None
    }
}

/// dockerd in `ns`, all of its state under a temporary directory.
struct Dockerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    ns_path: String,
    dockerd: PathBuf,
}

impl Dockerd {
    /// With this dockerd; its helpers (docker-proxy, docker-init) from its
    /// own directory first.
    fn start_with(ns: &Netns, dockerd: &Path) -> Dockerd {
        require_docker();
        let dir = tempfile::Builder::new()
            .prefix("egret-docker")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("daemon.json"), "{}\n").unwrap();
        let mut d = Dockerd {
            dir,
            child: None,
            ns_path: format!("/run/netns/{}", ns.name),
            dockerd: dockerd.to_path_buf(),
        };
        d.launch();
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Containers' cgroups go under this (not the system's `docker`), removed afterwards.
    fn cgroup_parent(&self) -> String {
        let dir = self.dir.path().file_name().unwrap_or_default();
        format!(
            "egret-test-{}",
            dir.to_string_lossy().trim_start_matches('.')
        )
    }

    fn socket(&self) -> PathBuf {
        self.path("docker.sock")
    }

    /// Its own mount namespace keeps the daemon's mounts (container root
    /// filesystems, network namespace files) away from the machine's.
    fn launch(&mut self) {
        let p = |n: &str| self.path(n).display().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .unwrap();
        let helpers = self.dockerd.parent().unwrap_or(Path::new("/usr/sbin"));
        let path = format!(
            "{}:{}",
            helpers.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path))
            .args(["--", "unshare", "--mount", "--propagation", "private", "--"])
            .arg(&self.dockerd)
            .args(["--config-file", &p("daemon.json")])
            .args(["--data-root", &p("data")])
            .args(["--exec-root", &p("exec")])
            .args(["--pidfile", &p("dockerd.pid")])
            .args(["--host", &format!("unix://{}", p("docker.sock"))])
            .args(["--storage-driver", "vfs"])
            .args(["--cgroup-parent", &self.cgroup_parent()])
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning dockerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.client(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A one-file image: busybox, made here (no registry is reachable).
    fn import_busybox(&self) {
        let tar = busybox_rootfs_tar(
            self.dir.path(),
            &[
                "sh", "nc", "httpd", "printf", "sleep", "mkdir", "echo", "nslookup", "wget",
            ],
        );
        self.client_ok(&["import", &tar.display().to_string(), IMAGE]);
    }

    /// SIGTERM, then SIGKILL after 30 s; the daemon stops the containerd it started.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Engine for Dockerd {
    const CLIENT: &'static str = "docker";

    fn client(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .env("DOCKER_CONFIG", self.path("cli"))
            .arg("--host")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running docker")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let ids = self.client(&["ps", "--all", "--quiet"]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = self.client(&["rm", "--force", id]);
            }
        }
        self.stop();
        for pid in processes_naming(self.dir.path()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let parent = self.cgroup_parent();
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(hierarchy.path().join(&parent));
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&parent));
        // The mounts were private to the daemon's mount namespace; nothing of
        // them may be left in ours.
        let dir = self.dir.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if m.starts_with(&dir) {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

/// Docker's rules as iptables-save prints them, without counters and comments.
fn docker_rules(ns: &Netns) -> String {
    let out = run_ok(&mut ns.cmd("iptables-save", &[]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.strip_prefix(':') {
            // ":FORWARD DROP [12:3456]" → ":FORWARD DROP"
            Some(chain) => format!(":{}", chain.rsplit_once(' ').map_or(chain, |c| c.0)),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn egret_table(ns: &Netns) -> String {
    let out = run_ok(&mut ns.cmd("nft", &["list", "table", "inet", "egret"]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Counters move with traffic; the rules must not.
    let mut tokens = text.split_whitespace().peekable();
    let mut kept = Vec::new();
    while let Some(t) = tokens.next() {
        kept.push(t);
        if t == "counter" && tokens.peek() == Some(&"packets") {
            tokens.nth(3);
        }
    }
    kept.join(" ")
}

fn policy(socket: &Path) -> String {
    format!(
        r#"
mode = "enforce"
scope = "host+containers"
container_runtime = "{}"

[[allow]]
name = "web"
cidrs = ["{ALLOWED}"]
ports = [8080]
"#,
        socket.display()
    )
}

/// The containers: `web` serves HTTP on 8080, published on the host's 8081;
/// `app` is where connections start from.
fn start_containers(d: &Dockerd) {
    d.client_ok(&[
        "run",
        "--detach",
        "--name",
        "web",
        "--restart",
        "always",
        "--stop-timeout",
        "1",
        "--publish",
        "8081:8080",
        IMAGE,
        "sh",
        "-c",
        "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]);
    d.client_ok(&[
        "run",
        "--detach",
        "--name",
        "app",
        "--restart",
        "always",
        "--stop-timeout",
        "1",
        IMAGE,
        "sleep",
        "3600",
    ]);
}

/// Container to container on the bridge.
fn app_reaches_web(d: &Dockerd) -> bool {
    let web = d.ip("web");
    let (ok, out) = d.exec(
        "app",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {web} 8080"),
    );
    ok && out.contains("hello-from-web")
}

/// The published port, from the outside namespace.
fn outside_reaches_published(outside: &Netns) -> bool {
    let url = format!("http://{HOST_UP}:8081/");
    let out = outside
        .cmd("curl", &["--silent", "--max-time", "5", &url])
        .output()
        .expect("curl");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello-from-web")
}

#[test]
fn egret_coexists_with_a_real_docker_daemon_and_names_its_containers() {
    coexists(Path::new(DOCKERD));
}

#[test]
fn egret_coexists_with_a_newer_docker_daemon_and_names_its_containers() {
    if let Some(dockerd) = newer_dockerd() {
        assert!(coexists(&dockerd) >= 26);
    }
}

/// Returns the daemon's major version.
fn coexists(dockerd: &Path) -> u32 {
    let (host, outside) = (Netns::new(), Netns::new());
    link_to_outside(&host, &outside, HOST_UP, &[ALLOWED, BLOCKED]);
    let _servers = [
        outside.server("tcp", ALLOWED, 8080),
        outside.server("tcp", BLOCKED, 8080),
    ];
    // Declared after the namespaces: dropped (stopped, cleaned) before them.
    let mut docker = Dockerd::start_with(&host, dockerd);
    docker.import_busybox();
    start_containers(&docker);

    // Before egret: everything works, so what stops later is egret's doing.
    eventually("app reaches the allowed server", || {
        docker.connects("app", ALLOWED, 8080)
    });
    assert!(
        docker.connects("app", BLOCKED, 8080),
        "the lab routes to {BLOCKED}"
    );
    assert!(app_reaches_web(&docker), "container to container");
    eventually("the published port", || outside_reaches_published(&outside));
    let docker_before = docker_rules(&host);
    assert!(docker_before.contains(":DOCKER-USER"), "{docker_before}");
    assert!(docker_before.contains("-j MASQUERADE"), "{docker_before}");

    // egret apply: Docker's rules stay as Docker wrote them.
    let file = PolicyFile::new(&policy(&docker.socket()));
    // doctor finds the runtime egret will ask for container names.
    let state = file.state_dir();
    let (status, detail) = doctor_check(
        &host,
        &["--policy", file.path(), "--state-dir", &state],
        "container runtime",
    );
    assert_eq!(status, "ok", "{detail}");
    run_ok(&mut host.egret(&["apply", "--state-dir", &file.state_dir(), file.path()]));
    assert_eq!(
        docker_rules(&host),
        docker_before,
        "egret apply left Docker's rules alone"
    );
    assert!(
        !docker.connects("app", BLOCKED, 8080),
        "egret blocks what no rule allows"
    );

    let run = Running::start(&host, &file.state_dir(), &["--policy", file.path()]);
    let app_id = docker.inspect("app", "{{.Id}}");
    let app_ip = docker.ip("app");
    assert!(docker.connects("app", ALLOWED, 8080), "allowed by rule web");
    assert!(!docker.connects("app", BLOCKED, 8080));
    let e = run.wait_event(15, "the container's blocked connection", |e| {
        at(e, "/destination/ip") == BLOCKED && at(e, "/source/ip") == app_ip.as_str()
    });
    assert_eq!(at(&e, "/event/action"), "blocked");
    assert_eq!(at(&e, "/rule/name"), "containers");
    assert_eq!(at(&e, "/container/name"), "app", "{e:#}");
    assert_eq!(at(&e, "/container/id"), app_id.as_str());
    assert_eq!(at(&e, "/container/image/name"), "egret-test/busybox");
    assert_eq!(at(&e, "/container/image/tag/0"), "1");
    assert_eq!(at(&e, "/egret/attribution"), "container-runtime");
    assert_eq!(at(&e, "/observer/ingress/interface/name"), "docker0");
    assert!(
        at(&e, "/message")
            .as_str()
            .unwrap_or("")
            .contains("container app ("),
        "{e:#}"
    );
    // Docker's own paths keep working under egret.
    assert!(
        app_reaches_web(&docker),
        "container to container under egret"
    );
    assert!(
        outside_reaches_published(&outside),
        "published port under egret"
    );
    assert_eq!(docker_rules(&host), docker_before);
    let rules = host.nft_ruleset();
    for docker_chain in [
        "chain DOCKER-USER",
        "chain DOCKER-ISOLATION-STAGE-1",
        "masquerade",
    ] {
        assert!(
            rules.contains(docker_chain),
            "{docker_chain} missing:\n{rules}"
        );
    }

    // A container started after egret, on a network of its own (a br-*
    // bridge): the runtime is asked when its first packet arrives.
    docker.client_ok(&[
        "network",
        "create",
        "--subnet",
        "172.30.0.0/24",
        "egret-net",
    ]);
    let late = docker.client(&[
        "run",
        "--rm",
        "--name",
        "late",
        "--network",
        "egret-net",
        IMAGE,
        "sh",
        "-c",
        &format!("echo ping | nc -w 2 {BLOCKED} 8080"),
    ]);
    assert!(!late.status.success(), "blocked from egret-net");
    let e = run.wait_event(15, "the late container's blocked connection", |e| {
        at(e, "/destination/ip") == BLOCKED
            && at(e, "/source/ip")
                .as_str()
                .is_some_and(|s| s.starts_with("172.30.0."))
    });
    assert_eq!(at(&e, "/container/name"), "late", "{e:#}");
    assert!(
        at(&e, "/observer/ingress/interface/name")
            .as_str()
            .is_some_and(|i| i.starts_with("br-")),
        "{e:#}"
    );

    // Docker rewrites its rules when it restarts; egret's table stays as it was.
    let egret_before = egret_table(&host);
    docker.restart();
    eventually("app runs again", || {
        docker.inspect("app", "{{.State.Running}}") == "true"
    });
    eventually("the published port after Docker's restart", || {
        outside_reaches_published(&outside)
    });
    assert_eq!(
        egret_table(&host),
        egret_before,
        "Docker's restart left egret's table alone"
    );
    assert!(docker.connects("app", ALLOWED, 8080));
    assert!(
        !docker.connects("app", BLOCKED, 8080),
        "still blocked after Docker's restart"
    );
    assert!(app_reaches_web(&docker));

    assert!(docker_rules(&host).contains(":DOCKER-USER"));

    // egret remove: egret's table goes, Docker's stays.
    run.stop();
    run_ok(&mut host.egret(&["remove"]));
    let after = host.nft_ruleset();
    assert!(!after.contains("table inet egret"), "{after}");
    for docker_chain in [
        "chain DOCKER-USER",
        "chain DOCKER-ISOLATION-STAGE-1",
        "masquerade",
    ] {
        assert!(
            after.contains(docker_chain),
            "{docker_chain} missing:\n{after}"
        );
    }
    assert!(
        docker.connects("app", BLOCKED, 8080),
        "open again without egret"
    );
    assert!(app_reaches_web(&docker));
    assert!(outside_reaches_published(&outside));
    let major = server_major(&docker);
    drop(docker);
    major
}

/// The outside namespace's resolver: the guard's upstream.
const RESOLVER: &str = "10.77.0.53";

fn dns_policy(socket: &Path) -> String {
    format!(
        r#"
mode = "enforce"
scope = "host+containers"
container_runtime = "{}"

[dns]
upstream = ["{RESOLVER}"]

[proxy]
listen = "0.0.0.0:3128"
# The lab's "internet" is 10.77.0.0/24, a private range.
ssrf_guard = false

[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [8080, 8000]
"#,
        socket.display()
    )
}

#[test]
fn containers_resolve_through_the_guard_and_are_named_in_its_reports() {
    resolve_through_the_guard(Path::new(DOCKERD));
}

/// The same with Docker 26 or later (Debian trixie's docker.io), whose
/// embedded resolver may forward from the host's namespace.
#[test]
fn containers_of_a_newer_docker_resolve_through_the_guard_and_are_named() {
    if let Some(dockerd) = newer_dockerd() {
        assert!(resolve_through_the_guard(&dockerd) >= 26);
    }
}

/// Returns the daemon's major version.
fn resolve_through_the_guard(dockerd: &Path) -> u32 {
    let (host, outside) = (Netns::new(), Netns::new());
    link_to_outside(&host, &outside, HOST_UP, &[ALLOWED, BLOCKED, RESOLVER]);
    let records = [
        format!("--host-record=allowed.test,{ALLOWED}"),
        format!("--host-record=blocked.test,{BLOCKED}"),
    ];
    let _upstream = dnsmasq(&outside, &[RESOLVER], &records);
    let _web = Spawned(
        outside
            .cmd(
                "python3",
                &[
                    "-m",
                    "http.server",
                    "--bind",
                    ALLOWED,
                    "--directory",
                    "/",
                    "8000",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let _servers = [
        outside.server("tcp", ALLOWED, 8080),
        outside.server("tcp", RESOLVER, 853),
        outside.server("tcp", BLOCKED, 8000),
    ];
    let docker = Dockerd::start_with(&host, dockerd);
    docker.import_busybox();
    start_containers(&docker);
    eventually("app reaches the allowed server", || {
        docker.connects("app", ALLOWED, 8080)
    });
    assert!(
        docker.connects("app", RESOLVER, 853),
        "DNS over TLS before egret"
    );

    let file = PolicyFile::new(&dns_policy(&docker.socket()));
    let run = Running::start(&host, &file.state_dir(), &["--policy", file.path()]);
    let gateway = docker.inspect(
        "app",
        "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
    );
    let resolv = docker.exec("app", "cat /etc/resolv.conf").1;
    // doctor sees the redirect loaded and the guard listening for containers.
    let state = file.state_dir();
    let (status, detail) = doctor_check(
        &host,
        &["--policy", file.path(), "--state-dir", &state],
        "container dns",
    );
    assert_eq!(status, "ok", "{detail}");

    // The default bridge: Docker gave the container the host's (or public)
    // resolvers; the guard answers, and its answer opens the address.
    let answer = docker.lookup("app", "allowed.test");
    assert!(answer.contains(ALLOWED), "{answer}\nresolv.conf:\n{resolv}");
    assert!(
        docker.connects("app", "allowed.test", 8080),
        "app reaches allowed.test by name"
    );
    // A name no rule allows: refused, and reported with the container.
    let answer = docker.lookup("app", "x1y2.callback.test");
    assert!(!answer.contains("Address: 10."), "{answer}");
    let app_id = docker.inspect("app", "{{.Id}}");
    let e = run.wait_event(15, "app's refused query", |e| {
        at(e, "/event/action") == "dns-refused"
            && at(e, "/dns/question/name") == "x1y2.callback.test"
    });
    assert_eq!(at(&e, "/container/name"), "app", "{e:#}");
    assert_eq!(at(&e, "/container/id"), app_id.as_str());
    assert_eq!(at(&e, "/container/image/name"), "egret-test/busybox");
    assert_eq!(at(&e, "/egret/attribution"), "container-runtime");
    assert_eq!(at(&e, "/observer/ingress/interface/name"), "docker0");
    // DNS around the guard (DNS over TLS): blocked, reported with the container.
    assert!(!docker.connects("app", RESOLVER, 853));
    let e = run.wait_event(15, "app's DNS over TLS", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/destination/port") == 853
    });
    assert_eq!(at(&e, "/container/name"), "app", "{e:#}");

    // The proxy on the bridge: same rules, denials name the container.
    let proxy = format!("http_proxy=http://{gateway}:3128");
    let (ok, out) = docker.exec(
        "app",
        &format!("{proxy} wget -q -O - http://allowed.test:8000/etc/hostname 2>&1"),
    );
    assert!(ok, "allowed through the proxy: {out}");
    let (ok, _) = docker.exec(
        "app",
        &format!("{proxy} wget -q -O - http://blocked.test:8000/"),
    );
    assert!(!ok, "denied by the proxy");
    let e = run.wait_event(15, "app's proxy denial", |e| {
        at(e, "/event/action") == "proxy-denied" && at(e, "/destination/domain") == "blocked.test"
    });
    assert_eq!(at(&e, "/container/name"), "app", "{e:#}");

    // A user-defined network made after egret started (a new br-* bridge):
    // the embedded resolver (127.0.0.11) forwards from the container's
    // namespace, through the bridge, to the guard.
    docker.client_ok(&[
        "network",
        "create",
        "--subnet",
        "172.30.0.0/24",
        "egret-net",
    ]);
    docker.client_ok(&[
        "run",
        "--detach",
        "--name",
        "late",
        "--network",
        "egret-net",
        "--stop-timeout",
        "1",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let resolv = docker.exec("late", "cat /etc/resolv.conf").1;
    assert!(resolv.contains("127.0.0.11"), "{resolv}");
    let answer = docker.lookup("late", "allowed.test");
    assert!(answer.contains(ALLOWED), "{answer}");
    assert!(
        docker.connects("late", "allowed.test", 8080),
        "late reaches allowed.test by name"
    );
    docker.lookup("late", "late.callback.test");
    let e = run.wait_event(15, "late's refused query", |e| {
        at(e, "/dns/question/name") == "late.callback.test"
    });
    assert_eq!(at(&e, "/container/name"), "late", "{e:#}");
    assert!(
        at(&e, "/observer/ingress/interface/name")
            .as_str()
            .is_some_and(|i| i.starts_with("br-")),
        "{e:#}"
    );
    run.stop();
    let major = server_major(&docker);
    drop(docker);
    major
}
