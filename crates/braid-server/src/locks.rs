//! Byte-range locks arbitrated by the server, so that processes on different clients exclude
//! each other. POSIX semantics: an owner's locks on one object merge and split like `fcntl`
//! locks (`braid_proto::lockset`); locks of different owners
//! conflict when they overlap and one of them is a write lock. `flock` and OFD locks are the
//! same thing with the open file as owner and the whole file as range (as NFS does it).
//!
//! An owner is (client, the client's owner id): owners of different clients never mix.
//!
//! Deadlocks: the server does not queue waiters (a client retries a conflict), but it remembers
//! for a moment whom each waiting owner waits for, and refuses a wait that would close a cycle
//! (`EDEADLK`, as the kernel does for local POSIX locks; here for every kind, as on NFS, where
//! `flock` is a byte-range lock too).
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use braid_proto::lockset::{LockRange, OwnerLocks};
use braid_proto::{ClientId, Handle, LockHeld, LockKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub client: ClientId,
    pub id: u64,
}

/// How long an owner is remembered as waiting after its last try. A waiting client retries at
/// least every 50 ms; an owner that stopped waiting (its process was signalled) without taking
/// the lock is forgotten after this, and until then may make another owner's wait look like a
/// deadlock.
pub const WAIT_REMEMBERED: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct LockTable {
    objects: HashMap<Handle, HashMap<Owner, OwnerLocks>>,
    /// Owners whose last request conflicted and who wait: the owners they wait for.
    waiting: HashMap<Owner, Waiting>,
}

/// What a waiting owner asked for: whom it waits for is worked out from the table when asked,
/// so that an owner who has let go since is not taken for one still waited for.
struct Waiting {
    handle: Handle,
    wanted: Wanted,
    until: Instant,
}

/// A wait that would never end: the owners waited for wait, directly or through others, for
/// the one that would wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlock;

/// What a lock request asks for, once decoded.
#[derive(Clone)]
pub struct Wanted {
    pub owner: Owner,
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

impl LockTable {
    /// The locks of other owners that `wanted` conflicts with (none for an unlock).
    fn conflicting<'t>(&'t self, handle: &Handle, wanted: &'t Wanted) -> impl Iterator<Item = (Owner, &'t LockRange)> {
        let write = wanted.kind == LockKind::Write;
        let owners = match wanted.kind {
            LockKind::Unlock => None,
            _ => self.objects.get(handle),
        };
        owners
            .into_iter()
            .flatten()
            .filter(move |(owner, _)| **owner != wanted.owner)
            .flat_map(|(owner, locks)| locks.ranges().iter().map(move |r| (*owner, r)))
            .filter(move |(_, r)| (write || r.write) && r.overlaps(wanted.start, wanted.end))
    }

    /// The first lock of another owner that `wanted` conflicts with.
    pub fn conflict(&self, handle: &Handle, wanted: &Wanted) -> Option<LockHeld> {
        self.conflicting(handle, wanted).next().map(|(owner, r)| LockHeld {
            kind: r.kind(),
            start: r.start,
            end: r.end,
            pid: r.pid,
            mine: owner.client == wanted.owner.client,
        })
    }

    /// Takes, converts or releases `wanted` if nobody else conflicts; else returns the conflict.
    pub fn set(&mut self, handle: &Handle, wanted: &Wanted) -> Result<(), LockHeld> {
        if let Some(held) = self.conflict(handle, wanted) {
            return Err(held);
        }
        self.waiting.remove(&wanted.owner);
        let owners = self.objects.entry(handle.clone()).or_default();
        let locks = owners.entry(wanted.owner).or_default();
        locks.apply(wanted.kind, wanted.start, wanted.end, wanted.pid);
        if locks.is_empty() {
            owners.remove(&wanted.owner);
        }
        if owners.is_empty() {
            self.objects.remove(handle);
        }
        Ok(())
    }

    /// Records that `wanted.owner` waits for the owners whose locks conflict with `wanted`,
    /// unless one of them waits, directly or through others, for `wanted.owner`.
    pub fn wait(&mut self, handle: &Handle, wanted: &Wanted, now: Instant) -> Result<(), Deadlock> {
        self.waiting.retain(|_, w| w.until > now);
        let blockers: Vec<Owner> = self.conflicting(handle, wanted).map(|(owner, _)| owner).collect();
        if self.waits_for(blockers, wanted.owner) {
            self.waiting.remove(&wanted.owner);
            return Err(Deadlock);
        }
        self.waiting.insert(wanted.owner, Waiting { handle: handle.clone(), wanted: wanted.clone(), until: now + WAIT_REMEMBERED });
        Ok(())
    }

