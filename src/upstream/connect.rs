//! Opening an upstream connection: dial, then AUTH and SELECT before any client request.

use std::{io, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
};

use super::{Address, Endpoint};
use crate::resp::{encode_command, ReplyScanner};

/// The read half of an upstream connection, whatever its transport.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of an upstream connection.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
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
}

/// Connects to `endpoint` and logs in, all within `timeout`. With `ping`, a PING must be
/// answered `+PONG` before the connection counts as up: a server that accepts and then refuses
/// (max clients reached, a password required) is caught here, not by a client's request.
pub async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
    ping: bool,
) -> Result<(Reader, Writer), ConnectError> {
    tokio::time::timeout(timeout, async {
        let (mut reader, mut writer) = dial(&endpoint.address).await?;
        handshake(endpoint, ping, &mut reader, &mut writer).await?;
        Ok((reader, writer))
    })
    .await
    .map_err(|_| ConnectError::Timeout(timeout))?
}

async fn dial(address: &Address) -> io::Result<(Reader, Writer)> {
    match address {
        Address::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Address::Unix(path) => {
            let (r, w) = UnixStream::connect(path).await?.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Address::Embedded => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the embedded upstream must be started before connecting",
        )),
    }
}

/// Sends AUTH, SELECT and PING as configured and checks each reply.
async fn handshake(
    endpoint: &Endpoint,
    ping: bool,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<(), ConnectError> {
    // (name for errors, request, the only acceptable reply)
    let mut commands: Vec<(&'static str, bytes::Bytes, &'static [u8])> = Vec::new();
    if let Some(password) = &endpoint.password {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(user) = &endpoint.username {
            args.push(user.as_bytes());
        }
        args.push(password.expose().as_bytes());
        commands.push(("AUTH", encode_command(args), b"+OK\r\n"));
    }
    if endpoint.db != 0 {
        let db = endpoint.db.to_string();
        commands.push((
            "SELECT",
            encode_command([&b"SELECT"[..], db.as_bytes()]),
            b"+OK\r\n",
        ));
    }
    if ping {
        commands.push(("PING", encode_command([&b"PING"[..]]), b"+PONG\r\n"));
    }
    if commands.is_empty() {
        return Ok(());
    }
    for (_, bytes, _) in &commands {
        writer.write_all(bytes).await?;
    }
    writer.flush().await?;
    let mut buf = BytesMut::with_capacity(256);
    let mut scanner = ReplyScanner::new();
    for (command, _, expected) in commands {
        let end = loop {
            if let Some(end) = scanner
                .next_reply(&buf)
                .map_err(|_| ConnectError::Malformed)?
            {
                break end;
            }
            if reader.read_buf(&mut buf).await? == 0 {
                return Err(ConnectError::Closed);
            }
        };
        let reply = buf.split_to(end);
        scanner.consumed(end);
        if reply[..] != *expected {
            let reply = String::from_utf8_lossy(&reply).trim_end().to_owned();
            return Err(ConnectError::Rejected { command, reply });
        }
    }
    Ok(())
}
