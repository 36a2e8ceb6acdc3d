//! One client connection: handshake, then a reader loop that dispatches requests to tasks and
//! a writer task that sends responses in the order they complete.
//!
//! Junk on the port (bad magic, bad checksum, oversized lengths, undecodable messages,
//! truncated frames) closes this connection with one log line; the server keeps serving others.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use braid_proto::limits::{HANDSHAKE_TIMEOUT_MS, REQUESTS_IN_FLIGHT_MAX};
use braid_proto::{
    encode_frame, encode_parts, Algorithms, EncodedFrame, ExportInfo, Frame, FrameHeader, FrameKind, Hello, Reply, Request, Response,
    Welcome, WireError, CHECKSUMS, HEADER_BYTES, PROTOCOL_VERSIONS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

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
    let (mut reader, writer, hello, transport) = match start(&state, stream).await {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "closing connection during handshake");
            return;
        }
    };
    tracing::info!(%peer, client = hello.client_id.0, name = %hello.client_name, ?transport, "client connected");
    let (tx, rx) = mpsc::channel::<Outgoing>(REQUESTS_IN_FLIGHT_MAX);
    let writer_task = tokio::spawn(write_responses(writer, rx));
    if let Err(e) = read_requests(&state, &mut reader, tx, hello.client_id).await {
        tracing::warn!(%peer, client = hello.client_id.0, error = %e, "closing connection");
    } else {
        tracing::info!(%peer, client = hello.client_id.0, "client disconnected");
    }
    writer_task.abort();
}

/// Transport set-up and handshake: everything before the first request.
async fn start(state: &ServerState, stream: TcpStream) -> Result<(Reader, Writer, Hello, Transport), SessionError> {
    let opened = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), open_transport(state, stream));
    let (mut reader, mut writer, transport) = opened.await.map_err(|_| SessionError::HandshakeTimeout)??;
    let hello = handshake(state, &mut reader, &mut writer, transport).await?;
    Ok((reader, writer, hello, transport))
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
        let tls = acceptor.accept(stream).await.map_err(|e| SessionError::Tls(e.to_string()))?;
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
    (Box::new(reader), BufWriter::with_capacity(WRITE_BUFFER_BYTES, Box::new(writer)), transport)
}

async fn handshake(state: &ServerState, reader: &mut Reader, writer: &mut Writer, transport: Transport) -> Result<Hello, SessionError> {
    let frame = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), read_frame(reader))
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    if frame.header.kind != FrameKind::Hello {
        return Err(SessionError::UnexpectedKind(frame.header.kind));
    }
    let hello: Hello = frame.decode()?;
    let welcome = match welcome(state, &hello, transport) {
        Ok(info) => Welcome::Accepted(Box::new(info)),
        Err(reason) => Welcome::Refused { reason },
    };
    let bytes = encode_frame(FrameKind::Welcome, frame.header.request_id, &welcome, &[])?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    match welcome {
        Welcome::Accepted(_) => Ok(hello),
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
    })
}

/// Picks the protocol version and checksum, and checks that every algorithm the client requires
/// is in force; the refusal names what is missing.
fn negotiate(hello: &Hello, cipher: &str, auth: &str) -> Result<(u16, Algorithms), String> {
    let version = PROTOCOL_VERSIONS
        .iter()
        .find(|v| hello.versions.contains(v))
        .ok_or_else(|| format!("no common protocol version: client speaks {:?}, server speaks {:?}", hello.versions, PROTOCOL_VERSIONS))?;
    let checksum = hello
        .checksums
        .iter()
        .find(|c| CHECKSUMS.contains(&c.as_str()))
        .ok_or_else(|| format!("no common checksum algorithm: client offers {:?}, server has {:?}", hello.checksums, CHECKSUMS))?;
    let algorithms = Algorithms { checksum: checksum.clone(), cipher: cipher.into(), auth: auth.into() };
    if let Some(missing) = hello.require.iter().find(|r| !algorithms.names().contains(&r.as_str())) {
        return Err(format!(
            "the client requires {missing}, which this server does not offer on this connection \
             (checksums {CHECKSUMS:?}, cipher {cipher}, authentication {auth})"
        ));
    }
    Ok((*version, algorithms))
}

/// Reads one frame, checking the header before allocating the payload.
pub async fn read_frame(reader: &mut Reader) -> Result<Frame, SessionError> {
    let header = read_header(reader).await?;
    read_payload(reader, header).await
}

async fn read_header(reader: &mut Reader) -> Result<FrameHeader, SessionError> {
    let mut head = [0u8; HEADER_BYTES];
    reader.read_exact(&mut head).await?;
    Ok(FrameHeader::decode(&head)?)
}

async fn read_payload(reader: &mut Reader, header: FrameHeader) -> Result<Frame, SessionError> {
    let mut payload = vec![0u8; header.payload_bytes()];
    reader.read_exact(&mut payload).await?;
    Ok(Frame::from_payload(header, payload)?)
}

