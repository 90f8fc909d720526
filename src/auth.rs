//! Client authentication, as Redis 7 does it with `requirepass` and ACL users: the `default`
//! user's password, and named users with a password each.

use std::collections::HashMap;

use crate::config::{AuthConfig, Secret};

/// Who may connect, built from `[auth]`.
#[derive(Debug, Default)]
pub struct Users {
    /// The `default` user's password; when unset the default user needs none (Redis's
    /// `nopass`), and clients start authenticated.
    default: Option<Secret>,
    named: HashMap<String, Secret>,
}

/// Why AUTH failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// `AUTH <password>` with no password configured for the default user.
    NoDefaultPassword,
    WrongPass,
}

impl Users {
    /// From an `[auth]` section whose passwords have been resolved (see
    /// [`AuthConfig::resolve`]).
    pub fn new(config: &AuthConfig) -> Users {
        Users {
            default: config.password.clone(),
            named: config
                .users
                .iter()
                .filter_map(|user| Some((user.name.clone(), user.password.clone()?)))
                .collect(),
        }
    }

    /// No `[auth]` at all: redmux passes AUTH through, for Redis to check.
    pub fn pass_through(&self) -> bool {
        self.default.is_none() && self.named.is_empty()
    }

    /// Whether a new client must authenticate before anything else.
    pub fn required(&self) -> bool {
        self.default.is_some()
    }

    /// Whether `name` is a named user.
    pub fn exists(&self, name: &str) -> bool {
        self.named.contains_key(name)
    }

    /// Checks `AUTH [user] password`; the user name on success.
    pub fn check(&self, user: Option<&[u8]>, password: &[u8]) -> Result<String, AuthError> {
        let expected = match user {
            None => match &self.default {
                None => return Err(AuthError::NoDefaultPassword),
                Some(expected) => Some(expected),
            },
            Some(b"default") => self.default.as_ref(),
            Some(name) => {
                let name = std::str::from_utf8(name).map_err(|_| AuthError::WrongPass)?;
                Some(self.named.get(name).ok_or(AuthError::WrongPass)?)
            }
        };
        // A user without a password (the default one, when none is set) takes any.
        if expected.is_none_or(|expected| constant_time_eq(expected.expose().as_bytes(), password))
        {
            let name = user.map_or("default".into(), |u| {
                String::from_utf8_lossy(u).into_owned()
            });
            Ok(name)
        } else {
            Err(AuthError::WrongPass)
        }
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell an
/// attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserConfig;

    fn users() -> Users {
        Users::new(&AuthConfig {
            password: Some(Secret::new("s3cret")),
            users: vec![UserConfig {
                name: "app".into(),
                password: Some(Secret::new("apppw")),
                ..UserConfig::default()
            }],
            ..AuthConfig::default()
        })
    }

    #[test]
    fn checks_like_redis() {
        let users = users();
        assert!(users.required());
        assert_eq!(users.check(None, b"s3cret"), Ok("default".into()));
        assert_eq!(
            users.check(Some(b"default"), b"s3cret"),
            Ok("default".into())
        );
        assert_eq!(users.check(Some(b"app"), b"apppw"), Ok("app".into()));
        assert_eq!(users.check(None, b"s3cre"), Err(AuthError::WrongPass));
        assert_eq!(
            users.check(Some(b"app"), b"s3cret"),
            Err(AuthError::WrongPass)
        );
        assert_eq!(
            users.check(Some(b"nobody"), b"x"),
            Err(AuthError::WrongPass)
        );
        let open = Users::default();
        assert!(!open.required());
        assert_eq!(open.check(None, b"x"), Err(AuthError::NoDefaultPassword));
        assert_eq!(
            open.check(Some(b"default"), b"anything"),
            Ok("default".into())
        );
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
