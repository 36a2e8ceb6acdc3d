//! Shared harness of the end-to-end suites: a real `braid serve` on a temporary export and state
//! directory, and a real `braid mount --foreground` on a temporary mount point.
//!
//! Every wait is a poll of a condition with a deadline. On drop the mount is unmounted
//! (`fusermount3 -u`, else `umount -l`) and both processes are killed and reaped; if the test is
//! failing, the tails of both logs are printed to help diagnosis.
#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use braid_proto::{
    encode_frame, Attr, ClientId, Command, CommandOk, Credentials, Entry, Errno, ExportInfo, Frame, FrameHeader, FrameKind, Handle, Hello,
    Predecessor, Reply, Request, Response, Txn, TxnSeq, Welcome, WireError, HEADER_BYTES,
};

/// How long a process may take to come up (listen, or complete the FUSE mount).
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long an unmount or a process exit may take.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// A request on the mount waits at most this long for the server; failing tests then end
/// instead of hanging for the default budget of two minutes.
const MOUNT_TIMEOUT_SECONDS: u64 = 30;
const POLL: Duration = Duration::from_millis(10);

pub fn braid_exe() -> &'static str {
    env!("CARGO_BIN_EXE_braid")
}

/// A server and, optionally, one mount of it, each in its own temporary directory:
/// `root/srv/export`, `root/state`, `root/mnt`, `root/logs`.
pub struct Fixture {
    pub root: tempfile::TempDir,
    pub export: PathBuf,
    pub state: PathBuf,
    pub mnt: PathBuf,
    pub port: u16,
    server: Option<Child>,
    mount: Option<Child>,
    logs: PathBuf,
    server_starts: u32,
    /// Extra arguments of `braid serve`; by default plain TCP, root trusted.
    pub server_args: Vec<String>,
    /// Extra arguments of `braid mount`; by default plain TCP.
    pub mount_args: Vec<String>,
    /// Where the mount connects, if not straight to the server (a proxy).
    pub mount_via: Option<SocketAddr>,
}

/// Server arguments of most tests: plain TCP (the TLS suite tests TLS), root trusted, as
/// pjdfstest-style checks of root's powers need, and a one-second lease, so that the grace
/// period after a server restart (changes wait one lease) stays short.
pub fn plain_server_args() -> Vec<String> {
    vec!["--insecure".into(), "--no-root-squash".into(), "--lease".into(), "1".into()]
}

pub fn plain_mount_args() -> Vec<String> {
    vec!["--insecure".into()]
}

impl Fixture {
    /// A server on an empty export, mounted.
    pub fn mounted() -> Self {
        Self::mounted_with(|_| {})
    }

    /// A server with a lease long enough for changes to be queued in the client's cache (the
    /// client then works at local speed), mounted.
    pub fn mounted_queueing() -> Self {
        let args = ["--insecure", "--no-root-squash", "--lease", "30"].map(String::from).to_vec();
        let mut fixture = Self::serving_with_args(|_| {}, args, plain_mount_args());
        fixture.mount();
        fixture
    }

    /// A server on an export that `prepare` fills first, mounted.
    pub fn mounted_with(prepare: impl FnOnce(&Path)) -> Self {
        let mut fixture = Self::serving_with(prepare);
        fixture.mount();
        fixture
    }

    /// A server on an export that `prepare` fills first, without a mount.
    pub fn serving_with(prepare: impl FnOnce(&Path)) -> Self {
        Self::serving_with_args(prepare, plain_server_args(), plain_mount_args())
    }

