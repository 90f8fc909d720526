//! The reply-ownership checker: many concurrent clients through redmux, each checking that every
//! reply it gets is the reply to its own request, while a test breaks the upstream.
//!
//! Client `id` loops over rounds of three requests on keys of its own:
//!
//! ```text
//! SET k:{id} c{id}:s{seq}:{padding}     the value names the client and the round
//! GET k:{id}                            must give back this client's value
//! INCRBY n:{id} {step(id)}              the counter moves by a step unique to the client
//! ```
//!
//! Odd clients pipeline the three in one write, even ones send one at a time. With
//! `Options::mixed`, every fourth client instead pipelines a round that takes three paths
//! through redmux in one write, and checks that they run in the order sent:
//!
//! ```text
//! SET k:{id} ...; MULTI; INCRBY n:{id} step; EXEC; GET k:{id}      shared, pinned, shared
//! RPUSH b:{id} ...; BLPOP b:{id} 0.2                                shared, pinned (blocking)
//! ```
//!
//! With `Options::attackers`, unchecked clients send command names with a NUL byte
//! (`multi\0N`, `select\0N 7`, `client\0N REPLY OFF`...), which Redis might run as the command
//! before the NUL: each must get the unknown-command error, and no checked client may notice.
//!
//! Every reply is classified as one of:
//!
//! - **ok**: the reply this request should get;
//! - **error**: `-ERR redmux: upstream ...`, what redmux answers during a fault;
//! - **misroute**: a reply that belongs to another client or to another request of this client:
//!   a value with another id, an integer that is not a multiple of this client's step, a reply of
//!   the wrong type, a value older than the last acknowledged SET;
//! - **hang**: neither a reply nor an error within the reply timeout, or the connection closed
//!   instead of answering. The client then reconnects;
//! - **twice**: an INCRBY reply shows the counter moved further than this client's requests can
//!   explain, so some request ran twice.
//!
//! What a failed request may have done: `-ERR redmux: upstream unavailable` means redmux never
//! wrote it (no connection came up in time), so it did not run. `connection lost`, `request timed
//! out` and a hang mean it may have run, possibly much later: a stopped Redis runs what is in its
//! socket buffer when it wakes. The checks allow exactly that and nothing more.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use redmux::resp::{encode_command, ReplyScanner};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

/// Most problems kept with their description (all are counted).
const PROBLEMS_KEPT: usize = 20;

#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Checked clients.
    pub clients: usize,
    /// A request with no reply after this is a hang. It must exceed the longest time redmux may
    /// take to answer with an error: `connect_timeout + request_timeout`, plus a margin.
    pub reply_timeout: Duration,
    /// Extra unchecked clients that pipeline INCRs and disconnect without reading the replies:
    /// requests in flight whose client is gone.
    pub leavers: usize,
    /// Every fourth checked client sends mixed-path rounds (a transaction and a blocking
    /// command between plain commands, in one write).
    pub mixed: bool,
    /// Clients sending command names with a NUL byte, each checked for the unknown-command error.
    pub attackers: usize,
}

/// Counts so far, over every checked client.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    /// Requests sent.
    pub sent: u64,
    pub ok: u64,
    pub error: u64,
    pub misroute: u64,
    pub hang: u64,
    pub twice: u64,
    /// Longest time from sending a request to its reply (ok or error).
    pub max_latency: Duration,
}

impl Counts {
    /// Every request sent has exactly one outcome (between rounds: call on a finished run).
    pub(crate) fn answered(&self) -> u64 {
        self.ok + self.error + self.misroute + self.hang + self.twice
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} ok {} error {} misroute {} hang {} twice {} (max latency {:?})",
            self.sent, self.ok, self.error, self.misroute, self.hang, self.twice, self.max_latency
        )
    }
}

/// State the clients and the test share.
struct Shared {
    start: Instant,
    stop: AtomicBool,
    sent: AtomicU64,
    ok: AtomicU64,
    error: AtomicU64,
    misroute: AtomicU64,
    hang: AtomicU64,
    twice: AtomicU64,
    max_latency_us: AtomicU64,
    /// Bumped by the test once Redis has lost its data (killed, not yet restarted).
    data_epoch: AtomicU64,
    /// Per client: when (µs after `start`) the latest request that then succeeded was sent.
    last_ok_sent_us: Vec<AtomicU64>,
    problems: Mutex<Vec<String>>,
}

