//! The writer thread: applies queued operations in shared transactions.
//!
//! Operations of one batch are applied in arrival order, each seeing the
//! effects of those before it, and all of them are answered only after the
//! batch is committed and durable (its log record synced, or its commit
//! synced as a checkpoint). If anything in the batch fails at the storage
//! level the whole transaction is abandoned and every operation in it gets the
//! error, so no reply ever speaks of state that is not on disk.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
};

use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::{
    CHANGES, Claim, HEAD, MEMBERS, META, PENDING, Published, SCOPES, Settle, Snapshot, StoreError,
    SubmitError, Submitted, TOKENS, WAL_SEQ, codec, head_of,
    wal::{self, Mutation, Syncer, Wal},
};
use crate::token::{Micros, Scope, Status, TokenId, TokenRecord, now_micros};

/// The most operations one transaction takes, so that a flood of writers
/// still gets answered in bounded slices.
const MAX_BATCH: usize = 4096;
/// The most payload bytes one transaction takes (beyond its first
/// operation), which bounds the memory and the log record of a batch.
const MAX_BATCH_BYTES: usize = 64 << 20;

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

impl Op {
    /// Roughly how many bytes applying the operation writes.
    fn size(&self) -> usize {
        match self {
            Op::Submit {
                payload,
                description,
                ..
            } => payload.len() + description.len(),
            _ => 64,
        }
    }
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

/// What the writer tells the syncer, in batch order.
enum Step {
    /// Log record number `n` (counting every append since the start) is
    /// written: sync it now, while the writer commits its batch.
    Appended(u64),
    /// A batch is applied and committed (or failed).
    Applied(Applied),
}

/// A batch applied and committed, waiting for its log record to be synced.
struct Applied {
    replies: Vec<oneshot::Sender<Result<Reply, StoreError>>>,
    outcome: Result<Committed, StoreError>,
}

struct Committed {
    results: Vec<Reply>,
    /// The state after the batch, if it changed anything.
    snapshot: Option<Arc<Snapshot>>,
    /// The number of the batch's log record, if the batch is durable only
    /// once that is synced (it is not when it was a checkpoint or changed
    /// nothing).
    record: Option<u64>,
}

impl Applied {
    fn record(&self) -> Option<u64> {
        self.outcome.as_ref().ok().and_then(|c| c.record)
    }
}

/// Runs until every sender is gone, then checkpoints so that a clean stop
/// leaves an empty log.
///
/// This thread applies and commits batches; a second one syncs the log and
/// then publishes each batch's state and sends its replies, in order. The
/// sync of a batch's record starts as soon as the record is written, so it
/// overlaps the batch's own redb commit and the work on the next batch, and
/// no reader or client learns of a batch before its record is on disk.
pub(super) fn run(
    db: &Database,
    claim: &Claim,
    wal: Wal,
    settle: Settle,
    jobs: mpsc::Receiver<Job>,
    published: Arc<Published>,
) {
    let _span = tracing::debug_span!("store_writer").entered();
    let (steps, steps_rx) = mpsc::channel();
    let syncer = wal.syncer().map(|syncer| {
        thread::Builder::new()
            .name("store-syncer".into())
            .spawn(move || sync_loop(&syncer, steps_rx, &published))
            .expect("spawning the store syncer thread")
    });
    let syncer = match syncer {
        Ok(handle) => handle,
        Err(err) => {
            tracing::error!(cause = %err, "cannot open the write-ahead log for syncing");
            for job in jobs {
                let _ = job.reply.send(Err(StoreError::log(io_error(&err))));
            }
            return;
        }
    };
    let mut writer = Writer {
        db,
        claim,
        wal,
        settle,
        steps,
        appends: 0,
    };
    loop {
        let first = if writer.wal.is_empty() {
            jobs.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            jobs.recv_timeout(writer.wal.checkpoint_in())
        };
        let batch = match first {
            Ok(first) => {
                let mut bytes = first.op.size();
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    match jobs.try_recv() {
                        Ok(job) => {
                            bytes += job.op.size();
                            batch.push(job);
                        }
                        Err(_) => break,
                    }
                }
                batch
            }
            // Idle with records waiting: the checkpoint is due.
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|j| (j.op, j.reply)).unzip();
        let outcome = writer.apply_all(ops, false);
        if let Err(err) = &outcome {
            tracing::warn!(cause = %err, operations = replies.len(), "write batch failed");
        }
        let _ = writer
            .steps
            .send(Step::Applied(Applied { replies, outcome }));
    }
    if !writer.wal.is_empty()
        && let Err(err) = writer.apply_all(Vec::new(), true)
    {
        tracing::warn!(cause = %err, "final checkpoint failed; the next start replays the log");
    }
    let Writer { wal, steps, .. } = writer;
    drop(steps);
    let _ = syncer.join();
    wal.close();
}