    /// A server started with `server_args` (mounts will use `mount_args`), without a mount.
    pub fn serving_with_args(prepare: impl FnOnce(&Path), server_args: Vec<String>, mount_args: Vec<String>) -> Self {
        let root = tempfile::Builder::new().prefix("braid-e2e-").tempdir().expect("create temp dir");
        // Other users (tests that act as uid 1000) must be able to reach the mount point.
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let export = root.path().join("srv").join("export");
        let state = root.path().join("state");
        let mnt = root.path().join("mnt");
        let logs = root.path().join("logs");
        for dir in [&export, &state, &mnt, &logs] {
            fs::create_dir_all(dir).expect("create fixture dir");
        }
        prepare(&export);
        let mut fixture = Self {
            root,
            export,
            state,
            mnt,
            // Chosen by the server at its first start (it binds port 0 and logs the port): a
            // port picked here and released could be taken by another test before the bind.
            port: 0,
            server: None,
            mount: None,
            logs,
            server_starts: 0,
            server_args,
            mount_args,
            mount_via: None,
        };
        fixture.start_server();
        fixture
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts `braid serve` on the fixture's export, state and port (any free one at the first
    /// start, the same one after), and waits until it listens.
    pub fn start_server(&mut self) {
        assert!(self.server.is_none(), "a server is already running");
        self.server_starts += 1;
        let log_name = format!("server-{}.log", self.server_starts);
        let log = self.log_file(&log_name);
        let child = Process::new(braid_exe())
            .arg("serve")
            .arg("--data")
            .arg(&self.export)
            .arg("--listen")
            .arg(self.addr().to_string())
            .arg("--state")
            .arg(&self.state)
            .args(&self.server_args)
            .env("BRAID_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn braid serve");
        self.server = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            // Its own log, not a connect: a connect could reach another test's server on the
            // same port, or the connecting socket itself (TCP self-connect).
            if let Some(listen) = listening_on(&fs::read_to_string(self.logs.join(&log_name)).unwrap_or_default()) {
                assert!(self.port == 0 || listen.port() == self.port, "braid serve listens on {listen}, not on port {}", self.port);
                self.port = listen.port();
                return;
            }
            if let Some(status) = self.server.as_mut().expect("server").try_wait().expect("try_wait") {
                self.server = None;
                panic!("braid serve exited before listening ({status}):\n{}", self.logs_tail());
            }
            assert!(
                Instant::now() < deadline,
                "braid serve not listening on {} after {START_DEADLINE:?}:\n{}",
                self.addr(),
                self.logs_tail()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill_server(&mut self) {
        let mut child = self.server.take().expect("no server to kill");
        child.kill().expect("kill -9 braid serve");
        child.wait().expect("reap braid serve");
    }

    /// True while the server process has not exited.
    pub fn server_alive(&mut self) -> bool {
        match self.server.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Runs `braid mount --foreground` and waits until the mount point is a mount point.
    pub fn mount(&mut self) {
        assert!(self.mount.is_none(), "already mounted");
        let child = self.start_mount(&self.mnt, "mount.log");
        self.mount = Some(child);
    }

    /// Mounts the server a second time, as another client would, on `root/<name>`.
    pub fn another_mount(&self, name: &str) -> OtherMount {
        let mnt = self.root.path().join(name);
        fs::create_dir_all(&mnt).expect("create mount point");
        let child = self.start_mount(&mnt, &format!("{name}.log"));
        OtherMount { mnt, child: Some(child) }
    }

    fn start_mount(&self, mnt: &Path, log_name: &str) -> Child {
        let log = self.log_file(log_name);
        let mut child = Process::new(braid_exe())
            .arg("mount")
            .arg(self.mount_via.unwrap_or(self.addr()).to_string())
            .arg(mnt)
            .arg("--foreground")
            .arg("--timeout")
            .arg(MOUNT_TIMEOUT_SECONDS.to_string())
            .args(&self.mount_args)
            .env("BRAID_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn braid mount");
        let deadline = Instant::now() + START_DEADLINE;
        while !is_mount_point(mnt) {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("braid mount exited before mounting ({status}):\n{}", self.logs_tail());
            }
            assert!(Instant::now() < deadline, "{} not mounted after {START_DEADLINE:?}:\n{}", mnt.display(), self.logs_tail());
            std::thread::sleep(POLL);
        }
        child
    }

    /// Sends `signal` to the server (SIGSTOP freezes it, SIGCONT thaws it).
    pub fn signal_server(&self, signal: i32) {
        let pid = self.server.as_ref().expect("server running").id();
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
    }

    /// A path under the mount point.
    pub fn m(&self, relative: &str) -> PathBuf {
        self.mnt.join(relative)
    }

    /// A path under the export directory (the server's view).
    pub fn e(&self, relative: &str) -> PathBuf {
        self.export.join(relative)
    }

    /// Writes a file through the mount, reads it back through the mount and from the export,
    /// and checks that the server is still running: the mount works end to end.
    pub fn assert_mount_works(&mut self, tag: &str) {
        assert!(self.server_alive(), "server died ({tag}):\n{}", self.logs_tail());
        let name = format!("probe-{tag}");
        let content = format!("probe {tag} {}", "x".repeat(1000)).into_bytes();
        fs::write(self.m(&name), &content).unwrap_or_else(|e| panic!("write through the mount ({tag}): {e}\n{}", self.logs_tail()));
        assert_eq!(fs::read(self.m(&name)).expect("read back through the mount"), content, "{tag}: read back through the mount");
        assert_eq!(fs::read(self.e(&name)).expect("read from the export"), content, "{tag}: content in the export");
        fs::remove_file(self.m(&name)).expect("remove probe");
        assert!(self.server_alive(), "server died ({tag}):\n{}", self.logs_tail());
    }

    /// The last lines of every log of this fixture.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = fs::read_dir(&self.logs).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
        names.sort();
        for path in names {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            out.push_str(&format!("---- {} (last {} lines)\n", path.display(), lines.len() - from));
            for line in &lines[from..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn log_file(&self, name: &str) -> fs::File {
        fs::OpenOptions::new().create(true).append(true).open(self.logs.join(name)).expect("open log file")
    }
}

/// A second client of a fixture's server (see [`Fixture::another_mount`]); unmounted on drop.
pub struct OtherMount {
    pub mnt: PathBuf,
    child: Option<Child>,
}

impl OtherMount {
    /// A path under this mount point.
    pub fn m(&self, relative: &str) -> PathBuf {
        self.mnt.join(relative)
    }

    /// Sends `signal` to the client (SIGSTOP freezes it as a hung machine would: its
    /// connections stay open; SIGCONT thaws it).
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("client running").id();
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
    }

    /// Kills the client as a crash would (SIGKILL): no unmount, no goodbye to the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Process::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

impl Drop for OtherMount {
    fn drop(&mut self) {
        stop_mount(&self.mnt, self.child.take());
    }
}

/// Unmounts `mnt`, gives its client process time to exit (else kills it), and detaches the
/// mount lazily if it is still there: the client is gone, so nothing can still be using it.
fn stop_mount(mnt: &Path, child: Option<Child>) {
    unmount(mnt);
    if let Some(mut child) = child {
        if !wait_exit(&mut child, STOP_DEADLINE) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    if in_mountinfo(mnt) {
        let _ = Process::new("umount").arg("-l").arg(mnt).status();
    }
}

/// Unmounts `mnt` if it is mounted. Mounted is what the kernel's table says: a stat of a mount
/// whose server does not answer fails, and such a mount must go too.
fn unmount(mnt: &Path) {
    if !in_mountinfo(mnt) {
        return;
    }
    let quiet = |program: &str, args: &[&OsStr]| {
        Process::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
    };
    if !quiet("fusermount3", &[OsStr::new("-u"), mnt.as_os_str()]) {
        quiet("umount", &[OsStr::new("-l"), mnt.as_os_str()]);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("fixture logs:\n{}", self.logs_tail());
        }
        stop_mount(&self.mnt, self.mount.take());
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    false
}

/// The address of `braid serve`'s "serving" line in `log`, once it has logged it (after its bind).
fn listening_on(log: &str) -> Option<SocketAddr> {
    let serving = log.lines().filter(|line| line.contains(" serving "));
    serving.flat_map(str::split_whitespace).find_map(|field| field.strip_prefix("listen="))?.parse().ok()
}

/// True if `path` is on another file system than its parent: a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    let parent = path.parent().expect("mount point has a parent");
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(own), Ok(up)) => own.dev() != up.dev(),
        _ => false,
    }
}

/// Whether `path` is a mount point in this process's mount table (asks no file system).
pub fn in_mountinfo(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines().any(|line| line.split(' ').nth(4) == path.to_str())
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// Writes "b" at offset 1 of `path` as uid/gid 1000 (not an append: a write the client may
/// keep in its cache).
pub fn write_as_user(path: &Path) {
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "dd", "bs=1", "seek=1", "conv=notrunc", "status=none"])
        .arg(format!("of={}", path.display()))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv runs");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"b").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "write as uid 1000 to {} failed: {status}", path.display());
}

pub fn setxattr(path: &Path, name: &str, value: &[u8], flags: libc::c_int) -> Result<(), i32> {
    let (path, name) = (cstr(path), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings and a buffer of the length passed, all alive for the call.
    match unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) } {
        0 => Ok(()),
        _ => Err(last_errno()),
    }
}

pub fn getxattr(path: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let (path, name) = (cstr(path), CString::new(name).unwrap());
    let mut buf = vec![0u8; size];
    // SAFETY: as in `setxattr`; the kernel writes at most `buf.len()` bytes.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Drops the client kernel's cached pages of `file`, so that the next read asks the server.
pub fn drop_page_cache(file: &fs::File) {
    // SAFETY: a valid descriptor; the call only advises the kernel.
    let ret = unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(file), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(ret, 0, "posix_fadvise");
}

/// The statvfs(2) of the file system at `path`.
pub fn statvfs(path: &Path) -> libc::statvfs {
    let c = cstr(path);
    // SAFETY: `c` is NUL-terminated and `out` a valid out-parameter.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut out) }, 0, "statvfs {}: errno {}", path.display(), last_errno());
    out
}

pub fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// The errno of the last failed libc call.
pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().expect("an OS error")
}

/// Deterministic bytes for contents: a small xorshift generator, so no extra dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// A hand-made client: a TCP connection that completed the braid handshake, speaking the wire
/// protocol with `braid_proto` only, one request at a time. Tests use it to send what the real
/// client never would.
pub struct RawSession {
    pub stream: TcpStream,
    pub info: ExportInfo,
    /// What the server said of the processes before it (empty from a version-4 welcome).
    pub predecessors: Vec<Predecessor>,
    next_request_id: u64,
    next_seq: u64,
}

impl RawSession {
    pub fn open(addr: SocketAddr) -> Self {
        // A client id of its own per session, so that no two sessions share a txn sequence.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
        Self::open_as(addr, ClientId(nanos ^ (u64::from(std::process::id()) << 32)))
    }

