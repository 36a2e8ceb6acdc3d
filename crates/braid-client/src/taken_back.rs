//! When the server last took rights back, per object, so that a response the callback
//! overtook does not bring them back.
//!
//! Responses come on the connection that carried the request, callbacks on the callback
//! connection: a flush or recall that the server sent after it granted a right can be carried
//! out here before the response that grants it is read. Taken in as it is, that response would
//! make this client hold the right again: kernel caches filled with what the other client is
//! about to change (a stale read for up to a lease), or changes queued under an exclusivity the
//! server no longer gives (applied after the other client's read, or refused as late). So a
//! response to a request sent before a callback that named one of its objects grants nothing
//! the callback took: no lease after a recall, no exclusivity after a flush or recall.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use braid_proto::{Command, Handle, Reply, Request};

/// How long a callback is remembered: a response to a request sent longer ago grants rights
/// that have ended anyway (they are counted from the send; leases are shorter than this).
const MEMORY: Duration = Duration::from_secs(600);

/// Callbacks remembered before those older than [`MEMORY`] are forgotten.
const PRUNED_AT: usize = 4096;

/// What a callback took back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// A flush: the right stays, shared.
    Exclusivity,
    /// A recall: the right is gone.
    Right,
}

#[derive(Default)]
pub(crate) struct TakenBack {
    times: Mutex<Times>,
}

#[derive(Default)]
struct Times {
    /// The last callback of all: a response to a request sent after it needs no look at the
    /// maps (the common case, every response of a mount).
    last: Option<Instant>,
    /// The last flush or recall of each object.
    exclusivity: HashMap<Handle, Instant>,
    /// The last recall of each object.
    right: HashMap<Handle, Instant>,
}

impl TakenBack {
    /// A callback taking `what` on `handles` is carried out now. Call before anything else is
    /// done for it (a response read from now on is vetted against it).
    pub(crate) fn record<'h>(&self, handles: impl IntoIterator<Item = &'h Handle>, what: Taken) {
        let now = Instant::now();
        let mut guard = self.times.lock().expect("taken-back lock");
        let times = &mut *guard;
        for map in [&mut times.exclusivity, &mut times.right] {
            if map.len() >= PRUNED_AT {
                map.retain(|_, at| now.duration_since(*at) < MEMORY);
            }
        }
        times.last = Some(now);
        for handle in handles {
            times.exclusivity.insert(handle.clone(), now);
            if what == Taken::Right {
                times.right.insert(handle.clone(), now);
            }
        }
    }

    /// What a response to `request`, sent at `sent`, may still grant of `leased` and
    /// `exclusive`: nothing a callback carried out since took on one of the objects it names.
    pub(crate) fn vet(&self, request: &Request, reply: Option<&Reply>, sent: Instant, leased: bool, exclusive: bool) -> (bool, bool) {
        if !leased {
            return (false, false);
        }
        let times = self.times.lock().expect("taken-back lock");
        if times.last.is_none_or(|last| last < sent) {
            return (leased, exclusive);
        }
        let since = |map: &HashMap<Handle, Instant>, handle: &Handle| map.get(handle).is_some_and(|at| *at >= sent);
        let named = named(request, reply);
        let recalled = named.iter().any(|h| since(&times.right, h));
        let flushed = named.iter().any(|h| since(&times.exclusivity, h));
        (!recalled, exclusive && !flushed)
    }
}

/// The objects a response to `request` grants rights on: those the request names and those
/// the reply names (a lookup's entry, a listing's entries, what a transaction created).
fn named<'a>(request: &'a Request, reply: Option<&'a Reply>) -> Vec<&'a Handle> {
    let mut handles: Vec<&Handle> = match request {
        Request::Lookup { parent: handle, .. }
        | Request::GetAttr { handle }
        | Request::ReadLink { handle }
        | Request::Read { handle, .. }
        | Request::ReadDir { handle, .. }
        | Request::GetXattr { handle, .. }
        | Request::ListXattr { handle }
        | Request::Lseek { handle, .. }
        | Request::Open { handle, .. } => vec![handle],
        Request::XattrNames { handles } => handles.iter().collect(),
        Request::Txn(txn) | Request::DurableTxn(txn) | Request::StagedTxn(txn) | Request::WriteBack { txn, .. } => {
            txn.commands.iter().flat_map(Command::handles).collect()
        }
        _ => Vec::new(),
    };
    match reply {
        Some(Reply::Entry(entry)) => handles.push(&entry.handle),
        Some(Reply::ReadDir { entries, .. }) => handles.extend(entries.iter().filter_map(|e| e.entry.as_ref().map(|e| &e.handle))),
        Some(Reply::Txn(outcome)) => handles.extend(outcome.created()),
        _ => {}
    }
    handles
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_proto::{Attr, Entry};

    fn h(n: u8) -> Handle {
        Handle(vec![n])
    }

    fn lookup_reply(child: Handle) -> Reply {
        Reply::Entry(Entry { handle: child, attr: Attr::default() })
    }

    #[test]
    fn a_response_overtaken_by_a_callback_grants_nothing_it_took() {
        // Goal: a response to a request sent before a recall of one of the objects it names
        // (the request's or the reply's) grants no lease; before a flush, no exclusivity but
        // the lease; a request sent after the callback, or naming other objects, keeps both.
        let taken = TakenBack::default();
        let getattr = |n| Request::GetAttr { handle: h(n) };
        let lookup = Request::Lookup { parent: h(1), name: b"x".to_vec() };
        let sent = Instant::now();
        taken.record([&h(2)], Taken::Right);
        taken.record([&h(3)], Taken::Exclusivity);
        assert_eq!(taken.vet(&getattr(2), None, sent, true, true), (false, false), "recalled");
        assert_eq!(taken.vet(&getattr(3), None, sent, true, true), (true, false), "flushed");
        assert_eq!(taken.vet(&getattr(4), None, sent, true, true), (true, true), "not named");
        assert_eq!(taken.vet(&lookup, Some(&lookup_reply(h(2))), sent, true, false), (false, false), "the reply names it");
        assert_eq!(taken.vet(&lookup, Some(&lookup_reply(h(4))), sent, true, false), (true, false));
        assert_eq!(taken.vet(&getattr(2), None, sent, false, false), (false, false), "nothing granted stays nothing");
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(taken.vet(&getattr(2), None, Instant::now(), true, true), (true, true), "sent after the recall");
    }
}
