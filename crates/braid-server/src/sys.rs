//! The one module with `unsafe`: thin wrappers over Linux syscalls that neither `std` nor `nix`
//! offers (file handles, per-thread credentials, getdents64, xattrs on descriptors, syncfs).
//! Each wrapper checks its buffer sizes and converts the return value to `io::Result`.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Kernel `MAX_HANDLE_SZ`.
pub const KERNEL_HANDLE_BYTES_MAX: usize = 128;

#[repr(C)]
struct RawFileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; KERNEL_HANDLE_BYTES_MAX],
}

/// A kernel file handle (`struct file_handle`): names an inode of one file system, stably across
/// renames and reboots.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelHandle {
    pub handle_type: i32,
    pub bytes: Vec<u8>,
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `name_to_handle_at(2)` for `name` under `dir` (empty name: `dir` itself), never following a
/// final symlink.
pub fn name_to_handle(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<KernelHandle> {
    let mut raw = RawFileHandle { handle_bytes: KERNEL_HANDLE_BYTES_MAX as u32, handle_type: 0, f_handle: [0; 128] };
    let mut mount_id: libc::c_int = 0;
    let flags = if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    // SAFETY: `raw` is a properly sized file_handle buffer, `name` is NUL-terminated, and the
    // kernel writes at most `handle_bytes` bytes into `f_handle`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut raw as *mut RawFileHandle,
            &mut mount_id as *mut libc::c_int,
            flags,
        )
    };
    check(ret)?;
    let len = (raw.handle_bytes as usize).min(KERNEL_HANDLE_BYTES_MAX);
    Ok(KernelHandle { handle_type: raw.handle_type, bytes: raw.f_handle[..len].to_vec() })
}

/// `open_by_handle_at(2)`. Needs CAP_DAC_READ_SEARCH, so it must run with the server's own
/// credentials, never inside [`as_caller`].
pub fn open_by_handle(mount: BorrowedFd<'_>, handle: &KernelHandle, flags: i32) -> io::Result<OwnedFd> {
    if handle.bytes.len() > KERNEL_HANDLE_BYTES_MAX {
        return Err(io::Error::from_raw_os_error(libc::ESTALE));
    }
    let mut raw = RawFileHandle { handle_bytes: handle.bytes.len() as u32, handle_type: handle.handle_type, f_handle: [0; 128] };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: `raw` is a valid file_handle whose length fits its buffer.
    let ret =
        unsafe { libc::syscall(libc::SYS_open_by_handle_at, mount.as_raw_fd(), &mut raw as *mut RawFileHandle, flags | libc::O_CLOEXEC) };
    let fd = check(ret)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Credentials of the calling thread only. glibc's `setgroups` and friends change every thread
/// of the process, so the raw syscalls are used: each server thread applies one client's
/// credentials to the file system calls of one command, then restores its own.
pub struct CallerGuard {
    saved_groups: Vec<libc::gid_t>,
}

pub fn as_caller(uid: u32, gid: u32, groups: &[u32]) -> io::Result<CallerGuard> {
    let saved_groups = current_groups()?;
    // SAFETY: plain syscalls on integers and a valid slice.
    unsafe {
        check(libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()))?;
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
    }
    Ok(CallerGuard { saved_groups })
}

impl Drop for CallerGuard {
    fn drop(&mut self) {
        // SAFETY: as in `as_caller`. The server runs as root; fsuid 0 restores its
        // file-system capabilities.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, 0);
            libc::syscall(libc::SYS_setfsgid, 0);
            let ret = libc::syscall(libc::SYS_setgroups, self.saved_groups.len(), self.saved_groups.as_ptr());
            assert!(ret == 0, "restoring the server's groups failed: {}", io::Error::last_os_error());
        }
    }
}

fn current_groups() -> io::Result<Vec<libc::gid_t>> {
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: the buffer holds `groups.len()` entries.
    let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

/// One entry of `getdents64`.
pub struct RawDirEntry {
    pub ino: u64,
    pub next_cookie: u64,
    pub d_type: u8,
    pub name: Vec<u8>,
}

/// Reads directory entries from the current position of `dir`. Returns an empty vector at the
/// end of the directory.
pub fn getdents(dir: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Vec<RawDirEntry>> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = check(unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) })? as usize;
    let mut entries = Vec::new();
    let mut at = 0usize;
    // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name NUL-terminated.
    while at + 19 <= n {
        let ino = u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let off = u64::from_ne_bytes(buf[at + 8..at + 16].try_into().expect("8 bytes"));
        let reclen = u16::from_ne_bytes(buf[at + 16..at + 18].try_into().expect("2 bytes")) as usize;
        assert!(reclen >= 19 && at + reclen <= n, "getdents64 record length {reclen} at {at} of {n}");
        let d_type = buf[at + 18];
        let name_area = &buf[at + 19..at + reclen];
        let name_len = name_area.iter().position(|&b| b == 0).unwrap_or(name_area.len());
        entries.push(RawDirEntry { ino, next_cookie: off, d_type, name: name_area[..name_len].to_vec() });
        at += reclen;
    }
    Ok(entries)
}

/// `syncfs(2)`: makes everything written to the file system of `fd` durable.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) } as libc::c_long).map(|_| ())
}

/// Which xattr call to make on an object we hold a descriptor for. Descriptors opened with
/// `O_PATH` (special files) do not accept `f*xattr`, so those go through `/proc/self/fd/N`.
pub enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    ProcPath(std::ffi::CString),
}

pub fn get_xattr(target: &XattrTarget<'_>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        match target {
            XattrTarget::Fd(fd) => libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()),
            XattrTarget::ProcPath(p) => libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()),
        }
    };
    check(n as libc::c_long).map(|n| n as usize)
}

pub fn list_xattr(target: &XattrTarget<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        match target {
            XattrTarget::Fd(fd) => libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()),
            XattrTarget::ProcPath(p) => libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()),
        }
    };
    check(n as libc::c_long).map(|n| n as usize)
}

pub fn set_xattr(target: &XattrTarget<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: `value` is a valid slice, `name` NUL-terminated.
    let ret = unsafe {
        match target {
            XattrTarget::Fd(fd) => libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags),
            XattrTarget::ProcPath(p) => libc::setxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags),
        }
    };
    check(ret as libc::c_long).map(|_| ())
}

pub fn remove_xattr(target: &XattrTarget<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    let ret = unsafe {
        match target {
            XattrTarget::Fd(fd) => libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()),
            XattrTarget::ProcPath(p) => libc::removexattr(p.as_ptr(), name.as_ptr()),
        }
    };
    check(ret as libc::c_long).map(|_| ())
}

/// Sets the process umask to 0: the client has already applied the caller's umask to the
/// modes it sends, and the server must create objects with exactly those modes.
pub fn clear_umask() {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };
}

/// `fallocate(2)` with the raw mode bits the client sent (keep size, punch hole, zero range).
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: plain syscall on a valid descriptor.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) } as libc::c_long).map(|_| ())
}
