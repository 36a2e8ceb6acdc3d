//! The connection to the server, kept alive across failures.
//!
//! Callers write their request frame straight to the socket (under a lock) and wait for the
//! response on their own channel: no hand-off to another thread on the way out, which on a
//! small machine costs more than the network round trip. One reader thread per connection
//! routes each response to its caller by request id. When the socket fails, the reader thread
//! reconnects with backoff, sends again every request without a response, in request order,
//! and restores the server-side pins of open files if the server restarted.
use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use braid_proto::limits::REQUESTS_IN_FLIGHT_MAX;
use braid_proto::{
    encode_frame, ClientId, ExportInfo, Frame, FrameHeader, FrameKind, Handle, Hello, Lsn, Reply, Request, Response, Welcome,
    HEADER_BYTES, PROTOCOL_VERSIONS,
};

use crate::{wire_error, ClientConfig, ClientError, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

type SharedFrame = Arc<Vec<u8>>;

struct Pending {
    frame: SharedFrame,
    reply: SyncSender<Frame>,
}

struct State {
    /// Requests without a response, by request id (= send order).
    pending: BTreeMap<u64, Pending>,
    /// The live socket's write side; `None` while disconnected.
    writer: Option<Arc<Mutex<TcpStream>>>,
    server_instance: u64,
}

pub struct Connection {
    config: ClientConfig,
    client_id: ClientId,
    state: Mutex<State>,
    next_request_id: AtomicU64,
    durable: AtomicU64,
    in_flight: Gate,
    /// Open count per handle, to restore the server's pins after it restarts.
    pins: Mutex<HashMap<Handle, i64>>,
}

/// A counting gate bounding the requests in flight, as the server's limit.
struct Gate {
    count: Mutex<usize>,
    freed: Condvar,
}

impl Gate {
    fn enter(&self) -> GateGuard<'_> {
        let mut count = self.count.lock().expect("gate lock");
        while *count >= REQUESTS_IN_FLIGHT_MAX {
            count = self.freed.wait(count).expect("gate lock");
        }
        *count += 1;
        GateGuard(self)
    }
}

struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        *self.0.count.lock().expect("gate lock") -= 1;
        self.0.freed.notify_one();
    }
}

struct Link {
    stream: TcpStream,
    info: ExportInfo,
}

