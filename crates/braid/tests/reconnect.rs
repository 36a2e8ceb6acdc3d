//! End-to-end recovery from a server crash: the server is killed with SIGKILL while the mount
//! holds a file open, then restarted on the same export, state directory and port. The mount
//! must reconnect by itself; applications see no error and lose no acknowledged data.
mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use braid_proto::{ClientId, Command, CommandOk, Credentials, Errno, Reply, Request, Txn, TxnSeq};
use common::{drop_page_cache, in_mountinfo, Fixture, RawSession, Rng};

const KIB: usize = 1024;

#[test]
fn open_file_survives_server_kill_and_restart() {
    // Goal: after kill -9 and restart of the server, an open file keeps working, new files can
    // be created, and everything written before the kill is intact.
    // Method: write 512 KiB and fsync; write 64 KiB more without fsync (acknowledged: after a
    // process crash it is still in the server's page cache); kill -9 the server; restart it;
    // then, through the same descriptor, read both ranges (after dropping the client's page
    // cache, so that the reads go to the server) and write more; create a new file; fsync;
    // compare everything with the export. Two rounds, so the second restart recovers a log
    // that the first restart already replayed.
    let mut fx = Fixture::mounted();
    let mut rng = Rng::new(42);
    let file = OpenOptions::new().create_new(true).read(true).write(true).open(fx.m("held-open")).unwrap();
    let mut expected = Vec::new();

    for round in 0..2 {
        let synced = rng.bytes(512 * KIB);
        file.write_all_at(&synced, expected.len() as u64).unwrap();
        expected.extend_from_slice(&synced);
        file.sync_all().unwrap_or_else(|e| panic!("round {round}: fsync before the kill: {e}"));
        let acked = rng.bytes(64 * KIB);
        file.write_all_at(&acked, expected.len() as u64).unwrap();
        expected.extend_from_slice(&acked);

        fx.kill_server();
        fx.start_server();

        drop_page_cache(&file);
        let mut read = vec![0u8; expected.len()];
        file.read_exact_at(&mut read, 0).unwrap_or_else(|e| panic!("round {round}: read after restart: {e}\n{}", fx.logs_tail()));
        assert!(read == expected, "round {round}: data written before the kill differs after the restart");

        let after = format!("written after restart {round}").into_bytes();
        file.write_all_at(&after, expected.len() as u64).unwrap_or_else(|e| panic!("round {round}: write after restart: {e}"));
        expected.extend_from_slice(&after);
        let new_name = format!("created-after-restart-{round}");
        fs::write(fx.m(&new_name), b"new file").unwrap_or_else(|e| panic!("round {round}: create after restart: {e}"));
        file.sync_all().unwrap_or_else(|e| panic!("round {round}: fsync after restart: {e}"));
        assert_eq!(fs::read(fx.e(&new_name)).unwrap(), b"new file");
        assert!(fs::read(fx.e("held-open")).unwrap() == expected, "round {round}: the export's copy differs");
    }
    assert_eq!(file.metadata().unwrap().len(), expected.len() as u64);
    fx.assert_mount_works("after-restarts");
}

#[test]
fn request_issued_while_the_server_is_down_completes_after_restart() {
    // Goal: requests made while the server is dead wait, are sent on reconnect, and succeed.
    // Method: kill -9 the server; from another thread append to an open file, create a file
    // and make a directory (which would fail with EEXIST if applied twice); restart the
    // server; the thread must finish without error, and the export must hold every change.
    let mut fx = Fixture::mounted();
    fs::write(fx.m("log"), b"first\n").unwrap();
    let appender = OpenOptions::new().append(true).open(fx.m("log")).unwrap();
    fx.kill_server();

    let new_path = fx.m("made-while-down");
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut appender = appender;
        std::io::Write::write_all(&mut appender, b"second\n")?;
        fs::write(&new_path, b"made while the server was down")?;
        fs::create_dir(new_path.with_extension("dir"))?;
        std::io::Write::write_all(&mut appender, b"third\n")?;
        appender.sync_all()
    });
    fx.start_server();
    writer.join().unwrap().unwrap_or_else(|e| panic!("a request across the restart failed: {e}\n{}", fx.logs_tail()));

    assert_eq!(fs::read(fx.e("log")).unwrap(), b"first\nsecond\nthird\n", "each append applied once, in order");
    assert_eq!(fs::read(fx.e("made-while-down")).unwrap(), b"made while the server was down");
    assert!(fx.e("made-while-down.dir").is_dir());
    assert_eq!(fs::read(fx.m("log")).unwrap(), b"first\nsecond\nthird\n");
    fx.assert_mount_works("after-restart");
}

