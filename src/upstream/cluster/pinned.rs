//! A pinned connection in front of a cluster: one client's own connection, for a transaction
//! (MULTI, WATCH) or a blocking command, to the master of the first key it is given.
//!
//! The client takes its pinned connection before it knows which key comes (MULTI comes first),
//! so the node is chosen late: MULTI, and keyless commands queued after it, are answered here
//! (`+OK`, `+QUEUED`) and held, and go to the node with the first keyed request, their replies
//! dropped. EXEC or DISCARD with no key at all goes to any master. A command with keys given
//! a wrong argument count (`SET k`) gets Redis's own error here, as Redis refuses it while
//! queuing, and EXEC its `-EXECABORT`. (An unknown command is answered `+QUEUED` here, as
//! redmux's table knows only the commands that have keys; EXEC is refused all the same, by
//! the node.) WATCH in MULTI gets Redis's `-ERR WATCH inside MULTI is not allowed` here,
//! whatever node its keys are on.
//!
//! Once MULTI or WATCH has gone to a node the connection stays there until EXEC, DISCARD,
//! UNWATCH or RESET. A command queued for another slot than the transaction's first key gets
//! `-CROSSSLOT` here and EXEC then gets `-EXECABORT` (a DISCARD goes to the node instead), as
//! the issue of a transaction across slots shows to a client of Redis Cluster. While watching,
//! a command for a slot another master owns gets `-MOVED` from the node, which the client sees
//! as `-CROSSSLOT`. A command whose own keys span slots (a BLPOP of two lists, say) gets
//! `-CROSSSLOT` here without reaching a node, in a transaction or not. A command that redmux
//! runs on every master (FLUSHALL, DBSIZE, KEYS, SCAN, SCRIPT LOAD...) is refused here in a
//! transaction or while watching, and a transaction it was queued in is aborted: on the one
//! node the transaction runs on it would cover a part of the keyspace, and say nothing of it.
//! Outside those states the connection moves to whichever master owns the next request's
//! slot, and a `-MOVED` (the node did not run the command) is followed once.

use std::{collections::VecDeque, sync::Arc};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{
    router::{
        combine::{requests, split_replies},
        Spawner,
    },
    Cluster,
};
use crate::{
    cluster::{
        keys::{self, Scope, SlotOf},
        plan::{CLUSTERDOWN, CROSSSLOT},
        redirect::{followable, redirect, scripted, Redirect},
    },
    resp::{encode, encode_command, Args},
    upstream::{Batch, Budget, Replies, Reply, ReplyTo, UpstreamError},
};

/// Most bytes of requests held before a transaction's first key (see [`Pinned::held`]).
const HELD_MAX: usize = 64 * 1024;

/// EXEC's answer when a command queued before it was refused.
const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";

/// Starts a pinned cluster connection on `rx`; `spawner` starts the actor of the node it
/// settles on.
pub(in crate::upstream) fn spawn(
    cluster: Arc<Cluster>,
    spawner: Spawner,
    rx: mpsc::Receiver<Batch>,
) {
    let pinned = Pinned {
        cluster,
        spawner,
        node: None,
        held: Vec::new(),
        held_len: 0,
        multi: false,
        sticky: false,
        tx_slot: None,
        aborted: false,
        inflight: VecDeque::new(),
    };
    tokio::spawn(
        pinned
            .run(rx)
            .instrument(tracing::info_span!("cluster_pinned")),
    );
}

/// The node the connection is on.
struct Node {
    host: String,
    port: u16,
    sender: mpsc::Sender<Batch>,
}

/// Where each reply of a client's batch comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Answered here.
    Local(Bytes),
    /// The node's reply; `-MOVED` and `-ASK` become `-CROSSSLOT` when `stuck` (the connection
    /// could not follow them).
    Node { stuck: bool },
    /// A held request's reply, answered here already: dropped.
    Drop,
    /// The node's reply dropped, and this given instead.
    Replace(Bytes),
}

