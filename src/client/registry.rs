//! Every client redmux serves, as Redis's CLIENT LIST, INFO, KILL, PAUSE and UNBLOCK see them.
//! redmux answers those as Redis would if each client had a connection of its own, so it keeps
//! what they show of each client here: one [`Entry`] per client, written by its session (plain
//! atomic stores, a few per request) and read by whoever asks.
//!
//! The registry is the server's, not the settings': it outlives reloads.

use std::{
    collections::HashMap,
    fmt::Write,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU8, Ordering::Relaxed},
        Arc, Mutex, OnceLock,
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::{
    command::CommandId,
    hash::Fast,
    tracking::{Invalidation, Sink},
    upstream::{ConnectionId, Identity},
};

/// Where the connection came from, for CLIENT INFO.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
}

/// A client's addresses as its entry keeps them: 16 bytes where a [`Peer`] takes 64, as every
/// idle client carries them. Both ends of a TCP connection are of one family, and IPv4 fits
/// inline; IPv6 is boxed.
#[derive(Debug)]
enum Addresses {
    Unix,
    V4 {
        addr: SocketAddrV4,
        local: SocketAddrV4,
    },
    Other(Box<Peer>),
}

impl Addresses {
    pub(super) fn new(peer: Peer) -> Self {
        match peer {
            Peer {
                addr: None,
                local: None,
            } => Addresses::Unix,
            Peer {
                addr: Some(SocketAddr::V4(addr)),
                local: Some(SocketAddr::V4(local)),
            } => Addresses::V4 { addr, local },
            other => Addresses::Other(Box::new(other)),
        }
    }

    fn peer(&self) -> Peer {
        match self {
            Addresses::Unix => Peer {
                addr: None,
                local: None,
            },
            Addresses::V4 { addr, local } => Peer {
                addr: Some(SocketAddr::V4(*addr)),
                local: Some(SocketAddr::V4(*local)),
            },
            Addresses::Other(peer) => **peer,
        }
    }
}

/// Seconds on a clock that starts with the first client. CLIENT INFO's `age` and `idle` need
/// no finer grain, and it takes 4 bytes per client where an `Instant` takes 16.
pub(super) fn clock() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    u32::try_from(START.get_or_init(Instant::now).elapsed().as_secs()).unwrap_or(u32::MAX)
}

/// What a client says about itself and who it logged in as: rarely set, read by CLIENT LIST.
#[derive(Debug, Default)]
pub struct Names {
    /// CLIENT SETNAME.
    pub name: Option<Box<[u8]>>,
    /// Who it logged in as, if anyone.
    pub login: Option<Login>,
    /// CLIENT SETINFO LIB-NAME and LIB-VER.
    pub lib: Option<Box<Library>>,
}

/// The client library a client names with CLIENT SETINFO: its name and version.
#[derive(Debug, Default)]
pub struct Library(pub Box<[u8]>, pub Box<[u8]>);

/// Who a client logged in as.
#[derive(Debug)]
pub enum Login {
    /// A named user of `[auth]`, checked by redmux.
    Local(Box<str>),
    /// A Redis user, checked by Redis (no `[auth]`): its commands run as that user. `None`
    /// when that is redmux's own login, whose connections it then shares.
    Upstream(Box<str>, Option<Identity>),
}

impl Login {
    pub fn user(&self) -> &str {
        match self {
            Login::Local(user) | Login::Upstream(user, _) => user,
        }
    }
}

/// Flag bits of an entry, shown by CLIENT LIST's `flags` as Redis does.
pub(super) mod flag {
    /// In MULTI (`x`).
    pub(crate) const MULTI: u8 = 1;
    /// Subscribed to anything (`P`).
    pub(crate) const PUBSUB: u8 = 2;
    /// MONITOR (`O`).
    pub(crate) const MONITOR: u8 = 4;
    /// CLIENT NO-EVICT ON (`e`).
    pub(crate) const NO_EVICT: u8 = 8;
    /// CLIENT TRACKING ON (`t`).
    pub(crate) const TRACKING: u8 = 16;
    /// Its REDIRECT client was gone when an invalidation was due (`R`).
    pub(crate) const TRACKING_BROKEN: u8 = 32;
    /// Tracking in BCAST mode (`B`).
    pub(crate) const TRACKING_BCAST: u8 = 64;
    /// Invalidations wait in the entry for the session to deliver them (not shown).
    pub(crate) const MAIL: u8 = 128;
}

/// Which kind of subscription a count is for.
#[derive(Debug, Clone, Copy)]
pub enum Subscription {
    Channel = 0,
    Pattern = 1,
    Shard = 2,
}

