//! The locks this client holds, as the server granted them. The server keeps locks in memory
//! only, so after it restarts the client claims each again (`Request::LockReclaim`) during the
//! grace period, before anyone else may take one. A server of protocol 8 also gives away the
//! locks of a client it has not heard from for a whole lease (frozen, cut off): such a client
//! sends a request at least every half lease while it holds locks, and when a reply comes later than
//! it could trust its locks (`in_doubt`), it asks the server to confirm each before any I/O
//! relies on one. A lock the server no longer has is lost: I/O through the files of its owner
//! fails (`EIO`) until the owner lets go, as on NFS; carrying on would write under a lock that
//! another client may have taken meanwhile.
//!
//! # Correctness
//! Every lock request holds `travelling` for reading from before it is sent until its outcome
//! is recorded; a claim holds it for writing. So a claim neither misses a lock granted by
//! the new server process nor claims one whose release that process has already carried out.
//! The server drops a lock only after a lease of silence, so a reply within three quarters of
//! a lease (`trust`) of sending the previous answered request proves none was dropped between.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use braid_proto::lockset::OwnerLocks;
use braid_proto::{Handle, LockKind, LockRequest};

pub struct HeldLocks {
    table: Mutex<HashMap<(Handle, u64), OwnerLocks>>,
    travelling: RwLock<()>,
    /// `table` is not empty.
    holding: AtomicBool,
    /// The server gives away the locks of a client it has not heard from (protocol 8).
    leased: AtomicBool,
    /// Until when (microseconds after `base`) the server cannot have dropped a lock unseen.
    trusted_until_us: AtomicU64,
    base: Instant,
    /// Counts the times a reply came after `trusted_until_us` or the server restarted: the
    /// locks must then be confirmed.
    lapses: AtomicU64,
    /// `lapses` as of the start of the last confirmation that went through.
    confirmed: AtomicU64,
    /// Locks (object, owner) the server no longer has, until their owner lets go.
    lost: Mutex<HashSet<(Handle, u64)>>,
    any_lost: AtomicBool,
}

/// How a claim of one lock went, when the server answered.
pub enum Claimed {
    Held,
    /// The server does not have it for this client (any more): why, for the log.
    Lost(String),
}

