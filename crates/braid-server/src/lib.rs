//! The braid server: exports a local directory over TCP.
//!
//! Layout: `session` (connections and dispatch) -> `applier` (dedup, log, apply) -> `export`
//! (handles, descriptors, syscalls) and `wal` (log segments); `commit` makes it all durable;
//! `coherence` grants and recalls clients' rights to cache, and arbitrates `locks`.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod applier;
pub mod clients;
pub mod coherence;
pub mod commit;
pub mod dedup;
pub mod export;
pub mod handles;
pub mod instances;
pub mod locks;
pub mod quota;
pub mod session;
pub mod sys;
pub mod wal;

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use crate::applier::Applier;
use crate::commit::{Committer, FlushTargets};
use crate::export::Export;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The directory to export.
    pub data_dir: PathBuf,
    /// Where the transaction log and the handle key live; never inside `data_dir`.
    pub state_dir: PathBuf,
    pub read_only: bool,
    /// Size limit of the export in bytes.
    pub max_bytes: Option<u64>,
    /// Map remote root (uid 0) to nobody for changes, as NFS does by default.
    pub root_squash: bool,
    /// TLS credentials (see `braid-tls`); `None` serves plain TCP without authentication.
    pub tls: Option<Arc<braid_tls::ServerConfig>>,
    /// How long a client's right to cache an object lasts without renewal; also how long a
    /// vanished client can delay others' changes and hold its locks.
    pub lease: std::time::Duration,
    /// How long applied changes may wait for a commit nobody asked for.
    pub commit_interval: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error("state directory {state} is inside the exported directory {data}: clients could read the handle key")]
    StateInsideExport { state: PathBuf, data: PathBuf },
}

pub struct ServerState {
    pub export: Export,
    pub applier: Mutex<Applier>,
    pub committer: Arc<Committer>,
    pub read_only: bool,
    /// Random per process start; tells clients the server restarted.
    pub instance: u64,
    /// The processes that served this state before, and what survived of each.
    pub predecessors: Vec<braid_proto::Predecessor>,
    /// Bytes of request payloads held in memory, over all connections.
    pub in_flight_bytes: Arc<tokio::sync::Semaphore>,
    pub root_squash: bool,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub coherence: coherence::Coherence,
    /// Who may hold rights granted on this state, for the grace period after a restart.
    pub clients: clients::KnownClients,
    /// Numbers connections, so a client's old callback connection is told from its new one.
    pub next_session: std::sync::atomic::AtomicU64,
}

pub struct Server {
    state: Arc<ServerState>,
}

