//! The `WatchToken` stream of one watcher.
//!
//! The watcher subscribes to the hub before it reads the token's stored state,
//! so a transition committed after that read is always published to it; one
//! committed before the read is in the state it read, and is ignored when its
//! publication arrives because a token's status only moves forward. The stream
//! ends with OK after INSYNC, and with UNAVAILABLE when the hub closes at
//! server shutdown.
//!
//! The stream keeps the latest state it knows and the last status it sent,
//! and builds each message when the transport asks for it: a watcher that
//! does not read holds no queued messages, only that state.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::Stream;
use prost_types::Timestamp;
use tonic::Status;

use crate::{
    error::ApiError,
    hub::{Hub, Progress, Subscription, Update},
    proto::{ChangeTokenStatus, WatchTokenResponse},
    store::Store,
    token::{Micros, Status as TokenStatus, TokenId},
};

/// Opens a watch on `token`: fails with `NotFound` if the token does not exist.
pub async fn open(hub: &Hub, store: &Store, token: TokenId) -> Result<WatchStream, ApiError> {
    let subscription = hub.subscribe(token);
    let record = store.get(token).await?.ok_or(ApiError::NotFound(token))?;
    Ok(WatchStream {
        subscription,
        latest: Progress::of(&record),
        sent: None,
        closed: false,
        done: false,
    })
}

/// The response stream of `WatchToken`.
pub struct WatchStream {
    subscription: Subscription,
    /// The most advanced state known.
    latest: Progress,
    /// The last status sent; `None` before the first message, which is the
    /// state found at open.
    sent: Option<TokenStatus>,
    /// The hub closed: the stream ends with UNAVAILABLE once the states
    /// already known are sent.
    closed: bool,
    done: bool,
}

impl WatchStream {
    /// The next status to send, if the known state is ahead of what was sent.
    fn next_status(&self) -> Option<TokenStatus> {
        match self.sent {
            None => Some(self.latest.status),
            Some(TokenStatus::Provisioned) if self.latest.status > TokenStatus::Provisioned => {
                Some(TokenStatus::Pending)
            }
            Some(TokenStatus::Pending) if self.latest.status > TokenStatus::Pending => {
                Some(TokenStatus::InSync)
            }
            Some(_) => None,
        }
    }

    fn message(&self, status: TokenStatus) -> WatchTokenResponse {
        WatchTokenResponse {
            change_token: self.latest.token.to_string(),
            change_token_status: proto_status(status) as i32,
            revision: if status >= TokenStatus::Pending {
                self.latest.revision
            } else {
                0
            },
            changed_at: Some(timestamp(self.latest.entered_at(status))),
        }
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchTokenResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(status) = this.next_status() {
                this.sent = Some(status);
                this.done = status == TokenStatus::InSync;
                return Poll::Ready(Some(Ok(this.message(status))));
            }
            if this.closed {
                this.done = true;
                return Poll::Ready(Some(Err(ApiError::ShuttingDown.into())));
            }
            match this.subscription.poll_update(cx) {
                Poll::Ready(Update::Record(record)) => {
                    if record.status > this.latest.status {
                        this.latest = record;
                    }
                }
                Poll::Ready(Update::Closed) => this.closed = true,
                Poll::Pending => return Poll::Pending,
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
