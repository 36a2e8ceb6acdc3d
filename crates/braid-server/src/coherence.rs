//! Rights (leases) of clients on objects, their recall, and the lock table.
//!
//! A client may cache what a response told it about an object (attributes, a name, data, a
//! directory listing) while it holds a right on the object. Every read-type response grants
//! rights on the objects it names, and so does a transaction to the client that made it. A
//! right lasts one lease unless recalled: before a transaction of client B changes an object,
//! every other client holding a right on it is sent a recall and the change waits until each
//! has acknowledged (its kernel caches are clean) or its lease has run out. A client that
//! vanished therefore delays others by at most one lease.
//!
//! # Correctness
//! A right must never be granted on state a concurrent change is about to make stale. Every
//! change bumps the epoch when it begins and marks its objects busy, and bumps it again when it
//! ends, stamping its objects with that epoch. A grant is refused (the response says "do not
//! cache") when one of its objects is busy with another client's change or carries a stamp of
//! another client newer than the read's start: the read may have seen the state before. Object
//! entries that a read in flight could still need for this check are kept until no such read
//! remains.
//!
//! When only one client is subscribed, its own changes recall nothing and need not name their
//! objects (the fast path, which costs no lookups): a second client subscribing waits until
//! fast-path changes in flight are done, and its reads begun before then get no rights.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use braid_proto::limits::LOCK_RANGES_PER_OBJECT_MAX;
use braid_proto::{Callback, ClientId, Handle, Invalidation, LockHeld, LockKind};

use crate::locks::{Deadlock, LockTable, Wanted};

/// How a lock request is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Taken if free, else answered with the conflict.
    Take,
    /// As `Take`, and the owner waits (it retries): see `locks` on deadlocks.
    Wait,
    /// A lock the client holds, claimed again: taken during the grace period after a restart
    /// (the previous server process granted it), confirmed if still held otherwise.
    Reclaim,
}

/// Why a lock request is refused outright (rather than answered with the conflicting lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockRefused {
    /// The object already has `LOCK_RANGES_PER_OBJECT_MAX` lock ranges.
    TableFull,
    /// The asker would wait for owners that wait for it (see `locks`).
    Deadlock,
    /// A reclaim, after the grace period, of a lock the owner does not hold: it lost it.
    NotHeld,
}

/// The conflict reported during the grace period after a restart, to every request that would
/// take a lock: any lock may still be reclaimed by a client of the previous process.
const HELD_BEFORE_THE_RESTART: LockHeld = LockHeld { kind: LockKind::Write, start: 0, end: u64::MAX, pid: 0, mine: false };

/// Delivers a callback to a subscribed client; false if it cannot (connection gone or full).
pub type Sink = Arc<dyn Fn(u64, &Callback) -> bool + Send + Sync>;

pub struct Coherence {
    lease: Duration,
    /// Woken whenever a lock is taken, changed or released: waiting owners try again.
    locks_changed: Arc<tokio::sync::Notify>,
    /// Until then, changes and reads wait: clients of the previous server process may still
    /// cache.
    grace_until: Option<Instant>,
    /// Every awaited client reclaimed before `grace_until`.
    grace_ended: AtomicBool,
    /// Write-backs of changes made under rights of the previous server process, admitted
    /// during the grace period and not yet applied (see [`Reclaim`]); changed under the lock.
    reclaims: AtomicUsize,
    state: Mutex<State>,
    /// Signalled when a callback is acknowledged or a fast-path change ends.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    epoch: u64,
    subscribers: HashMap<ClientId, Subscriber>,
    objects: HashMap<Handle, Object>,
    /// Start epochs of reads in flight, with their counts.
    reads: BTreeMap<u64, usize>,
    /// Callbacks sent and not yet acknowledged.
    pending: HashMap<u64, Asked>,
    next_callback: u64,
    /// Fast-path changes in flight.
    fast_busy: usize,
    /// The clients that may hold rights of the previous server process and have not reclaimed
    /// yet; `None` if not known (the grace period then lasts a whole lease).
    awaited: Option<HashSet<ClientId>>,
    /// Connections per client, and since when a client has had none.
    presence: HashMap<ClientId, Presence>,
    locks: LockTable,
    /// When expired rights are next swept out of `objects`.
    next_sweep: Option<Instant>,
    /// Clients granted exclusive rights, and when the last of them ends: their reads and
    /// changes cannot take the fast path.
    exclusive_until: HashMap<ClientId, Instant>,
}

struct Subscriber {
    session: u64,
    /// Reads begun before this epoch get no rights.
    since: u64,
    sink: Sink,
}

#[derive(Default)]
struct Presence {
    connections: usize,
    gone_since: Option<Instant>,
    heard: Arc<Heard>,
    /// The client speaks protocol version 8 or later: it is heard from at least every
    /// half lease while it holds locks, so silence means it is frozen or cut off.
    heard_while_locking: bool,
}

impl Presence {
    /// Whether the client is gone, or silent, for so long that its locks may be given away.
    fn departed(&self, now: Instant, lease: Duration) -> bool {
        let gone = self.gone_since.is_some_and(|t| now.duration_since(t) >= lease);
        gone || (self.heard_while_locking && self.heard.silent_for() >= lease)
    }
}

/// When the server last heard from a client (a request read on any of its connections).
#[derive(Debug)]
pub struct Heard {
    base: Instant,
    /// Milliseconds after `base`.
    at_ms: AtomicU64,
}

impl Default for Heard {
    fn default() -> Self {
        Self { base: Instant::now(), at_ms: AtomicU64::new(0) }
    }
}

impl Heard {
    pub fn now(&self) {
        self.at_ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.base.elapsed().saturating_sub(Duration::from_millis(self.at_ms.load(Ordering::Relaxed)))
    }
}

/// A callback waited for: until its client acknowledges it or its lease ends, the client may
/// still write back changes it made under its exclusive rights on these objects.
struct Asked {
    client: ClientId,
    handles: Vec<Handle>,
    until: Instant,
}

impl Asked {
    fn covers(&self, client: ClientId, handle: &Handle, now: Instant) -> bool {
        self.client == client && self.until > now && self.handles.contains(handle)
    }
}

/// A callback sent, or that could not be: waited for until acknowledged or `until`.
struct Wait {
    holder: ClientId,
    /// `None`: undeliverable.
    id: Option<u64>,
    until: Instant,
}

impl Wait {
    fn unanswered(&self, state: &State) -> bool {
        self.id.is_none_or(|id| state.pending.contains_key(&id))
    }
}

/// One client's right on one object.
#[derive(Debug, Clone, Copy)]
struct Right {
    until: Instant,
    /// No other client holds a right: the holder may change the object in its cache.
    exclusive: bool,
}

/// What a response may tell its client about the objects it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Nothing may be cached.
    None,
    Shared,
    Exclusive,
}

impl Grant {
    pub fn leased(self) -> bool {
        self != Grant::None
    }

    pub fn exclusive(self) -> bool {
        self == Grant::Exclusive
    }
}

