//! Multi-key commands across slots. A Redis Cluster node refuses a command whose keys hash to
//! more than one slot (`-CROSSSLOT`), even when it owns them all. Six commands are plain sums
//! of single-key work, so redmux splits them into one request per slot and merges the
//! replies, as Redis Cluster clients do: MGET (values back in the order asked), MSET (`+OK`
//! only if every part said so), DEL, UNLINK, EXISTS, TOUCH (the counts added up). Any other
//! command whose keys span slots gets Redis's own `-CROSSSLOT` error without reaching Redis:
//! splitting it would break its atomicity (MSETNX, RENAME, SUNIONSTORE, a script...).
//!
//! A split is not atomic: another client may see some parts done and others not, as it
//! would with the separate commands a cluster client sends.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::resp::{encode_command, Args};

use super::keys::{self, Scope, SlotOf};
use super::reply::{elements, ReplyFormatError};
use super::slot::slot;

/// Redis Cluster's reply to a request whose keys span slots (`getNodeByQuery` in Redis's
/// `src/cluster.c`).
pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
/// Redis Cluster's error for a slot no master serves.
pub const CLUSTERDOWN: &[u8] = b"-CLUSTERDOWN Hash slot not served\r\n";

/// The commands redmux splits by slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splittable {
    Mget,
    Mset,
    Del,
    Unlink,
    Exists,
    Touch,
}

impl Splittable {
    /// The splittable command `name` is, compared case-insensitively; a name with a NUL byte
    /// is none of them.
    pub fn of(name: &[u8]) -> Option<Splittable> {
        let is = |word: &[u8]| name.eq_ignore_ascii_case(word);
        if is(b"mget") {
            Some(Splittable::Mget)
        } else if is(b"mset") {
            Some(Splittable::Mset)
        } else if is(b"del") {
            Some(Splittable::Del)
        } else if is(b"unlink") {
            Some(Splittable::Unlink)
        } else if is(b"exists") {
            Some(Splittable::Exists)
        } else if is(b"touch") {
            Some(Splittable::Touch)
        } else {
            None
        }
    }

    /// Arguments per key: MSET's key and value, one for the others.
    fn stride(self) -> usize {
        match self {
            Splittable::Mset => 2,
            _ => 1,
        }
    }
}

/// One slot's share of a split request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The slot every key of this part hashes to.
    pub slot: u16,
    /// What the caller's node-of-slot function said for `slot`: where to send `request`.
    pub node: usize,
    /// The command with this slot's keys (and MSET's values), in their original order, as a
    /// canonical multibulk request.
    pub request: Bytes,
}

/// A request split by slot, and how to put the replies back together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    kind: Splittable,
    /// In the order of each slot's first key in the request.
    parts: Vec<Part>,
    /// For each key of the request, in order: its part, and its place among that part's keys.
    order: Vec<(usize, usize)>,
}

/// Part replies that cannot be merged: the caller answers the client with an `-ERR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("{got} replies for {parts} parts")]
    PartCount { parts: usize, got: usize },
    /// A part was redirected (`-MOVED`, `-ASK`): it must be resent where Redis says before its
    /// reply is merged; a client of redmux does not know cluster redirections.
    #[error("part {0} was redirected")]
    Redirected(usize),
    #[error("part {part} replied with an unexpected shape")]
    Unexpected { part: usize },
    #[error("part {part}'s reply is not valid RESP")]
    Format {
        part: usize,
        #[source]
        source: ReplyFormatError,
    },
    #[error("the counts add up to more than a 64-bit integer")]
    Overflow,
}

