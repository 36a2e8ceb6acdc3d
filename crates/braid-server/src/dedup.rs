//! At-most-once application of transactions: per client, the replies of the transactions it may
//! still resend. A plain struct with no I/O; the applier feeds it and the log rebuilds it.
use std::collections::{BTreeMap, HashMap};

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

/// A transaction as the log holds it: the encoded `Request::Txn` and its data.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoggedTxn {
    pub message: Vec<u8>,
    pub data: Vec<u8>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ClientReplies {
    replied_below: u64,
    replies: BTreeMap<u64, Vec<u8>>,
    /// Logged, not known to be applied; with the logged form when the log was replayed.
    torn: BTreeMap<u64, Option<LoggedTxn>>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplyCache {
    clients: HashMap<u64, ClientReplies>,
}

impl ReplyCache {
    pub fn check(&self, client: ClientId, seq: TxnSeq) -> Seen {
        let Some(known) = self.clients.get(&client.0) else { return Seen::New };
        if let Some(reply) = known.replies.get(&seq.0) {
            return Seen::Done(reply.clone());
        }
        if let Some(logged) = known.torn.get(&seq.0) {
            return Seen::Torn(logged.clone());
        }
        if seq.0 < known.replied_below {
            return Seen::Forgotten;
        }
        Seen::New
    }

    /// A transaction was logged; until `record` it counts as torn. `logged` is its logged form
    /// when the log is replayed (`None` while serving: the reply follows at once).
    pub fn logged(&mut self, client: ClientId, seq: TxnSeq, logged: Option<LoggedTxn>) {
        self.clients.entry(client.0).or_default().torn.insert(seq.0, logged);
    }

    pub fn record(&mut self, client: ClientId, seq: TxnSeq, reply: Vec<u8>) {
        let known = self.clients.entry(client.0).or_default();
        known.torn.remove(&seq.0);
        known.replies.insert(seq.0, reply);
        while known.replies.len() > REPLIES_PER_CLIENT_MAX {
            known.replies.pop_first();
        }
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
