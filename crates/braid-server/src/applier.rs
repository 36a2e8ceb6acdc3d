//! The apply path of transactions: dedup check, log append, apply, reply record, in that order,
//! under one lock, so the log order is the apply order.
//!
//! # Correctness
//! A transaction is in the log before any of its commands touches the export, and its reply is
//! in the log before the reply is sent. So after a crash a transaction is either unknown (never
//! applied), torn (logged, maybe partly applied: re-applied tolerantly when the client resends
//! it), or done (its logged reply is sent again). Each is applied at most once.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use braid_proto::limits::TXN_COMMANDS_MAX;
use braid_proto::{ClientId, Command, Errno, Lsn, Reply, Txn, TxnOutcome, WireError};

use crate::commit::Committer;
use crate::dedup::{ReplyCache, Seen};
use crate::export::Export;
use crate::wal::{Wal, WalError, WalRecord};

pub struct Applier {
    wal: Wal,
    cache: ReplyCache,
    next_lsn: Lsn,
}

impl Applier {
    pub fn new(wal: Wal, cache: ReplyCache, next_lsn: Lsn) -> Self {
        Self { wal, cache, next_lsn }
    }
}

/// Applies `txn` from `client`. `message` is the encoded request as received (it goes to the
/// log unchanged), `data` the frame's bulk bytes.
pub fn apply_txn(
    applier: &Mutex<Applier>,
    committer: &Arc<Committer>,
    export: &Export,
    client: ClientId,
    txn: &Txn,
    message: &[u8],
    data: &[u8],
) -> Result<Reply, WireError> {
    let slices = data_slices(&txn.commands, data)?;
    let mut guard = applier.lock().expect("applier lock");
    let a = &mut *guard;
    a.cache.replied_below(client, txn.replied_below);
    let tolerant = match a.cache.check(client, txn.seq) {
        Seen::Done(reply) => return decode_cached(&reply),
        Seen::Forgotten => return Err(WireError::Malformed(format!("resend of txn {} already acknowledged", txn.seq.0))),
        Seen::Torn => true,
        Seen::New => false,
    };
    let lsn = a.next_lsn;
    let record = WalRecord::Txn { lsn: lsn.0, client: client.0, seq: txn.seq.0, message, data };
    a.wal.append_txn(&record, &a.cache, lsn).map_err(|e| log_error(&e))?;
    a.next_lsn = Lsn(lsn.0 + 1);
    a.cache.logged(client, txn.seq);
    committer.segment.store(a.wal.segment(), Ordering::Release);

    let mut results = Vec::with_capacity(txn.commands.len());
    for (command, slice) in txn.commands.iter().zip(slices) {
        let result = export.apply(command, slice, &txn.creds, tolerant);
        let failed = result.is_err();
        results.push(result);
        if failed {
            break;
        }
    }
    let outcome = TxnOutcome { lsn, results };
    let reply = postcard::to_stdvec(&outcome).expect("a txn outcome always encodes");
    let applied = WalRecord::Applied { lsn: lsn.0, client: client.0, seq: txn.seq.0, reply: &reply };
    if let Err(e) = a.wal.append_applied(&applied) {
        // The reply stays in memory; only a crash before the next append could make this txn
        // look torn, and a torn txn is re-applied tolerantly: nothing is lost.
        tracing::warn!(error = %e, lsn = lsn.0, "cannot log a txn's reply");
    }
    a.cache.record(client, txn.seq, reply);
    let previous = committer.applied.swap(lsn.0, Ordering::AcqRel);
    assert!(previous < lsn.0, "applied lsn not increasing: {previous} then {}", lsn.0);
    Ok(Reply::Txn(outcome))
}

/// Splits the data section among the `Write` commands, in order, and checks the sizes match.
fn data_slices<'d>(commands: &[Command], data: &'d [u8]) -> Result<Vec<&'d [u8]>, WireError> {
    if commands.is_empty() || commands.len() > TXN_COMMANDS_MAX {
        return Err(WireError::Malformed(format!("txn of {} commands", commands.len())));
    }
    let mut rest = data;
    let mut slices = Vec::with_capacity(commands.len());
    for command in commands {
        let len = match command {
            Command::Write { len, .. } | Command::Append { len, .. } => *len as usize,
            _ => 0,
        };
        if len > rest.len() {
            return Err(WireError::Malformed("write lengths exceed the data section".into()));
        }
        let (mine, tail) = rest.split_at(len);
        slices.push(mine);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} bytes of data belong to no write", rest.len())));
    }
    Ok(slices)
}

fn decode_cached(reply: &[u8]) -> Result<Reply, WireError> {
    let outcome: TxnOutcome = postcard::from_bytes(reply).expect("cached replies were encoded by us");
    Ok(Reply::Txn(outcome))
}

fn log_error(e: &WalError) -> WireError {
    tracing::error!(error = %e, "cannot append to the transaction log");
    let errno = match e {
        WalError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        WalError::Encode(_) => libc::EIO,
    };
    WireError::Errno(Errno(errno))
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_proto::Handle;

    #[test]
    fn data_is_split_among_writes_in_order() {
        let h = Handle(vec![1]);
        let commands = vec![
            Command::Write { handle: h.clone(), offset: 0, len: 2 },
            Command::Unlink { parent: h.clone(), name: b"x".to_vec() },
            Command::Write { handle: h.clone(), offset: 9, len: 3 },
        ];
        let slices = data_slices(&commands, b"abcde").unwrap();
        assert_eq!(slices, vec![&b"ab"[..], &b""[..], &b"cde"[..]]);
        assert!(data_slices(&commands, b"abcd").is_err(), "too little data");
        assert!(data_slices(&commands, b"abcdef").is_err(), "data left over");
        assert!(data_slices(&[], b"").is_err(), "empty txn");
    }
}
