//! What the kernel caches on behalf of this mount, driven by the server's rights.
//!
//! The kernel's caches are the client cache: names and attributes (with timeouts), file pages
//! and directory listings. The kernel may keep them only while the server's lease covers
//! them: timeouts never outlast the lease, pages are kept across opens only while a lease has
//! covered the file without a gap, and a recall invalidates them through FUSE notifications
//! before it is acknowledged.
//!
//! # Deadlock avoidance
//! A notification may need a kernel lock (a directory's, a page's) that a request of this
//! mount holds while it waits for the server, and the server may be waiting for this very
//! recall to be acknowledged before it answers. So the objects of this mount's changes in flight
//! are marked busy; a recall of a busy object is acknowledged at once and its notification sent
//! by the invalidator thread once the change has returned. In that narrow case (both clients
//! changing the same object at the same moment) the old state stays visible here for the
//! duration of one round trip, except to a process that takes a lock: a lock taken on a file
//! this mount does not hold exclusively drops its pages first (as NFS does), so what the lock
//! guards is read afresh. A read that a change overlapped comes without a lease and is made
//! again; if it still has none, its pages are dropped after the answer.
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use braid_client::inodes::InodeTable;
use braid_client::{CallbackHandler, Lease};
use braid_proto::{Handle, Invalidation};
use fuser::{INodeNo, Notifier};

pub struct KernelCache {
    pub inodes: Mutex<InodeTable>,
    leases: Mutex<HashMap<u64, NodeLease>>,
    /// Extended attributes known to be missing, per node, until the lease of that answer ends
    /// (the kernel asks for `security.capability` before every write; the kernel itself does
    /// not cache extended attributes).
    missing_xattrs: Mutex<HashMap<u64, XattrKnowledge>>,
    busy: Mutex<HashMap<u64, usize>>,
    /// Notifications waiting for their objects to stop being busy.
    deferred: Mutex<Vec<Notice>>,
    /// Deferred notifications not sent yet (waiting or being sent), per node: until they are
    /// out, the kernel may hold pages of the node that are no longer right.
    unsent: Mutex<HashMap<u64, usize>>,
    /// Signalled when an object stops being busy or a notice is deferred.
    idle: Condvar,
    /// Deferred drops of pages not sent yet, per node (also counted in `unsent`).
    pages_unsent: Mutex<HashMap<u64, usize>>,
    /// Signalled when a deferred drop of pages has been sent.
    pages_sent: Condvar,
    /// Who read each node since this mount last wrote it (see `written`).
    readers: Mutex<HashMap<u64, Readers>>,
    notifier: OnceLock<Notifier>,
}

/// What is known of a node's extended attributes, until when.
struct XattrKnowledge {
    /// Names asked for and missing.
    missing: HashSet<Vec<u8>>,
    /// Every name it has, if known (`Request::XattrNames`): any other is missing.
    listed: Option<HashSet<Vec<u8>>>,
    until: Instant,
}

impl XattrKnowledge {
    fn lacks(&self, name: &[u8]) -> bool {
        self.until > Instant::now() && (self.missing.contains(name) || self.listed.as_ref().is_some_and(|names| !names.contains(name)))
    }
}

struct NodeLease {
    until: Instant,
    /// The lease lapsed before it was renewed: pages cached before may be stale.
    gap: bool,
}

/// The longest a request for attributes waits for pages of its file to be dropped: they wait
/// only for requests in flight on the file (see "Deadlock avoidance").
const PAGES_DROP_WAIT_MAX: Duration = Duration::from_millis(200);

/// The threads that read a node since this mount last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readers {
    One(u32),
    Several,
}

/// A kernel cache invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Notice {
    /// Attributes and pages (for a directory, its cached listing).
    Node(u64),
    /// The pages of `len` bytes from `offset` of a file.
    Pages {
        node: u64,
        offset: u64,
        len: u64,
    },
    Entry {
        parent: u64,
        name: Vec<u8>,
    },
}

impl Notice {
    fn node(&self) -> u64 {
        match self {
            Notice::Node(node) | Notice::Pages { node, .. } => *node,
            Notice::Entry { parent, .. } => *parent,
        }
    }
}

