//! Typed messages. Every mutating request is a [`Txn`]: an ordered list of [`Command`]s applied
//! atomically and at most once (client id + [`TxnSeq`]). Bulk data of `Write` commands travels
//! in the frame's data section, in command order, never inside the message.
use serde::{Deserialize, Serialize};

use crate::codec::Checksum;

/// Protocol versions this build speaks, newest first. 2 added [`Request::DurableTxn`], 3
/// [`Request::StagedTxn`], 4 [`Request::XattrNames`] and [`Request::CommitUpTo`], 5
/// [`Welcome::AcceptedAfter`] and [`Request::Renew`], 6 transactions carrying up to
/// [`crate::limits::TXN_DATA_BYTES_MAX`] of data, in which a refused write does not stop the
/// commands after it, 7 [`Request::LockWait`] and [`Request::LockReclaim`], 8 clients that hold
/// locks are heard from at least every half lease (see [`LOCK_LEASE_VERSION`]) and a lock wait
/// waits at the server (see [`LOCK_WAIT_AT_SERVER_VERSION`]), 9 [`Request::WriteBack`], 10
/// [`Request::ReclaimDone`].
pub const PROTOCOL_VERSIONS: &[u16] = &[10, 9, 8, 7, 6, 5, 4, 3, 2, 1];

/// The first protocol version with [`Request::DurableTxn`].
pub const DURABLE_TXN_VERSION: u16 = 2;

/// The first protocol version with [`Request::StagedTxn`].
pub const STAGED_TXN_VERSION: u16 = 3;

/// The first protocol version with [`Request::XattrNames`] and [`Request::CommitUpTo`].
pub const XATTR_NAMES_VERSION: u16 = 4;

/// The first protocol version whose server names its predecessors ([`Welcome::AcceptedAfter`]).
pub const PREDECESSORS_VERSION: u16 = 5;

/// The first protocol version with [`Request::Renew`].
pub const RENEW_VERSION: u16 = 5;

/// The first protocol version whose server takes frames of up to
/// [`crate::limits::TXN_DATA_BYTES_MAX`] of data (before: [`crate::limits::DATA_BYTES_MAX`]),
/// and goes on after a refused write in a transaction (before: it stopped at any refusal).
pub const BULK_TXN_VERSION: u16 = 6;

/// The first protocol version with [`Request::LockWait`] (deadlock detection) and
/// [`Request::LockReclaim`] (locks survive a restart of the server).
pub const LOCK_WAIT_VERSION: u16 = 7;

/// The first protocol version whose clients send a request (an empty [`Request::Renew`] if
/// nothing else) at least every half lease while they hold locks, so that the server may
/// drop the locks of a client it has not heard from for a whole lease even while its
/// connections stay open (a frozen or cut-off machine); the client then finds out with
/// [`Request::LockReclaim`] before it trusts its locks again.
pub const LOCK_LEASE_VERSION: u16 = 8;

/// The first protocol version whose server holds a conflicting [`Request::LockWait`] for up to
/// 100 ms, answering as soon as the lock can be taken, so that its client asks again at once.
pub const LOCK_WAIT_AT_SERVER_VERSION: u16 = 8;

/// The first protocol version with [`Request::WriteBack`]: changes a client made in its cache
/// under exclusive rights are refused once those rights were taken from it without its
/// acknowledgement, instead of overwriting what another client did since.
pub const WRITE_BACK_FENCE_VERSION: u16 = 9;

/// The first protocol version with [`Request::ReclaimDone`]: the grace period after a restart
/// of the server ends as soon as every client of the previous process has written back what
/// it changed under that process's rights and claimed its locks again; reads wait for it.
pub const RECLAIM_DONE_VERSION: u16 = 10;

/// Identifies one client (one mount) for deduplication; random, chosen at mount time and kept
/// across reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub u64);

/// A client's transaction sequence number, strictly increasing per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TxnSeq(pub u64);

/// Position in the server's transaction log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Lsn(pub u64);

/// An opaque, server-issued, tamper-evident name for one object (file, directory, ...). It stays
/// valid across renames and server restarts, and names no object outside the export.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Handle(pub Vec<u8>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handle(")?;
        for b in self.0.iter().take(16) {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Client hello: first frame on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the client speaks, any order.
    pub versions: Vec<u16>,
    pub client_id: ClientId,
    /// Free text for logs (host name, version).
    pub client_name: String,
    /// Frame checksum algorithms the client accepts, preferred first.
    pub checksums: Vec<String>,
    /// Algorithms the client insists on (a checksum, `tls13`, `x509`): the server refuses the
    /// connection, naming the first it lacks, rather than silently serving without it.
    pub require: Vec<String>,
}

