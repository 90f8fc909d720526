//! The command table: the one place that decides what redmux does with each command.
//!
//! Everything that does not touch connection state is forwarded on the shared upstream
//! connection. Commands that would change the shared connection's state (and so leak one client's
//! state to every other client) are never forwarded: until connection state is implemented they
//! are refused with an error naming the command.

use bytes::Bytes;

use crate::{embedded, resp::Args};

/// What a command is, as far as sharing a connection is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Touches only data: safe on a shared, pipelined connection.
    Stateless,
    /// `QUIT`: answered locally, then the client is closed.
    Quit,
    /// Changes per-connection state: SELECT, HELLO, AUTH, CLIENT, RESET, READONLY...
    ConnectionState,
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
    /// Turns the connection into something else: MONITOR, SYNC, REPLICAOF, SHUTDOWN, and
    /// REPLCONF, whose ACK is answered with nothing at all.
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
        b"select" | b"hello" | b"auth" | b"client" | b"reset" | b"readonly" | b"readwrite"
        | b"asking" => Kind::ConnectionState,
        b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch" => Kind::Transaction,
        b"blpop" | b"brpop" | b"brpoplpush" | b"blmove" | b"blmpop" | b"bzpopmin" | b"bzpopmax"
        | b"bzmpop" | b"wait" | b"waitaof" => Kind::Blocking,
        b"xread" | b"xreadgroup" => Kind::StreamRead,
        b"script" => Kind::Script,
        b"subscribe" | b"psubscribe" | b"ssubscribe" | b"unsubscribe" | b"punsubscribe"
        | b"sunsubscribe" => Kind::Subscribe,
        b"monitor" | b"sync" | b"psync" | b"replicaof" | b"slaveof" | b"shutdown" | b"replconf" => {
            Kind::Takeover
        }
        b"post" | b"host:" => Kind::Http,
        _ => Kind::Stateless,
    }
}

/// What the client session does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send it upstream on the shared connection.
    Forward,
    /// Answer it locally with these bytes.
    Reply(Bytes),
    /// Answer with these bytes, then close the connection (QUIT).
    ReplyAndClose(Bytes),
    /// Close the connection without a word.
    Drop,
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
    match kind(name) {
        Kind::Stateless => match profile {
            Profile::Redis => Action::Forward,
            Profile::Embedded => {
                embedded::screen(name, args).map_or(Action::Forward, Action::Reply)
            }
        },
        Kind::Quit => Action::ReplyAndClose(Bytes::from_static(b"+OK\r\n")),
        Kind::Http => Action::Drop,
        Kind::StreamRead if !blocks_stream_read(name, args.clone()) => Action::Forward,
        Kind::StreamRead => Action::Reply(not_supported(name, Some("BLOCK"))),
        Kind::Script => match args.next() {
            Some(sub) if sub.eq_ignore_ascii_case(b"debug") => {
                Action::Reply(not_supported(name, Some("DEBUG")))
            }
            _ => Action::Forward,
        },
        Kind::ConnectionState if name.eq_ignore_ascii_case(b"client") => {
            let sub = args
                .next()
                .map(|sub| String::from_utf8_lossy(sub).to_ascii_uppercase());
            Action::Reply(not_supported(name, sub.as_deref()))
        }
        Kind::ConnectionState
        | Kind::Transaction
        | Kind::Blocking
        | Kind::Subscribe
        | Kind::Takeover => Action::Reply(not_supported(name, None)),
    }
}

/// Whether XREAD / XREADGROUP will block: reads the options the way Redis's `xreadCommand` does
/// (GROUP takes two operands, so a group or consumer named "streams" or "block" is no option).
fn blocks_stream_read<'a>(name: &[u8], mut args: impl Iterator<Item = &'a [u8]>) -> bool {
    let group = name.eq_ignore_ascii_case(b"xreadgroup");
    let mut blocks = false;
    while let Some(option) = args.next() {
        let takes = if option.eq_ignore_ascii_case(b"block") {
            blocks = true;
            1
        } else if option.eq_ignore_ascii_case(b"count") {
            1
        } else if group && option.eq_ignore_ascii_case(b"group") {
            2
        } else if group && option.eq_ignore_ascii_case(b"noack") {
            0
        } else {
            // STREAMS ends the options; anything else is a syntax error Redis reports at once.
            break;
        };
        for _ in 0..takes {
            if args.next().is_none() {
                return false;
            }
        }
    }
    blocks
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
            &["FLUSHDB"],
            &["XREAD", "STREAMS", "block", "0"],
            &["averyveryverylongcommandname"],
        ] {
            assert_eq!(act(cmd), Action::Forward, "{cmd:?}");
        }
    }

    #[test]
    fn stateful_commands_are_refused_by_name() {
        assert_eq!(
            refused(&["select", "1"]),
            "-ERR redmux: SELECT is not supported yet\r\n"
        );
        assert_eq!(
            refused(&["Client", "setname", "x"]),
            "-ERR redmux: CLIENT SETNAME is not supported yet\r\n"
        );
        assert_eq!(
            refused(&["XREAD", "COUNT", "1", "BLOCK", "0", "STREAMS", "s", "$"]),
            "-ERR redmux: XREAD BLOCK is not supported yet\r\n"
        );
        assert_eq!(
            refused(&[
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
            "-ERR redmux: XREADGROUP BLOCK is not supported yet\r\n"
        );
        assert_eq!(
            refused(&["script", "debug", "yes"]),
            "-ERR redmux: SCRIPT DEBUG is not supported yet\r\n"
        );
        let long = "x".repeat(1000);
        assert_eq!(
            refused(&["CLIENT", &long]).len(),
            "-ERR redmux: CLIENT  is not supported yet\r\n".len() + 128
        );
        for cmd in [
            "HELLO",
            "AUTH",
            "RESET",
            "MULTI",
            "EXEC",
            "DISCARD",
            "WATCH",
            "UNWATCH",
            "BLPOP",
            "BRPOP",
            "BLMOVE",
            "BLMPOP",
            "BRPOPLPUSH",
            "BZPOPMIN",
            "BZPOPMAX",
            "BZMPOP",
            "WAIT",
            "WAITAOF",
            "SUBSCRIBE",
            "PSUBSCRIBE",
            "SSUBSCRIBE",
            "UNSUBSCRIBE",
            "MONITOR",
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
