//! A node's messages that wait for room on its channel, beside the router.
//!
//! A node's actor stops taking messages once it has a megabyte unwritten, and its channel
//! fills when the node stops reading (a long script, a stopped process). The router serves
//! every node: were it to wait there for room, one stuck node would hold up every client's
//! requests for the others. So a message that finds the channel full goes to the node's relay,
//! a task that hands the node its messages in the order they came as room frees, each within
//! its own time, and the router goes on. While the relay has messages the router sends that
//! node's through it too, so that they stay in order; once it has handed over all of them the
//! router sends on the channel itself again.
//!
//! A relay holds at most [`MAX_MESSAGES`] messages and [`MAX_BYTES`] bytes (one message
//! whatever its size): past that a message is refused at once, as from a node unavailable,
//! since clients that hang up and come back are bounded by nothing else. A message whose
//! client has gone is dropped when its turn comes, without waiting for room.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};

use crate::upstream::{Batch, UpstreamError};

/// How long a message with no deadline of its own waits for room.
const WAIT_MAX: Duration = Duration::from_secs(5);

/// Most messages a relay holds: enough that a node merely slow under a burst of pipelines
/// (each client's cut into messages of 64 requests) makes no client wait for an error; the
/// bytes are the bound that matters.
const MAX_MESSAGES: usize = 16 * 1024;

/// Most bytes of requests a relay holds.
const MAX_BYTES: usize = 64 * 1024 * 1024;

/// The relay of one node's channel.
#[derive(Debug)]
pub(super) struct Relay {
    tx: mpsc::UnboundedSender<Batch>,
    held: Arc<Waiting>,
}

/// What waits in a relay: messages given to it and not yet handed over (or refused), and
/// their bytes.
#[derive(Debug, Default)]
struct Waiting {
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

impl Waiting {
    fn take(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.messages.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a message out, once handed over or refused (messages last: see
    /// [`Relay::drained`]).
    fn give(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.messages.fetch_sub(1, Ordering::Release);
    }
}

impl Relay {
    /// Starts a relay to `node`'s channel.
    pub(super) fn start(node: mpsc::Sender<Batch>) -> Relay {
        let (tx, mut rx) = mpsc::unbounded_channel::<Batch>();
        let held = Arc::new(Waiting::default());
        let left = held.clone();
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                let bytes = batch.frames.len();
                if batch.reply.is_closed() {
                    // Nobody waits for its replies: it need not be written.
                    left.give(bytes);
                    continue;
                }
                let due = batch
                    .timeout
                    .and_then(|timeout| batch.queued_at.checked_add(timeout));
                let wait = due.map_or(WAIT_MAX, |due| {
                    due.saturating_duration_since(Instant::now())
                });
                match tokio::time::timeout(wait, node.reserve()).await {
                    Ok(Ok(permit)) => {
                        // What is left of its time goes with it, not its time again: the
                        // actor counts a message's time from when it takes it.
                        let mut batch = batch;
                        if let Some(due) = due {
                            batch.timeout = Some(due.saturating_duration_since(Instant::now()));
                        }
                        permit.send(batch);
                    }
                    // No room in time, or the node's actor has ended.
                    _ => refuse(batch),
                }
                left.give(bytes);
            }
        });
        Relay { tx, held }
    }

    /// Whether every message it was given has been handed over (or refused): the router may
    /// send on the node's channel itself again, after them.
    pub(super) fn drained(&self) -> bool {
        self.held.messages.load(Ordering::Acquire) == 0
    }

    /// Gives it `batch`, to hand over after those it has; refused at once when it holds
    /// all it may.
    pub(super) fn relay(&self, batch: Batch) {
        let bytes = batch.frames.len();
        let messages = self.held.messages.load(Ordering::Acquire);
        let full = messages > 0
            && (messages >= MAX_MESSAGES
                || self.held.bytes.load(Ordering::Acquire) + bytes > MAX_BYTES);
        if full {
            return refuse(batch);
        }
        self.held.take(bytes);
        if let Err(mpsc::error::SendError(batch)) = self.tx.send(batch) {
            self.held.give(bytes);
            refuse(batch);
        }
    }
}

