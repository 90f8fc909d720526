//! What a node's reply means for routing: MOVED (the map is stale: refresh and resend, Redis
//! did not run it), ASK (send ASKING and the command to the target, once), TRYAGAIN (retry
//! with backoff up to a bound); anything else is the answer.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::debug;

use super::{
    combine::split_replies, Job, NodeAddr, Retry, Router, Unit, MAX_REDIRECTS, MAX_TRYAGAIN,
    TRYAGAIN_FIRST,
};
use crate::{
    cluster::{
        keys::{self, SlotOf},
        redirect::{followable, redirect, scripted, Redirect},
    },
    upstream::{Reply, UpstreamError},
};

impl Router {
    /// A node answered `job` (or failed to).
    pub(super) async fn answered(&mut self, node: &Arc<NodeAddr>, job: Job, reply: Reply) {
        // A fence's answer: everything the node was sent before it is answered; dropping the
        // job opens its gate.
        if matches!(job.unit, Unit::Fence) || !self.batches.contains_key(&job.batch) {
            return;
        }
        let replies = match reply {
            Ok(replies) => replies,
            Err(error) => {
                self.cluster.refresh_if_lost(&error);
                self.fail(&job, error);
                return self.finish_if_done(job.batch);
            }
        };
        let batch = job.batch;
        let (mut bytes, mut errors) = (replies.bytes, replies.errors);
        if job.asking {
            // ASKING's own +OK.
            match split_replies(&bytes, 1) {
                Some(first) => {
                    let cut = first.first().map_or(0, |&(_, to)| to);
                    bytes = bytes.slice(cut..);
                    errors >>= 1;
                }
                None => {
                    self.fail(&job, UpstreamError::ConnectionLost);
                    return self.finish_if_done(batch);
                }
            }
        }
        let len = job.len();
        match job.unit {
            Unit::Range { start, len } if errors == 0 && len < 64 => {
                self.fill_range(batch, start, len, bytes, 0);
            }
            Unit::Picked if errors == 0 && len < 64 => {
                let Some(replies) = split_replies(&bytes, len) else {
                    self.fail(&job, UpstreamError::ConnectionLost);
                    return self.finish_if_done(batch);
                };
                for (&index, &(from, to)) in job.picks.iter().zip(&replies) {
                    self.fill_range(batch, index, 1, bytes.slice(from..to), 0);
                }
            }
            Unit::Range { .. } | Unit::Picked | Unit::Parts { .. } => {
                let (Some(replies), Some(requests)) =
                    (split_replies(&bytes, len), split_replies(&job.frames, len))
                else {
                    self.fail(&job, UpstreamError::ConnectionLost);
                    return self.finish_if_done(batch);
                };
                for (k, (&(from, to), &(rfrom, rto))) in replies.iter().zip(&requests).enumerate() {
                    let one = Job {
                        batch,
                        unit: job.unit_of(k),
                        frames: job.frames.slice(rfrom..rto),
                        redirects: job.redirects,
                        tries: job.tries,
                        asking: false,
                        hold: job.hold.clone(),
                        picks: Vec::new(),
                    };
                    self.reply_or_redirect(node, one, bytes.slice(from..to))
                        .await;
                }
            }
            Unit::Part { .. } => {
                let job = Job {
                    asking: false,
                    ..job
                };
                self.reply_or_redirect(node, job, bytes).await;
            }
            Unit::Fence => {}
        }
        self.finish_if_done(batch);
    }

    /// The reply to `job`, one request: the client's, or a redirect to follow.
    pub(super) async fn reply_or_redirect(
        &mut self,
        node: &Arc<NodeAddr>,
        mut job: Job,
        reply: Bytes,
    ) {
        let first = job.redirects == 0;
        let topology = &self.topology;
        let from = (node.host.as_str(), node.port);
        let redirect = redirect(&reply).map(|r| r.or_host(from.0)).filter(|r| {
            followable(&job.frames, r, from, first, |host, port| {
                topology.as_ref().is_some_and(|t| t.knows(host, port))
            })
        });
        match redirect {
            Some(Redirect::Moved { slot, host, port }) if job.redirects < MAX_REDIRECTS => {
                if let Some(to) = self.node(&host, port) {
                    // A script's redirect may be its own text: it moves only this request,
                    // never the slot's other requests, and says nothing of the map.
                    if !scripted(&job.frames) {
                        // Where the slot's requests go changes: no session sends past the
                        // router until the next map.
                        self.withdraw();
                        self.cluster.request_refresh();
                        // What went to the slot's node so far must run before what goes to
                        // the new one from now on.
                        if let Some(before) = self.sent_to(slot).filter(|&before| before != to) {
                            self.fence(before, vec![slot]).await;
                        }
                        self.moved.insert(slot, to);
                    }
                    debug!(slot, %host, port, "MOVED: resending to the new owner");
                    job.redirects += 1;
                    return self.send(to, job).await;
                }
            }
            Some(Redirect::Ask { host, port, .. }) if job.redirects < MAX_REDIRECTS => {
                if let Some(to) = self.node(&host, port) {
                    job.redirects += 1;
                    job.asking = true;
                    return self.send(to, job).await;
                }
            }
            Some(Redirect::TryAgain) if job.tries < MAX_TRYAGAIN => {
                // Its client's later requests for its slot wait until it has its answer.
                self.withdraw();
                if job.hold.is_none() {
                    if let SlotOf::One(slot) = keys::keys(&job.frames).slot() {
                        let client = self.batches.get(&job.batch).map(|b| b.budget.clone());
                        job.hold = Some(self.holds.gate([slot], Some(client.flatten())));
                    }
                }
                let at = Instant::now() + TRYAGAIN_FIRST * (1 << job.tries);
                job.tries += 1;
                self.next_retry += 1;
                let retry = Retry {
                    node: node.clone(),
                    job,
                };
                self.retries.insert((at, self.next_retry), retry);
                return;
            }
            _ => {}
        }
        match job.unit {
            Unit::Range { start, .. } => self.fill(job.batch, start, reply),
            Unit::Picked => self.fill(job.batch, job.index(0), reply),
            Unit::Part { index, part } => self.fill_part(job.batch, index, part, reply),
            // Taken apart by `answered`: each part comes here as a job of its own.
            Unit::Parts { .. } | Unit::Fence => {}
        }
    }

    /// Sends the TRYAGAIN retries that are due.
    pub(super) async fn retry_due(&mut self) {
        let now = Instant::now();
        let later = self.retries.split_off(&(now, u64::MAX));
        let due = std::mem::replace(&mut self.retries, later);
        for Retry { node, job } in due.into_values() {
            let batch = job.batch;
            match self.node(&node.host, node.port) {
                Some(node) => self.send(node, job).await,
                None => self.fail(&job, UpstreamError::Unavailable),
            }
            self.finish_if_done(batch);
        }
    }
}
