//! The FUSE adapter: each kernel request is decoded, turned into one client call, and replied
//! to. No file-system logic lives here; see `braid-client` and the server.
//!
//! Permission checks are the kernel's (`default_permissions`) against the server's attributes;
//! mutations carry the caller's uid, gid and groups, and the server applies them with those
//! credentials, so ownership and permission rules are the exported file system's own.
#![forbid(unsafe_code)]

pub mod cache;
mod caller;
mod errno;
mod lockers;
mod locking;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use braid_client::inodes::InodeTable;
use braid_client::{Client, ClientError, Lease};
use braid_proto::{
    Attr, AttrChanges, Command, CommandOk, Credentials, DirEntry, Entry, ExportInfo, Handle, LockKind, LockRequest, TimeSet, Timestamp,
    Whence,
};
use fuser::{
    AccessFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session, SessionACL,
    SessionUnmounter, TimeOrNow, WriteFlags,
};

use crate::cache::KernelCache;
use crate::locking::Locking;

pub use errno::errno_for;

/// Largest FUSE read or write; matches the protocol's data limit, so one kernel request is one
/// frame.
const IO_BYTES_MAX: u32 = braid_proto::limits::DATA_BYTES_MAX as u32;

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Kernel request loops; several so that a slow request (fsync) does not block others.
    pub threads: usize,
    /// Shown as the source in `mount` / `/proc/mounts`.
    pub fs_name: String,
    /// Kernel readahead for sequential reads, in KiB.
    pub readahead_kb: u32,
}

pub struct BraidFs {
    client: Client,
    cache: Arc<KernelCache>,
    dirs: Mutex<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_fh: AtomicU64,
    read_only: bool,
    /// Locks of this mount's processes: taken (a thread for each that waits), fenced once lost,
    /// released when the owner closes the file (POSIX) or the open file is released (OFD, flock).
    locking: Locking,
    /// Objects of recent listings, by node, with the listing batch they came in: the first
    /// getxattr of one the cache cannot answer asks for the names of the whole batch at once.
    unasked_xattrs: Mutex<HashMap<u64, ListedBatch>>,
    /// Unmounts the mount point; set once the session exists (see `destroy`).
    unmounter: Arc<OnceLock<Mutex<SessionUnmounter>>>,
}

/// The objects (node, handle) of one batch of a readdirplus listing.
type ListedBatch = Arc<Vec<(u64, Handle)>>;

/// Listed objects remembered for `unasked_xattrs` at most; past that the memory starts over.
const UNASKED_XATTRS_MAX: usize = 1 << 16;

/// Entries of one open directory, fetched from the server in batches and kept until
/// `releasedir`, so the kernel's small readdir calls do not each cost a round trip.
struct DirStream {
    handle: Handle,
    node: u64,
    /// The cookie the cached entries follow.
    start: u64,
    /// Whether the cached entries carry handles and attributes.
    plus: bool,
    /// Each entry with the lease of the batch it came in.
    entries: Vec<(DirEntry, Lease)>,
    eof: bool,
    /// Whether the entries are the client's own listing (`Client::known_listing`): complete,
    /// with cookies of its own that the server does not know.
    local: bool,
}

