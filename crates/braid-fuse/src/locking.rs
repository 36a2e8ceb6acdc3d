//! Locks of this mount's processes: taken (and waited for), fenced once lost, released at
//! close.
//!
//! A blocking request (`F_SETLKW`, a blocking `flock`) that meets a conflict waits on a thread
//! of its own, not on one of the mount's few kernel request threads: as many waiting processes
//! as there are threads (8 by default) left none for anything else, and every request on the
//! mount hung until the lock was let go. Which owner's locks a close ends is `lockers`' job.
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_client::Client;
use braid_proto::{LockHeld, LockKind, LockRequest};
use fuser::{Errno, ReplyEmpty};

use crate::cache::KernelCache;
use crate::lockers::{Lockers, Release};
use crate::{caller, errno_for};

/// How long a non-blocking lock request waits for a conflicting lock of this mount to be
/// released by a close the kernel has not sent yet.
const OWN_RELEASE_GRACE: Duration = Duration::from_millis(20);

/// Most backoff between the tries of a waiting request, against a server that answers a
/// conflict at once (before protocol 8).
const WAIT_BACKOFF_MAX: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct Locking {
    client: Client,
    cache: Arc<KernelCache>,
    lockers: Arc<Lockers>,
}

impl Locking {
    pub fn new(client: Client, cache: Arc<KernelCache>) -> Self {
        Self { client, cache, lockers: Arc::default() }
    }

    /// Takes, changes or releases a lock of `node` through the open file `fh`, and answers
    /// `reply`: at once, or, when `waiter` names the calling thread (a blocking request) and
    /// the lock is held, from a thread of its own once the lock is granted, the server finds
    /// that the wait would close a cycle of waiters (EDEADLK), or the caller is signalled
    /// (EINTR; see `caller::interrupted`). An owner that lost a lock there takes none until it
    /// lets go (EIO).
    pub fn take(&self, node: u64, fh: u64, request: LockRequest, waiter: Option<u32>, reply: ReplyEmpty) {
        if request.kind != LockKind::Unlock {
            if let Err(e) = self.fenced(node, fh, Some(request.owner)) {
                return reply.error(e);
            }
            self.lockers.taking(node, request.owner, fh);
        }
        let tid = match (self.without_waiting(&request), waiter) {
            (Ok(None), _) => {
                self.granted(node, &request);
                return reply.ok();
            }
            (Ok(Some(_)), Some(tid)) => tid,
            (Ok(Some(_)), None) => return reply.error(Errno::EAGAIN),
            (Err(e), _) => return reply.error(e),
        };
        let this = self.clone();
        let spawned = std::thread::Builder::new().name("braid-lock-wait".into()).spawn(move || match this.until_granted(&request, tid) {
            Ok(()) => {
                this.granted(node, &request);
                reply.ok()
            }
            Err(e) => reply.error(e),
        });
        // The reply went with the thread that could not start: fuser answers EIO for it.
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to wait for a lock");
        }
    }

    /// One try, and a few more for a moment if the conflicting lock is this mount's own: the
    /// kernel releases closed files asynchronously, so it may be on its way out.
    fn without_waiting(&self, request: &LockRequest) -> Result<Option<LockHeld>, Errno> {
        let deadline = Instant::now() + OWN_RELEASE_GRACE;
        let mut backoff = Duration::from_millis(1);
        loop {
            match self.client.lock(request.clone()).map_err(|e| errno_for(&e))? {
                Some(held) if held.mine && Instant::now() < deadline => std::thread::sleep(backoff),
                outcome => return Ok(outcome),
            }
            backoff *= 2;
        }
    }

    /// Retries a waiting request until it is granted (the server of protocol 8 waits up to
    /// 100 ms for the lock each time; it does not queue waiters), refused, or its caller is
    /// signalled.
    fn until_granted(&self, request: &LockRequest, tid: u32) -> Result<(), Errno> {
        let mut backoff = Duration::from_millis(1);
        loop {
            if caller::interrupted(tid) {
                return Err(Errno::EINTR);
            }
            if self.client.lock_waiting(request.clone()).map_err(|e| errno_for(&e))?.is_none() {
                return Ok(());
            }
            // A server of protocol 8 waited for the lock before it answered.
            if !self.client.lock_waits_at_server() {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(WAIT_BACKOFF_MAX);
            }
        }
    }

    /// Refuses I/O through the open file `fh` (and by `owner`, if the kernel names it) with
    /// EIO if a lock its owner took on `node` is lost: the writes it guards could land after
    /// another client's, which took the lock meanwhile. Costs nothing while no lock is in
    /// question.
    pub fn fenced(&self, node: u64, fh: u64, owner: Option<u64>) -> Result<(), Errno> {
        if !self.client.locks_in_question() {
            return Ok(());
        }
        let mut owners = self.lockers.owners_of(fh);
        owners.extend(owner);
        if owners.is_empty() {
            return Ok(());
        }
        let handle = self.cache.handle(node)?;
        for owner in owners {
            if self.client.lock_lost(&handle, owner).map_err(|e| errno_for(&e))? {
                return Err(Errno::EIO);
            }
        }
        Ok(())
    }

    /// A process closed a descriptor of `node`: the POSIX locks of `owner` there end.
    pub fn closed_by(&self, node: u64, owner: u64) -> Result<(), Errno> {
        self.lockers.end_owner(node, owner).map_or(Ok(()), |release| self.release(release))
    }

    /// The open file `fh` of `node` is released (its last descriptor closed): the flock and OFD
    /// locks taken through it end, and those of `owner` if the kernel names one.
    pub fn file_released(&self, node: u64, fh: u64, owner: Option<u64>) -> Result<(), Errno> {
        self.lockers.end_file(node, fh, owner).into_iter().try_for_each(|release| self.release(release))
    }

    /// Sends `release` (every lock of its owner on its node) to the server; a lost lock of the
    /// owner is forgotten (its I/O relies on it no more).
    fn release(&self, release: Release<'_>) -> Result<(), Errno> {
        let handle = self.cache.handle(release.node)?;
        self.client.forget_lost_lock(&handle, release.owner);
        let request = LockRequest { handle, owner: release.owner, kind: LockKind::Unlock, start: 0, end: u64::MAX, pid: 0 };
        self.client.lock(request).map(drop).map_err(|e| errno_for(&e))
    }

    /// What the lock guards must be read afresh unless the kernel's pages are known to be
    /// right: a recall that came while this mount was changing the file was acknowledged
    /// before its pages were dropped (see `cache`), so they may still hold what another client
    /// changed before it let go of the lock. (NFS drops a file's cache on every lock unless
    /// it holds a delegation; a lease with nothing waiting to be invalidated is one.)
    fn granted(&self, node: u64, request: &LockRequest) {
        let trusted = self.client.holds_exclusively(&request.handle) || self.cache.pages_trusted(node);
        if request.kind != LockKind::Unlock && !trusted {
            self.cache.drop_node_now(node);
        }
    }
}
