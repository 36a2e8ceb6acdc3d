//! The transaction log: preallocated segment files of framed records.
//!
//! ```text
//! record  = len: u32 LE | crc32c(body): u32 LE | body (postcard WalRecord)
//! segment = wal/<16 hex digits>.log, preallocated to SEGMENT_BYTES; a zero length ends it
//! ```
//! Every transaction is appended as a `Txn` record before it is applied and followed by an
//! `Applied` record carrying its reply; each new segment starts with a `Snapshot` of the reply
//! cache, so older segments can be deleted once the new one is durable. The log is made durable
//! by the committer (`commit.rs`), never here.
//!
//! Recovery reads every segment up to its first invalid record (a torn tail), rebuilds the reply
//! cache and the next lsn, and starts a fresh segment. After a crash of the machine, what was
//! applied after the last commit may be gone from the export although its records survived:
//! those transactions count as torn again, so that a client resending one has it applied.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use braid_proto::{ClientId, Lsn, TxnSeq};
use serde::{Deserialize, Serialize};

use crate::dedup::ReplyCache;

/// Preallocating segments means an append inside a segment cannot fail with ENOSPC: the space
/// is claimed when the segment is created, before any transaction that needs it is applied.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const RECORD_HEADER_BYTES: usize = 8;
/// Room always left in a segment for the `Applied` record that follows a `Txn` record.
const APPLIED_RESERVE_BYTES: u64 = 64 << 10;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum WalRecord<'a> {
    /// A transaction, logged before it is applied. (A newtype variant encodes as the struct
    /// variant it was before `FencedTxn`: older logs decode unchanged.)
    #[serde(borrow)]
    Txn(TxnRecord<'a>),
    Applied {
        lsn: u64,
        client: u64,
        seq: u64,
        #[serde(borrow)]
        reply: &'a [u8],
    },
    /// The encoded reply cache and next lsn at the start of a segment.
    Snapshot {
        next_lsn: u64,
        #[serde(borrow)]
        cache: &'a [u8],
    },
    /// A `Txn` of which the write-back fence refused some commands: their indices. A record
    /// of its own, so that logs written before it existed still decode.
    FencedTxn {
        #[serde(borrow)]
        txn: TxnRecord<'a>,
        refused: Vec<u32>,
    },
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TxnRecord<'a> {
    pub lsn: u64,
    pub client: u64,
    pub seq: u64,
    /// The encoded `Request::Txn`, as received.
    #[serde(borrow)]
    pub message: &'a [u8],
    #[serde(borrow)]
    pub data: &'a [u8],
}

