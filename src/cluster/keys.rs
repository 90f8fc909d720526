//! Where a request's keys are, so it can go to the master that owns their slot.
//!
//! A Redis Cluster node runs a keyed command only if all its keys hash to one slot and that
//! slot is its own; it finds the keys the way `COMMAND GETKEYS` does
//! (`getKeysFromCommandWithSpecs` in Redis's `src/db.c`). redmux must find the same keys, or it
//! sends a command to a node that answers `-MOVED`, or refuses with `-CROSSSLOT` a command
//! Redis would run. So this module does what Redis does, step by step:
//!
//! 1. A request whose argument count does not fit the command's arity has no keys: Redis
//!    checks arity before it looks at keys, so any node gives the same arity error.
//! 2. The command's key specs (`COMMAND INFO`, field 9) are followed in order: each starts at
//!    an index or just after a keyword, then takes a range or a `numkeys`-counted run.
//! 3. If a spec cannot be followed (an unparsable `numkeys`, a range past the end, a spec
//!    Redis marks incomplete or unknown), the keys found so far are dropped and the command's
//!    own key function decides ([`GetKeys`]), as Redis falls back to its `getkeys_proc`.
//!
//! Names and keywords are compared case-insensitively. One deliberate difference: Redis
//! compares keywords (`STORE`, `STREAMS`, `KEYS`...) as C strings, so `store\0x` is STORE to
//! it; here an argument with a NUL byte is never a known name or keyword. Such a request may
//! then be sent with fewer keys than Redis sees, and Redis answers `-CROSSSLOT` or `-MOVED`
//! itself; it never runs on a slot it does not own.
//!
//! Commands without keys are classified by [`Scope`]: most can run on any master, a few concern
//! every master (DBSIZE, KEYS, FLUSHALL, SCRIPT LOAD...) or need a node-aware cursor (SCAN).

use std::{cell::RefCell, sync::OnceLock};

use crate::resp::Args;

use super::slot::slot;

mod table;

/// Where a request must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// It has keys: it runs on the master of their slot, or gets `-CROSSSLOT` if they span
    /// slots.
    Keys,
    /// No keys (a keyless command, a keyed command given none, a wrong argument count, or a
    /// name Redis 7.0 does not have): any master gives the answer Redis would.
    NoKeys,
    /// It concerns the whole keyspace or every node's scripts and functions: it runs on every
    /// master and the replies are combined as Redis's `response_policy` tip says.
    AllMasters(Combine),
    /// RANDOMKEY: the keys of one master picked at random.
    RandomMaster,
    /// SCAN: a cursor walks one master's keyspace, so the cursor given back to the client
    /// must say which master it belongs to.
    Scan,
    /// SPUBLISH, SSUBSCRIBE, SUNSUBSCRIBE: sharded channels hash to slots as keys do; the
    /// "keys" are the channel names.
    ShardChannels,
}

/// How the replies of a command run on every master make one reply (Redis 7.0's
/// `response_policy` tips, `COMMAND INFO` field 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// `agg_sum`: integers added up (DBSIZE).
    Sum,
    /// No response policy on an `all_shards` command: the arrays concatenated (KEYS).
    Concat,
    /// `all_succeeded`: the first error, else any one reply (they are equal: FLUSHALL's `+OK`,
    /// SCRIPT LOAD's SHA1, FUNCTION LOAD's library name).
    AllSucceeded,
    /// `one_succeeded`: a success if any master succeeded, else an error (SCRIPT KILL and
    /// FUNCTION KILL: only the master running the script can kill it).
    OneSucceeded,
    /// `agg_logical_and`: element-wise AND of integer arrays (SCRIPT EXISTS).
    LogicalAnd,
}

/// The keys of one request, in the order `COMMAND GETKEYS` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys<'a> {
    scope: Scope,
    keys: Vec<&'a [u8]>,
}

/// The slot a request's keys hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOf {
    /// No keys.
    None,
    /// Every key is in this slot.
    One(u16),
    /// The keys span slots: Redis Cluster answers `-CROSSSLOT`.
    Cross,
}

impl<'a> Keys<'a> {
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// The key arguments (for [`Scope::ShardChannels`], the channels).
    pub fn keys(&self) -> &[&'a [u8]] {
        &self.keys
    }

    /// The slot of all the keys, if they share one.
    pub fn slot(&self) -> SlotOf {
        slot_of(self.keys.iter().copied())
    }
}

/// The slot of `keys`: none, one, or several (Redis Cluster's `-CROSSSLOT`).
pub fn slot_of<'k>(keys: impl IntoIterator<Item = &'k [u8]>) -> SlotOf {
    let mut keys = keys.into_iter();
    let Some(first) = keys.next() else {
        return SlotOf::None;
    };
    let first = slot(first);
    match keys.all(|key| slot(key) == first) {
        true => SlotOf::One(first),
        false => SlotOf::Cross,
    }
}

/// The keys of a complete multibulk request (as [`crate::resp::RequestDecoder`] accepts it).
pub fn keys(request: &[u8]) -> Keys<'_> {
    let argv: Vec<&[u8]> = Args::new(request).collect();
    let (scope, positions) = key_positions(&argv);
    Keys {
        scope,
        keys: positions.into_iter().map(|at| argv[at]).collect(),
    }
}

