//! One client connection: parse its requests, forward or answer each, and write the replies back
//! in request order.
//!
//! The session reads, forwards and writes concurrently, so a client may pipeline: everything
//! buffered is parsed, consecutive forwardable requests go upstream as one batch (one message,
//! one `oneshot`), and replies are written as soon as the oldest outstanding one is ready. At
//! most `max_pipeline` requests are outstanding; past that the client is not read until replies
//! drain, which is all the backpressure a well-behaved client needs.

use std::{collections::VecDeque, io::IoSlice, sync::Arc, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
    sync::{
        mpsc::{self, error::TrySendError},
        oneshot,
    },
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    command::{self, Action, Profile},
    resp::{Frame, Limits, RequestDecoder},
    upstream::{Reply, Request, UpstreamError},
};

/// Read size for client sockets.
const READ_CHUNK: usize = 16 * 1024;
/// Most buffer growth reserved at once for a large request.
const MAX_READ_RESERVE: usize = 1024 * 1024;
/// Slices handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// Stop reading a client while this many reply bytes wait for it to read them.
const OUTPUT_HIGH_WATER: usize = 1024 * 1024;

/// Settings every session shares.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub limits: Limits,
    pub max_pipeline: usize,
    pub client_query_limit: u64,
    pub client_output_limit: u64,
    pub idle_timeout: Option<Duration>,
    pub request_timeout: Duration,
    pub profile: Profile,
}

/// A reply slot, in request order.
#[derive(Debug)]
enum Pending {
    /// Replies redmux produced itself, to `count` requests.
    Local { bytes: Bytes, count: u32 },
    /// The replies to `count` requests forwarded as one batch.
    Upstream {
        rx: oneshot::Receiver<Reply>,
        count: u32,
    },
}

/// A client socket that can be read and written at once through borrowed halves: no `Arc`, no
/// lock, and no `shutdown(2)` on drop (a plain close is all Redis does either).
pub trait Duplex: Send + 'static {
    type Read<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

impl Duplex for TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

impl Duplex for UnixStream {
    type Read<'a> = tokio::net::unix::ReadHalf<'a>;
    type Write<'a> = tokio::net::unix::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

pub struct Session<S> {
    io: S,
    state: State,
}

/// Everything a session tracks besides its socket.
struct State {
    config: Arc<SessionConfig>,
    upstream: mpsc::Sender<Request>,
    shutdown: CancellationToken,
    decoder: RequestDecoder,
    /// Bytes read and not yet parsed (or parsed and not yet split off to be forwarded).
    rbuf: BytesMut,
    /// Set when `rbuf` may hold a complete request that has not been parsed yet.
    unparsed: bool,
    /// Reply slots not yet moved to `out`, oldest first.
    pending: VecDeque<Pending>,
    /// Requests whose replies have not reached `out` yet.
    outstanding: usize,
    /// Reply bytes ready to write, oldest first.
    out: VecDeque<Bytes>,
    out_len: usize,
    /// No more requests are read: QUIT, a protocol error, EOF or shutdown. The session ends
    /// once the replies already owed are written.
    draining: bool,
    /// Close now, writing nothing more: an HTTP request (as Redis does), or a client over its
    /// output limit.
    abort: bool,
    /// Last time the client sent a request or took a reply: idleness is measured from here.
    last_activity: Instant,
}

impl<S: Duplex> Session<S> {
    pub fn new(
        io: S,
        config: Arc<SessionConfig>,
        upstream: mpsc::Sender<Request>,
        shutdown: CancellationToken,
    ) -> Self {
        let state = State {
            decoder: RequestDecoder::new(config.limits),
            config,
            upstream,
            shutdown,
            rbuf: BytesMut::new(),
            unparsed: false,
            pending: VecDeque::new(),
            outstanding: 0,
            out: VecDeque::new(),
            out_len: 0,
            draining: false,
            abort: false,
            last_activity: Instant::now(),
        };
        Session { io, state }
    }

