//! How an error is shown to a person: its message, then each cause's, joined by ": ".
//!
//! redmux's errors keep their cause as [`Error::source`] and do not repeat it in their own
//! message, so printing only the top one would lose the cause, and printing the message with
//! the cause pasted in as well would show it twice. Every place that shows an error (the log,
//! the binary's stderr) shows it through [`Chain`].

use std::{error::Error, fmt};

/// Displays an error and its causes: `cannot listen on 127.0.0.1:6380: Address in use`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on {addr}")]
    struct Bind {
        addr: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn every_cause_is_shown_once() {
        let error = Bind {
            addr: "127.0.0.1:6380",
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address in use"),
        };
        assert_eq!(
            Chain(&error).to_string(),
            "cannot listen on 127.0.0.1:6380: Address in use"
        );
    }
}
