//! End-to-end robustness against hostile peers: junk on the server's port, frames with lying
//! headers, well-formed requests with absurd values, and many idle connections. After each,
//! the server must still run and a mount that is in use must keep working.
mod common;

use std::fs;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use braid_proto::limits::{DATA_BYTES_MAX, MESSAGE_BYTES_MAX, TXN_DATA_BYTES_MAX};
use braid_proto::{
    encode_frame, AttrChanges, ClientId, Command, CommandOk, Errno, FrameHeader, FrameKind, Handle, Hello, LockKind, LockRequest, Lsn,
    Reply, Request, TimeSet, Timestamp, Welcome, Whence, WireError, HEADER_BYTES,
};
use common::{assert_closed_by_peer, wait_until, Fixture, RawSession, Rng};

/// How long the server may take to drop a connection that sent junk.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

#[test]
fn junk_and_lying_frames_close_only_their_own_connection() {
    // Goal: bytes that are not a valid frame close that one connection, and never the server
    // or another client's session.
    // Method: keep a mount busy with writes and reads from a background thread; meanwhile open
    // raw connections that send random bytes, an HTTP request, headers whose lengths exceed
    // the limits (with valid checksums), a bad payload checksum, an undecodable message, a
    // frame of the wrong kind, and truncated frames; each connection must be closed by the
    // server, and after each the mount must still work and the server still run.
    let mut fx = Fixture::mounted();
    let worker = Worker::start(fx.m("busy"));
    worker.wait_for_progress();

    let mut rng = Rng::new(0x5eed);
    for round in 0..8 {
        let len = [1usize, 31, 32, 33, 100, 4096, 65536, 300_000][round];
        let mut junk = rng.bytes(len);
        if round % 2 == 1 && len >= 4 {
            // Past the magic check, into the header checksum check.
            junk[..4].copy_from_slice(b"BRD1");
        }
        send_junk(&fx, &format!("random bytes #{round} ({len} bytes)"), &junk);
        fx.assert_mount_works(&format!("random-{round}"));
    }

    let http = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n";
    send_junk(&fx, "HTTP GET", http);
    fx.assert_mount_works("http");

    let lying = [
        ("message_len u32::MAX", FrameHeader { kind: FrameKind::Hello, request_id: 0, message_len: u32::MAX, data_len: 0, payload_crc: 0 }),
        (
            "message_len just over the limit",
            FrameHeader { kind: FrameKind::Hello, request_id: 0, message_len: MESSAGE_BYTES_MAX as u32 + 1, data_len: 0, payload_crc: 0 },
        ),
        ("data_len u32::MAX", FrameHeader { kind: FrameKind::Request, request_id: 1, message_len: 10, data_len: u32::MAX, payload_crc: 0 }),
        (
            "data_len just over the limit",
            FrameHeader {
                kind: FrameKind::Request,
                request_id: 1,
                message_len: 10,
                data_len: TXN_DATA_BYTES_MAX as u32 + 1,
                payload_crc: 0,
            },
        ),
    ];
    for (what, header) in &lying {
        let bytes = header.encode();
        assert!(FrameHeader::decode(&bytes).is_err(), "{what}: the decoder must refuse this header");
        send_junk(&fx, &format!("{what}, before the handshake"), &bytes);
        fx.assert_mount_works("lying-before-handshake");
        let mut session = RawSession::open(fx.addr());
        session.stream.write_all(&bytes).expect("send lying header");
        assert_closed_by_peer(&mut session.stream, &format!("{what}, after the handshake"), CLOSE_DEADLINE);
        fx.assert_mount_works("lying-after-handshake");
    }

    // A request whose payload does not match the checksum in its header.
    let mut frame = request_frame(7, &Request::StatFs);
    let last = frame.len() - 1;
    frame[last] ^= 0xff;
    send_after_handshake(&fx, "bad payload checksum", &frame);
    // A message with valid checksums that is not a Request.
    let garbage_message = vec![0xffu8; 40];
    let frame = frame_with_message(FrameKind::Request, 8, &garbage_message);
    send_after_handshake(&fx, "undecodable message", &frame);
    // A frame of a kind a client never sends.
    let frame = encode_frame(FrameKind::Welcome, 9, &Request::StatFs, &[]).unwrap();
    send_after_handshake(&fx, "welcome frame from a client", &frame);
    send_junk(&fx, "request before hello", &request_frame(1, &Request::StatFs));
    // A hello in no protocol version this server speaks: refused, then closed.
    let mut stream = TcpStream::connect(fx.addr()).unwrap();
    let alien = Hello { versions: vec![0, 999, u16::MAX], ..hello() };
    stream.write_all(&encode_frame(FrameKind::Hello, 0, &alien, &[]).unwrap()).unwrap();
    stream.set_read_timeout(Some(CLOSE_DEADLINE)).unwrap();
    let mut head = [0u8; HEADER_BYTES];
    std::io::Read::read_exact(&mut stream, &mut head).expect("an answer to a hello of unknown versions");
    let header = FrameHeader::decode(&head).expect("the answer's header decodes");
    let mut payload = vec![0u8; header.payload_bytes()];
    std::io::Read::read_exact(&mut stream, &mut payload).unwrap();
    let welcome: Welcome = braid_proto::Frame::from_payload(header, payload, braid_proto::Checksum::Crc32c).unwrap().decode().unwrap();
    assert!(matches!(welcome, Welcome::Refused { .. }), "{welcome:?}");
    assert_closed_by_peer(&mut stream, "hello of unknown versions", CLOSE_DEADLINE);
    let second_hello = encode_frame(FrameKind::Hello, 0, &hello(), &[]).unwrap();
    send_after_handshake(&fx, "second hello", &second_hello);
    fx.assert_mount_works("bad-frames");

    // Truncated frames: the peer closes its side in the middle of a frame.
    let hello_frame = encode_frame(FrameKind::Hello, 0, &hello(), &[]).unwrap();
    for cut in [1, HEADER_BYTES - 1, HEADER_BYTES, hello_frame.len() - 1] {
        let mut stream = TcpStream::connect(fx.addr()).unwrap();
        stream.write_all(&hello_frame[..cut]).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        assert_closed_by_peer(&mut stream, &format!("hello cut at {cut}"), CLOSE_DEADLINE);
        fx.assert_mount_works("truncated-hello");
    }
    let write_frame = request_frame(3, &Request::Read { handle: Handle(vec![1; 40]), offset: 0, len: 10 });
    for cut in [5, HEADER_BYTES, write_frame.len() - 1] {
        let mut session = RawSession::open(fx.addr());
        session.stream.write_all(&write_frame[..cut]).unwrap();
        session.stream.shutdown(Shutdown::Write).unwrap();
        assert_closed_by_peer(&mut session.stream, &format!("request cut at {cut}"), CLOSE_DEADLINE);
        fx.assert_mount_works("truncated-request");
    }
    // A header that promises the largest allowed frame, then silence, then close.
    let mut session = RawSession::open(fx.addr());
    let promise = FrameHeader {
        kind: FrameKind::Request,
        request_id: 4,
        message_len: MESSAGE_BYTES_MAX as u32,
        data_len: TXN_DATA_BYTES_MAX as u32,
        payload_crc: 0,
    };
    session.stream.write_all(&promise.encode()).unwrap();
    session.stream.write_all(&[0u8; 1000]).unwrap();
    fx.assert_mount_works("promised-frame-pending");
    session.stream.shutdown(Shutdown::Write).unwrap();
    assert_closed_by_peer(&mut session.stream, "largest frame cut short", CLOSE_DEADLINE);

    worker.wait_for_progress();
    worker.stop_and_check();
    fx.assert_mount_works("end");
}

