//! A client's CLIENT TRACKING: the commands (TRACKING, CACHING, GETREDIR, TRACKINGINFO),
//! answered with Redis 7's bytes (`clientCommand` and `clientTrackingInfoCommand` in Redis's
//! `src/networking.c`), the reads and writes it reports to the [`Tracker`], and the
//! invalidations it delivers, to itself or to the client it redirects to.
//!
//! Where invalidations come from and why they wait behind earlier replies: see `tracking`.

use bytes::{BufMut, Bytes, BytesMut};

use std::sync::Arc;

use super::{
    registry::{flag, Clients, Entry},
    state::Effect,
    ClientState,
};
use crate::{
    command::{self, c_string, CommandId},
    resp::{encode, parse_int, Args},
    tracking::{Invalidation, Mode, Sink},
};

/// A client's tracking options, while it tracks.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    /// The client its invalidations go to (0: itself).
    redirect: u64,
    bcast: bool,
    /// BCAST prefixes, kept sorted (as Redis's radix tree lists them).
    prefixes: Vec<Bytes>,
    optin: bool,
    optout: bool,
    noloop: bool,
    /// CLIENT CACHING was given: it applies to the next command (to EXEC in a transaction).
    caching: bool,
    /// The redirect client was gone when an invalidation was due.
    broken: bool,
    /// Keys read by commands queued in MULTI: Redis tracks them when EXEC runs them, so
    /// they are reported then, not when queued (a change in between would use their entry
    /// up before the read).
    queued: Vec<Bytes>,
    /// More than [`QUEUED_MAX_KEYS`] were queued: a null invalidation follows the EXEC.
    queued_overflow: bool,
}

/// Most keys of queued reads kept until EXEC; past it the client gets a null invalidation
/// after the EXEC instead, which is always correct and keeps a long transaction bounded.
const QUEUED_MAX_KEYS: usize = 65_536;

/// Where the invalidations of a client that redirects go: straight to the redirect client,
/// as Redis writes them to that connection, not behind the replies the tracking client owes
/// (those are another connection's, and a blocked one would hold them for ever). If the
/// redirect client has gone, to the tracking client itself, which reports the broken redirect.
#[derive(Debug)]
struct Redirect {
    target: u64,
    clients: Arc<Clients>,
    own: Arc<Entry>,
}

impl Sink for Redirect {
    fn invalidate(&self, invalidation: Invalidation) {
        match self.clients.get(self.target) {
            Some(target) => target.post(invalidation),
            None => self.own.invalidate(invalidation),
        }
    }
}

/// The options of one `CLIENT TRACKING` command.
#[derive(Default)]
struct Options {
    redirect: u64,
    bcast: bool,
    optin: bool,
    optout: bool,
    noloop: bool,
    prefixes: Vec<Bytes>,
}

/// `strcasecmp`, as Redis compares CLIENT TRACKING's words: up to a NUL.
fn is(arg: &[u8], word: &[u8]) -> bool {
    c_string(arg).eq_ignore_ascii_case(word)
}

fn error(text: &str) -> (Bytes, Effect) {
    (encode::error(text), Effect::None)
}

impl ClientState {
    /// CLIENT TRACKING, CACHING, GETREDIR and TRACKINGINFO (`sub` in lower case).
    pub(super) fn tracking_command(&mut self, sub: &[u8], mut args: Args<'_>) -> (Bytes, Effect) {
        match sub {
            b"tracking" => self.client_tracking(args),
            b"caching" => {
                let value = args.next().unwrap_or_default();
                let Some(tracking) = self.tracking.as_deref_mut() else {
                    return error(
                        "CLIENT CACHING can be called only when the client is in tracking mode \
                         with OPTIN or OPTOUT mode enabled",
                    );
                };
                if is(value, b"yes") {
                    if !tracking.optin {
                        return error(
                            "CLIENT CACHING YES is only valid when tracking is enabled in OPTIN \
                             mode.",
                        );
                    }
                } else if is(value, b"no") {
                    if !tracking.optout {
                        return error(
                            "CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT \
                             mode.",
                        );
                    }
                } else {
                    return error("syntax error");
                }
                tracking.caching = true;
                (Bytes::from_static(b"+OK\r\n"), Effect::None)
            }
            b"getredir" => {
                let redirect = self.tracking.as_ref().map_or(-1, |t| t.redirect as i64);
                (encode::integer(redirect), Effect::None)
            }
            _ => (self.tracking_info(), Effect::None),
        }
    }

