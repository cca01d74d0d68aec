//! Durable state in an embedded redb database. Nothing outside this module
//! knows redb exists.
//!
//! Writes go through one writer thread that gathers every request waiting at
//! the moment it starts a transaction into that transaction, so concurrent
//! writers share one sync (group commit). A transaction's mutations are
//! written to the write-ahead log (`store/wal.rs`) and the transaction is
//! committed to redb without a sync; a second thread syncs the log, then
//! publishes the new state to readers and sends the replies, while the
//! writer goes on with the next batch. The database file itself is synced at
//! checkpoints. Readers only ever see published, durable states: point reads
//! on the calling thread, scans on the blocking pool, neither waiting for a
//! writer.

mod codec;
mod error;
mod open;
mod wal;
mod writer;

use std::{
    path::Path,
    sync::{Arc, Mutex, mpsc},
    thread,
};

use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
};
use tokio::sync::oneshot;

pub use codec::Change;
pub use error::{OpenError, StoreError, SubmitError};
use open::{init_schema, recover};
pub use writer::MemberUpdate;
use writer::{Job, Op, Reply};

use crate::token::{Micros, Scope, TokenId, TokenRecord};

/// Token records by token.
const TOKENS: TableDefinition<u128, &[u8]> = TableDefinition::new("tokens");
/// The outstanding PROVISIONED token of each scope that has one.
const SCOPES: TableDefinition<&str, u128> = TableDefinition::new("scopes");
/// The change log, by revision.
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// The tokens that are PENDING, by revision.
const PENDING: TableDefinition<u64, u128> = TableDefinition::new("pending");
/// Schema 1 indexed INSYNC tokens by time for retention; the change log in
/// revision order is that index, since tokens become INSYNC in that order.
const EXPIRY_V1: &str = "expiry";
/// Fleet members by node id: the highest revision each acknowledged.
const MEMBERS: TableDefinition<&str, u64> = TableDefinition::new("members");
/// Counters and the schema version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `META` key of the last revision handed out as of the last purge; later
/// revisions are the keys of `CHANGES` beyond it.
const HEAD: &str = "head_revision";
/// `META` key of the sequence number of the last write-ahead log record that
/// the last checkpoint includes.
const WAL_SEQ: &str = "wal_seq";
/// `META` key of the layout version of the tables above.
const SCHEMA: &str = "schema";
const SCHEMA_VERSION: u64 = 2;

/// Who moves a committed change from PENDING to INSYNC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Settle {
    /// Always the propagation worker: every change is committed PENDING.
    #[default]
    Worker,
    /// The commit itself, when no fleet member is stored and nothing earlier
    /// is PENDING: for a service that stands alone with no propagation delay
    /// and no minimum fleet size, where a change is INSYNC once durable.
    /// Watchers still see PENDING, then INSYNC.
    WhenAlone,
}

/// The last revision handed out: the stored head or the newest change.
fn head_of<M, C>(meta: &M, changes: &C) -> Result<u64, StoreError>
where
    M: ReadableTable<&'static str, u64>,
    C: ReadableTable<u64, &'static [u8]>,
{
    let stored = meta.get(HEAD)?.map_or(0, |v| v.value());
    let newest = changes.last()?.map_or(0, |(k, _)| k.value());
    Ok(stored.max(newest))
}

/// The database file inside the data directory.
pub const DB_FILE: &str = "changetoken.redb";
pub use wal::WAL_FILE;

/// An accepted change.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The token's record after the submission.
    pub record: TokenRecord,
    /// True when this was an identical retry of an earlier submission: nothing
    /// was written and no transition happened.
    pub replay: bool,
}

/// A handle to the database. Clones share the database and its writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    /// The latest durable state, published by the writer.
    published: Arc<Published>,
    /// Closed once every claim on the database file is dropped.
    release: tokio::sync::watch::Sender<()>,
    _claim: Claim,
}

/// A claim on the database file. Every store handle, published state and
/// the writer thread hold one; redb releases the file, and another process
/// or handle may open it, once every claim is dropped. A claim is dropped
/// after whatever it guards, so the release never comes early.
#[derive(Clone)]
struct Claim {
    _held: tokio::sync::watch::Receiver<()>,
}

/// Where the writer publishes the latest durable state for readers.
type Published = Mutex<Arc<Snapshot>>;

