//! The propagation worker: decides when PENDING tokens are INSYNC, persists
//! fleet membership, and publishes each INSYNC transition to the hub exactly
//! once.
//!
//! The worker owns the [`Fleet`] and the set of PENDING tokens. It learns of
//! new changes from the submit path, of nodes from the Sync streams, and at
//! start, of every token left PENDING and every member persisted by an earlier
//! run. A token moves only if the store still has it PENDING, and the worker
//! publishes only what the store moved, so a token learned of twice is still
//! published once. Membership changes are durable before a node is welcomed;
//! acknowledgements are persisted with the next transition or within
//! [`FLUSH_EVERY`], and a node that reconnects reports its own progress anyway.

use std::{collections::BTreeMap, time::Duration};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Instant, sleep, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    error::ApiError,
    fleet::{Fleet, NodeView, Watermark},
    hub::Hub,
    store::{MemberUpdate, Store, StoreError},
    token::{Micros, Status, TokenId, TokenRecord, now_micros},
};

/// How long the worker waits before retrying after a storage failure.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// The longest an acknowledgement stays only in memory.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The most tokens moved in one store operation.
const MAX_BATCH: usize = 4096;

/// How the worker decides.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// With no fleet, how long a change stays PENDING.
    pub delay: Duration,
    /// How long a disconnected member keeps blocking.
    pub member_timeout: Duration,
    /// The fewest members that must acknowledge a change.
    pub min_fleet_size: usize,
}

/// The fleet as operators see it.
#[derive(Clone, Debug)]
pub struct FleetView {
    /// The latest revision of the log.
    pub head: u64,
    /// Every member, ordered by id.
    pub nodes: Vec<NodeView>,
}

enum Event {
    Submitted(TokenRecord),
    Join {
        node: String,
        acked: u64,
        connection: u64,
        kick: CancellationToken,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Ack {
        node: String,
        connection: u64,
        revision: u64,
    },
    Left {
        node: String,
        connection: u64,
    },
    List {
        reply: oneshot::Sender<FleetView>,
    },
}

/// A handle to the worker. Clones share it.
#[derive(Clone)]
pub struct Propagation {
    events: mpsc::UnboundedSender<Event>,
    head: std::sync::Arc<watch::Sender<u64>>,
}

impl Propagation {
    /// Starts the worker; it stops when `shutdown` is cancelled.
    pub fn spawn(
        store: Store,
        hub: Hub,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> (Propagation, JoinHandle<()>) {
        let (events, rx) = mpsc::unbounded_channel();
        let (head, _) = watch::channel(0);
        let worker = Worker {
            store,
            hub,
            settings,
            pending: BTreeMap::new(),
            fleet: Fleet::restore(Vec::new(), settings.member_timeout, settings.min_fleet_size),
            head: 0,
            retry_at: None,
            last_flush: Instant::now(),
            unsaved: Vec::new(),
        };
        let span = tracing::info_span!("propagation");
        let handle = tokio::spawn(worker.run(rx, shutdown).instrument(span));
        let head = std::sync::Arc::new(head);
        (Propagation { events, head }, handle)
    }

    /// Hands a token whose change was just committed to the worker, unless
    /// the commit already made it INSYNC, and wakes the Sync streams waiting
    /// for the next change.
    pub fn submitted(&self, record: TokenRecord) {
        let revision = record.revision;
        // The worker only stops at shutdown; a token it misses then is
        // PENDING on disk and is picked up at the next start.
        if record.status == Status::Pending {
            let _ = self.events.send(Event::Submitted(record));
        }
        self.head.send_if_modified(|head| {
            let newer = revision > *head;
            if newer {
                *head = revision;
            }
            newer
        });
    }

    /// A receiver that changes whenever a new change is committed.
    pub fn head_changes(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Makes `node` a member that applied everything up to `acked`, durably,
    /// on connection `connection`; a previous connection is cancelled.
    pub async fn join(
        &self,
        node: String,
        acked: u64,
        connection: u64,
        kick: CancellationToken,
    ) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        let event = Event::Join {
            node,
            acked,
            connection,
            kick,
            reply,
        };
        self.events
            .send(event)
            .map_err(|_| ApiError::ShuttingDown)?;
        Ok(rx.await.map_err(|_| ApiError::ShuttingDown)??)
    }

    /// Records that `node` applied everything up to `revision`.
    pub fn ack(&self, node: &str, connection: u64, revision: u64) {
        let _ = self.events.send(Event::Ack {
            node: node.to_owned(),
            connection,
            revision,
        });
    }

    /// Records that a node's connection ended.
    pub fn left(&self, node: &str, connection: u64) {
        let _ = self.events.send(Event::Left {
            node: node.to_owned(),
            connection,
        });
    }

    /// The members and the head of the log.
    pub async fn fleet(&self) -> Result<FleetView, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::List { reply })
            .map_err(|_| ApiError::ShuttingDown)?;
        rx.await.map_err(|_| ApiError::ShuttingDown)
    }
}

struct Worker {
    store: Store,
    hub: Hub,
    settings: Settings,
    /// PENDING tokens by revision, with the time they became PENDING.
    pending: BTreeMap<u64, (TokenId, Micros)>,
    fleet: Fleet,
    head: u64,
    retry_at: Option<Instant>,
    last_flush: Instant,
    /// Membership updates whose write failed, to be written with the next.
    unsaved: Vec<MemberUpdate>,
}

