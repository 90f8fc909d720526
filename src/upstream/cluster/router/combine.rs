//! How the replies of the nodes a request was split over become the one reply its client
//! expects: MGET's values in key order, DEL's and EXISTS's sums, MSET's OK only if every part
//! was OK, KEYS's union, SCAN's cursor carrying the node.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use super::{elements, parse_int, Combine, Merge, CURSOR_BITS};
use crate::upstream::ReplyScanner;

/// Where each of `count` complete RESP values in `bytes` starts and ends; `None` if `bytes`
/// does not hold at least that many.
pub(in crate::upstream::cluster) fn split_replies(
    bytes: &[u8],
    count: usize,
) -> Option<Vec<(usize, usize)>> {
    let mut scanner = ReplyScanner::with_push();
    let mut at = 0;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let end = scanner.next_reply(&bytes[at..]).ok()??;
        scanner.consumed(end);
        out.push((at, at + end));
        at += end;
    }
    Some(out)
}

/// The bounds of each of `count` requests in a batch's frames.
pub(in crate::upstream::cluster) fn requests(
    frames: &[u8],
    count: u32,
) -> Option<Vec<(usize, usize)>> {
    let bounds = split_replies(frames, usize::try_from(count).ok()?)?;
    (bounds.last().map_or(0, |&(_, to)| to) == frames.len()).then_some(bounds)
}

/// The client's reply to a request answered in parts.
pub(super) fn merge(how: &Merge, parts: &[Bytes]) -> Bytes {
    let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
    let first_error = || {
        refs.iter()
            .find(|r| is_error(r))
            .map(|r| Bytes::copy_from_slice(r))
    };
    let merged = match how {
        Merge::Split(plan) => plan.merge(&refs).map_err(|e| e.to_string()),
        Merge::Combine(combine) => {
            if let (Combine::OneSucceeded, Some(ok)) = (combine, refs.iter().find(|r| !is_error(r)))
            {
                return Bytes::copy_from_slice(ok);
            }
            if let Some(error) = first_error() {
                return error;
            }
            combined(*combine, &refs)
        }
        Merge::Scan { master, masters } => match refs.first() {
            Some(reply) if is_error(reply) => return Bytes::copy_from_slice(reply),
            Some(reply) => scan_reply(reply, *master, *masters),
            None => Err("no reply".to_owned()),
        },
    };
    merged.unwrap_or_else(|why| {
        Bytes::from(format!(
            "-ERR redmux: cluster replies could not be combined: {why}\r\n"
        ))
    })
}

pub(super) fn combined(combine: Combine, parts: &[&[u8]]) -> Result<Bytes, String> {
    match combine {
        Combine::Sum => {
            let mut sum: i64 = 0;
            for part in parts {
                let n = integer(part).ok_or("not an integer")?;
                sum = sum.checked_add(n).ok_or("overflow")?;
            }
            Ok(Bytes::from(format!(":{sum}\r\n")))
        }
        Combine::Concat => {
            let mut items = Vec::new();
            let mut header = b'*';
            for part in parts {
                header = part.first().copied().unwrap_or(b'*');
                let elements = elements(part).map_err(|e| e.to_string())?;
                items.extend(elements.ok_or("not an array")?);
            }
            let mut out = BytesMut::new();
            out.put_u8(header);
            out.put_slice(format!("{}\r\n", items.len()).as_bytes());
            for item in items {
                out.put_slice(item);
            }
            Ok(out.freeze())
        }
        Combine::AllSucceeded | Combine::OneSucceeded => parts
            .first()
            .map(|p| Bytes::copy_from_slice(p))
            .ok_or_else(|| "no reply".to_owned()),
        Combine::LogicalAnd => {
            let mut result: Option<Vec<i64>> = None;
            for part in parts {
                let elements = elements(part)
                    .map_err(|e| e.to_string())?
                    .ok_or("not an array")?;
                let values = elements
                    .iter()
                    .map(|e| integer(e).ok_or("not an integer"))
                    .collect::<Result<Vec<i64>, _>>()?;
                result = Some(match result {
                    None => values,
                    Some(before) => before
                        .iter()
                        .zip(&values)
                        .map(|(a, b)| i64::from(*a != 0 && *b != 0))
                        .collect(),
                });
            }
            let values = result.unwrap_or_default();
            let mut out = format!("*{}\r\n", values.len());
            for value in values {
                out += &format!(":{value}\r\n");
            }
            Ok(Bytes::from(out))
        }
    }
}

/// A master's SCAN reply with its cursor made the client's: the next master's start once this
/// master is done, 0 after the last.
pub(super) fn scan_reply(reply: &[u8], master: usize, masters: usize) -> Result<Bytes, String> {
    let items = elements(reply)
        .map_err(|e| e.to_string())?
        .ok_or("not an array")?;
    let [cursor, keys] = items.as_slice() else {
        return Err("not a cursor and keys".to_owned());
    };
    let cursor = bulk(cursor)
        .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok())
        .ok_or("not a cursor")?;
    if cursor >> CURSOR_BITS != 0 {
        return Err("cursor too large to encode the master".to_owned());
    }
    let next = match cursor {
        0 if master + 1 < masters => ((master + 1) as u64) << CURSOR_BITS,
        0 => 0,
        own => own | ((master as u64) << CURSOR_BITS),
    };
    let next = next.to_string();
    let mut out = BytesMut::with_capacity(reply.len() + 24);
    out.put_slice(format!("*2\r\n${}\r\n{next}\r\n", next.len()).as_bytes());
    out.put_slice(keys);
    Ok(out.freeze())
}

pub(super) fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-' | b'!'))
}

/// The value of a `:n` reply.
pub(super) fn integer(reply: &[u8]) -> Option<i64> {
    parse_int(reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
}

/// The contents of a `$n` bulk string.
pub(super) fn bulk(reply: &[u8]) -> Option<&[u8]> {
    let rest = reply.strip_prefix(b"$")?;
    let cr = rest.iter().position(|&c| c == b'\r')?;
    let len = usize::try_from(parse_int(&rest[..cr])?).ok()?;
    rest.get(cr + 2..cr + 2 + len)
}

/// A random number, for RANDOMKEY's master.
pub(super) fn random() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
