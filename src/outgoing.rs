//! Bytes on their way out to a socket, written with vectored writes. Both directions queue
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

/// Writes as much of `out` as the socket takes in one vectored write, and drops what was written.
pub fn write_some<'a, W: AsyncWrite + Unpin>(
    writer: &'a mut W,
    out: &'a mut VecDeque<Bytes>,
) -> impl Future<Output = io::Result<usize>> + 'a {
    // The slices live on the stack for one poll only, so the future stays two pointers big:
    // it sits in every client's task.
    std::future::poll_fn(move |cx| {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (slot, chunk) in slices.iter_mut().zip(out.iter()) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        // One slice goes through `send`: `writev` costs the kernel more per call (iovec import,
        // fsnotify), and one slice is the common case, a reply or a batch of small requests.
        let polled = match n {
            1 => Pin::new(&mut *writer).poll_write(cx, &slices[0]),
            _ => Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..n]),
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