    /// `CLIENT TRACKING ON|OFF [REDIRECT id] [PREFIX p ...] [BCAST] [OPTIN] [OPTOUT]
    /// [NOLOOP]`, checked in the order Redis checks it.
    fn client_tracking(&mut self, mut args: Args<'_>) -> (Bytes, Effect) {
        let on_off = args.next().unwrap_or_default();
        let mut options = Options::default();
        while let Some(option) = args.next() {
            let more = args.remaining() > 0;
            if is(option, b"redirect") && more {
                if options.redirect != 0 {
                    return error("A client can only redirect to a single other client");
                }
                let id = args.next().unwrap_or_default();
                let Some(id) = parse_int(id) else {
                    return error("value is not an integer or out of range");
                };
                let id = u64::try_from(id).unwrap_or(0);
                if id == 0 || self.clients().get(id).is_none() {
                    return error("The client ID you want redirect to does not exist");
                }
                options.redirect = id;
            } else if is(option, b"bcast") {
                options.bcast = true;
            } else if is(option, b"optin") {
                options.optin = true;
            } else if is(option, b"optout") {
                options.optout = true;
            } else if is(option, b"noloop") {
                options.noloop = true;
            } else if is(option, b"prefix") && more {
                let prefix = args.next().unwrap_or_default();
                options.prefixes.push(Bytes::copy_from_slice(prefix));
            } else {
                return error("syntax error");
            }
        }
        if is(on_off, b"on") {
            self.tracking_on(options)
        } else if is(on_off, b"off") {
            self.tracking_off();
            (Bytes::from_static(b"+OK\r\n"), Effect::None)
        } else {
            error("syntax error")
        }
    }

    fn tracking_on(&mut self, options: Options) -> (Bytes, Effect) {
        let current = self.tracking.as_deref();
        if !options.bcast && !options.prefixes.is_empty() {
            return error("PREFIX option requires BCAST mode to be enabled");
        }
        if current.is_some_and(|t| t.bcast != options.bcast) {
            return error(
                "You can't switch BCAST mode on/off before disabling tracking for this client, \
                 and then re-enabling it with a different mode.",
            );
        }
        if options.bcast && (options.optin || options.optout) {
            return error("OPTIN and OPTOUT are not compatible with BCAST");
        }
        if options.optin && options.optout {
            return error("You can't specify both OPTIN mode and OPTOUT mode");
        }
        if current.is_some_and(|t| (options.optin && t.optout) || (options.optout && t.optin)) {
            return error(
                "You can't switch OPTIN/OPTOUT mode before disabling tracking for this client, \
                 and then re-enabling it with a different mode.",
            );
        }
        if options.bcast {
            if let Some(text) = prefix_collision(current, &options.prefixes) {
                return error(&text);
            }
        }
        // Redis checks its ACL here; redmux's stream sees every key, so a client running as an
        // ACL user of its own could learn names it may not read.
        if self.identity().is_some() {
            return error(
                "redmux: CLIENT TRACKING is not supported for clients logged in as their own \
                 Redis user yet",
            );
        }
        let mut prefixes = current.map(|t| t.prefixes.clone()).unwrap_or_default();
        prefixes.extend(options.prefixes.iter().cloned());
        if options.bcast && options.prefixes.is_empty() {
            // BCAST without PREFIX: every key, which Redis keeps as the empty prefix.
            prefixes.push(Bytes::new());
        }
        prefixes.sort();
        prefixes.dedup();
        let mode = if options.bcast {
            Mode::Broadcast {
                prefixes: prefixes.clone(),
            }
        } else {
            Mode::Reads
        };
        let sink: Arc<dyn Sink> = if options.redirect == 0 {
            self.entry.clone()
        } else {
            Arc::new(Redirect {
                target: options.redirect,
                clients: self.clients().clone(),
                own: self.entry.clone(),
            })
        };
        let waiting = match self.hubs().tracker().enable(self.id, mode, sink) {
            Ok(waiting) => waiting,
            Err(unsupported) => return error(&unsupported.to_string()),
        };
        self.tracking = Some(Box::new(Tracking {
            redirect: options.redirect,
            bcast: options.bcast,
            prefixes,
            optin: options.optin,
            optout: options.optout,
            noloop: options.noloop,
            // A second ON keeps CLIENT CACHING's flag, as Redis does.
            caching: current.is_some_and(|t| t.caching),
            broken: false,
            queued: Vec::new(),
            queued_overflow: false,
        }));
        self.publish_tracking();
        match waiting {
            None => (Bytes::from_static(b"+OK\r\n"), Effect::None),
            Some(rx) => (Bytes::new(), Effect::Track(rx)),
        }
    }