    /// Whether any of `owners` waits, directly or through other waiting owners, for `target`:
    /// a waiting owner waits for the owners whose locks conflict with what it asked for now.
    fn waits_for(&self, owners: Vec<Owner>, target: Owner) -> bool {
        let mut seen = HashSet::new();
        let mut next = owners;
        while let Some(owner) = next.pop() {
            if owner == target {
                return true;
            }
            if !seen.insert(owner) {
                continue;
            }
            if let Some(w) = self.waiting.get(&owner) {
                next.extend(self.conflicting(&w.handle, &w.wanted).map(|(blocker, _)| blocker));
            }
        }
        false
    }

    /// How many ranges are held on `handle`, over all owners.
    pub fn ranges(&self, handle: &Handle) -> usize {
        self.objects.get(handle).map_or(0, |owners| owners.values().map(|locks| locks.ranges().len()).sum())
    }

    /// Whether `wanted.owner` holds all of `wanted`'s range with `wanted`'s kind.
    pub fn holds(&self, handle: &Handle, wanted: &Wanted) -> bool {
        let held = self.objects.get(handle).and_then(|owners| owners.get(&wanted.owner));
        held.is_some_and(|locks| locks.covers(wanted.kind, wanted.start, wanted.end))
    }

    /// Drops every lock of `client` (it unmounted, or vanished for longer than its lease).
    pub fn release_client(&mut self, client: ClientId) {
        self.objects.retain(|_, owners| {
            owners.retain(|owner, _| owner.client != client);
            !owners.is_empty()
        });
        self.waiting.retain(|owner, _| owner.client != client);
    }