/// Open read-only tables of one committed state. The writer publishes one
/// after each batch is durable, and readers share it until the next; it
/// pins that state's pages while in use. Readers see nothing else: redb may
/// already hold a later commit whose log record is not synced yet.
struct Snapshot {
    txn: ReadTransaction,
    tokens: ReadOnlyTable<u128, &'static [u8]>,
    scopes: ReadOnlyTable<&'static str, u128>,
    changes: ReadOnlyTable<u64, &'static [u8]>,
    meta: ReadOnlyTable<&'static str, u64>,
    /// Declared last, so dropped after the transaction.
    _claim: Claim,
}

impl Snapshot {
    /// The latest committed state of `db`.
    fn read(db: &Database, claim: &Claim) -> Result<Snapshot, StoreError> {
        let txn = db.begin_read()?;
        Ok(Snapshot {
            tokens: txn.open_table(TOKENS)?,
            scopes: txn.open_table(SCOPES)?,
            changes: txn.open_table(CHANGES)?,
            meta: txn.open_table(META)?,
            txn,
            _claim: claim.clone(),
        })
    }
}

impl Drop for Inner {
    /// Closing waits for the batch in flight, so the database file is released
    /// when the last handle is gone.
    fn drop(&mut self) {
        drop(self.jobs.lock().ok().and_then(|mut jobs| jobs.take()));
        if let Some(handle) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = handle.join();
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database in `dir`. Fails if another
    /// process has it open.
    pub fn open(dir: &Path, settle: Settle) -> Result<Store, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(OpenError::InUse {
                    path: dir.to_owned(),
                });
            }
            Err(err) => {
                return Err(OpenError::Database {
                    path,
                    source: err.into(),
                });
            }
        };
        let (found, created) = init_schema(&db).map_err(|source| OpenError::Database {
            path: path.clone(),
            source,
        })?;
        if found != SCHEMA_VERSION {
            return Err(OpenError::Schema { path, found });
        }
        let wal_path = dir.join(WAL_FILE);
        if created {
            // A log left beside a deleted database belongs to that database.
            match std::fs::remove_file(&wal_path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(OpenError::Log {
                        path: wal_path,
                        source: err,
                    });
                }
                _ => {}
            }
        }
        let wal = recover(&db, &wal_path)?;
        tracing::debug!(path = %path.display(), "database open");

        let (release, claim) = tokio::sync::watch::channel(());
        let claim = Claim { _held: claim };
        let initial = Snapshot::read(&db, &claim).map_err(|source| OpenError::Replay {
            path: wal_path.clone(),
            source,
        })?;
        let published = Arc::new(Mutex::new(Arc::new(initial)));
        let (tx, rx) = mpsc::channel();
        let writer_published = published.clone();
        // The writer owns the database; redb closes it once the writer is
        // gone and the last published state is dropped.
        let writer_claim = claim.clone();
        let handle = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                writer::run(&db, &writer_claim, wal, settle, rx, writer_published);
                drop(db);
                drop(writer_claim);
            })
            .expect("spawning the store writer thread");
        Ok(Store {
            inner: Arc::new(Inner {
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                published,
                release,
                _claim: claim,
            }),
        })
    }

    /// Completes once the database file is released: every handle to this
    /// store and every state read from it is gone, and the writer has
    /// stopped. A request still running after its connection was cut keeps
    /// the file until it ends.
    pub fn released(&self) -> impl Future<Output = ()> + Send + 'static {
        let release = self.inner.release.clone();
        async move { release.closed().await }
    }

    async fn write(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        {
            let jobs = self.inner.jobs.lock().map_err(|_| StoreError::Closed)?;
            let jobs = jobs.as_ref().ok_or(StoreError::Closed)?;
            jobs.send(Job { op, reply })
                .map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The latest durable state for a point read, on the calling thread.
    /// Point reads touch a handful of cached pages and take microseconds,
    /// less than a hand-off to the blocking pool would cost; they never wait
    /// for a writer. The writer publishes a batch's state before it replies,
    /// so a reply's effects are visible to every later read.
    fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        let published = self
            .inner
            .published
            .lock()
            .map_err(|_| StoreError::Closed)?;
        Ok(published.clone())
    }

    /// Runs a read that may scan or copy much data on the blocking pool,
    /// against the latest durable state.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let snapshot = self.snapshot()?;
        tokio::task::spawn_blocking(move || f(&snapshot.txn))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Returns the scope's outstanding PROVISIONED token, minting and storing a
    /// new one if the scope has none.
    pub async fn provision(&self, scope: &Scope) -> Result<TokenId, StoreError> {
        let snapshot = self.snapshot()?;
        if let Some(token) = snapshot.scopes.get(scope.as_str())? {
            return Ok(TokenId::from_u128(token.value()));
        }
        match self
            .write(Op::Provision {
                scope: scope.clone(),
            })
            .await?
        {
            Reply::Provisioned(token) => Ok(token),
            other => unreachable!("provision answered with {other:?}"),
        }
    }

    /// Moves a PROVISIONED token to PENDING and appends its change at the next
    /// revision, or recognises an identical retry of an earlier submission.
    pub async fn submit(
        &self,
        token: TokenId,
        payload: Vec<u8>,
        description: String,
    ) -> Result<Submitted, SubmitError> {
        match self
            .write(Op::Submit {
                token,
                payload,
                description,
            })
            .await?
        {
            Reply::Submitted(result) => result,
            other => unreachable!("submit answered with {other:?}"),
        }
    }

    /// In one transaction, moves each of `tokens` that is PENDING to INSYNC
    /// and applies the membership updates. Returns the records that moved;
    /// tokens in any other state are left alone.
    pub async fn advance(
        &self,
        tokens: Vec<TokenId>,
        members: Vec<MemberUpdate>,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        match self.write(Op::Advance { tokens, members }).await? {
            Reply::InSync(records) => Ok(records),
            other => unreachable!("advance answered with {other:?}"),
        }
    }

    /// Deletes up to `limit` tokens that became INSYNC before `cutoff`, with
    /// their changes. Returns how many were deleted.
    pub async fn purge(&self, cutoff: Micros, limit: usize) -> Result<usize, StoreError> {
        match self.write(Op::Purge { cutoff, limit }).await? {
            Reply::Purged(n) => Ok(n),
            other => unreachable!("purge answered with {other:?}"),
        }
    }

    /// The token's record, if it exists.
    pub async fn get(&self, token: TokenId) -> Result<Option<TokenRecord>, StoreError> {
        let snapshot = self.snapshot()?;
        let value = snapshot.tokens.get(token.as_u128())?;
        Ok(value
            .map(|v| codec::decode_token(token, v.value()))
            .transpose()?)
    }

    /// The change at `revision`, if the log still holds it.
    pub async fn change(&self, revision: u64) -> Result<Option<Change>, StoreError> {
        self.read(move |txn| {
            let changes = txn.open_table(CHANGES)?;
            let value = changes.get(revision)?;
            Ok(value
                .map(|v| codec::decode_change(v.value()).map(|c| c.to_owned()))
                .transpose()?)
        })
        .await
    }

    /// The latest revision of the change log (0 before the first change).
    pub async fn head(&self) -> Result<u64, StoreError> {
        let snapshot = self.snapshot()?;
        head_of(&snapshot.meta, &snapshot.changes)
    }

    /// The changes after revision `after`, in revision order: at most
    /// `max_count`, and no more after their payloads reach `max_bytes`
    /// (the first change is always included).
    pub async fn changes_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Change)>, StoreError> {
        // Followers at the head of the log ask for one or two fresh changes
        // after every commit: from the shared snapshot on the calling thread,
        // that costs a lookup instead of a read transaction and a hand-off.
        let snapshot = self.snapshot()?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in snapshot.changes.range(after.saturating_add(1)..)? {
            if out.len() == max_count || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
            let (revision, value) = entry?;
            let change = codec::decode_change(value.value())?.to_owned();
            bytes += change.payload.len();
            out.push((revision.value(), change));
        }
        Ok(out)
    }

    /// Every fleet member and the highest revision it acknowledged.
    pub async fn members(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(|txn| {
            let members = txn.open_table(MEMBERS)?;
            let mut out = Vec::new();
            for entry in members.iter()? {
                let (id, acked) = entry?;
                out.push((id.value().to_owned(), acked.value()));
            }
            Ok(out)
        })
        .await
    }

    /// Every PENDING token, in revision order.
    pub async fn pending(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|txn| {
            let pending = txn.open_table(PENDING)?;
            let tokens = txn.open_table(TOKENS)?;
            let mut out = Vec::new();
            for entry in pending.iter()? {
                let token = TokenId::from_u128(entry?.1.value());
                let value = tokens.get(token.as_u128())?.ok_or_else(|| {
                    StoreError::Corrupt(format!("pending token {token} has no record"))
                })?;
                out.push(codec::decode_token(token, value.value())?);
            }
            Ok(out)
        })
        .await
    }
}
