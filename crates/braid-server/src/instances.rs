//! Which server processes ran before this one on the same state, and how much of each one's
//! work survived: what a client needs to tell an fsync of a change a crash of the machine undid
//! (it must fail) from an fsync of a change that is on disk (it may succeed).
//!
//! ```text
//! state/instances  postcard Instances: the serving process, the boot it runs in, and its
//!                  predecessors with the last of their lsns that survived; replaced (by rename)
//!                  once per start
//! state/durable    instance u64 LE | lsn u64 LE | crc32c u32 LE: the highest lsn of the
//!                  serving process known durable, rewritten in place after each commit
//! ```
//!
//! # Correctness
//! `state/durable` is written only after the flush that made its lsn durable returned, so any
//! value read from it after a crash is durable. After a crash of the process alone the page
//! cache kept everything the process applied, and the restart's flush makes it durable; after a
//! crash of the machine (the boot id differs) only what `state/durable` says survived. The mark
//! is itself made durable by the next commit's flush, or on its own when none follows soon
//! (`commit::MARK_SYNC_DELAY`).
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use braid_proto::{Lsn, Predecessor};
use serde::{Deserialize, Serialize};

/// Predecessors remembered: a client that missed more restarts than this (while cut off)
/// takes its changes of older processes as lost, which is safe.
const PREDECESSORS_MAX: usize = 16;
const MARK_BYTES: usize = 20;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Instances {
    serving: u64,
    boot: String,
    predecessors: Vec<Predecessor>,
}

/// The process that served the state before this one, as found at start.
#[derive(Debug)]
pub struct Previous {
    instance: u64,
    /// Everything it applied is in the page cache still: the machine did not restart.
    same_boot: bool,
    /// The highest of its lsns its mark says is durable, if the mark is its own and intact.
    marked: Option<Lsn>,
    history: Vec<Predecessor>,
}

impl Previous {
    /// Reads what the process before this one left in `state_dir`; `None` on a new state.
    pub fn find(state_dir: &Path) -> io::Result<Option<Self>> {
        let bytes = match fs::read(state_dir.join("instances")) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Ok(instances) = postcard::from_bytes::<Instances>(&bytes) else {
            // Written by rename, so only a damaged disk gets here. Nothing is known of the
            // process before: as after a crash of the machine with nothing marked durable,
            // logged txns count as torn and clients take their unflushed changes as lost.
            tracing::error!(path = %state_dir.join("instances").display(), "unreadable; taking every change not known durable as lost");
            return Ok(Some(Self { instance: 0, same_boot: false, marked: None, history: Vec::new() }));
        };
        let marked = read_mark(&state_dir.join("durable"))?.filter(|(instance, _)| *instance == instances.serving).map(|(_, lsn)| lsn);
        Ok(Some(Self { instance: instances.serving, same_boot: instances.boot == boot_id()?, marked, history: instances.predecessors }))
    }

    /// The lsn above which the previous process's transactions were lost, if a crash of the
    /// machine may have lost any.
    pub fn lost_above(&self) -> Option<Lsn> {
        (!self.same_boot).then(|| self.marked.unwrap_or(Lsn(0)))
    }
}

/// Records that process `instance` now serves `state_dir`, after `previous`, of whose lsns
/// those up to `recovered` survived; returns the predecessors to tell clients about.
pub fn start(state_dir: &Path, instance: u64, previous: Option<&Previous>, recovered: Lsn) -> io::Result<Vec<Predecessor>> {
    let mut predecessors = previous.map(|p| p.history.clone()).unwrap_or_default();
    // Instance 0 stands for an unknown predecessor: no client was told of it.
    if let Some(previous) = previous.filter(|p| p.instance != 0) {
        predecessors.push(Predecessor { instance: previous.instance, durable: previous.lost_above().unwrap_or(recovered) });
    }
    let excess = predecessors.len().saturating_sub(PREDECESSORS_MAX);
    predecessors.drain(..excess);
    let instances = Instances { serving: instance, boot: boot_id()?, predecessors };
    let bytes = postcard::to_stdvec(&instances).map_err(|e| io::Error::other(e.to_string()))?;
    replace_durably(&state_dir.join("instances"), &bytes)?;
    Ok(instances.predecessors)
}

/// The serving process's durable mark (`state/durable`).
pub struct DurableMark {
    file: File,
    instance: u64,
}

