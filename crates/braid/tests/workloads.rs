//! Real programs on a real mount: what users run and what network file systems have broken.
mod common;

use std::path::Path;
use std::process::Command;

use common::{plain_mount_args, Fixture};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.email=t@braid", "-c", "user.name=t", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn git_init_commit_clone_and_fsck_work_on_the_mount() {
    // Goal: git's use of the file system (lock files created O_EXCL and renamed, appends to
    // reflogs, fsync, hard-to-predict mixes of creates and writes) works on braid, and what it
    // wrote is intact as read through the mount and on the server.
    let args = ["--insecure", "--no-root-squash"].map(String::from).to_vec();
    let mut f = Fixture::serving_with_args(|_| {}, args, plain_mount_args());
    f.mount();
    let repo = f.m("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    for i in 0..50 {
        std::fs::create_dir_all(repo.join(format!("d{}", i % 5))).unwrap();
        std::fs::write(repo.join(format!("d{}/f{i}.txt", i % 5)), format!("file {i}\n").repeat(i + 1)).unwrap();
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    std::fs::write(repo.join("d0/f0.txt"), "changed\n").unwrap();
    assert_eq!(git(&repo, &["status", "--porcelain"]), " M d0/f0.txt\n");
    git(&repo, &["commit", "-q", "-am", "second"]);
    git(&f.m(""), &["clone", "-q", "repo", "clone"]);
    assert_eq!(git(&f.m("clone"), &["log", "--format=%s"]), "second\nfirst\n");
    assert_eq!(std::fs::read_to_string(f.m("clone/d3/f8.txt")).unwrap(), "file 8\n".repeat(9));
    git(&f.m("clone"), &["fsck", "--strict"]);
    git(&repo, &["gc", "-q"]);
    git(&repo, &["fsck", "--strict"]);
    // The server's copy is a valid repository too.
    git(&f.e("clone"), &["fsck", "--strict"]);
    assert_eq!(git(&f.e("clone"), &["status", "--porcelain"]), "");
}

#[test]
fn git_commits_on_one_client_are_seen_at_once_on_the_other() {
    // Goal: two people working on one repository through two mounts never see a stale HEAD or
    // a work tree that looks modified. Method: commits alternate between the clients; after
    // each, the other's HEAD must be the new commit and its `git status` clean.
    let args = ["--insecure", "--no-root-squash", "--lease", "30"].map(String::from).to_vec();
    let mut f = Fixture::serving_with_args(|_| {}, args, plain_mount_args());
    f.mount();
    let other = f.another_mount("mnt-b");
    let (a, b) = (f.m("repo"), other.m("repo"));
    std::fs::create_dir(&a).unwrap();
    git(&a, &["init", "-q"]);
    std::fs::write(a.join("notes.txt"), "start\n").unwrap();
    git(&a, &["add", "notes.txt"]);
    git(&a, &["commit", "-q", "-m", "start"]);
    for round in 0..6 {
        let (writer, reader) = if round % 2 == 0 { (&b, &a) } else { (&a, &b) };
        let mut notes = std::fs::read_to_string(writer.join("notes.txt")).unwrap();
        notes.push_str(&format!("round {round}\n"));
        std::fs::write(writer.join("notes.txt"), &notes).unwrap();
        git(writer, &["commit", "-q", "-am", &format!("round {round}")]);
        let head = git(writer, &["rev-parse", "HEAD"]);
        assert_eq!(git(reader, &["rev-parse", "HEAD"]), head, "round {round}: the other client's HEAD is stale");
        assert_eq!(git(reader, &["status", "--porcelain"]), "", "round {round}: the other client's work tree looks modified");
        assert_eq!(std::fs::read_to_string(reader.join("notes.txt")).unwrap(), notes);
    }
    git(&a, &["fsck", "--strict"]);
}