/// Marks objects busy while a change of this mount is in flight (see the module notes).
pub struct BusyGuard<'c> {
    cache: &'c KernelCache,
    nodes: Vec<u64>,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.cache.busy.lock().expect("busy lock");
        for node in &self.nodes {
            if let Some(count) = busy.get_mut(node) {
                *count -= 1;
                if *count == 0 {
                    busy.remove(node);
                }
            }
        }
        drop(busy);
        self.cache.idle.notify_all();
    }
}

impl KernelCache {
    pub fn new(inodes: InodeTable) -> Arc<Self> {
        Arc::new(Self {
            inodes: Mutex::new(inodes),
            leases: Mutex::new(HashMap::new()),
            missing_xattrs: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            deferred: Mutex::new(Vec::new()),
            unsent: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
            pages_unsent: Mutex::new(HashMap::new()),
            pages_sent: Condvar::new(),
            readers: Mutex::new(HashMap::new()),
            notifier: OnceLock::new(),
        })
    }

    /// Starts sending notifications (once the session exists) and the invalidator thread.
    pub fn start(self: &Arc<Self>, notifier: Notifier) -> std::io::Result<()> {
        let _ = self.notifier.set(notifier);
        let cache = self.clone();
        std::thread::Builder::new().name("braid-invalidate".into()).spawn(move || cache.run_deferred())?;
        Ok(())
    }

    /// The handle of the object the kernel knows as `node` (ESTALE once forgotten).
    pub fn handle(&self, node: u64) -> Result<Handle, fuser::Errno> {
        self.inodes.lock().expect("inode lock").handle(node).ok_or(fuser::Errno::ESTALE)
    }

