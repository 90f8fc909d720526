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
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use bytes::Bytes;
use tokio::time::Instant;

use crate::{cluster::slot::SLOTS, io::Budget};

/// Whose requests these are: a client's output budget, of which each client has one (the
/// `Arc` kept here keeps its address from going to another client); `None` for redmux's own.
pub(super) type Owner = Option<Arc<Budget>>;

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
    slots: Slots,
    token: Token,
    /// The one client whose requests it holds back (`-TRYAGAIN`), or every client's (`None`:
    /// a fence).
    only: Option<Owner>,
}

/// A gate's slots: one (a retried request's: there may be one such gate per request in
/// flight, so it stays small), or a set of them (a fence's).
enum Slots {
    One(u16),
    Many(Box<[u64; SLOTS / 64]>),
}

impl Slots {
    /// Calls `f` with each slot.
    fn each(&self, mut f: impl FnMut(u16)) {
        match self {
            Slots::One(slot) => f(*slot),
            Slots::Many(words) => {
                for (at, &word) in words.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let bit = bits.trailing_zeros() as usize;
                        f(u16::try_from(at * 64 + bit).unwrap_or(u16::MAX));
                        bits &= bits - 1;
                    }
                }
            }
        }
    }
}

/// The closed gates, counted by what they hold back, so that a request learns in a few
/// steps whether one holds it back however many are closed: a `-TRYAGAIN` gate is kept per
/// request in flight, and a map change can fence thousands of slots one by one.
#[derive(Default)]
struct Closed {
    fences: u32,
    /// How many fences cover each slot (empty until the first fence).
    fenced: Vec<u32>,
    /// Each client's own gates, by [`key`].
    own: HashMap<usize, Own>,
}

/// One client's own gates: how many, and how many cover each slot.
#[derive(Default)]
struct Own {
    gates: u32,
    slots: HashMap<u16, u32>,
}

impl Closed {
    /// Counts `gate` in (`closing`) or out.
    fn count(&mut self, gate: &Gate, closing: bool) {
        let step = |count: &mut u32| match closing {
            true => *count += 1,
            false => *count = count.saturating_sub(1),
        };
        match &gate.only {
            None => {
                step(&mut self.fences);
                if self.fenced.is_empty() {
                    self.fenced = vec![0; SLOTS];
                }
                gate.slots.each(|slot| {
                    if let Some(count) = self.fenced.get_mut(usize::from(slot)) {
                        step(count);
                    }
                });
            }
            Some(owner) => {
                let client = key(owner);
                let own = self.own.entry(client).or_default();
                step(&mut own.gates);
                gate.slots.each(|slot| {
                    let count = own.slots.entry(slot).or_default();
                    step(count);
                    if *count == 0 {
                        own.slots.remove(&slot);
                    }
                });
                if own.gates == 0 {
                    self.own.remove(&client);
                }
            }
        }
    }

    /// Whether a closed gate holds back a request of `owner` that touches `touch`: a fence
    /// holds back every client's, a client's own gate only its own; either holds back a
    /// request that touches every slot.
    fn holds_back(&self, touch: Touch, owner: &Owner) -> bool {
        let own = self.own.get(&key(owner));
        match touch {
            Touch::Nothing => false,
            Touch::Slot(slot) => {
                self.fenced
                    .get(usize::from(slot))
                    .is_some_and(|&count| count > 0)
                    || own.is_some_and(|own| own.slots.contains_key(&slot))
            }
            Touch::All => self.fences > 0 || own.is_some(),
        }
    }
}

