//! What a hub has to send upstream and what it has sent and not seen answered: commands go
//! out in a bounded window, so the hub always knows which request an answer belongs to.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::task::coop::consume_budget;

use super::{Key, NAMES_PER_COMMAND, REPLY_OVERHEAD, WINDOW};
use crate::{
    cluster::redirect::{redirect, Redirect},
    command::Namespace,
    resp::encode_command,
};

/// One client request's names (or a new connection's, or names sent again), on their way.
#[derive(Debug)]
pub(super) struct Queued {
    kind: Namespace,
    subscribe: bool,
    names: VecDeque<Bytes>,
    /// The waiter whose request this is, if any.
    origin: Option<u64>,
    /// A PING ([`super::HubRequest::Sync`]), of no names.
    ping: bool,
}

/// A command sent and not wholly answered.
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) kind: Namespace,
    pub(super) subscribe: bool,
    /// How many of its names Redis has still to answer.
    left: usize,
    /// The reply bytes it was counted for.
    owed: usize,
    /// Its names: a SUBSCRIBE's for when Redis refuses it, an UNSUBSCRIBE's to tell its
    /// answers from a `sunsubscribe` Redis sends unasked.
    pub(super) names: Vec<Bytes>,
    pub(super) origin: Option<u64>,
    /// The last command of its request.
    pub(super) last: bool,
    /// A shard hub's shard command: the one slot of its names.
    slot: Option<u16>,
    /// A PING, answered by one `pong` frame (or an error).
    ping: bool,
}

/// (Un)subscriptions on their way to Redis, in order, sent while Redis owes the hub less than
/// `WINDOW` bytes of replies to those sent before. Each request goes as its own commands
/// (`NAMES_PER_COMMAND` names at most each), so that a refusal is that request's alone.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    queue: VecDeque<Queued>,
    /// Each command sent and not wholly answered, oldest first.
    sent: VecDeque<Sent>,
    /// The reply bytes of `sent`.
    owed: usize,
}

impl Outbox {
    pub(super) fn push(
        &mut self,
        kind: Namespace,
        subscribe: bool,
        names: Vec<Bytes>,
        origin: Option<u64>,
    ) {
        if !names.is_empty() {
            self.queue.push_back(Queued {
                kind,
                subscribe,
                names: names.into(),
                origin,
                ping: false,
            });
        }
    }

    /// A PING for waiter `origin`, behind everything queued.
    pub(super) fn push_ping(&mut self, origin: u64) {
        self.queue.push_back(Queued {
            kind: Namespace::Channel,
            subscribe: false,
            names: VecDeque::new(),
            origin: Some(origin),
            ping: true,
        });
    }

    /// The commands the window allows now (the first one whatever its size), encoded. With
    /// `per_slot` (a shard hub's), a shard command holds one slot's names: Redis Cluster
    /// refuses names across slots with `-CROSSSLOT`.
    pub(super) async fn next_commands(&mut self, per_slot: bool) -> BytesMut {
        let mut out = BytesMut::new();
        while self.owed < WINDOW {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            if front.ping {
                let origin = front.origin;
                self.queue.pop_front();
                out.extend_from_slice(&encode_command([&b"PING"[..]]));
                self.sent.push_back(Sent {
                    kind: Namespace::Channel,
                    subscribe: false,
                    left: 1,
                    owed: REPLY_OVERHEAD,
                    names: Vec::new(),
                    origin,
                    last: true,
                    slot: None,
                    ping: true,
                });
                self.owed += REPLY_OVERHEAD;
                continue;
            }
            let mut names = Vec::new();
            let mut owed = 0;
            let mut slot = None;
            while let Some(name) = front.names.front() {
                if names.len() == NAMES_PER_COMMAND || self.owed + owed >= WINDOW {
                    break;
                }
                if per_slot && front.kind == Namespace::Shard {
                    let of = crate::cluster::slot::slot(name);
                    if *slot.get_or_insert(of) != of {
                        break;
                    }
                }
                owed += name.len() + REPLY_OVERHEAD;
                if let Some(name) = front.names.pop_front() {
                    names.push(name);
                }
            }
            let (kind, subscribe, origin) = (front.kind, front.subscribe, front.origin);
            let last = front.names.is_empty();
            if last {
                self.queue.pop_front();
            }
            let command = kind.command(subscribe).as_bytes();
            let args = std::iter::once(command).chain(names.iter().map(|name| &name[..]));
            out.extend_from_slice(&encode_command(args));
            self.sent.push_back(Sent {
                kind,
                subscribe,
                left: names.len(),
                owed,
                names,
                origin,
                last,
                slot,
                ping: false,
            });
            self.owed += owed;
            consume_budget().await;
        }
        out
    }

