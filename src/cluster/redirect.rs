//! A node's redirect: `-MOVED` (the slot has another owner: Redis did not run the command),
//! `-ASK` (the slot is migrating: ask the target), `-TRYAGAIN` (a multi-key command while its
//! slot migrates). Read by the routers, which follow them, and by the shard hubs, which tell a
//! late one from the answer they wait for.
//!
//! An error reply is not always Redis's own: a script or a function writes any error it likes
//! (`redis.error_reply("MOVED 1 host:port")`), and has run by then. [`followable`] tells the
//! redirects a node can really have given from those.

use super::keys::{self, SlotOf};
use crate::resp::Args;

/// Commands whose error replies a client can write itself: scripts and functions
/// (`redis.error_reply`, or a `{err = ...}` table), lower case.
const SCRIPTED: [&[u8]; 6] = [
    b"eval",
    b"evalsha",
    b"eval_ro",
    b"evalsha_ro",
    b"fcall",
    b"fcall_ro",
];

/// What a redirect says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    Moved { slot: u16, host: String, port: u16 },
    Ask { slot: u16, host: String, port: u16 },
    TryAgain,
}

impl Redirect {
    /// The redirect with `own` for the host when it names none: Redis leaves it out for an
    /// unknown endpoint, meaning the host of the node that redirected (Redis's docs).
    pub fn or_host(mut self, own: &str) -> Redirect {
        if let Redirect::Moved { host, .. } | Redirect::Ask { host, .. } = &mut self {
            if host.is_empty() {
                own.clone_into(host);
            }
        }
        self
    }
}

/// `-MOVED slot host:port`, `-ASK slot host:port` or `-TRYAGAIN ...`; `None` for anything
/// else. The host of `[::1]:7000` is `::1`; an empty host is the node's own (Redis's docs).
pub fn redirect(reply: &[u8]) -> Option<Redirect> {
    if reply.starts_with(b"-TRYAGAIN") {
        return Some(Redirect::TryAgain);
    }
    let text = std::str::from_utf8(reply.strip_prefix(b"-")?)
        .ok()?
        .trim_end();
    let mut words = text.split(' ');
    let kind = words.next()?;
    let slot: u16 = words.next()?.parse().ok()?;
    let (host, port) = words.next()?.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, host, port }),
        "ASK" => Some(Redirect::Ask { slot, host, port }),
        _ => None,
    }
}

/// Whether `request` runs a script or a function, whose error text is the client's own.
pub fn scripted(request: &[u8]) -> bool {
    Args::new(request)
        .next()
        .is_some_and(|name| SCRIPTED.iter().any(|s| name.eq_ignore_ascii_case(s)))
}

/// Whether `redirect`, the reply to `request` (one request) from node `from` (host, port),
/// may be followed. Its host must be filled in already ([`Redirect::or_host`]).
///
/// A node redirects a request for the slot of its keys, never one without keys, and never to
/// itself (Redis's `getNodeByQuery` in `src/cluster.c`): any other redirect is an error text,
/// and the client gets it as it is. A script or function may write even a redirect that names
/// its own slot, after it ran, so for one of those: `-TRYAGAIN` is never retried (it may have
/// run); `-MOVED` and `-ASK` are followed once (`first`) and only to another node of the map
/// (`known`), so a script can neither send a request outside the cluster nor run itself twice
/// (a node it was wrongly sent to answers `-MOVED` back, and that is not followed).
pub fn followable(
    request: &[u8],
    redirect: &Redirect,
    from: (&str, u16),
    first: bool,
    known: impl FnOnce(&str, u16) -> bool,
) -> bool {
    let own = keys::keys(request).slot();
    let scripted = scripted(request);
    match redirect {
        Redirect::TryAgain => !scripted && matches!(own, SlotOf::One(_)),
        Redirect::Moved { slot, host, port } | Redirect::Ask { slot, host, port } => {
            own == SlotOf::One(*slot)
                && (host.as_str(), *port) != from
                && (!scripted || (first && known(host, *port)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cluster::slot::slot, resp::encode_command};

    fn request(args: &[&str]) -> bytes::Bytes {
        encode_command(args.iter().map(|a| a.as_bytes()))
    }

    #[test]
    fn only_redirects_redis_can_give_are_followed() {
        let key_slot = slot(b"k");
        let moved = |slot: u16, port: u16| Redirect::Moved {
            slot,
            host: "127.0.0.1".to_owned(),
            port,
        };
        let anywhere = |_: &str, _: u16| true;
        let from = ("127.0.0.1", 7000);
        let get = request(&["GET", "k"]);
        assert!(followable(
            &get,
            &moved(key_slot, 7001),
            from,
            false,
            anywhere
        ));
        assert!(followable(&get, &Redirect::TryAgain, from, false, anywhere));
        // Another slot's redirect, or one for a request without keys: not Redis's.
        let other_slot = moved(key_slot + 1, 7001);
        assert!(!followable(&get, &other_slot, from, true, anywhere));
        let ping = request(&["PING"]);
        assert!(!followable(
            &ping,
            &moved(key_slot, 7001),
            from,
            true,
            anywhere
        ));
        assert!(!followable(
            &ping,
            &Redirect::TryAgain,
            from,
            true,
            anywhere
        ));

        let eval = request(&["evalsha", "0123", "1", "k"]);
        assert!(scripted(&eval));
        let only_7001 = |_: &str, port: u16| port == 7001;
        assert!(followable(
            &eval,
            &moved(key_slot, 7001),
            from,
            true,
            only_7001
        ));
        assert!(!followable(
            &eval,
            &moved(key_slot, 6666),
            from,
            true,
            only_7001
        ));
        assert!(!followable(
            &eval,
            &moved(key_slot, 7001),
            from,
            false,
            only_7001
        ));
        assert!(!followable(
            &eval,
            &Redirect::TryAgain,
            from,
            true,
            only_7001
        ));
        // Never to the node that answered: that one is never Redis's.
        assert!(!followable(
            &get,
            &moved(key_slot, 7000),
            from,
            true,
            anywhere
        ));
        assert!(!followable(
            &eval,
            &moved(key_slot, 7000),
            from,
            true,
            |_, _| true
        ));
        let fcall = request(&["FCALL_RO", "f", "1", "k"]);
        assert!(!followable(
            &fcall,
            &Redirect::TryAgain,
            from,
            true,
            only_7001
        ));
    }

    #[test]
    fn redirects_are_read() {
        assert!(matches!(
            redirect(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some(Redirect::Moved { slot: 3999, ref host, port: 6381 }) if host == "127.0.0.1"
        ));
        assert!(matches!(
            redirect(b"-ASK 1 [::1]:7000\r\n"),
            Some(Redirect::Ask { slot: 1, ref host, port: 7000 }) if host == "::1"
        ));
        assert!(matches!(
            redirect(b"-MOVED 3999 :6381\r\n"),
            Some(Redirect::Moved { ref host, .. }) if host.is_empty()
        ));
        assert!(matches!(
            redirect(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"),
            Some(Redirect::TryAgain)
        ));
        assert!(redirect(b"-ERR MOVED\r\n").is_none());
        assert!(redirect(b"$5\r\nMOVED\r\n").is_none());
    }
}
