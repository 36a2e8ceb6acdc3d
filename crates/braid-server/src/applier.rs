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
use braid_proto::{ClientId, Command, CommandOk, Errno, Handle, Lsn, Reply, Request, Txn, TxnOutcome, WireError};

use crate::commit::Committer;
use crate::dedup::{LoggedTxn, ReplyCache, Seen};
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

/// The client a transaction comes from, what a refusal in it stops, and which of its commands
/// come too late.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'f> {
    pub client: ClientId,
    /// A refused `Write` does not stop the commands after it: the write-back of a client of
    /// protocol version 6 or later sends writes it has already answered, and, as a local file
    /// system goes on after one failed write, their order does not make the next depend on it
    /// (before, a client sent everything after a refusal again, one round trip and one copy of
    /// the rest of the batch per refused write: a full disk cost minutes). Any other refusal
    /// ends the transaction.
    pub writes_go_on: bool,
    pub fence: Fence<'f>,
}

impl From<ClientId> for Sender<'_> {
    /// A client whose transactions end at their first refusal (protocol versions 1 to 5).
    fn from(client: ClientId) -> Self {
        Self { client, writes_go_on: false, fence: Fence::default() }
    }
}

/// The commands of a write-back (`Request::WriteBack`) that the client made in its cache under
/// exclusive rights it has lost since (`Coherence::rights_lost`): each is refused with `EIO`,
/// as a write-back a local file system could not complete, instead of overwriting what another
/// client did meanwhile.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fence<'f> {
    /// How many of the transaction's first commands were made in the client's cache.
    pub queued: usize,
    /// Objects none of those commands may change.
    pub lost: &'f [Handle],
}

impl Fence<'_> {
    fn refuses(&self, index: usize, command: &Command) -> bool {
        index < self.queued && command.handles().iter().any(|h| self.lost.contains(h))
    }
}

