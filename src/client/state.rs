//! A client's connection state, and the commands that only change it, answered by redmux with
//! the bytes Redis 7 would send (`helloCommand`, `clientCommand` in `src/networking.c`).
//!
//! Redis keeps this state per connection; on a shared connection it would leak from one client
//! to every other. So it lives here, per client, and what Redis must see of it (database and
//! protocol) picks the shared upstream connection the client's commands go to.

use std::{sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};

use super::registry::{flag, Clients, Entry, Filter, Login, Names, PauseMode, Peer};
use crate::{
    auth::{AuthError, Users},
    command::{c_string, keyword_is, Profile},
    config::Secret,
    pubsub::Hubs,
    resp::encode_command,
    resp::{encode, parse_int, Args},
    upstream::{Credentials, Identity, Shared, Target, UpstreamError, Upstreams},
};

/// What Redis version redmux reports in HELLO: the reference it follows.
const REDIS_VERSION: &str = "7.0.15";

/// `CLIENT REPLY` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyMode {
    On,
    Off,
    /// Suppress the next command's reply only.
    Skip,
}

/// One client's connection state. Every idle client holds one, so it is kept small (64
/// bytes): what others may see of the client (CLIENT LIST) is in its [`Entry`].
#[derive(Debug)]
pub(crate) struct ClientState {
    pub id: u64,
    pub db: u32,
    pub resp3: bool,
    pub reply_mode: ReplyMode,
    /// The client may run commands: it has authenticated, or no password is required.
    pub authenticated: bool,
    /// Counts the client's moves from one shared connection to another: requests sent after
    /// a move take another path (see the session's barrier).
    pub moves: u32,
    /// The shared upstream actor for the current (db, protocol).
    pub shared: Shared,
    upstreams: Upstreams,
    hubs: Hubs,
    users: Arc<Users>,
    /// What CLIENT LIST shows of this client; removed from `clients` when the state drops.
    pub entry: Arc<Entry>,
    clients: Arc<Clients>,
    /// CLIENT TRACKING's options, while the client tracks. Boxed: few clients track.
    pub(super) tracking: Option<Box<super::tracking::Tracking>>,
}

impl Drop for ClientState {
    fn drop(&mut self) {
        if self.tracking.is_some() {
            self.hubs.tracker().disable(self.id);
        }
        self.clients.remove(self.id);
    }
}

/// What the session must do after a locally answered command.
#[derive(Debug)]
pub(crate) enum Effect {
    None,
    /// RESET: drop any transaction or pinned connection as well.
    Reset,
    /// CLIENT UNBLOCK of a client blocked upstream: send this request on a connection of its
    /// own, as redmux, to the cluster node the blocked connection is on (if any), and pass its
    /// reply on.
    Send(Bytes, Option<(String, u16)>),
    /// AUTH failed (counted in the metrics).
    AuthFailed,
    /// No `[auth]`: Redis checks the credentials. Send this AUTH request on a connection that
    /// carries nothing else (or on the client's own watching connection), then call
    /// [`ClientState::handle`] again with the command and Redis's reply.
    Check(Bytes),
    /// CLIENT TRACKING ON while redmux's invalidation stream is not up yet: the reply (OK, or
    /// an error once the client no longer tracks) comes when it is.
    Track(tokio::sync::oneshot::Receiver<crate::upstream::Reply>),
}

/// Redis's answer to the AUTH that [`Effect::Check`] asked for, if it has come.
pub(super) type Checked<'a> = Option<&'a [u8]>;

impl ClientState {
    /// A new client, listed in `clients` for as long as its state lives.
    pub(crate) fn new(
        id: u64,
        peer: Peer,
        (upstreams, hubs): (Upstreams, Hubs),
        users: Arc<Users>,
        clients: Arc<Clients>,
    ) -> Result<Self, UpstreamError> {
        let target = upstreams.default_target();
        let shared = upstreams.shared(&target, id)?;
        let entry = clients.register(id, peer);
        entry.set_target(target.db, target.resp3);
        Ok(ClientState {
            authenticated: !users.required(),
            users,
            id,
            db: target.db,
            resp3: target.resp3,
            reply_mode: ReplyMode::On,
            shared,
            moves: 0,
            upstreams,
            hubs,
            entry,
            clients,
            tracking: None,
        })
    }

