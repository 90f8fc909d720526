//! The command table: the one place that decides what redmux does with each command.
//!
//! Everything that does not touch connection state is forwarded on the client's shared upstream
//! connection. Commands that would change a shared connection's state (and so leak one client's
//! state to every other client) are never forwarded there: connection commands are answered from
//! the client's own state, transactions and blocking commands get a pinned connection, and what
//! is not implemented yet is refused with an error naming the command.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::resp::{encode, Args};

mod embedded;
mod pubsub;
mod table;

pub(crate) use pubsub::{Count, Namespace};
pub(crate) use table::{lookup, may_write, touches_keyspace, Class, CommandId};

/// What the client session does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send it upstream on the client's current connection.
    Forward,
    /// Answer it locally with these bytes.
    Reply(Bytes),
    /// Refuse it with this error, which Redis gives before it looks at authentication,
    /// transactions or subscribed state (an unknown command or subcommand): so does redmux.
    /// Inside MULTI it aborts the transaction, as in Redis.
    Reject(Bytes),
    /// Answer with these bytes, then close the connection (QUIT).
    ReplyAndClose(Bytes),
    /// Close the connection without a word.
    Drop,
    /// SELECT, HELLO, AUTH, CLIENT, RESET: answered from the client's connection state.
    Connection,
    /// A transaction command that changes which connection the client uses.
    Transaction(Transaction),
    /// A blocking command: a pinned connection for as long as it blocks, at most this long
    /// (`None`: forever, as a timeout of 0 means in Redis).
    Block(Option<Duration>),
    /// (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE, served by the shared subscriber connection.
    PubSub { kind: Namespace, subscribe: bool },
    /// PUBLISH, SPUBLISH and the PUBSUB subcommands that count subscribers: forwarded, and
    /// Redis's figure corrected for redmux's hub connections while any local client
    /// subscribes (see `pubsub::Registry`); plainly forwarded otherwise.
    Count(Count),
    /// MONITOR.
    Monitor,
    /// SCRIPT KILL, FUNCTION KILL, FUNCTION STATS: Redis runs them while a script is busy
    /// (they are flagged `allow_busy`), so they go on a connection opened for them alone,
    /// never behind the busy script on a shared one.
    Control,
}

/// Transaction commands, with the arity that makes Redis change the connection's state (with
/// another arity Redis answers an error and nothing changes, so they are plainly forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transaction {
    Multi,
    /// EXEC ends a transaction whatever its arguments (a bad arity aborts it).
    Exec,
    Discard,
    Watch,
    Unwatch,
}

/// Which upstream the commands go to: it decides what redmux must answer for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A real Redis server.
    Redis,
    /// The embedded mini-redis, which knows only a few commands (see [`embedded::screen`]).
    Embedded,
}

/// Decides what to do with a complete, canonical request, and which command it is.
pub(crate) fn action(request: &[u8], profile: Profile) -> (CommandId, Action) {
    match Args::new(request).next() {
        Some(name) => action_named(request, name, profile),
        None => (CommandId::OTHER, Action::Forward),
    }
}

/// [`action`] for a request whose name the decoder has already found: the common case, a
/// stateless command for Redis, is decided from the name alone, without walking the
/// request's headers again.
pub(crate) fn action_named(request: &[u8], name: &[u8], profile: Profile) -> (CommandId, Action) {
    let (id, kind) = lookup(name);
    if kind == Class::Stateless && profile == Profile::Redis {
        return (id, Action::Forward);
    }
    let mut args = Args::new(request);
    // The name, already known.
    args.next();
    (id, decide(name, kind, args, profile))
}