/// One client, as CLIENT LIST shows it. Every idle client has one, so it is kept small (96
/// bytes): what is rarely set is boxed.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    addresses: Addresses,
    /// When the client connected, on [`clock`].
    since: u32,
    /// When it last sent a command, on [`clock`].
    last: AtomicU32,
    db: AtomicU32,
    /// Commands queued in MULTI, or -1.
    multi: AtomicI32,
    subs: [AtomicU32; 3],
    resp3: AtomicBool,
    /// The last command's [`CommandId`] index.
    cmd: AtomicU8,
    flags: AtomicU8,
    killed: AtomicBool,
    /// Present once something rarely set is.
    cold: Mutex<Option<Box<Cold>>>,
    /// The session's task, woken when the client is killed.
    waker: Mutex<Option<Waker>>,
}

/// What wakes a session besides its socket: see [`Entry::poll_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// CLIENT KILL: the session closes the client.
    Killed,
    /// Invalidations wait ([`Entry::take_mail`]).
    Mail,
}

/// What most clients never set.
#[derive(Debug, Default)]
struct Cold {
    names: Names,
    /// The pinned connection a blocking command of this client waits on, if it waits: CLIENT
    /// UNBLOCK unblocks it by its Redis client id.
    blocked_on: Option<ConnectionId>,
    /// CLIENT TRACKING's REDIRECT client (0: none) while the client tracks.
    redirect: Option<u64>,
    /// Invalidations for the client, waiting for its session.
    mail: Mail,
}

/// Invalidations waiting for a session, each kind merged into one, so what waits for a client
/// that does not read stays bounded (see [`Invalidation::merge`]).
#[derive(Debug, Default)]
pub struct Mail {
    /// For the client itself (its own tracking).
    pub own: Option<Invalidation>,
    /// From clients that redirect their invalidations to this one.
    pub redirected: Option<Invalidation>,
}

impl Entry {
    pub(super) fn new(id: u64, peer: Peer) -> Entry {
        let now = clock();
        Entry {
            id,
            addresses: Addresses::new(peer),
            since: now,
            last: AtomicU32::new(now),
            db: AtomicU32::new(0),
            resp3: AtomicBool::new(false),
            cmd: AtomicU8::new(CommandId::NONE.index() as u8),
            flags: AtomicU8::new(0),
            subs: Default::default(),
            multi: AtomicI32::new(-1),
            cold: Mutex::new(None),
            killed: AtomicBool::new(false),
            waker: Mutex::new(None),
        }
    }

    fn cold(&self) -> std::sync::MutexGuard<'_, Option<Box<Cold>>> {
        self.cold.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the client's names and login.
    pub fn names<R>(&self, read: impl FnOnce(&Names) -> R) -> R {
        match self.cold().as_deref() {
            Some(cold) => read(&cold.names),
            None => read(&Names::default()),
        }
    }

    /// Changes the client's names or login.
    pub fn set_names(&self, set: impl FnOnce(&mut Names)) {
        set(&mut self.cold().get_or_insert_with(Box::default).names);
    }

    pub fn peer(&self) -> Peer {
        self.addresses.peer()
    }

    /// The client sent `command`.
    pub fn command(&self, command: CommandId) {
        self.cmd.store(command.index() as u8, Relaxed);
    }

    /// The client was active at `now` (on [`clock`]).
    pub fn active(&self, now: u32) {
        self.last.store(now, Relaxed);
    }

    pub fn set_target(&self, db: u32, resp3: bool) {
        self.db.store(db, Relaxed);
        self.resp3.store(resp3, Relaxed);
    }

    pub fn set_flag(&self, bit: u8, on: bool) {
        if on {
            self.flags.fetch_or(bit, Relaxed);
        } else {
            self.flags.fetch_and(!bit, Relaxed);
        }
    }

    pub fn flag(&self, bit: u8) -> bool {
        self.flags.load(Relaxed) & bit != 0
    }

    pub fn set_subscriptions(&self, kind: Subscription, count: usize) {
        self.subs[kind as usize].store(u32::try_from(count).unwrap_or(u32::MAX), Relaxed);
    }

    /// Commands queued in MULTI; `None` outside MULTI.
    pub fn set_multi(&self, queued: Option<usize>) {
        let value = queued.map_or(-1, |n| i32::try_from(n).unwrap_or(i32::MAX));
        self.multi.store(value, Relaxed);
        self.set_flag(flag::MULTI, queued.is_some());
    }

