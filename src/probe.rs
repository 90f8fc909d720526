//! What `redmux --ping` and `redmux --status` do: one request to a redmux that is running with
//! the same configuration, for container health checks and for operators. Blocking I/O with
//! timeouts: the binary runs this instead of the server, before any runtime exists.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    time::Duration,
};

use crate::{config::Config, resp::encode_command};

/// Most bytes read from a `/status` response.
const MAX_STATUS: u64 = 16 * 1024 * 1024;
/// Time for the metrics endpoint to answer `/status`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("--status needs the metrics endpoint: set [metrics] listen in the configuration")]
    NoEndpoint,
    #[error("no address to connect to: server.listen and server.unix_socket are both unset")]
    NoListener,
    #[error("cannot reach {target}")]
    Unreachable { target: String, source: io::Error },
    #[error("{target} answered {answer:?}")]
    Unexpected { target: String, answer: String },
}

/// Sends PING (after AUTH, when clients must authenticate) to the first address redmux listens
/// on, and expects `+PONG`. Everything must happen within `connect_timeout + request_timeout`,
/// the longest redmux takes to answer a PING, even with Redis down.
pub fn ping(config: &Config) -> Result<(), ProbeError> {
    let timeout = config.upstream.connect_timeout + config.upstream.request_timeout;
    let mut request = Vec::new();
    let mut expected = Vec::new();
    let auth = &config.auth;
    let login = match (&auth.password, auth.users.first()) {
        (Some(password), _) => Some((None, password)),
        (None, Some(user)) => user
            .password
            .as_ref()
            .map(|p| (Some(user.name.as_str()), p)),
        (None, None) => None,
    };
    if let Some((user, password)) = login {
        let args = std::iter::once(&b"AUTH"[..])
            .chain(user.map(str::as_bytes))
            .chain([password.expose().as_bytes()]);
        request.extend_from_slice(&encode_command(args));
        expected.extend_from_slice(b"+OK\r\n");
    }
    request.extend_from_slice(&encode_command([&b"PING"[..]]));
    expected.extend_from_slice(b"+PONG\r\n");
    let lines = expected.iter().filter(|b| **b == b'\n').count();
    let (target, answer) = match (config.server.listen.first(), &config.server.unix_socket) {
        (Some(addr), _) => {
            let addr = reachable(*addr);
            let answer = TcpStream::connect_timeout(&addr, timeout).and_then(|mut stream| {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                exchange(&mut stream, &request, lines)
            });
            (addr.to_string(), answer)
        }
        (None, Some(path)) => {
            let answer = UnixStream::connect(path).and_then(|mut stream| {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                exchange(&mut stream, &request, lines)
            });
            (path.display().to_string(), answer)
        }
        (None, None) => return Err(ProbeError::NoListener),
    };
    let answer = answer.map_err(|source| ProbeError::Unreachable {
        target: target.clone(),
        source,
    })?;
    if answer == expected {
        return Ok(());
    }
    Err(ProbeError::Unexpected {
        target,
        answer: String::from_utf8_lossy(&answer).into_owned(),
    })
}

/// Writes `request` and reads until `lines` lines have come (or the server closed).
fn exchange(stream: &mut (impl Read + Write), request: &[u8], lines: usize) -> io::Result<Vec<u8>> {
    stream.write_all(request)?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 512];
    while answer.iter().filter(|b| **b == b'\n').count() < lines && answer.len() < 64 * 1024 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    Ok(answer)
}

/// Fetches `/status` from the metrics endpoint: the JSON document.
pub fn status(config: &Config) -> Result<String, ProbeError> {
    let addr = reachable(config.metrics.listen.ok_or(ProbeError::NoEndpoint)?);
    let target = format!("http://{addr}/status");
    let unreachable = |source| ProbeError::Unreachable {
        target: target.clone(),
        source,
    };
    let mut stream = TcpStream::connect_timeout(&addr, STATUS_TIMEOUT).map_err(unreachable)?;
    let mut response = Vec::new();
    stream
        .set_read_timeout(Some(STATUS_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STATUS_TIMEOUT)))
        .and_then(|()| {
            write!(
                stream,
                "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
        })
        .and_then(|()| (&mut stream).take(MAX_STATUS).read_to_end(&mut response))
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200 ") => Ok(body.to_owned()),
        _ => Err(ProbeError::Unexpected {
            target,
            answer: text.lines().next().unwrap_or_default().to_owned(),
        }),
    }
}

/// Where a client reaches a server listening on `addr`: a wildcard address (0.0.0.0, [::]) is
/// reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        _ => addr.ip(),
    };
    SocketAddr::new(ip, addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_are_reached_on_loopback() {
        let reach = |a: &str| reachable(a.parse().unwrap()).to_string();
        assert_eq!(reach("0.0.0.0:6380"), "127.0.0.1:6380");
        assert_eq!(reach("[::]:6380"), "[::1]:6380");
        assert_eq!(reach("127.0.0.2:6380"), "127.0.0.2:6380");
    }
}
