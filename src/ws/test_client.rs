//! Test-only encoder for client frames (masked, any bits), so tests can produce what a browser would
//! send as well as what a hostile client could.

use super::frame::OpCode;
use super::mask::apply_mask_plain;

/// The masking key of RFC 6455 §5.7's examples.
pub(crate) const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// How the payload length is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Length {
    /// The shortest encoding, as RFC 6455 §5.2 asks.
    Minimal,
    /// Always the 16-bit form (payload must fit in 16 bits).
    Bits16,
    /// Always the 64-bit form.
    Bits64,
}

/// A masked frame with the standard key and minimal length encoding.
pub(crate) fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    frame_with_key(fin, opcode, payload, KEY)
}

/// A masked frame with the given key and minimal length encoding.
pub(crate) fn frame_with_key(fin: bool, opcode: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let first = if fin { 0x80 } else { 0 } | opcode as u8;
    raw(first, Some(key), Length::Minimal, payload)
}

/// A frame with the given first byte (FIN, RSV and opcode bits, unchecked), optional mask and length
/// form. The payload is given unmasked and masked here when `mask` is set.
pub(crate) fn raw(first: u8, mask: Option<[u8; 4]>, length: Length, payload: &[u8]) -> Vec<u8> {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut frame = vec![first];
    let len = payload.len();
    match length {
        Length::Minimal if len <= 125 => frame.push(mask_bit | len as u8),
        Length::Minimal if len <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Length::Bits16 => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        }
        Length::Minimal | Length::Bits64 => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let payload_start = frame.len() + if mask.is_some() { 4 } else { 0 };
    if let Some(key) = mask {
        frame.extend_from_slice(&key);
    }
    frame.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask_plain(&mut frame[payload_start..], key);
    }
    frame
}