    /// A session that introduces itself as `client_id`, as a reconnecting client does; its
    /// transactions are numbered from 1.
    pub fn open_as(addr: SocketAddr, client_id: ClientId) -> Self {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
        let hello = Hello::new(client_id, "raw test session".into());
        stream.write_all(&encode_frame(FrameKind::Hello, 0, &hello, &[]).expect("encode hello")).expect("send hello");
        let frame = read_frame(&mut stream).expect("read welcome");
        assert_eq!(frame.header.kind, FrameKind::Welcome);
        match frame.decode::<Welcome>().expect("welcome decodes") {
            Welcome::Accepted(info) => Self { stream, info: *info, predecessors: Vec::new(), next_request_id: 1, next_seq: 1 },
            Welcome::AcceptedAfter { info, predecessors } => Self { stream, info: *info, predecessors, next_request_id: 1, next_seq: 1 },
            Welcome::Refused { reason } => panic!("server refused the raw session: {reason}"),
        }
    }

    pub fn root(&self) -> Handle {
        self.info.root.handle.clone()
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, request: &Request, data: &[u8]) -> Result<(Reply, Vec<u8>), WireError> {
        let (response, data) = self.call_response(request, data);
        response.result.map(|reply| (reply, data))
    }

    /// Sends one request and returns its whole response and data.
    pub fn call_response(&mut self, request: &Request, data: &[u8]) -> (Response, Vec<u8>) {
        self.send(request, data);
        let id = self.next_request_id - 1;
        let frame = read_frame(&mut self.stream).unwrap_or_else(|e| panic!("no response to {request:?}: {e}"));
        assert_eq!(frame.header.kind, FrameKind::Response);
        assert_eq!(frame.header.request_id, id, "response to another request");
        (frame.decode().expect("response decodes"), frame.data)
    }

