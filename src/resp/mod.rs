//! RESP framing: finding where requests and replies end, without building values.
//!
//! redmux never needs the decoded value of a reply and only the first few arguments of a request,
//! so both directions are handled as *framing*: find where a frame ends, hand the bytes on as a
//! `Bytes` slice of the read buffer. Both scanners are resumable, so a frame that arrives over
//! many reads is scanned once, not once per read.

mod args;
pub mod encode;
mod inline;
mod reply;
mod request;

pub use args::{encode_command, Args};
pub use reply::{ReplyError, ReplyScanner};
pub use request::{Frame, Limits, ProtocolError, RequestDecoder, INLINE_MAX};

/// Where `a` or `b` first occurs in `buf`. RESP's header lines are a few bytes long, and there a
/// plain loop beats `memchr2`, whose vector setup dominates on short input: under callgrind,
/// memchr was 15% of redmux's instructions with `redis-benchmark -P 32`. Long lines (inline
/// requests, error replies, large counts) still get the vectorised search past the first bytes.
#[inline]
pub(crate) fn find2(a: u8, b: u8, buf: &[u8]) -> Option<usize> {
    const SHORT: usize = 16;
    let (head, tail) = buf.split_at(buf.len().min(SHORT));
    match head.iter().position(|&c| c == a || c == b) {
        Some(at) => Some(at),
        None => memchr::memchr2(a, b, tail).map(|at| at + SHORT),
    }
}

/// Parses a length or count the way Redis's `string2ll` does: optional `-`, digits, no leading
/// zeros, no `+`, no spaces, and `-0` rejected.
pub(crate) fn parse_int(digits: &[u8]) -> Option<i64> {
    let (negative, body) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    match body {
        [] => return None,
        [b'0'] if !negative => return Some(0),
        [b'0', ..] => return None,
        _ => {}
    }
    let mut value: i64 = 0;
    for &b in body {
        if !b.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(b - b'0');
        value = if negative {
            value.checked_mul(10)?.checked_sub(digit)?
        } else {
            value.checked_mul(10)?.checked_add(digit)?
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::{find2, parse_int};

    #[test]
    fn find2_finds_the_first_of_either_byte_in_short_and_long_input() {
        for len in [0, 1, 15, 16, 17, 40, 100] {
            let mut buf = vec![b'x'; len];
            assert_eq!(find2(b'\r', 0, &buf), None, "{len}");
            for at in (0..len).rev() {
                buf[at] = if at % 2 == 0 { b'\r' } else { 0 };
                assert_eq!(find2(b'\r', 0, &buf), Some(at), "{len} {at}");
            }
        }
    }

    #[test]
    fn parse_int_follows_string2ll() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"123"), Some(123));
        assert_eq!(parse_int(b"-1"), Some(-1));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1a",
            b"9223372036854775808",
        ] {
            assert_eq!(parse_int(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