fn io_error(err: &std::io::Error) -> std::io::Error {
    std::io::Error::new(err.kind(), err.to_string())
}

/// Syncs the log whenever a record was written since the last sync, then
/// publishes the state of every batch whose record that sync covered and
/// answers it, in batch order. A failed sync fails every batch that needed
/// it, and every later one: the log refuses writes from then on.
fn sync_loop(syncer: &Syncer, steps: mpsc::Receiver<Step>, published: &Published) {
    let mut waiting = VecDeque::new();
    // The highest record written, and the highest one known durable.
    let (mut written, mut synced) = (0, 0);
    let mut failed: Option<StoreError> = None;
    let mut open = true;
    while open || !waiting.is_empty() {
        if written <= synced || failed.is_some() {
            // Nothing to sync: every waiting batch is answered below, so
            // wait for the writer.
            match steps.recv() {
                Ok(step) => take(step, &mut waiting, &mut written),
                Err(_) => open = false,
            }
        }
        for step in steps.try_iter() {
            take(step, &mut waiting, &mut written);
        }
        if written > synced && failed.is_none() {
            let target = written;
            match syncer.sync() {
                Ok(()) => synced = target,
                Err(err) => failed = Some(StoreError::log(err)),
            }
        }
        while let Some(batch) = waiting.front() {
            let durable = batch.record().is_none_or(|n| n <= synced);
            if !durable && failed.is_none() {
                break;
            }
            let Applied { replies, outcome } = waiting.pop_front().expect("a front batch");
            let outcome = match (outcome, &failed) {
                (Ok(_), Some(err)) if !durable => Err(err.clone()),
                (outcome, _) => outcome,
            };
            match outcome {
                Ok(committed) => {
                    if let Some(snapshot) = committed.snapshot
                        && let Ok(mut current) = published.lock()
                    {
                        *current = snapshot;
                    }
                    for (reply, result) in replies.into_iter().zip(committed.results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Err(err) => {
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        }
    }
}

/// Takes in one step. A batch's `Appended` always comes before its `Applied`.
fn take(step: Step, waiting: &mut VecDeque<Applied>, written: &mut u64) {
    match step {
        Step::Appended(n) => *written = (*written).max(n),
        Step::Applied(batch) => waiting.push_back(batch),
    }
}

/// The state of the writer thread.
struct Writer<'a> {
    db: &'a Database,
    claim: &'a Claim,
    wal: Wal,
    settle: Settle,
    steps: mpsc::Sender<Step>,
    /// Log records written since the start, undone ones included, so that a
    /// record's number is never reused.
    appends: u64,
}

impl Writer<'_> {
    /// Applies `ops` in one transaction and commits it: after writing its
    /// log record, whose sync the syncer starts at once, or as a checkpoint
    /// (a synced commit that also records the last log record it includes)
    /// when one is due or `checkpoint` asks for it.
    fn apply_all(&mut self, ops: Vec<Op>, checkpoint: bool) -> Result<Committed, StoreError> {
        let wal = &mut self.wal;
        wal.usable().map_err(StoreError::log)?;
        let checkpoint = checkpoint || wal.checkpoint_due();
        let mut txn = self.db.begin_write()?;
        if checkpoint {
            // The state a crash falls back to records redb's allocator state,
            // so that reopening it need not walk every tree to rebuild that.
            txn.set_quick_repair(true);
        } else {
            txn.set_durability(Durability::None)?;
        }
        let (results, journal) = {
            let mut tables = Tables::open(&txn, self.settle)?;
            let now = now_micros();
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(tables.apply(op, now)?);
            }
            if checkpoint {
                tables.meta.insert(WAL_SEQ, wal.last_seq())?;
            }
            (results, tables.journal)
        };
        let record = if checkpoint {
            txn.commit()?;
            wal.checkpointed();
            None
        } else if journal.is_empty() {
            txn.abort()?;
            return Ok(Committed {
                results,
                snapshot: None,
                record: None,
            });
        } else {
            let mark = wal.append(&journal).map_err(StoreError::log)?;
            self.appends += 1;
            let _ = self.steps.send(Step::Appended(self.appends));
            if let Err(err) = txn.commit() {
                // The syncer may have made the record durable meanwhile; the
                // cut is synced before this batch is answered, and a crash
                // before that leaves a batch that was never answered.
                wal.undo(mark);
                return Err(err.into());
            }
            Some(self.appends)
        };
        Ok(Committed {
            results,
            snapshot: Some(Arc::new(Snapshot::read(self.db, self.claim)?)),
            record,
        })
    }
}

/// Applies the bodies of log records, in order, in `txn`.
pub(super) fn replay(txn: &WriteTransaction, bodies: &[Vec<u8>]) -> Result<(), StoreError> {
    let mut tables = Tables::open(txn, Settle::Worker)?;
    for body in bodies {
        for mutation in wal::decode(body).map_err(|e| StoreError::Corrupt(e.to_string()))? {
            tables.write(mutation)?;
        }
        tables.journal.clear();
    }
    Ok(())
}

struct Tables<'txn> {
    tokens: Table<'txn, u128, &'static [u8]>,
    scopes: Table<'txn, &'static str, u128>,
    changes: Table<'txn, u64, &'static [u8]>,
    pending: Table<'txn, u64, u128>,
    meta: Table<'txn, &'static str, u64>,
    members: Table<'txn, &'static str, u64>,
    /// The last revision handed out, including this transaction's.
    head: u64,
    settle: Settle,
    /// Every mutation applied, encoded for the log.
    journal: Vec<u8>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction, settle: Settle) -> Result<Self, StoreError> {
        let changes = txn.open_table(CHANGES)?;
        let meta = txn.open_table(META)?;
        let head = head_of(&meta, &changes)?;
        Ok(Tables {
            tokens: txn.open_table(TOKENS)?,
            scopes: txn.open_table(SCOPES)?,
            changes,
            pending: txn.open_table(PENDING)?,
            meta,
            members: txn.open_table(MEMBERS)?,
            head,
            settle,
            journal: Vec::new(),
        })
    }

    /// Applies one mutation and records it for the log. Every change to the
    /// tables goes through here, so the log holds all of them.
    fn write(&mut self, mutation: Mutation<'_>) -> Result<(), StoreError> {
        match mutation {
            Mutation::PutToken(key, value) => drop(self.tokens.insert(key, value)?),
            Mutation::DeleteToken(key) => drop(self.tokens.remove(key)?),
            Mutation::PutScope(key, value) => drop(self.scopes.insert(key, value)?),
            Mutation::PutChange(key, value) => drop(self.changes.insert(key, value)?),
            Mutation::DeleteChange(key) => drop(self.changes.remove(key)?),
            Mutation::PutPending(key, value) => drop(self.pending.insert(key, value)?),
            Mutation::DeletePending(key) => drop(self.pending.remove(key)?),
            Mutation::PutMember(key, value) => drop(self.members.insert(key, value)?),
            Mutation::DeleteMember(key) => drop(self.members.remove(key)?),
            Mutation::PutMeta(key, value) => drop(self.meta.insert(key, value)?),
        }
        mutation.encode(&mut self.journal);
        Ok(())
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
        let value = codec::encode_token(record);
        self.write(Mutation::PutToken(record.token.as_u128(), &value))
    }

    fn provision(&mut self, scope: &Scope, now: Micros) -> Result<TokenId, StoreError> {
        if let Some(token) = self.scopes.get(scope.as_str())? {
            return Ok(TokenId::from_u128(token.value()));
        }
        self.mint(scope.as_str(), now)
    }

    /// Stores a new PROVISIONED token as the scope's outstanding one.
    fn mint(&mut self, scope: &str, now: Micros) -> Result<TokenId, StoreError> {
        let token = loop {
            let candidate = TokenId::generate();
            if self.tokens.get(candidate.as_u128())?.is_none() {
                break candidate;
            }
        };
        self.put_record(&TokenRecord {
            token,
            scope: scope.to_owned(),
            status: Status::Provisioned,
            revision: 0,
            provisioned_at: now,
            pending_at: 0,
            insync_at: 0,
        })?;
        self.write(Mutation::PutScope(scope, token.as_u128()))?;
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

        let revision = self.head + 1;
        let encoded = codec::encode_change(token, now, description, payload);
        self.write(Mutation::PutChange(revision, &encoded))?;
        self.head = revision;
        record.status = Status::Pending;
        record.revision = revision;
        record.pending_at = now;
        if self.settles_alone()? {
            record.status = Status::InSync;
            record.insync_at = now;
        } else {
            self.write(Mutation::PutPending(revision, token.as_u128()))?;
        }
        self.put_record(&record)?;
        // The scope's next token is minted with the use of the current one,
        // so that asking for it is a read: once a scope has been written to,
        // GetChangeToken never waits for a commit.
        let outstanding = self
            .scopes
            .get(record.scope.as_str())
            .map_err(StoreError::from)?
            .map(|v| v.value());
        if outstanding == Some(token.as_u128()) {
            self.mint(&record.scope, now)?;
        }
        Ok(Submitted {
            record,
            replay: false,
        })
    }

    /// Whether a change committed now is INSYNC in the same commit: the
    /// store settles alone, no member is stored (so none can be waiting for
    /// it) and nothing earlier is PENDING (so INSYNC keeps revision order).
    fn settles_alone(&self) -> Result<bool, StoreError> {
        Ok(self.settle == Settle::WhenAlone
            && self.members.first()?.is_none()
            && self.pending.first()?.is_none())
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
            self.write(Mutation::DeletePending(record.revision))?;
            moved.push(record);
        }
        Ok(moved)
    }

    fn update_members(&mut self, updates: &[MemberUpdate]) -> Result<(), StoreError> {
        for update in updates {
            match update {
                MemberUpdate::Put { node, acked } => {
                    self.write(Mutation::PutMember(node, *acked))?;
                }
                MemberUpdate::Remove { node } => {
                    self.write(Mutation::DeleteMember(node))?;
                }
            }
        }
        Ok(())
    }

    /// Deletes, oldest revision first, up to `limit` changes whose tokens
    /// became INSYNC before `cutoff`, with their tokens. Tokens become INSYNC
    /// in revision order, so the expired ones are a prefix of the log; the
    /// scan stops at the first change that is not expired.
    fn purge(&mut self, cutoff: Micros, limit: usize) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for entry in self.changes.iter()?.take(limit) {
            let (revision, value) = entry?;
            let token = codec::decode_change(value.value())?.token;
            let record = self.record(token)?.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "revision {} names token {token}, which has no record",
                    revision.value()
                ))
            })?;
            if record.status != Status::InSync || record.insync_at >= cutoff {
                break;
            }
            doomed.push((revision.value(), token));
        }
        if !doomed.is_empty() {
            // The head outlives the changes that show it.
            self.write(Mutation::PutMeta(HEAD, self.head))?;
        }
        for &(revision, token) in &doomed {
            self.write(Mutation::DeleteChange(revision))?;
            self.write(Mutation::DeleteToken(token.as_u128()))?;
        }
        Ok(doomed.len())
    }
}
