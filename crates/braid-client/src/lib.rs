//! The braid client library: one connection to a server that survives the server's restarts,
//! typed calls for every request, and the transaction sequence of this mount. No FUSE here.
//!
//! # Correctness
//! A call returns only with the server's reply. While the connection is down, calls wait; on
//! reconnect every request without a reply is sent again, and the server applies each
//! transaction at most once (client id + seq), so a resend can never apply a change twice.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod callbacks;
mod connection;
pub mod inodes;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use braid_proto::{
    Attr, ClientId, Command, CommandOk, Credentials, DirEntry, Entry, Errno, ExportInfo, Handle, LockHeld, LockRequest, Lsn, Reply,
    Request, StatFs, Txn, TxnSeq, Whence, WireError,
};

pub use callbacks::CallbackHandler;
pub use connection::Connection;

/// Until when the client may cache what a reply said; `None`: not at all.
pub type Lease = Option<Instant>;

/// Results of the commands of a transaction (see [`Client::txn`]).
pub type TxnResults = Vec<std::result::Result<CommandOk, Errno>>;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server.
    pub server: String,
    /// Shown in the server's logs.
    pub client_name: String,
    /// How long a call may wait for an unreachable server before it fails with `TimedOut`;
    /// `None` waits for ever (as NFS `hard`).
    pub retry_budget: Option<Duration>,
    /// TLS 1.3 with this configuration (client certificate included); `None`: plain TCP.
    pub tls: Option<std::sync::Arc<braid_tls::ClientConfig>>,
    /// Algorithms the server must use on every connection (see `Hello::require`).
    pub require: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("server returned errno {}", .0 .0)]
    Errno(Errno),
    #[error("the export is read-only")]
    ReadOnly,
    #[error("no reply from {server} within the retry budget of {budget_ms} ms")]
    TimedOut { server: String, budget_ms: u128 },
    #[error("server {server} refused the connection: {reason}")]
    Refused { server: String, reason: String },
    #[error("cannot reach {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("protocol error: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

#[derive(Clone)]
pub struct Client {
    connection: Arc<Connection>,
    txns: Arc<TxnSequencer>,
    callbacks: Arc<Mutex<Option<callbacks::CallbackThread>>>,
    /// Work for the release thread.
    releases: std::sync::mpsc::Sender<ReleaseWork>,
}

enum ReleaseWork {
    Release(Handle),
    /// Answered once every release queued before it was sent.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Hands out transaction sequence numbers and remembers which have no reply yet.
struct TxnSequencer {
    next: AtomicU64,
    outstanding: Mutex<BTreeSet<u64>>,
}

impl TxnSequencer {
    fn begin(&self) -> (TxnSeq, TxnSeq) {
        let mut outstanding = self.outstanding.lock().expect("txn lock");
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        outstanding.insert(seq);
        let replied_below = *outstanding.first().expect("just inserted");
        (TxnSeq(seq), TxnSeq(replied_below))
    }

    fn end(&self, seq: TxnSeq) {
        self.outstanding.lock().expect("txn lock").remove(&seq.0);
    }
}

impl Client {
    /// Connects and completes the handshake; fails at once if the server is unreachable or
    /// refuses, so that `braid mount` reports it.
    pub fn connect(config: ClientConfig) -> Result<(Self, ExportInfo)> {
        let client_id = ClientId(rand::random());
        let (connection, info) = Connection::open(config, client_id)?;
        let txns = Arc::new(TxnSequencer { next: AtomicU64::new(1), outstanding: Mutex::new(BTreeSet::new()) });
        let releases =
            start_release_thread(connection.clone()).map_err(|e| ClientError::Protocol(format!("cannot start the release thread: {e}")))?;
        Ok((Self { connection, txns, callbacks: Arc::new(Mutex::new(None)), releases }, info))
    }

    /// Opens the callback channel: from now on the server grants this client rights to cache,
    /// and recalls them through `handler`.
    pub fn subscribe(&self, handler: Arc<dyn CallbackHandler>) -> std::io::Result<()> {
        let thread = callbacks::CallbackThread::start(self.connection.clone(), handler)?;
        *self.callbacks.lock().expect("callbacks lock") = Some(thread);
        Ok(())
    }

