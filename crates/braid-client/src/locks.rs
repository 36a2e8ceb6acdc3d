//! The locks this client holds, as the server granted them: the server keeps locks in memory
//! only, so after it restarts the client claims each again (`Request::LockReclaim`) during the
//! grace period, before anyone else may take one.
//!
//! # Correctness
//! Every lock request holds `travelling` for reading from before it is sent until its outcome
//! is recorded; a reclaim holds it for writing. So a reclaim neither misses a lock granted by
//! the new server process nor claims one whose release that process has already carried out.
use std::collections::HashMap;
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use braid_proto::lockset::OwnerLocks;
use braid_proto::{Handle, LockKind, LockRequest};

#[derive(Default)]
pub struct HeldLocks {
    table: Mutex<HashMap<(Handle, u64), OwnerLocks>>,
    travelling: RwLock<()>,
}

impl HeldLocks {
    /// Held by a lock request from before it is sent until `granted` has recorded its outcome.
    pub fn travelling(&self) -> RwLockReadGuard<'_, ()> {
        self.travelling.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records what a lock request the server carried out did.
    pub fn granted(&self, request: &LockRequest) {
        let mut table = self.table.lock().expect("held locks lock");
        let key = (request.handle.clone(), request.owner);
        let locks = table.entry(key.clone()).or_default();
        locks.apply(request.kind, request.start, request.end, request.pid);
        if locks.is_empty() {
            table.remove(&key);
        }
    }

    /// Claims every held lock again through `reclaim`, with no other lock request travelling
    /// meanwhile. A lock `reclaim` cannot get back is forgotten, and reported.
    pub fn reclaim_all(&self, mut reclaim: impl FnMut(&LockRequest) -> Result<(), String>) {
        let _alone = self.travelling.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let held: Vec<LockRequest> = {
            let table = self.table.lock().expect("held locks lock");
            table
                .iter()
                .flat_map(|((handle, owner), locks)| {
                    locks.ranges().iter().map(|r| LockRequest {
                        handle: handle.clone(),
                        owner: *owner,
                        kind: r.kind(),
                        start: r.start,
                        end: r.end,
                        pid: r.pid,
                    })
                })
                .collect()
        };
        for request in held {
            if let Err(why) = reclaim(&request) {
                tracing::error!(
                    owner = request.owner,
                    start = request.start,
                    end = request.end,
                    pid = request.pid,
                    why,
                    "a lock held before the server restarted is lost: another process may take it"
                );
                self.granted(&LockRequest { kind: LockKind::Unlock, ..request });
            }
        }
    }

    #[cfg(test)]
    fn held(&self) -> Vec<(u64, LockKind, u64, u64)> {
        let table = self.table.lock().expect("held locks lock");
        let mut held: Vec<_> =
            table.iter().flat_map(|((_, owner), locks)| locks.ranges().iter().map(|r| (*owner, r.kind(), r.start, r.end))).collect();
        held.sort_by_key(|&(owner, _, start, _)| (owner, start));
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(owner: u64, kind: LockKind, start: u64, end: u64) -> LockRequest {
        LockRequest { handle: Handle(vec![1]), owner, kind, start, end, pid: 9 }
    }

    #[test]
    fn what_is_held_is_reclaimed_and_what_cannot_be_is_forgotten() {
        let held = HeldLocks::default();
        held.granted(&request(1, LockKind::Write, 0, 99));
        held.granted(&request(1, LockKind::Unlock, 10, 19));
        held.granted(&request(2, LockKind::Read, 5, 5));
        held.granted(&request(3, LockKind::Read, 7, 7));
        held.granted(&request(3, LockKind::Unlock, 0, u64::MAX));
        let mut claimed = Vec::new();
        held.reclaim_all(|r| {
            claimed.push((r.owner, r.kind, r.start, r.end));
            if r.owner == 2 {
                Err("conflict".into())
            } else {
                Ok(())
            }
        });
        claimed.sort_by_key(|&(owner, _, start, _)| (owner, start));
        assert_eq!(claimed, [(1, LockKind::Write, 0, 9), (1, LockKind::Write, 20, 99), (2, LockKind::Read, 5, 5)]);
        assert_eq!(held.held(), [(1, LockKind::Write, 0, 9), (1, LockKind::Write, 20, 99)], "owner 2's lock is lost");
    }
}
