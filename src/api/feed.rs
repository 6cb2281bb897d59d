//! The live feed: every event document `egret run` writes to stdout, pushed
//! to the API's Server-Sent-Events clients. Publishing costs nothing while
//! nobody listens, and a slow client loses its oldest events (and is told
//! how many) instead of holding the pipeline.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{broadcast, mpsc};

use crate::local_http::Client;

/// Events a client may fall behind by before it skips ahead.
const BACKLOG: usize = 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events queued for a client are sent together up to about this size.
const BURST_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct LiveFeed(
    broadcast::Sender<Arc<str>>,
    Arc<Mutex<HashMap<Client, usize>>>,
);

impl Default for LiveFeed {
    fn default() -> Self {
        LiveFeed(broadcast::channel(BACKLOG).0, Arc::default())
    }
}

/// A client's hold on one of its feeds, given back when the stream ends.
struct Held {
    client: Client,
    per_client: Arc<Mutex<HashMap<Client, usize>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut m = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.client);
            }
        }
    }
}

impl LiveFeed {
    /// `line`: one serialized event document.
    pub fn publish(&self, line: &str) {
        if self.0.receiver_count() > 0 {
            // Framed once here, not once per client.
            let _ = self.0.send(format!("data: {line}\n\n").into());
        }
    }

    pub fn clients(&self) -> usize {
        self.0.receiver_count()
    }

    /// A `text/event-stream` body: `data:` lines with one ECS document each,
    /// `event: lagged` when this client fell behind, comments as keep-alives.
    /// Must be called on the API's runtime (it spawns the forwarder).
    /// A stream for `client`, unless it has `max` open already.
    pub fn stream_for(&self, client: Option<Client>, max: usize) -> Option<EventStream> {
        let Some(client) = client else {
            return Some(self.open(None));
        };
        {
            let mut m = self.1.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(client).or_insert(0);
            if *n >= max {
                return None;
            }
            *n += 1;
        }
        Some(self.open(Some(Held {
            client,
            per_client: Arc::clone(&self.1),
        })))
    }

    fn open(&self, held: Option<Held>) -> EventStream {
        let mut events = self.0.subscribe();
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            if tx
                .send(Bytes::from_static(b"retry: 2000\n: egret live feed\n\n"))
                .await
                .is_err()
            {
                return;
            }
            let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
            keep_alive.tick().await;
            loop {
                let chunk = tokio::select! {
                    r = events.recv() => match r {
                        // A burst goes out as one write, not one per event.
                        Ok(event) => {
                            let mut chunk = String::from(&*event);
                            while chunk.len() < BURST_BYTES {
                                match events.try_recv() {
                                    Ok(more) => chunk.push_str(&more),
                                    Err(_) => break,
                                }
                            }
                            Bytes::from(chunk)
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            Bytes::from(format!("event: lagged\ndata: {n}\n\n"))
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = keep_alive.tick() => Bytes::from_static(b": keep-alive\n\n"),
                    _ = tx.closed() => break,
                };
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
        });
        EventStream { rx, _held: held }
    }
}

pub struct EventStream {
    rx: mpsc::Receiver<Bytes>,
    /// Keeps the client's count until the stream is dropped.
    _held: Option<Held>,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}