/// Applies `txn` from `sender`. `message` is the encoded request as received, `data` the
/// frame's bulk bytes. The log receives the transaction in the form that replays exactly: an
/// append becomes the write at the offset where it lands; and a transaction torn by a crash is
/// applied again in its logged form, so a resent append is not appended twice.
pub fn apply_txn(
    applier: &Mutex<Applier>,
    committer: &Arc<Committer>,
    export: &Export,
    sender: Sender<'_>,
    txn: &Txn,
    message: &[u8],
    data: &[u8],
) -> Result<Reply, WireError> {
    let received_slices = data_slices(&txn.commands, data)?;
    if txn.commands.len() > 1 && txn.commands.iter().any(|c| matches!(c, Command::Append { .. })) {
        return Err(WireError::Malformed("an append must be the only command of its transaction".into()));
    }
    let client = sender.client;
    let mut guard = applier.lock().expect("applier lock");
    let a = &mut *guard;
    a.cache.replied_below(client, txn.replied_below);
    let (replayable, tolerant) = match a.cache.check(client, txn.seq) {
        Seen::Done(reply) => return decode_cached(&reply),
        Seen::Forgotten => return Err(WireError::Malformed(format!("resend of txn {} already acknowledged", txn.seq.0))),
        Seen::Torn(logged) => (logged.and_then(decode_logged), true),
        Seen::New => (resolve_append(export, txn, data), false),
    };
    let (txn, message, data, slices, refused_before) = match &replayable {
        Some((txn, logged)) => (txn, &logged.message[..], &logged.data[..], data_slices(&txn.commands, &logged.data)?, &logged.refused[..]),
        None => (txn, message, data, received_slices, &[][..]),
    };
    let refused = refusals(&sender.fence, &txn.commands, refused_before);
    let lsn = a.next_lsn;
    let record = WalRecord::txn(lsn, client, txn.seq, message, data, refused.clone());
    a.wal.append_txn(&record, &a.cache, lsn).map_err(|e| log_error(&e))?;
    a.next_lsn = Lsn(lsn.0 + 1);
    a.cache.logged(client, txn.seq, None);
    committer.segment.store(a.wal.segment(), Ordering::Release);

    let mut results = Vec::with_capacity(txn.commands.len());
    let mut created: Vec<Option<Handle>> = Vec::with_capacity(txn.commands.len());
    for (index, (command, slice)) in txn.commands.iter().zip(slices).enumerate() {
        let result = match with_created(command, &created) {
            Ok(_) if refused.contains(&(index as u32)) => Err(Errno(libc::EIO)),
            Ok(Some(resolved)) => export.apply(&resolved, slice, &txn.creds, tolerant),
            Ok(None) => export.apply(command, slice, &txn.creds, tolerant),
            Err(errno) => Err(errno),
        };
        created.push(match &result {
            Ok(CommandOk::Entry(entry)) => Some(entry.handle.clone()),
            _ => None,
        });
        let stops = result.is_err() && !(sender.writes_go_on && matches!(command, Command::Write { .. }));
        results.push(result);
        if stops {
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

/// The indices of the `commands` that `fence` refuses, and of those refused when the
/// transaction was first applied (`before`, from its logged form when it is applied again):
/// a refusal stands, since the objects may have changed since.
fn refusals(fence: &Fence<'_>, commands: &[Command], before: &[u32]) -> Vec<u32> {
    (0u32..)
        .zip(commands)
        .filter(|(index, command)| before.contains(index) || fence.refuses(*index as usize, command))
        .map(|(index, _)| index)
        .collect()
}

/// `command` with its [`Handle::created_by`] references replaced by what the earlier commands
/// created; `None` if it has none. A reference to no earlier creation names no object.
fn with_created(command: &Command, created: &[Option<Handle>]) -> Result<Option<Command>, Errno> {
    if command.handles().iter().all(|h| h.created_index().is_none()) {
        return Ok(None);
    }
    let mut resolved = command.clone();
    for handle in resolved.handles_mut() {
        if let Some(index) = handle.created_index() {
            *handle = created.get(index as usize).cloned().flatten().ok_or(Errno(libc::ESTALE))?;
        }
    }
    Ok(Some(resolved))
}

/// A transaction made of one append, as the write it becomes: at the end of the file now (the
/// caller holds the apply lock, so nothing moves the end before it is applied). `None` for
/// anything else, or if the file is gone (the append then fails as it would).
fn resolve_append(export: &Export, txn: &Txn, data: &[u8]) -> Option<(Txn, LoggedTxn)> {
    let [Command::Append { handle, len }] = txn.commands.as_slice() else { return None };
    let offset = export.getattr(handle).ok()?.size;
    let write = Txn { commands: vec![Command::Write { handle: handle.clone(), offset, len: *len }], ..txn.clone() };
    let message = postcard::to_stdvec(&Request::Txn(write.clone())).expect("a txn always encodes");
    Some((write, LoggedTxn { message, data: data.to_vec(), refused: Vec::new() }))
}

/// The transaction of a logged form, if it decodes (it was encoded by this server).
fn decode_logged(logged: LoggedTxn) -> Option<(Txn, LoggedTxn)> {
    match postcard::from_bytes::<Request>(&logged.message) {
        Ok(Request::Txn(txn)) => Some((txn, logged)),
        _ => None,
    }
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
    use braid_proto::{Credentials, Handle, TxnSeq};

    /// An export holding `f` = "abc", an empty log, and the handle of `f`.
    fn setup(dir: &std::path::Path) -> (Export, Mutex<Applier>, Arc<Committer>, Handle) {
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("f"), b"abc").unwrap();
        let export = Export::open(&data, [7; 32], None).unwrap();
        let (wal, recovered) = Wal::open(&dir.join("wal"), None).unwrap();
        let committer = Committer::new(Lsn(0), wal.segment(), std::time::Duration::from_secs(1));
        let applier = Mutex::new(Applier::new(wal, recovered.cache, recovered.next_lsn));
        let f = export.lookup(&export.root_entry().unwrap().handle, b"f").unwrap().handle;
        (export, applier, committer, f)
    }

    fn append(f: &Handle, seq: u64) -> Txn {
        Txn {
            seq: TxnSeq(seq),
            replied_below: TxnSeq(seq),
            creds: Credentials::default(),
            commands: vec![Command::Append { handle: f.clone(), len: 3 }],
        }
    }

    #[test]
    fn an_append_is_logged_as_the_write_it_became_and_a_torn_one_is_not_appended_twice() {
        // Goal: at most once for appends too. A resent append whose first application was
        // torn by a crash lands where it landed the first time, not at the new end of file.
        let dir = tempfile::tempdir().unwrap();
        let (export, applier, committer, f) = setup(dir.path());
        let client = ClientId(9);
        let txn = append(&f, 1);
        let message = postcard::to_stdvec(&Request::Txn(txn.clone())).unwrap();
        apply_txn(&applier, &committer, &export, client.into(), &txn, &message, b"xyz").unwrap();
        assert_eq!(std::fs::read(dir.path().join("data/f")).unwrap(), b"abcxyz");

        // The log holds a write at offset 3: replaying it finds the transaction as logged.
        drop(applier);
        let (_, recovered) = Wal::open(&dir.path().join("wal"), None).unwrap();
        assert!(matches!(recovered.cache.check(client, TxnSeq(1)), Seen::Done(_)));

        // A crash after the log append and the write, before the reply record: torn.
        let mut torn = ReplyCache::default();
        let logged = Txn { commands: vec![Command::Write { handle: f.clone(), offset: 3, len: 3 }], ..append(&f, 2) };
        let logged = LoggedTxn { message: postcard::to_stdvec(&Request::Txn(logged)).unwrap(), data: b"xyz".to_vec(), refused: Vec::new() };
        torn.logged(client, TxnSeq(2), Some(logged));
        let (wal, _) = Wal::open(&dir.path().join("wal2"), None).unwrap();
        let applier = Mutex::new(Applier::new(wal, torn, Lsn(10)));
        let resent = append(&f, 2);
        let message = postcard::to_stdvec(&Request::Txn(resent.clone())).unwrap();
        apply_txn(&applier, &committer, &export, client.into(), &resent, &message, b"xyz").unwrap();
        assert_eq!(std::fs::read(dir.path().join("data/f")).unwrap(), b"abcxyz", "the resent append was applied twice");
    }

    #[test]
    fn later_commands_name_what_earlier_ones_of_the_transaction_created() {
        // Goal: a client sends a create and the writes to the new file in one transaction,
        // before it knows the file's handle; a reference to nothing created fails cleanly.
        let dir = tempfile::tempdir().unwrap();
        let (export, applier, committer, _) = setup(dir.path());
        let root = export.root_entry().unwrap().handle;
        let created = Handle::created_by(0);
        let commands = vec![
            Command::Create {
                parent: root.clone(),
                name: b"new".to_vec(),
                mode: libc::S_IFREG | 0o600,
                rdev: 0,
                exclusive: true,
                pin: false,
            },
            Command::Write { handle: created.clone(), offset: 0, len: 5 },
            Command::SetAttr { handle: created, changes: braid_proto::AttrChanges { mode: Some(0o640), ..Default::default() } },
            Command::Write { handle: Handle::created_by(1), offset: 0, len: 1 },
        ];
        let txn = Txn { seq: TxnSeq(1), replied_below: TxnSeq(1), creds: Credentials::default(), commands };
        let message = postcard::to_stdvec(&Request::Txn(txn.clone())).unwrap();
        let Ok(Reply::Txn(outcome)) = apply_txn(&applier, &committer, &export, ClientId(3).into(), &txn, &message, b"hello!") else {
            panic!("txn failed")
        };
        assert_eq!(outcome.results.len(), 4);
        assert!(outcome.results[..3].iter().all(Result::is_ok), "{:?}", outcome.results);
        assert_eq!(outcome.results[3], Err(Errno(libc::ESTALE)), "command 1 created nothing");
        assert_eq!(std::fs::read(dir.path().join("data/new")).unwrap(), b"hello");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join("data/new")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn a_refused_write_stops_the_transaction_only_for_clients_before_version_6() {
        // Goal: a refused write ends the transaction of an old client (which sends the rest
        // again); for a client of version 6 the writes and changes after it are applied, with
        // one result per command; any other refusal still ends the transaction.
        let dir = tempfile::tempdir().unwrap();
        let (export, applier, committer, f) = setup(dir.path());
        let truncate =
            |size| Command::SetAttr { handle: f.clone(), changes: braid_proto::AttrChanges { size: Some(size), ..Default::default() } };
        let commands = vec![
            Command::Write { handle: f.clone(), offset: 0, len: 1 },
            Command::Write { handle: f.clone(), offset: 1 << 44, len: 1 }, // past ext4's largest file
            Command::Write { handle: f.clone(), offset: 1, len: 1 },
            truncate(4),
            Command::Rmdir { parent: export.root_entry().unwrap().handle, name: b"none".to_vec() },
            truncate(2),
        ];
        for (seq, writes_go_on, tried, content) in [(1, false, 2, &b"Xbc"[..]), (2, true, 5, b"XYc\0")] {
            let txn = Txn { seq: TxnSeq(seq), replied_below: TxnSeq(seq), creds: Credentials::default(), commands: commands.clone() };
            let message = postcard::to_stdvec(&Request::Txn(txn.clone())).unwrap();
            std::fs::write(dir.path().join("data/f"), b"abc").unwrap();
            let sender = Sender { client: ClientId(4), writes_go_on, fence: Fence::default() };
            let Ok(Reply::Txn(outcome)) = apply_txn(&applier, &committer, &export, sender, &txn, &message, b"XEY") else {
                panic!("txn failed")
            };
            assert_eq!(outcome.results.len(), tried, "writes_go_on {writes_go_on}: {:?}", outcome.results);
            assert_eq!(outcome.results[1], Err(Errno(libc::EFBIG)));
            assert_eq!(std::fs::read(dir.path().join("data/f")).unwrap(), content, "writes_go_on {writes_go_on}");
        }
    }

    #[test]
    fn queued_commands_naming_an_object_whose_right_was_lost_are_refused() {
        // Goal: in a write-back, each queued command that names a lost object is refused with
        // EIO (a refused write does not stop the rest, as any refused write); queued commands on
        // other objects, and commands after the queued ones (sent directly), are applied.
        let dir = tempfile::tempdir().unwrap();
        let (export, applier, committer, lost) = setup(dir.path());
        std::fs::write(dir.path().join("data/g"), b"ghi").unwrap();
        let kept = export.lookup(&export.root_entry().unwrap().handle, b"g").unwrap().handle;
        let write = |handle: &Handle, offset| Command::Write { handle: handle.clone(), offset, len: 1 };
        let commands = vec![write(&lost, 0), write(&kept, 0), write(&lost, 1), write(&kept, 1), write(&lost, 2)];
        let txn = Txn { seq: TxnSeq(1), replied_below: TxnSeq(1), creds: Credentials::default(), commands };
        let message = postcard::to_stdvec(&Request::Txn(txn.clone())).unwrap();
        let lost_objects = [lost.clone()];
        let sender = Sender { client: ClientId(4), writes_go_on: true, fence: Fence { queued: 4, lost: &lost_objects } };
        let Ok(Reply::Txn(outcome)) = apply_txn(&applier, &committer, &export, sender, &txn, &message, b"VWXYZ") else {
            panic!("txn failed")
        };
        let refused: Vec<bool> = outcome.results.iter().map(|r| *r == Err(Errno(libc::EIO))).collect();
        assert_eq!(refused, [true, false, true, false, false], "{:?}", outcome.results);
        assert_eq!(std::fs::read(dir.path().join("data/f")).unwrap(), b"abZ", "only the direct write reached the lost object");
        assert_eq!(std::fs::read(dir.path().join("data/g")).unwrap(), b"WYi");

        let setattr = Command::SetAttr { handle: lost.clone(), changes: braid_proto::AttrChanges { size: Some(0), ..Default::default() } };
        let txn = Txn { seq: TxnSeq(2), replied_below: TxnSeq(2), creds: Credentials::default(), commands: vec![setattr, write(&kept, 2)] };
        let message = postcard::to_stdvec(&Request::Txn(txn.clone())).unwrap();
        let sender = Sender { fence: Fence { queued: 2, lost: &lost_objects }, ..sender };
        let Ok(Reply::Txn(outcome)) = apply_txn(&applier, &committer, &export, sender, &txn, &message, b"Q") else { panic!("txn failed") };
        assert_eq!(outcome.results, [Err(Errno(libc::EIO))], "any other refusal ends the transaction");
        assert_eq!(std::fs::read(dir.path().join("data/f")).unwrap(), b"abZ");
    }

    #[test]
    fn a_command_the_fence_refused_is_refused_again_when_its_transaction_is_applied_again() {
        // Goal: a write-back applied after a crash of the machine (its records survived, what it
        // did may not have) replays the fence's decisions: the write refused because another
        // client had taken the file is refused again, though the resend comes unfenced (as a
        // reclaim does in the grace period), and the other command is applied again.
        let dir = tempfile::tempdir().unwrap();
        let (export, applier, committer, lost) = setup(dir.path());
        std::fs::write(dir.path().join("data/g"), b"ghi").unwrap();
        let kept = export.lookup(&export.root_entry().unwrap().handle, b"g").unwrap().handle;
        let commands = vec![Command::Write { handle: lost.clone(), offset: 0, len: 1 }, Command::Write { handle: kept, offset: 0, len: 1 }];
        let txn = Txn { seq: TxnSeq(1), replied_below: TxnSeq(1), creds: Credentials::default(), commands };
        let message = postcard::to_stdvec(&Request::Txn(txn.clone())).unwrap();
        let lost_objects = [lost.clone()];
        let client = ClientId(4);
        let fenced = Sender { client, writes_go_on: true, fence: Fence { queued: 2, lost: &lost_objects } };
        apply_txn(&applier, &committer, &export, fenced, &txn, &message, b"XY").unwrap();
        assert_eq!(std::fs::read(dir.path().join("data/f")).unwrap(), b"abc");

        // The machine crashed before a commit: the transaction counts as torn, g lost its write.
        drop(applier);
        std::fs::write(dir.path().join("data/g"), b"ghi").unwrap();
        let (wal, recovered) = Wal::open(&dir.path().join("wal"), Some(Lsn(0))).unwrap();
        assert_eq!(recovered.undone, 1);
        let applier = Mutex::new(Applier::new(wal, recovered.cache, recovered.next_lsn));
        let unfenced = Sender { client, writes_go_on: true, fence: Fence::default() };
        let Ok(Reply::Txn(outcome)) = apply_txn(&applier, &committer, &export, unfenced, &txn, &message, b"XY") else {
            panic!("txn failed")
        };
        assert_eq!(outcome.results[0], Err(Errno(libc::EIO)), "{:?}", outcome.results);
        assert!(outcome.results[1].is_ok(), "{:?}", outcome.results);
        assert_eq!(std::fs::read(dir.path().join("data/f")).unwrap(), b"abc", "the refused write was applied when replayed");
        assert_eq!(std::fs::read(dir.path().join("data/g")).unwrap(), b"Yhi");

        // And the log of that second application keeps the refusal for a third.
        drop(applier);
        let (_, recovered) = Wal::open(&dir.path().join("wal"), Some(Lsn(0))).unwrap();
        let Seen::Torn(Some(logged)) = recovered.cache.check(client, TxnSeq(1)) else { panic!("not torn") };
        assert_eq!(logged.refused, [0]);
    }

    #[test]
    fn an_append_must_be_alone_in_its_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (export, applier, committer, f) = setup(dir.path());
        let mut txn = append(&f, 1);
        txn.commands.push(Command::Write { handle: f.clone(), offset: 0, len: 0 });
        let message = postcard::to_stdvec(&Request::Txn(txn.clone())).unwrap();
        assert!(matches!(
            apply_txn(&applier, &committer, &export, ClientId(1).into(), &txn, &message, b"xyz"),
            Err(WireError::Malformed(_))
        ));
    }

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
