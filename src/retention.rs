//! Background deletion of tokens that have been INSYNC for longer than the
//! retention period, together with their changes. Nothing else deletes a
//! token. Deletion runs in bounded slices so that it never holds the writer
//! for long.

use std::time::Duration;

use tokio::{task::JoinHandle, time::interval};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{store::Store, token::now_micros};

/// The most tokens deleted in one transaction.
const SLICE: usize = 1000;
/// The longest pause between sweeps.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Starts the sweeper; it stops when `shutdown` is cancelled.
pub fn spawn(store: Store, retention: Duration, shutdown: CancellationToken) -> JoinHandle<()> {
    let every = (retention / 4).clamp(Duration::from_millis(10), MAX_SWEEP_INTERVAL);
    let span = tracing::info_span!("retention", retention = ?retention);
    tokio::spawn(
        async move {
            let mut ticks = interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticks.tick() => sweep(&store, retention).await,
                }
            }
        }
        .instrument(span),
    )
}

async fn sweep(store: &Store, retention: Duration) {
    let cutoff = now_micros().saturating_sub(retention.as_micros() as u64);
    let mut deleted = 0;
    loop {
        match store.purge(cutoff, SLICE).await {
            Ok(n) => {
                deleted += n;
                if n < SLICE {
                    break;
                }
            }
            Err(err) => {
                tracing::warn!(cause = %err, "retention sweep failed; retrying at the next sweep");
                break;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "deleted expired tokens");
    }
}
