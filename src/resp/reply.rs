//! Reply framing for every RESP2 and RESP3 type, so the upstream actor can count replies and
//! cut them out of its read buffer without decoding them.

use super::{find2, parse_int};

/// The upstream sent something that is not RESP. Replies can no longer be matched to requests,
/// so the connection must be torn down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("unknown reply type byte 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed length in a reply header")]
    BadLength,
    #[error("reply header line not terminated by CRLF")]
    BadLineEnd,
    #[error("out-of-band push frame on a request/reply connection")]
    UnexpectedPush,
}

/// An aggregate whose elements are still being scanned.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// Elements still to come (maps and attributes count keys and values).
    remaining: u64,
    /// Attributes (`|`) annotate the value that follows them and are not elements themselves.
    attribute: bool,
}

/// Finds where each top-level reply ends in a buffer that grows at the back and is cut at the
/// front. Resumable: scanning stops at the first incomplete element and resumes there, so a
/// large array arriving over many reads is walked once.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    /// Offset in the buffer of the next element to scan.
    pos: usize,
    /// Aggregates opened and not finished, outermost first.
    open: Vec<Open>,
    /// Accept top-level push frames as replies (a client reading what redmux sends it); an
    /// upstream request/reply connection must never receive one.
    allow_push: bool,
    /// How far past `pos` the element's line was searched for its CR without finding it (the
    /// `pos` it was searched from, and how far): a status line has no length limit (a script
    /// can return a 512 MB one), and searching it again from its start at every read would
    /// cost its length squared over the read size.
    searched: (usize, usize),
}

impl ReplyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// A scanner that takes top-level push frames (`>`) as frames of their own.
    pub fn with_push() -> Self {
        ReplyScanner {
            allow_push: true,
            ..Self::default()
        }
    }

    /// The caller removed `n` bytes from the front of the buffer (only ever whole replies).
    pub fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.pos);
        self.pos -= n;
        self.searched = (self.pos, 0);
    }

    /// Forgets any partial state: for a fresh connection.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
        self.searched = (0, 0);
    }

    /// Scans on from where the last call stopped. `Ok(Some(end))`: a top-level reply ends at
    /// offset `end` of `buf`; `Ok(None)`: more bytes are needed.
    pub fn next_reply(&mut self, buf: &[u8]) -> Result<Option<usize>, ReplyError> {
        loop {
            let Some(&kind) = buf.get(self.pos) else {
                return Ok(None);
            };
            let rest = &buf[self.pos + 1..];
            let from = match self.searched {
                (pos, searched) if pos == self.pos => searched.min(rest.len()),
                _ => 0,
            };
            let Some(cr) = find2(b'\r', b'\r', &rest[from..]).map(|at| from + at) else {
                self.searched = (self.pos, rest.len());
                return Ok(None);
            };
            match rest.get(cr + 1) {
                None => {
                    self.searched = (self.pos, cr);
                    return Ok(None);
                }
                Some(b'\n') => {}
                Some(_) => return Err(ReplyError::BadLineEnd),
            }
            let line = &rest[..cr];
            let after_line = self.pos + 1 + cr + 2;
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => self.pos = after_line,
                b'$' | b'=' | b'!' => match length(line)? {
                    None => self.pos = after_line,
                    Some(len) => {
                        let end = usize::try_from(len)
                            .ok()
                            .and_then(|len| after_line.checked_add(len)?.checked_add(2))
                            .ok_or(ReplyError::BadLength)?;
                        if buf.len() < end {
                            return Ok(None);
                        }
                        if &buf[end - 2..end] != b"\r\n" {
                            return Err(ReplyError::BadLineEnd);
                        }
                        self.pos = end;
                    }
                },
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    if kind == b'>' && self.open.is_empty() && !self.allow_push {
                        return Err(ReplyError::UnexpectedPush);
                    }
                    self.pos = after_line;
                    let pairs = matches!(kind, b'%' | b'|');
                    let attribute = kind == b'|';
                    match length(line)? {
                        Some(n) if n > 0 => {
                            let remaining = if pairs {
                                n.checked_mul(2).ok_or(ReplyError::BadLength)?
                            } else {
                                n
                            };
                            self.open.push(Open {
                                remaining,
                                attribute,
                            });
                            continue;
                        }
                        // An empty attribute annotates nothing; the value still follows.
                        _ if attribute => continue,
                        _ => {}
                    }
                }
                other => return Err(ReplyError::UnknownType(other)),
            }
            // One element is complete: close every aggregate it completes.
            loop {
                let Some(top) = self.open.last_mut() else {
                    return Ok(Some(self.pos));
                };
                top.remaining -= 1;
                if top.remaining > 0 {
                    break;
                }
                let finished = self.open.pop().map(|open| open.attribute);
                if finished == Some(true) {
                    break;
                }
            }
        }
    }
}

