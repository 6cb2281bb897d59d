//! Load for bench/proxy.sh and bench/relay.sh: the same client against
//! egret's proxy, tinyproxy, squid and HAProxy.
//!
//!   proxy_load connect PROXY HOST:PORT SECONDS THREADS
//!       new CONNECT tunnels as fast as possible; through each, one HTTP/1.0
//!       GET, read to the end, close. Prints "N tunnels/s (N ok, F failed)".
//!   proxy_load tcp ADDR HOST SECONDS THREADS
//!       the same without CONNECT: each connection goes to ADDR (a TCP relay
//!       such as HAProxy, or the server itself) and sends the GET at once.
//!   proxy_load idle PROXY HOST:PORT COUNT
//!       open COUNT tunnels, print "ready N", hold them until stdin closes.
//!   proxy_load source ADDR
//!       serve zeros to every connection until it closes (a throughput source).
//!   proxy_load pull [PROXY] HOST:PORT BYTES
//!       read BYTES through a tunnel (or directly without PROXY); prints MB/s.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(|s| s.as_str())
            .ok_or_else(|| "missing argument (see the file's header)".into())
    };
    match arg(0)? {
        "connect" => connect_rate(
            Via::Connect(arg(1)?.parse()?),
            arg(2)?,
            arg(3)?.parse()?,
            arg(4)?.parse()?,
        ),
        "tcp" => connect_rate(
            Via::Tcp(arg(1)?.parse()?),
            arg(2)?,
            arg(3)?.parse()?,
            arg(4)?.parse()?,
        ),
        "idle" => idle(arg(1)?.parse()?, arg(2)?, arg(3)?.parse()?),
        "source" => source(arg(1)?),
        "pull" if args.len() == 4 => pull(Some(arg(1)?.parse()?), arg(2)?, arg(3)?.parse()?),
        "pull" => pull(None, arg(1)?, arg(2)?.parse()?),
        other => Err(format!("unknown mode {other}").into()),
    }
}

/// CONNECT through `proxy`; returns the tunnel once the proxy said 200.
fn tunnel(proxy: SocketAddr, target: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    // Read the response head byte by byte so nothing of the tunnel is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err("proxy closed".into());
        }
        head.push(b[0]);
        if head.len() > 8192 {
            return Err("response head too long".into());
        }
    }
    let status = String::from_utf8_lossy(&head);
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        return Err(format!("proxy said {}", status.lines().next().unwrap_or("")).into());
    }
    Ok(s)
}

/// How each connection of `connect_rate` reaches the server.
#[derive(Clone, Copy)]
enum Via {
    /// A CONNECT tunnel through this HTTP proxy.
    Connect(SocketAddr),
    /// A plain TCP connection to this address (a TCP relay, or the server).
    Tcp(SocketAddr),
}

fn open(via: Via, target: &str) -> Result<TcpStream> {
    match via {
        Via::Connect(proxy) => tunnel(proxy, target),
        Via::Tcp(addr) => {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            Ok(s)
        }
    }
}

fn connect_rate(via: Via, target: &str, seconds: u64, threads: usize) -> Result<()> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (ok, failed, stop, target) =
                (ok.clone(), failed.clone(), stop.clone(), target.to_string());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let r = open(via, &target).and_then(|mut s| {
                        write!(s, "GET / HTTP/1.0\r\nHost: {target}\r\n\r\n")?;
                        let mut got = 0;
                        loop {
                            let n = s.read(&mut buf)?;
                            if n == 0 {
                                break;
                            }
                            got += n;
                        }
                        if got == 0 {
                            return Err("empty response".into());
                        }
                        Ok(())
                    });
                    match r {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("first failure: {e}");
                            }
                            0
                        }
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    println!(
        "{:.0} tunnels/s ({n} ok, {} failed, {secs:.1} s)",
        n as f64 / secs,
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

fn idle(proxy: SocketAddr, target: &str, count: usize) -> Result<()> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        match tunnel(proxy, target) {
            Ok(s) => held.push(s),
            Err(e) => return Err(format!("tunnel {i}: {e}").into()),
        }
    }
    println!("ready {}", held.len());
    std::io::stdout().flush()?;
    let mut line = String::new();
    BufReader::new(std::io::stdin()).read_line(&mut line)?;
    Ok(())
}

fn source(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    println!("listening");
    std::io::stdout().flush()?;
    let zeros = vec![0u8; 1 << 20];
    for conn in listener.incoming() {
        let Ok(mut c) = conn else { continue };
        let zeros = zeros.clone();
        std::thread::spawn(move || while c.write_all(&zeros).is_ok() {});
    }
    Ok(())
}

fn pull(proxy: Option<SocketAddr>, target: &str, bytes: u64) -> Result<()> {
    let mut s = match proxy {
        Some(p) => tunnel(p, target)?,
        None => TcpStream::connect(target)?,
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let start = Instant::now();
    while got < bytes {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err("closed early".into());
        }
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.0} MB/s ({got} bytes, {secs:.2} s)",
        got as f64 / secs / 1e6
    );
    Ok(())
}
