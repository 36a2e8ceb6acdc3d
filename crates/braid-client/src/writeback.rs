//! Write-back of changes made under exclusive rights.
//!
//! While this client holds an object exclusively (`Response::exclusive`), writes and simple
//! attribute changes to it are queued here and answered at once, attributes from a shadow of
//! the object's attributes kept up to date by the queued changes. Files and directories created
//! in a directory whose every name this client knows are queued too: the new object gets a
//! *provisional* handle and inode number at once, and its server handle when the create has
//! reached the server (`resolve`); from then on the provisional handle stands for the real one. The queue reaches the
//! server, in order, in as few transactions as fit: from the flusher thread once the oldest
//! change is [`FLUSH_DELAY`] old or a batch is full, ahead of (or with) any change that may
//! depend on it, before any request naming an object with queued changes, on fsync, on a
//! callback from the server and on unmount.
//!
//! # Correctness
//! - Order: one shipment at a time (`shipping`), so queued changes reach the server in the
//!   order they were made, and a change that is not queued goes after everything it may depend
//!   on.
//! - Freshness: an object stays `pending` until the transaction carrying its changes has its
//!   reply; a request of this client naming it ships the queue first. Another client's read of
//!   it makes the server ask for the queue first (`Callback::Flush`); another client's change
//!   recalls it (`Callback::Recall`), which ships the queue before it is acknowledged.
//! - Errors: a queued change the server refuses is remembered for its object, reported by every
//!   close of it and by the next fsync of it, which forgets it (as NFS does), and the
//!   kernel's view of the object is dropped. A refused create loses the object: the changes
//!   queued for it fail too.
//! - Keys: every map here is keyed by the object's *canonical* handle (the server's once it is
//!   known); every entry point canonicalizes the handles it is given.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::connection::Epoch;
use braid_proto::limits::{DATA_BYTES_MAX, NAME_BYTES_MAX, TXN_COMMANDS_MAX};
use braid_proto::{Attr, AttrChanges, Command, CommandOk, Credentials, Entry, Errno, Handle, Lsn, TimeSet, Timestamp};

/// How long a change may wait in the queue for others to share its transaction.
pub const FLUSH_DELAY: Duration = Duration::from_millis(25);

/// Queued data beyond which writers wait for the queue to drain (the memory bound).
pub const DIRTY_BYTES_MAX: usize = 64 << 20;

/// How long after its grant an exclusive right is renewed (`Request::Renew`) before it ends:
/// an object this client changed stays changeable in its cache for that long although nothing
/// touched it since (postmark, `rm -rf` a while after an untar), while the rights of objects
/// long unused lapse instead of being renewed for ever.
pub(crate) const RENEW_HORIZON: Duration = Duration::from_secs(60);

/// An exclusive right is used for queueing only if it lasts at least this much longer: the
/// queue must reach the server before the right ends.
const RIGHT_MARGIN: Duration = Duration::from_secs(1);

/// First byte of the handles of objects created in the cache whose create has not reached the
/// server yet. Server handles start with their format (1), `Handle::created_by` references
/// with 0: neither can be mistaken for one.
const PROVISIONAL_FORMAT: u8 = 0xfe;

/// Inode numbers of objects created in the cache are this plus a counter: far above those of
/// the exported file systems (ext4: 32 bits), so they never name another object.
pub const PROVISIONAL_INO: u64 = 1 << 62;

/// Whether `handle` is a provisional handle given by this client.
pub fn is_provisional(handle: &Handle) -> bool {
    handle.0.first() == Some(&PROVISIONAL_FORMAT)
}

fn provisional(id: u64) -> Handle {
    let mut bytes = vec![PROVISIONAL_FORMAT];
    bytes.extend_from_slice(&id.to_le_bytes());
    Handle(bytes)
}

/// A directory's listing as this client knows it ([`WriteBack::known_listing`]).
#[derive(Debug)]
pub(crate) struct KnownListing {
    pub ino: u64,
    pub parent_ino: u64,
    pub entries: Vec<(Vec<u8>, Entry)>,
    pub until: Instant,
}

/// A change waiting to be sent.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub creds: Credentials,
    pub command: Command,
    pub data: Vec<u8>,
    /// The provisional handle of the object this command creates, if it is a queued create.
    pub creates: Option<Handle>,
    /// The server process that granted the exclusive rights this change was made under.
    pub rights_of: u64,
}

impl Queued {
    /// The object changed: the file written or set, the directory of a create.
    fn handle(&self) -> &Handle {
        self.command.handles()[0]
    }

    /// Every object whose state this change is part of.
    fn objects(&self) -> impl Iterator<Item = &Handle> {
        self.command.handles().into_iter().chain(self.creates.as_ref())
    }
}

#[derive(Default)]
struct State {
    queue: Vec<Queued>,
    bytes: usize,
    /// When the oldest queued change was queued.
    oldest: Option<Instant>,
    /// Objects with changes queued or on their way, and how many.
    pending: HashMap<Handle, usize>,
    /// Exclusive rights held, and until when.
    exclusive: HashMap<Handle, Instant>,
    /// When each exclusive right was last granted (not renewed): rights are renewed only for
    /// [`RENEW_HORIZON`] after that.
    granted_at: HashMap<Handle, Instant>,
    /// Attributes of exclusively held objects, with the queued changes applied.
    attrs: HashMap<Handle, Attr>,
    /// Objects whose `attrs` are the server's own (no change since it reported them): the
    /// kernel's requests for them are answered here.
    exact: HashSet<Handle>,
    /// Queued changes the server refused, by object, until reported.
    errors: HashMap<Handle, Errno>,
    /// Every name in directories this client made and has held exclusively since, with the
    /// object it names when known: nobody else can have added one, so a name not here does not
    /// exist (no lookup needed).
    listings: HashMap<Handle, HashMap<Vec<u8>, Option<Handle>>>,
    /// The directory holding each directory this client made, as far as this client has seen
    /// it move, and its inode number then: the `..` of a listing answered here (the number
    /// is looked up again when listing: a parent made here changes it when its create reaches
    /// the server). Forgotten when it may have moved unseen.
    parents: HashMap<Handle, (Handle, u64)>,
    /// Provisional handles whose create has reached the server, and the server's handles.
    resolved: HashMap<Handle, Handle>,
    /// Provisional handles whose create the server refused: the object never existed.
    lost: HashMap<Handle, Errno>,
    /// The lsn of the last transaction of this client that changed each object, until the
    /// server says that it is durable: an fsync of an object not here needs no round trip.
    unflushed: HashMap<Handle, Lsn>,
    /// The highest lsn the server said is durable.
    durable: Lsn,
    /// The server process `durable` and `unflushed` are from (0 before the first reply).
    instance: u64,
    /// Server processes gone, each with the last of its lsns that survived into its successor.
    retired: HashMap<u64, Lsn>,
    next_provisional: u64,
    shipping: bool,
    stop: bool,
    /// Most data bytes in one transaction: what the server takes in one frame.
    batch_bytes: usize,
}

impl State {
    /// The handle `handle` stands for now.
    fn canonical(&self, handle: &Handle) -> Handle {
        self.resolved.get(handle).unwrap_or(handle).clone()
    }

    fn canonicalize(&self, command: &mut Command) {
        for handle in command.handles_mut() {
            if let Some(real) = self.resolved.get(handle) {
                *handle = real.clone();
            }
        }
    }

    /// The create of `provisional` reached the server as `real`: everything known of the
    /// object moves to its real handle.
    fn resolve(&mut self, provisional: &Handle, real: &Handle) {
        assert!(is_provisional(provisional) && !is_provisional(real), "resolve maps a provisional handle to a server handle");
        self.resolved.insert(provisional.clone(), real.clone());
        fn rekey<V>(map: &mut HashMap<Handle, V>, from: &Handle, to: &Handle) {
            if let Some(value) = map.remove(from) {
                map.insert(to.clone(), value);
            }
        }
        rekey(&mut self.exclusive, provisional, real);
        rekey(&mut self.granted_at, provisional, real);
        rekey(&mut self.attrs, provisional, real);
        rekey(&mut self.listings, provisional, real);
        rekey(&mut self.parents, provisional, real);
        rekey(&mut self.errors, provisional, real);
        if let Some(count) = self.pending.remove(provisional) {
            *self.pending.entry(real.clone()).or_default() += count;
        }
        if self.exact.remove(provisional) {
            self.exact.insert(real.clone());
        }
        if let Some(lsn) = self.unflushed.remove(provisional) {
            self.unflushed_at(real.clone(), lsn);
        }
        // Queued commands keep naming `provisional`: they are canonicalized when they are sent.
    }

    /// How the lsns of server process `epoch` compare: with `durable` if it is the current
    /// process (a new one becomes current), or with the last of them that survived if it is
    /// gone (a reply it sent before the switch, read after it).
    fn era(&mut self, epoch: &Epoch) -> Era {
        if epoch.instance == self.instance {
            return Era::Current;
        }
        if let Some(kept) = self.retired.get(&epoch.instance) {
            return Era::Retired(*kept);
        }
        self.succeeded_by(epoch);
        Era::Current
    }

    /// Server process `epoch` took over from the current one. What it says of its predecessors
    /// settles every change not known durable: durable if its lsn survived, else lost in a
    /// crash of the server's machine (its fsync fails). A server that does not say (older than
    /// protocol version 5) leaves them to be compared with the new process's lsns, as before.
    fn succeeded_by(&mut self, epoch: &Epoch) {
        let previous = std::mem::replace(&mut self.instance, epoch.instance);
        self.durable = Lsn(0);
        let Some(predecessors) = epoch.predecessors.as_ref().filter(|_| previous != 0) else { return };
        // Not named (more restarts than the server remembers, or a new state): nothing is known.
        let kept = predecessors.iter().find(|p| p.instance == previous).map_or(Lsn(0), |p| p.durable);
        self.retired.insert(previous, kept);
        for (handle, lsn) in std::mem::take(&mut self.unflushed) {
            if lsn > kept {
                self.lose(handle);
            }
        }
    }

    /// A change to `handle` the server applied was lost by a crash of its machine before it
    /// was durable: the next fsync of `handle` fails.
    fn lose(&mut self, handle: Handle) {
        tracing::error!(?handle, "a change the server had applied was lost in a crash of its machine; its fsync will fail");
        self.not_exclusive(&handle);
        self.errors.entry(handle).or_insert(Errno(libc::EIO));
    }