// Bug (design gap, server + client): the only thing keeping an unlinked open file alive is
// the server process's in-memory pin (a cached descriptor). kill -9 closes it, the kernel
// frees the inode, `restore_pins` then gets ESTALE ("cannot restore an open file after the
// server restarted"), and the application's next read fails with ESTALE: its data is lost.
// NFS avoids this with a client-side "silly rename" (unlink of an open file becomes a rename
// to a hidden name, removed on last close); braid has no equivalent.
#[test]
#[ignore = "bug: an unlinked open file is lost when the server restarts (no silly rename)"]
fn unlinked_open_file_across_restart() {
    // Goal: an open file that was unlinked stays readable and writable (POSIX), also after
    // the server restarts.
    // Method: open, write, unlink through the mount; kill -9 and restart the server; read and
    // write through the open descriptor.
    let mut fx = Fixture::mounted();
    let file = OpenOptions::new().create_new(true).read(true).write(true).open(fx.m("doomed")).unwrap();
    file.write_all_at(b"still here", 0).unwrap();
    fs::remove_file(fx.m("doomed")).unwrap();
    drop_page_cache(&file);
    let mut buf = [0u8; 10];
    file.read_exact_at(&mut buf, 0).expect("read of an unlinked open file");
    assert_eq!(&buf, b"still here");

    fx.kill_server();
    fx.start_server();
    drop_page_cache(&file);
    let mut buf = [0u8; 10];
    file.read_exact_at(&mut buf, 0).unwrap_or_else(|e| panic!("read of an unlinked open file after restart: {e}\n{}", fx.logs_tail()));
    assert_eq!(&buf, b"still here");
    file.write_all_at(b"more", 10).expect("write to an unlinked open file after restart");
}

#[test]
fn resent_transaction_after_restart_gets_its_original_reply() {
    // Goal: a transaction is applied at most once, even when the client resends it to a
    // restarted server (its reply was lost with the connection).
    // Method: a hand-made client sends txn 1 (exclusive create, mkdir, symlink: each would
    // fail with EEXIST if applied again); it resends the same txn as the same client id, to
    // the same server and then after kill -9 and restart; both times the answer must be the
    // original results, and txn 2 must then apply normally.
    let mut fx = Fixture::serving_with(|_| {});
    let client = ClientId(0x00c0_ffee_0000_0001);
    let mut session = RawSession::open_as(fx.addr(), client);
    let root = session.root();
    let commands = vec![
        Command::Create { parent: root.clone(), name: b"once".to_vec(), mode: libc::S_IFREG | 0o644, rdev: 0, exclusive: true, pin: false },
        Command::Mkdir { parent: root.clone(), name: b"once.d".to_vec(), mode: 0o755 },
        Command::Symlink { parent: root.clone(), name: b"once.link".to_vec(), target: b"once".to_vec() },
    ];
    let first = session.txn(commands.clone(), &[]).expect("txn 1");
    assert!(first.iter().all(|r| r.is_ok()), "txn 1 failed: {first:?}");
    assert_eq!(first.len(), 3);

    let mut same_server = RawSession::open_as(fx.addr(), client);
    assert_eq!(same_server.txn(commands.clone(), &[]), Ok(first.clone()), "resend to the same server");
    drop((session, same_server));

    fx.kill_server();
    fx.start_server();
    let mut restarted = RawSession::open_as(fx.addr(), client);
    assert_eq!(restarted.txn(commands, &[]), Ok(first), "resend after kill -9 and restart");
    let next = restarted.txn(vec![Command::Unlink { parent: root.clone(), name: b"once.link".to_vec() }], &[]);
    assert_eq!(next, Ok(vec![Ok(CommandOk::Done)]), "txn 2 after the resend");
    assert!(fx.e("once").is_file());
    assert!(fx.e("once.d").is_dir());
    assert!(!fx.e("once.link").exists());
}