    /// Serves the client until it leaves, QUITs, misbehaves or the server shuts down.
    pub async fn run(self) {
        let Session {
            mut io,
            state: mut this,
        } = self;
        let (mut reader, mut writer) = io.halves();
        let idle_timeout = this.config.idle_timeout;
        // Registered once: a fresh `cancelled()` future per loop turn would lock the token's
        // waiter list twice per request.
        let shutdown = this.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        let idle = tokio::time::sleep(idle_timeout.unwrap_or(Duration::MAX / 4));
        tokio::pin!(idle);
        loop {
            this.collect_ready();
            if this.abort {
                break;
            }
            if this.unparsed && !this.draining && this.outstanding < this.config.max_pipeline {
                this.process_input().await;
                continue;
            }
            if this.draining && this.pending.is_empty() && this.out.is_empty() {
                break;
            }
            let can_read = !this.draining
                && this.outstanding < this.config.max_pipeline
                && this.out_len < OUTPUT_HIGH_WATER;
            if can_read && this.rbuf.capacity() - this.rbuf.len() < READ_CHUNK / 4 {
                // Grow towards a large announced bulk step by step: a header alone must not
                // reserve 512 MB.
                this.rbuf
                    .reserve(this.decoder.missing().clamp(READ_CHUNK, MAX_READ_RESERVE));
            }
            let waiting_upstream = matches!(this.pending.front(), Some(Pending::Upstream { .. }));
            tokio::select! {
                biased;
                (reply, count) = front_reply(&mut this.pending), if waiting_upstream => {
                    this.pending.pop_front();
                    let bytes = match reply {
                        Ok(reply) => reply_bytes(reply, count),
                        Err(_) => UpstreamError::ConnectionLost.replies(count),
                    };
                    this.queue_out(bytes, count);
                }
                written = write_some(&mut writer, &mut this.out), if !this.out.is_empty() => {
                    match written {
                        Ok(n) => {
                            this.out_len -= n;
                            this.last_activity = Instant::now();
                        }
                        Err(error) => {
                            debug!(%error, "client write failed");
                            return;
                        }
                    }
                }
                read = reader.read_buf(&mut this.rbuf), if can_read => match read {
                    Ok(0) => this.draining = true,
                    Ok(_) => {
                        this.unparsed = true;
                        this.last_activity = Instant::now();
                        if this.rbuf.len() as u64 > this.config.client_query_limit {
                            debug!("query buffer limit exceeded; closing");
                            return;
                        }
                    }
                    Err(error) => {
                        debug!(%error, "client read failed");
                        return;
                    }
                },
                // A client owed replies is not idle: the timer runs only when nothing is owed.
                () = &mut idle, if idle_timeout.is_some() && this.outstanding == 0 && this.out.is_empty() => {
                    let deadline = this.last_activity + idle_timeout.unwrap_or_default();
                    if deadline <= Instant::now() {
                        debug!("idle timeout; closing");
                        return;
                    }
                    idle.as_mut().reset(deadline);
                }
                () = &mut shutdown, if !this.draining => this.draining = true,
            }
        }
    }
}

impl State {
    /// Moves replies that are ready, in order, from `pending` to `out`.
    fn collect_ready(&mut self) {
        while let Some(front) = self.pending.front_mut() {
            let (bytes, count) = match front {
                Pending::Local { bytes, count } => (std::mem::take(bytes), *count),
                Pending::Upstream { rx, count } => match rx.try_recv() {
                    Ok(reply) => (reply_bytes(reply, *count), *count),
                    Err(oneshot::error::TryRecvError::Empty) => return,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        (UpstreamError::ConnectionLost.replies(*count), *count)
                    }
                },
            };
            self.pending.pop_front();
            self.queue_out(bytes, count);
        }
    }

    fn queue_out(&mut self, bytes: Bytes, count: u32) {
        self.outstanding -= count as usize;
        if !bytes.is_empty() {
            self.out_len += bytes.len();
            self.out.push_back(bytes);
        }
        if self.out_len as u64 > self.config.client_output_limit && !self.abort {
            warn!(
                limit = self.config.client_output_limit,
                "client output limit reached (it does not read its replies); closing"
            );
            self.abort = true;
        }
    }