    /// The transaction `lsn` of server process `epoch` changed `handles`.
    fn changed_at<'h>(&mut self, lsn: Lsn, epoch: &Epoch, handles: impl IntoIterator<Item = &'h Handle>) {
        match self.era(epoch) {
            Era::Current if lsn <= self.durable => {}
            Era::Current => handles.into_iter().for_each(|handle| self.unflushed_at(self.canonical(handle), lsn)),
            Era::Retired(kept) if lsn <= kept => {}
            Era::Retired(_) => handles.into_iter().for_each(|handle| self.lose(self.canonical(handle))),
        }
    }

    /// `handle` was changed by the transaction `lsn` (kept if a later one is known).
    fn unflushed_at(&mut self, handle: Handle, lsn: Lsn) {
        let at = self.unflushed.entry(handle).or_default();
        *at = (*at).max(lsn);
    }

    /// The server reported `attr` for `handle`. `current`: it holds whatever is pending (the
    /// answer to a command sent directly: the kernel holds the object locked for it, so nothing
    /// of it was queued since its shipment took the queue, which the server applied first).
    fn reported(&mut self, handle: &Handle, attr: &Attr, current: bool) {
        if self.exclusive.contains_key(handle) && (current || !self.pending.contains_key(handle)) {
            self.attrs.insert(handle.clone(), *attr);
            self.exact.insert(handle.clone());
        }
    }

    /// Records an exclusive right on `handle` granted now, until `until`.
    fn hold(&mut self, handle: Handle, until: Instant) {
        self.granted_at.insert(handle.clone(), Instant::now());
        self.exclusive.insert(handle, until);
    }

    /// Forgets what only an exclusive right on `handle` let this client know.
    fn not_exclusive(&mut self, handle: &Handle) {
        self.exclusive.remove(handle);
        self.granted_at.remove(handle);
        self.attrs.remove(handle);
        self.exact.remove(handle);
        self.listings.remove(handle);
        self.parents.remove(handle);
    }

    /// `name` in `parent` names `object` (`Some`: the object if known) or nothing (`None`)
    /// after a command, if the command was `applied`; a failed command leaves the listing
    /// unknown.
    fn listed(&mut self, parent: &Handle, name: &[u8], applied: bool, object: Option<Option<Handle>>) {
        let Some(names) = self.listings.get_mut(parent) else { return };
        match (applied, object) {
            (false, _) => {
                self.listings.remove(parent);
            }
            (true, Some(object)) => {
                names.insert(name.to_vec(), object);
            }
            (true, None) => {
                names.remove(name);
            }
        }
    }

    /// Until when this client holds `handle` (canonical) exclusively, if it still does at `now`.
    fn held_until(&self, handle: &Handle, now: Instant) -> Option<Instant> {
        self.exclusive.get(handle).copied().filter(|until| *until > now)
    }

    /// Until when this client holds `handle` exclusively, if long enough to queue a change of
    /// it at `now` ([`RIGHT_MARGIN`]).
    fn held_for_queueing(&self, handle: &Handle, now: Instant) -> Option<Instant> {
        self.exclusive.get(handle).copied().filter(|until| *until >= now + RIGHT_MARGIN)
    }

    /// The exact attributes of `handle` (canonical) and until when this client holds it
    /// exclusively, if it does at `now`.
    fn held_exactly(&self, handle: &Handle, now: Instant) -> Option<(Attr, Instant)> {
        let until = self.held_until(handle, now)?;
        let attr = *self.attrs.get(handle).filter(|_| self.exact.contains(handle))?;
        Some((attr, until))
    }

    /// A queued change of the entries of directory `dir` at `t`, adding `links` to its link
    /// count (a subdirectory's `..`).
    fn entries_changed(&mut self, dir: &Handle, t: Timestamp, links: i32) {
        if let Some(attr) = self.attrs.get_mut(dir) {
            attr.mtime = t;
            attr.ctime = t;
            attr.nlink = attr.nlink.saturating_add_signed(links);
        }
    }

    /// Appends a change made now, under exclusive rights of the current server process, to the
    /// queue: every object it is part of is pending until it is sent ([`WriteBack::sent`] counts
    /// them down the same way). Returns whether the flusher has work it did not know of: a
    /// first change to wait for, or a full queue to send at once.
    #[must_use]
    fn enqueue(&mut self, creds: &Credentials, command: Command, data: Vec<u8>, creates: Option<Handle>, now: Instant) -> bool {
        let op = Queued { creds: creds.clone(), command, data, creates, rights_of: self.instance };
        for handle in op.objects() {
            *self.pending.entry(handle.clone()).or_default() += 1;
        }
        let was_full = self.full();
        self.bytes += op.data.len();
        let first = self.oldest.is_none();
        self.oldest.get_or_insert(now);
        self.queue.push(op);
        first || (self.full() && !was_full)
    }

    /// Whether a transaction's worth is queued (the flusher sends it without waiting).
    fn full(&self) -> bool {
        self.queue.len() >= BATCH_COMMANDS_MAX || self.bytes >= self.batch_bytes
    }

    /// The objects the names `command` removes or replaces name now, if the listings know
    /// them all (`None`: a name whose object is unknown, or a directory whose names are).
    fn named_by(&self, command: &Command) -> Option<Vec<Handle>> {
        match command {
            Command::Unlink { parent, name } | Command::Rmdir { parent, name } => self.named(&[(parent, name)]),
            Command::Rename { parent, name, new_parent, new_name, .. } => self.named(&[(parent, name), (new_parent, new_name)]),
            _ => Some(Vec::new()),
        }
    }

    /// The objects that lose a name by `command` (for a rename: the one it replaces), with the
    /// same `None` as `named_by`.
    fn unnamed_by(&self, command: &Command) -> Option<Vec<Handle>> {
        match command {
            Command::Unlink { parent, name } | Command::Rmdir { parent, name } => self.named(&[(parent, name)]),
            Command::Rename { new_parent, new_name, .. } => self.named(&[(new_parent, new_name)]),
            _ => Some(Vec::new()),
        }
    }

    fn named(&self, names: &[(&Handle, &Vec<u8>)]) -> Option<Vec<Handle>> {
        let mut objects = Vec::new();
        for (parent, name) in names {
            match self.listings.get(&self.canonical(parent))?.get(*name) {
                None => {}
                Some(object) => objects.push(self.canonical(object.as_ref()?)),
            }
        }
        Some(objects)
    }

    /// The object `name` in `parent` names, if the listing knows it.
    fn listed_object(&self, parent: &Handle, name: &[u8]) -> Option<Handle> {
        let object = self.listings.get(parent)?.get(name)?.as_ref()?;
        Some(self.canonical(object))
    }

    /// Directory `dir` is in `parent` now (made or moved there by this client).
    fn moved_to(&mut self, dir: &Handle, parent: &Handle) {
        match self.attrs.get(parent) {
            Some(attr) => self.parents.insert(dir.clone(), (parent.clone(), attr.ino)),
            None => self.parents.remove(dir),
        };
    }

    /// The inode number of the directory `dir` is in, if known: as it is now if this client
    /// holds that directory, else as it was when `dir` moved there, unless it was provisional
    /// then (the server may have given it another since).
    fn parent_ino(&self, dir: &Handle) -> Option<u64> {
        let (parent, then) = self.parents.get(dir)?;
        match self.attrs.get(&self.canonical(parent)) {
            Some(attr) => Some(attr.ino),
            None => (*then < PROVISIONAL_INO).then_some(*then),
        }
    }

    /// A rename sent to the server moved `object` (`None`: an object the listings do not know,
    /// which may be any directory this client made).
    fn moved_unseen(&mut self, object: Option<&Handle>) {
        if let Some(object) = object {
            self.parents.remove(object);
        } else {
            self.parents.clear();
        }
    }
}

pub(crate) struct WriteBack {
    state: Mutex<State>,
    /// Signalled when `shipping` changes, changes are sent and creates resolved.
    changed: Condvar,
    /// Signalled for the flusher: the queue got its first change or filled up, or stopping.
    work: Condvar,
    root_squash: bool,
}

/// The right to send the queue: only one holder at a time, so that order is kept. Taken
/// with what was queued; dropping it (after the sends) marks those changes as sent.
pub(crate) struct Shipment<'w> {
    writeback: &'w WriteBack,
    pub ops: Vec<Queued>,
    /// Whether this shipment holds `shipping` (an empty queue needs no turn).
    holds_turn: bool,
}

impl Shipment<'_> {
    /// Lets the next shipment go: everything this one sent has been applied (what remains is
    /// waiting for the disk).
    pub(crate) fn give_up_turn(&mut self) {
        if !std::mem::take(&mut self.holds_turn) {
            return;
        }
        let mut state = self.writeback.lock();
        state.shipping = false;
        drop(state);
        self.writeback.changed.notify_all();
    }
}

impl Drop for Shipment<'_> {
    fn drop(&mut self) {
        self.give_up_turn();
    }
}

impl WriteBack {
    /// Ships transactions of at most [`DATA_BYTES_MAX`] data: see [`Self::with_batch_bytes`].
    pub(crate) fn new(root_squash: bool) -> Self {
        let state = State { batch_bytes: DATA_BYTES_MAX, ..State::default() };
        Self { state: Mutex::new(state), changed: Condvar::new(), work: Condvar::new(), root_squash }
    }

    /// Ships transactions of up to `bytes` of data (what the server takes in one frame).
    pub(crate) fn with_batch_bytes(self, bytes: usize) -> Self {
        assert!(bytes >= DATA_BYTES_MAX, "a batch must hold the largest single write");
        self.lock().batch_bytes = bytes;
        self
    }

    /// Most data bytes in one transaction.
    pub(crate) fn batch_bytes(&self) -> usize {
        self.lock().batch_bytes
    }

    fn wake_flusher(&self, wake: bool) {
        if wake {
            self.work.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("write-back lock")
    }

    /// Records the rights a response granted on `handles` (see `taken_back` on responses that
    /// a callback overtook).
    pub(crate) fn granted<'h>(
        &self,
        handles: impl IntoIterator<Item = &'h Handle>,
        until: Option<Instant>,
        exclusive: bool,
        epoch: &Epoch,
    ) {
        let mut state = self.lock();
        // The process that grants them becomes the current one first: changes queued under
        // these rights are stamped with it (`Queued::rights_of`), and a reply of a process
        // already succeeded grants nothing exclusive.
        let current = matches!(state.era(epoch), Era::Current);
        for handle in handles {
            let handle = state.canonical(handle);
            match until {
                Some(until) if exclusive && current => state.hold(handle, until),
                _ => state.not_exclusive(&handle),
            }
        }
    }

    /// Keeps the listings of directories this client made up to date with a transaction's
    /// applied commands (`results` holds one per command applied). The first `queued` commands
    /// were queued here: the listings have shown them since; only their failure matters.
    pub(crate) fn names_changed(&self, commands: &[Command], results: &[Result<CommandOk, Errno>], queued: usize) {
        let mut state = self.lock();
        for (index, (command, result)) in commands.iter().zip(results).enumerate() {
            let applied = result.is_ok();
            let made = match result {
                Ok(CommandOk::Entry(entry)) => Some(entry.handle.clone()),
                _ => None,
            };
            if let (Command::Mkdir { parent, .. }, Some(dir)) = (command, &made) {
                if state.exclusive.contains_key(dir) {
                    // A directory made in the cache already lists what was queued in it.
                    state.listings.entry(dir.clone()).or_default();
                    state.moved_to(dir, parent);
                }
            }
            if index < queued && applied {
                continue;
            }
            match command {
                Command::Create { parent, name, .. } | Command::Mkdir { parent, name, .. } | Command::Symlink { parent, name, .. } => {
                    state.listed(parent, name, applied, Some(made))
                }
                Command::Link { handle, new_parent, new_name } => state.listed(new_parent, new_name, applied, Some(Some(handle.clone()))),
                Command::Unlink { parent, name } | Command::Rmdir { parent, name } => state.listed(parent, name, applied, None),
                Command::Rename { parent, name, new_parent, new_name, flags } => {
                    let (moved, replaced) = (state.listed_object(parent, name), state.listed_object(new_parent, new_name));
                    let exchange = flags & libc::RENAME_EXCHANGE != 0;
                    state.moved_unseen(moved.as_ref());
                    if exchange {
                        state.moved_unseen(replaced.as_ref());
                    }
                    state.listed(parent, name, applied, exchange.then_some(replaced));
                    state.listed(new_parent, new_name, applied, Some(moved));
                }
                _ => {}
            }
        }
    }

    /// Whether `name` is known not to exist in `parent` (a directory this client made and holds
    /// exclusively, and never put that name in).
    pub(crate) fn known_missing(&self, parent: &Handle, name: &[u8]) -> bool {
        let state = self.lock();
        let parent = &state.canonical(parent);
        let held = state.held_until(parent, Instant::now()).is_some();
        // An overlong name gets its error from the server.
        held && name.len() <= braid_proto::limits::NAME_BYTES_MAX
            && state.listings.get(parent).is_some_and(|names| !names.contains_key(name))
    }

    /// The entry `name` in `parent` names, and until when that holds, if this client holds both
    /// exclusively, the directory is one whose names it knows and the object's shadow is exact.
    pub(crate) fn known_entry(&self, parent: &Handle, name: &[u8]) -> Option<(Entry, Instant)> {
        let state = self.lock();
        let now = Instant::now();
        let parent = state.canonical(parent);
        let parent_until = state.held_until(&parent, now)?;
        let handle = state.listed_object(&parent, name)?;
        let (attr, until) = state.held_exactly(&handle, now)?;
        Some((Entry { handle, attr }, until.min(parent_until)))
    }

    /// The listing of directory `dir` (every name with its entry), its own and its parent's
    /// inode numbers, and until when that holds, if nobody else can have changed any of it:
    /// this client made `dir`, holds it and every object in it exclusively, and their shadows
    /// are exact. `None`: the server is to list it.
    pub(crate) fn known_listing(&self, dir: &Handle) -> Option<KnownListing> {
        let state = self.lock();
        let now = Instant::now();
        let dir = state.canonical(dir);
        let (attr, mut until) = state.held_exactly(&dir, now)?;
        let parent_ino = state.parent_ino(&dir)?;
        let names = state.listings.get(&dir)?;
        let mut entries = Vec::with_capacity(names.len());
        for (name, object) in names {
            let handle = state.canonical(object.as_ref()?);
            let (attr, object_until) = state.held_exactly(&handle, now)?;
            until = until.min(object_until);
            entries.push((name.clone(), Entry { handle, attr }));
        }
        Some(KnownListing { ino: attr.ino, parent_ino, entries, until })
    }

    /// Records attributes the server reported, for objects held exclusively.
    pub(crate) fn attributes(&self, handle: &Handle, attr: &Attr) {
        let mut state = self.lock();
        let handle = state.canonical(handle);
        state.reported(&handle, attr, false);
    }