    /// Redis answered a name of the oldest command: the command, if that was its last name.
    pub(super) fn answered(&mut self) -> Option<Sent> {
        let front = self.sent.front_mut()?;
        front.left = front.left.saturating_sub(1);
        if front.left > 0 {
            return None;
        }
        let sent = self.sent.pop_front()?;
        self.owed -= sent.owed;
        Some(sent)
    }

    /// Whether Redis's next answer is a PING's.
    pub(super) fn expects_pong(&self) -> bool {
        self.sent.front().is_some_and(|sent| sent.ping)
    }

    /// Whether Redis's next answer is that of unsubscribing `key`.
    pub(super) fn expects(&self, (kind, name): &Key) -> bool {
        self.sent.front().is_some_and(|sent| {
            let next = sent.names.len().checked_sub(sent.left);
            sent.kind == *kind
                && !sent.subscribe
                && next.and_then(|at| sent.names.get(at)) == Some(name)
        })
    }

    /// Whether `error` is a redirect (`-MOVED slot …`, `-ASK slot …`) that cannot be the
    /// oldest command's answer, being for another slot (or the oldest being a PING, which is
    /// never redirected): the late answer to a shard command already counted done. A command
    /// for a slot that left the node is answered with a redirect, and Redis's unasked
    /// `sunsubscribe` for the slot's channels, sent when the slot left, looks like its answer:
    /// it was taken as one.
    pub(super) fn late_redirect(&self, error: &[u8]) -> bool {
        let slot = match redirect(error) {
            Some(Redirect::Moved { slot, .. } | Redirect::Ask { slot, .. }) => slot,
            _ => return false,
        };
        self.sent
            .front()
            .is_none_or(|sent| sent.ping || sent.slot.is_some_and(|own| own != slot))
    }

    /// Redis refused the oldest command as a whole.
    pub(super) fn refused(&mut self) -> Option<Sent> {
        let sent = self.sent.pop_front()?;
        self.owed -= sent.owed;
        Some(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::slot::slot;

    fn names(names: &[&str]) -> Vec<Bytes> {
        names
            .iter()
            .map(|n| Bytes::copy_from_slice(n.as_bytes()))
            .collect()
    }

    /// Redis Cluster refuses a shard command whose names span slots: each command holds one
    /// slot's names, in the order given; channels and patterns go together.
    #[tokio::test]
    async fn a_shard_command_holds_one_slot() {
        let (a, b) = ("{x}1", "{x}2");
        let c = "other";
        assert_eq!(slot(a.as_bytes()), slot(b.as_bytes()));
        assert_ne!(slot(a.as_bytes()), slot(c.as_bytes()));
        let mut outbox = Outbox::default();
        outbox.push(Namespace::Shard, false, names(&[a, b, c]), None);
        outbox.push(Namespace::Channel, true, names(&[a, c]), None);
        let out = outbox.next_commands(true).await;
        let expected = [
            encode_command(["sunsubscribe", a, b].map(str::as_bytes)),
            encode_command(["sunsubscribe", c].map(str::as_bytes)),
            encode_command(["subscribe", a, c].map(str::as_bytes)),
        ]
        .concat();
        assert_eq!(&out[..], &expected[..]);
        assert!(outbox.expects(&(Namespace::Shard, Bytes::from_static(b"{x}1"))));
        assert!(!outbox.expects(&(Namespace::Shard, Bytes::from_static(b"{x}2"))));
    }

    /// A redirect for another slot than the oldest command's is a late answer to a command
    /// already counted done; one for its slot, or an error of another kind, is its answer.
    #[tokio::test]
    async fn a_redirect_for_another_slot_is_a_late_answer() {
        let mut outbox = Outbox::default();
        outbox.push(Namespace::Shard, true, names(&["ch"]), Some(1));
        outbox.next_commands(true).await;
        let own = slot(b"ch");
        let other = (own + 1) % 16384;
        let moved = |slot: u16| format!("-MOVED {slot} 127.0.0.1:7000\r\n").into_bytes();
        assert!(outbox.late_redirect(&moved(other)));
        assert!(!outbox.late_redirect(&moved(own)));
        assert!(outbox.late_redirect(format!("-ASK {other} h:1\r\n").as_bytes()));
        assert!(!outbox.late_redirect(b"-NOPERM no\r\n"));
        assert!(outbox.refused().is_some());
        assert!(
            outbox.late_redirect(&moved(own)),
            "nothing is waiting for it"
        );
        outbox.push_ping(2);
        outbox.next_commands(true).await;
        assert!(outbox.expects_pong());
        assert!(
            outbox.late_redirect(&moved(own)),
            "a PING is never redirected"
        );
    }
}
