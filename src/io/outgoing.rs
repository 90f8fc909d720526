//! Bytes on their way out to a socket, written with one write a call. Both directions queue
//! `Bytes` rather than copying into one buffer: a client's replies are slices of what upstream
//! sent, and a large request goes upstream as the slice of the client's read buffer it arrived
//! in, not copied again on its way out.

use std::{
    collections::VecDeque,
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    task::Poll,
};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;

/// Slices handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// Writes as much of `out` as the socket takes in one write (vectored for more than one slice),
/// and drops what was written.
pub(crate) fn write_some<'a, W: AsyncWrite + Unpin>(
    writer: &'a mut W,
    out: &'a mut VecDeque<Bytes>,
) -> impl Future<Output = io::Result<usize>> + 'a {
    // The slices live on the stack for one poll only, so the future stays two pointers big:
    // it sits in every client's task.
    std::future::poll_fn(move |cx| {
        // One slice goes through `send`: `writev` costs the kernel more per call (iovec import,
        // fsnotify), and one slice is the common case, a reply or a batch of small requests.
        let polled = if out.len() == 1 {
            Pin::new(&mut *writer).poll_write(cx, &out[0])
        } else {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (slot, chunk) in slices.iter_mut().zip(out.iter()) {
                *slot = IoSlice::new(chunk);
                n += 1;
            }
            Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..n])
        };
        let written = match polled {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(written)) => written,
            other => return other,
        };
        let mut left = written;
        while left > 0 {
            let Some(front) = out.front_mut() else { break };
            if front.len() > left {
                front.advance(left);
                break;
            }
            left -= front.len();
            out.pop_front();
        }
        Poll::Ready(Ok(written))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `limit` bytes a call and records how it was written to.
    #[derive(Default)]
    struct Socket {
        limit: usize,
        taken: Vec<u8>,
        plain: usize,
        vectored: usize,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.plain += 1;
            let n = buf.len().min(self.limit);
            self.taken.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.vectored += 1;
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.limit - n);
                self.taken.extend_from_slice(&buf[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn queue(chunks: &[&'static [u8]]) -> VecDeque<Bytes> {
        chunks.iter().map(|c| Bytes::from_static(c)).collect()
    }

    #[tokio::test]
    async fn partial_writes_leave_exactly_the_unwritten_bytes_queued() {
        let chunks: [&'static [u8]; 4] = [b"+OK\r\n", b"$5\r\nhello\r\n", b":1\r\n", b"*0\r\n"];
        let all: Vec<u8> = chunks.concat();
        for limit in 1..=all.len() {
            let mut socket = Socket {
                limit,
                ..Socket::default()
            };
            let mut out = queue(&chunks);
            while !out.is_empty() {
                let before: usize = out.iter().map(Bytes::len).sum();
                let written = write_some(&mut socket, &mut out).await.unwrap();
                let after: usize = out.iter().map(Bytes::len).sum();
                assert_eq!(before - after, written, "limit {limit}");
            }
            assert_eq!(socket.taken, all, "limit {limit}");
        }
    }

    #[tokio::test]
    async fn one_slice_is_written_plainly_and_several_vectored() {
        let mut socket = Socket {
            limit: 1024,
            ..Socket::default()
        };
        write_some(&mut socket, &mut queue(&[b"+OK\r\n"]))
            .await
            .unwrap();
        assert_eq!((socket.plain, socket.vectored), (1, 0));
        write_some(&mut socket, &mut queue(&[b"+OK\r\n", b":1\r\n"]))
            .await
            .unwrap();
        assert_eq!((socket.plain, socket.vectored), (1, 1));
        assert_eq!(socket.taken, b"+OK\r\n+OK\r\n:1\r\n");
    }

    #[tokio::test]
    async fn a_socket_that_takes_nothing_is_an_error() {
        let mut socket = Socket::default();
        let error = write_some(&mut socket, &mut queue(&[b"+OK\r\n"]))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WriteZero);
    }
}