    /// Gives every right and lock back (unmount) and stops the callback channel, once the
    /// releases of closed files have been sent.
    pub fn unsubscribe(&self) -> Result<()> {
        let (done, sent) = std::sync::mpsc::sync_channel(1);
        if self.releases.send(ReleaseWork::Barrier(done)).is_ok() {
            let _ = sent.recv_timeout(Duration::from_secs(10));
        }
        let thread = self.callbacks.lock().expect("callbacks lock").take();
        if let Some(thread) = thread {
            thread.stop();
        }
        self.call(Request::Unsubscribe).map(|_| ())
    }

    pub fn lookup(&self, parent: &Handle, name: &[u8]) -> Result<(Entry, Lease)> {
        match self.call_leased(Request::Lookup { parent: parent.clone(), name: name.to_vec() })? {
            (Reply::Entry(entry), lease) => Ok((entry, lease)),
            (other, _) => unexpected(other),
        }
    }

    pub fn getattr(&self, handle: &Handle) -> Result<(Attr, Lease)> {
        match self.call_leased(Request::GetAttr { handle: handle.clone() })? {
            (Reply::Attr(attr), lease) => Ok((attr, lease)),
            (other, _) => unexpected(other),
        }
    }

    pub fn readlink(&self, handle: &Handle) -> Result<Vec<u8>> {
        match self.call(Request::ReadLink { handle: handle.clone() })? {
            Reply::ReadLink(target) => Ok(target),
            other => unexpected(other),
        }
    }

    pub fn read(&self, handle: &Handle, offset: u64, len: u32) -> Result<(Vec<u8>, Lease)> {
        let (reply, data, lease) = self.connection.call_leased(&Request::Read { handle: handle.clone(), offset, len }, &[])?;
        match reply {
            Reply::Read => Ok((data, lease)),
            other => unexpected(other),
        }
    }

    /// Entries after `cookie`, whether the listing ends there, and the lease on all of it.
    pub fn readdir(&self, handle: &Handle, cookie: u64, plus: bool) -> Result<(Vec<DirEntry>, bool, Lease)> {
        match self.call_leased(Request::ReadDir { handle: handle.clone(), cookie, plus })? {
            (Reply::ReadDir { entries, eof }, lease) => Ok((entries, eof, lease)),
            (other, _) => unexpected(other),
        }
    }

    pub fn statfs(&self) -> Result<StatFs> {
        match self.call(Request::StatFs)? {
            Reply::StatFs(s) => Ok(s),
            other => unexpected(other),
        }
    }

    /// The value of an extended attribute, `None` if the object has no such attribute, and the
    /// lease on that answer.
    pub fn getxattr(&self, handle: &Handle, name: &[u8]) -> Result<(Option<Vec<u8>>, Lease)> {
        let (result, _, lease) = self.connection.call_outcome(&Request::GetXattr { handle: handle.clone(), name: name.to_vec() }, &[])?;
        match result {
            Ok(Reply::Xattr(value)) => Ok((Some(value), lease)),
            Ok(other) => unexpected(other),
            Err(ClientError::Errno(Errno(libc::ENODATA))) => Ok((None, lease)),
            Err(e) => Err(e),
        }
    }

    pub fn listxattr(&self, handle: &Handle) -> Result<Vec<u8>> {
        match self.call(Request::ListXattr { handle: handle.clone() })? {
            Reply::XattrList(names) => Ok(names),
            other => unexpected(other),
        }
    }

    pub fn lseek(&self, handle: &Handle, offset: u64, whence: Whence) -> Result<u64> {
        match self.call(Request::Lseek { handle: handle.clone(), offset, whence })? {
            Reply::Lseek(at) => Ok(at),
            other => unexpected(other),
        }
    }

    /// Tells the server this mount has `handle` open (see `Request::Open`), for `access`
    /// (`R_OK`/`W_OK` bits) by `creds`. Pins are restored after a server restart.
    pub fn open(&self, handle: &Handle, creds: Credentials, access: u32) -> Result<Lease> {
        let (_, lease) = self.call_leased(Request::Open { handle: handle.clone(), creds, access })?;
        self.connection.pin(handle, 1);
        Ok(lease)
    }

