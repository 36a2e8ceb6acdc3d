//! The braid client library: one connection to a server that survives the server's restarts,
//! typed calls for every request, and the transaction sequence of this mount. No FUSE here.
//!
//! # Correctness
//! A call returns only with the server's reply. While the connection is down, calls wait; on
//! reconnect every request without a reply is sent again, and the server applies each
//! transaction at most once (client id + seq), so a resend can never apply a change twice.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod callbacks;
mod connection;
pub mod inodes;
mod locks;
mod taken_back;
mod writeback;

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use braid_proto::{
    Attr, AttrChanges, ClientId, Command, CommandOk, Credentials, DirEntry, Entry, Errno, ExportInfo, Handle, LockHeld, LockRequest, Lsn,
    Reply, Request, StatFs, Txn, TxnSeq, Whence, WireError,
};

pub use callbacks::CallbackHandler;
pub use connection::Connection;
use writeback::Durability;
pub use writeback::{is_provisional, PROVISIONAL_INO};

/// Until when the client may cache what a reply said; `None`: not at all.
pub type Lease = Option<Instant>;

/// Results of the commands of a transaction (see [`Client::txn`]).
pub type TxnResults = Vec<std::result::Result<CommandOk, Errno>>;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server.
    pub server: String,
    /// Shown in the server's logs.
    pub client_name: String,
    /// How long a call may wait for an unreachable server before it fails with `TimedOut`;
    /// `None` waits for ever (as NFS `hard`).
    pub retry_budget: Option<Duration>,
    /// TLS 1.3 with this configuration (client certificate included); `None`: plain TCP.
    pub tls: Option<std::sync::Arc<braid_tls::ClientConfig>>,
    /// Algorithms the server must use on every connection (see `Hello::require`).
    pub require: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("server returned errno {}", .0 .0)]
    Errno(Errno),
    #[error("the export is read-only")]
    ReadOnly,
    #[error("no reply from {server} within the retry budget of {budget_ms} ms")]
    TimedOut { server: String, budget_ms: u128 },
    #[error("server {server} refused the connection: {reason}")]
    Refused { server: String, reason: String },
    #[error("cannot reach {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("protocol error: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Per object, its extended attribute names (NUL-terminated), or `None` if unknown.
pub type XattrNameLists = Vec<Option<Vec<u8>>>;

#[derive(Clone)]
pub struct Client {
    connection: Arc<Connection>,
    txns: Arc<TxnSequencer>,
    callbacks: Arc<Mutex<Option<callbacks::CallbackThread>>>,
    /// Told when a queued change fails (set when the callback channel opens).
    handler: Arc<OnceLock<Arc<dyn CallbackHandler>>>,
    /// Work for the release thread.
    releases: std::sync::mpsc::Sender<ReleaseWork>,
    /// Opens the server was not told of, one entry per open (see `open`).
    unsent_opens: Arc<Mutex<Vec<Handle>>>,
    writeback: Arc<writeback::WriteBack>,
    /// How the last transaction of an fsync goes out, by what the server speaks.
    fsync_txn: FsyncTxn,
    /// Whether the server answers `XattrNames` and `CommitUpTo` (protocol version 4).
    version_4: bool,
    /// Whether the server answers `LockWait` (protocol version 7).
    lock_wait: bool,
    /// Whether the server holds a conflicting `LockWait` until the lock is free or 100 ms have
    /// passed (protocol version 8).
    lock_wait_at_server: bool,
    /// Whether the server takes `WriteBack` (protocol version 9): refuses changes this client
    /// made in its cache under exclusive rights it lost, rather than let them overwrite what
    /// another client did since.
    write_back_fence: bool,
    /// The server ends its grace period after a restart when told (`Request::ReclaimDone`).
    reclaim_done: bool,
    /// The callback channel is subscribed: the server grants rights and recalls them.
    subscribed: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FsyncTxn {
    /// `StagedTxn` (protocol version 3): answered once applied, when the queue's turn passes
    /// to the next shipment, then once durable. Concurrent fsyncs share the server's flush.
    Staged,
    /// `DurableTxn` (version 2): answered once durable; the turn is held until then.
    Durable,
    /// `Txn`, then `Commit` (version 1).
    ThenCommit,
}

impl FsyncTxn {
    fn for_version(version: u16) -> Self {
        if version >= braid_proto::STAGED_TXN_VERSION {
            FsyncTxn::Staged
        } else if version >= braid_proto::DURABLE_TXN_VERSION {
            FsyncTxn::Durable
        } else {
            FsyncTxn::ThenCommit
        }
    }
}

/// Changes not queued, sent after the queued ones they may depend on.
struct Direct {
    creds: Credentials,
    commands: Vec<Command>,
    data: Vec<u8>,
}

enum ReleaseWork {
    /// An open the server was not told of (see `Client::open`).
    Open(Handle),
    Release(Handle),
    /// Answered once every release queued before it was sent.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Hands out transaction sequence numbers and remembers which have no reply yet.
struct TxnSequencer {
    next: AtomicU64,
    outstanding: Mutex<BTreeSet<u64>>,
}

impl TxnSequencer {
    fn begin(&self) -> (TxnSeq, TxnSeq) {
        let mut outstanding = self.outstanding.lock().expect("txn lock");
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        outstanding.insert(seq);
        let replied_below = *outstanding.first().expect("just inserted");
        (TxnSeq(seq), TxnSeq(replied_below))
    }