fn decide(name: &[u8], kind: Class, mut args: Args<'_>, profile: Profile) -> Action {
    // mini-redis knows no transactions or blocking commands: it answers them "unknown command"
    // without changing any state, so they can go to the shared connection as they are.
    if profile == Profile::Embedded && matches!(kind, Class::Transaction | Class::Blocking) {
        return Action::Forward;
    }
    match kind {
        Class::Stateless => match profile {
            Profile::Redis => Action::Forward,
            Profile::Embedded => {
                embedded::screen(name, args).map_or(Action::Forward, Action::Reply)
            }
        },
        Class::Quit => Action::ReplyAndClose(Bytes::from_static(b"+OK\r\n")),
        Class::Http => Action::Drop,
        // CLIENT HELP changes nothing: Redis's own text.
        Class::ConnectionState
            if keyword_is(name, b"client")
                && args.remaining() == 1
                && args
                    .next()
                    .is_some_and(|sub| sub.eq_ignore_ascii_case(b"help")) =>
        {
            Action::Forward
        }
        Class::ConnectionState => Action::Connection,
        Class::Transaction => {
            transaction(name, args.remaining()).map_or(Action::Forward, Action::Transaction)
        }
        Class::Blocking => Action::Block(block_timeout(name, args)),
        Class::StreamRead if profile == Profile::Embedded => Action::Forward,
        Class::StreamRead => match stream_block(name, args) {
            Some(timeout) => Action::Block(timeout),
            None => Action::Forward,
        },
        Class::NulName => Action::Reject(unknown_command(name, args)),
        Class::Container => container(name, args, profile),
        Class::Debug => match args.next() {
            Some(sub) if keyword_is(sub, b"protocol") => {
                Action::Reply(not_supported(name, Some("PROTOCOL")))
            }
            _ => Action::Forward,
        },
        Class::Subscribe => {
            let lower = name.to_ascii_lowercase();
            let (kind, subscribe) = match lower.as_slice() {
                b"subscribe" => (Namespace::Channel, true),
                b"unsubscribe" => (Namespace::Channel, false),
                b"psubscribe" => (Namespace::Pattern, true),
                b"punsubscribe" => (Namespace::Pattern, false),
                b"ssubscribe" => (Namespace::Shard, true),
                _ => (Namespace::Shard, false),
            };
            if profile == Profile::Embedded && kind != Namespace::Channel {
                // mini-redis has channels only.
                return Action::Reply(encode::error(&format!(
                    "redmux: the embedded upstream does not support {}",
                    String::from_utf8_lossy(&lower).to_ascii_uppercase()
                )));
            }
            if subscribe && args.remaining() == 0 {
                return Action::Reply(encode::error(&format!(
                    "wrong number of arguments for '{}' command",
                    String::from_utf8_lossy(&lower)
                )));
            }
            Action::PubSub { kind, subscribe }
        }
        Class::Publish => {
            let count = if keyword_is(name, b"spublish") {
                Count::SPublish
            } else {
                Count::Publish
            };
            match profile {
                Profile::Redis => Action::Count(count),
                Profile::Embedded => {
                    embedded::screen(name, args).map_or(Action::Count(count), Action::Reply)
                }
            }
        }
        Class::Monitor if profile == Profile::Embedded => Action::Reply(encode::error(
            "redmux: the embedded upstream does not support MONITOR",
        )),
        Class::Monitor => Action::Monitor,
        Class::ClusterFlag | Class::Takeover => Action::Reply(not_supported(name, None)),
    }
}

/// A container command: refused if its subcommand has a NUL byte, else forwarded, but for the
/// subcommands redmux answers or refuses itself.
fn container(name: &[u8], mut args: Args<'_>, profile: Profile) -> Action {
    let Some(sub) = args.next() else {
        return Action::Forward;
    };
    if sub.contains(&0) {
        return Action::Reject(unknown_subcommand(name, sub));
    }
    let lower = name.to_ascii_lowercase();
    match lower.as_slice() {
        b"script" if sub.eq_ignore_ascii_case(b"debug") => {
            Action::Reply(not_supported(name, Some("DEBUG")))
        }
        b"acl" if sub.eq_ignore_ascii_case(b"whoami") => Action::Connection,
        b"script" | b"function" if profile == Profile::Redis && allow_busy(&lower, sub) => {
            Action::Control
        }
        b"pubsub" => pubsub_count(sub).map_or(Action::Forward, Action::Count),
        _ => Action::Forward,
    }
}

/// The PUBSUB subcommands whose figures redmux corrects (NUMPAT needs none: Redis counts
/// each pattern once, however many connections hold it).
fn pubsub_count(sub: &[u8]) -> Option<Count> {
    [
        (&b"numsub"[..], Count::NumSub),
        (b"shardnumsub", Count::ShardNumSub),
        (b"channels", Count::Channels),
        (b"shardchannels", Count::ShardChannels),
    ]
    .into_iter()
    .find(|(name, _)| keyword_is(sub, name))
    .map(|(_, count)| count)
}

