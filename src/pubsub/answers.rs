//! What the subscriber connection says back, matched to what was sent: confirmations answered
//! to each waiting client at the point of the stream where Redis gave them, refusals
//! (`-NOPERM`) to the request that caused them, and messages fanned out to subscribers.

use std::collections::HashSet;

use bytes::{Bytes, BytesMut};
use tokio::{task::coop::consume_budget, time::Instant};
use tracing::warn;

use super::{Answer, Hub, Key, Sent, Waiter};
use crate::{
    command::Namespace,
    resp::{encode_command, Args, ReplyScanner},
    upstream::{Replies, UpstreamError},
};

impl Hub {
    /// Handles every complete frame the subscriber connection sent, answering each waiter as
    /// soon as the frame that completes it is in: before the next message is delivered.
    pub(super) async fn dispatch(
        &mut self,
        rbuf: &mut BytesMut,
        scanner: &mut ReplyScanner,
    ) -> Result<(), crate::resp::ReplyError> {
        while let Some(end) = scanner.next_reply(rbuf)? {
            let frame = rbuf.split_to(end).freeze();
            scanner.consumed(end);
            consume_budget().await;
            // PING's answer on a connection that holds no subscription any more (Redis
            // dropped the last shard channel when its slot left the node).
            if &frame[..] == b"+PONG\r\n" {
                self.ponged().await;
                continue;
            }
            if frame.first() == Some(&b'-') {
                if self.outbox.late_redirect(&frame) {
                    continue;
                }
                // Redis refused a whole (UN)SUBSCRIBE: an ACL's -NOPERM, or a redirect of a
                // shard command whose slot left the node.
                if let Some(sent) = self.outbox.refused() {
                    self.refused(sent, frame).await;
                }
                self.answer_ready().await;
                continue;
            }
            let mut args = Args::new(&frame);
            let (Some(what), Some(name)) = (args.next(), args.next()) else {
                continue;
            };
            let (kind, subscribe) = match what {
                b"message" | b"pmessage" | b"smessage" => {
                    let kind = match what {
                        b"message" => Namespace::Channel,
                        b"pmessage" => Namespace::Pattern,
                        _ => Namespace::Shard,
                    };
                    let key = (kind, Bytes::copy_from_slice(name));
                    self.deliver(&key, &frame).await;
                    continue;
                }
                b"subscribe" => (Namespace::Channel, true),
                b"psubscribe" => (Namespace::Pattern, true),
                b"ssubscribe" => (Namespace::Shard, true),
                b"unsubscribe" => (Namespace::Channel, false),
                b"punsubscribe" => (Namespace::Pattern, false),
                b"sunsubscribe" => (Namespace::Shard, false),
                // A subscribed RESP2 connection's answer to PING (`pong` and its argument).
                b"pong" => {
                    self.ponged().await;
                    continue;
                }
                _ => continue,
            };
            let key = (kind, Bytes::copy_from_slice(name));
            if kind == Namespace::Shard && !subscribe && !self.outbox.expects(&key) {
                // Not an answer: the channel's slot left the node.
                self.dropped(key).await;
                continue;
            }
            if subscribe {
                if self.upstream.insert(key.clone()) {
                    self.registry.hub(&key, true);
                }
                self.confirmed(key);
            } else if self.upstream.remove(&key) {
                self.registry.hub(&key, false);
            }
            if let Some(sent) = self.outbox.answered() {
                self.command_done(&sent);
            }
            self.answer_ready().await;
        }
        Ok(())
    }

    /// Redis answered the PING at the front of what was sent ([`super::HubRequest::Sync`]).
    async fn ponged(&mut self) {
        if self.outbox.expects_pong() {
            if let Some(sent) = self.outbox.answered() {
                self.command_done(&sent);
            }
            self.answer_ready().await;
        }
    }

    /// Redis dropped `key` without being asked (a shard channel whose slot left the node), or
    /// a shard hub lost its connection. Each client that holds it live gets Redis's
    /// `sunsubscribe` frame (its session puts its own count in) and holds it no more; a
    /// subscription still waiting for Redis's answer gets that answer (a redirect, or a
    /// confirmation on a node that owns the slot).
    pub(super) async fn dropped(&mut self, key: Key) {
        if self.upstream.remove(&key) {
            self.registry.hub(&key, false);
        }
        let holders: Vec<u64> = self
            .wanted
            .get(&key)
            .into_iter()
            .flatten()
            .filter(|(_, pending)| pending.is_none())
            .map(|(client, _)| *client)
            .collect();
        if holders.is_empty() {
            return;
        }
        let notice = encode_command([key.0.command(false).as_bytes(), &key.1[..]]);
        for client in holders {
            consume_budget().await;
            if let Some(entry) = self.clients.get_mut(&client) {
                entry.subscriptions.remove(&key);
                if !entry.inbox.queued.charge(notice.len())
                    || entry.inbox.tx.send(notice.clone()).is_err()
                {
                    self.cut(client);
                }
            }
            // Redis holds it no more: nothing to unsubscribe.
            let _ = self.release_one(client, key.clone());
        }
    }

