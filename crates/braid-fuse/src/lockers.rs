//! Which lock owners may hold locks on which nodes, and through which open files, so that a
//! close releases exactly the locks it ends and costs no request when there are none.
//!
//! The kernel names a lock owner by an address: the open file for OFD and `flock` locks, the
//! process's file table for POSIX locks. An address is reused as soon as its object is freed,
//! and the kernel frees a closed file before its FUSE release has been served. So a new open
//! may take a lock under the owner id of a file whose release is still on its way; releasing
//! "every lock of that owner" then would drop the new open's lock (two processes in the same
//! critical section: lost updates). Hence an owner's locks on a node are released only once
//! no open file that took one is left, and a lock request for an owner whose release is
//! travelling waits until the server has carried the release out.
use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
pub struct Lockers {
    state: Mutex<State>,
    /// Signalled when a release is done.
    released: Condvar,
}

#[derive(Default)]
struct State {
    /// (node, owner) → the open files through which the owner took locks on the node.
    owners: HashMap<(u64, u64), Locker>,
    /// Open file → the owners that took locks through it.
    files: HashMap<u64, HashSet<u64>>,
}

#[derive(Default)]
struct Locker {
    files: HashSet<u64>,
    /// A release of all the owner's locks on the node is on its way to the server.
    releasing: bool,
}

/// A release the caller must send to the server: every lock of `owner` on `node`. Dropping it
/// (after the server answered) lets lock requests of that owner on that node go on.
pub struct Release<'l> {
    lockers: &'l Lockers,
    pub node: u64,
    pub owner: u64,
}

impl Lockers {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("lockers lock")
    }

    /// `owner` is about to take a lock on `node` through the open file `fh`. Waits while a
    /// release of the owner's locks on the node travels: it must reach the server first.
    pub fn taking(&self, node: u64, owner: u64, fh: u64) {
        let mut state = self.lock();
        while state.owners.get(&(node, owner)).is_some_and(|l| l.releasing) {
            state = self.released.wait(state).expect("lockers lock");
        }
        state.owners.entry((node, owner)).or_default().files.insert(fh);
        state.files.entry(fh).or_default().insert(owner);
    }

    /// The owners that took locks through the open file `fh`.
    pub fn owners_of(&self, fh: u64) -> Vec<u64> {
        self.lock().files.get(&fh).map(|owners| owners.iter().copied().collect()).unwrap_or_default()
    }

    /// A close by `owner` (a POSIX lock owner: a process) ends all its locks on `node`,
    /// whichever open file took them; `None` if it took none.
    pub fn end_owner(&self, node: u64, owner: u64) -> Option<Release<'_>> {
        let mut state = self.lock();
        let locker = state.owners.get_mut(&(node, owner)).filter(|l| !l.releasing)?;
        locker.files.clear();
        locker.releasing = true;
        Some(Release { lockers: self, node, owner })
    }

    /// The open file `fh` on `node` is released: the locks of each owner that took some
    /// through it and through no other open file still there end (`also`: the owner the
    /// kernel names for its `flock` locks).
    pub fn end_file(&self, node: u64, fh: u64, also: Option<u64>) -> Vec<Release<'_>> {
        let mut state = self.lock();
        let mut owners = state.files.remove(&fh).unwrap_or_default();
        owners.extend(also);
        let mut releases = Vec::new();
        for owner in owners {
            let Some(locker) = state.owners.get_mut(&(node, owner)) else { continue };
            locker.files.remove(&fh);
            if locker.files.is_empty() && !locker.releasing {
                locker.releasing = true;
                releases.push(Release { lockers: self, node, owner });
            }
        }
        releases
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let mut state = self.lockers.lock();
        let key = (self.node, self.owner);
        if let Some(locker) = state.owners.get_mut(&key) {
            assert!(locker.releasing, "a release ended that was not under way");
            locker.releasing = false;
            if locker.files.is_empty() {
                state.owners.remove(&key);
            }
        }
        self.lockers.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn released(releases: Vec<Release<'_>>) -> Vec<(u64, u64)> {
        releases.iter().map(|r| (r.node, r.owner)).collect()
    }

    #[test]
    fn an_owner_reused_by_a_new_open_keeps_its_lock_when_the_old_open_is_released() {
        // Goal: the kernel freed open file 1 (owner 7) and a new open 2 got the same address
        // and took a lock before the release of open 1 came: that release must not end it.
        let lockers = Lockers::default();
        lockers.taking(1, 7, 1);
        lockers.taking(1, 7, 2);
        assert!(lockers.end_file(1, 1, None).is_empty(), "open 2 still relies on owner 7's lock");
        assert_eq!(released(lockers.end_file(1, 2, None)), [(1, 7)]);
        assert!(lockers.end_file(1, 2, None).is_empty(), "released once");
    }

    #[test]
    fn a_posix_close_ends_the_owners_locks_through_every_open_file() {
        let lockers = Lockers::default();
        lockers.taking(1, 7, 1);
        lockers.taking(1, 7, 2);
        lockers.taking(1, 8, 2);
        assert_eq!(lockers.end_owner(1, 7).map(|r| (r.node, r.owner)), Some((1, 7)));
        assert!(lockers.end_owner(1, 7).is_none(), "nothing left to release");
        assert_eq!(lockers.owners_of(2).len(), 2);
        assert_eq!(released(lockers.end_file(1, 2, None)), [(1, 8)], "owner 7's locks are already released");
        assert!(lockers.end_owner(2, 7).is_none(), "no lock on another node");
    }

    #[test]
    fn a_lock_request_waits_for_a_release_of_its_owner_on_its_way() {
        let lockers = Arc::new(Lockers::default());
        lockers.taking(1, 7, 1);
        let release = lockers.end_owner(1, 7).expect("a release");
        let (tx, rx) = std::sync::mpsc::channel();
        let taker = lockers.clone();
        std::thread::spawn(move || {
            taker.taking(1, 7, 2);
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "the lock request went ahead of the release");
        drop(release);
        rx.recv_timeout(Duration::from_secs(5)).expect("the lock request goes on once the release is done");
        assert_eq!(released(lockers.end_file(1, 2, None)), [(1, 7)]);
    }
}
