//! The `WatchToken` stream of one watcher.
//!
//! The watcher subscribes to the hub before it reads the token's stored state,
//! so a transition committed after that read is always published to it; one
//! committed before the read is in the state it read, and is skipped when its
//! publication arrives because a token's status only moves forward. The stream
//! ends with OK after INSYNC, and with UNAVAILABLE when the server shuts down.

use std::{collections::VecDeque, pin::Pin};

use futures_util::{Stream, stream};
use prost_types::Timestamp;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    error::ApiError,
    hub::{Hub, Subscription},
    proto::{ChangeTokenStatus, WatchTokenResponse},
    store::Store,
    token::{Micros, Status as TokenStatus, TokenId, TokenRecord},
};

/// The response stream of `WatchToken`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchTokenResponse, Status>> + Send>>;

/// Opens a watch on `token`: fails with `NotFound` if the token does not exist.
pub async fn open(
    hub: &Hub,
    store: &Store,
    token: TokenId,
    shutdown: CancellationToken,
) -> Result<WatchStream, ApiError> {
    let subscription = hub.subscribe(token);
    let record = store.get(token).await?.ok_or(ApiError::NotFound(token))?;
    let mut watcher = Watcher {
        subscription,
        sent: None,
        queue: VecDeque::with_capacity(1),
        shutdown,
        done: false,
    };
    watcher.send_state(&record, record.status);
    Ok(Box::pin(stream::unfold(watcher, Watcher::next)))
}

struct Watcher {
    subscription: Subscription,
    /// The most advanced status already queued for the client.
    sent: Option<TokenStatus>,
    /// Messages not yet taken by the client: at most one per remaining state.
    queue: VecDeque<WatchTokenResponse>,
    shutdown: CancellationToken,
    done: bool,
}

impl Watcher {
    fn send_state(&mut self, record: &TokenRecord, status: TokenStatus) {
        let at = record.entered_at(status).unwrap_or_default();
        self.queue.push_back(WatchTokenResponse {
            change_token: record.token.to_string(),
            change_token_status: proto_status(status) as i32,
            revision: if status >= TokenStatus::Pending {
                record.revision
            } else {
                0
            },
            changed_at: Some(timestamp(at)),
        });
        self.sent = Some(status);
        self.done = status == TokenStatus::InSync;
    }

    /// Queues every state between the last one sent and `record`'s.
    fn catch_up(&mut self, record: &TokenRecord) {
        for status in [TokenStatus::Pending, TokenStatus::InSync] {
            if self.sent.is_none_or(|sent| status > sent) && status <= record.status {
                self.send_state(record, status);
            }
        }
    }

    async fn next(mut self) -> Option<(Result<WatchTokenResponse, Status>, Self)> {
        loop {
            if let Some(message) = self.queue.pop_front() {
                return Some((Ok(message), self));
            }
            if self.done {
                return None;
            }
            let receiver = self.subscription.receiver();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.done = true;
                    return Some((Err(ApiError::ShuttingDown.into()), self));
                }
                changed = receiver.changed() => {
                    if changed.is_err() {
                        self.done = true;
                        return Some((Err(ApiError::ShuttingDown.into()), self));
                    }
                    let latest = receiver.borrow_and_update().clone();
                    if let Some(record) = latest {
                        self.catch_up(&record);
                    }
                }
            }
        }
    }
}

/// The wire form of a status.
pub fn proto_status(status: TokenStatus) -> ChangeTokenStatus {
    match status {
        TokenStatus::Provisioned => ChangeTokenStatus::Provisioned,
        TokenStatus::Pending => ChangeTokenStatus::Pending,
        TokenStatus::InSync => ChangeTokenStatus::Insync,
    }
}

/// A protobuf timestamp from microseconds since the Unix epoch.
pub fn timestamp(micros: Micros) -> Timestamp {
    Timestamp {
        seconds: (micros / 1_000_000) as i64,
        nanos: ((micros % 1_000_000) * 1_000) as i32,
    }
}