#[derive(Default)]
struct Object {
    holders: HashMap<ClientId, Right>,
    /// Until then no exclusive right is granted: several clients used the object lately, and
    /// handing it back and forth would cost a recall per change.
    contended_until: Option<Instant>,
    /// Clients with a change of this object in flight (a client may have several).
    busy: Vec<ClientId>,
    /// Epoch of the last change and who made it.
    changed_at: u64,
    changed_by: Option<ClientId>,
}

/// A write-back, admitted during the grace period after a restart, of changes its client made
/// in its cache under exclusive rights of the previous server process. No other client can
/// have changed those objects since (every other change waits for the grace period), and
/// the changes were made before any change waiting now: so they go first, and other changes
/// wait until every admitted reclaim has been applied. Ends when dropped.
#[must_use]
pub struct Reclaim<'c> {
    coherence: &'c Coherence,
}

impl Drop for Reclaim<'_> {
    fn drop(&mut self) {
        // Under the lock, so that a change checking for reclaims before it waits is woken.
        let _state = self.coherence.lock();
        let before = self.coherence.reclaims.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "a reclaim ends twice");
        self.coherence.changed.notify_all();
    }
}

/// Which server process granted the rights a write-back's changes were made under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granter {
    ThisProcess,
    /// A process before a restart: this one knows nothing of its rights.
    Earlier,
}

/// A read in flight: rights for what it read are granted only if nothing changed meanwhile.
#[must_use]
pub struct ReadTicket {
    epoch: u64,
}

/// A change in flight; pass it to [`Coherence::end_change`] once applied.
#[must_use]
pub struct Change {
    client: ClientId,
    /// `None` on the fast path.
    busy: Option<Vec<Handle>>,
    ticket: ReadTicket,
}

impl Coherence {
    /// `after_restart`: clients of an earlier server process may still hold rights it granted;
    /// changes and reads then wait one lease (the grace period), or until each client of
    /// [`Self::awaiting`] has reclaimed.
    pub fn new(lease: Duration, after_restart: bool) -> Self {
        let grace_until = after_restart.then(|| Instant::now() + lease);
        let locks_changed = Arc::new(tokio::sync::Notify::new());
        Self {
            lease,
            locks_changed,
            grace_until,
            grace_ended: AtomicBool::new(false),
            reclaims: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    /// The clients that may hold rights of the previous process: the grace period ends as soon
    /// as each has said it reclaimed (`reclaim_done`). Without this, nobody is known, and the
    /// grace period lasts its whole lease.
    pub fn awaiting(mut self, clients: HashSet<ClientId>) -> Self {
        if clients.is_empty() {
            self.grace_ended.store(true, Ordering::Release);
        }
        self.state.get_mut().expect("coherence lock").awaited = Some(clients);
        self
    }

    /// Whether changes and reads must still wait for the rights of a previous server process:
    /// until they have expired, or each client that may hold one has reclaimed.
    pub fn in_grace(&self) -> bool {
        !self.grace_ended.load(Ordering::Acquire) && self.grace_until.is_some_and(|until| Instant::now() < until)
    }

    /// `client` has written back everything it changed under rights of the previous process
    /// and claimed its locks again (or gave up its rights): the grace period no longer waits
    /// for it, and ends if it waited for nobody else.
    pub fn reclaim_done(&self, client: ClientId) {
        let mut state = self.lock();
        let Some(awaited) = state.awaited.as_mut() else { return };
        if awaited.remove(&client) && awaited.is_empty() && self.in_grace() {
            self.grace_ended.store(true, Ordering::Release);
            tracing::info!("every client of the previous server process has reclaimed: the grace period is over");
            self.changed.notify_all();
            self.locks_changed.notify_waiters();
        }
    }

    /// Admits a write-back of changes made under rights of the previous server process ahead
    /// of every other change, if the grace period is still on; `None` once it is over (the
    /// write-back is then a change like any other, fenced like any other).
    pub fn reclaim(&self) -> Option<Reclaim<'_>> {
        let _state = self.lock();
        if !self.in_grace() {
            return None;
        }
        self.reclaims.fetch_add(1, Ordering::AcqRel);
        Some(Reclaim { coherence: self })
    }

    /// Whether a change or read begun now would wait: the grace period is on, or reclaims
    /// admitted during it are still being applied.
    pub fn changes_wait(&self) -> bool {
        self.in_grace() || self.reclaims.load(Ordering::Acquire) > 0
    }

    /// Returns once a read may see what clients of the previous process changed in their
    /// caches: the grace period is over and every reclaim admitted during it was applied.
    pub fn wait_out_grace(&self) {
        if self.changes_wait() {
            drop(self.lock_for_change(None));
        }
    }

    /// Locks the state once changes may begin: the grace period is over and every reclaim
    /// admitted during it has been applied. A `reclaim` begins at once.
    fn lock_for_change(&self, reclaim: Option<&Reclaim<'_>>) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        let Some(until) = self.grace_until.filter(|_| reclaim.is_none()) else { return state };
        let mut logged = false;
        while self.changes_wait() {
            let left = until.saturating_duration_since(Instant::now());
            if !logged {
                let reclaims = self.reclaims.load(Ordering::Acquire);
                tracing::info!(wait_ms = left.as_millis() as u64, reclaims, "waiting for the grace period after a restart");
                logged = true;
            }
            // Woken when a reclaim ends or the last awaited client reclaimed; the end of the
            // grace period is waited out.
            let wait = if left.is_zero() { self.lease } else { left };
            state = self.changed.wait_timeout(state, wait).expect("coherence lock").0;
        }
        state
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("coherence lock")
    }

    /// Makes `sink` the callback channel of `client` (replacing an older one). Waits for
    /// fast-path changes in flight, which recalled nothing from anyone.
    pub fn subscribe(&self, client: ClientId, session: u64, sink: Sink) {
        let mut state = self.lock();
        while state.fast_busy > 0 {
            state = self.changed.wait(state).expect("coherence lock");
        }
        let since = state.epoch;
        state.subscribers.insert(client, Subscriber { session, since, sink });
        tracing::debug!(client = client.0, session, "subscribed");
    }

    /// The callback connection `session` of `client` closed. Its rights stay until they expire:
    /// the client may still be caching (a network failure, not an unmount).
    pub fn session_closed(&self, client: ClientId, session: u64) {
        let mut state = self.lock();
        if state.subscribers.get(&client).is_some_and(|s| s.session == session) {
            state.subscribers.remove(&client);
        }
    }

    /// The client dropped all its rights and locks (clean unmount).
    pub fn unsubscribe(&self, client: ClientId) {
        let mut state = self.lock();
        state.subscribers.remove(&client);
        state.exclusive_until.remove(&client);
        for object in state.objects.values_mut() {
            object.holders.remove(&client);
        }
        state.locks.release_client(client);
        self.locks_changed.notify_waiters();
    }

    /// Woken whenever a lock is taken, changed or released; a waiting owner enables its
    /// `notified()` before it tries, so that no change between its try and its wait is missed.
    pub fn locks_changed(&self) -> Arc<tokio::sync::Notify> {
        self.locks_changed.clone()
    }

    pub fn callback_done(&self, id: u64) {
        if self.lock().pending.remove(&id).is_some() {
            self.changed.notify_all();
        }
    }

    /// A connection of `client` opened, speaking protocol `version`; its session stamps the
    /// returned `Heard` at every request.
    pub fn connected(&self, client: ClientId, version: u16) -> Arc<Heard> {
        let mut state = self.lock();
        let presence = state.presence.entry(client).or_default();
        presence.connections += 1;
        presence.gone_since = None;
        presence.heard_while_locking |= version >= braid_proto::LOCK_LEASE_VERSION;
        presence.heard.now();
        presence.heard.clone()
    }

    pub fn disconnected(&self, client: ClientId) {
        let mut state = self.lock();
        let presence = state.presence.entry(client).or_default();
        presence.connections = presence.connections.saturating_sub(1);
        if presence.connections == 0 {
            presence.gone_since = Some(Instant::now());
        }
    }

    /// Ends a read that grants nothing (it failed).
    pub fn cancel_read(&self, ticket: ReadTicket) {
        end_read(&mut self.lock(), ticket);
    }

    /// Call before reading state that a response will grant rights on.
    pub fn begin_read(&self) -> ReadTicket {
        begin_read_locked(&mut self.lock())
    }

    /// Grants `client` shared rights on `handles` unless something they name changed since
    /// `ticket` was taken (an exclusive right the client holds stays exclusive).
    pub fn grant<'h>(&self, ticket: ReadTicket, client: ClientId, handles: impl IntoIterator<Item = &'h Handle>) -> Grant {
        let mut state = self.lock();
        let granted = self.grant_locked(&mut state, &ticket, client, handles, false);
        end_read(&mut state, ticket);
        granted
    }

