//! Requests held back so that one client's requests for a slot run in the order it sent
//! them when the slot's requests change node.
//!
//! A node runs what it is sent in order, so requests for a slot that all go to one node keep
//! their order. They may not when the router starts sending the slot's requests elsewhere (a
//! new map, or a `-MOVED`) while earlier ones are still queued on the old owner: those come
//! back `-MOVED` and are resent behind what went to the new owner directly. Nor when a request
//! waits to be tried again (`-TRYAGAIN`) while later ones for its slot go on. So in both cases
//! the slot is gated:
//!
//! - the router sends the old owner a fence (a `PING` behind everything it was sent) and the
//!   slot's new requests, every client's, wait here until it is answered: every request
//!   before it answered, given back and resent;
//! - a retried request gates its slot until it has its answer, for its own client only: the
//!   order of different clients' requests is not theirs to keep (a client's identity is its
//!   output budget, one per client).
//!
//! A request that touches more than one slot (a keyless one, a script given no key, a split
//! MGET, a command run on every master) waits while any slot is gated for its client, and
//! whatever a client sends after a waiting request of its own of the same slot, or after one
//! of every slot, waits behind it.
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

use crate::{cluster::slot::SLOTS, io::Budget};

/// Whose requests these are: a client's output budget, of which each client has one (the
/// `Arc` kept here keeps its address from going to another client); `None` for redmux's own.
pub(super) type Owner = Option<Arc<Budget>>;

/// Whether `a` and `b` are the same client.
fn same(a: &Owner, b: &Owner) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// An owner as a map key: its budget's address (0 for redmux's own).
fn key(owner: &Owner) -> usize {
    owner
        .as_ref()
        .map_or(0, |budget| Arc::as_ptr(budget) as usize)
}

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
    /// The one client whose requests it holds back (`-TRYAGAIN`), or every client's (`None`:
    /// a fence).
    only: Option<Owner>,
}

impl Gate {
    fn holds_back(&self, owner: &Owner) -> bool {
        self.only.as_ref().is_none_or(|only| same(only, owner))
    }

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
    pub(super) owner: Owner,
}

/// What one client's waiting requests touch: what its new requests must wait behind.
#[derive(Default)]
struct Queued {
    slots: HashMap<u16, usize>,
    all: usize,
}

/// The gates and the requests waiting, in the order they came.
#[derive(Default)]
pub(super) struct Holds {
    gates: Vec<Gate>,
    queue: VecDeque<Held>,
    /// For each client with requests waiting (by [`key`]), how many touch each slot, and
    /// every slot.
    queued: HashMap<usize, Queued>,
}

impl Holds {
    /// Nothing gated, nothing waiting: requests go straight on.
    pub(super) fn idle(&self) -> bool {
        self.gates.is_empty() && self.queue.is_empty()
    }

    /// Gates `slots`, for every client (`only`: `None`) or for one, until every clone of the
    /// token returned is dropped.
    pub(super) fn gate(
        &mut self,
        slots: impl IntoIterator<Item = u16>,
        only: Option<Owner>,
    ) -> Token {
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
            only,
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

    fn gated_for(&self, touch: Touch, owner: &Owner) -> bool {
        let mut gates = self.gates.iter().filter(|gate| gate.holds_back(owner));
        match touch {
            Touch::Nothing => false,
            Touch::Slot(slot) => gates.any(|gate| gate.covers(slot)),
            Touch::All => gates.next().is_some(),
        }
    }

    /// Whether a new request of `owner` that touches `touch` must wait.
    pub(super) fn must_wait(&self, touch: Touch, owner: &Owner) -> bool {
        let behind = match (touch, self.queued.get(&key(owner))) {
            (Touch::Nothing, _) => return false,
            (_, None) => false,
            (Touch::Slot(slot), Some(queued)) => queued.all > 0 || queued.slots.contains_key(&slot),
            (Touch::All, Some(queued)) => queued.all > 0 || !queued.slots.is_empty(),
        };
        behind || self.gated_for(touch, owner)
    }

    pub(super) fn push(&mut self, held: Held) {
        let queued = self.queued.entry(key(&held.owner)).or_default();
        match held.touch {
            Touch::Nothing => {}
            Touch::Slot(slot) => *queued.slots.entry(slot).or_default() += 1,
            Touch::All => queued.all += 1,
        }
        self.queue.push_back(held);
    }

    /// The waiting requests that may go now, in the order they came.
    pub(super) fn release(&mut self) -> Vec<Held> {
        let waiting = std::mem::take(&mut self.queue);
        self.queued.clear();
        let mut go = Vec::new();
        for held in waiting {
            if self.must_wait(held.touch, &held.owner) {
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
        self.queued.clear();
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
            owner: None,
        }
    }

    #[test]
    fn a_gated_slot_waits_and_what_came_behind_it_keeps_its_place() {
        let mut holds = Holds::default();
        assert!(holds.idle());
        let token = holds.gate([7], None);
        let fence = token.clone();
        drop(token);
        let me = None;
        assert!(holds.must_wait(Touch::Slot(7), &me));
        assert!(!holds.must_wait(Touch::Slot(8), &me));
        assert!(holds.must_wait(Touch::All, &me));
        assert!(!holds.must_wait(Touch::Nothing, &me));
        holds.push(held(0, Touch::Slot(7)));
        // Slot 8 goes on, but not past a request that touches every slot.
        assert!(!holds.must_wait(Touch::Slot(8), &me));
        holds.push(held(1, Touch::All));
        assert!(holds.must_wait(Touch::Slot(8), &me));
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
    fn a_clients_own_gate_and_queue_hold_back_only_that_client() {
        let mut holds = Holds::default();
        let (a, b): (Owner, Owner) = (
            Some(Arc::new(Budget::new(1 << 20))),
            Some(Arc::new(Budget::new(1 << 20))),
        );
        let _retried = holds.gate([7], Some(a.clone()));
        assert!(holds.must_wait(Touch::Slot(7), &a));
        assert!(holds.must_wait(Touch::All, &a));
        assert!(!holds.must_wait(Touch::Slot(7), &b));
        assert!(!holds.must_wait(Touch::All, &b));
        holds.push(Held {
            owner: a.clone(),
            ..held(0, Touch::All)
        });
        assert!(holds.must_wait(Touch::Slot(8), &a));
        assert!(!holds.must_wait(Touch::Slot(8), &b));
        // A fence holds back everyone.
        let _fence = holds.gate([9], None);
        assert!(holds.must_wait(Touch::Slot(9), &b));
        assert!(holds.must_wait(Touch::All, &b));
    }

    #[test]
    fn waiting_requests_time_out_and_free_those_behind_them() {
        let mut holds = Holds::default();
        let _fence = holds.gate([1], None);
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
