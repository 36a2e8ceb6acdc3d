//! Object handles: the kernel's file handle of an object, its file type and a keyed MAC.
//!
//! ```text
//! [0] format version (1)   [1] object kind   [2..6] kernel handle type (i32 LE)
//! [6] kernel handle length n   [7..7+n] kernel handle   [7+n..7+n+16] MAC
//! ```
//! The MAC (keyed BLAKE3 over everything before it, key kept in the server's state directory)
//! makes handles unforgeable: a client can only name objects the server handed out, so it can
//! never open a file outside the export by guessing a kernel handle. The key persists, so
//! handles stay valid across server restarts.
use braid_proto::Handle;

use crate::sys::{KernelHandle, KERNEL_HANDLE_BYTES_MAX};

const FORMAT: u8 = 1;
const MAC_BYTES: usize = 16;
const PREFIX_BYTES: usize = 7;

/// The file type of an object decides how the server opens it (see `export::open_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Regular = 1,
    Directory = 2,
    Symlink = 3,
    /// fifo, socket, character or block device.
    Special = 4,
}

impl ObjectKind {
    pub fn from_mode(mode: u32) -> Self {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Self::Regular,
            libc::S_IFDIR => Self::Directory,
            libc::S_IFLNK => Self::Symlink,
            _ => Self::Special,
        }
    }

    fn from_wire(byte: u8) -> Option<Self> {
        [Self::Regular, Self::Directory, Self::Symlink, Self::Special].into_iter().find(|k| *k as u8 == byte)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandleError {
    #[error("handle has a bad length or format")]
    Malformed,
    #[error("handle MAC mismatch: forged or from another server")]
    BadMac,
}

pub struct HandleSealer {
    key: [u8; 32],
}

impl HandleSealer {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    pub fn seal(&self, kind: ObjectKind, kernel: &KernelHandle) -> Handle {
        assert!(kernel.bytes.len() <= KERNEL_HANDLE_BYTES_MAX, "kernel handle of {} bytes", kernel.bytes.len());
        let mut bytes = Vec::with_capacity(PREFIX_BYTES + kernel.bytes.len() + MAC_BYTES);
        bytes.push(FORMAT);
        bytes.push(kind as u8);
        bytes.extend_from_slice(&kernel.handle_type.to_le_bytes());
        bytes.push(kernel.bytes.len() as u8);
        bytes.extend_from_slice(&kernel.bytes);
        let mac = self.mac(&bytes);
        bytes.extend_from_slice(&mac);
        Handle(bytes)
    }

    /// Verifies the MAC and returns the kind and kernel handle.
    pub fn open(&self, handle: &Handle) -> Result<(ObjectKind, KernelHandle), HandleError> {
        let bytes = &handle.0;
        if bytes.len() < PREFIX_BYTES + MAC_BYTES || bytes[0] != FORMAT {
            return Err(HandleError::Malformed);
        }
        let kernel_len = bytes[6] as usize;
        if kernel_len > KERNEL_HANDLE_BYTES_MAX || bytes.len() != PREFIX_BYTES + kernel_len + MAC_BYTES {
            return Err(HandleError::Malformed);
        }
        let (body, mac) = bytes.split_at(PREFIX_BYTES + kernel_len);
        // Constant-time comparison, so the MAC cannot be guessed byte by byte.
        if !constant_time_eq(&self.mac(body), mac) {
            return Err(HandleError::BadMac);
        }
        let kind = ObjectKind::from_wire(bytes[1]).ok_or(HandleError::Malformed)?;
        let handle_type = i32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        Ok((kind, KernelHandle { handle_type, bytes: body[PREFIX_BYTES..].to_vec() }))
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_BYTES] {
        let full = blake3::keyed_hash(&self.key, body);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full.as_bytes()[..MAC_BYTES]);
        out
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> KernelHandle {
        KernelHandle { handle_type: 1, bytes: vec![1, 2, 3, 4, 5, 6, 7, 8] }
    }

    #[test]
    fn seal_then_open_round_trips() {
        let sealer = HandleSealer::new([7; 32]);
        let handle = sealer.seal(ObjectKind::Directory, &kernel());
        assert_eq!(sealer.open(&handle), Ok((ObjectKind::Directory, kernel())));
    }

    #[test]
    fn forged_truncated_and_foreign_handles_are_refused() {
        // Goal: no byte of a handle can be changed, and another server's key does not verify.
        let sealer = HandleSealer::new([7; 32]);
        let handle = sealer.seal(ObjectKind::Regular, &kernel());
        for i in 0..handle.0.len() {
            let mut forged = handle.clone();
            forged.0[i] ^= 1;
            assert!(sealer.open(&forged).is_err(), "flipping byte {i} was accepted");
        }
        let mut short = handle.clone();
        short.0.pop();
        assert_eq!(sealer.open(&short), Err(HandleError::Malformed));
        assert_eq!(HandleSealer::new([8; 32]).open(&handle), Err(HandleError::BadMac));
        assert_eq!(sealer.open(&Handle(vec![])), Err(HandleError::Malformed));
    }
}
