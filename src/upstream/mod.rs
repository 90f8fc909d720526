//! The upstream side: actors that each own one connection to Redis and pipeline every client's
//! requests onto it.
//!
//! Clients talk to an actor only through [`Request`] messages on a bounded channel; each carries
//! a `oneshot` sender that the actor completes with the replies, or with an [`UpstreamError`].

mod actor;
mod address;
mod connect;

use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

pub use address::{Address, Endpoint};
pub use connect::ConnectError;

use crate::{command::Profile, config::UpstreamConfig, embedded};

/// Messages an actor's channel holds at most. Each may carry a whole pipeline of one client.
const CHANNEL_CAPACITY: usize = 1024;

/// One or more requests of one client, to be written upstream back to back.
#[derive(Debug)]
pub struct Request {
    /// Complete, canonical RESP requests, exactly as they will be written.
    pub frames: Bytes,
    /// How many requests `frames` holds: the number of replies to collect.
    pub count: u32,
    /// When the client handed the requests over. While the upstream is down they wait for a
    /// connection for at most `connect_timeout` from this moment.
    pub queued_at: Instant,
    /// Completed with all `count` replies back to back, or with the error that ended them.
    pub reply: oneshot::Sender<Reply>,
}

/// The replies to one [`Request`].
pub type Reply = Result<Bytes, UpstreamError>;

/// Why requests got no reply from Redis. None of them is retried: a request that was written
/// may have run, and running it twice is worse than failing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The connection broke with the request written (or being written) and not answered.
    #[error("redmux: upstream connection lost")]
    ConnectionLost,
    /// No connection could be made within `connect_timeout`.
    #[error("redmux: upstream unavailable")]
    Unavailable,
    /// A request waited `request_timeout` for its reply; the connection was reset.
    #[error("redmux: upstream request timed out")]
    Timeout,
}

impl UpstreamError {
    /// The error reply, once for each of `count` requests so the client's replies stay aligned.
    pub fn replies(self, count: u32) -> Bytes {
        let line = format!("-ERR {self}\r\n");
        let mut out = BytesMut::with_capacity(line.len() * count as usize);
        for _ in 0..count {
            out.extend_from_slice(line.as_bytes());
        }
        out.freeze()
    }
}

/// Timeouts an actor applies.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

/// The set of upstream actors; clients are spread over them round-robin, and each client keeps
/// its actor for life so its replies stay in order.
#[derive(Debug)]
pub struct Upstreams {
    senders: Vec<mpsc::Sender<Request>>,
    next: AtomicUsize,
    profile: Profile,
}

impl Upstreams {
    /// Starts the embedded store if configured, then `connections` actors. Actors stop once
    /// every sender is gone and their in-flight requests are answered; the embedded store stops
    /// with `shutdown`.
    pub async fn start(config: &UpstreamConfig, shutdown: CancellationToken) -> io::Result<Self> {
        let mut endpoint = config.endpoint();
        let profile = if endpoint.address == Address::Embedded {
            let addr = embedded::start(shutdown).await?;
            endpoint.address = Address::Tcp {
                host: addr.ip().to_string(),
                port: addr.port(),
            };
            Profile::Embedded
        } else {
            Profile::Redis
        };
        let timeouts = Timeouts {
            connect: config.connect_timeout,
            request: config.request_timeout,
        };
        let senders = (0..config.connections)
            .map(|id| {
                let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
                actor::spawn(
                    id,
                    endpoint.clone(),
                    timeouts,
                    profile == Profile::Redis,
                    rx,
                );
                tx
            })
            .collect();
        Ok(Upstreams {
            senders,
            next: AtomicUsize::new(0),
            profile,
        })
    }

    /// The actor for a new client.
    pub fn assign(&self) -> mpsc::Sender<Request> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        self.senders[i].clone()
    }

    /// What kind of server is behind the actors.
    pub fn profile(&self) -> Profile {
        self.profile
    }
}
