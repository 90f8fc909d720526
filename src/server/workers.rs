//! The threads that serve clients besides the server's own (`server.threads`): each runs a
//! single-threaded runtime of its own, as the first thread does, so a client, its session and
//! the shared upstream connections it uses all live on one thread. The accept loops hand each
//! new client to a thread in turn (see [`crate::server`]); nothing else about a client needs
//! another thread.

use std::{io, thread::JoinHandle};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::upstream;

/// The serving threads after the first, running until [`Workers::stop`].
#[derive(Debug)]
pub(super) struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    /// Ends the threads: cancelled once every client is gone (or the grace period is over).
    done: CancellationToken,
}

impl Workers {
    /// Starts `count` threads, numbered 1 to `count` (thread 0 is the caller's).
    pub(super) fn start(count: usize) -> io::Result<Workers> {
        let done = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for worker in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let done = done.clone();
            let thread = std::thread::Builder::new()
                .name(format!("redmux-{worker}"))
                .spawn(move || {
                    upstream::enter_worker(worker);
                    // What is spawned on this runtime runs only while it is driven here.
                    runtime.block_on(done.cancelled());
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            threads,
            done,
        })
    }

    /// The runtimes clients are handed to.
    pub(super) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Ends the threads, whatever their runtimes still hold, and waits for them.
    pub(super) async fn stop(self) {
        self.done.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}