impl Shared {
    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_micros()).unwrap_or(u64::MAX)
    }

    fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            error: self.error.load(Ordering::Relaxed),
            misroute: self.misroute.load(Ordering::Relaxed),
            hang: self.hang.load(Ordering::Relaxed),
            twice: self.twice.load(Ordering::Relaxed),
            max_latency: Duration::from_micros(self.max_latency_us.load(Ordering::Relaxed)),
        }
    }

    fn problem(&self, counter: &AtomicU64, text: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < PROBLEMS_KEPT {
            problems.push(text);
        }
    }
}

/// A running set of checked clients.
pub(crate) struct Checker {
    shared: Arc<Shared>,
    clients: Vec<JoinHandle<ClientReport>>,
    leavers: Vec<JoinHandle<(usize, u64)>>,
    attackers: Vec<JoinHandle<()>>,
}

/// What one client did, for the final check against Redis.
#[derive(Debug, Clone)]
pub(crate) struct ClientReport {
    pub id: usize,
    pub incr_sent: u64,
    /// INCRBYs acknowledged since the counter was last seen to restart (Redis lost its data).
    pub incr_ok_instance: u64,
    pub incr_ok_total: u64,
    /// INCRBYs that failed in a way that may have run (connection lost, timed out, hang).
    pub incr_uncertain: u64,
    /// Runs beyond what was sent, seen in replies (each is a request that ran twice).
    pub incr_excess: u64,
}

/// The outcome of a whole run.
pub(crate) struct Report {
    pub counts: Counts,
    pub clients: Vec<ClientReport>,
    /// (leaver id, INCRs it sent)
    pub leavers: Vec<(usize, u64)>,
    pub data_lost: bool,
    pub problems: Vec<String>,
}

impl Checker {
    /// Starts the clients against `addr` (they connect in the background).
    pub(crate) fn start(addr: SocketAddr, options: Options) -> Checker {
        let shared = Arc::new(Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            error: AtomicU64::new(0),
            misroute: AtomicU64::new(0),
            hang: AtomicU64::new(0),
            twice: AtomicU64::new(0),
            max_latency_us: AtomicU64::new(0),
            data_epoch: AtomicU64::new(0),
            last_ok_sent_us: (0..options.clients).map(|_| AtomicU64::new(0)).collect(),
            problems: Mutex::new(Vec::new()),
        });
        let clients = (0..options.clients)
            .map(|id| {
                let mode = match id % 4 {
                    3 if options.mixed => Mode::Mixed,
                    1 | 3 => Mode::Pipelined,
                    _ => Mode::OneAtATime,
                };
                let client = Client::new(id, addr, options.reply_timeout, mode, shared.clone());
                tokio::spawn(client.run())
            })
            .collect();
        let leavers = (0..options.leavers)
            .map(|id| tokio::spawn(leaver(id, addr, shared.clone())))
            .collect();
        let attackers = (0..options.attackers)
            .map(|id| tokio::spawn(attacker(id, addr, options.reply_timeout, shared.clone())))
            .collect();
        Checker {
            shared,
            clients,
            leavers,
            attackers,
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        self.shared.counts()
    }