impl<'a> WalRecord<'a> {
    /// The record of a transaction logged before it is applied: `refused` lists the commands
    /// the fence refuses.
    pub fn txn(lsn: Lsn, client: ClientId, seq: TxnSeq, message: &'a [u8], data: &'a [u8], refused: Vec<u32>) -> Self {
        let txn = TxnRecord { lsn: lsn.0, client: client.0, seq: seq.0, message, data };
        if refused.is_empty() {
            WalRecord::Txn(txn)
        } else {
            WalRecord::FencedTxn { txn, refused }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("log directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("log record does not encode: {0}")]
    Encode(String),
}

pub struct Wal {
    dir: PathBuf,
    file: File,
    segment: u64,
    offset: u64,
}

pub struct Recovered {
    pub cache: ReplyCache,
    pub next_lsn: Lsn,
    pub records: u64,
    /// Transactions counted as torn again because they were above the lost bound.
    pub undone: u64,
}

/// Recovery under way: what is recovered, and the transactions that may have been lost.
struct Replay {
    into: Recovered,
    lost_above: Option<Lsn>,
    above: Vec<(ClientId, TxnSeq, crate::dedup::LoggedTxn)>,
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, recovers its state, and starts a new segment.
    /// `lost_above`: the transactions after this lsn may have been lost (by a crash of the
    /// machine) even where the log has them.
    pub fn open(dir: &Path, lost_above: Option<Lsn>) -> Result<(Self, Recovered), WalError> {
        let io_err = |source| WalError::Io { path: dir.to_path_buf(), source };
        fs::create_dir_all(dir).map_err(io_err)?;
        let segments = list_segments(dir).map_err(io_err)?;
        let recovered = Recovered { cache: ReplyCache::default(), next_lsn: Lsn(1), records: 0, undone: 0 };
        let mut replay = Replay { into: recovered, lost_above, above: Vec::new() };
        for &id in &segments {
            replay_segment(&segment_path(dir, id), &mut replay).map_err(io_err)?;
        }
        let mut recovered = replay.into;
        for (client, seq, logged) in replay.above {
            recovered.undone += u64::from(recovered.cache.undo(client, seq, logged));
        }
        let next_segment = segments.last().map_or(1, |last| last + 1);
        let file = create_segment(dir, next_segment).map_err(io_err)?;
        let mut wal = Self { dir: dir.to_path_buf(), file, segment: next_segment, offset: 0 };
        wal.write_snapshot(&recovered.cache, recovered.next_lsn)?;
        Ok((wal, recovered))
    }

    pub fn segment(&self) -> u64 {
        self.segment
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a `Txn` record, moving to a new segment if this one lacks room for it and for
    /// its `Applied` record. Fails (ENOSPC, EIO) before anything is applied.
    pub fn append_txn(&mut self, record: &WalRecord<'_>, cache: &ReplyCache, next_lsn: Lsn) -> Result<(), WalError> {
        let body = postcard::to_stdvec(record).map_err(|e| WalError::Encode(e.to_string()))?;
        let needed = (RECORD_HEADER_BYTES + body.len()) as u64 + APPLIED_RESERVE_BYTES;
        if self.offset + needed > SEGMENT_BYTES {
            self.rotate(cache, next_lsn)?;
        }
        self.write_body(&body)
    }

    pub fn append_applied(&mut self, record: &WalRecord<'_>) -> Result<(), WalError> {
        let body = postcard::to_stdvec(record).map_err(|e| WalError::Encode(e.to_string()))?;
        assert!((body.len() as u64) < APPLIED_RESERVE_BYTES, "applied record of {} bytes", body.len());
        self.write_body(&body)
    }

    fn rotate(&mut self, cache: &ReplyCache, next_lsn: Lsn) -> Result<(), WalError> {
        let next = self.segment + 1;
        self.file = create_segment(&self.dir, next).map_err(|source| WalError::Io { path: segment_path(&self.dir, next), source })?;
        self.segment = next;
        self.offset = 0;
        self.write_snapshot(cache, next_lsn)
    }

    fn write_snapshot(&mut self, cache: &ReplyCache, next_lsn: Lsn) -> Result<(), WalError> {
        let encoded = postcard::to_stdvec(cache).map_err(|e| WalError::Encode(e.to_string()))?;
        let body = postcard::to_stdvec(&WalRecord::Snapshot { next_lsn: next_lsn.0, cache: &encoded })
            .map_err(|e| WalError::Encode(e.to_string()))?;
        self.write_body(&body)
    }

    fn write_body(&mut self, body: &[u8]) -> Result<(), WalError> {
        let total = (RECORD_HEADER_BYTES + body.len()) as u64;
        if self.offset + total > SEGMENT_BYTES {
            return Err(WalError::Io { path: segment_path(&self.dir, self.segment), source: io::Error::from_raw_os_error(libc::EFBIG) });
        }
        let mut record = Vec::with_capacity(total as usize);
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        record.extend_from_slice(body);
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(&record, self.offset)
            .map_err(|source| WalError::Io { path: segment_path(&self.dir, self.segment), source })?;
        self.offset += total;
        Ok(())
    }
}

/// Deletes the segments before `keep_from`. Called by the committer once a commit has made the
/// snapshot at the start of segment `keep_from` durable.
pub fn delete_segments_before(dir: &Path, keep_from: u64) -> io::Result<()> {
    for id in list_segments(dir)? {
        if id < keep_from {
            fs::remove_file(segment_path(dir, id))?;
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.log"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name.strip_suffix(".log").and_then(|hex| u64::from_str_radix(hex, 16).ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn create_segment(dir: &Path, id: u64) -> io::Result<File> {
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(segment_path(dir, id))?;
    if let Err(e) = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, SEGMENT_BYTES) {
        let _ = fs::remove_file(segment_path(dir, id));
        return Err(e.into());
    }
    Ok(file)
}

fn replay_segment(path: &Path, into: &mut Replay) -> io::Result<()> {
    let mut file = File::open(path)?;
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut at = 0u64;
    loop {
        let mut head = [0u8; RECORD_HEADER_BYTES];
        if at + RECORD_HEADER_BYTES as u64 > len || reader.read_exact(&mut head).is_err() {
            return Ok(());
        }
        let body_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        // A zero length is the preallocated end; a length past the file is a torn tail.
        if body_len == 0 || at + RECORD_HEADER_BYTES as u64 + body_len > len {
            return Ok(());
        }
        let mut body = vec![0u8; body_len as usize];
        reader.read_exact(&mut body)?;
        if crc32c::crc32c(&body) != crc {
            tracing::warn!(path = %path.display(), offset = at, "log ends at a torn record");
            return Ok(());
        }
        let Ok(record) = postcard::from_bytes::<WalRecord<'_>>(&body) else {
            tracing::warn!(path = %path.display(), offset = at, "log record does not decode; treating as end");
            return Ok(());
        };
        apply_record(record, into);
        at += RECORD_HEADER_BYTES as u64 + body_len;
    }
}

fn apply_record(record: WalRecord<'_>, replay: &mut Replay) {
    let into = &mut replay.into;
    into.records += 1;
    match record {
        WalRecord::Txn(txn) => replay_txn(replay, txn, Vec::new()),
        WalRecord::FencedTxn { txn, refused } => replay_txn(replay, txn, refused),
        WalRecord::Applied { client, seq, reply, .. } => into.cache.record(ClientId(client), TxnSeq(seq), reply.to_vec()),
        WalRecord::Snapshot { next_lsn, cache } => {
            if let Ok(cache) = postcard::from_bytes(cache) {
                into.cache.adopt_snapshot(cache);
            }
            into.next_lsn = into.next_lsn.max(Lsn(next_lsn));
        }
    }
}

/// A logged transaction counts as torn until its `Applied` record comes.
fn replay_txn(replay: &mut Replay, txn: TxnRecord<'_>, refused: Vec<u32>) {
    let (client, seq) = (ClientId(txn.client), TxnSeq(txn.seq));
    let logged = crate::dedup::LoggedTxn { message: txn.message.to_vec(), data: txn.data.to_vec(), refused };
    if replay.lost_above.is_some_and(|bound| txn.lsn > bound.0) {
        replay.above.push((client, seq, logged.clone()));
    }
    replay.into.cache.logged(client, seq, Some(logged));
    replay.into.next_lsn = replay.into.next_lsn.max(Lsn(txn.lsn + 1));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::Seen;

    fn txn(lsn: u64, seq: u64) -> WalRecord<'static> {
        WalRecord::Txn(TxnRecord { lsn, client: 7, seq, message: b"m", data: b"data" })
    }

    #[test]
    fn a_transaction_record_written_before_fenced_records_existed_still_decodes() {
        // Goal: logs of older servers replay: the `Txn` record is encoded as it was.
        #[derive(Serialize)]
        enum Before<'a> {
            Txn { lsn: u64, client: u64, seq: u64, message: &'a [u8], data: &'a [u8] },
        }
        let old = postcard::to_stdvec(&Before::Txn { lsn: 3, client: 7, seq: 9, message: b"m", data: b"data" }).unwrap();
        assert_eq!(
            postcard::from_bytes::<WalRecord<'_>>(&old).unwrap(),
            WalRecord::Txn(TxnRecord { lsn: 3, client: 7, seq: 9, message: b"m", data: b"data" })
        );
    }

    #[test]
    fn recovery_rebuilds_replies_and_marks_torn_transactions() {
        // Goal: after a restart, applied txns answer from the cache, a logged-but-unapplied
        // txn is torn, and lsns continue. Method: write records, reopen the log.
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, rec) = Wal::open(dir.path(), None).unwrap();
            assert_eq!(rec.next_lsn, Lsn(1));
            wal.append_txn(&txn(1, 10), &rec.cache, Lsn(1)).unwrap();
            wal.append_applied(&WalRecord::Applied { lsn: 1, client: 7, seq: 10, reply: b"r10" }).unwrap();
            wal.append_txn(&txn(2, 11), &rec.cache, Lsn(2)).unwrap();
        }
        let (_, rec) = Wal::open(dir.path(), None).unwrap();
        assert_eq!(rec.next_lsn, Lsn(3));
        assert_eq!(rec.cache.check(ClientId(7), TxnSeq(10)), Seen::Done(b"r10".to_vec()));
        assert!(matches!(rec.cache.check(ClientId(7), TxnSeq(11)), Seen::Torn(Some(_))));
        assert_eq!(rec.cache.check(ClientId(7), TxnSeq(12)), Seen::New);
    }

