//! Reading the few replies the cluster blocks must look inside: `CLUSTER SHARDS` and `CLUSTER
//! SLOTS` (decoded into values), and the parts of a split MGET, DEL... (cut into elements,
//! each kept as the bytes Redis sent, so a RESP2 or RESP3 element goes back to the client
//! untouched). Everything else redmux relays as framed bytes and never decodes.
//!
//! Replies come from Redis, but a bug or a wrong server must still give an error, not a panic
//! or an unbounded allocation: nesting is capped, and no header's count is trusted for more
//! room than the bytes that follow could fill.

use crate::resp::ReplyScanner;

/// Nesting deeper than any cluster reply has (SHARDS: shards → shard → nodes → node map).
const DEPTH_MAX: usize = 8;

/// A reply that is not what the caller can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyFormatError {
    #[error("the reply ends before it is complete")]
    Incomplete,
    #[error("bytes follow the reply")]
    Trailing,
    #[error("malformed reply header")]
    BadHeader,
    #[error("reply type byte 0x{0:02x} not expected here")]
    UnexpectedType(u8),
    #[error("reply nested deeper than {DEPTH_MAX} levels")]
    TooDeep,
}

/// A decoded reply. RESP3 aggregates become `Array` (a map as its keys and values in turn, as
/// RESP2 sends it); scalar types the cluster replies never use are `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// `+`
    Simple(&'a [u8]),
    /// `-`, or RESP3 `!`: the text after the type byte.
    Error(&'a [u8]),
    /// `:`
    Int(i64),
    /// `$`, or RESP3 `=` (with its `txt:` prefix).
    Bulk(&'a [u8]),
    /// `$-1`, `*-1`, RESP3 `_`.
    Null,
    /// `*`, RESP3 `~`, `%` (flattened), `>`.
    Array(Vec<Value<'a>>),
    /// RESP3 doubles, booleans, big numbers.
    Other,
}

impl<'a> Value<'a> {
    /// The bytes of a bulk or simple string.
    pub fn bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Bulk(b) | Value::Simple(b) => Some(b),
            _ => None,
        }
    }

    /// An integer, or a bulk or simple string of digits (as `string2ll` reads it).
    pub fn int(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            Value::Bulk(b) | Value::Simple(b) => crate::resp::parse_int(b),
            _ => None,
        }
    }
}

/// Decodes one complete reply that fills `bytes` exactly.
pub fn decode(bytes: &[u8]) -> Result<Value<'_>, ReplyFormatError> {
    let (value, used) = decode_at(bytes, 0)?;
    match used == bytes.len() {
        true => Ok(value),
        false => Err(ReplyFormatError::Trailing),
    }
}

/// One header line: its type byte, its text, and where the line ends.
fn header(bytes: &[u8]) -> Result<(u8, &[u8], usize), ReplyFormatError> {
    let (&kind, rest) = bytes.split_first().ok_or(ReplyFormatError::Incomplete)?;
    let cr = rest
        .iter()
        .position(|&b| b == b'\r')
        .ok_or(ReplyFormatError::Incomplete)?;
    match rest.get(cr + 1) {
        Some(b'\n') => Ok((kind, &rest[..cr], 1 + cr + 2)),
        Some(_) => Err(ReplyFormatError::BadHeader),
        None => Err(ReplyFormatError::Incomplete),
    }
}

/// A length or count: `None` for -1 (null), an error for anything else not a count.
fn count(text: &[u8]) -> Result<Option<usize>, ReplyFormatError> {
    match crate::resp::parse_int(text) {
        Some(-1) => Ok(None),
        Some(n) => usize::try_from(n)
            .map(Some)
            .map_err(|_| ReplyFormatError::BadHeader),
        None => Err(ReplyFormatError::BadHeader),
    }
}

fn decode_at(bytes: &[u8], depth: usize) -> Result<(Value<'_>, usize), ReplyFormatError> {
    if depth > DEPTH_MAX {
        return Err(ReplyFormatError::TooDeep);
    }
    let (kind, text, mut used) = header(bytes)?;
    let value = match kind {
        b'+' => Value::Simple(text),
        b'-' => Value::Error(text),
        b':' => Value::Int(crate::resp::parse_int(text).ok_or(ReplyFormatError::BadHeader)?),
        b'_' => Value::Null,
        b',' | b'#' | b'(' => Value::Other,
        b'$' | b'=' | b'!' => match count(text)? {
            None => Value::Null,
            Some(len) => {
                let end = used.checked_add(len).ok_or(ReplyFormatError::BadHeader)?;
                let body = bytes.get(used..end).ok_or(ReplyFormatError::Incomplete)?;
                match bytes.get(end..end + 2) {
                    Some(b"\r\n") => {}
                    Some(_) => return Err(ReplyFormatError::BadHeader),
                    None => return Err(ReplyFormatError::Incomplete),
                }
                used = end + 2;
                match kind {
                    b'!' => Value::Error(body),
                    _ => Value::Bulk(body),
                }
            }
        },
        b'*' | b'~' | b'>' | b'%' => match count(text)? {
            None => Value::Null,
            Some(n) => {
                let n = match kind {
                    b'%' => n.checked_mul(2).ok_or(ReplyFormatError::BadHeader)?,
                    _ => n,
                };
                // Each element takes at least 3 bytes: never reserve more than could follow.
                let mut items = Vec::with_capacity(n.min((bytes.len() - used) / 3));
                for _ in 0..n {
                    let (item, len) = decode_at(&bytes[used..], depth + 1)?;
                    items.push(item);
                    used += len;
                }
                Value::Array(items)
            }
        },
        other => return Err(ReplyFormatError::UnexpectedType(other)),
    };
    Ok((value, used))
}

