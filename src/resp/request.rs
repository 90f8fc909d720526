//! Request framing with Redis 7's rules and errors (`processMultibulkBuffer`, `src/networking.c`).

use bytes::Bytes;

use super::{args::Args, encode_command, find2, inline, parse_int};

/// Longest inline request, and longest `*N` / `$N` header line, Redis buffers before giving up
/// (`PROTO_INLINE_MAX_SIZE`).
pub const INLINE_MAX: usize = 64 * 1024;

/// Redis rejects multibulk counts above `INT_MAX` whatever the configured limit.
const REDIS_MAX_MULTIBULK: i64 = i32::MAX as i64;

/// Size limits a request must respect; exceeding one is a protocol error, as in Redis.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest bulk string argument (`proto-max-bulk-len`).
    pub max_bulk_len: u64,
    /// Most arguments in one multibulk request.
    pub max_multibulk_len: u64,
}

/// A protocol error: the client gets `-ERR Protocol error: ...` and is disconnected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// Redis echoes the offending byte; CR and LF would break the error line, so they become a
    /// space as in every Redis error reply.
    #[error("Protocol error: expected '$', got '{}'", printable(*.0))]
    ExpectedDollar(u8),
    #[error("Protocol error: too big inline request")]
    TooBigInlineRequest,
    #[error("Protocol error: too big mbulk count string")]
    TooBigMbulkCount,
    #[error("Protocol error: too big bulk count string")]
    TooBigBulkCount,
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("Protocol error: unauthenticated multibulk length")]
    UnauthenticatedMultibulkLength,
    #[error("Protocol error: unauthenticated bulk length")]
    UnauthenticatedBulkLength,
}

/// Limits Redis applies before a client has authenticated (when a password is required).
const UNAUTHENTICATED_MULTIBULK: u64 = 10;
const UNAUTHENTICATED_BULK: u64 = 16384;

impl ProtocolError {
    /// The error reply, byte for byte as Redis sends it: the offending byte is echoed raw (a
    /// byte above 0x7f is not re-encoded as UTF-8), CR and LF replaced by a space.
    pub fn reply(&self) -> Bytes {
        match self {
            ProtocolError::ExpectedDollar(byte) => {
                let byte = if matches!(byte, b'\r' | b'\n') {
                    b' '
                } else {
                    *byte
                };
                Bytes::from(
                    [
                        &b"-ERR Protocol error: expected '$', got '"[..],
                        &[byte],
                        b"'\r\n",
                    ]
                    .concat(),
                )
            }
            other => super::encode::error(&other.to_string()),
        }
    }
}

/// For logs only; the reply uses the raw byte.
fn printable(byte: u8) -> char {
    match byte {
        b'\r' | b'\n' => ' ',
        other => char::from(other),
    }
}

/// One complete request found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A command occupying the first `len` bytes. `rewritten` is `None` when those bytes are a
    /// canonical multibulk request that can be forwarded as received; otherwise (an inline
    /// command, or a multibulk one with the sloppy separators Redis tolerates) it holds the
    /// same command re-encoded canonically.
    Command {
        len: usize,
        rewritten: Option<Bytes>,
    },
    /// Input Redis consumes without replying: `*0`, `*-1`, a blank inline line.
    Ignored { len: usize },
}

impl Frame {
    /// The canonical multibulk bytes of a command, given the buffer it was decoded from.
    pub fn command_bytes<'a>(&'a self, buf: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            Frame::Command {
                rewritten: Some(bytes),
                ..
            } => Some(bytes),
            Frame::Command {
                len,
                rewritten: None,
            } => Some(&buf[..*len]),
            Frame::Ignored { .. } => None,
        }
    }

    /// Bytes of the buffer this frame occupies.
    pub fn consumed(&self) -> usize {
        match self {
            Frame::Command { len, .. } | Frame::Ignored { len } => *len,
        }
    }
}

/// Where a multibulk request stopped for lack of bytes, so the next read resumes there instead of
/// rescanning every argument (a 1M-argument request arriving in 64 KiB reads stays linear).
#[derive(Debug, Clone, Copy)]
struct Partial {
    /// Arguments still to come.
    remaining: u64,
    /// Offset, from the start of the request, of the next argument's `$` header.
    cursor: usize,
    /// Whether every separator so far was a proper CRLF.
    canonical: bool,
    /// Where the first argument, the command's name, lies in the request, once seen.
    name: Option<(usize, usize)>,
}

/// Splits a client's byte stream into requests. Holds only the resume point of an incomplete
/// multibulk request; the bytes themselves stay in the caller's buffer.
#[derive(Debug)]
pub struct RequestDecoder {
    limits: Limits,
    partial: Option<Partial>,
    /// Bytes still missing from the current request, when known (a bulk payload being read):
    /// lets the reader size its next read.
    missing: usize,
    /// The client has not authenticated yet (and must): Redis's tighter limits apply.
    unauthenticated: bool,
    /// The name of the command last decoded, if it came canonical (see [`Self::name`]).
    name: Option<(usize, usize)>,
}