    /// The client waits on a blocking command on `connection` (`None`: it no longer waits).
    pub fn set_blocked_on(&self, connection: Option<ConnectionId>) {
        let mut cold = self.cold();
        match (cold.as_mut(), connection) {
            (Some(cold), connection) => cold.blocked_on = connection,
            (None, None) => {}
            (None, connection) => {
                *cold = Some(Box::new(Cold {
                    blocked_on: connection,
                    ..Cold::default()
                }))
            }
        }
    }

    /// Whether it waits on a blocking command, and the Redis client id of the connection it
    /// waits on (0 if Redis would not tell it), with the cluster node that connection is on.
    pub fn blocked_on(&self) -> Option<(u64, Option<(String, u16)>)> {
        let cold = self.cold();
        let connection = cold.as_ref()?.blocked_on.as_ref()?;
        Some(connection.get())
    }

    fn pubsub(&self) -> bool {
        self.flag(flag::PUBSUB)
    }

    /// CLIENT TRACKING's REDIRECT client while the client tracks (0: none), for CLIENT LIST.
    pub fn set_redirect(&self, redirect: Option<u64>) {
        let mut cold = self.cold();
        if cold.is_none() && redirect.is_none() {
            return;
        }
        cold.get_or_insert_with(Box::default).redirect = redirect;
    }

    fn redirect(&self) -> Option<u64> {
        self.cold().as_ref().and_then(|cold| cold.redirect)
    }

    /// An invalidation from a client that redirects its own to this one.
    pub fn post(&self, invalidation: Invalidation) {
        self.mail(|mail| Invalidation::merge(&mut mail.redirected, invalidation));
    }

    fn mail(&self, add: impl FnOnce(&mut Mail)) {
        add(&mut self.cold().get_or_insert_with(Box::default).mail);
        self.set_flag(flag::MAIL, true);
        if let Some(waker) = self
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            waker.wake_by_ref();
        }
    }

    /// Whether invalidations wait for the session.
    pub fn has_mail(&self) -> bool {
        self.flag(flag::MAIL)
    }

    /// The invalidations waiting for the session, taken.
    pub fn take_mail(&self) -> Mail {
        let mut cold = self.cold();
        self.set_flag(flag::MAIL, false);
        cold.as_mut()
            .map(|cold| std::mem::take(&mut cold.mail))
            .unwrap_or_default()
    }

    /// Ready once the client is killed or invalidations wait for it; registers the task to
    /// be woken then. Polled by the session, parked or busy, at no cost of a future of its
    /// own.
    pub fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Event> {
        let event = || {
            if self.killed.load(Relaxed) {
                Some(Event::Killed)
            } else if self.has_mail() {
                Some(Event::Mail)
            } else {
                None
            }
        };
        if let Some(event) = event() {
            return Poll::Ready(event);
        }
        self.register(cx);
        event().map_or(Poll::Pending, Poll::Ready)
    }

    fn register(&self, cx: &mut Context<'_>) {
        let mut waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        match waker.as_ref() {
            Some(registered) if registered.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
    }

    /// CLIENT KILL: the session closes the client as soon as it is woken.
    pub fn kill(&self) {
        self.killed.store(true, Relaxed);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            waker.wake();
        }
    }

    pub fn killed(&self) -> bool {
        self.killed.load(Relaxed)
    }

    /// The CLIENT LIST / INFO line, fields in Redis 7.0's order (`clientInfoString` in
    /// Redis's `src/networking.c`), then `lib-name` and `lib-ver` when the client set them
    /// (Redis 7.2). `cmd`: the caller's own command, for its own line. `user`: the user its
    /// commands run as. Buffer sizes are not tracked: they show 0.
    pub fn describe(&self, cmd: Option<&str>, user: &str) -> String {
        let peer = self.peer();
        let addr = peer.addr.map(|a| a.to_string()).unwrap_or_default();
        let laddr = peer.local.map(|a| a.to_string()).unwrap_or_default();
        let bits = self.flags.load(Relaxed);
        let set = |bit: u8| bits & bit != 0;
        // In the order Redis 7.0 lists them.
        let mut flags: String = [
            (set(flag::MONITOR), 'O'),
            (set(flag::PUBSUB), 'P'),
            (set(flag::MULTI), 'x'),
            (self.blocked_on().is_some(), 'b'),
            (set(flag::TRACKING), 't'),
            (set(flag::TRACKING_BROKEN), 'R'),
            (set(flag::TRACKING_BCAST), 'B'),
            (peer.addr.is_none(), 'U'),
            (set(flag::NO_EVICT), 'e'),
        ]
        .into_iter()
        .filter_map(|(on, letter)| on.then_some(letter))
        .collect();
        if flags.is_empty() {
            flags.push('N');
        }
        let now = clock();
        let age = now.saturating_sub(self.since);
        let idle = now.saturating_sub(self.last.load(Relaxed));
        let (name, lib) = self.names(|names| {
            let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
            let name = names.name.as_deref().map(text).unwrap_or_default();
            let lib = names.lib.as_ref().map(|lib| (text(&lib.0), text(&lib.1)));
            (name, lib)
        });
        let command = cmd.unwrap_or_else(|| {
            CommandId::from_index(usize::from(self.cmd.load(Relaxed))).name_or_null()
        });
        let [sub, psub, ssub] = [0, 1, 2].map(|i| self.subs[i].load(Relaxed));
        let mut line = format!(
            "id={} addr={addr} laddr={laddr} fd=-1 name={name} age={age} idle={idle} \
             flags={flags} db={} sub={sub} psub={psub} ssub={ssub} multi={} qbuf=0 \
             qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 \
             events=r cmd={command} user={user} redir={} resp={}",
            self.id,
            self.db.load(Relaxed),
            self.multi.load(Relaxed),
            self.redirect().map_or(-1, |id| id as i64),
            if self.resp3.load(Relaxed) { 3 } else { 2 }
        );
        if let Some((name, version)) = lib {
            let _ = write!(line, " lib-name={name} lib-ver={version}");
        }
        line.push('\n');
        line
    }
}