/// Mounts `fs` on `mountpoint` and returns the session once the kernel has completed the FUSE
/// handshake: the mount is then usable. Run the session to serve it.
pub fn mount(fs: BraidFs, mountpoint: &Path, options: &MountOptions) -> io::Result<Session<BraidFs>> {
    let mut config = Config::default();
    config.mount_options =
        vec![MountOption::FSName(options.fs_name.clone()), MountOption::Subtype("braid".into()), MountOption::DefaultPermissions];
    if fs.read_only {
        config.mount_options.push(MountOption::RO);
    }
    // Other users may use the mount only if the kernel is told to check their permissions,
    // which default_permissions does.
    config.acl = if nix_is_root() { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(options.threads.max(2));
    config.clone_fd = true;
    let (cache, client, unmounter) = (fs.cache.clone(), fs.client.clone(), fs.unmounter.clone());
    let mut session = Session::new(fs, mountpoint, &config)?;
    let _ = unmounter.set(Mutex::new(session.unmount_callable()));
    // Rights are granted only once the callback channel is up, and recalls need the notifier.
    cache.start(session.notifier())?;
    client.subscribe(cache)?;
    if let Err(e) = set_readahead(mountpoint, options.readahead_kb) {
        tracing::warn!(error = %e, "cannot set the mount's readahead; sequential reads will be slower");
    }
    Ok(session)
}

/// Sets the kernel readahead of the mount. FUSE mounts start with 128 KiB (the kernel default,
/// which the FUSE handshake can only lower); a sequential read then waits for one small
/// request at a time. Only root may change it. The device number comes from mountinfo: a
/// `stat` of the mount point would be a FUSE request, and nothing serves them yet.
fn set_readahead(mountpoint: &Path, readahead_kb: u32) -> io::Result<()> {
    let mountpoint = std::fs::canonicalize(mountpoint)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Fields: id, parent id, major:minor, root, mount point, ... (the last mount wins).
    let device = mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(4).map(Path::new) == Some(mountpoint.as_path())).then(|| fields[2].to_string())
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "mount not in /proc/self/mountinfo"))?;
    std::fs::write(format!("/sys/class/bdi/{device}/read_ahead_kb"), readahead_kb.to_string())
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

impl BraidFs {
    pub fn new(client: Client, info: &ExportInfo) -> Self {
        let cache = KernelCache::new(InodeTable::new(info.root.attr.ino, info.root.handle.clone()));
        Self {
            locking: Locking::new(client.clone(), cache.clone()),
            client,
            cache,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            read_only: info.read_only,
            unasked_xattrs: Mutex::new(HashMap::new()),
            unmounter: Arc::new(OnceLock::new()),
        }
    }

    fn check<T>(&self, result: Result<T, ClientError>) -> Result<T, Errno> {
        result.map_err(|e| errno_for(&e))
    }

    fn handle(&self, ino: INodeNo) -> Result<Handle, Errno> {
        self.cache.handle(ino.0)
    }

    fn node_id(&self, ino: u64) -> u64 {
        self.cache.inodes.lock().expect("inode lock").node_id(ino)
    }

    /// The node id of `entry`: the one the kernel knows its object by, if it does (an object
    /// created in the cache keeps its provisional number), else from its inode number.
    fn node_of(&self, entry: &Entry) -> u64 {
        let inodes = self.cache.inodes.lock().expect("inode lock");
        inodes.node_of(&entry.handle).unwrap_or_else(|| inodes.node_id(entry.attr.ino))
    }

