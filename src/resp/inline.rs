//! Inline command splitting, a port of Redis's `sdssplitargs` so that `telnet` and `nc` users get
//! exactly the arguments Redis would see.

/// Splits one inline line into arguments. `None` for unbalanced quotes.
pub(super) fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_space(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let (arg, next) = split_one(line, i)?;
        args.push(arg);
        i = next;
    }
}

/// Reads one argument starting at `i`; returns it and the index after it.
fn split_one(line: &[u8], mut i: usize) -> Option<(Vec<u8>, usize)> {
    #[derive(PartialEq)]
    enum Quote {
        None,
        Double,
        Single,
    }
    let mut quote = Quote::None;
    let mut current = Vec::new();
    let at = |i: usize| line.get(i).copied();
    loop {
        let Some(c) = at(i) else {
            // End of line: fine outside quotes, an error inside them.
            return (quote == Quote::None).then_some((current, i));
        };
        match quote {
            Quote::Double => match (c, at(i + 1)) {
                (b'\\', Some(b'x'))
                    if at(i + 2).is_some_and(|h| h.is_ascii_hexdigit())
                        && at(i + 3).is_some_and(|h| h.is_ascii_hexdigit()) =>
                {
                    current.push(hex(line[i + 2]) * 16 + hex(line[i + 3]));
                    i += 3;
                }
                (b'\\', Some(escaped)) => {
                    current.push(match escaped {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    i += 1;
                }
                (b'"', next) => {
                    // A closing quote must be followed by a space or the end.
                    if next.is_some_and(|n| !is_space(n)) {
                        return None;
                    }
                    return Some((current, i + 1));
                }
                (other, _) => current.push(other),
            },
            Quote::Single => match (c, at(i + 1)) {
                (b'\\', Some(b'\'')) => {
                    current.push(b'\'');
                    i += 1;
                }
                (b'\'', next) => {
                    if next.is_some_and(|n| !is_space(n)) {
                        return None;
                    }
                    return Some((current, i + 1));
                }
                (other, _) => current.push(other),
            },
            Quote::None => match c {
                b' ' | b'\n' | b'\r' | b'\t' => return Some((current, i)),
                b'"' => quote = Quote::Double,
                b'\'' => quote = Quote::Single,
                other => current.push(other),
            },
        }
        i += 1;
    }
}

/// C's `isspace`.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::split_args;

    fn split(line: &str) -> Option<Vec<String>> {
        split_args(line.as_bytes()).map(|args| {
            args.into_iter()
                .map(|a| String::from_utf8_lossy(&a).into_owned())
                .collect()
        })
    }

    #[test]
    fn like_sdssplitargs() {
        assert_eq!(split("set a b").unwrap(), ["set", "a", "b"]);
        assert_eq!(split("  set\t a  ").unwrap(), ["set", "a"]);
        assert_eq!(split("\"\"").unwrap(), [""]);
        assert_eq!(split("\"\\xZZ\"").unwrap(), ["xZZ"]);
        assert_eq!(split("\"\\x41\\t\"").unwrap(), ["A\t"]);
        assert_eq!(split("'a\\'b' 'c\\d'").unwrap(), ["a'b", "c\\d"]);
        assert!(split("a\"b c\"d e").is_none());
        assert_eq!(split("a\"b c\" e").unwrap(), ["ab c", "e"]);
        assert!(split("\"a\"b").is_none());
        assert!(split("'a'b").is_none());
        assert!(split("\"abc").is_none());
        assert!(split("\"abc\\").is_none());
        assert_eq!(split("").unwrap(), Vec::<String>::new());
    }
}
