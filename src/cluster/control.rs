//! The one reply a client gets for a command redmux sends to every master on connections of
//! their own because it must run while a script is busy: SCRIPT KILL, FUNCTION KILL and
//! FUNCTION STATS. Only the master running the script can kill it or report it, and a client
//! of one Redis asks without knowing which master that is.
//!
//! - SCRIPT KILL and FUNCTION KILL (Redis's `response_policy:one_succeeded`): `+OK` if any
//!   master killed its script. Otherwise the error that says most: another than `-NOTBUSY`
//!   (`-UNKILLABLE`, for a script that has written), else `-NOTBUSY`.
//! - FUNCTION STATS: the reply of a master running a function, which names it in
//!   `running_script`; else the first master's (the engines part is the same on every master
//!   that loaded the same libraries, which FUNCTION LOAD through redmux does).

use bytes::Bytes;

use crate::resp::Args;

/// The client's reply to control command `request`, given each master's (`None` where a
/// master could not be asked), in the map's order; `None` when no master answered.
pub fn combine(request: &[u8], replies: &[Option<Bytes>]) -> Option<Bytes> {
    let answered: Vec<&Bytes> = replies.iter().flatten().collect();
    let sub = Args::new(request).nth(1).unwrap_or_default();
    let pick = if sub.eq_ignore_ascii_case(b"stats") {
        answered.iter().find(|reply| running(reply))
    } else {
        answered
            .iter()
            .find(|reply| !reply.starts_with(b"-"))
            .or_else(|| {
                answered
                    .iter()
                    .find(|reply| !reply.starts_with(b"-NOTBUSY"))
            })
    };
    pick.or(answered.first()).map(|reply| (*reply).clone())
}

/// Whether a FUNCTION STATS reply names a running function: its `running_script` is not a
/// null (`$-1` or `*-1` in RESP2, `_` in RESP3).
fn running(reply: &[u8]) -> bool {
    const FIELD: &[u8] = b"running_script\r\n";
    let Some(at) = memchr::memmem::find(reply, FIELD) else {
        return false;
    };
    let value = &reply[at + FIELD.len()..];
    !(value.starts_with(b"$-1") || value.starts_with(b"*-1") || value.starts_with(b"_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::encode_command;

    fn replies(all: &[&'static str]) -> Vec<Option<Bytes>> {
        all.iter()
            .map(|r| (!r.is_empty()).then(|| Bytes::from_static(r.as_bytes())))
            .collect()
    }

    #[test]
    fn a_kill_succeeds_where_a_master_ran_a_script() {
        let kill = encode_command([&b"SCRIPT"[..], b"KILL"]);
        let notbusy = "-NOTBUSY No scripts in execution right now.\r\n";
        let unkillable = "-UNKILLABLE Sorry the script already executed write commands\r\n";
        let got = |all: &[&'static str]| combine(&kill, &replies(all));
        assert_eq!(got(&[notbusy, "+OK\r\n", notbusy]).unwrap(), "+OK\r\n");
        assert_eq!(got(&[notbusy, unkillable, ""]).unwrap(), unkillable);
        assert_eq!(got(&[notbusy, "", notbusy]).unwrap(), notbusy);
        assert_eq!(got(&["", ""]), None);
    }

    #[test]
    fn function_stats_come_from_the_master_running_a_function() {
        let stats = encode_command([&b"FUNCTION"[..], b"STATS"]);
        let idle = "*4\r\n$14\r\nrunning_script\r\n$-1\r\n$7\r\nengines\r\n*0\r\n";
        let busy = "*4\r\n$14\r\nrunning_script\r\n*6\r\n$4\r\nname\r\n$4\r\nspin\r\n...";
        let idle3 = "%2\r\n$14\r\nrunning_script\r\n_\r\n$7\r\nengines\r\n%0\r\n";
        assert_eq!(combine(&stats, &replies(&[idle, busy])).unwrap(), busy);
        assert_eq!(
            combine(&stats, &replies(&["", idle3, idle])).unwrap(),
            idle3
        );
    }
}
