//! MULTI, EXEC, DISCARD, WATCH and UNWATCH: a transaction takes a pinned connection of its own
//! from MULTI or WATCH until EXEC, DISCARD or UNWATCH, and the client's db and protocol go with
//! it.

use bytes::Bytes;

use super::{Run, State, Then, Tx};
use crate::{
    command::Transaction,
    resp::{encode, encode_command, Args},
    upstream::{Lease, UpstreamError},
};

impl State {
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH (with the arity that changes state).
    pub(super) async fn transaction(&mut self, command: Transaction, request: Bytes) {
        let timeout = Some(self.config.request_timeout);
        match (command, std::mem::replace(&mut self.tx, Tx::None)) {
            // Opening: take a pinned connection (the one WATCH holds, or a new one). Without
            // one, MULTI is answered here all the same (see `Tx`).
            (Transaction::Multi, Tx::None) | (Transaction::Watch, Tx::None) => {
                let lease = self.client.upstreams().pinned(self.client.target()).await;
                match (command, lease) {
                    (Transaction::Watch, Err(error)) => {
                        self.tx = Tx::Watching(Err(error));
                        self.reply_locally(error.replies(1));
                    }
                    (Transaction::Watch, Ok(lease)) => {
                        self.tx = Tx::Watching(Ok(lease));
                        self.forward_one(request, timeout, None).await;
                    }
                    (_, lease) => self.open_multi(lease, request).await,
                }
            }
            (Transaction::Multi, Tx::Watching(lease)) => self.open_multi(lease, request).await,
            // No connection: nothing of the transaction reached Redis, and none of it runs.
            // A command refused while queuing says so first, as it would with a connection.
            (
                Transaction::Exec,
                Tx::Multi {
                    lease: Err(error),
                    dirty,
                    ..
                },
            ) => self.reply_locally(match (exec_arity(&request), dirty) {
                (Some(arity), _) => Bytes::from_static(arity),
                (None, true) => Bytes::from_static(PREVIOUS_ERRORS),
                (None, false) => Bytes::from(format!(
                    "-EXECABORT Transaction discarded because of: {error}\r\n"
                )),
            }),
            (Transaction::Discard, Tx::Multi { lease: Err(_), .. })
            | (Transaction::Unwatch, Tx::Watching(Err(_))) => {
                self.reply_locally(Bytes::from_static(b"+OK\r\n"))
            }
            // The keys watched before were not: it stays without a connection.
            (Transaction::Watch, Tx::Watching(Err(error))) => {
                self.tx = Tx::Watching(Err(error));
                self.reply_locally(error.replies(1));
            }
            // Redis's answers, which do not abort the transaction; UNWATCH is queued.
            (_, tx @ Tx::Multi { lease: Err(_), .. }) => {
                self.tx = tx;
                self.reply_locally(match command {
                    Transaction::Multi => encode::error("MULTI calls can not be nested"),
                    Transaction::Watch => encode::error("WATCH inside MULTI is not allowed"),
                    _ => Bytes::from_static(b"+QUEUED\r\n"),
                });
            }
            // A command redmux refused while queuing aborts the transaction: DISCARD it
            // upstream (that reply is dropped) and answer as Redis does (its arity check on
            // EXEC comes first).
            (
                Transaction::Exec,
                Tx::Multi {
                    lease: Ok(lease),
                    dirty: true,
                    ..
                },
            ) => {
                let discard = Run {
                    frames: encode_command([&b"DISCARD"[..]]),
                    count: 1,
                    timeout,
                    release: Some(lease),
                    ..Run::default()
                };
                self.owe();
                self.send(discard, true).await;
                self.reply_locally(Bytes::from_static(
                    exec_arity(&request).unwrap_or(PREVIOUS_ERRORS),
                ));
            }
            // Closing: the last request on the pinned connection; it is given back after. An
            // EXEC whose transaction SELECTs moves the client once it has run, and nothing
            // after it runs before that is known.
            (
                Transaction::Exec,
                Tx::Multi {
                    lease: Ok(lease),
                    db,
                    ..
                },
            ) => {
                self.sync = db.is_some();
                let batch = Run {
                    frames: request,
                    count: 1,
                    timeout,
                    release: Some(lease),
                    then: db.map(|db| Box::new(Then::Select(db))),
                    ..Run::default()
                };
                self.forward(batch).await;
            }
            (
                Transaction::Discard,
                Tx::Multi {
                    lease: Ok(lease), ..
                },
            )
            | (Transaction::Unwatch, Tx::Watching(Ok(lease))) => {
                self.forward_one(request, timeout, Some(lease)).await;
            }
            // Without a transaction there is nothing to close: Redis's own answers (while
            // watching without a connection, too). Its arity check comes first, and refuses
            // EXEC in EXEC's words.
            (Transaction::Exec, tx @ (Tx::None | Tx::Watching(Err(_))))
                if exec_arity(&request).is_some() =>
            {
                self.tx = tx;
                self.reply_locally(Bytes::from_static(EXEC_ARITY))
            }
            (Transaction::Exec, tx @ (Tx::None | Tx::Watching(Err(_)))) => {
                self.tx = tx;
                self.reply_locally(encode::error("EXEC without MULTI"))
            }
            (Transaction::Discard, tx @ (Tx::None | Tx::Watching(Err(_)))) => {
                self.tx = tx;
                self.reply_locally(encode::error("DISCARD without MULTI"))
            }
            (Transaction::Unwatch, Tx::None) => self.reply_locally(Bytes::from_static(b"+OK\r\n")),
            // Everything else goes to the pinned connection, whose Redis answers it (nested
            // MULTI, WATCH inside MULTI, EXEC without MULTI while watching, queued UNWATCH...).
            (_, tx) => {
                self.tx = tx;
                self.forward_one(request, timeout, None).await;
            }
        }
    }

    /// MULTI, on the connection WATCH took or MULTI took itself, or on none: then it is
    /// answered here, as Redis would answer it, and the transaction never runs.
    async fn open_multi(&mut self, lease: Result<Lease, UpstreamError>, request: Bytes) {
        let connected = lease.is_ok();
        self.tx = Tx::Multi {
            lease,
            dirty: false,
            db: None,
            writes: false,
            queued: 0,
        };
        match connected {
            true => {
                let timeout = Some(self.config.request_timeout);
                self.forward_one(request, timeout, None).await;
            }
            false => self.reply_locally(Bytes::from_static(b"+OK\r\n")),
        }
    }
}

/// Redis's answer to EXEC after a command was refused while queuing.
const PREVIOUS_ERRORS: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";

/// Redis's answer to EXEC with arguments: its arity check comes before anything else.
const EXEC_ARITY: &[u8] =
    b"-EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command\r\n";

/// [`EXEC_ARITY`] if this EXEC has arguments.
fn exec_arity(request: &[u8]) -> Option<&'static [u8]> {
    (Args::new(request).remaining() > 1).then_some(EXEC_ARITY)
}
