//! Write-back: changes to what a client holds exclusively land in its cache and return at
//! local speed, reach the server later, and are never lost, never invisible to another client
//! and never silently refused.
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::sync::mpsc;
use std::time::Duration;

use common::{plain_mount_args, Fixture};

fn serving(extra: &[&str]) -> Fixture {
    serving_leased("30", extra)
}

fn serving_leased(lease: &str, extra: &[&str]) -> Fixture {
    let mut args = ["--insecure", "--no-root-squash", "--lease", lease].map(String::from).to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut fixture = Fixture::serving_with_args(|_| {}, args, plain_mount_args());
    fixture.mount();
    fixture
}

/// Runs `work` on a thread and waits at most `limit` for it.
fn within<T: Send + 'static>(what: &str, limit: Duration, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

#[test]
fn changes_to_a_file_held_exclusively_return_while_the_server_is_stopped() {
    // Goal: writes, truncates, chmods and utimes of a file this client created return without
    // the server (they are queued), and all of them reach it afterwards.
    let f = serving(&[]);
    let mut file = File::create(f.m("f")).expect("create");
    file.write_all(b"first").expect("first write");
    f.signal_server(libc::SIGSTOP);
    let file = within("changes with the server stopped", Duration::from_secs(10), move || {
        file.write_all(&[b'x'; 100_000]).expect("write");
        file.set_len(50_000).expect("truncate");
        file.set_permissions(fs::Permissions::from_mode(0o600)).expect("chmod");
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000)).expect("utime");
        let meta = file.metadata().expect("fstat");
        assert_eq!((meta.len(), meta.mode() & 0o777, meta.mtime()), (50_000, 0o600, 1_600_000_000), "as the cache shows it");
        file
    });
    f.signal_server(libc::SIGCONT);
    file.sync_all().expect("fsync");
    let on_server = fs::metadata(f.e("f")).expect("stat in the export");
    assert_eq!((on_server.len(), on_server.mode() & 0o777, on_server.mtime()), (50_000, 0o600, 1_600_000_000));
    let mut expected = b"first".to_vec();
    expected.resize(50_000, b'x');
    assert_eq!(fs::read(f.e("f")).expect("read the export"), expected);
}

#[test]
fn removing_one_file_does_not_wait_for_the_opens_of_others() {
    // Goal: an unlink waits for the server only to tell it of unsent opens of the file it
    // removes, not of every file open here (dbench's unlinks and renames stalled 30 ms each,
    // flushing the whole write-back queue first). With the server frozen, in a directory made
    // here, a file is kept open and another one is removed: the removal answers from the cache.
    let f = serving(&[]);
    fs::create_dir(f.m("d")).expect("mkdir d");
    // The kernel checks the path's permissions: the root's attributes come from the server.
    fs::metadata(f.m("")).expect("stat the root");
    f.signal_server(libc::SIGSTOP);
    let d = f.m("d");
    let removed = within("an unlink with another file open and the server stopped", Duration::from_secs(10), move || {
        fs::write(d.join("open"), b"1").expect("create open");
        fs::write(d.join("gone"), b"2").expect("create gone");
        let kept_open = File::open(d.join("open")).expect("open");
        let removed = fs::remove_file(d.join("gone"));
        drop(kept_open);
        removed
    });
    f.signal_server(libc::SIGCONT);
    removed.expect("unlink in the cache");
    File::open(f.m("d")).expect("open d").sync_all().expect("fsync d");
    assert_eq!(fs::read(f.e("d/open")).expect("read the export"), b"1");
    assert!(!f.e("d/gone").exists(), "the unlink reached the server");
}

