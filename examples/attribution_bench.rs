//! Attribution latency and cost (bench/attribution.sh runs this inside a
//! namespace): how long `Attributor::attribute` takes to go from a logged
//! packet's 5-tuple to pid, executable and unit, with ~300 processes and
//! thousands of descriptors on the machine.
//!
//! Cases: a socket of a brand-new process (the usual blocked connect), of a
//! long-lived process (worst case: the whole /proc is scanned), a repeat of
//! the same flow (cache), and a new socket of a process seen before.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use egret::monitor::attribution::{Attributor, Method};
use egret::monitor::packet::{Flow, L4Header};

const TARGET: &str = "10.77.0.2:9";
const ROUNDS: usize = 40;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut crowd = spawn_crowd()?;
    std::thread::sleep(Duration::from_millis(500));
    let (procs, fds) = count_procs_and_fds();
    println!("processes: {procs}, open descriptors: {fds}");

    let mut new_process = Vec::new();
    for _ in 0..ROUNDS {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", "import socket,sys; s=socket.socket(); s.setblocking(False); s.connect_ex(('10.77.0.2', 9)); print(s.getsockname()[1], flush=True); sys.stdin.read()"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().ok_or("no stdout")?).read_line(&mut line)?;
        let port: u16 = line.trim().parse()?;
        let mut a = Attributor::new();
        new_process.push(time(&mut a, port, Some(child.id()))?);
        finish(child);
    }

    let mut long_lived = Vec::new();
    let mut cached = Vec::new();
    let mut known_process = Vec::new();
    let mut warm = Attributor::new();
    for i in 0..ROUNDS {
        let sock = connect_nonblocking()?;
        let port = sock.1;
        let mut a = Attributor::new();
        long_lived.push(time(&mut a, port, Some(std::process::id()))?);
        cached.push(time(&mut a, port, Some(std::process::id()))?);
        if i > 0 {
            known_process.push(time(&mut warm, port, Some(std::process::id()))?);
        } else {
            time(&mut warm, port, Some(std::process::id()))?;
        }
        drop(sock);
    }
    for c in &mut crowd {
        let _ = c.kill();
    }
    for c in &mut crowd {
        let _ = c.wait();
    }
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "case (µs per attribution)", "p50", "p99", "max"
    );
    for (name, v) in [
        ("new process (cold caches)", &mut new_process),
        (
            "long-lived process (cold: full /proc scan)",
            &mut long_lived,
        ),
        ("same flow again (socket cache)", &mut cached),
        ("new socket of a known process", &mut known_process),
    ] {
        v.sort_unstable();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        println!("{name:<44} {:>9} {:>9} {:>9}", q(0.5), q(0.99), q(1.0));
    }
    Ok(())
}

fn finish(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

/// 280 idle processes plus 20 that each hold 100 sockets.
fn spawn_crowd() -> std::io::Result<Vec<Child>> {
    let mut v = Vec::new();
    for _ in 0..280 {
        v.push(Command::new("sleep").arg("300").spawn()?);
    }
    for _ in 0..20 {
        v.push(
            Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    "import socket,time; s=[socket.socket() for _ in range(100)]; time.sleep(300)",
                ])
                .spawn()?,
        );
    }
    Ok(v)
}

fn count_procs_and_fds() -> (usize, usize) {
    let mut procs = 0;
    let mut fds = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            procs += 1;
            fds += std::fs::read_dir(e.path().join("fd"))
                .map(|d| d.count())
                .unwrap_or(0);
        }
    }
    (procs, fds)
}

/// A socket of this (old) process in SYN-SENT: nothing answers 10.77.0.2.
fn connect_nonblocking() -> std::io::Result<(std::net::TcpStream, u16)> {
    let stream = nonblocking_tcp_socket()?;
    let addr: SocketAddr = TARGET.parse().map_err(std::io::Error::other)?;
    let _ = connect_raw(&stream, addr);
    let port = stream.local_addr()?.port();
    Ok((stream, port))
}

fn nonblocking_tcp_socket() -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket fd, owned by the TcpStream from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a valid socket that nothing else owns.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

fn connect_raw(s: &TcpStream, addr: SocketAddr) -> std::io::Result<()> {
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid fd and a sockaddr_in of the stated size.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn time(
    a: &mut Attributor,
    sport: u16,
    expect_pid: Option<u32>,
) -> Result<u128, Box<dyn std::error::Error>> {
    let flow = Flow {
        src: "10.77.0.1".parse::<IpAddr>()?,
        dst: "10.77.0.2".parse::<IpAddr>()?,
        protocol: 6,
        l4: L4Header::Ports { src: sport, dst: 9 },
    };
    let start = Instant::now();
    let who = a.attribute(Some(&flow), Some(0), Some(0));
    let us = start.elapsed().as_micros();
    if who.method != Method::SockDiagProc || who.process.as_ref().map(|p| p.pid) != expect_pid {
        let _ = writeln!(
            std::io::stderr(),
            "wrong attribution: {who:?}, expected pid {expect_pid:?}"
        );
        return Err("attribution failed".into());
    }
    Ok(us)
}
