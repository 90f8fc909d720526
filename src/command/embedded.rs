//! What the embedded upstream (mini-redis, see `upstream::embedded`) cannot take.
//!
//! mini-redis knows GET, SET (with EX/PX), PUBLISH and SUBSCRIBE, and drops the whole connection
//! when one of those arrives with arguments it cannot parse. On a shared connection that would
//! fail every other client's requests, so redmux checks those commands first and answers bad ones
//! itself, with Redis's error texts. It also answers PING, which mini-redis does not know, so
//! health checks and `redis-benchmark` work against the embedded store.

use bytes::Bytes;

use crate::resp::{encode, Args};

/// Answers locally what the embedded store cannot take; `None` means forward it.
pub(super) fn screen(name: &[u8], mut args: Args<'_>) -> Option<Bytes> {
    let Ok(name) = std::str::from_utf8(name) else {
        return Some(encode::error(&format!(
            "unknown command '{}'",
            String::from_utf8_lossy(name)
        )));
    };
    let lower = name.to_ascii_lowercase();
    let argc = args.remaining();
    let arity_ok = match lower.as_str() {
        "ping" => argc <= 1,
        "get" => argc == 1,
        "set" => argc >= 2,
        "publish" => argc == 2,
        _ => return None,
    };
    if !arity_ok {
        return Some(encode::error(&format!(
            "wrong number of arguments for '{lower}' command"
        )));
    }
    match lower.as_str() {
        "ping" => Some(match args.next() {
            None => Bytes::from_static(b"+PONG\r\n"),
            Some(arg) => encode::bulk(arg),
        }),
        // The key (or channel) is read as a UTF-8 string by mini-redis.
        "get" | "publish" => utf8_key(args.next()?),
        "set" => {
            let key = args.next()?;
            args.next(); // the value: any bytes will do
            utf8_key(key).or_else(|| set_options(&mut args))
        }
        _ => None,
    }
}

fn utf8_key(key: &[u8]) -> Option<Bytes> {
    std::str::from_utf8(key).is_err().then(|| {
        encode::error("redmux: the embedded upstream only accepts UTF-8 keys and channels")
    })
}

/// mini-redis takes `SET key value [EX seconds | PX milliseconds]` and nothing else.
fn set_options(options: &mut Args<'_>) -> Option<Bytes> {
    let option = options.next()?;
    let upper = String::from_utf8_lossy(option).to_ascii_uppercase();
    match upper.as_str() {
        "EX" | "PX" => {}
        "NX" | "XX" | "GET" | "KEEPTTL" | "EXAT" | "PXAT" => {
            return Some(encode::error(&format!(
                "redmux: the embedded upstream does not support SET {upper}"
            )))
        }
        _ => return Some(encode::error("syntax error")),
    }
    let Some(value) = options.next() else {
        return Some(encode::error("syntax error"));
    };
    if options.next().is_some() {
        return Some(encode::error(
            "redmux: the embedded upstream supports only one SET option",
        ));
    }
    // Redis's bounds: positive, and the expiry in milliseconds must fit an i64. mini-redis adds
    // the duration to an Instant and panics on overflow, poisoning the whole store.
    let max = if upper == "EX" {
        i64::MAX / 1000
    } else {
        i64::MAX
    } / 2;
    match crate::resp::parse_int(value) {
        Some(n) if n > 0 && n <= max => None,
        Some(_) => Some(encode::error("invalid expire time in 'set' command")),
        None => Some(encode::error("value is not an integer or out of range")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::encode_command;

    fn check(args: &[&[u8]]) -> Option<String> {
        let request = encode_command(args.iter().copied());
        let mut parsed = Args::new(&request);
        let name = parsed.next().unwrap();
        screen(name, parsed).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    #[test]
    fn screens_what_mini_redis_would_choke_on() {
        assert_eq!(check(&[b"GET", b"k"]), None);
        assert_eq!(check(&[b"SET", b"k", b"v"]), None);
        assert_eq!(check(&[b"set", b"k", b"v", b"ex", b"10"]), None);
        assert_eq!(check(&[b"PUBLISH", b"c", b"m"]), None);
        assert_eq!(
            check(&[b"INCR", b"k"]),
            None,
            "unknown commands are answered by mini-redis"
        );
        assert_eq!(check(&[b"PING"]).unwrap(), "+PONG\r\n");
        assert_eq!(check(&[b"PING", b"hi"]).unwrap(), "$2\r\nhi\r\n");
        assert_eq!(
            check(&[b"GET"]).unwrap(),
            "-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(
            check(&[b"GET", b"\xff"]).unwrap(),
            "-ERR redmux: the embedded upstream only accepts UTF-8 keys and channels\r\n"
        );
        assert_eq!(
            check(&[b"SET", b"k", b"v", b"NX"]).unwrap(),
            "-ERR redmux: the embedded upstream does not support SET NX\r\n"
        );
        assert_eq!(
            check(&[b"SET", b"k", b"v", b"EX"]).unwrap(),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            check(&[b"SET", b"k", b"v", b"EX", b"x"]).unwrap(),
            "-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(
            check(&[b"SET", b"k", b"v", b"EX", b"9223372036854775807"]).unwrap(),
            "-ERR invalid expire time in 'set' command\r\n"
        );
        assert_eq!(
            check(&[b"SET", b"k", b"v", b"EX", b"0"]).unwrap(),
            "-ERR invalid expire time in 'set' command\r\n"
        );
        assert_eq!(
            check(&[b"SET", b"k", b"v", b"EX", b"1", b"PX", b"1"]).unwrap(),
            "-ERR redmux: the embedded upstream supports only one SET option\r\n"
        );
        assert_eq!(
            check(&[b"\xff"]).unwrap(),
            "-ERR unknown command '\u{fffd}'\r\n"
        );
    }
}