/// A batch sent to the node, waiting for its replies.
struct InFlight {
    rx: oneshot::Receiver<Reply>,
    pieces: Vec<Piece>,
    reply: ReplyTo,
    /// The client's output budget, charged with the replies it is given.
    budget: Option<Arc<Budget>>,
    /// The client's request, to send again after a `-MOVED` (only when it is one request
    /// outside a transaction, never followed yet).
    resend: Option<Resend>,
}

/// What is needed to send a request again.
struct Resend {
    frames: Bytes,
    timeout: Option<std::time::Duration>,
}

struct Pinned {
    cluster: Arc<Cluster>,
    spawner: Spawner,
    node: Option<Node>,
    /// Requests answered here and not yet sent: MULTI and what was queued before the first
    /// key. At most [`HELD_MAX`] bytes: a transaction that queues more keyless commands goes
    /// to any master then, as if it had ended, rather than growing redmux's memory with what
    /// the client sends.
    held: Vec<Bytes>,
    /// The bytes in `held`.
    held_len: usize,
    /// Between MULTI and EXEC or DISCARD.
    multi: bool,
    /// MULTI or WATCH went to the node: the connection stays on it.
    sticky: bool,
    /// The slot of the transaction's first key.
    tx_slot: Option<u16>,
    /// A command of the transaction was refused here: EXEC is too.
    aborted: bool,
    inflight: VecDeque<InFlight>,
}

/// What a request does to the connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Multi,
    Watch,
    Exec,
    Discard,
    Unwatch,
    Reset,
    Other,
}

/// Redis's error for a command given an argument count its arity does not allow
/// (`processCommand`), `name` being its full name.
fn arity_error(name: &[u8]) -> Bytes {
    encode::error_bytes(&[b"ERR wrong number of arguments for '", name, b"' command"].concat())
}

/// The error for a command run on every master, given in a transaction (or while watching):
/// the transaction runs on one node.
fn every_master_refused(request: &[u8]) -> Bytes {
    let mut args = Args::new(request);
    let mut name = args.next().unwrap_or_default().to_ascii_lowercase();
    if let (b"script" | b"function", Some(sub)) = (name.as_slice(), args.next()) {
        name.push(b' ');
        name.extend(sub.to_ascii_lowercase());
    }
    let runs = b"' runs on every master of the cluster, and a transaction (MULTI, WATCH) on one";
    encode::error_bytes(&[&b"ERR redmux: '"[..], &name, runs].concat())
}

fn verb(request: &[u8]) -> Verb {
    let name = Args::new(request).next().unwrap_or_default();
    let is = |word: &[u8]| name.eq_ignore_ascii_case(word);
    if is(b"multi") {
        Verb::Multi
    } else if is(b"watch") {
        Verb::Watch
    } else if is(b"exec") {
        Verb::Exec
    } else if is(b"discard") {
        Verb::Discard
    } else if is(b"unwatch") {
        Verb::Unwatch
    } else if is(b"reset") {
        Verb::Reset
    } else {
        Verb::Other
    }
}

