//! The stream: redmux's own connection in `CLIENT TRACKING ON BCAST` mode (RESP3), on which
//! Redis pushes every key that changes. It reconnects until no client tracks and there is no
//! near cache to keep.

use std::{sync::Weak, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{interval, sleep, Instant, MissedTickBehavior},
};
use tracing::{info, warn};

use super::{Inner, Invalidation};
use crate::{
    cluster::reply::{decode, Value},
    report::Chain,
    resp::{encode_command, ReplyScanner},
    upstream::{self, Dial, Reader, Setup, Timeouts, Writer},
};

/// How often the stream checks whether anyone still tracks, and PINGs Redis: a stream that
/// only listens would look idle to Redis's `timeout`, which would close it (emptying the
/// cache each time), and a connection that died without a reset (a host gone, a firewall's
/// dropped state) would look up forever while no invalidation can come.
const TICK: Duration = Duration::from_secs(1);

/// Longest wait between two connection attempts.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// What ended a stream connection.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("connection closed by Redis")]
    Closed,
    #[error("read failed")]
    Read(#[source] std::io::Error),
    #[error("malformed reply from Redis")]
    Malformed,
    #[error("Redis refused CLIENT TRACKING: {0}")]
    Refused(String),
    #[error("could not connect")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("write failed")]
    Write(#[source] std::io::Error),
    #[error("no answer to CLIENT TRACKING within {0:?}")]
    Timeout(Duration),
    #[error("no answer to PING within {0:?}")]
    Unanswered(Duration),
}

/// Runs the stream for `tracker` until no client tracks or the tracker is gone.
pub(super) async fn run(tracker: Weak<Inner>, dial: Dial, timeouts: Timeouts) {
    let mut retry = Duration::from_millis(50);
    loop {
        match tracker.upgrade() {
            Some(inner) if !inner.stop_if_idle() => {}
            _ => return,
        }
        match open(&dial, timeouts).await {
            Ok((reader, rbuf)) => {
                info!("tracking stream up");
                retry = Duration::from_millis(50);
                let Some(inner) = tracker.upgrade() else {
                    return;
                };
                inner.up();
                drop(inner);
                match follow(&tracker, reader, rbuf, timeouts).await {
                    Ok(()) => return,
                    Err(error) => {
                        warn!(error = %Chain(&error), "tracking stream lost; reconnecting")
                    }
                }
            }
            Err(error) => {
                warn!(error = %Chain(&error), "cannot open the tracking stream; retrying");
            }
        }
        if let Some(inner) = tracker.upgrade() {
            inner.down();
        }
        sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Connects in RESP3 and turns BCAST tracking on. Returns the read half and what was read
/// past the `+OK`; the write half is kept by the caller's `follow` only to hold it open.
async fn open(dial: &Dial, timeouts: Timeouts) -> Result<((Reader, Writer), BytesMut), Ended> {
    let setup = Setup {
        db: 0,
        resp3: true,
        ping: false,
    };
    let (mut reader, mut writer) = upstream::connect(dial, setup, timeouts.connect)
        .await
        .map_err(|error| Ended::Connect(Box::new(error)))?;
    let request = encode_command([&b"CLIENT"[..], b"TRACKING", b"ON", b"BCAST"]);
    writer.write_all(&request).await.map_err(Ended::Write)?;
    writer.flush().await.map_err(Ended::Write)?;
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut scanner = ReplyScanner::with_push();
    let answer = tokio::time::timeout(timeouts.connect, async {
        loop {
            if let Some(end) = scanner.next_reply(&rbuf).map_err(|_| Ended::Malformed)? {
                let reply = rbuf.split_to(end).freeze();
                scanner.consumed(end);
                return Ok::<Bytes, Ended>(reply);
            }
            match reader.read_buf(&mut rbuf).await {
                Ok(0) => return Err(Ended::Closed),
                Ok(_) => {}
                Err(error) => return Err(Ended::Read(error)),
            }
        }
    })
    .await
    .map_err(|_| Ended::Timeout(timeouts.connect))??;
    if &answer[..] != b"+OK\r\n" {
        return Err(Ended::Refused(
            String::from_utf8_lossy(answer.trim_ascii_end()).into_owned(),
        ));
    }
    Ok(((reader, writer), rbuf))
}

/// Reads invalidations until the connection ends (an error) or no client tracks (`Ok`),
/// PINGing Redis every tick; a PING unanswered for `request_timeout` ends the connection.
async fn follow(
    tracker: &Weak<Inner>,
    (mut reader, mut writer): (Reader, Writer),
    mut rbuf: BytesMut,
    timeouts: Timeouts,
) -> Result<(), Ended> {
    let mut scanner = ReplyScanner::with_push();
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ping = encode_command([&b"PING"[..]]);
    let mut pinged: Option<Instant> = None;
    loop {
        while let Some(end) = scanner.next_reply(&rbuf).map_err(|_| Ended::Malformed)? {
            let frame = rbuf.split_to(end);
            scanner.consumed(end);
            if frame.first() != Some(&b'>') {
                // The PING's answer, the only reply that is not a push: its PONG, or an error
                // (-BUSY while a script runs, -LOADING). Either way Redis reads the stream.
                pinged = None;
                continue;
            }
            let Some(inner) = tracker.upgrade() else {
                return Ok(());
            };
            match parse(&frame)? {
                Some(Invalidation::Keys(keys)) => inner.changed(&keys),
                Some(Invalidation::All) => inner.flushed(),
                None => {}
            }
        }
        tokio::select! {
            read = reader.read_buf(&mut rbuf) => match read {
                Ok(0) => return Err(Ended::Closed),
                Ok(_) => {}
                Err(error) => return Err(Ended::Read(error)),
            },
            _ = tick.tick() => {
                match tracker.upgrade() {
                    Some(inner) if !inner.stop_if_idle() => {}
                    _ => {
                        info!("tracking stream closed: no client tracks");
                        return Ok(());
                    }
                }
                match pinged {
                    Some(at) if at.elapsed() > timeouts.request => {
                        return Err(Ended::Unanswered(timeouts.request));
                    }
                    Some(_) => {}
                    None => {
                        let write = async {
                            writer.write_all(&ping).await?;
                            writer.flush().await
                        };
                        tokio::time::timeout(timeouts.request, write)
                            .await
                            .map_err(|_| Ended::Unanswered(timeouts.request))?
                            .map_err(Ended::Write)?;
                        pinged = Some(Instant::now());
                    }
                }
            }
        }
    }
}

/// One frame from the stream: `>2 invalidate [keys]`, or `>2 invalidate _` for everything.
/// Anything else (a push of another kind) is not tracking's business: `None`.
fn parse(frame: &[u8]) -> Result<Option<Invalidation>, Ended> {
    let Value::Array(parts) = decode(frame).map_err(|_| Ended::Malformed)? else {
        return Ok(None);
    };
    let [kind, keys] = parts.as_slice() else {
        return Ok(None);
    };
    if kind.bytes() != Some(b"invalidate") {
        return Ok(None);
    }
    match keys {
        Value::Null => Ok(Some(Invalidation::All)),
        Value::Array(keys) => Ok(Some(Invalidation::Keys(
            keys.iter()
                .filter_map(Value::bytes)
                .map(Bytes::copy_from_slice)
                .collect(),
        ))),
        _ => Err(Ended::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidations_are_read_and_other_pushes_ignored() {
        assert_eq!(parse(b">2\r\n$7\r\nmessage\r\n$1\r\nx\r\n").unwrap(), None);
        assert_eq!(
            parse(b">2\r\n$10\r\ninvalidate\r\n*2\r\n$1\r\nk\r\n$1\r\nj\r\n").unwrap(),
            Some(Invalidation::Keys(vec![
                Bytes::from_static(b"k"),
                Bytes::from_static(b"j")
            ]))
        );
        assert_eq!(
            parse(b">2\r\n$10\r\ninvalidate\r\n_\r\n").unwrap(),
            Some(Invalidation::All)
        );
        assert!(parse(b">2\r\n$10\r\ninvalidate\r\n:1\r\n").is_err());
        assert!(parse(b"*1\r\n").is_err());
    }
}