/// The subcommands Redis 7 flags `allow_busy` that redmux forwards: they must reach Redis
/// while a script runs. (AUTH, HELLO, QUIT, RESET and the transaction commands, flagged too,
/// are answered by redmux or take a pinned connection; SHUTDOWN and REPLCONF are refused.)
fn allow_busy(container: &[u8], sub: &[u8]) -> bool {
    match container {
        b"script" => sub.eq_ignore_ascii_case(b"kill"),
        _ => sub.eq_ignore_ascii_case(b"kill") || sub.eq_ignore_ascii_case(b"stats"),
    }
}

/// Whether a connection command is AUTH, or HELLO with an AUTH option (which Redis checks when
/// AUTH is passed through).
pub(crate) fn names_auth(request: &[u8]) -> bool {
    let mut args = Args::new(request);
    let name = args.next().unwrap_or_default();
    name.eq_ignore_ascii_case(b"auth")
        || (name.eq_ignore_ascii_case(b"hello") && args.any(|arg| keyword_is(arg, b"auth")))
}

/// Whether a connection command acts on other clients: CLIENT KILL, UNBLOCK, PAUSE and
/// UNPAUSE. Redis runs it after the client's earlier commands, so a client that pushes to a
/// list and then unblocks or kills the client waiting on it has its push run first; redmux,
/// which answers it itself, must wait for the earlier commands' replies before it acts.
pub(crate) fn acts_on_others(request: &[u8]) -> bool {
    let mut args = Args::new(request);
    let (Some(name), Some(sub)) = (args.next(), args.next()) else {
        return false;
    };
    name.eq_ignore_ascii_case(b"client")
        && [&b"kill"[..], b"unblock", b"pause", b"unpause"]
            .iter()
            .any(|others| sub.eq_ignore_ascii_case(others))
}

/// Whether a command waits for replicas to acknowledge the client's writes (WAIT, WAITAOF).
/// Redis counts them for the connection's offset, which it sets after each command the
/// connection runs; redmux runs it on a pinned connection whose last command may be older
/// than the client's writes (a transaction's, before the connection went back to the pool),
/// so it first sends [`MARK`] there (see the session's `Then::Marked`).
pub(crate) fn waits_for_replicas(request: &[u8]) -> bool {
    let name = Args::new(request).next().unwrap_or_default();
    name.eq_ignore_ascii_case(b"wait") || name.eq_ignore_ascii_case(b"waitaof")
}

/// What redmux writes on a pinned connection before WAIT or WAITAOF: a PING. Redis sets a
/// connection's offset to the replication stream's current end after every command it runs
/// (`c->woff = server.master_repl_offset` in `processCommand`, `src/server.c`), not only after
/// writes; the client's writes were answered before (the path barrier), so they are behind
/// that end, and WAIT waits for what it would wait for directly. A PING is not held by a
/// `CLIENT PAUSE WRITE` on Redis and tells no subscriber anything.
pub(crate) const MARK: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Before authenticating, a client may only AUTH, HELLO (with AUTH), RESET or QUIT.
pub(crate) fn allowed_before_auth(action: &Action, request: &[u8]) -> bool {
    match action {
        Action::ReplyAndClose(_) | Action::Drop => true,
        Action::Connection => {
            let name = Args::new(request).next().unwrap_or_default();
            [&b"auth"[..], b"hello", b"reset"]
                .iter()
                .any(|allowed| name.eq_ignore_ascii_case(allowed))
        }
        _ => false,
    }
}