    /// `[auth]` as reloaded: later AUTH and RESET follow it. A client already let in stays so,
    /// as Redis keeps clients authenticated when `requirepass` changes, and one that still had
    /// to authenticate need not once no password is required. `false` if the client is logged
    /// in as a named user that no longer exists: it must be closed.
    pub(crate) fn set_users(&mut self, users: Arc<Users>) -> bool {
        let exists = self.entry.names(|names| match &names.login {
            Some(Login::Local(user)) => users.exists(user),
            _ => true,
        });
        self.authenticated |= !users.required();
        self.users = users;
        exists
    }

    /// Every client of the server.
    pub(crate) fn clients(&self) -> &Arc<Clients> {
        &self.clients
    }

    /// The upstream connections, for the session's pinned, pub/sub and MONITOR connections.
    pub(crate) fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The subscriber hubs on [`Self::upstreams`].
    pub(crate) fn hubs(&self) -> &Hubs {
        &self.hubs
    }

    /// The user the commands of the client `entry` describes run as, as ACL WHOAMI and
    /// CLIENT INFO name it.
    fn user_of(&self, entry: &Entry) -> String {
        let login = entry.names(|names| names.login.as_ref().map(|l| l.user().to_owned()));
        match login {
            Some(user) => user,
            None if self.users.pass_through() => self.upstreams.own_user().to_owned(),
            None => "default".to_owned(),
        }
    }

    /// The user this client's commands run as.
    pub(crate) fn user(&self) -> String {
        self.user_of(&self.entry)
    }

    /// The client's own Redis login, when its commands run as a user other than redmux's.
    pub(crate) fn identity(&self) -> Option<Identity> {
        self.entry.names(|names| match names.login.as_ref()? {
            Login::Upstream(_, identity) => identity.clone(),
            Login::Local(_) => None,
        })
    }

