//! One client connection: handshake, then a reader loop that dispatches requests to tasks and
//! a writer task that sends responses in the order they complete.
//!
//! Junk on the port (bad magic, bad checksum, oversized lengths, undecodable messages,
//! truncated frames) closes this connection with one log line; the server keeps serving others.
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use braid_proto::limits::{HANDSHAKE_TIMEOUT_MS, REQUESTS_IN_FLIGHT_MAX};
use braid_proto::{
    encode_frame, encode_parts, Algorithms, Callback, Checksum, ClientId, Command, EncodedFrame, Errno, ExportInfo, Frame, FrameHeader,
    FrameKind, Handle, Hello, Invalidation, LockRequest, Lsn, Reply, Request, Response, Welcome, WireError, HEADER_BYTES,
    PREDECESSORS_VERSION, PROTOCOL_VERSIONS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

use crate::coherence::{Change, Grant, Granter, Heard, LockMode, LockRefused, Reclaim, Sink};
use crate::export::Export;
use crate::locks::{Owner, Wanted};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Codec(#[from] braid_proto::CodecError),
    #[error("bad frame header: {0}")]
    Header(#[from] braid_proto::frame::HeaderError),
    #[error("unexpected {0:?} frame")]
    UnexpectedKind(FrameKind),
    #[error("no hello within {HANDSHAKE_TIMEOUT_MS} ms")]
    HandshakeTimeout,
    #[error("refused: {0}")]
    Refused(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

/// First byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Encrypted bytes rustls may hold before writing: a whole largest response.
const TLS_SEND_BUFFER_BYTES: usize = braid_proto::limits::DATA_BYTES_MAX + 64 * 1024;

/// How a connection is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// TLS 1.3, the client authenticated by a certificate of the server's authority.
    Tls,
    /// Plain TCP on a server started with --insecure.
    Plain,
    /// Plain TCP on a server that requires TLS: the hello is answered with a refusal.
    PlainRefused,
}

pub async fn serve_connection(state: Arc<ServerState>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Started { mut reader, writer, hello, transport, checksum, version } = match start(&state, stream).await {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "closing connection during handshake");
            return;
        }
    };
    tracing::info!(%peer, client = hello.client_id.0, name = %hello.client_name, ?transport, "client connected");
    let (tx, rx) = mpsc::channel::<Outgoing>(REQUESTS_IN_FLIGHT_MAX);
    let writer_task = tokio::spawn(write_responses(writer, rx));
    let session = state.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let who = Peer { client: hello.client_id, session, checksum, version };
    let heard = state.coherence.connected(who.client, version);
    if let Err(e) = read_requests(&state, &mut reader, tx, who, &heard).await {
        tracing::warn!(%peer, client = who.client.0, error = %e, "closing connection");
    } else {
        tracing::info!(%peer, client = who.client.0, "client disconnected");
    }
    state.coherence.session_closed(who.client, who.session);
    state.coherence.disconnected(who.client);
    writer_task.abort();
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    client: ClientId,
    /// This connection.
    session: u64,
    /// The payload checksum negotiated for this connection.
    checksum: Checksum,
    /// The protocol version negotiated for this connection.
    version: u16,
}

/// A connection whose handshake succeeded.
struct Started {
    reader: Reader,
    writer: Writer,
    hello: Hello,
    transport: Transport,
    checksum: Checksum,
    version: u16,
}

/// Transport set-up and handshake: everything before the first request.
async fn start(state: &ServerState, stream: TcpStream) -> Result<Started, SessionError> {
    let opened = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), open_transport(state, stream));
    let (mut reader, mut writer, transport) = opened.await.map_err(|_| SessionError::HandshakeTimeout)??;
    let (hello, checksum, version) = handshake(state, &mut reader, &mut writer, transport).await?;
    Ok(Started { reader, writer, hello, transport, checksum, version })
}

/// Sets up TLS when the server has credentials. A client that starts with a plain braid hello
/// instead of a TLS ClientHello gets a refusal it can show, not a dropped connection.
async fn open_transport(state: &ServerState, stream: TcpStream) -> Result<(Reader, Writer, Transport), SessionError> {
    let Some(acceptor) = &state.tls else {
        let (reader, writer) = stream.into_split();
        return Ok(boxed(reader, writer, Transport::Plain));
    };
    let mut first = [0u8; 1];
    let peeked = stream.peek(&mut first).await?;
    if peeked == 1 && first[0] == TLS_HANDSHAKE_RECORD {
        let mut tls = acceptor.accept(stream).await.map_err(|e| SessionError::Tls(e.to_string()))?;
        // rustls takes at most 64 KiB of plaintext before it must write to the socket: a 1 MiB
        // read response then costs 16 small writes (and as many wake-ups of the client).
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
        let (reader, writer) = tokio::io::split(tls);
        return Ok(boxed(reader, writer, Transport::Tls));
    }
    let (reader, writer) = stream.into_split();
    Ok(boxed(reader, writer, Transport::PlainRefused))
}

