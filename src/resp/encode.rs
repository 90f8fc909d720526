//! The one place local replies are written: every reply redmux gives without asking Redis
//! (errors, HELLO's map, CLIENT ID, PUBSUB counts, the embedded store's refusals) is built from
//! these, so the framing rules live once.
//!
//! Error texts may carry client-supplied bytes (an unknown command's name, a bad argument). A CR
//! or LF there would end the line early and let the rest be read as a reply of its own, so both
//! become a space, as in every error reply Redis writes (`addReplyErrorLength` in
//! `src/networking.c`).

use bytes::{BufMut, Bytes, BytesMut};

/// `-ERR <text>\r\n`.
pub fn error(text: &str) -> Bytes {
    line(b'-', &["ERR ", text].concat())
}

/// `-<text>\r\n`, for errors with a code of their own (`NOAUTH`, `WRONGPASS`, `NOPERM`…).
pub fn coded_error(text: &str) -> Bytes {
    line(b'-', text)
}

/// An error line from raw bytes, kept as they are except CR and LF: Redis echoes a bad byte as
/// it came, not re-encoded as UTF-8.
pub fn error_bytes(text: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 3);
    out.put_u8(b'-');
    put_clean(&mut out, text);
    out.put_slice(b"\r\n");
    out.freeze()
}

/// `+<text>\r\n`.
pub fn simple(text: &str) -> Bytes {
    line(b'+', text)
}

/// `:<n>\r\n`.
pub fn integer(n: i64) -> Bytes {
    let mut out = BytesMut::with_capacity(24);
    put_integer(&mut out, n);
    out.freeze()
}

/// `$<len>\r\n<payload>\r\n`.
pub fn bulk(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 16);
    put_bulk(&mut out, payload);
    out.freeze()
}

/// RESP3's verbatim string of plain text: `=<len>\r\ntxt:<text>\r\n`.
pub fn verbatim(text: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 16);
    put_header(&mut out, b'=', text.len() + 4);
    out.put_slice(b"txt:");
    out.put_slice(text);
    out.put_slice(b"\r\n");
    out.freeze()
}

/// The same `line`, `count` times: one error for each request of a batch, so the client's
/// replies stay aligned with its requests.
pub fn repeat(line: &[u8], count: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(line.len() * count);
    for _ in 0..count {
        out.put_slice(line);
    }
    out.freeze()
}

/// Appends `$<len>\r\n<payload>\r\n`.
pub fn put_bulk(out: &mut impl BufMut, payload: &[u8]) {
    put_header(out, b'$', payload.len());
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// Appends `:<n>\r\n`.
pub fn put_integer(out: &mut impl BufMut, n: i64) {
    out.put_u8(b':');
    out.put_slice(n.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

/// Appends an aggregate's header: `*` array, `%` map, `>` push, `$` bulk length.
pub fn put_header(out: &mut impl BufMut, kind: u8, len: usize) {
    out.put_u8(kind);
    out.put_slice(len.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

/// A CLIENT TRACKING invalidation as Redis sends it (`sendTrackingMessage` in Redis's
/// `src/tracking.c`): a push, `>2 invalidate <keys>`, to a RESP3 client; a message on
/// `__redis__:invalidate` to a RESP2 client that is subscribed. `keys: None` is the null
/// invalidation ("everything"), in the null of the protocol of the client it reaches
/// (`resp3_null`).
pub fn invalidation(push: bool, keys: Option<&[&[u8]]>, resp3_null: bool) -> Bytes {
    let mut out = BytesMut::new();
    if push {
        put_header(&mut out, b'>', 2);
        put_bulk(&mut out, b"invalidate");
    } else {
        put_header(&mut out, b'*', 3);
        put_bulk(&mut out, b"message");
        put_bulk(&mut out, b"__redis__:invalidate");
    }
    match keys {
        Some(keys) => {
            put_header(&mut out, b'*', keys.len());
            for key in keys {
                put_bulk(&mut out, key);
            }
        }
        None if resp3_null => out.put_slice(b"_\r\n"),
        None => out.put_slice(b"$-1\r\n"),
    }
    out.freeze()
}

/// The push a RESP3 client tracking with REDIRECT gets when its redirect client is gone.
pub fn tracking_redirect_broken(id: u64) -> Bytes {
    let mut out = BytesMut::new();
    put_header(&mut out, b'>', 2);
    put_bulk(&mut out, b"tracking-redir-broken");
    put_integer(&mut out, i64::try_from(id).unwrap_or(i64::MAX));
    out.freeze()
}

fn line(kind: u8, text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 3);
    out.put_u8(kind);
    put_clean(&mut out, text.as_bytes());
    out.put_slice(b"\r\n");
    out.freeze()
}

fn put_clean(out: &mut BytesMut, text: &[u8]) {
    out.extend(
        text.iter()
            .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_bytes_cannot_break_the_framing() {
        assert_eq!(
            &error("unknown command 'a\r\n+OK'")[..],
            b"-ERR unknown command 'a  +OK'\r\n"
        );
        assert_eq!(&coded_error("NOAUTH x\ny")[..], b"-NOAUTH x y\r\n");
        assert_eq!(&error_bytes(b"x\xff\r")[..], b"-x\xff \r\n");
    }

    #[test]
    fn values() {
        assert_eq!(&integer(-7)[..], b":-7\r\n");
        assert_eq!(&bulk(b"")[..], b"$0\r\n\r\n");
        assert_eq!(&bulk(b"a\r\nb")[..], b"$4\r\na\r\nb\r\n");
        assert_eq!(&simple("OK")[..], b"+OK\r\n");
        assert_eq!(&verbatim(b"id=1")[..], b"=8\r\ntxt:id=1\r\n");
        assert_eq!(&repeat(b"-ERR x\r\n", 2)[..], b"-ERR x\r\n-ERR x\r\n");
        let mut out = BytesMut::new();
        put_header(&mut out, b'*', 2);
        put_integer(&mut out, 1);
        put_bulk(&mut out, b"k");
        assert_eq!(&out[..], b"*2\r\n:1\r\n$1\r\nk\r\n");
    }
}
