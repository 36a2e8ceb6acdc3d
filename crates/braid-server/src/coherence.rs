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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use braid_proto::limits::LOCK_RANGES_PER_OBJECT_MAX;
use braid_proto::{Callback, ClientId, Handle, Invalidation, LockHeld, LockKind};

use crate::locks::{LockTable, Wanted};

/// An object already has `LOCK_RANGES_PER_OBJECT_MAX` lock ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockTableFull;

/// Delivers a callback to a subscribed client; false if it cannot (connection gone or full).
pub type Sink = Arc<dyn Fn(u64, &Callback) -> bool + Send + Sync>;

pub struct Coherence {
    lease: Duration,
    /// Until then, changes wait: clients of the previous server process may still cache.
    grace_until: Option<Instant>,
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
    pending: HashSet<u64>,
    next_callback: u64,
    /// Fast-path changes in flight.
    fast_busy: usize,
    /// Connections per client, and since when a client has had none.
    presence: HashMap<ClientId, Presence>,
    locks: LockTable,
    /// When expired rights are next swept out of `objects`.
    next_sweep: Option<Instant>,
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
}

#[derive(Default)]
struct Object {
    /// Client -> when its right ends.
    holders: HashMap<ClientId, Instant>,
    /// Clients with a change of this object in flight (a client may have several).
    busy: Vec<ClientId>,
    /// Epoch of the last change and who made it.
    changed_at: u64,
    changed_by: Option<ClientId>,
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
    /// changes then wait one lease (the grace period).
    pub fn new(lease: Duration, after_restart: bool) -> Self {
        let grace_until = after_restart.then(|| Instant::now() + lease);
        Self { lease, grace_until, state: Mutex::new(State::default()), changed: Condvar::new() }
    }

    /// Whether changes must still wait for the rights of a previous server process to expire.
    pub fn in_grace(&self) -> bool {
        self.grace_until.is_some_and(|until| Instant::now() < until)
    }

    fn wait_for_grace(&self) {
        if let Some(until) = self.grace_until {
            let now = Instant::now();
            if now < until {
                tracing::info!(wait_ms = (until - now).as_millis() as u64, "change waits for the grace period after a restart");
                std::thread::sleep(until - now);
            }
        }
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
        for object in state.objects.values_mut() {
            object.holders.remove(&client);
        }
        state.locks.release_client(client);
    }

    pub fn callback_done(&self, id: u64) {
        if self.lock().pending.remove(&id) {
            self.changed.notify_all();
        }
    }

    pub fn connected(&self, client: ClientId) {
        let mut state = self.lock();
        let presence = state.presence.entry(client).or_default();
        presence.connections += 1;
        presence.gone_since = None;
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

    /// Grants `client` rights on `handles` unless something they name changed since `ticket`
    /// was taken; returns whether it did.
    pub fn grant<'h>(&self, ticket: ReadTicket, client: ClientId, handles: impl IntoIterator<Item = &'h Handle>) -> bool {
        let mut state = self.lock();
        let granted = self.grant_locked(&mut state, &ticket, client, handles);
        end_read(&mut state, ticket);
        granted
    }

