//! The export's size limit (`braid serve --max-size`): bytes allocated by files in the export,
//! counted once at start and kept up to date by the applier. Growth past the limit fails with
//! ENOSPC before anything is written; statfs reports the limit as the file system's size.
//!
//! The count is of allocated blocks (`st_blocks`), like `du`; a file unlinked while open still
//! counts as freed at once. The limit is enforced on every path that allocates: writes,
//! truncates that extend, fallocate and copy_file_range.
use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};

pub struct Quota {
    max_bytes: u64,
    used_bytes: AtomicU64,
}

impl Quota {
    /// Counts what the export under `root` holds now. Iterative (a bounded work list, no
    /// recursion), one visit per inode so that hard links count once.
    pub fn scan(root: BorrowedFd<'_>, max_bytes: u64) -> std::io::Result<Self> {
        let mut used = 0u64;
        let mut seen = HashSet::new();
        let mut pending: Vec<OwnedFd> =
            vec![rustix::fs::openat(root, c".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?];
        while let Some(dir_fd) = pending.pop() {
            let dir = rustix::fs::Dir::read_from(&dir_fd)?;
            for entry in dir {
                let entry = entry?;
                let name = entry.file_name();
                if name == c"." || name == c".." {
                    continue;
                }
                let Ok(stat) = rustix::fs::statat(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) else { continue };
                if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    if let Ok(child) = rustix::fs::openat(
                        &dir_fd,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                        Mode::empty(),
                    ) {
                        pending.push(child);
                    }
                } else if stat.st_nlink <= 1 || seen.insert(stat.st_ino) {
                    used += stat.st_blocks as u64 * 512;
                }
            }
        }
        Ok(Self { max_bytes, used_bytes: AtomicU64::new(used) })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Acquire)
    }

    /// Whether `extra` more bytes fit.
    pub fn allows(&self, extra: u64) -> bool {
        self.used_bytes().saturating_add(extra) <= self.max_bytes
    }

    /// Records a change of an object's allocation from `before` to `after` bytes.
    pub fn changed(&self, before: u64, after: u64) {
        if after >= before {
            self.used_bytes.fetch_add(after - before, Ordering::AcqRel);
        } else {
            let freed = before - after;
            let _ = self.used_bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_sub(freed)));
        }
    }
}

/// Bytes allocated to the object behind `fd`.
pub fn allocated(fd: impl AsFd) -> u64 {
    rustix::fs::fstat(fd).map(|s| s.st_blocks as u64 * 512).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_counts_files_once_and_tracks_changes() {
        // Goal: the scan counts every file (hard links once), and changes move the count.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::hard_link(dir.path().join("a/b/f"), dir.path().join("a/g")).unwrap();
        let root = std::fs::File::open(dir.path()).unwrap();
        let quota = Quota::scan(root.as_fd(), 1 << 20).unwrap();
        let file_bytes = allocated(std::fs::File::open(dir.path().join("a/g")).unwrap());
        assert_eq!(quota.used_bytes(), file_bytes, "the hard-linked file counts once");
        assert!(quota.allows(1 << 19));
        assert!(!quota.allows(1 << 20));
        quota.changed(file_bytes, 0);
        assert_eq!(quota.used_bytes(), 0);
        quota.changed(10, 0);
        assert_eq!(quota.used_bytes(), 0, "never below zero");
    }
}