    fn end(&self, seq: TxnSeq) {
        self.outstanding.lock().expect("txn lock").remove(&seq.0);
    }
}

impl Client {
    /// Connects and completes the handshake; fails at once if the server is unreachable or
    /// refuses, so that `braid mount` reports it.
    pub fn connect(config: ClientConfig) -> Result<(Self, ExportInfo)> {
        let client_id = ClientId(rand::random());
        let (connection, info) = Connection::open(config, client_id)?;
        let txns = Arc::new(TxnSequencer { next: AtomicU64::new(1), outstanding: Mutex::new(BTreeSet::new()) });
        let batch_bytes = match info.version >= braid_proto::BULK_TXN_VERSION {
            true => braid_proto::limits::TXN_DATA_BYTES_MAX,
            false => braid_proto::limits::DATA_BYTES_MAX,
        };
        let writeback = Arc::new(writeback::WriteBack::new(info.root_squash).with_batch_bytes(batch_bytes));
        let thread_error = |e: std::io::Error| ClientError::Protocol(format!("cannot start a client thread: {e}"));
        let releases = start_release_thread(connection.clone(), writeback.clone()).map_err(thread_error)?;
        let client = Self {
            connection,
            txns,
            callbacks: Arc::new(Mutex::new(None)),
            handler: Arc::new(OnceLock::new()),
            releases,
            unsent_opens: Arc::new(Mutex::new(Vec::new())),
            writeback,
            fsync_txn: FsyncTxn::for_version(info.version),
            version_4: info.version >= braid_proto::XATTR_NAMES_VERSION,
            lock_wait: info.version >= braid_proto::LOCK_WAIT_VERSION,
            lock_wait_at_server: info.version >= braid_proto::LOCK_WAIT_AT_SERVER_VERSION,
            write_back_fence: info.version >= braid_proto::WRITE_BACK_FENCE_VERSION,
            reclaim_done: info.version >= braid_proto::RECLAIM_DONE_VERSION,
            subscribed: Arc::new(AtomicBool::new(false)),
        };
        client.start_flusher().map_err(thread_error)?;
        if info.version >= braid_proto::RENEW_VERSION {
            start_renewal_thread(client.clone()).map_err(thread_error)?;
        }
        Ok((client, info))
    }

    /// Sends queued changes once they are due, for as long as the client exists.
    fn start_flusher(&self) -> std::io::Result<()> {
        let client = self.clone();
        std::thread::Builder::new().name("braid-flush".into()).spawn(move || {
            while client.writeback.wait_for_work() {
                if let Err(e) = client.flush() {
                    tracing::warn!(error = %e, "cannot write queued changes back");
                }
            }
        })?;
        Ok(())
    }

    /// Opens the callback channel: from now on the server grants this client rights to cache,
    /// and recalls them through `handler`.
    pub fn subscribe(&self, handler: Arc<dyn CallbackHandler>) -> std::io::Result<()> {
        let _ = self.handler.set(handler.clone());
        let thread = callbacks::CallbackThread::start(self.clone(), handler)?;
        *self.callbacks.lock().expect("callbacks lock") = Some(thread);
        Ok(())
    }

    /// Writes queued changes back, then gives every right and lock back (unmount) and stops the
    /// callback channel, once the releases of closed files have been sent.
    pub fn unsubscribe(&self) -> Result<()> {
        self.writeback.stop();
        self.flush()?;
        self.releases_sent(Some(Duration::from_secs(10)));
        let thread = self.callbacks.lock().expect("callbacks lock").take();
        if let Some(thread) = thread {
            thread.stop();
        }
        self.call(Request::Unsubscribe).map(|_| ())
    }

    /// After a restart of the server: claims this client's locks again and writes back what
    /// it changed in its cache under the old process's rights (a reclaim, applied during the
    /// grace period), then says so: the grace period, during which every other client's reads
    /// and changes wait, then need not last a whole lease for this client.
    pub(crate) fn finish_reclaim(&self) -> Result<()> {
        self.connection.confirm_locks()?;
        self.flush()?;
        if self.reclaim_done {
            self.call(Request::ReclaimDone)?;
        }
        Ok(())
    }

    pub fn lookup(&self, parent: &Handle, name: &[u8]) -> Result<(Entry, Lease)> {
        if self.writeback.known_missing(parent, name) {
            return Err(ClientError::Errno(Errno(libc::ENOENT)));
        }
        if let Some((entry, until)) = self.writeback.known_entry(parent, name) {
            return Ok((entry, Some(until)));
        }
        let parent = &self.settled(parent)?;
        let request = Request::Lookup { parent: parent.clone(), name: name.to_vec() };
        let lookup = || match self.call_leased(request.clone())? {
            (Reply::Entry(entry), lease) => Ok((entry, lease)),
            (other, _) => unexpected(other),
        };
        let (entry, lease) = lookup()?;
        // Its attributes must show this client's queued changes.
        if self.writeback.pending([&entry.handle]) {
            self.flush()?;
            return lookup();
        }
        self.writeback.attributes(&entry.handle, &entry.attr);
        Ok((entry, lease))
    }

    /// Whether this client holds `handle` exclusively: no other client can change it.
    pub fn holds_exclusively(&self, handle: &Handle) -> bool {
        self.writeback.holds(handle)
    }

    /// The attributes of `handle` if this client knows them without asking (it holds the
    /// object exclusively and its shadow is exact).
    pub fn known_attributes(&self, handle: &Handle) -> Option<Attr> {
        self.writeback.exact_attributes(handle).map(|(attr, _)| attr)
    }

    pub fn getattr(&self, handle: &Handle) -> Result<(Attr, Lease)> {
        if let Some((attr, until)) = self.writeback.exact_attributes(handle) {
            return Ok((attr, Some(until)));
        }
        let handle = self.settled(handle)?;
        match self.call_leased(Request::GetAttr { handle: handle.clone() })? {
            (Reply::Attr(attr), lease) => {
                self.writeback.attributes(&handle, &attr);
                Ok((attr, lease))
            }
            (other, _) => unexpected(other),
        }
    }

    /// Sends the queue if one of `handles` has changes in it: a request naming them must see
    /// those changes.
    fn settle<'h>(&self, handles: impl IntoIterator<Item = &'h Handle>) -> Result<()> {
        if self.writeback.pending(handles) {
            self.flush()?;
        }
        Ok(())
    }

    /// The server's handle of `handle` (which may be provisional), once queued changes naming
    /// it have been sent.
    fn settled(&self, handle: &Handle) -> Result<Handle> {
        self.settle([handle])?;
        self.writeback.server_handle(handle).map_err(ClientError::Errno)
    }

    pub fn readlink(&self, handle: &Handle) -> Result<Vec<u8>> {
        let handle = self.settled(handle)?;
        match self.call(Request::ReadLink { handle })? {
            Reply::ReadLink(target) => Ok(target),
            other => unexpected(other),
        }
    }