    /// Parses buffered requests while the pipeline limit allows, forwarding runs of them.
    async fn process_input(&mut self) {
        // `rbuf[..run_len]` holds `run_count` canonical requests to forward as one batch.
        let mut run_len = 0;
        let mut run_count = 0;
        loop {
            if self.outstanding >= self.config.max_pipeline {
                break;
            }
            let frame = match self.decoder.decode(&self.rbuf[run_len..]) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    self.unparsed = false;
                    break;
                }
                Err(error) => {
                    self.flush_run(&mut run_len, &mut run_count).await;
                    debug!(%error, "protocol error; closing");
                    self.reply_locally(error.reply());
                    self.draining = true;
                    break;
                }
            };
            let action = frame
                .command_bytes(&self.rbuf[run_len..])
                .map(|request| command::action(request, self.config.profile));
            match (action, frame) {
                (
                    Some(Action::Forward),
                    Frame::Command {
                        len,
                        rewritten: None,
                    },
                ) => {
                    run_len += len;
                    run_count += 1;
                    self.outstanding += 1;
                    continue;
                }
                (action, frame) => {
                    self.flush_run(&mut run_len, &mut run_count).await;
                    self.rbuf.advance(frame.consumed());
                    match (action, frame) {
                        (
                            Some(Action::Forward),
                            Frame::Command {
                                rewritten: Some(bytes),
                                ..
                            },
                        ) => {
                            self.outstanding += 1;
                            self.forward(bytes, 1).await;
                        }
                        (Some(Action::Reply(bytes)), _) => self.reply_locally(bytes),
                        (Some(Action::ReplyAndClose(bytes)), _) => {
                            self.reply_locally(bytes);
                            self.draining = true;
                            break;
                        }
                        (Some(Action::Drop), _) => {
                            self.abort = true;
                            break;
                        }
                        // Input Redis ignores, and the already-handled forward case.
                        _ => {}
                    }
                }
            }
        }
        self.flush_run(&mut run_len, &mut run_count).await;
        if self.draining || self.abort {
            self.unparsed = false;
        }
    }

    fn reply_locally(&mut self, bytes: Bytes) {
        self.outstanding += 1;
        self.pending.push_back(Pending::Local { bytes, count: 1 });
    }

    /// Sends the run of requests at the front of `rbuf` upstream as one batch.
    async fn flush_run(&mut self, run_len: &mut usize, run_count: &mut u32) {
        if *run_count > 0 {
            let frames = self.rbuf.split_to(*run_len).freeze();
            self.forward(frames, *run_count).await;
        }
        *run_len = 0;
        *run_count = 0;
    }

    /// Hands `count` requests to the upstream actor. A full channel is waited on for at most
    /// `request_timeout`, so a stuck upstream cannot hold a client forever.
    async fn forward(&mut self, frames: Bytes, count: u32) {
        let (reply, rx) = oneshot::channel();
        let request = Request {
            frames,
            count,
            queued_at: Instant::now(),
            reply,
        };
        let sent = match self.upstream.try_send(request) {
            Ok(()) => true,
            Err(TrySendError::Full(request)) => matches!(
                tokio::time::timeout(self.config.request_timeout, self.upstream.send(request))
                    .await,
                Ok(Ok(()))
            ),
            Err(TrySendError::Closed(_)) => false,
        };
        self.pending.push_back(if sent {
            Pending::Upstream { rx, count }
        } else {
            Pending::Local {
                bytes: UpstreamError::Unavailable.replies(count),
                count,
            }
        });
    }
}

/// Waits for the oldest slot, which the caller guarantees is an upstream one.
async fn front_reply(
    pending: &mut VecDeque<Pending>,
) -> (Result<Reply, oneshot::error::RecvError>, u32) {
    match pending.front_mut() {
        Some(Pending::Upstream { rx, count }) => {
            let count = *count;
            (rx.await, count)
        }
        _ => std::future::pending().await,
    }
}

fn reply_bytes(reply: Reply, count: u32) -> Bytes {
    reply.unwrap_or_else(|error| error.replies(count))
}

/// Writes as much of `out` as the socket takes in one vectored write, and drops what was written.
async fn write_some<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut VecDeque<Bytes>,
) -> std::io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
    let mut n = 0;
    for (slot, chunk) in slices.iter_mut().zip(out.iter()) {
        *slot = IoSlice::new(chunk);
        n += 1;
    }
    let written = writer.write_vectored(&slices[..n]).await?;
    if written == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    let mut left = written;
    while left > 0 {
        let Some(front) = out.front_mut() else { break };
        if front.len() > left {
            front.advance(left);
            break;
        }
        left -= front.len();
        out.pop_front();
    }
    Ok(written)
}
