//! Fan-out of token transitions to watchers.
//!
//! Each watched token has one cell holding the token's latest published
//! record and the wakers of the watchers waiting for a newer one. A record
//! carries the time of every state the token has entered, so a watcher that
//! falls behind reconstructs each transition it did not see from the latest
//! record alone: no transition is lost, and a watcher that never reads costs
//! its place in the cell, whatever happens to the token. Publishing never
//! waits for a watcher.
//!
//! A watcher holds no future of its own: it is polled by its stream, finds a
//! newer version of the cell or leaves its waker there. That keeps an idle
//! watcher to a few dozen bytes besides its stream's transport state.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use slab::Slab;

use crate::token::{Status, TokenId, TokenRecord};

const SHARDS: usize = 64;

type Cells = HashMap<TokenId, Arc<Cell>>;

/// The registry of watched tokens. Clones share it.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Mutex<Cells>>,
    hasher: RandomState,
    /// Set once by [`Hub::close`]; cells created after it start closed.
    closed: AtomicBool,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                closed: AtomicBool::new(false),
            }),
        }
    }
}

/// The published state of one watched token.
#[derive(Default)]
struct Cell {
    state: Mutex<CellState>,
}

#[derive(Default)]
struct CellState {
    /// The most advanced record published since the first subscription.
    record: Option<Progress>,
    /// Moves with every publication and with closing; each move wakes and
    /// forgets every waiting watcher.
    version: u64,
    closed: bool,
    /// The watchers of the token, waiting or not.
    watchers: usize,
    /// Wakers of the watchers that saw `version` and wait for the next.
    waiting: Slab<Waker>,
}

/// What a watcher needs of a token's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The token.
    pub token: TokenId,
    /// Its status.
    pub status: Status,
    /// Its change's revision, once PENDING.
    pub revision: u64,
    /// When it entered each state so far (0 for states not entered).
    pub entered: [u64; 3],
}

impl Progress {
    /// The parts of `record` a watcher reports.
    pub fn of(record: &TokenRecord) -> Progress {
        Progress {
            token: record.token,
            status: record.status,
            revision: record.revision,
            entered: [record.provisioned_at, record.pending_at, record.insync_at],
        }
    }

    /// When the token entered `status`.
    pub fn entered_at(&self, status: Status) -> u64 {
        self.entered[status as usize]
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data
    // inconsistent: every critical section is a few field updates.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    fn shard(&self, token: TokenId) -> MutexGuard<'_, Cells> {
        let index = self.inner.hasher.hash_one(token) as usize % SHARDS;
        lock(&self.inner.shards[index])
    }

    /// Starts receiving every record published for `token` from now on.
    pub fn subscribe(&self, token: TokenId) -> Subscription {
        let mut shard = self.shard(token);
        let cell = shard.entry(token).or_default().clone();
        let version = {
            let mut state = lock(&cell.state);
            state.watchers += 1;
            if self.inner.closed.load(Ordering::SeqCst) {
                state.closed = true;
            }
            state.version
        };
        Subscription {
            hub: self.clone(),
            token,
            cell,
            seen: version,
            waiting: None,
        }
    }

    /// Hands `record` to the token's watchers, unless they already hold a
    /// record at least as advanced (a token's status only moves forward).
    pub fn publish(&self, record: &TokenRecord) {
        let Some(cell) = self.shard(record.token).get(&record.token).cloned() else {
            return;
        };
        let wakers = {
            let mut state = lock(&cell.state);
            if state
                .record
                .is_some_and(|current| current.status >= record.status)
            {
                return;
            }
            state.record = Some(Progress::of(record));
            state.version += 1;
            std::mem::take(&mut state.waiting)
        };
        wakers.into_iter().for_each(|(_, waker)| waker.wake());
    }

    /// Ends every subscription, present and future: each one's next poll
    /// reports the hub closed. Used at shutdown.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        for shard in &self.inner.shards {
            let cells: Vec<_> = lock(shard).values().cloned().collect();
            for cell in cells {
                let wakers = {
                    let mut state = lock(&cell.state);
                    state.closed = true;
                    state.version += 1;
                    std::mem::take(&mut state.waiting)
                };
                wakers.into_iter().for_each(|(_, waker)| waker.wake());
            }
        }
    }
}

