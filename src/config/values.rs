//! How values are read from TOML and the command line: sizes, durations, addresses, modes and
//! log levels, each refused with a message that names what was expected, and the shapes a
//! secret may take (a string, or `{ file = ... }`), checked before serde sees them.

use std::{fmt, marker::PhantomData, net::SocketAddr, time::Duration};

use serde::{de, Deserialize, Deserializer};

use super::{AuthConfig, Endpoint, Secret, UpstreamConfig, UserConfig};

pub(super) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("{text:?} is not an address: expected IP:PORT, e.g. \"127.0.0.1:6380\"")
    })
}

pub(super) fn check_log_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("{level:?} is not a log filter: {e}"))
}

/// Parses a size the way Redis's config does: a plain number of bytes, or a number with a unit,
/// case-insensitive: `k`/`m`/`g` are powers of 1000, `kb`/`mb`/`gb` powers of 1024.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let multiplier: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => u64::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| multiplier != u64::MAX)
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is not a size: expected e.g. 1024, \"64kb\", \"512mb\""))
}

/// Longest duration accepted anywhere: keeps deadline arithmetic far from overflow.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a duration: a whole number with a unit `ms`, `s`, `m` or `h`; `0` alone is allowed.
/// At most a year.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration: expected e.g. \"500ms\", \"5s\", \"1m\"");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let duration = match unit {
        "" if n == 0 => Duration::ZERO,
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is too long: at most a year"));
    }
    Ok(duration)
}

// === serde adapters: each gives a precise message, and toml adds the line ===

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(de::Error::custom)
}

/// `upstream.cluster`: a list of addresses, each read as `address` reads one.
pub(super) fn addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Endpoint>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|message: String| de::Error::custom(without_password(text, message)))
        })
        .collect()
}

pub(super) fn address<'de, D: Deserializer<'de>>(d: D) -> Result<Endpoint, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map_err(|message: String| de::Error::custom(without_password(&text, message)))
}

/// An address error quotes the address: one with a password (`redis://user:pass@...`) must
/// not show it.
pub(super) fn without_password(address: &str, message: String) -> String {
    let password = address
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|password| !password.is_empty());
    match password {
        // The message quotes the address with `{:?}`, which escapes `"` and `\`.
        Some(password) => {
            let quoted = format!("{password:?}");
            let escaped = quoted
                .strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .unwrap_or(&quoted);
            message
                .replace(escaped, "<redacted>")
                .replace(password, "<redacted>")
        }
        None => message,
    }
}

// === keys that may hold a password: their value's shape is checked without quoting it ===
//
// serde's type errors quote the value they got ("invalid type: integer `86753091`, expected a
// string"), and a password written as a number, or as a string where its section or list
// belongs, is still a password. These keys check the shape themselves and say only what it
// must be: "`auth.password` must be a string".

pub(super) fn auth_password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    checked(d, "auth.password", "a string").map(Some)
}

pub(super) fn user_password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    checked(d, "auth.users.password", "a string").map(Some)
}

pub(super) fn upstream_password<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Secret>, D::Error> {
    checked(d, "upstream.password", "a string").map(Some)
}

pub(super) fn auth_section<'de, D: Deserializer<'de>>(d: D) -> Result<AuthConfig, D::Error> {
    checked(d, "auth", "a table").map(|Table(auth)| auth)
}

pub(super) fn upstream_section<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<UpstreamConfig, D::Error> {
    checked(d, "upstream", "a table").map(|Table(upstream)| upstream)
}

pub(super) fn auth_users<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<UserConfig>, D::Error> {
    let users: Vec<Table<UserConfig>> = checked(d, "auth.users", "a list of tables")?;
    Ok(users.into_iter().map(|Table(user)| user).collect())
}

/// Reads a `T` at `key`; any other shape of value is refused with "`key` must be `what`",
/// which quotes nothing of it.
pub(super) fn checked<'de, D: Deserializer<'de>, T: Shape<'de>>(
    d: D,
    key: &'static str,
    what: &'static str,
) -> Result<T, D::Error> {
    de::DeserializeSeed::deserialize(
        Checked {
            key,
            what,
            shape: PhantomData,
        },
        d,
    )
}