    /// Records what a transaction's results tell about objects held exclusively: the names in
    /// directories made here, and the attributes of objects whose last command reported them.
    /// `commands` are canonical; the first `queued` of them were queued here, so the shadow
    /// attributes already show what they did.
    /// `lsn`: the transaction's, and the server process it is from; every object it names or
    /// creates is unflushed until it is durable.
    pub(crate) fn applied(&self, commands: &[Command], results: &[Result<CommandOk, Errno>], queued: usize, lsn: (Lsn, &Epoch)) {
        // Before the listings forget them: the objects that names removed or replaced named.
        let renamed = {
            let state = self.lock();
            commands[queued.min(commands.len())..].iter().map(|command| state.named_by(command)).collect::<Option<Vec<_>>>()
        };
        self.names_changed(commands, results, queued);
        let mut state = self.lock();
        state.changed_at(lsn.0, lsn.1, commands.iter().flat_map(Command::handles).chain(braid_proto::created(results)));
        for (index, (command, result)) in commands.iter().zip(results).enumerate() {
            match (command, result) {
                (_, Ok(CommandOk::Attr(attr))) => {
                    // A probe may have been sent after changes queued since (see `reported`).
                    let probe = command.is_probe();
                    command.handles().into_iter().for_each(|h| state.reported(h, attr, index >= queued && !probe))
                }
                _ if index < queued => {}
                // They change the objects their names named (ctime, link count): those the
                // listings knew, or any.
                (Command::Unlink { .. } | Command::Rmdir { .. } | Command::Rename { .. }, _) => match &renamed {
                    Some(objects) => {
                        let named = objects[index - queued].iter().chain(command.handles());
                        named.for_each(|h| {
                            state.exact.remove(h);
                        })
                    }
                    None => state.exact.clear(),
                },
                _ => command.handles().into_iter().for_each(|h| {
                    state.exact.remove(h);
                }),
            }
            if let Ok(CommandOk::Entry(entry)) = result {
                state.reported(&entry.handle, &entry.attr, false);
            }
        }
    }

    /// The server's attributes of `handle` and until when they hold, if this client holds it
    /// exclusively and has not changed it since the server reported them.
    /// Queued changes included: the server has them once the queue is sent, and nobody else
    /// can change the object meanwhile.
    pub(crate) fn exact_attributes(&self, handle: &Handle) -> Option<(Attr, Instant)> {
        let state = self.lock();
        state.held_exactly(&state.canonical(handle), Instant::now())
    }

    /// Whether this client holds `handle` exclusively.
    pub(crate) fn holds(&self, handle: &Handle) -> bool {
        self.held_until(handle).is_some()
    }

    /// Until when this client holds `handle` exclusively, if it does.
    pub(crate) fn held_until(&self, handle: &Handle) -> Option<Instant> {
        let state = self.lock();
        state.held_until(&state.canonical(handle), Instant::now())
    }

    /// Where in `handles` one names the same object as `handle` (a provisional handle and the
    /// real one its create made do).
    pub(crate) fn position_of_object(&self, handles: &[Handle], handle: &Handle) -> Option<usize> {
        let state = self.lock();
        let wanted = state.canonical(handle);
        handles.iter().position(|h| state.canonical(h) == wanted)
    }

    /// Whether a change by `creds` is checked by the server as another user's (root squashed).
    pub(crate) fn squashed(&self, creds: &Credentials) -> bool {
        creds.uid == 0 && self.root_squash
    }

    /// The server took exclusivity on `handles` back (nothing more is queued for them; the
    /// queue is sent next).
    pub(crate) fn downgraded(&self, handles: &[Handle]) {
        let mut state = self.lock();
        for handle in handles {
            let handle = state.canonical(handle);
            state.not_exclusive(&handle);
        }
    }

    /// The handle the server knows `handle` by; an error if it is provisional and its create
    /// never reached the server.
    pub(crate) fn server_handle(&self, handle: &Handle) -> Result<Handle, Errno> {
        let state = self.lock();
        let canonical = state.canonical(handle);
        if is_provisional(&canonical) {
            return Err(state.lost.get(&canonical).copied().unwrap_or(Errno(libc::ESTALE)));
        }
        Ok(canonical)
    }

    /// `commands` as the server must see them: handles of objects created earlier in the same
    /// transaction become `Handle::created_by` references (`creates`: the index of each
    /// provisional handle's create), others their server handle. An error if a command names
    /// an object whose create failed.
    pub(crate) fn on_the_wire(&self, commands: &[Command], creates: &[(usize, Handle)]) -> Result<Vec<Command>, Errno> {
        let state = self.lock();
        let mut wire = commands.to_vec();
        for (index, command) in wire.iter_mut().enumerate() {
            for handle in command.handles_mut() {
                *handle = state.canonical(handle);
                if !is_provisional(handle) {
                    continue;
                }
                match creates.iter().find(|(at, created)| *at < index && created == handle) {
                    Some((at, _)) => *handle = Handle::created_by(*at as u32),
                    None => return Err(state.lost.get(handle).copied().unwrap_or(Errno(libc::ESTALE))),
                }
            }
        }
        Ok(wire)
    }

    /// `commands` with every handle canonical (after the creates they depend on resolved).
    /// The objects (server handles) that lose a name by `commands`, if this client's listings
    /// tell (`None`: a directory not listed here, or a name whose object is unknown).
    pub(crate) fn unnamed_by(&self, commands: &[Command]) -> Option<Vec<Handle>> {
        let state = self.lock();
        let objects = commands.iter().map(|command| state.unnamed_by(command)).collect::<Option<Vec<_>>>()?;
        Some(objects.concat())
    }

    /// `handle` as the server knows it (the real handle of a provisional one that was created).
    pub(crate) fn canonical_handle(&self, handle: &Handle) -> Handle {
        self.lock().canonical(handle)
    }

    pub(crate) fn canonical(&self, commands: &[Command]) -> Vec<Command> {
        let state = self.lock();
        let mut commands = commands.to_vec();
        commands.iter_mut().for_each(|c| state.canonicalize(c));
        commands
    }

    /// The create of `provisional` reached the server: the object is `real` from now on.
    pub(crate) fn resolve(&self, provisional: &Handle, real: &Handle) {
        self.lock().resolve(provisional, real);
        self.changed.notify_all();
    }

    /// Whether `op` names an object whose create the server refused, and the error.
    pub(crate) fn names_lost(&self, op: &Queued) -> Option<Errno> {
        let state = self.lock();
        op.command.handles().into_iter().find_map(|h| state.lost.get(&state.canonical(h)).copied())
    }

    /// Empty setattrs of every object `batch` changes or creates, to be sent after it: their
    /// results are the server's attributes, which the shadow then takes (blocks, times).
    pub(crate) fn probes(batch: &[Queued]) -> Vec<Command> {
        let mut objects: Vec<&Handle> = Vec::new();
        for op in batch {
            for handle in op.objects() {
                if !objects.contains(&handle) {
                    objects.push(handle);
                }
            }
        }
        objects.into_iter().map(|handle| Command::SetAttr { handle: handle.clone(), changes: AttrChanges::default() }).collect()
    }

    /// Rights may have been recalled unseen: no object is held exclusively any more.
    pub(crate) fn lost_rights(&self) {
        let mut state = self.lock();
        state.exclusive.clear();
        state.granted_at.clear();
        state.attrs.clear();
        state.exact.clear();
        state.listings.clear();
        state.parents.clear();
    }

    /// Queues the create of a regular file (`Command::Create`) or directory (`Command::Mkdir`)
    /// if this client holds the directory exclusively and knows every name in it (so the name
    /// is free on the server too), and returns the new object as the server would have: with a
    /// provisional handle and inode number. `None`: it must be sent now.
    pub(crate) fn queue_create(&self, creds: &Credentials, command: &Command) -> Option<(Entry, Instant)> {
        let mut state = self.lock();
        let mut command = command.clone();
        state.canonicalize(&mut command);
        let now = Instant::now();
        let (parent, name, mode) = match &command {
            Command::Create { parent, name, mode, rdev: 0, .. } if mode & libc::S_IFMT == libc::S_IFREG => (parent, name, *mode),
            Command::Mkdir { parent, name, mode } => (parent, name, libc::S_IFDIR | (mode & 0o7777)),
            _ => return None,
        };
        let setid = libc::S_ISUID | libc::S_ISGID;
        // A squashed root's objects belong to someone else; set-id bits may be dropped by the
        // server: those outcomes are the server's to tell.
        if state.stop || self.squashed(creds) || mode & setid != 0 || name.len() > NAME_BYTES_MAX {
            return None;
        }
        let until = state.held_for_queueing(parent, now)?;
        if state.listings.get(parent).is_none_or(|names| names.contains_key(name)) {
            return None;
        }
        // A set-group-id directory gives its group (and, to directories, the bit): the server's.
        let blksize = state.attrs.get(parent).filter(|dir| dir.mode & libc::S_ISGID == 0)?.blksize;
        let id = state.next_provisional;
        state.next_provisional += 1;
        let handle = provisional(id);
        let directory = mode & libc::S_IFMT == libc::S_IFDIR;
        let t = self::now();
        let attr = Attr {
            ino: PROVISIONAL_INO + id,
            size: if directory { u64::from(blksize) } else { 0 },
            blocks: if directory { u64::from(blksize) / 512 } else { 0 },
            atime: t,
            mtime: t,
            ctime: t,
            mode,
            nlink: if directory { 2 } else { 1 },
            uid: creds.uid,
            gid: creds.gid,
            rdev: 0,
            blksize,
        };
        let (parent, name) = (parent.clone(), name.clone());
        state.entries_changed(&parent, t, i32::from(directory));
        state.listings.get_mut(&parent).expect("checked above").insert(name, Some(handle.clone()));
        if directory {
            state.listings.insert(handle.clone(), HashMap::new());
            state.moved_to(&handle, &parent);
        }
        state.hold(handle.clone(), until);
        state.attrs.insert(handle.clone(), attr);
        state.exact.insert(handle.clone());
        let wake = state.enqueue(creds, command, Vec::new(), Some(handle.clone()), now);
        drop(state);
        self.wake_flusher(wake);
        Some((Entry { handle, attr }, until))
    }

    /// Queues `command` if this client may make it in its cache, returning what the server
    /// would have answered; `None`: it must be sent now.
    pub(crate) fn queue(&self, creds: &Credentials, command: &Command, data: &[u8]) -> Option<CommandOk> {
        let mut state = self.lock();
        let mut command = command.clone();
        state.canonicalize(&mut command);
        let command = &command;
        let now = Instant::now();
        let handle = match command {
            Command::Write { handle, .. } | Command::SetAttr { handle, .. } | Command::Append { handle, .. } => handle,
            _ => return None,
        };
        let mut sent_command = None;
        if state.stop || state.held_for_queueing(handle, now).is_none() {
            return None;
        }
        let ok = match command {
            // Held exclusively with exact attributes, the end of the file is where the server
            // would append: the append is a write there.
            Command::Append { len, .. } => {
                if !state.exact.contains(handle) {
                    return None;
                }
                let attr = state.attrs.get_mut(handle)?;
                let offset = attr.size;
                written(attr, offset, u64::from(*len));
                sent_command = Some(Command::Write { handle: handle.clone(), offset, len: *len });
                CommandOk::Written(u64::from(*len))
            }
            Command::Write { offset, len, .. } => {
                if let Some(attr) = state.attrs.get_mut(handle) {
                    written(attr, *offset, *len as u64);
                }
                CommandOk::Written(*len as u64)
            }
            Command::SetAttr { changes, .. } => {
                let squashed = self.squashed(creds);
                let attr = state.attrs.get_mut(handle).filter(|attr| !squashed && predictable(attr, changes))?;
                // "Now" is sent as the time predicted, so that the server's and the cache's
                // agree; only the owner may set explicit times.
                let now_times = [changes.atime, changes.mtime].contains(&Some(TimeSet::Now));
                if now_times && creds.uid != 0 && creds.uid != attr.uid {
                    return None;
                }
                set_attributes(attr, changes);
                let exact = |t: Option<TimeSet>, value: Timestamp| t.map(|_| TimeSet::At(value));
                let changes =
                    AttrChanges { atime: exact(changes.atime, attr.atime), mtime: exact(changes.mtime, attr.mtime), ..changes.clone() };
                sent_command = Some(Command::SetAttr { handle: handle.clone(), changes });
                CommandOk::Attr(*attr)
            }
            _ => unreachable!("matched above"),
        };
        let command = sent_command.unwrap_or_else(|| command.clone());
        let wake = state.enqueue(creds, command, data.to_vec(), None, now);
        drop(state);
        self.wake_flusher(wake);
        Some(ok)
    }