    /// Grants rights as [`Self::grant`]; exclusive ones if `exclusive` is wanted and nobody
    /// else holds or lately used any of `handles`.
    fn grant_locked<'h>(
        &self,
        state: &mut State,
        ticket: &ReadTicket,
        client: ClientId,
        handles: impl IntoIterator<Item = &'h Handle>,
        exclusive: bool,
    ) -> Grant {
        if state.subscribers.get(&client).is_none_or(|s| s.since > ticket.epoch) {
            return Grant::None;
        }
        let handles: Vec<&Handle> = handles.into_iter().collect();
        let stale = |o: &Object| o.busy.iter().any(|c| *c != client) || (o.changed_at > ticket.epoch && o.changed_by != Some(client));
        if handles.iter().any(|h| state.objects.get(*h).is_some_and(stale)) {
            return Grant::None;
        }
        let now = Instant::now();
        let until = now + self.lease;
        let alone = |o: &Object| {
            o.contended_until.is_none_or(|t| t <= now) && o.holders.iter().all(|(c, right)| *c == client || right.until <= now)
        };
        let exclusive = exclusive && handles.iter().all(|h| state.objects.get(*h).is_none_or(alone));
        for handle in handles {
            let holders = &mut state.objects.entry(handle.clone()).or_default().holders;
            let held_exclusive = holders.get(&client).is_some_and(|r| r.exclusive && r.until > now);
            holders.insert(client, Right { until, exclusive: exclusive || held_exclusive });
        }
        if exclusive {
            state.exclusive_until.insert(client, until);
        }
        if state.next_sweep.is_none_or(|at| now >= at) {
            sweep(state, now);
            state.next_sweep = Some(now + self.lease);
        }
        if exclusive {
            Grant::Exclusive
        } else {
            Grant::Shared
        }
    }

    /// Extends `client`'s exclusive rights on `handles` by a lease from now, on each it still
    /// holds exclusively, that no other client's change is in flight on and that nobody else
    /// used lately; returns which were extended. A right that ended is never revived: its
    /// object may have changed since without a recall. Only a client with a callback channel
    /// is renewed, since a right it held could not be recalled otherwise.
    pub fn renew(&self, client: ClientId, handles: &[Handle]) -> Vec<bool> {
        let mut state = self.lock();
        if !state.subscribers.contains_key(&client) {
            return vec![false; handles.len()];
        }
        let now = Instant::now();
        let until = now + self.lease;
        let renewed: Vec<bool> = handles
            .iter()
            .map(|handle| {
                let Some(object) = state.objects.get_mut(handle) else { return false };
                let free = object.busy.iter().all(|c| *c == client) && object.contended_until.is_none_or(|t| t <= now);
                match object.holders.get_mut(&client) {
                    Some(right) if free && right.exclusive && right.until > now => {
                        right.until = until;
                        true
                    }
                    _ => false,
                }
            })
            .collect();
        if renewed.contains(&true) {
            let last = state.exclusive_until.entry(client).or_insert(until);
            *last = (*last).max(until);
        }
        renewed
    }

    /// Before `client` is told about `handles`: asks every other client holding one of them
    /// exclusively to write its changes back, and waits until each has (or its lease ran out).
    /// Their rights become shared. Returns whether anything was asked (the read must then be
    /// done again).
    pub fn flush_others(&self, client: ClientId, handles: &[Handle]) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        let mut flushes: HashMap<ClientId, (Vec<Handle>, Instant)> = HashMap::new();
        for handle in handles {
            let Some(object) = state.objects.get_mut(handle) else { continue };
            let mut asked = false;
            for (holder, right) in object.holders.iter_mut() {
                if *holder != client && right.exclusive && right.until > now {
                    right.exclusive = false;
                    asked = true;
                    let flush = flushes.entry(*holder).or_insert_with(|| (Vec::new(), right.until));
                    flush.0.push(handle.clone());
                    flush.1 = flush.1.max(right.until);
                }
            }
            if asked {
                object.contended_until = Some(now + self.lease);
            }
        }
        if flushes.is_empty() {
            return false;
        }
        let callbacks = flushes.into_iter().map(|(holder, (handles, until))| (holder, Callback::Flush(handles), until)).collect();
        let waits = self.send_callbacks(&mut state, callbacks);
        drop(self.wait_for(state, waits));
        true
    }

    /// Of `handles`, those on which changes `client` made in its cache may have been overtaken:
    /// it no longer holds them exclusively (its right ran out, or was taken without its
    /// acknowledgement), is not being asked to write them back (a flush or recall it may still
    /// answer), and another client changed, holds or used them since, or this server no longer
    /// remembers (its record was swept after the right ran out). Such changes must be refused:
    /// applied late, they would overwrite what the other client did. Of rights granted by an
    /// `Earlier` server process this one has no record unless somebody used the object since
    /// it started: no record then means nobody did.
    pub fn rights_lost<'h>(&self, client: ClientId, granted_by: Granter, handles: impl IntoIterator<Item = &'h Handle>) -> Vec<Handle> {
        let state = self.lock();
        let now = Instant::now();
        let mut named: Vec<&Handle> = handles.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.dedup();
        named.into_iter().filter(|handle| right_lost(&state, client, granted_by, handle, now)).cloned().collect()
    }

    /// Whether requests of `client` must name what they touch: someone else may hold rights.
    pub fn shared(&self, client: ClientId) -> bool {
        others_subscribed(&self.lock(), client)
    }

    /// Whether a client other than `client` may hold an exclusive right (a read by `client`
    /// may then have to wait for it).
    pub fn exclusive_elsewhere(&self, client: ClientId) -> bool {
        let now = Instant::now();
        self.lock().exclusive_until.iter().any(|(c, until)| *c != client && *until > now)
    }

    /// Starts a change by `client` without naming what it touches, if `client` is the only
    /// subscriber (nobody else can hold rights); `None` if it is not.
    pub fn begin_alone(&self, client: ClientId, reclaim: Option<&Reclaim<'_>>) -> Option<Change> {
        let mut state = self.lock_for_change(reclaim);
        if others_subscribed(&state, client) {
            return None;
        }
        state.fast_busy += 1;
        state.epoch += 1;
        let ticket = begin_read_locked(&mut state);
        Some(Change { client, busy: None, ticket })
    }

    /// Starts a change by `client` of `items`: recalls them from every other holder and returns
    /// once each has acknowledged or its lease has run out.
    pub fn begin_change(&self, client: ClientId, items: &[Invalidation], reclaim: Option<&Reclaim<'_>>) -> Change {
        let mut state = self.lock_for_change(reclaim);
        state.epoch += 1;
        let epoch = state.epoch;
        let now = Instant::now();
        let mut recalls: HashMap<ClientId, (Vec<Invalidation>, Instant)> = HashMap::new();
        let mut busy = Vec::with_capacity(items.len());
        for item in items {
            let handle = item.handle();
            let object = state.objects.entry(handle.clone()).or_default();
            object.busy.push(client);
            object.changed_at = epoch;
            object.changed_by = Some(client);
            busy.push(handle.clone());
            object.holders.retain(|_, right| right.until > now);
            for (holder, right) in object.holders.iter().filter(|(c, _)| **c != client) {
                let recall = recalls.entry(*holder).or_insert_with(|| (Vec::new(), right.until));
                recall.0.push(item.clone());
                recall.1 = recall.1.max(right.until);
                object.contended_until = Some(now + self.lease);
            }
        }
        // Only now: several items may name the same object, and each must reach its holders.
        // A recalled right on a file ends: the holder drops what it cached of it. A right on a
        // directory whose names change stays (shared): its holder's kernel keeps the other
        // names it looked up there, and a later change of one of them must be recalled too.
        let directories: HashSet<&Handle> = items
            .iter()
            .filter_map(|item| match item {
                Invalidation::Entry { parent, .. } => Some(parent),
                Invalidation::Object(_) => None,
            })
            .collect();
        for handle in &busy {
            if let Some(object) = state.objects.get_mut(handle) {
                if directories.contains(handle) {
                    object.holders.iter_mut().filter(|(c, _)| **c != client).for_each(|(_, right)| right.exclusive = false);
                } else {
                    object.holders.retain(|c, _| *c == client);
                }
            }
        }
        let ticket = begin_read_locked(&mut state);
        let callbacks = recalls
            .into_iter()
            .map(|(holder, (mut items, until))| {
                items.sort_by_key(|i| matches!(i, Invalidation::Object(_)));
                items.dedup();
                (holder, Callback::Recall(items), until)
            })
            .collect();
        let waits = self.send_callbacks(&mut state, callbacks);
        let (state, silent) = self.wait_for(state, waits);
        drop(self.wait_for_changes_of(state, &busy, &silent));
        Change { client, busy: Some(busy), ticket }
    }

    /// Sends each callback to its client; returns what to wait for: the callback id (if
    /// delivered) and the end of the client's lease.
    fn send_callbacks(&self, state: &mut State, callbacks: Vec<(ClientId, Callback, Instant)>) -> Vec<Wait> {
        let mut waits = Vec::with_capacity(callbacks.len());
        for (holder, callback, until) in callbacks {
            let id = state.next_callback;
            state.next_callback += 1;
            let delivered = state.subscribers.get(&holder).is_some_and(|s| (s.sink)(id, &callback));
            if delivered {
                state.pending.insert(id, Asked { client: holder, handles: callback.handles(), until });
            } else {
                tracing::debug!(client = holder.0, "callback undeliverable; waiting for the lease to run out");
            }
            waits.push(Wait { holder, id: delivered.then_some(id), until });
        }
        waits
    }

    /// Waits until each callback is acknowledged or its client's lease has ended; returns the
    /// clients that did not acknowledge.
    fn wait_for<'s>(&self, mut state: MutexGuard<'s, State>, waits: Vec<Wait>) -> (MutexGuard<'s, State>, Vec<ClientId>) {
        loop {
            let now = Instant::now();
            let open: Vec<Instant> = waits.iter().filter(|w| w.until > now && w.unanswered(&state)).map(|w| w.until).collect();
            let Some(first_end) = open.iter().min() else { break };
            state = self.changed.wait_timeout(state, *first_end - now).expect("coherence lock").0;
        }
        let silent = waits.iter().filter(|w| w.unanswered(&state)).map(|w| w.holder).collect();
        for id in waits.iter().filter_map(|w| w.id) {
            state.pending.remove(&id);
        }
        (state, silent)
    }

    /// Waits until no change of `holders` (clients whose rights on `handles` ended without
    /// their acknowledgement) is in flight on `handles`. Such a change began while their right
    /// still held (it passed the write-back fence), so it comes first; applied after the change
    /// that waited for them, it would overwrite it. Waits two leases at most: that change may
    /// itself wait for a recall from a client that vanished.
    fn wait_for_changes_of<'s>(&self, mut state: MutexGuard<'s, State>, handles: &[Handle], holders: &[ClientId]) -> MutexGuard<'s, State> {
        let deadline = Instant::now() + 2 * self.lease;
        loop {
            let theirs = |o: &Object| o.busy.iter().any(|c| holders.contains(c));
            let in_flight = !holders.is_empty() && handles.iter().any(|h| state.objects.get(h).is_some_and(theirs));
            let now = Instant::now();
            if !in_flight || now >= deadline {
                return state;
            }
            state = self.changed.wait_timeout(state, deadline - now).expect("coherence lock").0;
        }
    }

    /// Ends `change`, granting its client rights on `touched` (what its response names):
    /// exclusive ones where nobody else holds or lately used them.
    pub fn end_change<'h>(&self, change: Change, touched: impl IntoIterator<Item = &'h Handle>) -> Grant {
        let mut state = self.lock();
        match &change.busy {
            None => {
                state.fast_busy -= 1;
                state.epoch += 1;
                self.changed.notify_all();
            }
            Some(busy) => {
                // A read that began before this point may have seen the state before the change:
                // stamping the change with a new epoch makes its grant fail.
                state.epoch += 1;
                let epoch = state.epoch;
                for handle in busy {
                    if let Some(object) = state.objects.get_mut(handle) {
                        object.changed_at = epoch;
                        if let Some(at) = object.busy.iter().position(|c| *c == change.client) {
                            object.busy.swap_remove(at);
                        }
                    }
                }
                // A change of another client may wait for this one (`wait_for_changes_of`).
                self.changed.notify_all();
            }
        }
        let granted = self.grant_locked(&mut state, &change.ticket, change.client, touched, true);
        if let Some(busy) = &change.busy {
            prune(&mut state, busy);
        }
        end_read(&mut state, change.ticket);
        granted
    }

    /// Takes, changes or releases a lock for `client`. A conflicting lock of a client that has
    /// had no connection, or (protocol 8) sent no request, for a whole lease is dropped: that
    /// client died, froze or is cut off, and finds out when it comes back (a reclaim is refused).
    /// An owner that waits is remembered as waiting for the conflicting owners, unless that
    /// would be a deadlock. During the grace period after a restart only reclaims and unlocks
    /// are carried out; after it a reclaim only confirms a lock still held.
    pub fn set_lock(
        &self,
        client: ClientId,
        handle: &Handle,
        wanted: &Wanted,
        mode: LockMode,
    ) -> Result<Result<(), LockHeld>, LockRefused> {
        match (mode, self.in_grace()) {
            (LockMode::Reclaim, false) => {
                return match self.lock().locks.holds(handle, wanted) {
                    true => Ok(Ok(())),
                    false => Err(LockRefused::NotHeld),
                }
            }
            (LockMode::Take | LockMode::Wait, true) if wanted.kind != LockKind::Unlock => return Ok(Err(HELD_BEFORE_THE_RESTART)),
            _ => {}
        }
        let mut state = self.lock();
        // A new range may split one in two: room for two more.
        if wanted.kind != LockKind::Unlock && state.locks.ranges(handle) + 2 > LOCK_RANGES_PER_OBJECT_MAX {
            return Err(LockRefused::TableFull);
        }
        let result = match state.locks.set(handle, wanted) {
            Err(_) if self.drop_departed(&mut state, handle, wanted) => state.locks.set(handle, wanted),
            result => result,
        };
        match result {
            Ok(()) => self.locks_changed.notify_waiters(),
            Err(_) => {
                tracing::trace!(client = client.0, "lock conflict");
                if mode == LockMode::Wait {
                    state.locks.wait(handle, wanted, Instant::now()).map_err(|Deadlock| LockRefused::Deadlock)?;
                }
            }
        }
        Ok(result)
    }

    /// The lock that `wanted` would conflict with (during the grace period: any lock may).
    pub fn test_lock(&self, handle: &Handle, wanted: &Wanted) -> Option<LockHeld> {
        if self.in_grace() {
            return Some(HELD_BEFORE_THE_RESTART);
        }
        let mut state = self.lock();
        self.drop_departed(&mut state, handle, wanted);
        state.locks.conflict(handle, wanted)
    }

    fn drop_departed(&self, state: &mut State, handle: &Handle, wanted: &Wanted) -> bool {
        let now = Instant::now();
        let departed: Vec<ClientId> = state
            .locks
            .conflicting_clients(handle, wanted)
            .into_iter()
            .filter(|c| state.presence.get(c).is_some_and(|p| p.departed(now, self.lease)))
            .collect();
        for client in &departed {
            tracing::warn!(client = client.0, "releasing the locks of a client gone or silent for longer than its lease");
            state.locks.release_client(*client);
        }
        if !departed.is_empty() {
            self.locks_changed.notify_waiters();
        }
        !departed.is_empty()
    }
}