/// What a subscription's poll found.
#[derive(Debug, PartialEq, Eq)]
pub enum Update {
    /// A record newer than the last one this subscription returned.
    Record(Progress),
    /// The hub closed.
    Closed,
}

/// One watcher's view of a token. Dropping it unregisters the token once its
/// last watcher is gone.
pub struct Subscription {
    hub: Hub,
    token: TokenId,
    cell: Arc<Cell>,
    /// The cell version this subscription last looked at.
    seen: u64,
    /// Its waker's key in the cell, valid while the version is `seen`.
    waiting: Option<usize>,
}

impl Subscription {
    /// The latest record if one was published since the last call, or
    /// `Closed`; otherwise registers the task to be woken by the next
    /// publication.
    pub fn poll_update(&mut self, cx: &mut Context<'_>) -> Poll<Update> {
        let mut state = lock(&self.cell.state);
        if state.version != self.seen {
            // The publication that moved the version forgot every waker.
            self.waiting = None;
            self.seen = state.version;
            if let Some(record) = state.record {
                return Poll::Ready(Update::Record(record));
            }
        }
        if state.closed {
            return Poll::Ready(Update::Closed);
        }
        match self.waiting.and_then(|key| state.waiting.get_mut(key)) {
            Some(waker) => waker.clone_from(cx.waker()),
            None => self.waiting = Some(state.waiting.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut shard = self.hub.shard(self.token);
        let mut state = lock(&self.cell.state);
        if state.version == self.seen
            && let Some(key) = self.waiting
        {
            state.waiting.try_remove(key);
        }
        state.watchers -= 1;
        if state.watchers == 0 {
            drop(state);
            shard.remove(&self.token);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::AtomicUsize,
        task::{Wake, Waker},
    };

    use super::*;

    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn record(token: TokenId, status: Status) -> TokenRecord {
        TokenRecord {
            token,
            scope: String::new(),
            status,
            revision: 7,
            provisioned_at: 1,
            pending_at: 2,
            insync_at: if status == Status::InSync { 3 } else { 0 },
        }
    }

    #[test]
    fn a_waiting_watcher_is_woken_once_and_sees_only_newer_records() {
        let hub = Hub::default();
        let token = TokenId::generate();
        let mut sub = hub.subscribe(token);
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        // Polled twice while idle: one registration, not two.
        assert_eq!(sub.poll_update(&mut cx), Poll::Pending);
        assert_eq!(sub.poll_update(&mut cx), Poll::Pending);
        assert_eq!(lock(&sub.cell.state).waiting.len(), 1);

        hub.publish(&record(token, Status::Pending));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        let Poll::Ready(Update::Record(seen)) = sub.poll_update(&mut cx) else {
            panic!("no record after a publication");
        };
        assert_eq!(seen.status, Status::Pending);
        // An older or equal status changes nothing.
        hub.publish(&record(token, Status::Pending));
        assert_eq!(sub.poll_update(&mut cx), Poll::Pending);
        hub.publish(&record(token, Status::InSync));
        let Poll::Ready(Update::Record(seen)) = sub.poll_update(&mut cx) else {
            panic!("no record after INSYNC");
        };
        assert_eq!(
            (seen.status, seen.entered_at(Status::InSync)),
            (Status::InSync, 3)
        );
    }

    #[test]
    fn the_last_watcher_to_leave_removes_the_token_and_close_ends_everyone() {
        let hub = Hub::default();
        let token = TokenId::generate();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut a = hub.subscribe(token);
        let b = hub.subscribe(token);
        assert_eq!(a.poll_update(&mut cx), Poll::Pending);
        drop(b);
        assert_eq!(hub.shard(token).len(), 1);
        hub.close();
        assert_eq!(a.poll_update(&mut cx), Poll::Ready(Update::Closed));
        let mut late = hub.subscribe(token);
        assert_eq!(late.poll_update(&mut cx), Poll::Ready(Update::Closed));
        drop((a, late));
        assert!(hub.shard(token).is_empty());
    }
}