/// CLIENT PAUSE's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PauseMode {
    /// Commands that may write (Redis's `write` and `may_replicate` commands) wait.
    Write = 1,
    /// Every command waits.
    All = 2,
}

/// CLIENT PAUSE, for every client of the server.
#[derive(Debug)]
struct Pause {
    /// 0: none, else a [`PauseMode`]; read once per request, so a plain atomic.
    mode: AtomicU8,
    until: Mutex<Instant>,
    /// Woken on UNPAUSE.
    unpaused: Notify,
}

/// Every client of a server.
#[derive(Debug)]
pub struct Clients {
    /// Keyed by the ids redmux gives out: [`Fast`], not SipHash.
    entries: Mutex<HashMap<u64, Arc<Entry>, Fast>>,
    pause: Pause,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            entries: Mutex::default(),
            pause: Pause {
                mode: AtomicU8::new(0),
                until: Mutex::new(Instant::now()),
                unpaused: Notify::new(),
            },
        }
    }
}

/// CLIENT LIST's and KILL's filters.
#[derive(Debug, Default)]
pub struct Filter {
    pub ids: Option<Vec<u64>>,
    /// `normal` (`true`) or `pubsub` (`false`); `master` and `replica` match no redmux client.
    pub normal: Option<bool>,
    pub nobody: bool,
    pub addr: Option<String>,
    pub laddr: Option<String>,
    pub user: Option<String>,
    /// The caller, when it must not match (CLIENT KILL's SKIPME, on by default).
    pub skip: Option<u64>,
}

impl Clients {
    /// A new client's entry, listed until [`Clients::remove`].
    pub fn register(&self, id: u64, peer: Peer) -> Arc<Entry> {
        let entry = Arc::new(Entry::new(id, peer));
        self.lock().insert(id, entry.clone());
        entry
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>, Fast>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: u64) -> Option<Arc<Entry>> {
        self.lock().get(&id).cloned()
    }

    /// The clients `filter` matches, by id. `user_of` names the user an entry runs as.
    pub fn matching(&self, filter: &Filter, user_of: impl Fn(&Entry) -> String) -> Vec<Arc<Entry>> {
        if filter.nobody {
            return Vec::new();
        }
        // Sorted before the registry is locked, then searched: looking through every id for
        // every client held the lock (and every thread that registers a client) for clients ×
        // ids steps.
        let ids = filter.ids.as_ref().map(|ids| {
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids.dedup();
            ids
        });
        let mut found: Vec<Arc<Entry>> = self
            .lock()
            .values()
            .filter(|entry| {
                let peer = entry.peer();
                ids.as_ref()
                    .is_none_or(|ids| ids.binary_search(&entry.id).is_ok())
                    && filter.normal.is_none_or(|normal| normal != entry.pubsub())
                    && filter.skip != Some(entry.id)
                    && filter
                        .addr
                        .as_ref()
                        .is_none_or(|addr| peer.addr.is_some_and(|a| a.to_string() == *addr))
                    && filter
                        .laddr
                        .as_ref()
                        .is_none_or(|addr| peer.local.is_some_and(|a| a.to_string() == *addr))
            })
            .cloned()
            .collect();
        if let Some(user) = &filter.user {
            found.retain(|entry| user_of(entry) == *user);
        }
        found.sort_by_key(|entry| entry.id);
        found
    }

