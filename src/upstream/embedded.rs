//! The embedded upstream: a mini-redis server run in-process, so redmux can be tried with no
//! Redis installed. What it cannot take is answered before it is sent (`command::embedded`).

use std::{io, net::SocketAddr};

use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A running embedded store. It holds the data, so a reload that keeps the embedded upstream
/// keeps the store; it stops when the last upstream set using it is gone, or with `shutdown`.
#[derive(Debug)]
pub(super) struct Store {
    pub addr: SocketAddr,
    _stop: DropGuard,
}

/// Starts mini-redis on an ephemeral loopback port.
pub(super) async fn start(shutdown: &CancellationToken) -> io::Result<Store> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let stop = shutdown.child_token();
    let stopped = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        if let Err(error) = mini_redis::server::run(listener, stopped).await {
            tracing::error!(%error, "embedded mini-redis server stopped");
        }
    });
    tracing::warn!(
        %addr,
        "upstream is \"embedded\": an in-memory toy store (mini-redis) for trying redmux. It knows \
         only GET, SET, PUBLISH and PING, and nothing is persisted. Point upstream.address at a \
         real redis-server for real use"
    );
    Ok(Store {
        addr,
        _stop: stop.drop_guard(),
    })
}
