//! At-most-once application of transactions: per client, the replies of the transactions it may
//! still resend. A plain struct with no I/O; the applier feeds it and the log rebuilds it.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use braid_proto::limits::REQUESTS_IN_FLIGHT_MAX;
use braid_proto::{ClientId, TxnSeq};
use serde::{Deserialize, Serialize};

/// Replies kept per client beyond its in-flight window, for a client that resends after a
/// reconnect before it has told us what it received.
const REPLIES_PER_CLIENT_MAX: usize = REQUESTS_IN_FLIGHT_MAX * 8;

/// What the server knows of a transaction it is asked to apply.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Never seen: apply it.
    New,
    /// Logged but its application did not finish before a crash: apply it again, tolerantly,
    /// in the form it was logged in (an append was logged as the write it became), if known.
    Torn(Option<LoggedTxn>),
    /// Applied; here is the encoded reply to send again.
    Done(Vec<u8>),
    /// Below the client's own acknowledgement: a resend of it is a client bug.
    Forgotten,
}

/// A transaction as the log holds it: the encoded `Request::Txn`, its data, and the indices
/// of the commands the write-back fence refused when it was applied (applied again, it must
/// refuse them again: another client may have changed their objects since).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoggedTxn {
    pub message: Vec<u8>,
    pub data: Vec<u8>,
    pub refused: Vec<u32>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ClientReplies {
    replied_below: u64,
    replies: BTreeMap<u64, Vec<u8>>,
    /// Logged, not known to be applied.
    torn: BTreeSet<u64>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplyCache {
    clients: HashMap<u64, ClientReplies>,
    /// The logged forms of torn transactions, from the last log replay, by (client, seq). Not
    /// in snapshots: they are only needed until the client resends, which it does at once, and
    /// snapshots stay small (a form carries up to a megabyte of data).
    #[serde(skip)]
    logged_forms: HashMap<(u64, u64), LoggedTxn>,
}

impl ReplyCache {
    pub fn check(&self, client: ClientId, seq: TxnSeq) -> Seen {
        let Some(known) = self.clients.get(&client.0) else { return Seen::New };
        if let Some(reply) = known.replies.get(&seq.0) {
            return Seen::Done(reply.clone());
        }
        if known.torn.contains(&seq.0) {
            return Seen::Torn(self.logged_forms.get(&(client.0, seq.0)).cloned());
        }
        if seq.0 < known.replied_below {
            return Seen::Forgotten;
        }
        Seen::New
    }

    /// A transaction was logged; until `record` it counts as torn. `logged` is its logged form
    /// when the log is replayed (`None` while serving: the reply follows at once).
    pub fn logged(&mut self, client: ClientId, seq: TxnSeq, logged: Option<LoggedTxn>) {
        self.clients.entry(client.0).or_default().torn.insert(seq.0);
        if let Some(logged) = logged {
            self.logged_forms.insert((client.0, seq.0), logged);
        }
    }

    pub fn record(&mut self, client: ClientId, seq: TxnSeq, reply: Vec<u8>) {
        self.logged_forms.remove(&(client.0, seq.0));
        let known = self.clients.entry(client.0).or_default();
        known.torn.remove(&seq.0);
        known.replies.insert(seq.0, reply);
        while known.replies.len() > REPLIES_PER_CLIENT_MAX {
            known.replies.pop_first();
        }
    }

    /// A transaction recorded as applied may have been lost by a crash of the machine: it
    /// counts as torn again, in its `logged` form. Returns whether it was done (a transaction
    /// the client acknowledged is left alone: it will not be resent).
    pub fn undo(&mut self, client: ClientId, seq: TxnSeq, logged: LoggedTxn) -> bool {
        let Some(known) = self.clients.get_mut(&client.0) else { return false };
        if seq.0 < known.replied_below || known.replies.remove(&seq.0).is_none() {
            return false;
        }
        known.torn.insert(seq.0);
        self.logged_forms.insert((client.0, seq.0), logged);
        true
    }

    /// Replaces this cache by a snapshot read from the log, keeping the logged forms of the
    /// transactions the snapshot still counts as torn (snapshots do not carry them).
    pub fn adopt_snapshot(&mut self, snapshot: ReplyCache) {
        let mut forms = std::mem::take(&mut self.logged_forms);
        *self = snapshot;
        forms.retain(|(c, s), _| self.clients.get(c).is_some_and(|known| known.torn.contains(s)));
        self.logged_forms = forms;
    }

    /// The client has the replies of everything below `seq`.
    pub fn replied_below(&mut self, client: ClientId, seq: TxnSeq) {
        let known = self.clients.entry(client.0).or_default();
        if seq.0 <= known.replied_below {
            return;
        }
        known.replied_below = seq.0;
        known.replies = known.replies.split_off(&seq.0);
        known.torn = known.torn.split_off(&seq.0);
        self.logged_forms.retain(|(c, s), _| *c != client.0 || *s >= seq.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: ClientId = ClientId(1);

    #[test]
    fn lifecycle_of_a_transaction() {
        // Goal: new -> torn (logged) -> done (recorded) -> forgotten (acknowledged).
        let mut cache = ReplyCache::default();
        assert_eq!(cache.check(C, TxnSeq(5)), Seen::New);
        cache.logged(C, TxnSeq(5), None);
        assert_eq!(cache.check(C, TxnSeq(5)), Seen::Torn(None));
        cache.record(C, TxnSeq(5), vec![1, 2]);
        assert_eq!(cache.check(C, TxnSeq(5)), Seen::Done(vec![1, 2]));
        assert_eq!(cache.check(ClientId(2), TxnSeq(5)), Seen::New, "clients are independent");
        cache.replied_below(C, TxnSeq(6));
        assert_eq!(cache.check(C, TxnSeq(5)), Seen::Forgotten);
        assert_eq!(cache.check(C, TxnSeq(6)), Seen::New);
    }

    #[test]
    fn logged_forms_stay_out_of_snapshots_but_survive_adopting_one() {
        // Goal: snapshots stay small (no logged data in them), and replaying a snapshot after
        // a torn transaction's record does not lose the form a resend must use.
        let form = LoggedTxn { message: vec![1], data: vec![2; 100], refused: Vec::new() };
        let mut cache = ReplyCache::default();
        cache.logged(C, TxnSeq(3), Some(form.clone()));
        cache.logged(C, TxnSeq(4), Some(form.clone()));
        let bytes = postcard::to_stdvec(&cache).unwrap();
        assert!(bytes.len() < 50, "the snapshot carries the forms: {} bytes", bytes.len());
        let mut snapshot: ReplyCache = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(snapshot.check(C, TxnSeq(3)), Seen::Torn(None));
        snapshot.record(C, TxnSeq(4), vec![]);
        cache.adopt_snapshot(snapshot);
        assert_eq!(cache.check(C, TxnSeq(3)), Seen::Torn(Some(form)));
        assert!(matches!(cache.check(C, TxnSeq(4)), Seen::Done(_)));
        assert_eq!(cache.logged_forms.len(), 1, "the form of a transaction done in the snapshot is dropped");
        cache.replied_below(C, TxnSeq(4));
        assert!(cache.logged_forms.is_empty());
    }

    #[test]
    fn acknowledgement_never_moves_backwards() {
        let mut cache = ReplyCache::default();
        cache.record(C, TxnSeq(10), vec![]);
        cache.replied_below(C, TxnSeq(9));
        cache.replied_below(C, TxnSeq(3));
        assert_eq!(cache.check(C, TxnSeq(10)), Seen::Done(vec![]));
        assert_eq!(cache.check(C, TxnSeq(4)), Seen::Forgotten);
    }

    #[test]
    fn replies_are_bounded_per_client() {
        let mut cache = ReplyCache::default();
        for seq in 0..(REPLIES_PER_CLIENT_MAX as u64 + 10) {
            cache.record(C, TxnSeq(seq), vec![]);
        }
        assert_eq!(cache.clients[&C.0].replies.len(), REPLIES_PER_CLIENT_MAX);
        assert_eq!(cache.check(C, TxnSeq(0)), Seen::New, "oldest evicted");
    }
}