    /// Stops tracking (CLIENT TRACKING OFF, RESET, or the stream could not be opened).
    pub(super) fn tracking_off(&mut self) {
        if self.tracking.take().is_some() {
            self.hubs().tracker().disable(self.id);
            self.publish_tracking();
        }
    }

    /// What CLIENT LIST shows of the client's tracking: flags t, R, B and `redir`.
    fn publish_tracking(&self) {
        let tracking = self.tracking.as_deref();
        self.entry.set_flag(flag::TRACKING, tracking.is_some());
        self.entry
            .set_flag(flag::TRACKING_BCAST, tracking.is_some_and(|t| t.bcast));
        self.entry
            .set_flag(flag::TRACKING_BROKEN, tracking.is_some_and(|t| t.broken));
        self.entry.set_redirect(tracking.map(|t| t.redirect));
    }

    /// CLIENT TRACKINGINFO: a map of flags, redirect and prefixes.
    fn tracking_info(&self) -> Bytes {
        let tracking = self.tracking.as_deref();
        let mut flags: Vec<&[u8]> = Vec::new();
        match tracking {
            None => flags.push(b"off"),
            Some(t) => {
                flags.push(b"on");
                let optional: [(bool, &[u8]); 7] = [
                    (t.bcast, b"bcast"),
                    (t.optin, b"optin"),
                    (t.optin && t.caching, b"caching-yes"),
                    (t.optout, b"optout"),
                    (t.optout && t.caching, b"caching-no"),
                    (t.noloop, b"noloop"),
                    (t.broken, b"broken_redirect"),
                ];
                flags.extend(optional.iter().filter(|(on, _)| *on).map(|(_, f)| *f));
            }
        }
        let mut out = BytesMut::new();
        let (map, set) = if self.resp3 {
            (b'%', b'~')
        } else {
            (b'*', b'*')
        };
        encode::put_header(&mut out, map, if self.resp3 { 3 } else { 6 });
        encode::put_bulk(&mut out, b"flags");
        encode::put_header(&mut out, set, flags.len());
        for flag in flags {
            encode::put_bulk(&mut out, flag);
        }
        encode::put_bulk(&mut out, b"redirect");
        encode::put_integer(&mut out, tracking.map_or(-1, |t| t.redirect as i64));
        encode::put_bulk(&mut out, b"prefixes");
        let prefixes = tracking.map(|t| t.prefixes.as_slice()).unwrap_or_default();
        encode::put_header(&mut out, b'*', prefixes.len());
        for prefix in prefixes {
            encode::put_bulk(&mut out, prefix);
        }
        out.freeze()
    }

    /// The client is about to send `request` (`command`): a read is reported to the tracker
    /// (as Redis tracks the keys of `readonly` commands, in OPTIN mode only after CLIENT
    /// CACHING YES, in OPTOUT mode unless after CLIENT CACHING NO). In a transaction
    /// (`in_multi`) the reads are reported when EXEC is sent, as Redis tracks them when EXEC
    /// runs them.
    pub(super) fn track(&mut self, command: CommandId, request: &[u8], in_multi: bool) {
        let Some(tracking) = self.tracking.as_deref_mut() else {
            return;
        };
        let name = command.name();
        let ends_multi = in_multi && matches!(name, "exec" | "discard");
        let caching = tracking.caching;
        // CLIENT CACHING's flag lasts through CLIENT commands, MULTI and what is queued, to
        // the end of EXEC (`resetClient` in Redis's `src/networking.c`).
        if !(name == "client" || name == "multi" || (in_multi && !ends_multi)) {
            tracking.caching = false;
        }
        if ends_multi {
            let queued = std::mem::take(&mut tracking.queued);
            let overflow = std::mem::replace(&mut tracking.queued_overflow, false);
            if name == "exec" {
                let tracker = self.hubs().tracker();
                tracker.read(self.id, queued.iter().map(|key| &key[..]));
                if overflow {
                    tracker.tell(self.id, Invalidation::All);
                }
            }
            return;
        }
        // OPTIN: only after CLIENT CACHING YES; OPTOUT: unless after CLIENT CACHING NO.
        let wanted = if tracking.optin {
            caching
        } else {
            !(tracking.optout && caching)
        };
        if tracking.bcast || !wanted || !read_only(command, request) {
            return;
        }
        let keys = crate::cluster::keys::keys(request);
        if in_multi {
            if tracking.queued.len() + keys.keys().len() > QUEUED_MAX_KEYS {
                tracking.queued_overflow = true;
            } else {
                let more = keys.keys().iter().map(|key| Bytes::copy_from_slice(key));
                tracking.queued.extend(more);
            }
            return;
        }
        self.hubs()
            .tracker()
            .read(self.id, keys.keys().iter().copied());
    }

