//! Fan-out of token transitions to watchers.
//!
//! Each watched token has one `watch` channel holding the token's latest
//! record; every watcher of that token holds a receiver. A record carries the
//! time of every state the token has entered, so a watcher that falls behind
//! reconstructs each transition it did not see from the latest record alone:
//! no transition is lost, and a watcher that never reads costs one receiver,
//! whatever happens to the token. Publishing never waits for a watcher.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

use crate::token::{TokenId, TokenRecord};

const SHARDS: usize = 64;

type Channels = HashMap<TokenId, watch::Sender<Option<TokenRecord>>>;

/// The registry of watched tokens. Clones share it.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Mutex<Channels>>,
    hasher: RandomState,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
            }),
        }
    }
}

impl Hub {
    fn shard(&self, token: TokenId) -> MutexGuard<'_, Channels> {
        let index = self.inner.hasher.hash_one(token) as usize % SHARDS;
        // A panic while holding a shard cannot leave the map inconsistent:
        // every critical section is a single map operation.
        self.inner.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts receiving every record published for `token` from now on.
    /// The receiver initially holds no record; publications replace it.
    pub fn subscribe(&self, token: TokenId) -> Subscription {
        let mut shard = self.shard(token);
        let receiver = match shard.get(&token) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(None);
                shard.insert(token, sender);
                receiver
            }
        };
        Subscription {
            hub: self.clone(),
            token,
            receiver: Some(receiver),
        }
    }

    /// Hands `record` to the token's watchers, unless they already hold a
    /// record at least as advanced (a token's status only moves forward).
    pub fn publish(&self, record: &TokenRecord) {
        let shard = self.shard(record.token);
        if let Some(sender) = shard.get(&record.token) {
            sender.send_if_modified(|current| {
                let newer = current.as_ref().is_none_or(|c| c.status < record.status);
                if newer {
                    *current = Some(record.clone());
                }
                newer
            });
        }
    }

    /// How many tokens have at least one watcher.
    pub fn watched_tokens(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }
}

/// One watcher's view of a token. Dropping it unregisters the token once its
/// last watcher is gone.
pub struct Subscription {
    hub: Hub,
    token: TokenId,
    receiver: Option<watch::Receiver<Option<TokenRecord>>>,
}

impl Subscription {
    /// The receiver of the token's latest published record.
    pub fn receiver(&mut self) -> &mut watch::Receiver<Option<TokenRecord>> {
        self.receiver.as_mut().expect("present until drop")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut shard = self.hub.shard(self.token);
        drop(self.receiver.take());
        if shard
            .get(&self.token)
            .is_some_and(|s| s.receiver_count() == 0)
        {
            shard.remove(&self.token);
        }
    }
}
