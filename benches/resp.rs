//! Micro-benchmarks of RESP framing, the per-byte work of every request and reply: the request
//! decoder a client session runs on what clients send, and the reply scanner an upstream actor
//! runs on what Redis sends. Throughput is in bytes, so a regression shows as fewer bytes/s
//! whatever the frame size.
//!
//! `cargo bench --bench resp` (about 40 s); `cargo test --benches` runs each case once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use redmux::resp::{encode_command, Limits, ReplyScanner, RequestDecoder};

/// Redis's defaults, as the server configures the decoder.
const LIMITS: Limits = Limits {
    max_bulk_len: 512 * 1024 * 1024,
    max_multibulk_len: 1024 * 1024,
};

/// Short runs: these are for spotting regressions, and the machine is shared and noisy anyway.
fn configured() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

/// Decodes every request in `input` (whole requests only), as a session does with one read.
fn decode_all(decoder: &mut RequestDecoder, input: &[u8]) -> usize {
    let mut at = 0;
    let mut requests = 0;
    while at < input.len() {
        let frame = decoder
            .decode(&input[at..])
            .expect("valid input")
            .expect("complete input");
        at += frame.consumed();
        requests += 1;
    }
    requests
}

/// Finds the end of every reply in `input` (whole replies only), as an upstream actor does.
fn scan_all(scanner: &mut ReplyScanner, input: &[u8]) -> usize {
    let mut replies = 0;
    while let Some(end) = scanner.next_reply(input).expect("valid replies") {
        replies += 1;
        if end == input.len() {
            break;
        }
    }
    scanner.reset();
    replies
}

fn requests(c: &mut Criterion) {
    let value_16k = vec![b'v'; 16 * 1024];
    let get = encode_command([&b"GET"[..], b"key:000042"]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "set_small",
            encode_command([
                &b"SET"[..],
                b"key:000042",
                b"value-64-bytes".repeat(4).as_slice(),
            ])
            .to_vec(),
        ),
        ("get_small", get.to_vec()),
        (
            "set_16k",
            encode_command([&b"SET"[..], b"key:000042", &value_16k]).to_vec(),
        ),
        ("pipeline_1000_get", get.repeat(1000)),
        ("inline_set", b"SET key:000042 \"hello world\"\r\n".to_vec()),
        ("inline_ping", b"PING\r\n".to_vec()),
    ];
    assert_eq!(
        decode_all(&mut RequestDecoder::new(LIMITS), &cases[3].1),
        1000
    );
    let mut group = c.benchmark_group("request_decoder");
    for (name, input) in &cases {
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), input, |b, input| {
            let mut decoder = RequestDecoder::new(LIMITS);
            b.iter(|| decode_all(&mut decoder, std::hint::black_box(input)));
        });
    }
    group.finish();
}

/// A bulk string reply.
fn bulk(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

fn replies(c: &mut Criterion) {
    // LRANGE of 1000 short elements.
    let mut array = b"*1000\r\n".to_vec();
    for i in 0..1000 {
        array.extend(bulk(format!("element:{i:06}").as_bytes()));
    }
    // A RESP3 HGETALL-like map of 100 fields, each value a small array, behind an attribute.
    let mut map = b"|1\r\n+ttl\r\n:3600\r\n%100\r\n".to_vec();
    for i in 0..100 {
        map.extend(bulk(format!("field:{i:04}").as_bytes()));
        map.extend(b"*3\r\n:1\r\n#t\r\n,3.14\r\n");
    }
    // What a pipelined SET/GET/INCR mix gets back.
    let mut pipelined = Vec::new();
    for i in 0..1000 {
        match i % 3 {
            0 => pipelined.extend_from_slice(b"+OK\r\n"),
            1 => pipelined.extend(bulk(b"value-64-bytes".repeat(4).as_slice())),
            _ => pipelined.extend(format!(":{i}\r\n").into_bytes()),
        }
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("simple_string", b"+OK\r\n".to_vec()),
        ("bulk_16k", bulk(&vec![b'v'; 16 * 1024])),
        ("array_1000", array),
        ("resp3_map_100_nested", map),
        ("pipeline_1000_replies", pipelined),
    ];
    for (name, input) in &cases {
        let expected = if name.starts_with("pipeline") {
            1000
        } else {
            1
        };
        assert_eq!(
            scan_all(&mut ReplyScanner::new(), input),
            expected,
            "{name}"
        );
    }
    let mut group = c.benchmark_group("reply_scanner");
    for (name, input) in &cases {
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), input, |b, input| {
            let mut scanner = ReplyScanner::new();
            b.iter(|| scan_all(&mut scanner, std::hint::black_box(input)));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = configured();
    targets = requests, replies
}
criterion_main!(benches);
