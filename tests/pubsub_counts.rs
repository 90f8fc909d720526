//! Redis's glob, which redmux needs to count the receivers of patterns as Redis does,
//! compared with Redis's own.

mod support;

use support::{Raw, RedisServer};

/// A pseudo-random number generator, so that the glob comparison is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }

    fn string(&mut self, alphabet: &[u8], max: usize) -> Vec<u8> {
        let len = self.next(max + 1);
        (0..len)
            .map(|_| alphabet[self.next(alphabet.len())])
            .collect()
    }
}

/// redmux's glob against Redis's own: the channels `PUBSUB CHANNELS pattern` lists, for
/// thousands of random patterns (stars, `?`, classes with `^`, ranges and escapes, bytes past
/// 0x7f, unterminated classes) over random channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_matches_as_redis_does() {
    let redis = RedisServer::start();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let letters = b"abcx-]^\\\x80\xff";
    let mut channels: Vec<Vec<u8>> = (0..300).map(|_| rng.string(letters, 6)).collect();
    channels.retain(|channel| !channel.is_empty());
    channels.sort();
    channels.dedup();
    let mut subscriber = Raw::connect(redis.addr().parse().unwrap()).await;
    let subscribe = redmux::resp::encode_command(
        std::iter::once(&b"SUBSCRIBE"[..]).chain(channels.iter().map(Vec::as_slice)),
    );
    assert_eq!(
        subscriber.pipeline(&subscribe, channels.len()).await.len(),
        channels.len()
    );
    let symbols = b"abcx-]^\\\x80\xff*?[[";
    let mut direct = redis.direct();
    for _ in 0..3000 {
        let pattern = rng.string(symbols, 7);
        let mut listed: Vec<Vec<u8>> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(&pattern)
            .query(&mut direct)
            .unwrap();
        listed.sort();
        let matched: Vec<Vec<u8>> = channels
            .iter()
            .filter(|channel| redmux::pubsub::glob::matches(&pattern, channel))
            .cloned()
            .collect();
        assert_eq!(
            matched,
            listed,
            "pattern {:?}",
            String::from_utf8_lossy(&pattern)
        );
    }
}