#[test]
fn another_client_reads_what_was_not_written_back_yet() {
    // Goal: B reads A's latest bytes and attributes while A keeps the file open and never
    // closes or syncs it: the server has B wait for A's queued changes.
    let f = serving(&[]);
    let b = f.another_mount("mnt-b");
    let mut on_a = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(f.m("f")).expect("create on A");
    for round in 0..20u8 {
        let content = vec![b'a' + round; 4096 + round as usize];
        on_a.seek(SeekFrom::Start(0)).expect("seek");
        on_a.write_all(&content).expect("write on A");
        on_a.set_permissions(fs::Permissions::from_mode(0o600 + round as u32 % 2)).expect("chmod on A");
        let meta = fs::metadata(b.m("f")).expect("stat on B");
        assert_eq!(meta.len(), content.len() as u64, "round {round}: size on B");
        assert_eq!(meta.mode() & 0o777, 0o600 + round as u32 % 2, "round {round}: mode on B");
        let mut seen = Vec::new();
        File::open(b.m("f")).expect("open on B").read_to_end(&mut seen).expect("read on B");
        assert_eq!(seen, content, "round {round}: B read stale bytes");
    }
}

#[test]
fn fsync_reports_a_change_the_server_refused() {
    // Goal: a write the server refuses after it was queued (the export is full) is not
    // swallowed: the write or the fsync fails with ENOSPC, even after another close of the
    // file, and the export holds no more than its limit allows.
    let f = serving(&["--max-size", "1M"]);
    let mut file = File::create(f.m("big")).expect("create");
    let outcome = (|| {
        for _ in 0..8 {
            file.write_all(&[7u8; 512 * 1024])?;
        }
        // Another close of the same open file (here a dup; a child's exec closes the ones it
        // inherited) must not take the error from the fsync.
        std::thread::sleep(Duration::from_millis(200));
        drop(file.try_clone()?);
        file.sync_all()
    })();
    let Err(error) = outcome else {
        let size = fs::metadata(f.e("big")).map(|m| m.len());
        panic!("4 MiB into a 1 MiB export must fail; the export holds {size:?} bytes\n{}", f.logs_tail())
    };
    assert!(matches!(error.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)), "got {error}");
    assert!(fs::metadata(f.e("big")).expect("stat in the export").len() <= 1 << 20);
}

#[test]
fn fsyncdir_reports_a_create_the_server_refused() {
    // Goal: a create queued in the cache that the server refuses is not swallowed: the fsync
    // of its directory fails (once), as the fsync of a refused write does.
    // Method: the client makes d (it then knows d's every name and queues creates in it); a
    // file of the same name appears in the export behind its back; the client's create of it
    // is refused by the server when it arrives.
    let f = serving(&[]);
    fs::create_dir(f.m("d")).expect("mkdir d");
    fs::write(f.m("d/mine"), b"m").expect("create d/mine");
    fs::write(f.e("d/x"), b"theirs").expect("create d/x in the export");
    let created = OpenOptions::new().write(true).create_new(true).open(f.m("d/x"));
    let dir = File::open(f.m("d")).expect("open d");
    let synced = dir.sync_all();
    assert!(created.is_err() || synced.is_err(), "a refused create was reported nowhere\n{}", f.logs_tail());
    assert!(dir.sync_all().is_ok(), "reported once");
    assert_eq!(fs::read(f.e("d/x")).expect("read the export"), b"theirs", "theirs is left alone");
}

#[test]
fn a_clean_unmount_writes_everything_back() {
    // Goal: changes queued when the mount goes away are on the server once unmount returns.
    let f = serving(&[]);
    let b = f.another_mount("mnt-b");
    let mut content = Vec::new();
    for i in 0..50u32 {
        let mut file = File::create(b.m(&format!("f{i}"))).expect("create on B");
        let bytes = format!("file {i}\n").repeat(i as usize + 1).into_bytes();
        file.write_all(&bytes).expect("write on B");
        content.push(bytes);
    }
    drop(b);
    for (i, bytes) in content.iter().enumerate() {
        assert_eq!(&fs::read(f.e(&format!("f{i}"))).expect("read the export"), bytes, "file {i}");
    }
}

