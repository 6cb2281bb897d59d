//! Kernel set insert latency (bench/dns.sh runs this inside a namespace it
//! created): how long the DNS guard's write of one resolved address into a
//! rule's set takes, as one netlink transaction with a timeout, with the set
//! empty and with 100,000 elements already in it; beside `nft add element`
//! for the same insert, which is what a script around nft would do.
//!
//!   set_insert [COUNT] [NFT_RUNS]

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Instant;

use egret::kernel::nft::Nftables;
use egret::policy::{parse_str, SystemAccounts};
use egret::ruleset::{compile, CompileInput, Element, Set};

const POLICY: &str = r#"
mode = "enforce"
[dns]
upstream = ["192.0.2.53"]
[[allow]]
name = "bench"
hosts = ["*.bench.test"]
ports = [443]
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: u32 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let nft_runs: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(30);

    let policy = parse_str(POLICY, std::path::Path::new("bench.toml"), &SystemAccounts)
        .map_err(|e| format!("{e:?}"))?;
    let rs = compile(&policy, &CompileInput::default());
    let set: Set = rs.set("h_bench_v4").ok_or("no host set")?.clone();
    let mut nft = Nftables::open()?;
    nft.apply(&rs)?;

    measure(&mut nft, &set, count, "empty set", 0)?;

    // Fill to 100k elements in bulk, then measure again.
    let bulk: Vec<(Element, u64)> = (count..100_000 + count)
        .map(|i| (element(i), 3_600_000))
        .collect();
    nft.add_timed_elements(&[(&set, bulk)])?;
    measure(&mut nft, &set, count, "set of 100k", 200_000)?;

    let mut nft_ms = Vec::new();
    for i in 0..nft_runs {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 9, 0, 0)) + i);
        let t = Instant::now();
        let st = Command::new("nft")
            .args([
                "add",
                "element",
                "inet",
                "egret",
                "h_bench_v4",
                &format!("{{ {ip} timeout 300s }}"),
            ])
            .status()?;
        nft_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !st.success() {
            return Err("nft add element failed".into());
        }
    }
    nft_ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "nft add element, set of 100k: {nft_runs} runs, p50 {:.1} ms, max {:.1} ms",
        nft_ms[nft_ms.len() / 2],
        nft_ms[nft_ms.len() - 1]
    );
    nft.remove()?;
    Ok(())
}

fn element(i: u32) -> Element {
    Element::single(vec![
        u32::from(Ipv4Addr::new(10, 0, 0, 0)) as u128 + i as u128,
    ])
}

/// One address per transaction, as the guard writes a single-address answer.
fn measure(
    nft: &mut Nftables,
    set: &Set,
    count: u32,
    label: &str,
    offset: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut lat = Vec::with_capacity(count as usize);
    for i in 0..count {
        let items = vec![(set, vec![(element(offset + i), 300_000)])];
        let t = Instant::now();
        nft.add_timed_elements(&items)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "egret {label}: {count} inserts, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
        q(0.50),
        q(0.99),
        q(0.999),
        q(1.0)
    );
    Ok(())
}