impl Hello {
    /// A hello offering every protocol version and checksum of this build and requiring nothing.
    pub fn new(client_id: ClientId, client_name: String) -> Self {
        Self {
            versions: PROTOCOL_VERSIONS.to_vec(),
            client_id,
            client_name,
            checksums: Checksum::ALL.iter().map(|c| c.name().to_string()).collect(),
            require: Vec::new(),
        }
    }

    /// This hello insisting on `require`; a required checksum is then the only one offered, so
    /// that the server does not pick another it prefers.
    pub fn requiring(mut self, require: Vec<String>) -> Self {
        if require.iter().any(|r| Checksum::from_name(r).is_some()) {
            self.checksums.retain(|c| require.contains(c));
        }
        self.require = require;
        self
    }
}

/// The algorithms in force on one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Algorithms {
    /// Frame payload checksum: `crc32c`, or `aead` (none: the channel's encryption covers it).
    pub checksum: String,
    /// Channel encryption: `tls13` or `none`.
    pub cipher: String,
    /// How the client was authenticated: `x509` (a certificate of the server's authority) or `none`.
    pub auth: String,
}

impl Algorithms {
    pub fn names(&self) -> [&str; 3] {
        [&self.checksum, &self.cipher, &self.auth]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    /// Boxed: a refusal should not cost the size of a full export description.
    Accepted(Box<ExportInfo>),
    /// The server refuses the client; the reason is for humans.
    Refused { reason: String },
    /// As `Accepted` (protocol version 5 and later), with what this server process has of the
    /// transactions of the processes that ran before it on the same state.
    AcceptedAfter { info: Box<ExportInfo>, predecessors: Vec<Predecessor> },
}

/// An earlier server process on the same state, and the last of its lsns that survived into
/// this one: every transaction it applied up to `durable` is durable, none after it is there
/// (a crash of the machine undid them). A client that was told an lsn above `durable` by that
/// process lost that change, and its fsync must fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Predecessor {
    pub instance: u64,
    pub durable: Lsn,
}

/// What the server tells a client about the export at mount time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub version: u16,
    pub algorithms: Algorithms,
    pub root: Entry,
    pub read_only: bool,
    /// The export's size limit in bytes, if any; writes beyond it fail with ENOSPC.
    pub max_bytes: Option<u64>,
    /// Whether the server maps remote root to nobody.
    pub root_squash: bool,
    /// Changes whenever the server process restarts; the client reopens its pins then.
    pub server_instance: u64,
    /// How long a right (lease) granted by a response lasts, from the moment the request was
    /// sent, unless the server recalls it earlier (see [`Callback::Recall`]).
    pub lease_ms: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// A new value for atime or mtime in a setattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// Attributes of an object, as `stat` reports them on the server's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// File type and permission bits, as `st_mode`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub blksize: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub handle: Handle,
    pub attr: Attr,
}

/// Who asks for a mutation. The server applies mutations with these credentials, so ownership,
/// setgid inheritance and permission rules are those of the exported file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// File type bits as in `st_mode` (`S_IFREG`, ...).
    pub kind: u32,
    /// Opaque cookie: pass it back to continue after this entry.
    pub cookie: u64,
    /// Handle and attributes, when asked for (`ReadDir { plus: true }`), except for `.` and `..`.
    pub entry: Option<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_max: u32,
    pub fragment_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Whence {
    Data,
    Hole,
}