    /// Redis has answered every name of a command.
    pub(super) fn command_done(&mut self, sent: &Sent) {
        if let (Some(id), true) = (sent.origin, sent.last) {
            if let Some(waiter) = self.waiters.get_mut(&id) {
                waiter.own = waiter.own.saturating_sub(1);
                self.ready.push(id);
            }
        }
    }

    /// Redis refused a command as a whole.
    pub(super) async fn refused(&mut self, sent: Sent, error: Bytes) {
        if !sent.subscribe {
            // UNSUBSCRIBE is never refused for its channels; a user without the command may
            // not unsubscribe, and there is nothing else to do.
            self.command_done(&sent);
            return;
        }
        let keys: Vec<Key> = sent
            .names
            .into_iter()
            .map(|name| (sent.kind, name))
            .collect();
        for key in &keys {
            if let Some(count) = self.in_flight.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.in_flight.remove(key);
                }
            }
        }
        match sent.origin {
            // A client's own request: refused as Redis would have refused it.
            Some(id) => self.fail(id, error).await,
            // Sent again for others (or by a new connection): one at a time, to find which
            // name Redis refuses.
            None if keys.len() > 1 => {
                for key in keys {
                    if self.orphaned(&key) {
                        self.push_by_kind(vec![key], true, None);
                    }
                    consume_budget().await;
                }
                return;
            }
            None => {
                if let Some(key) = keys.first() {
                    self.forbid(key, error).await;
                }
            }
        }
        // Names of the refused request that others were waiting for go again, on their own.
        for key in keys {
            if self.orphaned(&key) {
                self.push_by_kind(vec![key], true, None);
            }
            consume_budget().await;
        }
    }

    /// Whether `key` is wanted, and yet not subscribed and not on its way.
    pub(super) fn orphaned(&self, key: &Key) -> bool {
        self.wanted.contains_key(key)
            && !self.active.contains(key)
            && !self.in_flight.contains_key(key)
    }

    /// Answers a subscription with `error`: the names it added for its client are taken back,
    /// as if it never ran.
    pub(super) async fn fail(&mut self, id: u64, error: Bytes) {
        let Some(waiter) = self.waiters.get_mut(&id) else {
            return;
        };
        if waiter.refused.is_some() {
            return;
        }
        waiter.refused = Some(error);
        let client = waiter.client;
        let names = std::mem::take(&mut waiter.names);
        self.ready.push(id);
        let mut mine = Vec::new();
        for key in names {
            let pending = self.wanted.get(&key).and_then(|wanted| wanted.get(&client));
            if pending == Some(&Some(id)) {
                if let Some(entry) = self.clients.get_mut(&client) {
                    entry.subscriptions.remove(&key);
                }
                mine.push(key);
            }
        }
        let unwanted = self.release(client, mine).await;
        self.push_by_kind(unwanted, false, None);
    }

    /// Redis refused `key` on its own: its waiters fail with Redis's words. Clients holding it
    /// already (their user lost the permission while it was held, and the connection was made
    /// again) are closed, as Redis closes them.
    pub(super) async fn forbid(&mut self, key: &Key, error: Bytes) {
        let mut pending: Vec<u64> = self.waiting.remove(key).unwrap_or_default();
        let mut holders = Vec::new();
        for (client, waiter) in self.wanted.get(key).into_iter().flatten() {
            match waiter {
                Some(id) => pending.push(*id),
                None => holders.push(*client),
            }
        }
        for id in pending {
            self.fail(id, error.clone()).await;
        }
        for client in holders {
            warn!(
                client,
                "Redis no longer lets the subscriber's user subscribe to a name it holds; closing it"
            );
            self.remove_client(client, None).await;
        }
    }

    /// Publishes the counts, if they changed.
    pub(super) fn publish_counts(&mut self) {
        self.counts.clients = self.clients.len() as u64;
        let counts = self.counts;
        self.counts_tx.send_if_modified(|published| {
            let changed = *published != counts;
            *published = counts;
            changed
        });
    }

    pub(super) fn confirmed(&mut self, key: Key) {
        if let Some(count) = self.in_flight.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count > 0 {
                return; // a later SUBSCRIBE of the same key is still to be confirmed
            }
            self.in_flight.remove(&key);
        }
        if !self.wanted.contains_key(&key) {
            return; // unsubscribed meanwhile
        }
        self.satisfy(&key);
        self.active.insert(key);
    }

    /// `key` no longer keeps any waiter waiting.
    pub(super) fn satisfy(&mut self, key: &Key) {
        let Some(ids) = self.waiting.remove(key) else {
            return;
        };
        for id in ids {
            if let Some(waiter) = self.waiters.get_mut(&id) {
                waiter.missing.remove(key);
                self.ready.push(id);
            }
        }
    }

    /// Answers the waiters that are done, each client's in the order it sent them.
    pub(super) async fn answer_ready(&mut self) {
        while let Some(id) = self.ready.pop() {
            let Some(waiter) = self.waiters.get(&id) else {
                continue;
            };
            if !waiter.done() {
                continue;
            }
            if let Answer::Reset(_) = waiter.answer {
                if let Some(Waiter {
                    answer: Answer::Reset(done),
                    ..
                }) = self.waiters.remove(&id)
                {
                    let _ = done.send(Ok(Replies::from(Bytes::new())));
                }
                continue;
            }
            let client = waiter.client;
            self.answer_client(client).await;
        }
    }

    /// Puts the answers of the client's oldest requests that are done in its inbox.
    pub(super) async fn answer_client(&mut self, client: u64) {
        let Some(entry) = self.clients.get_mut(&client) else {
            return;
        };
        while let Some(&id) = entry.queue.front() {
            let Some(waiter) = self.waiters.get(&id) else {
                entry.queue.pop_front();
                continue;
            };
            if !waiter.done() {
                break;
            }
            entry.queue.pop_front();
            let Some(waiter) = self.waiters.remove(&id) else {
                continue;
            };
            let marker = match waiter.refused {
                Some(error) => error,
                None => {
                    // Live from now on: the next message for these goes to the client.
                    for key in &waiter.names {
                        let pending = self
                            .wanted
                            .get_mut(key)
                            .and_then(|wanted| wanted.get_mut(&client));
                        if let Some(pending) = pending {
                            if *pending == Some(id) {
                                *pending = None;
                                self.registry.client(key, true);
                            }
                        }
                        consume_budget().await;
                    }
                    Bytes::new()
                }
            };
            if !entry.inbox.queued.charge(marker.len()) || entry.inbox.tx.send(marker).is_err() {
                self.cut(client);
                return;
            }
        }
    }

    pub(super) async fn deliver(&mut self, key: &Key, frame: &Bytes) {
        let Some(wanted) = self.wanted.get(key) else {
            return;
        };
        // Frames go out as the RESP2 upstream sent them; a RESP3 session makes them pushes.
        let mut cut_off = Vec::new();
        for (client, pending) in wanted {
            consume_budget().await;
            if pending.is_some() {
                continue;
            }
            let Some(subscriber) = self.clients.get(client) else {
                continue;
            };
            let bytes = frame.clone();
            if !subscriber.inbox.queued.charge(bytes.len())
                || subscriber.inbox.tx.send(bytes).is_err()
            {
                cut_off.push(*client);
            }
        }
        for client in cut_off {
            self.cut(client);
        }
    }

    /// Gives up on a client past its limit: out of `clients` at once, so that it is cut off
    /// once; out of every subscription (and its frames, queued or not, freed) as soon as the
    /// dispatch is over.
    pub(super) fn cut(&mut self, client: u64) {
        if let Some(subscriber) = self.clients.remove(&client) {
            // Its session logs it, once: the hub could only log every message it drops.
            let _ = subscriber.inbox.cut.send(());
            for id in subscriber.queue {
                self.waiters.remove(&id);
            }
            self.cut_off.push((client, subscriber.subscriptions));
        }
    }

    /// Fails the waiters that have waited too long (see [`Waiter::since`]): a subscription
    /// with redmux's error, taken back; an unsubscription is done all the same.
    pub(super) async fn expire_waiters(&mut self) {
        let now = Instant::now();
        let (progress, timeouts, connected) = (self.progress, self.timeouts, self.connected);
        let expired: HashSet<u64> = self
            .waiters
            .iter()
            .filter(|(_, waiter)| !waiter.done())
            .filter(|(_, waiter)| match connected {
                true => waiter.since.max(progress) + timeouts.request <= now,
                false => waiter.since + timeouts.connect <= now,
            })
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return;
        }
        // Their places in `waiting`, each list walked once.
        let mut keys = HashSet::new();
        for id in &expired {
            if let Some(waiter) = self.waiters.get_mut(id) {
                keys.extend(std::mem::take(&mut waiter.missing));
            }
        }
        for key in keys {
            if let Some(ids) = self.waiting.get_mut(&key) {
                ids.retain(|id| !expired.contains(id));
                if ids.is_empty() {
                    self.waiting.remove(&key);
                }
            }
            consume_budget().await;
        }
        for id in expired {
            match self.waiters.get_mut(&id) {
                Some(waiter) if waiter.subscribe => {
                    self.fail(id, UpstreamError::Unavailable.replies(1)).await;
                }
                Some(waiter) => {
                    waiter.own = 0;
                    self.ready.push(id);
                }
                None => {}
            }
        }
        self.answer_ready().await;
    }
}