impl FromIterator<u16> for Slots {
    fn from_iter<I: IntoIterator<Item = u16>>(slots: I) -> Slots {
        let mut slots = slots.into_iter().peekable();
        let mut words = Box::new([0u64; SLOTS / 64]);
        let Some(first) = slots.next() else {
            return Slots::Many(words);
        };
        if slots.peek().is_none() {
            return Slots::One(first);
        }
        for slot in std::iter::once(first).chain(slots) {
            let slot = usize::from(slot);
            if let Some(word) = words.get_mut(slot / 64) {
                *word |= 1 << (slot % 64);
            }
        }
        Slots::Many(words)
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

/// One client's waiting requests, by what they touch: what its new requests must wait
/// behind. Each set holds numbers in [`Holds::queue`], so its first is the earliest.
#[derive(Default)]
struct Queued {
    held: BTreeSet<u64>,
    /// Those that touch each slot.
    slots: HashMap<u16, BTreeSet<u64>>,
    /// Those that touch every slot.
    all: BTreeSet<u64>,
    /// Those no gate held back when last looked at: they wait only behind this client's
    /// earlier requests, so only they may go when one of those times out.
    ungated: BTreeSet<u64>,
}

impl Queued {
    /// Whether request `number`, which touches `touch`, must wait behind an earlier one of
    /// these (`u64::MAX`: a new request, behind all of them).
    fn blocks(&self, touch: Touch, number: u64) -> bool {
        match touch {
            Touch::Nothing => false,
            Touch::Slot(slot) => {
                let earlier = |set: Option<&BTreeSet<u64>>| {
                    set.and_then(BTreeSet::first).is_some_and(|&n| n < number)
                };
                earlier(Some(&self.all)) || earlier(self.slots.get(&slot))
            }
            Touch::All => self.held.first().is_some_and(|&n| n < number),
        }
    }

    fn add(&mut self, number: u64, touch: Touch, gated: bool) {
        self.held.insert(number);
        if !gated {
            self.ungated.insert(number);
        }
        match touch {
            Touch::Nothing => {}
            Touch::Slot(slot) => {
                self.slots.entry(slot).or_default().insert(number);
            }
            Touch::All => {
                self.all.insert(number);
            }
        }
    }

    fn remove(&mut self, number: u64, touch: Touch) {
        self.held.remove(&number);
        self.ungated.remove(&number);
        match touch {
            Touch::Nothing => {}
            Touch::Slot(slot) => {
                if let Some(numbers) = self.slots.get_mut(&slot) {
                    numbers.remove(&number);
                    if numbers.is_empty() {
                        self.slots.remove(&slot);
                    }
                }
            }
            Touch::All => {
                self.all.remove(&number);
            }
        }
    }
}

/// The gates and the requests waiting, in the order they came.
///
/// Kept so that what the router does per request costs a few steps however many wait and
/// however many gates are closed: a gate can stay closed for a request timeout (a fence to a
/// node that stopped answering) while every client's requests for its slots queue here, and
/// the router looks at the soonest deadline on every turn. Opening a gate looks again at the
/// requests it held back; the last fence's opening, at every waiting request.
#[derive(Default)]
pub(super) struct Holds {
    gates: Vec<Gate>,
    /// The waiting requests by a number given in the order they came.
    queue: BTreeMap<u64, Held>,
    /// The number the next waiting request gets.
    next: u64,
    /// The waiting requests that have a deadline, soonest first.
    due: BTreeSet<(Instant, u64)>,
    /// For each client with requests waiting (by [`key`]), which they are and what they
    /// touch.
    queued: HashMap<usize, Queued>,
    /// For each slot, the clients with requests for it waiting, and how many: those a fence
    /// on it may let go.
    touching: HashMap<u16, HashMap<usize, u32>>,
    closed: Closed,
    /// What to look at again for requests that may go.
    look_again: LookAgain,
}

#[derive(Default)]
enum LookAgain {
    #[default]
    Nobody,
    /// These clients' requests: all of them (a gate that held them back opened), or only
    /// those no gate holds back (requests they waited behind timed out).
    Clients(HashMap<usize, bool>),
    /// Every client's: the last fence opened.
    Everyone,
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
        let token = Token::default();
        let gate = Gate {
            slots: slots.into_iter().collect(),
            token: token.clone(),
            only,
        };
        self.closed.count(&gate, true);
        self.gates.push(gate);
        token
    }

    /// Whether a gate is still closed (for the router to look again from time to time: a
    /// token dropped outside it wakes nothing).
    pub(super) fn gated(&self) -> bool {
        !self.gates.is_empty()
    }

    /// Opens the gates whose token is no longer held anywhere else; whether any opened.
    /// Only the requests an opened gate held back are looked at again: its client's, or a
    /// fence's slots' (every client's once no fence is left: they held back every request
    /// that touches every slot).
    pub(super) fn open(&mut self) -> bool {
        if self
            .gates
            .iter()
            .all(|gate| Arc::strong_count(&gate.token) > 1)
        {
            return false;
        }
        let (opened, closed): (Vec<Gate>, Vec<Gate>) = std::mem::take(&mut self.gates)
            .into_iter()
            .partition(|gate| Arc::strong_count(&gate.token) == 1);
        self.gates = closed;
        for gate in &opened {
            self.closed.count(gate, false);
        }
        for gate in &opened {
            match &gate.only {
                Some(owner) => self.look_again_at(key(owner), true),
                None if self.closed.fences == 0 => self.look_again = LookAgain::Everyone,
                None => {
                    let mut clients = Vec::new();
                    gate.slots.each(|slot| {
                        if let Some(touching) = self.touching.get(&slot) {
                            clients.extend(touching.keys().copied());
                        }
                    });
                    for client in clients {
                        self.look_again_at(client, true);
                    }
                }
            }
        }
        true
    }

    /// Marks `client`'s requests to be looked at again: `all` of them, or those no gate
    /// holds back.
    fn look_again_at(&mut self, client: usize, all: bool) {
        match &mut self.look_again {
            LookAgain::Everyone => {}
            LookAgain::Clients(clients) => *clients.entry(client).or_default() |= all,
            nobody @ LookAgain::Nobody => {
                *nobody = LookAgain::Clients(HashMap::from([(client, all)]));
            }
        }
    }

    /// Whether a new request of `owner` that touches `touch` must wait.
    pub(super) fn must_wait(&self, touch: Touch, owner: &Owner) -> bool {
        if touch == Touch::Nothing {
            return false;
        }
        let behind = self
            .queued
            .get(&key(owner))
            .is_some_and(|queued| queued.blocks(touch, u64::MAX));
        behind || self.closed.holds_back(touch, owner)
    }

    pub(super) fn push(&mut self, held: Held) {
        let number = self.next;
        self.next += 1;
        let gated = self.closed.holds_back(held.touch, &held.owner);
        self.enqueue(key(&held.owner), number, held.touch, gated);
        if let Some(deadline) = held.deadline {
            self.due.insert((deadline, number));
        }
        self.queue.insert(number, held);
    }

    /// The waiting requests that may go now (a gate opened, or requests they waited behind
    /// timed out), in the order they came.
    pub(super) fn release(&mut self) -> Vec<Held> {
        let mut go = Vec::new();
        match std::mem::take(&mut self.look_again) {
            LookAgain::Nobody => {}
            LookAgain::Everyone => {
                self.touching.clear();
                for (_, mine) in std::mem::take(&mut self.queued) {
                    self.look_at(mine.held, &mut go);
                }
            }
            LookAgain::Clients(clients) => {
                for (client, all) in clients {
                    let Some(numbers) = self.queued.get(&client).map(|queued| match all {
                        true => queued.held.clone(),
                        false => queued.ungated.clone(),
                    }) else {
                        continue;
                    };
                    self.look_at(numbers, &mut go);
                }
            }
        }
        go.sort_unstable();
        go.into_iter()
            .filter_map(|number| {
                let held = self.queue.remove(&number)?;
                if let Some(deadline) = held.deadline {
                    self.due.remove(&(deadline, number));
                }
                Some(held)
            })
            .collect()
    }

    /// Looks again at a client's waiting requests `numbers`, in order: each that may go now
    /// leaves the client's [`Queued`] (those behind it no longer wait for it) and is added
    /// to `go`; each that stays is (again) in it.
    fn look_at(&mut self, numbers: BTreeSet<u64>, go: &mut Vec<u64>) {
        for number in numbers {
            let Some(held) = self.queue.get(&number) else {
                continue;
            };
            let (touch, client) = (held.touch, key(&held.owner));
            let gated = self.closed.holds_back(touch, &held.owner);
            self.dequeue(client, number, touch);
            let behind = self
                .queued
                .get(&client)
                .is_some_and(|queued| queued.blocks(touch, number));
            if gated || behind {
                self.enqueue(client, number, touch, gated);
            } else {
                go.push(number);
            }
        }
    }

    /// Counts request `number` of `client` in as waiting.
    fn enqueue(&mut self, client: usize, number: u64, touch: Touch, gated: bool) {
        self.queued
            .entry(client)
            .or_default()
            .add(number, touch, gated);
        if let Touch::Slot(slot) = touch {
            *self
                .touching
                .entry(slot)
                .or_default()
                .entry(client)
                .or_default() += 1;
        }
    }

    /// Counts request `number` of `client` out (if it was in).
    fn dequeue(&mut self, client: usize, number: u64, touch: Touch) {
        let Some(queued) = self.queued.get_mut(&client) else {
            return;
        };
        if !queued.held.contains(&number) {
            return;
        }
        queued.remove(number, touch);
        if queued.held.is_empty() {
            self.queued.remove(&client);
        }
        if let Touch::Slot(slot) = touch {
            if let Some(clients) = self.touching.get_mut(&slot) {
                if let Some(count) = clients.get_mut(&client) {
                    *count -= 1;
                    if *count == 0 {
                        clients.remove(&client);
                    }
                }
                if clients.is_empty() {
                    self.touching.remove(&slot);
                }
            }
        }
    }

    /// When the first waiting request is due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.due.first().map(|&(deadline, _)| deadline)
    }

