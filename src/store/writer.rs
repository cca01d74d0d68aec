//! The writer thread: applies queued operations in shared transactions.
//!
//! Operations of one batch are applied in arrival order, each seeing the
//! effects of those before it, and all of them are answered only after the
//! batch's commit returned. If anything in the batch fails at the storage
//! level the whole transaction is abandoned and every operation in it gets the
//! error, so no reply ever speaks of state that is not on disk.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    mpsc,
};

use redb::{Database, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::{
    CHANGES, EXPIRY, HEAD, MEMBERS, META, PENDING, SCOPES, StoreError, SubmitError, Submitted,
    TOKENS, codec,
};
use crate::token::{Micros, Scope, Status, TokenId, TokenRecord, now_micros};

/// The most operations one transaction takes, so that a flood of writers
/// still gets answered in bounded slices.
const MAX_BATCH: usize = 4096;

#[derive(Debug)]
pub(super) enum Op {
    Provision {
        scope: Scope,
    },
    Submit {
        token: TokenId,
        payload: Vec<u8>,
        description: String,
    },
    Advance {
        tokens: Vec<TokenId>,
        members: Vec<MemberUpdate>,
    },
    Purge {
        cutoff: Micros,
        limit: usize,
    },
}

/// A change to the stored fleet membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberUpdate {
    /// The node is a member that acknowledged everything up to `acked`.
    Put {
        /// The node's id.
        node: String,
        /// Its highest acknowledged revision.
        acked: u64,
    },
    /// The node is no longer a member.
    Remove {
        /// The node's id.
        node: String,
    },
}

impl MemberUpdate {
    /// Whether the update concerns `node`.
    pub fn is_for(&self, node: &str) -> bool {
        match self {
            MemberUpdate::Put { node: n, .. } | MemberUpdate::Remove { node: n } => n == node,
        }
    }
}

#[derive(Debug)]
pub(super) enum Reply {
    Provisioned(TokenId),
    Submitted(Result<Submitted, SubmitError>),
    InSync(Vec<TokenRecord>),
    Purged(usize),
}

pub(super) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// Runs until every sender is gone. `commits` counts committed batches; it
/// moves after a commit and before that commit's replies are sent.
pub(super) fn run(db: &Database, jobs: mpsc::Receiver<Job>, commits: &AtomicU64) {
    let _span = tracing::debug_span!("store_writer").entered();
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(db, batch, commits);
    }
}