    fn set_names(&mut self, set: impl FnOnce(&mut Names)) {
        self.entry.set_names(set);
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            db: self.db,
            resp3: self.resp3,
            identity: self.identity(),
        }
    }

    /// Moves the client to the shared connection for `target`; nothing changes on error.
    fn switch(&mut self, target: Target) -> Result<(), UpstreamError> {
        if target != self.target() {
            self.shared = self.upstreams.shared(&target, self.id)?;
            self.db = target.db;
            self.resp3 = target.resp3;
            self.moves = self.moves.wrapping_add(1);
            self.entry.set_target(target.db, target.resp3);
        }
        Ok(())
    }

    /// Answers SELECT, HELLO, AUTH, CLIENT, RESET or ACL WHOAMI (`name` is one of them).
    /// `checked`: Redis's reply to the AUTH an earlier call asked for ([`Effect::Check`]).
    pub(crate) fn handle(
        &mut self,
        name: &[u8],
        mut args: Args<'_>,
        checked: Checked<'_>,
    ) -> (Bytes, Effect) {
        let lower = name.to_ascii_lowercase();
        let reply = match lower.as_slice() {
            b"select" => self.select(args),
            b"hello" => return self.hello(args, checked),
            b"auth" => return self.auth(args, checked),
            b"reset" => {
                if args.remaining() != 0 {
                    return (arity("reset"), Effect::None);
                }
                return (self.reset(), Effect::Reset);
            }
            b"client" => match args.next() {
                None => arity("client"),
                Some(sub) => return self.client(sub, args),
            },
            // `ACL WHOAMI`, the only ACL subcommand answered here: the shared connection's
            // user is redmux's, not the client's.
            b"acl" => {
                args.next();
                if args.remaining() != 0 {
                    return (arity("acl|whoami"), Effect::None);
                }
                encode::bulk(self.user().as_bytes())
            }
            _ => encode::error("redmux: not a connection command"),
        };
        (reply, Effect::None)
    }

    fn select(&mut self, args: Args<'_>) -> Bytes {
        match self.database(args) {
            Ok(db) => match self.set_db(db) {
                Ok(()) => ok(),
                Err(error) => encode::error(&error.to_string()),
            },
            Err(error) => error,
        }
    }

    /// Moves the client to database `db` (a SELECT that ran in a transaction).
    pub(crate) fn set_db(&mut self, db: u32) -> Result<(), UpstreamError> {
        self.switch(Target {
            db,
            ..self.target()
        })
    }

    /// Whether Redis checks AUTH (no `[auth]`).
    pub(crate) fn pass_through(&self) -> bool {
        self.users.pass_through()
    }

    /// The database a SELECT with these arguments selects, or the error Redis gives for them.
    pub(crate) fn database(&self, mut args: Args<'_>) -> Result<u32, Bytes> {
        let (Some(index), None) = (args.next(), args.next()) else {
            return Err(arity("select"));
        };
        let index = match parse_int(index) {
            None => return Err(encode::error("value is not an integer or out of range")),
            Some(n) if i32::try_from(n).is_err() => {
                return Err(encode::error(
                    "value is out of range, value must between -2147483648 and 2147483647",
                ))
            }
            Some(n) => n,
        };
        if index != 0 && self.upstreams.is_cluster() {
            // A cluster node checks this before the range (`selectCommand`, `src/db.c`).
            return Err(encode::error("SELECT is not allowed in cluster mode"));
        }
        let databases = self.upstreams.databases();
        let Some(db) = u32::try_from(index).ok().filter(|db| *db < databases) else {
            return Err(encode::error("DB index is out of range"));
        };
        if db != 0 && self.upstreams.profile() == Profile::Embedded {
            return Err(encode::error("redmux: the embedded upstream has only db 0"));
        }
        Ok(db)
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`, options processed left to right.
    fn hello(&mut self, mut args: Args<'_>, checked: Checked<'_>) -> (Bytes, Effect) {
        let mut resp3 = self.resp3;
        if let Some(version) = args.next() {
            match parse_int(version) {
                Some(2) => resp3 = false,
                Some(3) => resp3 = true,
                Some(_) => {
                    return (
                        encode::coded_error("NOPROTO unsupported protocol version"),
                        Effect::None,
                    )
                }
                None => {
                    let error = encode::error("Protocol version is not an integer or out of range");
                    return (error, Effect::None);
                }
            }
        }
        // Options left to right, as Redis 7.0's `helloCommand` takes them: each takes effect at
        // once, and a failing one ends the command, so a SETNAME after a failed AUTH is not
        // applied, and one before it is. When Redis checks AUTH, the command stops at the AUTH
        // and is handled again, from the start, with Redis's reply: a SETNAME before it is
        // then set again, to the same name.
        let mut checks = 0;
        while let Some(option) = args.next() {
            // Compared as Redis compares them (`strcasecmp`, up to a NUL).
            if keyword_is(option, b"auth") && args.remaining() >= 2 {
                if let Some((user, password)) = args.next().zip(args.next()) {
                    checks += 1;
                    if checks > 1 && self.users.pass_through() {
                        let error = "redmux: HELLO with more than one AUTH option is not supported";
                        return (encode::error(error), Effect::None);
                    }
                    if let Err(failed) = self.login(Some(user), password, checked) {
                        return failed;
                    }
                }
            } else if keyword_is(option, b"setname") && args.remaining() >= 1 {
                let Some(name) = args.next() else { break };
                if let Err(error) = self.set_name(name) {
                    return (error, Effect::None);
                }
            } else {
                let option = c_string(option);
                let option = String::from_utf8_lossy(&option[..option.len().min(128)]);
                let error = encode::error(&format!("Syntax error in HELLO option '{option}'"));
                return (error, Effect::None);
            }
        }
        if !self.authenticated {
            let error = encode::coded_error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise \
                 the HELLO AUTH <user> <pass> option can be used to authenticate the client and \
                 select the RESP protocol version at the same time",
            );
            return (error, Effect::None);
        }
        if resp3 && self.upstreams.profile() == Profile::Embedded {
            let error = encode::coded_error("NOPROTO the embedded upstream speaks only RESP2");
            return (error, Effect::None);
        }
        if let Err(error) = self.switch(Target {
            resp3,
            ..self.target()
        }) {
            return (encode::error(&error.to_string()), Effect::None);
        }
        (self.hello_reply(), Effect::None)
    }

    fn hello_reply(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(160);
        let (kind, len, proto) = if self.resp3 {
            (b'%', 7, 3)
        } else {
            (b'*', 14, 2)
        };
        encode::put_header(&mut out, kind, len);
        for (key, value) in [("server", "redis"), ("version", REDIS_VERSION)] {
            encode::put_bulk(&mut out, key.as_bytes());
            encode::put_bulk(&mut out, value.as_bytes());
        }
        encode::put_bulk(&mut out, b"proto");
        encode::put_integer(&mut out, proto);
        encode::put_bulk(&mut out, b"id");
        encode::put_integer(&mut out, self.id as i64);
        for (key, value) in [("mode", "standalone"), ("role", "master")] {
            encode::put_bulk(&mut out, key.as_bytes());
            encode::put_bulk(&mut out, value.as_bytes());
        }
        encode::put_bulk(&mut out, b"modules");
        encode::put_header(&mut out, b'*', 0);
        out.freeze()
    }

    fn set_name(&mut self, name: &[u8]) -> Result<(), Bytes> {
        if !name.iter().all(|b| (b'!'..=b'~').contains(b)) {
            return Err(encode::error(
                "Client names cannot contain spaces, newlines or special characters.",
            ));
        }
        self.set_names(|names| names.name = (!name.is_empty()).then(|| Box::from(name)));
        Ok(())
    }

    fn client(&mut self, sub: &[u8], mut args: Args<'_>) -> (Bytes, Effect) {
        let lower = sub.to_ascii_lowercase();
        let argc = args.remaining();
        let reply = match (lower.as_slice(), argc) {
            (b"id", 0) => encode::integer(self.id as i64),
            (b"getname", 0) => self
                .entry
                .names(|names| names.name.as_deref().map(encode::bulk))
                .unwrap_or_else(|| self.null()),
            (b"setname", 1) => match args.next().map(|name| self.set_name(name)) {
                Some(Err(error)) => error,
                _ => ok(),
            },
            (b"info", 0) => {
                let user = self.user();
                self.verbatim(&self.entry.describe(Some("client|info"), &user))
            }
            (b"list", _) => self.list(args),
            (b"kill", 1..) => return self.kill(args),
            (b"pause", 1 | 2) => self.pause(args),
            // Past the table's arity, the subcommand's own count (`clientCommand`).
            (b"pause" | b"unblock", 3..) => crate::command::subcommand_syntax(b"client", sub),
            (b"unpause", 0) => {
                self.clients.unpause();
                ok()
            }
            (b"unblock", 1 | 2) => return self.unblock(args),
            // Values compared as Redis compares them (`strcasecmp`, up to a NUL).
            (b"reply", 1) => {
                let mode = args.next().map(|mode| c_string(mode).to_ascii_uppercase());
                match mode.as_deref() {
                    Some(b"ON") => {
                        self.reply_mode = ReplyMode::On;
                        ok()
                    }
                    Some(b"OFF") => {
                        self.reply_mode = ReplyMode::Off;
                        Bytes::new()
                    }
                    Some(b"SKIP") => {
                        if self.reply_mode != ReplyMode::Off {
                            self.reply_mode = ReplyMode::Skip;
                        }
                        Bytes::new()
                    }
                    _ => encode::error("syntax error"),
                }
            }
            (b"no-evict", 1) | (b"no-touch", 1) => {
                let value = args
                    .next()
                    .map(|value| c_string(value).to_ascii_uppercase());
                match value.as_deref() {
                    Some(b"ON") | Some(b"OFF") => {
                        if lower == b"no-evict" {
                            let on = value.as_deref() == Some(b"ON");
                            self.entry.set_flag(flag::NO_EVICT, on);
                        }
                        ok()
                    }
                    _ => encode::error("syntax error"),
                }
            }
            // Library name and version (Redis 7.2): shown by CLIENT LIST.
            (b"setinfo", 2) => {
                let attr = args.next().map(<[u8]>::to_ascii_uppercase);
                let value = args.clone().next().unwrap_or_default();
                match attr.as_deref() {
                    Some(attr @ (b"LIB-NAME" | b"LIB-VER")) => {
                        let name = attr == b"LIB-NAME";
                        self.set_names(|names| {
                            let lib = names.lib.get_or_insert_with(Default::default);
                            let slot = if name { &mut lib.0 } else { &mut lib.1 };
                            *slot = Box::from(value);
                        });
                        ok()
                    }
                    _ => {
                        let attr = String::from_utf8_lossy(value);
                        encode::error(&format!("Unrecognized option '{attr}'"))
                    }
                }
            }
            (b"tracking", 1..) | (b"caching", 1) | (b"getredir" | b"trackinginfo", 0) => {
                return self.tracking_command(&lower, args);
            }
            (
                b"id" | b"getname" | b"setname" | b"info" | b"reply" | b"no-evict" | b"no-touch"
                | b"setinfo" | b"kill" | b"pause" | b"unpause" | b"unblock" | b"tracking"
                | b"caching" | b"getredir" | b"trackinginfo",
                _,
            ) => arity(&format!("client|{}", String::from_utf8_lossy(&lower))),
            _ => crate::command::unknown_subcommand(b"client", sub),
        };
        (reply, Effect::None)
    }

    /// Text as CLIENT INFO and LIST send it: a bulk string, or RESP3's verbatim string.
    fn verbatim(&self, text: &str) -> Bytes {
        if self.resp3 {
            encode::verbatim(text.as_bytes())
        } else {
            encode::bulk(text.as_bytes())
        }
    }

    /// `CLIENT LIST [TYPE type] [ID id ...]`, parsed as Redis 7.0's `clientCommand` parses it.
    fn list(&self, mut args: Args<'_>) -> Bytes {
        let mut filter = Filter::default();
        let mut ids = None;
        match (args.remaining(), args.next()) {
            (0, _) => {}
            (2, Some(option)) if keyword_is(option, b"type") => {
                match client_type(args.next().unwrap_or_default()) {
                    Ok(normal) => {
                        filter.normal = normal;
                        filter.nobody = normal.is_none();
                    }
                    Err(error) => return error,
                }
            }
            (2.., Some(option)) if keyword_is(option, b"id") => {
                // In the order given, repeats included, as Redis lists them.
                let mut wanted = Vec::new();
                for id in args {
                    match parse_int(id) {
                        Some(id) => wanted.push(u64::try_from(id).unwrap_or(0)),
                        None => return encode::error("Invalid client ID"),
                    }
                }
                ids = Some(wanted);
            }
            _ => return encode::error("syntax error"),
        }
        let entries = match &ids {
            Some(ids) => ids.iter().filter_map(|id| self.clients.get(*id)).collect(),
            None => self.clients.matching(&filter, |entry| self.user_of(entry)),
        };
        let mut text = String::new();
        for entry in entries {
            let cmd = (entry.id == self.id).then_some("client|list");
            text.push_str(&entry.describe(cmd, &self.user_of(&entry)));
        }
        self.verbatim(&text)
    }

    /// `CLIENT KILL addr` or `CLIENT KILL <filter> <value> ...`, as Redis 7.0 reads them.
    fn kill(&self, mut args: Args<'_>) -> (Bytes, Effect) {
        let mut filter = Filter {
            skip: Some(self.id),
            ..Filter::default()
        };
        let old_form = args.remaining() == 1;
        if old_form {
            filter.skip = None;
            filter.addr = Some(String::from_utf8_lossy(args.next().unwrap_or_default()).into());
        }
        while let Some(option) = args.next() {
            let Some(value) = args.next() else {
                return (encode::error("syntax error"), Effect::None);
            };
            let text = || String::from_utf8_lossy(value).into_owned();
            if keyword_is(option, b"id") {
                match parse_int(value).filter(|id| *id >= 1) {
                    Some(id) => filter.ids = Some(vec![u64::try_from(id).unwrap_or(0)]),
                    None => {
                        let error = encode::error("client-id should be greater than 0");
                        return (error, Effect::None);
                    }
                }
            } else if keyword_is(option, b"type") {
                match client_type(value) {
                    Ok(normal) => {
                        filter.normal = normal;
                        filter.nobody |= normal.is_none();
                    }
                    Err(error) => return (error, Effect::None),
                }
            } else if keyword_is(option, b"addr") {
                filter.addr = Some(text());
            } else if keyword_is(option, b"laddr") {
                filter.laddr = Some(text());
            } else if keyword_is(option, b"user") {
                let user = text();
                let known =
                    self.users.pass_through() || user == "default" || self.users.exists(&user);
                if !known {
                    let error = encode::error(&format!("No such user '{user}'"));
                    return (error, Effect::None);
                }
                filter.user = Some(user);
            } else if keyword_is(option, b"skipme") {
                if keyword_is(value, b"yes") {
                    filter.skip = Some(self.id);
                } else if keyword_is(value, b"no") {
                    filter.skip = None;
                } else {
                    return (encode::error("syntax error"), Effect::None);
                }
            } else {
                return (encode::error("syntax error"), Effect::None);
            }
        }
        let killed = self.clients.matching(&filter, |entry| self.user_of(entry));
        for entry in &killed {
            entry.kill();
        }
        let reply = match (old_form, killed.len()) {
            (true, 0) => encode::error("No such client"),
            (true, _) => ok(),
            (false, n) => encode::integer(n as i64),
        };
        (reply, Effect::None)
    }

    /// `CLIENT PAUSE timeout [WRITE|ALL]`: redmux holds its own clients' requests; Redis and
    /// its direct clients are not paused.
    fn pause(&self, mut args: Args<'_>) -> Bytes {
        let timeout = args.next().unwrap_or_default();
        // The mode first, as Redis's `clientCommand` checks it.
        let mode = match args.next() {
            None => PauseMode::All,
            Some(mode) if keyword_is(mode, b"write") => PauseMode::Write,
            Some(mode) if keyword_is(mode, b"all") => PauseMode::All,
            Some(_) => return encode::error("CLIENT PAUSE mode must be WRITE or ALL"),
        };
        let millis = match parse_int(timeout) {
            None => return encode::error("timeout is not an integer or out of range"),
            Some(ms) if ms < 0 => return encode::error("timeout is negative"),
            Some(ms) => ms,
        };
        // Redis 7.0 (`getTimeoutFromObjectOrReply`) adds the timeout to the Unix time in
        // milliseconds as a signed 64-bit integer: past i64::MAX the end wraps into the past
        // and the pause ends at once. So here: it is answered and holds nothing.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
            });
        if millis.checked_add(now).is_none() {
            return ok();
        }
        let millis = u64::try_from(millis).unwrap_or(0);
        self.clients.pause(Duration::from_millis(millis), mode);
        ok()
    }

    /// `CLIENT UNBLOCK id [TIMEOUT|ERROR]`: a client blocked on its pinned connection is
    /// unblocked there, by Redis, which then answers it exactly as it would answer a client of
    /// its own; Redis's reply (`:1`, or `:0` if it was not blocked after all) is the answer.
    fn unblock(&self, mut args: Args<'_>) -> (Bytes, Effect) {
        let Some(id) = args.next().and_then(parse_int) else {
            let error = encode::error("value is not an integer or out of range");
            return (error, Effect::None);
        };
        let mode = match args.next() {
            None => None,
            Some(mode) if keyword_is(mode, b"timeout") => Some(&b"TIMEOUT"[..]),
            Some(mode) if keyword_is(mode, b"error") => Some(&b"ERROR"[..]),
            Some(_) => {
                let error = encode::error("CLIENT UNBLOCK reason should be TIMEOUT or ERROR");
                return (error, Effect::None);
            }
        };
        let (connection, node) = u64::try_from(id)
            .ok()
            .and_then(|id| self.clients.get(id))
            .and_then(|entry| entry.blocked_on())
            .unwrap_or_default();
        if connection == 0 {
            return (Bytes::from_static(b":0\r\n"), Effect::None);
        }
        let connection = connection.to_string();
        let mut request: Vec<&[u8]> = vec![b"CLIENT", b"UNBLOCK", connection.as_bytes()];
        request.extend(mode);
        (Bytes::new(), Effect::Send(encode_command(request), node))
    }

    /// `AUTH password` or `AUTH user password`, as Redis 7 answers them.
    fn auth(&mut self, mut args: Args<'_>, checked: Checked<'_>) -> (Bytes, Effect) {
        let (user, password) = match (args.remaining(), args.next(), args.next()) {
            (0, _, _) => return (arity("auth"), Effect::None),
            (1, Some(password), _) => (None, password),
            (2, Some(user), Some(password)) => (Some(user), password),
            _ => return (encode::error("syntax error"), Effect::None),
        };
        match self.login(user, password, checked) {
            Ok(()) => (ok(), Effect::None),
            Err(failed) => failed,
        }
    }

    /// Logs the client in as `user` (`default` if `None`). With `[auth]`, redmux checks the
    /// password; without, Redis does: the first call asks for that check ([`Effect::Check`]),
    /// and the call made with Redis's reply logs the client in, so that its commands run as
    /// that user from then on. A failure changes nothing.
    fn login(
        &mut self,
        user: Option<&[u8]>,
        password: &[u8],
        checked: Checked<'_>,
    ) -> Result<(), (Bytes, Effect)> {
        if !self.users.pass_through() {
            return self
                .login_locally(user, password)
                .map_err(|error| (error, Effect::AuthFailed));
        }
        let (Ok(name), Ok(secret)) = (
            std::str::from_utf8(user.unwrap_or(b"default")),
            std::str::from_utf8(password),
        ) else {
            let error = "redmux: a user name or password that is not UTF-8 is not supported";
            return Err((encode::error(error), Effect::None));
        };
        let reply = match checked {
            None => {
                // The one-argument form stays so: Redis's answer to it differs.
                let request = match user {
                    Some(user) => encode_command([&b"AUTH"[..], user, password]),
                    None => encode_command([&b"AUTH"[..], password]),
                };
                return Err((Bytes::new(), Effect::Check(request)));
            }
            Some(reply) => reply,
        };
        if reply != b"+OK\r\n" {
            return Err((Bytes::copy_from_slice(reply), Effect::AuthFailed));
        }
        let identity = self.upstreams.identity(Credentials {
            user: name.into(),
            password: Secret::new(secret),
        });
        self.switch(Target {
            identity: identity.clone(),
            ..self.target()
        })
        .map_err(|error| (encode::error(&error.to_string()), Effect::None))?;
        self.set_names(|names| names.login = Some(Login::Upstream(name.into(), identity)));
        Ok(())
    }

    /// Checks credentials against `[auth]`; on success the client is that user.
    fn login_locally(&mut self, user: Option<&[u8]>, password: &[u8]) -> Result<(), Bytes> {
        match self.users.check(user, password) {
            Ok(name) => {
                self.authenticated = true;
                let login = (name != "default").then(|| Login::Local(name.into_boxed_str()));
                self.set_names(|names| names.login = login);
                Ok(())
            }
            Err(AuthError::NoDefaultPassword) => Err(encode::error(
                "AUTH <password> called without any password configured for the default \
                 user. Are you sure your configuration is correct?",
            )),
            Err(AuthError::WrongPass) => Err(encode::coded_error(
                "WRONGPASS invalid username-password pair or user is disabled.",
            )),
        }
    }

    /// RESET: back to the configured db, RESP2, no name, replies on, and the default user
    /// (unauthenticated when it needs a password).
    fn reset(&mut self) -> Bytes {
        let default = self.upstreams.default_target();
        if self.switch(default).is_err() {
            // The default target always has its actors; this cannot fail in practice.
            return encode::error("redmux: cannot reset the connection");
        }
        self.set_names(|names| {
            names.name = None;
            names.login = None;
        });
        self.reply_mode = ReplyMode::On;
        self.authenticated = !self.users.required();
        self.tracking_off();
        Bytes::from_static(b"+RESET\r\n")
    }

    /// The null reply in this client's protocol.
    pub(crate) fn null(&self) -> Bytes {
        Bytes::from_static(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" })
    }
}

fn ok() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

fn arity(fullname: &str) -> Bytes {
    encode::error(&format!(
        "wrong number of arguments for '{fullname}' command"
    ))
}

/// A CLIENT LIST / KILL `TYPE`: `Some(true)` normal, `Some(false)` pubsub, `None` master or
/// replica (no redmux client is one).
fn client_type(name: &[u8]) -> Result<Option<bool>, Bytes> {
    let lower = c_string(name).to_ascii_lowercase();
    match lower.as_slice() {
        b"normal" => Ok(Some(true)),
        b"pubsub" => Ok(Some(false)),
        b"master" | b"replica" | b"slave" => Ok(None),
        _ => Err(encode::error(&format!(
            "Unknown client type '{}'",
            String::from_utf8_lossy(c_string(name))
        ))),
    }
}