/// The scope of a request and the slot of its keys: what [`keys`] says, without keeping the
/// keys. The router asks it of every request, so a request of up to 16 arguments is read
/// without allocating for them.
pub fn scope_and_slot(request: &[u8]) -> (Scope, SlotOf) {
    if let Some(slot) = first_key_only(request) {
        return (Scope::Keys, SlotOf::One(slot));
    }
    const ON_STACK: usize = 16;
    let mut stack: [&[u8]; ON_STACK] = [&[]; ON_STACK];
    let mut args = Args::new(request);
    let mut argc = 0;
    for (slot, arg) in stack.iter_mut().zip(args.by_ref()) {
        *slot = arg;
        argc += 1;
    }
    let heap: Vec<&[u8]>;
    let argv: &[&[u8]] = match args.next() {
        None => &stack[..argc],
        Some(more) => {
            heap = stack.iter().copied().chain([more]).chain(args).collect();
            &heap
        }
    };
    POSITIONS.with_borrow_mut(|positions| {
        let scope = positions_into(argv, positions);
        let slot = slot_of(positions.iter().filter_map(|&at| argv.get(at).copied()));
        // A request with a million keys must not keep its vector for the thread's lifetime.
        if positions.capacity() > ON_STACK {
            *positions = Vec::new();
        }
        (scope, slot)
    })
}

/// The slot of a request of the commonest shape, a command whose one key is its first
/// argument (GET, SET, INCR, HGET, LPUSH...), read without collecting the arguments or their
/// key positions: half of what the general path costs, on every request sent to a cluster.
/// `None` for any other shape (and for anything [`scope_of`] names, none of which has that
/// shape), which the general path reads.
fn first_key_only(request: &[u8]) -> Option<u16> {
    let mut args = Args::new(request);
    let (name, key) = (args.next()?, args.next()?);
    let argc = 2 + args.count();
    let command = lookup(name, Some(key))?;
    (command.first_key_only() && arity_fits(command.arity, argc)).then(|| slot(key))
}

thread_local! {
    /// The key positions [`scope_and_slot`] reads, kept between calls.
    static POSITIONS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Where a command's keys are, given all its arguments (the name first): the scope and the
/// indexes into `argv` of the keys, in the order `COMMAND GETKEYS` lists them. A key may be
/// listed twice if Redis lists it twice (two specs naming the same argument).
pub fn key_positions(argv: &[&[u8]]) -> (Scope, Vec<usize>) {
    let mut positions = Vec::new();
    let scope = positions_into(argv, &mut positions);
    (scope, positions)
}

/// The name Redis gives (`container|subcommand` for a subcommand) of a command given an
/// argument count its arity does not allow (`GET`, `SET k`, `DBSIZE x`): Redis refuses it
/// before anything else, in MULTI too. Known for the commands with keys and those of
/// [`EVERY_MASTER`]; `None` for anything else.
pub fn wrong_arity(request: &[u8]) -> Option<&'static [u8]> {
    let mut args = Args::new(request);
    let (name, sub) = (args.next()?, args.next());
    let argc = 1 + usize::from(sub.is_some()) + args.count();
    let (full, arity) = match lookup(name, sub) {
        Some(command) => (command.name, command.arity),
        None => every_master(name, sub)?,
    };
    (!arity_fits(arity, argc)).then_some(full)
}

/// The commands [`scope_of`] sends to every master or walks them with (SCAN), and their
/// containers, with Redis 7.0's full names and arities (`COMMAND INFO`): the table holds only
/// the commands with keys.
const EVERY_MASTER: &[(&[u8], i16)] = &[
    (b"dbsize", 1),
    (b"flushall", -1),
    (b"flushdb", -1),
    (b"function", -2),
    (b"function|delete", 3),
    (b"function|flush", -2),
    (b"function|kill", 2),
    (b"function|load", -3),
    (b"function|restore", -3),
    (b"keys", 2),
    (b"scan", -2),
    (b"script", -2),
    (b"script|exists", -3),
    (b"script|flush", -2),
    (b"script|kill", 2),
    (b"script|load", 3),
];

/// The row of [`EVERY_MASTER`] for `name` (and `sub`, for SCRIPT and FUNCTION).
fn every_master(name: &[u8], sub: Option<&[u8]>) -> Option<(&'static [u8], i16)> {
    let mut buf = [0u8; NAME_MAX];
    let mut len = lower_into(&mut buf, 0, name)?;
    if let Some(sub) = sub.filter(|_| matches!(&buf[..len], b"script" | b"function")) {
        len = lower_into(&mut buf, len, b"|")?;
        len = lower_into(&mut buf, len, sub)?;
    }
    EVERY_MASTER
        .iter()
        .find(|(full, _)| *full == &buf[..len])
        .copied()
}

/// [`key_positions`] into `positions`, which it clears first: the router's hot path reuses
/// one vector rather than allocating one per request.
fn positions_into(argv: &[&[u8]], positions: &mut Vec<usize>) -> Scope {
    positions.clear();
    let Some(name) = argv.first() else {
        return Scope::NoKeys;
    };
    let sub = argv.get(1).copied();
    if let Some(scope) = scope_of(name, sub) {
        if let Scope::ShardChannels = scope {
            channel_positions(name, argv.len(), positions);
        }
        return scope;
    }
    let Some(command) = lookup(name, sub) else {
        return Scope::NoKeys;
    };
    if arity_fits(command.arity, argv.len()) {
        command.find(argv, positions);
    }
    match positions.is_empty() {
        true => Scope::NoKeys,
        false => Scope::Keys,
    }
}