    /// Reads from the server. A read that a change of another client overlapped comes without
    /// a lease: it may hold bytes from before that change, whose recall may already have been
    /// carried out here, so nothing would ever drop them from the kernel's pages. Such a read is
    /// made again (while the server grants leases at all), and the caller must not let the
    /// kernel keep what a read without a lease returned.
    pub fn read(&self, handle: &Handle, offset: u64, len: u32) -> Result<(Vec<u8>, Lease)> {
        let handle = self.settled(handle)?;
        let request = Request::Read { handle, offset, len };
        let mut attempts = 1;
        loop {
            let (reply, data, lease) = self.connection.call_leased(&request, &[])?;
            if !matches!(reply, Reply::Read) {
                return unexpected(reply);
            }
            if lease.is_some() || attempts == READ_ATTEMPTS_FOR_A_LEASE || !self.subscribed.load(Ordering::Acquire) {
                return Ok((data, lease));
            }
            attempts += 1;
        }
    }

    /// Entries after `cookie`, whether the listing ends there, and the lease on all of it.
    pub fn readdir(&self, handle: &Handle, cookie: u64, plus: bool) -> Result<(Vec<DirEntry>, bool, Lease)> {
        let handle = &self.settled(handle)?;
        let readdir = || match self.call_leased(Request::ReadDir { handle: handle.clone(), cookie, plus })? {
            (Reply::ReadDir { entries, eof }, lease) => Ok((entries, eof, lease)),
            (other, _) => unexpected(other),
        };
        let listed = readdir()?;
        // The entries' attributes must show this client's queued changes.
        if self.writeback.pending(listed.0.iter().filter_map(|e| e.entry.as_ref().map(|e| &e.handle))) {
            self.flush()?;
            return readdir();
        }
        Ok(listed)
    }

    /// The whole listing of `dir` if this client knows it without asking (see
    /// `WriteBack::known_listing`): `.` and `..` first, then every name in no particular
    /// order, each with its entry; cookies are positions in this listing only.
    pub fn known_listing(&self, dir: &Handle) -> Option<(Vec<DirEntry>, Lease)> {
        let listing = self.writeback.known_listing(dir)?;
        let dots = [(&b"."[..], listing.ino), (&b".."[..], listing.parent_ino)].map(|(name, ino)| DirEntry {
            name: name.to_vec(),
            ino,
            kind: libc::S_IFDIR,
            cookie: 0,
            entry: None,
        });
        let named = listing.entries.into_iter().map(|(name, entry)| DirEntry {
            name,
            ino: entry.attr.ino,
            kind: entry.attr.mode & libc::S_IFMT,
            cookie: 0,
            entry: Some(entry),
        });
        let mut entries: Vec<DirEntry> = dots.into_iter().chain(named).collect();
        for (position, entry) in entries.iter_mut().enumerate() {
            entry.cookie = position as u64 + 1;
        }
        Some((entries, Some(listing.until)))
    }

    pub fn statfs(&self) -> Result<StatFs> {
        match self.call(Request::StatFs)? {
            Reply::StatFs(s) => Ok(s),
            other => unexpected(other),
        }
    }

    /// The value of an extended attribute, `None` if the object has no such attribute, and the
    /// lease on that answer.
    pub fn getxattr(&self, handle: &Handle, name: &[u8]) -> Result<(Option<Vec<u8>>, Lease)> {
        let handle = self.settled(handle)?;
        let (result, _, lease) = self.connection.call_outcome(&Request::GetXattr { handle, name: name.to_vec() }, &[])?;
        match result {
            Ok(Reply::Xattr(value)) => Ok((Some(value), lease)),
            Ok(other) => unexpected(other),
            Err(ClientError::Errno(Errno(libc::ENODATA))) => Ok((None, lease)),
            Err(e) => Err(e),
        }
    }

    pub fn listxattr(&self, handle: &Handle) -> Result<Vec<u8>> {
        let handle = self.settled(handle)?;
        match self.call(Request::ListXattr { handle })? {
            Reply::XattrList(names) => Ok(names),
            other => unexpected(other),
        }
    }

    /// The extended attribute names of each of `handles` (server handles, as a listing gives
    /// them), each `None` if unknown, and the lease they hold under; `None` if the server does
    /// not answer that (before protocol version 4).
    pub fn xattr_names(&self, handles: Vec<Handle>) -> Result<Option<(XattrNameLists, Lease)>> {
        if !self.version_4 || handles.is_empty() {
            return Ok(None);
        }
        let count = handles.len();
        match self.call_leased(Request::XattrNames { handles })? {
            (Reply::XattrNames(names), lease) if names.len() == count => Ok(Some((names, lease))),
            (other, _) => unexpected(other),
        }
    }

    pub fn lseek(&self, handle: &Handle, offset: u64, whence: Whence) -> Result<u64> {
        let handle = self.settled(handle)?;
        match self.call(Request::Lseek { handle, offset, whence })? {
            Reply::Lseek(at) => Ok(at),
            other => unexpected(other),
        }
    }

    /// Tells the server this mount has `handle` open (see `Request::Open`), for `access`
    /// (`R_OK`/`W_OK` bits) by `creds`. Pins are restored after a server restart.
    ///
    /// A file this client holds exclusively opens without a round trip (the kernel has checked
    /// the permissions): nobody else can remove its last name without recalling it first, and
    /// the open is sent then, before this client removes a name itself, and at the next lease
    /// renewal (`send_unsent_opens`). An open closed before that never reaches the server.
    pub fn open(&self, handle: &Handle, creds: Credentials, access: u32) -> Result<Lease> {
        if let Some(until) = self.open_held(handle, &creds) {
            return Ok(Some(until));
        }
        let handle = self.settled(handle)?;
        let (_, lease) = self.call_leased(Request::Open { handle: handle.clone(), creds, access })?;
        self.connection.pin(&handle, 1);
        Ok(lease)
    }

    /// Opens `handle` without telling the server if this client holds it exclusively; until
    /// when it does.
    fn open_held(&self, handle: &Handle, creds: &Credentials) -> Option<Instant> {
        // The server checks a squashed root's access as another user's; the kernel did not.
        if self.writeback.squashed(creds) {
            return None;
        }
        // Checked and recorded under one lock: a recall that takes the right away sends what
        // is recorded after it has taken it (see `send_unsent_opens`).
        let mut unsent = self.unsent_opens.lock().expect("unsent opens lock");
        let until = self.writeback.held_until(handle)?;
        unsent.push(handle.clone());
        Some(until)
    }

