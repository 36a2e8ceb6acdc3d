//! Lock requests, and the ones that wait. A blocking request (`F_SETLKW`, a blocking `flock`)
//! that meets a conflict waits on a thread of its own, not on one of the mount's few kernel
//! request threads: as many waiting processes as there are threads (8 by default) left none
//! for anything else, and every request on the mount hung until the lock was let go.
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_client::Client;
use braid_proto::{LockHeld, LockKind, LockRequest};
use fuser::{Errno, ReplyEmpty};

use crate::cache::KernelCache;
use crate::{caller, errno_for};

/// How long a non-blocking lock request waits for a conflicting lock of this mount to be
/// released by a close the kernel has not sent yet.
const OWN_RELEASE_GRACE: Duration = Duration::from_millis(20);

/// Most backoff between the tries of a waiting request, against a server that answers a
/// conflict at once (before protocol 8).
const WAIT_BACKOFF_MAX: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct Locking {
    pub client: Client,
    pub cache: Arc<KernelCache>,
}

impl Locking {
    /// Takes, changes or releases a lock of `node`, and answers `reply`: at once, or, when
    /// `waiter` names the calling thread (a blocking request) and the lock is held, from a
    /// thread of its own once the lock is granted, the server finds that the wait would close
    /// a cycle of waiters (EDEADLK), or the caller is signalled (EINTR; see
    /// `caller::interrupted`).
    pub fn take(&self, node: u64, request: LockRequest, waiter: Option<u32>, reply: ReplyEmpty) {
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