/// The shapes of value a checked key takes; `None` for any other.
pub(super) trait Shape<'de>: Sized {
    fn from_str<E: de::Error>(_text: &str) -> Option<Result<Self, E>> {
        None
    }
    fn from_map<A: de::MapAccess<'de>>(_map: A) -> Option<Result<Self, A::Error>> {
        None
    }
    fn from_seq<A: de::SeqAccess<'de>>(
        _seq: A,
        _checked: Checked<Self>,
    ) -> Option<Result<Self, A::Error>> {
        None
    }
}

impl Shape<'_> for Secret {
    fn from_str<E: de::Error>(text: &str) -> Option<Result<Self, E>> {
        Some(Ok(Secret::new(text)))
    }
}

/// A TOML table, read as `T`: its own errors (an unknown key, a bad value) keep their place.
pub(super) struct Table<T>(T);

impl<'de, T: Deserialize<'de>> Shape<'de> for Table<T> {
    fn from_map<A: de::MapAccess<'de>>(map: A) -> Option<Result<Self, A::Error>> {
        Some(T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table))
    }
}

/// A list of tables (`[[auth.users]]`): each element is checked as the list is.
impl<'de, T: Deserialize<'de>> Shape<'de> for Vec<Table<T>> {
    fn from_seq<A: de::SeqAccess<'de>>(
        mut seq: A,
        checked: Checked<Self>,
    ) -> Option<Result<Self, A::Error>> {
        let mut tables = Vec::new();
        let element = || Checked::<Table<T>> {
            key: checked.key,
            what: checked.what,
            shape: PhantomData,
        };
        loop {
            match seq.next_element_seed(element()) {
                Ok(Some(table)) => tables.push(table),
                Ok(None) => return Some(Ok(tables)),
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

/// The visitor behind [`checked`]: every shape but the ones `T` takes is refused the same
/// way, with the value left out.
pub(super) struct Checked<T> {
    key: &'static str,
    what: &'static str,
    shape: PhantomData<T>,
}

impl<T> Checked<T> {
    fn wrong<E: de::Error>(&self) -> E {
        E::custom(format!("`{}` must be {}", self.key, self.what))
    }
}

impl<'de, T: Shape<'de>> de::DeserializeSeed<'de> for Checked<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Shape<'de>> de::Visitor<'de> for Checked<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        T::from_str(text).unwrap_or_else(|| Err(self.wrong()))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map).unwrap_or_else(|| Err(self.wrong()))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        let wrong = self.wrong();
        T::from_seq(seq, self).unwrap_or(Err(wrong))
    }

    // Every other shape: serde's defaults would quote the value.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<T, D::Error> {
        Err(self.wrong())
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, _: D) -> Result<T, D::Error> {
        Err(self.wrong())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(self.wrong())
    }
}

pub(super) fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?;
    check_log_level(&level).map_err(de::Error::custom)?;
    Ok(level)
}

pub(super) fn file_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    u32::from_str_radix(&text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            de::Error::custom(format!(
                "{text:?} is not a file mode: expected octal, e.g. \"0660\""
            ))
        })
}

/// A size: a TOML integer (bytes) or a string with a unit.
pub(super) fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d).map_err(|_| {
        de::Error::custom("expected a size: a number of bytes or a string such as \"512mb\"")
    })? {
        Size::Bytes(n) => Ok(n),
        Size::Text(text) => parse_size(&text).map_err(de::Error::custom),
    }
}

pub(super) fn optional_address<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    parse_listen(&String::deserialize(d)?)
        .map(Some)
        .map_err(de::Error::custom)
}

/// A string or a list of strings.
pub(super) fn listen_addresses<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)
        .map_err(|_| de::Error::custom("expected an address or a list of addresses"))?
    {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    };
    list.iter()
        .map(|addr| parse_listen(addr).map_err(de::Error::custom))
        .collect()
}