    #[test]
    fn after_a_crash_of_the_machine_transactions_above_the_bound_are_torn_again() {
        // Goal: a txn applied after the last durable lsn may be gone from the export although
        // its records survived: its resend must be applied (tolerantly), not answered from the
        // cache. Method: log two applied txns, reopen with the bound between them.
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, rec) = Wal::open(dir.path(), None).unwrap();
            for (lsn, seq) in [(1, 10), (2, 11)] {
                wal.append_txn(&txn(lsn, seq), &rec.cache, Lsn(lsn)).unwrap();
                wal.append_applied(&WalRecord::Applied { lsn, client: 7, seq, reply: b"r" }).unwrap();
            }
        }
        let (_, rec) = Wal::open(dir.path(), Some(Lsn(1))).unwrap();
        assert_eq!(rec.undone, 1);
        assert_eq!(rec.cache.check(ClientId(7), TxnSeq(10)), Seen::Done(b"r".to_vec()));
        let torn = crate::dedup::LoggedTxn { message: b"m".to_vec(), data: b"data".to_vec(), refused: Vec::new() };
        assert_eq!(rec.cache.check(ClientId(7), TxnSeq(11)), Seen::Torn(Some(torn)));
    }

    #[test]
    fn a_corrupt_tail_ends_the_log() {
        // Goal: a torn or corrupt last record is ignored, earlier records survive.
        let dir = tempfile::tempdir().unwrap();
        let path;
        {
            let (mut wal, rec) = Wal::open(dir.path(), None).unwrap();
            wal.append_txn(&txn(1, 1), &rec.cache, Lsn(1)).unwrap();
            let good_end = wal.offset;
            wal.append_txn(&txn(2, 2), &rec.cache, Lsn(2)).unwrap();
            path = segment_path(dir.path(), wal.segment);
            use std::os::unix::fs::FileExt;
            // Flip a byte inside the second record's body.
            wal.file.write_all_at(&[0xff], good_end + 12).unwrap();
        }
        let (_, rec) = Wal::open(dir.path(), None).unwrap();
        assert!(path.exists());
        assert_eq!(rec.next_lsn, Lsn(2));
        assert!(matches!(rec.cache.check(ClientId(7), TxnSeq(1)), Seen::Torn(Some(_))));
        assert_eq!(rec.cache.check(ClientId(7), TxnSeq(2)), Seen::New);
    }

    #[test]
    fn snapshots_carry_state_across_deleted_segments() {
        // Goal: after rotation and deletion of old segments, nothing known is lost.
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, mut rec) = Wal::open(dir.path(), None).unwrap();
            wal.append_txn(&txn(1, 1), &rec.cache, Lsn(1)).unwrap();
            wal.append_applied(&WalRecord::Applied { lsn: 1, client: 7, seq: 1, reply: b"one" }).unwrap();
            rec.cache.record(ClientId(7), TxnSeq(1), b"one".to_vec());
            wal.rotate(&rec.cache, Lsn(2)).unwrap();
            delete_segments_before(dir.path(), wal.segment()).unwrap();
        }
        let (_, rec) = Wal::open(dir.path(), None).unwrap();
        assert_eq!(rec.next_lsn, Lsn(2));
        assert_eq!(rec.cache.check(ClientId(7), TxnSeq(1)), Seen::Done(b"one".to_vec()));
    }
}
