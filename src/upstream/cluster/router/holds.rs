//! Requests held back so that one client's requests for a slot run in the order it sent
//! them when the slot's requests change node.
//!
//! A node runs what it is sent in order, so requests for a slot that all go to one node keep
//! their order. They may not when the router starts sending the slot's requests elsewhere (a
//! new map, or a `-MOVED`) while earlier ones are still queued on the old owner: those come
//! back `-MOVED` and are resent behind what went to the new owner directly. Nor when a request
//! waits to be tried again (`-TRYAGAIN`) while later ones for its slot go on. So in both cases
//! the slot is gated: the router sends the old owner a fence (a `PING` behind everything it
//! was sent) and the slot's new requests wait here until it is answered, every request before
//! it answered, given back and resent; a retried request gates its slot until it has its
//! answer. A request that touches more than one slot (a keyless one, a script given no key,
//! a split MGET, a command run on every master) waits while any slot is gated, and whatever
//! comes after a waiting request of the same slot, or after a waiting request of every slot,
//! waits behind it.
//!
//! Requests already sent when a slot is gated cannot be held back: a request whose multi-key
//! command was refused with `-TRYAGAIN` is tried again after those of its slot already on
//! their way, as from any cluster client.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use bytes::Bytes;
use tokio::time::Instant;

use crate::cluster::slot::SLOTS;

/// Kept by what a gate waits for (a fence, a retried request): the gate opens once only the
/// router's own copy is left. Dropping it is enough, wherever that happens.
pub(super) type Token = Arc<()>;

/// What a request acts on, for the order it must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Touch {
    /// Nothing: redmux answers it itself.
    Nothing,
    /// The keys of one slot.
    Slot(u16),
    /// Any key: a keyless command, keys of several slots, every master.
    All,
}

/// Slots whose new requests wait while its token is held elsewhere.
struct Gate {
    slots: Box<[u64; SLOTS / 64]>,
    token: Token,
}

impl Gate {
    fn covers(&self, slot: u16) -> bool {
        let slot = usize::from(slot);
        self.slots
            .get(slot / 64)
            .is_some_and(|word| word & (1 << (slot % 64)) != 0)
    }
}

/// One request of a client's batch, waiting.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) batch: u64,
    pub(super) index: usize,
    pub(super) request: Bytes,
    pub(super) touch: Touch,
    pub(super) deadline: Option<Instant>,
}

/// The gates and the requests waiting, in the order they came.
#[derive(Default)]
pub(super) struct Holds {
    gates: Vec<Gate>,
    queue: VecDeque<Held>,
    /// How many waiting requests touch each slot, and every slot: what a new request must
    /// wait behind.
    queued_slots: HashMap<u16, usize>,
    queued_all: usize,
}

impl Holds {
    /// Nothing gated, nothing waiting: requests go straight on.
    pub(super) fn idle(&self) -> bool {
        self.gates.is_empty() && self.queue.is_empty()
    }

    /// Gates `slots` until every clone of the token returned is dropped.
    pub(super) fn gate(&mut self, slots: impl IntoIterator<Item = u16>) -> Token {
        let mut words = Box::new([0u64; SLOTS / 64]);
        for slot in slots {
            let slot = usize::from(slot);
            if let Some(word) = words.get_mut(slot / 64) {
                *word |= 1 << (slot % 64);
            }
        }
        let token = Token::default();
        self.gates.push(Gate {
            slots: words,
            token: token.clone(),
        });
        token
    }

    /// Whether a gate is still closed (for the router to look again from time to time: a
    /// token dropped outside it wakes nothing).
    pub(super) fn gated(&self) -> bool {
        !self.gates.is_empty()
    }

    /// Opens the gates whose token is no longer held anywhere else; whether any opened.
    pub(super) fn open(&mut self) -> bool {
        let before = self.gates.len();
        self.gates.retain(|gate| Arc::strong_count(&gate.token) > 1);
        self.gates.len() < before
    }

    fn gated_for(&self, touch: Touch) -> bool {
        match touch {
            Touch::Nothing => false,
            Touch::Slot(slot) => self.gates.iter().any(|gate| gate.covers(slot)),
            Touch::All => !self.gates.is_empty(),
        }
    }

    /// Whether a new request that touches `touch` must wait.
    pub(super) fn must_wait(&self, touch: Touch) -> bool {
        let behind = match touch {
            Touch::Nothing => return false,
            Touch::Slot(slot) => self.queued_all > 0 || self.queued_slots.contains_key(&slot),
            Touch::All => !self.queue.is_empty(),
        };
        behind || self.gated_for(touch)
    }

    pub(super) fn push(&mut self, held: Held) {
        match held.touch {
            Touch::Nothing => {}
            Touch::Slot(slot) => *self.queued_slots.entry(slot).or_default() += 1,
            Touch::All => self.queued_all += 1,
        }
        self.queue.push_back(held);
    }

    /// The waiting requests that may go now, in the order they came.
    pub(super) fn release(&mut self) -> Vec<Held> {
        let waiting = std::mem::take(&mut self.queue);
        self.queued_slots.clear();
        self.queued_all = 0;
        let mut go = Vec::new();
        for held in waiting {
            if self.must_wait(held.touch) {
                self.push(held);
            } else {
                go.push(held);
            }
        }
        go
    }

    /// When the first waiting request is due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.queue.iter().filter_map(|held| held.deadline).min()
    }

    /// Takes out the waiting requests due by `now`: they get a timeout.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Held> {
        let (expired, waiting): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|held| held.deadline.is_some_and(|d| d <= now));
        self.queued_slots.clear();
        self.queued_all = 0;
        for held in waiting {
            self.push(held);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(index: usize, touch: Touch) -> Held {
        Held {
            batch: 0,
            index,
            request: Bytes::new(),
            touch,
            deadline: None,
        }
    }

    #[test]
    fn a_gated_slot_waits_and_what_came_behind_it_keeps_its_place() {
        let mut holds = Holds::default();
        assert!(holds.idle());
        let token = holds.gate([7]);
        let fence = token.clone();
        drop(token);
        assert!(holds.must_wait(Touch::Slot(7)));
        assert!(!holds.must_wait(Touch::Slot(8)));
        assert!(holds.must_wait(Touch::All));
        assert!(!holds.must_wait(Touch::Nothing));
        holds.push(held(0, Touch::Slot(7)));
        // Slot 8 goes on, but not past a request that touches every slot.
        assert!(!holds.must_wait(Touch::Slot(8)));
        holds.push(held(1, Touch::All));
        assert!(holds.must_wait(Touch::Slot(8)));
        holds.push(held(2, Touch::Slot(8)));
        assert!(holds.release().is_empty());
        assert!(!holds.open());
        drop(fence);
        assert!(holds.open());
        let order: Vec<usize> = holds.release().iter().map(|h| h.index).collect();
        assert_eq!(order, [0, 1, 2]);
        assert!(holds.idle());
    }

    #[test]
    fn waiting_requests_time_out_and_free_those_behind_them() {
        let mut holds = Holds::default();
        let _fence = holds.gate([1]);
        let now = Instant::now();
        holds.push(Held {
            deadline: Some(now),
            ..held(0, Touch::All)
        });
        holds.push(held(1, Touch::Slot(2)));
        assert_eq!(holds.next_deadline(), Some(now));
        let expired = holds.expired(now);
        assert_eq!(expired.len(), 1);
        let order: Vec<usize> = holds.release().iter().map(|h| h.index).collect();
        assert_eq!(order, [1]);
        assert_eq!(holds.next_deadline(), None);
    }
}
