//! Encoding and decoding of whole frames. After the header comes the raw bulk data, then the
//! postcard message: data first, so that a receiver keeps the payload buffer as the data (the
//! message is split off its end) and a sender can write header, data and message with one
//! vectored write, and 1 MiB of file data is never copied to build or take apart a frame.
use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{FrameHeader, FrameKind, HeaderError, HEADER_BYTES};
use crate::limits::{MESSAGE_BYTES_MAX, TXN_DATA_BYTES_MAX};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("payload checksum mismatch on request {request_id}")]
    BadPayloadChecksum { request_id: u64 },
    #[error("payload is {got} bytes, header says {expected}")]
    PayloadLength { expected: usize, got: usize },
    #[error("message does not decode: {0}")]
    Message(String),
    #[error("message of {0} bytes exceeds the limit {MESSAGE_BYTES_MAX}")]
    MessageTooLong(usize),
    #[error("data of {0} bytes exceeds the limit {TXN_DATA_BYTES_MAX}")]
    DataTooLong(usize),
}

/// How a frame's payload (data || message) is protected, negotiated per connection. The header
/// always carries its own crc32c, so junk is rejected before its lengths are trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// crc32c of the payload in the header: plain TCP, whose 16-bit checksum misses too much.
    Crc32c,
    /// No payload checksum (the header field is 0): the channel's authenticated encryption (the
    /// AEAD of TLS 1.3) already refuses any changed byte. Computing crc32c again cost about a
    /// sixth of the CPU of a sequential read over TLS.
    ChannelAead,
}

impl Checksum {
    /// Every checksum this build implements, preferred first when the channel allows it.
    pub const ALL: [Checksum; 2] = [Checksum::ChannelAead, Checksum::Crc32c];

    /// The wire name, as offered in [`crate::Hello::checksums`].
    pub const fn name(self) -> &'static str {
        match self {
            Checksum::Crc32c => "crc32c",
            Checksum::ChannelAead => "aead",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether this checksum protects frames on a channel with (`true`) or without encryption.
    pub const fn fits(self, encrypted: bool) -> bool {
        match self {
            Checksum::Crc32c => true,
            Checksum::ChannelAead => encrypted,
        }
    }

    fn of(self, data: &[u8], message: &[u8]) -> u32 {
        match self {
            Checksum::Crc32c => crc32c::crc32c_append(crc32c::crc32c(data), message),
            Checksum::ChannelAead => 0,
        }
    }
}

/// A received frame whose header and payload checksums have been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub message: Vec<u8>,
    pub data: Vec<u8>,
}

impl Frame {
    /// Splits a payload (data || message) read after `header` and verifies its checksum.
    pub fn from_payload(header: FrameHeader, mut payload: Vec<u8>, checksum: Checksum) -> Result<Self, CodecError> {
        if payload.len() != header.payload_bytes() {
            return Err(CodecError::PayloadLength { expected: header.payload_bytes(), got: payload.len() });
        }
        let message = payload.split_off(header.data_len as usize);
        if checksum.of(&payload, &message) != header.payload_crc {
            return Err(CodecError::BadPayloadChecksum { request_id: header.request_id });
        }
        Ok(Self { header, message, data: payload })
    }

    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        decode_message(&self.message)
    }
}

/// A frame ready to send: write `header`, then the caller's data, then `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub header: [u8; HEADER_BYTES],
    pub message: Vec<u8>,
}

/// Encodes the header and message of a frame carrying `data`, without copying `data`. Fails only
/// on a message or data over its limit.
pub fn encode_parts<T: Serialize>(
    kind: FrameKind,
    request_id: u64,
    message: &T,
    data: &[u8],
    checksum: Checksum,
) -> Result<EncodedFrame, CodecError> {
    if data.len() > TXN_DATA_BYTES_MAX {
        return Err(CodecError::DataTooLong(data.len()));
    }
    let message = postcard::to_stdvec(message).map_err(|e| CodecError::Message(e.to_string()))?;
    if message.len() > MESSAGE_BYTES_MAX {
        return Err(CodecError::MessageTooLong(message.len()));
    }
    let header = FrameHeader {
        kind,
        request_id,
        message_len: message.len() as u32,
        data_len: data.len() as u32,
        payload_crc: checksum.of(data, &message),
    };
    Ok(EncodedFrame { header: header.encode(), message })
}