    /// Records a pin the server took as part of a command (`Command::Create { pin: true }`).
    pub fn pinned(&self, handle: &Handle) {
        self.connection.pin(handle, 1);
    }

    /// Ends one open of `handle`. The server is told in the background: a close does not wait
    /// for a round trip (opens and releases only count, so their order does not matter).
    pub fn release(&self, handle: &Handle) {
        self.connection.pin(handle, -1);
        if self.releases.send(ReleaseWork::Release(handle.clone())).is_err() {
            tracing::warn!("the release thread is gone; the server keeps a file open until it restarts");
        }
    }

    /// Applies `commands` as one transaction. `data` holds the bytes of the `Write` commands,
    /// in order. Returns one result per command applied; the last may be an error.
    pub fn txn(&self, creds: Credentials, commands: Vec<Command>, data: Vec<u8>) -> Result<(TxnResults, Lease)> {
        let (seq, replied_below) = self.txns.begin();
        let request = Request::Txn(Txn { seq, replied_below, creds, commands });
        let result = self.connection.call_leased(&request, &data);
        self.txns.end(seq);
        match result? {
            (Reply::Txn(outcome), _, lease) => Ok((outcome.results, lease)),
            (other, _, _) => unexpected(other),
        }
    }

    /// Applies one command as its own transaction.
    pub fn apply(&self, creds: Credentials, command: Command, data: Vec<u8>) -> Result<(CommandOk, Lease)> {
        let (mut results, lease) = self.txn(creds, vec![command], data)?;
        match results.pop() {
            Some(Ok(ok)) => Ok((ok, lease)),
            Some(Err(errno)) => Err(ClientError::Errno(errno)),
            None => Err(ClientError::Protocol("empty txn outcome".into())),
        }
    }

    /// Takes, changes or releases a lock; returns the conflicting lock another owner holds
    /// instead, if any.
    pub fn lock(&self, request: LockRequest) -> Result<Option<LockHeld>> {
        self.lock_call(Request::Lock(request))
    }

    /// The first lock that conflicts with `request`, if any.
    pub fn test_lock(&self, request: LockRequest) -> Result<Option<LockHeld>> {
        self.lock_call(Request::TestLock(request))
    }

    /// Sends a lock request; both kinds are answered with the conflicting lock, if any.
    fn lock_call(&self, request: Request) -> Result<Option<LockHeld>> {
        match self.call(request)? {
            Reply::LockTest(held) => Ok(held),
            other => unexpected(other),
        }
    }

    /// Returns once every transaction this client has had a reply for is durable.
    pub fn commit(&self) -> Result<Lsn> {
        match self.call(Request::Commit)? {
            Reply::Committed(lsn) => Ok(lsn),
            other => unexpected(other),
        }
    }

    fn call(&self, request: Request) -> Result<Reply> {
        self.connection.call(&request, &[]).map(|(reply, _)| reply)
    }

    fn call_leased(&self, request: Request) -> Result<(Reply, Lease)> {
        self.connection.call_leased(&request, &[]).map(|(reply, _, lease)| (reply, lease))
    }
}

/// Sends the releases of closed files, in order, for as long as the client exists.
fn start_release_thread(connection: Arc<Connection>) -> std::io::Result<std::sync::mpsc::Sender<ReleaseWork>> {
    let (tx, rx) = std::sync::mpsc::channel::<ReleaseWork>();
    std::thread::Builder::new().name("braid-release".into()).spawn(move || {
        for work in rx {
            match work {
                ReleaseWork::Release(handle) => {
                    if let Err(e) = connection.call(&Request::Release { handle }, &[]) {
                        tracing::warn!(error = %e, "cannot release a closed file on the server");
                    }
                }
                ReleaseWork::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    })?;
    Ok(tx)
}

fn unexpected<T>(reply: Reply) -> Result<T> {
    Err(ClientError::Protocol(format!("unexpected reply {reply:?}")))
}

pub(crate) fn wire_error(e: WireError) -> ClientError {
    match e {
        WireError::Errno(errno) => ClientError::Errno(errno),
        WireError::ReadOnly => ClientError::ReadOnly,
        WireError::Malformed(m) => ClientError::Protocol(format!("server says: malformed request: {m}")),
    }
}
