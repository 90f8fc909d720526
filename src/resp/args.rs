//! Reading the arguments of a request the decoder has already validated, and encoding commands.

use bytes::{BufMut, Bytes, BytesMut};

/// Iterates over the arguments of a complete multibulk request that [`super::RequestDecoder`]
/// accepted. Lengths are trusted, so this only walks headers; it works on the sloppy forms Redis
/// accepts (any byte after a header's CR, any two bytes after a payload) as well as on canonical
/// ones. Given anything else it stops early instead of panicking.
#[derive(Debug, Clone)]
pub struct Args<'a> {
    rest: &'a [u8],
    remaining: usize,
}

impl<'a> Args<'a> {
    pub fn new(request: &'a [u8]) -> Self {
        let mut args = Args {
            rest: request,
            remaining: 0,
        };
        if let Some(count) = args.header(b'*') {
            args.remaining = count;
        }
        args
    }

    /// Arguments not yet returned.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// One pass over the digits up to the CR: every request's arguments are walked here, and a
    /// search for the CR followed by a parse took twice as long. The same headers are taken as
    /// [`parse_int`](super::parse_int) takes (no sign, no leading zero), as the decoder did.
    fn header(&mut self, kind: u8) -> Option<usize> {
        let (&first, body) = self.rest.split_first()?;
        if first != kind {
            return None;
        }
        // An i64, as `parse_int`'s: a count past i64::MAX is no count.
        let mut value: i64 = 0;
        let mut cr = 0;
        loop {
            match *body.get(cr)? {
                b'\r' => break,
                digit @ b'0'..=b'9' => {
                    value = value
                        .checked_mul(10)?
                        .checked_add(i64::from(digit - b'0'))?;
                }
                _ => return None,
            }
            cr += 1;
        }
        if cr == 0 || (cr > 1 && body[0] == b'0') {
            return None;
        }
        self.rest = body.get(cr + 2..)?;
        usize::try_from(value).ok()
    }
}

impl<'a> Iterator for Args<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.remaining == 0 {
            return None;
        }
        let arg = self
            .header(b'$')
            .and_then(|len| Some((self.rest.get(..len)?, self.rest.get(len + 2..)?)));
        match arg {
            Some((arg, rest)) => {
                self.rest = rest;
                self.remaining -= 1;
                Some(arg)
            }
            None => {
                self.remaining = 0;
                None
            }
        }
    }
}

/// Encodes a command as a canonical multibulk request.
pub fn encode_command<'a, I>(args: I) -> Bytes
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: Clone,
{
    let args = args.into_iter();
    let size: usize = args.clone().map(|a| a.len() + 16).sum::<usize>() + 16;
    let mut out = BytesMut::with_capacity(size);
    out.put_slice(format!("*{}\r\n", args.clone().count()).as_bytes());
    for arg in args {
        out.put_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_iterate() {
        let args: [&[u8]; 3] = [b"SET", b"", b"a\r\nb"];
        let encoded = encode_command(args);
        assert_eq!(
            &encoded[..],
            b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\na\r\nb\r\n"
        );
        let back: Vec<&[u8]> = Args::new(&encoded).collect();
        assert_eq!(back, args);
    }

    #[test]
    fn headers_are_taken_as_parse_int_takes_them() {
        for (header, expected) in [
            (&b"*1\r\n$1\r\nx\r\n"[..], vec![&b"x"[..]]),
            (b"*1\r\n$0\r\n\r\n", vec![b""]),
            (b"*1\r\n$10\r\n0123456789\r\n", vec![b"0123456789"]),
            // Sloppy forms Redis takes: any byte after the CR and after the payload.
            (b"*1\rx$1\r\nxyz", vec![b"x"]),
            (b"*1\r\n$01\r\nx\r\n", vec![]),
            (b"*01\r\n$1\r\nx\r\n", vec![]),
            (b"*1\r\n$-1\r\n", vec![]),
            (b"*1\r\n$+1\r\nx\r\n", vec![]),
            (b"*1\r\n$\r\nx\r\n", vec![]),
            (b"*1\r\n$1 \r\nx\r\n", vec![]),
            (b"*1\r\n$99999999999999999999999\r\nx\r\n", vec![]),
            (b"*9223372036854775807\r\n$1\r\nx\r\n", vec![b"x"]),
            (b"*9223372036854775808\r\n$1\r\nx\r\n", vec![]),
            (b"*1\r\n$1", vec![]),
        ] {
            let args: Vec<&[u8]> = Args::new(header).collect();
            assert_eq!(args, expected, "{:?}", String::from_utf8_lossy(header));
        }
    }

    #[test]
    fn garbage_stops_iteration() {
        assert_eq!(Args::new(b"*2\r\n$3\r\nGET\r\n").count(), 1);
        assert_eq!(Args::new(b"junk").count(), 0);
        assert_eq!(Args::new(b"*1\r\n$99\r\nabc\r\n").count(), 0);
    }
}
