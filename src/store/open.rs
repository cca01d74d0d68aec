//! Opening a database: creating or upgrading its tables, and replaying
//! the write-ahead log an unclean stop left behind.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    CHANGES, EXPIRY_V1, MEMBERS, META, OpenError, PENDING, SCHEMA, SCHEMA_VERSION, SCOPES,
    StoreError, TOKENS, WAL_SEQ, wal::Wal, writer,
};

/// Replays the write-ahead log records that the last checkpoint does not
/// include, as a new checkpoint, and returns the log ready for appends.
pub(super) fn recover(db: &Database, path: &Path) -> Result<Wal, OpenError> {
    let replay_error = |source| OpenError::Replay {
        path: path.to_owned(),
        source,
    };
    let checkpoint = (|| {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok::<_, StoreError>(meta.get(WAL_SEQ)?.map_or(0, |v| v.value()))
    })()
    .map_err(replay_error)?;
    let (wal, bodies) = Wal::open(path, checkpoint).map_err(|source| OpenError::Log {
        path: path.to_owned(),
        source,
    })?;
    if !bodies.is_empty() {
        (|| {
            let txn = db.begin_write()?;
            writer::replay(&txn, &bodies)?;
            txn.open_table(META)?.insert(WAL_SEQ, wal.last_seq())?;
            txn.commit()?;
            Ok(())
        })()
        .map_err(replay_error)?;
        tracing::info!(
            records = bodies.len(),
            "replayed the write-ahead log of an unclean stop"
        );
    }
    Ok(wal)
}

/// Creates every table of a new database and brings an older one to the
/// current schema; returns the version found (the current one after an
/// upgrade, a newer one untouched) and whether the database is new.
pub(super) fn init_schema(db: &Database) -> Result<(u64, bool), redb::Error> {
    let txn = db.begin_write()?;
    let found = {
        txn.open_table(TOKENS)?;
        txn.open_table(SCOPES)?;
        txn.open_table(CHANGES)?;
        txn.open_table(PENDING)?;
        txn.open_table(MEMBERS)?;
        let mut meta = txn.open_table(META)?;
        let found = meta.get(SCHEMA)?.map(|v| v.value());
        match found {
            Some(version) if version >= SCHEMA_VERSION => {}
            Some(version) => {
                if version < 2 {
                    // Its entries are recomputed from the change log.
                    let expiry: TableDefinition<(u64, u64), u128> = TableDefinition::new(EXPIRY_V1);
                    txn.delete_table(expiry)?;
                }
                meta.insert(SCHEMA, SCHEMA_VERSION)?;
            }
            None => {
                meta.insert(SCHEMA, SCHEMA_VERSION)?;
            }
        }
        found
    };
    txn.commit()?;
    let version = found.map_or(SCHEMA_VERSION, |v| v.max(SCHEMA_VERSION));
    Ok((version, found.is_none()))
}

#[cfg(test)]
mod tests {
    use redb::TableHandle;

    use super::*;
    use crate::{
        store::{DB_FILE, HEAD, OpenError, Settle, Store},
        token::{Scope, Status},
    };

    /// A database as schema 1 left it: the expiry index, and the head in
    /// `META` beyond every change retention left.
    fn schema_1(path: &Path) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(TOKENS).unwrap();
            txn.open_table(SCOPES).unwrap();
            txn.open_table(CHANGES).unwrap();
            txn.open_table(PENDING).unwrap();
            txn.open_table(MEMBERS).unwrap();
            let mut expiry = txn
                .open_table(TableDefinition::<(u64, u64), u128>::new(EXPIRY_V1))
                .unwrap();
            expiry.insert((1, 7), 9).unwrap();
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(SCHEMA, 1).unwrap();
            meta.insert(HEAD, 7).unwrap();
        }
        txn.commit().unwrap();
    }

    #[tokio::test]
    async fn a_schema_1_database_is_upgraded_and_keeps_its_head() {
        let dir = tempfile::tempdir().unwrap();
        schema_1(&dir.path().join(DB_FILE));
        let store = Store::open(dir.path(), Settle::WhenAlone).unwrap();
        assert_eq!(store.head().await.unwrap(), 7);
        let token = store.provision(&Scope::parse("s").unwrap()).await.unwrap();
        let submitted = store.submit(token, b"x".to_vec(), String::new()).await;
        let record = submitted.unwrap().record;
        assert_eq!((record.revision, record.status), (8, Status::InSync));
        drop(store);

        let db = Database::open(dir.path().join(DB_FILE)).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get(SCHEMA).unwrap().unwrap().value(), SCHEMA_VERSION);
        let names: Vec<_> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(!names.iter().any(|n| n == EXPIRY_V1), "{names:?}");
    }

    #[tokio::test]
    async fn a_database_of_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA, SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(dir.path(), Settle::Worker).err().unwrap();
        assert!(matches!(err, OpenError::Schema { found, .. } if found == SCHEMA_VERSION + 1));
    }
}