    fn grant_locked<'h>(
        &self,
        state: &mut State,
        ticket: &ReadTicket,
        client: ClientId,
        handles: impl IntoIterator<Item = &'h Handle>,
    ) -> bool {
        if state.subscribers.get(&client).is_none_or(|s| s.since > ticket.epoch) {
            return false;
        }
        let handles: Vec<&Handle> = handles.into_iter().collect();
        let stale = |o: &Object| o.busy.iter().any(|c| *c != client) || (o.changed_at > ticket.epoch && o.changed_by != Some(client));
        if handles.iter().any(|h| state.objects.get(*h).is_some_and(stale)) {
            return false;
        }
        let now = Instant::now();
        let until = now + self.lease;
        for handle in handles {
            state.objects.entry(handle.clone()).or_default().holders.insert(client, until);
        }
        if state.next_sweep.is_none_or(|at| now >= at) {
            sweep(state, now);
            state.next_sweep = Some(now + self.lease);
        }
        true
    }

    /// Whether changes by `client` must name what they touch: someone else may hold rights.
    pub fn shared(&self, client: ClientId) -> bool {
        others_subscribed(&self.lock(), client)
    }

    /// Starts a change by `client` without naming what it touches, if `client` is the only
    /// subscriber (nobody else can hold rights); `None` if it is not.
    pub fn begin_alone(&self, client: ClientId) -> Option<Change> {
        self.wait_for_grace();
        let mut state = self.lock();
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
    pub fn begin_change(&self, client: ClientId, items: &[Invalidation]) -> Change {
        self.wait_for_grace();
        let mut state = self.lock();
        state.epoch += 1;
        let epoch = state.epoch;
        let now = Instant::now();
        let mut recalls: HashMap<ClientId, (Vec<Invalidation>, Instant)> = HashMap::new();
        let mut busy = Vec::with_capacity(items.len());
        for item in items {
            let handle = match item {
                Invalidation::Object(h) => h,
                Invalidation::Entry { parent, .. } => parent,
            };
            let object = state.objects.entry(handle.clone()).or_default();
            object.busy.push(client);
            object.changed_at = epoch;
            object.changed_by = Some(client);
            busy.push(handle.clone());
            object.holders.retain(|_, until| *until > now);
            for (holder, until) in object.holders.iter().filter(|(c, _)| **c != client) {
                let recall = recalls.entry(*holder).or_insert_with(|| (Vec::new(), *until));
                recall.0.push(item.clone());
                recall.1 = recall.1.max(*until);
            }
        }
        // Only now: several items may name the same object, and each must reach its holders.
        for handle in &busy {
            if let Some(object) = state.objects.get_mut(handle) {
                object.holders.retain(|c, _| *c == client);
            }
        }
        let ticket = begin_read_locked(&mut state);
        let waits = self.send_recalls(&mut state, recalls);
        self.wait_for(state, waits);
        Change { client, busy: Some(busy), ticket }
    }

    /// Sends one recall per client; returns what to wait for: the callback id (if delivered)
    /// and the end of the client's lease.
    fn send_recalls(&self, state: &mut State, recalls: HashMap<ClientId, (Vec<Invalidation>, Instant)>) -> Vec<(Option<u64>, Instant)> {
        let mut waits = Vec::with_capacity(recalls.len());
        for (holder, (mut items, until)) in recalls {
            items.sort_by_key(|i| matches!(i, Invalidation::Object(_)));
            items.dedup();
            let id = state.next_callback;
            state.next_callback += 1;
            let delivered = state.subscribers.get(&holder).is_some_and(|s| (s.sink)(id, &Callback::Recall(items)));
            if delivered {
                state.pending.insert(id);
            } else {
                tracing::debug!(client = holder.0, "recall undeliverable; waiting for the lease to run out");
            }
            waits.push((delivered.then_some(id), until));
        }
        waits
    }

    fn wait_for(&self, mut state: MutexGuard<'_, State>, waits: Vec<(Option<u64>, Instant)>) {
        loop {
            let now = Instant::now();
            let open: Vec<Instant> = waits
                .iter()
                .filter(|(id, until)| *until > now && id.is_none_or(|id| state.pending.contains(&id)))
                .map(|(_, until)| *until)
                .collect();
            let Some(first_end) = open.iter().min() else { break };
            state = self.changed.wait_timeout(state, *first_end - now).expect("coherence lock").0;
        }
        for (id, _) in waits {
            if let Some(id) = id {
                state.pending.remove(&id);
            }
        }
    }

    /// Ends `change`, granting its client rights on `touched` (what its response names).
    pub fn end_change<'h>(&self, change: Change, touched: impl IntoIterator<Item = &'h Handle>) -> bool {
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
            }
        }
        let granted = self.grant_locked(&mut state, &change.ticket, change.client, touched);
        if let Some(busy) = &change.busy {
            prune(&mut state, busy);
        }
        end_read(&mut state, change.ticket);
        granted
    }

    /// Takes, changes or releases a lock for `client`. A conflicting lock of a client that has
    /// had no connection for a whole lease is dropped: that client died.
    pub fn set_lock(&self, client: ClientId, handle: &Handle, wanted: &Wanted) -> Result<Result<(), LockHeld>, LockTableFull> {
        let mut state = self.lock();
        // A new range may split one in two: room for two more.
        if wanted.kind != LockKind::Unlock && state.locks.ranges(handle) + 2 > LOCK_RANGES_PER_OBJECT_MAX {
            return Err(LockTableFull);
        }
        let result = match state.locks.set(handle, wanted) {
            Err(_) if self.drop_departed(&mut state, handle, wanted) => state.locks.set(handle, wanted),
            result => result,
        };
        if result.is_err() {
            tracing::trace!(client = client.0, "lock conflict");
        }
        Ok(result)
    }

    pub fn test_lock(&self, handle: &Handle, wanted: &Wanted) -> Option<LockHeld> {
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
            .filter(|c| state.presence.get(c).is_some_and(|p| p.gone_since.is_some_and(|t| now.duration_since(t) >= self.lease)))
            .collect();
        for client in &departed {
            tracing::info!(client = client.0, "releasing the locks of a client gone for longer than its lease");
            state.locks.release_client(*client);
        }
        !departed.is_empty()
    }
}

/// Whether a client other than `client` is subscribed (and so may hold rights).
fn others_subscribed(state: &State, client: ClientId) -> bool {
    state.subscribers.keys().any(|c| *c != client)
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
}

fn oldest_read(state: &State) -> u64 {
    state.reads.keys().next().copied().unwrap_or(u64::MAX)
}