    fn reply_entry(&self, reply: ReplyEntry, entry: Result<(Entry, Lease), Errno>) {
        match entry {
            Ok((entry, lease)) => reply.entry(&KernelCache::ttl(lease), &self.remember(&entry, lease), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    /// Records the kernel's new reference to `entry` and returns the attributes it is told.
    fn remember(&self, entry: &Entry, lease: Lease) -> FileAttr {
        let node = self.cache.inodes.lock().expect("inode lock").remember(entry.attr.ino, &entry.handle);
        self.cache.leased(node, lease);
        file_attr(node, &entry.attr)
    }

    /// Replies with the attributes of `node` (whose inode number may be provisional: the one
    /// the kernel knows it by stands).
    fn reply_attr(&self, reply: ReplyAttr, node: INodeNo, attr: Result<(Attr, Lease), Errno>) {
        match attr {
            Ok((attr, lease)) => {
                let node = node.0;
                self.cache.leased(node, lease);
                reply.attr(&KernelCache::ttl(lease), &file_attr(node, &attr))
            }
            Err(e) => reply.error(e),
        }
    }

    fn reply_empty(&self, reply: ReplyEmpty, result: Result<(), Errno>) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Runs one mutation as its own transaction with the caller's credentials. `nodes` are the
    /// objects the kernel holds locked for it (see `cache` on deadlock avoidance).
    fn apply(&self, req: &Request, nodes: &[INodeNo], command: Command, data: Vec<u8>) -> Result<(CommandOk, Lease), Errno> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let nodes: Vec<u64> = nodes.iter().map(|n| n.0).collect();
        let _busy = self.cache.busy(&nodes);
        self.check(self.client.apply(credentials(req), command, data))
    }

    /// Queues `command` if the client may change its object in its cache; returns what the
    /// server would have answered.
    fn write_back(&self, req: &Request, command: &Command, data: &[u8]) -> Option<CommandOk> {
        if self.read_only {
            return None;
        }
        self.client.write_back(&credentials(req), command, data)
    }

    /// The error of a queued change to `ino` the server refused, not reported by an fsync yet
    /// (`fsync`: reported now; see `Client::write_back_error`).
    fn write_back_error(&self, ino: INodeNo, fsync: bool) -> Result<(), Errno> {
        match self.handle(ino).ok().and_then(|h| self.client.write_back_error(&h, fsync)) {
            Some(errno) => Err(Errno::from_i32(errno.0)),
            None => Ok(()),
        }
    }

    /// Changes the attributes of `ino` (none: reads them), in the cache if the client may.
    fn set_attr(&self, req: &Request, ino: INodeNo, changes: AttrChanges) -> Result<(Attr, Lease), Errno> {
        let handle = self.handle(ino)?;
        if changes == AttrChanges::default() {
            return self.check(self.client.getattr(&handle));
        }
        let command = Command::SetAttr { handle, changes };
        if let Some(CommandOk::Attr(attr)) = self.write_back(req, &command, &[]) {
            return Ok((attr, self.cache.lease_of(ino.0)));
        }
        match self.apply(req, &[ino], command, Vec::new())? {
            (CommandOk::Attr(attr), lease) => Ok((attr, lease)),
            _ => Err(Errno::EIO),
        }
    }

    /// Whether a write by a process without CAP_FSETID may clear set-id bits of `handle`: the
    /// server decides (whether the set-group-id bit goes depends on the writer's groups), and
    /// unless this client holds the object, it does not know its mode for sure.
    fn write_may_kill_setid(&self, handle: &Handle) -> bool {
        self.client.known_attributes(handle).is_none_or(|attr| attr.mode & (libc::S_ISUID | libc::S_ISGID) != 0)
    }

    /// Sends a write that may clear set-id bits to the server, which clears them as a local
    /// write does (it applies it with the caller's credentials); the shadow, if any, then takes
    /// the server's mode (an empty setattr, on its own: an append goes alone). The kernel asks
    /// for the attributes after a write anyway, and the mount is nosuid.
    fn write_killing_setid(&self, req: &Request, ino: INodeNo, command: Command, data: &[u8]) -> Result<(CommandOk, Lease), Errno> {
        let handle = command.handles()[0].clone();
        let held = self.client.known_attributes(&handle).is_some();
        let written = self.apply(req, &[ino], command, data.to_vec());
        if held {
            let probe = Command::SetAttr { handle, changes: AttrChanges::default() };
            let _ = self.apply(req, &[ino], probe, Vec::new());
        }
        written
    }

    /// Returns once the changes of `ino` are durable on the server, and reports (once) a queued
    /// change of it the server refused: for a directory, a create, link, rename or removal in it.
    fn fsync_object(&self, ino: INodeNo) -> Result<(), Errno> {
        let synced = match self.handle(ino) {
            Ok(handle) => self.client.fsync(&handle),
            Err(_) => self.client.sync(),
        };
        self.check(synced).and_then(|()| self.write_back_error(ino, true))
    }

    fn apply_entry(&self, req: &Request, nodes: &[INodeNo], command: Command) -> Result<(Entry, Lease), Errno> {
        if !self.read_only {
            if let Some(created) = self.client.create_in_cache(&credentials(req), &command) {
                return Ok(created);
            }
        }
        match self.apply(req, nodes, command, Vec::new())? {
            (CommandOk::Entry(entry), lease) => Ok((entry, lease)),
            _ => Err(Errno::EIO),
        }
    }

    fn apply_done(&self, req: &Request, nodes: &[INodeNo], command: Command) -> Result<(), Errno> {
        if !self.read_only && self.client.rename_or_remove_in_cache(&credentials(req), &command) {
            return Ok(());
        }
        self.apply(req, nodes, command, Vec::new()).map(|_| ())
    }

    /// A lock request of `owner` on `ino` for the kernel's `typ` (`F_RDLCK`...) and range.
    fn lock_request(&self, ino: INodeNo, owner: LockOwner, start: u64, end: u64, typ: i32, pid: u32) -> Result<LockRequest, Errno> {
        let kind = match typ {
            libc::F_RDLCK => LockKind::Read,
            libc::F_WRLCK => LockKind::Write,
            libc::F_UNLCK => LockKind::Unlock,
            _ => return Err(Errno::EINVAL),
        };
        Ok(LockRequest { handle: self.handle(ino)?, owner: owner.0, kind, start, end, pid })
    }

    fn new_fh(&self) -> FileHandle {
        FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<(Handle, Vec<u8>), Errno> {
        Ok((self.handle(parent)?, name.as_bytes().to_vec()))
    }

    /// Remembers the objects of a listing batch: `ls -l` asks for two extended attributes of
    /// every file, and one request can then answer them all (`learn_xattr_names`); `find`,
    /// which asks for none, costs nothing more.
    fn listed(&self, listing: &[DirEntry]) {
        let batch: ListedBatch =
            Arc::new(listing.iter().filter_map(|e| e.entry.as_ref()).map(|e| (self.node_of(e), e.handle.clone())).collect());
        let mut unasked = self.unasked_xattrs.lock().expect("unasked lock");
        if unasked.len() + batch.len() > UNASKED_XATTRS_MAX {
            unasked.clear();
        }
        unasked.extend(batch.iter().map(|(node, _)| (*node, batch.clone())));
    }

    /// Asks for the extended attribute names of every object of the listing batch `node` came
    /// in, if it is still unasked; returns whether it asked.
    fn learn_xattr_names(&self, node: u64) -> bool {
        let batch = {
            let mut unasked = self.unasked_xattrs.lock().expect("unasked lock");
            let Some(batch) = unasked.remove(&node) else { return false };
            batch.iter().for_each(|(node, _)| {
                unasked.remove(node);
            });
            batch
        };
        match self.client.xattr_names(batch.iter().map(|(_, handle)| handle.clone()).collect()) {
            Ok(Some((lists, lease))) => {
                for ((node, _), names) in batch.iter().zip(lists) {
                    if let Some(names) = names {
                        self.cache.note_xattr_names(*node, &names, lease);
                    }
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %e, "cannot learn the extended attributes of a listing");
                false
            }
        }
    }

    /// Serves one readdir call from the stream's cached entries, fetching more as needed.
    /// Only this stream is locked while the server is asked, so other directories proceed.
    /// `plus`: the entries must carry handles and attributes (readdirplus).
    fn fill_dir(&self, fh: u64, offset: u64, plus: bool, mut add: impl FnMut(&DirEntry, Lease) -> bool) -> Result<(), Errno> {
        let stream = self.dirs.lock().expect("dir lock").get(&fh).cloned().ok_or(Errno::EBADF)?;
        let mut stream = stream.lock().expect("dir stream lock");
        let cached = match offset {
            0 => None,
            _ if plus && !stream.plus => None,
            cookie => stream.entries.iter().position(|(e, _)| e.cookie == cookie),
        };
        let mut at = match cached {
            Some(i) => i + 1,
            // A listing of the client's own holds every position there is.
            None if offset != 0 && stream.local => return Ok(()),
            None => {
                // rewinddir, or a seekdir to a position not cached: read afresh from there, so
                // that new entries show and the position is the server's own.
                stream.entries.clear();
                stream.eof = false;
                stream.start = offset;
                stream.plus = plus;
                stream.local = false;
                if offset == 0 {
                    self.list_known(&mut stream);
                }
                0
            }
        };
        loop {
            if at == stream.entries.len() {
                if stream.eof {
                    return Ok(());
                }
                let cookie = stream.entries.last().map_or(stream.start, |(e, _)| e.cookie);
                let (more, eof, lease) = self.check(self.client.readdir(&stream.handle, cookie, stream.plus))?;
                self.cache.leased(stream.node, lease);
                stream.eof = eof || more.is_empty();
                if more.is_empty() {
                    return Ok(());
                }
                if stream.plus {
                    self.listed(&more);
                }
                stream.entries.extend(more.into_iter().map(|e| (e, lease)));
            }
            let (entry, lease) = &stream.entries[at];
            if add(entry, *lease) {
                return Ok(());
            }
            at += 1;
        }
    }

    /// Fills `stream` with the client's own listing of its directory if it has one: a
    /// directory this client made and holds with all in it is listed without the server.
    fn list_known(&self, stream: &mut DirStream) {
        let Some((entries, lease)) = self.client.known_listing(&stream.handle) else { return };
        self.cache.leased(stream.node, lease);
        self.listed(&entries);
        stream.entries = entries.into_iter().map(|e| (e, lease)).collect();
        (stream.plus, stream.eof, stream.local) = (true, true, true);
    }
}

impl Filesystem for BraidFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(IO_BYTES_MAX);
        let _ = config.set_max_readahead(IO_BYTES_MAX);
        let _ = config.add_capabilities(
            InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_BIG_WRITES
                | InitFlags::FUSE_ASYNC_READ
                | InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                // Locks are the server's, so that processes on other clients see them.
                | InitFlags::FUSE_POSIX_LOCKS
                | InitFlags::FUSE_FLOCK_LOCKS
                // Pages of a file whose lease lapsed unseen are dropped when its mtime changes.
                | InitFlags::FUSE_AUTO_INVAL_DATA
                // Set-id bits are cleared by the server, which applies writes, truncates and
                // chowns with the caller's credentials (see `write_killing_setid`). Without it the
                // kernel asks for security.capability before every write and fetches the
                // attributes before every chown.
                | InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        );
        Ok(())
    }

    fn destroy(&mut self) {
        // The session unmounts its mount point by path when it ends, after this. The kernel
        // has usually unmounted it already, and the rights given back below may wait for an
        // unreachable server for the whole timeout: by then the mount point may hold another
        // mount (the user mounted again), which the session would unmount. So unmount now.
        if let Some(unmounter) = self.unmounter.get() {
            if let Err(e) = unmounter.lock().expect("unmounter lock").unmount() {
                tracing::debug!(error = %e, "mount point already unmounted");
            }
        }
        if let Err(e) = self.client.unsubscribe() {
            tracing::warn!(error = %e, "cannot give the server this mount's rights back; they expire with their lease");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let entry = self.child(parent, name).and_then(|(p, n)| self.check(self.client.lookup(&p, &n)));
        self.reply_entry(reply, entry);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut inodes = self.cache.inodes.lock().expect("inode lock");
        inodes.forget(ino.0, nlookup);
        if inodes.handle(ino.0).is_none() {
            self.cache.forgotten(ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.cache.await_pages_dropped(ino.0);
        self.reply_attr(reply, ino, self.handle(ino).and_then(|h| self.check(self.client.getattr(&h))));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = AttrChanges { mode, uid, gid, size, atime: atime.map(time_set), mtime: mtime.map(time_set) };
        let result = self.set_attr(req, ino, changes);
        self.reply_attr(reply, ino, result);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.handle(ino).and_then(|h| self.check(self.client.readlink(&h))) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, rdev: u32, reply: ReplyEntry) {
        let entry = self.child(parent, name).and_then(|(p, name)| {
            self.apply_entry(req, &[parent], Command::Create { parent: p, name, mode, rdev: rdev as u64, exclusive: true, pin: false })
        });
        self.reply_entry(reply, entry);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let entry =
            self.child(parent, name).and_then(|(p, name)| self.apply_entry(req, &[parent], Command::Mkdir { parent: p, name, mode }));
        self.reply_entry(reply, entry);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|(p, name)| self.apply_done(req, &[parent], Command::Unlink { parent: p, name }));
        self.reply_empty(reply, result);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|(p, name)| self.apply_done(req, &[parent], Command::Rmdir { parent: p, name }));
        self.reply_empty(reply, result);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let entry = self.child(parent, link_name).and_then(|(p, name)| {
            self.apply_entry(req, &[parent], Command::Symlink { parent: p, name, target: target.as_os_str().as_bytes().to_vec() })
        });
        self.reply_entry(reply, entry);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.child(parent, name).and_then(|(p, name)| {
            let (new_parent, new_name) = self.child(newparent, newname)?;
            self.apply_done(req, &[parent, newparent], Command::Rename { parent: p, name, new_parent, new_name, flags: flags.bits() })
        });
        self.reply_empty(reply, result);
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let entry = self.handle(ino).and_then(|handle| {
            let (new_parent, new_name) = self.child(newparent, newname)?;
            self.apply_entry(req, &[ino, newparent], Command::Link { handle, new_parent, new_name })
        });
        self.reply_entry(reply, entry);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let access = match flags.0 & libc::O_ACCMODE {
            libc::O_WRONLY => libc::W_OK,
            libc::O_RDWR => libc::R_OK | libc::W_OK,
            _ => libc::R_OK,
        } as u32;
        let keep = self.cache.may_keep_pages(ino.0);
        match self.handle(ino).and_then(|h| self.check(self.client.open(&h, credentials(req), access))) {
            Ok(lease) => {
                self.cache.leased(ino.0, lease);
                reply.opened(self.new_fh(), open_flags(keep, flags.0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = self.locking.fenced(ino.0, fh.0, lock.map(|o| o.0)).and_then(|()| self.handle(ino));
        self.cache.reading(ino.0, req.pid());
        match read.and_then(|h| self.check(self.client.read(&h, offset, size.min(IO_BYTES_MAX)))) {
            Ok((data, lease)) => {
                self.cache.leased(ino.0, lease);
                reply.data(&data);
                if lease.is_none() {
                    self.cache.drop_pages_later(ino.0, offset, data.len() as u64);
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.locking.fenced(ino.0, fh.0, lock.map(|o| o.0)).and_then(|()| self.handle(ino)).and_then(|handle| {
            let kills_setid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) && self.write_may_kill_setid(&handle);
            let len = data.len() as u32;
            // O_APPEND: at the end of the file as the server sees it, so that appends from
            // several clients never overwrite each other.
            let command =
                if flags.0 & libc::O_APPEND != 0 { Command::Append { handle, len } } else { Command::Write { handle, offset, len } };
            if kills_setid {
                return self.write_killing_setid(req, ino, command, data);
            }
            if let Some(ok) = self.write_back(req, &command, data) {
                return Ok((ok, None));
            }
            self.apply(req, &[ino], command, data.to_vec())
        });
        if result.is_ok() && flags.0 & libc::O_APPEND == 0 {
            self.cache.written(ino.0, req.pid(), offset, data.len() as u64);
        }
        reply_written(reply, result);
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // A close does not wait for queued writes (other clients' opens are served only after
        // they are written back); it reports a lost lock, ends the POSIX locks of the process
        // on the file, and reports a failed write-back already known.
        let fenced = self.locking.fenced(ino.0, fh.0, Some(lock_owner.0));
        let released = self.locking.closed_by(ino.0, lock_owner.0);
        let result = fenced.and(released).and_then(|()| self.write_back_error(ino, false));
        self.reply_empty(reply, result);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The last close of an open file ends its flock and OFD locks.
        let unlocked = self.locking.file_released(ino.0, fh.0, lock_owner.map(|o| o.0));
        let result = self.handle(ino).map(|h| self.client.release(&h));
        self.reply_empty(reply, unlocked.and(result));
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let result = self.locking.fenced(ino.0, fh.0, None).and_then(|()| self.fsync_object(ino));
        self.reply_empty(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.handle(ino) {
            Ok(handle) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                let stream = DirStream { handle, node: ino.0, start: 0, plus: false, entries: Vec::new(), eof: false, local: false };
                self.dirs.lock().expect("dir lock").insert(fh, Arc::new(Mutex::new(stream)));
                // The kernel may keep a listing it read under a lease that is still unbroken;
                // a recall drops it (and the kernel drops it itself when the mtime changes).
                let mut flags = FopenFlags::FOPEN_CACHE_DIR;
                if self.cache.may_keep_pages(ino.0) {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let result = self.fill_dir(fh.0, offset, false, |e, _| {
            reply.add(INodeNo(self.node_id(e.ino)), e.cookie, file_type(e.kind), OsStr::from_bytes(&e.name))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let result = self.fill_dir(fh.0, offset, true, |e, lease| {
            let name = OsStr::from_bytes(&e.name);
            match &e.entry {
                Some(entry) => {
                    let node = self.node_of(entry);
                    let ttl = KernelCache::ttl(lease);
                    let full = reply.add(INodeNo(node), e.cookie, name, &ttl, &file_attr(node, &entry.attr), Generation(0));
                    // The kernel takes a lookup reference on every entry it was given.
                    if !full {
                        self.remember(entry, lease);
                    }
                    full
                }
                // `.` and `..`: the kernel links neither, so placeholder attributes do.
                None => {
                    let node = self.node_id(e.ino);
                    let attr = Attr { ino: e.ino, mode: e.kind, ..Attr::default() };
                    reply.add(INodeNo(node), e.cookie, name, &Duration::ZERO, &file_attr(node, &attr), Generation(0))
                }
            }
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().expect("dir lock").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let result = self.fsync_object(ino);
        self.reply_empty(reply, result);
    }

    /// No ioctl is supported (not FICLONE, not file attribute flags): ENOTTY, as for a file
    /// system without them, so that `cp` and `tar` fall back quietly.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.check(self.client.statfs()) {
            Ok(s) => {
                reply.statfs(s.blocks, s.blocks_free, s.blocks_available, s.files, s.files_free, s.block_size, s.name_max, s.fragment_size)
            }
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, _position: u32, reply: ReplyEmpty) {
        let result = self.handle(ino).and_then(|handle| {
            let command = Command::SetXattr { handle, name: name.as_bytes().to_vec(), value: value.to_vec(), flags };
            self.apply_done(req, &[ino], command)
        });
        self.cache.xattrs_changed(ino.0);
        self.reply_empty(reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes();
        let missing = || self.cache.xattr_missing(ino.0, name);
        if missing() || (self.learn_xattr_names(ino.0) && missing()) {
            return reply.error(Errno::ENODATA);
        }
        let value = self.handle(ino).and_then(|h| self.check(self.client.getxattr(&h, name))).and_then(|(value, lease)| {
            if value.is_none() {
                self.cache.note_xattr_missing(ino.0, name, lease);
            }
            value.ok_or(Errno::ENODATA)
        });
        reply_xattr(reply, value, size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = self.handle(ino).and_then(|h| self.check(self.client.listxattr(&h)));
        reply_xattr(reply, names, size);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self
            .handle(ino)
            .and_then(|handle| self.apply_done(req, &[ino], Command::RemoveXattr { handle, name: name.as_bytes().to_vec() }));
        self.reply_empty(reply, result);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only called without default_permissions; the kernel checks permissions itself.
        reply.ok();
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, flags: i32, reply: ReplyCreate) {
        let exclusive = flags & libc::O_EXCL != 0;
        let entry = self.child(parent, name).and_then(|(p, name)| {
            let created = self.apply_entry(req, &[parent], Command::Create { parent: p, name, mode, rdev: 0, exclusive, pin: true })?;
            // A create made in the cache counts its pin when it reaches the server.
            if !braid_client::is_provisional(&created.0.handle) {
                self.client.pinned(&created.0.handle);
            }
            Ok(created)
        });
        match entry {
            Ok((entry, lease)) => {
                let attr = self.remember(&entry, lease);
                // A new file has no file capabilities (the kernel asks before every write), and
                // another client setting some would recall the lease first.
                self.cache.note_xattr_missing(attr.ino.0, b"security.capability", lease);
                reply.created(&KernelCache::ttl(lease), &attr, Generation(0), self.new_fh(), open_flags(false, flags))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let held = self.lock_request(ino, lock_owner, start, end, typ, pid).and_then(|r| self.check(self.client.test_lock(r)));
        match held {
            Ok(Some(held)) => {
                let typ = if held.kind == LockKind::Write { libc::F_WRLCK } else { libc::F_RDLCK };
                reply.locked(held.start, held.end, typ, held.pid)
            }
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(e),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        match self.lock_request(ino, lock_owner, start, end, typ, pid) {
            Ok(request) => self.locking.take(ino.0, fh.0, request, sleep.then(|| req.pid()), reply),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let result = self
            .locking
            .fenced(ino.0, fh.0, None)
            .and_then(|()| self.handle(ino))
            .and_then(|handle| self.apply_done(req, &[ino], Command::Fallocate { handle, offset, len: length, mode }));
        self.reply_empty(reply, result);
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let whence = match whence {
            libc::SEEK_DATA => Whence::Data,
            libc::SEEK_HOLE => Whence::Hole,
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else { return reply.error(Errno::ENXIO) };
        match self.handle(ino).and_then(|h| self.check(self.client.lseek(&h, offset, whence))) {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let result = self.locking.fenced(ino_out.0, fh_out.0, None).and_then(|()| self.handle(ino_in)).and_then(|source| {
            let target = self.handle(ino_out)?;
            // A FUSE reply carries a 32-bit count; the kernel loops for the rest.
            let len = len.min(u32::MAX as u64 & !0xfff);
            let command = Command::CopyFileRange { source, source_offset: offset_in, target, target_offset: offset_out, len };
            self.apply(req, &[ino_out], command, Vec::new())
        });
        reply_written(reply, result);
    }
}

/// How an open file uses the page cache: pages are kept from earlier opens only under an
/// unbroken lease; O_APPEND writes bypass it, since the server decides where they land.
fn open_flags(keep_pages: bool, open_flags: i32) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if keep_pages {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if open_flags & libc::O_APPEND != 0 {
        flags |= FopenFlags::FOPEN_DIRECT_IO;
    }
    flags
}

fn reply_written(reply: ReplyWrite, result: Result<(CommandOk, Lease), Errno>) {
    match result {
        Ok((CommandOk::Written(n), _)) => reply.written(n as u32),
        Ok(_) => reply.error(Errno::EIO),
        Err(e) => reply.error(e),
    }
}

fn reply_xattr(reply: ReplyXattr, value: Result<Vec<u8>, Errno>, size: u32) {
    match value {
        Ok(value) if size == 0 => reply.size(value.len() as u32),
        Ok(value) if value.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(value) => reply.data(&value),
        Err(e) => reply.error(e),
    }
}

fn credentials(req: &Request) -> Credentials {
    let groups = if req.uid() == 0 { Vec::new() } else { caller::supplementary_groups(req.pid()) };
    Credentials { uid: req.uid(), gid: req.gid(), groups }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(timestamp(t)),
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
        Err(before) => {
            let d = before.duration();
            if d.subsec_nanos() == 0 {
                Timestamp { secs: -(d.as_secs() as i64), nanos: 0 }
            } else {
                Timestamp { secs: -(d.as_secs() as i64) - 1, nanos: 1_000_000_000 - d.subsec_nanos() }
            }
        }
    }
}

fn system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(node: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(node),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_before_and_after_the_epoch() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp { secs: 1_900_000_000, nanos: 5 },
            Timestamp { secs: -1, nanos: 999_999_999 },
            Timestamp { secs: -100, nanos: 0 },
        ] {
            assert_eq!(timestamp(system_time(t)), t);
        }
    }

    #[test]
    fn file_types_follow_the_mode() {
        assert_eq!(file_type(libc::S_IFDIR | 0o755), FileType::Directory);
        assert_eq!(file_type(libc::S_IFIFO), FileType::NamedPipe);
        assert_eq!(file_type(libc::S_IFREG | 0o644), FileType::RegularFile);
    }
}
