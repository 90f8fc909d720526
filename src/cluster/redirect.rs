//! A node's redirect: `-MOVED` (the slot has another owner: Redis did not run the command),
//! `-ASK` (the slot is migrating: ask the target), `-TRYAGAIN` (a multi-key command while its
//! slot migrates). Read by the routers, which follow them, and by the shard hubs, which tell a
//! late one from the answer they wait for.

/// What a redirect says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    Moved { slot: u16, host: String, port: u16 },
    Ask { slot: u16, host: String, port: u16 },
    TryAgain,
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

#[cfg(test)]
mod tests {
    use super::*;

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