#[test]
fn a_tree_created_in_the_cache_returns_while_the_server_is_stopped_and_reaches_it() {
    // Goal: mkdir, create, write, chmod, rename, unlink and rmdir inside a directory this client made return without
    // the server (they are queued, with provisional inode numbers), reach it once it runs
    // again, and the inode numbers the mount showed do not change when they do.
    let f = serving(&[]);
    fs::create_dir(f.m("d")).expect("mkdir d");
    // The kernel asks for the attributes of the directory the mkdir changed; the mount's root
    // was not made here, so the server answers (from then on the cache does).
    fs::metadata(f.m("")).expect("stat the root");
    f.signal_server(libc::SIGSTOP);
    let (d, inodes) = (f.m("d"), Vec::new());
    let inodes = within("creates with the server stopped", Duration::from_secs(10), move || {
        let mut inodes = inodes;
        fs::create_dir(d.join("sub")).expect("mkdir sub");
        for i in 0..100u32 {
            let path = d.join("sub").join(format!("f{i}"));
            let mut file = File::create(&path).expect("create");
            file.write_all(format!("content {i}\n").repeat(i as usize).as_bytes()).expect("write");
            file.set_permissions(fs::Permissions::from_mode(0o600 + i % 8)).expect("chmod");
            inodes.push(fs::metadata(&path).expect("stat").ino());
        }
        assert!(fs::metadata(d.join("sub/missing")).is_err(), "a name never created");
        inodes
    });
    let mut sorted = inodes.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), inodes.len(), "every new file has its own inode number");
    f.signal_server(libc::SIGCONT);
    File::open(f.m("d/sub/f1")).expect("open").sync_all().expect("fsync");
    for i in 0..100u32 {
        let on_server = fs::metadata(f.e(&format!("d/sub/f{i}"))).expect("in the export");
        assert_eq!(on_server.mode() & 0o777, 0o600 + i % 8, "f{i}: mode");
        let expected = format!("content {i}\n").repeat(i as usize);
        assert_eq!(fs::read(f.e(&format!("d/sub/f{i}"))).expect("read the export"), expected.as_bytes(), "f{i}");
        assert_eq!(fs::metadata(f.m(&format!("d/sub/f{i}"))).expect("stat").ino(), inodes[i as usize], "f{i}: inode number kept");
    }
    let listed = fs::read_dir(f.m("d/sub")).expect("readdir").count();
    assert_eq!(listed, 100);
    // Removals of names this client knows are queued too.
    f.signal_server(libc::SIGSTOP);
    let d = f.m("d");
    within("renames and removals with the server stopped", Duration::from_secs(10), move || {
        fs::rename(d.join("sub/f0"), d.join("sub/f1")).expect("rename over another file");
        fs::rename(d.join("sub/f2"), d.join("kept")).expect("rename to another directory");
        for i in 3..100u32 {
            fs::remove_file(d.join(format!("sub/f{i}"))).expect("unlink");
        }
        fs::remove_file(d.join("sub/f1")).expect("unlink the replaced name");
        fs::remove_dir(d.join("sub")).expect("rmdir");
        assert!(fs::metadata(d.join("sub")).is_err(), "gone from the cache at once");
    });
    f.signal_server(libc::SIGCONT);
    File::open(f.m("d")).expect("open d").sync_all().expect("fsync d");
    assert!(!f.e("d/sub").exists(), "the removals reached the server");
    let names: Vec<_> = fs::read_dir(f.e("d")).expect("list d in the export").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(fs::read(f.e("d/kept")).expect("read the export"), "content 2\n".repeat(2).as_bytes());
}

