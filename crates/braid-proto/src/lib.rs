//! The braid wire protocol: the fixed frame header, the typed messages, their codec and the
//! limits on every length. This crate does no I/O and owns no state; the server and the client
//! both depend on it and never on each other.
//!
//! A frame is a 32-byte [`frame::FrameHeader`] followed by raw bulk bytes (file data, never
//! re-encoded) and then a postcard-encoded message.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod codec;
pub mod frame;
pub mod limits;
pub mod lockset;
pub mod messages;

pub use codec::{decode_frame, decode_message, encode_frame, encode_parts, Checksum, CodecError, EncodedFrame, Frame};
pub use frame::{FrameHeader, FrameKind, HEADER_BYTES};
pub use messages::*;