    /// Sends one request without waiting for its response (`next_response` reads it).
    pub fn send(&mut self, request: &Request, data: &[u8]) {
        let id = self.next_request_id;
        self.next_request_id += 1;
        let bytes = encode_frame(FrameKind::Request, id, request, data).expect("encode request");
        self.stream.write_all(&bytes).expect("send request");
    }

    /// A further response to the request sent last (a `StagedTxn` has two).
    pub fn next_response(&mut self) -> Response {
        let frame = read_frame(&mut self.stream).expect("a further response");
        assert_eq!(frame.header.kind, FrameKind::Response);
        assert_eq!(frame.header.request_id, self.next_request_id - 1, "response to another request");
        frame.decode().expect("response decodes")
    }

    pub fn lookup(&mut self, parent: &Handle, name: &[u8]) -> Result<Entry, WireError> {
        match self.call(&Request::Lookup { parent: parent.clone(), name: name.to_vec() }, &[])?.0 {
            Reply::Entry(entry) => Ok(entry),
            other => panic!("lookup answered {other:?}"),
        }
    }

    pub fn getattr(&mut self, handle: &Handle) -> Result<Attr, WireError> {
        match self.call(&Request::GetAttr { handle: handle.clone() }, &[])?.0 {
            Reply::Attr(attr) => Ok(attr),
            other => panic!("getattr answered {other:?}"),
        }
    }