    /// CLIENT PAUSE: as Redis, a pause extends the current one and never weakens it.
    pub fn pause(&self, duration: Duration, mode: PauseMode) {
        let until = Instant::now() + duration;
        let mut current = self.pause.until.lock().unwrap_or_else(|e| e.into_inner());
        let active = self.pause.mode.load(Relaxed) != 0 && *current > Instant::now();
        if !active || until > *current {
            *current = until;
        }
        let mode = if active {
            mode.max(self.mode().unwrap_or(mode))
        } else {
            mode
        };
        self.pause.mode.store(mode as u8, Relaxed);
    }

    pub fn unpause(&self) {
        self.pause.mode.store(0, Relaxed);
        self.pause.unpaused.notify_waiters();
    }

    /// The pause in effect, if any (one atomic load): CLIENT PAUSE may hold requests.
    pub fn paused(&self) -> Option<PauseMode> {
        self.mode()
    }

    fn mode(&self) -> Option<PauseMode> {
        match self.pause.mode.load(Relaxed) {
            1 => Some(PauseMode::Write),
            2 => Some(PauseMode::All),
            _ => None,
        }
    }

    /// Whether a request must wait for a pause to end (`write`: it may write), and until when
    /// at most. One atomic load when nothing is paused.
    pub fn held(&self, write: bool) -> Option<Instant> {
        let mode = self.mode()?;
        if mode == PauseMode::Write && !write {
            return None;
        }
        let until = *self.pause.until.lock().unwrap_or_else(|e| e.into_inner());
        if until <= Instant::now() {
            // Over by itself.
            let _ = self
                .pause
                .mode
                .compare_exchange(mode as u8, 0, Relaxed, Relaxed);
            return None;
        }
        Some(until)
    }

    /// Waits until `until`, or an UNPAUSE.
    pub async fn wait(&self, until: Instant) {
        let unpaused = self.pause.unpaused.notified();
        tokio::pin!(unpaused);
        unpaused.as_mut().enable();
        if self.mode().is_none() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => {}
            () = unpaused => {}
        }
    }
}

/// Invalidations for the client's own tracking, delivered by its session.
impl Sink for Entry {
    fn invalidate(&self, invalidation: Invalidation) {
        self.mail(|mail| Invalidation::merge(&mut mail.own, invalidation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle client holds an entry (in an `Arc`, and in the registry's map): what is
    /// rarely set stays boxed, so it fits 96 bytes.
    #[test]
    fn an_entry_is_small() {
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 96, "an entry is {size} bytes");
    }

    /// CLIENT LIST ID and CLIENT KILL ID with 400,000 ids among 20,000 clients: a search per
    /// client under the registry's lock, not a walk over the ids (minutes here). Bounded by a
    /// watchdog, generous enough for a slow debug build, so that the walk fails.
    #[test]
    fn many_ids_cost_a_search_per_client() {
        let clients = Arc::new(Clients::default());
        let peer = Peer {
            addr: None,
            local: None,
        };
        let entries: Vec<Arc<Entry>> = (1..=20_000).map(|id| clients.register(id, peer)).collect();
        let ids: Vec<u64> = (0..400_000)
            .map(|i| (i * 7919) % 1_000_000 + 15_000)
            .collect();
        let asked: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let expected = (15_000..=20_000)
            .filter(|id| asked.contains(id))
            .collect::<Vec<u64>>();
        let filter = Filter {
            ids: Some(ids),
            ..Filter::default()
        };
        let matching = clients.clone();
        let found = crate::within_a_watchdog("matched", move || {
            let found = matching.matching(&filter, |_| String::new());
            found.iter().map(|entry| entry.id).collect::<Vec<u64>>()
        });
        assert_eq!(found, expected);
        drop(entries);
    }

    #[test]
    fn a_pause_extends_and_never_weakens() {
        let clients = Clients::default();
        assert_eq!(clients.held(true), None);
        clients.pause(Duration::from_secs(60), PauseMode::All);
        clients.pause(Duration::from_millis(1), PauseMode::Write);
        assert_eq!(clients.paused(), Some(PauseMode::All), "not weakened");
        assert!(clients.held(false).is_some(), "ALL holds reads too");
        clients.unpause();
        assert_eq!(clients.held(true), None);
        clients.pause(Duration::ZERO, PauseMode::Write);
        assert_eq!(clients.held(true), None, "over by itself");
    }
}