async fn read_requests(
    state: &Arc<ServerState>,
    reader: &mut Reader,
    tx: mpsc::Sender<Outgoing>,
    client: braid_proto::ClientId,
) -> Result<(), SessionError> {
    let permits = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    loop {
        let header = match read_header(reader).await {
            Ok(header) => header,
            Err(SessionError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        // Room for the payload in the server-wide budget before it is allocated.
        let budget = state.in_flight_bytes.clone().acquire_many_owned(header.payload_bytes() as u32).await.expect("never closed");
        let frame = read_payload(reader, header).await?;
        if frame.header.kind != FrameKind::Request {
            return Err(SessionError::UnexpectedKind(frame.header.kind));
        }
        let request: Request = frame.decode()?;
        if is_quick(&request) {
            // Quick requests are served right here: handing them to another thread costs more
            // (two wake-ups) than the few microseconds of file-system work they need.
            let id = frame.header.request_id;
            let handled = handle_blocking(state, client, request, frame);
            drop(budget);
            if tx.send(outgoing(state, id, handled)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        // Backpressure: stop reading this connection while it has too many requests in flight.
        let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
        let (state, tx) = (state.clone(), tx.clone());
        tokio::spawn(async move {
            let id = frame.header.request_id;
            let handled = handle_request(&state, client, request, frame).await;
            drop(budget);
            let _ = tx.send(outgoing(&state, id, handled)).await;
            drop(permit);
        });
    }
}

/// A response ready to send: its header and message, and the bulk data that goes between.
struct Outgoing {
    frame: EncodedFrame,
    data: Vec<u8>,
}

fn outgoing(state: &ServerState, request_id: u64, (result, data): Handled) -> Outgoing {
    let response = Response { result, durable: state.committer.durable() };
    let frame = encode_parts(FrameKind::Response, request_id, &response, &data).expect("responses stay within limits");
    Outgoing { frame, data }
}

async fn write_responses(mut writer: Writer, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Coalesce responses that are already waiting into one flush. Large data bypasses the
        // buffer (BufWriter writes it directly), so file data is not copied here.
        while let Some(out) = next {
            let written = async {
                writer.write_all(&out.frame.header).await?;
                writer.write_all(&out.data).await?;
                writer.write_all(&out.frame.message).await
            };
            if written.await.is_err() {
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

/// Requests that never wait for the disk in the common case: metadata reads and small
/// mutations (which only reach the page cache; durability is the committer's job).
fn is_quick(request: &Request) -> bool {
    match request {
        Request::Read { len, .. } => *len <= 128 * 1024,
        Request::Commit => false,
        Request::Txn(txn) => txn.commands.len() <= 16,
        _ => true,
    }
}

type Handled = (Result<Reply, WireError>, Vec<u8>);

async fn handle_request(state: &Arc<ServerState>, client: braid_proto::ClientId, request: Request, frame: Frame) -> Handled {
    if let Request::Commit = request {
        return (Ok(Reply::Committed(state.committer.commit().await)), Vec::new());
    }
    let state = state.clone();
    tokio::task::spawn_blocking(move || handle_blocking(&state, client, request, frame))
        .await
        .unwrap_or_else(|e| (Err(WireError::Malformed(format!("request handler failed: {e}"))), Vec::new()))
}

fn handle_blocking(state: &ServerState, client: braid_proto::ClientId, request: Request, frame: Frame) -> Handled {
    use braid_proto::Errno;
    let export = &state.export;
    let plain = |r: Result<Reply, Errno>| (r.map_err(WireError::Errno), Vec::new());
    match request {
        Request::Lookup { parent, name } => plain(export.lookup(&parent, &name).map(Reply::Entry)),
        Request::GetAttr { handle } => plain(export.getattr(&handle).map(Reply::Attr)),
        Request::ReadLink { handle } => plain(export.readlink(&handle).map(Reply::ReadLink)),
        Request::Read { handle, offset, len } => {
            let len = len.min(braid_proto::limits::DATA_BYTES_MAX as u32);
            match export.read(&handle, offset, len) {
                Ok(data) => (Ok(Reply::Read), data),
                Err(e) => (Err(WireError::Errno(e)), Vec::new()),
            }
        }
        Request::ReadDir { handle, cookie, plus } => {
            plain(export.readdir(&handle, cookie, plus).map(|(entries, eof)| Reply::ReadDir { entries, eof }))
        }
        Request::StatFs => plain(export.statfs().map(Reply::StatFs)),
        Request::GetXattr { handle, name } => plain(export.getxattr(&handle, &name).map(Reply::Xattr)),
        Request::ListXattr { handle } => plain(export.listxattr(&handle).map(Reply::XattrList)),
        Request::Lseek { handle, offset, whence } => plain(export.lseek(&handle, offset, whence).map(Reply::Lseek)),
        Request::Open { handle, creds, access } => {
            plain(export.open_checked(&handle, &effective_creds(state, creds), access).map(|()| Reply::Done))
        }
        Request::Release { handle } => plain(export.unpin(&handle).map(|()| Reply::Done)),
        Request::Txn(mut txn) => {
            if state.read_only {
                return (Err(WireError::ReadOnly), Vec::new());
            }
            txn.creds = effective_creds(state, txn.creds);
            let result = crate::applier::apply_txn(&state.applier, &state.committer, export, client, &txn, &frame.message, &frame.data);
            (result, Vec::new())
        }
        Request::Commit => unreachable!("handled without blocking"),
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
        assert_eq!(version, 1);
        assert_eq!(algorithms.names(), ["crc32c", "tls13", "x509"]);

        let wants_blake3 = Hello { checksums: vec!["blake3".into()], ..hello() };
        assert!(negotiate(&wants_blake3, "none", "none").unwrap_err().contains("no common checksum"));

        let requires_tls = Hello { require: vec!["tls13".into()], ..hello() };
        let refusal = negotiate(&requires_tls, "none", "none").unwrap_err();
        assert!(refusal.contains("requires tls13"), "{refusal}");
        assert!(negotiate(&requires_tls, "tls13", "x509").is_ok());

        let future = Hello { versions: vec![7], ..hello() };
        assert!(negotiate(&future, "none", "none").unwrap_err().contains("no common protocol version"));
    }
}
