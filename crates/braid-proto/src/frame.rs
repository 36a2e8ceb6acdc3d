//! The fixed 32-byte frame header.
//!
//! ```text
//!  0..4   magic "BRD1"
//!  4      kind (FrameKind)
//!  5      flags (0; reserved for later features)
//!  6..8   reserved, must be 0
//!  8..16  request id, little endian: pairs a response with its request
//! 16..20  message length (postcard bytes, after the data)
//! 20..24  data length (raw bulk bytes, right after the header)
//! 24..28  crc32c of data || message
//! 28..32  crc32c of bytes 0..28, so junk is rejected before its lengths are trusted
//! ```
use crate::limits::{MESSAGE_BYTES_MAX, TXN_DATA_BYTES_MAX};

pub const HEADER_BYTES: usize = 32;
pub const MAGIC: [u8; 4] = *b"BRD1";

/// What a frame carries. The numbers are stable wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Client -> server, first frame of a connection.
    Hello = 1,
    /// Server -> client, answer to Hello.
    Welcome = 2,
    /// Client -> server request.
    Request = 3,
    /// Server -> client response to the request with the same id.
    Response = 4,
    /// Server -> client, unsolicited, on a connection the client subscribed (`Request::Subscribe`):
    /// a [`crate::Callback`]. The id names the callback in the client's acknowledgement.
    Callback = 5,
}

impl FrameKind {
    fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Hello),
            2 => Some(Self::Welcome),
            3 => Some(Self::Request),
            4 => Some(Self::Response),
            5 => Some(Self::Callback),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub request_id: u64,
    pub message_len: u32,
    pub data_len: u32,
    pub payload_crc: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("bad magic {0:02x?}: not a braid peer")]
    BadMagic([u8; 4]),
    #[error("header checksum mismatch: corrupt or not a braid frame")]
    BadHeaderChecksum,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("reserved header bits set")]
    ReservedBits,
    #[error("message length {0} exceeds the limit {MESSAGE_BYTES_MAX}")]
    MessageTooLong(u32),
    #[error("data length {0} exceeds the limit {TXN_DATA_BYTES_MAX}")]
    DataTooLong(u32),
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = self.kind as u8;
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.message_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.data_len.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&header_crc.to_le_bytes());
        out
    }

    /// Validates everything that can be validated from the header alone, in the order that
    /// rejects junk cheapest: magic, header checksum, kind, lengths.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, HeaderError> {
        let u32_at = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(w)
        };
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        if crc32c::crc32c(&bytes[0..28]) != u32_at(28) {
            return Err(HeaderError::BadHeaderChecksum);
        }
        let kind = FrameKind::from_wire(bytes[4]).ok_or(HeaderError::UnknownKind(bytes[4]))?;
        if bytes[5] != 0 || bytes[6] != 0 || bytes[7] != 0 {
            return Err(HeaderError::ReservedBits);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[8..16]);
        let message_len = u32_at(16);
        let data_len = u32_at(20);
        if message_len as usize > MESSAGE_BYTES_MAX {
            return Err(HeaderError::MessageTooLong(message_len));
        }
        if data_len as usize > TXN_DATA_BYTES_MAX {
            return Err(HeaderError::DataTooLong(data_len));
        }
        Ok(Self { kind, request_id: u64::from_le_bytes(id), message_len, data_len, payload_crc: u32_at(24) })
    }

    pub fn payload_bytes(&self) -> usize {
        self.message_len as usize + self.data_len as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Request,
            request_id: 0x0102_0304_0506_0708,
            message_len: 17,
            data_len: 4096,
            payload_crc: 0xdead_beef,
        }
    }

    #[test]
    fn golden_bytes() {
        // Goal: the header layout is a stable wire format. Method: compare with fixed bytes.
        let bytes = sample().encode();
        assert_eq!(&bytes[0..4], b"BRD1");
        assert_eq!(bytes[4], 3);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[16..20], &[17, 0, 0, 0]);
        assert_eq!(&bytes[20..24], &[0, 16, 0, 0]);
        assert_eq!(&bytes[24..28], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(FrameHeader::decode(&bytes), Ok(sample()));
    }

    #[test]
    fn rejects_junk_and_oversized_lengths() {
        // Goal: every malformed header is refused with its own error before lengths are used.
        let http: [u8; 32] = *b"GET / HTTP/1.1\r\nHost: x\r\n\r\n12345";
        assert!(matches!(FrameHeader::decode(&http), Err(HeaderError::BadMagic(_))));

        let mut flipped = sample().encode();
        flipped[17] ^= 0x40;
        assert_eq!(FrameHeader::decode(&flipped), Err(HeaderError::BadHeaderChecksum));

        let huge = FrameHeader { message_len: u32::MAX, ..sample() }.encode();
        assert_eq!(FrameHeader::decode(&huge), Err(HeaderError::MessageTooLong(u32::MAX)));

        let big_data = FrameHeader { data_len: (TXN_DATA_BYTES_MAX + 1) as u32, ..sample() }.encode();
        assert!(matches!(FrameHeader::decode(&big_data), Err(HeaderError::DataTooLong(_))));

        let mut bad_kind = sample().encode();
        bad_kind[4] = 99;
        let crc = crc32c::crc32c(&bad_kind[0..28]);
        bad_kind[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FrameHeader::decode(&bad_kind), Err(HeaderError::UnknownKind(99)));
    }
}