    /// The last open of `handle` ended. If its create is still queued, the create no longer
    /// asks the server to keep it open, and nothing is left to release: returns `true`.
    pub(crate) fn closed_before_created(&self, handle: &Handle) -> bool {
        let mut state = self.lock();
        if !is_provisional(handle) || state.resolved.contains_key(handle) {
            return false;
        }
        let create = state.queue.iter_mut().find(|op| op.creates.as_ref() == Some(handle));
        match create.map(|op| &mut op.command) {
            Some(Command::Create { pin, .. }) => {
                *pin = false;
                true
            }
            _ => false,
        }
    }

    /// Queues the removal of a name (`Command::Unlink`, `Command::Rmdir`) from a directory held
    /// exclusively whose every name this client knows, when the outcome is known: the name
    /// exists and names an object held exclusively, a file for an unlink, an empty directory
    /// for an rmdir (the kernel has checked the caller's permissions). `false`: it must be
    /// sent now.
    pub(crate) fn queue_remove(&self, creds: &Credentials, command: &Command) -> bool {
        let mut state = self.lock();
        let mut command = command.clone();
        state.canonicalize(&mut command);
        let now = Instant::now();
        let (parent, name, rmdir) = match &command {
            Command::Unlink { parent, name } => (parent.clone(), name.clone(), false),
            Command::Rmdir { parent, name } => (parent.clone(), name.clone(), true),
            _ => return false,
        };
        // A squashed root may not remove what the kernel let it: the server is to say.
        if state.stop || self.squashed(creds) {
            return false;
        }
        let Some(victim) = state.listed_object(&parent, &name) else { return false };
        let held = |state: &State, h: &Handle| state.held_for_queueing(h, now).is_some();
        if !held(&state, &parent) || !held(&state, &victim) || !state.exact.contains(&victim) {
            return false;
        }
        let Some(kind) = state.attrs.get(&victim).map(|a| a.mode & libc::S_IFMT) else { return false };
        let removable = match rmdir {
            false => kind != libc::S_IFDIR,
            true => kind == libc::S_IFDIR && state.listings.get(&victim).is_some_and(HashMap::is_empty),
        };
        if !removable {
            return false;
        }
        let t = self::now();
        state.entries_changed(&parent, t, -i32::from(rmdir));
        if let Some(object) = state.attrs.get_mut(&victim) {
            object.nlink = if rmdir { 0 } else { object.nlink.saturating_sub(1) };
            object.ctime = t;
        }
        state.listings.get_mut(&parent).expect("listed_object found it").remove(&name);
        if rmdir {
            state.listings.remove(&victim);
        }
        let wake = state.enqueue(creds, command, Vec::new(), None, now);
        drop(state);
        self.wake_flusher(wake);
        true
    }

    /// Queues a rename (`Command::Rename`, no flags or `RENAME_NOREPLACE`) between directories
    /// held exclusively whose every name this client knows, when the outcome is known: the
    /// source names an object held exclusively, and the target is free or names a file held
    /// exclusively that a file replaces. `false`: it must be sent now.
    pub(crate) fn queue_rename(&self, creds: &Credentials, command: &Command) -> bool {
        let mut state = self.lock();
        let mut command = command.clone();
        state.canonicalize(&mut command);
        let now = Instant::now();
        let Command::Rename { parent, name, new_parent, new_name, flags } = &command else { return false };
        if state.stop || self.squashed(creds) || *flags & !libc::RENAME_NOREPLACE != 0 {
            return false;
        }
        let held = |state: &State, h: &Handle| state.held_for_queueing(h, now).is_some();
        let known = |state: &State, h: &Handle| held(state, h) && state.exact.contains(h);
        let Some(moved) = state.listed_object(parent, name) else { return false };
        if !held(&state, parent) || !held(&state, new_parent) || !known(&state, &moved) || !state.listings.contains_key(new_parent) {
            return false;
        }
        let kind = |state: &State, h: &Handle| state.attrs.get(h).map(|a| a.mode & libc::S_IFMT);
        let moved_kind = kind(&state, &moved);
        let replaced = state.listed_object(new_parent, new_name);
        if replaced.as_ref() == Some(&moved) {
            // Two names of one file: the server's to answer (nothing happens).
            return false;
        }
        if let Some(replaced) = &replaced {
            // Replacing is predictable for a file over a file, and only without NOREPLACE.
            let files = moved_kind.is_some_and(|k| k != libc::S_IFDIR) && kind(&state, replaced).is_some_and(|k| k != libc::S_IFDIR);
            if *flags != 0 || !files || !known(&state, replaced) {
                return false;
            }
        }
        let directory = moved_kind == Some(libc::S_IFDIR);
        let t = self::now();
        let (parent, name, new_parent, new_name) = (parent.clone(), name.clone(), new_parent.clone(), new_name.clone());
        state.entries_changed(&parent, t, -i32::from(directory));
        state.entries_changed(&new_parent, t, i32::from(directory));
        if let Some(attr) = state.attrs.get_mut(&moved) {
            attr.ctime = t;
        }
        if let Some(attr) = replaced.as_ref().and_then(|r| state.attrs.get_mut(r)) {
            attr.nlink = attr.nlink.saturating_sub(1);
            attr.ctime = t;
        }
        let entry = state.listings.get_mut(&parent).expect("listed_object found it").remove(&name).flatten();
        state.listings.get_mut(&new_parent).expect("checked above").insert(new_name, entry);
        if directory {
            state.moved_to(&moved, &new_parent);
        }
        let wake = state.enqueue(creds, command, Vec::new(), None, now);
        drop(state);
        self.wake_flusher(wake);
        true
    }

    /// Queues a hard link (`Command::Link`) of a regular file held exclusively, whose attributes
    /// are known, to a free name in a directory held exclusively whose every name this client
    /// knows; returns the file as the server would (one more link). `None`: it must be sent now.
    /// (git makes every object file this way: link of a temporary file, then unlink.)
    pub(crate) fn queue_link(&self, creds: &Credentials, command: &Command) -> Option<(Entry, Instant)> {
        let mut state = self.lock();
        let mut command = command.clone();
        state.canonicalize(&mut command);
        let now = Instant::now();
        let Command::Link { handle, new_parent, new_name } = &command else { return None };
        if state.stop || self.squashed(creds) {
            return None;
        }
        let until = state.held_for_queueing(new_parent, now)?;
        state.held_for_queueing(handle, now)?;
        let regular = state.attrs.get(handle).is_some_and(|a| a.mode & libc::S_IFMT == libc::S_IFREG);
        let free = state.listings.get(new_parent).is_some_and(|names| !names.contains_key(new_name));
        if !regular || !state.exact.contains(handle) || !free {
            return None;
        }
        let (handle, new_parent, new_name) = (handle.clone(), new_parent.clone(), new_name.clone());
        let t = self::now();
        state.entries_changed(&new_parent, t, 0);
        let attr = state.attrs.get_mut(&handle).expect("checked above");
        attr.nlink += 1;
        attr.ctime = t;
        let attr = *attr;
        state.listings.get_mut(&new_parent).expect("checked above").insert(new_name, Some(handle.clone()));
        let wake = state.enqueue(creds, command, Vec::new(), None, now);
        drop(state);
        self.wake_flusher(wake);
        Some((Entry { handle, attr }, until))
    }

    /// Server process `epoch` said every transaction up to `lsn` is durable.
    pub(crate) fn made_durable(&self, lsn: Lsn, epoch: &Epoch) {
        let mut state = self.lock();
        if state.era(epoch) == Era::Current && lsn > state.durable {
            state.durable = lsn;
            state.unflushed.retain(|_, at| *at > lsn);
        }
    }

    /// How far the changes of `handle` this client made are from durable, as far as it knows.
    pub(crate) fn durability(&self, handle: &Handle) -> Durability {
        let state = self.lock();
        let handle = state.canonical(handle);
        if is_provisional(&handle) || state.pending.contains_key(&handle) {
            return Durability::Pending;
        }
        match state.unflushed.get(&handle) {
            Some(lsn) => Durability::Applied(*lsn),
            None => Durability::Durable,
        }
    }

    /// Exclusive rights to renew now: not ended at `now`, ending within `within`, and granted
    /// less than [`RENEW_HORIZON`] ago.
    pub(crate) fn rights_to_renew(&self, now: Instant, within: Duration) -> Vec<Handle> {
        let state = self.lock();
        let due = |(handle, until): (&Handle, &Instant)| {
            let recent = state.granted_at.get(handle).is_some_and(|at| now.saturating_duration_since(*at) < RENEW_HORIZON);
            let due = *until > now && *until < now + within && recent && !is_provisional(handle);
            due.then(|| handle.clone())
        };
        state.exclusive.iter().filter_map(due).collect()
    }

    /// The server renewed the rights on `handles` where `renewed` says so, and this client may
    /// count on them until `until`, if it still holds them (a recall meanwhile took them; a
    /// right granted again since lasts at least as long). Returns the rights extended.
    pub(crate) fn renewed(&self, handles: &[Handle], renewed: &[bool], until: Instant) -> Vec<Handle> {
        assert_eq!(handles.len(), renewed.len(), "one answer per right");
        let mut state = self.lock();
        let mut extended = Vec::new();
        for (handle, _) in handles.iter().zip(renewed).filter(|(_, renewed)| **renewed) {
            if let Some(held) = state.exclusive.get_mut(handle) {
                *held = (*held).max(until);
                extended.push(handle.clone());
            }
        }
        extended
    }

    /// Whether the client is stopping (unmount): no more changes are queued.
    pub(crate) fn stopped(&self) -> bool {
        self.lock().stop
    }

    /// Whether queued data is beyond the memory bound (the writer should send the queue).
    pub(crate) fn over_limit(&self) -> bool {
        self.lock().bytes >= DIRTY_BYTES_MAX
    }

    /// Whether any of `handles` has changes queued or on their way.
    pub(crate) fn pending<'h>(&self, handles: impl IntoIterator<Item = &'h Handle>) -> bool {
        let state = self.lock();
        !state.pending.is_empty() && handles.into_iter().any(|h| state.pending.contains_key(&state.canonical(h)))
    }

    /// Waits for the turn to send, and takes the queue. A caller that does not `depend` on
    /// queued changes needs no turn, nor does one when nothing is queued or on its way.
    pub(crate) fn begin_shipment(&self, depend: bool) -> Shipment<'_> {
        let mut state = self.lock();
        if !depend || (state.queue.is_empty() && !state.shipping) {
            return Shipment { writeback: self, ops: Vec::new(), holds_turn: false };
        }
        while state.shipping {
            state = self.changed.wait(state).expect("write-back lock");
        }
        state.shipping = true;
        state.bytes = 0;
        state.oldest = None;
        let ops = std::mem::take(&mut state.queue);
        Shipment { writeback: self, ops, holds_turn: true }
    }

    /// The server has applied (or refused) `ops`: they are no longer pending.
    pub(crate) fn sent(&self, ops: &[Queued]) {
        let mut state = self.lock();
        for op in ops {
            for handle in op.objects() {
                let handle = state.canonical(handle);
                if let Some(count) = state.pending.get_mut(&handle) {
                    *count -= 1;
                    if *count == 0 {
                        state.pending.remove(&handle);
                    }
                }
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    /// The server refused `op`: the object's cached state is wrong from here on.
    /// A refused create loses its object: what was queued for it fails too.
    pub(crate) fn failed(&self, op: &Queued, errno: Errno) {
        let mut state = self.lock();
        let handle = state.canonical(op.handle());
        state.not_exclusive(&handle);
        state.errors.entry(handle).or_insert(errno);
        if let Some(created) = op.creates.as_ref().filter(|h| !state.resolved.contains_key(*h)) {
            state.not_exclusive(created);
            state.lost.insert(created.clone(), errno);
            state.errors.entry(created.clone()).or_insert(errno);
        }
    }

    /// Waits until no change to `handle` is queued or on its way.
    pub(crate) fn wait_sent(&self, handle: &Handle) {
        let mut state = self.lock();
        while state.pending.contains_key(&state.canonical(handle)) {
            state = self.changed.wait(state).expect("write-back lock");
        }
    }

    /// The error of a queued change to `handle` not yet reported by an fsync, if any; `take`:
    /// it is reported now.
    pub(crate) fn error(&self, handle: &Handle, take: bool) -> Option<Errno> {
        let mut state = self.lock();
        let handle = state.canonical(handle);
        match take {
            true => state.errors.remove(&handle),
            false => state.errors.get(&handle).copied(),
        }
    }

    /// Waits until the queue should be sent: its oldest change is [`FLUSH_DELAY`] old or a
    /// transaction's worth is waiting. `false` once stopped with nothing queued.
    pub(crate) fn wait_for_work(&self) -> bool {
        let mut state = self.lock();
        loop {
            match state.oldest {
                Some(_) if state.full() || state.stop => return true,
                Some(oldest) => {
                    let due = oldest + FLUSH_DELAY;
                    let now = Instant::now();
                    if now >= due {
                        return true;
                    }
                    state = self.work.wait_timeout(state, due - now).expect("write-back lock").0;
                }
                None if state.stop => return false,
                None => state = self.work.wait(state).expect("write-back lock"),
            }
        }
    }

    /// Changes are no longer queued; the flusher ends once the queue is empty.
    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
        self.work.notify_all();
    }
}

/// How a server process's lsns compare with what this client knows (see `State::era`).
#[derive(Debug, PartialEq, Eq)]
enum Era {
    Current,
    Retired(Lsn),
}

/// How far an object's changes are from durable (see [`WriteBack::durability`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Some are queued or on their way.
    Pending,
    /// All applied, the last one at this lsn, which the server has not said is durable.
    Applied(Lsn),
    /// All durable.
    Durable,
}