impl DurableMark {
    /// Opens the mark of process `instance` and records `durable` in it, durably.
    pub fn open(state_dir: &Path, instance: u64, durable: Lsn) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(state_dir.join("durable"))?;
        let mark = Self { file, instance };
        mark.record(durable)?;
        mark.sync()?;
        Ok(mark)
    }

    /// Records that every lsn up to `lsn` is durable; call only once it is.
    pub fn record(&self, lsn: Lsn) -> io::Result<()> {
        let mut record = [0u8; MARK_BYTES];
        record[..8].copy_from_slice(&self.instance.to_le_bytes());
        record[8..16].copy_from_slice(&lsn.0.to_le_bytes());
        let crc = crc32c::crc32c(&record[..16]);
        record[16..].copy_from_slice(&crc.to_le_bytes());
        // One write inside one sector: a crash leaves the old record or the new one.
        self.file.write_all_at(&record, 0)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn read_mark(path: &Path) -> io::Result<Option<(u64, Lsn)>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(record) = bytes.get(..MARK_BYTES) else { return Ok(None) };
    let field = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(record[16..20].try_into().expect("4 bytes"));
    Ok((crc32c::crc32c(&record[..16]) == crc).then(|| (field(0), Lsn(field(8)))))
}

/// The kernel's id of the current boot: it changes when the machine restarts.
fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/boot_id")?.trim().to_string())
}

/// Replaces `path` by `bytes` so that a crash leaves the old content or the new one, both
/// durable once this returns.
pub fn replace_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(dir: &Path) -> Instances {
        postcard::from_bytes(&fs::read(dir.join("instances")).unwrap()).unwrap()
    }

    #[test]
    fn a_restart_in_the_same_boot_keeps_everything_recovered() {
        // Goal: after a crash of the process only, every recovered lsn counts as surviving.
        let dir = tempfile::tempdir().unwrap();
        assert!(Previous::find(dir.path()).unwrap().is_none());
        start(dir.path(), 11, None, Lsn(0)).unwrap();
        DurableMark::open(dir.path(), 11, Lsn(3)).unwrap().record(Lsn(5)).unwrap();
        let previous = Previous::find(dir.path()).unwrap().unwrap();
        assert_eq!(previous.lost_above(), None);
        let told = start(dir.path(), 12, Some(&previous), Lsn(9)).unwrap();
        assert_eq!(told, vec![Predecessor { instance: 11, durable: Lsn(9) }]);
    }

    #[test]
    fn after_a_reboot_only_the_marked_lsns_survive() {
        // Goal: a different boot id means the machine restarted: the mark bounds what survived,
        // and a mark of another process (or none) means nothing of this one did.
        // Method: write instances with a boot id that is not this boot's.
        let dir = tempfile::tempdir().unwrap();
        let old = Instances { serving: 21, boot: "another boot".into(), predecessors: vec![Predecessor { instance: 20, durable: Lsn(4) }] };
        replace_durably(&dir.path().join("instances"), &postcard::to_stdvec(&old).unwrap()).unwrap();
        DurableMark::open(dir.path(), 21, Lsn(7)).unwrap();
        let previous = Previous::find(dir.path()).unwrap().unwrap();
        assert_eq!(previous.lost_above(), Some(Lsn(7)));
        let told = start(dir.path(), 22, Some(&previous), Lsn(30)).unwrap();
        assert_eq!(told, vec![Predecessor { instance: 20, durable: Lsn(4) }, Predecessor { instance: 21, durable: Lsn(7) }]);
        assert_eq!(instances(dir.path()).serving, 22);

        DurableMark::open(dir.path(), 99, Lsn(50)).unwrap();
        let old = Instances { serving: 22, boot: "yet another".into(), predecessors: vec![] };
        replace_durably(&dir.path().join("instances"), &postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!(Previous::find(dir.path()).unwrap().unwrap().lost_above(), Some(Lsn(0)));
    }

    #[test]
    fn an_unreadable_record_counts_as_a_crash_of_the_machine_with_nothing_durable() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("instances"), b"\xff\xff\xff").unwrap();
        let previous = Previous::find(dir.path()).unwrap().unwrap();
        assert_eq!(previous.lost_above(), Some(Lsn(0)));
        let told = start(dir.path(), 5, Some(&previous), Lsn(9)).unwrap();
        assert_eq!(told, vec![], "no predecessor is known");
        assert_eq!(Previous::find(dir.path()).unwrap().unwrap().instance, 5, "rewritten whole");
    }

    #[test]
    fn a_torn_mark_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        DurableMark::open(dir.path(), 1, Lsn(8)).unwrap();
        assert_eq!(read_mark(&dir.path().join("durable")).unwrap(), Some((1, Lsn(8))));
        let file = OpenOptions::new().write(true).open(dir.path().join("durable")).unwrap();
        file.write_all_at(&[0xff], 9).unwrap();
        assert_eq!(read_mark(&dir.path().join("durable")).unwrap(), None);
    }

    #[test]
    fn history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        start(dir.path(), 1, None, Lsn(0)).unwrap();
        for instance in 2..40 {
            let previous = Previous::find(dir.path()).unwrap().unwrap();
            let told = start(dir.path(), instance, Some(&previous), Lsn(instance)).unwrap();
            assert!(told.len() <= PREDECESSORS_MAX);
            assert_eq!(told.last(), Some(&Predecessor { instance: instance - 1, durable: Lsn(instance) }));
        }
    }
}