#[test]
fn another_client_sees_files_created_in_the_cache_at_once() {
    // Goal: files A creates in its cache (never closed, never synced) are visible on B with
    // their bytes, by name and in listings; once B reads the directory, A's later creates
    // there are visible too. Method: B looks names up for the first time (no negative entry).
    let f = serving(&[]);
    let b = f.another_mount("mnt-b");
    fs::create_dir(f.m("d")).expect("mkdir on A");
    let mut first = File::create(f.m("d/first")).expect("create on A");
    first.write_all(b"hello").expect("write on A");
    fs::write(f.m("d/gone"), b"x").expect("create on A");
    fs::remove_file(f.m("d/gone")).expect("unlink on A");
    assert_eq!(fs::read(b.m("d/first")).expect("B reads A's new file"), b"hello");
    assert!(fs::metadata(b.m("d/gone")).is_err(), "B sees A's unlink");
    let mut later = File::create(f.m("d/later")).expect("create on A");
    later.write_all(b"again").expect("write on A");
    let mut names: Vec<String> =
        fs::read_dir(b.m("d")).expect("B lists").map(|e| e.expect("entry").file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["first", "later"]);
    assert_eq!(fs::read(b.m("d/later")).expect("B reads the later file"), b"again");
    drop((first, later));
}

#[test]
fn links_renames_and_unlinks_of_files_still_in_the_cache() {
    // Goal: changes sent directly that name objects created in the cache (link, rename,
    // unlink) go after those creates and name the right objects.
    let f = serving(&[]);
    fs::create_dir(f.m("d")).expect("mkdir");
    fs::write(f.m("d/a"), b"bytes of a").expect("create a");
    fs::hard_link(f.m("d/a"), f.m("d/b")).expect("link a b");
    fs::rename(f.m("d/a"), f.m("d/c")).expect("rename a c");
    fs::remove_file(f.m("d/b")).expect("unlink b");
    fs::write(f.m("d/gone"), b"x").expect("create gone");
    fs::remove_file(f.m("d/gone")).expect("unlink gone");
    fs::create_dir_all(f.m("d/x/y/z")).expect("mkdir -p");
    fs::write(f.m("d/x/y/z/deep"), b"deep").expect("create deep");
    fs::rename(f.m("d/x"), f.m("d/moved")).expect("rename a new directory");
    let c = fs::metadata(f.m("d/c")).expect("stat c");
    assert_eq!((c.len(), c.nlink()), (10, 1));
    File::open(f.m("d/c")).expect("open").sync_all().expect("fsync");
    let mut names: Vec<String> =
        fs::read_dir(f.e("d")).expect("list the export").map(|e| e.expect("entry").file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["c", "moved"]);
    assert_eq!(fs::read(f.e("d/c")).expect("c in the export"), b"bytes of a");
    assert_eq!(fs::read(f.e("d/moved/y/z/deep")).expect("deep in the export"), b"deep");
    assert_eq!(fs::metadata(f.e("d/c")).expect("stat c in the export").nlink(), 1);
    fs::remove_dir_all(f.m("d")).expect("rm -rf");
    assert!(!f.e("d").exists());
}

#[test]
fn listings_show_the_inode_numbers_stat_shows_for_files_created_in_the_cache() {
    // Goal: `ls -i` (d_ino) and `stat` agree for objects created in the cache, before and
    // after they reached the server (their provisional number stays while the kernel knows
    // them). Method: a directory of 300 entries, listed several times without lookups in
    // between: the kernel reads its first part "plus" (with attributes) and the rest plain.
    use std::os::unix::fs::DirEntryExt;
    let f = serving(&[]);
    fs::create_dir(f.m("d")).unwrap();
    for i in 0..300 {
        fs::write(f.m(&format!("d/f{i}")), b"x").unwrap();
    }
    fs::create_dir(f.m("d/sub")).unwrap();
    let stat_inos: Vec<(String, u64)> = (0..20)
        .map(|i| format!("f{i}"))
        .chain(["sub".to_string()])
        .map(|n| (n.clone(), fs::metadata(f.m(&format!("d/{n}"))).unwrap().ino()))
        .collect();
    File::open(f.m("d")).unwrap().sync_all().expect("fsync of the directory: everything reached the server");
    for round in 0..3 {
        let listed: std::collections::HashMap<String, u64> =
            fs::read_dir(f.m("d")).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().into_string().unwrap(), e.ino())).collect();
        for (name, ino) in &stat_inos {
            assert_eq!(listed.get(name), Some(ino), "round {round}: d_ino of {name} differs from its st_ino");
        }
        for (name, ino) in &stat_inos {
            assert_eq!(fs::metadata(f.m(&format!("d/{name}"))).unwrap().ino(), *ino, "st_ino of {name} changed");
        }
    }
}