/// How many transactions of a shipment may be in flight at once ([`concurrent_run`]).
pub(crate) const CONCURRENT_TXNS_MAX: usize = 4;

/// How many of `batches`, from the first, may be sent at once, each on its own channel, with no
/// answer awaited in between: a run of batches of writes only, none overlapping a byte another
/// batch of the run writes. The server may then apply them in any order and the file still
/// holds what the queue's order gives (writes within one batch keep their order: a transaction
/// is applied in order), and a refused write leaves nothing later in the run depending on it.
/// Anything else (creates, attribute changes, appends, names) may depend on the order, so it
/// ends the run. The last batch of a shipment is never in a run: it carries the probes (see
/// [`WriteBack::probes`]), whose answers must come after every write. At most `max`; a run
/// shorter than 2 is none (`0`).
pub(crate) fn concurrent_run(batches: &VecDeque<Vec<Queued>>, max: usize) -> usize {
    let run = independent_writes(batches.iter().take(max.min(batches.len().saturating_sub(1))));
    if run >= 2 {
        run
    } else {
        0
    }
}

/// How many of `batches`, from the first, hold only writes, none of a byte another of them
/// writes.
fn independent_writes<'q>(batches: impl Iterator<Item = &'q Vec<Queued>>) -> usize {
    let mut written: HashMap<&Handle, Vec<(u64, u64)>> = HashMap::new();
    let mut count = 0;
    for batch in batches {
        let mut ranges = Vec::with_capacity(batch.len());
        for op in batch {
            let Command::Write { handle, offset, len } = &op.command else { return count };
            let (start, end) = (*offset, offset.saturating_add(u64::from(*len)));
            if written.get(handle).is_some_and(|earlier| earlier.iter().any(|(s, e)| start < *e && *s < end)) {
                return count;
            }
            ranges.push((handle, (start, end)));
        }
        for (handle, range) in ranges {
            written.entry(handle).or_default().push(range);
        }
        count += 1;
    }
    count
}

/// The data of `batch`'s writes, in command order: the transaction's data section.
pub(crate) fn data_of(batch: &[Queued]) -> Vec<u8> {
    // Slices, not bytes: this copies up to a transaction's 4 MiB on every shipment.
    let mut data = Vec::with_capacity(batch.iter().map(|op| op.data.len()).sum());
    for op in batch {
        data.extend_from_slice(&op.data);
    }
    data
}

/// A transaction's worth of queued changes (the flusher sends the queue once it holds that many).
pub(crate) const BATCH_COMMANDS_MAX: usize = TXN_COMMANDS_MAX / 2;

/// Splits `ops` into transactions: consecutive changes of one caller, within the limits of
/// one transaction once the probes ([`WriteBack::probes`], one per object) are added, and of
/// at most `data_max` bytes of data.
pub(crate) fn batches(ops: Vec<Queued>, data_max: usize) -> Vec<Vec<Queued>> {
    let mut batches: Vec<Vec<Queued>> = Vec::new();
    let (mut bytes, mut objects) = (0, HashSet::new());
    for op in ops {
        let new_objects = op.objects().filter(|h| !objects.contains(*h)).count();
        let fits = batches.last().is_some_and(|batch| {
            batch.len() + 1 + objects.len() + new_objects <= TXN_COMMANDS_MAX
                && bytes + op.data.len() <= data_max
                && batch[0].creds == op.creds
        });
        if !fits {
            batches.push(Vec::new());
            bytes = 0;
            objects.clear();
        }
        bytes += op.data.len();
        objects.extend(op.objects().cloned());
        batches.last_mut().expect("just pushed").push(op);
    }
    batches
}

/// Whether the server's answer to `changes` can be predicted from `attr` exactly: no change of
/// owner (which may clear set-id bits) and no set-id bits set (which the server may refuse).
fn predictable(attr: &Attr, changes: &AttrChanges) -> bool {
    let setid = libc::S_ISUID | libc::S_ISGID;
    let same_owner = changes.uid.is_none_or(|uid| uid == attr.uid) && changes.gid.is_none_or(|gid| gid == attr.gid);
    same_owner && attr.mode & setid == 0 && changes.mode.is_none_or(|mode| mode & setid == 0)
}

fn set_attributes(attr: &mut Attr, changes: &AttrChanges) {
    let now = now();
    if let Some(mode) = changes.mode {
        attr.mode = (attr.mode & libc::S_IFMT) | (mode & 0o7777);
    }
    if let Some(size) = changes.size {
        attr.size = size;
        attr.blocks = attr.blocks.min(size.div_ceil(512));
        attr.mtime = now;
    }
    let at = |t: TimeSet| match t {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    };
    if let Some(t) = changes.atime {
        attr.atime = at(t);
    }
    if let Some(t) = changes.mtime {
        attr.mtime = at(t);
    }
    attr.ctime = now;
}

fn written(attr: &mut Attr, offset: u64, len: u64) {
    let now = now();
    attr.size = attr.size.max(offset + len);
    // The written range newly allocated, in 4 KiB blocks, at most the whole file: a write far
    // past the end of a sparse file allocates what it wrote, not the hole before it (`du` right
    // after `truncate -s 10G` and a 1 MiB write showed 10 GiB). The batch's probe then gives
    // the server's figure.
    let blocks_of = |bytes: u64| bytes.div_ceil(4096) * 8;
    attr.blocks = (attr.blocks + blocks_of(len)).min(blocks_of(attr.size)).max(attr.blocks);
    attr.mtime = now;
    attr.ctime = now;
}