fn commit_batch(db: &Database, batch: Vec<Job>, commits: &AtomicU64) {
    let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|j| (j.op, j.reply)).unzip();
    match apply_all(db, ops) {
        Ok(results) => {
            commits.fetch_add(1, Ordering::Release);
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(err) => {
            tracing::warn!(cause = %err, operations = replies.len(), "write batch failed");
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

fn apply_all(db: &Database, ops: Vec<Op>) -> Result<Vec<Reply>, StoreError> {
    let txn = db.begin_write()?;
    let results = {
        let mut tables = Tables::open(&txn)?;
        let now = now_micros();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(tables.apply(op, now)?);
        }
        results
    };
    txn.commit()?;
    Ok(results)
}

struct Tables<'txn> {
    tokens: Table<'txn, u128, &'static [u8]>,
    scopes: Table<'txn, &'static str, u128>,
    changes: Table<'txn, u64, &'static [u8]>,
    pending: Table<'txn, u64, u128>,
    expiry: Table<'txn, (u64, u64), u128>,
    meta: Table<'txn, &'static str, u64>,
    members: Table<'txn, &'static str, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            tokens: txn.open_table(TOKENS)?,
            scopes: txn.open_table(SCOPES)?,
            changes: txn.open_table(CHANGES)?,
            pending: txn.open_table(PENDING)?,
            expiry: txn.open_table(EXPIRY)?,
            meta: txn.open_table(META)?,
            members: txn.open_table(MEMBERS)?,
        })
    }

    /// Applies one operation. `Err` is a storage failure that dooms the batch;
    /// a rejected submission is an `Ok` reply.
    fn apply(&mut self, op: Op, now: Micros) -> Result<Reply, StoreError> {
        Ok(match op {
            Op::Provision { scope } => Reply::Provisioned(self.provision(&scope, now)?),
            Op::Submit {
                token,
                payload,
                description,
            } => match self.submit(token, &payload, &description, now) {
                // A storage failure part-way through a submission dooms the
                // batch, so no half-applied submission is ever committed.
                Err(SubmitError::Store(err)) => return Err(err),
                outcome => Reply::Submitted(outcome),
            },
            Op::Advance { tokens, members } => {
                self.update_members(&members)?;
                Reply::InSync(self.mark_insync(&tokens, now)?)
            }
            Op::Purge { cutoff, limit } => Reply::Purged(self.purge(cutoff, limit)?),
        })
    }

    fn record(&self, token: TokenId) -> Result<Option<TokenRecord>, StoreError> {
        let value = self.tokens.get(token.as_u128())?;
        Ok(value
            .map(|v| codec::decode_token(token, v.value()))
            .transpose()?)
    }

    fn put_record(&mut self, record: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(
            record.token.as_u128(),
            codec::encode_token(record).as_slice(),
        )?;
        Ok(())
    }

    fn provision(&mut self, scope: &Scope, now: Micros) -> Result<TokenId, StoreError> {
        if let Some(token) = self.scopes.get(scope.as_str())? {
            return Ok(TokenId::from_u128(token.value()));
        }
        let token = loop {
            let candidate = TokenId::generate();
            if self.tokens.get(candidate.as_u128())?.is_none() {
                break candidate;
            }
        };
        self.put_record(&TokenRecord {
            token,
            scope: scope.as_str().to_owned(),
            status: Status::Provisioned,
            revision: 0,
            provisioned_at: now,
            pending_at: 0,
            insync_at: 0,
        })?;
        self.scopes.insert(scope.as_str(), token.as_u128())?;
        Ok(token)
    }

    fn submit(
        &mut self,
        token: TokenId,
        payload: &[u8],
        description: &str,
        now: Micros,
    ) -> Result<Submitted, SubmitError> {
        let Some(mut record) = self.record(token)? else {
            return Err(SubmitError::NotFound(token));
        };
        if record.status != Status::Provisioned {
            let stored = self
                .changes
                .get(record.revision)
                .map_err(StoreError::from)?;
            let stored = stored.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "revision {} of {token} is missing",
                    record.revision
                ))
            })?;
            let change = codec::decode_change(stored.value()).map_err(StoreError::from)?;
            if change.payload == payload && change.description == description {
                return Ok(Submitted {
                    record,
                    replay: true,
                });
            }
            return Err(SubmitError::Stale {
                token,
                status: record.status,
            });
        }

        let revision = self
            .meta
            .get(HEAD)
            .map_err(StoreError::from)?
            .map_or(0, |v| v.value())
            + 1;
        let encoded = codec::encode_change(token, now, description, payload);
        self.changes
            .insert(revision, encoded.as_slice())
            .map_err(StoreError::from)?;
        self.meta.insert(HEAD, revision).map_err(StoreError::from)?;
        self.pending
            .insert(revision, token.as_u128())
            .map_err(StoreError::from)?;
        let outstanding = self
            .scopes
            .get(record.scope.as_str())
            .map_err(StoreError::from)?;
        if outstanding.map(|v| v.value()) == Some(token.as_u128()) {
            self.scopes
                .remove(record.scope.as_str())
                .map_err(StoreError::from)?;
        }
        record.status = Status::Pending;
        record.revision = revision;
        record.pending_at = now;
        self.put_record(&record)?;
        Ok(Submitted {
            record,
            replay: false,
        })
    }

    fn mark_insync(
        &mut self,
        tokens: &[TokenId],
        now: Micros,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let mut moved = Vec::with_capacity(tokens.len());
        for &token in tokens {
            let Some(mut record) = self.record(token)? else {
                continue;
            };
            if record.status != Status::Pending {
                continue;
            }
            record.status = Status::InSync;
            record.insync_at = now;
            self.put_record(&record)?;
            self.pending.remove(record.revision)?;
            self.expiry
                .insert((now, record.revision), token.as_u128())?;
            moved.push(record);
        }
        Ok(moved)
    }

    fn update_members(&mut self, updates: &[MemberUpdate]) -> Result<(), StoreError> {
        for update in updates {
            match update {
                MemberUpdate::Put { node, acked } => {
                    self.members.insert(node.as_str(), *acked)?;
                }
                MemberUpdate::Remove { node } => {
                    self.members.remove(node.as_str())?;
                }
            }
        }
        Ok(())
    }

    fn purge(&mut self, cutoff: Micros, limit: usize) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for entry in self.expiry.range(..(cutoff, 0))?.take(limit) {
            let (key, token) = entry?;
            doomed.push((key.value(), token.value()));
        }
        for &((at, revision), token) in &doomed {
            self.expiry.remove((at, revision))?;
            self.changes.remove(revision)?;
            self.tokens.remove(token)?;
        }
        Ok(doomed.len())
    }
}