/// What a RESP2 client in subscribed state gets for a command Redis does not allow there;
/// `None` if it is allowed. PING is answered in the subscribed form.
pub(crate) fn subscribed_context(action: &Action, request: &[u8]) -> Option<Bytes> {
    let mut args = Args::new(request);
    let name = args.next().unwrap_or_default().to_ascii_lowercase();
    match (action, name.as_slice()) {
        (Action::PubSub { .. }, _) | (_, b"quit" | b"reset") => None,
        (_, b"ping") => Some(match (args.next(), args.next()) {
            (None, _) => Bytes::from_static(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
            (Some(arg), None) => {
                let mut out = BytesMut::from(&b"*2\r\n$4\r\npong\r\n"[..]);
                encode::put_bulk(&mut out, arg);
                out.freeze()
            }
            _ => encode::error("wrong number of arguments for 'ping' command"),
        }),
        _ => {
            let mut fullname = String::from_utf8_lossy(&name[..name.len().min(128)]).into_owned();
            if matches!(
                name.as_slice(),
                b"client"
                    | b"config"
                    | b"script"
                    | b"function"
                    | b"object"
                    | b"memory"
                    | b"command"
                    | b"pubsub"
                    | b"acl"
                    | b"cluster"
                    | b"xinfo"
                    | b"latency"
                    | b"slowlog"
                    | b"module"
                    | b"xgroup"
            ) {
                if let Some(sub) = args.next() {
                    fullname.push('|');
                    fullname.push_str(&String::from_utf8_lossy(&sub.to_ascii_lowercase()));
                }
            }
            let why = if name == b"exec" && args.remaining() > 0 {
                // Redis checks the arity first.
                "wrong number of arguments for 'exec' command".to_owned()
            } else {
                format!(
                    "Can't execute '{fullname}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / \
                     QUIT / RESET are allowed in this context"
                )
            };
            Some(if name == b"exec" {
                // Redis refuses EXEC in EXEC's own words (`rejectCommand`).
                Bytes::from(format!(
                    "-EXECABORT Transaction discarded because of: {why}\r\n"
                ))
            } else {
                encode::error(&why)
            })
        }
    }
}

/// What Redis sees when it compares an argument with a keyword (`strcasecmp`): the bytes before
/// the first NUL.
pub(crate) fn c_string(arg: &[u8]) -> &[u8] {
    memchr::memchr(0, arg).map_or(arg, |nul| &arg[..nul])
}

/// Whether Redis takes `arg` for `keyword` (lower case) where it compares them with
/// `strcasecmp`, which stops at a NUL: `block\0x` is BLOCK to Redis, so it must be to redmux.
pub(crate) fn keyword_is(arg: &[u8], keyword: &[u8]) -> bool {
    c_string(arg).eq_ignore_ascii_case(keyword)
}

/// Redis's reply to a command it does not know (`processCommand` in Redis's `src/server.c`):
/// the name cut at 128 bytes, then the arguments quoted while their text is under 128 bytes,
/// each cut to fit. Redis prints them with `%s`, so each stops at its first NUL.
pub(crate) fn unknown_command(name: &[u8], args: Args<'_>) -> Bytes {
    let name = c_string(name);
    let mut text = b"unknown command '".to_vec();
    text.extend_from_slice(&name[..name.len().min(ECHO_MAX)]);
    text.extend_from_slice(b"', with args beginning with: ");
    let mut echoed = 0;
    for arg in args {
        if echoed >= ECHO_MAX {
            break;
        }
        let arg = c_string(arg);
        let arg = &arg[..arg.len().min(ECHO_MAX - echoed)];
        text.push(b'\'');
        text.extend_from_slice(arg);
        text.extend_from_slice(b"' ");
        echoed += arg.len() + 3;
    }
    error_bytes(&text)
}

/// Redis's reply to a container command with a subcommand it does not know.
pub(crate) fn unknown_subcommand(name: &[u8], sub: &[u8]) -> Bytes {
    subcommand_error(b"unknown subcommand '", name, sub)
}

/// Redis's `addReplySubcommandSyntaxError`: a known subcommand given an argument count its
/// command refuses beyond the table's arity.
pub(crate) fn subcommand_syntax(name: &[u8], sub: &[u8]) -> Bytes {
    subcommand_error(
        b"unknown subcommand or wrong number of arguments for '",
        name,
        sub,
    )
}

/// `-ERR <lead><sub>'. Try <NAME> HELP.`, the subcommand cut at a NUL and at `ECHO_MAX` bytes.
fn subcommand_error(lead: &[u8], name: &[u8], sub: &[u8]) -> Bytes {
    let sub = c_string(sub);
    let mut text = lead.to_vec();
    text.extend_from_slice(&sub[..sub.len().min(ECHO_MAX)]);
    text.extend_from_slice(b"'. Try ");
    text.extend_from_slice(&c_string(name).to_ascii_uppercase());
    text.extend_from_slice(b" HELP.");
    error_bytes(&text)
}

/// `-ERR text`, with CR and LF in the text made spaces and other bytes kept as they are, as
/// Redis echoes client input in errors.
fn error_bytes(text: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(text.len() + 7);
    out.extend_from_slice(b"-ERR ");
    out.extend(
        text.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

fn transaction(name: &[u8], argc: usize) -> Option<Transaction> {
    let lower = name.to_ascii_lowercase();
    match (lower.as_slice(), argc) {
        (b"multi", 0) => Some(Transaction::Multi),
        (b"exec", _) => Some(Transaction::Exec),
        (b"discard", 0) => Some(Transaction::Discard),
        (b"watch", 1..) => Some(Transaction::Watch),
        (b"unwatch", 0) => Some(Transaction::Unwatch),
        _ => None,
    }
}

/// How long a blocking command may block, from its timeout argument (Redis's `src/timeout.c`).
/// `None`: forever (a timeout of 0). A timeout Redis will reject counts as zero: the error comes
/// back at once.
fn block_timeout(name: &[u8], args: Args<'_>) -> Option<Duration> {
    let lower = name.to_ascii_lowercase();
    let args: Vec<&[u8]> = args.collect();
    let (arg, millis) = match lower.as_slice() {
        b"blpop" | b"brpop" | b"bzpopmin" | b"bzpopmax" => (args.last(), false),
        b"brpoplpush" => (args.get(2), false),
        b"blmove" => (args.get(4), false),
        b"blmpop" | b"bzmpop" => (args.first(), false),
        b"wait" => (args.get(1), true),
        b"waitaof" => (args.get(2), true),
        _ => (None, false),
    };
    parse_timeout(arg.copied(), millis)
}

fn parse_timeout(arg: Option<&[u8]>, millis: bool) -> Option<Duration> {
    let seconds = arg
        .and_then(|a| std::str::from_utf8(a).ok())
        .and_then(|a| a.trim().parse::<f64>().ok())
        .map(|n| if millis { n / 1000.0 } else { n });
    match seconds {
        Some(0.0) => None,
        Some(s) => Some(Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)),
        // Not a number to Rust: Redis may read it all the same (its `strtold` takes hex floats
        // such as `0x10` or `0x1.8p1`, seconds it then blocks for), so no deadline of redmux's
        // own cuts it short; Redis answers at once what it cannot read.
        None => None,
    }
}

/// Whether XREAD / XREADGROUP will block, and how long: reads the options the way Redis's
/// `xreadCommand` does (GROUP takes two operands, so a group or consumer named "streams" or
/// "block" is no option). `None`: it does not block.
fn stream_block<'a>(
    name: &[u8],
    mut args: impl Iterator<Item = &'a [u8]>,
) -> Option<Option<Duration>> {
    let group = name.eq_ignore_ascii_case(b"xreadgroup");
    let mut block = None;
    while let Some(option) = args.next() {
        // Compared as Redis compares them, up to a NUL: `block\0` blocks.
        if keyword_is(option, b"block") {
            block = Some(parse_timeout(Some(args.next()?), true));
        } else if keyword_is(option, b"count") {
            args.next()?;
        } else if group && keyword_is(option, b"group") {
            args.next()?;
            args.next()?;
        } else if !(group && keyword_is(option, b"noack")) {
            // STREAMS ends the options; anything else is a syntax error Redis reports at once.
            break;
        }
    }
    block
}

/// Longest piece of client input echoed in an error, as Redis truncates command names.
const ECHO_MAX: usize = 128;

/// `-ERR redmux: SELECT is not supported yet`, naming the subcommand or option that matters.
fn not_supported(name: &[u8], detail: Option<&str>) -> Bytes {
    let name = &name[..name.len().min(ECHO_MAX)];
    let mut what = String::from_utf8_lossy(name).to_ascii_uppercase();
    if let Some(detail) = detail {
        what.push(' ');
        what.extend(detail.chars().take(ECHO_MAX));
    }
    encode::error(&format!("redmux: {what} is not supported yet"))
}

#[cfg(test)]
mod tests {
    use super::table::{hash, INDEX, LONGEST, SLOTS, TABLE};
    use super::*;
    use crate::resp::encode_command;

    fn act(args: &[&str]) -> Action {
        let request = encode_command(args.iter().map(|a| a.as_bytes()));
        action(&request, Profile::Redis).1
    }

    fn refused(args: &[&str]) -> String {
        match act(args) {
            Action::Reply(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
            other => panic!("{args:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn action_named_decides_as_decide_does() {
        let mut requests: Vec<Vec<&str>> = TABLE.iter().map(|(name, _)| vec![*name]).collect();
        requests.extend([
            vec!["get", "k"],
            vec!["BLPOP", "l", "0"],
            vec!["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
            vec!["SUBSCRIBE", "c"],
            vec!["nosuchcommand", "x"],
        ]);
        for args in requests {
            let request = encode_command(args.iter().map(|a| a.as_bytes()));
            let name = args[0].as_bytes();
            for profile in [Profile::Redis, Profile::Embedded] {
                // The shortcut for stateless commands must agree with the full decision.
                let (id, kind) = lookup(name);
                let mut rest = Args::new(&request);
                rest.next();
                assert_eq!(
                    action_named(&request, name, profile),
                    (id, decide(name, kind, rest, profile)),
                    "{args:?} {profile:?}"
                );
            }
        }
    }

    #[test]
    fn stateless_commands_are_forwarded() {
        for cmd in [
            &["GET", "k"][..],
            &["set", "k", "v"],
            &["PING"],
            &["PUBSUB", "NUMPAT"],
            &["EVAL", "return 1", "0"],
            &["SCRIPT", "LOAD", "return 1"],
            &["FLUSHDB"],
            &["XREAD", "STREAMS", "block", "0"],
            &["XREAD", "COUNT", "block", "STREAMS", "s", "0"],
            &["XREADGROUP", "GROUP", "block", "block", "STREAMS", "s", ">"],
            &["XREAD", "BLOCK"],
            &["MULTI", "extra"],
            &["WATCH"],
            &["DISCARD", "x"],
            &["averyveryverylongcommandname"],
        ] {
            assert_eq!(act(cmd), Action::Forward, "{cmd:?}");
        }
    }

    /// Counts of subscribers are corrected for redmux's hub connections; NUMPAT needs no
    /// correction, and PUBSUB HELP none either.
    #[test]
    fn pubsub_counts() {
        use Count;
        for (cmd, count) in [
            (&["PUBLISH", "c", "m"][..], Count::Publish),
            (&["spublish", "c", "m"], Count::SPublish),
            (&["PUBSUB", "numsub", "c"], Count::NumSub),
            (&["pubsub", "SHARDNUMSUB"], Count::ShardNumSub),
            (&["PUBSUB", "CHANNELS", "a*"], Count::Channels),
            (&["PUBSUB", "shardchannels"], Count::ShardChannels),
        ] {
            assert_eq!(act(cmd), Action::Count(count), "{cmd:?}");
        }
        assert_eq!(act(&["PUBSUB", "NUMPAT"]), Action::Forward);
        assert_eq!(act(&["PUBSUB", "HELP"]), Action::Forward);
        assert_eq!(act(&["PUBSUB"]), Action::Forward);
    }

    #[test]
    fn connection_transaction_and_blocking_commands() {
        for cmd in ["SELECT", "hello", "AUTH", "CLIENT", "RESET"] {
            assert_eq!(act(&[cmd, "x"]), Action::Connection);
        }
        assert_eq!(
            act(&["PSUBSCRIBE", "a*"]),
            Action::PubSub {
                kind: Namespace::Pattern,
                subscribe: true
            }
        );
        assert_eq!(
            act(&["unsubscribe"]),
            Action::PubSub {
                kind: Namespace::Channel,
                subscribe: false
            }
        );
        assert_eq!(
            refused(&["SUBSCRIBE"]),
            "-ERR wrong number of arguments for 'subscribe' command\r\n"
        );
        assert_eq!(act(&["MULTI"]), Action::Transaction(Transaction::Multi));
        assert_eq!(act(&["exec", "x"]), Action::Transaction(Transaction::Exec));
        assert_eq!(
            act(&["WATCH", "a", "b"]),
            Action::Transaction(Transaction::Watch)
        );
        assert_eq!(act(&["UNWATCH"]), Action::Transaction(Transaction::Unwatch));
        let secs = |s: f64| Action::Block(Some(Duration::from_secs_f64(s)));
        assert_eq!(act(&["BLPOP", "a", "b", "1.5"]), secs(1.5));
        assert_eq!(act(&["BLPOP", "a", "0"]), Action::Block(None));
        assert_eq!(act(&["BRPOPLPUSH", "a", "b", "2"]), secs(2.0));
        assert_eq!(act(&["BLMOVE", "a", "b", "LEFT", "RIGHT", "3"]), secs(3.0));
        assert_eq!(act(&["BZMPOP", "4", "1", "z", "MIN"]), secs(4.0));
        assert_eq!(act(&["WAIT", "1", "500"]), secs(0.5));
        assert_eq!(act(&["BLPOP", "a", "nope"]), Action::Block(None));
        assert_eq!(act(&["BLPOP", "a", "0x3"]), Action::Block(None));
        assert_eq!(act(&["BLPOP", "a", "-1"]), secs(0.0));
        assert_eq!(
            act(&["XREAD", "COUNT", "1", "BLOCK", "250", "STREAMS", "s", "$"]),
            secs(0.25)
        );
        assert_eq!(
            act(&[
                "XREADGROUP",
                "GROUP",
                "streams",
                "c",
                "BLOCK",
                "0",
                "STREAMS",
                "s",
                ">"
            ]),
            Action::Block(None)
        );
    }

    #[test]
    fn unsupported_commands_are_refused_by_name() {
        assert_eq!(
            refused(&["script", "debug", "yes"]),
            "-ERR redmux: SCRIPT DEBUG is not supported yet\r\n"
        );
        let long = format!("replconf{}", "x".repeat(1000));
        assert_eq!(
            act(&[&long]),
            Action::Forward,
            "an unknown command, for Redis to answer"
        );
        for cmd in [
            "READONLY",
            "READWRITE",
            "SYNC",
            "PSYNC",
            "SHUTDOWN",
            "REPLICAOF",
            "SLAVEOF",
            "REPLCONF",
        ] {
            assert_eq!(
                refused(&[cmd]),
                format!("-ERR redmux: {cmd} is not supported yet\r\n")
            );
        }
    }

    #[test]
    fn embedded_forwards_what_mini_redis_ignores() {
        let request = encode_command([&b"MULTI"[..]]);
        assert_eq!(action(&request, Profile::Embedded).1, Action::Forward);
        let request = encode_command([&b"BLPOP"[..], b"l", b"0"]);
        assert_eq!(action(&request, Profile::Embedded).1, Action::Forward);
    }

    #[test]
    fn quit_and_http() {
        assert_eq!(
            act(&["quit"]),
            Action::ReplyAndClose(Bytes::from_static(b"+OK\r\n"))
        );
        assert_eq!(act(&["POST", "/", "HTTP/1.1"]), Action::Drop);
        assert_eq!(act(&["Host:", "x"]), Action::Drop);
    }

    #[test]
    fn a_monitor_client_may_not_touch_the_keyspace() {
        let touches = |args: &[&str]| {
            let request = encode_command(args.iter().map(|a| a.as_bytes()));
            touches_keyspace(lookup(args[0].as_bytes()).0, &request)
        };
        for args in [
            &["GET", "k"][..],
            &["sort_ro", "k"],
            &["SET", "k", "v"],
            &["EVAL", "return 1", "0"],
            &["PUBLISH", "c", "m"],
            &["OBJECT", "ENCODING", "k"],
            &["FUNCTION", "FLUSH"],
        ] {
            assert!(touches(args), "{args:?}");
        }
        for args in [
            &["PING"][..],
            &["SELECT", "1"],
            &["OBJECT", "HELP"],
            &["SCRIPT", "LOAD", "return 1"],
            &["INFO"],
            &["NOSUCHCOMMAND"],
        ] {
            assert!(!touches(args), "{args:?}");
        }
    }

    #[test]
    fn the_table_is_sorted_lower_case_and_every_name_is_found() {
        assert!(
            TABLE.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no duplicates"
        );
        for (i, (name, kind)) in TABLE.iter().enumerate() {
            assert_eq!(name.to_ascii_lowercase(), *name);
            assert!(name.len() <= LONGEST);
            assert_eq!(lookup(name.as_bytes()), (CommandId(i as u8), *kind));
            assert_eq!(lookup(name.to_ascii_uppercase().as_bytes()).0.name(), *name);
        }
        assert_eq!(lookup(b"GeT").0.name(), "get");
        assert_eq!(lookup(b"BLPOP").1, Class::Blocking);
        assert_eq!(
            lookup(b"georadiusbymember_ro").0.name(),
            "georadiusbymember_ro"
        );
        for unknown in [
            &b"getx"[..],
            b"ge",
            b"",
            b"georadiusbymember_rox",
            b"\xff\xfe",
        ] {
            assert_eq!(
                lookup(unknown),
                (CommandId::OTHER, Class::Stateless),
                "{unknown:?}"
            );
        }
        assert_eq!(lookup(b"Host:"), (CommandId::OTHER, Class::Http));
        let probes = |name: &str| {
            let mut slot = hash(name.as_bytes());
            let mut probes = 1;
            while TABLE[usize::from(INDEX[slot] - 1)].0 != name {
                slot = (slot + 1) % SLOTS;
                probes += 1;
            }
            probes
        };
        let all: Vec<usize> = TABLE.iter().map(|(name, _)| probes(name)).collect();
        assert!(all.iter().all(|p| *p <= 4), "{all:?}");
        assert!(
            all.iter().sum::<usize>() * 100 / all.len() <= 115,
            "{all:?}"
        );
        assert_eq!(CommandId::OTHER.name(), "other");
        assert_eq!(CommandId::OTHER.index(), CommandId::COUNT - 1);
    }

    #[test]
    fn a_name_with_a_nul_is_refused_as_redis_refuses_an_unknown_command() {
        for name in [
            "multi\x00257",
            "select\x00",
            "client\x001",
            "\x00",
            "averyveryverylongname\x00x",
        ] {
            assert_eq!(lookup(name.as_bytes()).1, Class::NulName, "{name:?}");
        }
        assert_eq!(
            act(&["multi\x00257"]),
            Action::Reject(Bytes::from_static(
                b"-ERR unknown command 'multi', with args beginning with: \r\n"
            ))
        );
        // Arguments are echoed as C strings too, and CR/LF become spaces.
        assert_eq!(
            act(&["get\x00x", "k\x00ey", "a\r\nb"]),
            Action::Reject(Bytes::from_static(
                b"-ERR unknown command 'get', with args beginning with: 'k' 'a  b' \r\n"
            ))
        );
        // As Redis, at most about 128 bytes of arguments.
        let long = "x".repeat(200);
        let Action::Reject(reply) = act(&["a\x00", &long, "next"]) else {
            panic!("not refused")
        };
        let expected = format!(
            "-ERR unknown command 'a', with args beginning with: '{}' \r\n",
            "x".repeat(128)
        );
        assert_eq!(reply, Bytes::from(expected));
        // Redis drops these whatever follows a NUL.
        assert_eq!(act(&["post\x00x"]), Action::Drop);
        assert_eq!(act(&["HOST:\x00"]), Action::Drop);
    }

    #[test]
    fn subcommands_and_options_are_read_as_redis_reads_them() {
        assert_eq!(
            act(&["script", "debug\x00x", "yes"]),
            Action::Reject(Bytes::from_static(
                b"-ERR unknown subcommand 'debug'. Try SCRIPT HELP.\r\n"
            ))
        );
        assert_eq!(
            act(&["config", "set\x00", "x", "y"]),
            Action::Reject(Bytes::from_static(
                b"-ERR unknown subcommand 'set'. Try CONFIG HELP.\r\n"
            ))
        );
        assert_eq!(act(&["CONFIG", "GET", "maxmemory"]), Action::Forward);
        assert_eq!(act(&["script", "load", "return 1"]), Action::Forward);
        assert_eq!(act(&["acl", "WHOAMI"]), Action::Connection);
        assert_eq!(
            act(&["acl", "whoami\x00"]),
            Action::Reject(Bytes::from_static(
                b"-ERR unknown subcommand 'whoami'. Try ACL HELP.\r\n"
            ))
        );
        assert_eq!(act(&["acl", "users"]), Action::Forward);
        assert_eq!(
            refused(&["DEBUG", "protocol\x00x", "push"]),
            "-ERR redmux: DEBUG PROTOCOL is not supported yet\r\n"
        );
        assert_eq!(
            refused(&["debug", "PROTOCOL", "attrib"]),
            "-ERR redmux: DEBUG PROTOCOL is not supported yet\r\n"
        );
        assert_eq!(act(&["DEBUG", "sleep", "0"]), Action::Forward);
        // Redis takes `block\0` for BLOCK: so must redmux, or it would block a shared connection.
        assert_eq!(
            act(&["XREAD", "block\x00junk", "0", "STREAMS", "s", "$"]),
            Action::Block(None)
        );
        assert_eq!(
            act(&[
                "XREADGROUP",
                "group\x00",
                "g",
                "c",
                "BLOCK\x00",
                "10",
                "STREAMS",
                "s",
                ">"
            ]),
            Action::Block(Some(Duration::from_millis(10)))
        );
    }

    #[test]
    fn error_text_cannot_break_framing() {
        assert_eq!(
            encode::error("a\r\nb"),
            Bytes::from_static(b"-ERR a  b\r\n")
        );
    }
}