/// Encodes a whole frame into one buffer: header, data, message, with a crc32c payload checksum
/// (the handshake's, before any other is negotiated).
pub fn encode_frame<T: Serialize>(kind: FrameKind, request_id: u64, message: &T, data: &[u8]) -> Result<Vec<u8>, CodecError> {
    let parts = encode_parts(kind, request_id, message, data, Checksum::Crc32c)?;
    let mut out = Vec::with_capacity(HEADER_BYTES + data.len() + parts.message.len());
    out.extend_from_slice(&parts.header);
    out.extend_from_slice(data);
    out.extend_from_slice(&parts.message);
    Ok(out)
}

/// Decodes one postcard message; trailing bytes are an error, so two peers can never disagree
/// about where a message ends.
pub fn decode_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(CodecError::MessageTooLong(bytes.len()));
    }
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| CodecError::Message(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Message(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// Decodes a whole frame with a crc32c payload checksum from a buffer (used by tests and the
/// fuzz target; the network code reads the header and payload separately so that it can bound
/// its reads).
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, CodecError> {
    let Some(head) = buf.get(..HEADER_BYTES) else { return Ok(None) };
    let mut head_bytes = [0u8; HEADER_BYTES];
    head_bytes.copy_from_slice(head);
    let header = FrameHeader::decode(&head_bytes)?;
    let end = HEADER_BYTES + header.payload_bytes();
    let Some(payload) = buf.get(HEADER_BYTES..end) else { return Ok(None) };
    Ok(Some((Frame::from_payload(header, payload.to_vec(), Checksum::Crc32c)?, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use proptest::prelude::*;

    fn handle(n: u8) -> Handle {
        Handle(vec![n; 24])
    }

    fn sample_requests() -> Vec<Request> {
        vec![
            Request::Lookup { parent: handle(1), name: b"a.txt".to_vec() },
            Request::Read { handle: handle(2), offset: 1 << 33, len: 4096 },
            Request::ReadDir { handle: handle(3), cookie: 77, plus: true },
            Request::Commit,
            Request::Txn(Txn {
                seq: TxnSeq(9),
                replied_below: TxnSeq(5),
                creds: Credentials { uid: 1000, gid: 1000, groups: vec![4, 27] },
                commands: vec![
                    Command::Create { parent: handle(1), name: b"m".to_vec(), mode: 0o100644, rdev: 0, exclusive: true, pin: false },
                    Command::Write { handle: handle(4), offset: 0, len: 3 },
                    Command::Rename { parent: handle(1), name: b"m".to_vec(), new_parent: handle(5), new_name: b"n".to_vec(), flags: 0 },
                    Command::SetAttr { handle: handle(4), changes: AttrChanges { mtime: Some(TimeSet::Now), ..Default::default() } },
                ],
            }),
        ]
    }

    #[test]
    fn frame_round_trip_keeps_message_and_raw_data() {
        // Goal: encode then decode gives back the message and the bulk bytes untouched.
        for (id, request) in sample_requests().into_iter().enumerate() {
            let data = vec![0xab; id * 1000];
            let bytes = encode_frame(FrameKind::Request, id as u64, &request, &data).unwrap();
            let (frame, used) = decode_frame(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(frame.header.request_id, id as u64);
            assert_eq!(frame.decode::<Request>().unwrap(), request);
            assert_eq!(frame.data, data);
        }
    }

    #[test]
    fn golden_message_bytes() {
        // Goal: the postcard layout of a message is stable. Commit = variant 12, no fields.
        let bytes = encode_frame(FrameKind::Request, 1, &Request::Commit, &[]).unwrap();
        assert_eq!(&bytes[HEADER_BYTES..], &[12]);
        // Data comes before the message.
        let bytes = encode_frame(FrameKind::Request, 1, &Request::Commit, b"xy").unwrap();
        assert_eq!(&bytes[HEADER_BYTES..], b"xy\x0c");
        let lookup = Request::Lookup { parent: Handle(vec![7]), name: b"x".to_vec() };
        let bytes = encode_frame(FrameKind::Request, 1, &lookup, &[]).unwrap();
        assert_eq!(&bytes[HEADER_BYTES..], &[0, 1, 7, 1, b'x']);
    }

    #[test]
    fn truncated_frames_wait_and_corrupt_payloads_fail() {
        // Goal: a prefix of a frame is "need more bytes", a flipped payload bit is an error.
        let bytes = encode_frame(FrameKind::Request, 3, &sample_requests()[4], b"abc").unwrap();
        for cut in [0, 5, HEADER_BYTES, bytes.len() - 1] {
            assert_eq!(decode_frame(&bytes[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert_eq!(decode_frame(&corrupt), Err(CodecError::BadPayloadChecksum { request_id: 3 }));
    }

    #[test]
    fn channel_aead_frames_skip_the_payload_checksum_but_not_the_header_one() {
        // Goal: under TLS the payload is not summed (the AEAD covers it), yet both ends agree on
        // the frame; a crc32c receiver refuses such a frame, and the header is still checked.
        let parts = encode_parts(FrameKind::Response, 4, &Request::Commit, b"data", Checksum::ChannelAead).unwrap();
        let header = FrameHeader::decode(&parts.header).unwrap();
        assert_eq!(header.payload_crc, 0);
        let payload = [&b"data"[..], &parts.message].concat();
        let frame = Frame::from_payload(header, payload.clone(), Checksum::ChannelAead).unwrap();
        assert_eq!(frame.data, b"data");
        assert_eq!(Frame::from_payload(header, payload, Checksum::Crc32c), Err(CodecError::BadPayloadChecksum { request_id: 4 }));
        let mut flipped = parts.header;
        flipped[21] ^= 1;
        assert!(FrameHeader::decode(&flipped).is_err());
        assert!(!Checksum::ChannelAead.fits(false) && Checksum::ChannelAead.fits(true) && Checksum::Crc32c.fits(false));
        assert_eq!(Checksum::from_name("aead"), Some(Checksum::ChannelAead));
        assert_eq!(Checksum::from_name("crc32c"), Some(Checksum::Crc32c));
        assert_eq!(Checksum::from_name("blake3"), None);
    }

    #[test]
    fn trailing_bytes_and_oversized_data_are_rejected() {
        let mut message = postcard::to_stdvec(&Request::Commit).unwrap();
        message.push(0);
        assert!(matches!(decode_message::<Request>(&message), Err(CodecError::Message(_))));
        let big = vec![0u8; TXN_DATA_BYTES_MAX + 1];
        assert_eq!(encode_frame(FrameKind::Request, 1, &Request::Commit, &big), Err(CodecError::DataTooLong(TXN_DATA_BYTES_MAX + 1)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes);
            let _ = decode_message::<Request>(&bytes);
            let _ = decode_message::<Response>(&bytes);
        }

        #[test]
        fn read_requests_round_trip(offset in any::<u64>(), len in any::<u32>(), id in any::<u64>()) {
            let request = Request::Read { handle: Handle(vec![1, 2, 3]), offset, len };
            let bytes = encode_frame(FrameKind::Request, id, &request, &[]).unwrap();
            let (frame, _) = decode_frame(&bytes).unwrap().unwrap();
            prop_assert_eq!(frame.decode::<Request>().unwrap(), request);
        }
    }
}
