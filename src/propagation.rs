//! The propagation worker: turns PENDING tokens into INSYNC ones and
//! publishes each of those transitions to the hub exactly once.
//!
//! With no fleet, a change is INSYNC once it has been durable for the
//! propagation delay. The worker learns of new changes from the submit path
//! and, at start, of every token left PENDING by an earlier run, so no PENDING
//! token is forgotten across a restart. The store moves a token only if it is
//! still PENDING, and the worker publishes only what the store moved, so a
//! token learned of twice is still published once.

use std::{cmp::Reverse, collections::BinaryHeap, time::Duration};

use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    hub::Hub,
    store::Store,
    token::{TokenId, TokenRecord, now_micros},
};

/// How long the worker waits before retrying after a storage failure.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// The most tokens moved in one store operation.
const MAX_BATCH: usize = 4096;

/// Tells the worker about newly PENDING tokens. Clones share the worker.
#[derive(Clone)]
pub struct Propagation {
    submitted: mpsc::UnboundedSender<TokenRecord>,
}

impl Propagation {
    /// Starts the worker; it stops when `shutdown` is cancelled.
    pub fn spawn(
        store: Store,
        hub: Hub,
        delay: Duration,
        shutdown: CancellationToken,
    ) -> (Propagation, JoinHandle<()>) {
        let (submitted, rx) = mpsc::unbounded_channel();
        let worker = Worker {
            store,
            hub,
            delay,
            due: BinaryHeap::new(),
        };
        let span = tracing::info_span!("propagation", delay = ?delay);
        let handle = tokio::spawn(worker.run(rx, shutdown).instrument(span));
        (Propagation { submitted }, handle)
    }

    /// Hands a token that just became PENDING to the worker.
    pub fn submitted(&self, record: TokenRecord) {
        // The worker only stops at shutdown; a token it misses then is
        // PENDING on disk and is picked up at the next start.
        let _ = self.submitted.send(record);
    }
}

struct Worker {
    store: Store,
    hub: Hub,
    delay: Duration,
    due: BinaryHeap<Reverse<(Instant, u64, TokenId)>>,
}

impl Worker {
    async fn run(
        mut self,
        mut submitted: mpsc::UnboundedReceiver<TokenRecord>,
        shutdown: CancellationToken,
    ) {
        let recovered = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                loaded = self.store.pending() => match loaded {
                    Ok(records) => break records,
                    Err(err) => {
                        tracing::warn!(cause = %err, "cannot load pending tokens; retrying");
                        sleep(RETRY_AFTER).await;
                    }
                }
            }
        };
        if !recovered.is_empty() {
            tracing::info!(count = recovered.len(), "resuming pending tokens");
        }
        for record in recovered {
            self.schedule(&record);
        }

        loop {
            let next_due = self.due.peek().map(|Reverse((at, ..))| *at);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(record) = submitted.recv() => self.schedule(&record),
                _ = sleep_until(next_due.unwrap_or_else(far_future)), if next_due.is_some() => {
                    self.complete_due().await;
                }
            }
        }
        tracing::debug!("propagation worker stopped");
    }

    fn schedule(&mut self, record: &TokenRecord) {
        let due_micros = record
            .pending_at
            .saturating_add(self.delay.as_micros() as u64);
        let wait = Duration::from_micros(due_micros.saturating_sub(now_micros()));
        self.due.push(Reverse((
            Instant::now() + wait,
            record.revision,
            record.token,
        )));
    }

    async fn complete_due(&mut self) {
        let now = Instant::now();
        let mut batch = Vec::new();
        while let Some(Reverse((at, ..))) = self.due.peek() {
            if *at > now || batch.len() == MAX_BATCH {
                break;
            }
            let Reverse((at, revision, token)) = self.due.pop().expect("peeked");
            batch.push((at, revision, token));
        }
        let tokens = batch.iter().map(|&(_, _, token)| token).collect();
        match self.store.mark_insync(tokens).await {
            Ok(moved) => {
                for record in &moved {
                    tracing::debug!(token = %record.token, revision = record.revision, "insync");
                    self.hub.publish(record);
                }
            }
            Err(err) => {
                tracing::warn!(cause = %err, count = batch.len(), "cannot mark tokens insync; retrying");
                let retry_at = Instant::now() + RETRY_AFTER;
                for (_, revision, token) in batch {
                    self.due.push(Reverse((retry_at, revision, token)));
                }
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}