/// Read-only requests and control requests. Mutations are in [`Request::Txn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Lookup {
        parent: Handle,
        name: Vec<u8>,
    },
    GetAttr {
        handle: Handle,
    },
    ReadLink {
        handle: Handle,
    },
    Read {
        handle: Handle,
        offset: u64,
        len: u32,
    },
    /// `plus`: also return each entry's handle and attributes, saving a lookup per entry.
    ReadDir {
        handle: Handle,
        cookie: u64,
        plus: bool,
    },
    StatFs,
    GetXattr {
        handle: Handle,
        name: Vec<u8>,
    },
    ListXattr {
        handle: Handle,
    },
    Lseek {
        handle: Handle,
        offset: u64,
        whence: Whence,
    },
    /// Keeps the object alive on the server while the client has it open, so an open file that
    /// is unlinked stays readable. Released by `Release`. The server checks that `creds` may
    /// open it for `access` (`R_OK`/`W_OK` bits; 0: existence only), after root squash.
    Open {
        handle: Handle,
        creds: Credentials,
        access: u32,
    },
    Release {
        handle: Handle,
    },
    Txn(Txn),
    /// Returns once every transaction applied before it is durable on the server.
    Commit,
    /// Makes this connection the client's callback channel: from the reply on, the server sends
    /// [`Callback`] frames on it, and grants rights to this client. One per client; a new one
    /// replaces the old.
    Subscribe,
    /// The client has carried out callback `id` (its kernel caches no longer show what it named).
    CallbackDone {
        id: u64,
    },
    /// The client drops every right it holds (clean unmount): the server recalls nothing from it
    /// any more and releases its locks.
    Unsubscribe,
    /// Takes, changes or releases a lock. The reply is `LockTest(None)` when done, or the
    /// conflicting lock another owner holds (the client retries for a blocking request).
    Lock(LockRequest),
    /// The first lock conflicting with `LockRequest` (whose kind must not be `Unlock`), if any.
    TestLock(LockRequest),
    /// A `Txn` answered only once it is durable, with everything applied before it (`Txn`
    /// then `Commit` in one round trip: an fsync). Protocol version 2.
    DurableTxn(Txn),
    /// A `Txn` answered twice under its request id: once applied (its `Reply::Txn`, exactly as
    /// a `Txn`), then once it and everything applied before it are durable
    /// (`Reply::Committed`). An fsync in one round trip whose sender may send its next
    /// transaction before the disk has flushed: fsyncs of several processes share one flush.
    /// Protocol version 3.
    StagedTxn(Txn),
    /// The names of the extended attributes of each object (as `ListXattr`), at most
    /// [`crate::limits::READDIR_ENTRIES_MAX`] of them: asked after a listing, so that `ls -l`
    /// (which asks for two attributes of every file) is answered from the cache. Protocol
    /// version 4.
    XattrNames {
        handles: Vec<Handle>,
    },
    /// Returns once every transaction up to this lsn (or, if it is beyond, every one applied)
    /// is durable, answered `Committed`: an fsync of an object whose last change another
    /// client request sent waits only for the flush that covers it. Protocol version 4.
    CommitUpTo(Lsn),
    /// Extends the client's exclusive rights on these objects (at most
    /// [`crate::limits::READDIR_ENTRIES_MAX`]) by a lease from when the server reads this, on
    /// each it still holds exclusively and nobody else is changing or lately used; answered
    /// `Renewed`. A right that ended is never revived (the object may have changed since
    /// without a recall). Protocol version 5.
    Renew(Vec<Handle>),
    /// As `Lock`, from an owner that will wait for the lock (`F_SETLKW`, a blocking `flock`):
    /// the client retries a conflict, and the server remembers for a moment whom the owner
    /// waits for. If the owners it would wait for wait, directly or through others, for it,
    /// the request is refused with `EDEADLK` instead (none of them could ever go on).
    /// Protocol version 7.
    LockWait(LockRequest),
    /// A lock this client holds, claimed again. After a restart, during the grace period (one
    /// lease after the start, when no other request may take a lock: they are answered with a
    /// conflict), it is taken. Otherwise it is confirmed if the owner still holds it, and
    /// refused with `ENOLCK` if not: the lock is lost (the server restarted longer than a
    /// lease ago, or dropped it while it did not hear from the client). Protocol version 7.
    LockReclaim(LockRequest),
    /// A transaction whose first `queued` commands the client made in its cache, under
    /// exclusive rights granted by server process `instance`, and answered before sending
    /// (write-back). Applied as `Txn` (or, if `staged`, as `StagedTxn`), except that a queued
    /// command naming an object on which this server process took the client's exclusive right
    /// without the client's acknowledgement (its lease ran out: it was frozen, cut off or too
    /// slow to answer a recall) is refused with `EIO`: another client may have changed the
    /// object since, and the late change would overwrite that. Protocol version 9.
    ///
    /// Changes made under rights of an earlier server process (and nothing else but probes,
    /// empty setattrs) are applied during the grace period after a restart ahead of every
    /// other change (a reclaim); after it they are refused where another client changed or
    /// holds the object since the restart.
    WriteBack {
        txn: Txn,
        queued: u32,
        instance: u64,
        staged: bool,
    },
    /// After a restart of the server: this client has written back every change it made under
    /// rights of the previous server process and claimed its locks again. Once every client of
    /// the previous process has said so (or a lease has passed), the grace period is over:
    /// other changes and reads, which wait for it, go on. Protocol version 10.
    ReclaimDone,
}

