//! Which eviction the near cache should use (`cache.eviction`): hit rates of LRU and TinyLFU
//! on the same request traces, through the real cache (`redmux::cache::NearCache`), with the
//! same `max_memory`. Prints a table; `cargo bench --bench cache_policy`.
//!
//! Traces (keys of one 100-byte value each, 16 MiB of cache, which holds about 40,000):
//! - Zipf over 1,000,000 keys with exponent 0.8, 0.99 and 1.2: a skewed keyspace, as real
//!   hot keys are;
//! - Zipf 0.99 with half the requests one-off reads of keys never seen again (a scan, a
//!   crawler): what LRU is known to suffer from;
//! - a loop over 60,000 keys, a little more than the cache holds: LRU's worst case.

use std::time::Duration;

use bytes::Bytes;
use redmux::cache::{Limits, Lookup, NearCache, Policy};

const REQUESTS: usize = 2_000_000;
const KEYS: usize = 1_000_000;
const VALUE: &[u8] = &[b'v'; 100];

/// xorshift64*: enough randomness for a trace, and the same trace for both policies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Key ranks drawn from a Zipf distribution by inverting its cumulative weights.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(keys: usize, exponent: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=keys)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect::<Vec<_>>();
        let cumulative = cumulative.iter().map(|c| c / total).collect();
        Zipf { cumulative }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cumulative.partition_point(|&c| c < u)
    }
}

fn trace(name: &str) -> Vec<u64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    match name {
        "loop 60k" => (0..REQUESTS as u64).map(|i| i % 60_000).collect(),
        "zipf 0.99 + one-offs" => {
            let zipf = Zipf::new(KEYS, 0.99);
            let mut fresh = KEYS as u64;
            (0..REQUESTS)
                .map(|i| {
                    if i % 2 == 0 {
                        zipf.sample(&mut rng) as u64
                    } else {
                        fresh += 1;
                        fresh
                    }
                })
                .collect()
        }
        _ => {
            let exponent = name.trim_start_matches("zipf ").parse().unwrap_or(0.99);
            let zipf = Zipf::new(KEYS, exponent);
            (0..REQUESTS)
                .map(|_| zipf.sample(&mut rng) as u64)
                .collect()
        }
    }
}

fn hit_rate(policy: Policy, trace: &[u64]) -> f64 {
    let cache = NearCache::new(
        &Limits {
            max_memory: 16 * 1024 * 1024,
            max_ttl: Duration::from_secs(3600),
            prefixes: Vec::new(),
            policy,
        },
        0,
    );
    cache.set_up(true);
    let mut hits = 0;
    for key in trace {
        let request = Bytes::from(format!("*2\r\n$3\r\nGET\r\n$8\r\n{key:08}\r\n"));
        let at = request.len() - 10;
        match cache.get(0, false, &request, &request[at..at + 8]) {
            Lookup::Hit(_) => hits += 1,
            Lookup::Fill(ticket) => cache.fill(ticket, VALUE, None),
            Lookup::Pass | Lookup::Down => {}
        }
    }
    hits as f64 / trace.len() as f64
}

fn main() {
    println!("{:<24} {:>8} {:>8}", "trace", "lru", "tinylfu");
    for name in [
        "zipf 0.8",
        "zipf 0.99",
        "zipf 1.2",
        "zipf 0.99 + one-offs",
        "loop 60k",
    ] {
        let requests = trace(name);
        let lru = hit_rate(Policy::Lru, &requests);
        let lfu = hit_rate(Policy::TinyLfu, &requests);
        println!("{name:<24} {:>7.1}% {:>7.1}%", lru * 100.0, lfu * 100.0);
    }
}
