//! Load generator for bench/conn_rate.sh: new TCP connections per second.
//!
//!   conn_rate server ADDR:PORT [THREADS]          accept, wait for the client's reset, forever
//!   conn_rate client ADDR:PORT SECONDS [THREADS]  connect, close with RST, repeat;
//!                                                 prints connections per second
//!
//! The client closes with SO_LINGER 0 (an RST), so no TIME_WAIT piles up and
//! ephemeral ports are not exhausted; every connection is a full handshake
//! through the firewall under test. Bounded by SECONDS.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", addr, rest @ ..] => server(addr.parse()?, threads(rest.first())?),
        ["client", addr, secs, rest @ ..] => client(
            addr.parse()?,
            Duration::from_secs_f64(secs.parse()?),
            threads(rest.first())?,
        ),
        _ => Err(
            "usage: conn_rate server ADDR:PORT [THREADS] | client ADDR:PORT SECONDS [THREADS]"
                .into(),
        ),
    }
}

fn threads(arg: Option<&&str>) -> Result<usize> {
    Ok(arg.map(|t| t.parse()).transpose()?.unwrap_or(2).max(1))
}

fn server(addr: SocketAddr, threads: usize) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    // A deep accept queue: with client and server sharing two CPUs, the
    // accepting threads can lag a burst; an overflow would drop SYNs and
    // measure a 1 s retransmit instead of the firewall.
    // SAFETY: valid listening socket fd.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    println!("listening");
    let mut handles = Vec::new();
    for _ in 0..threads {
        let l = listener.try_clone()?;
        handles.push(std::thread::spawn(move || loop {
            // Wait for the client's RST rather than closing first: a server
            // that closes first either leaves TIME_WAIT sockets that reused
            // client ports run into, or resets connections before the client
            // has seen its handshake complete.
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.read(&mut [0u8; 1]);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn client(addr: SocketAddr, secs: Duration, threads: usize) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + secs;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        Ok(s) => {
                            reset_on_close(&s);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("conn_rate: first failure: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "client thread panicked")?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{:.0} conn/s ({} connections, {} failed, {:.2} s)",
        done.load(Ordering::Relaxed) as f64 / elapsed,
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        elapsed
    );
    Ok(())
}

fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd; pointer to a linger struct of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}