/// The keyless commands that are not [`Scope::NoKeys`]. Redis 7.0 tips more commands
/// `request_policy:all_shards` or `all_nodes` (PING, INFO, WAIT, CONFIG SET, LATENCY, SLOWLOG,
/// MEMORY STATS...), but those describe one node to a client talking to one node, so they stay
/// with any master; the ones here change or read what every master holds.
fn scope_of(name: &[u8], sub: Option<&[u8]>) -> Option<Scope> {
    let is = |word: &[u8]| name.eq_ignore_ascii_case(word);
    let sub_is = |word: &[u8]| sub.is_some_and(|sub| sub.eq_ignore_ascii_case(word));
    let scope = if is(b"dbsize") {
        Scope::AllMasters(Combine::Sum)
    } else if is(b"keys") {
        Scope::AllMasters(Combine::Concat)
    } else if is(b"flushall") || is(b"flushdb") {
        Scope::AllMasters(Combine::AllSucceeded)
    } else if is(b"randomkey") {
        Scope::RandomMaster
    } else if is(b"scan") {
        Scope::Scan
    } else if is(b"spublish") || is(b"ssubscribe") || is(b"sunsubscribe") {
        Scope::ShardChannels
    } else if is(b"script") {
        if sub_is(b"load") || sub_is(b"flush") {
            Scope::AllMasters(Combine::AllSucceeded)
        } else if sub_is(b"exists") {
            Scope::AllMasters(Combine::LogicalAnd)
        } else if sub_is(b"kill") {
            Scope::AllMasters(Combine::OneSucceeded)
        } else {
            return None;
        }
    } else if is(b"function") {
        if sub_is(b"load") || sub_is(b"delete") || sub_is(b"flush") || sub_is(b"restore") {
            Scope::AllMasters(Combine::AllSucceeded)
        } else if sub_is(b"kill") {
            Scope::AllMasters(Combine::OneSucceeded)
        } else {
            return None;
        }
    } else {
        return None;
    };
    Some(scope)
}

/// The channels of a sharded pub/sub command (`getChannelsFromCommand` in Redis's
/// `src/db.c`): SPUBLISH's one channel, every argument of the other two.
fn channel_positions(name: &[u8], argc: usize, positions: &mut Vec<usize>) {
    let end = match name.eq_ignore_ascii_case(b"spublish") {
        true => argc.min(2),
        false => argc,
    };
    positions.extend(1..end);
}

/// Whether `argc` arguments (the name included) fit `arity`: exactly `arity`, or at least
/// `-arity` when it is negative.
fn arity_fits(arity: i16, argc: usize) -> bool {
    let argc = i64::try_from(argc).unwrap_or(i64::MAX);
    let arity = i64::from(arity);
    match arity >= 0 {
        true => argc == arity,
        false => argc >= -arity,
    }
}

/// The longest `name|subcommand` in the table is shorter than this; longer names are unknown.
const NAME_MAX: usize = 40;

/// The row for a command, or for `container|subcommand` when the command is a container with
/// keys in a subcommand (OBJECT, MEMORY, XINFO, XGROUP).
fn lookup(name: &[u8], sub: Option<&[u8]>) -> Option<&'static Command> {
    let mut buf = [0u8; NAME_MAX];
    let mut len = lower_into(&mut buf, 0, name)?;
    if let Some(found) = find_row(&buf[..len]) {
        return Some(found);
    }
    // Only containers have `|` rows; a plain command never matches one.
    let sub = sub?;
    len = lower_into(&mut buf, len, b"|")?;
    len = lower_into(&mut buf, len, sub)?;
    find_row(&buf[..len])
}

/// Appends `bytes` in lower case to `buf` at `at`; `None` if it does not fit or has a NUL
/// (never a known name).
fn lower_into(buf: &mut [u8; NAME_MAX], at: usize, bytes: &[u8]) -> Option<usize> {
    let end = at.checked_add(bytes.len()).filter(|&end| end <= NAME_MAX)?;
    for (slot, &b) in buf[at..end].iter_mut().zip(bytes) {
        if b == 0 {
            return None;
        }
        *slot = b.to_ascii_lowercase();
    }
    Some(end)
}

/// The row named `lower`. Every request is looked up, so the search starts from the rows
/// that begin with the same byte (a dozen at most, not the whole table), and compares lengths
/// before bytes.
fn find_row(lower: &[u8]) -> Option<&'static Command> {
    static FIRST: OnceLock<[(u16, u16); 256]> = OnceLock::new();
    let first = FIRST.get_or_init(|| {
        let mut first = [(0u16, 0u16); 256];
        for (at, row) in table::COMMANDS.iter().enumerate() {
            let at = u16::try_from(at).unwrap_or(u16::MAX);
            let Some(&byte) = row.name.first() else {
                continue;
            };
            let bucket = &mut first[usize::from(byte)];
            if bucket.1 == 0 {
                bucket.0 = at;
            }
            bucket.1 = at + 1;
        }
        first
    });
    let (from, to) = first[usize::from(*lower.first()?)];
    table::COMMANDS
        .get(usize::from(from)..usize::from(to))?
        .iter()
        .find(|row| row.name.len() == lower.len() && row.name == lower)
}

// === The key spec model ===

/// A command with keys: a row of [`table::COMMANDS`].
#[derive(Debug)]
struct Command {
    /// Lower case; `container|subcommand` for a subcommand.
    name: &'static [u8],
    /// `COMMAND INFO` field 2: the exact argument count, or minus the least one.
    arity: i16,
    /// Redis's key specs, in its order.
    specs: &'static [Spec],
    /// What Redis does when a spec cannot be followed.
    getkeys: GetKeys,
}

const fn cmd(name: &'static [u8], arity: i16, specs: &'static [Spec], getkeys: GetKeys) -> Command {
    Command {
        name,
        arity,
        specs,
        getkeys,
    }
}

/// One key spec (`COMMAND INFO` field 9): where to start looking, then which arguments from
/// there are keys.
#[derive(Debug, Clone, Copy)]
struct Spec {
    begin: Begin,
    find: Find,
    /// Redis flags the spec `incomplete`: its keys are found, then dropped for the command's
    /// own function's answer (MIGRATE's `KEYS`).
    incomplete: bool,
}

