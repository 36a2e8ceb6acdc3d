//! The callback channel: a connection of its own on which the server sends recalls. The thread
//! that owns it carries each recall out (through the [`CallbackHandler`]) and acknowledges it;
//! when the channel breaks, every right may have been recalled unseen, so the handler drops
//! everything it caches, and the thread reconnects and subscribes again.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braid_proto::{Callback, FrameKind, Handle, Invalidation, Request};

use crate::connection::Channel;
use crate::taken_back::Taken;
use crate::Client;

/// What the client does with callbacks; implemented by the FUSE adapter.
pub trait CallbackHandler: Send + Sync {
    /// Drop what `items` name from every cache. The server is told once this returns (queued
    /// changes to them have been written back before).
    fn recall(&self, items: &[Invalidation]);
    /// The callback channel broke: rights may have been recalled without this client knowing.
    fn lost(&self);
    /// The server refused a queued change to `handle`: what the caches show of it is wrong.
    /// `name`: the change was the create of `handle` as that name in that directory, which
    /// therefore does not exist. Called from threads serving requests: must not wait for the
    /// kernel.
    fn write_back_failed(&self, handle: &Handle, name: Option<(&Handle, &[u8])>);
    /// An object created in the cache under the handle `provisional` now exists on the server
    /// as `real` with inode number `ino`; recalls will name `real`. Called from threads serving
    /// requests.
    fn created(&self, provisional: &Handle, real: &Handle, ino: u64);
    /// The exclusive rights on `handles` were renewed until `until`: what the caches hold of
    /// them under an unbroken lease stays good that long. Never starts a lease (a recall may
    /// have ended it meanwhile). Called from the renewal thread.
    fn renewed(&self, handles: &[Handle], until: std::time::Instant);
}

const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a new mount waits for its first subscription before it starts serving anyway.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// The running callback thread; `stop` ends it.
pub(crate) struct CallbackThread {
    stop: Arc<AtomicBool>,
    /// The socket of the current channel, shut down to wake the thread.
    socket: Arc<Mutex<Option<std::net::TcpStream>>>,
}

impl CallbackThread {
    /// Starts the thread and waits (at most [`SUBSCRIBE_WAIT`]) until the server has taken the
    /// subscription: requests made before it get no rights, so a mount that starts serving
    /// before then would cache nothing at first.
    pub(crate) fn start(client: Client, handler: Arc<dyn CallbackHandler>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = Arc::new(Mutex::new(None));
        let (thread_stop, thread_socket) = (stop.clone(), socket.clone());
        let (subscribed, first_subscription) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("braid-callbacks".into())
            .spawn(move || run(&client, handler.as_ref(), &thread_stop, &thread_socket, subscribed))?;
        if first_subscription.recv_timeout(SUBSCRIBE_WAIT).is_err() {
            tracing::warn!("the server has not taken this mount's subscription yet: nothing is cached until it does");
        }
        Ok(Self { stop, socket })
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(socket) = self.socket.lock().expect("callback socket lock").as_ref() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn run(
    client: &Client,
    handler: &dyn CallbackHandler,
    stop: &AtomicBool,
    socket: &Mutex<Option<std::net::TcpStream>>,
    subscribed: std::sync::mpsc::SyncSender<()>,
) {
    let mut backoff = Duration::from_millis(10);
    let next_id = AtomicU64::new(1);
    let mut instance = client.connection.server_instance();
    while !stop.load(Ordering::Acquire) {
        match client.connection.open_callback_channel() {
            Ok(mut channel) => {
                *socket.lock().expect("callback socket lock") = channel.socket.try_clone().ok();
                backoff = Duration::from_millis(10);
                // Every client notices a restart here (its channel breaks), idle or not.
                let now = client.connection.server_instance();
                if std::mem::replace(&mut instance, now) != now {
                    start_reclaim(client);
                }
                // Rights lost with the last channel no longer keep what is open here.
                client.send_unsent_opens(false);
                let error = serve(&mut channel, client, handler, &next_id, &subscribed);
                client.subscribed.store(false, Ordering::Release);
                if !stop.load(Ordering::Acquire) {
                    tracing::warn!(%error, "callback channel lost; dropping every cached object and subscribing again");
                }
                client.writeback.lost_rights();
                handler.lost();
            }
            Err(e) => tracing::debug!(error = %e, "cannot open the callback channel"),
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Finishes the reclaim after a restart of the server on a thread of its own: it waits for
/// the write-back of the queue, which may wait for this channel's callbacks.
fn start_reclaim(client: &Client) {
    let client = client.clone();
    let spawned = std::thread::Builder::new().name("braid-reclaim".into()).spawn(move || {
        if let Err(e) = client.finish_reclaim() {
            tracing::warn!(error = %e, "cannot finish the reclaim after the server restarted; its grace period lasts a whole lease");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the reclaim thread; the grace period after the restart lasts a whole lease");
    }
}

/// Subscribes, then carries out callbacks until the channel fails; returns why it failed.
fn serve(
    channel: &mut Channel,
    client: &Client,
    handler: &dyn CallbackHandler,
    next_id: &AtomicU64,
    subscribed: &std::sync::mpsc::SyncSender<()>,
) -> String {
    let send = |channel: &mut Channel, request: &Request| channel.send(next_id.fetch_add(1, Ordering::Relaxed), request);
    if let Err(e) = send(channel, &Request::Subscribe) {
        return e;
    }
    loop {
        let frame = match channel.receive() {
            Ok(frame) => frame,
            Err(e) => return e,
        };
        match frame.header.kind {
            // Acknowledgements of Subscribe (the first) and of CallbackDone.
            FrameKind::Response => {
                client.subscribed.store(true, Ordering::Release);
                let _ = subscribed.try_send(());
                continue;
            }
            FrameKind::Callback => {}
            other => return format!("unexpected {other:?} frame on the callback channel"),
        }
        let callback = match frame.decode::<Callback>() {
            Ok(callback) => callback,
            Err(e) => return e.to_string(),
        };
        carry_out(client, handler, &callback);
        if let Err(e) = send(channel, &Request::CallbackDone { id: frame.header.request_id }) {
            return e;
        }
    }
}

/// Gives up exclusivity first (nothing more is queued for these objects), writes the queue back,
/// and for a recall drops the objects from every cache.
fn carry_out(client: &Client, handler: &dyn CallbackHandler, callback: &Callback) {
    let handles = callback.handles();
    let taken = match callback {
        Callback::Recall(_) => Taken::Right,
        Callback::Flush(_) => Taken::Exclusivity,
    };
    client.connection.taken_back.record(&handles, taken);
    client.writeback.downgraded(&handles);
    if let Err(e) = client.flush() {
        tracing::warn!(error = %e, "cannot write queued changes back for a callback");
    }
    // The change the server recalls for may remove what is open here without its knowing.
    client.send_unsent_opens(true);
    if let Callback::Recall(items) = callback {
        handler.recall(items);
    }
}