impl Worker {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        shutdown: CancellationToken,
    ) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = self.recover() => {}
        }
        loop {
            self.advance().await;
            let wake = self.next_wake();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => {
                    let Some(event) = event else { break };
                    self.handle(event).await;
                    while let Ok(event) = events.try_recv() {
                        self.handle(event).await;
                    }
                }
                _ = sleep_until(wake.unwrap_or_else(far_future)), if wake.is_some() => {}
            }
        }
        tracing::debug!("propagation worker stopped");
    }

    /// Loads what an earlier run left, retrying until the store answers.
    async fn recover(&mut self) {
        loop {
            let loaded = async {
                Ok::<_, StoreError>((
                    self.store.pending().await?,
                    self.store.members().await?,
                    self.store.head().await?,
                ))
            };
            match loaded.await {
                Ok((pending, members, head)) => {
                    if !pending.is_empty() || !members.is_empty() {
                        tracing::info!(
                            pending = pending.len(),
                            members = members.len(),
                            "resuming pending tokens and fleet members"
                        );
                    }
                    for record in pending {
                        self.pending
                            .insert(record.revision, (record.token, record.pending_at));
                    }
                    let s = self.settings;
                    self.fleet = Fleet::restore(members, s.member_timeout, s.min_fleet_size);
                    self.head = head;
                    return;
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot load pending tokens; retrying");
                    sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Submitted(record) => {
                self.head = self.head.max(record.revision);
                self.pending
                    .insert(record.revision, (record.token, record.pending_at));
            }
            Event::Join {
                node,
                acked,
                connection,
                kick,
                reply,
            } => {
                let update = self.fleet.join(&node, acked, connection, kick);
                self.unsaved.retain(|u| !u.is_for(&node));
                let result = self.store.advance(Vec::new(), vec![update]).await.map(drop);
                if result.is_ok() {
                    tracing::info!(node, acked, "node joined");
                }
                let _ = reply.send(result);
            }
            Event::Ack {
                node,
                connection,
                revision,
            } => {
                self.fleet.ack(&node, connection, revision);
            }
            Event::Left { node, connection } => {
                self.fleet.left(&node, connection);
                tracing::info!(node, "node disconnected");
            }
            Event::List { reply } => {
                let _ = reply.send(FleetView {
                    head: self.head,
                    nodes: self.fleet.view(),
                });
            }
        }
    }

    /// The tokens that may be INSYNC now, in revision order.
    fn eligible(&self) -> Vec<TokenId> {
        match self.fleet.watermark() {
            Watermark::Blocked => Vec::new(),
            Watermark::UpTo(revision) => self
                .pending
                .range(..=revision)
                .take(MAX_BATCH)
                .map(|(_, (t, _))| *t)
                .collect(),
            // Tokens become PENDING in revision order, so the due ones are a
            // prefix of the map.
            Watermark::Standalone => {
                let now = now_micros();
                self.pending
                    .values()
                    .take_while(|(_, at)| self.due(*at) <= now)
                    .take(MAX_BATCH)
                    .map(|(t, _)| *t)
                    .collect()
            }
        }
    }

    /// When a token that became PENDING at `pending_at` is due alone.
    fn due(&self, pending_at: Micros) -> Micros {
        pending_at.saturating_add(self.settings.delay.as_micros() as u64)
    }

    /// Drops expired members, then moves every eligible token to INSYNC and
    /// persists membership changes, in one store operation.
    async fn advance(&mut self) {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let mut updates = std::mem::take(&mut self.unsaved);
        for node in self.fleet.expire(Instant::now().into_std()) {
            tracing::warn!(node, timeout = ?self.settings.member_timeout,
                "member disconnected for longer than the member timeout; dropped from the fleet");
            updates.push(MemberUpdate::Remove { node });
        }
        let tokens = self.eligible();
        let flush_due = self.fleet.has_dirty() && self.last_flush.elapsed() >= FLUSH_EVERY;
        let retrying = self.retry_at.is_some();
        if tokens.is_empty() && updates.is_empty() && !flush_due && !retrying {
            return;
        }
        if !tokens.is_empty() || flush_due {
            updates.extend(self.fleet.take_dirty());
            self.last_flush = Instant::now();
        }
        match self.store.advance(tokens.clone(), updates.clone()).await {
            Ok(moved) => {
                self.retry_at = None;
                let done: std::collections::HashSet<_> = tokens.into_iter().collect();
                self.pending.retain(|_, (token, _)| !done.contains(token));
                for record in &moved {
                    tracing::debug!(token = %record.token, revision = record.revision, "insync");
                    self.hub.publish(record);
                }
            }
            Err(err) => {
                tracing::warn!(cause = %err, "cannot record fleet progress; retrying");
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                self.unsaved = updates;
            }
        }
    }

    /// When something may next become due without an event.
    fn next_wake(&self) -> Option<Instant> {
        let mut wake = self.retry_at;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
            }
        };
        consider(self.fleet.next_expiry().map(Instant::from_std));
        if self.fleet.has_dirty() {
            consider(Some(self.last_flush + FLUSH_EVERY));
        }
        if self.fleet.watermark() == Watermark::Standalone
            && let Some((_, at)) = self.pending.values().next()
        {
            let wait = Duration::from_micros(self.due(*at).saturating_sub(now_micros()));
            consider(Some(Instant::now() + wait));
        }
        wake
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}