#[test]
fn an_append_after_changes_queued_in_the_cache_succeeds() {
    // Goal: an O_APPEND write (which the server takes only alone in its transaction) made while
    // creates are queued goes out after them, not in their transaction. Before the fix the
    // whole transaction was refused as malformed and every queued change failed with EIO
    // (`git clone` failed appending to a reflog in a directory it had just made).
    let f = serving(&[]);
    fs::create_dir(f.m("logs")).unwrap();
    fs::write(f.m("logs/HEAD"), b"").unwrap();
    // Opening sends what is queued; the changes below are queued after it.
    let mut log = OpenOptions::new().append(true).open(f.m("logs/HEAD")).unwrap();
    fs::create_dir(f.m("logs/refs")).unwrap();
    fs::write(f.m("logs/refs/x"), b"queued").unwrap();
    log.write_all(b"entry 1\n").expect("append");
    log.write_all(b"entry 2\n").expect("append again");
    log.sync_all().expect("fsync");
    assert_eq!(fs::read(f.e("logs/HEAD")).unwrap(), b"entry 1\nentry 2\n");
    assert_eq!(fs::read(f.e("logs/refs/x")).unwrap(), b"queued");
}

#[test]
fn what_was_created_a_few_leases_ago_is_still_removed_in_the_cache() {
    // Goal: the exclusive rights on what this client created are renewed before they lapse, so
    // changes of it still land in the cache leases later although nothing touched it meanwhile
    // (postmark, `rm -rf` a while after an untar), and still reach the server.
    // Method: a 6 s lease (rights end 4.5 s after a grant, client side); create d/sub/f, leave
    // the mount idle for more than two leases, stop the server, then unlink sub/f and rmdir
    // sub relative to d (a lookup in the root, whose names this client does not all know,
    // would ask the server): both must return with the server stopped. Without renewal they
    // wait for it.
    let f = serving_leased("6", &[]);
    fs::create_dir_all(f.m("d/sub")).expect("mkdir");
    fs::write(f.m("d/sub/f"), b"x").expect("create");
    let d = File::open(f.m("d")).expect("open d");
    std::thread::sleep(Duration::from_secs(14));
    f.signal_server(libc::SIGSTOP);
    within("unlink and rmdir with the server stopped", Duration::from_secs(5), move || {
        let remove = |path: &str, flags: i32| {
            let path = std::ffi::CString::new(path).expect("no NUL");
            // SAFETY: a valid descriptor and a NUL-terminated path.
            let ret = unsafe { libc::unlinkat(std::os::fd::AsRawFd::as_raw_fd(&d), path.as_ptr(), flags) };
            assert_eq!(ret, 0, "unlinkat {path:?}: {}", std::io::Error::last_os_error());
        };
        remove("sub/f", 0);
        remove("sub", libc::AT_REMOVEDIR);
    });
    f.signal_server(libc::SIGCONT);
    File::open(f.m("d")).expect("open d").sync_all().expect("fsync d");
    assert!(f.e("d").is_dir() && !f.e("d/sub").exists(), "the removals reached the server");
}

/// Every entry readdir(3) gives for `dir`, `.` and `..` included, with its d_ino.
fn entries_with_dots(dir: &std::path::Path) -> Vec<(String, u64)> {
    let path = common::cstr(dir);
    // SAFETY: a NUL-terminated path; the stream is read until its end and closed once.
    unsafe {
        let stream = libc::opendir(path.as_ptr());
        assert!(!stream.is_null(), "opendir {dir:?}: {}", std::io::Error::last_os_error());
        let mut entries = Vec::new();
        loop {
            let entry = libc::readdir(stream);
            if entry.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()).to_string_lossy().into_owned();
            entries.push((name, (*entry).d_ino));
        }
        libc::closedir(stream);
        entries
    }
}