    /// Takes out the waiting requests due by `now`: they get a timeout. Those of their
    /// clients behind them may go at the next [`Holds::release`].
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Held> {
        let mut expired = Vec::new();
        while let Some(&(deadline, number)) = self.due.first() {
            if deadline > now {
                break;
            }
            self.due.pop_first();
            let Some(held) = self.queue.remove(&number) else {
                continue;
            };
            let client = key(&held.owner);
            self.dequeue(client, number, held.touch);
            self.look_again_at(client, false);
            expired.push(held);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client of its own.
    fn client() -> Owner {
        Some(Arc::new(Budget::new(1 << 20)))
    }

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
    fn a_gate_covers_its_slots_and_no_other() {
        let me = None;
        for slots in [vec![], vec![3], vec![3, 70], vec![16_383, 3]] {
            let mut holds = Holds::default();
            let _token = holds.gate(slots.clone(), None);
            for slot in [0, 3, 4, 70, 16_383] {
                assert_eq!(
                    holds.must_wait(Touch::Slot(slot), &me),
                    slots.contains(&slot),
                    "{slots:?} {slot}"
                );
            }
        }
    }

    #[test]
    fn a_clients_own_gate_and_queue_hold_back_only_that_client() {
        let mut holds = Holds::default();
        let (a, b) = (client(), client());
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
    /// The router's way with a gate that stays closed (a fence to a node that does not answer)
    /// while many clients' requests come one at a time: a look at the soonest deadline per
    /// request, then the deadlines falling due a few at a time, each followed by a release.
    /// Each step costs in proportion to the requests it concerns, not to every request
    /// waiting (walks over them all did not finish in 30 s here). Bounded by a watchdog,
    /// generous enough for a slow debug build, so that a walk per step fails instead of
    /// hanging.
    #[test]
    fn a_long_gate_costs_each_request_a_few_steps() {
        const CLIENTS: usize = 1_000;
        const REQUESTS: usize = 200_000;
        let (expired, released, idle) = crate::within_a_watchdog("done", move || {
            let owners: Vec<Owner> = (0..CLIENTS).map(|_| client()).collect();
            let mut holds = Holds::default();
            let fence = holds.gate([7], None);
            let start = Instant::now();
            for i in 0..REQUESTS {
                let owner = &owners[i % CLIENTS];
                assert!(holds.must_wait(Touch::Slot(7), owner));
                holds.push(Held {
                    deadline: Some(start + std::time::Duration::from_micros(i as u64)),
                    owner: owner.clone(),
                    ..held(i, Touch::Slot(7))
                });
                assert_eq!(holds.next_deadline(), Some(start));
            }
            let mut expired = 0;
            for tick in (0..REQUESTS / 2).step_by(10) {
                expired += holds
                    .expired(start + std::time::Duration::from_micros(tick as u64 + 9))
                    .len();
                assert!(holds.release().is_empty());
            }
            drop(fence);
            assert!(holds.open());
            let released = holds.release();
            (expired, released.len(), holds.idle())
        });
        assert_eq!(
            (expired, released, idle),
            (REQUESTS / 2, REQUESTS / 2, true)
        );
    }
    /// What the holds did before they were kept by number: every request waiting looked at
    /// on every release and every timeout, in a list. Random steps give both the same
    /// requests and must see the same requests go, in the same order, and time out.
    #[test]
    fn holds_let_go_what_a_walk_over_every_request_would() {
        #[derive(Default)]
        struct Walk {
            queue: Vec<(usize, Touch, usize, Option<u64>)>,
        }
        impl Walk {
            fn waits(
                queue: &[(usize, Touch, usize, Option<u64>)],
                gates: &[(Vec<u16>, Option<usize>)],
                touch: Touch,
                owner: usize,
            ) -> bool {
                let conflict = |a: Touch, b: Touch| match (a, b) {
                    (Touch::Nothing, _) | (_, Touch::Nothing) => false,
                    (Touch::All, _) | (_, Touch::All) => true,
                    (Touch::Slot(a), Touch::Slot(b)) => a == b,
                };
                let behind = queue.iter().any(|q| q.2 == owner && conflict(q.1, touch));
                let gated = gates.iter().any(|(slots, only)| {
                    only.is_none_or(|o| o == owner)
                        && match touch {
                            Touch::Nothing => false,
                            Touch::Slot(slot) => slots.contains(&slot),
                            Touch::All => true,
                        }
                });
                touch != Touch::Nothing && (behind || gated)
            }
            fn release(&mut self, gates: &[(Vec<u16>, Option<usize>)]) -> Vec<usize> {
                let mut kept = Vec::new();
                let mut go = Vec::new();
                for q in std::mem::take(&mut self.queue) {
                    if Self::waits(&kept, gates, q.1, q.2) {
                        kept.push(q);
                    } else {
                        go.push(q.0);
                    }
                }
                self.queue = kept;
                go
            }
        }
        let owners: Vec<Owner> = (0..4).map(|_| client()).collect();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let start = Instant::now();
        let at = |t: u64| start + std::time::Duration::from_millis(t);
        for _ in 0..2_000 {
            let (mut holds, mut walk) = (Holds::default(), Walk::default());
            let mut gates: Vec<(Vec<u16>, Option<usize>, Token)> = Vec::new();
            let (mut now, mut index) = (0, 0);
            for _ in 0..200 {
                let walk_gates: Vec<(Vec<u16>, Option<usize>)> =
                    gates.iter().map(|(s, o, _)| (s.clone(), *o)).collect();
                match random(10) {
                    0..=4 => {
                        let touch = match random(5) {
                            0 => Touch::All,
                            1 => Touch::Nothing,
                            _ => Touch::Slot(random(4) as u16),
                        };
                        let owner = random(4) as usize;
                        let deadline = (random(4) > 0).then(|| now + 1 + random(20));
                        let waits = Walk::waits(&walk.queue, &walk_gates, touch, owner);
                        assert_eq!(holds.must_wait(touch, &owners[owner]), waits);
                        if waits {
                            holds.push(Held {
                                deadline: deadline.map(at),
                                owner: owners[owner].clone(),
                                ..held(index, touch)
                            });
                            walk.queue.push((index, touch, owner, deadline));
                        }
                        index += 1;
                    }
                    5 => {
                        let slots: Vec<u16> = (0..random(3)).map(|_| random(4) as u16).collect();
                        let only = (random(2) == 0).then(|| random(4) as usize);
                        let token = holds.gate(slots.clone(), only.map(|o| owners[o].clone()));
                        gates.push((slots, only, token));
                    }
                    6 | 7 if !gates.is_empty() => {
                        gates.remove(random(gates.len() as u64) as usize);
                        let walk_gates: Vec<(Vec<u16>, Option<usize>)> =
                            gates.iter().map(|(s, o, _)| (s.clone(), *o)).collect();
                        assert!(holds.open());
                        let went: Vec<usize> = holds.release().iter().map(|h| h.index).collect();
                        assert_eq!(went, walk.release(&walk_gates));
                    }
                    _ => {
                        now += random(8);
                        assert_eq!(
                            holds.next_deadline(),
                            walk.queue.iter().filter_map(|q| q.3).min().map(at)
                        );
                        let mut expired: Vec<usize> =
                            holds.expired(at(now)).iter().map(|h| h.index).collect();
                        expired.sort_unstable();
                        let (out, kept) = std::mem::take(&mut walk.queue)
                            .into_iter()
                            .partition(|q| q.3.is_some_and(|d| d <= now));
                        walk.queue = kept;
                        let out: Vec<usize> = out
                            .iter()
                            .map(|q: &(usize, Touch, usize, Option<u64>)| q.0)
                            .collect();
                        assert_eq!(expired, out);
                        let went: Vec<usize> = holds.release().iter().map(|h| h.index).collect();
                        assert_eq!(went, walk.release(&walk_gates));
                    }
                }
                assert_eq!(holds.idle(), gates.is_empty() && walk.queue.is_empty());
            }
        }
    }
    /// Many gates closed at once (a `-TRYAGAIN` gate per request in flight while slots
    /// migrate): another client's request asks whether one holds it back, and each gate
    /// that opens lets go what it held, in a few steps each. Looking at every gate per
    /// request, and at every waiting request per opening, took a minute here (found by a
    /// hostile pass). Bounded by a watchdog, generous enough for a slow debug build.
    #[test]
    fn many_gates_cost_each_request_a_few_steps() {
        const CLIENTS: usize = 400;
        const BEHIND: usize = 100;
        let (released, pushed, idle) = crate::within_a_watchdog("done", move || {
            let owners: Vec<Owner> = (0..CLIENTS).map(|_| client()).collect();
            let other = client();
            let mut holds = Holds::default();
            let mut tokens: Vec<Token> = owners
                .iter()
                .map(|owner| holds.gate([1], Some(owner.clone())))
                .collect();
            let fences: Vec<Token> = (1_000..3_000)
                .map(|slot| holds.gate([slot], None))
                .collect();
            let mut index = 0;
            for owner in &owners {
                for touch in std::iter::once(Touch::All)
                    .chain((0..BEHIND).map(|i| Touch::Slot(3_000 + i as u16)))
                {
                    assert!(holds.must_wait(touch, owner));
                    holds.push(Held {
                        owner: owner.clone(),
                        ..held(index, touch)
                    });
                    index += 1;
                }
            }
            for i in 0..20_000 {
                assert!(!holds.must_wait(Touch::Slot(3_000 + i % 10_000), &other));
            }
            let mut released = 0;
            while let Some(token) = tokens.pop() {
                drop(token);
                assert!(holds.open());
                released += holds.release().len();
            }
            assert_eq!(
                released, 0,
                "the fences still hold back every request of every slot"
            );
            drop(fences);
            assert!(holds.open());
            released += holds.release().len();
            (released, index, holds.idle())
        });
        assert_eq!((released, idle), (pushed, true));
    }
}
