//! The command table: the one place that decides what redmux does with each command.
//!
//! Everything that does not touch connection state is forwarded on the client's shared upstream
//! connection. Commands that would change a shared connection's state (and so leak one client's
//! state to every other client) are never forwarded there: connection commands are answered from
//! the client's own state, transactions and blocking commands get a pinned connection, and what
//! is not implemented yet is refused with an error naming the command.

use std::time::Duration;

use bytes::Bytes;

use crate::{embedded, pubsub, resp::Args};

/// What a command is, as far as sharing a connection is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Touches only data: safe on a shared, pipelined connection.
    Stateless,
    /// `QUIT`: answered locally, then the client is closed.
    Quit,
    /// Changes per-connection state, answered from the client's own: SELECT, HELLO, AUTH,
    /// CLIENT, RESET.
    ConnectionState,
    /// Cluster-mode connection flags: READONLY, READWRITE, ASKING.
    ClusterFlag,
    /// MULTI/EXEC/DISCARD/WATCH/UNWATCH: need a connection of their own.
    Transaction,
    /// Blocks the connection until it is served (BLPOP, WAIT...).
    Blocking,
    /// XREAD and XREADGROUP: blocking only with a `BLOCK` option.
    StreamRead,
    /// SCRIPT: stateless, except `SCRIPT DEBUG`, which turns the connection into a debugger.
    Script,
    /// Puts the connection in subscribed state.
    Subscribe,
    /// MONITOR: a feed of every command, on a connection of the client's own.
    Monitor,
    /// Turns the connection into something else: SYNC, REPLICAOF, SHUTDOWN, and REPLCONF,
    /// whose ACK is answered with nothing at all.
    Takeover,
    /// `POST` / `Host:`: an HTTP request sent to the Redis port; Redis drops the connection
    /// silently to defeat cross-protocol attacks, and so does redmux.
    Http,
}

/// Looks up a command by its name (any case).
pub fn kind(name: &[u8]) -> Kind {
    let mut lower = [0u8; 16];
    let Some(lower) = lower.get_mut(..name.len()) else {
        return Kind::Stateless;
    };
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    match &*lower {
        b"quit" => Kind::Quit,
        b"select" | b"hello" | b"auth" | b"client" | b"reset" => Kind::ConnectionState,
        b"readonly" | b"readwrite" | b"asking" => Kind::ClusterFlag,
        b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch" => Kind::Transaction,
        b"blpop" | b"brpop" | b"brpoplpush" | b"blmove" | b"blmpop" | b"bzpopmin" | b"bzpopmax"
        | b"bzmpop" | b"wait" | b"waitaof" => Kind::Blocking,
        b"xread" | b"xreadgroup" => Kind::StreamRead,
        b"script" => Kind::Script,
        b"subscribe" | b"psubscribe" | b"ssubscribe" | b"unsubscribe" | b"punsubscribe"
        | b"sunsubscribe" => Kind::Subscribe,
        b"monitor" => Kind::Monitor,
        b"sync" | b"psync" | b"replicaof" | b"slaveof" | b"shutdown" | b"replconf" => {
            Kind::Takeover
        }
        b"post" | b"host:" => Kind::Http,
        _ => Kind::Stateless,
    }
}

/// What the client session does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send it upstream on the client's current connection.
    Forward,
    /// Answer it locally with these bytes.
    Reply(Bytes),
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
    PubSub { kind: pubsub::Kind, subscribe: bool },
    /// MONITOR.
    Monitor,
}

/// Transaction commands, with the arity that makes Redis change the connection's state (with
/// another arity Redis answers an error and nothing changes, so they are plainly forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transaction {
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