fn boxed(
    reader: impl AsyncRead + Send + Unpin + 'static,
    writer: impl AsyncWrite + Send + Unpin + 'static,
    transport: Transport,
) -> (Reader, Writer, Transport) {
    // Plain TCP reads through a buffer: a request's header and message then come in one receive,
    // not three (header, payload, and the one that finds the socket empty). TLS has its own.
    let reader: Reader = match transport {
        Transport::Tls => Box::new(reader),
        Transport::Plain | Transport::PlainRefused => Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, reader)),
    };
    (reader, BufWriter::with_capacity(WRITE_BUFFER_BYTES, Box::new(writer)), transport)
}

/// Answers the client's hello; returns it with the payload checksum in force from then on and
/// the protocol version.
async fn handshake(
    state: &ServerState,
    reader: &mut Reader,
    writer: &mut Writer,
    transport: Transport,
) -> Result<(Hello, Checksum, u16), SessionError> {
    let frame = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), read_frame(reader, Checksum::Crc32c))
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    if frame.header.kind != FrameKind::Hello {
        return Err(SessionError::UnexpectedKind(frame.header.kind));
    }
    let hello: Hello = frame.decode()?;
    let welcome = match welcome(state, &hello, transport) {
        Ok(info) if info.version >= PREDECESSORS_VERSION => {
            Welcome::AcceptedAfter { info: Box::new(info), predecessors: state.predecessors.clone() }
        }
        Ok(info) => Welcome::Accepted(Box::new(info)),
        Err(reason) => Welcome::Refused { reason },
    };
    let bytes = encode_frame(FrameKind::Welcome, frame.header.request_id, &welcome, &[])?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    match welcome {
        Welcome::Accepted(info) | Welcome::AcceptedAfter { info, .. } => {
            let checksum = Checksum::from_name(&info.algorithms.checksum).expect("negotiate picks a checksum of this build");
            Ok((hello, checksum, info.version))
        }
        Welcome::Refused { reason } => Err(SessionError::Refused(reason)),
    }
}

fn welcome(state: &ServerState, hello: &Hello, transport: Transport) -> Result<ExportInfo, String> {
    let (cipher, auth) = match transport {
        Transport::Tls => ("tls13", "x509"),
        Transport::Plain => ("none", "none"),
        Transport::PlainRefused => {
            return Err("this server accepts only TLS connections from clients with a certificate of its authority: \
                        mount with the credentials made by `braid init` (see `braid mount --help`, --tls-dir)"
                .into())
        }
    };
    let (version, algorithms) = negotiate(hello, cipher, auth)?;
    let root = state.export.root_entry().map_err(|e| format!("export root unavailable: errno {}", e.0))?;
    Ok(ExportInfo {
        version,
        algorithms,
        root,
        read_only: state.read_only,
        max_bytes: state.export.max_bytes(),
        root_squash: state.root_squash,
        server_instance: state.instance,
        lease_ms: state.coherence.lease().as_millis().try_into().unwrap_or(u32::MAX),
    })
}

/// Picks the protocol version and checksum, and checks that every algorithm the client requires
/// is in force; the refusal names what is missing.
fn negotiate(hello: &Hello, cipher: &str, auth: &str) -> Result<(u16, Algorithms), String> {
    let version = PROTOCOL_VERSIONS
        .iter()
        .find(|v| hello.versions.contains(v))
        .ok_or_else(|| format!("no common protocol version: client speaks {:?}, server speaks {:?}", hello.versions, PROTOCOL_VERSIONS))?;
    // Only the client's order counts; "aead" (no payload checksum) only where there is an AEAD.
    let usable: Vec<&str> = Checksum::ALL.iter().filter(|c| c.fits(cipher != "none")).map(|c| c.name()).collect();
    let checksum = hello
        .checksums
        .iter()
        .find(|c| usable.contains(&c.as_str()))
        .ok_or_else(|| format!("no common checksum algorithm: client offers {:?}, server has {usable:?}", hello.checksums))?;
    let algorithms = Algorithms { checksum: checksum.clone(), cipher: cipher.into(), auth: auth.into() };
    if let Some(missing) = hello.require.iter().find(|r| !algorithms.names().contains(&r.as_str())) {
        return Err(format!(
            "the client requires {missing}, which this server does not offer on this connection \
             (checksums {usable:?}, cipher {cipher}, authentication {auth})"
        ));
    }
    Ok((*version, algorithms))
}

/// Reads one frame, checking the header before allocating the payload.
pub async fn read_frame(reader: &mut Reader, checksum: Checksum) -> Result<Frame, SessionError> {
    let header = read_header(reader).await?;
    read_payload(reader, header, checksum).await
}

async fn read_header(reader: &mut Reader) -> Result<FrameHeader, SessionError> {
    let mut head = [0u8; HEADER_BYTES];
    reader.read_exact(&mut head).await?;
    Ok(FrameHeader::decode(&head)?)
}

async fn read_payload(reader: &mut Reader, header: FrameHeader, checksum: Checksum) -> Result<Frame, SessionError> {
    let len = header.payload_bytes();
    // Into the spare capacity: zeroing up to 4 MiB per request first showed in profiles.
    let mut payload = Vec::with_capacity(len);
    if (&mut *reader).take(len as u64).read_to_end(&mut payload).await? < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Frame::from_payload(header, payload, checksum)?)
}

