//! The write-ahead log: each batch's mutations, written before the batch is
//! committed to the database without a sync of its own, and synced (by the
//! [`Syncer`], while the next batch is applied) before the batch is answered
//! or its state shown to any reader.
//!
//! A redb commit that syncs writes every page its B-trees dirtied plus redb's
//! own bookkeeping, tens of kilobytes even for one small change; a log record
//! is the bytes that changed, usually one page. So the database is synced
//! only at checkpoints (at most [`CHECKPOINT_AFTER`] after the first record
//! since the last one, or once the log holds [`CHECKPOINT_BYTES`]), and the
//! log holds every batch committed since. After a crash, redb is back at its
//! last checkpoint, which recorded the sequence number of the last record it
//! includes; replaying the records after it, in order, restores exactly the
//! acknowledged state.
//!
//! Records are `[body length: u32][crc32 of seq and body: u32][seq: u64][body]`,
//! little-endian. After a checkpoint the file is overwritten from the start
//! rather than truncated, so an append changes no file metadata once the file
//! has reached its working size, and a sync is one data write. The valid log
//! is therefore the run of records from offset 0 whose sequence numbers
//! continue the checkpoint's one by one with a correct checksum; it ends at
//! the first record that does not: an older record, or the torn tail of an
//! append a crash interrupted, which was never acknowledged.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The log file inside the data directory.
pub const WAL_FILE: &str = "changetoken.wal";

/// The longest a record waits for a checkpoint.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// The log size that triggers a checkpoint.
const CHECKPOINT_BYTES: u64 = 16 << 20;
const HEADER: usize = 16;

/// The appending end of the log. Owned by the writer thread.
pub(super) struct Wal {
    file: File,
    /// The end of the valid records.
    len: u64,
    /// The sequence number of the last record, or of the last checkpoint if
    /// no record followed it.
    last_seq: u64,
    /// When the first record after the last checkpoint was appended.
    oldest: Option<Instant>,
    /// Set when a failed append could not be undone (the file may end in a
    /// record the database does not hold) or a sync failed (the database
    /// may hold batches that are not durable): no write may follow.
    broken: Arc<AtomicBool>,
}

/// Syncs the log from another thread than the one appending to it.
pub(super) struct Syncer {
    file: File,
    broken: Arc<AtomicBool>,
}

impl Syncer {
    /// Makes every record written so far durable. A failure leaves the log
    /// unusable until the service restarts, and every later call fails too:
    /// a sync after a failed one may succeed although pages the failed one
    /// should have written were dropped, and a record after a lost one is
    /// never replayed.
    pub fn sync(&self) -> io::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "an earlier sync of the write-ahead log failed; restart the service",
            ));
        }
        self.file.sync_data().inspect_err(|err| {
            tracing::error!(cause = %err, "cannot sync the write-ahead log; refusing writes");
            self.broken.store(true, Ordering::SeqCst);
        })
    }
}

/// Where the log stood before an append, to undo it.
#[derive(Clone, Copy)]
pub(super) struct Mark {
    len: u64,
    last_seq: u64,
    oldest: Option<Instant>,
}

impl Wal {
    /// Opens (creating if needed) the log at `path` and returns it with the
    /// bodies of the records after sequence number `checkpoint`, in order.
    /// The log is positioned to be overwritten once those are checkpointed.
    pub fn open(path: &Path, checkpoint: u64) -> io::Result<(Wal, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let bodies = valid_records(&bytes, checkpoint);
        let last_seq = checkpoint + bodies.len() as u64;
        let wal = Wal {
            file,
            len: 0,
            last_seq,
            oldest: None,
            broken: Arc::default(),
        };
        Ok((wal, bodies))
    }

    /// The sequence number a checkpoint taken now records.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether records are waiting for a checkpoint.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the next batch should be a checkpoint.
    pub fn checkpoint_due(&self) -> bool {
        self.len >= CHECKPOINT_BYTES
            || self
                .oldest
                .is_some_and(|at| at.elapsed() >= CHECKPOINT_AFTER)
    }

    /// How long the writer may sleep before a checkpoint is due.
    pub fn checkpoint_in(&self) -> Duration {
        self.oldest.map_or(CHECKPOINT_AFTER, |at| {
            CHECKPOINT_AFTER.saturating_sub(at.elapsed())
        })
    }

    /// A handle that syncs this log from another thread.
    pub fn syncer(&self) -> io::Result<Syncer> {
        Ok(Syncer {
            file: self.file.try_clone()?,
            broken: self.broken.clone(),
        })
    }