/// See [`Coherence::rights_lost`].
fn right_lost(state: &State, client: ClientId, granted_by: Granter, handle: &Handle, now: Instant) -> bool {
    let asked = state.pending.values().any(|asked| asked.covers(client, handle, now));
    let Some(object) = state.objects.get(handle) else {
        let forgotten = granted_by == Granter::ThisProcess && !asked;
        if forgotten {
            tracing::warn!(client = client.0, ?handle, "refusing changes a client made in its cache: its right is long gone");
        }
        return forgotten;
    };
    let right = object.holders.get(&client);
    let held = right.is_some_and(|right| right.exclusive && right.until > now);
    let changed_by_other = object.changed_by.is_some_and(|c| c != client);
    let others = object.holders.keys().filter(|c| **c != client).count() + object.busy.iter().filter(|c| **c != client).count();
    let lost = !held && !asked && (changed_by_other || others > 0);
    if lost {
        tracing::warn!(
            client = client.0,
            ?handle,
            ?right,
            others,
            changed_by_other,
            "refusing changes a client made in its cache under an exclusive right it lost"
        );
    }
    lost
}

/// Whether a client other than `client` is subscribed (and so may hold rights) or holds an
/// exclusive right (whose changes a read must wait for).
fn others_subscribed(state: &State, client: ClientId) -> bool {
    let now = Instant::now();
    state.subscribers.keys().any(|c| *c != client) || state.exclusive_until.iter().any(|(c, until)| *c != client && *until > now)
}

