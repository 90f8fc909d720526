//! What a node's reply means for routing: MOVED (the map is stale: refresh and resend, Redis
//! did not run it), ASK (send ASKING and the command to the target, once), TRYAGAIN (retry
//! with backoff up to a bound); anything else is the answer.

use bytes::Bytes;
use tokio::time::Instant;
use tracing::debug;

use super::{
    combine::split_replies, Job, NodeAddr, Retry, Router, Unit, MAX_REDIRECTS, MAX_TRYAGAIN,
    TRYAGAIN_FIRST,
};
use crate::{
    cluster::redirect::{redirect, Redirect},
    upstream::{Reply, UpstreamError},
};

impl Router {
    /// A node answered `job` (or failed to).
    pub(super) async fn answered(&mut self, node: &NodeAddr, job: Job, reply: Reply) {
        let Job {
            batch,
            unit,
            frames,
            redirects,
            tries,
            asking,
        } = job;
        if !self.batches.contains_key(&batch) {
            return;
        }
        let replies = match reply {
            Ok(replies) => replies,
            Err(error) => {
                self.cluster.refresh_if_lost(&error);
                self.fail(batch, unit, error);
                return self.finish_if_done(batch);
            }
        };
        let (mut bytes, mut errors) = (replies.bytes, replies.errors);
        if asking {
            // ASKING's own +OK.
            match split_replies(&bytes, 1) {
                Some(first) => {
                    let cut = first.first().map_or(0, |&(_, to)| to);
                    bytes = bytes.slice(cut..);
                    errors >>= 1;
                }
                None => {
                    self.fail(batch, unit, UpstreamError::ConnectionLost);
                    return self.finish_if_done(batch);
                }
            }
        }
        match unit {
            Unit::Range { start, len } if errors == 0 && len < 64 => {
                self.fill_range(batch, start, len, bytes, 0);
            }
            Unit::Range { start, len } => {
                let (Some(replies), Some(requests)) =
                    (split_replies(&bytes, len), split_replies(&frames, len))
                else {
                    self.fail(batch, unit, UpstreamError::ConnectionLost);
                    return self.finish_if_done(batch);
                };
                for (k, (&(from, to), &(rfrom, rto))) in replies.iter().zip(&requests).enumerate() {
                    let reply = bytes.slice(from..to);
                    let unit = Unit::Range {
                        start: start + k,
                        len: 1,
                    };
                    let request = frames.slice(rfrom..rto);
                    self.reply_or_redirect(node, batch, unit, request, reply, redirects, tries)
                        .await;
                }
            }
            Unit::Part { .. } => {
                self.reply_or_redirect(node, batch, unit, frames, bytes, redirects, tries)
                    .await;
            }
        }
        self.finish_if_done(batch);
    }

    /// One reply: the client's, or a redirect to follow.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn reply_or_redirect(
        &mut self,
        node: &NodeAddr,
        batch: u64,
        unit: Unit,
        request: Bytes,
        reply: Bytes,
        redirects: u8,
        tries: u8,
    ) {
        match redirect(&reply) {
            Some(Redirect::Moved { slot, host, port }) if redirects < MAX_REDIRECTS => {
                self.cluster.request_refresh();
                let host = Self::host_or(node, host);
                if let Some(to) = self.node(&host, port) {
                    self.moved.insert(slot, to);
                    debug!(slot, %host, port, "MOVED: resending to the new owner");
                    return self
                        .send(to, batch, unit, request, redirects + 1, tries, false)
                        .await;
                }
            }
            Some(Redirect::Ask { host, port, .. }) if redirects < MAX_REDIRECTS => {
                let host = Self::host_or(node, host);
                if let Some(to) = self.node(&host, port) {
                    return self
                        .send(to, batch, unit, request, redirects + 1, tries, true)
                        .await;
                }
            }
            Some(Redirect::TryAgain) if tries < MAX_TRYAGAIN => {
                self.retries.push(Retry {
                    at: Instant::now() + TRYAGAIN_FIRST * (1 << tries),
                    host: node.host.clone(),
                    port: node.port,
                    batch,
                    unit,
                    frames: request,
                    redirects,
                    tries: tries + 1,
                });
                return;
            }
            _ => {}
        }
        match unit {
            Unit::Range { start, .. } => self.fill(batch, start, reply),
            Unit::Part { index, part } => self.fill_part(batch, index, part, reply),
        }
    }

    /// The host a redirect names, or, when Redis left it out (an unknown endpoint), the host
    /// of the node that redirected.
    pub(super) fn host_or(node: &NodeAddr, host: String) -> String {
        match host.is_empty() {
            true => node.host.clone(),
            false => host,
        }
    }

    /// Sends the TRYAGAIN retries that are due.
    pub(super) async fn retry_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Retry>, Vec<Retry>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|r| r.at <= now);
        self.retries = later;
        for retry in due {
            let batch = retry.batch;
            match self.node(&retry.host, retry.port) {
                Some(node) => {
                    self.send(
                        node,
                        batch,
                        retry.unit,
                        retry.frames,
                        retry.redirects,
                        retry.tries,
                        false,
                    )
                    .await
                }
                None => self.fail(batch, retry.unit, UpstreamError::Unavailable),
            }
            self.finish_if_done(batch);
        }
    }
}