#[test]
fn absurd_but_well_formed_requests_get_errors_not_crashes() {
    // Goal: requests that decode fine but carry absurd values (offsets near u64::MAX, sizes
    // over every limit, invalid modes and flags, a txn of no or too many commands) are
    // answered with an error, and the server keeps serving a mount in use.
    // Method: send each on a raw session; require a response (any error, or a harmless
    // success) and a live session afterwards; then check the mount still reads and writes.
    let mut fx = Fixture::mounted_with(|export| fs::write(export.join("target"), b"0123456789").unwrap());
    let worker = Worker::start(fx.m("busy"));
    worker.wait_for_progress();
    let mut session = RawSession::open(fx.addr());
    let root = session.root();
    let target = session.lookup(&root, b"target").unwrap().handle;

    // Each of these must be answered with an error: none names a valid range or object.
    let reads = [
        Request::Read { handle: target.clone(), offset: u64::MAX, len: 100 },
        Request::Read { handle: target.clone(), offset: u64::MAX - 3, len: u32::MAX },
        Request::Read { handle: target.clone(), offset: 1 << 63, len: 1 << 20 },
        Request::Lseek { handle: target.clone(), offset: u64::MAX, whence: Whence::Data },
        Request::Lseek { handle: target.clone(), offset: 1 << 63, whence: Whence::Hole },
        Request::ReadDir { handle: root.clone(), cookie: u64::MAX, plus: true },
        Request::ReadDir { handle: target.clone(), cookie: 0, plus: false },
        Request::GetXattr { handle: target.clone(), name: vec![b'u'; 70_000] },
        Request::GetXattr { handle: target.clone(), name: Vec::new() },
        Request::ReadLink { handle: target.clone() },
        Request::Lookup { parent: root.clone(), name: vec![b'x'; 100_000] },
    ];
    for request in &reads {
        let result = session.call(request, &[]);
        assert!(result.is_err(), "{request:?} answered {result:?}");
    }
    // Releasing what was never opened is harmless.
    for _ in 0..2 {
        assert!(session.call(&Request::Release { handle: target.clone() }, &[]).is_ok());
    }

    let commands = vec![
        Command::Write { handle: target.clone(), offset: u64::MAX - 1, len: 4 },
        Command::Write { handle: target.clone(), offset: 1 << 63, len: 4 },
        Command::SetAttr { handle: target.clone(), changes: AttrChanges { size: Some(u64::MAX), ..Default::default() } },
        Command::SetAttr {
            handle: target.clone(),
            changes: AttrChanges { mtime: Some(TimeSet::At(Timestamp { secs: i64::MAX, nanos: u32::MAX })), ..Default::default() },
        },
        Command::Fallocate { handle: target.clone(), offset: u64::MAX, len: u64::MAX, mode: -1 },
        Command::CopyFileRange {
            source: target.clone(),
            source_offset: u64::MAX,
            target: target.clone(),
            target_offset: u64::MAX - 10,
            len: u64::MAX,
        },
        Command::CopyFileRange { source: target.clone(), source_offset: 0, target: target.clone(), target_offset: 1 << 62, len: u64::MAX },
        Command::Create {
            parent: root.clone(),
            name: b"dir-by-create".to_vec(),
            mode: libc::S_IFDIR | 0o755,
            rdev: 0,
            exclusive: true,
            pin: false,
        },
        Command::Create { parent: root.clone(), name: b"odd-type".to_vec(), mode: 0o170777, rdev: u64::MAX, exclusive: true, pin: true },
        Command::Rename {
            parent: root.clone(),
            name: b"target".to_vec(),
            new_parent: root.clone(),
            new_name: b"t2".to_vec(),
            flags: u32::MAX,
        },
        Command::SetXattr { handle: target.clone(), name: b"user.big".to_vec(), value: vec![0; 200_000], flags: 0 },
        Command::SetXattr { handle: target.clone(), name: b"user.x".to_vec(), value: Vec::new(), flags: -1 },
        Command::Mkdir { parent: target.clone(), name: b"in-a-file".to_vec(), mode: u32::MAX },
    ];
    for command in commands {
        let data = match &command {
            Command::Write { len, .. } => vec![0xee; *len as usize],
            _ => Vec::new(),
        };
        let shown = format!("{command:?}");
        let result = session.apply(command, &data);
        assert!(matches!(result, Err(WireError::Errno(_))), "{shown} answered {result:?}");
    }
    // Mode bits beyond the permission bits are ignored, not applied.
    let changes = AttrChanges { mode: Some(u32::MAX), ..Default::default() };
    let result = session.apply(Command::SetAttr { handle: target.clone(), changes }, &[]);
    assert!(matches!(result, Ok(CommandOk::Attr(attr)) if attr.mode == libc::S_IFREG | 0o7777), "{result:?}");

    // Transactions whose shape is wrong are refused as malformed.
    assert!(matches!(session.txn(Vec::new(), &[]), Err(WireError::Malformed(_))), "empty txn");
    let many = vec![Command::Unlink { parent: root.clone(), name: b"none".to_vec() }; 2000];
    assert!(session.txn(many, &[]).is_err(), "txn of 2000 commands");
    let short = Command::Write { handle: target.clone(), offset: 0, len: u32::MAX };
    assert!(matches!(session.txn(vec![short], b"abc"), Err(WireError::Malformed(_))), "write longer than its data");
    let no_owner = Command::Unlink { parent: root.clone(), name: b"none".to_vec() };
    assert!(matches!(session.txn(vec![no_owner], b"stray bytes"), Err(WireError::Malformed(_))), "data of no write");

    // An lsn never applied is not waited for (it might never come); too many objects at once
    // are refused.
    let started = std::time::Instant::now();
    assert!(matches!(session.call(&Request::CommitUpTo(Lsn(u64::MAX)), &[]), Ok((Reply::Committed(_), _))));
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "CommitUpTo(u64::MAX) waited for the never-applied");
    let names = session.call(&Request::XattrNames { handles: vec![target.clone(), root.clone(), Handle(vec![7; 20])] }, &[]);
    assert!(matches!(&names, Ok((Reply::XattrNames(lists), _)) if lists.len() == 3 && lists[2].is_none()), "{names:?}");
    let too_many = Request::XattrNames { handles: vec![target.clone(); 5000] };
    assert!(matches!(session.call(&too_many, &[]), Err(WireError::Malformed(_))), "XattrNames of 5000 objects");

    assert!(session.getattr(&root).is_ok(), "the raw session still works");
    assert_eq!(&fs::read(fx.e("target")).unwrap()[..10], b"0123456789", "no absurd write landed at a wrapped offset");
    worker.wait_for_progress();
    worker.stop_and_check();
    fx.assert_mount_works("after-absurd-requests");
}