#[test]
fn a_directory_made_here_is_listed_while_the_server_is_stopped() {
    // Goal: `find` or `ls` of a tree this client made and holds is answered from its cache:
    // every name, the inode numbers `stat` shows, `.` and `..` (the directory it was moved to);
    // and once another client adds a name, the listing is the server's again and shows it.
    // Method: list d/sub and d/inner with the server stopped (without the cache's listing
    // readdir waits for it), then create a name on a second mount and list again.
    let f = serving(&[]);
    fs::create_dir(f.m("d")).expect("mkdir d");
    fs::metadata(f.m("")).expect("stat the root"); // the root was not made here: its attributes are the server's
    fs::create_dir_all(f.m("d/sub/inner")).expect("mkdir -p");
    for i in 0..50 {
        fs::write(f.m(&format!("d/sub/f{i}")), format!("{i}")).expect("create");
    }
    fs::rename(f.m("d/sub/inner"), f.m("d/inner")).expect("move a directory");
    f.signal_server(libc::SIGSTOP);
    let (d, expected) = (f.m("d"), (0..50).map(|i| format!("f{i}")).collect::<Vec<_>>());
    within("listings with the server stopped", Duration::from_secs(10), move || {
        let mut names = Vec::new();
        for entry in fs::read_dir(d.join("sub")).expect("readdir sub") {
            let entry = entry.expect("entry");
            let name = entry.file_name().into_string().expect("utf-8");
            let stat = fs::symlink_metadata(entry.path()).expect("stat");
            assert_eq!(std::os::unix::fs::DirEntryExt::ino(&entry), stat.ino(), "{name}: d_ino is st_ino");
            assert!(entry.file_type().expect("d_type").is_file(), "{name} is a file");
            names.push(name);
        }
        names.sort_by_key(|n| n[1..].parse::<u32>().expect("f<n>"));
        assert_eq!(names, expected);
        let dots: Vec<_> = entries_with_dots(&d.join("inner"));
        let ino = |p: &std::path::Path| fs::metadata(p).expect("stat").ino();
        assert_eq!(dots, [(".".to_string(), ino(&d.join("inner"))), ("..".to_string(), ino(&d))], "`.` and `..` of d/inner");
    });
    f.signal_server(libc::SIGCONT);
    let b = f.another_mount("mnt-b");
    fs::write(b.m("d/sub/from-b"), b"b").expect("create on B");
    let listed = fs::read_dir(f.m("d/sub")).expect("readdir sub").map(|e| e.expect("entry").file_name()).collect::<Vec<_>>();
    assert_eq!(listed.len(), 51, "B's name too");
    assert!(listed.iter().any(|n| n == "from-b"), "B's name: {listed:?}");
}

#[test]
fn rewrites_queued_behind_a_stopped_server_land_in_order() {
    // Goal: a shipment of many MiB of writes, some of which rewrite bytes written earlier in it,
    // leaves the file as the writes' order gives, although transactions of writes to distinct
    // bytes are sent together and the server may apply those in any order.
    // Method: with the server stopped, write 12 MiB three times over (each pass its own pattern),
    // so that all three passes are queued for one shipment; then let the server go and compare.
    let f = serving(&[]);
    const MIB: usize = 1 << 20;
    let pass = |round: u8| -> Vec<u8> { (0..12 * MIB).map(|i| (i % 251) as u8 ^ round.wrapping_mul(85)).collect() };
    let mut file = File::create(f.m("f")).expect("create");
    file.write_all(b"x").expect("first write");
    f.signal_server(libc::SIGSTOP);
    let file = within("writes with the server stopped", Duration::from_secs(30), move || {
        for round in 0..3 {
            file.seek(SeekFrom::Start(0)).expect("seek");
            for chunk in pass(round).chunks(MIB) {
                file.write_all(chunk).expect("write");
            }
        }
        file
    });
    f.signal_server(libc::SIGCONT);
    file.sync_all().expect("fsync");
    assert!(fs::read(f.e("f")).expect("read the export") == pass(2), "the export holds the last pass, in every byte");
}