#[test]
fn a_server_restarted_after_kill_names_its_predecessor_and_keeps_all_it_applied() {
    // Goal: after a crash of the server process alone (same boot), the new process tells
    // clients that everything its predecessor applied survived, durable or not (the page cache
    // kept it), so that no client takes a change as lost; the new process's own lsns go on
    // from there. Method: apply a txn with a raw session and kill -9 the server at once; the
    // restarted server's welcome must name the old instance with a durable lsn covering it.
    let mut fx = Fixture::serving_with(|_| {});
    let mut session = RawSession::open(fx.addr());
    let (root, before) = (session.root(), session.info.server_instance);
    let create =
        Command::Create { parent: root, name: b"applied".to_vec(), mode: libc::S_IFREG | 0o644, rdev: 0, exclusive: true, pin: false };
    let txn = Txn { seq: TxnSeq(1), replied_below: TxnSeq(1), creds: Credentials::default(), commands: vec![create] };
    let applied = match session.call(&Request::Txn(txn), &[]) {
        Ok((Reply::Txn(outcome), _)) => outcome.lsn,
        other => panic!("txn: {other:?}"),
    };
    fx.kill_server();
    fx.start_server();
    let restarted = RawSession::open(fx.addr());
    assert_ne!(restarted.info.server_instance, before, "a new process");
    let predecessor = restarted.predecessors.last().copied().expect("the restarted server names its predecessor");
    assert_eq!(predecessor.instance, before);
    assert!(predecessor.durable >= applied, "{predecessor:?}: lsn {applied:?} was applied before the kill and survived it");
    assert!(fx.e("applied").is_file());
}