    /// Tells the server of every open it was not told of: it keeps those files (pins them)
    /// while they are open here, whoever removes their names. The opens go out on the release
    /// thread, so that no release overtakes the open it ends; with `wait`, returns once they
    /// are out (no lock is held meanwhile: a server that does not answer must not stop the
    /// opens and closes this client can answer itself).
    pub(crate) fn send_unsent_opens(&self, wait: bool) {
        let queued = {
            let mut unsent = self.unsent_opens.lock().expect("unsent opens lock");
            let opens = std::mem::take(&mut *unsent);
            opens.into_iter().filter(|handle| self.releases.send(ReleaseWork::Open(handle.clone())).is_ok()).count()
        };
        if queued > 0 && wait {
            // The creates of the files go first: the release thread waits for them.
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "cannot write queued changes back");
            }
            self.releases_sent(None);
        }
    }

    /// Waits until the release thread has sent what was given to it before (at most `limit`).
    fn releases_sent(&self, limit: Option<Duration>) {
        let (done, sent) = std::sync::mpsc::sync_channel(1);
        if self.releases.send(ReleaseWork::Barrier(done)).is_ok() {
            let _ = match limit {
                Some(limit) => sent.recv_timeout(limit).map_err(|_| ()),
                None => sent.recv().map_err(|_| ()),
            };
        }
    }

    /// Ends an open the server was not told of, if `handle` has one.
    fn end_unsent_open(&self, handle: &Handle) -> bool {
        let mut unsent = self.unsent_opens.lock().expect("unsent opens lock");
        match self.writeback.position_of_object(&unsent, handle) {
            Some(at) => {
                unsent.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// Before `commands` remove a name: the server must keep what is open here.
    fn before_names_go(&self, commands: &[Command]) {
        if !commands.iter().any(|c| matches!(c, Command::Unlink { .. } | Command::Rmdir { .. } | Command::Rename { .. })) {
            return;
        }
        let unsent = self.unsent_opens.lock().expect("unsent opens lock").clone();
        if unsent.is_empty() {
            return;
        }
        // Only the opens of what loses a name matter; when the listings cannot tell what
        // does, every unsent open is sent.
        let concerned = match self.writeback.unnamed_by(commands) {
            Some(objects) => unsent.iter().any(|open| objects.contains(&self.writeback.canonical_handle(open))),
            None => true,
        };
        if concerned {
            self.send_unsent_opens(true);
        }
    }

    /// Records a pin the server took as part of a command (`Command::Create { pin: true }`).
    pub fn pinned(&self, handle: &Handle) {
        self.connection.pin(handle, 1);
    }

    /// Ends one open of `handle`. The server is told in the background: a close does not wait
    /// for a round trip (opens and releases only count, so their order does not matter). A
    /// file created in the cache and closed before its create was sent is never opened on the
    /// server at all.
    pub fn release(&self, handle: &Handle) {
        if self.end_unsent_open(handle) || self.writeback.closed_before_created(handle) {
            return;
        }
        if self.releases.send(ReleaseWork::Release(handle.clone())).is_err() {
            tracing::warn!("the release thread is gone; the server keeps a file open until it restarts");
        }
    }

    /// Applies `commands` as one transaction. `data` holds the bytes of the `Write` commands,
    /// in order. Returns one result per command applied; the last may be an error. Queued
    /// changes they may depend on go first, in the same transaction if they fit.
    pub fn txn(&self, creds: Credentials, mut commands: Vec<Command>, data: Vec<u8>) -> Result<(TxnResults, Lease)> {
        self.before_names_go(&commands);
        // A new object depends on nothing queued, unless its directory has queued changes.
        let creates_only = commands.iter().all(|c| matches!(c, Command::Create { .. } | Command::Mkdir { .. } | Command::Symlink { .. }));
        let depends = !creates_only || self.writeback.pending(commands.iter().flat_map(Command::handles));
        let asked = commands.len();
        commands.extend(self.attribute_probes(&commands));
        let mut shipment = self.writeback.begin_shipment(depends);
        let queued = std::mem::take(&mut shipment.ops);
        let direct = self.ship(queued, Some(Direct { creds, commands, data }), None);
        drop(shipment);
        let (mut results, lease) = direct?.expect("a direct change always has an outcome");
        results.truncate(asked);
        Ok((results, lease))
    }

    /// Empty setattrs (which only report attributes) of the directories whose entries `commands`
    /// change that this client holds exclusively: the kernel asks for a directory's attributes
    /// after every change in it, and they can then be answered here.
    fn attribute_probes(&self, commands: &[Command]) -> Vec<Command> {
        let mut directories: Vec<&Handle> = commands
            .iter()
            .flat_map(|c| match c {
                Command::Create { parent, .. }
                | Command::Mkdir { parent, .. }
                | Command::Symlink { parent, .. }
                | Command::Unlink { parent, .. }
                | Command::Rmdir { parent, .. } => vec![parent],
                Command::Link { new_parent, .. } => vec![new_parent],
                Command::Rename { parent, new_parent, .. } => vec![parent, new_parent],
                _ => vec![],
            })
            .filter(|dir| self.writeback.holds(dir))
            .collect();
        directories.dedup();
        directories.into_iter().map(|handle| Command::SetAttr { handle: handle.clone(), changes: AttrChanges::default() }).collect()
    }

    /// Queues the create `command` (a regular file or directory, or a hard link of a file) if
    /// this client may make it in its cache, and returns the object (a new one's handle is
    /// provisional until the create reaches the server) and the lease on it; `None`: send it
    /// with [`Self::apply`].
    pub fn create_in_cache(&self, creds: &Credentials, command: &Command) -> Option<(Entry, Lease)> {
        let queued = match command {
            Command::Link { .. } => self.writeback.queue_link(creds, command),
            _ => self.writeback.queue_create(creds, command),
        };
        queued.map(|(entry, until)| (entry, Some(until)))
    }

    /// Queues the change of names `command` (an unlink, rmdir or rename) if this client may
    /// make it in its cache; `false`: send it with [`Self::apply`].
    pub fn rename_or_remove_in_cache(&self, creds: &Credentials, command: &Command) -> bool {
        self.before_names_go(std::slice::from_ref(command));
        match command {
            Command::Rename { .. } => self.writeback.queue_rename(creds, command),
            _ => self.writeback.queue_remove(creds, command),
        }
    }

    /// Queues `command` if this client holds what it changes exclusively, and returns what the
    /// server would have answered; `None`: send it with [`Self::apply`].
    pub fn write_back(&self, creds: &Credentials, command: &Command, data: &[u8]) -> Option<CommandOk> {
        let ok = self.writeback.queue(creds, command, data)?;
        if self.writeback.over_limit() {
            // The writer pays for the memory bound, not the flusher's other customers.
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "cannot write queued changes back");
            }
        }
        Some(ok)
    }

    /// Sends every queued change, in order, after any shipment already under way.
    pub fn flush(&self) -> Result<()> {
        self.flush_durably(false).map(|_| ())
    }

    /// [`Self::flush`]; if `durable`, the last transaction is answered once durable (one
    /// round trip for an fsync). Returns whether any transaction was sent that way.
    fn flush_durably(&self, durable: bool) -> Result<bool> {
        let mut shipment = self.writeback.begin_shipment(true);
        let queued = std::mem::take(&mut shipment.ops);
        let durable = durable && !queued.is_empty() && self.fsync_txn != FsyncTxn::ThenCommit;
        let sent = self.ship(queued, None, durable.then_some(&mut shipment))?;
        Ok(durable && sent.is_some())
    }

    /// Returns once every change made so far, queued ones included, is durable on the server:
    /// the queue goes out with its last transaction asking for durability, or, if nothing was
    /// queued, a `Commit` follows.
    pub fn sync(&self) -> Result<()> {
        if !self.flush_durably(true)? {
            self.commit()?;
        }
        Ok(())
    }

    /// Returns once every change of `handle` made so far is durable on the server: at once if
    /// the server has said so already (an fsync of a directory whose renames another fsync
    /// made durable), else as [`Self::sync`].
    pub fn fsync(&self, handle: &Handle) -> Result<()> {
        match self.writeback.durability(handle) {
            Durability::Durable => Ok(()),
            // Waits only for the flush that covers it, not for one covering everything since.
            Durability::Applied(lsn) if self.version_4 => self.commit_up_to(lsn).map(|_| ()),
            _ => self.sync(),
        }
    }

    /// The error of a queued change to `handle` the server refused, not yet reported by an
    /// fsync. `fsync`: it is reported now, and forgotten; a close reports it and leaves it for
    /// the fsync (as NFS does: the close may be another process's, e.g. a child's exec).
    pub fn write_back_error(&self, handle: &Handle, fsync: bool) -> Option<Errno> {
        self.writeback.error(handle, fsync)
    }

    /// Sends `queued` in batches, then `direct` (with the last batch if it fits); returns the
    /// outcome of `direct`. A queued change the server refuses is recorded for its object; the
    /// changes after it are sent again without it.
    /// `fsync`: the shipment (holding the queue's turn) of an fsync: its last transaction is
    /// answered once durable (`StagedTxn` or `DurableTxn`), and the outcome is `Some` only if
    /// one was sent (changes naming lost objects are dropped before sending). The turn passes
    /// on once nothing of this shipment remains to be sent and the last one is applied.
    fn ship(
        &self,
        queued: Vec<writeback::Queued>,
        direct: Option<Direct>,
        mut fsync: Option<&mut writeback::Shipment<'_>>,
    ) -> Result<Option<(TxnResults, Lease)>> {
        debug_assert!(!(fsync.is_some() && direct.is_some()), "durable shipments are fsyncs: nothing direct");
        let durable = fsync.is_some();
        let batch_bytes = self.writeback.batch_bytes();
        let mut batches: VecDeque<Vec<writeback::Queued>> = writeback::batches(queued, batch_bytes).into();
        let mut outcome = None;
        loop {
            let run = writeback::concurrent_run(&batches, writeback::CONCURRENT_TXNS_MAX);
            if run > 0 {
                let run: Vec<_> = batches.drain(..run).collect();
                match self.ship_concurrently(run) {
                    Ok(again) => again.into_iter().rev().for_each(|rest| batches.push_front(rest)),
                    Err(e) => {
                        self.abandon(batches.iter().flatten());
                        return Err(e);
                    }
                }
                continue;
            }
            let Some(batch) = batches.pop_front() else { break };
            let batch = self.drop_lost(batch);
            if batch.is_empty() {
                continue;
            }
            let probes = writeback::WriteBack::probes(&batch);
            let joins = batches.is_empty() && direct.as_ref().is_some_and(|d| joins(&batch, probes.len(), d, batch_bytes));
            let mut commands: Vec<Command> = batch.iter().map(|op| op.command.clone()).collect();
            let mut data = writeback::data_of(&batch);
            if let (true, Some(d)) = (joins, &direct) {
                commands.extend(d.commands.iter().cloned());
                data.extend_from_slice(&d.data);
            }
            commands.extend(probes);
            let creates: Vec<(usize, Handle)> =
                batch.iter().enumerate().filter_map(|(at, op)| op.creates.clone().map(|created| (at, created))).collect();
            let last = durable && batches.is_empty();
            let (mut results, lease, staged) = match self.send_txn(batch[0].creds.clone(), &commands, &data, &creates, &batch, last) {
                Ok(done) => done,
                Err(e) => {
                    // Nothing more will be tried: every change not sent is lost.
                    self.abandon(batch.iter().chain(batches.iter().flatten()));
                    return Err(e);
                }
            };
            // The server answers every command it tried (see `sent`).
            let done = results.len().min(batch.len());
            if let Some(rest) = self.sent(&batch, &results) {
                batches.push_front(rest);
            }
            if let Some(staged) = staged {
                // Only now may the next shipment go: a refusal may have left part of this batch
                // to send again, after which it must not be overtaken.
                if let (true, Some(turn)) = (batches.is_empty(), fsync.as_deref_mut()) {
                    turn.give_up_turn();
                }
                match staged.durable() {
                    Ok((lsn, epoch)) => self.writeback.made_durable(lsn, &epoch),
                    Err(e) => {
                        // As when the send fails: whether the batch is durable is unknown.
                        batch[..done].iter().for_each(|op| self.write_back_failed(op, Errno(libc::EIO)));
                        self.abandon(batches.iter().flatten());
                        return Err(e);
                    }
                }
            }
            if joins && results.len() > batch.len() {
                return Ok(Some((results.split_off(batch.len()), lease)));
            }
            if last && batches.is_empty() {
                outcome = Some((results, lease));
            }
        }
        match direct {
            Some(d) => self.send_txn(d.creds, &d.commands, &d.data, &[], &[], false).map(|(results, lease, _)| Some((results, lease))),
            None => Ok(outcome),
        }
    }

    /// Sends `run` (see [`writeback::concurrent_run`]) as transactions in flight together, each
    /// on its own channel: over a link with a long round trip the data of several transactions
    /// travels in one round trip. Their outcomes are taken in queue order. Returns what refusals
    /// left to send again; if any transport failed, every change of the run not known to be
    /// applied fails (EIO) and the error is returned.
    fn ship_concurrently(&self, run: Vec<Vec<writeback::Queued>>) -> Result<Vec<Vec<writeback::Queued>>> {
        let run: Vec<_> = run.into_iter().map(|batch| self.drop_lost(batch)).filter(|batch| !batch.is_empty()).collect();
        tracing::debug!(transactions = run.len(), "writes sent together");
        let outcomes: Vec<_> = std::thread::scope(|scope| {
            let sends: Vec<_> = run
                .iter()
                .map(|batch| {
                    scope.spawn(|| {
                        let commands: Vec<Command> = batch.iter().map(|op| op.command.clone()).collect();
                        self.send_txn(batch[0].creds.clone(), &commands, &writeback::data_of(batch), &[], batch, false)
                    })
                })
                .collect();
            sends.into_iter().map(|send| send.join().expect("a write-back send panicked")).collect()
        });
        let (mut again, mut failure) = (Vec::new(), None);
        for (batch, outcome) in run.iter().zip(outcomes) {
            match outcome {
                Ok((results, ..)) => again.extend(self.sent(batch, &results)),
                Err(e) => {
                    self.abandon(batch.iter());
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => {
                self.abandon(again.iter().flatten());
                Err(e)
            }
            None => Ok(again),
        }
    }

    /// Takes in the server's `results` for `batch` (and maybe more commands after it): one per
    /// command the server tried. It stops at a refusal (from protocol version 6 on, at any but
    /// a write's), so the changes it did not try are returned, to be sent again; each refused
    /// one is recorded as failed.
    fn sent(&self, batch: &[writeback::Queued], results: &[std::result::Result<CommandOk, Errno>]) -> Option<Vec<writeback::Queued>> {
        let done = results.len().min(batch.len());
        for (op, result) in batch.iter().zip(results) {
            if let Err(errno) = result {
                self.write_back_failed(op, *errno);
            }
        }
        self.writeback.sent(&batch[..done]);
        (done < batch.len()).then(|| batch[done..].to_vec())
    }

    /// Gives up changes that will not be sent (the transport failed): every one fails with
    /// EIO, and only then are they no longer pending.
    fn abandon<'q>(&self, ops: impl Iterator<Item = &'q writeback::Queued>) {
        let ops: Vec<writeback::Queued> = ops.cloned().collect();
        for op in &ops {
            self.write_back_failed(op, Errno(libc::EIO));
        }
        self.writeback.sent(&ops);
    }

    /// Fails the changes of `batch` that name an object whose create the server refused, and
    /// returns the others.
    fn drop_lost(&self, batch: Vec<writeback::Queued>) -> Vec<writeback::Queued> {
        let mut kept = Vec::with_capacity(batch.len());
        for op in batch {
            match self.writeback.names_lost(&op) {
                Some(errno) => {
                    self.write_back_failed(&op, errno);
                    self.writeback.sent(std::slice::from_ref(&op));
                }
                None => kept.push(op),
            }
        }
        kept
    }

    /// Sends one transaction of `commands` (the first of them the changes `queued`, `creates`
    /// the provisional handles their creates give), resolves what it created and records the
    /// rights its response grants and the attributes and names its results report. `durable`:
    /// answered once durable; with `StagedTxn` that answer is still to be awaited (`Staged`).
    fn send_txn(
        &self,
        creds: Credentials,
        commands: &[Command],
        data: &[u8],
        creates: &[(usize, Handle)],
        queued: &[writeback::Queued],
        durable: bool,
    ) -> Result<(TxnResults, Lease, Option<connection::Staged>)> {
        let wire = self.writeback.on_the_wire(commands, creates).map_err(ClientError::Errno)?;
        let (seq, replied_below) = self.txns.begin();
        let txn = Txn { seq, replied_below, creds, commands: wire };
        let request = self.txn_request(txn, queued, durable);
        let (result, staged) = match request {
            Request::StagedTxn(_) | Request::WriteBack { staged: true, .. } => match self.connection.call_staged(&request, data) {
                Ok((granted, staged)) => (Ok(granted), Some(staged)),
                Err(e) => (Err(e), None),
            },
            _ => (self.connection.call_granted(&request, data), None),
        };
        self.txns.end(seq);
        let (results, lease) = self.applied(result?, commands, creates, queued.len())?;
        Ok((results, lease, staged))
    }

    /// The request that carries `txn`, whose first commands are the changes `queued`: a
    /// `WriteBack` if there are any and the server fences them (all made under rights of one
    /// server process, else it could not tell which; it then applies them as before), else a
    /// `Txn`, or for a `durable` one a `StagedTxn` or `DurableTxn`, as the server speaks.
    fn txn_request(&self, txn: Txn, queued: &[writeback::Queued], durable: bool) -> Request {
        let staged = durable && self.fsync_txn == FsyncTxn::Staged;
        let instance = queued.first().map(|op| op.rights_of);
        if let Some(instance) = instance.filter(|i| self.write_back_fence && queued.iter().all(|op| op.rights_of == *i)) {
            return Request::WriteBack { txn, queued: queued.len() as u32, instance, staged };
        }
        match (durable, self.fsync_txn) {
            (false, _) => Request::Txn(txn),
            (true, FsyncTxn::Staged) => Request::StagedTxn(txn),
            (true, _) => Request::DurableTxn(txn),
        }
    }

    /// Takes in the outcome of a transaction (see `send_txn`).
    fn applied(
        &self,
        result: connection::Granted,
        commands: &[Command],
        creates: &[(usize, Handle)],
        queued: usize,
    ) -> Result<(TxnResults, Lease)> {
        let connection::Granted { result, lease, exclusive, epoch, .. } = result;
        match result {
            Ok(Reply::Txn(outcome)) => {
                tracing::trace!(?lease, exclusive, commands = commands.len(), "txn applied");
                for (at, provisional) in creates {
                    if let Some(Ok(CommandOk::Entry(entry))) = outcome.results.get(*at) {
                        self.resolve(&commands[*at], provisional, &entry.handle, entry.attr.ino);
                    }
                }
                let commands = self.writeback.canonical(commands);
                let created = outcome.created();
                self.writeback.granted(commands.iter().flat_map(Command::handles).chain(created), lease, exclusive, &epoch);
                self.writeback.applied(&commands, &outcome.results, queued, (outcome.lsn, &epoch));
                Ok((outcome.results, lease))
            }
            Ok(other) => unexpected(other),
            Err(e) => Err(e),
        }
        .inspect_err(|_| {
            // Whether it was applied is unknown: so is everything exclusivity let us know.
            self.writeback.lost_rights();
        })
    }

    /// The create `command` of the provisional object `provisional` made it `real` (inode
    /// number `ino`) on the server: every cache learns the real handle, and the pin it took is
    /// counted.
    fn resolve(&self, command: &Command, provisional: &Handle, real: &Handle, ino: u64) {
        self.writeback.resolve(provisional, real);
        if let Command::Create { pin: true, .. } = command {
            self.connection.pin(real, 1);
        }
        if let Some(handler) = self.handler.get() {
            handler.created(provisional, real, ino);
        }
    }

    fn write_back_failed(&self, op: &writeback::Queued, errno: Errno) {
        tracing::warn!(errno = errno.0, command = ?op.command, "the server refused a change written back");
        self.writeback.failed(op, errno);
        if let Some(handler) = self.handler.get() {
            match (&op.creates, &op.command) {
                (Some(created), Command::Create { parent, name, .. } | Command::Mkdir { parent, name, .. }) => {
                    handler.write_back_failed(created, Some((parent, name)));
                    handler.write_back_failed(parent, None);
                }
                _ => handler.write_back_failed(op.command.handles()[0], None),
            }
        }
    }

    /// Applies one command as its own transaction.
    pub fn apply(&self, creds: Credentials, command: Command, data: Vec<u8>) -> Result<(CommandOk, Lease)> {
        let (mut results, lease) = self.txn(creds, vec![command], data)?;
        match results.pop() {
            Some(Ok(ok)) => Ok((ok, lease)),
            Some(Err(errno)) => Err(ClientError::Errno(errno)),
            None => Err(ClientError::Protocol("empty txn outcome".into())),
        }
    }

    /// Takes, changes or releases a lock; returns the conflicting lock another owner holds
    /// instead, if any.
    pub fn lock(&self, request: LockRequest) -> Result<Option<LockHeld>> {
        self.lock_call(Request::Lock(request))
    }

    /// As `lock`, for an owner that will wait for the lock and retry a conflict: the server
    /// refuses with EDEADLK a wait that would never end. A server before protocol version 7
    /// cannot tell, and is asked as by `lock`.
    pub fn lock_waiting(&self, request: LockRequest) -> Result<Option<LockHeld>> {
        match self.lock_wait {
            true => self.lock_call(Request::LockWait(request)),
            false => self.lock_call(Request::Lock(request)),
        }
    }

    /// Whether `lock_waiting` answers a conflict only after the server waited for the lock a
    /// while: the caller may ask again at once.
    pub fn lock_waits_at_server(&self) -> bool {
        self.lock_wait_at_server
    }

    /// The first lock that conflicts with `request`, if any.
    pub fn test_lock(&self, request: LockRequest) -> Result<Option<LockHeld>> {
        self.lock_call(Request::TestLock(request))
    }

    /// Sends a lock request; all kinds are answered with the conflicting lock, if any. What
    /// the server carried out is recorded, to be claimed again if it restarts.
    fn lock_call(&self, mut request: Request) -> Result<Option<LockHeld>> {
        if let Request::Lock(lock) | Request::LockWait(lock) | Request::TestLock(lock) = &mut request {
            lock.handle = self.settled(&lock.handle)?;
        }
        let held_locks = &self.connection.held_locks;
        let _travelling = held_locks.travelling();
        match (self.connection.call(&request, &[])?.0, &request) {
            (Reply::LockTest(None), Request::Lock(lock) | Request::LockWait(lock)) => {
                held_locks.granted(lock);
                Ok(None)
            }
            (Reply::LockTest(held), _) => Ok(held),
            (other, _) => unexpected(other),
        }
    }

    /// Whether I/O through a file whose owner took locks must ask `lock_lost` first: a lock of
    /// this client is lost, or may have been dropped by the server unseen (see `locks`).
    pub fn locks_in_question(&self) -> bool {
        self.connection.held_locks.in_question()
    }

    /// Whether the lock `owner` held on `handle` is lost; asks the server to confirm every
    /// held lock first if some may have been dropped unseen.
    pub fn lock_lost(&self, handle: &Handle, owner: u64) -> Result<bool> {
        let held_locks = &self.connection.held_locks;
        if held_locks.in_doubt() {
            self.connection.confirm_locks()?;
        }
        let handle = self.writeback.server_handle(handle).unwrap_or_else(|_| handle.clone());
        Ok(held_locks.is_lost(&handle, owner))
    }

    /// `owner` let go of `handle` (it closed it): its I/O no longer relies on a lost lock.
    pub fn forget_lost_lock(&self, handle: &Handle, owner: u64) {
        let handle = self.writeback.server_handle(handle).unwrap_or_else(|_| handle.clone());
        self.connection.held_locks.forget_lost(&handle, owner);
    }

    /// Returns once every transaction this client has had a reply for is durable.
    pub fn commit(&self) -> Result<Lsn> {
        self.commit_request(Request::Commit)
    }

    /// Returns once every transaction up to `lsn` is durable (protocol version 4).
    fn commit_up_to(&self, lsn: Lsn) -> Result<Lsn> {
        self.commit_request(Request::CommitUpTo(lsn))
    }

    fn commit_request(&self, request: Request) -> Result<Lsn> {
        let granted = self.connection.call_granted(&request, &[])?;
        match granted.result? {
            Reply::Committed(lsn) => {
                self.writeback.made_durable(lsn, &granted.epoch);
                Ok(lsn)
            }
            other => unexpected(other),
        }
    }

    fn call(&self, request: Request) -> Result<Reply> {
        self.connection.call(&request, &[]).map(|(reply, _)| reply)
    }

    fn call_leased(&self, request: Request) -> Result<(Reply, Lease)> {
        self.connection.call_leased(&request, &[]).map(|(reply, _, lease)| (reply, lease))
    }
}

/// How many times a read is made while a change of another client overlaps it (see `read`).
const READ_ATTEMPTS_FOR_A_LEASE: u32 = 3;

/// Renews the exclusive rights this client was granted lately, a quarter of a lease before
/// they would end, until unmount (see `writeback::RENEW_HORIZON`).
fn start_renewal_thread(client: Client) -> std::io::Result<()> {
    std::thread::Builder::new().name("braid-renew".into()).spawn(move || {
        while !client.writeback.stopped() {
            let lease = client.connection.lease();
            std::thread::sleep(lease / 4);
            // An open the server was not told of is safe while the right lasts; sent now, it is
            // safe whatever becomes of the right.
            client.send_unsent_opens(false);
            let due = client.writeback.rights_to_renew(Instant::now(), lease / 2);
            for handles in due.chunks(braid_proto::limits::READDIR_ENTRIES_MAX) {
                match client.connection.renew(handles) {
                    Ok((renewed, until)) => {
                        let extended = client.writeback.renewed(handles, &renewed, until);
                        if let Some(handler) = client.handler.get() {
                            handler.renewed(&extended, until);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot renew rights; they will lapse");
                        break;
                    }
                }
            }
            keep_locks_alive(&client, lease);
        }
    })?;
    Ok(())
}

/// While this client holds locks, lets the server hear from it (it gives away the locks of a
/// client silent for a lease), and confirms them if a reply came too late to be sure of them.
/// A request answered within the last quarter `lease` (a renewal just now, any request of the
/// mount) was heard: nothing need be sent until the next tick.
fn keep_locks_alive(client: &Client, lease: Duration) {
    let held_locks = &client.connection.held_locks;
    if !held_locks.holding() || !held_locks.leased() {
        return;
    }
    if !held_locks.in_doubt() && held_locks.trusted_for() > lease / 2 {
        return;
    }
    let alive = client.connection.renew(&[]).map(drop);
    if let Err(e) = alive.and_then(|()| match held_locks.in_doubt() {
        true => client.connection.confirm_locks(),
        false => Ok(()),
    }) {
        tracing::warn!(error = %e, "cannot reach the server to keep this client's locks");
    }
}

/// Sends the releases of closed files and the opens the server was not told of, in order, for
/// as long as the client exists. A file is released only once its queued changes are on the
/// server (an unlinked file would be gone).
fn start_release_thread(
    connection: Arc<Connection>,
    writeback: Arc<writeback::WriteBack>,
) -> std::io::Result<std::sync::mpsc::Sender<ReleaseWork>> {
    let (tx, rx) = std::sync::mpsc::channel::<ReleaseWork>();
    std::thread::Builder::new().name("braid-release".into()).spawn(move || {
        for work in rx {
            match work {
                ReleaseWork::Release(handle) => {
                    writeback.wait_sent(&handle);
                    // A file whose create never reached the server has nothing to release.
                    let Ok(handle) = writeback.server_handle(&handle) else { continue };
                    connection.pin(&handle, -1);
                    if let Err(e) = connection.call(&Request::Release { handle }, &[]) {
                        tracing::warn!(error = %e, "cannot release a closed file on the server");
                    }
                }
                ReleaseWork::Open(handle) => {
                    writeback.wait_sent(&handle);
                    // A file whose create never reached the server is not there to keep.
                    let Ok(handle) = writeback.server_handle(&handle) else { continue };
                    // The open was checked when it was made: existence is all that is asked.
                    let open = Request::Open { handle: handle.clone(), creds: Credentials::default(), access: 0 };
                    match connection.call(&open, &[]) {
                        Ok(_) => connection.pin(&handle, 1),
                        Err(e) => tracing::warn!(error = %e, "cannot tell the server of an open file; another client may remove it"),
                    }
                }
                ReleaseWork::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    })?;
    Ok(tx)
}

/// Whether `direct` can share the transaction of `batch` and its `probes` (of at most
/// `data_max` bytes of data).
fn joins(batch: &[writeback::Queued], probes: usize, direct: &Direct, data_max: usize) -> bool {
    // The server takes an append only alone in its transaction (it logs it as the write at the
    // offset where it lands).
    let alone = direct.commands.iter().any(|c| matches!(c, Command::Append { .. }));
    !alone
        && batch.first().is_none_or(|op| op.creds == direct.creds)
        && batch.len() + probes + direct.commands.len() <= braid_proto::limits::TXN_COMMANDS_MAX
        && batch.iter().map(|op| op.data.len()).sum::<usize>() + direct.data.len() <= data_max
}

fn unexpected<T>(reply: Reply) -> Result<T> {
    Err(ClientError::Protocol(format!("unexpected reply {reply:?}")))
}

pub(crate) fn wire_error(e: WireError) -> ClientError {
    match e {
        WireError::Errno(errno) => ClientError::Errno(errno),
        WireError::ReadOnly => ClientError::ReadOnly,
        WireError::Malformed(m) => ClientError::Protocol(format!("server says: malformed request: {m}")),
    }
}