#[test]
fn a_transaction_as_large_as_a_frame_allows_is_applied_whole() {
    // Goal: the server takes a transaction carrying TXN_DATA_BYTES_MAX of data (protocol version
    // 6: what a client's write-back ships in one round trip) and applies every write of it.
    let fx = Fixture::serving_with(|export| fs::write(export.join("big"), b"").unwrap());
    let mut session = RawSession::open(fx.addr());
    let root = session.root();
    let big = session.lookup(&root, b"big").unwrap().handle;
    let data: Vec<u8> = (0..TXN_DATA_BYTES_MAX).map(|i| (i % 251) as u8).collect();
    let commands = (0..TXN_DATA_BYTES_MAX / DATA_BYTES_MAX)
        .map(|k| Command::Write { handle: big.clone(), offset: (k * DATA_BYTES_MAX) as u64, len: DATA_BYTES_MAX as u32 })
        .collect();
    let results = session.txn(commands, &data).expect("the largest transaction is taken");
    assert_eq!(results.len(), TXN_DATA_BYTES_MAX / DATA_BYTES_MAX);
    assert!(results.iter().all(|r| matches!(r, Ok(CommandOk::Written(n)) if *n == DATA_BYTES_MAX as u64)), "{results:?}");
    assert!(fs::read(fx.e("big")).unwrap() == data, "the export holds every write of the transaction");
}