    /// Call once Redis has lost its data (after SIGKILL, before the restart). Requests sent
    /// before this call may have been applied to the lost instance: their values may be gone
    /// and counters may restart from zero. Requests sent after it can only reach the new one.
    pub(crate) fn data_lost(&self) {
        self.shared.data_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until every client has had a request sent after `since` succeed, and returns how
    /// long after `since` that was; `None` if it did not happen within `within`.
    pub(crate) async fn all_succeeding_since(
        &self,
        since: Instant,
        within: Duration,
    ) -> Option<Duration> {
        let since_us = self.shared.micros(since);
        let deadline = since + within;
        loop {
            let all = self
                .shared
                .last_ok_sent_us
                .iter()
                .all(|t| t.load(Ordering::Relaxed) >= since_us);
            if all {
                return Some(since.elapsed());
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Polling a condition the clients update; nothing to be notified of.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until `more` further requests have succeeded: traffic at its steady state before a
    /// fault.
    pub(crate) async fn wait_ok(&self, more: u64, within: Duration) {
        let target = self.shared.ok.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + within;
        while self.shared.ok.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "{more} successes did not come within {within:?}: {}",
                self.counts()
            );
            // Polling a counter the clients update.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Like [`Checker::all_succeeding_since`] from now, panicking with the counts if it does not
    /// happen within `within`: all clients are up and served.
    pub(crate) async fn wait_all_succeeding(&self, within: Duration) -> Duration {
        let since = Instant::now();
        match self.all_succeeding_since(since, within).await {
            Some(took) => took,
            None => panic!(
                "not every client succeeded within {within:?}: {}\n{:#?}",
                self.counts(),
                self.shared.problems.lock().unwrap()
            ),
        }
    }

    /// Stops every client after its current round and collects the report.
    pub(crate) async fn finish(self) -> Report {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut clients = Vec::new();
        for client in self.clients {
            clients.push(client.await.expect("checked client task"));
        }
        let mut leavers = Vec::new();
        for leaver in self.leavers {
            leavers.push(leaver.await.expect("leaver task"));
        }
        for attacker in self.attackers {
            attacker.await.expect("attacker task");
        }
        Report {
            counts: self.shared.counts(),
            clients,
            leavers,
            data_lost: self.shared.data_epoch.load(Ordering::SeqCst) > 0,
            problems: self.shared.problems.lock().unwrap().clone(),
        }
    }
}

impl Report {
    /// Prints the counts (shown with `--nocapture`).
    pub(crate) fn print(&self, name: &str) {
        println!("{name}: {}", self.counts);
        for problem in &self.problems {
            println!("{name}: problem: {problem}");
        }
    }

    /// No misroute, no hang, nothing run twice, and every request sent accounted for once.
    pub(crate) fn assert_clean(&self, name: &str) {
        let c = &self.counts;
        assert_eq!(
            c.answered(),
            c.sent,
            "{name}: every request has one outcome: {c}"
        );
        assert!(
            c.misroute == 0 && c.hang == 0 && c.twice == 0,
            "{name}: {c}\n{:#?}",
            self.problems
        );
    }

    /// Reads every client's counter directly from Redis: it never exceeds what the client sent,
    /// nor what its acknowledged and possibly-run requests explain (no request ran twice); and,
    /// unless Redis lost its data, it is at least what was acknowledged (no reply was invented).
    pub(crate) fn check_counters(&self, name: &str, direct: &mut redis::Connection) {
        for client in &self.clients {
            let value: Option<u64> = redis::cmd("GET")
                .arg(counter_key(client.id))
                .query(direct)
                .expect("read counter");
            let value = value.unwrap_or(0);
            let step = step(client.id);
            assert_eq!(
                value % step,
                0,
                "{name}: client {}: counter {value}",
                client.id
            );
            let ran = value / step;
            assert!(
                ran <= client.incr_sent,
                "{name}: client {}: {ran} INCRBYs ran, {} sent",
                client.id,
                client.incr_sent
            );
            assert!(
                ran <= client.incr_ok_instance + client.incr_uncertain,
                "{name}: client {}: {ran} INCRBYs ran, more than {} acknowledged + {} that may \
                 have run: a request ran twice",
                client.id,
                client.incr_ok_instance,
                client.incr_uncertain
            );
            if !self.data_lost {
                assert!(
                    ran >= client.incr_ok_total,
                    "{name}: client {}: {ran} INCRBYs ran, {} acknowledged",
                    client.id,
                    client.incr_ok_total
                );
            }
        }
        for &(id, sent) in &self.leavers {
            let value: Option<u64> = redis::cmd("GET")
                .arg(format!("leaver:{id}"))
                .query(direct)
                .expect("read leaver counter");
            assert!(
                value.unwrap_or(0) <= sent,
                "{name}: leaver {id}: {value:?} INCRs ran, {sent} sent"
            );
        }
    }
}

fn value_key(id: usize) -> String {
    format!("k:{id}")
}

fn counter_key(id: usize) -> String {
    format!("n:{id}")
}

fn list_key(id: usize) -> String {
    format!("b:{id}")
}

/// The INCRBY step of client `id`. A multiple of one client's step is practically never a
/// multiple of another's, so an integer reply shows whose counter it came from.
fn step(id: usize) -> u64 {
    1_000_003 + id as u64
}

/// The value client `id` writes in round `seq`: it names both, and its length varies (every
/// 64th is 16 KiB, so replies also arrive over several reads).
fn value(id: usize, seq: u64) -> String {
    let pad_len = if seq % 64 == 0 {
        16 * 1024
    } else {
        (id * 7 + seq as usize * 13) % 300
    };
    let pad = char::from(b'a' + (seq % 26) as u8);
    format!("c{id}:s{seq}:{}", pad.to_string().repeat(pad_len))
}

/// Parses `c{id}:s{seq}:...` back into (id, seq).
fn parse_value(value: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.splitn(3, ':');
    let id = parts.next()?.strip_prefix('c')?.parse().ok()?;
    let seq = parts.next()?.strip_prefix('s')?.parse().ok()?;
    Some((id, seq))
}

/// The payload of a bulk-string reply; `Some(None)` for a null bulk.
fn bulk(reply: &[u8]) -> Option<Option<&[u8]>> {
    if reply == b"$-1\r\n" {
        return Some(None);
    }
    let rest = reply.strip_prefix(b"$")?;
    let cr = rest.iter().position(|&b| b == b'\r')?;
    let len: usize = std::str::from_utf8(&rest[..cr]).ok()?.parse().ok()?;
    let payload = rest.get(cr + 2..cr + 2 + len)?;
    Some(Some(payload))
}

fn integer(reply: &[u8]) -> Option<u64> {
    std::str::from_utf8(reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
        .ok()?
        .parse()
        .ok()
}

/// An error reply: `Some(true)` if the request may have run, `Some(false)` if it surely did
/// not. Besides redmux's own, Redis's `-BUSY` (a script is running: the command was refused)
/// and `-EXECABORT` (the transaction was discarded) say the request did not run.
fn redmux_error(reply: &[u8]) -> Option<bool> {
    if reply == b"-ERR redmux: upstream unavailable\r\n"
        || reply.starts_with(b"-BUSY ")
        || reply.starts_with(b"-EXECABORT ")
    {
        Some(false)
    } else if reply.starts_with(b"-ERR redmux: upstream ") {
        Some(true)
    } else {
        None
    }
}

fn show(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(&reply[..reply.len().min(80)]);
    format!("{text:?}")
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Set,
    Get,
    Incr,
    /// MULTI, in a mixed round.
    Multi,
    /// The INCRBY between MULTI and EXEC: `+QUEUED`, or run at once if MULTI failed.
    QueuedIncr,
    Exec,
    /// RPUSH b:{id}, then the BLPOP that must find what it pushed.
    Push,
    Blpop,
}

/// How a checked client sends its rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    OneAtATime,
    Pipelined,
    /// Pipelined rounds through a transaction and a blocking command.
    Mixed,
}

/// How a request turned out.
enum Outcome {
    Ok,
    /// A redmux error; `true` if the request may have run.
    Error(bool),
    Misroute(String),
    Twice(String),
}

/// A socket with a reply scanner; requests and replies are handled in order.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    scanner: ReplyScanner,
}

enum Read {
    Reply(Vec<u8>),
    Closed,
    TimedOut,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(32 * 1024),
            scanner: ReplyScanner::new(),
        })
    }

