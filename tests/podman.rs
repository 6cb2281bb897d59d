//! A real rootful podman (Debian's podman, netavark and aardvark-dns) run
//! inside a network namespace this test creates: `podman system service`
//! in a mount namespace of its own, with `/run` a private tmpfs there, all
//! its storage, configuration and state under a temporary directory, driven
//! through its API socket (the same socket egret names containers with).
//! Nothing of it reaches the machine's root network namespace, /run,
//! /var/lib/containers or /etc/containers.
//!
//! With scope = "host+containers", `[dns]` and `intercept`:
//! - podman's default network (`podman0`, no DNS of its own): the container
//!   is given the host's resolver; its queries are redirected to the guard,
//!   an allowed name opens the address and the container connects by name,
//!   a refused name is a `dns-refused` event naming the container (podman's
//!   Docker-compatible API), DNS over TLS is blocked and reported with it;
//! - a user network (`podman1`, DNS on): aardvark-dns on the gateway still
//!   answers the names of the network's containers, and forwards the rest
//!   from the host to the guard (`intercept`), whose answer opens the
//!   address; a refused name is reported as aardvark-dns's query; blocked
//!   packets name the container.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::runtime::*;
use common::*;

const PODMAN: &str = "/usr/bin/podman";
const IMAGE: &str = "egret-test/busybox:1";
/// The host namespace's uplink, and the outside namespace's servers.
const HOST_UP: &str = "10.77.0.1";
const ALLOWED: &str = "10.77.0.2";
const BLOCKED: &str = "10.77.0.3";
const RESOLVER: &str = "10.77.0.53";
/// The host's resolver as podman reads it (its own /etc/resolv.conf): a
/// TEST-NET address nothing answers but the guard, through egret's rules.
const HOST_RESOLVER: &str = "192.0.2.53";
const USER_NET: &str = "10.89.0";

fn require_podman() {
    for (path, package) in [
        (PODMAN, "podman"),
        ("/usr/lib/podman/netavark", "netavark"),
        ("/usr/lib/podman/aardvark-dns", "aardvark-dns"),
        ("/usr/sbin/runc", "runc"),
        ("/bin/busybox", "busybox-static"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: this test runs a real podman; install {package} (scripts/deps.sh does)"
        );
    }
}