    pub fn busy(&self, nodes: &[u64]) -> BusyGuard<'_> {
        let mut busy = self.busy.lock().expect("busy lock");
        for node in nodes {
            *busy.entry(*node).or_default() += 1;
        }
        BusyGuard { cache: self, nodes: nodes.to_vec() }
    }

    /// How long the kernel may cache what a reply under `lease` said.
    pub fn ttl(lease: Lease) -> Duration {
        lease.map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
    }

    /// Records that `node` is covered until `lease` ends.
    pub fn leased(&self, node: u64, lease: Lease) {
        let Some(until) = lease else { return };
        let now = Instant::now();
        let mut leases = self.leases.lock().expect("lease lock");
        match leases.get_mut(&node) {
            Some(held) => {
                held.gap |= held.until <= now;
                held.until = held.until.max(until);
            }
            None => {
                leases.insert(node, NodeLease { until, gap: false });
            }
        }
    }

    /// Whether an open of `node` may keep the pages the kernel has: a lease has covered them
    /// since they were read, without a gap. Call before the open's own request.
    pub fn may_keep_pages(&self, node: u64) -> bool {
        let mut leases = self.leases.lock().expect("lease lock");
        match leases.get_mut(&node) {
            Some(held) if held.until > Instant::now() && !held.gap => true,
            Some(held) => {
                // This open drops the pages; what is read from now on is covered afresh.
                held.gap = false;
                false
            }
            None => false,
        }
    }

    /// Until when `node` is covered by a lease.
    pub fn lease_of(&self, node: u64) -> Lease {
        self.leases.lock().expect("lease lock").get(&node).map(|held| held.until)
    }

    /// The kernel forgot `node`: its pages went with it.
    pub fn forgotten(&self, node: u64) {
        self.drop_node_state(node);
    }

    /// Forgets the lease and the missing attributes recorded for `node`.
    fn drop_node_state(&self, node: u64) {
        self.leases.lock().expect("lease lock").remove(&node);
        self.missing_xattrs.lock().expect("xattr lock").remove(&node);
        self.readers.lock().expect("readers lock").remove(&node);
    }

    /// Thread `pid` reads `node`. Call before the read is served, so that a write answered
    /// after it knows that it may have been overtaken.
    pub fn reading(&self, node: u64, pid: u32) {
        let mut readers = self.readers.lock().expect("readers lock");
        match readers.get(&node) {
            Some(Readers::One(reader)) if *reader != pid => {
                readers.insert(node, Readers::Several);
            }
            Some(_) => {}
            None => {
                readers.insert(node, Readers::One(pid));
            }
        }
    }

    /// Thread `pid` wrote `len` bytes at `offset` of `node` through the kernel's pages.
    ///
    /// The kernel copies a write into its pages and unlocks them before it sends the write to
    /// this mount; if they are dropped in between (an invalidation, the kernel's own check of
    /// the file's mtime), another thread's read fills them again with the bytes from before
    /// the write, and this mount's lease makes the kernel keep them. Only a read by another
    /// thread can do it (the writer is inside its write), so only then are the written pages
    /// dropped once more, after the answer.
    pub fn written(&self, node: u64, pid: u32, offset: u64, len: u64) {
        let overtaken = match self.readers.lock().expect("readers lock").remove(&node) {
            Some(Readers::One(reader)) => reader != pid,
            Some(Readers::Several) => true,
            None => false,
        };
        if overtaken {
            self.drop_pages_later(node, offset, len);
        }
    }

    /// Whether `node` is known, under a lease, to have no extended attribute `name`.
    pub fn xattr_missing(&self, node: u64, name: &[u8]) -> bool {
        self.missing_xattrs.lock().expect("xattr lock").get(&node).is_some_and(|known| known.lacks(name))
    }

    /// Records that `node` has no extended attribute `name`, as long as `lease` lasts.
    pub fn note_xattr_missing(&self, node: u64, name: &[u8], lease: Lease) {
        let Some(until) = lease else { return };
        let mut known = self.missing_xattrs.lock().expect("xattr lock");
        let known = known.entry(node).or_insert_with(|| XattrKnowledge { missing: HashSet::new(), listed: None, until });
        // One expiry for all names of a node: the earliest lease still running.
        if known.until <= Instant::now() {
            known.missing.clear();
            known.listed = None;
            known.until = until;
        }
        known.until = known.until.min(until);
        known.missing.insert(name.to_vec());
    }

    /// Records every extended attribute name `node` has (`names`: NUL-terminated, as
    /// listxattr(2) gives them), as long as `lease` lasts: it replaces what was known.
    pub fn note_xattr_names(&self, node: u64, names: &[u8], lease: Lease) {
        let Some(until) = lease else { return };
        let listed = names.split(|b| *b == 0).filter(|name| !name.is_empty()).map(<[u8]>::to_vec).collect();
        let known = XattrKnowledge { missing: HashSet::new(), listed: Some(listed), until };
        self.missing_xattrs.lock().expect("xattr lock").insert(node, known);
    }

    /// Drops the kernel's attributes and pages of `node` now. Only from a request that no
    /// change of the server waits for (see "Deadlock avoidance").
    pub fn drop_node_now(&self, node: u64) {
        self.notify(&Notice::Node(node));
    }

    /// A read of `node` came without a lease (a change of another client overlapped it): the
    /// kernel must not keep the pages it filled, which may hold bytes from before that change.
    /// Sent by the invalidator thread: the notification may wait for other reads of the file,
    /// which need the thread that calls this.
    pub fn drop_pages_later(&self, node: u64, offset: u64, len: u64) {
        self.defer([Notice::Pages { node, offset, len }]);
    }

    /// Whether the kernel's pages of `node` are known to be right: a lease covers them without
    /// a gap and no notification about them waits to be sent. A process that takes a lock
    /// must not read them otherwise (see "Deadlock avoidance").
    pub fn pages_trusted(&self, node: u64) -> bool {
        let leased = self.leases.lock().expect("lease lock").get(&node).is_some_and(|held| held.until > Instant::now() && !held.gap);
        leased && !self.unsent.lock().expect("unsent lock").contains_key(&node)
    }

    /// Waits until no drop of pages of `node` waits to be sent, for at most
    /// `PAGES_DROP_WAIT_MAX`. Called when the kernel asks for the attributes of `node`, which
    /// it does before it reads pages after a write of its own (the write makes them out of
    /// date): so a process that reads back what it wrote finds the pages that `written`
    /// drops gone. Never waits for other notifications: those may need a directory's lock
    /// that the caller holds.
    pub fn await_pages_dropped(&self, node: u64) {
        let unsent = self.pages_unsent.lock().expect("pages lock");
        let (_unsent, timeout) =
            self.pages_sent.wait_timeout_while(unsent, PAGES_DROP_WAIT_MAX, |unsent| unsent.contains_key(&node)).expect("pages lock");
        if timeout.timed_out() {
            tracing::debug!(node, "a drop of pages is still waiting to be sent");
        }
    }

    /// Leaves `notices` to the invalidator thread.
    fn defer(&self, notices: impl IntoIterator<Item = Notice>) {
        let mut deferred = self.deferred.lock().expect("deferred lock");
        let mut unsent = self.unsent.lock().expect("unsent lock");
        let mut pages_unsent = self.pages_unsent.lock().expect("pages lock");
        for notice in notices {
            *unsent.entry(notice.node()).or_default() += 1;
            if let Notice::Pages { node, .. } = notice {
                *pages_unsent.entry(node).or_default() += 1;
            }
            deferred.push(notice);
        }
        self.idle.notify_all();
    }

    /// A deferred notification was sent.
    fn sent(&self, notice: &Notice) {
        let node = notice.node();
        uncount(&mut self.unsent.lock().expect("unsent lock"), node);
        if let Notice::Pages { .. } = notice {
            uncount(&mut self.pages_unsent.lock().expect("pages lock"), node);
            self.pages_sent.notify_all();
        }
    }

    /// This mount changes the extended attributes of `node` (its own changes recall nothing here).
    pub fn xattrs_changed(&self, node: u64) {
        self.missing_xattrs.lock().expect("xattr lock").remove(&node);
    }

    fn notify(&self, notice: &Notice) {
        let Some(notifier) = self.notifier.get() else { return };
        // ENOENT: the kernel no longer has it cached, which is what we want.
        let _ = match notice {
            Notice::Node(node) => notifier.inval_inode(INodeNo(*node), 0, 0),
            Notice::Pages { node, offset, len } => notifier.inval_inode(INodeNo(*node), *offset as i64, *len as i64),
            Notice::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
        };
    }

    /// Sends `notice` now, or leaves it to the invalidator thread if its object is busy.
    fn invalidate(&self, notice: Notice) {
        if let Notice::Node(node) = notice {
            self.drop_node_state(node);
        }
        if self.busy.lock().expect("busy lock").contains_key(&notice.node()) {
            self.defer([notice]);
        } else {
            self.notify(&notice);
        }
    }

    fn run_deferred(&self) {
        let mut deferred = self.deferred.lock().expect("deferred lock");
        loop {
            let ready: Vec<Notice> = {
                let busy = self.busy.lock().expect("busy lock");
                let (ready, waiting) = deferred.drain(..).partition(|n| !busy.contains_key(&n.node()));
                *deferred = waiting;
                ready
            };
            if !ready.is_empty() {
                drop(deferred);
                ready.iter().for_each(|n| {
                    self.notify(n);
                    self.sent(n);
                });
                deferred = self.deferred.lock().expect("deferred lock");
                continue;
            }
            deferred = self.idle.wait_timeout(deferred, Duration::from_millis(100)).expect("deferred lock").0;
        }
    }
}

