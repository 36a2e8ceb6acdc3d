//! The table from FUSE node ids to server handles, with the kernel's lookup counts.
//!
//! Node ids are the server's inode numbers, so that `stat` shows stable numbers and hard links
//! share a node; the root's inode number and FUSE's root id 1 are swapped to keep the map a
//! bijection. An object created in the cache keeps its provisional number while the kernel
//! knows it; its server inode number is then an alias of that node, so that listings show the
//! number `stat` shows.
use std::collections::HashMap;

use braid_proto::Handle;

pub const ROOT_ID: u64 = 1;

pub struct InodeTable {
    root_ino: u64,
    nodes: HashMap<u64, Node>,
    /// The reverse map, for recalls, which name objects by handle.
    by_handle: HashMap<Handle, u64>,
    /// Server inode numbers of objects created in the cache, to the provisional node they are
    /// known by.
    aliases: HashMap<u64, u64>,
}

struct Node {
    handle: Handle,
    /// The server inode number this node is also known by (created in the cache).
    alias: Option<u64>,
    lookups: u64,
}

impl InodeTable {
    pub fn new(root_ino: u64, root: Handle) -> Self {
        let mut nodes = HashMap::new();
        // The root is never forgotten: one lookup that no FORGET will take back.
        let by_handle = HashMap::from([(root.clone(), ROOT_ID)]);
        nodes.insert(ROOT_ID, Node { handle: root, alias: None, lookups: 1 });
        Self { root_ino, nodes, by_handle, aliases: HashMap::new() }
    }

    /// The node the kernel knows `handle` by, if it knows it.
    pub fn node_of(&self, handle: &Handle) -> Option<u64> {
        self.by_handle.get(handle).copied()
    }

    /// Every node the kernel knows.
    pub fn nodes(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The node id the kernel sees for a server inode number.
    pub fn node_id(&self, ino: u64) -> u64 {
        if ino == self.root_ino {
            ROOT_ID
        } else if ino == ROOT_ID {
            self.root_ino
        } else {
            self.aliases.get(&ino).copied().unwrap_or(ino)
        }
    }

    pub fn handle(&self, node: u64) -> Option<Handle> {
        self.nodes.get(&node).map(|n| n.handle.clone())
    }

    /// Records one more kernel reference to the object, returning its node id. A new handle for
    /// a known id means the inode number was reused by a new object: the old one is gone. A
    /// known handle keeps its node (an object created in the cache keeps its provisional id).
    pub fn remember(&mut self, ino: u64, handle: &Handle) -> u64 {
        if let Some(id) = self.by_handle.get(handle).copied() {
            self.nodes.get_mut(&id).expect("by_handle names known nodes").lookups += 1;
            return id;
        }
        let id = self.node_id(ino);
        let node = self.nodes.entry(id).or_insert_with(|| {
            self.by_handle.insert(handle.clone(), id);
            Node { handle: handle.clone(), alias: None, lookups: 0 }
        });
        if node.handle != *handle {
            self.by_handle.remove(&node.handle);
            self.by_handle.insert(handle.clone(), id);
            node.handle = handle.clone();
        }
        node.lookups += 1;
        id
    }

    /// The object created in the cache as `provisional` is `real`, inode number `ino`, on the
    /// server. Its node keeps its id, so `stat` shows one inode number for as long as the
    /// kernel knows the node, and listings show that number too.
    pub fn created(&mut self, provisional: &Handle, real: &Handle, ino: u64) {
        let Some(id) = self.by_handle.remove(provisional) else { return };
        self.by_handle.insert(real.clone(), id);
        let Some(node) = self.nodes.get_mut(&id) else { return };
        node.handle = real.clone();
        if id != ino && ino != self.root_ino && ino != ROOT_ID {
            node.alias = Some(ino);
            self.aliases.insert(ino, id);
        }
    }

    pub fn forget(&mut self, node: u64, count: u64) {
        if node == ROOT_ID {
            return;
        }
        if let Some(n) = self.nodes.get_mut(&node) {
            n.lookups = n.lookups.saturating_sub(count);
            if n.lookups == 0 {
                self.by_handle.remove(&n.handle);
                if let Some(alias) = n.alias {
                    self.aliases.remove(&alias);
                }
                self.nodes.remove(&node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_inode_one_swap() {
        let table = InodeTable::new(2, Handle(vec![0]));
        assert_eq!(table.node_id(2), ROOT_ID);
        assert_eq!(table.node_id(ROOT_ID), 2);
        assert_eq!(table.node_id(77), 77);
    }

    #[test]
    fn lookups_are_counted_and_forgotten() {
        // Goal: a node lives exactly as long as the kernel holds lookups on it.
        let mut table = InodeTable::new(2, Handle(vec![0]));
        let h = Handle(vec![5]);
        assert_eq!(table.remember(50, &h), 50);
        table.remember(50, &h);
        assert_eq!(table.node_of(&h), Some(50));
        table.forget(50, 1);
        assert_eq!(table.handle(50), Some(h.clone()));
        table.forget(50, 1);
        assert_eq!(table.handle(50), None);
        assert_eq!(table.node_of(&h), None);
        table.forget(ROOT_ID, 100);
        assert!(table.handle(ROOT_ID).is_some(), "the root is never forgotten");
    }

    #[test]
    fn an_object_created_in_the_cache_keeps_its_node_once_created_on_the_server() {
        let mut table = InodeTable::new(2, Handle(vec![0]));
        let (provisional, real) = (Handle(vec![0xfe, 1]), Handle(vec![1, 7]));
        let id = table.remember(1 << 62, &provisional);
        table.created(&provisional, &real, 77);
        assert_eq!(table.handle(id), Some(real.clone()));
        assert_eq!(table.node_of(&real), Some(id), "recalls name the real handle");
        assert_eq!(table.node_of(&provisional), None);
        assert_eq!(table.node_id(77), id, "a listing shows the number stat shows");
        assert_eq!(table.remember(77, &real), id, "a lookup reporting the server's inode number finds the same node");
        table.forget(id, 1);
        assert_eq!(table.handle(id), Some(real.clone()), "two lookups were counted");
        table.forget(id, 1);
        assert_eq!(table.node_id(77), 77, "once the kernel forgot the node, the server's number stands");
    }

    #[test]
    fn a_reused_inode_number_takes_the_new_handle() {
        let mut table = InodeTable::new(2, Handle(vec![0]));
        table.remember(9, &Handle(vec![1]));
        table.remember(9, &Handle(vec![2]));
        assert_eq!(table.handle(9), Some(Handle(vec![2])));
        assert_eq!(table.node_of(&Handle(vec![1])), None);
        assert_eq!(table.node_of(&Handle(vec![2])), Some(9));
    }
}