impl Connection {
    pub(crate) fn open(config: ClientConfig, client_id: ClientId) -> Result<(Arc<Self>, ExportInfo)> {
        let link = connect(&config, client_id)?;
        let info = link.info.clone();
        let connection = Arc::new(Self {
            config,
            client_id,
            state: Mutex::new(State { pending: BTreeMap::new(), writer: None, server_instance: info.server_instance }),
            next_request_id: AtomicU64::new(1),
            durable: AtomicU64::new(0),
            in_flight: Gate { count: Mutex::new(0), freed: Condvar::new() },
            pins: Mutex::new(HashMap::new()),
        });
        let reader = connection.attach(link).map_err(|e| ClientError::Unreachable { server: connection.config.server.clone(), reason: e.to_string() })?;
        let supervisor = connection.clone();
        std::thread::Builder::new()
            .name("braid-conn".into())
            .spawn(move || supervisor.supervise(reader))
            .map_err(|e| ClientError::Protocol(format!("cannot start the connection thread: {e}")))?;
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
    pub fn call(&self, request: &Request, data: &[u8]) -> Result<(Reply, Vec<u8>)> {
        let _gate = self.in_flight.enter();
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = Arc::new(encode_frame(FrameKind::Request, id, request, data).map_err(|e| ClientError::Protocol(e.to_string()))?);
        let (reply_tx, reply_rx) = sync_channel(1);
        let writer = {
            let mut state = self.state.lock().expect("connection lock");
            state.pending.insert(id, Pending { frame: frame.clone(), reply: reply_tx });
            state.writer.clone()
        };
        if let Some(writer) = writer {
            // A failed write means the socket died; the reader thread reconnects and resends
            // everything in `pending`, this request included.
            let _ = writer.lock().expect("writer lock").write_all(&frame);
        }
        let frame = match self.config.retry_budget {
            Some(budget) => match reply_rx.recv_timeout(budget) {
                Ok(frame) => frame,
                Err(RecvTimeoutError::Timeout) => {
                    self.state.lock().expect("connection lock").pending.remove(&id);
                    return Err(ClientError::TimedOut { server: self.config.server.clone(), budget_ms: budget.as_millis() });
                }
                Err(RecvTimeoutError::Disconnected) => return Err(ClientError::Protocol("connection thread stopped".into())),
            },
            None => reply_rx.recv().map_err(|_| ClientError::Protocol("connection thread stopped".into()))?,
        };
        let response: Response = frame.decode().map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.durable.fetch_max(response.durable.0, Ordering::AcqRel);
        let reply = response.result.map_err(wire_error)?;
        Ok((reply, frame.data))
    }

    /// Installs a new socket: resends what has no response, returns the read side.
    fn attach(self: &Arc<Self>, link: Link) -> std::io::Result<TcpStream> {
        let reader = link.stream.try_clone()?;
        let writer = Arc::new(Mutex::new(link.stream));
        let mut state = self.state.lock().expect("connection lock");
        let restarted = state.server_instance != link.info.server_instance;
        state.server_instance = link.info.server_instance;
        {
            let mut socket = writer.lock().expect("writer lock");
            if !state.pending.is_empty() {
                tracing::info!(requests = state.pending.len(), "resending requests without a reply");
            }
            for pending in state.pending.values() {
                socket.write_all(&pending.frame)?;
            }
        }
        state.writer = Some(writer);
        drop(state);
        if restarted {
            self.restore_pins();
        }
        Ok(reader)
    }

    fn supervise(self: Arc<Self>, mut reader: TcpStream) {
        loop {
            let error = self.read_responses(&reader);
            let _ = reader.shutdown(Shutdown::Both);
            self.state.lock().expect("connection lock").writer = None;
            tracing::warn!(server = %self.config.server, %error, "connection lost; reconnecting");
            reader = self.reconnect();
        }
    }

    fn reconnect(self: &Arc<Self>) -> TcpStream {
        let mut backoff = Duration::from_millis(20);
        loop {
            match connect(&self.config, self.client_id).map(|link| self.attach(link)) {
                Ok(Ok(reader)) => {
                    tracing::info!(server = %self.config.server, "reconnected");
                    return reader;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "resend after reconnect failed"),
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    /// Re-sends one `Open` per open of each pinned handle. Runs on a thread of its own: the
    /// reader thread must keep reading to receive the replies.
    fn restore_pins(self: &Arc<Self>) {
        let pins: Vec<(Handle, i64)> = self.pins.lock().expect("pins lock").iter().map(|(h, n)| (h.clone(), *n)).collect();
        if pins.is_empty() {
            return;
        }
        let requests: Vec<Request> =
            pins.into_iter().flat_map(|(handle, n)| (0..n).map(move |_| Request::Open { handle: handle.clone() })).collect();
        let this = self.clone();
        std::thread::spawn(move || {
            for request in requests {
                if let Err(e) = this.call(&request, &[]) {
                    tracing::warn!(error = %e, "cannot restore an open file after the server restarted");
                }
            }
        });
    }

    fn read_responses(&self, stream: &TcpStream) -> String {
        let mut reader = BufReader::with_capacity(256 * 1024, stream);
        loop {
            let frame = match read_frame(&mut reader) {
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

fn read_frame(reader: &mut impl Read) -> std::result::Result<Frame, String> {
    let mut head = [0u8; HEADER_BYTES];
    reader.read_exact(&mut head).map_err(|e| e.to_string())?;
    let header = FrameHeader::decode(&head).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; header.payload_bytes()];
    reader.read_exact(&mut payload).map_err(|e| e.to_string())?;
    Frame::from_payload(header, payload).map_err(|e| e.to_string())
}

fn connect(config: &ClientConfig, client_id: ClientId) -> Result<Link> {
    let unreachable = |reason: String| ClientError::Unreachable { server: config.server.clone(), reason };
    let addr = config
        .server
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("the address resolves to nothing".into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let hello = Hello { versions: PROTOCOL_VERSIONS.to_vec(), client_id, client_name: config.client_name.clone() };
    let bytes = encode_frame(FrameKind::Hello, 0, &hello, &[]).map_err(|e| ClientError::Protocol(e.to_string()))?;
    stream.write_all(&bytes).map_err(|e| unreachable(e.to_string()))?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT * 2)).map_err(|e| unreachable(e.to_string()))?;
    let frame = read_frame(&mut stream).map_err(|e| unreachable(format!("handshake: {e}")))?;
    stream.set_read_timeout(None).map_err(|e| unreachable(e.to_string()))?;
    if frame.header.kind != FrameKind::Welcome {
        return Err(ClientError::Protocol(format!("expected welcome, got {:?}", frame.header.kind)));
    }
    match frame.decode::<Welcome>().map_err(|e| ClientError::Protocol(e.to_string()))? {
        Welcome::Accepted(info) => Ok(Link { stream, info }),
        Welcome::Refused { reason } => Err(ClientError::Refused { server: config.server.clone(), reason }),
    }
}
