//! The command line: help is complete, bad arguments and unreachable servers give a clear error
//! and a failing exit status, and the default (daemonizing) mount comes up and unmounts cleanly.
mod common;

use std::process::Command;

use common::{braid_exe, is_mount_point, wait_until, Fixture, START_DEADLINE};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(braid_exe()).args(args).output().expect("run braid");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn every_subcommand_has_help() {
    // Goal: `--help` documents each subcommand and its options. Method: look for each flag.
    let (ok, top) = run(&["--help"]);
    assert!(ok, "{top}");
    for word in ["serve", "mount", "init", "umount"] {
        assert!(top.contains(word), "top-level help lacks {word}: {top}");
    }
    let expected: &[(&str, &[&str])] = &[
        (
            "serve",
            &[
                "--data",
                "--listen",
                "--state",
                "--read-only",
                "--max-size",
                "--no-root-squash",
                "--lease",
                "--commit-interval",
                "--tls-dir",
                "--insecure",
            ],
        ),
        ("mount", &["--foreground", "--timeout", "--log-file", "--require", "--tls-dir", "--insecure"]),
        ("init", &["--dir", "--server-name", "--client", "--force"]),
        ("umount", &["MOUNTPOINT"]),
    ];
    for (sub, flags) in expected {
        let (ok, help) = run(&[sub, "--help"]);
        assert!(ok, "{sub} --help failed: {help}");
        for flag in *flags {
            assert!(help.contains(flag), "`braid {sub} --help` lacks {flag}: {help}");
        }
    }
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    // Goal: each mistake names what is wrong. Method: run bad command lines, check status and text.
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--data", "/nonexistent/braid-test", "--listen", "127.0.0.1:0"], "not a directory"),
        (&["serve", "--data", "/tmp", "--listen", "not-an-address"], "invalid"),
        (&["mount", "127.0.0.1:1", "/tmp", "--foreground", "--insecure"], "cannot reach 127.0.0.1:1"),
        (
            &["mount", "127.0.0.1:1", "/tmp", "--foreground", "--tls-dir", "/nonexistent/braid-tls"],
            "no TLS credentials in /nonexistent/braid-tls",
        ),
        (&["serve", "--data", "/tmp", "--tls-dir", "/nonexistent/braid-tls"], "braid init"),
        (&["serve", "--data", "/tmp", "--insecure", "--max-size", "12X"], "unknown unit"),
        (&["serve", "--data", "/tmp", "--insecure", "--lease", "0"], "a lease lasts from 0.1 to 3600 seconds"),
        (&["serve", "--data", "/tmp", "--insecure", "--commit-interval", "1h"], "not a number of seconds"),
        (&["serve", "--data", "/tmp", "--insecure", "--commit-interval", "0"], "the commit interval is from 0.01 to 3600 seconds"),
        (&["mount", "127.0.0.1:1", "/nonexistent/braid-mnt"], "not a directory"),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, needle) in cases {
        let (ok, text) = run(args);
        assert!(!ok, "braid {args:?} succeeded: {text}");
        assert!(text.contains(needle), "braid {args:?}: expected {needle:?} in {text:?}");
    }
}

#[test]
fn default_mount_daemonizes_and_umount_unmounts() {
    // Goal: `braid mount` without --foreground returns once the mount is usable and keeps
    // serving it; `braid umount` ends it. Method: mount, use it, unmount, check the mount is gone.
    let fixture = Fixture::serving_with(|export| std::fs::write(export.join("hello"), b"hi").expect("seed file"));
    let addr = fixture.addr().to_string();
    let mnt = fixture.mnt.to_str().expect("utf-8 path");
    let (ok, text) = run(&["mount", &addr, mnt, "--timeout", "30", "--insecure"]);
    assert!(ok, "daemonized mount failed: {text}");
    assert!(is_mount_point(&fixture.mnt), "mount returned before the mount was up");
    assert_eq!(std::fs::read(fixture.mnt.join("hello")).expect("read through the mount"), b"hi");
    let (ok, text) = run(&["umount", mnt]);
    assert!(ok, "umount failed: {text}");
    wait_until("unmounted", START_DEADLINE, || !is_mount_point(&fixture.mnt));
}

#[test]
fn a_mount_whose_server_is_gone_at_unmount_leaves_the_next_mount_there_alone() {
    // Goal: after `umount`, a mount whose server is gone tries to give its rights back for up
    // to its --timeout before its process ends; it must not then unmount what was mounted on
    // the same mount point meanwhile (the process used to unmount the path as its last act).
    let mut fixture = Fixture::serving_with(|export| std::fs::write(export.join("hello"), b"hi").expect("seed file"));
    let addr = fixture.addr().to_string();
    let mnt = fixture.mnt.to_str().expect("utf-8 path").to_owned();
    let logs = tempfile::tempdir().expect("temp dir");
    let old_log = logs.path().join("old-mount.log");
    let (ok, text) = run(&["mount", &addr, &mnt, "--timeout", "2", "--insecure", "--log-file", old_log.to_str().unwrap()]);
    assert!(ok, "daemonized mount failed: {text}");
    assert_eq!(std::fs::read(fixture.mnt.join("hello")).expect("read through the mount"), b"hi");
    fixture.kill_server();
    let status = Command::new("umount").arg(&mnt).status().expect("run umount");
    assert!(status.success() && !is_mount_point(&fixture.mnt), "umount failed");

    // Another server (this one stays down, so the old process waits out its timeout).
    let other = Fixture::serving_with(|export| std::fs::write(export.join("other"), b"yes").expect("seed file"));
    let (ok, text) = run(&["mount", &other.addr().to_string(), &mnt, "--timeout", "30", "--insecure"]);
    assert!(ok, "second mount failed: {text}");
    let old_ended = || std::fs::read_to_string(&old_log).unwrap_or_default().contains("unmounted mountpoint");
    wait_until("the old mount's process to end", START_DEADLINE, old_ended);
    assert!(is_mount_point(&fixture.mnt), "the old mount's process unmounted the new mount");
    assert_eq!(std::fs::read(fixture.mnt.join("other")).expect("read through the new mount"), b"yes");
    let (ok, text) = run(&["umount", &mnt]);
    assert!(ok, "umount failed: {text}");
}
