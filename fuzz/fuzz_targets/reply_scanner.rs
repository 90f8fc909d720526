//! The reply scanner on arbitrary upstream bytes, delivered whole and in chunks, used the way
//! the upstream actor uses it (scan, cut the reply off the front, `consumed`).
//!
//! Checked: no panic (debug assertions and overflow checks are on); every reply end lies within
//! the buffer and past its start; each reply cut out scans alone as exactly one reply of the
//! same length; and how the bytes were split does not change where replies end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redmux::resp::ReplyScanner;

/// Reply lengths found, then whether scanning ended in an error.
fn scan(input: &[u8], chunk: usize) -> (Vec<usize>, bool) {
    let mut scanner = ReplyScanner::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut replies = Vec::new();
    let chunk = if chunk == 0 {
        input.len().max(1)
    } else {
        chunk
    };
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match scanner.next_reply(&buf) {
                Ok(Some(end)) => {
                    assert!(end > 0 && end <= buf.len(), "end {end} of {}", buf.len());
                    let reply: Vec<u8> = buf.drain(..end).collect();
                    scanner.consumed(end);
                    let mut alone = ReplyScanner::new();
                    assert_eq!(alone.next_reply(&reply), Ok(Some(reply.len())));
                    replies.push(end);
                }
                Ok(None) => break,
                Err(_) => return (replies, true),
            }
        }
    }
    (replies, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let whole = scan(input, 0);
    for chunk in [1, usize::from(seed % 16) + 2, usize::from(seed) + 1] {
        let chunked = scan(input, chunk);
        // An error is found once the bad bytes arrive, whatever came before them; the replies
        // before it are the same.
        assert_eq!(chunked, whole, "chunks of {chunk}");
    }
});