/// `podman system service` in `ns`, all of its state under a temporary directory.
struct Podman {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Podman {
    fn start(ns: &Netns) -> Podman {
        require_podman();
        let dir = tempfile::Builder::new()
            .prefix("egret-podman")
            .tempdir()
            .unwrap();
        let p = |n: &str| dir.path().join(n).display().to_string();
        for d in ["root", "runroot", "tmp", "networks", "vartmp"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(
            dir.path().join("resolv.conf"),
            format!("nameserver {HOST_RESOLVER}\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            // runc: crun 1.8 refuses this machine's cgroup v1 with a v2
            // hierarchy mounted beside it ("hybrid mode").
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n\n[network]\nnetwork_backend = \"netavark\"\n",
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("podman.log")).unwrap();
        // /run a private tmpfs: podman's network namespaces (/run/netns),
        // crun's and netavark's state stay in this mount namespace.
        let script = format!(
            "mount -t tmpfs tmpfs /run && mount --bind {resolv} /etc/resolv.conf && exec {PODMAN} \
             --root {root} --runroot {runroot} --tmpdir {tmp} --network-config-dir {networks} \
             --storage-driver vfs --cgroup-manager cgroupfs --events-backend file \
             system service --time 0 unix://{sock}",
            resolv = p("resolv.conf"),
            root = p("root"),
            runroot = p("runroot"),
            tmp = p("tmp"),
            networks = p("networks"),
            sock = p("podman.sock"),
        );
        let child = ns
            .cmd(
                "unshare",
                &[
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script.as_str(),
                ],
            )
            .env("CONTAINERS_CONF", p("containers.conf"))
            .env("TMPDIR", p("vartmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning podman system service");
        let podman = Podman {
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60 * time_scale());
        while !podman.client(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "podman's service did not answer within 60 s:\n{}",
                podman.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        podman
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Containers' and conmon's cgroups go under this, removed afterwards.
    fn cgroup_parent(&self) -> String {
        let dir = self.dir.path().file_name().unwrap_or_default();
        format!(
            "/egret-test-{}",
            dir.to_string_lossy().trim_start_matches('.')
        )
    }

    fn socket(&self) -> PathBuf {
        self.path("podman.sock")
    }

    /// A one-file image: busybox, made here (no registry is reachable).
    fn import_busybox(&self) {
        let tar = busybox_rootfs_tar(
            self.dir.path(),
            &[
                "sh", "nc", "httpd", "printf", "sleep", "mkdir", "echo", "nslookup", "cat",
            ],
        );
        self.client_ok(&["import", &tar.display().to_string(), IMAGE]);
    }

    /// A container running `sh -c script`, on `network` (podman's default: None).
    fn run(&self, name: &str, network: Option<&str>, script: &str) {
        let parent = self.cgroup_parent();
        // Limits within this process's own: podman's defaults (1048576
        // files) need CAP_SYS_RESOURCE, which a test may not have.
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--cgroup-parent",
            &parent,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--stop-timeout",
            "1",
        ];
        if let Some(n) = network {
            args.extend(["--network", n]);
        }
        args.extend([IMAGE, "sh", "-c", script]);
        self.client_ok(&args);
    }
}

impl Engine for Podman {
    const CLIENT: &'static str = "podman";

    fn client(&self, args: &[&str]) -> Output {
        Command::new(PODMAN)
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("TMPDIR", self.path("vartmp"))
            .arg("--remote")
            .arg("--url")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running podman")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("podman.log")).unwrap_or_default()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.client(&["rm", "--all", "--force", "--time", "1"]);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in processes_naming(self.dir.path()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // A cgroup with a process left in it cannot be removed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_naming(self.dir.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Conmon's and the containers' cgroups, deepest first, in every hierarchy.
        let parent = self.cgroup_parent();
        let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
        roots.extend(
            std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
                .map(|h| h.path()),
        );
        for root in roots {
            let top = root.join(parent.trim_start_matches('/'));
            let children: Vec<PathBuf> = std::fs::read_dir(&top)
                .into_iter()
                .flatten()
                .flatten()
                .map(|c| c.path())
                .filter(|c| c.is_dir())
                .collect();
            for c in children {
                let _ = std::fs::remove_dir(c);
            }
            let _ = std::fs::remove_dir(top);
        }
    }
}

fn policy(socket: &Path) -> String {
    format!(
        r#"
mode = "enforce"
scope = "host+containers"
container_runtime = "{}"

[dns]
upstream = ["{RESOLVER}"]
# aardvark-dns forwards from the host: to the guard.
intercept = true

[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [8080]
"#,
        socket.display()
    )
}

#[test]
fn podman_containers_resolve_through_the_guard_and_aardvark_keeps_its_names() {
    let (host, outside) = (Netns::new(), Netns::new());
    link_to_outside(&host, &outside, HOST_UP, &[ALLOWED, BLOCKED, RESOLVER]);
    // The host's default route, into the outside namespace: a host process
    // (aardvark-dns) can send to the host's resolver, which `intercept`
    // then takes to the guard (with no route, the send fails before any hook).
    run_ok(&mut host.cmd("ip", &["route", "add", "default", "via", RESOLVER]));
    // Authoritative for .test: AAAA of an A-only name is NODATA, as a real
    // resolver answers (without it dnsmasq refuses, and a client behind
    // aardvark-dns tries every resolver and search domain until nc gives up).
    let records = [
        format!("--host-record=allowed.test,{ALLOWED}"),
        format!("--host-record=blocked.test,{BLOCKED}"),
        "--local=/test/".to_string(),
    ];
    let _upstream = dnsmasq(&outside, &[RESOLVER], &records);
    let _servers = [
        outside.server("tcp", ALLOWED, 8080),
        outside.server("tcp", BLOCKED, 8080),
        outside.server("tcp", RESOLVER, 853),
    ];
    // Declared after the namespaces: dropped (stopped, cleaned) before them.
    let podman = Podman::start(&host);
    podman.import_busybox();
    podman.client_ok(&[
        "network",
        "create",
        "--subnet",
        &format!("{USER_NET}.0/24"),
        "egret-net",
    ]);
    podman.run("app", None, "sleep 3600");
    podman.run(
        "web",
        Some("egret-net"),
        "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    podman.run("client", Some("egret-net"), "sleep 3600");
    // Before egret: the lab routes, and aardvark-dns names the network's containers.
    eventually("app reaches the allowed server", || {
        podman.connects("app", ALLOWED, 8080)
    });
    assert!(podman.connects("client", BLOCKED, 8080));
    assert!(
        podman.connects("app", RESOLVER, 853),
        "DNS over TLS before egret"
    );
    let web_ip = podman.ip("web");
    let resolv = podman.exec("client", "cat /etc/resolv.conf").1;
    assert!(resolv.contains(&format!("{USER_NET}.1")), "{resolv}");
    eventually("aardvark-dns names web", || {
        podman.lookup("client", "web").contains(&web_ip)
    });
    let resolv = podman.exec("app", "cat /etc/resolv.conf").1;
    assert!(resolv.contains(HOST_RESOLVER), "{resolv}");

    let file = PolicyFile::new(&policy(&podman.socket()));
    let run = Running::start(&host, &file.state_dir(), &["--policy", file.path()]);
    let state = file.state_dir();
    let args = ["--policy", file.path(), "--state-dir", &state];
    let (status, detail) = doctor_check(&host, &args, "container runtime");
    assert_eq!(status, "ok", "{detail}");
    let (status, detail) = doctor_check(&host, &args, "container dns");
    assert_eq!(status, "warn", "{detail}");
    assert!(
        detail.contains("aardvark-dns") && detail.contains("forwards other names"),
        "{detail}"
    );

    // The default network: the redirect takes the query to the guard.
    assert!(
        !podman.connects("app", ALLOWED, 8080),
        "closed until resolved"
    );
    let answer = podman.lookup("app", "allowed.test");
    assert!(answer.contains(ALLOWED), "{answer}");
    assert!(
        podman.connects("app", "allowed.test", 8080),
        "app reaches allowed.test by name"
    );
    podman.lookup("app", "x1y2.callback.test");
    let app_id = podman.inspect("app", "{{.Id}}");
    let e = run.wait_event(15, "app's refused query", |e| {
        at(e, "/event/action") == "dns-refused"
            && at(e, "/dns/question/name") == "x1y2.callback.test"
    });
    assert_eq!(at(&e, "/container/name"), "app", "{e:#}");
    assert_eq!(at(&e, "/container/id"), app_id.as_str(), "{e:#}");
    assert_eq!(at(&e, "/egret/attribution"), "container-runtime", "{e:#}");
    assert_eq!(
        at(&e, "/observer/ingress/interface/name"),
        "podman0",
        "{e:#}"
    );
    assert!(
        at(&e, "/container/image/name")
            .as_str()
            .is_some_and(|i| i.ends_with("egret-test/busybox")),
        "{e:#}"
    );
    // DNS over TLS, around the guard: blocked, reported with the container.
    assert!(!podman.connects("app", RESOLVER, 853));
    let e = run.wait_event(15, "app's DNS over TLS", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/destination/port") == 853
    });
    assert_eq!(at(&e, "/container/name"), "app", "{e:#}");

    // The user network: aardvark-dns still answers its containers' names...
    assert!(
        podman.lookup("client", "web").contains(&web_ip),
        "aardvark-dns names web under egret"
    );
    let (ok, page) = podman.exec(
        "client",
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 web 8080",
    );
    assert!(
        ok && page.contains("hello-from-web"),
        "client reaches web by name: {page}"
    );
    // ...and forwards the rest from the host, to the guard.
    let answer = podman.lookup("client", "allowed.test");
    assert!(answer.contains(ALLOWED), "{answer}");
    assert!(
        podman.connects("client", "allowed.test", 8080),
        "client reaches allowed.test by name: {}\n{:#?}",
        podman
            .exec(
                "client",
                "echo ping | nc -w 3 allowed.test 8080 2>&1; echo direct; echo ping | nc -w 3 10.77.0.2 8080 2>&1; echo aardvark; nslookup allowed.test 10.89.0.1 2>&1; nslookup -type=AAAA allowed.test 10.89.0.1 2>&1; nslookup allowed.test.dns.podman 10.89.0.1 2>&1"
            )
            .1,
        run.snapshot()
            .iter()
            .rev()
            .take(6)
            .map(|e| format!(
                "{} {} {} {}",
                at(e, "/event/action"),
                at(e, "/dns/question/name"),
                at(e, "/destination/ip"),
                at(e, "/process/name")
            ))
            .collect::<Vec<_>>()
    );
    let answer = podman.lookup("client", "net.callback.test");
    assert!(!answer.contains("Address: 10.77"), "{answer}");
    // The container's resolv.conf also lists the host's resolver, which a
    // client may try next: that query is the container's own (redirected).
    run.wait_event(
        15,
        "the user network's refused query, from aardvark-dns",
        |e| {
            at(e, "/event/action") == "dns-refused"
                && at(e, "/dns/question/name") == "net.callback.test"
                && at(e, "/process/name") == "aardvark-dns"
        },
    );
    // Its packets name the container.
    assert!(!podman.connects("client", BLOCKED, 8080));
    let e = run.wait_event(15, "client's blocked connection", |e| {
        at(e, "/destination/ip") == BLOCKED && at(e, "/event/action") == "blocked"
    });
    assert_eq!(at(&e, "/container/name"), "client", "{e:#}");
    assert!(
        at(&e, "/observer/ingress/interface/name")
            .as_str()
            .is_some_and(|i| i.starts_with("podman")),
        "{e:#}"
    );
    run.stop();
    drop(podman);
}
