//! The exported directory: resolves handles to descriptors, answers reads and applies commands.
//!
//! Every object is reached through a handle (see `handles`) or as a single name component under a
//! directory handle; the server never walks a path, never follows a symlink, and refuses `.`,
//! `..` and names containing `/`, so no request can reach outside the export root.
//!
//! Mutations run with the caller's file-system credentials (`sys::as_caller`) so that the
//! exported file system itself decides ownership and permissions; descriptors are opened
//! beforehand with the server's own credentials.
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use braid_proto::limits::{NAME_BYTES_MAX, READDIR_ENTRIES_MAX, XATTR_NAME_BYTES_MAX, XATTR_VALUE_BYTES_MAX};
use braid_proto::{Attr, AttrChanges, Command, CommandOk, Credentials, DirEntry, Entry, Errno, Handle, StatFs, TimeSet, Timestamp, Whence};
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::handles::{HandleSealer, ObjectKind};
use crate::quota::{self, Quota};
use crate::sys::{self, KernelHandle, XattrTarget};

/// Descriptors kept open for handles, so that most requests cost no `open_by_handle_at`.
/// Pinned entries (objects a client has open) are never evicted.
const FD_CACHE_ENTRIES_MAX: usize = 8192;

/// How long the descriptor of an object that lost its last name stays open. A client may have
/// looked the name up just before the removal and open it just after, as a process on a local
/// file system may: with the descriptor gone that open would fail with ESTALE (a reader of a
/// file replaced by rename, the usual way to update a file atomically). Space is freed at
/// once when a change would otherwise run out of it.
const REMOVED_LINGER: Duration = Duration::from_secs(1);

/// How often the descriptors of removed objects are looked at (see `Export::closes_looked`).
const CLOSE_BATCH_INTERVAL: Duration = Duration::from_millis(50);

pub type OpResult<T> = Result<T, Errno>;

fn errno(e: impl Into<io::Error>) -> Errno {
    Errno(e.into().raw_os_error().unwrap_or(libc::EIO))
}

fn from_rustix(e: rustix::io::Errno) -> Errno {
    Errno(e.raw_os_error())
}

const ESTALE: Errno = Errno(libc::ESTALE);
const EINVAL: Errno = Errno(libc::EINVAL);

struct CachedFd {
    fd: Arc<OwnedFd>,
    pins: u32,
}

pub struct Export {
    root: OwnedFd,
    root_handle: Handle,
    sealer: HandleSealer,
    fds: Mutex<HashMap<KernelHandle, CachedFd>>,
    /// Objects that lost a name, oldest first, whose descriptors are closed after
    /// [`REMOVED_LINGER`] unless a client has them open.
    removed: Mutex<VecDeque<(KernelHandle, Instant)>>,
    /// Closes descriptors of removed objects on a thread of its own: the last close of an
    /// unlinked file frees its blocks and first waits for any writeback of its pages, which
    /// under a commit took up to 280 ms, and stalled every request behind the fd cache lock.
    closer: mpsc::Sender<Vec<Arc<OwnedFd>>>,
    /// When `close_removed` last looked: it looks at most every `CLOSE_BATCH_INTERVAL`, so that
    /// a stream of removals wakes the closer a few times a second, not once per removal.
    closes_looked: Mutex<Instant>,
    quota: Option<Quota>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot open export directory {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("export directory {path} does not support file handles (name_to_handle_at: {source}); use a local file system such as ext4, xfs, btrfs or tmpfs")]
    NoHandles { path: String, source: io::Error },
}

