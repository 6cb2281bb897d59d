//! Load generator for bench/ingest.sh: sends COUNT UDP datagrams to ADDR as
//! fast as one thread can, optionally capped at RATE per second, and prints
//! how many the firewall refused (EPERM: dropped by an output rule) and how
//! long it took. Bounded by count; only ever aimed at namespace addresses.
//!
//!   udp_flood ADDR:PORT COUNT [RATE]

use std::io::ErrorKind;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, count, rest @ ..] = args.as_slice() else {
        return Err("usage: udp_flood ADDR:PORT COUNT [RATE]".into());
    };
    let count: u64 = count.parse()?;
    let rate: Option<u64> = rest.first().map(|r| r.parse()).transpose()?;
    let socket = UdpSocket::bind(if addr.starts_with('[') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })?;
    let start = Instant::now();
    let (mut refused, mut sent) = (0u64, 0u64);
    for i in 0..count {
        if let Some(rate) = rate.filter(|&r| r > 0) {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        match socket.send_to(b"x", addr.as_str()) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == ErrorKind::PermissionDenied => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "refused={refused} sent={sent} seconds={secs:.3} rate={:.0}",
        count as f64 / secs
    );
    Ok(())
}