#[test]
fn a_server_that_drops_every_request_gives_etimedout_not_a_hang() {
    // Goal: a mount never hangs for ever: when the server accepts connections but never answers
    // (here it closes each one at the first request), a call fails with ETIMEDOUT once the
    // retry budget (`--timeout`) is spent. Method: a fake server completes the handshake and
    // drops every request; stat on the mount must fail with ETIMEDOUT within the deadline.
    use braid_proto::{encode_frame, FrameKind, Welcome};
    use std::io::Write;
    let real = Fixture::serving_with(|_| {});
    let info = RawSession::open(real.addr()).info;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let info = info.clone();
            std::thread::spawn(move || {
                if common::read_frame(&mut stream).is_err() {
                    return;
                }
                let welcome = encode_frame(FrameKind::Welcome, 0, &Welcome::Accepted(Box::new(info)), &[]).expect("encode");
                let _ = stream.write_all(&welcome);
                let _ = common::read_frame(&mut stream); // the first request: dropped with the connection
            });
        }
    });
    let mnt = tempfile::tempdir().expect("mount point");
    let client = std::process::Command::new(common::braid_exe())
        .args(["mount", &addr.to_string(), mnt.path().to_str().expect("utf-8"), "--foreground", "--insecure", "--timeout", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn braid mount");
    let _mount = FakeMount { client, mnt: mnt.path().to_path_buf() };
    // Not a stat of the mount point: that would itself wait for the silent server.
    common::wait_until("fake mount", common::START_DEADLINE, || in_mountinfo(mnt.path()));
    let started = std::time::Instant::now();
    let error = fs::metadata(mnt.path().join("anything")).expect_err("no server answers");
    let waited = started.elapsed();
    assert_eq!(error.raw_os_error(), Some(libc::ETIMEDOUT), "{error}");
    assert!(waited < std::time::Duration::from_secs(30), "failed only after {waited:?}");
}

/// A mount of the fake server, unmounted and its client killed even if the test fails.
struct FakeMount {
    client: std::process::Child,
    mnt: std::path::PathBuf,
}

impl Drop for FakeMount {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[test]
fn a_durable_txn_is_answered_once_durable_and_applied_at_most_once() {
    // Goal: the one-round-trip fsync (`DurableTxn`) is answered only when the server's durable
    // position covers it, and a resend of it is answered from the reply cache, not applied
    // again. Method: send it twice over a raw session; a second create would fail with EEXIST.
    let fx = Fixture::serving_with(|_| {});
    let mut raw = RawSession::open(fx.addr());
    let create =
        Command::Create { parent: raw.root(), name: b"f".to_vec(), mode: libc::S_IFREG | 0o644, rdev: 0, exclusive: true, pin: false };
    let root = Credentials { uid: 0, gid: 0, groups: Vec::new() };
    let txn = Txn { seq: TxnSeq(1), replied_below: TxnSeq(1), creds: root, commands: vec![create] };
    let (first, _) = raw.call_response(&Request::DurableTxn(txn.clone()), &[]);
    let Ok(Reply::Txn(outcome)) = &first.result else { panic!("durable txn answered {:?}", first.result) };
    assert!(outcome.results[0].is_ok(), "created: {:?}", outcome.results);
    assert!(first.durable >= outcome.lsn, "answered at durable {:?} before its lsn {:?} was durable", first.durable, outcome.lsn);
    let (again, _) = raw.call_response(&Request::DurableTxn(txn), &[]);
    assert_eq!(again.result, first.result, "a resend gets the logged reply");
    assert!(fx.e("f").exists());
}

#[test]
fn a_staged_txn_is_answered_applied_then_durable_and_applied_at_most_once() {
    // Goal: `StagedTxn` (the fsync whose sender need not wait for the disk before sending its
    // next transaction) is answered twice: applied, with the txn's results, then `Committed`
    // at a durable position covering it; also when a command is refused, and also when resent
    // (the reply cache answers, nothing is applied twice).
    let fx = Fixture::serving_with(|_| {});
    let mut raw = RawSession::open(fx.addr());
    let root = Credentials { uid: 0, gid: 0, groups: Vec::new() };
    let create =
        Command::Create { parent: raw.root(), name: b"f".to_vec(), mode: libc::S_IFREG | 0o644, rdev: 0, exclusive: true, pin: false };
    let txn = Txn { seq: TxnSeq(1), replied_below: TxnSeq(1), creds: root.clone(), commands: vec![create.clone()] };
    for attempt in ["first", "resend"] {
        let (applied, _) = raw.call_response(&Request::StagedTxn(txn.clone()), &[]);
        let Ok(Reply::Txn(outcome)) = &applied.result else { panic!("{attempt}: staged txn answered {:?}", applied.result) };
        assert!(outcome.results[0].is_ok(), "{attempt}: created: {:?}", outcome.results);
        let durable = raw.next_response();
        let Ok(Reply::Committed(lsn)) = durable.result else { panic!("{attempt}: second answer {:?}", durable.result) };
        assert!(lsn >= outcome.lsn && durable.durable >= outcome.lsn, "{attempt}: durable at {lsn:?}, txn at {:?}", outcome.lsn);
    }
    // The same create again as a new txn: refused (EEXIST), still answered twice.
    let again = Txn { seq: TxnSeq(2), replied_below: TxnSeq(2), creds: root, commands: vec![create] };
    let (applied, _) = raw.call_response(&Request::StagedTxn(again), &[]);
    let Ok(Reply::Txn(outcome)) = &applied.result else { panic!("staged txn answered {:?}", applied.result) };
    assert_eq!(outcome.results[0], Err(braid_proto::Errno(libc::EEXIST)), "{:?}", outcome.results);
    assert!(matches!(raw.next_response().result, Ok(Reply::Committed(_))));
    assert!(fx.e("f").exists());
}

/// A write of `bytes` at offset 0 of `handle`, as one transaction numbered `seq`.
fn write_txn(handle: &braid_proto::Handle, seq: u64, bytes: &[u8]) -> Txn {
    let write = Command::Write { handle: handle.clone(), offset: 0, len: bytes.len() as u32 };
    Txn { seq: TxnSeq(seq), replied_below: TxnSeq(seq), creds: Credentials::default(), commands: vec![write] }
}

/// The result of the one command of a transaction's reply.
fn only_result(answer: Result<Reply, braid_proto::WireError>) -> Result<CommandOk, Errno> {
    match answer {
        Ok(Reply::Txn(mut outcome)) if outcome.results.len() == 1 => outcome.results.pop().expect("one result"),
        other => panic!("a transaction of one command answered {other:?}"),
    }
}

#[test]
fn after_a_restart_changes_made_under_old_rights_land_before_changes_made_since() {
    // Goal: a client's changes queued in its cache under an exclusive right of a server process
    // that then crashed were made before anything another client does after the restart. The
    // restarted server applies no change during its grace period (one lease) except such
    // write-backs, and the other client's change waits until they are applied. Before, both
    // waited for the end of the grace period and went on in any order: the old write could land
    // over the new one. Written back after the grace period, the old changes are fenced as
    // any others: refused where another client changed the object since.
    let args = ["--insecure", "--no-root-squash", "--lease", "2"].map(String::from).to_vec();
    let mut fx = Fixture::serving_with_args(
        |export| {
            fs::write(export.join("f"), b"........").unwrap();
            fs::write(export.join("g"), b"........").unwrap();
        },
        args,
        common::plain_mount_args(),
    );
    // The holder subscribes, as a mount does: the restarted server waits for it (it never
    // says it reclaimed, so the grace period lasts its whole lease).
    let holder_client = ClientId(0x00c0_ffee_0000_0001);
    let mut before = RawSession::open_as(fx.addr(), holder_client);
    assert!(matches!(before.call(&Request::Subscribe, &[]), Ok((Reply::Done, _))));
    let (old_instance, root) = (before.info.server_instance, before.root());
    let f = before.lookup(&root, b"f").expect("lookup f").handle;
    let g = before.lookup(&root, b"g").expect("lookup g").handle;
    drop(before);
    fx.kill_server();
    fx.start_server();

    // The other client has a callback channel, as a mount does: the server keeps a record of
    // the rights its changes bring it (the fence after the grace period needs one).
    let other_client = ClientId(0x00c0_ffee_0000_0002);
    let mut callbacks = RawSession::open_as(fx.addr(), other_client);
    assert!(matches!(callbacks.call(&Request::Subscribe, &[]), Ok((Reply::Done, _))));
    let mut other = RawSession::open_as(fx.addr(), other_client);
    other.send(&Request::Txn(write_txn(&f, 1, b"BBBB")), b"BBBB");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut holder = RawSession::open_as(fx.addr(), holder_client);
    let written_back =
        |seq, handle, bytes| Request::WriteBack { txn: write_txn(handle, seq, bytes), queued: 1, instance: old_instance, staged: false };
    let answer = holder.call_response(&written_back(1, &f, b"AAAAAAAA"), b"AAAAAAAA").0.result;
    assert_eq!(only_result(answer), Ok(CommandOk::Written(8)), "the write-back of the old process's right");
    other.stream.set_nonblocking(true).unwrap();
    let pending = other.stream.peek(&mut [0; 1]).map_err(|e| e.kind());
    assert_eq!(pending, Err(std::io::ErrorKind::WouldBlock), "the change made after the restart did not wait for the write-back");
    other.stream.set_nonblocking(false).unwrap();
    assert_eq!(only_result(other.next_response().result), Ok(CommandOk::Written(4)));
    assert_eq!(fs::read(fx.e("f")).unwrap(), b"BBBBAAAA", "the old change landed over the new one");

    // After the grace period: refused on f (changed since), applied on g (nobody came). The
    // other client is asked to give f up and does not answer: the late write-back waits for its
    // lease to run out.
    let mut late = RawSession::open_as(fx.addr(), holder_client);
    let refused = late.call_response(&written_back(2, &f, b"ZZ"), b"ZZ").0.result;
    assert_eq!(only_result(refused), Err(Errno(libc::EIO)), "a late old change overwrote another client's");
    let applied = late.call_response(&written_back(3, &g, b"ZZ"), b"ZZ").0.result;
    assert_eq!(only_result(applied), Ok(CommandOk::Written(2)), "a late old change on an object nobody used since");
    assert_eq!(fs::read(fx.e("f")).unwrap(), b"BBBBAAAA");
    assert_eq!(fs::read(fx.e("g")).unwrap(), b"ZZ......");
}
