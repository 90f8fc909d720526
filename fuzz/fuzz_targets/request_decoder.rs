//! The request decoder on arbitrary client bytes, delivered whole and in chunks.
//!
//! Checked: no panic (debug assertions and overflow checks are on); a frame never claims more
//! bytes than it was given, nor zero; every command is handed on as canonical RESP that decodes
//! again to the same arguments; a protocol error's reply is one `-ERR Protocol error: ` line;
//! and how the bytes were split does not change what is decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redmux::resp::{encode_command, Args, Frame, Limits, RequestDecoder, INLINE_MAX};

fn fresh_decoder() -> RequestDecoder {
    // Small limits, so the limit paths are reachable.
    RequestDecoder::new(Limits {
        max_bulk_len: 1024 * 1024,
        max_multibulk_len: 64,
    })
}

/// For re-decoding what was forwarded: `max_multibulk_len` applies to multibulk requests only
/// (as Redis has no argument limit for inline ones), and an inline line of up to 64 KiB can hold
/// more arguments than the small limit above.
fn forwarded_decoder() -> RequestDecoder {
    RequestDecoder::new(Limits {
        max_bulk_len: 1024 * 1024,
        max_multibulk_len: INLINE_MAX as u64,
    })
}

/// What a session would see: the arguments of each command, then the error that ended the
/// stream (if any).
type Decoded = (Vec<Vec<Vec<u8>>>, Option<String>);

/// Feeds `input` in pieces of `chunk` bytes (0: all at once), as a socket would deliver it.
fn decode(input: &[u8], chunk: usize) -> Decoded {
    let mut decoder = fresh_decoder();
    let mut buf: Vec<u8> = Vec::new();
    let mut commands = Vec::new();
    let chunk = if chunk == 0 {
        input.len().max(1)
    } else {
        chunk
    };
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let frame = match decoder.decode(&buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    let reply = error.reply();
                    assert!(reply.starts_with(b"-ERR Protocol error: "), "{reply:?}");
                    assert!(reply.ends_with(b"\r\n"), "{reply:?}");
                    let body = &reply[..reply.len() - 2];
                    assert!(
                        !body.contains(&b'\r') && !body.contains(&b'\n'),
                        "{reply:?}"
                    );
                    return (commands, Some(error.to_string()));
                }
            };
            let len = frame.consumed();
            assert!(
                len > 0 && len <= buf.len(),
                "frame of {len} in {}",
                buf.len()
            );
            if let Some(bytes) = frame.command_bytes(&buf) {
                let args: Vec<Vec<u8>> = Args::new(bytes).map(<[u8]>::to_vec).collect();
                assert!(!args.is_empty());
                // Canonical: decodes again, as is, to the same arguments.
                let again = forwarded_decoder()
                    .decode(bytes)
                    .expect("canonical bytes decode");
                assert_eq!(
                    again,
                    Some(Frame::Command {
                        len: bytes.len(),
                        rewritten: None
                    })
                );
                assert_eq!(&encode_command(args.iter().map(Vec::as_slice))[..], bytes);
                commands.push(args);
            }
            buf.drain(..len);
        }
    }
    (commands, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let whole = decode(input, 0);
    // Past INLINE_MAX unterminated bytes an error depends on where reads end, as in Redis.
    if input.len() < INLINE_MAX {
        for chunk in [1, usize::from(seed % 16) + 2, usize::from(seed) + 1] {
            assert_eq!(decode(input, chunk), whole, "chunks of {chunk}");
        }
    }
});
