//! The otlp sink's cost (bench/otlp.sh runs this inside a network namespace
//! it created): events per second one sink pushes to a receiver on loopback,
//! and the sink's CPU per 1,000 events (its thread's CPU time: building the
//! records, protobuf, gzip, the marked connection and the POST). The
//! receiver reads each request and answers 200, so the sink is what is
//! measured. The events are the real documents of tests/fixtures/ecs.
//!
//!   otlp_push [EVENTS] [BATCH] [gzip|none]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use egret::alert::otlp::Otlp;
use egret::alert::Deliver;
use egret::policy::{HttpTarget, OtlpConfig};

const DOCUMENTS: &str = include_str!("../tests/fixtures/ecs/documents.golden");

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Reads every request's body, answers 200; counts the bytes it got.
fn receiver(addr: SocketAddr, bytes: Arc<AtomicU64>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let bytes = Arc::clone(&bytes);
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let bytes = Arc::clone(&bytes);
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let n = body.map(|b| b.len()).unwrap_or(0);
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let batch: usize = args.next().map_or(Ok(512), |a| a.parse())?;
    let gzip = args.next().as_deref() != Some("none");
    let docs: Vec<Arc<Value>> = DOCUMENTS
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let raw: usize = docs.iter().map(|d| d.to_string().len()).sum::<usize>() / docs.len();

    let addr: SocketAddr = "127.0.0.1:14318".parse()?;
    let received = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&received);
    std::thread::spawn(move || receiver(addr, r));
    std::thread::sleep(Duration::from_millis(200));

    let config = OtlpConfig {
        http: HttpTarget {
            url: format!("http://{addr}/v1/logs"),
            https: false,
            host: addr.ip().to_string(),
            port: addr.port(),
            ca_file: None,
            headers: Vec::new(),
        },
        gzip,
        batch_size: batch,
        batch_delay: Duration::from_secs(1),
    };
    let mut sink = Otlp::new(&config, 0x6567_7274, Duration::from_secs(5), "bench1")?;
    let batches: Vec<Vec<Arc<Value>>> = (0..events)
        .map(|i| Arc::clone(&docs[i % docs.len()]))
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(<[_]>::to_vec)
        .collect();
    let (cpu0, t0) = (thread_cpu(), Instant::now());
    for b in &batches {
        sink.deliver_batch(b)?;
    }
    let (cpu, wall) = (thread_cpu() - cpu0, t0.elapsed());
    let sent = received.load(Ordering::Relaxed);
    println!(
        "otlp_push events={events} batch={batch} compression={} requests={}: {:.0} events/s, {:.2} ms CPU per 1,000 events, {:.0} bytes/event on the wire (ECS JSON {raw})",
        if gzip { "gzip" } else { "none" },
        batches.len(),
        events as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / events as f64,
        sent as f64 / events as f64,
    );
    Ok(())
}