    /// The clients holding a lock that conflicts with `wanted`.
    pub fn conflicting_clients(&self, handle: &Handle, wanted: &Wanted) -> Vec<ClientId> {
        self.conflicting(handle, wanted).map(|(owner, _)| owner.client).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(client: u64, id: u64) -> Owner {
        Owner { client: ClientId(client), id }
    }

    fn want(owner: Owner, kind: LockKind, start: u64, end: u64) -> Wanted {
        Wanted { owner, kind, start, end, pid: 7 }
    }

    #[test]
    fn writers_exclude_everyone_readers_share() {
        // Goal: the POSIX conflict matrix, across clients and across owners of one client.
        let h = Handle(vec![1]);
        let mut t = LockTable::default();
        let (a, b, a2) = (owner(1, 1), owner(2, 1), owner(1, 2));
        t.set(&h, &want(a, LockKind::Read, 0, 99)).unwrap();
        t.set(&h, &want(b, LockKind::Read, 50, 150)).unwrap();
        assert!(t.set(&h, &want(b, LockKind::Write, 0, 10)).is_err(), "write over a's read");
        assert!(t.set(&h, &want(a2, LockKind::Write, 120, 130)).is_err(), "other owner of client 1 over b's read");
        t.set(&h, &want(a2, LockKind::Write, 151, 200)).unwrap();
        let held = t.conflict(&h, &want(b, LockKind::Read, 160, 160)).unwrap();
        assert_eq!((held.kind, held.start, held.end), (LockKind::Write, 151, 200));
    }

    #[test]
    fn an_owner_splits_converts_and_releases_its_own_ranges() {
        // Goal: fcntl semantics within one owner: unlock in the middle splits, a new type
        // replaces the overlapped part, and neighbours of the same type merge.
        let h = Handle(vec![2]);
        let mut t = LockTable::default();
        let (a, b) = (owner(1, 1), owner(2, 9));
        t.set(&h, &want(a, LockKind::Write, 0, 99)).unwrap();
        t.set(&h, &want(a, LockKind::Unlock, 40, 59)).unwrap();
        t.set(&h, &want(b, LockKind::Write, 40, 59)).unwrap();
        assert!(t.set(&h, &want(b, LockKind::Write, 39, 39)).is_err());
        assert!(t.set(&h, &want(b, LockKind::Write, 60, 60)).is_err());
        t.set(&h, &want(b, LockKind::Unlock, 0, u64::MAX)).unwrap();
        t.set(&h, &want(a, LockKind::Read, 40, 59)).unwrap();
        t.set(&h, &want(a, LockKind::Read, 0, 99)).unwrap();
        assert_eq!(t.ranges(&h), 1, "merged into one read range");
        assert!(t.set(&h, &want(b, LockKind::Read, 0, 99)).is_ok(), "readers share");
        t.set(&h, &want(b, LockKind::Unlock, 0, u64::MAX)).unwrap();
        t.set(&h, &want(a, LockKind::Unlock, 0, u64::MAX)).unwrap();
        assert!(t.objects.is_empty(), "no empty entries left behind");
    }

    #[test]
    fn a_departed_client_loses_its_locks() {
        let h = Handle(vec![3]);
        let mut t = LockTable::default();
        t.set(&h, &want(owner(1, 1), LockKind::Write, 0, u64::MAX)).unwrap();
        assert_eq!(t.conflicting_clients(&h, &want(owner(2, 1), LockKind::Read, 5, 5)), vec![ClientId(1)]);
        t.release_client(ClientId(1));
        assert!(t.set(&h, &want(owner(2, 1), LockKind::Write, 0, u64::MAX)).is_ok());
    }

    #[test]
    fn a_wait_that_closes_a_cycle_is_refused_and_others_are_not() {
        // Goal: EDEADLK exactly when the owners waited for wait (through others too) for the
        // asker; across clients, since each client only sees its own owners.
        let (h1, h2, h3) = (Handle(vec![4]), Handle(vec![5]), Handle(vec![6]));
        let mut t = LockTable::default();
        let (a, b, c) = (owner(1, 1), owner(2, 1), owner(3, 1));
        let now = Instant::now();
        t.set(&h1, &want(a, LockKind::Write, 0, 0)).unwrap();
        t.set(&h2, &want(b, LockKind::Write, 0, 0)).unwrap();
        t.set(&h3, &want(c, LockKind::Write, 0, 0)).unwrap();
        assert_eq!(t.wait(&h2, &want(a, LockKind::Write, 0, 0), now), Ok(()), "a waits for b");
        assert_eq!(t.wait(&h3, &want(b, LockKind::Write, 0, 0), now), Ok(()), "b waits for c");
        assert_eq!(t.wait(&h1, &want(c, LockKind::Write, 0, 0), now), Err(Deadlock), "c would wait for a, who waits for c");
        assert_eq!(t.wait(&h1, &want(owner(4, 1), LockKind::Write, 0, 0), now), Ok(()), "a bystander may wait for a");
        assert_eq!(t.wait(&h1, &want(c, LockKind::Read, 5, 9), now), Ok(()), "no conflict, nobody waited for");
        t.set(&h3, &want(c, LockKind::Unlock, 0, u64::MAX)).unwrap();
        assert_eq!(t.wait(&h1, &want(c, LockKind::Write, 0, 0), now), Ok(()), "b waits for c no more: c let go of what b asked for");
    }

    #[test]
    fn waits_are_forgotten_when_granted_or_stale() {
        let (h1, h2) = (Handle(vec![7]), Handle(vec![8]));
        let mut t = LockTable::default();
        let (a, b) = (owner(1, 1), owner(2, 1));
        let now = Instant::now();
        t.set(&h1, &want(a, LockKind::Write, 0, 0)).unwrap();
        t.set(&h2, &want(b, LockKind::Write, 0, 0)).unwrap();
        t.wait(&h2, &want(a, LockKind::Write, 0, 0), now).unwrap();
        assert_eq!(t.wait(&h1, &want(b, LockKind::Write, 0, 0), now + WAIT_REMEMBERED / 2), Err(Deadlock));
        let later = now + WAIT_REMEMBERED;
        assert_eq!(t.wait(&h1, &want(b, LockKind::Write, 0, 0), later), Ok(()), "a stopped waiting long ago");
        assert_eq!(t.wait(&h2, &want(a, LockKind::Write, 0, 0), later), Err(Deadlock), "b waits for a now");
        t.set(&h1, &want(a, LockKind::Unlock, 0, u64::MAX)).unwrap();
        t.set(&h1, &want(b, LockKind::Write, 0, 0)).unwrap();
        assert!(t.waiting.is_empty(), "granted: b waits no more");
        t.wait(&h1, &want(a, LockKind::Write, 0, 0), later).unwrap();
        t.release_client(ClientId(1));
        assert!(t.waiting.is_empty(), "a departed client waits for nothing");
    }
}
