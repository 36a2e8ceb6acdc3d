//! The connection to the server, kept alive across failures.
//!
//! A supervisor task owns the socket: it writes queued frames, reads responses and routes each
//! to its waiting call by request id. When the socket fails it reconnects with backoff, and
//! sends again every request that has no response yet, in request order, then restores the
//! server-side pins of open files if the server restarted.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braid_proto::limits::REQUESTS_IN_FLIGHT_MAX;
use braid_proto::{
    encode_frame, ClientId, ExportInfo, Frame, FrameHeader, FrameKind, Handle, Hello, Lsn, Reply, Request, Response, Welcome,
    HEADER_BYTES, PROTOCOL_VERSIONS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{wire_error, ClientConfig, ClientError, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

type SharedFrame = Arc<Vec<u8>>;

struct Pending {
    frame: SharedFrame,
    reply: oneshot::Sender<Frame>,
}

#[derive(Default)]
struct State {
    /// Requests without a response, by request id (= send order).
    pending: BTreeMap<u64, Pending>,
    /// Queue to the writer of the live socket; `None` while disconnected.
    sender: Option<mpsc::Sender<SharedFrame>>,
    server_instance: u64,
}

pub struct Connection {
    config: ClientConfig,
    client_id: ClientId,
    state: Mutex<State>,
    next_request_id: AtomicU64,
    durable: AtomicU64,
    permits: Semaphore,
    /// Open count per handle, to restore the server's pins after it restarts.
    pins: Mutex<HashMap<Handle, i64>>,
}

struct Link {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    info: ExportInfo,
}

impl Connection {
    pub(crate) async fn open(config: ClientConfig, client_id: ClientId) -> Result<(Arc<Self>, ExportInfo)> {
        let link = connect(&config, client_id).await?;
        let info = link.info.clone();
        let connection = Arc::new(Self {
            config,
            client_id,
            state: Mutex::new(State { server_instance: info.server_instance, ..State::default() }),
            next_request_id: AtomicU64::new(1),
            durable: AtomicU64::new(0),
            permits: Semaphore::new(REQUESTS_IN_FLIGHT_MAX),
            pins: Mutex::new(HashMap::new()),
        });
        tokio::spawn(connection.clone().supervise(link));
        Ok((connection, info))
    }

    pub fn durable(&self) -> Lsn {
        Lsn(self.durable.load(Ordering::Acquire))
    }

    pub(crate) fn pin(&self, handle: &Handle, delta: i64) {
        let mut pins = self.pins.lock().expect("pins lock");
        let count = pins.entry(handle.clone()).or_insert(0);
        *count += delta;
        if *count <= 0 {
            pins.remove(handle);
        }
    }

    /// Sends `request` and waits for its response, across reconnects, within the retry budget.
    pub async fn call(&self, request: Request, data: Vec<u8>) -> Result<(Reply, Vec<u8>)> {
        let _permit = self.permits.acquire().await.expect("semaphore never closed");
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = Arc::new(encode_frame(FrameKind::Request, id, &request, &data).map_err(|e| ClientError::Protocol(e.to_string()))?);
        let (reply_tx, reply_rx) = oneshot::channel();
        let sender = {
            let mut state = self.state.lock().expect("connection lock");
            state.pending.insert(id, Pending { frame: frame.clone(), reply: reply_tx });
            state.sender.clone()
        };
        if let Some(sender) = sender {
            // A closed queue means the socket just died; the reconnect resends from `pending`.
            let _ = sender.send(frame).await;
        }
        let frame = match self.config.retry_budget {
            Some(budget) => match tokio::time::timeout(budget, reply_rx).await {
                Ok(reply) => reply,
                Err(_) => {
                    self.state.lock().expect("connection lock").pending.remove(&id);
                    return Err(ClientError::TimedOut { server: self.config.server.clone(), budget_ms: budget.as_millis() });
                }
            },
            None => reply_rx.await,
        }
        .map_err(|_| ClientError::Protocol("connection supervisor stopped".into()))?;
        let response: Response = frame.decode().map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.durable.fetch_max(response.durable.0, Ordering::AcqRel);
        let reply = response.result.map_err(wire_error)?;
        Ok((reply, frame.data))
    }

    async fn supervise(self: Arc<Self>, first: Link) {
        let mut link = Some(first);
        loop {
            let Link { reader, writer, info } = match link.take() {
                Some(link) => link,
                None => self.reconnect().await,
            };
            let (tx, rx) = mpsc::channel(REQUESTS_IN_FLIGHT_MAX * 2);
            let writer_task = tokio::spawn(write_frames(writer, rx));
            let (resend, restarted) = {
                let mut state = self.state.lock().expect("connection lock");
                state.sender = Some(tx.clone());
                let restarted = state.server_instance != info.server_instance;
                state.server_instance = info.server_instance;
                (state.pending.values().map(|p| p.frame.clone()).collect::<Vec<_>>(), restarted)
            };
            if !resend.is_empty() {
                tracing::info!(requests = resend.len(), "resending requests without a reply");
            }
            for frame in resend {
                let _ = tx.send(frame).await;
            }
            if restarted {
                tokio::spawn(self.clone().restore_pins());
            }
            let error = self.read_responses(reader).await;
            self.state.lock().expect("connection lock").sender = None;
            writer_task.abort();
            tracing::warn!(server = %self.config.server, %error, "connection lost; reconnecting");
        }
    }

    async fn reconnect(&self) -> Link {
        let mut backoff = Duration::from_millis(20);
        loop {
            match connect(&self.config, self.client_id).await {
                Ok(link) => {
                    tracing::info!(server = %self.config.server, "reconnected");
                    return link;
                }
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    async fn restore_pins(self: Arc<Self>) {
        let pins: Vec<(Handle, i64)> = self.pins.lock().expect("pins lock").iter().map(|(h, n)| (h.clone(), *n)).collect();
        for (handle, count) in pins {
            for _ in 0..count {
                if let Err(e) = self.call(Request::Open { handle: handle.clone() }, Vec::new()).await {
                    tracing::warn!(?handle, error = %e, "cannot restore an open file after the server restarted");
                }
            }
        }
    }

    async fn read_responses(&self, mut reader: OwnedReadHalf) -> String {
        loop {
            let frame = match read_frame(&mut reader).await {
                Ok(frame) => frame,
                Err(e) => return e,
            };
            if frame.header.kind != FrameKind::Response {
                return format!("unexpected {:?} frame from the server", frame.header.kind);
            }
            let waiter = self.state.lock().expect("connection lock").pending.remove(&frame.header.request_id);
            // No waiter: the reply to a call that timed out; nothing to do.
            if let Some(waiter) = waiter {
                let _ = waiter.reply.send(frame);
            }
        }
    }
}

async fn write_frames(writer: OwnedWriteHalf, mut rx: mpsc::Receiver<SharedFrame>) {
    let mut writer = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(frame) = rx.recv().await {
        if writer.write_all(&frame).await.is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if writer.write_all(&more).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

async fn read_frame(reader: &mut OwnedReadHalf) -> std::result::Result<Frame, String> {
    let mut head = [0u8; HEADER_BYTES];
    reader.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let header = FrameHeader::decode(&head).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; header.payload_bytes()];
    reader.read_exact(&mut payload).await.map_err(|e| e.to_string())?;
    Frame::from_payload(header, payload).map_err(|e| e.to_string())
}

async fn connect(config: &ClientConfig, client_id: ClientId) -> Result<Link> {
    let unreachable = |reason: String| ClientError::Unreachable { server: config.server.clone(), reason };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&config.server))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let hello = Hello { versions: PROTOCOL_VERSIONS.to_vec(), client_id, client_name: config.client_name.clone() };
    let bytes = encode_frame(FrameKind::Hello, 0, &hello, &[]).map_err(|e| ClientError::Protocol(e.to_string()))?;
    writer.write_all(&bytes).await.map_err(|e| unreachable(e.to_string()))?;
    let frame = tokio::time::timeout(CONNECT_TIMEOUT * 2, read_frame(&mut reader))
        .await
        .map_err(|_| unreachable("no answer to hello".into()))?
        .map_err(|e| unreachable(format!("handshake: {e}")))?;
    if frame.header.kind != FrameKind::Welcome {
        return Err(ClientError::Protocol(format!("expected welcome, got {:?}", frame.header.kind)));
    }
    match frame.decode::<Welcome>().map_err(|e| ClientError::Protocol(e.to_string()))? {
        Welcome::Accepted(info) => Ok(Link { reader, writer, info }),
        Welcome::Refused { reason } => Err(ClientError::Refused { server: config.server.clone(), reason }),
    }
}
