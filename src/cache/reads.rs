//! Which requests the near cache may answer: read-only commands of one key whose reply
//! depends only on the key's value (never on the clock, as TTL's does), and MGET, whose reply
//! is made of one such element per key.

use crate::{command::CommandId, resp::Args};

/// A request the cache may answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Read<'a> {
    /// The whole reply depends on this key alone.
    One(&'a [u8]),
    /// MGET: one element per key, each cached on its own.
    Parts(Vec<&'a [u8]>),
}

/// The read `request` (of `command`) is, if the cache may answer it. Only the forms with the
/// argument count Redis accepts: anything else goes to Redis for its error.
pub fn read_of(command: CommandId, request: &[u8]) -> Option<Read<'_>> {
    let name = command.name();
    let arguments = match name {
        "get" | "strlen" | "hgetall" | "smembers" | "exists" => 2,
        "hget" => 3,
        "mget" => 0,
        _ => return None,
    };
    let mut args = Args::new(request);
    args.next();
    if arguments == 0 {
        let keys: Vec<&[u8]> = args.collect();
        return (!keys.is_empty()).then_some(Read::Parts(keys));
    }
    let key = args.next()?;
    (args.remaining() == arguments - 2).then_some(Read::One(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{command, resp::encode_command};

    fn read(parts: &[&str]) -> Option<Vec<Vec<u8>>> {
        let request = encode_command(parts.iter().map(|p| p.as_bytes()));
        let (id, _) = command::action(&request, command::Profile::Redis);
        read_of(id, &request).map(|read| match read {
            Read::One(key) => vec![key.to_vec()],
            Read::Parts(keys) => keys.iter().map(|k| k.to_vec()).collect(),
        })
    }

    #[test]
    fn only_the_listed_reads_of_the_right_arity() {
        assert_eq!(read(&["GET", "k"]), Some(vec![b"k".to_vec()]));
        assert_eq!(read(&["hget", "h", "f"]), Some(vec![b"h".to_vec()]));
        assert_eq!(
            read(&["MGET", "a", "b"]),
            Some(vec![b"a".to_vec(), b"b".to_vec()])
        );
        assert_eq!(read(&["EXISTS", "a", "b"]), None);
        assert_eq!(read(&["GET", "k", "x"]), None);
        assert_eq!(read(&["HGET", "h"]), None);
        assert_eq!(read(&["MGET"]), None);
        assert_eq!(read(&["TTL", "k"]), None);
        assert_eq!(read(&["SET", "k", "v"]), None);
        assert_eq!(read(&["GETEX", "k"]), None);
    }
}