impl Default for HeldLocks {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            travelling: RwLock::default(),
            holding: AtomicBool::new(false),
            leased: AtomicBool::new(false),
            trusted_until_us: AtomicU64::new(0),
            base: Instant::now(),
            lapses: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            lost: Mutex::default(),
            any_lost: AtomicBool::new(false),
        }
    }
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
        self.holding.store(!table.is_empty(), Ordering::Release);
    }

    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    /// Whether the server (protocol 8 or later) gives away the locks of silent clients.
    pub fn set_leased(&self, leased: bool) {
        self.leased.store(leased, Ordering::Release);
    }

    pub fn leased(&self) -> bool {
        self.leased.load(Ordering::Acquire)
    }

    /// A reply came to a request sent at `sent`: the server heard from this client then, and
    /// keeps its locks for `trust` at least after that (its lease, less a margin).
    pub fn answered(&self, sent: Instant, trust: Duration) {
        let now = self.micros(Instant::now());
        if self.leased() && self.holding() && now > self.trusted_until_us.load(Ordering::Acquire) {
            self.doubt();
        }
        self.trusted_until_us.fetch_max(self.micros(sent + trust), Ordering::AcqRel);
    }

    /// The server restarted: what it holds must be claimed again.
    pub fn doubt(&self) {
        self.lapses.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether some held lock may have been dropped by the server unseen.
    pub fn in_doubt(&self) -> bool {
        let lapsed = self.lapses.load(Ordering::Acquire) != self.confirmed.load(Ordering::Acquire);
        self.holding() && (lapsed || self.expired())
    }

    /// How much longer the server keeps this client's locks for sure, counting from the last
    /// request it answered.
    pub fn trusted_for(&self) -> Duration {
        let until = self.trusted_until_us.load(Ordering::Acquire);
        Duration::from_micros(until.saturating_sub(self.micros(Instant::now())))
    }

    fn expired(&self) -> bool {
        self.leased() && self.micros(Instant::now()) > self.trusted_until_us.load(Ordering::Acquire)
    }

    /// Whether I/O must ask `is_lost` first: a lock is lost or in doubt.
    pub fn in_question(&self) -> bool {
        self.any_lost.load(Ordering::Acquire) || self.in_doubt()
    }

    pub fn is_lost(&self, handle: &Handle, owner: u64) -> bool {
        self.any_lost.load(Ordering::Acquire) && self.lost.lock().expect("lost locks lock").contains(&(handle.clone(), owner))
    }

    /// `owner` let go of `handle` (it closed it): I/O through it no longer relies on a lock.
    pub fn forget_lost(&self, handle: &Handle, owner: u64) {
        if self.any_lost.load(Ordering::Acquire) {
            let mut lost = self.lost.lock().expect("lost locks lock");
            lost.remove(&(handle.clone(), owner));
            self.any_lost.store(!lost.is_empty(), Ordering::Release);
        }
    }

    /// While a lock may have been dropped unseen: `heartbeat` (a request whose reply clears
    /// the doubt about what came before it), then every held lock claimed again through
    /// `claim`, with no other lock request travelling meanwhile. A lock the server does not
    /// have is forgotten, marked lost and reported. The locks stay in doubt until the claims
    /// are done (I/O meanwhile waits for them), and after them if another lapse came
    /// meanwhile; also after an error of the transport, which ends the confirmation.
    pub fn confirm_all<E>(
        &self,
        mut heartbeat: impl FnMut() -> Result<(), E>,
        mut claim: impl FnMut(&LockRequest) -> Result<Claimed, E>,
    ) -> Result<(), E> {
        let _alone = self.travelling.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        while self.in_doubt() {
            heartbeat()?;
            let lapses = self.lapses.load(Ordering::Acquire);
            for request in self.held_requests() {
                if let Claimed::Lost(why) = claim(&request)? {
                    self.lose(request, &why);
                }
            }
            self.confirmed.store(lapses, Ordering::Release);
        }
        Ok(())
    }

    fn held_requests(&self) -> Vec<LockRequest> {
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
    }

    fn lose(&self, request: LockRequest, why: &str) {
        tracing::error!(
            owner = request.owner,
            start = request.start,
            end = request.end,
            pid = request.pid,
            why,
            "a lock is lost (the server restarted or did not hear from this client for a lease): \
             I/O of its owner on the file fails until it closes it"
        );
        let mut lost = self.lost.lock().expect("lost locks lock");
        lost.insert((request.handle.clone(), request.owner));
        self.any_lost.store(true, Ordering::Release);
        drop(lost);
        self.granted(&LockRequest { kind: LockKind::Unlock, ..request });
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
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
    fn what_is_held_is_reclaimed_and_what_cannot_be_is_lost() {
        let held = HeldLocks::default();
        held.granted(&request(1, LockKind::Write, 0, 99));
        held.granted(&request(1, LockKind::Unlock, 10, 19));
        held.granted(&request(2, LockKind::Read, 5, 5));
        held.granted(&request(3, LockKind::Read, 7, 7));
        held.granted(&request(3, LockKind::Unlock, 0, u64::MAX));
        held.doubt();
        let mut claimed = Vec::new();
        let mut heartbeats = 0;
        let confirmed = held.confirm_all(
            || {
                heartbeats += 1;
                Ok::<_, ()>(())
            },
            |r| {
                claimed.push((r.owner, r.kind, r.start, r.end));
                Ok(if r.owner == 2 { Claimed::Lost("conflict".into()) } else { Claimed::Held })
            },
        );
        assert_eq!((confirmed, heartbeats), (Ok(()), 1));
        claimed.sort_by_key(|&(owner, _, start, _)| (owner, start));
        assert_eq!(claimed, [(1, LockKind::Write, 0, 9), (1, LockKind::Write, 20, 99), (2, LockKind::Read, 5, 5)]);
        assert_eq!(held.held(), [(1, LockKind::Write, 0, 9), (1, LockKind::Write, 20, 99)], "owner 2's lock is lost");
        let handle = Handle(vec![1]);
        assert!(held.in_question() && held.is_lost(&handle, 2) && !held.is_lost(&handle, 1));
        held.forget_lost(&handle, 2);
        assert!(!held.in_question() && !held.is_lost(&handle, 2), "owner 2 let go");
    }

    #[test]
    fn a_reply_later_than_the_locks_were_trusted_puts_them_in_doubt() {
        // Goal: the server of protocol 8 gives away the locks of a client silent for a lease;
        // a reply that comes after the trust of the last one ran out may follow such a loss.
        let held = HeldLocks::default();
        let trust = Duration::from_millis(30);
        held.answered(Instant::now(), trust);
        held.granted(&request(1, LockKind::Write, 0, 9));
        assert!(!held.in_doubt(), "an older server never drops locks of a silent client");
        held.set_leased(true);
        held.answered(Instant::now(), trust);
        assert!(!held.in_doubt(), "a reply within the trust");
        std::thread::sleep(trust * 2);
        assert!(held.in_doubt(), "the trust ran out");
        held.answered(Instant::now(), trust);
        assert!(held.in_doubt(), "a reply after the trust ran out does not end the doubt");
        let unreachable = held.confirm_all(|| Err("unreachable"), |_| Ok(Claimed::Held));
        assert_eq!(unreachable, Err("unreachable"));
        assert!(held.in_doubt(), "still in doubt when the server cannot be asked");
        let heartbeat = || {
            held.answered(Instant::now(), trust);
            Ok::<_, ()>(())
        };
        let claim = |_: &LockRequest| {
            assert!(held.in_doubt(), "in doubt until every lock is confirmed (I/O meanwhile waits)");
            Ok(Claimed::Held)
        };
        held.confirm_all(heartbeat, claim).unwrap();
        assert!(!held.in_doubt() && !held.is_lost(&Handle(vec![1]), 1), "confirmed");
    }

    #[test]
    fn the_trust_left_counts_from_the_last_request_answered() {
        // Goal: the renewal thread sends a heartbeat only when no request was answered lately;
        // what it reads is the trust left after the latest send that was answered.
        let held = HeldLocks::default();
        assert_eq!(held.trusted_for(), Duration::ZERO, "nothing answered yet");
        let sent = Instant::now();
        held.answered(sent, Duration::from_secs(7));
        held.answered(sent - Duration::from_secs(5), Duration::from_secs(7));
        let left = held.trusted_for();
        assert!(left > Duration::from_secs(6) && left <= Duration::from_secs(7), "{left:?}: an older answer changes nothing");
    }
}