impl Pinned {
    async fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        loop {
            tokio::select! {
                request = rx.recv() => match request {
                    Some(request) => self.accept(request).await,
                    None => break,
                },
                reply = front(&mut self.inflight), if !self.inflight.is_empty() => {
                    self.answered(reply).await;
                }
            }
        }
        // The client is gone: what is in flight is answered to nobody; dropping the node's
        // sender closes its connection once it has.
    }

    /// The master that owns `slot`.
    fn owner(&self, slot: u16) -> Option<(String, u16)> {
        let topology = self.cluster.current()?;
        topology.master_addr(topology.map.owner(slot)?)
    }

    /// Any master (the first of the map), for requests with no key.
    fn any(&self) -> Option<(String, u16)> {
        self.cluster.current()?.master_addr(0)
    }

    /// The connection on `host:port`: where it is, or moved there (a new connection).
    fn settle(&mut self, (host, port): (String, u16)) -> bool {
        if self
            .node
            .as_ref()
            .is_some_and(|node| node.host == host && node.port == port)
        {
            return true;
        }
        match (self.spawner)(&host, port, None) {
            Some(sender) => {
                self.node = Some(Node { host, port, sender });
                true
            }
            None => false,
        }
    }

    async fn accept(&mut self, request: Batch) {
        let Some(bounds) = requests(&request.frames, request.count) else {
            request
                .reply
                .deliver(Err(UpstreamError::ConnectionLost), None);
            return;
        };
        let mut pieces = Vec::with_capacity(bounds.len());
        let mut wire = BytesMut::new();
        let mut down = false;
        for &(from, to) in &bounds {
            let frame = request.frames.slice(from..to);
            let verb = verb(&frame);
            if verb == Verb::Reset && self.node.is_none() {
                self.held.clear();
                self.held_len = 0;
                self.multi = false;
                self.tx_slot = None;
                self.aborted = false;
                pieces.push(Piece::Local(Bytes::from_static(b"+RESET\r\n")));
                continue;
            }
            let (scope, slot_of) = keys::scope_and_slot(&frame);
            // Asked only where it matters: a connection that is not in a transaction (a
            // blocking command's) leaves arity to Redis.
            let wrong_arity = (self.multi || self.sticky)
                .then(|| keys::wrong_arity(&frame))
                .flatten();
            if self.multi && verb == Verb::Watch && wrong_arity.is_none() {
                // Redis's answer (`watchCommand`), whatever the keys: the transaction goes on.
                pieces.push(Piece::Local(encode::error(
                    "WATCH inside MULTI is not allowed",
                )));
                continue;
            }
            let every_master = matches!(scope, Scope::AllMasters(_) | Scope::Scan);
            if (self.multi || self.sticky) && every_master && wrong_arity.is_none() {
                self.aborted |= self.multi;
                pieces.push(Piece::Local(every_master_refused(&frame)));
                continue;
            }
            if slot_of == SlotOf::Cross {
                // Refused here, as the node would refuse it (and flag a transaction, which
                // makes EXEC fail): a blocking command across slots never waits on a node.
                self.aborted |= self.multi;
                pieces.push(Piece::Local(Bytes::from_static(CROSSSLOT)));
                continue;
            }
            // Where the request goes, when that is still open.
            if !self.sticky {
                let target = match slot_of {
                    SlotOf::One(slot) => Some(self.owner(slot)),
                    _ => None,
                };
                let may_move = self.inflight.is_empty() && wire.is_empty();
                match target {
                    Some(Some(addr)) if self.node.is_none() || may_move => {
                        down |= !self.settle(addr);
                    }
                    Some(None) => down = true,
                    Some(Some(_)) => {}
                    // No key: MULTI, and what is queued after it, wait for one.
                    None if self.node.is_none() && (verb == Verb::Multi || self.multi) => {
                        if let Some(name) = wrong_arity {
                            // Refused as Redis refuses it while queuing, which aborts the
                            // transaction; it still waits for its first key.
                            self.aborted = true;
                            pieces.push(Piece::Local(arity_error(name)));
                            continue;
                        }
                        let full = self.held_len + frame.len() > HELD_MAX;
                        if matches!(verb, Verb::Exec | Verb::Discard) || full {
                            match self.any() {
                                Some(addr) => down |= !self.settle(addr),
                                None => down = true,
                            }
                        } else {
                            let answer: &'static [u8] = match verb {
                                Verb::Multi if !self.multi => b"+OK\r\n",
                                Verb::Multi => b"-ERR MULTI calls can not be nested\r\n",
                                _ => b"+QUEUED\r\n",
                            };
                            if !(verb == Verb::Multi && self.multi) {
                                self.held_len += frame.len();
                                self.held.push(frame);
                            }
                            self.multi = true;
                            pieces.push(Piece::Local(Bytes::from_static(answer)));
                            continue;
                        }
                    }
                    None if self.node.is_none() => match self.any() {
                        Some(addr) => down |= !self.settle(addr),
                        None => down = true,
                    },
                    None => {}
                }
            }
            if down {
                break;
            }
            if !self.held.is_empty() {
                // MULTI went first: the connection stays on this node now.
                self.sticky = true;
                self.held_len = 0;
                for held in self.held.drain(..) {
                    wire.extend_from_slice(&held);
                    pieces.push(Piece::Drop);
                }
            }
            let stuck = self.sticky || self.multi;
            let (mut frame, mut piece) = (frame, Piece::Node { stuck });
            if self.multi {
                match verb {
                    // Queued for another slot than the transaction's first key: refused, and
                    // EXEC will be too (Redis Cluster queues it, then refuses EXEC, when the
                    // slots are on one node; this is the same whichever node owns them).
                    Verb::Other => match (self.tx_slot, slot_of) {
                        (None, SlotOf::One(slot)) => self.tx_slot = Some(slot),
                        (Some(first), SlotOf::One(slot)) if slot != first => {
                            self.aborted = true;
                            pieces.push(Piece::Local(Bytes::from_static(CROSSSLOT)));
                            continue;
                        }
                        _ => {}
                    },
                    Verb::Exec if self.aborted => {
                        frame = encode_command([&b"DISCARD"[..]]);
                        piece = Piece::Replace(Bytes::from_static(EXECABORT));
                    }
                    _ => {}
                }
            }
            match verb {
                Verb::Multi => {
                    self.multi = true;
                    self.sticky = true;
                }
                Verb::Watch => self.sticky = true,
                // Without MULTI Redis answers an error and goes on watching.
                Verb::Exec | Verb::Discard if !self.multi => {}
                Verb::Exec | Verb::Discard | Verb::Reset => {
                    self.multi = false;
                    self.sticky = false;
                    self.tx_slot = None;
                    self.aborted = false;
                }
                Verb::Unwatch if !self.multi => self.sticky = false,
                _ => {}
            }
            wire.extend_from_slice(&frame);
            pieces.push(piece);
        }
        if down {
            self.cluster.request_refresh();
            let count = u32::try_from(bounds.len()).unwrap_or(u32::MAX);
            let error = Bytes::from_static(CLUSTERDOWN);
            let mut all = BytesMut::new();
            for _ in 0..count {
                all.extend_from_slice(&error);
            }
            let errors = if count >= 64 {
                u64::MAX
            } else {
                (1u64 << count) - 1
            };
            let replies = Replies {
                bytes: all.freeze(),
                errors,
            };
            return answer(request.reply, request.budget.as_ref(), replies);
        }
        let resend = (bounds.len() == 1
            && pieces == [Piece::Node { stuck: false }]
            && !self.sticky)
            .then(|| Resend {
                frames: request.frames.clone(),
                timeout: request.timeout,
            });
        self.send(
            wire.freeze(),
            pieces,
            request.reply,
            request.queued_at,
            request.timeout,
            request.budget,
            resend,
        )
        .await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        wire: Bytes,
        pieces: Vec<Piece>,
        reply: ReplyTo,
        queued_at: tokio::time::Instant,
        timeout: Option<std::time::Duration>,
        budget: Option<Arc<crate::upstream::Budget>>,
        resend: Option<Resend>,
    ) {
        let count = pieces
            .iter()
            .filter(|p| !matches!(p, Piece::Local(_)))
            .count();
        if count == 0 {
            return answer(
                reply,
                budget.as_ref(),
                assemble(&pieces, &Bytes::new(), &[]),
            );
        }
        let Some(node) = &self.node else {
            reply.deliver(Err(UpstreamError::Unavailable), None);
            return;
        };
        let (tx, rx) = oneshot::channel();
        let request = Batch {
            frames: wire,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            queued_at,
            timeout,
            reply: tx.into(),
            budget: None,
        };
        if node.sender.send(request).await.is_err() {
            self.cluster.request_refresh();
            reply.deliver(Err(UpstreamError::ConnectionLost), None);
            return;
        }
        self.inflight.push_back(InFlight {
            rx,
            pieces,
            reply,
            budget,
            resend,
        });
    }

    async fn answered(&mut self, reply: Reply) {
        let Some(done) = self.inflight.pop_front() else {
            return;
        };
        let replies = match reply {
            Ok(replies) => replies,
            Err(error) => {
                self.cluster.refresh_if_lost(&error);
                done.reply.deliver(Err(error), None);
                return;
            }
        };
        // Outside a transaction, a single request the node did not run follows MOVED once
        // (a blocking command: one that cannot write its own error text, but the rule is the
        // router's).
        if let (Some(resend), true) = (&done.resend, self.inflight.is_empty()) {
            let from = self
                .node
                .as_ref()
                .map_or(("", 0), |n| (n.host.as_str(), n.port));
            let cluster = &self.cluster;
            let moved = redirect(&replies.bytes)
                .map(|r| r.or_host(from.0))
                .filter(|r| {
                    followable(&resend.frames, r, from, true, |host, port| {
                        cluster.current().is_some_and(|t| t.knows(host, port))
                    })
                });
            if let Some(Redirect::Moved { host, port, .. }) = moved {
                if !scripted(&resend.frames) {
                    self.cluster.request_refresh();
                }
                if !self.sticky && self.settle((host, port)) {
                    let (frames, timeout) = (resend.frames.clone(), resend.timeout);
                    let now = tokio::time::Instant::now();
                    return self
                        .send(
                            frames,
                            done.pieces,
                            done.reply,
                            now,
                            timeout,
                            done.budget,
                            None,
                        )
                        .await;
                }
            }
        }
        let remote = done
            .pieces
            .iter()
            .filter(|p| !matches!(p, Piece::Local(_)))
            .count();
        let Some(bounds) = split_replies(&replies.bytes, remote) else {
            done.reply.deliver(Err(UpstreamError::ConnectionLost), None);
            return;
        };
        let replies = assemble(&done.pieces, &replies.bytes, &bounds);
        answer(done.reply, done.budget.as_ref(), replies);
    }
}