/// The elements of an array reply (`*` or RESP3 `~`/`>`), each as its own bytes, or `None` if
/// the reply is not an array (an error, a null...). `bytes` must hold exactly one reply.
pub fn elements(bytes: &[u8]) -> Result<Option<Vec<&[u8]>>, ReplyFormatError> {
    let (kind, text, mut at) = header(bytes)?;
    if !matches!(kind, b'*' | b'~' | b'>') {
        return Ok(None);
    }
    let Some(n) = count(text)? else {
        return Ok(None);
    };
    let mut items = Vec::with_capacity(n.min((bytes.len() - at) / 3));
    for _ in 0..n {
        let rest = &bytes[at..];
        let mut scanner = ReplyScanner::with_push();
        let end = match scanner.next_reply(rest) {
            Ok(Some(end)) => end,
            Ok(None) => return Err(ReplyFormatError::Incomplete),
            Err(_) => return Err(ReplyFormatError::BadHeader),
        };
        items.push(&rest[..end]);
        at += end;
    }
    match at == bytes.len() {
        true => Ok(Some(items)),
        false => Err(ReplyFormatError::Trailing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_resp2_and_resp3_shapes() {
        assert_eq!(decode(b"+OK\r\n"), Ok(Value::Simple(b"OK")));
        assert_eq!(decode(b"-ERR x\r\n"), Ok(Value::Error(b"ERR x")));
        assert_eq!(decode(b"!5\r\nERR x\r\n"), Ok(Value::Error(b"ERR x")));
        assert_eq!(decode(b":-3\r\n"), Ok(Value::Int(-3)));
        assert_eq!(decode(b"$3\r\na\r\n\r\n"), Ok(Value::Bulk(b"a\r\n")));
        assert_eq!(decode(b"$-1\r\n"), Ok(Value::Null));
        assert_eq!(decode(b"*-1\r\n"), Ok(Value::Null));
        assert_eq!(decode(b"_\r\n"), Ok(Value::Null));
        assert_eq!(decode(b",1.5\r\n"), Ok(Value::Other));
        assert_eq!(
            decode(b"%1\r\n+a\r\n*2\r\n:1\r\n$0\r\n\r\n"),
            Ok(Value::Array(vec![
                Value::Simple(b"a"),
                Value::Array(vec![Value::Int(1), Value::Bulk(b"")])
            ]))
        );
        assert_eq!(Value::Bulk(b"12").int(), Some(12));
        assert_eq!(Value::Bulk(b"012").int(), None);
    }

    #[test]
    fn refuses_what_is_not_one_whole_reply() {
        assert_eq!(decode(b""), Err(ReplyFormatError::Incomplete));
        assert_eq!(decode(b"+OK\r\n+OK\r\n"), Err(ReplyFormatError::Trailing));
        assert_eq!(decode(b"$5\r\nab\r\n"), Err(ReplyFormatError::Incomplete));
        assert_eq!(decode(b"$2\r\nabcd"), Err(ReplyFormatError::BadHeader));
        assert_eq!(decode(b"*2\r\n:1\r\n"), Err(ReplyFormatError::Incomplete));
        assert_eq!(decode(b"*x\r\n"), Err(ReplyFormatError::BadHeader));
        assert_eq!(decode(b"*-2\r\n"), Err(ReplyFormatError::BadHeader));
        assert_eq!(decode(b"+OK\rx"), Err(ReplyFormatError::BadHeader));
        assert_eq!(
            decode(b"?\r\n"),
            Err(ReplyFormatError::UnexpectedType(b'?'))
        );
        // A count far beyond the bytes: an error, with no huge allocation on the way.
        assert_eq!(
            decode(b"*9223372036854775807\r\n"),
            Err(ReplyFormatError::Incomplete)
        );
        let deep = "*1\r\n".repeat(DEPTH_MAX + 2) + ":1\r\n";
        assert_eq!(decode(deep.as_bytes()), Err(ReplyFormatError::TooDeep));
    }

    #[test]
    fn elements_keep_each_element_as_sent() {
        let reply = b"*3\r\n$1\r\na\r\n_\r\n*1\r\n:1\r\n";
        assert_eq!(
            elements(reply),
            Ok(Some(vec![&b"$1\r\na\r\n"[..], b"_\r\n", b"*1\r\n:1\r\n"]))
        );
        assert_eq!(elements(b"*0\r\n"), Ok(Some(vec![])));
        assert_eq!(elements(b"-ERR x\r\n"), Ok(None));
        assert_eq!(elements(b"*-1\r\n"), Ok(None));
        assert_eq!(elements(b"*2\r\n:1\r\n"), Err(ReplyFormatError::Incomplete));
        assert_eq!(
            elements(b"*1\r\n:1\r\n:2\r\n"),
            Err(ReplyFormatError::Trailing)
        );
        assert_eq!(elements(b"*1\r\n?x\r\n"), Err(ReplyFormatError::BadHeader));
    }
}