impl Server {
    /// Opens the export and the log (recovering it), and starts the commit thread.
    pub fn open(config: &ServerConfig) -> Result<Self, ServerError> {
        sys::clear_umask();
        raise_descriptor_limit();
        let state_err = |source| ServerError::State { path: config.state_dir.clone(), source };
        fs::create_dir_all(&config.state_dir).map_err(state_err)?;
        let data = fs::canonicalize(&config.data_dir).map_err(|source| ServerError::State { path: config.data_dir.clone(), source })?;
        let state_dir = fs::canonicalize(&config.state_dir).map_err(state_err)?;
        if state_dir.starts_with(&data) {
            return Err(ServerError::StateInsideExport { state: state_dir, data });
        }
        let key = load_or_create_key(&state_dir.join("handle.key")).map_err(state_err)?;
        // Clients of an earlier run of this server may still cache under rights this process
        // knows nothing about: no change is applied until they have expired (a grace period,
        // as NFSv4 has), unless this state directory never served before.
        let served_before = mark_served(&state_dir).map_err(state_err)?;
        let export = Export::open(&data, key, config.max_bytes)?;
        let wal_dir = state_dir.join("wal");
        let previous = instances::Previous::find(&state_dir).map_err(state_err)?;
        let lost_above = previous.as_ref().and_then(instances::Previous::lost_above);
        let (wal, recovered) = wal::Wal::open(&wal_dir, lost_above)?;
        tracing::info!(
            records = recovered.records,
            next_lsn = recovered.next_lsn.0,
            undone = recovered.undone,
            "transaction log recovered"
        );
        let applied = braid_proto::Lsn(recovered.next_lsn.0 - 1);
        let instance = rand::random();
        let predecessors = instances::start(&state_dir, instance, previous.as_ref(), applied).map_err(state_err)?;
        // What the log says was applied is durable only once flushed: after a crash of the
        // process (not of the machine) it may still be in the page cache only, and a resent
        // txn answered from the reply cache, then an fsync, must not be acked before it is.
        let file_systems = flush_file_systems(&export, &state_dir).map_err(state_err)?;
        file_systems.flush();
        let mark = instances::DurableMark::open(&state_dir, instance, applied).map_err(state_err)?;
        let targets = FlushTargets { file_systems, wal_dir, mark };
        let committer = Committer::new(applied, wal.segment(), config.commit_interval);
        let thread_committer = committer.clone();
        std::thread::Builder::new().name("braid-commit".into()).spawn(move || thread_committer.run(targets)).map_err(state_err)?;
        let (clients, awaited) = clients::KnownClients::open(&state_dir, !served_before).map_err(state_err)?;
        let coherence = match awaited {
            Some(awaited) if served_before => coherence::Coherence::new(config.lease, true).awaiting(awaited),
            _ => coherence::Coherence::new(config.lease, served_before),
        };
        let state = ServerState {
            export,
            applier: Mutex::new(Applier::new(wal, recovered.cache, recovered.next_lsn)),
            committer,
            read_only: config.read_only,
            instance,
            predecessors,
            in_flight_bytes: Arc::new(tokio::sync::Semaphore::new(braid_proto::limits::IN_FLIGHT_BYTES_MAX)),
            root_squash: config.root_squash,
            tls: config.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            coherence,
            clients,
            next_session: std::sync::atomic::AtomicU64::new(1),
        };
        Ok(Self { state: Arc::new(state) })
    }

    /// Accepts connections for ever. Accept errors (out of descriptors, a connection reset
    /// before it was accepted) are logged and survived: they are load, not a reason to stop.
    pub async fn serve(&self, listener: TcpListener) -> io::Result<()> {
        let slots = Arc::new(tokio::sync::Semaphore::new(braid_proto::limits::CONNECTIONS_MAX));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = braid_proto::limits::CONNECTIONS_MAX, "too many connections; closing the new one");
                continue;
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                session::serve_connection(state, stream, peer).await;
                drop(slot);
            });
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit: the server holds one per
/// connection and up to `export::FD_CACHE_ENTRIES_MAX` for handles.
fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
}

/// The export's file system and, if it is another one, the state directory's.
fn flush_file_systems(export: &Export, state_dir: &Path) -> io::Result<commit::FileSystems> {
    let export_fd = export.root_fd().try_clone_to_owned()?;
    let mut file_systems = vec![export_fd];
    let state_fd = fs::File::open(state_dir)?;
    let export_dev = rustix::fs::fstat(&file_systems[0])?.st_dev;
    if state_fd.metadata()?.dev() != export_dev {
        file_systems.push(state_fd.as_fd().try_clone_to_owned()?);
    }
    Ok(commit::FileSystems(file_systems))
}

/// Records that this state directory has served; returns whether it had before.
fn mark_served(state_dir: &Path) -> io::Result<bool> {
    let marker = state_dir.join("served");
    if marker.exists() {
        return Ok(true);
    }
    fs::write(&marker, b"")?;
    fs::File::open(state_dir)?.sync_all()?;
    Ok(false)
}

fn load_or_create_key(path: &Path) -> io::Result<[u8; 32]> {
    match fs::read(path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            Ok(key)
        }
        Ok(bytes) => {
            Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} holds {} bytes, expected 32", path.display(), bytes.len())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            instances::replace_durably(path, &key)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}