async fn read_requests(
    state: &Arc<ServerState>,
    reader: &mut Reader,
    tx: mpsc::Sender<Outgoing>,
    who: Peer,
    heard: &Heard,
) -> Result<(), SessionError> {
    let permits = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    loop {
        let header = match read_header(reader).await {
            Ok(header) => header,
            Err(SessionError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        heard.now();
        // Room for the payload in the server-wide budget before it is allocated.
        let budget = state.in_flight_bytes.clone().acquire_many_owned(header.payload_bytes() as u32).await.expect("never closed");
        let frame = read_payload(reader, header, who.checksum).await?;
        if frame.header.kind != FrameKind::Request {
            return Err(SessionError::UnexpectedKind(frame.header.kind));
        }
        let request: Request = frame.decode()?;
        tracing::trace!(client = who.client.0, ?request, "request");
        if let Request::Subscribe = request {
            subscribe(state, who, &tx).await;
            let done = Handled { result: Ok(Reply::Done), data: Vec::new(), grant: Grant::None };
            if tx.send(outgoing(state, who, frame.header.request_id, done)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if is_quick(state, who, &request) {
            // Quick requests are served right here: handing them to another thread costs more
            // (two wake-ups) than the few microseconds of file-system work they need.
            let id = frame.header.request_id;
            let handled = handle_blocking(state, who, request, frame);
            drop(budget);
            if tx.send(outgoing(state, who, id, handled)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        // Backpressure: stop reading this connection while it has too many requests in flight.
        let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
        let (state, tx) = (state.clone(), tx.clone());
        tokio::spawn(async move {
            let id = frame.header.request_id;
            match staged(request) {
                Ok((txn, written_back)) => {
                    let applied = apply_as_txn(&state, who, txn, written_back, frame).await;
                    let lsn = applied.txn_lsn();
                    drop(budget);
                    if tx.send(outgoing(&state, who, id, applied)).await.is_ok() {
                        // Always a second answer, also after a refusal: the commands before the
                        // one refused were applied, and the client waits for this one.
                        let committed = Handled::plain(Ok(Reply::Committed(commit_txn(&state, lsn).await)));
                        let _ = tx.send(outgoing(&state, who, id, committed)).await;
                    }
                }
                Err(request) => {
                    let handled = handle_request(&state, who, request, frame).await;
                    drop(budget);
                    let _ = tx.send(outgoing(&state, who, id, handled)).await;
                }
            }
            drop(permit);
        });
    }
}

/// The transaction of a request answered twice (applied, then durable), or the request.
fn staged(request: Request) -> Result<(braid_proto::Txn, Option<WrittenBack>), Request> {
    match request {
        Request::StagedTxn(txn) => Ok((txn, None)),
        Request::WriteBack { txn, queued, instance, staged: true } => Ok((txn, Some(WrittenBack::new(queued, instance)))),
        request => Err(request),
    }
}

/// A response ready to send: its header and message, and the bulk data that goes between.
struct Outgoing {
    frame: EncodedFrame,
    data: Vec<u8>,
}

fn outgoing(state: &ServerState, to: Peer, request_id: u64, handled: Handled) -> Outgoing {
    let Handled { result, data, grant } = handled;
    let response = Response { result, durable: state.committer.durable(), leased: grant.leased(), exclusive: grant.exclusive() };
    let frame = encode_parts(FrameKind::Response, request_id, &response, &data, to.checksum).expect("responses stay within limits");
    Outgoing { frame, data }
}

/// Makes this connection the client's callback channel. A callback that does not fit in the
/// connection's queue counts as undeliverable: the change then waits for the lease instead.
async fn subscribe(state: &Arc<ServerState>, who: Peer, tx: &mpsc::Sender<Outgoing>) {
    let tx = tx.clone();
    let sink: Sink = Arc::new(move |id, callback: &Callback| match encode_parts(FrameKind::Callback, id, callback, &[], who.checksum) {
        Ok(frame) => tx.try_send(Outgoing { frame, data: Vec::new() }).is_ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a callback");
            false
        }
    });
    let state = state.clone();
    // Writes the list of clients, and waits for changes in flight that recalled nothing: not
    // on the connection's task.
    let subscribed = tokio::task::spawn_blocking(move || {
        // On file before any right is granted: a restarted server must wait for this client.
        if let Err(e) = state.clients.remember(who.client, !state.coherence.in_grace()) {
            tracing::error!(error = %e, "cannot record a client in the list of clients; after a restart the grace period will last a whole lease");
            state.clients.distrust();
        }
        state.coherence.subscribe(who.client, who.session, sink)
    })
    .await;
    if let Err(e) = subscribed {
        tracing::error!(error = %e, "subscribe failed");
    }
}

/// Writes header, data and message with one vectored write where they do not fit in the buffer.
/// Written one by one, a response with 1 MiB of data went out as three sends, the header alone in
/// its own segment: the client woke for 32 bytes, then again for the data.
async fn write_response(writer: &mut Writer, out: &Outgoing) -> std::io::Result<()> {
    let mut parts = [IoSlice::new(&out.frame.header), IoSlice::new(&out.data), IoSlice::new(&out.frame.message)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        let written = writer.write_vectored(parts).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut parts, written);
    }
    Ok(())
}

async fn write_responses(mut writer: Writer, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Coalesce responses that are already waiting into one flush. Large data bypasses the
        // buffer (BufWriter writes it directly), so file data is not copied here.
        while let Some(out) = next {
            if write_response(&mut writer, &out).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// Uid and gid of "nobody", what a squashed remote root acts as.
const NOBODY: u32 = 65534;

/// The credentials a request acts with: with root squash, a remote root caller becomes nobody
/// and has no more power over the export than any other unprivileged user.
fn effective_creds(state: &ServerState, creds: braid_proto::Credentials) -> braid_proto::Credentials {
    match (state.root_squash, creds.uid) {
        (true, 0) => braid_proto::Credentials { uid: NOBODY, gid: NOBODY, groups: Vec::new() },
        _ => creds,
    }
}

/// Requests that never wait for the disk or for other clients in the common case: metadata
/// reads and small mutations (which only reach the page cache; durability is the committer's
/// job) when no other client can hold rights to recall.
/// A read may have to wait for another client to write back what it holds exclusively: that
/// wait must not block the connection's task.
fn is_quick(state: &ServerState, who: Peer, request: &Request) -> bool {
    let (client, version) = (who.client, who.version);
    if is_read(request) && state.coherence.changes_wait() {
        return false;
    }
    match request {
        Request::Read { len, .. } => *len <= 128 * 1024 && !state.coherence.exclusive_elsewhere(client),
        Request::Commit | Request::CommitUpTo(_) | Request::DurableTxn(_) | Request::StagedTxn(_) => false,
        Request::WriteBack { staged: true, .. } => false,
        Request::Txn(txn) | Request::WriteBack { txn, .. } => {
            txn.commands.len() <= 16 && !state.coherence.shared(client) && !state.coherence.changes_wait()
        }
        Request::StatFs | Request::Release { .. } | Request::CallbackDone { .. } | Request::Renew(_) => true,
        // It rewrites the list of clients, durably.
        Request::Unsubscribe => false,
        Request::Lock(_) | Request::LockReclaim(_) | Request::TestLock(_) | Request::Subscribe | Request::ReclaimDone => true,
        // From protocol 8 on the server waits for the lock a while: not on the reading task.
        Request::LockWait(_) => version < braid_proto::LOCK_WAIT_AT_SERVER_VERSION,
        _ => !state.coherence.exclusive_elsewhere(client),
    }
}

/// Whether `request` reads what a client of the previous server process may have changed in
/// its cache: during the grace period after a restart it waits until that is written back.
fn is_read(request: &Request) -> bool {
    matches!(
        request,
        Request::Lookup { .. }
            | Request::GetAttr { .. }
            | Request::ReadLink { .. }
            | Request::Read { .. }
            | Request::ReadDir { .. }
            | Request::GetXattr { .. }
            | Request::ListXattr { .. }
            | Request::XattrNames { .. }
            | Request::Lseek { .. }
            | Request::Open { .. }
    )
}

/// A request's outcome: the reply, the bulk data that goes with it, and the rights the client
/// now holds on what it names.
struct Handled {
    result: Result<Reply, WireError>,
    data: Vec<u8>,
    grant: Grant,
}

impl Handled {
    fn plain(result: Result<Reply, Errno>) -> Self {
        Self { result: result.map_err(WireError::Errno), data: Vec::new(), grant: Grant::None }
    }

    /// The lsn of the transaction this answers, if it answers one.
    fn txn_lsn(&self) -> Option<Lsn> {
        match &self.result {
            Ok(Reply::Txn(outcome)) => Some(outcome.lsn),
            _ => None,
        }
    }

    fn failed(error: WireError) -> Self {
        Self { result: Err(error), data: Vec::new(), grant: Grant::None }
    }
}

async fn handle_request(state: &Arc<ServerState>, who: Peer, request: Request, frame: Frame) -> Handled {
    match request {
        Request::Commit => Handled::plain(Ok(Reply::Committed(state.committer.commit().await))),
        Request::CommitUpTo(lsn) => Handled::plain(Ok(Reply::Committed(state.committer.commit_up_to(lsn).await))),
        Request::DurableTxn(txn) => {
            let handled = apply_as_txn(state, who, txn, None, frame).await;
            if handled.result.is_ok() {
                commit_txn(state, handled.txn_lsn()).await;
            }
            handled
        }
        Request::LockWait(request) if who.version >= braid_proto::LOCK_WAIT_AT_SERVER_VERSION => {
            Handled::plain(wait_for_lock(state, who.client, &request).await)
        }
        request => run_blocking(state, who, request, frame).await,
    }
}

/// How long a `LockWait` waits at the server for a conflicting lock to go before it is
/// answered with the conflict (the client then checks its caller for signals and asks again).
const LOCK_WAIT_SLICE: Duration = Duration::from_millis(100);

/// Takes a lock for an owner that waits: tries again whenever a lock changes, for up to
/// `LOCK_WAIT_SLICE`, so that a lock let go is taken at once instead of at the waiter's next
/// try (a client backing off up to 50 ms made waits of hundreds of milliseconds).
async fn wait_for_lock(state: &ServerState, client: ClientId, request: &LockRequest) -> Result<Reply, Errno> {
    let deadline = tokio::time::Instant::now() + LOCK_WAIT_SLICE;
    let changes = state.coherence.locks_changed();
    loop {
        let changed = changes.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match lock(state, client, request, LockMode::Wait)? {
            Reply::LockTest(Some(_)) if tokio::time::Instant::now() < deadline => {
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    return lock(state, client, request, LockMode::Wait);
                }
            }
            reply => return Ok(reply),
        }
    }
}

/// Returns once the transaction applied as `lsn` is durable (if it has none, everything
/// applied so far).
async fn commit_txn(state: &ServerState, lsn: Option<Lsn>) -> Lsn {
    match lsn {
        Some(lsn) => state.committer.commit_up_to(lsn).await,
        None => state.committer.commit().await,
    }
}

/// Applies the transaction of a `DurableTxn`, `StagedTxn` or staged `WriteBack` on a blocking
/// thread (see [`apply_change`]).
async fn apply_as_txn(
    state: &Arc<ServerState>,
    who: Peer,
    txn: braid_proto::Txn,
    written_back: Option<WrittenBack>,
    frame: Frame,
) -> Handled {
    on_a_blocking_thread(state, move |state| {
        let message = as_txn(&txn);
        apply_change(state, who, txn, written_back, &message, &frame.data)
    })
    .await
}

/// What a `WriteBack` says of the commands its client made in its cache.
#[derive(Debug, Clone, Copy)]
struct WrittenBack {
    /// How many of the transaction's first commands.
    queued: usize,
    /// The server process whose exclusive rights they were made under.
    instance: u64,
}

impl WrittenBack {
    fn new(queued: u32, instance: u64) -> Self {
        Self { queued: queued as usize, instance }
    }

    /// Whether `txn` changes nothing but what its client changed in its cache under rights of
    /// an earlier server process (the probes after them change nothing): during the grace
    /// period they are applied ahead of every other change (a `Reclaim`). A command made
    /// now, outside the cache, waits like any other change.
    fn reclaims(&self, state: &ServerState, txn: &braid_proto::Txn) -> bool {
        self.instance != state.instance && txn.commands.iter().skip(self.queued).all(Command::is_probe)
    }
}

/// The encoded `Txn` of a transaction that came in another request: the log holds every
/// transaction in that form, so that a resend in any form gets the same reply.
fn as_txn(txn: &braid_proto::Txn) -> Vec<u8> {
    postcard::to_stdvec(&Request::Txn(txn.clone())).expect("a txn always encodes")
}

/// Applies `txn`, whose `Txn` form is `message`: logged, deduplicated. Queued commands of a write-back
/// that the client made under exclusive rights it lost are refused (see `Fence`).
fn apply_change(
    state: &ServerState,
    who: Peer,
    mut txn: braid_proto::Txn,
    written_back: Option<WrittenBack>,
    message: &[u8],
    data: &[u8],
) -> Handled {
    if state.read_only {
        return Handled::failed(WireError::ReadOnly);
    }
    let client = who.client;
    txn.creds = effective_creds(state, txn.creds);
    let reclaim = written_back.filter(|w| w.reclaims(state, &txn)).and_then(|_| state.coherence.reclaim());
    let lost = match written_back {
        Some(w) if reclaim.is_none() => rights_lost(state, client, &txn, w),
        _ => Vec::new(),
    };
    let change = begin_change(state, client, &txn.commands, reclaim.as_ref());
    let sender = crate::applier::Sender {
        client,
        // From protocol version 6 on, a refused write does not stop the writes after it.
        writes_go_on: who.version >= braid_proto::BULK_TXN_VERSION,
        fence: crate::applier::Fence { queued: written_back.map_or(0, |w| w.queued), lost: &lost },
    };
    let result = crate::applier::apply_txn(&state.applier, &state.committer, &state.export, sender, &txn, message, data);
    let mut touched: Vec<&Handle> = txn.commands.iter().flat_map(Command::handles).filter(|h| h.created_index().is_none()).collect();
    if let Ok(Reply::Txn(outcome)) = &result {
        touched.extend(outcome.created());
    }
    let grant = state.coherence.end_change(change, touched);
    Handled { result, data: Vec::new(), grant }
}

/// The objects that the queued commands of a write-back name and that their client may no
/// longer change from its cache. Commands made under rights of an earlier server process and
/// written back after the grace period are judged as any others: their rights have run out
/// by then, and another client may have changed the objects since.
fn rights_lost(state: &ServerState, client: ClientId, txn: &braid_proto::Txn, written_back: WrittenBack) -> Vec<Handle> {
    let named = txn.commands.iter().take(written_back.queued).flat_map(Command::handles).filter(|h| h.created_index().is_none());
    let granted_by = if written_back.instance == state.instance { Granter::ThisProcess } else { Granter::Earlier };
    state.coherence.rights_lost(client, granted_by, named)
}

/// Serves `request` on a blocking thread (it may wait for the disk or for other clients).
async fn run_blocking(state: &Arc<ServerState>, who: Peer, request: Request, frame: Frame) -> Handled {
    on_a_blocking_thread(state, move |state| handle_blocking(state, who, request, frame)).await
}

async fn on_a_blocking_thread(state: &Arc<ServerState>, work: impl FnOnce(&ServerState) -> Handled + Send + 'static) -> Handled {
    let state = state.clone();
    tokio::task::spawn_blocking(move || work(&state))
        .await
        .unwrap_or_else(|e| Handled::failed(WireError::Malformed(format!("request handler failed: {e}"))))
}

/// Reads done again at most this often because another client held what they named
/// exclusively (and was asked to write it back); the last read's answer stands.
const FLUSHED_READS_MAX: usize = 4;

/// Runs a read of `subject` that grants `client` rights on the objects `named` lists in its
/// reply. If another client holds one of them exclusively, its changes are written back first
/// and the read is done again, so that no client reads what another has changed in its cache.
/// A failed read is done again the same way if another client holds `subject` exclusively: a
/// name missing here may be one that client created in its cache.
fn leased<T>(
    state: &ServerState,
    client: ClientId,
    subject: &Handle,
    read: impl Fn() -> Result<T, Errno>,
    named: impl Fn(&T) -> Vec<Handle>,
) -> (Result<T, Errno>, Grant) {
    for attempt in 1.. {
        let ticket = state.coherence.begin_read();
        let result = read();
        let flushed = match &result {
            Ok(value) => named(value),
            Err(_) => vec![subject.clone()],
        };
        if attempt < FLUSHED_READS_MAX && state.coherence.flush_others(client, &flushed) {
            state.coherence.cancel_read(ticket);
            continue;
        }
        return match result {
            Ok(value) => {
                let granted = state.coherence.grant(ticket, client, &flushed);
                (Ok(value), granted)
            }
            Err(e) => {
                state.coherence.cancel_read(ticket);
                (Err(e), Grant::None)
            }
        };
    }
    unreachable!("the loop returns")
}

/// A read that grants nothing but must see what other clients changed in their caches.
fn fresh<T>(state: &ServerState, client: ClientId, handle: &Handle, read: impl Fn() -> Result<T, Errno>) -> Result<T, Errno> {
    state.coherence.flush_others(client, std::slice::from_ref(handle));
    read()
}

fn handle_blocking(state: &ServerState, who: Peer, request: Request, frame: Frame) -> Handled {
    let (export, client) = (&state.export, who.client);
    if is_read(&request) {
        state.coherence.wait_out_grace();
    }
    let granting = |(result, grant): (Result<Reply, Errno>, Grant)| Handled { grant, ..Handled::plain(result) };
    match request {
        Request::Lookup { parent, name } => {
            granting(leased(state, client, &parent, || export.lookup(&parent, &name).map(Reply::Entry), |r| reply_handles(&parent, r)))
        }
        Request::GetAttr { handle } => {
            granting(leased(state, client, &handle, || export.getattr(&handle).map(Reply::Attr), |_| vec![handle.clone()]))
        }
        Request::ReadLink { handle } => {
            granting(leased(state, client, &handle, || export.readlink(&handle).map(Reply::ReadLink), |_| vec![handle.clone()]))
        }
        Request::Read { handle, offset, len } => {
            let len = len.min(braid_proto::limits::DATA_BYTES_MAX as u32);
            match leased(state, client, &handle, || export.read(&handle, offset, len), |_| vec![handle.clone()]) {
                (Ok(data), grant) => Handled { result: Ok(Reply::Read), data, grant },
                (Err(e), _) => Handled::plain(Err(e)),
            }
        }
        Request::ReadDir { handle, cookie, plus } => granting(leased(
            state,
            client,
            &handle,
            || export.readdir(&handle, cookie, plus).map(|(entries, eof)| Reply::ReadDir { entries, eof }),
            |r| reply_handles(&handle, r),
        )),
        Request::StatFs => Handled::plain(export.statfs().map(Reply::StatFs)),
        Request::GetXattr { handle, name } => getxattr(state, client, &handle, &name),
        Request::ListXattr { handle } => Handled::plain(fresh(state, client, &handle, || export.listxattr(&handle)).map(Reply::XattrList)),
        Request::XattrNames { handles } => xattr_names(state, client, handles),
        Request::Renew(handles) if handles.len() > braid_proto::limits::READDIR_ENTRIES_MAX => {
            Handled::failed(WireError::Malformed(format!("Renew of {} objects", handles.len())))
        }
        Request::Renew(handles) => Handled::plain(Ok(Reply::Renewed(state.coherence.renew(client, &handles)))),
        Request::Lseek { handle, offset, whence } => {
            Handled::plain(fresh(state, client, &handle, || export.lseek(&handle, offset, whence)).map(Reply::Lseek))
        }
        Request::Open { handle, creds, access } => {
            let creds = effective_creds(state, creds);
            granting(leased(
                state,
                client,
                &handle,
                || export.open_checked(&handle, &creds, access).map(|()| Reply::Done),
                |_| vec![handle.clone()],
            ))
        }
        Request::Release { handle } => Handled::plain(export.unpin(&handle).map(|()| Reply::Done)),
        Request::Txn(txn) => apply_change(state, who, txn, None, &frame.message, &frame.data),
        Request::WriteBack { txn, queued, instance, staged: false } => {
            let message = as_txn(&txn);
            apply_change(state, who, txn, Some(WrittenBack::new(queued, instance)), &message, &frame.data)
        }
        Request::Lock(request) => Handled::plain(lock(state, client, &request, LockMode::Take)),
        Request::LockWait(request) => Handled::plain(lock(state, client, &request, LockMode::Wait)),
        Request::LockReclaim(request) => Handled::plain(lock(state, client, &request, LockMode::Reclaim)),
        Request::TestLock(request) => Handled::plain(
            lock_wanted(export, client, &request).map(|(handle, wanted)| Reply::LockTest(state.coherence.test_lock(handle, &wanted))),
        ),
        Request::CallbackDone { id } => {
            state.coherence.callback_done(id);
            Handled::plain(Ok(Reply::Done))
        }
        Request::Unsubscribe => {
            state.coherence.unsubscribe(client);
            if let Err(e) = state.clients.forget(client) {
                tracing::warn!(error = %e, "cannot remove a client from the list of clients; a restart will wait for it");
            }
            state.coherence.reclaim_done(client);
            Handled::plain(Ok(Reply::Done))
        }
        Request::ReclaimDone => {
            state.coherence.reclaim_done(client);
            Handled::plain(Ok(Reply::Done))
        }
        Request::Subscribe => unreachable!("handled on the connection's task"),
        Request::Commit
        | Request::CommitUpTo(_)
        | Request::DurableTxn(_)
        | Request::StagedTxn(_)
        | Request::WriteBack { staged: true, .. } => unreachable!("handled by handle_request"),
    }
}

/// A missing attribute is leased like a value: the kernel asks for `security.capability` before
/// every write, and a client may answer that from its cache while it holds a right.
fn getxattr(state: &ServerState, client: ClientId, handle: &Handle, name: &[u8]) -> Handled {
    let read = || match state.export.getxattr(handle, name) {
        Ok(value) => Ok(Some(value)),
        Err(Errno(libc::ENODATA)) => Ok(None),
        Err(e) => Err(e),
    };
    let (result, grant) = leased(state, client, handle, read, |_| vec![handle.clone()]);
    let result = result.and_then(|value| value.ok_or(Errno(libc::ENODATA)));
    Handled { grant, ..Handled::plain(result.map(Reply::Xattr)) }
}

/// Bytes of names an `XattrNames` answer carries at most: the objects past them are unknown.
const XATTR_NAMES_BYTES_MAX: usize = braid_proto::limits::MESSAGE_BYTES_MAX / 2;

/// The extended attribute names of each of `handles`, under a lease on all of them (another
/// client's change of one is recalled like any change).
fn xattr_names(state: &ServerState, client: ClientId, handles: Vec<Handle>) -> Handled {
    if handles.len() > braid_proto::limits::READDIR_ENTRIES_MAX {
        return Handled::failed(WireError::Malformed(format!("XattrNames of {} objects", handles.len())));
    }
    let Some(first) = handles.first() else { return Handled::plain(Ok(Reply::XattrNames(Vec::new()))) };
    let read = || {
        let mut budget = XATTR_NAMES_BYTES_MAX;
        let mut lists = Vec::with_capacity(handles.len());
        for handle in &handles {
            // A few bytes of framing per object besides the names.
            let names = state.export.listxattr(handle).ok().filter(|names| names.len() + 8 <= budget);
            budget -= names.as_ref().map_or(0, |names| names.len() + 8);
            lists.push(names);
        }
        Ok(lists)
    };
    let (result, grant) = leased(state, client, first, read, |_| handles.clone());
    Handled { grant, ..Handled::plain(result.map(Reply::XattrNames)) }
}

/// The objects a lookup or readdir reply names: the directory and every entry in it.
fn reply_handles(directory: &Handle, reply: &Reply) -> Vec<Handle> {
    let mut handles = vec![directory.clone()];
    match reply {
        Reply::Entry(entry) => handles.push(entry.handle.clone()),
        Reply::ReadDir { entries, .. } => handles.extend(entries.iter().filter_map(|e| e.entry.as_ref().map(|e| e.handle.clone()))),
        _ => {}
    }
    handles
}

/// Starts a change: on the fast path when no other client can hold rights, otherwise after
/// recalling everything the commands touch from every other holder.
fn begin_change(state: &ServerState, client: ClientId, commands: &[Command], reclaim: Option<&Reclaim<'_>>) -> Change {
    if let Some(change) = state.coherence.begin_alone(client, reclaim) {
        return change;
    }
    state.coherence.begin_change(client, &invalidations(&state.export, commands), reclaim)
}

/// What other clients must stop caching before `commands` apply: the objects they change and
/// the names they add or remove. Names are looked up before the change, while they still
/// name what is about to be removed or replaced.
fn invalidations(export: &Export, commands: &[Command]) -> Vec<Invalidation> {
    let mut items = Vec::new();
    let entry = |items: &mut Vec<Invalidation>, parent: &Handle, name: &[u8]| {
        items.push(Invalidation::Object(parent.clone()));
        items.push(Invalidation::Entry { parent: parent.clone(), name: name.to_vec() });
        if let Ok(existing) = export.lookup(parent, name) {
            items.push(Invalidation::Object(existing.handle));
        }
    };
    for command in commands {
        match command {
            Command::Create { parent, name, .. }
            | Command::Mkdir { parent, name, .. }
            | Command::Symlink { parent, name, .. }
            | Command::Unlink { parent, name }
            | Command::Rmdir { parent, name } => entry(&mut items, parent, name),
            Command::Link { handle, new_parent, new_name } => {
                items.push(Invalidation::Object(handle.clone()));
                entry(&mut items, new_parent, new_name);
            }
            Command::Rename { parent, name, new_parent, new_name, .. } => {
                entry(&mut items, parent, name);
                entry(&mut items, new_parent, new_name);
            }
            Command::CopyFileRange { target, .. } => items.push(Invalidation::Object(target.clone())),
            other => items.extend(other.handles().into_iter().map(|h| Invalidation::Object(h.clone()))),
        }
    }
    // Objects created by this very transaction: nobody else can hold them.
    items.retain(|item| match item {
        Invalidation::Object(handle) | Invalidation::Entry { parent: handle, .. } => handle.created_index().is_none(),
    });
    items
}

/// Decodes a lock request, checking its handle (a forged one must not grow the lock table).
fn lock_wanted<'r>(export: &Export, client: ClientId, request: &'r LockRequest) -> Result<(&'r Handle, Wanted), Errno> {
    if request.start > request.end {
        return Err(Errno(libc::EINVAL));
    }
    export.getattr(&request.handle)?;
    let owner = Owner { client, id: request.owner };
    Ok((&request.handle, Wanted { owner, kind: request.kind, start: request.start, end: request.end, pid: request.pid }))
}

fn lock(state: &ServerState, client: ClientId, request: &LockRequest, mode: LockMode) -> Result<Reply, Errno> {
    let (handle, wanted) = lock_wanted(&state.export, client, request)?;
    match state.coherence.set_lock(client, handle, &wanted, mode) {
        Ok(result) => Ok(Reply::LockTest(result.err())),
        Err(LockRefused::TableFull | LockRefused::NotHeld) => Err(Errno(libc::ENOLCK)),
        Err(LockRefused::Deadlock) => Err(Errno(libc::EDEADLK)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_proto::ClientId;

    fn hello() -> Hello {
        Hello::new(ClientId(1), "t".into())
    }

    #[test]
    fn negotiation_picks_common_algorithms_and_names_what_is_missing() {
        // Goal: the refusal names the first missing algorithm; success reports what is in force.
        let (version, algorithms) = negotiate(&hello(), "tls13", "x509").unwrap();
        assert_eq!(version, 10);
        for older in 1..10u16 {
            let client = Hello { versions: (1..=older).rev().collect(), ..hello() };
            assert_eq!(negotiate(&client, "tls13", "x509").unwrap().0, older, "a version-{older} client is still served");
        }
        assert_eq!(algorithms.names(), ["aead", "tls13", "x509"], "under TLS the AEAD covers the payload");
        assert_eq!(negotiate(&hello(), "none", "none").unwrap().1.checksum, "crc32c", "plain TCP always sums the payload");
        let only_aead = Hello { checksums: vec!["aead".into()], ..hello() };
        assert!(negotiate(&only_aead, "none", "none").unwrap_err().contains("no common checksum"));
        let insists_on_crc = hello().requiring(vec!["crc32c".into()]);
        assert_eq!(negotiate(&insists_on_crc, "tls13", "x509").unwrap().1.checksum, "crc32c");

        let wants_blake3 = Hello { checksums: vec!["blake3".into()], ..hello() };
        assert!(negotiate(&wants_blake3, "none", "none").unwrap_err().contains("no common checksum"));

        let requires_tls = Hello { require: vec!["tls13".into()], ..hello() };
        let refusal = negotiate(&requires_tls, "none", "none").unwrap_err();
        assert!(refusal.contains("requires tls13"), "{refusal}");
        assert!(negotiate(&requires_tls, "tls13", "x509").is_ok());

        let future = Hello { versions: vec![PROTOCOL_VERSIONS[0] + 1], ..hello() };
        assert!(negotiate(&future, "none", "none").unwrap_err().contains("no common protocol version"));
    }
}
