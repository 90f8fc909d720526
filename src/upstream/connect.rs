//! Opening an upstream connection: dial, then AUTH and SELECT before any client request.

use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
};

use super::{tls, Address, Endpoint};
use crate::{
    resp::{encode_command, ReplyScanner},
    tls::Flushed,
};

/// Where to connect and how: the configured endpoint (address, login, db), and the TLS
/// settings a `rediss://` one needs, made when the upstreams start.
#[derive(Debug, Clone)]
pub struct Dial {
    pub endpoint: Endpoint,
    pub tls: Option<tls::Connector>,
}

impl std::ops::Deref for Dial {
    type Target = Endpoint;

    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// The read half of an upstream connection, whatever its transport.
pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of an upstream connection.
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("upstream closed the connection during the handshake")]
    Closed,
    #[error("upstream answered {command} with {reply:?}")]
    Rejected {
        command: &'static str,
        reply: String,
    },
    #[error("upstream sent a malformed reply during the handshake")]
    Malformed,
    /// Redis is running a script or function past `busy-reply-threshold`, and refuses all but
    /// a few commands until it ends or is killed: worth retrying soon.
    #[error("upstream is busy running a script (answered {command} with -BUSY)")]
    Busy { command: &'static str },
    /// No address to try: a cluster whose seeds and map name no node.
    #[error("no node to connect to")]
    NoCandidate,
}

/// What to do on a new connection before it carries client requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Setup {
    /// `SELECT` this database (when not 0).
    pub db: u32,
    /// Switch to RESP3 with `HELLO 3`.
    pub resp3: bool,
    /// Check the connection with a PING: a server that accepts and then refuses (max clients
    /// reached, a password required) is caught here, not by a client's request. Not for the
    /// embedded store, which does not know PING.
    pub ping: bool,
}

/// Connects to `endpoint` and prepares the connection as `setup` says, all within `timeout`.
pub(crate) async fn connect(
    endpoint: &Dial,
    setup: Setup,
    timeout: Duration,
) -> Result<(Reader, Writer), ConnectError> {
    let (reader, writer, _) = open(endpoint, setup, timeout, false).await?;
    Ok((reader, writer))
}

/// [`connect`], and, if `identify`, the id Redis gives the connection (CLIENT ID), which
/// CLIENT UNBLOCK names it by: `None` if Redis would not say (the user may not run CLIENT ID).
pub(super) async fn open(
    endpoint: &Dial,
    setup: Setup,
    timeout: Duration,
    identify: bool,
) -> Result<(Reader, Writer, Option<u64>), ConnectError> {
    tokio::time::timeout(timeout, async {
        let (mut reader, mut writer) = dial(endpoint).await?;
        let mut steps = login(endpoint, setup);
        if identify {
            steps.push(Step {
                name: "CLIENT ID",
                request: encode_command([&b"CLIENT"[..], b"ID"]),
                expect: Expect::Id,
            });
        }
        let id = handshake(&steps, &mut reader, &mut writer).await?;
        Ok((reader, writer, id))
    })
    .await
    .map_err(|_| ConnectError::Timeout(timeout))?
}

/// Opens the connection: TCP (then TLS for `rediss://`) or a unix socket. Every upstream
/// connection (shared, pinned, pub/sub, MONITOR) is opened here.
async fn dial(endpoint: &Dial) -> Result<(Reader, Writer), ConnectError> {
    match &endpoint.address {
        Address::Tcp { host, port, tls } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            match (tls, &endpoint.tls) {
                (false, _) => {
                    let (r, w) = stream.into_split();
                    Ok((Box::new(r), Box::new(w)))
                }
                (true, Some(connector)) => {
                    let stream = connector
                        .handshake(stream)
                        .await
                        .map_err(ConnectError::Tls)?;
                    let (r, w) = tokio::io::split(stream);
                    Ok((Box::new(r), Box::new(Flushed::new(w))))
                }
                (true, None) => Err(ConnectError::Tls(io::Error::other(
                    "no TLS settings for a rediss:// address",
                ))),
            }
        }
        Address::Unix(path) => {
            let (r, w) = UnixStream::connect(path).await?.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Address::Embedded => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the embedded upstream must be started before connecting",
        )
        .into()),
    }
}

