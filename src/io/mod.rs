//! Sockets and the bytes on them, below every connection redmux holds: the socket traits a
//! session reads and writes through ([`Duplex`], [`ReadSide`]), how writes go out
//! ([`outgoing`]), and what a client may be owed at most ([`Budget`]).

pub(crate) mod outgoing;

use std::{
    cell::RefCell,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
};

/// Read size for client sockets.
const READ_CHUNK: usize = 16 * 1024;
/// Size of the buffer a session with nothing buffered reads into (see [`read_arrived`]): large
/// enough that a request with a 16 KiB value arrives in one read, not two.
const SCRATCH_SIZE: usize = 64 * 1024;
/// Most buffer growth reserved at once for a large request.
const MAX_READ_RESERVE: usize = 1024 * 1024;
/// A client socket that can be read and written at once through borrowed halves: for TCP and
/// unix sockets no `Arc`, no lock, and no `shutdown(2)` on drop (a plain close is all Redis does
/// either). A TLS connection (`tls::TlsClient`) shares one TLS state between its halves
/// through a lock, and sends close_notify as it closes.
pub(crate) trait Duplex: Send + 'static {
    type Read<'a>: ReadSide
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    /// Readiness for a parked session (data, or the end): the waker goes into the socket's own
    /// slot, so waiting costs no future of its own (`ReadSide::readable`'s is 168 bytes).
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

/// Reading in two steps, wait for data then read it, so that an idle client holds no read
/// buffer: one is taken only when there is something to put in it.
pub(crate) trait ReadSide: AsyncRead + Unpin + Send {
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// Reads what has arrived into `rbuf`, without waiting: `WouldBlock` when nothing has. Returns
/// the bytes read and whether the socket is drained (the read was short, or found nothing), so
/// that the session may park.
///
/// Through `AsyncRead` rather than `try_read_buf`, because tokio clears the readiness after a
/// short read, and so saves the read that would otherwise return EAGAIN after every request
/// (strace: one per request, a third of the session's syscalls).
///
/// A session with nothing buffered reads into a buffer its thread's sessions share and keeps a
/// copy of what arrived: a request costs an allocation of its own size, and a burst of new
/// clients does not leave `SCRATCH_SIZE` holes in the heap. A read that fills most of the shared
/// buffer takes it over instead of copying.
pub(crate) fn read_arrived(
    reader: &mut impl ReadSide,
    rbuf: &mut BytesMut,
    missing: usize,
    cx: &mut Context<'_>,
) -> std::io::Result<(usize, bool)> {
    let read = |reader: &mut _, buf: &mut BytesMut, cx: &mut Context<'_>| {
        let room = buf.capacity() - buf.len();
        match tokio_util::io::poll_read_buf(Pin::new(reader), cx, buf) {
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
            Poll::Ready(read) => read.map(|n| (n, n < room)),
        }
    };
    if rbuf.is_empty() {
        return SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            scratch.reserve(SCRATCH_SIZE);
            let (n, drained) = read(reader, scratch, cx)?;
            if n >= SCRATCH_SIZE / 2 {
                // The thread allocates a new one next time.
                *rbuf = std::mem::take(scratch);
            } else {
                rbuf.extend_from_slice(scratch);
            }
            Ok((n, drained))
        });
    }
    if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
        // Grow towards a large announced bulk step by step: a header alone must not reserve
        // 512 MB.
        rbuf.reserve(missing.clamp(READ_CHUNK, MAX_READ_RESERVE));
    }
    read(reader, rbuf, cx)
}

thread_local! {
    /// Where a session with nothing buffered reads first (see [`read_arrived`]).
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

macro_rules! read_side {
    ($half:ty) => {
        impl ReadSide for $half {
            fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
                <$half>::readable(self)
            }
        }
    };
}
read_side!(tokio::net::tcp::ReadHalf<'_>);
read_side!(tokio::net::unix::ReadHalf<'_>);

impl Duplex for TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Duplex for UnixStream {
    type Read<'a> = tokio::net::unix::ReadHalf<'a>;
    type Write<'a> = tokio::net::unix::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
}

/// Reply bytes owed to one client and not yet written to it, shared by its session and the
/// actors answering it: a client that does not read is stopped where its replies arrive, so
/// they cannot pile up anywhere past `client_output_limit`, however fast Redis answers. A
/// subscriber's or monitor's feed counts its waiting frames with one too.
#[derive(Debug)]
pub struct Budget {
    owed: AtomicUsize,
    /// Atomic so that a reload can change it for a client already connected.
    limit: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            owed: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    /// Counts `n` more bytes owed; `false` if that goes past the limit.
    pub fn charge(&self, n: usize) -> bool {
        let before = self.owed.fetch_add(n, Ordering::AcqRel);
        before.saturating_add(n) <= self.limit.load(Ordering::Relaxed)
    }

    /// A new limit (`client_output_limit` reloaded), for the bytes charged from now on.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// `n` bytes were written to the client (or dropped).
    pub fn refund(&self, n: usize) {
        self.owed.fetch_sub(n, Ordering::AcqRel);
    }
}