/// A message that found no room: its requests get an error, as from a node unavailable.
fn refuse(batch: Batch) {
    let Batch {
        frames, mut reply, ..
    } = batch;
    reply.written(frames);
    reply.deliver(Err(UpstreamError::Unavailable), None);
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::sync::oneshot;

    use super::*;
    use crate::upstream::Reply;

    fn batch(frames: impl Into<Bytes>, timeout: Duration) -> (Batch, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let batch = Batch {
            frames: frames.into(),
            count: 1,
            queued_at: Instant::now(),
            timeout: Some(timeout),
            reply: tx.into(),
            budget: None,
        };
        (batch, rx)
    }

    /// A relay to a node whose channel (of one) is full with message "first": what the
    /// node takes, and the first message's reply.
    fn behind_a_full_channel() -> (Relay, mpsc::Receiver<Batch>, oneshot::Receiver<Reply>) {
        let (node, taken) = mpsc::channel(1);
        let (first, first_reply) = batch(&b"first"[..], Duration::from_secs(9));
        node.try_send(first).unwrap();
        (Relay::start(node), taken, first_reply)
    }

    #[tokio::test(start_paused = true)]
    async fn messages_wait_for_room_in_order_and_each_within_its_time() {
        let (relay, mut taken, _first) = behind_a_full_channel();
        let (second, _second) = batch(&b"second"[..], Duration::from_secs(9));
        let (third, _third) = batch(&b"third"[..], Duration::from_secs(9));
        let (late, late_reply) = batch(&b"late"[..], Duration::from_secs(1));
        relay.relay(second);
        relay.relay(third);
        relay.relay(late);
        assert!(!relay.drained());
        let mut order = Vec::new();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let message = taken.recv().await.unwrap();
            order.push((message.frames, message.timeout));
        }
        // Each goes with what is left of its time (the first never waited).
        let left = |ms: u64| Some(Duration::from_millis(9_000 - ms));
        assert_eq!(
            order,
            [
                (Bytes::from_static(b"first"), Some(Duration::from_secs(9))),
                (Bytes::from_static(b"second"), left(400)),
                (Bytes::from_static(b"third"), left(800)),
            ]
        );
        // Its second ran out before there was room for it.
        assert_eq!(late_reply.await.unwrap(), Err(UpstreamError::Unavailable));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(relay.drained());
        assert!(taken.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_relay_refuses_at_once_and_drops_what_nobody_waits_for() {
        let (relay, mut taken, _first) = behind_a_full_channel();
        let mut waiting = Vec::new();
        for _ in 0..MAX_MESSAGES {
            let (message, reply) = batch(&b"waits"[..], Duration::from_secs(9));
            relay.relay(message);
            waiting.push(reply);
        }
        let (over, over_reply) = batch(&b"over"[..], Duration::from_secs(9));
        relay.relay(over);
        assert_eq!(over_reply.await.unwrap(), Err(UpstreamError::Unavailable));
        // Their clients have gone: none of them is handed over, and room is made at once.
        drop(waiting);
        assert_eq!(&taken.recv().await.unwrap().frames[..], b"first");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(relay.drained());
        assert!(taken.try_recv().is_err());
        // One message of any size goes into an empty relay; one that would take it past its
        // bytes does not.
        let (filler, _filler) = batch(&b"filler"[..], Duration::from_secs(9));
        relay.relay(filler);
        let (big, big_reply) = batch(vec![b'x'; MAX_BYTES], Duration::from_secs(9));
        relay.relay(big);
        assert_eq!(big_reply.await.unwrap(), Err(UpstreamError::Unavailable));
    }

    #[tokio::test]
    async fn a_node_that_has_ended_refuses_what_waits() {
        let (relay, taken, _first) = behind_a_full_channel();
        let (second, second_reply) = batch(&b"second"[..], Duration::from_secs(9));
        relay.relay(second);
        drop(taken);
        assert_eq!(second_reply.await.unwrap(), Err(UpstreamError::Unavailable));
    }
}