    /// Fails if an earlier failure left the log unusable.
    pub fn usable(&self) -> io::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the write-ahead log failed and could not be repaired; restart the service",
            ));
        }
        Ok(())
    }

    /// Writes `body` as the next record, without syncing it. On failure the
    /// write is undone as far as possible and the error returned.
    pub fn append(&mut self, body: &[u8]) -> io::Result<Mark> {
        self.usable()?;
        let len = u32::try_from(body.len())
            .map_err(|_| io::Error::other("write-ahead log record over 4 GiB"))?;
        let mark = Mark {
            len: self.len,
            last_seq: self.last_seq,
            oldest: self.oldest,
        };
        let seq = self.last_seq + 1;
        let mut record = Vec::with_capacity(HEADER + body.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&checksum(seq, body).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(body);
        if let Err(err) = self.file.write_all_at(&record, self.len) {
            self.undo(mark);
            return Err(err);
        }
        self.len += record.len() as u64;
        self.last_seq = seq;
        self.oldest.get_or_insert_with(Instant::now);
        Ok(mark)
    }

    /// Takes back the appends after `mark`, whose batch was not committed:
    /// the file is cut at the mark, so that no replay applies them (whatever
    /// lay beyond it was older records, which a replay never reaches
    /// either). If that fails the log is unusable until the service restarts.
    pub fn undo(&mut self, mark: Mark) {
        let cut = self
            .file
            .set_len(mark.len)
            .and_then(|()| self.file.sync_data());
        if let Err(err) = cut {
            tracing::error!(cause = %err, "cannot undo a write-ahead log append; refusing writes");
            self.broken.store(true, Ordering::SeqCst);
        }
        self.len = mark.len;
        self.last_seq = mark.last_seq;
        self.oldest = mark.oldest;
    }

    /// Records that a synced commit now holds every record: the log starts
    /// over at offset 0.
    pub fn checkpointed(&mut self) {
        self.len = 0;
        self.oldest = None;
    }

    /// Shrinks the file to nothing after the final checkpoint of a clean
    /// shutdown. Failure only leaves records that the next start skips.
    pub fn close(self) {
        if self.len == 0 {
            let _ = self.file.set_len(0).and_then(|()| self.file.sync_all());
        }
    }
}

