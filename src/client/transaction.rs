//! MULTI, EXEC, DISCARD, WATCH and UNWATCH: a transaction takes a pinned connection of its own
//! from MULTI or WATCH until EXEC, DISCARD or UNWATCH, and the client's db and protocol go with
//! it.

use bytes::Bytes;

use super::{Run, State, Then, Tx};
use crate::{
    command::Transaction,
    resp::{encode, encode_command, Args},
};

impl State {
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH (with the arity that changes state).
    pub(super) async fn transaction(&mut self, command: Transaction, request: Bytes) {
        let timeout = Some(self.config.request_timeout);
        match (command, std::mem::replace(&mut self.tx, Tx::None)) {
            // Opening: take a pinned connection (the one WATCH holds, or a new one).
            (Transaction::Multi, Tx::None) | (Transaction::Watch, Tx::None) => {
                match self.client.upstreams().pinned(self.client.target()).await {
                    Ok(lease) => {
                        self.tx = if command == Transaction::Multi {
                            Tx::Multi {
                                lease,
                                dirty: false,
                                db: None,
                                writes: false,
                                queued: 0,
                            }
                        } else {
                            Tx::Watching(lease)
                        };
                        self.forward_one(request, timeout, None).await;
                    }
                    Err(error) => self.reply_locally(error.replies(1)),
                }
            }
            (Transaction::Multi, Tx::Watching(lease)) => {
                self.tx = Tx::Multi {
                    lease,
                    dirty: false,
                    db: None,
                    writes: false,
                    queued: 0,
                };
                self.forward_one(request, timeout, None).await;
            }
            // A command redmux refused while queuing aborts the transaction: DISCARD it
            // upstream (that reply is dropped) and answer as Redis does.
            (Transaction::Exec, Tx::Multi { lease, dirty: true, .. }) => {
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
                    b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                ));
            }
            // Closing: the last request on the pinned connection; it is given back after. An
            // EXEC whose transaction SELECTs moves the client once it has run, and nothing
            // after it runs before that is known.
            (Transaction::Exec, Tx::Multi { lease, db, .. }) => {
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
            (Transaction::Discard, Tx::Multi { lease, .. })
            | (Transaction::Unwatch, Tx::Watching(lease)) => {
                self.forward_one(request, timeout, Some(lease)).await;
            }
            // Without a transaction there is nothing to close: Redis's own answers. Its arity
            // check comes first, and refuses EXEC in EXEC's words.
            (Transaction::Exec, Tx::None) if Args::new(&request).remaining() > 1 => {
                self.reply_locally(Bytes::from_static(
                    b"-EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command\r\n",
                ))
            }
            (Transaction::Exec, Tx::None) => self.reply_locally(encode::error("EXEC without MULTI")),
            (Transaction::Discard, Tx::None) => {
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
}