/// Counts one fewer notice of `node` waiting to be sent.
fn uncount(unsent: &mut HashMap<u64, usize>, node: u64) {
    let count = unsent.get_mut(&node).expect("a deferred notice is counted");
    *count -= 1;
    if *count == 0 {
        unsent.remove(&node);
    }
}

impl CallbackHandler for KernelCache {
    fn recall(&self, items: &[Invalidation]) {
        let notices: Vec<Notice> = {
            let inodes = self.inodes.lock().expect("inode lock");
            items
                .iter()
                .filter_map(|item| match item {
                    Invalidation::Object(handle) => inodes.node_of(handle).map(Notice::Node),
                    Invalidation::Entry { parent, name } => {
                        inodes.node_of(parent).map(|parent| Notice::Entry { parent, name: name.clone() })
                    }
                })
                .collect()
        };
        tracing::trace!(?notices, "recall");
        notices.into_iter().for_each(|n| self.invalidate(n));
    }

    fn lost(&self) {
        let nodes = self.inodes.lock().expect("inode lock").nodes();
        nodes.into_iter().for_each(|node| self.invalidate(Notice::Node(node)));
    }

    fn write_back_failed(&self, handle: &Handle, name: Option<(&Handle, &[u8])>) {
        let (node, parent) = {
            let inodes = self.inodes.lock().expect("inode lock");
            (inodes.node_of(handle), name.and_then(|(parent, name)| Some((inodes.node_of(parent)?, name.to_vec()))))
        };
        let mut notices: Vec<Notice> = parent.map(|(parent, name)| Notice::Entry { parent, name }).into_iter().collect();
        if let Some(node) = node {
            self.drop_node_state(node);
            notices.push(Notice::Node(node));
        }
        // Never from here: the caller may serve a request the notification would wait for.
        self.defer(notices);
    }

