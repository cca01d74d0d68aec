//! Counts of answered RPCs by method and outcome, logged when the server
//! stops so that load tests can check on the server side what succeeded.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tonic::Status;

/// The counted methods.
#[derive(Clone, Copy, Debug)]
pub enum Method {
    /// `GetChangeToken`.
    GetChangeToken,
    /// `GetChangeTokenStatus`.
    GetChangeTokenStatus,
    /// `SubmitChange`.
    SubmitChange,
    /// `WatchToken` (counted when the stream opens or is refused).
    WatchToken,
}

const METHODS: usize = 4;

/// Shared counters. Clones count into the same totals.
#[derive(Clone, Default)]
pub struct Stats {
    ok: Arc<[AtomicU64; METHODS]>,
    failed: Arc<[AtomicU64; METHODS]>,
}

impl Stats {
    /// Counts `result` under `method` and passes it on.
    pub fn count<T>(&self, method: Method, result: Result<T, Status>) -> Result<T, Status> {
        let counters = if result.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        counters[method as usize].fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Logs the totals at `info`.
    pub fn log(&self) {
        let ok = |m: Method| self.ok[m as usize].load(Ordering::Relaxed);
        let failed = |m: Method| self.failed[m as usize].load(Ordering::Relaxed);
        tracing::info!(
            get_change_token_ok = ok(Method::GetChangeToken),
            get_change_token_failed = failed(Method::GetChangeToken),
            status_ok = ok(Method::GetChangeTokenStatus),
            status_failed = failed(Method::GetChangeTokenStatus),
            submit_ok = ok(Method::SubmitChange),
            submit_failed = failed(Method::SubmitChange),
            watch_ok = ok(Method::WatchToken),
            watch_failed = failed(Method::WatchToken),
            "requests served"
        );
    }
}
