//! The process behind a FUSE request, as `/proc` shows it: FUSE passes only its uid, gid and
//! thread id.
use std::fs;

/// The caller's supplementary groups: the server needs them to apply rules such as "chgrp to a
/// group you belong to".
pub fn supplementary_groups(pid: u32) -> Vec<u32> {
    match fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => parse_groups(&status),
        // The process may already have exited; it then has no groups that matter.
        Err(_) => Vec::new(),
    }
}

/// Whether thread `tid` has a signal pending that it neither blocks nor ignores (SIGKILL
/// always counts), or is gone. A request that waits for long (a blocking lock) asks this
/// between its tries: the kernel's FUSE_INTERRUPT never reaches braid (fuser drops it), and
/// once the daemon has read a request the caller cannot leave before the answer, not even when
/// killed: it would sit in D state for as long as the lock is held.
pub fn interrupted(tid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => parse_interrupted(&status),
        Err(_) => true,
    }
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).take(braid_proto::limits::GROUPS_MAX).collect())
        .unwrap_or_default()
}

fn parse_interrupted(status: &str) -> bool {
    let mask = |field: &str| {
        status.lines().find_map(|line| line.strip_prefix(field)).and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok()).unwrap_or(0)
    };
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    let sigkill = 1u64 << (libc::SIGKILL - 1);
    pending & (!(mask("SigBlk:") | mask("SigIgn:")) | sigkill) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_groups_line() {
        let status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nNgid:\t0\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27, 1000]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("nothing"), Vec::<u32>::new());
    }

    fn status(pending: u64, shared: u64, blocked: u64, ignored: u64) -> String {
        format!("Name:\tx\nSigPnd:\t{pending:016x}\nShdPnd:\t{shared:016x}\nSigBlk:\t{blocked:016x}\nSigIgn:\t{ignored:016x}\nSigCgt:\t0\n")
    }

    #[test]
    fn a_pending_signal_interrupts_unless_blocked_or_ignored() {
        let bit = |signal: i32| 1u64 << (signal - 1);
        assert!(!parse_interrupted(&status(0, 0, 0, 0)), "nothing pending");
        assert!(parse_interrupted(&status(bit(libc::SIGALRM), 0, 0, 0)), "pending on the thread");
        assert!(parse_interrupted(&status(0, bit(libc::SIGTERM), 0, 0)), "pending on the process");
        assert!(!parse_interrupted(&status(bit(libc::SIGALRM), 0, bit(libc::SIGALRM), 0)), "blocked");
        assert!(!parse_interrupted(&status(0, bit(libc::SIGHUP), 0, bit(libc::SIGHUP))), "ignored");
        assert!(parse_interrupted(&status(0, bit(libc::SIGKILL), bit(libc::SIGKILL), 0)), "SIGKILL cannot be blocked");
    }

    #[test]
    fn this_process_is_not_interrupted_and_a_missing_one_is() {
        assert!(!interrupted(std::process::id()));
        assert!(interrupted(u32::MAX));
    }
}
