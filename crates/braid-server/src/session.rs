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
    encode_frame, encode_parts, EncodedFrame, ExportInfo, Frame, FrameHeader, FrameKind, Hello, Reply, Request, Response, Welcome, WireError, HEADER_BYTES,
    PROTOCOL_VERSIONS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
}

pub async fn serve_connection(state: Arc<ServerState>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    let hello = match handshake(&state, &mut reader, &mut writer).await {
        Ok(hello) => hello,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "closing connection during handshake");
            return;
        }
    };
    tracing::info!(%peer, client = hello.client_id.0, name = %hello.client_name, "client connected");
    let (tx, rx) = mpsc::channel::<Outgoing>(REQUESTS_IN_FLIGHT_MAX);
    let writer_task = tokio::spawn(write_responses(writer, rx));
    if let Err(e) = read_requests(&state, &mut reader, tx, hello.client_id).await {
        tracing::warn!(%peer, client = hello.client_id.0, error = %e, "closing connection");
    } else {
        tracing::info!(%peer, client = hello.client_id.0, "client disconnected");
    }
    writer_task.abort();
}

async fn handshake(state: &ServerState, reader: &mut OwnedReadHalf, writer: &mut BufWriter<OwnedWriteHalf>) -> Result<Hello, SessionError> {
    let frame = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), read_frame(reader))
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    if frame.header.kind != FrameKind::Hello {
        return Err(SessionError::UnexpectedKind(frame.header.kind));
    }
    let hello: Hello = frame.decode()?;
    let welcome = match (PROTOCOL_VERSIONS.iter().find(|v| hello.versions.contains(v)), state.export.root_entry()) {
        (Some(&version), Ok(root)) => {
            Welcome::Accepted(ExportInfo { version, root, read_only: state.read_only, server_instance: state.instance })
        }
        (None, _) => Welcome::Refused {
            reason: format!("no common protocol version: client speaks {:?}, server speaks {:?}", hello.versions, PROTOCOL_VERSIONS),
        },
        (_, Err(e)) => Welcome::Refused { reason: format!("export root unavailable: errno {}", e.0) },
    };
    let bytes = encode_frame(FrameKind::Welcome, frame.header.request_id, &welcome, &[])?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    match welcome {
        Welcome::Accepted(_) => Ok(hello),
        Welcome::Refused { reason } => Err(SessionError::Refused(reason)),
    }
}

/// Reads one frame, checking the header before allocating the payload.
pub async fn read_frame(reader: &mut OwnedReadHalf) -> Result<Frame, SessionError> {
    let mut head = [0u8; HEADER_BYTES];
    reader.read_exact(&mut head).await?;
    let header = FrameHeader::decode(&head)?;
    let mut payload = vec![0u8; header.payload_bytes()];
    reader.read_exact(&mut payload).await?;
    Ok(Frame::from_payload(header, payload)?)
}

async fn read_requests(
    state: &Arc<ServerState>,
    reader: &mut OwnedReadHalf,
    tx: mpsc::Sender<Outgoing>,
    client: braid_proto::ClientId,
) -> Result<(), SessionError> {
    let permits = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    loop {
        let frame = match read_frame(reader).await {
            Ok(frame) => frame,
            Err(SessionError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if frame.header.kind != FrameKind::Request {
            return Err(SessionError::UnexpectedKind(frame.header.kind));
        }
        let request: Request = frame.decode()?;
        if is_quick(&request) {
            // Quick requests are served right here: handing them to another thread costs more
            // (two wake-ups) than the few microseconds of file-system work they need.
            let id = frame.header.request_id;
            let handled = handle_blocking(state, client, request, frame);
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

async fn write_responses(mut writer: BufWriter<OwnedWriteHalf>, mut rx: mpsc::Receiver<Outgoing>) {
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
        Request::Open { handle } => plain(export.pin(&handle).map(|()| Reply::Done)),
        Request::Release { handle } => plain(export.unpin(&handle).map(|()| Reply::Done)),
        Request::Txn(txn) => {
            if state.read_only {
                return (Err(WireError::ReadOnly), Vec::new());
            }
            let result = crate::applier::apply_txn(&state.applier, &state.committer, export, client, &txn, &frame.message, &frame.data);
            (result, Vec::new())
        }
        Request::Commit => unreachable!("handled without blocking"),
    }
}