    fn created(&self, provisional: &Handle, real: &Handle, ino: u64) {
        self.inodes.lock().expect("inode lock").created(provisional, real, ino);
    }

    fn renewed(&self, handles: &[Handle], until: Instant) {
        let nodes: Vec<u64> = {
            let inodes = self.inodes.lock().expect("inode lock");
            handles.iter().filter_map(|handle| inodes.node_of(handle)).collect()
        };
        let now = Instant::now();
        let mut leases = self.leases.lock().expect("lease lock");
        for node in nodes {
            // Only a lease still running: one a recall dropped is not started again.
            if let Some(held) = leases.get_mut(&node).filter(|held| held.until > now && !held.gap) {
                held.until = held.until.max(until);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<KernelCache> {
        KernelCache::new(InodeTable::new(2, Handle(vec![0])))
    }

    #[test]
    fn pages_are_kept_only_under_a_lease_without_gaps() {
        // Goal: an open keeps cached pages only if a lease covered them continuously.
        let c = cache();
        assert!(!c.may_keep_pages(5), "never leased");
        c.leased(5, Some(Instant::now() + Duration::from_secs(5)));
        assert!(c.may_keep_pages(5));
        c.leased(6, Some(Instant::now()));
        std::thread::sleep(Duration::from_millis(5));
        c.leased(6, Some(Instant::now() + Duration::from_secs(5)));
        assert!(!c.may_keep_pages(6), "the lease lapsed before it was renewed");
        assert!(c.may_keep_pages(6), "the open that dropped the pages closed the gap");
    }

    #[test]
    fn a_missing_attribute_is_remembered_until_recall_or_own_change() {
        let c = cache();
        let h = Handle(vec![4]);
        c.inodes.lock().unwrap().remember(4, &h);
        let lease = Some(Instant::now() + Duration::from_secs(5));
        c.note_xattr_missing(4, b"security.capability", lease);
        assert!(c.xattr_missing(4, b"security.capability"));
        assert!(!c.xattr_missing(4, b"user.other"), "only what was asked");
        c.xattrs_changed(4);
        assert!(!c.xattr_missing(4, b"security.capability"), "own setxattr");
        c.note_xattr_missing(4, b"security.capability", lease);
        c.recall(&[Invalidation::Object(h)]);
        assert!(!c.xattr_missing(4, b"security.capability"), "recalled");
        c.note_xattr_missing(4, b"security.capability", None);
        assert!(!c.xattr_missing(4, b"security.capability"), "no lease, no memory");

        c.note_xattr_names(5, b"user.a\0security.selinux\0", lease);
        assert!(c.xattr_missing(5, b"system.posix_acl_access"), "not listed");
        assert!(!c.xattr_missing(5, b"user.a") && !c.xattr_missing(5, b"security.selinux"), "listed");
        c.xattrs_changed(5);
        assert!(!c.xattr_missing(5, b"system.posix_acl_access"), "own setxattr");
        c.note_xattr_names(6, b"", Some(Instant::now() - Duration::from_secs(1)));
        assert!(!c.xattr_missing(6, b"user.a"), "lease over");
    }

    #[test]
    fn a_recall_of_a_busy_object_is_deferred() {
        // Goal: a notice for an object with a change in flight waits for the change.
        let c = cache();
        let h = Handle(vec![9]);
        c.inodes.lock().unwrap().remember(9, &h);
        c.leased(9, Some(Instant::now() + Duration::from_secs(5)));
        let guard = c.busy(&[9]);
        c.recall(&[Invalidation::Object(h)]);
        assert_eq!(*c.deferred.lock().unwrap(), vec![Notice::Node(9)]);
        assert!(!c.may_keep_pages(9), "the recall ended the lease at once");
        drop(guard);
        assert!(c.busy.lock().unwrap().is_empty());
    }

    #[test]
    fn pages_are_trusted_under_a_lease_with_no_notice_waiting() {
        // Goal: a process that takes a lock may read the kernel's pages only if a lease covers
        // them and no invalidation of them waits to be sent (a recall acknowledged while this
        // mount was changing the file): then they may hold what another client changed.
        let c = cache();
        let h = Handle(vec![9]);
        c.inodes.lock().unwrap().remember(9, &h);
        assert!(!c.pages_trusted(9), "never leased");
        c.leased(9, Some(Instant::now() + Duration::from_secs(5)));
        assert!(c.pages_trusted(9));
        let guard = c.busy(&[9]);
        c.recall(&[Invalidation::Object(h)]);
        c.leased(9, Some(Instant::now() + Duration::from_secs(5)));
        assert!(!c.pages_trusted(9), "leased again by a read, but the recall's invalidation waits");
        let waiting = std::mem::take(&mut *c.deferred.lock().unwrap());
        waiting.iter().for_each(|notice| c.sent(notice));
        assert!(c.pages_trusted(9), "the invalidation went out");
        drop(guard);
        c.drop_pages_later(9, 0, 4096);
        assert!(!c.pages_trusted(9), "a read without a lease waits to be dropped");
    }

    #[test]
    fn written_pages_are_dropped_when_another_thread_read_since_the_last_write() {
        // Goal: a page another thread filled again while a write was on its way to this mount
        // holds the bytes from before the write; it must not stay in the kernel's cache.
        let c = cache();
        c.leased(9, Some(Instant::now() + Duration::from_secs(5)));
        c.reading(9, 100);
        c.written(9, 100, 0, 10);
        assert!(c.pages_trusted(9), "the writer's own reads cannot overtake its write");
        c.written(9, 100, 0, 10);
        assert!(c.pages_trusted(9), "no read at all since the last write");
        c.reading(9, 100);
        c.reading(9, 200);
        c.written(9, 100, 4096, 10);
        assert_eq!(*c.deferred.lock().unwrap(), vec![Notice::Pages { node: 9, offset: 4096, len: 10 }]);
        assert!(!c.pages_trusted(9), "another thread read since the last write");
        c.reading(9, 200);
        c.forgotten(9);
        c.written(9, 100, 0, 10);
        assert_eq!(c.deferred.lock().unwrap().len(), 1, "the reads were forgotten with the node");
    }

    #[test]
    fn a_request_for_attributes_waits_until_the_pages_of_its_file_are_dropped() {
        // Goal: the writer's own read-back after an overtaken write (which asks for attributes
        // first) finds the stale pages gone; other notifications are not waited for.
        let c = cache();
        let h = Handle(vec![9]);
        c.inodes.lock().unwrap().remember(9, &h);
        let guard = c.busy(&[9]);
        c.recall(&[Invalidation::Object(h)]);
        assert!(c.pages_unsent.lock().unwrap().is_empty(), "a recall's notification is not waited for");
        c.drop_pages_later(9, 0, 10);
        assert_eq!(c.deferred.lock().unwrap().len(), 2);
        let sender = {
            let c = c.clone();
            std::thread::spawn(move || {
                let waiting = std::mem::take(&mut *c.deferred.lock().unwrap());
                waiting.iter().for_each(|notice| c.sent(notice));
            })
        };
        c.await_pages_dropped(9);
        sender.join().unwrap();
        assert!(c.pages_unsent.lock().unwrap().is_empty() && c.unsent.lock().unwrap().is_empty());
        drop(guard);
    }
}
