//! Fuzz target: every message decoder on raw bytes. Nothing may panic or allocate without bound.
#![no_main]
use braid_proto::{decode_message, Hello, Request, Response, Welcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_message::<Request>(data);
    let _ = decode_message::<Response>(data);
    let _ = decode_message::<Hello>(data);
    let _ = decode_message::<Welcome>(data);
});
