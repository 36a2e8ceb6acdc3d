//! Fuzz target: the frame decoder, on raw bytes and on frames whose checksums are made valid so
//! that the message decoders behind them are reached too. Nothing may panic.
#![no_main]
use braid_proto::frame::{FrameHeader, FrameKind, HEADER_BYTES};
use braid_proto::{decode_frame, Hello, Request, Response, Welcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, _))) = decode_frame(data) {
        decode_all(&frame.message);
    }
    // The same bytes as the payload of a frame with correct lengths and checksums.
    let Some((&split, payload)) = data.split_first() else { return };
    let data_len = (split as usize * payload.len() / 256).min(payload.len());
    let header = FrameHeader {
        kind: FrameKind::Request,
        request_id: 1,
        message_len: (payload.len() - data_len) as u32,
        data_len: data_len as u32,
        payload_crc: crc(payload),
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(payload);
    assert!(bytes.len() >= HEADER_BYTES);
    if let Ok(Some((frame, used))) = decode_frame(&bytes) {
        assert_eq!(used, bytes.len());
        decode_all(&frame.message);
    }
});

fn decode_all(message: &[u8]) {
    let _ = braid_proto::decode_message::<Request>(message);
    let _ = braid_proto::decode_message::<Response>(message);
    let _ = braid_proto::decode_message::<Hello>(message);
    let _ = braid_proto::decode_message::<Welcome>(message);
}

fn crc(bytes: &[u8]) -> u32 {
    // crc32c, bit by bit: the fuzz crate stays free of other dependencies.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}