impl Plan {
    /// Splits `request` (a complete multibulk request) by slot, if it is one of the [`Splittable`]s
    /// with the arguments its shape needs: at least one key, and for MSET whole key/value
    /// pairs. Otherwise `None`: the request goes on as it is, and Redis gives its own error
    /// (or [`cross_slot`] says `-CROSSSLOT`). `node_of` names the node of a slot, called once
    /// per part.
    pub fn split(request: &[u8], node_of: impl Fn(u16) -> usize) -> Option<Plan> {
        let mut args = Args::new(request);
        let name = args.next()?;
        let kind = Splittable::of(name)?;
        let rest: Vec<&[u8]> = args.collect();
        let stride = kind.stride();
        if rest.is_empty() || rest.len() % stride != 0 {
            return None;
        }
        let mut by_slot: HashMap<u16, usize> = HashMap::new();
        let mut members: Vec<Vec<&[u8]>> = Vec::new();
        let mut slots: Vec<u16> = Vec::new();
        let mut order = Vec::with_capacity(rest.len() / stride);
        for group in rest.chunks(stride) {
            let key_slot = slot(group[0]);
            let part = *by_slot.entry(key_slot).or_insert_with(|| {
                members.push(vec![name]);
                slots.push(key_slot);
                members.len() - 1
            });
            let within = (members[part].len() - 1) / stride;
            members[part].extend_from_slice(group);
            order.push((part, within));
        }
        let parts = slots
            .into_iter()
            .zip(members)
            .map(|(slot, args)| Part {
                slot,
                node: node_of(slot),
                request: encode_command(args.iter().copied()),
            })
            .collect();
        Some(Plan { kind, parts, order })
    }

    pub fn kind(&self) -> Splittable {
        self.kind
    }

    /// The requests to send, one per slot.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The client's reply, from each part's reply (`replies[i]` answers `parts()[i]`, each one
    /// complete reply, RESP2 or RESP3). MGET: the values in the order the keys were asked;
    /// MSET: `+OK` if every part said `+OK`; the others: the sum of the counts. If a part
    /// failed, the client gets the error of the first failed part (the one whose first key
    /// comes first in the request), as Redis sent it.
    pub fn merge(&self, replies: &[&[u8]]) -> Result<Bytes, MergeError> {
        if replies.len() != self.parts.len() {
            return Err(MergeError::PartCount {
                parts: self.parts.len(),
                got: replies.len(),
            });
        }
        for (part, reply) in replies.iter().enumerate() {
            if is_error(reply) {
                if is_redirect(reply) {
                    return Err(MergeError::Redirected(part));
                }
                return Ok(Bytes::copy_from_slice(reply));
            }
        }
        match self.kind {
            Splittable::Mget => self.merge_values(replies),
            Splittable::Mset => match replies.iter().all(|reply| *reply == b"+OK\r\n") {
                true => Ok(Bytes::from_static(b"+OK\r\n")),
                false => {
                    let part = replies.iter().position(|r| *r != b"+OK\r\n").unwrap_or(0);
                    Err(MergeError::Unexpected { part })
                }
            },
            Splittable::Del | Splittable::Unlink | Splittable::Exists | Splittable::Touch => {
                let mut sum: i64 = 0;
                for (part, reply) in replies.iter().enumerate() {
                    let count = integer(reply).ok_or(MergeError::Unexpected { part })?;
                    sum = sum.checked_add(count).ok_or(MergeError::Overflow)?;
                }
                Ok(Bytes::from(format!(":{sum}\r\n")))
            }
        }
    }

    fn merge_values(&self, replies: &[&[u8]]) -> Result<Bytes, MergeError> {
        // Each part's key count, counted in one pass: counting per part over every key took
        // parts × keys steps, seconds for one MGET over every slot, while the router (and every
        // client behind it) waited.
        let mut keys = vec![0usize; replies.len()];
        for &(part, _) in &self.order {
            if let Some(count) = keys.get_mut(part) {
                *count += 1;
            }
        }
        let mut values = Vec::with_capacity(replies.len());
        for (part, reply) in replies.iter().enumerate() {
            let items = elements(reply)
                .map_err(|source| MergeError::Format { part, source })?
                .ok_or(MergeError::Unexpected { part })?;
            if Some(&items.len()) != keys.get(part) {
                return Err(MergeError::Unexpected { part });
            }
            values.push(items);
        }
        let size: usize = replies.iter().map(|r| r.len()).sum::<usize>() + 16;
        let mut out = BytesMut::with_capacity(size);
        out.put_slice(format!("*{}\r\n", self.order.len()).as_bytes());
        for &(part, within) in &self.order {
            out.put_slice(values[part][within]);
        }
        Ok(out.freeze())
    }
}

fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-' | b'!'))
}

/// `-MOVED slot host:port` or `-ASK slot host:port` (RESP3 blob errors never carry these).
fn is_redirect(reply: &[u8]) -> bool {
    reply.starts_with(b"-MOVED ") || reply.starts_with(b"-ASK ")
}

/// The value of a `:n\r\n` reply.
fn integer(reply: &[u8]) -> Option<i64> {
    let body = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    crate::resp::parse_int(body)
}

/// Whether `request` must be answered with [`CROSSSLOT`]: its keys (or sharded channels)
/// span slots and it is not a request [`Plan::split`] splits.
pub fn cross_slot(request: &[u8]) -> bool {
    if Plan::split(request, |_| 0).is_some() {
        return false;
    }
    let keys = keys::keys(request);
    matches!(keys.scope(), Scope::Keys | Scope::ShardChannels) && keys.slot() == SlotOf::Cross
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(args: &[&str]) -> Bytes {
        encode_command(args.iter().map(|a| a.as_bytes()))
    }

    /// Node of a slot for the tests: three nodes as `redis-cli --cluster create` assigns them.
    fn node(slot: u16) -> usize {
        match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        }
    }

    fn split(args: &[&str]) -> Option<Plan> {
        Plan::split(&request(args), node)
    }

    // slot("foo") = 12182 (node 2), slot("bar") = 5061 (node 0), slot("baz") = 4813 (node 0),
    // slot("{foo}x") = 12182.

    #[test]
    fn mget_is_split_by_slot_and_merged_in_the_order_asked() {
        let plan = split(&["MGET", "foo", "bar", "{foo}x", "baz", "bar"]).unwrap();
        assert_eq!(plan.kind(), Splittable::Mget);
        let parts = plan.parts();
        assert_eq!(parts.len(), 3);
        assert_eq!((parts[0].slot, parts[0].node), (12182, 2));
        assert_eq!(parts[0].request, request(&["MGET", "foo", "{foo}x"]));
        assert_eq!((parts[1].slot, parts[1].node), (5061, 0));
        assert_eq!(parts[1].request, request(&["MGET", "bar", "bar"]));
        assert_eq!((parts[2].slot, parts[2].node), (4813, 0));
        assert_eq!(parts[2].request, request(&["MGET", "baz"]));
        let merged = plan
            .merge(&[
                b"*2\r\n$1\r\nF\r\n$-1\r\n",
                b"*2\r\n$1\r\nB\r\n$1\r\nB\r\n",
                b"*1\r\n$2\r\nZZ\r\n",
            ])
            .unwrap();
        assert_eq!(
            &merged[..],
            b"*5\r\n$1\r\nF\r\n$1\r\nB\r\n$-1\r\n$2\r\nZZ\r\n$1\r\nB\r\n"
        );
    }

    /// An MGET over every slot, several keys each: the merge takes time in proportion to the
    /// keys, not to parts × keys (which took minutes here). Bounded by a watchdog, generous
    /// enough for a slow debug build, so that the quadratic form fails instead of hanging.
    #[test]
    fn a_split_over_every_slot_merges_in_one_pass() {
        let keys: Vec<String> = (0..400_000)
            .map(|i| format!("{{{}}}k{i}", i % 100_000))
            .collect();
        let mut args = vec!["MGET"];
        args.extend(keys.iter().map(String::as_str));
        let plan = split(&args).unwrap();
        assert!(plan.parts().len() > 16_000, "{} parts", plan.parts().len());
        let replies: Vec<Vec<u8>> = plan
            .parts()
            .iter()
            .map(|part| {
                let n = Args::new(&part.request).count() - 1;
                let mut reply = format!("*{n}\r\n").into_bytes();
                for _ in 0..n {
                    reply.extend_from_slice(b"$1\r\nv\r\n");
                }
                reply
            })
            .collect();
        let len = crate::within_a_watchdog("merged", move || {
            let replies: Vec<&[u8]> = replies.iter().map(Vec::as_slice).collect();
            plan.merge(&replies).map(|bytes| bytes.len())
        })
        .unwrap();
        assert_eq!(len, "*400000\r\n".len() + 400_000 * "$1\r\nv\r\n".len());
    }

    #[test]
    fn mget_in_resp3_keeps_its_nulls() {
        let plan = split(&["mget", "bar", "foo"]).unwrap();
        let merged = plan.merge(&[b"*1\r\n_\r\n", b"*1\r\n$1\r\nF\r\n"]).unwrap();
        assert_eq!(&merged[..], b"*2\r\n_\r\n$1\r\nF\r\n");
        assert_eq!(plan.parts()[0].request, request(&["mget", "bar"]));
    }

    #[test]
    fn one_slot_is_one_part() {
        let plan = split(&["MGET", "{foo}a", "{foo}b"]).unwrap();
        assert_eq!(plan.parts().len(), 1);
        assert_eq!(
            plan.parts()[0].request,
            request(&["MGET", "{foo}a", "{foo}b"])
        );
        let reply: &[u8] = b"*2\r\n$1\r\na\r\n$1\r\nb\r\n";
        assert_eq!(&plan.merge(&[reply]).unwrap()[..], reply);
    }

    #[test]
    fn mset_keeps_values_with_their_keys() {
        let plan = split(&["MSET", "foo", "1", "bar", "2", "{foo}y", "3"]).unwrap();
        assert_eq!(plan.parts().len(), 2);
        assert_eq!(
            plan.parts()[0].request,
            request(&["MSET", "foo", "1", "{foo}y", "3"])
        );
        assert_eq!(plan.parts()[1].request, request(&["MSET", "bar", "2"]));
        assert_eq!(
            &plan.merge(&[b"+OK\r\n", b"+OK\r\n"]).unwrap()[..],
            b"+OK\r\n"
        );
        let oom: &[u8] = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n";
        assert_eq!(&plan.merge(&[b"+OK\r\n", oom]).unwrap()[..], oom);
        assert_eq!(
            plan.merge(&[b"+OK\r\n", b":1\r\n"]),
            Err(MergeError::Unexpected { part: 1 })
        );
    }

    #[test]
    fn counts_are_added_up() {
        for name in ["DEL", "unlink", "Exists", "TOUCH"] {
            let plan = split(&[name, "foo", "bar", "foo"]).unwrap();
            assert_eq!(plan.parts().len(), 2);
            assert_eq!(plan.parts()[0].request, request(&[name, "foo", "foo"]));
            assert_eq!(&plan.merge(&[b":2\r\n", b":1\r\n"]).unwrap()[..], b":3\r\n");
        }
        let plan = split(&["DEL", "foo", "bar"]).unwrap();
        assert_eq!(
            plan.merge(&[b":9223372036854775807\r\n", b":1\r\n"]),
            Err(MergeError::Overflow)
        );
        assert_eq!(
            plan.merge(&[b":1\r\n", b"+OK\r\n"]),
            Err(MergeError::Unexpected { part: 1 })
        );
    }

    #[test]
    fn the_first_failed_part_gives_the_error() {
        let plan = split(&["EXISTS", "foo", "bar"]).unwrap();
        let merged = plan.merge(&[b":1\r\n", b"-ERR second\r\n"]).unwrap();
        assert_eq!(&merged[..], b"-ERR second\r\n");
        let merged = plan
            .merge(&[b"-ERR first\r\n", b"-ERR second\r\n"])
            .unwrap();
        assert_eq!(&merged[..], b"-ERR first\r\n");
        let merged = plan.merge(&[b"!5\r\nERR x\r\n", b":1\r\n"]).unwrap();
        assert_eq!(&merged[..], b"!5\r\nERR x\r\n");
        let plan = split(&["MGET", "foo", "bar"]).unwrap();
        let merged = plan
            .merge(&[b"*1\r\n$1\r\nx\r\n", b"-TRYAGAIN x\r\n"])
            .unwrap();
        assert_eq!(&merged[..], b"-TRYAGAIN x\r\n");
    }

    #[test]
    fn redirections_are_not_merged() {
        let plan = split(&["MGET", "foo", "bar"]).unwrap();
        assert_eq!(
            plan.merge(&[b"*1\r\n_\r\n", b"-MOVED 5061 127.0.0.1:7001\r\n"]),
            Err(MergeError::Redirected(1))
        );
        assert_eq!(
            plan.merge(&[b"-ASK 12182 127.0.0.1:7002\r\n", b"*1\r\n_\r\n"]),
            Err(MergeError::Redirected(0))
        );
    }

    #[test]
    fn replies_of_the_wrong_shape_are_errors() {
        let plan = split(&["MGET", "foo", "bar"]).unwrap();
        assert_eq!(
            plan.merge(&[b"*1\r\n_\r\n"]),
            Err(MergeError::PartCount { parts: 2, got: 1 })
        );
        assert_eq!(
            plan.merge(&[b"*2\r\n_\r\n_\r\n", b"*1\r\n_\r\n"]),
            Err(MergeError::Unexpected { part: 0 })
        );
        assert_eq!(
            plan.merge(&[b"*1\r\n_\r\n", b":1\r\n"]),
            Err(MergeError::Unexpected { part: 1 })
        );
        assert!(matches!(
            plan.merge(&[b"*1\r\n_\r\n", b"*1\r\n"]),
            Err(MergeError::Format { part: 1, .. })
        ));
    }

    #[test]
    fn what_is_not_split() {
        assert_eq!(split(&["GET", "foo"]), None);
        assert_eq!(split(&["MGET"]), None);
        assert_eq!(split(&["MSET", "foo"]), None);
        assert_eq!(split(&["MSET", "foo", "1", "bar"]), None);
        assert_eq!(split(&["MSETNX", "foo", "1", "bar", "2"]), None);
        assert_eq!(split(&["mget\0", "foo", "bar"]), None);
        assert_eq!(Plan::split(b"junk", node), None);
    }

    #[test]
    fn cross_slot_is_for_every_other_multi_key_command() {
        let cross = |args: &[&str]| cross_slot(&request(args));
        assert!(!cross(&["MGET", "foo", "bar"]));
        assert!(!cross(&["DEL", "foo", "bar"]));
        assert!(!cross(&["MSET", "foo", "1", "bar", "2"]));
        // Not splittable: a half pair, MSETNX's all-or-nothing, two-key commands, scripts.
        assert!(cross(&["MSET", "foo", "1", "bar"]));
        assert!(cross(&["MSETNX", "foo", "1", "bar", "2"]));
        assert!(cross(&["RENAME", "foo", "bar"]));
        assert!(cross(&["SUNIONSTORE", "foo", "{foo}a", "bar"]));
        assert!(cross(&["EVAL", "s", "2", "foo", "bar"]));
        assert!(cross(&["SSUBSCRIBE", "foo", "bar"]));
        // One slot: hash tags, a single key, no keys.
        assert!(!cross(&["RENAME", "{foo}a", "{foo}b"]));
        assert!(!cross(&["MSETNX", "foo", "1", "{foo}y", "2"]));
        assert!(!cross(&["EVAL", "s", "0", "foo", "bar"]));
        assert!(!cross(&["GET", "foo"]));
        assert!(!cross(&["PING"]));
        // The keys Redis sees, not every argument: values and scores are not keys.
        assert!(!cross(&["SET", "foo", "bar"]));
        assert!(!cross(&["ZADD", "foo", "1", "bar"]));
        assert_eq!(
            CROSSSLOT,
            b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
        );
    }
}
