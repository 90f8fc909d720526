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

/// Connects to `endpoint` and logs in, all within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<(Reader, Writer), ConnectError> {
    tokio::time::timeout(timeout, async {
        let (mut reader, mut writer) = dial(&endpoint.address).await?;
        handshake(endpoint, &mut reader, &mut writer).await?;
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

/// Sends AUTH and SELECT as configured and checks each reply is `+OK`.
async fn handshake(
    endpoint: &Endpoint,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<(), ConnectError> {
    let mut commands: Vec<(&'static str, bytes::Bytes)> = Vec::new();
    if let Some(password) = &endpoint.password {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(user) = &endpoint.username {
            args.push(user.as_bytes());
        }
        args.push(password.expose().as_bytes());
        commands.push(("AUTH", encode_command(args)));
    }
    if endpoint.db != 0 {
        let db = endpoint.db.to_string();
        commands.push(("SELECT", encode_command([&b"SELECT"[..], db.as_bytes()])));
    }
    if commands.is_empty() {
        return Ok(());
    }
    for (_, bytes) in &commands {
        writer.write_all(bytes).await?;
    }
    writer.flush().await?;
    let mut buf = BytesMut::with_capacity(256);
    let mut scanner = ReplyScanner::new();
    for (command, _) in commands {
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
        if &reply[..] != b"+OK\r\n" {
            let reply = String::from_utf8_lossy(&reply).trim_end().to_owned();
            return Err(ConnectError::Rejected { command, reply });
        }
    }
    Ok(())
}