fn now() -> Timestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_proto::limits::TXN_DATA_BYTES_MAX;
    use braid_proto::Predecessor;

    fn h(n: u8) -> Handle {
        Handle(vec![n])
    }

    /// A server process of a version that does not name its predecessors.
    fn epoch(instance: u64) -> Epoch {
        Epoch { instance, predecessors: None }
    }

    #[test]
    fn a_change_made_under_a_right_carries_the_server_process_that_granted_it() {
        // Goal: the server fences or reclaims a write-back by the process its rights came
        // from. The reply that grants a right makes its process the current one before the
        // right can be used: stamped with the one before (0 at the first reply), a change
        // made just after the grant was taken for one made under a restarted server's rights.
        let w = WriteBack::new(false);
        let until = Some(Instant::now() + Duration::from_secs(10));
        w.granted([&h(1)], until, true, &epoch(7));
        assert!(w.queue(&Credentials::default(), &Command::Write { handle: h(1), offset: 0, len: 1 }, b"x").is_some());
        assert_eq!(w.lock().queue.iter().map(|op| op.rights_of).collect::<Vec<_>>(), vec![7]);
        let successor = Epoch { instance: 8, predecessors: Some(vec![Predecessor { instance: 7, durable: Lsn(0) }]) };
        w.granted([&h(2)], until, true, &successor);
        w.granted([&h(3)], until, true, &epoch(7));
        assert!(!w.holds(&h(3)), "a reply of a process already succeeded granted a right");
        assert!(w.holds(&h(2)));
    }

    fn held(w: &WriteBack, handle: &Handle, attr: Attr) {
        w.granted([handle], Some(Instant::now() + Duration::from_secs(10)), true, &epoch(0));
        w.attributes(handle, &attr);
    }

    impl WriteBack {
        fn durable(&self, handle: &Handle) -> bool {
            self.durability(handle) == Durability::Durable
        }
    }

    #[test]
    fn an_object_is_durable_once_the_last_transaction_that_changed_it_is() {
        let w = WriteBack::new(false);
        let (dir, file, other) = (h(1), h(2), h(3));
        assert!(w.durable(&dir), "never changed here");
        let rename =
            Command::Rename { parent: dir.clone(), name: b"a".to_vec(), new_parent: dir.clone(), new_name: b"b".to_vec(), flags: 0 };
        w.applied(&[rename], &[Ok(CommandOk::Done)], 0, (Lsn(5), &epoch(1)));
        let write = Command::Write { handle: file.clone(), offset: 0, len: 1 };
        w.applied(&[write], &[Ok(CommandOk::Written(1))], 0, (Lsn(7), &epoch(1)));
        assert!(!w.durable(&dir) && !w.durable(&file));
        assert_eq!(w.durability(&file), Durability::Applied(Lsn(7)));
        assert!(w.durable(&other));
        w.made_durable(Lsn(6), &epoch(1));
        assert!(w.durable(&dir), "its last change (5) is durable");
        assert!(!w.durable(&file), "7 is not");
        w.made_durable(Lsn(4), &epoch(1));
        assert!(w.durable(&dir), "durability never moves back");
        w.applied(&[Command::Write { handle: file.clone(), offset: 1, len: 1 }], &[Ok(CommandOk::Written(1))], 0, (Lsn(3), &epoch(1)));
        w.made_durable(Lsn(7), &epoch(1));
        assert!(w.durable(&file), "an older transaction does not undo a later one");

        // Queued changes are not durable, whatever the server said.
        held(&w, &file, Attr::default());
        assert!(w.queue(&Credentials::default(), &Command::Write { handle: file.clone(), offset: 0, len: 1 }, b"x").is_some());
        assert!(!w.durable(&file));

        // A create made in the cache: its object is durable only after the create is, under
        // its real handle.
        let provisional = super::provisional(9);
        assert!(!w.durable(&provisional), "not even on the server");
        let create = Command::Create { parent: dir.clone(), name: b"n".to_vec(), mode: 0o600, rdev: 0, exclusive: true, pin: false };
        let made = Entry { handle: h(4), attr: Attr::default() };
        w.lock().resolve(&provisional, &h(4));
        w.applied(&[create], &[Ok(CommandOk::Entry(made))], 0, (Lsn(8), &epoch(1)));
        assert!(!w.durable(&provisional) && !w.durable(&h(4)) && !w.durable(&dir));
        w.made_durable(Lsn(8), &epoch(1));
        assert!(w.durable(&provisional) && w.durable(&h(4)) && w.durable(&dir));

        // A restarted server whose lsns start again lower: its transaction 2 is not durable
        // because the old process's 8 was.
        let later = h(5);
        w.applied(&[Command::Write { handle: later.clone(), offset: 0, len: 1 }], &[Ok(CommandOk::Written(1))], 0, (Lsn(2), &epoch(2)));
        assert_eq!(w.durability(&later), Durability::Applied(Lsn(2)));
        w.made_durable(Lsn(2), &epoch(2));
        assert!(w.durable(&later));
    }

    #[test]
    fn a_server_that_names_its_predecessor_settles_what_was_not_durable() {
        // Goal: after a crash of the server's machine, a change its old process applied but
        // had not made durable is reported lost (the fsync fails) and one it had is durable;
        // a late reply of the old process counts the same way, and never makes the old
        // process current again. Method: changes under process 1, then replies of process 2
        // that says how much of 1 survived.
        let w = WriteBack::new(false);
        let (kept, lost, late_kept, late_lost) = (h(1), h(2), h(3), h(4));
        let write = |handle: &Handle| [Command::Write { handle: handle.clone(), offset: 0, len: 1 }];
        let written = [Ok(CommandOk::Written(1))];
        let one = Epoch { instance: 1, predecessors: Some(vec![]) };
        w.applied(&write(&kept), &written, 0, (Lsn(4), &one));
        w.applied(&write(&lost), &written, 0, (Lsn(6), &one));
        let two = Epoch { instance: 2, predecessors: Some(vec![Predecessor { instance: 1, durable: Lsn(5) }]) };
        w.made_durable(Lsn(1), &two);
        assert!(w.durable(&kept), "4 survived");
        assert!(w.durable(&lost), "nothing to wait for any more");
        assert_eq!(w.error(&lost, true), Some(Errno(libc::EIO)), "6 did not: the fsync fails");
        assert_eq!(w.error(&kept, true), None);

        w.applied(&write(&late_kept), &written, 0, (Lsn(5), &one));
        w.applied(&write(&late_lost), &written, 0, (Lsn(7), &one));
        assert!(w.durable(&late_kept));
        assert_eq!(w.error(&late_lost, true), Some(Errno(libc::EIO)));
        w.made_durable(Lsn(9), &one);
        w.applied(&write(&kept), &written, 0, (Lsn(3), &two));
        assert_eq!(w.durability(&kept), Durability::Applied(Lsn(3)), "process 2's own lsns count from its own durable (1)");

        // A successor that does not name process 2 (a new state, or more restarts than it
        // remembers): none of 2's changes is known to have survived.
        let three = Epoch { instance: 3, predecessors: Some(vec![]) };
        w.made_durable(Lsn(1), &three);
        assert_eq!(w.error(&kept, true), Some(Errno(libc::EIO)));
    }

    #[test]
    fn rights_are_renewed_shortly_before_they_end_and_only_for_a_while_after_their_grant() {
        // Goal: a right is due for renewal once it ends within the window, a renewal extends it
        // only if it is still held, and rights granted longer than RENEW_HORIZON ago lapse.
        let w = WriteBack::new(false);
        let (file, other) = (h(1), h(2));
        let now = Instant::now();
        held(&w, &file, Attr::default());
        let window = Duration::from_secs(5);
        assert!(w.rights_to_renew(now, window).is_empty(), "ends in 10 s: not yet");
        assert_eq!(w.rights_to_renew(now + Duration::from_secs(6), window), vec![file.clone()]);
        assert!(w.rights_to_renew(now + Duration::from_secs(11), window).is_empty(), "ended: never revived");

        w.renewed(&[file.clone(), other.clone()], &[true, true], now + Duration::from_secs(100));
        assert!(w.holds(&file), "renewed");
        assert!(!w.holds(&other), "a renewal does not grant what is not held");
        assert!(w.rights_to_renew(now + Duration::from_secs(6), window).is_empty(), "ends in 94 s now");
        let late = now + RENEW_HORIZON + Duration::from_secs(1);
        assert!(w.rights_to_renew(late, Duration::from_secs(99)).is_empty(), "granted too long ago");
        assert_eq!(w.rights_to_renew(now + Duration::from_secs(30), Duration::from_secs(99)), vec![file.clone()]);
        w.renewed(std::slice::from_ref(&file), &[false], now + Duration::from_secs(200));
        let ends_by_101 = w.rights_to_renew(now + Duration::from_secs(30), Duration::from_secs(71));
        assert_eq!(ends_by_101, vec![file.clone()], "a refusal extends nothing: it still ends at 100 s");
    }

    #[test]
    fn a_direct_removal_forgets_the_attributes_of_what_its_names_named_only() {
        // Goal: an unlink sent to the server changes the object its name named (link count,
        // ctime) and its directory; the attributes of the other objects held stay the server's,
        // so their removals stay predictable (postmark: an append goes to the server, and then
        // every unlink did). A name whose object is unknown forgets them all.
        let w = WriteBack::new(false);
        let (dir, a, b) = (h(1), h(2), h(3));
        {
            let mut state = w.lock();
            for handle in [&dir, &a, &b] {
                state.hold(handle.clone(), Instant::now() + Duration::from_secs(10));
                state.exact.insert(handle.clone());
            }
            let names = [(b"a".to_vec(), Some(a.clone())), (b"b".to_vec(), Some(b.clone())), (b"u".to_vec(), None)];
            state.listings.insert(dir.clone(), names.into_iter().collect());
        }
        let unlink = |name: &[u8]| Command::Unlink { parent: dir.clone(), name: name.to_vec() };
        w.applied(&[unlink(b"a")], &[Ok(CommandOk::Done)], 0, (Lsn(1), &epoch(1)));
        let exact = |handle: &Handle| w.lock().exact.contains(handle);
        assert!(!exact(&a) && !exact(&dir), "what the unlink changed");
        assert!(exact(&b), "what it did not");
        w.applied(&[unlink(b"u")], &[Ok(CommandOk::Done)], 0, (Lsn(2), &epoch(1)));
        assert!(!exact(&b), "u named an unknown object: nothing is known exactly any more");
    }

    #[test]
    fn only_changes_to_objects_held_exclusively_are_queued() {
        let w = WriteBack::new(true);
        let creds = Credentials::default();
        let write = |n| Command::Write { handle: h(n), offset: 0, len: 3 };
        assert_eq!(w.queue(&creds, &write(1), b"abc"), None, "no right");
        w.granted([&h(1)], Some(Instant::now() + Duration::from_secs(10)), false, &epoch(0));
        assert_eq!(w.queue(&creds, &write(1), b"abc"), None, "shared right");
        w.granted([&h(1)], Some(Instant::now() + Duration::from_millis(100)), true, &epoch(0));
        assert_eq!(w.queue(&creds, &write(1), b"abc"), None, "right about to end");
        held(&w, &h(1), Attr::default());
        assert_eq!(w.queue(&creds, &write(1), b"abc"), Some(CommandOk::Written(3)));
        assert!(w.pending([&h(1)]));
        assert!(!w.pending([&h(2)]));
        let append = Command::Append { handle: h(1), len: 2 };
        assert_eq!(w.queue(&creds, &append, b"de"), Some(CommandOk::Written(2)), "held with exact attributes: at the end");
        let queued: Vec<_> = w.lock().queue.iter().map(|op| op.command.clone()).collect();
        assert!(matches!(queued[..], [_, Command::Write { offset: 3, len: 2, .. }]), "a write at the end: {queued:?}");
        assert_eq!(w.exact_attributes(&h(1)).map(|(a, _)| a.size), Some(5));
        w.lock().exact.remove(&h(1));
        assert_eq!(w.queue(&creds, &append, b"de"), None, "without exact attributes, appends land where the server says");
        w.downgraded(&[h(1)]);
        assert_eq!(w.queue(&creds, &write(1), b"abc"), None, "flushed and downgraded");
    }

    #[test]
    fn a_write_into_a_sparse_file_predicts_only_the_blocks_it_wrote() {
        // Goal: `du` right after a write far into a sparse file shows what was written, not the
        // hole (the prediction stands until the batch's probe brings the server's figure).
        let w = WriteBack::new(true);
        let creds = Credentials { uid: 1000, gid: 1000, groups: vec![] };
        held(&w, &h(1), Attr { mode: libc::S_IFREG | 0o644, uid: 1000, gid: 1000, ..Attr::default() });
        let grow = AttrChanges { size: Some(10 << 30), ..Default::default() };
        let Some(CommandOk::Attr(after)) = w.queue(&creds, &Command::SetAttr { handle: h(1), changes: grow }, &[]) else {
            panic!("not queued")
        };
        assert_eq!(after.blocks, 0, "a truncate upwards allocates nothing");
        let data = vec![1u8; 1 << 20];
        w.queue(&creds, &Command::Write { handle: h(1), offset: 5 << 30, len: 1 << 20 }, &data).expect("queued");
        let (attr, _) = w.exact_attributes(&h(1)).expect("shadow");
        assert_eq!((attr.size, attr.blocks), (10 << 30, 2048), "1 MiB in 512-byte units");
        w.queue(&creds, &Command::Write { handle: h(1), offset: 0, len: 100 }, &data[..100]).expect("queued");
        assert_eq!(w.exact_attributes(&h(1)).expect("shadow").0.blocks, 2056, "a partial block counts whole");
    }

    #[test]
    fn queued_changes_update_the_shadow_attributes() {
        let w = WriteBack::new(true);
        let creds = Credentials { uid: 1000, gid: 1000, groups: vec![] };
        let attr = Attr { mode: libc::S_IFREG | 0o644, uid: 1000, gid: 1000, size: 10, ..Attr::default() };
        held(&w, &h(1), attr);
        w.queue(&creds, &Command::Write { handle: h(1), offset: 8, len: 4 }, b"wxyz").expect("queued");
        let changes = AttrChanges { mode: Some(0o600), mtime: Some(TimeSet::At(Timestamp { secs: 5, nanos: 6 })), ..Default::default() };
        let Some(CommandOk::Attr(after)) = w.queue(&creds, &Command::SetAttr { handle: h(1), changes }, &[]) else { panic!("not queued") };
        assert_eq!(after.size, 12, "the write extended the file");
        assert_eq!(after.mode, libc::S_IFREG | 0o600);
        assert_eq!(after.mtime, Timestamp { secs: 5, nanos: 6 });
        let chown = AttrChanges { uid: Some(0), ..Default::default() };
        assert_eq!(w.queue(&creds, &Command::SetAttr { handle: h(1), changes: chown }, &[]), None, "owner changes go to the server");
        let setuid = AttrChanges { mode: Some(0o4755), ..Default::default() };
        assert_eq!(w.queue(&creds, &Command::SetAttr { handle: h(1), changes: setuid }, &[]), None, "set-id bits go to the server");
        let root = Credentials::default();
        let touch = AttrChanges { atime: Some(TimeSet::Now), ..Default::default() };
        assert_eq!(w.queue(&root, &Command::SetAttr { handle: h(1), changes: touch }, &[]), None, "squashed root");
    }

    #[test]
    fn now_is_sent_as_the_time_the_cache_shows() {
        // Goal: the server sets the very times the cache answered with, not its own "now".
        let w = WriteBack::new(false);
        let creds = Credentials { uid: 1000, gid: 1000, groups: vec![] };
        held(&w, &h(1), Attr { uid: 1000, gid: 1000, ..Attr::default() });
        let touch = AttrChanges { mtime: Some(TimeSet::Now), ..Default::default() };
        let Some(CommandOk::Attr(shown)) = w.queue(&creds, &Command::SetAttr { handle: h(1), changes: touch.clone() }, &[]) else {
            panic!("not queued")
        };
        let ops = w.begin_shipment(true).ops.clone();
        let Command::SetAttr { changes, .. } = &ops[0].command else { panic!("not a setattr") };
        assert_eq!(changes.mtime, Some(TimeSet::At(shown.mtime)));
        let stranger = Credentials { uid: 2000, gid: 2000, groups: vec![] };
        assert_eq!(w.queue(&stranger, &Command::SetAttr { handle: h(1), changes: touch }, &[]), None, "only the owner sets explicit times");
    }

    #[test]
    fn shipments_take_turns_and_keep_order() {
        let w = WriteBack::new(false);
        let creds = Credentials::default();
        held(&w, &h(1), Attr::default());
        for i in 0..3u64 {
            w.queue(&creds, &Command::Write { handle: h(1), offset: i, len: 1 }, b"x").expect("queued");
        }
        assert!(w.begin_shipment(false).ops.is_empty(), "independent changes take nothing");
        let first = w.begin_shipment(true);
        assert_eq!(first.ops.len(), 3);
        w.queue(&creds, &Command::Write { handle: h(1), offset: 9, len: 1 }, b"y").expect("queued");
        std::thread::scope(|s| {
            let second = s.spawn(|| w.begin_shipment(true).ops.len());
            std::thread::sleep(Duration::from_millis(50));
            assert!(!second.is_finished(), "the second shipment waits for the first");
            w.sent(&first.ops);
            drop(first);
            assert_eq!(second.join().unwrap(), 1);
        });
        assert!(w.pending([&h(1)]), "the fourth write is on its way");
    }

    #[test]
    fn names_missing_from_a_directory_made_here_need_no_lookup() {
        use braid_proto::Entry;
        let w = WriteBack::new(false);
        let (root, dir) = (h(1), h(2));
        let mkdir = [Command::Mkdir { parent: root.clone(), name: b"d".to_vec(), mode: 0o755 }];
        let made = [Ok(CommandOk::Entry(Entry { handle: dir.clone(), attr: Attr::default() }))];
        w.granted([&root, &dir], Some(Instant::now() + Duration::from_secs(10)), true, &epoch(0));
        w.names_changed(&mkdir, &made, 0);
        assert!(w.known_missing(&dir, b"a"));
        assert!(!w.known_missing(&dir, &[b'n'; 256]), "an overlong name is the server's to refuse");
        assert!(!w.known_missing(&root, b"a"), "the root was not made here");
        let create =
            |name: &[u8]| Command::Create { parent: dir.clone(), name: name.to_vec(), mode: 0o644, rdev: 0, exclusive: true, pin: false };
        w.names_changed(&[create(b"a")], &[Ok(CommandOk::Done)], 0);
        assert!(!w.known_missing(&dir, b"a"), "created");
        let rename =
            Command::Rename { parent: dir.clone(), name: b"a".to_vec(), new_parent: dir.clone(), new_name: b"b".to_vec(), flags: 0 };
        w.names_changed(&[rename], &[Ok(CommandOk::Done)], 0);
        assert!(w.known_missing(&dir, b"a") && !w.known_missing(&dir, b"b"), "renamed");
        w.names_changed(&[Command::Unlink { parent: dir.clone(), name: b"b".to_vec() }], &[Ok(CommandOk::Done)], 0);
        assert!(w.known_missing(&dir, b"b"), "unlinked");
        w.names_changed(&[create(b"c")], &[Err(Errno(libc::ENOSPC))], 0);
        assert!(!w.known_missing(&dir, b"z"), "a failed change leaves the listing unknown");
        w.granted([&dir], Some(Instant::now() + Duration::from_secs(10)), true, &epoch(0));
        w.names_changed(&mkdir, &made, 0);
        w.downgraded(std::slice::from_ref(&dir));
        assert!(!w.known_missing(&dir, b"z"), "another client read it");
    }

    #[test]
    fn attributes_are_answered_here_only_while_they_are_the_servers() {
        use braid_proto::Entry;
        let w = WriteBack::new(false);
        let (dir, file) = (h(1), h(2));
        let until = Some(Instant::now() + Duration::from_secs(10));
        w.granted([&dir, &file], until, true, &epoch(0));
        let dir_attr = Attr { ino: 1, nlink: 2, ..Attr::default() };
        let create = Command::Create { parent: dir.clone(), name: b"f".to_vec(), mode: 0o644, rdev: 0, exclusive: true, pin: false };
        let probe = Command::SetAttr { handle: dir.clone(), changes: AttrChanges::default() };
        let made = Ok(CommandOk::Entry(Entry { handle: file.clone(), attr: Attr { ino: 2, ..Attr::default() } }));
        w.applied(std::slice::from_ref(&create), std::slice::from_ref(&made), 0, (Lsn(1), &epoch(1)));
        assert!(w.exact_attributes(&dir).is_none(), "the create changed the directory");
        assert_eq!(w.exact_attributes(&file).map(|(a, _)| a.ino), Some(2), "the server reported the new file");
        w.applied(&[create, probe], &[made, Ok(CommandOk::Attr(dir_attr))], 0, (Lsn(1), &epoch(1)));
        assert_eq!(w.exact_attributes(&dir).map(|(a, _)| a.nlink), Some(2), "the probe reported the directory after it");
        w.queue(&Credentials::default(), &Command::Write { handle: file.clone(), offset: 0, len: 1 }, b"x").expect("queued");
        assert_eq!(w.exact_attributes(&file).map(|(a, _)| a.size), Some(1), "a queued write shows at once");
        w.applied(&[Command::Write { handle: file.clone(), offset: 0, len: 1 }], &[Ok(CommandOk::Written(1))], 1, (Lsn(1), &epoch(1)));
        assert!(w.exact_attributes(&file).is_some(), "a queued write, sent: the shadow had it already");
        w.applied(&[Command::Write { handle: file.clone(), offset: 0, len: 1 }], &[Ok(CommandOk::Written(1))], 0, (Lsn(1), &epoch(1)));
        assert!(w.exact_attributes(&file).is_none(), "a write sent directly changed the file behind the shadow");
        w.applied(&[Command::Unlink { parent: h(9), name: b"x".to_vec() }], &[Ok(CommandOk::Done)], 0, (Lsn(1), &epoch(1)));
        assert!(w.exact_attributes(&dir).is_none(), "an unlink may change objects known by name only");
    }

    #[test]
    fn batches_leave_room_for_a_probe_of_every_object() {
        let creates: Vec<Queued> = (0..1000u64)
            .map(|i| Queued {
                creds: Credentials::default(),
                command: create(&h(1), format!("f{i}").as_bytes()),
                data: Vec::new(),
                creates: Some(provisional(i)),
                rights_of: 0,
            })
            .collect();
        for batch in batches(creates, DATA_BYTES_MAX) {
            let probes = WriteBack::probes(&batch).len();
            assert!(batch.len() + probes <= TXN_COMMANDS_MAX, "{} commands and {probes} probes", batch.len());
            assert_eq!(probes, batch.len() + 1, "each new file and the directory");
        }
    }

    #[test]
    fn batches_split_by_caller_and_size() {
        let op = |uid, len: usize| Queued {
            creds: Credentials { uid, gid: 0, groups: vec![] },
            command: Command::Write { handle: h(1), offset: 0, len: len as u32 },
            data: vec![0; len],
            creates: None,
            rights_of: 0,
        };
        let ops = vec![op(1, 10), op(1, 10), op(2, 10), op(2, DATA_BYTES_MAX), op(2, 1)];
        let sizes: Vec<usize> = batches(ops, DATA_BYTES_MAX).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1, 1, 1]);

        // A server of protocol version 6 takes four 1 MiB writes in one transaction.
        let big = || op(1, DATA_BYTES_MAX);
        let sizes: Vec<usize> = batches(vec![big(); 9], TXN_DATA_BYTES_MAX).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![4, 4, 1]);
    }

    #[test]
    fn only_batches_of_writes_to_distinct_bytes_are_sent_together() {
        let creds = Credentials { uid: 1, gid: 0, groups: vec![] };
        let op = |command| Queued { creds: creds.clone(), command, data: Vec::new(), creates: None, rights_of: 0 };
        let write = |n, offset: u64, len| op(Command::Write { handle: h(n), offset, len });
        let run = |batches: Vec<Vec<Queued>>| concurrent_run(&batches.into(), CONCURRENT_TXNS_MAX);
        let mib = DATA_BYTES_MAX as u64;
        let seq = |k: u64| vec![write(1, k * mib, mib as u32), write(2, k * mib, mib as u32)];

        assert_eq!(run((0..6).map(seq).collect()), 4, "at most CONCURRENT_TXNS_MAX");
        assert_eq!(run((0..3).map(seq).collect()), 2, "the last batch (with the probes) is never in a run");
        assert_eq!(run((0..2).map(seq).collect()), 0, "one batch is no run");
        // A byte written twice: the later write must land last, so it waits for the earlier.
        assert_eq!(run(vec![seq(0), seq(1), vec![write(1, mib - 1, 2)], seq(3)]), 2);
        assert_eq!(run(vec![seq(0), vec![write(2, 10, 1)], seq(2)]), 0);
        assert_eq!(run(vec![vec![write(1, 0, 10), write(1, 5, 10)], seq(1), seq(2)]), 2, "overlaps within a batch keep their order");
        // Anything but a write may depend on what comes before it.
        let truncate = op(Command::SetAttr { handle: h(3), changes: AttrChanges { size: Some(0), ..AttrChanges::default() } });
        assert_eq!(run(vec![seq(0), seq(1), vec![truncate], seq(3)]), 2);
        let append = op(Command::Append { handle: h(3), len: 1 });
        assert_eq!(run(vec![seq(0), vec![write(3, 0, 1), append], seq(2)]), 0);
    }

    #[test]
    fn the_queue_is_sent_once_a_transactions_worth_of_data_is_queued() {
        let creds = Credentials { uid: 1000, gid: 1000, groups: vec![] };
        for batch_bytes in [DATA_BYTES_MAX, TXN_DATA_BYTES_MAX] {
            let w = WriteBack::new(false).with_batch_bytes(batch_bytes);
            held(&w, &h(1), Attr { mode: libc::S_IFREG | 0o644, ..Attr::default() });
            let mut offset = 0;
            while offset < batch_bytes as u64 {
                assert!(!w.lock().full(), "{batch_bytes}: full at {offset} bytes");
                let write = Command::Write { handle: h(1), offset, len: 64 << 10 };
                assert!(w.queue(&creds, &write, &[7; 64 << 10]).is_some(), "queued");
                offset += 64 << 10;
            }
            assert!(w.lock().full(), "{batch_bytes}: not full at {offset} bytes");
        }
    }

    /// A directory this client made and holds exclusively, with its attributes known.
    fn made_here(w: &WriteBack, dir: &Handle) {
        held(w, dir, Attr { mode: libc::S_IFDIR | 0o755, nlink: 2, blksize: 4096, ..Attr::default() });
        let mkdir = [Command::Mkdir { parent: h(9), name: b"d".to_vec(), mode: 0o755 }];
        w.names_changed(&mkdir, &[Ok(CommandOk::Entry(Entry { handle: dir.clone(), attr: Attr::default() }))], 0);
    }

    #[test]
    fn renames_between_directories_this_client_knows_are_queued() {
        let (w, creds, dir) = user_in_a_directory_made_here();
        let rename = |from: &Handle, name: &[u8], to: &Handle, new_name: &[u8], flags| Command::Rename {
            parent: from.clone(),
            name: name.to_vec(),
            new_parent: to.clone(),
            new_name: new_name.to_vec(),
            flags,
        };
        let file = queued_create(&w, &creds, &create(&dir, b"tmp"));
        let old = queued_create(&w, &creds, &create(&dir, b"target"));
        let sub = queued_create(&w, &creds, &Command::Mkdir { parent: dir.clone(), name: b"s".to_vec(), mode: 0o755 });
        assert!(!w.queue_rename(&creds, &rename(&dir, b"none", &dir, b"x", 0)), "a source not there");
        assert!(!w.queue_rename(&creds, &rename(&dir, b"tmp", &dir, b"target", libc::RENAME_NOREPLACE)), "EEXIST is the server's");
        assert!(!w.queue_rename(&creds, &rename(&dir, b"tmp", &dir, b"s", 0)), "a file over a directory");
        assert!(!w.queue_rename(&creds, &rename(&dir, b"tmp", &dir, b"t", libc::RENAME_EXCHANGE)));
        assert!(w.queue_rename(&creds, &rename(&dir, b"tmp", &dir, b"target", 0)), "the atomic update of a file");
        assert!(w.known_missing(&dir, b"tmp") && !w.known_missing(&dir, b"target"));
        assert_eq!(w.exact_attributes(&old.handle).map(|(a, _)| a.nlink), Some(0), "the replaced file has no name left");
        assert!(w.queue_rename(&creds, &rename(&dir, b"target", &sub.handle, b"moved", 0)), "into another directory");
        assert!(!w.known_missing(&sub.handle, b"moved") && w.known_missing(&dir, b"target"));
        assert!(w.queue_rename(&creds, &rename(&dir, b"s", &dir, b"s2", 0)), "a directory");
        assert!(!w.known_missing(&sub.handle, b"moved"), "its listing moves with it");
        assert!(
            w.queue_remove(&creds, &Command::Unlink { parent: sub.handle.clone(), name: b"moved".to_vec() }),
            "the name knows its object"
        );
        assert_eq!(w.exact_attributes(&file.handle).map(|(a, _)| a.nlink), Some(0));
    }

    #[test]
    fn removals_of_names_this_client_knows_are_queued() {
        let (w, creds, dir) = user_in_a_directory_made_here();
        let unlink = |name: &[u8]| Command::Unlink { parent: dir.clone(), name: name.to_vec() };
        let rmdir = |name: &[u8]| Command::Rmdir { parent: dir.clone(), name: name.to_vec() };
        assert!(!w.queue_remove(&creds, &unlink(b"nothing")), "a name not there is the server's to refuse");
        let file = queued_create(&w, &creds, &create(&dir, b"f"));
        let sub = queued_create(&w, &creds, &Command::Mkdir { parent: dir.clone(), name: b"s".to_vec(), mode: 0o755 });
        queued_create(&w, &creds, &create(&sub.handle, b"inner"));
        assert!(!w.queue_remove(&creds, &unlink(b"s")), "unlink of a directory");
        assert!(!w.queue_remove(&creds, &rmdir(b"f")), "rmdir of a file");
        assert!(!w.queue_remove(&creds, &rmdir(b"s")), "rmdir of a directory with a name in it");
        assert!(w.queue_remove(&creds, &unlink(b"f")));
        assert!(w.known_missing(&dir, b"f"), "the name is gone");
        assert_eq!(w.exact_attributes(&file.handle).map(|(a, _)| a.nlink), Some(0), "an open file shows it has no name left");
        assert!(w.queue_remove(&creds, &Command::Unlink { parent: sub.handle.clone(), name: b"inner".to_vec() }));
        assert!(w.queue_remove(&creds, &rmdir(b"s")), "empty now");
        assert_eq!(w.exact_attributes(&dir).map(|(a, _)| a.nlink), Some(2), "the subdirectory's `..` is gone");
        let ops = w.begin_shipment(true).ops.clone();
        assert_eq!(ops.len(), 6, "creates and removals go out in order");
        // Sent and applied, the removals do not bring the names back.
        let commands: Vec<Command> = ops.iter().map(|op| op.command.clone()).collect();
        let results: Vec<Result<CommandOk, Errno>> = commands.iter().map(|_| Ok(CommandOk::Done)).collect();
        w.sent(&ops);
        w.names_changed(&commands, &results, commands.len());
        assert!(w.known_missing(&dir, b"f") && w.known_missing(&dir, b"s"));
        let root = Credentials::default();
        queued_create(&w, &creds, &create(&dir, b"g"));
        assert!(!WriteBack::new(true).queue_remove(&root, &unlink(b"g")), "a squashed root");
    }

    #[test]
    fn hard_links_of_files_this_client_knows_are_queued() {
        // Goal: git's way of making an object file (link a temporary file to its final name,
        // then unlink the temporary) stays in the cache; what the server must decide does not.
        let (w, creds, dir) = user_in_a_directory_made_here();
        let file = queued_create(&w, &creds, &create(&dir, b"tmp"));
        let sub = queued_create(&w, &creds, &Command::Mkdir { parent: dir.clone(), name: b"s".to_vec(), mode: 0o755 });
        let link = |target: &Handle, name: &[u8], parent: &Handle| Command::Link {
            handle: target.clone(),
            new_parent: parent.clone(),
            new_name: name.to_vec(),
        };
        assert!(w.queue_link(&creds, &link(&file.handle, b"s", &dir)).is_none(), "the name is taken");
        assert!(w.queue_link(&creds, &link(&sub.handle, b"d2", &dir)).is_none(), "a directory");
        assert!(w.queue_link(&creds, &link(&file.handle, b"x", &h(9))).is_none(), "a directory not held");
        let (entry, _) = w.queue_link(&creds, &link(&file.handle, b"obj", &sub.handle)).expect("queued");
        assert_eq!((entry.handle.clone(), entry.attr.nlink), (file.handle.clone(), 2));
        assert_eq!(w.known_entry(&sub.handle, b"obj").map(|(e, _)| e.handle), Some(file.handle.clone()), "found by name");
        assert!(w.queue_remove(&creds, &Command::Unlink { parent: dir.clone(), name: b"tmp".to_vec() }));
        assert_eq!(w.exact_attributes(&file.handle).map(|(a, _)| a.nlink), Some(1), "one name left");
        assert_eq!(w.begin_shipment(true).ops.len(), 4, "create, mkdir, link and unlink go out in order");
    }

    /// A write-back state, a user, and a directory that user made here.
    fn user_in_a_directory_made_here() -> (WriteBack, Credentials, Handle) {
        let w = WriteBack::new(false);
        made_here(&w, &h(1));
        (w, Credentials { uid: 1000, gid: 100, groups: vec![] }, h(1))
    }

    /// The entry `command` gives when it is queued (it must be).
    fn queued_create(w: &WriteBack, creds: &Credentials, command: &Command) -> Entry {
        w.queue_create(creds, command).map(|(entry, _)| entry).expect("the create is queued")
    }

    fn create(parent: &Handle, name: &[u8]) -> Command {
        Command::Create { parent: parent.clone(), name: name.to_vec(), mode: libc::S_IFREG | 0o640, rdev: 0, exclusive: true, pin: true }
    }

    #[test]
    fn creates_in_a_directory_made_here_are_queued_with_provisional_handles() {
        let w = WriteBack::new(true);
        let creds = Credentials { uid: 1000, gid: 100, groups: vec![] };
        let dir = h(1);
        assert!(w.queue_create(&creds, &create(&dir, b"f")).is_none(), "no right on the directory");
        made_here(&w, &dir);
        let file = queued_create(&w, &creds, &create(&dir, b"f"));
        assert!(is_provisional(&file.handle));
        assert!(file.attr.ino >= PROVISIONAL_INO);
        assert_eq!((file.attr.mode, file.attr.uid, file.attr.gid, file.attr.nlink), (libc::S_IFREG | 0o640, 1000, 100, 1));
        assert!(!w.known_missing(&dir, b"f"), "the name is taken");
        assert!(w.queue_create(&creds, &create(&dir, b"f")).is_none(), "a name taken is the server's to refuse");
        let sub = queued_create(&w, &creds, &Command::Mkdir { parent: dir.clone(), name: b"s".to_vec(), mode: 0o700 });
        assert_eq!(w.exact_attributes(&dir).map(|(a, _)| a.nlink), Some(3), "the new directory's `..`");
        assert!(w.known_missing(&sub.handle, b"x"), "a new directory is empty");
        queued_create(&w, &creds, &create(&sub.handle, b"x"));
        assert!(w.queue(&creds, &Command::Write { handle: file.handle.clone(), offset: 0, len: 2 }, b"hi").is_some());
        assert_eq!(w.exact_attributes(&file.handle).map(|(a, _)| a.size), Some(2));
        assert!(w.pending([&file.handle]) && w.pending([&dir]));
        let root = Credentials::default();
        assert!(w.queue_create(&root, &create(&dir, b"r")).is_none(), "a squashed root's files are the server's to make");
        let setuid =
            Command::Create { parent: dir.clone(), name: b"u".to_vec(), mode: libc::S_IFREG | 0o4755, rdev: 0, exclusive: true, pin: true };
        assert!(w.queue_create(&creds, &setuid).is_none());
    }

    #[test]
    fn a_transaction_names_what_it_creates_by_index_and_what_was_created_before_by_handle() {
        let (w, creds, dir) = user_in_a_directory_made_here();
        let sub = queued_create(&w, &creds, &Command::Mkdir { parent: dir.clone(), name: b"s".to_vec(), mode: 0o700 });
        let file = queued_create(&w, &creds, &create(&sub.handle, b"f"));
        w.queue(&creds, &Command::Write { handle: file.handle.clone(), offset: 0, len: 1 }, b"x").expect("queued");
        let ops = w.begin_shipment(true).ops.clone();
        let commands: Vec<Command> = ops.iter().map(|op| op.command.clone()).collect();
        let creates: Vec<(usize, Handle)> = ops.iter().enumerate().filter_map(|(i, op)| op.creates.clone().map(|c| (i, c))).collect();
        let wire = w.on_the_wire(&commands, &creates).expect("every handle known");
        assert_eq!(wire[1].handles(), vec![&Handle::created_by(0)], "the file's directory is made by command 0");
        assert_eq!(wire[2].handles(), vec![&Handle::created_by(1)], "the write names the file made by command 1");
        assert!(w.on_the_wire(&commands[1..], &[]).is_err(), "a provisional handle nobody creates");
        // The first two reach the server; the write is sent on its own.
        w.resolve(&sub.handle, &h(20));
        w.resolve(&file.handle, &h(21));
        assert_eq!(w.on_the_wire(&commands[2..], &[]).expect("resolved")[0].handles(), vec![&h(21)]);
        assert_eq!(w.server_handle(&file.handle), Ok(h(21)));
        assert!(w.pending([&file.handle]) && w.pending([&h(21)]), "pending under both names until sent");
        w.sent(&ops);
        assert!(!w.pending([&h(21)]) && !w.pending([&dir]));
        assert!(w.known_missing(&h(20), b"g") && !w.known_missing(&h(20), b"f"), "the listing moved to the real handle");
        assert_eq!(w.exact_attributes(&file.handle).map(|(a, _)| a.size), Some(1), "and the shadow");
    }

    #[test]
    fn a_file_closed_before_its_create_is_sent_is_not_opened_on_the_server() {
        let (w, creds, dir) = user_in_a_directory_made_here();
        let (closed, open) = (queued_create(&w, &creds, &create(&dir, b"a")), queued_create(&w, &creds, &create(&dir, b"b")));
        assert!(w.closed_before_created(&closed.handle));
        let ops = w.begin_shipment(true).ops.clone();
        assert!(matches!(ops[0].command, Command::Create { pin: false, .. }), "no pin to release");
        assert!(matches!(ops[1].command, Command::Create { pin: true, .. }));
        assert!(!w.closed_before_created(&open.handle), "on its way: the server pins it, the release must follow");
        w.resolve(&open.handle, &h(30));
        assert!(!w.closed_before_created(&open.handle));
    }

    #[test]
    fn a_refused_create_loses_the_object_and_what_was_queued_for_it() {
        let (w, creds, dir) = user_in_a_directory_made_here();
        let file = queued_create(&w, &creds, &create(&dir, b"f"));
        w.queue(&creds, &Command::Write { handle: file.handle.clone(), offset: 0, len: 1 }, b"x").expect("queued");
        let ops = w.begin_shipment(true).ops.clone();
        w.failed(&ops[0], Errno(libc::ENOSPC));
        assert_eq!(w.names_lost(&ops[1]), Some(Errno(libc::ENOSPC)), "the write names a file that never existed");
        assert_eq!(w.server_handle(&file.handle), Err(Errno(libc::ENOSPC)));
        assert_eq!(w.error(&file.handle, false), Some(Errno(libc::ENOSPC)), "reported by a close");
        assert_eq!(w.error(&file.handle, true), Some(Errno(libc::ENOSPC)), "and by the fsync after it");
        assert_eq!(w.error(&file.handle, true), None, "once");
        assert!(w.queue(&creds, &Command::Write { handle: file.handle.clone(), offset: 1, len: 1 }, b"y").is_none());
    }

    #[test]
    fn a_directory_made_here_is_listed_here_while_all_in_it_is_held() {
        // Goal: `find` or `ls` right after an untar lists what this client made without asking
        // the server, and only as long as nobody else can have changed any of it; `..` is the
        // directory it is in now.
        let (w, creds, dir) = user_in_a_directory_made_here();
        let mkdir = |parent: &Handle, name: &[u8]| Command::Mkdir { parent: parent.clone(), name: name.to_vec(), mode: 0o755 };
        let sub = queued_create(&w, &creds, &mkdir(&dir, b"s"));
        let file = queued_create(&w, &creds, &create(&sub.handle, b"f"));
        let inner = queued_create(&w, &creds, &mkdir(&sub.handle, b"d"));
        let dir_ino = w.exact_attributes(&dir).expect("held").0.ino;
        let listing = w.known_listing(&sub.handle).expect("listed here");
        assert_eq!((listing.ino, listing.parent_ino), (sub.attr.ino, dir_ino));
        let mut names: Vec<_> = listing.entries.iter().map(|(name, e)| (name.clone(), e.handle.clone(), e.attr.mode)).collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(names, [(b"d".to_vec(), inner.handle.clone(), inner.attr.mode), (b"f".to_vec(), file.handle.clone(), file.attr.mode)]);
        assert!(w.known_listing(&dir).is_none(), "a directory whose own parent is not known");

        let rename =
            Command::Rename { parent: sub.handle.clone(), name: b"d".to_vec(), new_parent: dir.clone(), new_name: b"d".to_vec(), flags: 0 };
        assert!(w.queue_rename(&creds, &rename), "queued");
        assert_eq!(w.known_listing(&inner.handle).map(|l| l.parent_ino), Some(dir_ino), "`..` follows a move made here");
        assert_eq!(w.known_listing(&sub.handle).map(|l| l.entries.len()), Some(1), "and so does the name");

        // The create of `s` reaches the server, which gives it its inode number: `..` of a
        // directory in it is that number, not the provisional one (seen once in CI).
        let e = queued_create(&w, &creds, &mkdir(&sub.handle, b"e"));
        w.resolve(&sub.handle, &h(20));
        w.lock().reported(&h(20), &Attr { ino: 777, ..sub.attr }, true);
        assert_eq!(w.known_listing(&e.handle).map(|l| l.parent_ino), Some(777), "`..` is the parent's number now");

        w.downgraded(std::slice::from_ref(&file.handle));
        assert!(w.known_listing(&sub.handle).is_none(), "an object in it may be changed by another client");
        let elsewhere = Command::Rename { parent: h(9), name: b"x".to_vec(), new_parent: h(9), new_name: b"y".to_vec(), flags: 0 };
        w.names_changed(&[elsewhere], &[Ok(CommandOk::Done)], 0);
        assert!(w.known_listing(&inner.handle).is_none(), "a rename of an object not known may have moved it");
    }
}