fn begin_read_locked(state: &mut State) -> ReadTicket {
    let epoch = state.epoch;
    *state.reads.entry(epoch).or_default() += 1;
    ReadTicket { epoch }
}

fn end_read(state: &mut State, ticket: ReadTicket) {
    if let Some(count) = state.reads.get_mut(&ticket.epoch) {
        *count -= 1;
        if *count == 0 {
            state.reads.remove(&ticket.epoch);
        }
    }
}

/// Forgets objects nobody holds or changes, once no read in flight began before their change.
fn prune(state: &mut State, handles: &[Handle]) {
    let oldest_read = oldest_read(state);
    let now = Instant::now();
    for handle in handles {
        if let Some(object) = state.objects.get_mut(handle) {
            if forgettable(object, now, oldest_read) {
                state.objects.remove(handle);
            }
        }
    }
}

/// Forgets every object whose rights all expired (clients that read much and change little
/// would otherwise grow the table for ever).
fn sweep(state: &mut State, now: Instant) {
    let oldest_read = oldest_read(state);
    state.objects.retain(|_, object| !forgettable(object, now, oldest_read));
    state.exclusive_until.retain(|_, until| *until > now);
}

fn oldest_read(state: &State) -> u64 {
    state.reads.keys().next().copied().unwrap_or(u64::MAX)
}

