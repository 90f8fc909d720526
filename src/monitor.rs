//! MONITOR: a connection of the client's own that streams every command Redis runs.
//!
//! The feed goes to the client's inbox, bounded in bytes like a subscriber's, after the `+OK`
//! that answers MONITOR itself. The connection closes as soon as the client stops monitoring
//! (RESET) or leaves, or falls more than its output limit behind, which also closes the client.

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tracing::debug;

use crate::{
    pubsub::Inbox,
    resp::{encode_command, ReplyScanner},
    upstream::{Identity, Reply, UpstreamError, Upstreams},
};

/// Starts monitoring: the receiver gets the reply to MONITOR, the inbox everything after it.
/// Past the inbox's limit on waiting bytes the feed stops.
pub(crate) async fn start(
    upstreams: &Upstreams,
    identity: Option<&Identity>,
    inbox: Inbox,
) -> oneshot::Receiver<Reply> {
    let (reply, rx) = oneshot::channel();
    let (mut reader, mut writer, slot) = match upstreams.monitor_connection(identity).await {
        Ok(connection) => connection,
        Err(error) => {
            let _ = reply.send(Err(error));
            return rx;
        }
    };
    let Inbox { tx, queued, cut } = inbox;
    tokio::spawn(async move {
        let _slot = slot;
        if writer
            .write_all(&encode_command([&b"MONITOR"[..]]))
            .await
            .is_err()
        {
            let _ = reply.send(Err(UpstreamError::ConnectionLost));
            return;
        }
        let mut reply = Some(reply);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut scanner = ReplyScanner::new();
        loop {
            tokio::select! {
                read = reader.read_buf(&mut buf) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        break;
                    }
                }
                () = tx.closed() => break,
            }
            loop {
                let end = match scanner.next_reply(&buf) {
                    Ok(Some(end)) => end,
                    Ok(None) => break,
                    // Not RESP: the feed cannot go on.
                    Err(_) => return,
                };
                let frame = buf.split_to(end).freeze();
                scanner.consumed(end);
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Ok(frame.into()));
                    continue;
                }
                if !queued.charge(frame.len()) {
                    // The session logs it, and closes the client.
                    let _ = cut.send(());
                    return;
                }
                if tx.send(frame).is_err() {
                    debug!("monitoring client gone; closing its MONITOR connection");
                    return;
                }
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(Err(UpstreamError::ConnectionLost));
        }
    });
    rx
}