    pub fn readlink(&mut self, handle: &Handle) -> Result<Vec<u8>, WireError> {
        match self.call(&Request::ReadLink { handle: handle.clone() }, &[])?.0 {
            Reply::ReadLink(target) => Ok(target),
            other => panic!("readlink answered {other:?}"),
        }
    }

    pub fn read(&mut self, handle: &Handle, offset: u64, len: u32) -> Result<Vec<u8>, WireError> {
        match self.call(&Request::Read { handle: handle.clone(), offset, len }, &[])? {
            (Reply::Read, data) => Ok(data),
            (other, _) => panic!("read answered {other:?}"),
        }
    }

    /// Sends `commands` as one transaction with root's credentials.
    pub fn txn(&mut self, commands: Vec<Command>, data: &[u8]) -> Result<Vec<Result<CommandOk, Errno>>, WireError> {
        let seq = TxnSeq(self.next_seq);
        self.next_seq += 1;
        let txn = Txn { seq, replied_below: seq, creds: Credentials { uid: 0, gid: 0, groups: Vec::new() }, commands };
        match self.call(&Request::Txn(txn), data)?.0 {
            Reply::Txn(outcome) => Ok(outcome.results),
            other => panic!("txn answered {other:?}"),
        }
    }

    /// One command as its own transaction; a failed command gives its errno.
    pub fn apply(&mut self, command: Command, data: &[u8]) -> Result<CommandOk, WireError> {
        let mut results = self.txn(vec![command], data)?;
        assert_eq!(results.len(), 1, "one result per command");
        results.pop().expect("one result").map_err(WireError::Errno)
    }
}

/// The wire error for an errno.
pub fn wire_errno(code: i32) -> WireError {
    WireError::Errno(Errno(code))
}

pub fn read_frame(stream: &mut TcpStream) -> io::Result<Frame> {
    let mut head = [0u8; HEADER_BYTES];
    stream.read_exact(&mut head)?;
    let header = FrameHeader::decode(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; header.payload_bytes()];
    stream.read_exact(&mut payload)?;
    Frame::from_payload(header, payload, braid_proto::Checksum::Crc32c).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Waits until the peer closes `stream` (read returns end of file or a reset), failing after
/// `limit`. Bytes the server sends before closing are ignored.
pub fn assert_closed_by_peer(stream: &mut TcpStream, what: &str, limit: Duration) {
    stream.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => return,
            Err(e) => panic!("{what}: unexpected read error {e}"),
        }
        assert!(Instant::now() < deadline, "{what}: the server did not close the connection within {limit:?}");
    }
}
