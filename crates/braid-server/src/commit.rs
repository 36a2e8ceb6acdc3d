//! Group commit: one thread makes the log and the export durable for every transaction applied
//! so far with one `syncfs` per file system, however many clients asked for it meanwhile.
//!
//! # Correctness
//! `durable` is published only after the flush covering every lsn up to it returned success.
//! A failed flush is fatal: the server stops at once, because after a failed `syncfs` the kernel
//! may have dropped dirty pages, and acking anything afterwards could ack lost data. On restart
//! the log says which transactions clients must resend.
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use braid_proto::Lsn;
use tokio::sync::watch;

use crate::instances::DurableMark;

/// How long the durable mark of the last commit waits for the next commit's flush to carry it
/// before it is synced on its own: under load no commit waits for a sync of the mark, and when
/// idle the mark of the last commit before a crash of the machine survives it (unless the crash
/// comes within this delay: clients then take that commit's changes as lost, which is safe).
const MARK_SYNC_DELAY: Duration = Duration::from_millis(20);
use crate::sys;
use crate::wal;

pub struct Committer {
    wanted: Mutex<bool>,
    wake: Condvar,
    durable: watch::Sender<Lsn>,
    /// The lsn the flush under way (or the last one) makes durable: a commit it covers waits
    /// for it instead of asking for another.
    flushing: AtomicU64,
    /// Highest lsn whose application has finished (set by the applier).
    pub applied: AtomicU64,
    /// The segment being written (set by the applier); older ones are obsolete after a commit.
    pub segment: AtomicU64,
    /// An idle server still commits what was applied at least this often, which bounds the
    /// work a crash of the whole machine can undo and lets old log segments be deleted.
    interval: Duration,
}

/// The export's file system and, if it is another one, the state directory's.
pub struct FileSystems(pub Vec<OwnedFd>);

/// What the commit thread flushes, and where it records what it made durable.
pub struct FlushTargets {
    pub file_systems: FileSystems,
    pub wal_dir: PathBuf,
    pub mark: DurableMark,
}

impl FileSystems {
    /// Makes everything written to the export and the log so far durable. A failure stops
    /// the process (see the module notes).
    pub fn flush(&self) {
        for fd in &self.0 {
            if let Err(e) = sys::syncfs(fd.as_fd()) {
                tracing::error!(error = %e, "syncfs failed: stopping the server so that nothing unflushed is acked");
                std::process::exit(70);
            }
        }
    }
}

impl Committer {
    pub fn new(applied: Lsn, segment: u64, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            wanted: Mutex::new(false),
            wake: Condvar::new(),
            durable: watch::channel(applied).0,
            flushing: AtomicU64::new(applied.0),
            applied: AtomicU64::new(applied.0),
            segment: AtomicU64::new(segment),
            interval,
        })
    }

    /// The highest lsn whose application has finished.
    fn applied(&self) -> Lsn {
        Lsn(self.applied.load(Ordering::Acquire))
    }

    pub fn durable(&self) -> Lsn {
        *self.durable.borrow()
    }

    /// Returns once everything applied before the call is durable.
    pub async fn commit(&self) -> Lsn {
        self.commit_up_to(self.applied()).await
    }

    /// Returns once everything up to `target` is durable; a `target` not applied yet stands for
    /// everything applied (it might never come). A flush is asked for only if the one under way
    /// started before `target` was applied.
    pub async fn commit_up_to(&self, target: Lsn) -> Lsn {
        let target = target.min(self.applied());
        let mut rx = self.durable.subscribe();
        if *rx.borrow() >= target {
            return *rx.borrow();
        }
        // `flushing` is stored before its flush starts, and `durable` after it ends: if it
        // covers `target`, that flush's end will.
        if self.flushing.load(Ordering::Acquire) < target.0 {
            *self.wanted.lock().expect("commit lock") = true;
            self.wake.notify_one();
        }
        let durable = *rx.wait_for(|d| *d >= target).await.expect("the commit thread never exits while serving");
        durable
    }

    /// Runs the commit loop on the current thread, forever.
    pub fn run(self: Arc<Self>, targets: FlushTargets) -> ! {
        let mut mark_unsynced = false;
        loop {
            let patience = if mark_unsynced { MARK_SYNC_DELAY } else { self.interval };
            if !self.wait_for_work(patience) {
                // The mark's wait is not the interval: after syncing it, wait the interval.
                if mark_unsynced {
                    sync_mark(&targets.mark);
                    mark_unsynced = false;
                    continue;
                }
                if self.applied() <= self.durable() {
                    continue;
                }
            }
            let target = self.applied();
            let segment = self.segment.load(Ordering::Acquire);
            self.flushing.store(target.0, Ordering::Release);
            targets.file_systems.flush();
            assert!(target >= self.durable(), "durable lsn moving backwards: {target:?} < {:?}", self.durable());
            self.durable.send_replace(target);
            // A failure only leaves the mark older: clients would take more of their changes
            // as lost after a crash of the machine, never fewer.
            match targets.mark.record(target) {
                Ok(()) => mark_unsynced = true,
                Err(e) => tracing::warn!(error = %e, "cannot record the durable lsn"),
            }
            if let Err(e) = wal::delete_segments_before(&targets.wal_dir, segment) {
                tracing::warn!(error = %e, "cannot delete old log segments");
            }
        }
    }

    /// Waits until a commit is wanted (true) or `patience` has passed (false).
    fn wait_for_work(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut wanted = self.wanted.lock().expect("commit lock");
        while !*wanted {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            wanted = self.wake.wait_timeout(wanted, deadline - now).expect("commit lock").0;
        }
        *wanted = false;
        true
    }
}

fn sync_mark(mark: &DurableMark) {
    if let Err(e) = mark.sync() {
        tracing::warn!(error = %e, "cannot sync the durable lsn's mark");
    }
}