/// Decides what to do with a complete, canonical request.
pub fn action(request: &[u8], profile: Profile) -> Action {
    let mut args = Args::new(request);
    let Some(name) = args.next() else {
        return Action::Forward;
    };
    let kind = kind(name);
    // mini-redis knows no transactions or blocking commands: it answers them "unknown command"
    // without changing any state, so they can go to the shared connection as they are.
    if profile == Profile::Embedded && matches!(kind, Kind::Transaction | Kind::Blocking) {
        return Action::Forward;
    }
    match kind {
        Kind::Stateless => match profile {
            Profile::Redis => Action::Forward,
            Profile::Embedded => {
                embedded::screen(name, args).map_or(Action::Forward, Action::Reply)
            }
        },
        Kind::Quit => Action::ReplyAndClose(Bytes::from_static(b"+OK\r\n")),
        Kind::Http => Action::Drop,
        Kind::ConnectionState => Action::Connection,
        Kind::Transaction => {
            transaction(name, args.remaining()).map_or(Action::Forward, Action::Transaction)
        }
        Kind::Blocking => Action::Block(block_timeout(name, args)),
        Kind::StreamRead if profile == Profile::Embedded => Action::Forward,
        Kind::StreamRead => match stream_block(name, args) {
            Some(timeout) => Action::Block(timeout),
            None => Action::Forward,
        },
        Kind::Script => match args.next() {
            Some(sub) if sub.eq_ignore_ascii_case(b"debug") => {
                Action::Reply(not_supported(name, Some("DEBUG")))
            }
            _ => Action::Forward,
        },
        Kind::Subscribe => {
            let lower = name.to_ascii_lowercase();
            let (kind, subscribe) = match lower.as_slice() {
                b"subscribe" => (pubsub::Kind::Channel, true),
                b"unsubscribe" => (pubsub::Kind::Channel, false),
                b"psubscribe" => (pubsub::Kind::Pattern, true),
                b"punsubscribe" => (pubsub::Kind::Pattern, false),
                b"ssubscribe" => (pubsub::Kind::Shard, true),
                _ => (pubsub::Kind::Shard, false),
            };
            if profile == Profile::Embedded && kind != pubsub::Kind::Channel {
                // mini-redis has channels only.
                return Action::Reply(error_reply(&format!(
                    "redmux: the embedded upstream does not support {}",
                    String::from_utf8_lossy(&lower).to_ascii_uppercase()
                )));
            }
            if subscribe && args.remaining() == 0 {
                return Action::Reply(error_reply(&format!(
                    "wrong number of arguments for '{}' command",
                    String::from_utf8_lossy(&lower)
                )));
            }
            Action::PubSub { kind, subscribe }
        }
        Kind::Monitor if profile == Profile::Embedded => Action::Reply(error_reply(
            "redmux: the embedded upstream does not support MONITOR",
        )),
        Kind::Monitor => Action::Monitor,
        Kind::ClusterFlag | Kind::Takeover => Action::Reply(not_supported(name, None)),
    }
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

/// How long a blocking command may block, read from its timeout argument (`REDIS-NOTES.md` §6).
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
        None => Some(Duration::ZERO),
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
        if option.eq_ignore_ascii_case(b"block") {
            block = Some(parse_timeout(Some(args.next()?), true));
        } else if option.eq_ignore_ascii_case(b"count") {
            args.next()?;
        } else if group && option.eq_ignore_ascii_case(b"group") {
            args.next()?;
            args.next()?;
        } else if !(group && option.eq_ignore_ascii_case(b"noack")) {
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
    error_reply(&format!("redmux: {what} is not supported yet"))
}

/// An `-ERR` reply whose text may contain client-supplied bytes: CR and LF become spaces, as in
/// every Redis error reply, so the text cannot break the framing.
pub fn error_reply(text: &str) -> Bytes {
    let clean: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    Bytes::from(format!("-ERR {clean}\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::encode_command;

    fn act(args: &[&str]) -> Action {
        let request = encode_command(args.iter().map(|a| a.as_bytes()));
        action(&request, Profile::Redis)
    }

    fn refused(args: &[&str]) -> String {
        match act(args) {
            Action::Reply(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
            other => panic!("{args:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn stateless_commands_are_forwarded() {
        for cmd in [
            &["GET", "k"][..],
            &["set", "k", "v"],
            &["PING"],
            &["PUBLISH", "c", "m"],
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

    #[test]
    fn connection_transaction_and_blocking_commands() {
        for cmd in ["SELECT", "hello", "AUTH", "CLIENT", "RESET"] {
            assert_eq!(act(&[cmd, "x"]), Action::Connection);
        }
        assert_eq!(
            act(&["PSUBSCRIBE", "a*"]),
            Action::PubSub {
                kind: pubsub::Kind::Pattern,
                subscribe: true
            }
        );
        assert_eq!(
            act(&["unsubscribe"]),
            Action::PubSub {
                kind: pubsub::Kind::Channel,
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
        assert_eq!(act(&["BLPOP", "a", "nope"]), secs(0.0));
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
        assert_eq!(action(&request, Profile::Embedded), Action::Forward);
        let request = encode_command([&b"BLPOP"[..], b"l", b"0"]);
        assert_eq!(action(&request, Profile::Embedded), Action::Forward);
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
    fn error_text_cannot_break_framing() {
        assert_eq!(error_reply("a\r\nb"), Bytes::from_static(b"-ERR a  b\r\n"));
    }
}