/// A command sent while setting a connection up, and the reply it must get.
pub(super) struct Step {
    pub name: &'static str,
    pub request: Bytes,
    pub expect: Expect,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    /// Exactly these bytes.
    Exact(&'static [u8]),
    /// Any RESP3 map (the reply to HELLO 3).
    Map,
    /// Anything: an integer is the connection's id, anything else means it is not known.
    Id,
}

impl Expect {
    pub(super) fn accepts(self, reply: &[u8]) -> bool {
        match self {
            Expect::Exact(bytes) => reply == bytes,
            Expect::Map => reply.first() == Some(&b'%'),
            Expect::Id => true,
        }
    }
}

/// The AUTH that logs a connection in, if credentials are configured.
pub(super) fn auth(endpoint: &Endpoint) -> Option<Step> {
    let password = endpoint.password.as_ref()?;
    let mut args: Vec<&[u8]> = vec![b"AUTH"];
    if let Some(user) = &endpoint.username {
        args.push(user.as_bytes());
    }
    args.push(password.expose().as_bytes());
    Some(Step {
        name: "AUTH",
        request: encode_command(args),
        expect: Expect::Exact(b"+OK\r\n"),
    })
}

/// The steps that bring a connection from "logged in as nobody, db 0, RESP2" to `setup`.
pub(super) fn select(setup: Setup) -> Vec<Step> {
    let mut steps = Vec::new();
    if setup.db != 0 {
        let db = setup.db.to_string();
        steps.push(Step {
            name: "SELECT",
            request: encode_command([&b"SELECT"[..], db.as_bytes()]),
            expect: Expect::Exact(b"+OK\r\n"),
        });
    }
    if setup.resp3 {
        steps.push(Step {
            name: "HELLO",
            request: encode_command([&b"HELLO"[..], b"3"]),
            expect: Expect::Map,
        });
    }
    steps
}

fn login(endpoint: &Endpoint, setup: Setup) -> Vec<Step> {
    let mut steps: Vec<Step> = auth(endpoint).into_iter().collect();
    steps.extend(select(setup));
    if setup.ping {
        steps.push(Step {
            name: "PING",
            request: encode_command([&b"PING"[..]]),
            expect: Expect::Exact(b"+PONG\r\n"),
        });
    }
    steps
}

/// Sends every step pipelined and checks each reply; the id an [`Expect::Id`] step got.
async fn handshake(
    steps: &[Step],
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<Option<u64>, ConnectError> {
    if steps.is_empty() {
        return Ok(None);
    }
    for step in steps {
        writer.write_all(&step.request).await?;
    }
    writer.flush().await?;
    let mut buf = BytesMut::with_capacity(256);
    let mut scanner = ReplyScanner::new();
    let mut id = None;
    for step in steps {
        let reply = read_reply(reader, &mut buf, &mut scanner).await?;
        if !step.expect.accepts(&reply) {
            if reply.starts_with(b"-BUSY") {
                return Err(ConnectError::Busy { command: step.name });
            }
            let reply = String::from_utf8_lossy(&reply).trim_end().to_owned();
            return Err(ConnectError::Rejected {
                command: step.name,
                reply,
            });
        }
        if let Expect::Id = step.expect {
            id = std::str::from_utf8(&reply)
                .ok()
                .and_then(|text| text.strip_prefix(':')?.trim_end().parse().ok());
        }
    }
    Ok(id)
}

/// Reads the next whole reply from `reader`, buffering in `buf`.
pub(super) async fn read_reply(
    reader: &mut Reader,
    buf: &mut BytesMut,
    scanner: &mut ReplyScanner,
) -> Result<Bytes, ConnectError> {
    loop {
        if let Some(end) = scanner
            .next_reply(buf)
            .map_err(|_| ConnectError::Malformed)?
        {
            scanner.consumed(end);
            return Ok(buf.split_to(end).freeze());
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(ConnectError::Closed);
        }
    }
}