impl Export {
    /// Opens the export; with `max_bytes`, counts what it holds to enforce that limit.
    pub fn open(dir: &Path, key: [u8; 32], max_bytes: Option<u64>) -> Result<Self, ExportError> {
        let path = dir.display().to_string();
        let root = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| ExportError::Open { path: path.clone(), source: e.into() })?;
        let kernel = sys::name_to_handle(root.as_fd(), c"").map_err(|source| ExportError::NoHandles { path, source })?;
        let sealer = HandleSealer::new(key);
        let root_handle = sealer.seal(ObjectKind::Directory, &kernel);
        let quota = match max_bytes {
            Some(max) => {
                Some(Quota::scan(root.as_fd(), max).map_err(|source| ExportError::Open { path: dir.display().to_string(), source })?)
            }
            None => None,
        };
        let (closer, to_close) = mpsc::channel::<Vec<Arc<OwnedFd>>>();
        std::thread::Builder::new()
            .name("braid-close".into())
            .spawn(move || to_close.into_iter().for_each(drop))
            .map_err(|source| ExportError::Open { path: dir.display().to_string(), source })?;
        Ok(Self {
            root,
            root_handle,
            sealer,
            fds: Mutex::new(HashMap::new()),
            removed: Mutex::new(VecDeque::new()),
            closer,
            closes_looked: Mutex::new(Instant::now()),
            quota,
        })
    }

    pub fn max_bytes(&self) -> Option<u64> {
        self.quota.as_ref().map(Quota::max_bytes)
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    pub fn root_entry(&self) -> OpResult<Entry> {
        Ok(Entry { handle: self.root_handle.clone(), attr: stat_fd(self.root.as_fd())? })
    }

    // ---- reads -------------------------------------------------------------------------

    pub fn lookup(&self, parent: &Handle, name: &[u8]) -> OpResult<Entry> {
        let dir = self.dir_fd(parent)?;
        let name = component(name)?;
        self.entry_at(dir.as_fd(), &name)
    }

    pub fn getattr(&self, handle: &Handle) -> OpResult<Attr> {
        stat_fd(self.fd(handle)?.as_fd())
    }

    pub fn readlink(&self, handle: &Handle) -> OpResult<Vec<u8>> {
        let fd = self.fd(handle)?;
        let target = rustix::fs::readlinkat(fd.as_fd(), c"", Vec::new()).map_err(from_rustix)?;
        Ok(target.into_bytes())
    }

    pub fn read(&self, handle: &Handle, offset: u64, len: u32) -> OpResult<Vec<u8>> {
        let fd = self.fd(handle)?;
        // Read into the spare capacity: zeroing 1 MiB first showed in sequential-read profiles.
        let len = len as usize;
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(fd.as_fd(), rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(from_rustix(e)),
            }
        }
        buf.truncate(len); // with_capacity may have given more room than asked for
        Ok(buf)
    }

    /// Entries after `cookie` (0: from the start), up to a batch; `true` at the end.
    pub fn readdir(&self, handle: &Handle, cookie: u64, plus: bool) -> OpResult<(Vec<DirEntry>, bool)> {
        let dir = self.dir_fd(handle)?;
        // A private descriptor: the position is per open file, and the cached one is shared.
        let own = rustix::fs::openat(dir.as_fd(), c".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(from_rustix)?;
        rustix::fs::seek(&own, rustix::fs::SeekFrom::Start(cookie)).map_err(from_rustix)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut entries = Vec::new();
        while entries.len() < READDIR_ENTRIES_MAX {
            let batch = sys::getdents(own.as_fd(), &mut buf).map_err(errno)?;
            if batch.is_empty() {
                return Ok((entries, true));
            }
            for e in batch {
                let dot = e.name == b"." || e.name == b"..";
                let entry = match (plus && !dot, CString::new(e.name.clone())) {
                    (true, Ok(name)) => match self.entry_at(dir.as_fd(), &name) {
                        Ok(entry) => Some(entry),
                        // Removed since getdents saw it: leave it out, as a later readdir would.
                        Err(_) => continue,
                    },
                    _ => None,
                };
                entries.push(DirEntry { name: e.name, ino: e.ino, kind: dtype_to_mode(e.d_type), cookie: e.next_cookie, entry });
            }
        }
        Ok((entries, false))
    }

    pub fn statfs(&self) -> OpResult<StatFs> {
        self.close_removed(Instant::now() - REMOVED_LINGER);
        let s = rustix::fs::fstatvfs(&self.root).map_err(from_rustix)?;
        // With a size limit the export looks like a file system of that size.
        let (blocks, blocks_free, blocks_available) = match &self.quota {
            Some(quota) => {
                let unit = s.f_frsize.max(1);
                let left = quota.max_bytes().saturating_sub(quota.used_bytes()) / unit;
                (quota.max_bytes() / unit, left.min(s.f_bfree), left.min(s.f_bavail))
            }
            None => (s.f_blocks, s.f_bfree, s.f_bavail),
        };
        Ok(StatFs {
            blocks,
            blocks_free,
            blocks_available,
            files: s.f_files,
            files_free: s.f_ffree,
            block_size: s.f_bsize as u32,
            name_max: s.f_namemax as u32,
            fragment_size: s.f_frsize as u32,
        })
    }

    pub fn getxattr(&self, handle: &Handle, name: &[u8]) -> OpResult<Vec<u8>> {
        let (kind, fd) = self.fd_with_kind(handle)?;
        let name = xattr_name(name)?;
        let mut buf = vec![0u8; XATTR_VALUE_BYTES_MAX];
        let n = sys::get_xattr(&xattr_target(kind, &fd)?, &name, &mut buf).map_err(errno)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn listxattr(&self, handle: &Handle) -> OpResult<Vec<u8>> {
        let (kind, fd) = self.fd_with_kind(handle)?;
        let mut buf = vec![0u8; XATTR_VALUE_BYTES_MAX];
        let n = sys::list_xattr(&xattr_target(kind, &fd)?, &mut buf).map_err(errno)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn lseek(&self, handle: &Handle, offset: u64, whence: Whence) -> OpResult<u64> {
        let fd = self.fd(handle)?;
        let from = match whence {
            Whence::Data => rustix::fs::SeekFrom::Data(offset),
            Whence::Hole => rustix::fs::SeekFrom::Hole(offset),
        };
        rustix::fs::seek(&*fd, from).map_err(from_rustix)
    }

    /// Checks that `creds` may open the object for `access` (`R_OK`/`W_OK`), as the exported
    /// file system decides, then pins it. Root (unsquashed) may open anything, as locally.
    pub fn open_checked(&self, handle: &Handle, creds: &Credentials, access: u32) -> OpResult<()> {
        if creds.uid != 0 && access != 0 {
            let fd = self.fd(handle)?;
            let access = rustix::fs::Access::from_bits_truncate(access as _);
            // faccessat refuses AT_EMPTY_PATH; the /proc link reaches the same inode.
            let path = proc_path(&fd)?;
            as_caller(creds, || rustix::fs::accessat(rustix::fs::CWD, path.as_c_str(), access, AtFlags::EACCESS).map_err(from_rustix))?;
        }
        self.pin(handle)
    }

    /// Keeps the object's descriptor open until `unpin`, so an open file that gets unlinked
    /// stays readable and writable.
    pub fn pin(&self, handle: &Handle) -> OpResult<()> {
        let (_, kernel) = self.sealer.open(handle).map_err(|_| ESTALE)?;
        self.fd(handle)?;
        if let Some(cached) = self.fds.lock().expect("fd cache lock").get_mut(&kernel) {
            cached.pins += 1;
        }
        Ok(())
    }

    pub fn unpin(&self, handle: &Handle) -> OpResult<()> {
        let (_, kernel) = self.sealer.open(handle).map_err(|_| ESTALE)?;
        let mut fds = self.fds.lock().expect("fd cache lock");
        if let Some(cached) = fds.get_mut(&kernel) {
            cached.pins = cached.pins.saturating_sub(1);
        }
        drop(fds);
        self.close_removed(Instant::now() - REMOVED_LINGER);
        Ok(())
    }

    // ---- mutations ---------------------------------------------------------------------

    /// Applies one command. `data` is this command's share of the frame's data section.
    /// `tolerant` is set when the command's transaction may already have been partly applied
    /// before a crash: then "already exists" and "already gone" count as success.
    pub fn apply(&self, command: &Command, data: &[u8], creds: &Credentials, tolerant: bool) -> OpResult<CommandOk> {
        self.close_removed(Instant::now() - REMOVED_LINGER);
        match self.apply_limited(command, data, creds, tolerant) {
            // Space held by removed files is freed first.
            Err(Errno(libc::ENOSPC | libc::EDQUOT)) if self.close_removed_now() => self.apply_limited(command, data, creds, tolerant),
            result => result,
        }
    }

    /// Applies one command within the export's size limit.
    fn apply_limited(&self, command: &Command, data: &[u8], creds: &Credentials, tolerant: bool) -> OpResult<CommandOk> {
        let Some(quota) = &self.quota else { return self.apply_unlimited(command, data, creds, tolerant) };
        match self.allocation_target(command)? {
            Some((fd, growth)) => {
                if !quota.allows(growth) {
                    return Err(Errno(libc::ENOSPC));
                }
                let before = quota::allocated(&*fd);
                let result = self.apply_unlimited(command, data, creds, tolerant);
                quota.changed(before, quota::allocated(&*fd));
                result
            }
            None => {
                let victim = self.removal_victim(command);
                let result = self.apply_unlimited(command, data, creds, tolerant);
                if let (Ok(_), Some(bytes)) = (&result, victim) {
                    quota.changed(bytes, 0);
                }
                result
            }
        }
    }

    /// For a command that may allocate space: the object it grows and by how many bytes at most.
    fn allocation_target(&self, command: &Command) -> OpResult<Option<(Arc<OwnedFd>, u64)>> {
        let (handle, end) = match command {
            Command::Write { handle, offset, len } => (handle, offset.saturating_add(*len as u64)),
            Command::Append { handle, .. } => (handle, u64::MAX),
            Command::Fallocate { handle, offset, len, .. } => (handle, offset.saturating_add(*len)),
            Command::CopyFileRange { target, target_offset, len, .. } => (target, target_offset.saturating_add(*len)),
            Command::SetAttr { handle, changes: AttrChanges { size: Some(size), .. } } => (handle, *size),
            _ => return Ok(None),
        };
        let fd = self.fd(handle)?;
        let size = rustix::fs::fstat(&*fd).map_err(from_rustix)?.st_size as u64;
        let growth = match command {
            // fallocate may fill holes inside the file too.
            Command::Fallocate { len, .. } => *len,
            Command::Append { len, .. } => *len as u64,
            _ => end.saturating_sub(size),
        };
        Ok(Some((fd, growth)))
    }

    /// For a command that removes a name: the bytes freed if it is the object's last name.
    fn removal_victim(&self, command: &Command) -> Option<u64> {
        let (parent, name) = match command {
            Command::Unlink { parent, name } => (parent, name),
            Command::Rename { new_parent, new_name, flags, .. } if *flags & libc::RENAME_EXCHANGE == 0 => (new_parent, new_name),
            _ => return None,
        };
        let dir = self.dir_fd(parent).ok()?;
        let stat = rustix::fs::statat(&*dir, component(name).ok()?.as_c_str(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
        (stat.st_nlink == 1 && stat.st_mode & libc::S_IFMT != libc::S_IFDIR).then_some(stat.st_blocks as u64 * 512)
    }

    fn apply_unlimited(&self, command: &Command, data: &[u8], creds: &Credentials, tolerant: bool) -> OpResult<CommandOk> {
        match command {
            Command::Create { parent, name, mode, rdev, exclusive, pin } => {
                let entry = self.create(parent, name, *mode, *rdev, *exclusive && !tolerant, creds, tolerant)?;
                if *pin {
                    self.pin(&entry.handle)?;
                }
                Ok(CommandOk::Entry(entry))
            }
            Command::Mkdir { parent, name, mode } => self
                .make_entry(parent, name, creds, tolerant, |dir, name| rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(*mode & 0o7777))),
            Command::Symlink { parent, name, target } => {
                let target = CString::new(target.clone()).map_err(|_| EINVAL)?;
                self.make_entry(parent, name, creds, tolerant, |dir, name| rustix::fs::symlinkat(target.as_c_str(), dir, name))
            }
            Command::Link { handle, new_parent, new_name } => self.link(handle, new_parent, new_name, tolerant),
            Command::Unlink { parent, name } => self.remove(parent, name, creds, tolerant, AtFlags::empty()),
            Command::Rmdir { parent, name } => self.remove(parent, name, creds, tolerant, AtFlags::REMOVEDIR),
            Command::Rename { parent, name, new_parent, new_name, flags } => {
                self.rename(parent, name, new_parent, new_name, *flags, creds, tolerant)
            }
            Command::SetAttr { handle, changes } => self.setattr(handle, changes, creds).map(CommandOk::Attr),
            Command::Write { handle, offset, len } => {
                assert_eq!(data.len(), *len as usize, "write data slice does not match its command");
                self.write(handle, *offset, data, creds)
            }
            Command::Append { handle, len } => {
                assert_eq!(data.len(), *len as usize, "append data slice does not match its command");
                // Transactions are applied one at a time, so the size read here is still the
                // end of the file when the bytes land.
                let size = rustix::fs::fstat(&*self.fd(handle)?).map_err(from_rustix)?.st_size as u64;
                self.write(handle, size, data, creds)
            }
            Command::Fallocate { handle, offset, len, mode } => {
                let fd = self.fd(handle)?;
                as_caller(creds, || sys::fallocate(fd.as_fd(), *mode, *offset, *len).map_err(errno))?;
                Ok(CommandOk::Done)
            }
            Command::CopyFileRange { source, source_offset, target, target_offset, len } => {
                self.copy_range(source, *source_offset, target, *target_offset, *len, creds)
            }
            Command::SetXattr { handle, name, value, flags } => {
                let (kind, fd) = self.fd_with_kind(handle)?;
                let name = xattr_name(name)?;
                let target = xattr_target(kind, &fd)?;
                as_caller(creds, || sys::set_xattr(&target, &name, value, *flags).map_err(errno))?;
                Ok(CommandOk::Done)
            }
            Command::RemoveXattr { handle, name } => {
                let (kind, fd) = self.fd_with_kind(handle)?;
                let name = xattr_name(name)?;
                let target = xattr_target(kind, &fd)?;
                as_caller(creds, || sys::remove_xattr(&target, &name).map_err(errno))?;
                Ok(CommandOk::Done)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        parent: &Handle,
        name: &[u8],
        mode: u32,
        rdev: u64,
        exclusive: bool,
        creds: &Credentials,
        tolerant: bool,
    ) -> OpResult<Entry> {
        let dir = self.dir_fd(parent)?;
        let name = component(name)?;
        let perm = Mode::from_raw_mode(mode & 0o7777);
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            let file_type = rustix::fs::FileType::from_raw_mode(mode);
            let made = as_caller(creds, || {
                rustix::fs::mknodat(dir.as_fd(), name.as_c_str(), file_type, perm, rdev as rustix::fs::Dev).map_err(from_rustix)
            });
            tolerate(made, tolerant, libc::EEXIST)?;
            return self.entry_at(dir.as_fd(), &name);
        }
        let mut flags = OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        if exclusive {
            flags |= OFlags::EXCL;
        }
        let opened = as_caller(creds, || {
            rustix::fs::openat(dir.as_fd(), name.as_c_str(), flags, perm)
                .or_else(|e| match e {
                    // An existing file the caller may only read: still a successful open(O_CREAT).
                    // If there is no such file, the directory refused the creation: keep EACCES.
                    rustix::io::Errno::ACCESS if !exclusive => {
                        rustix::fs::openat(dir.as_fd(), name.as_c_str(), OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, perm)
                            .map_err(|again| if again == rustix::io::Errno::NOENT { e } else { again })
                    }
                    e => Err(e),
                })
                .map_err(from_rustix)
        })?;
        let entry = self.entry_at(dir.as_fd(), &name)?;
        let (_, kernel) = self.sealer.open(&entry.handle).map_err(|_| ESTALE)?;
        self.cache_insert(kernel, Arc::new(opened));
        Ok(entry)
    }

    fn make_entry(
        &self,
        parent: &Handle,
        name: &[u8],
        creds: &Credentials,
        tolerant: bool,
        make: impl FnOnce(BorrowedFd<'_>, &std::ffi::CStr) -> rustix::io::Result<()>,
    ) -> OpResult<CommandOk> {
        let dir = self.dir_fd(parent)?;
        let name = component(name)?;
        let made = as_caller(creds, || make(dir.as_fd(), name.as_c_str()).map_err(from_rustix));
        tolerate(made, tolerant, libc::EEXIST)?;
        self.entry_at(dir.as_fd(), &name).map(CommandOk::Entry)
    }

    fn link(&self, handle: &Handle, new_parent: &Handle, new_name: &[u8], tolerant: bool) -> OpResult<CommandOk> {
        let fd = self.fd(handle)?;
        let dir = self.dir_fd(new_parent)?;
        let name = component(new_name)?;
        // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH, so this runs with the server's credentials;
        // the client kernel has already checked the caller's write permission on the directory.
        let made = rustix::fs::linkat(fd.as_fd(), c"", dir.as_fd(), name.as_c_str(), AtFlags::EMPTY_PATH).map_err(from_rustix);
        tolerate(made, tolerant, libc::EEXIST)?;
        self.entry_at(dir.as_fd(), &name).map(CommandOk::Entry)
    }

    fn remove(&self, parent: &Handle, name: &[u8], creds: &Credentials, tolerant: bool, flags: AtFlags) -> OpResult<CommandOk> {
        let dir = self.dir_fd(parent)?;
        let name = component(name)?;
        let victim = self.kernel_handle_at(dir.as_fd(), &name).ok();
        let removed = as_caller(creds, || rustix::fs::unlinkat(dir.as_fd(), name.as_c_str(), flags).map_err(from_rustix));
        tolerate(removed, tolerant, libc::ENOENT)?;
        if let Some(kernel) = victim {
            self.forget_if_unpinned(&kernel);
        }
        Ok(CommandOk::Done)
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        parent: &Handle,
        name: &[u8],
        new_parent: &Handle,
        new_name: &[u8],
        flags: u32,
        creds: &Credentials,
        tolerant: bool,
    ) -> OpResult<CommandOk> {
        let from_dir = self.dir_fd(parent)?;
        let to_dir = self.dir_fd(new_parent)?;
        let from = component(name)?;
        let to = component(new_name)?;
        let replaced = self.kernel_handle_at(to_dir.as_fd(), &to).ok();
        let flags = rustix::fs::RenameFlags::from_bits(flags).ok_or(EINVAL)?;
        let renamed = as_caller(creds, || {
            rustix::fs::renameat_with(from_dir.as_fd(), from.as_c_str(), to_dir.as_fd(), to.as_c_str(), flags).map_err(from_rustix)
        });
        // Replayed after a crash: the source is gone and the target exists, so it was done.
        if tolerant && renamed == Err(Errno(libc::ENOENT)) && replaced.is_some() {
            return Ok(CommandOk::Done);
        }
        renamed?;
        if let Some(kernel) = replaced.filter(|_| !flags.contains(rustix::fs::RenameFlags::EXCHANGE)) {
            self.forget_if_unpinned(&kernel);
        }
        Ok(CommandOk::Done)
    }

    fn setattr(&self, handle: &Handle, changes: &AttrChanges, creds: &Credentials) -> OpResult<Attr> {
        let (kind, fd) = self.fd_with_kind(handle)?;
        as_caller(creds, || {
            if let Some(mode) = changes.mode {
                chmod(kind, &fd, mode & 0o7777)?;
            }
            if changes.uid.is_some() || changes.gid.is_some() {
                let uid = changes.uid.map(rustix::fs::Uid::from_raw);
                let gid = changes.gid.map(rustix::fs::Gid::from_raw);
                rustix::fs::chownat(fd.as_fd(), c"", uid, gid, AtFlags::EMPTY_PATH).map_err(from_rustix)?;
            }
            if let Some(size) = changes.size {
                if kind != ObjectKind::Regular {
                    return Err(Errno(libc::EINVAL));
                }
                rustix::fs::ftruncate(&*fd, size).map_err(from_rustix)?;
            }
            if changes.atime.is_some() || changes.mtime.is_some() {
                let times = rustix::fs::Timestamps { last_access: timespec(changes.atime), last_modification: timespec(changes.mtime) };
                rustix::fs::utimensat(fd.as_fd(), c"", &times, AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW).map_err(from_rustix)?;
            }
            Ok(())
        })?;
        stat_fd(fd.as_fd())
    }

    fn write(&self, handle: &Handle, offset: u64, data: &[u8], creds: &Credentials) -> OpResult<CommandOk> {
        let fd = self.fd(handle)?;
        as_caller(creds, || {
            let mut done = 0;
            while done < data.len() {
                match rustix::io::pwrite(&*fd, &data[done..], offset + done as u64) {
                    Ok(n) => done += n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(from_rustix(e)),
                }
            }
            Ok(CommandOk::Written(done as u64))
        })
    }

    fn copy_range(
        &self,
        source: &Handle,
        mut source_offset: u64,
        target: &Handle,
        mut target_offset: u64,
        len: u64,
        creds: &Credentials,
    ) -> OpResult<CommandOk> {
        let from = self.fd(source)?;
        let to = self.fd(target)?;
        as_caller(creds, || {
            let mut done = 0u64;
            while done < len {
                let chunk = (len - done).min(1 << 30) as usize;
                let n = rustix::fs::copy_file_range(&*from, Some(&mut source_offset), &*to, Some(&mut target_offset), chunk)
                    .map_err(from_rustix)?;
                if n == 0 {
                    break;
                }
                done += n as u64;
            }
            Ok(CommandOk::Written(done))
        })
    }

    // ---- handles and descriptors -------------------------------------------------------

    fn entry_at(&self, dir: BorrowedFd<'_>, name: &CString) -> OpResult<Entry> {
        let stat = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW).map_err(from_rustix)?;
        let attr = attr_from_stat(&stat);
        let kernel = sys::name_to_handle(dir, name).map_err(errno)?;
        Ok(Entry { handle: self.sealer.seal(ObjectKind::from_mode(attr.mode), &kernel), attr })
    }

    fn kernel_handle_at(&self, dir: BorrowedFd<'_>, name: &CString) -> OpResult<KernelHandle> {
        sys::name_to_handle(dir, name).map_err(errno)
    }

    fn dir_fd(&self, handle: &Handle) -> OpResult<Arc<OwnedFd>> {
        match self.fd_with_kind(handle)? {
            (ObjectKind::Directory, fd) => Ok(fd),
            _ => Err(Errno(libc::ENOTDIR)),
        }
    }

    fn fd(&self, handle: &Handle) -> OpResult<Arc<OwnedFd>> {
        self.fd_with_kind(handle).map(|(_, fd)| fd)
    }

    fn fd_with_kind(&self, handle: &Handle) -> OpResult<(ObjectKind, Arc<OwnedFd>)> {
        let (kind, kernel) = self.sealer.open(handle).map_err(|e| {
            tracing::warn!(?handle, error = %e, "refused handle");
            ESTALE
        })?;
        if let Some(cached) = self.fds.lock().expect("fd cache lock").get(&kernel) {
            return Ok((kind, cached.fd.clone()));
        }
        let fd = Arc::new(self.open_kernel(kind, &kernel)?);
        Ok((kind, self.cache_insert(kernel, fd)))
    }

    fn open_kernel(&self, kind: ObjectKind, kernel: &KernelHandle) -> OpResult<OwnedFd> {
        let root = self.root.as_fd();
        let opened = match kind {
            ObjectKind::Regular => sys::open_by_handle(root, kernel, libc::O_RDWR).or_else(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EROFS | libc::ETXTBSY | libc::EPERM) => sys::open_by_handle(root, kernel, libc::O_RDONLY),
                _ => Err(e),
            }),
            ObjectKind::Directory => sys::open_by_handle(root, kernel, libc::O_RDONLY | libc::O_DIRECTORY),
            ObjectKind::Symlink | ObjectKind::Special => sys::open_by_handle(root, kernel, libc::O_PATH | libc::O_NOFOLLOW),
        };
        opened.map_err(|e| match e.raw_os_error() {
            // The object is gone: the client's handle is stale, as in NFS.
            Some(libc::ENOENT) => ESTALE,
            _ => errno(e),
        })
    }

    /// Inserts `fd` unless another thread was faster; returns the descriptor now cached.
    fn cache_insert(&self, kernel: KernelHandle, fd: Arc<OwnedFd>) -> Arc<OwnedFd> {
        let mut fds = self.fds.lock().expect("fd cache lock");
        if fds.len() >= FD_CACHE_ENTRIES_MAX {
            // Evict half of the unpinned entries; order does not matter for correctness.
            let victims: Vec<_> = fds.iter().filter(|(_, c)| c.pins == 0).map(|(k, _)| k.clone()).take(FD_CACHE_ENTRIES_MAX / 2).collect();
            for k in victims {
                fds.remove(&k);
            }
        }
        fds.entry(kernel).or_insert(CachedFd { fd, pins: 0 }).fd.clone()
    }

    /// The cached descriptor of an object that lost a name is closed after [`REMOVED_LINGER`],
    /// unless a client has it open, so that the space of a deleted file is freed.
    fn forget_if_unpinned(&self, kernel: &KernelHandle) {
        self.removed.lock().expect("removed lock").push_back((kernel.clone(), Instant::now()));
    }

    /// Closes the descriptors of objects removed before `cutoff` that no client has open (those
    /// still open are looked at again later); returns whether there were any.
    /// Closes, in the background, the descriptors of objects removed before `cutoff` that no
    /// client has open; returns whether any removal was that old.
    fn close_removed(&self, cutoff: Instant) -> bool {
        {
            let mut looked = self.closes_looked.lock().expect("closes lock");
            if looked.elapsed() < CLOSE_BATCH_INTERVAL {
                return false;
            }
            *looked = Instant::now();
        }
        let Some(closing) = self.take_removed(cutoff) else { return false };
        if !closing.is_empty() {
            if let Err(mpsc::SendError(closing)) = self.closer.send(closing) {
                drop(closing);
            }
        }
        true
    }

    /// As `close_removed`, and returns once they are closed (their space is free), unless a
    /// request still uses one.
    fn close_removed_now(&self) -> bool {
        self.take_removed(Instant::now()).is_some()
    }

    fn take_removed(&self, cutoff: Instant) -> Option<Vec<Arc<OwnedFd>>> {
        let mut removed = self.removed.lock().expect("removed lock");
        if removed.front().is_none_or(|(_, at)| *at > cutoff) {
            return None;
        }
        let mut fds = self.fds.lock().expect("fd cache lock");
        let mut still_open = Vec::new();
        let mut closing = Vec::new();
        while let Some((kernel, _)) = removed.pop_front_if(|(_, at)| *at <= cutoff) {
            match fds.get(&kernel) {
                Some(cached) if cached.pins > 0 => still_open.push((kernel, Instant::now())),
                Some(_) => closing.extend(fds.remove(&kernel).map(|cached| cached.fd)),
                None => {}
            }
        }
        removed.extend(still_open);
        Some(closing)
    }
}

fn as_caller<T>(creds: &Credentials, op: impl FnOnce() -> OpResult<T>) -> OpResult<T> {
    // The server runs as root: a root caller with group 0 needs no switch (7 syscalls saved).
    if creds.uid == 0 && creds.gid == 0 {
        return op();
    }
    let _guard = sys::as_caller(creds.uid, creds.gid, &creds.groups).map_err(errno)?;
    op()
}

fn tolerate(result: OpResult<()>, tolerant: bool, benign: i32) -> OpResult<()> {
    match result {
        Err(Errno(e)) if tolerant && e == benign => Ok(()),
        other => other,
    }
}

fn chmod(kind: ObjectKind, fd: &OwnedFd, mode: u32) -> OpResult<()> {
    let mode = Mode::from_raw_mode(mode);
    match kind {
        ObjectKind::Regular | ObjectKind::Directory => rustix::fs::fchmod(fd, mode).map_err(from_rustix),
        ObjectKind::Symlink => Err(Errno(libc::EOPNOTSUPP)),
        // O_PATH descriptors refuse fchmod; the /proc link reaches the node itself.
        ObjectKind::Special => {
            let path = proc_path(fd)?;
            rustix::fs::chmod(path.as_c_str(), mode).map_err(from_rustix)
        }
    }
}

fn proc_path(fd: &OwnedFd) -> OpResult<CString> {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|_| EINVAL)
}

fn xattr_target(kind: ObjectKind, fd: &OwnedFd) -> OpResult<XattrTarget<'_>> {
    match kind {
        ObjectKind::Regular | ObjectKind::Directory => Ok(XattrTarget::Fd(fd.as_fd())),
        // Linux allows no user xattrs on symlinks; others need CAP_SYS_ADMIN on the link
        // itself, which a /proc path cannot reach without following it.
        ObjectKind::Symlink => Err(Errno(libc::EPERM)),
        ObjectKind::Special => Ok(XattrTarget::ProcPath(proc_path(fd)?)),
    }
}

