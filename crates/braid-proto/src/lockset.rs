//! What a `Lock` request does to its owner's locks on one object, so that the server (which
//! arbitrates) and the client (which claims its locks again from a restarted server) agree:
//! fcntl's semantics, where a request replaces the owner's own ranges where it overlaps them
//! (an unlock in the middle splits a range, a new kind converts the overlapped part), and
//! touching ranges of one kind merge, as the kernel does for local locks.
use crate::LockKind;

/// One range of one owner's locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRange {
    pub write: bool,
    pub start: u64,
    /// Inclusive.
    pub end: u64,
    /// The process that took it, shown to others in a conflict report (`F_GETLK`).
    pub pid: u32,
}

impl LockRange {
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    pub fn kind(&self) -> LockKind {
        if self.write {
            LockKind::Write
        } else {
            LockKind::Read
        }
    }
}

/// One owner's locks on one object: disjoint ranges, ordered by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerLocks {
    ranges: Vec<LockRange>,
}

impl OwnerLocks {
    /// Takes, converts or releases (`LockKind::Unlock`) `start..=end`.
    pub fn apply(&mut self, kind: LockKind, start: u64, end: u64, pid: u32) {
        assert!(start <= end, "lock range {start}..={end} is empty");
        self.carve(start, end);
        if kind != LockKind::Unlock {
            let at = self.ranges.partition_point(|r| r.start < start);
            self.ranges.insert(at, LockRange { write: kind == LockKind::Write, start, end, pid });
            self.merge_touching();
        }
        debug_assert!(self.ranges.windows(2).all(|w| w[0].end < w[1].start), "ranges overlap: {:?}", self.ranges);
    }

    pub fn ranges(&self) -> &[LockRange] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether one range of kind `kind` holds all of `start..=end`.
    pub fn covers(&self, kind: LockKind, start: u64, end: u64) -> bool {
        let write = kind == LockKind::Write;
        kind != LockKind::Unlock && self.ranges.iter().any(|r| r.write == write && r.start <= start && end <= r.end)
    }

    /// Removes `start..=end`, splitting a range that straddles it.
    fn carve(&mut self, start: u64, end: u64) {
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for r in self.ranges.drain(..) {
            if !r.overlaps(start, end) {
                kept.push(r);
                continue;
            }
            if r.start < start {
                kept.push(LockRange { end: start - 1, ..r });
            }
            if r.end > end {
                kept.push(LockRange { start: end + 1, ..r });
            }
        }
        self.ranges = kept;
    }

    fn merge_touching(&mut self) {
        let mut merged: Vec<LockRange> = Vec::with_capacity(self.ranges.len());
        for r in self.ranges.drain(..) {
            match merged.last_mut() {
                Some(last) if last.write == r.write && last.end.checked_add(1) == Some(r.start) => last.end = r.end,
                _ => merged.push(r),
            }
        }
        self.ranges = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(locks: &OwnerLocks) -> Vec<(bool, u64, u64)> {
        locks.ranges().iter().map(|r| (r.write, r.start, r.end)).collect()
    }

    #[test]
    fn an_unlock_in_the_middle_splits_and_a_new_kind_converts_the_overlap() {
        let mut locks = OwnerLocks::default();
        locks.apply(LockKind::Write, 0, 99, 1);
        locks.apply(LockKind::Unlock, 40, 59, 1);
        assert_eq!(spans(&locks), [(true, 0, 39), (true, 60, 99)]);
        locks.apply(LockKind::Read, 30, 69, 1);
        assert_eq!(spans(&locks), [(true, 0, 29), (false, 30, 69), (true, 70, 99)]);
        locks.apply(LockKind::Unlock, 0, u64::MAX, 1);
        assert!(locks.is_empty());
    }

    #[test]
    fn touching_ranges_of_one_kind_merge() {
        let mut locks = OwnerLocks::default();
        locks.apply(LockKind::Read, 40, 59, 1);
        locks.apply(LockKind::Read, 0, 39, 1);
        locks.apply(LockKind::Read, 60, u64::MAX, 1);
        assert_eq!(spans(&locks), [(false, 0, u64::MAX)]);
        locks.apply(LockKind::Write, u64::MAX, u64::MAX, 1);
        assert_eq!(spans(&locks), [(false, 0, u64::MAX - 1), (true, u64::MAX, u64::MAX)]);
    }

    #[test]
    fn a_range_is_covered_by_one_range_of_its_kind() {
        let mut locks = OwnerLocks::default();
        locks.apply(LockKind::Write, 10, 19, 1);
        locks.apply(LockKind::Read, 20, 29, 1);
        assert!(locks.covers(LockKind::Write, 10, 19));
        assert!(locks.covers(LockKind::Write, 12, 15));
        assert!(!locks.covers(LockKind::Read, 12, 15), "another kind");
        assert!(!locks.covers(LockKind::Write, 10, 20), "partly another kind");
        assert!(!locks.covers(LockKind::Write, 0, 9), "not held");
        assert!(!locks.covers(LockKind::Unlock, 12, 15));
    }
}