/// A whole-file or byte-range lock request. `owner` is the client's name for the lock owner
/// (a process for POSIX locks, an open file for OFD locks and `flock`); the server qualifies it
/// with the client id, so owners of different clients never mix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRequest {
    pub handle: Handle,
    pub owner: u64,
    pub kind: LockKind,
    /// First byte covered.
    pub start: u64,
    /// Last byte covered, inclusive (`u64::MAX`: to the end of the file, for ever).
    pub end: u64,
    /// Shown to others in a conflict report (`F_GETLK`).
    pub pid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// A lock held by someone, as reported by `TestLock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHeld {
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
    /// Held by another owner of the asking client: the kernel may be about to release it
    /// (it closes files asynchronously).
    pub mine: bool,
}

/// Server -> client messages on the callback channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Callback {
    /// Another client is about to change what these name: drop them from every cache, then
    /// acknowledge with `Request::CallbackDone`. The rights on them are gone.
    Recall(Vec<Invalidation>),
    /// Another client is about to read these objects, which this client holds exclusively:
    /// write back every change to them it has not sent yet, then acknowledge. Its rights on
    /// them are shared from now on (what it caches stays valid).
    Flush(Vec<Handle>),
}

/// One thing a recall takes back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Invalidation {
    /// The object's attributes and data (for a directory: its listing).
    Object(Handle),
    /// The name `name` in directory `parent`.
    Entry { parent: Handle, name: Vec<u8> },
}

impl Invalidation {
    /// The object whose right it takes back: the object, or the directory of the name.
    pub fn handle(&self) -> &Handle {
        match self {
            Invalidation::Object(handle) | Invalidation::Entry { parent: handle, .. } => handle,
        }
    }
}