#[derive(Debug, Clone, Copy)]
enum Begin {
    /// At this argument.
    Index(usize),
    /// Just after the first argument equal to `keyword`, searching from `from` towards the end
    /// (positive `from`), or from `argc + from` towards the start (negative).
    Keyword { keyword: &'static [u8], from: isize },
    /// Redis cannot say (SORT's BY, GET and STORE): always a fallback to the command's own
    /// function.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
enum Find {
    /// Keys from the start to `last` (counted from the start if ≥ 0; from the end if < 0 and
    /// `limit` is 0; else up to `1/limit` of what follows the start), every `step`.
    Range {
        last: isize,
        step: usize,
        limit: usize,
    },
    /// The argument at the start is a count; that many keys follow it.
    Keynum,
}

/// `index pos, range 0`: one key at `pos`.
const fn at(pos: usize) -> Spec {
    range(pos, 0, 1)
}

/// `index pos, range last step`.
const fn range(pos: usize, last: isize, step: usize) -> Spec {
    Spec {
        begin: Begin::Index(pos),
        find: Find::Range {
            last,
            step,
            limit: 0,
        },
        incomplete: false,
    }
}

/// `index pos, keynum 0 1 1`: a count at `pos`, then that many keys.
const fn numkeys(pos: usize) -> Spec {
    Spec {
        begin: Begin::Index(pos),
        find: Find::Keynum,
        incomplete: false,
    }
}

/// `keyword keyword from, range last step limit`.
const fn after(
    keyword: &'static [u8],
    from: isize,
    last: isize,
    step: usize,
    limit: usize,
) -> Spec {
    Spec {
        begin: Begin::Keyword { keyword, from },
        find: Find::Range { last, step, limit },
        incomplete: false,
    }
}

const fn incomplete(spec: Spec) -> Spec {
    Spec {
        incomplete: true,
        ..spec
    }
}

/// `unknown`: Redis cannot describe these keys with a spec.
const UNKNOWN: Spec = Spec {
    begin: Begin::Unknown,
    find: Find::Keynum,
    incomplete: true,
};

/// A command's own key function (`getkeys_proc`), which Redis asks when a spec cannot be
/// followed; each mirrors the one named in Redis's `src/db.c`.
#[derive(Debug, Clone, Copy)]
enum GetKeys {
    /// None: a spec that cannot be followed means no keys.
    None,
    /// `genericGetKeys`: the count at `count` (read with C's `atoi`), that many keys from
    /// `first`, then the destination at `store` (0: none). EVAL, FCALL, ZUNIONSTORE, LMPOP...
    Numkeys {
        store: usize,
        count: usize,
        first: usize,
    },
    /// `sortGetKeys`: argument 1 and the last `STORE` destination.
    Sort,
    /// `sortROGetKeys`: argument 1.
    SortRo,
    /// `migrateGetKeys`: argument 3, or the arguments after `KEYS` when argument 3 is empty.
    Migrate,
    /// `georadiusGetKeys`: argument 1 and the last `STORE`/`STOREDIST` destination.
    Georadius,
    /// `xreadGetKeys`: the first half of what follows `STREAMS`.
    Xread,
    /// `setGetKeys`, `bitfieldGetKeys`: argument 1.
    First,
}

impl Command {
    /// Whether argument 1 is the command's one key whenever its arity fits: a single spec
    /// `index 1, range 0`, or no spec and a key function that answers argument 1.
    fn first_key_only(&self) -> bool {
        match self.specs {
            [] => matches!(self.getkeys, GetKeys::First | GetKeys::SortRo),
            [Spec {
                begin: Begin::Index(1),
                find: Find::Range { last: 0, .. },
                incomplete: false,
            }] => true,
            _ => false,
        }
    }

    fn find(&self, argv: &[&[u8]], out: &mut Vec<usize>) {
        if !self.specs.is_empty() && follow_specs(self.specs, argv, out) {
            return;
        }
        out.clear();
        self.getkeys.run(argv, out);
    }
}

/// `getKeysUsingKeySpecs`: the keys every spec names, or `false` if one cannot be followed.
fn follow_specs(specs: &[Spec], argv: &[&[u8]], out: &mut Vec<usize>) -> bool {
    let argc = argv.len() as isize;
    for spec in specs {
        let first = match spec.begin {
            Begin::Index(pos) => pos as isize,
            Begin::Keyword { keyword, from } => match find_keyword(argv, keyword, from) {
                Some(at) => at as isize + 1,
                // No such keyword: this spec names no keys, the others still count.
                None => continue,
            },
            Begin::Unknown => return false,
        };
        let (first, last, step) = match spec.find {
            Find::Range { last, step, limit } => {
                let end = if last >= 0 {
                    first + last
                } else if limit == 0 {
                    argc + last
                } else {
                    first + ((argc - first) / limit as isize + last)
                };
                (first, end, step as isize)
            }
            Find::Keynum => {
                let Some(count) = argv.get(first as usize).and_then(|arg| string2ll(arg)) else {
                    return false;
                };
                if count < 0 {
                    return false;
                }
                let keys_from = first + 1;
                // Redis computes `first + (int)numkeys - 1`: the count is cut to 32 bits, so
                // 4294967297 counts as 1, and 2147483648 as a negative the check below refuses.
                let end = keys_from + count as i32 as isize - 1;
                (keys_from, end, 1)
            }
        };
        if last >= argc || last < first || first >= argc {
            return false;
        }
        let mut at = first;
        while at <= last {
            out.push(at as usize);
            at += step.max(1);
        }
        if spec.incomplete {
            return false;
        }
    }
    true
}

/// The index of the first argument equal to `keyword`, searched as a keyword spec searches:
/// from `from` up to `argc - 2`, or from `argc + from` down to 2.
fn find_keyword(argv: &[&[u8]], keyword: &[u8], from: isize) -> Option<usize> {
    let argc = argv.len() as isize;
    let is_keyword = |at: isize| {
        argv.get(at as usize)
            .is_some_and(|arg| arg.eq_ignore_ascii_case(keyword))
    };
    if from > 0 {
        (from..argc - 1)
            .find(|&at| is_keyword(at))
            .map(|at| at as usize)
    } else {
        let start = argc + from;
        (2..=start)
            .rev()
            .take_while(|&at| at < argc)
            .find(|&at| is_keyword(at))
            .map(|at| at as usize)
    }
}

impl GetKeys {
    fn run(self, argv: &[&[u8]], out: &mut Vec<usize>) {
        let argc = argv.len();
        let is =
            |at: usize, word: &[u8]| argv.get(at).is_some_and(|a| a.eq_ignore_ascii_case(word));
        match self {
            GetKeys::None => {}
            GetKeys::First | GetKeys::SortRo => out.push(1),
            GetKeys::Numkeys {
                store,
                count,
                first,
            } => {
                let Some(arg) = argv.get(count) else {
                    return;
                };
                let num = i64::from(atoi(arg));
                let room = argc as i64 - first as i64;
                if num < 1 || num > room {
                    return;
                }
                out.extend(first..first + num as usize);
                if store != 0 {
                    out.push(store);
                }
            }
            GetKeys::Sort => {
                out.push(1);
                let mut store = None;
                let mut at = 2;
                while at < argc {
                    if is(at, b"limit") {
                        at += 2;
                    } else if is(at, b"store") && at + 1 < argc {
                        // The last STORE wins, as it does when SORT runs.
                        store = Some(at + 1);
                    } else if is(at, b"get") || is(at, b"by") {
                        at += 1;
                    }
                    at += 1;
                }
                out.extend(store);
            }
            GetKeys::Migrate => {
                let (mut first, mut num) = (3, 1);
                let mut at = 6;
                while argc > 6 && at < argc {
                    if is(at, b"keys") {
                        match argv.get(3).is_some_and(|key| !key.is_empty()) {
                            // A syntax error MIGRATE itself reports.
                            true => num = 0,
                            false => (first, num) = (at + 1, argc - at - 1),
                        }
                        break;
                    }
                    if is(at, b"auth") {
                        at += 1;
                    } else if is(at, b"auth2") {
                        at += 2;
                    }
                    at += 1;
                }
                out.extend((first..first + num).filter(|&at| at < argc));
            }
            GetKeys::Georadius => {
                out.push(1);
                let mut store = None;
                let mut at = 5;
                while at < argc {
                    if (is(at, b"store") || is(at, b"storedist")) && at + 1 < argc {
                        store = Some(at + 1);
                        at += 1;
                    }
                    at += 1;
                }
                out.extend(store);
            }
            GetKeys::Xread => {
                let mut streams = None;
                let mut at = 1;
                while at < argc {
                    if is(at, b"block") || is(at, b"count") {
                        at += 1;
                    } else if is(at, b"group") {
                        at += 2;
                    } else if is(at, b"noack") {
                    } else if is(at, b"streams") {
                        streams = Some(at);
                        break;
                    } else {
                        break;
                    }
                    at += 1;
                }
                let Some(streams) = streams else {
                    return;
                };
                let rest = argc - streams - 1;
                if rest == 0 || rest % 2 != 0 {
                    return;
                }
                out.extend(streams + 1..streams + 1 + rest / 2);
            }
        }
    }
}

/// Redis's `string2ll`: what a key spec's count must be.
fn string2ll(arg: &[u8]) -> Option<i64> {
    crate::resp::parse_int(arg)
}

/// C's `atoi` as glibc has it, `(int) strtol(arg, NULL, 10)`: leading white space, a sign,
/// digits up to the first other byte (a NUL ends the C string), saturating at the `long`
/// bounds, then cut to 32 bits. Redis's `genericGetKeys` reads counts this way, so `2abc` is
/// 2 there.
fn atoi(arg: &[u8]) -> i32 {
    let mut rest = arg;
    while let [b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r', tail @ ..] = rest {
        rest = tail;
    }
    let negative = matches!(rest.first(), Some(b'-'));
    if let [b'-' | b'+', tail @ ..] = rest {
        rest = tail;
    }
    let mut value: i64 = 0;
    for &b in rest.iter().take_while(|b| b.is_ascii_digit()) {
        let digit = i64::from(b - b'0');
        value = match negative {
            true => value.saturating_mul(10).saturating_sub(digit),
            false => value.saturating_mul(10).saturating_add(digit),
        };
    }
    value as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::encode_command;

    fn found(args: &[&str]) -> (Scope, Vec<String>) {
        let request = encode_command(args.iter().map(|a| a.as_bytes()));
        let keys = keys(&request);
        let names = keys
            .keys()
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        (keys.scope(), names)
    }

    fn keys_of(args: &[&str]) -> Vec<String> {
        found(args).1
    }

    #[test]
    fn keyed_commands_with_a_wrong_argument_count_are_told_apart() {
        let wrong = |args: &[&str]| wrong_arity(&encode_command(args.iter().map(|a| a.as_bytes())));
        for (args, name) in [
            (&["GET"][..], &b"get"[..]),
            (&["set", "k"], b"set"),
            (&["GET", "a", "b"], b"get"),
            (&["xinfo", "stream"], b"xinfo|stream"),
            (&["DBSIZE", "x"], b"dbsize"),
            (&["script", "LOAD"], b"script|load"),
            (&["SCRIPT"], b"script"),
            (&["keys"], b"keys"),
        ] {
            assert_eq!(wrong(args), Some(name), "{args:?}");
        }
        // Fitting, keyless (not in the table), unknown, or a name with a NUL.
        for args in [
            &["GET", "k"][..],
            &["SET", "k", "v", "EX", "1"],
            &["PING"],
            &["PING", "a", "b", "c"],
            &["bogus"],
            &["GET\0", "k", "x"],
            &["DBSIZE"],
            &["script", "load", "return 1"],
            &["SCRIPT", "bogus"],
        ] {
            assert_eq!(wrong(args), None, "{args:?}");
        }
    }

    #[test]
    fn scope_and_slot_says_what_keys_says_for_short_and_long_requests() {
        let many: Vec<String> = (0..40).map(|i| format!("{{t}}k{i}")).collect();
        let spread: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let mut requests: Vec<Vec<&[u8]>> = vec![
            vec![b"GET", b"k"],
            vec![b"get", b"k"],
            vec![b"PING"],
            vec![b"DBSIZE"],
            vec![b"EVAL", b"s", b"2", b"{a}1", b"{a}2"],
            vec![b"SPUBLISH", b"ch", b"m"],
            vec![b"XINFO", b"STREAM", b"s"],
            vec![b"GET"],
        ];
        for keys in [&many, &spread] {
            let mut mget: Vec<&[u8]> = vec![b"MGET"];
            mget.extend(keys.iter().map(|k| k.as_bytes()));
            requests.push(mget);
        }
        for args in requests {
            let request = encode_command(args.iter().copied());
            let keys = keys(&request);
            assert_eq!(
                scope_and_slot(&request),
                (keys.scope(), keys.slot()),
                "{args:?}"
            );
        }
    }

    /// The short cut for commands whose one key is argument 1 answers what the general path
    /// does, for every row of the table, in upper and lower case, with too few and too many
    /// arguments, keys with and without hash tags, and a NUL in the name.
    #[test]
    fn the_first_key_short_cut_says_what_the_general_path_says() {
        let mut short_cuts = 0;
        for row in table::COMMANDS {
            let name = String::from_utf8_lossy(row.name).into_owned();
            let (command, sub) = match name.split_once('|') {
                Some((command, sub)) => (command.to_owned(), Some(sub.to_owned())),
                None => (name.clone(), None),
            };
            if row.first_key_only() {
                short_cuts += 1;
                assert_eq!(
                    scope_of(command.as_bytes(), sub.as_deref().map(str::as_bytes)),
                    None,
                    "{name}"
                );
            }
            for spelling in [
                command.clone(),
                command.to_uppercase(),
                format!("{command}\0"),
            ] {
                for argc in 1..=7 {
                    let mut args: Vec<String> = vec![spelling.clone()];
                    args.extend(sub.clone());
                    while args.len() < argc {
                        args.push(match args.len() % 3 {
                            0 => format!("{{t}}k{}", args.len()),
                            1 => format!("key:{}", args.len()),
                            _ => "2".to_owned(),
                        });
                    }
                    let request = encode_command(args.iter().map(|a| a.as_bytes()));
                    let keys = keys(&request);
                    assert_eq!(
                        scope_and_slot(&request),
                        (keys.scope(), keys.slot()),
                        "{args:?}"
                    );
                }
            }
        }
        // GET, SET, INCR, HGET... take it.
        assert!(short_cuts > 100, "{short_cuts}");
    }

    /// The router answers CLUSTER itself; its direct path sends on only requests with keys,
    /// so no CLUSTER form may have any.
    #[test]
    fn cluster_commands_have_no_keys() {
        for args in [
            &["CLUSTER", "KEYSLOT", "k"][..],
            &["cluster", "countkeysinslot", "1"],
            &["CLUSTER", "GETKEYSINSLOT", "1", "10"],
            &["CLUSTER", "INFO"],
            &["CLUSTER", "SLOTS"],
            &["CLUSTER"],
        ] {
            let request = encode_command(args.iter().map(|a| a.as_bytes()));
            assert_eq!(
                scope_and_slot(&request),
                (Scope::NoKeys, SlotOf::None),
                "{args:?}"
            );
        }
    }

    #[test]
    fn the_table_is_sorted_and_every_row_is_lower_case() {
        for pair in table::COMMANDS.windows(2) {
            assert!(pair[0].name < pair[1].name, "{:?}", pair[1]);
        }
        for row in table::COMMANDS {
            assert_eq!(row.name.to_ascii_lowercase(), row.name);
            assert!(row.name.len() < NAME_MAX);
        }
    }

    #[test]
    fn fixed_positions() {
        assert_eq!(found(&["GET", "k"]), (Scope::Keys, vec!["k".into()]));
        assert_eq!(keys_of(&["set", "k", "v", "GET"]), ["k"]);
        assert_eq!(keys_of(&["MSET", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(keys_of(&["mset", "a", "1", "b"]), ["a", "b"]);
        assert_eq!(keys_of(&["BLPOP", "a", "b", "0"]), ["a", "b"]);
        assert_eq!(keys_of(&["LMOVE", "a", "b", "LEFT", "RIGHT"]), ["a", "b"]);
        assert_eq!(keys_of(&["BITOP", "AND", "d", "a", "b"]), ["d", "a", "b"]);
        assert_eq!(keys_of(&["LCS", "a", "b", "LEN"]), ["a", "b"]);
        assert_eq!(keys_of(&["DEL", "a", "b", "c"]), ["a", "b", "c"]);
    }

    #[test]
    fn names_are_case_insensitive_and_never_have_a_nul() {
        assert_eq!(keys_of(&["gEt", "k"]), ["k"]);
        assert_eq!(found(&["get\0", "k"]), (Scope::NoKeys, vec![]));
        assert_eq!(
            found(&["object", "encoding\0", "k"]),
            (Scope::NoKeys, vec![])
        );
        assert_eq!(found(&["OBJECT", "Encoding", "k"]).1, ["k"]);
        let long = "g".repeat(NAME_MAX + 1);
        assert_eq!(found(&[&long, "k"]), (Scope::NoKeys, vec![]));
    }

    #[test]
    fn a_wrong_argument_count_has_no_keys() {
        assert_eq!(found(&["GET", "a", "b"]), (Scope::NoKeys, vec![]));
        assert_eq!(found(&["GET"]), (Scope::NoKeys, vec![]));
        assert_eq!(found(&["MSET", "a"]), (Scope::NoKeys, vec![]));
        assert_eq!(found(&["OBJECT", "ENCODING"]), (Scope::NoKeys, vec![]));
    }

    #[test]
    fn numkeys_forms() {
        assert_eq!(keys_of(&["EVAL", "s", "2", "a", "b", "x"]), ["a", "b"]);
        assert_eq!(found(&["EVALSHA", "s", "0", "x"]), (Scope::NoKeys, vec![]));
        assert_eq!(keys_of(&["FCALL_RO", "f", "1", "a"]), ["a"]);
        assert_eq!(
            keys_of(&["ZUNIONSTORE", "d", "2", "a", "b"]),
            ["d", "a", "b"]
        );
        assert_eq!(
            keys_of(&["ZUNION", "2", "a", "b", "WITHSCORES"]),
            ["a", "b"]
        );
        assert_eq!(
            keys_of(&["SINTERCARD", "2", "a", "b", "LIMIT", "1"]),
            ["a", "b"]
        );
        assert_eq!(keys_of(&["LMPOP", "2", "a", "b", "LEFT"]), ["a", "b"]);
        assert_eq!(keys_of(&["BLMPOP", "0", "2", "a", "b", "LEFT"]), ["a", "b"]);
        assert_eq!(keys_of(&["BZMPOP", "0", "1", "a", "MIN"]), ["a"]);
        // More keys than arguments, or a negative count: none.
        assert_eq!(keys_of(&["EVAL", "s", "3", "a", "b"]), Vec::<String>::new());
        assert_eq!(keys_of(&["EVAL", "s", "-1", "a"]), Vec::<String>::new());
        // ZUNIONSTORE with no sources names no keys at all, not even the destination.
        assert_eq!(
            keys_of(&["ZUNIONSTORE", "d", "0", "a"]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_count_redis_cannot_parse_is_read_as_c_atoi_reads_it() {
        // The spec fails (`string2ll`), genericGetKeys reads `atoi`: the keys, then the
        // destination.
        assert_eq!(keys_of(&["EVAL", "s", "2abc", "a", "b"]), ["a", "b"]);
        assert_eq!(keys_of(&["EVAL", "s", " +1", "a"]), ["a"]);
        assert_eq!(
            keys_of(&["ZINTERSTORE", "d", "02", "a", "b"]),
            ["a", "b", "d"]
        );
        assert_eq!(keys_of(&["EVAL", "s", "x", "a"]), Vec::<String>::new());
        assert_eq!(atoi(b"  -12x"), -12);
        assert_eq!(atoi(b"1\x002"), 1);
        assert_eq!(atoi(b"99999999999999999999"), -1); // LONG_MAX cut to an int
        assert_eq!(atoi(b"4294967297"), 1);
        // The spec's count is cut to 32 bits as well.
        assert_eq!(keys_of(&["EVAL", "s", "4294967297", "a"]), ["a"]);
    }

    #[test]
    fn streams() {
        assert_eq!(
            keys_of(&["XREAD", "COUNT", "1", "STREAMS", "a", "b", "0", "0"]),
            ["a", "b"]
        );
        assert_eq!(
            keys_of(&["XREADGROUP", "GROUP", "g", "c", "streams", "streams", "0"]),
            ["streams"]
        );
        // An odd count after STREAMS: the spec takes the first half, rounded down.
        assert_eq!(keys_of(&["XREAD", "STREAMS", "a", "b", "0"]), ["a"]);
        assert_eq!(keys_of(&["XREAD", "COUNT", "1", "a"]), Vec::<String>::new());
        // A NUL in the keyword: not STREAMS here (Redis's strcasecmp would say it is).
        assert_eq!(
            keys_of(&["XREAD", "STREAMS\0", "a", "0"]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn sort_and_georadius_store_destinations() {
        assert_eq!(keys_of(&["SORT", "k"]), ["k"]);
        assert_eq!(
            keys_of(&["SORT", "k", "BY", "store", "LIMIT", "0", "1", "STORE", "d"]),
            ["k", "d"]
        );
        assert_eq!(
            keys_of(&["SORT", "k", "STORE", "a", "STORE", "b"]),
            ["k", "b"]
        );
        assert_eq!(keys_of(&["SORT", "k", "STORE\0", "d"]), ["k"]);
        assert_eq!(keys_of(&["SORT_RO", "k", "BY", "x"]), ["k"]);
        assert_eq!(
            keys_of(&["GEORADIUS", "k", "0", "0", "1", "m", "STORE", "d"]),
            ["k", "d"]
        );
        assert_eq!(
            keys_of(&[
                "GEORADIUS",
                "k",
                "0",
                "0",
                "1",
                "m",
                "STORE",
                "a",
                "STOREDIST",
                "b"
            ]),
            ["k", "a", "b"]
        );
        assert_eq!(
            keys_of(&["GEORADIUSBYMEMBER", "k", "m", "1", "km", "storedist", "d"]),
            ["k", "d"]
        );
        assert_eq!(
            keys_of(&["GEORADIUS", "k", "0", "0", "1", "m", "STORE"]),
            ["k"]
        );
    }

    #[test]
    fn migrate() {
        assert_eq!(keys_of(&["MIGRATE", "h", "1", "k", "0", "5"]), ["k"]);
        assert_eq!(
            keys_of(&["MIGRATE", "h", "1", "", "0", "5", "COPY", "KEYS", "a", "b"]),
            ["a", "b"]
        );
        assert_eq!(
            keys_of(&["MIGRATE", "h", "1", "", "0", "5", "AUTH", "keys", "KEYS", "a"]),
            ["a"]
        );
        assert_eq!(
            keys_of(&["MIGRATE", "h", "1", "", "0", "5", "AUTH2", "u", "keys", "KEYS", "a"]),
            ["a"]
        );
        // A key and KEYS both: MIGRATE's own syntax error, no keys.
        assert_eq!(
            keys_of(&["MIGRATE", "h", "1", "k", "0", "5", "KEYS", "a"]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn containers() {
        assert_eq!(keys_of(&["OBJECT", "ENCODING", "k"]), ["k"]);
        assert_eq!(keys_of(&["MEMORY", "USAGE", "k", "SAMPLES", "5"]), ["k"]);
        assert_eq!(keys_of(&["XINFO", "STREAM", "k", "FULL"]), ["k"]);
        assert_eq!(keys_of(&["XGROUP", "CREATE", "k", "g", "$"]), ["k"]);
        assert_eq!(found(&["OBJECT", "HELP"]), (Scope::NoKeys, vec![]));
        assert_eq!(found(&["MEMORY", "STATS"]), (Scope::NoKeys, vec![]));
    }

    #[test]
    fn keyless_scopes() {
        use Combine::*;
        assert_eq!(found(&["PING"]).0, Scope::NoKeys);
        assert_eq!(found(&["INFO", "keyspace"]).0, Scope::NoKeys);
        assert_eq!(found(&["nosuchcommand", "k"]).0, Scope::NoKeys);
        assert_eq!(found(&["dbsize"]).0, Scope::AllMasters(Sum));
        assert_eq!(found(&["KEYS", "*"]).0, Scope::AllMasters(Concat));
        assert_eq!(
            found(&["FLUSHALL", "ASYNC"]).0,
            Scope::AllMasters(AllSucceeded)
        );
        assert_eq!(found(&["flushdb"]).0, Scope::AllMasters(AllSucceeded));
        assert_eq!(
            found(&["SCRIPT", "load", "x"]).0,
            Scope::AllMasters(AllSucceeded)
        );
        assert_eq!(
            found(&["SCRIPT", "FLUSH"]).0,
            Scope::AllMasters(AllSucceeded)
        );
        assert_eq!(
            found(&["SCRIPT", "EXISTS", "a"]).0,
            Scope::AllMasters(LogicalAnd)
        );
        assert_eq!(
            found(&["SCRIPT", "KILL"]).0,
            Scope::AllMasters(OneSucceeded)
        );
        assert_eq!(found(&["SCRIPT", "HELP"]).0, Scope::NoKeys);
        for sub in ["LOAD", "delete", "FLUSH", "RESTORE"] {
            assert_eq!(found(&["FUNCTION", sub]).0, Scope::AllMasters(AllSucceeded));
        }
        assert_eq!(
            found(&["FUNCTION", "KILL"]).0,
            Scope::AllMasters(OneSucceeded)
        );
        assert_eq!(found(&["FUNCTION", "LIST"]).0, Scope::NoKeys);
        assert_eq!(found(&["FUNCTION", "load\0"]).0, Scope::NoKeys);
        assert_eq!(found(&["RANDOMKEY"]).0, Scope::RandomMaster);
        assert_eq!(found(&["SCAN", "0"]).0, Scope::Scan);
    }

    #[test]
    fn sharded_channels_hash_like_keys() {
        assert_eq!(
            found(&["SPUBLISH", "ch", "msg"]),
            (Scope::ShardChannels, vec!["ch".into()])
        );
        assert_eq!(
            found(&["ssubscribe", "a", "b"]),
            (Scope::ShardChannels, vec!["a".into(), "b".into()])
        );
        assert_eq!(found(&["SUNSUBSCRIBE"]), (Scope::ShardChannels, vec![]));
    }

    #[test]
    fn slot_of_the_keys() {
        let slot_of = |args: &[&str]| {
            let request = encode_command(args.iter().map(|a| a.as_bytes()));
            keys(&request).slot()
        };
        assert_eq!(slot_of(&["PING"]), SlotOf::None);
        assert_eq!(slot_of(&["GET", "foo"]), SlotOf::One(12182));
        assert_eq!(
            slot_of(&["MGET", "{user1000}.a", "{user1000}.b"]),
            SlotOf::One(slot(b"user1000"))
        );
        assert_eq!(slot_of(&["MGET", "foo", "bar"]), SlotOf::Cross);
        assert_eq!(slot_of(&["SPUBLISH", "foo", "bar"]), SlotOf::One(12182));
    }

    #[test]
    fn garbage_is_no_keys_and_never_a_panic() {
        for request in [
            &b""[..],
            b"*",
            b"junk",
            b"*2\r\n$3\r\nGET\r\n",
            b"*1\r\n$-1\r\n",
        ] {
            assert_eq!(keys(request).scope(), Scope::NoKeys);
        }
        // Huge counts and positions at the edges of the argument list.
        for args in [
            &["EVAL", "s", "9223372036854775807", "a"][..],
            &["EVAL", "s", "-9223372036854775808", "a"],
            &["ZUNIONSTORE", "d", "2147483648", "a", "b"],
            &["XREAD", "STREAMS"],
            &["XREADGROUP", "a", "b", "c", "d", "e", "STREAMS"],
            &["MIGRATE", "h", "1", "", "0", "5", "KEYS"],
            &["MIGRATE", "h", "1", "", "0", "5", "AUTH2"],
            &["SORT", "k", "LIMIT"],
            &["GEORADIUS", "k", "0", "0", "1", "m", "STOREDIST"],
        ] {
            let _ = keys_of(args);
        }
    }
}
