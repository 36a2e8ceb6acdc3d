//! The clients that may hold rights granted on this state: a restarted server process knows
//! nothing of its predecessor's rights, so its grace period waits for the clients that may hold
//! some to write back what they changed under them (`Request::ReclaimDone`), and no longer.
//!
//! ```text
//! state/clients   postcard Vec<u64>: every client subscribed to this process or, not back yet,
//!                 to an earlier one; replaced (by rename) whenever a client is added or removed
//! ```
//!
//! # Correctness
//! A client is on file, durably, before it is subscribed, and rights go only to subscribers: so
//! every client that may hold a right of a process that crashed is on file when the next one
//! starts. A client leaves the file when it unsubscribes (it gives up every right). Clients of
//! an earlier process stay on file until one lease after a restart has passed (their rights
//! have expired by then), so a second crash during the grace period still waits for them.
//! No file, or one that cannot be read, means nobody is known: the grace period then lasts a
//! whole lease, as it did before the file existed, and no list is written before it is over
//! (it would leave out the clients of the earlier process).
use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use braid_proto::ClientId;

pub struct KnownClients {
    path: PathBuf,
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// Subscribed to this process.
    current: BTreeSet<u64>,
    /// Of earlier processes, not subscribed to this one yet.
    earlier: BTreeSet<u64>,
    /// There was no list to read (a state of an older server) or it was damaged: until the
    /// grace period is over, a list written now would leave out clients that may hold rights.
    earlier_unknown: bool,
}

impl KnownClients {
    /// Reads `state_dir/clients`: the clients that may hold rights of earlier processes, or
    /// `None` if that is not known. A `new_state` gets an empty list: the next start then
    /// waits for nobody unless somebody subscribed.
    pub fn open(state_dir: &Path, new_state: bool) -> io::Result<(Self, Option<HashSet<ClientId>>)> {
        let path = state_dir.join("clients");
        if new_state {
            crate::instances::replace_durably(&path, &postcard::to_stdvec(&Vec::<u64>::new()).map_err(io::Error::other)?)?;
        }
        let earlier: Option<BTreeSet<u64>> = match fs::read(&path) {
            Ok(bytes) => match postcard::from_bytes::<Vec<u64>>(&bytes) {
                Ok(ids) => Some(ids.into_iter().collect()),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable list of clients: the grace period lasts a whole lease");
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the list of clients: the grace period lasts a whole lease");
                None
            }
        };
        let awaited = earlier.as_ref().map(|ids| ids.iter().map(|id| ClientId(*id)).collect());
        let known = Known { current: BTreeSet::new(), earlier_unknown: earlier.is_none(), earlier: earlier.unwrap_or_default() };
        Ok((Self { path, known: Mutex::new(known) }, awaited))
    }

    /// Records, durably, that `client` may hold rights: call before it is granted any. Clients
    /// of earlier processes are forgotten once `grace_over`.
    pub fn remember(&self, client: ClientId, grace_over: bool) -> io::Result<()> {
        let mut known = self.lock();
        let was_earlier = known.earlier.remove(&client.0);
        let added = known.current.insert(client.0);
        let earlier_gone = grace_over && (!known.earlier.is_empty() || known.earlier_unknown);
        if earlier_gone {
            known.earlier.clear();
            known.earlier_unknown = false;
        }
        if (added && !was_earlier) || earlier_gone {
            self.write(&known)?;
        }
        Ok(())
    }

    /// `client` gave up every right it held (it unsubscribed).
    pub fn forget(&self, client: ClientId) -> io::Result<()> {
        let mut known = self.lock();
        if known.current.remove(&client.0) | known.earlier.remove(&client.0) {
            self.write(&known)?;
        }
        Ok(())
    }

    /// After a failure to write the file: nothing on it can be trusted, so remove it (the next
    /// start then waits a whole lease).
    pub fn distrust(&self) {
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::error!(path = %self.path.display(), error = %e, "cannot remove the list of clients; after a restart the grace period may end too early");
            }
        }
    }

    fn write(&self, known: &Known) -> io::Result<()> {
        if known.earlier_unknown {
            return Ok(());
        }
        let ids: Vec<u64> = known.current.union(&known.earlier).copied().collect();
        let bytes = postcard::to_stdvec(&ids).map_err(io::Error::other)?;
        crate::instances::replace_durably(&self.path, &bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().expect("known clients lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_file(dir: &Path) -> Option<HashSet<ClientId>> {
        KnownClients::open(dir, false).unwrap().1
    }

    #[test]
    fn clients_stay_on_file_until_they_unsubscribe_or_a_grace_period_passes_without_them() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(on_file(dir.path()), None, "a state that served without the list (an older server): a whole lease");
        let (first, awaited) = KnownClients::open(dir.path(), true).unwrap();
        assert_eq!(awaited, Some(HashSet::new()));
        assert_eq!(on_file(dir.path()), Some(HashSet::new()), "a new state: nobody to wait for");
        first.remember(ClientId(1), true).unwrap();
        first.remember(ClientId(2), true).unwrap();
        assert_eq!(on_file(dir.path()), Some(HashSet::from([ClientId(1), ClientId(2)])));
        first.forget(ClientId(2)).unwrap();
        assert_eq!(on_file(dir.path()), Some(HashSet::from([ClientId(1)])), "2 gave its rights up");
        drop(first);

        // A restart: client 1 is awaited; 3 subscribes during the grace period, and a second
        // crash must still wait for 1, which is not back.
        let (second, awaited) = KnownClients::open(dir.path(), false).unwrap();
        assert_eq!(awaited, Some(HashSet::from([ClientId(1)])));
        second.remember(ClientId(3), false).unwrap();
        assert_eq!(on_file(dir.path()), Some(HashSet::from([ClientId(1), ClientId(3)])));
        second.remember(ClientId(4), true).unwrap();
        assert_eq!(on_file(dir.path()), Some(HashSet::from([ClientId(3), ClientId(4)])), "1 did not come back within the grace period");

        fs::write(dir.path().join("clients"), b"\xff\xff").unwrap();
        assert_eq!(on_file(dir.path()), None, "a damaged list: a whole lease");
        second.distrust();
        assert_eq!(on_file(dir.path()), None);

        // Nobody known: no list is written before the grace period is over, since it would
        // leave out the clients of the earlier process.
        let (third, awaited) = KnownClients::open(dir.path(), false).unwrap();
        assert_eq!(awaited, None);
        third.remember(ClientId(5), false).unwrap();
        assert_eq!(on_file(dir.path()), None, "a list written during a grace period of unknown clients");
        third.remember(ClientId(6), true).unwrap();
        assert_eq!(on_file(dir.path()), Some(HashSet::from([ClientId(5), ClientId(6)])));
    }
}
