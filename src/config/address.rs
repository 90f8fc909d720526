//! Upstream addresses and the credentials that go with them.

use std::{fmt, path::PathBuf, str::FromStr};

use super::Secret;

/// Where the upstream Redis listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp {
        host: String,
        port: u16,
        /// `rediss://`: TLS on top.
        tls: bool,
    },
    Unix(PathBuf),
    /// A mini-redis server started in-process.
    Embedded,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port, tls } => {
                if *tls {
                    f.write_str("rediss://")?;
                }
                if host.contains(':') {
                    write!(f, "[{host}]:{port}")
                } else {
                    write!(f, "{host}:{port}")
                }
            }
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
            Address::Embedded => f.write_str("embedded"),
        }
    }
}

/// Who a connection logs in as: a client's own user, when redmux passes AUTH through to
/// Redis. Compared by value, so clients that logged in alike share connections.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub user: Box<str>,
    pub password: Secret,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Shared credentials: a client holds its identity, and the connections opened for it hold
/// it too, no longer than that.
pub type Identity = std::sync::Arc<Credentials>;

/// An address plus what to send when a connection is made: AUTH, then SELECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: Address,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub db: u32,
}

impl From<Address> for Endpoint {
    fn from(address: Address) -> Self {
        Endpoint {
            address,
            username: None,
            password: None,
            db: 0,
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// Accepts `redis://[user:pass@]host[:port][/db]` (or `rediss://` for TLS), `host:port`,
    /// `unix:///path`, `embedded`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?} is not an upstream address: {why}");
        if text == "embedded" {
            return Ok(Address::Embedded.into());
        }
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("a unix socket path must be absolute (unix:///path)"));
            }
            return Ok(Address::Unix(PathBuf::from(path)).into());
        }
        let (rest, tls) = match (
            text.strip_prefix("redis://"),
            text.strip_prefix("rediss://"),
        ) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            (None, None) => {
                if text.contains("://") {
                    return Err(bad(
                        "expected redis://, rediss://, unix://, host:port or embedded",
                    ));
                }
                let (host, port) = host_port(text, None).map_err(|why| bad(&why))?;
                return Ok(Address::Tcp {
                    host,
                    port,
                    tls: false,
                }
                .into());
            }
        };
        let (authority, db) = match rest.split_once('/') {
            None => (rest, 0),
            Some((authority, "")) => (authority, 0),
            Some((authority, db)) => (
                authority,
                db.parse()
                    .map_err(|_| bad("the database after '/' must be a number"))?,
            ),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (host, port) = host_port(hostport, Some(6379)).map_err(|why| bad(&why))?;
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user = percent_decode(user).ok_or_else(|| bad("bad %-escape"))?;
                let pass = percent_decode(pass).ok_or_else(|| bad("bad %-escape"))?;
                (
                    Some(user).filter(|u| !u.is_empty()),
                    Some(Secret::new(pass)).filter(|p| !p.expose().is_empty()),
                )
            }
        };
        Ok(Endpoint {
            address: Address::Tcp { host, port, tls },
            username,
            password,
            db,
        })
    }
}

/// Splits `host:port` or `[v6]:port`; `default_port` applies when the port is omitted.
fn host_port(text: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address needs a closing ']'")?;
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match (port, default_port) {
        (Some(port), _) => port.parse().map_err(|_| format!("bad port {port:?}"))?,
        (None, Some(default)) => default,
        (None, None) => return Err("expected host:port".into()),
    };
    Ok((host.to_owned(), port))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Endpoint {
        text.parse().unwrap()
    }

    #[test]
    fn address_forms() {
        assert_eq!(parse("embedded").address, Address::Embedded);
        assert_eq!(
            parse("127.0.0.1:7000").address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 7000,
                tls: false,
            }
        );
        assert_eq!(parse("[::1]:7000").address.to_string(), "[::1]:7000");
        assert_eq!(
            parse("unix:///run/redis.sock").address,
            Address::Unix("/run/redis.sock".into())
        );
        let full = parse("redis://alice:s%3Acret@localhost:7001/2");
        assert_eq!(full.address.to_string(), "localhost:7001");
        assert_eq!(full.username.as_deref(), Some("alice"));
        assert_eq!(full.password, Some(Secret::new("s:cret")));
        assert_eq!(full.db, 2);
        let no_user = parse("redis://:pw@h");
        assert_eq!(
            (
                no_user.username,
                no_user.password,
                no_user.address.to_string()
            ),
            (None, Some(Secret::new("pw")), "h:6379".into())
        );
        let tls = parse("rediss://:pw@[::1]:6390/1");
        assert_eq!(
            tls.address,
            Address::Tcp {
                host: "::1".into(),
                port: 6390,
                tls: true,
            }
        );
        assert_eq!(tls.address.to_string(), "rediss://[::1]:6390");
        assert_eq!((tls.password, tls.db), (Some(Secret::new("pw")), 1));
        assert_eq!(parse("rediss://h").address.to_string(), "rediss://h:6379");
    }

    #[test]
    fn bad_addresses() {
        for bad in [
            "",
            "host",
            "host:notaport",
            "http://x:1",
            "redis://h:1/x",
            "unix://relative",
            "rediss://h:1/x",
            "rediss://",
            "redis://h:1/%",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?}");
        }
    }
}