#[test]
fn a_write_refused_amid_writes_sent_together_is_reported_and_the_others_land() {
    // Goal: when the server refuses one write of transactions sent together (each on its own
    // channel), the fsync reports it, and every other write, before and after it in the queue,
    // still reaches the export.
    // Method: with the server stopped, queue 16 MiB of writes with 1 MiB at 16 TiB amid them
    // (past ext4's largest file: EFBIG on the server), so that they go out in transactions sent
    // together once the server runs again; then fsync and compare.
    let f = serving(&[]);
    const MIB: usize = 1 << 20;
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 253) as u8).collect();
    let mut file = File::create(f.m("f")).expect("create");
    file.write_all(b"x").expect("first write");
    f.signal_server(libc::SIGSTOP);
    let sent = data.clone();
    let mut file = within("writes with the server stopped", Duration::from_secs(30), move || {
        use std::os::unix::fs::FileExt;
        for (k, chunk) in sent.chunks(MIB).enumerate() {
            file.write_all_at(chunk, (k * MIB) as u64).expect("queued write");
            if k == 7 {
                file.write_all_at(&[9u8; MIB], 1 << 44).expect("queued write past the largest file");
            }
        }
        file
    });
    f.signal_server(libc::SIGCONT);
    let error = file.sync_all().expect_err("the write at 16 TiB was refused");
    assert_eq!(error.raw_os_error(), Some(libc::EFBIG), "{error}");
    file.flush().expect("flush");
    let on_server = fs::read(f.e("f")).expect("read the export");
    assert_eq!(on_server.len(), data.len(), "the export's file ends with the last write");
    assert!(on_server == data, "every write but the refused one landed");
}

#[test]
fn a_full_export_refusing_thousands_of_queued_writes_does_not_stall_the_fsync() {
    // Goal: when the export fills up under thousands of queued small writes, the fsync reports
    // ENOSPC promptly: each refused write does not cost a round trip and a resend of everything
    // queued after it (that took minutes for 64 MiB of small writes).
    // Method: 1 MiB export limit; with the server stopped, queue 4,000 writes of 4 KiB (16 MiB);
    // let the server go; the fsync must fail with ENOSPC within a bound far above its normal
    // time (a liveness check, not a speed measurement).
    let f = serving(&["--max-size", "1M"]);
    let mut file = File::create(f.m("f")).expect("create");
    file.write_all(b"x").expect("first write");
    f.signal_server(libc::SIGSTOP);
    let file = within("writes with the server stopped", Duration::from_secs(30), move || {
        use std::os::unix::fs::FileExt;
        for k in 0..4000u64 {
            file.write_all_at(&[7u8; 4096], k * 4096).expect("queued write");
        }
        file
    });
    f.signal_server(libc::SIGCONT);
    let error = within("fsync of 4,000 refused writes", Duration::from_secs(20), move || file.sync_all().expect_err("past the limit"));
    assert!(matches!(error.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)), "{error}");
    assert!(fs::metadata(f.e("f")).expect("stat in the export").len() <= 1 << 20, "the export stayed within its limit");
}

#[test]
fn a_read_after_the_kernel_dropped_its_pages_sees_this_clients_queued_writes() {
    // Goal: the kernel's pages of a file hold this client's writes, which wait up to 25 ms in
    // the write-back queue before they reach the server. When the kernel drops those pages
    // (memory pressure, fadvise, a lock taken after a recall), the next read goes to the
    // server and must still see them: the read sends the queue first (fails without that).
    let fx = serving_leased("30", &[]);
    fs::write(fx.m("f"), b"....").unwrap();
    let file = OpenOptions::new().read(true).write(true).open(fx.m("f")).unwrap();
    for round in 0..20u32 {
        let bytes = format!("{round:04}");
        file.write_all_at(bytes.as_bytes(), 0).unwrap();
        common::drop_page_cache(&file);
        let mut read = [0u8; 4];
        file.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(read, bytes.as_bytes(), "round {round}: the read missed this client's queued write");
    }
}
