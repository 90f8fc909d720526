//! Property tests for RESP framing: frames split at any byte boundary parse the same as whole;
//! random bytes never panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

use bytes::{Buf, BytesMut};
use proptest::prelude::*;
use redmux::resp::{encode_command, Args, Frame, Limits, ReplyScanner, RequestDecoder};

fn decoder() -> RequestDecoder {
    RequestDecoder::new(Limits {
        max_bulk_len: 512 * 1024 * 1024,
        max_multibulk_len: 1024 * 1024,
    })
}

/// Feeds `input` to a decoder in the given chunks, as a socket would deliver it, and returns
/// the commands decoded (or `None` at a protocol error).
fn decode_chunked(input: &[u8], cuts: &[usize]) -> Option<Vec<Vec<Vec<u8>>>> {
    let mut decoder = decoder();
    let mut buf = BytesMut::new();
    let mut commands = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut fed = 0;
    for point in points {
        buf.extend_from_slice(&input[fed..point]);
        fed = point;
        while let Some(frame) = decoder.decode(&buf).ok()? {
            if let Some(bytes) = frame.command_bytes(&buf) {
                let args: Vec<Vec<u8>> = Args::new(bytes).map(<[u8]>::to_vec).collect();
                // The name found while framing is the first argument.
                if let Some(at) = decoder.name() {
                    assert_eq!(buf.get(at).map(<[u8]>::to_vec).as_ref(), args.first());
                }
                commands.push(args);
            }
            buf.advance(frame.consumed());
        }
    }
    Some(commands)
}

fn command() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6)
}

/// An arbitrary RESP3 reply, encoded.
fn reply() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        "[a-zA-Z0-9 ]{0,10}".prop_map(|s| format!("+{s}\r\n").into_bytes()),
        "[a-zA-Z0-9 ]{0,10}".prop_map(|s| format!("-ERR {s}\r\n").into_bytes()),
        any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
        prop::collection::vec(any::<u8>(), 0..30).prop_map(|b| {
            let mut out = format!("${}\r\n", b.len()).into_bytes();
            out.extend(b);
            out.extend(b"\r\n");
            out
        }),
        Just(b"$-1\r\n".to_vec()),
        Just(b"*-1\r\n".to_vec()),
        Just(b"_\r\n".to_vec()),
        Just(b",1.5\r\n".to_vec()),
        Just(b"#f\r\n".to_vec()),
        Just(b"(123456789012345678901234567890\r\n".to_vec()),
        Just(b"=8\r\ntxt:a\r\nb\r\n".to_vec()),
        Just(b"!5\r\nERR x\r\n".to_vec()),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            (
                prop::sample::select(vec!['*', '~', '>']),
                prop::collection::vec(inner.clone(), 0..5)
            )
                .prop_map(|(kind, items)| {
                    let mut out = format!("{kind}{}\r\n", items.len()).into_bytes();
                    items.into_iter().for_each(|i| out.extend(i));
                    // Push frames are only valid nested here: top level they are out-of-band.
                    if kind == '>' {
                        out.splice(0..0, b"*1\r\n".iter().copied());
                    }
                    out
                }),
            prop::collection::vec((inner.clone(), inner.clone()), 0..4).prop_map(|pairs| {
                let mut out = format!("%{}\r\n", pairs.len()).into_bytes();
                for (k, v) in pairs {
                    out.extend(k);
                    out.extend(v);
                }
                out
            }),
            (
                prop::collection::vec((inner.clone(), inner.clone()), 0..2),
                inner
            )
                .prop_map(|(attrs, value)| {
                    let mut out = format!("|{}\r\n", attrs.len()).into_bytes();
                    for (k, v) in attrs {
                        out.extend(k);
                        out.extend(v);
                    }
                    out.extend(value);
                    out
                }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn requests_split_anywhere_parse_the_same(
        commands in prop::collection::vec(command(), 1..8),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut input = Vec::new();
        for args in &commands {
            input.extend_from_slice(&encode_command(args.iter().map(Vec::as_slice)));
        }
        prop_assert_eq!(decode_chunked(&input, &cuts), Some(commands.clone()));
        prop_assert_eq!(decode_chunked(&input, &[]), Some(commands));
    }

    #[test]
    fn canonical_requests_are_forwarded_as_received(args in command()) {
        let input = encode_command(args.iter().map(Vec::as_slice));
        let mut decoder = decoder();
        let frame = decoder.decode(&input).unwrap().unwrap();
        prop_assert_eq!(frame, Frame::Command { len: input.len(), rewritten: None });
        prop_assert_eq!(decoder.name().map(|at| input[at].to_vec()), Some(args[0].clone()));
    }

    #[test]
    fn inline_commands_split_anywhere_parse_the_same(
        args in prop::collection::vec("[a-zA-Z0-9_:.-]{1,12}", 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let input = format!("{}\r\n", args.join("  "));
        let expected: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        prop_assert_eq!(decode_chunked(input.as_bytes(), &cuts), Some(vec![expected]));
    }

    #[test]
    fn random_bytes_never_panic_the_request_decoder(
        input in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = decode_chunked(&input, &cuts);
    }

    #[test]
    fn resp_shaped_garbage_never_panics(
        input in prop::collection::vec(prop::sample::select(b"*$:+-0123456789\r\nab".to_vec()), 0..256),
    ) {
        let _ = decode_chunked(&input, &[]);
        let mut scanner = ReplyScanner::new();
        let _ = scanner.next_reply(&input);
    }

    #[test]
    fn replies_split_anywhere_are_found_whole(
        replies in prop::collection::vec(reply(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let input: Vec<u8> = replies.concat();
        let mut expected = Vec::new();
        let mut end = 0;
        for reply in &replies {
            end += reply.len();
            expected.push(end);
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        let mut scanner = ReplyScanner::new();
        let mut found = Vec::new();
        for point in points {
            while let Some(end) = scanner.next_reply(&input[..point]).unwrap() {
                found.push(end);
            }
        }
        prop_assert_eq!(found, expected);
    }

    #[test]
    fn random_bytes_never_panic_the_reply_scanner(input in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut scanner = ReplyScanner::new();
        while let Ok(Some(_)) = scanner.next_reply(&input) {}
    }
}