fn checksum(seq: u64, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

/// The bodies of the run of valid records from the start of `bytes` whose
/// sequence numbers follow `checkpoint` one by one.
fn valid_records(bytes: &[u8], checkpoint: u64) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    let mut at = 0;
    let mut expected = checkpoint + 1;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes(header[0..4].try_into().expect("four bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("four bytes"));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("eight bytes"));
        let Some(body) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if seq != expected || crc != checksum(seq, body) {
            break;
        }
        bodies.push(body.to_vec());
        at += HEADER + len;
        expected += 1;
    }
    bodies
}

/// One change to one table, as the writer applies it and the log stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mutation<'a> {
    PutToken(u128, &'a [u8]),
    DeleteToken(u128),
    PutScope(&'a str, u128),
    PutChange(u64, &'a [u8]),
    DeleteChange(u64),
    PutPending(u64, u128),
    DeletePending(u64),
    PutMember(&'a str, u64),
    DeleteMember(&'a str),
    PutMeta(&'a str, u64),
}

impl Mutation<'_> {
    /// Appends the encoding of the mutation to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Mutation::PutToken(key, value) => {
                out.push(1);
                out.extend_from_slice(&key.to_le_bytes());
                put_bytes(out, value);
            }
            Mutation::DeleteToken(key) => {
                out.push(2);
                out.extend_from_slice(&key.to_le_bytes());
            }
            Mutation::PutScope(key, value) => {
                out.push(3);
                put_str(out, key);
                out.extend_from_slice(&value.to_le_bytes());
            }
            Mutation::PutChange(key, value) => {
                out.push(4);
                out.extend_from_slice(&key.to_le_bytes());
                put_bytes(out, value);
            }
            Mutation::DeleteChange(key) => {
                out.push(5);
                out.extend_from_slice(&key.to_le_bytes());
            }
            Mutation::PutPending(key, value) => {
                out.push(6);
                out.extend_from_slice(&key.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            Mutation::DeletePending(key) => {
                out.push(7);
                out.extend_from_slice(&key.to_le_bytes());
            }
            Mutation::PutMember(key, value) => {
                out.push(8);
                put_str(out, key);
                out.extend_from_slice(&value.to_le_bytes());
            }
            Mutation::DeleteMember(key) => {
                out.push(9);
                put_str(out, key);
            }
            Mutation::PutMeta(key, value) => {
                out.push(10);
                put_str(out, key);
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

fn put_str(out: &mut Vec<u8>, value: &str) {
    // Keys are scopes, node ids and fixed names: all far below 64 KiB.
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// A record body that does not decode: the record passed its checksum, so
/// the file was written by something else.
#[derive(Debug, thiserror::Error)]
#[error("write-ahead log record is malformed at byte {0}")]
pub struct Malformed(usize);

/// The mutations of a record body, in order.
pub(super) fn decode(body: &[u8]) -> Result<Vec<Mutation<'_>>, Malformed> {
    let mut reader = Reader { body, at: 0 };
    let mut out = Vec::new();
    while reader.at < body.len() {
        let tag = reader.take(1)?[0];
        out.push(match tag {
            1 => Mutation::PutToken(reader.u128()?, reader.bytes()?),
            2 => Mutation::DeleteToken(reader.u128()?),
            3 => Mutation::PutScope(reader.str()?, reader.u128()?),
            4 => Mutation::PutChange(reader.u64()?, reader.bytes()?),
            5 => Mutation::DeleteChange(reader.u64()?),
            6 => Mutation::PutPending(reader.u64()?, reader.u128()?),
            7 => Mutation::DeletePending(reader.u64()?),
            8 => Mutation::PutMember(reader.str()?, reader.u64()?),
            9 => Mutation::DeleteMember(reader.str()?),
            10 => Mutation::PutMeta(reader.str()?, reader.u64()?),
            _ => return Err(Malformed(reader.at - 1)),
        });
    }
    Ok(out)
}

struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let slice = self
            .body
            .get(self.at..self.at + n)
            .ok_or(Malformed(self.at))?;
        self.at += n;
        Ok(slice)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("eight bytes"),
        ))
    }

    fn u128(&mut self) -> Result<u128, Malformed> {
        Ok(u128::from_le_bytes(
            self.take(16)?.try_into().expect("sixteen bytes"),
        ))
    }

    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().expect("four bytes"));
        self.take(len as usize)
    }

    fn str(&mut self) -> Result<&'a str, Malformed> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("two bytes"));
        let at = self.at;
        std::str::from_utf8(self.take(len as usize)?).map_err(|_| Malformed(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: u8) -> Vec<u8> {
        let mut out = Vec::new();
        Mutation::PutChange(u64::from(n), &[n; 3]).encode(&mut out);
        out
    }

    fn appended(path: &Path, checkpoint: u64, bodies: &[Vec<u8>]) -> Wal {
        let (mut wal, old) = Wal::open(path, checkpoint).unwrap();
        assert!(old.is_empty());
        for b in bodies {
            wal.append(b).unwrap();
        }
        wal
    }

    #[test]
    fn every_mutation_round_trips() {
        let all = [
            Mutation::PutToken(u128::MAX - 3, b"record"),
            Mutation::DeleteToken(7),
            Mutation::PutScope("waf/acl-1", 9),
            Mutation::PutChange(11, b""),
            Mutation::DeleteChange(12),
            Mutation::PutPending(13, 14),
            Mutation::DeletePending(15),
            Mutation::PutMember("web-1", 16),
            Mutation::DeleteMember("web-2"),
            Mutation::PutMeta("head_revision", 17),
        ];
        let mut out = Vec::new();
        for m in &all {
            m.encode(&mut out);
        }
        assert_eq!(decode(&out).unwrap(), all);
        assert!(decode(&out[..out.len() - 1]).is_err());
        assert!(decode(&[99]).is_err());
    }

    #[test]
    fn records_after_the_checkpoint_are_replayed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let bodies: Vec<_> = (1..=5).map(body).collect();
        drop(appended(&path, 10, &bodies));
        let (wal, replay) = Wal::open(&path, 10).unwrap();
        assert_eq!(replay, bodies);
        assert_eq!(wal.last_seq(), 15);
        // A checkpoint that already holds the first two.
        let (_, replay) = Wal::open(&path, 12).unwrap();
        assert!(replay.is_empty(), "records out of sequence were replayed");
        let (_, replay) = Wal::open(&path, 15).unwrap();
        assert!(replay.is_empty());
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let bodies: Vec<_> = (1..=3).map(body).collect();
        drop(appended(&path, 0, &bodies));
        let full = std::fs::read(&path).unwrap();
        let record = full.len() / 3;

        std::fs::write(&path, &full[..full.len() - 1]).unwrap();
        assert_eq!(Wal::open(&path, 0).unwrap().1, bodies[..2]);

        let mut flipped = full.clone();
        flipped[record + HEADER] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(Wal::open(&path, 0).unwrap().1, bodies[..1]);
    }

    #[test]
    fn after_a_checkpoint_the_log_is_overwritten_and_older_records_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let mut wal = appended(&path, 0, &(1..=4).map(body).collect::<Vec<_>>());
        wal.checkpointed();
        wal.append(&body(5)).unwrap();
        drop(wal);
        // The checkpoint recorded 4: only record 5 follows it, and the
        // records 2..4 still in the file after it are not in sequence.
        assert_eq!(Wal::open(&path, 4).unwrap().1, vec![body(5)]);
    }

    #[test]
    fn an_undone_append_is_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let mut wal = appended(&path, 0, &[body(1)]);
        let mark = wal.append(&body(2)).unwrap();
        wal.undo(mark);
        wal.append(&body(3)).unwrap();
        drop(wal);
        assert_eq!(Wal::open(&path, 0).unwrap().1, vec![body(1), body(3)]);
    }

    #[test]
    fn after_a_failed_sync_no_sync_or_append_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let mut wal = appended(&path, 0, &[body(1)]);
        let syncer = wal.syncer().unwrap();
        syncer.sync().unwrap();
        // What a failing sync_data leaves behind.
        syncer.broken.store(true, Ordering::SeqCst);
        assert!(
            syncer.sync().is_err(),
            "a sync after a failed one succeeded"
        );
        assert!(wal.append(&body(2)).is_err());
        assert!(wal.usable().is_err());
    }
}