impl RequestDecoder {
    pub fn new(limits: Limits) -> Self {
        RequestDecoder {
            limits,
            partial: None,
            missing: 0,
            unauthenticated: false,
            name: None,
        }
    }

    /// New limits (reloaded), for the headers decoded from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Applies Redis's limits for clients that still have to authenticate (`true`), or lifts
    /// them.
    pub fn set_unauthenticated(&mut self, unauthenticated: bool) {
        self.unauthenticated = unauthenticated;
    }

    /// Bytes known to be still missing from the request being received (0 if unknown).
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// Where the command name of the request last decoded lies in it, when that request is
    /// forwarded as received (`rewritten: None`): found while framing, so that deciding what
    /// to do with the request need not parse its headers again.
    pub fn name(&self) -> Option<std::ops::Range<usize>> {
        self.name.map(|(start, len)| start..start + len)
    }

    /// Finds the request at the start of `buf`. `Ok(None)` means "read more". After
    /// `Ok(Some(frame))` the caller must consume `frame.len()` bytes before the next call.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        self.missing = 0;
        self.name = None;
        match buf.first() {
            None => Ok(None),
            Some(b'*') => self.decode_multibulk(buf),
            Some(_) => decode_inline(buf),
        }
    }

    fn decode_multibulk(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        let mut state = match self.partial.take() {
            Some(state) => state,
            None => {
                let Some(Header { digits, next, crlf }) =
                    header(buf, 1, ProtocolError::TooBigMbulkCount)?
                else {
                    return Ok(None);
                };
                let count = match parse_int(digits) {
                    Some(n) if n <= REDIS_MAX_MULTIBULK => n,
                    _ => return Err(ProtocolError::InvalidMultibulkLength),
                };
                if count > 0
                    && self.unauthenticated
                    && count.unsigned_abs() > UNAUTHENTICATED_MULTIBULK
                {
                    return Err(ProtocolError::UnauthenticatedMultibulkLength);
                }
                if count <= 0 {
                    return Ok(Some(Frame::Ignored { len: next }));
                }
                if count.unsigned_abs() > self.limits.max_multibulk_len {
                    return Err(ProtocolError::InvalidMultibulkLength);
                }
                Partial {
                    remaining: count.unsigned_abs(),
                    cursor: next,
                    canonical: crlf,
                    name: None,
                }
            }
        };
        while state.remaining > 0 {
            match self.bulk(buf, state.cursor)? {
                Some((payload, end, proper)) => {
                    state.name.get_or_insert((payload, end - 2 - payload));
                    state.cursor = end;
                    state.canonical &= proper;
                    state.remaining -= 1;
                }
                None => {
                    self.partial = Some(state);
                    return Ok(None);
                }
            }
        }
        let len = state.cursor;
        let rewritten = if state.canonical {
            self.name = state.name;
            None
        } else {
            Some(encode_command(Args::new(&buf[..len])))
        };
        Ok(Some(Frame::Command { len, rewritten }))
    }

    /// Checks the bulk argument at `at`: `Some((payload, end, canonical))` once all of it is
    /// buffered, with the offsets of its payload and of the byte after it.
    fn bulk(
        &mut self,
        buf: &[u8],
        at: usize,
    ) -> Result<Option<(usize, usize, bool)>, ProtocolError> {
        let Some(rest) = buf.get(at..).filter(|rest| !rest.is_empty()) else {
            return Ok(None);
        };
        let Some(Header {
            digits,
            next: payload_at,
            crlf,
        }) = header(rest, 1, ProtocolError::TooBigBulkCount)?
        else {
            return Ok(None);
        };
        // Redis looks at the type byte only once the whole header line is there.
        if rest[0] != b'$' {
            return Err(ProtocolError::ExpectedDollar(rest[0]));
        }
        let len = match parse_int(digits) {
            Some(n) if n >= 0 && n.unsigned_abs() <= self.limits.max_bulk_len => n.unsigned_abs(),
            _ => return Err(ProtocolError::InvalidBulkLength),
        };
        if self.unauthenticated && len > UNAUTHENTICATED_BULK {
            return Err(ProtocolError::UnauthenticatedBulkLength);
        }
        let len = usize::try_from(len).map_err(|_| ProtocolError::InvalidBulkLength)?;
        let end = payload_at + len + 2;
        if rest.len() < end {
            self.missing = end - rest.len();
            return Ok(None);
        }
        // Redis skips the two bytes after the payload unchecked; forwarding them as received
        // would pass the sloppiness on, so such a request is re-encoded instead.
        let canonical = crlf && &rest[end - 2..end] == b"\r\n";
        Ok(Some((at + payload_at, at + end, canonical)))
    }
}

