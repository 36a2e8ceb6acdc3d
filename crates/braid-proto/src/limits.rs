//! Every bound of the protocol, with the reason for its value. Each length read from the wire or
//! from disk is checked against one of these before anything is allocated.

/// Largest single write or read. 1 MiB matches the FUSE `max_write` the client asks for, so one
/// kernel request is one command.
pub const DATA_BYTES_MAX: usize = 1 << 20;

/// Largest bulk data of one frame: a transaction of several writes (protocol version 6; older
/// peers keep to [`DATA_BYTES_MAX`]). A client ships write-back data in transactions this large,
/// so a link with a long round trip carries 4 MiB per round trip instead of 1; the server's
/// apply lock is held for one such transaction's writes, a few milliseconds.
pub const TXN_DATA_BYTES_MAX: usize = 4 << 20;

/// Largest postcard message in a frame. A transaction of many small commands or a batch of
/// directory entries fits easily; anything larger is a bug or an attack.
pub const MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Largest whole frame (header + message + bulk data).
pub const FRAME_BYTES_MAX: usize = crate::frame::HEADER_BYTES + MESSAGE_BYTES_MAX + TXN_DATA_BYTES_MAX;

/// Longest file name component, as Linux `NAME_MAX`.
pub const NAME_BYTES_MAX: usize = 255;

/// Longest symlink target, as Linux `PATH_MAX`.
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;

/// Largest opaque object handle: the kernel's `MAX_HANDLE_SZ` (128) plus our type byte,
/// handle type and MAC.
pub const HANDLE_BYTES_MAX: usize = 128 + 32;

/// Largest extended attribute value, as Linux `XATTR_SIZE_MAX`.
pub const XATTR_VALUE_BYTES_MAX: usize = 65536;

/// Largest extended attribute name, as Linux `XATTR_NAME_MAX`.
pub const XATTR_NAME_BYTES_MAX: usize = 255;

/// Most commands in one transaction: enough for a whole batch of a maildir delivery or an untar
/// flush, small enough that applying one never holds the apply lock for long.
pub const TXN_COMMANDS_MAX: usize = 1024;

/// Most requests a client may have in flight on one connection; the server stops reading from a
/// connection at this bound (backpressure), the client waits for a permit.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// Most connections a server holds at once; more are closed as they arrive. Each costs a
/// task, a 64 KiB write buffer and at most one frame in memory.
pub const CONNECTIONS_MAX: usize = 4096;

/// Most bytes of request payloads a server holds at once, over all connections: a reader waits
/// for room before it reads a payload, so memory stays bounded however many clients send.
pub const IN_FLIGHT_BYTES_MAX: usize = 256 << 20;

/// Most directory entries returned by one readdir request.
pub const READDIR_ENTRIES_MAX: usize = 1024;

/// Most supplementary groups carried in credentials, as Linux `NGROUPS_MAX`.
pub const GROUPS_MAX: usize = 65536;

/// Seconds a new connection has to complete the handshake before it is closed.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Most lock ranges held on one object, over all owners; past it a lock request gets ENOLCK
/// (a client splitting a file into millions of ranges must not exhaust the server's memory).
pub const LOCK_RANGES_PER_OBJECT_MAX: usize = 10_000;

const _: () = assert!(TXN_DATA_BYTES_MAX >= DATA_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MAX >= crate::frame::HEADER_BYTES + TXN_DATA_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(IN_FLIGHT_BYTES_MAX >= FRAME_BYTES_MAX);
const _: () = assert!(READDIR_ENTRIES_MAX * (NAME_BYTES_MAX + 64) <= MESSAGE_BYTES_MAX);