/// Validates one name component: what a client may name under a directory.
fn component(name: &[u8]) -> OpResult<CString> {
    if name.len() > NAME_BYTES_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(EINVAL);
    }
    CString::new(name).map_err(|_| EINVAL)
}

fn xattr_name(name: &[u8]) -> OpResult<CString> {
    if name.len() > XATTR_NAME_BYTES_MAX {
        return Err(Errno(libc::ERANGE));
    }
    if name.is_empty() {
        return Err(EINVAL);
    }
    CString::new(name).map_err(|_| EINVAL)
}

fn timespec(time: Option<TimeSet>) -> rustix::fs::Timespec {
    match time {
        None => rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        Some(TimeSet::Now) => rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        Some(TimeSet::At(t)) => rustix::fs::Timespec { tv_sec: t.secs, tv_nsec: t.nanos as _ },
    }
}

fn stat_fd(fd: BorrowedFd<'_>) -> OpResult<Attr> {
    rustix::fs::fstat(fd).map(|s| attr_from_stat(&s)).map_err(from_rustix)
}

fn attr_from_stat(s: &rustix::fs::Stat) -> Attr {
    let ts = |secs: i64, nanos: u64| Timestamp { secs, nanos: nanos as u32 };
    Attr {
        ino: s.st_ino,
        size: s.st_size as u64,
        blocks: s.st_blocks as u64,
        atime: ts(s.st_atime, s.st_atime_nsec),
        mtime: ts(s.st_mtime, s.st_mtime_nsec),
        ctime: ts(s.st_ctime, s.st_ctime_nsec),
        mode: s.st_mode,
        nlink: s.st_nlink as u32,
        uid: s.st_uid,
        gid: s.st_gid,
        rdev: s.st_rdev,
        blksize: s.st_blksize as u32,
    }
}

fn dtype_to_mode(d_type: u8) -> u32 {
    match d_type {
        libc::DT_REG => libc::S_IFREG,
        libc::DT_DIR => libc::S_IFDIR,
        libc::DT_LNK => libc::S_IFLNK,
        libc::DT_FIFO => libc::S_IFIFO,
        libc::DT_SOCK => libc::S_IFSOCK,
        libc::DT_CHR => libc::S_IFCHR,
        libc::DT_BLK => libc::S_IFBLK,
        _ => 0,
    }
}