/// Gives the client `replies`, charged to its output budget.
fn answer(reply: ReplyTo, budget: Option<&Arc<Budget>>, replies: Replies) {
    reply.deliver(Ok(replies), budget.map(|b| &**b));
}

/// The client's replies: local ones, and the node's (`bounds` in `bytes`), in order.
fn assemble(pieces: &[Piece], bytes: &Bytes, bounds: &[(usize, usize)]) -> Replies {
    let mut out = BytesMut::with_capacity(bytes.len() + 16);
    let mut errors = 0u64;
    let mut next = bounds.iter();
    let mut at = 0u32;
    for piece in pieces {
        let reply: Bytes = match piece {
            Piece::Local(local) => local.clone(),
            Piece::Drop => {
                next.next();
                continue;
            }
            Piece::Replace(instead) => {
                next.next();
                instead.clone()
            }
            Piece::Node { stuck } => {
                let Some(&(from, to)) = next.next() else {
                    break;
                };
                let reply = bytes.slice(from..to);
                match (*stuck, redirect(&reply)) {
                    (true, Some(Redirect::Moved { .. } | Redirect::Ask { .. })) => {
                        Bytes::from_static(CROSSSLOT)
                    }
                    _ => reply,
                }
            }
        };
        if matches!(reply.first(), Some(b'-' | b'!')) && at < 64 {
            errors |= 1 << at;
        }
        out.extend_from_slice(&reply);
        at += 1;
    }
    Replies {
        bytes: out.freeze(),
        errors,
    }
}

/// The reply of the oldest batch in flight (a node answers in order).
async fn front(inflight: &mut VecDeque<InFlight>) -> Reply {
    match inflight.front_mut() {
        Some(first) => (&mut first.rx)
            .await
            .unwrap_or(Err(UpstreamError::ConnectionLost)),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_assembled_in_order() {
        let pieces = [
            Piece::Local(Bytes::from_static(b"+OK\r\n")),
            Piece::Drop,
            Piece::Node { stuck: true },
            Piece::Node { stuck: true },
            Piece::Node { stuck: false },
        ];
        let bytes = Bytes::from_static(
            b"+OK\r\n+QUEUED\r\n-MOVED 1 127.0.0.1:7000\r\n-MOVED 1 127.0.0.1:7000\r\n",
        );
        let bounds = split_replies(&bytes, 4).unwrap();
        let out = assemble(&pieces, &bytes, &bounds);
        let expected = [
            &b"+OK\r\n"[..],
            b"+QUEUED\r\n",
            CROSSSLOT,
            b"-MOVED 1 127.0.0.1:7000\r\n",
        ]
        .concat();
        assert_eq!(&out.bytes[..], &expected[..]);
        assert_eq!(out.errors, 0b1100);
    }
}