/// Drops expired rights; true if nothing about the object is worth keeping.
fn forgettable(object: &mut Object, now: Instant, oldest_read: u64) -> bool {
    object.holders.retain(|_, right| right.until > now);
    object.holders.is_empty()
        && object.busy.is_empty()
        && object.contended_until.is_none_or(|t| t <= now)
        && (object.changed_by.is_none() || object.changed_at < oldest_read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn h(n: u8) -> Handle {
        Handle(vec![n])
    }

    /// A sink that records recalls and acknowledges them from another thread after `delay`.
    fn acking_sink(coherence: &Arc<Coherence>, delay: Duration, seen: Arc<AtomicUsize>) -> Sink {
        let weak = Arc::downgrade(coherence);
        Arc::new(move |id, _callback: &Callback| {
            seen.fetch_add(1, Ordering::SeqCst);
            let weak = weak.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                if let Some(c) = weak.upgrade() {
                    c.callback_done(id);
                }
            });
            true
        })
    }

    /// Leases of 200 ms; client 1 receives callbacks and never answers them (frozen), client 2
    /// answers at once.
    fn silent_and_answering_clients() -> (Arc<Coherence>, ClientId, ClientId) {
        let c = Arc::new(Coherence::new(Duration::from_millis(200), false));
        let (a, b) = (ClientId(1), ClientId(2));
        c.subscribe(a, 1, Arc::new(|_, _: &Callback| true));
        c.subscribe(b, 2, acking_sink(&c, Duration::ZERO, Arc::new(AtomicUsize::new(0))));
        (c, a, b)
    }

    fn write_lock(client: ClientId) -> Wanted {
        let owner = crate::locks::Owner { client, id: 1 };
        Wanted { owner, kind: LockKind::Write, start: 0, end: u64::MAX, pid: 1 }
    }

    #[test]
    fn a_client_silent_for_a_lease_loses_its_locks_and_cannot_confirm_them() {
        // Goal: a client whose connections stay open but which sends nothing (frozen, cut off)
        // holds its locks one lease at most, if it speaks protocol 8 (it is heard from at least every
        // half lease while it holds locks); it then finds out when it asks to confirm them.
        // A client heard from keeps them, and an older client is never taken for silent.
        let c = Coherence::new(Duration::from_millis(200), false);
        let (silent, chatty, old, other) = (ClientId(1), ClientId(2), ClientId(3), ClientId(4));
        let chatty_heard = c.connected(chatty, 8);
        c.connected(silent, 8);
        c.connected(old, 7);
        c.connected(other, 8);
        for (client, n) in [(silent, 1), (chatty, 2), (old, 3)] {
            assert_eq!(c.set_lock(client, &h(n), &write_lock(client), LockMode::Take), Ok(Ok(())));
        }
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            chatty_heard.now();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(c.set_lock(other, &h(1), &write_lock(other), LockMode::Take), Ok(Ok(())), "the silent client's lock is given away");
        assert!(c.set_lock(other, &h(2), &write_lock(other), LockMode::Take).unwrap().is_err(), "a client heard from keeps its lock");
        assert!(
            c.set_lock(other, &h(3), &write_lock(other), LockMode::Take).unwrap().is_err(),
            "a version-7 client is not taken for silent"
        );
        assert_eq!(
            c.set_lock(silent, &h(1), &write_lock(silent), LockMode::Reclaim),
            Err(LockRefused::NotHeld),
            "the lost lock is not confirmed"
        );
        assert_eq!(c.set_lock(chatty, &h(2), &write_lock(chatty), LockMode::Reclaim), Ok(Ok(())), "a held lock is confirmed");
    }

    #[test]
    fn a_change_recalls_other_holders_and_waits_for_their_ack() {
        // Goal: B's change of an object A holds reaches A and waits for A's acknowledgement,
        // not for the lease; A's right is gone afterwards and B's own rights are never recalled.
        let c = Arc::new(Coherence::new(Duration::from_secs(30), false));
        let (a, b) = (ClientId(1), ClientId(2));
        let seen = Arc::new(AtomicUsize::new(0));
        c.subscribe(a, 1, acking_sink(&c, Duration::from_millis(50), seen.clone()));
        c.subscribe(b, 2, acking_sink(&c, Duration::ZERO, Arc::new(AtomicUsize::new(0))));
        assert!(c.grant(c.begin_read(), a, [&h(1)]).leased());
        assert!(c.grant(c.begin_read(), b, [&h(1)]).leased());

        let started = Instant::now();
        let change = c.begin_change(b, &[Invalidation::Object(h(1))], None);
        let waited = started.elapsed();
        assert_eq!(seen.load(Ordering::SeqCst), 1, "A was recalled once");
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(5), "waited {waited:?}");
        assert!(c.end_change(change, [&h(1)]).leased());
        assert!(!c.lock().objects[&h(1)].holders.contains_key(&a), "A's right is gone");
        assert!(c.lock().objects[&h(1)].holders.contains_key(&b), "B holds it now");
    }

    #[test]
    fn a_lone_changer_holds_exclusively_until_another_client_reads() {
        // Goal: the client that changed an object nobody else uses holds it exclusively; another
        // client's read first makes it write back (and waits for that), then both share it, and
        // the object stays shared for a lease (no exclusive ping-pong).
        let c = Arc::new(Coherence::new(Duration::from_secs(30), false));
        let (a, b) = (ClientId(1), ClientId(2));
        let flushes = Arc::new(AtomicUsize::new(0));
        c.subscribe(a, 1, acking_sink(&c, Duration::from_millis(50), flushes.clone()));
        c.subscribe(b, 2, acking_sink(&c, Duration::ZERO, Arc::new(AtomicUsize::new(0))));
        let change = c.begin_change(a, &[Invalidation::Object(h(1))], None);
        assert_eq!(c.end_change(change, [&h(1)]), Grant::Exclusive);
        assert!(c.exclusive_elsewhere(b) && !c.exclusive_elsewhere(a));
        assert_eq!(c.grant(c.begin_read(), a, [&h(1)]), Grant::Shared, "a read keeps A's right exclusive");
        assert!(c.lock().objects[&h(1)].holders[&a].exclusive);
        assert!(!c.flush_others(a, &[h(1)]), "A's own reads ask nothing");
        let started = Instant::now();
        assert!(c.flush_others(b, &[h(1)]), "B's read asks A to write back");
        assert!(started.elapsed() >= Duration::from_millis(50), "and waits for A's acknowledgement");
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        assert!(!c.lock().objects[&h(1)].holders[&a].exclusive, "A's right is shared now");
        assert!(!c.flush_others(b, &[h(1)]), "nothing more to ask");
        assert_eq!(c.grant(c.begin_read(), b, [&h(1)]), Grant::Shared);
        let change = c.begin_change(a, &[Invalidation::Object(h(1))], None);
        assert_eq!(c.end_change(change, [&h(1)]), Grant::Shared, "contended: no exclusive right for a lease");
    }

    #[test]
    fn renewal_extends_only_exclusive_rights_still_held_and_uncontended() {
        // Goal: a renewal keeps an exclusive right alive past its lease; it never revives an
        // ended right, nor extends one that another client's read made shared, nor renews a
        // client without a callback channel. Method: a 300 ms lease, renewals before and after
        // it would end.
        let c = Arc::new(Coherence::new(Duration::from_millis(300), false));
        let (a, b) = (ClientId(1), ClientId(2));
        c.subscribe(a, 1, acking_sink(&c, Duration::ZERO, Arc::new(AtomicUsize::new(0))));
        c.subscribe(b, 2, acking_sink(&c, Duration::ZERO, Arc::new(AtomicUsize::new(0))));
        let change = c.begin_change(a, &[Invalidation::Object(h(1)), Invalidation::Object(h(2))], None);
        assert_eq!(c.end_change(change, [&h(1), &h(2)]), Grant::Exclusive);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(c.renew(a, &[h(1), h(3)]), vec![true, false], "h(3) was never held");
        }
        let now = Instant::now();
        assert!(c.lock().objects[&h(1)].holders[&a].until > now, "alive 600 ms into a 300 ms lease");
        assert!(c.lock().objects[&h(2)].holders[&a].until <= now, "not renewed: ended");
        assert_eq!(c.renew(a, &[h(2)]), vec![false], "an ended right is not revived");
        assert!(c.exclusive_elsewhere(b), "B's reads still know to ask A");

        assert!(c.flush_others(b, &[h(1)]), "B's read makes A write back");
        assert_eq!(c.renew(a, &[h(1)]), vec![false], "shared now: not renewed as exclusive");
        assert_eq!(c.renew(b, &[h(1)]), vec![false], "B holds no exclusive right");
        c.unsubscribe(a);
        assert_eq!(c.renew(a, &[h(1)]), vec![false], "no callback channel, no renewal");
    }

    #[test]
    fn changes_made_under_a_right_lost_without_acknowledgement_are_refused_once_another_client_came() {
        // Goal: what a client made in its cache under an exclusive right may still be written
        // back while the right lasts and while a flush it was asked for is awaited; once the
        // right was taken without its acknowledgement (frozen: it never answers) and another
        // client used the object, it is lost (applied late, it would overwrite the other's
        // change). A right that simply ran out, with nobody else there, is not; one whose record
        // was forgotten is (nothing is known).
        let (c, a, b) = silent_and_answering_clients();
        let (read, changed, idle) = (h(1), h(2), h(3));
        let change = c.begin_change(
            a,
            &[Invalidation::Object(read.clone()), Invalidation::Object(changed.clone()), Invalidation::Object(idle.clone())],
            None,
        );
        assert_eq!(c.end_change(change, [&read, &changed, &idle]), Grant::Exclusive);
        assert!(c.rights_lost(a, Granter::ThisProcess, [&read, &changed, &idle]).is_empty(), "held");

        let flushing = {
            let (c, read) = (c.clone(), read.clone());
            std::thread::spawn(move || c.flush_others(b, &[read]))
        };
        let changing = {
            let (c, changed) = (c.clone(), changed.clone());
            std::thread::spawn(move || c.begin_change(b, &[Invalidation::Object(changed)], None))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            c.rights_lost(a, Granter::ThisProcess, [&read, &changed]).is_empty(),
            "asked to write back (a flush, a recall), and the lease runs"
        );
        assert!(flushing.join().unwrap(), "B's read waited for A's lease");
        let change = changing.join().unwrap();
        assert!(c.rights_lost(a, Granter::ThisProcess, [&read, &idle]).is_empty(), "ran out, but nobody else came yet");
        c.end_change(change, [&changed]);
        assert_eq!(c.rights_lost(a, Granter::ThisProcess, [&changed]), vec![changed.clone()], "B changed it");
        assert_eq!(c.grant(c.begin_read(), b, [&read]), Grant::Shared);
        assert_eq!(
            c.rights_lost(a, Granter::ThisProcess, [&changed, &read]),
            vec![read.clone(), changed.clone()],
            "B read it without A's changes"
        );
        assert_eq!(c.rights_lost(a, Granter::ThisProcess, [&h(4)]), vec![h(4)], "a record forgotten (swept out): nothing is known");
        assert!(c.rights_lost(a, Granter::Earlier, [&h(4)]).is_empty(), "no record of a right of an earlier process: nobody came since");
        assert_eq!(c.rights_lost(a, Granter::Earlier, [&changed]), vec![changed.clone()], "B changed it after the restart");
        assert!(c.rights_lost(b, Granter::ThisProcess, [&changed]).is_empty(), "B's own right");
    }

    #[test]
    fn a_change_waits_for_the_change_in_flight_of_a_holder_whose_lease_ran_out() {
        // Goal: a holder that did not answer a recall within its lease may have a change of the
        // object in flight that began while its right held (it passed the write-back fence:
        // a write-back slow at the server); the recalling change waits for it to end instead
        // of being applied first and overwritten by it.
        let (c, a, b) = silent_and_answering_clients();
        let change = c.begin_change(a, &[Invalidation::Object(h(1))], None);
        assert_eq!(c.end_change(change, [&h(1)]), Grant::Exclusive);
        let in_flight = c.begin_change(a, &[Invalidation::Object(h(1))], None);
        let (began, waiting) = std::sync::mpsc::channel();
        let recalling = {
            let c = c.clone();
            std::thread::spawn(move || {
                let change = c.begin_change(b, &[Invalidation::Object(h(1))], None);
                began.send(()).unwrap();
                c.end_change(change, [&h(1)]);
            })
        };
        assert!(waiting.recv_timeout(Duration::from_millis(500)).is_err(), "B waits past A's lease, for A's change");
        c.end_change(in_flight, [&h(1)]);
        waiting.recv_timeout(Duration::from_secs(2)).expect("B goes on once A's change has ended");
        recalling.join().unwrap();
    }

    #[test]
    fn an_exclusive_holder_without_a_channel_delays_reads_by_its_lease_at_most() {
        let c = Arc::new(Coherence::new(Duration::from_millis(200), false));
        let (a, b) = (ClientId(1), ClientId(2));
        c.subscribe(a, 1, Arc::new(|_, _: &Callback| false));
        let change = c.begin_change(a, &[Invalidation::Object(h(1))], None);
        assert_eq!(c.end_change(change, [&h(1)]), Grant::Exclusive);
        let started = Instant::now();
        assert!(c.flush_others(b, &[h(1)]));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(2), "waited {waited:?}");
    }

    #[test]
    fn every_item_naming_a_held_object_reaches_its_holder() {
        // Goal: a rename names the directory several times (object, old name, new name); the
        // holder must get all of them, not only the first.
        let c = Coherence::new(Duration::from_millis(200), false);
        let (a, b) = (ClientId(1), ClientId(2));
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink_got = got.clone();
        c.subscribe(
            a,
            1,
            Arc::new(move |_, callback: &Callback| {
                if let Callback::Recall(items) = callback {
                    sink_got.lock().unwrap().extend(items.iter().cloned());
                }
                false
            }),
        );
        c.subscribe(b, 2, Arc::new(|_, _: &Callback| true));
        assert!(c.grant(c.begin_read(), a, [&h(1)]).leased());
        let old = Invalidation::Entry { parent: h(1), name: b"old".to_vec() };
        let new = Invalidation::Entry { parent: h(1), name: b"new".to_vec() };
        let change = c.begin_change(b, &[Invalidation::Object(h(1)), old.clone(), Invalidation::Object(h(1)), new.clone()], None);
        let _ = c.end_change(change, []);
        assert_eq!(*got.lock().unwrap(), vec![old, new, Invalidation::Object(h(1))], "entries first, duplicates dropped");
    }

    #[test]
    fn a_right_on_a_directory_outlives_changes_of_its_names_and_one_on_a_file_does_not() {
        // Goal: a holder's kernel keeps every name it looked up in a directory; after one name
        // there changed, a change of another must still be recalled from it. A file's recall
        // drops all the holder cached of it: its right ends.
        let c = Arc::new(Coherence::new(Duration::from_secs(10), false));
        let (a, b) = (ClientId(1), ClientId(2));
        let recalls = Arc::new(AtomicUsize::new(0));
        c.subscribe(a, 1, acking_sink(&c, Duration::ZERO, recalls.clone()));
        c.subscribe(b, 2, acking_sink(&c, Duration::ZERO, Arc::new(AtomicUsize::new(0))));
        assert!(c.grant(c.begin_read(), a, [&h(1), &h(2)]).leased());
        let entry = |name: &[u8]| Invalidation::Entry { parent: h(1), name: name.to_vec() };
        for name in [&b"lock"[..], b"master", b"other"] {
            let change = c.begin_change(b, &[Invalidation::Object(h(1)), entry(name)], None);
            let _ = c.end_change(change, []);
        }
        assert_eq!(recalls.load(Ordering::SeqCst), 3, "every change of a name recalls the directory's holder");
        for _ in 0..2 {
            let change = c.begin_change(b, &[Invalidation::Object(h(2))], None);
            let _ = c.end_change(change, []);
        }
        assert_eq!(recalls.load(Ordering::SeqCst), 4, "a file's holder is recalled once");
    }

    #[test]
    fn a_read_overlapping_a_foreign_change_gets_no_right() {
        // Goal: no right is granted on data a concurrent change may have made stale: a read
        // that overlaps a change in any way gets none.
        let c = Coherence::new(Duration::from_millis(100), false);
        let (a, b) = (ClientId(1), ClientId(2));
        let never: Sink = Arc::new(|_, _: &Callback| false);
        c.subscribe(a, 1, never.clone());
        c.subscribe(b, 2, never);
        let ticket = c.begin_read();
        let change = c.begin_change(b, &[Invalidation::Object(h(7))], None);
        assert!(!c.grant(ticket, a, [&h(7)]).leased(), "read begun before, granted during the change");
        let during = c.begin_read();
        let _ = c.end_change(change, [&h(7)]);
        assert!(!c.grant(during, a, [&h(7)]).leased(), "read begun during the change (it may have read the old state)");
        assert!(c.grant(c.begin_read(), a, [&h(7)]).leased(), "read begun after the change");
        let before = c.begin_read();
        let change = c.begin_change(b, &[Invalidation::Object(h(7))], None);
        let _ = c.end_change(change, []);
        assert!(!c.grant(before, a, [&h(7)]).leased(), "read begun before a change that is over");
    }

    #[test]
    fn a_vanished_holder_delays_a_change_by_at_most_its_lease() {
        // Goal: a recall nobody can deliver waits for the lease, no longer.
        let c = Coherence::new(Duration::from_millis(300), false);
        let (a, b) = (ClientId(1), ClientId(2));
        c.subscribe(a, 1, Arc::new(|_, _: &Callback| true));
        c.subscribe(b, 2, Arc::new(|_, _: &Callback| true));
        assert!(c.grant(c.begin_read(), a, [&h(3)]).leased());
        c.session_closed(a, 1);
        let started = Instant::now();
        let change = c.begin_change(b, &[Invalidation::Entry { parent: h(3), name: b"x".to_vec() }], None);
        let waited = started.elapsed();
        let _ = c.end_change(change, []);
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "waited {waited:?}");
    }

    #[test]
    fn expired_rights_are_swept_out() {
        // Goal: the table does not keep every object a client ever read.
        let c = Coherence::new(Duration::from_millis(50), false);
        let a = ClientId(1);
        c.subscribe(a, 1, Arc::new(|_, _: &Callback| true));
        for n in 0..100 {
            assert!(c.grant(c.begin_read(), a, [&h(n)]).leased());
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.grant(c.begin_read(), a, [&h(200)]).leased());
        assert_eq!(c.lock().objects.len(), 1, "only the fresh right is left");
    }

    #[test]
    fn after_a_restart_changes_wait_for_the_old_rights_to_expire() {
        let c = Coherence::new(Duration::from_millis(200), true);
        assert!(c.in_grace());
        let started = Instant::now();
        let change = c.begin_alone(ClientId(1), None).expect("alone");
        let _ = c.end_change(change, []);
        assert!(started.elapsed() >= Duration::from_millis(150), "no grace period");
        assert!(!c.in_grace());
        assert!(!Coherence::new(Duration::from_secs(30), false).in_grace(), "a first start has none");
    }

    #[test]
    fn the_grace_period_ends_once_every_client_of_the_previous_process_has_reclaimed() {
        // Goal: after a restart, reads and changes wait until the clients that may hold rights
        // of the old process have written back what they changed under them, and no longer
        // than that: a whole lease (10 s by default) only if one of them does not come back.
        let (a, b) = (ClientId(1), ClientId(2));
        let c = Arc::new(Coherence::new(Duration::from_secs(30), true).awaiting(HashSet::from([a, b])));
        c.reclaim_done(ClientId(3));
        c.reclaim_done(a);
        assert!(c.in_grace(), "B has not reclaimed yet");
        let (done, read) = std::sync::mpsc::channel();
        let reader = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.wait_out_grace();
                done.send(()).unwrap();
            })
        };
        assert!(read.recv_timeout(Duration::from_millis(100)).is_err(), "a read went on during the grace period");
        c.reclaim_done(b);
        assert!(!c.in_grace());
        read.recv_timeout(Duration::from_secs(10)).expect("the read still waits after every client reclaimed");
        reader.join().unwrap();
        let change = c.begin_alone(a, None).expect("alone");
        let _ = c.end_change(change, []);

        assert!(!Coherence::new(Duration::from_secs(30), true).awaiting(HashSet::new()).in_grace(), "nobody to wait for");
        assert!(Coherence::new(Duration::from_secs(30), true).in_grace(), "clients not known: a whole lease");
    }

    #[test]
    fn write_backs_of_the_previous_process_go_ahead_of_changes_waiting_for_the_grace_period() {
        // Goal: after a restart, changes a client made in its cache under a right of the old
        // process are applied during the grace period, and a change another client made after
        // the restart waits until they are, even past the end of the grace period. Released
        // together at its end, the old change could land after the new one and overwrite it.
        let c = Arc::new(Coherence::new(Duration::from_millis(200), true));
        let (a, b) = (ClientId(1), ClientId(2));
        let started = Instant::now();
        let reclaim = c.reclaim().expect("admitted during the grace period");
        let written_back = c.begin_change(a, &[Invalidation::Object(h(1))], Some(&reclaim));
        assert!(started.elapsed() < Duration::from_millis(100), "the reclaim waited for the grace period");
        assert!(c.changes_wait());
        let waiting = {
            let c = c.clone();
            std::thread::spawn(move || {
                let change = c.begin_change(b, &[Invalidation::Object(h(1))], None);
                let began = Instant::now();
                let _ = c.end_change(change, [&h(1)]);
                began
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!c.in_grace() && c.changes_wait(), "the grace period is over, the reclaim is not");
        assert!(c.reclaim().is_none(), "admitted after the grace period");
        assert!(!waiting.is_finished(), "a new change began before the reclaim ended");
        let _ = c.end_change(written_back, [&h(1)]);
        let ended = Instant::now();
        drop(reclaim);
        assert!(waiting.join().unwrap() >= ended, "the new change began before the reclaim was applied");
        assert!(!c.changes_wait());
    }

    #[test]
    fn the_fast_path_is_only_for_a_lone_client() {
        let c = Coherence::new(Duration::from_secs(30), false);
        let (a, b) = (ClientId(1), ClientId(2));
        c.subscribe(a, 1, Arc::new(|_, _: &Callback| true));
        let change = c.begin_alone(a, None).expect("alone");
        let _ = c.end_change(change, []);
        c.subscribe(b, 2, Arc::new(|_, _: &Callback| true));
        assert!(c.begin_alone(a, None).is_none(), "b may hold rights now");
        assert!(c.shared(a));
    }
}