impl Callback {
    /// The objects it takes rights (or exclusivity) back on.
    pub fn handles(&self) -> Vec<Handle> {
        match self {
            Callback::Recall(items) => items.iter().map(|item| item.handle().clone()).collect(),
            Callback::Flush(handles) => handles.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub seq: TxnSeq,
    /// Every transaction of this client below this seq has its reply: the server may forget
    /// their cached replies.
    pub replied_below: TxnSeq,
    pub creds: Credentials,
    pub commands: Vec<Command>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Regular file (`rdev` 0, `S_IFREG`), fifo, socket or device node, by the type in `mode`.
    /// `pin` also does what `Request::Open` does, saving a round trip for create-and-open.
    Create {
        parent: Handle,
        name: Vec<u8>,
        mode: u32,
        rdev: u64,
        exclusive: bool,
        pin: bool,
    },
    Mkdir {
        parent: Handle,
        name: Vec<u8>,
        mode: u32,
    },
    Symlink {
        parent: Handle,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Link {
        handle: Handle,
        new_parent: Handle,
        new_name: Vec<u8>,
    },
    Unlink {
        parent: Handle,
        name: Vec<u8>,
    },
    Rmdir {
        parent: Handle,
        name: Vec<u8>,
    },
    Rename {
        parent: Handle,
        name: Vec<u8>,
        new_parent: Handle,
        new_name: Vec<u8>,
        flags: u32,
    },
    SetAttr {
        handle: Handle,
        changes: AttrChanges,
    },
    /// `len` bytes of the frame's data section, following those of earlier writes.
    Write {
        handle: Handle,
        offset: u64,
        len: u32,
    },
    /// Like `Write`, at the end of the file as the server sees it when it applies the command
    /// (`O_APPEND`): appends from several clients never overwrite each other. It must be the
    /// only command of its transaction. The server logs it as the `Write` it became, so a
    /// replay or a resend after a crash writes the same bytes at the same place.
    Append {
        handle: Handle,
        len: u32,
    },
    Fallocate {
        handle: Handle,
        offset: u64,
        len: u64,
        mode: i32,
    },
    CopyFileRange {
        source: Handle,
        source_offset: u64,
        target: Handle,
        target_offset: u64,
        len: u64,
    },
    SetXattr {
        handle: Handle,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        handle: Handle,
        name: Vec<u8>,
    },
}

/// The handles a command names, by reference or by mutable reference (match ergonomics).
macro_rules! named_handles {
    ($command:expr) => {
        match $command {
            Command::Create { parent, .. }
            | Command::Mkdir { parent, .. }
            | Command::Symlink { parent, .. }
            | Command::Unlink { parent, .. }
            | Command::Rmdir { parent, .. } => vec![parent],
            Command::Link { handle, new_parent, .. } => vec![handle, new_parent],
            Command::Rename { parent, new_parent, .. } => vec![parent, new_parent],
            Command::SetAttr { handle, .. }
            | Command::Write { handle, .. }
            | Command::Append { handle, .. }
            | Command::Fallocate { handle, .. }
            | Command::SetXattr { handle, .. }
            | Command::RemoveXattr { handle, .. } => vec![handle],
            Command::CopyFileRange { source, target, .. } => vec![source, target],
        }
    };
}

impl Command {
    /// The objects this command names (not those it creates or removes by name).
    pub fn handles(&self) -> Vec<&Handle> {
        named_handles!(self)
    }

    /// An empty setattr: it changes nothing and answers the object's attributes.
    pub fn is_probe(&self) -> bool {
        matches!(self, Command::SetAttr { changes, .. } if *changes == AttrChanges::default())
    }

    pub fn handles_mut(&mut self) -> Vec<&mut Handle> {
        named_handles!(self)
    }
}

impl Handle {
    /// Names, inside one transaction, the object its command `index` creates: a client sends
    /// a create and changes to the new object in one transaction, before it knows the handle.
    pub fn created_by(index: u32) -> Handle {
        let mut bytes = vec![CREATED_BY_FORMAT];
        bytes.extend_from_slice(&index.to_le_bytes());
        Handle(bytes)
    }

    /// The command index this handle refers to, if it is a [`Handle::created_by`] reference.
    pub fn created_index(&self) -> Option<u32> {
        match self.0.as_slice() {
            [CREATED_BY_FORMAT, a, b, c, d] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }
}

/// First byte of [`Handle::created_by`] references; server handles never start with it.
const CREATED_BY_FORMAT: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AttrChanges {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

/// What one successful command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOk {
    Entry(Entry),
    Attr(Attr),
    Written(u64),
    Done,
}

/// Result of a transaction: one item per command applied, in order. Application stops at the
/// first command that fails, which is then the last item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOutcome {
    pub lsn: Lsn,
    pub results: Vec<Result<CommandOk, Errno>>,
}

impl TxnOutcome {
    /// The objects its commands created.
    pub fn created(&self) -> impl Iterator<Item = &Handle> {
        created(&self.results)
    }
}

/// The objects that the commands with these `results` created.
pub fn created(results: &[Result<CommandOk, Errno>]) -> impl Iterator<Item = &Handle> {
    results.iter().filter_map(|r| match r {
        Ok(CommandOk::Entry(entry)) => Some(&entry.handle),
        _ => None,
    })
}

/// A POSIX error number, as on Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errno(pub i32);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Entry(Entry),
    Attr(Attr),
    ReadLink(Vec<u8>),
    /// The bytes are the frame's data section.
    Read,
    ReadDir {
        entries: Vec<DirEntry>,
        eof: bool,
    },
    StatFs(StatFs),
    Xattr(Vec<u8>),
    XattrList(Vec<u8>),
    Lseek(u64),
    Done,
    Txn(TxnOutcome),
    Committed(Lsn),
    /// Answer to `Lock` and `TestLock`: the conflicting lock, if any.
    LockTest(Option<LockHeld>),
    /// Answer to `XattrNames`, in order: each object's names (NUL-terminated, as listxattr(2)
    /// gives them), or `None` if unknown (the object is gone, or the answer would be too big).
    XattrNames(Vec<Option<Vec<u8>>>),
    /// Answer to `Renew`, in order: whether each right was extended.
    Renewed(Vec<bool>),
}

/// Errors the server returns instead of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    #[error("errno {}", .0 .0)]
    Errno(Errno),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("the export is read-only")]
    ReadOnly,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub result: Result<Reply, WireError>,
    /// Every transaction with an lsn at or below this is durable.
    pub durable: Lsn,
    /// The client holds a right (lease) on every object this response names, for
    /// `ExportInfo::lease_ms` from when it sent the request: it may cache them until then or
    /// until the server recalls them. `false`: nothing here may be cached.
    pub leased: bool,
    /// The rights are exclusive (no other client holds any): the client may change these
    /// objects in its cache and write the changes back later. Another client's read of them
    /// first makes the server ask for them (`Callback::Flush`).
    pub exclusive: bool,
}