#[test]
fn many_idle_connections_do_not_starve_the_mount() {
    // Goal: connections that never speak, or speak once and then idle, do not block service
    // to a mount in use.
    // Method: keep a mount busy; open 3000 connections that send nothing and 50 that complete
    // the handshake and then idle; hold them all while the mount is used; then close them.
    raise_descriptor_limit(8192);
    let mut fx = Fixture::mounted();
    let worker = Worker::start(fx.m("busy"));
    worker.wait_for_progress();

    let silent: Vec<TcpStream> =
        (0..3000).map(|i| TcpStream::connect(fx.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect();
    fx.assert_mount_works("3000-silent");
    let sessions: Vec<RawSession> = (0..50).map(|_| RawSession::open(fx.addr())).collect();
    fx.assert_mount_works("50-idle-sessions");
    worker.wait_for_progress();
    let mut fresh = RawSession::open(fx.addr());
    let root = fresh.root();
    assert!(fresh.getattr(&root).is_ok(), "a new session is served while 3050 others idle");

    drop(silent);
    drop(sessions);
    fx.assert_mount_works("after-close");
    worker.wait_for_progress();
    worker.stop_and_check();
}

#[test]
fn a_million_small_frames_are_all_answered() {
    // Goal: a flood of small pipelined requests on one connection is served in full, with
    // backpressure instead of unbounded memory, while a mount keeps working.
    // Method: one thread writes 1,000,000 GetAttr frames without waiting; this thread reads
    // the responses and checks each request id is answered once.
    const FRAMES: u64 = 1_000_000;
    let mut fx = Fixture::mounted();
    let mut session = RawSession::open(fx.addr());
    let root = session.root();
    let mut writer = session.stream.try_clone().expect("clone stream");
    let sender = std::thread::spawn(move || {
        let frame = |id| encode_frame(FrameKind::Request, id, &Request::GetAttr { handle: root.clone() }, &[]).expect("encode");
        let mut batch = Vec::new();
        for id in 1..=FRAMES {
            batch.extend(frame(id));
            if batch.len() > 256 * 1024 || id == FRAMES {
                writer.write_all(&batch).expect("send frames");
                batch.clear();
            }
        }
    });
    let mut answered = vec![false; FRAMES as usize + 1];
    for n in 0..FRAMES {
        let frame = common::read_frame(&mut session.stream).unwrap_or_else(|e| panic!("response {n}: {e}"));
        let id = frame.header.request_id as usize;
        assert!(!std::mem::replace(&mut answered[id], true), "request {id} answered twice");
        if n == FRAMES / 2 {
            fx.assert_mount_works("mid-flood");
        }
    }
    sender.join().expect("sender");
    assert!(answered[1..].iter().all(|a| *a), "every request answered");
    fx.assert_mount_works("after-flood");
}

// ---- helpers ----------------------------------------------------------------------------

/// Sends `bytes` on a new connection and waits for the server to close it. Fewer bytes than a
/// header are not junk yet (the server waits for the rest, up to its handshake timeout), so
/// then this side closes its half first, which the server must notice.
fn send_junk(fx: &Fixture, what: &str, bytes: &[u8]) {
    let mut stream = TcpStream::connect(fx.addr()).unwrap();
    // The server may close before taking every byte: a failed write is an acceptable outcome.
    let _ = stream.write_all(bytes);
    if bytes.len() < HEADER_BYTES {
        stream.shutdown(Shutdown::Write).unwrap();
    }
    assert_closed_by_peer(&mut stream, what, CLOSE_DEADLINE);
}

fn send_after_handshake(fx: &Fixture, what: &str, bytes: &[u8]) {
    let mut session = RawSession::open(fx.addr());
    let _ = session.stream.write_all(bytes);
    assert_closed_by_peer(&mut session.stream, what, CLOSE_DEADLINE);
}

fn hello() -> Hello {
    Hello::new(ClientId(99), "hostile".into())
}

fn request_frame(id: u64, request: &Request) -> Vec<u8> {
    encode_frame(FrameKind::Request, id, request, &[]).unwrap()
}

/// A frame with correct header and payload checksums around arbitrary message bytes.
fn frame_with_message(kind: FrameKind, id: u64, message: &[u8]) -> Vec<u8> {
    let header = FrameHeader { kind, request_id: id, message_len: message.len() as u32, data_len: 0, payload_crc: crc32c(message) };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(message);
    out
}

/// CRC-32C (Castagnoli), bitwise: the payload checksum of the frame format.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// A thread that writes and reads back a file on the mount in a loop, recording the first
/// failure, so that every attack happens while the mount is in use.
struct Worker {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(path: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (stop2, rounds2, failure2) = (stop.clone(), rounds.clone(), failure.clone());
        let thread = std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let content = format!("round {round} {}", "y".repeat((round % 5000) as usize)).into_bytes();
                let result = fs::write(&path, &content).and_then(|()| fs::read(&path));
                match result {
                    Ok(read) if read == content => {}
                    Ok(read) => {
                        *failure2.lock().unwrap() = Some(format!("round {round}: read {} bytes, wrote {}", read.len(), content.len()));
                        return;
                    }
                    Err(e) => {
                        *failure2.lock().unwrap() = Some(format!("round {round}: {e}"));
                        return;
                    }
                }
                round += 1;
                rounds2.store(round, Ordering::Relaxed);
            }
        });
        Self { stop, rounds, failure, thread: Some(thread) }
    }

    /// Waits until the worker completes at least one more round (or has failed).
    fn wait_for_progress(&self) {
        let start = self.rounds.load(Ordering::Relaxed);
        wait_until("the mount worker to make progress", Duration::from_secs(30), || {
            self.rounds.load(Ordering::Relaxed) > start || self.failure.lock().unwrap().is_some()
        });
        if let Some(failure) = self.failure.lock().unwrap().as_ref() {
            panic!("the mount failed while in use: {failure}");
        }
    }

    fn stop_and_check(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        if let Some(failure) = self.failure.lock().unwrap().as_ref() {
            panic!("the mount failed while in use: {failure}");
        }
        assert!(self.rounds.load(Ordering::Relaxed) > 0);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn pipelined_requests_are_answered_out_of_order_by_request_id() {
    // Goal: a connection may carry many requests at once and each response names its request.
    // Method: on one raw session, make some data dirty, then send a Commit (waits for a disk
    // flush) followed at once by GetAttr requests; the quick answers must not wait for the slow
    // one, and every request id must be answered exactly once.
    use braid_proto::{Command, Reply, Response};
    let fixture = Fixture::serving_with(|_| {});
    let mut session = common::RawSession::open(fixture.addr());
    let root = session.root();
    let file = match session
        .apply(Command::Create { parent: root.clone(), name: b"dirty".to_vec(), mode: 0o100644, rdev: 0, exclusive: true, pin: false }, &[])
    {
        Ok(braid_proto::CommandOk::Entry(entry)) => entry.handle,
        other => panic!("create failed: {other:?}"),
    };
    let chunk = vec![7u8; 1 << 20];
    for i in 0..8u64 {
        session.apply(Command::Write { handle: file.clone(), offset: i << 20, len: chunk.len() as u32 }, &chunk).expect("write");
    }
    let mut burst = encode_frame(FrameKind::Request, 1000, &Request::Commit, &[]).expect("encode");
    for id in 1001..1004 {
        burst.extend(encode_frame(FrameKind::Request, id, &Request::GetAttr { handle: root.clone() }, &[]).expect("encode"));
    }
    session.stream.write_all(&burst).expect("send burst");
    let mut order = Vec::new();
    for _ in 0..4 {
        let frame = common::read_frame(&mut session.stream).expect("response");
        let response: Response = frame.decode().expect("decodes");
        match (frame.header.request_id, response.result) {
            (1000, Ok(Reply::Committed(_))) | (1001..=1003, Ok(Reply::Attr(_))) => order.push(frame.header.request_id),
            (id, other) => panic!("request {id}: unexpected {other:?}"),
        }
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![1000, 1001, 1002, 1003], "each request answered once");
    assert_ne!(order[0], 1000, "the quick requests waited behind the commit: {order:?}");
}

/// Raises this test process's descriptor limit so that it can hold many connections.
fn raise_descriptor_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid out-parameter.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = wanted.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

#[test]
fn a_client_cannot_fill_the_server_with_lock_ranges() {
    // Goal: disjoint byte-range locks (each a range of its own) stop at the per-object limit
    // with ENOLCK; the server keeps serving and releases them when asked.
    // Method: 12,000 one-byte read locks on every other byte, on a raw session.
    let mut fx = Fixture::mounted_with(|export| fs::write(export.join("locked"), b"x").unwrap());
    let mut session = RawSession::open(fx.addr());
    let root = session.root();
    let handle = session.lookup(&root, b"locked").unwrap().handle;
    let lock = |kind, start: u64, end: u64| Request::Lock(LockRequest { handle: handle.clone(), owner: 1, kind, start, end, pid: 1 });
    let mut refused = None;
    for i in 0..12_000u64 {
        match session.call(&lock(LockKind::Read, 2 * i, 2 * i), &[]) {
            Ok((Reply::LockTest(None), _)) => {}
            Err(WireError::Errno(Errno(libc::ENOLCK))) => {
                refused = Some(i);
                break;
            }
            other => panic!("lock {i}: {other:?}"),
        }
    }
    let refused = refused.expect("12,000 ranges on one object were all accepted");
    assert!(refused >= 5_000, "refused too early, at {refused}");
    let (reply, _) = session.call(&lock(LockKind::Unlock, 0, u64::MAX), &[]).expect("unlock all");
    assert_eq!(reply, Reply::LockTest(None));
    fx.assert_mount_works("after the lock flood");
}
