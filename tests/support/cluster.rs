//! Talking to Redis Cluster nodes from tests: a blocking RESP2 connection that hands back each
//! reply's raw bytes (the building blocks under test parse those bytes themselves), and a
//! small decoder for the test's own reading of them.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use redmux::resp::{encode_command, ReplyScanner};

/// A blocking connection to one node.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    scanner: ReplyScanner,
}

impl Conn {
    pub fn connect(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to a node");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::new(),
            scanner: ReplyScanner::new(),
        }
    }

    /// Sends one command, returns its reply's bytes.
    pub fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.pipeline(&[args.to_vec()]).remove(0)
    }

    /// `call` with string arguments, the reply decoded.
    pub fn query(&mut self, args: &[&str]) -> Resp {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        parse(&self.call(&args))
    }

    /// Sends many commands, returns their replies' bytes in order. Written in batches, each
    /// read back before the next is written, so neither side's buffers fill up.
    pub fn pipeline(&mut self, commands: &[Vec<&[u8]>]) -> Vec<Vec<u8>> {
        let mut replies = Vec::with_capacity(commands.len());
        for batch in commands.chunks(256) {
            let mut out = Vec::new();
            for args in batch {
                out.extend_from_slice(&encode_command(args.iter().copied()));
            }
            self.stream.write_all(&out).expect("write to a node");
            for _ in batch {
                replies.push(self.read_reply());
            }
        }
        replies
    }

    fn read_reply(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.scanner.next_reply(&self.buf).expect("valid RESP") {
                self.scanner.consumed(end);
                return self.buf.drain(..end).collect();
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).expect("read from a node");
            assert!(n > 0, "the node closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A decoded RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Resp>),
    Null,
}

impl Resp {
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Error(s) => s.clone(),
            Resp::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            Resp::Int(i) => i.to_string(),
            other => panic!("not text: {other:?}"),
        }
    }

    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(items) => items,
            other => panic!("not an array: {other:?}"),
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Resp::Int(i) => *i,
            other => panic!("not an integer: {other:?}"),
        }
    }
}

/// Decodes one complete RESP2 reply.
pub fn parse(bytes: &[u8]) -> Resp {
    let (value, rest) = parse_at(bytes);
    assert!(rest.is_empty(), "trailing bytes after a reply");
    value
}

fn parse_at(bytes: &[u8]) -> (Resp, &[u8]) {
    let line_end = bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a complete line");
    let line = std::str::from_utf8(&bytes[1..line_end]).expect("ASCII header");
    let rest = &bytes[line_end + 2..];
    match bytes[0] {
        b'+' => (Resp::Simple(line.to_string()), rest),
        b'-' => (Resp::Error(line.to_string()), rest),
        b':' => (Resp::Int(line.parse().expect("integer")), rest),
        b'$' => match line.parse::<i64>().expect("length") {
            -1 => (Resp::Null, rest),
            len => {
                let len = len as usize;
                (Resp::Bulk(rest[..len].to_vec()), &rest[len + 2..])
            }
        },
        b'*' => match line.parse::<i64>().expect("count") {
            -1 => (Resp::Null, rest),
            count => {
                let mut items = Vec::new();
                let mut rest = rest;
                for _ in 0..count {
                    let (item, after) = parse_at(rest);
                    items.push(item);
                    rest = after;
                }
                (Resp::Array(items), rest)
            }
        },
        other => panic!("unexpected RESP2 type byte {other:#x}"),
    }
}