    /// The bytes an invalidation becomes for this client, now that every reply owed before it
    /// is out: pushes to itself (RESP3; a RESP2 client without REDIRECT gets nothing, as from
    /// Redis), or, with REDIRECT, the report that the redirect client is gone (the redirect
    /// client, while there, is told directly: [`Redirect`], [`ClientState::redirected`]).
    pub(super) fn invalidation(&mut self, invalidation: &Invalidation) -> Bytes {
        let resp3 = self.resp3;
        let Some(&Tracking {
            redirect, bcast, ..
        }) = self.tracking.as_deref()
        else {
            return Bytes::new();
        };
        if redirect == 0 {
            // Default mode: a push per key, as Redis sends them; BCAST: one per batch.
            return if resp3 {
                frames(true, invalidation, !bcast, resp3)
            } else {
                Bytes::new()
            };
        }
        // With REDIRECT, an invalidation comes here only when the redirect client was gone
        // ([`Redirect`]); client ids are never used again, so it is gone for good.
        if let Some(tracking) = self.tracking.as_deref_mut() {
            if !std::mem::replace(&mut tracking.broken, true) {
                self.publish_tracking();
            }
        }
        if !resp3 {
            return Bytes::new();
        }
        // As many as Redis would send the invalidation itself.
        let times = match invalidation {
            Invalidation::Keys(keys) if !bcast => keys.len(),
            _ => 1,
        };
        encode::tracking_redirect_broken(redirect)
            .repeat(times)
            .into()
    }

    /// The bytes invalidations redirected to this client become: a push (RESP3), or a message
    /// on `__redis__:invalidate` to a RESP2 client that is subscribed to anything, as Redis
    /// sends them (`sendTrackingMessage` in Redis's `src/tracking.c`); else nothing. Those that
    /// waited together go as one, with every key.
    pub(super) fn redirected(&self, invalidation: &Invalidation) -> Bytes {
        if self.resp3 {
            frames(true, invalidation, false, true)
        } else if self.entry.flag(flag::PUBSUB) {
            frames(false, invalidation, false, false)
        } else {
            Bytes::new()
        }
    }
}

/// `invalidation` as pushes (or messages), one per key if `per_key`, else one in all.
fn frames(push: bool, invalidation: &Invalidation, per_key: bool, resp3: bool) -> Bytes {
    match invalidation {
        Invalidation::All => encode::invalidation(push, None, resp3),
        Invalidation::Keys(keys) if per_key => {
            let mut out = BytesMut::new();
            for key in keys {
                out.put(encode::invalidation(push, Some(&[&key[..]]), resp3));
            }
            out.freeze()
        }
        Invalidation::Keys(keys) => {
            let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
            encode::invalidation(push, Some(&keys), resp3)
        }
    }
}

/// Whether Redis tracks the keys of this command as read (its `readonly` flag). Scripts and
/// functions count as reading the keys they declare: Redis tracks what they really read,
/// which redmux cannot see, so it tracks what they may read.
fn read_only(command: CommandId, request: &[u8]) -> bool {
    match command.name() {
        "watch" | "unwatch" => false,
        "eval" | "evalsha" | "fcall" | "pfcount" => true,
        _ => !command::may_write(command, request),
    }
}

/// Redis's check that no two prefixes of a client overlap (`checkPrefixCollisionsOrReply`
/// in Redis's `src/tracking.c`): the error text if two do.
fn prefix_collision(current: Option<&Tracking>, new: &[Bytes]) -> Option<String> {
    let overlap = |a: &[u8], b: &[u8]| a.starts_with(b) || b.starts_with(a);
    let text = |b: &[u8]| String::from_utf8_lossy(c_string(b)).into_owned();
    for (i, prefix) in new.iter().enumerate() {
        if let Some(existing) = current
            .into_iter()
            .flat_map(|t| t.prefixes.iter())
            .find(|existing| overlap(existing, prefix))
        {
            return Some(format!(
                "Prefix '{}' overlaps with an existing prefix '{}'. Prefixes for a single \
                 client must not overlap.",
                text(prefix),
                text(existing)
            ));
        }
        if let Some(other) = new[i + 1..].iter().find(|other| overlap(prefix, other)) {
            return Some(format!(
                "Prefix '{}' overlaps with another provided prefix '{}'. Prefixes for a single \
                 client must not overlap.",
                text(prefix),
                text(other)
            ));
        }
    }
    None
}