/// Drops expired rights; true if nothing about the object is worth keeping.
fn forgettable(object: &mut Object, now: Instant, oldest_read: u64) -> bool {
    object.holders.retain(|_, until| *until > now);
    object.holders.is_empty() && object.busy.is_empty() && (object.changed_by.is_none() || object.changed_at < oldest_read)
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

    #[test]
    fn a_change_recalls_other_holders_and_waits_for_their_ack() {
        // Goal: B's change of an object A holds reaches A and waits for A's acknowledgement,
        // not for the lease; A's right is gone afterwards and B's own rights are never recalled.
        let c = Arc::new(Coherence::new(Duration::from_secs(30), false));
        let (a, b) = (ClientId(1), ClientId(2));
        let seen = Arc::new(AtomicUsize::new(0));
        c.subscribe(a, 1, acking_sink(&c, Duration::from_millis(50), seen.clone()));
        c.subscribe(b, 2, acking_sink(&c, Duration::ZERO, Arc::new(AtomicUsize::new(0))));
        assert!(c.grant(c.begin_read(), a, [&h(1)]));
        assert!(c.grant(c.begin_read(), b, [&h(1)]));

        let started = Instant::now();
        let change = c.begin_change(b, &[Invalidation::Object(h(1))]);
        let waited = started.elapsed();
        assert_eq!(seen.load(Ordering::SeqCst), 1, "A was recalled once");
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(5), "waited {waited:?}");
        assert!(c.end_change(change, [&h(1)]));
        assert!(!c.lock().objects[&h(1)].holders.contains_key(&a), "A's right is gone");
        assert!(c.lock().objects[&h(1)].holders.contains_key(&b), "B holds it now");
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
                let Callback::Recall(items) = callback;
                sink_got.lock().unwrap().extend(items.iter().cloned());
                false
            }),
        );
        c.subscribe(b, 2, Arc::new(|_, _: &Callback| true));
        assert!(c.grant(c.begin_read(), a, [&h(1)]));
        let old = Invalidation::Entry { parent: h(1), name: b"old".to_vec() };
        let new = Invalidation::Entry { parent: h(1), name: b"new".to_vec() };
        let change = c.begin_change(b, &[Invalidation::Object(h(1)), old.clone(), Invalidation::Object(h(1)), new.clone()]);
        let _ = c.end_change(change, []);
        assert_eq!(*got.lock().unwrap(), vec![old, new, Invalidation::Object(h(1))], "entries first, duplicates dropped");
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
        let change = c.begin_change(b, &[Invalidation::Object(h(7))]);
        assert!(!c.grant(ticket, a, [&h(7)]), "read begun before, granted during the change");
        let during = c.begin_read();
        let _ = c.end_change(change, [&h(7)]);
        assert!(!c.grant(during, a, [&h(7)]), "read begun during the change (it may have read the old state)");
        assert!(c.grant(c.begin_read(), a, [&h(7)]), "read begun after the change");
        let before = c.begin_read();
        let change = c.begin_change(b, &[Invalidation::Object(h(7))]);
        let _ = c.end_change(change, []);
        assert!(!c.grant(before, a, [&h(7)]), "read begun before a change that is over");
    }

    #[test]
    fn a_vanished_holder_delays_a_change_by_at_most_its_lease() {
        // Goal: a recall nobody can deliver waits for the lease, no longer.
        let c = Coherence::new(Duration::from_millis(300), false);
        let (a, b) = (ClientId(1), ClientId(2));
        c.subscribe(a, 1, Arc::new(|_, _: &Callback| true));
        c.subscribe(b, 2, Arc::new(|_, _: &Callback| true));
        assert!(c.grant(c.begin_read(), a, [&h(3)]));
        c.session_closed(a, 1);
        let started = Instant::now();
        let change = c.begin_change(b, &[Invalidation::Entry { parent: h(3), name: b"x".to_vec() }]);
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
            assert!(c.grant(c.begin_read(), a, [&h(n)]));
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.grant(c.begin_read(), a, [&h(200)]));
        assert_eq!(c.lock().objects.len(), 1, "only the fresh right is left");
    }

    #[test]
    fn after_a_restart_changes_wait_for_the_old_rights_to_expire() {
        let c = Coherence::new(Duration::from_millis(200), true);
        assert!(c.in_grace());
        let started = Instant::now();
        let change = c.begin_alone(ClientId(1)).expect("alone");
        let _ = c.end_change(change, []);
        assert!(started.elapsed() >= Duration::from_millis(150), "no grace period");
        assert!(!c.in_grace());
        assert!(!Coherence::new(Duration::from_secs(30), false).in_grace(), "a first start has none");
    }

    #[test]
    fn the_fast_path_is_only_for_a_lone_client() {
        let c = Coherence::new(Duration::from_secs(30), false);
        let (a, b) = (ClientId(1), ClientId(2));
        c.subscribe(a, 1, Arc::new(|_, _: &Callback| true));
        let change = c.begin_alone(a).expect("alone");
        let _ = c.end_change(change, []);
        c.subscribe(b, 2, Arc::new(|_, _: &Callback| true));
        assert!(c.begin_alone(a).is_none(), "b may hold rights now");
        assert!(c.shared(a));
    }
}
