//! Redis's glob: whether a pattern subscription receives a channel's messages.
//!
//! redmux corrects Redis's receiver counts by the patterns its own clients hold, so it must
//! match a pattern against a channel exactly as Redis does:
//! `stringmatchlen` in Redis's `src/util.c`, case-sensitive, which is what `PUBLISH` and
//! `PUBSUB CHANNELS pattern` use. Its quirks are kept: `*` never matches an empty channel, a
//! range may be written backwards (`[z-a]`), an unterminated class ends the pattern, `[^` with
//! nothing after it matches any one byte, and bytes from 0x80 on compare as negative numbers
//! in a range (Redis's `char` is signed on x86-64, the platform this follows).
//!
//! Redis recurses once per `*`; a client may subscribe to a pattern of a million stars, so
//! this walks the pattern in a loop instead, going back only to the last `*` seen. That finds
//! the same answer: every other token matches exactly one byte, and Redis itself gives up as
//! soon as the rest after a later `*` matches nowhere (its `skipLongerMatches`).

/// Whether `channel` matches `pattern`, as Redis's `stringmatchlen(pattern, channel, nocase=0)`.
pub fn matches(pattern: &[u8], channel: &[u8]) -> bool {
    let (mut p, mut s) = (0usize, 0usize);
    // The pattern position just after the last `*`, and the channel position the rest of the
    // pattern was last tried at.
    let mut star: Option<(usize, usize)> = None;
    loop {
        let matched = if p < pattern.len() && s < channel.len() {
            if pattern[p] == b'*' {
                while p + 1 < pattern.len() && pattern[p + 1] == b'*' {
                    p += 1;
                }
                if p + 1 == pattern.len() {
                    return true;
                }
                p += 1;
                star = Some((p, s));
                continue;
            }
            match token(pattern, p, channel[s]) {
                Some(next) => {
                    p = next;
                    s += 1;
                    if s < channel.len() {
                        continue;
                    }
                    // The channel is used up: stars left at the end of the pattern match it.
                    while p < pattern.len() && pattern[p] == b'*' {
                        p += 1;
                    }
                    p == pattern.len()
                }
                None => false,
            }
        } else {
            p == pattern.len() && s == channel.len()
        };
        if matched {
            return true;
        }
        // Redis's `*` tries the rest at each later position where a byte is left.
        match star {
            Some((rest, tried)) if tried + 1 < channel.len() => {
                star = Some((rest, tried + 1));
                p = rest;
                s = tried + 1;
            }
            _ => return false,
        }
    }
}

/// Matches the one-byte token at `pattern[p]` (not `*`) against `c`: the position after the
/// token if it matches, else `None`. How far a token reaches never depends on `c`.
fn token(pattern: &[u8], mut p: usize, c: u8) -> Option<usize> {
    // Redis reads the NUL that ends its string where the pattern runs out.
    let at = |i: usize| pattern.get(i).copied().unwrap_or(0);
    let left = |i: usize| pattern.len().saturating_sub(i);
    let matched = match pattern[p] {
        b'?' => true,
        b'[' => {
            p += 1;
            let not = at(p) == b'^';
            if not {
                p += 1;
            }
            let mut matched = false;
            loop {
                if at(p) == b'\\' && left(p) >= 2 {
                    p += 1;
                    matched |= pattern[p] == c;
                } else if at(p) == b']' {
                    break;
                } else if left(p) == 0 {
                    // Unterminated: the class ends the pattern.
                    p -= 1;
                    break;
                } else if left(p) >= 3 && pattern[p + 1] == b'-' {
                    let (mut start, mut end) = (signed(pattern[p]), signed(pattern[p + 2]));
                    if start > end {
                        std::mem::swap(&mut start, &mut end);
                    }
                    p += 2;
                    matched |= (start..=end).contains(&signed(c));
                } else {
                    matched |= pattern[p] == c;
                }
                p += 1;
            }
            matched != not
        }
        b'\\' if left(p) >= 2 => {
            p += 1;
            pattern[p] == c
        }
        literal => literal == c,
    };
    matched.then_some(p + 1)
}

/// A byte as Redis's signed `char` compares it in a range.
fn signed(byte: u8) -> i8 {
    byte as i8
}

#[cfg(test)]
mod tests {
    use super::matches;

    /// Each answer checked against redis-server 7.0.15 (`PSUBSCRIBE pattern`, then
    /// `PUBLISH channel`; `tests/pubsub_counts.rs` compares many more).
    #[test]
    fn matches_as_redis_does() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"*", b"", false),
            (b"*", b"a", true),
            (b"", b"", true),
            (b"", b"a", false),
            (b"a*", b"a", true),
            (b"a**", b"a", true),
            (b"*a", b"a", true),
            (b"*a", b"ba", true),
            (b"*a", b"ab", false),
            (b"a*b*c", b"axxbyyc", true),
            (b"a*b*c", b"axxbyy", false),
            (b"a*b*c", b"abcbc", true),
            (b"?", b"", false),
            (b"?", b"x", true),
            (b"??", b"x", false),
            (b"h?llo", b"hello", true),
            (b"h[ae]llo", b"hallo", true),
            (b"h[ae]llo", b"hillo", false),
            (b"h[^e]llo", b"hallo", true),
            (b"h[^e]llo", b"hello", false),
            (b"h[a-b]llo", b"hbllo", true),
            (b"h[b-a]llo", b"hbllo", true),
            (b"h[a-b]llo", b"hcllo", false),
            (b"[\\]]", b"]", true),
            (b"[\\", b"\\", true),
            (b"\\*", b"*", true),
            (b"\\*", b"a", false),
            (b"\\", b"\\", true),
            (b"a\\", b"a", false),
            (b"a\\", b"a\\", true),
            (b"[^", b"z", true),
            (b"[^", b"", false),
            (b"[a-", b"a", true),
            (b"[a-", b"-", true),
            (b"[a-]", b"b", false),
            (b"[a-]", b"^", true),
            (b"[a-]x", b"^x", false),
            (b"[abc", b"b", true),
            (b"[abc", b"bc", false),
            (b"[", b"[", false),
            (b"[]", b"]", false),
            (b"[a-\xff]", b"b", false),
            (b"[\xff-a]", b"\x00", true),
            (b"[\x00-\x7f]", b"\x80", false),
            (b"[\x81-\x7f]", b"\x90", true),
            (b"*\x00*", b"a\x00b", true),
            (b"CH", b"ch", false),
        ];
        for (pattern, channel, want) in cases {
            assert_eq!(
                matches(pattern, channel),
                *want,
                "{:?} against {:?}",
                String::from_utf8_lossy(pattern),
                String::from_utf8_lossy(channel)
            );
        }
    }

    /// A pattern of a million stars is walked, not recursed into.
    #[test]
    fn many_stars_do_not_recurse() {
        let mut pattern = vec![b'*'; 1_000_000];
        pattern.push(b'x');
        assert!(matches(&pattern, b"aaax"));
        assert!(!matches(&pattern, b"aaay"));
        let pattern = b"*a".repeat(100_000);
        assert!(!matches(&pattern, &b"a".repeat(1000)));
    }
}
