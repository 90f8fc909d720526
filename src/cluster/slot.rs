//! Which of the 16384 hash slots a key belongs to: the rule every Redis Cluster node applies
//! (`keyHashSlot` in Redis's `src/cluster.c`), so redmux can send a keyed command straight to
//! the master that owns its slot instead of being redirected with `-MOVED`.

/// Slots in a Redis Cluster: a key's slot is its CRC16 modulo this.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0, no reflection), the variant Redis
/// uses (`src/crc16.c`). Built at compile time from the polynomial; the test below checks it
/// against entries of the table printed in Redis's source.
const TABLE: [u16; 256] = table();

const fn table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = (byte as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
}

/// The CRC16 of `bytes`, as Redis's `crc16()` computes it.
pub fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ TABLE[usize::from(((crc >> 8) as u8) ^ b)]
    })
}

/// The part of `key` that is hashed. Redis's hash-tag rule: if the key has a `{`, and a `}`
/// somewhere after that first `{`, and at least one byte between them, only those bytes are
/// hashed, so `{user1000}.following` and `{user1000}.followers` share a slot. Otherwise (no
/// `{`, no `}` after it, or the empty tag `{}`) the whole key is hashed.
pub fn hashed_part(key: &[u8]) -> &[u8] {
    let Some(open) = memchr_byte(b'{', key) else {
        return key;
    };
    let after = &key[open + 1..];
    match memchr_byte(b'}', after) {
        Some(close) if close > 0 => &after[..close],
        _ => key,
    }
}

fn memchr_byte(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// The hash slot of `key` (0..16384).
pub fn slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) & (SLOTS as u16 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_the_one_in_redis_crc16_c() {
        // The first and last rows of the table in Redis's src/crc16.c.
        assert_eq!(
            TABLE[..8],
            [0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7]
        );
        assert_eq!(
            TABLE[248..],
            [0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93, 0x3eb2, 0x0ed1, 0x1ef0]
        );
    }

    #[test]
    fn crc16_matches_the_xmodem_check_value() {
        // The check value in Redis's src/crc16.c header comment.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slot_is_the_crc_modulo_16384() {
        // 0x31C3 is below 16384, so it is its own slot.
        assert_eq!(slot(b"123456789"), 0x31C3);
        // Values `CLUSTER KEYSLOT` gives for these keys.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b""), 0);
    }

    #[test]
    fn hash_tags_follow_the_redis_cluster_spec() {
        // The examples of the cluster specification.
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag: the whole key.
        assert_eq!(hashed_part(b"foo{}{bar}"), b"foo{}{bar}");
        // The first `{`, then the first `}` after it.
        assert_eq!(hashed_part(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hashed_part(b"foo{bar}{zap}"), b"bar");
        // No `}` after the first `{`: the whole key, even with a `}` before it.
        assert_eq!(hashed_part(b"}foo{bar"), b"}foo{bar");
        assert_eq!(hashed_part(b"{"), b"{");
        assert_eq!(hashed_part(b"{}"), b"{}");
        assert_eq!(hashed_part(b"a{b}"), b"b");
        assert_eq!(hashed_part(b"{\x00}"), b"\x00");
    }
}