    async fn read(&mut self, deadline: Instant) -> Read {
        loop {
            match self.scanner.next_reply(&self.buf) {
                Ok(Some(end)) => {
                    self.scanner.consumed(end);
                    return Read::Reply(self.buf.split_to(end).to_vec());
                }
                Ok(None) => {}
                // Not RESP at all: nothing after it can be trusted either.
                Err(_) => return Read::Closed,
            }
            let read =
                tokio::time::timeout_at(deadline.into(), self.stream.read_buf(&mut self.buf));
            match read.await {
                Err(_) => return Read::TimedOut,
                Ok(Ok(0) | Err(_)) => return Read::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// One checked client and what it knows about its keys.
struct Client {
    id: usize,
    addr: SocketAddr,
    reply_timeout: Duration,
    shared: Arc<Shared>,
    conn: Option<Conn>,
    mode: Mode,
    seq: u64,
    /// (seq, data epoch when sent) of the last SET acknowledged `+OK`.
    last_ok_set: Option<(u64, u64)>,
    /// SETs that failed in a way that may have run, possibly late.
    uncertain_sets: BTreeSet<u64>,
    /// Whether this round's SET may have been applied (ok, or may have run).
    round_set_may_have_run: bool,
    /// (k, data epoch when sent) of the last INCRBY acknowledged: the counter was at k steps.
    last_incr: Option<(u64, u64)>,
    /// Mixed rounds: MULTI was answered `+OK`, and this round's INCRBY `+QUEUED`.
    multi_open: bool,
    incr_queued: bool,
    /// This round's INCRBY has been accounted for (acknowledged, or counted as uncertain).
    incr_settled: bool,
    /// This round's RPUSH was acknowledged: the BLPOP after it must find an element.
    pushed: bool,
    report: ClientReport,
}

impl Client {
    fn new(
        id: usize,
        addr: SocketAddr,
        reply_timeout: Duration,
        mode: Mode,
        shared: Arc<Shared>,
    ) -> Client {
        Client {
            id,
            addr,
            reply_timeout,
            shared,
            conn: None,
            mode,
            seq: 0,
            last_ok_set: None,
            uncertain_sets: BTreeSet::new(),
            round_set_may_have_run: false,
            last_incr: None,
            multi_open: false,
            incr_queued: false,
            incr_settled: false,
            pushed: false,
            report: ClientReport {
                id,
                incr_sent: 0,
                incr_ok_instance: 0,
                incr_ok_total: 0,
                incr_uncertain: 0,
                incr_excess: 0,
            },
        }
    }

    async fn run(mut self) -> ClientReport {
        while !self.shared.stop.load(Ordering::Relaxed) {
            if self.conn.is_none() {
                match tokio::time::timeout(self.reply_timeout, Conn::connect(self.addr)).await {
                    Ok(Ok(conn)) => self.conn = Some(conn),
                    _ => {
                        let problem = format!("client {}: cannot connect to redmux", self.id);
                        self.shared.problem(&self.shared.hang, problem);
                        // A client pausing before it reconnects, as real ones do.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            self.round().await;
        }
        self.report
    }

    /// One SET, GET, INCRBY round, pipelined or one at a time.
    async fn round(&mut self) {
        self.seq += 1;
        let seq = self.seq;
        let value = value(self.id, seq);
        let step = step(self.id).to_string();
        let set = encode_command([&b"SET"[..], value_key(self.id).as_bytes(), value.as_bytes()]);
        let get = encode_command([&b"GET"[..], value_key(self.id).as_bytes()]);
        let incr = encode_command([
            &b"INCRBY"[..],
            counter_key(self.id).as_bytes(),
            step.as_bytes(),
        ]);
        let requests: Vec<(Kind, bytes::Bytes)> = match self.mode {
            Mode::Mixed => {
                let list = list_key(self.id);
                vec![
                    (Kind::Set, set),
                    (Kind::Multi, encode_command([&b"MULTI"[..]])),
                    (Kind::QueuedIncr, incr),
                    (Kind::Exec, encode_command([&b"EXEC"[..]])),
                    (Kind::Get, get),
                    (
                        Kind::Push,
                        encode_command([&b"RPUSH"[..], list.as_bytes(), value.as_bytes()]),
                    ),
                    (
                        Kind::Blpop,
                        encode_command([&b"BLPOP"[..], list.as_bytes(), b"0.2"]),
                    ),
                ]
            }
            _ => vec![(Kind::Set, set), (Kind::Get, get), (Kind::Incr, incr)],
        };
        self.round_set_may_have_run = false;
        self.multi_open = false;
        self.incr_queued = false;
        self.incr_settled = false;
        self.pushed = false;
        if self.mode != Mode::OneAtATime {
            let batch: Vec<u8> = requests.iter().flat_map(|(_, r)| r.to_vec()).collect();
            let epoch = self.shared.data_epoch.load(Ordering::SeqCst);
            let sent_at = Instant::now();
            for (kind, _) in &requests {
                self.sent(*kind);
            }
            // redmux starts a request once those before it on another path are answered
            // (issue 12's barrier), so each request's bound runs from the reply before it.
            let mut turn = sent_at;
            let written = self.conn_mut().stream.write_all(&batch).await.is_ok();
            for (i, (kind, _)) in requests.iter().enumerate() {
                let deadline = turn + self.reply_timeout;
                let read = if written {
                    self.conn_mut().read(deadline).await
                } else {
                    Read::Closed
                };
                turn = Instant::now();
                if !self.handle(*kind, read, sent_at, epoch) {
                    // No reply: the rest of the pipeline got none either.
                    for (kind, _) in &requests[i + 1..] {
                        self.no_reply(*kind, "after an earlier request of its pipeline");
                    }
                    return;
                }
            }
        } else {
            for (kind, request) in &requests {
                let epoch = self.shared.data_epoch.load(Ordering::SeqCst);
                let sent_at = Instant::now();
                let deadline = sent_at + self.reply_timeout;
                self.sent(*kind);
                let read = match self.conn_mut().stream.write_all(request).await {
                    Ok(()) => self.conn_mut().read(deadline).await,
                    Err(_) => Read::Closed,
                };
                if !self.handle(*kind, read, sent_at, epoch) {
                    return;
                }
            }
        }
    }

    fn conn_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connected")
    }

    fn sent(&mut self, kind: Kind) {
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        if let Kind::Incr | Kind::QueuedIncr = kind {
            self.report.incr_sent += 1;
        }
    }

    /// Judges one read; false if there was no reply (the connection is then dropped).
    fn handle(&mut self, kind: Kind, read: Read, sent_at: Instant, epoch: u64) -> bool {
        let reply = match read {
            Read::Reply(reply) => reply,
            Read::Closed => {
                self.no_reply(kind, "the connection closed instead");
                return false;
            }
            Read::TimedOut => {
                self.no_reply(kind, "timed out");
                return false;
            }
        };
        let latency = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared
            .max_latency_us
            .fetch_max(latency, Ordering::Relaxed);
        let outcome = match kind {
            Kind::Set => self.judge_set(&reply, epoch),
            Kind::Get => self.judge_get(&reply),
            Kind::Incr => self.judge_incr(&reply, epoch),
            Kind::Multi => self.judge_multi(&reply),
            Kind::QueuedIncr => self.judge_queued_incr(&reply, epoch),
            Kind::Exec => self.judge_exec(&reply, epoch),
            Kind::Push => self.judge_push(&reply),
            Kind::Blpop => self.judge_blpop(&reply),
        };
        let shared = &self.shared;
        match outcome {
            Outcome::Ok => {
                shared.ok.fetch_add(1, Ordering::Relaxed);
                shared.last_ok_sent_us[self.id].store(shared.micros(sent_at), Ordering::Relaxed);
            }
            Outcome::Error(_) => {
                shared.error.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Misroute(why) => shared.problem(
                &shared.misroute,
                format!(
                    "client {} round {} {kind:?}: misroute: {why}",
                    self.id, self.seq
                ),
            ),
            Outcome::Twice(why) => shared.problem(
                &shared.twice,
                format!("client {} round {} {kind:?}: {why}", self.id, self.seq),
            ),
        }
        true
    }

    /// A request that got no reply: a hang. It may have run.
    fn no_reply(&mut self, kind: Kind, why: &str) {
        self.conn = None;
        match kind {
            Kind::Set => {
                self.uncertain_sets.insert(self.seq);
                self.round_set_may_have_run = true;
            }
            Kind::Incr => self.report.incr_uncertain += 1,
            Kind::QueuedIncr | Kind::Exec if !self.incr_settled => {
                self.incr_settled = true;
                self.report.incr_uncertain += 1;
            }
            _ => {}
        }
        let shared = &self.shared;
        shared.problem(
            &shared.hang,
            format!(
                "client {} round {} {kind:?}: no reply: {why}",
                self.id, self.seq
            ),
        );
    }

    fn judge_set(&mut self, reply: &[u8], epoch: u64) -> Outcome {
        if reply == b"+OK\r\n" {
            self.last_ok_set = Some((self.seq, epoch));
            self.round_set_may_have_run = true;
            return Outcome::Ok;
        }
        match redmux_error(reply) {
            Some(may_have_run) => {
                if may_have_run {
                    self.uncertain_sets.insert(self.seq);
                    self.round_set_may_have_run = true;
                }
                Outcome::Error(may_have_run)
            }
            None => Outcome::Misroute(format!("SET answered {}", show(reply))),
        }
    }

    fn judge_get(&mut self, reply: &[u8]) -> Outcome {
        if let Some(may_have_run) = redmux_error(reply) {
            return Outcome::Error(may_have_run);
        }
        let epoch_now = self.shared.data_epoch.load(Ordering::SeqCst);
        match bulk(reply) {
            // Nothing stored: right only if no SET was acknowledged, or Redis lost its data
            // after the last acknowledged one was sent.
            Some(None) => match self.last_ok_set {
                Some((seq, sent_epoch)) if sent_epoch == epoch_now => Outcome::Misroute(format!(
                    "GET found nothing after SET of round {seq} was acknowledged"
                )),
                _ => Outcome::Ok,
            },
            Some(Some(payload)) => match parse_value(payload) {
                Some((id, seq)) if payload == value(id, seq).as_bytes() => {
                    let this_round = seq == self.seq && self.round_set_may_have_run;
                    let last_acknowledged = self.last_ok_set.is_some_and(|(ok, _)| ok == seq);
                    // A SET that failed may still have run, late: even after a newer SET.
                    let uncertain = self.uncertain_sets.contains(&seq);
                    if id != self.id {
                        Outcome::Misroute(format!("got client {id}'s value (round {seq})"))
                    } else if this_round || last_acknowledged || uncertain {
                        Outcome::Ok
                    } else {
                        Outcome::Misroute(format!(
                            "got its own value of round {seq}; last acknowledged SET: {:?}",
                            self.last_ok_set.map(|(seq, _)| seq)
                        ))
                    }
                }
                _ => Outcome::Misroute(format!("GET answered {}", show(reply))),
            },
            None => Outcome::Misroute(format!("GET answered {}", show(reply))),
        }
    }

    fn judge_multi(&mut self, reply: &[u8]) -> Outcome {
        if reply == b"+OK\r\n" {
            self.multi_open = true;
            return Outcome::Ok;
        }
        match redmux_error(reply) {
            Some(may_have_run) => Outcome::Error(may_have_run),
            None => Outcome::Misroute(format!("MULTI answered {}", show(reply))),
        }
    }

    /// The INCRBY inside the transaction: queued if MULTI opened it, run at once if MULTI
    /// failed before a connection was pinned.
    fn judge_queued_incr(&mut self, reply: &[u8], epoch: u64) -> Outcome {
        if reply == b"+QUEUED\r\n" && self.multi_open {
            self.incr_queued = true;
            return Outcome::Ok;
        }
        self.incr_settled = true;
        self.judge_incr(reply, epoch)
    }

    fn judge_exec(&mut self, reply: &[u8], epoch: u64) -> Outcome {
        if !self.incr_queued {
            // Nothing queued: MULTI failed (then EXEC has no transaction), or the INCRBY did.
            return match reply {
                b"-ERR EXEC without MULTI\r\n" | b"*0\r\n" => Outcome::Ok,
                _ => match redmux_error(reply) {
                    Some(_) => Outcome::Error(false),
                    None => Outcome::Misroute(format!("EXEC answered {}", show(reply))),
                },
            };
        }
        self.incr_settled = true;
        match reply.strip_prefix(b"*1\r\n") {
            Some(inner) => self.judge_incr(inner, epoch),
            None => self.judge_incr(reply, epoch),
        }
    }

    fn judge_push(&mut self, reply: &[u8]) -> Outcome {
        if integer(reply).is_some_and(|n| n >= 1) {
            self.pushed = true;
            return Outcome::Ok;
        }
        match redmux_error(reply) {
            Some(may_have_run) => Outcome::Error(may_have_run),
            None => Outcome::Misroute(format!("RPUSH answered {}", show(reply))),
        }
    }

    /// The BLPOP after this round's RPUSH: it finds an element of this client's (this round's
    /// or one left by an earlier round whose BLPOP failed), and none only if the RPUSH was not
    /// acknowledged.
    fn judge_blpop(&mut self, reply: &[u8]) -> Outcome {
        if let Some(may_have_run) = redmux_error(reply) {
            return Outcome::Error(may_have_run);
        }
        if reply == b"*-1\r\n" {
            return if self.pushed {
                Outcome::Misroute("BLPOP found nothing after RPUSH was acknowledged".into())
            } else {
                Outcome::Ok
            };
        }
        let list = list_key(self.id);
        let Some(rest) =
            reply.strip_prefix(format!("*2\r\n${}\r\n{list}\r\n", list.len()).as_bytes())
        else {
            return Outcome::Misroute(format!("BLPOP answered {}", show(reply)));
        };
        match bulk(rest).flatten().and_then(parse_value) {
            Some((id, seq)) if id == self.id && seq <= self.seq => Outcome::Ok,
            _ => Outcome::Misroute(format!("BLPOP answered {}", show(reply))),
        }
    }

    /// `sent_epoch`: the data epoch when this request was sent.
    fn judge_incr(&mut self, reply: &[u8], sent_epoch: u64) -> Outcome {
        if let Some(may_have_run) = redmux_error(reply) {
            if may_have_run {
                self.report.incr_uncertain += 1;
            }
            return Outcome::Error(may_have_run);
        }
        let Some(value) = integer(reply) else {
            return Outcome::Misroute(format!("INCRBY answered {}", show(reply)));
        };
        let step = step(self.id);
        if value % step != 0 {
            return Outcome::Misroute(format!("INCRBY gave {value}, not this client's counter"));
        }
        let k = value / step;
        let epoch_now = self.shared.data_epoch.load(Ordering::SeqCst);
        if let Some((last, last_sent_epoch)) = self.last_incr {
            if k <= last {
                // Only a loss after the previous INCRBY was sent can restart the counter.
                if last_sent_epoch == epoch_now {
                    return Outcome::Misroute(format!(
                        "counter went from {last} back to {k} steps: an older reply"
                    ));
                }
                // Redis lost its data: the counter restarted.
                self.report.incr_ok_instance = 0;
            }
        }
        self.last_incr = Some((k, sent_epoch));
        self.report.incr_ok_instance += 1;
        self.report.incr_ok_total += 1;
        let explained =
            self.report.incr_ok_instance + self.report.incr_uncertain + self.report.incr_excess;
        if k > explained {
            // Counted once: later replies are judged against the counter as it now is.
            self.report.incr_excess += k - explained;
            return Outcome::Twice(format!(
                "counter at {k} steps, but only {} INCRBYs acknowledged and {} may have run: a \
                 request ran twice",
                self.report.incr_ok_instance, self.report.incr_uncertain
            ));
        }
        Outcome::Ok
    }
}

/// An unchecked client that keeps connecting, pipelining INCRs and leaving without reading the
/// replies. Returns (id, INCRs sent).
async fn leaver(id: usize, addr: SocketAddr, shared: Arc<Shared>) -> (usize, u64) {
    let request = encode_command([&b"INCR"[..], format!("leaver:{id}").as_bytes()]);
    let batch = request.repeat(50);
    let mut sent = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            if stream.write_all(&batch).await.is_ok() {
                sent += 50;
            }
        }
        // A client that comes back now and then; this paces it, it synchronises nothing.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (id, sent)
}

/// A client that sends command names holding a NUL byte, which Redis might take for the
/// command before the NUL (MULTI, SELECT, CLIENT REPLY OFF, HELLO 3, MONITOR, EXEC): each must
/// be refused with the unknown-command error, whatever the upstream is going through.
async fn attacker(id: usize, addr: SocketAddr, reply_timeout: Duration, shared: Arc<Shared>) {
    let attacks: [(&str, &[&str]); 6] = [
        ("multi", &[]),
        ("select", &["7"]),
        ("client", &["REPLY", "OFF"]),
        ("hello", &["3"]),
        ("monitor", &[]),
        ("exec", &[]),
    ];
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = Conn::connect(addr).await else {
            // Pacing reconnects, as a real client does; it synchronises nothing.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !shared.stop.load(Ordering::Relaxed) {
            n += 1;
            let (name, args) = attacks[(n % 6) as usize];
            let named = format!("{name}\0{id}x{n}");
            let request = encode_command(
                std::iter::once(named.as_bytes()).chain(args.iter().map(|a| a.as_bytes())),
            );
            let echoed: String = args.iter().map(|a| format!("'{a}' ")).collect();
            let expected =
                format!("-ERR unknown command '{name}', with args beginning with: {echoed}\r\n");
            if conn.stream.write_all(&request).await.is_err() {
                break;
            }
            // Counted with the checked requests: each has exactly one outcome.
            shared.sent.fetch_add(1, Ordering::Relaxed);
            match conn.read(Instant::now() + reply_timeout).await {
                Read::Reply(reply) if reply == expected.as_bytes() => {
                    shared.ok.fetch_add(1, Ordering::Relaxed);
                }
                Read::Reply(reply) => {
                    shared.problem(
                        &shared.misroute,
                        format!("attacker {id}: {named:?} answered {}", show(&reply)),
                    );
                    break;
                }
                Read::Closed | Read::TimedOut => {
                    shared.problem(&shared.hang, format!("attacker {id}: {named:?}: no reply"));
                    break;
                }
            }
        }
    }
}