/// A length or count: `None` for the null forms (`-1`), an error for anything else negative.
fn length(line: &[u8]) -> Result<Option<u64>, ReplyError> {
    match parse_int(line) {
        Some(-1) => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n.unsigned_abs())),
        _ => Err(ReplyError::BadLength),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` as a stream of replies and returns their end offsets.
    fn ends(input: &[u8]) -> Vec<usize> {
        let mut scanner = ReplyScanner::new();
        let mut out = Vec::new();
        while let Some(end) = scanner.next_reply(input).unwrap() {
            out.push(end);
        }
        out
    }

    #[test]
    fn every_resp2_and_resp3_type() {
        let replies: [&[u8]; 17] = [
            b"+OK\r\n",
            b"-ERR bad\r\n",
            b":42\r\n",
            b"$5\r\nhello\r\n",
            b"$-1\r\n",
            b"$0\r\n\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            b"_\r\n",
            b",3.14\r\n",
            b"#t\r\n",
            b"(12345678901234567890\r\n",
            b"=15\r\ntxt:Some string\r\n",
            b"!3\r\nerr\r\n",
            b"%2\r\n+a\r\n:1\r\n+b\r\n~1\r\n:2\r\n",
            b"|1\r\n+key\r\n+val\r\n*2\r\n:1\r\n>1\r\n:2\r\n",
        ];
        let joined = replies.concat();
        let mut expected = Vec::new();
        let mut at = 0;
        for reply in replies {
            at += reply.len();
            expected.push(at);
        }
        assert_eq!(ends(&joined), expected);
    }

    #[test]
    fn binary_payload_with_crlf_inside() {
        assert_eq!(ends(b"$4\r\n\r\n\r\n\r\n:1\r\n"), vec![10, 14]);
    }

    #[test]
    fn resumes_where_it_stopped() {
        let input = b"*3\r\n$3\r\nfoo\r\n*2\r\n:1\r\n:2\r\n$3\r\nbar\r\n";
        let mut scanner = ReplyScanner::new();
        for end in 0..input.len() {
            assert_eq!(
                scanner.next_reply(&input[..end]).unwrap(),
                None,
                "prefix {end}"
            );
        }
        assert_eq!(scanner.next_reply(input).unwrap(), Some(input.len()));
    }

    /// A status line (which has no length limit) arriving over many reads is searched once:
    /// searching it from its start at every read took minutes at this size. Bounded by a
    /// watchdog, generous enough for a slow debug build.
    #[test]
    fn a_long_status_line_is_searched_once() {
        const READ: usize = 64 * 1024;
        const LINE: usize = 64 * 1024 * 1024;
        let (end, len) = crate::within_a_watchdog("scanned", move || {
            let mut scanner = ReplyScanner::new();
            let mut buf = Vec::with_capacity(LINE + READ);
            buf.extend_from_slice(b":1\r\n+");
            while buf.len() < LINE {
                buf.resize(buf.len() + READ, b'a');
                if scanner.next_reply(&buf).unwrap() == Some(4) {
                    scanner.consumed(4);
                    buf.drain(..4);
                }
                assert_eq!(scanner.next_reply(&buf).unwrap(), None);
            }
            // The CR in one read, its LF in the next.
            buf.push(b'\r');
            assert_eq!(scanner.next_reply(&buf).unwrap(), None);
            buf.push(b'\n');
            (scanner.next_reply(&buf).unwrap(), buf.len())
        });
        assert_eq!(end, Some(len));
    }

    #[test]
    fn consumed_shifts_the_position() {
        let mut scanner = ReplyScanner::new();
        assert_eq!(scanner.next_reply(b"+OK\r\n:1").unwrap(), Some(5));
        scanner.consumed(5);
        assert_eq!(scanner.next_reply(b":1").unwrap(), None);
        assert_eq!(scanner.next_reply(b":1\r\n").unwrap(), Some(4));
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(
            ReplyScanner::new().next_reply(b"hello\r\n"),
            Err(ReplyError::UnknownType(b'h'))
        );
        assert_eq!(
            ReplyScanner::new().next_reply(b"$-2\r\n"),
            Err(ReplyError::BadLength)
        );
        assert_eq!(
            ReplyScanner::new().next_reply(b"$1\r\nab\r\n"),
            Err(ReplyError::BadLineEnd)
        );
        assert_eq!(
            ReplyScanner::new().next_reply(b"+OK\rX"),
            Err(ReplyError::BadLineEnd)
        );
        assert_eq!(
            ReplyScanner::new().next_reply(b">2\r\n"),
            Err(ReplyError::UnexpectedPush)
        );
    }
}