/// A `*N` or `$N` header line.
struct Header<'a> {
    digits: &'a [u8],
    /// Offset just past the line.
    next: usize,
    /// Whether the line ended in a proper CRLF (Redis skips the byte after the CR unchecked).
    crlf: bool,
}

/// Reads the header line starting at `buf[0]`; `Ok(None)` if it is not complete yet.
fn header(
    buf: &[u8],
    digits_at: usize,
    too_big: ProtocolError,
) -> Result<Option<Header<'_>>, ProtocolError> {
    // Redis scans with strchr, which stops at a NUL: a NUL before the CR stalls the line.
    let cr = match find2(b'\r', 0, buf) {
        Some(i) if buf[i] == b'\r' => i,
        _ => {
            return if buf.len() > INLINE_MAX {
                Err(too_big)
            } else {
                Ok(None)
            }
        }
    };
    if cr + 2 > buf.len() {
        return Ok(None);
    }
    Ok(Some(Header {
        digits: buf.get(digits_at..cr).unwrap_or_default(),
        next: cr + 2,
        crlf: buf[cr + 1] == b'\n',
    }))
}

fn decode_inline(buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
    // strchr semantics again: a NUL hides the newline behind it.
    let newline = match find2(b'\n', 0, buf) {
        Some(i) if buf[i] == b'\n' => i,
        _ => {
            return if buf.len() > INLINE_MAX {
                Err(ProtocolError::TooBigInlineRequest)
            } else {
                Ok(None)
            }
        }
    };
    let len = newline + 1;
    let mut line = &buf[..newline];
    if let Some(stripped) = line.strip_suffix(b"\r") {
        line = stripped;
    }
    let args = inline::split_args(line).ok_or(ProtocolError::UnbalancedQuotes)?;
    if args.is_empty() {
        return Ok(Some(Frame::Ignored { len }));
    }
    let rewritten = encode_command(args.iter().map(Vec::as_slice));
    Ok(Some(Frame::Command {
        len,
        rewritten: Some(rewritten),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> RequestDecoder {
        RequestDecoder::new(Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
        })
    }

    fn command(input: &[u8]) -> Vec<Vec<u8>> {
        let mut d = decoder();
        let frame = d.decode(input).unwrap().expect("complete");
        let bytes = frame.command_bytes(input).expect("a command").to_vec();
        Args::new(&bytes).map(<[u8]>::to_vec).collect()
    }

    fn error(input: &[u8]) -> String {
        decoder().decode(input).unwrap_err().to_string()
    }

    #[test]
    fn canonical_multibulk_is_forwarded_as_is() {
        let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n";
        let frame = decoder().decode(input).unwrap().unwrap();
        assert_eq!(
            frame,
            Frame::Command {
                len: 20,
                rewritten: None
            }
        );
    }

    #[test]
    fn the_name_of_a_canonical_request_is_found_while_framing() {
        let mut decoder = decoder();
        let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        decoder.decode(input).unwrap().unwrap();
        assert_eq!(decoder.name().map(|at| &input[at]), Some(&b"GET"[..]));
        // Arriving in pieces, the name is kept across reads.
        assert_eq!(decoder.decode(&input[..14]).unwrap(), None);
        assert_eq!(decoder.name(), None);
        decoder.decode(input).unwrap().unwrap();
        assert_eq!(decoder.name().map(|at| &input[at]), Some(&b"GET"[..]));
        // None for a rewritten request (sloppy or inline), nor for input that is ignored.
        for other in [&b"*1\r\n$4\r\nPINGxx"[..], b"PING\r\n", b"*0\r\n"] {
            decoder.decode(other).unwrap().unwrap();
            assert_eq!(decoder.name(), None, "{:?}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn sloppy_separators_are_accepted_and_rewritten() {
        assert_eq!(command(b"*1\rX$4\rYPING\r\n"), vec![b"PING".to_vec()]);
        let frame = decoder().decode(b"*1\r\n$4\r\nPINGxx").unwrap().unwrap();
        assert_eq!(
            frame,
            Frame::Command {
                len: 14,
                rewritten: Some(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"))
            }
        );
    }

    #[test]
    fn empty_and_negative_counts_are_ignored() {
        for input in [&b"*0\r\n"[..], b"*-1\r\n", b"*-5\r\n"] {
            assert_eq!(
                decoder().decode(input).unwrap(),
                Some(Frame::Ignored { len: input.len() })
            );
        }
        assert_eq!(
            decoder().decode(b"\r\n").unwrap(),
            Some(Frame::Ignored { len: 2 })
        );
        assert_eq!(
            decoder().decode(b"  \t \n").unwrap(),
            Some(Frame::Ignored { len: 5 })
        );
    }

    #[test]
    fn redis_error_texts() {
        let mbulk = "Protocol error: invalid multibulk length";
        for input in [
            &b"*abc\r\n"[..],
            b"*\r\n",
            b"*+1\r\n",
            b"* 1\r\n",
            b"*01\r\n",
            b"*-0\r\n",
            b"*2147483648\r\n",
        ] {
            assert_eq!(error(input), mbulk, "{:?}", String::from_utf8_lossy(input));
        }
        assert_eq!(error(b"*1048577\r\n"), mbulk);
        let bulk = "Protocol error: invalid bulk length";
        for input in [
            &b"*1\r\n$-1\r\n"[..],
            b"*1\r\n$-0\r\n",
            b"*1\r\n$04\r\n",
            b"*1\r\n$\r\n",
            b"*1\r\n$x\r\n",
            b"*1\r\n$536870913\r\n",
        ] {
            assert_eq!(error(input), bulk, "{:?}", String::from_utf8_lossy(input));
        }
        assert_eq!(
            error(b"*1\r\nfoo\r\n"),
            "Protocol error: expected '$', got 'f'"
        );
        assert_eq!(
            error(b"*1\r\n:1\r\n"),
            "Protocol error: expected '$', got ':'"
        );
        assert_eq!(
            error(b"SET \"a b\"c\r\n"),
            "Protocol error: unbalanced quotes in request"
        );
        assert_eq!(
            error(&[b'a'; INLINE_MAX + 1]),
            "Protocol error: too big inline request"
        );
        let mut long = b"*".to_vec();
        long.extend([b'1'; INLINE_MAX + 1]);
        assert_eq!(error(&long), "Protocol error: too big mbulk count string");
        let mut long = b"*1\r\n$".to_vec();
        long.extend([b'1'; INLINE_MAX + 1]);
        assert_eq!(error(&long), "Protocol error: too big bulk count string");
    }

    #[test]
    fn error_replies_echo_the_raw_byte() {
        assert_eq!(
            ProtocolError::ExpectedDollar(0xe9).reply(),
            Bytes::from_static(b"-ERR Protocol error: expected '$', got '\xe9'\r\n")
        );
        assert_eq!(
            ProtocolError::ExpectedDollar(b'\n').reply(),
            Bytes::from_static(b"-ERR Protocol error: expected '$', got ' '\r\n")
        );
        assert_eq!(
            ProtocolError::InvalidBulkLength.reply(),
            Bytes::from_static(b"-ERR Protocol error: invalid bulk length\r\n")
        );
    }

    #[test]
    fn bulk_limit_is_configurable() {
        let mut d = RequestDecoder::new(Limits {
            max_bulk_len: 4,
            max_multibulk_len: 2,
        });
        assert!(d.decode(b"*1\r\n$4\r\nPING\r\n").unwrap().is_some());
        assert_eq!(
            d.decode(b"*1\r\n$5\r\n").unwrap_err(),
            ProtocolError::InvalidBulkLength
        );
        assert_eq!(
            d.decode(b"*3\r\n").unwrap_err(),
            ProtocolError::InvalidMultibulkLength
        );
    }

    #[test]
    fn incomplete_input_asks_for_more_and_resumes() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n";
        let mut d = decoder();
        for end in 0..input.len() {
            assert_eq!(
                d.decode(&input[..end]).unwrap(),
                None,
                "prefix of {end} bytes"
            );
        }
        assert_eq!(d.missing(), 1, "the last byte of the value's CRLF");
        assert!(d.decode(input).unwrap().is_some());
        assert_eq!(d.missing(), 0);
        let mut d = decoder();
        assert_eq!(d.decode(b"*1\r\n$10\r\nab").unwrap(), None);
        assert_eq!(d.missing(), 10);
    }

    #[test]
    fn nul_stalls_a_line_like_redis() {
        assert_eq!(decoder().decode(b"PI\0NG\r\n").unwrap(), None);
        assert_eq!(decoder().decode(b"*1\0\r\n").unwrap(), None);
    }

    #[test]
    fn inline_commands_are_split_like_redis() {
        assert_eq!(command(b"PING\r\n"), vec![b"PING".to_vec()]);
        assert_eq!(command(b"PING\n"), vec![b"PING".to_vec()]);
        assert_eq!(
            command(b"PING\rPING\r\n"),
            vec![b"PING".to_vec(), b"PING".to_vec()]
        );
        assert_eq!(
            command(b"  SET  \"a\\x41\\n\" 'it\\'s'  \r\n"),
            vec![b"SET".to_vec(), b"aA\n".to_vec(), b"it's".to_vec()]
        );
        assert_eq!(
            command(b"ECHO a\"b c\"\n"),
            vec![b"ECHO".to_vec(), b"ab c".to_vec()]
        );
    }
}
