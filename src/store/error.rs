//! How opening the store, and its operations, fail.

use std::{path::PathBuf, sync::Arc};

use super::{SCHEMA_VERSION, codec};
use crate::token::{Status, TokenId};

/// Why the data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory does not exist and cannot be created.
    #[error("cannot create data directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why it could not be created.
        source: std::io::Error,
    },
    /// Another process holds the database.
    #[error("data directory {} is in use by another changetoken process", path.display())]
    InUse {
        /// The directory.
        path: PathBuf,
    },
    /// redb refused to open the file.
    #[error("cannot open database {}: {source}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        source: redb::Error,
    },
    /// The write-ahead log cannot be read.
    #[error("cannot read write-ahead log {}: {source}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// What the system reported.
        source: std::io::Error,
    },
    /// The write-ahead log could not be applied to the database.
    #[error("cannot replay write-ahead log {}: {source}", path.display())]
    Replay {
        /// The log file.
        path: PathBuf,
        /// Why the replay failed.
        source: StoreError,
    },
    /// The file was written by a newer, incompatible version.
    #[error("database {} has schema version {found}, this build reads {SCHEMA_VERSION}",
        path.display())]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version it records.
        found: u64,
    },
}

/// A storage operation that failed. Nothing was acknowledged for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The disk or the database refused the operation; it may succeed if retried.
    #[error("storage i/o failed: {0}")]
    Io(Arc<redb::Error>),
    /// The write-ahead log could not be written or synced; it may succeed if
    /// retried, unless the log could not be repaired (then until a restart).
    #[error("write-ahead log i/o failed: {0}")]
    Log(Arc<std::io::Error>),
    /// The database contents are not what this build wrote.
    #[error("storage is corrupt: {0}")]
    Corrupt(String),
    /// The store is shutting down and accepts no more writes.
    #[error("storage is closed")]
    Closed,
}

impl From<redb::Error> for StoreError {
    fn from(err: redb::Error) -> Self {
        match err {
            redb::Error::Corrupted(msg) => StoreError::Corrupt(msg),
            other => StoreError::Io(Arc::new(other)),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(err: $t) -> Self {
                redb::Error::from(err).into()
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl StoreError {
    pub(super) fn log(err: std::io::Error) -> Self {
        StoreError::Log(Arc::new(err))
    }
}

impl From<codec::Corrupt> for StoreError {
    fn from(err: codec::Corrupt) -> Self {
        StoreError::Corrupt(err.to_string())
    }
}

/// Why a change was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// The token was never issued, or retention deleted it.
    #[error("change token {0} does not exist")]
    NotFound(TokenId),
    /// The token was already used for a different change.
    #[error("change token {token} is no longer current: it is {status}")]
    Stale {
        /// The stale token.
        token: TokenId,
        /// Its current status.
        status: Status,
    },
    /// The store failed; the change was not accepted.
    #[error(transparent)]
    Store(#[from] StoreError),
}
