//! Frame headers: parsing what clients send and encoding what the server sends (RFC 6455 §5.2).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! ```
//!
//! Parsing never consumes a partial header: [`FrameHeader::parse`] returns `Ok(None)` until the whole
//! header is in the buffer. Server frames are never masked (RFC 6455 §5.1), so the encoders here write
//! at most [`SERVER_HEADER_BYTES_MAX`] bytes of header.

use std::io;

use super::close;
use super::codec::ProtocolError;

/// Longest header the server writes: 2 bytes + 8 bytes of extended length, no masking key.
pub const SERVER_HEADER_BYTES_MAX: usize = 10;
/// Longest header a client can send: the server's longest plus a 4-byte masking key.
pub const CLIENT_HEADER_BYTES_MAX: usize = 14;
/// Largest control frame payload (RFC 6455 §5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;

/// Bytes of the masking key (RFC 6455 §5.2).
const MASK_KEY_BYTES: usize = 4;
const _: () = assert!(CLIENT_HEADER_BYTES_MAX == SERVER_HEADER_BYTES_MAX + MASK_KEY_BYTES);

const FIN_BIT: u8 = 0x80;
/// RSV1, RSV2 and RSV3: meaningful only to a negotiated extension.
const RSV_BITS: u8 = 0x70;
/// RSV1 alone: permessage-deflate's "Per-Message Compressed" bit (RFC 7692 §6), the only
/// reserved bit an extension we negotiate gives a meaning to.
const RSV1_BIT: u8 = 0x40;
const OPCODE_BITS: u8 = 0x0f;
const MASK_BIT: u8 = 0x80;
const LENGTH_BITS: u8 = 0x7f;
/// 7-bit length values that announce a 16-bit or a 64-bit extended length.
const LENGTH_16_BIT: u8 = 126;
const LENGTH_64_BIT: u8 = 127;
/// Largest payload whose length fits the 7-bit field; 126 and 127 are the markers above.
const LENGTH_7_BIT_MAX: usize = 125;
/// RFC 6455 §5.2: "the most significant bit MUST be 0" in the 64-bit length.
const LENGTH_64_BIT_MSB: u64 = 1 << 63;

/// Frame opcode (RFC 6455 §5.2, §11.8). The reserved values 3-7 and 11-15 have no variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// Continues a fragmented message (RFC 6455 §5.4).
    Continuation = 0,
    /// Starts a UTF-8 text message.
    Text = 1,
    /// Starts a binary message.
    Binary = 2,
    /// Close (RFC 6455 §5.5.1).
    Close = 8,
    /// Ping (RFC 6455 §5.5.2).
    Ping = 9,
    /// Pong (RFC 6455 §5.5.3).
    Pong = 10,
}

impl OpCode {
    /// The opcode for the low four bits of a frame's first byte, or `None` for a reserved value.
    pub const fn from_bits(bits: u8) -> Option<OpCode> {
        match bits {
            0 => Some(OpCode::Continuation),
            1 => Some(OpCode::Text),
            2 => Some(OpCode::Binary),
            8 => Some(OpCode::Close),
            9 => Some(OpCode::Ping),
            10 => Some(OpCode::Pong),
            _ => None,
        }
    }

    /// Control frames are the opcodes with the high bit set (RFC 6455 §5.5).
    pub const fn is_control(self) -> bool {
        self as u8 & 0x08 != 0
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// Frame type.
    pub opcode: OpCode,
    /// RSV1: the message this frame starts is compressed (RFC 7692 §6). Only ever set when the
    /// caller allowed it, and then only on a text or binary frame.
    pub rsv1: bool,
    /// Masking key; client frames must have one (RFC 6455 §5.1), which the decoder checks.
    pub mask: Option<[u8; 4]>,
    /// Payload bytes following the header. Below 2^63 (RFC 6455 §5.2), and at most
    /// [`CONTROL_PAYLOAD_BYTES_MAX`] for control frames.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses the header at the start of `buf`.
    ///
    /// Returns `Ok(None)` while the header is incomplete: nothing is consumed and the caller retries
    /// with more bytes. Returns `Ok(Some((header, header_bytes)))` once it is complete; the payload
    /// starts at `buf[header_bytes]` and may not have arrived yet. A violation is reported as soon as
    /// the bytes that show it are present, without waiting for the rest of the header.
    ///
    /// Checked here (RFC 6455 §5.2, §5.5): reserved bits (no extension is negotiated), reserved
    /// opcodes, fragmented control frames, control payloads over 125 bytes, and the most significant
    /// bit of a 64-bit length. Non-minimal length encodings are accepted: §5.2 says the minimal
    /// number of bytes MUST be used, but rejecting them protects nothing. Whether a mask is required
    /// is the caller's decision, so a missing mask is not an error here.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        Self::parse_with(buf, false)
    }

    /// [`FrameHeader::parse`] on a connection that negotiated permessage-deflate when
    /// `rsv1_allowed`: RSV1 is then accepted on the first frame of a data message (text or
    /// binary) and still refused on control and continuation frames (RFC 7692 §6.1: "An endpoint
    /// MUST NOT set the Per-Message Compressed bit of control frames and non-first fragments").
    pub fn parse_with(
        buf: &[u8],
        rsv1_allowed: bool,
    ) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        let &[first, second, ref rest @ ..] = buf else {
            return Ok(None);
        };
        let allowed = if rsv1_allowed { RSV1_BIT } else { 0 };
        let rsv = (first & RSV_BITS & !allowed) >> 4;
        if rsv != 0 {
            return Err(ProtocolError::ReservedBitsSet { rsv });
        }
        let rsv1 = first & allowed != 0;
        let opcode_bits = first & OPCODE_BITS;
        let Some(opcode) = OpCode::from_bits(opcode_bits) else {
            return Err(ProtocolError::ReservedOpCode {
                opcode: opcode_bits,
            });
        };
        if rsv1 && !matches!(opcode, OpCode::Text | OpCode::Binary) {
            return Err(ProtocolError::CompressedBitMisplaced { opcode });
        }
        let fin = first & FIN_BIT != 0;
        // RFC 6455 §5.5: "Control frames themselves MUST NOT be fragmented."
        if opcode.is_control() && !fin {
            return Err(ProtocolError::FragmentedControlFrame { opcode });
        }

        let (payload_len, rest) = match second & LENGTH_BITS {
            LENGTH_16_BIT => {
                let Some((length, rest)) = rest.split_first_chunk::<2>() else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes(*length)), rest)
            }
            LENGTH_64_BIT => {
                let Some((length, rest)) = rest.split_first_chunk::<8>() else {
                    return Ok(None);
                };
                let payload_len = u64::from_be_bytes(*length);
                if payload_len & LENGTH_64_BIT_MSB != 0 {
                    return Err(ProtocolError::PayloadLengthMsbSet { payload_len });
                }
                (payload_len, rest)
            }
            length => (u64::from(length), rest),
        };
        // RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less."
        if opcode.is_control() && payload_len > CONTROL_PAYLOAD_BYTES_MAX as u64 {
            return Err(ProtocolError::ControlFrameTooBig {
                opcode,
                payload_len,
            });
        }

        let (mask, rest) = if second & MASK_BIT != 0 {
            let Some((key, rest)) = rest.split_first_chunk::<MASK_KEY_BYTES>() else {
                return Ok(None);
            };
            (Some(*key), rest)
        } else {
            (None, rest)
        };
        let header_bytes = buf.len() - rest.len();
        debug_assert!(header_bytes <= CLIENT_HEADER_BYTES_MAX);
        let header = FrameHeader {
            fin,
            opcode,
            rsv1,
            mask,
            payload_len,
        };
        Ok(Some((header, header_bytes)))
    }
}

/// Bytes of the unmasked (server) header for a payload of `payload_len` bytes.
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=LENGTH_7_BIT_MAX => 2,
        // 2 + 16-bit extended length.
        126..=0xffff => 4,
        // 2 + 64-bit extended length.
        _ => SERVER_HEADER_BYTES_MAX,
    }
}

/// The unmasked header bytes (RFC 6455 §5.2) and how many of them are used.
///
/// Panics if asked for a control frame that is fragmented or over 125 bytes: the server building one
/// is a programmer error, and sending it would make a conforming client close the connection.
fn header_bytes(
    fin: bool,
    opcode: OpCode,
    payload_len: usize,
) -> ([u8; SERVER_HEADER_BYTES_MAX], usize) {
    assert!(
        !opcode.is_control() || (fin && payload_len <= CONTROL_PAYLOAD_BYTES_MAX),
        "control frame {opcode:?} must be final and at most {CONTROL_PAYLOAD_BYTES_MAX} bytes, \
         got fin={fin} payload_len={payload_len}"
    );
    let mut header = [0u8; SERVER_HEADER_BYTES_MAX];
    header[0] = if fin { FIN_BIT } else { 0 } | opcode as u8;
    let used = header_len(payload_len);
    match used {
        2 => header[1] = payload_len as u8,
        4 => {
            header[1] = LENGTH_16_BIT;
            let length = u16::try_from(payload_len).expect("header_len chose 16 bits for it");
            header[2..4].copy_from_slice(&length.to_be_bytes());
        }
        _ => {
            header[1] = LENGTH_64_BIT;
            // usize is at most 64 bits on every target Rust supports, and a Vec holds at most
            // isize::MAX bytes, so the most significant bit is clear as RFC 6455 §5.2 requires.
            header[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    (header, used)
}

/// Appends an unmasked frame header to `out`; the caller appends `payload_len` payload bytes next.
pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload_len: usize) {
    let (header, used) = header_bytes(fin, opcode, payload_len);
    out.extend_from_slice(&header[..used]);
}

/// A complete, final, unmasked frame: one allocation of exactly the frame's size.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut frame, true, opcode, payload.len());
    frame.extend_from_slice(payload);
    debug_assert_eq!(frame.len(), frame.capacity());
    frame
}

/// A close frame with `code` and as much of `reason` as fits (RFC 6455 §5.5.1).
///
/// The reason is cut at the last UTF-8 character boundary that keeps the payload within 125 bytes,
/// because a peer must fail the connection on a close reason that is not valid UTF-8 (RFC 6455 §8.1).
/// Panics if `code` may not be sent (1004-1006, 1015 or an unassigned range): a programmer error.
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    assert!(
        close::is_valid_received(code),
        "close code {code} may not be sent (RFC 6455 §7.4)"
    );
    // str::floor_char_boundary is newer than our minimum Rust version.
    let mut reason_len = reason.len().min(close::REASON_BYTES_MAX);
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    let payload_len = close::CODE_BYTES + reason_len;
    let mut frame = Vec::with_capacity(header_len(payload_len) + payload_len);
    write_header(&mut frame, true, OpCode::Close, payload_len);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(&reason.as_bytes()[..reason_len]);
    debug_assert_eq!(frame.len(), frame.capacity());
    frame
}

/// Builds one final, unmasked frame by writing its payload straight into the frame buffer.
///
/// The payload length is not known until serialisation ends, so [`SERVER_HEADER_BYTES_MAX`] bytes are
/// kept free at the front; [`FrameWriter::finish`] writes the real header just before the payload and
/// shifts the frame to the start of the same allocation. This is how a broadcast frame is built once
/// (e.g. `serde_json::to_writer(&mut writer, &update)`) and then shared by every subscriber.
#[derive(Debug)]
pub struct FrameWriter {
    opcode: OpCode,
    /// INVARIANT: `buf[..SERVER_HEADER_BYTES_MAX]` is the reserved header space; the payload follows.
    buf: Vec<u8>,
}

impl FrameWriter {
    /// A writer for a frame of type `opcode`, with no payload capacity reserved yet.
    pub fn new(opcode: OpCode) -> Self {
        Self::with_capacity(opcode, 0)
    }

    /// A writer with room for `payload_bytes` of payload before it has to grow.
    pub fn with_capacity(opcode: OpCode, payload_bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(SERVER_HEADER_BYTES_MAX + payload_bytes);
        buf.resize(SERVER_HEADER_BYTES_MAX, 0);
        FrameWriter { opcode, buf }
    }

    /// Payload bytes written so far.
    pub fn payload_len(&self) -> usize {
        self.buf.len() - SERVER_HEADER_BYTES_MAX
    }

    /// The payload written so far.
    pub fn payload(&self) -> &[u8] {
        &self.buf[SERVER_HEADER_BYTES_MAX..]
    }

    /// The finished frame, in the writer's own allocation (no copy to a new buffer).
    ///
    /// Panics for a control opcode whose payload exceeds 125 bytes (see [`encode`]).
    pub fn finish(self) -> Vec<u8> {
        let FrameWriter { opcode, mut buf } = self;
        let payload_len = buf.len() - SERVER_HEADER_BYTES_MAX;
        let (header, used) = header_bytes(true, opcode, payload_len);
        let start = SERVER_HEADER_BYTES_MAX - used;
        buf[start..SERVER_HEADER_BYTES_MAX].copy_from_slice(&header[..used]);
        if start > 0 {
            let frame_len = buf.len() - start;
            buf.copy_within(start.., 0);
            buf.truncate(frame_len);
        }
        buf
    }
}

// `#[inline]`: serde_json calls these once per token from the caller's crate; without it each
// token costs an out-of-line call (benches/frame.rs `encode_json`).
impl io::Write for FrameWriter {
    #[inline]
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::test_client::{self, Length, KEY};
    use super::*;

    const SIZES: [usize; 7] = [0, 1, 125, 126, 65535, 65536, 70_000];

    fn header(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload_len: u64) -> FrameHeader {
        FrameHeader {
            fin,
            opcode,
            rsv1: false,
            mask,
            payload_len,
        }
    }

    #[test]
    fn rsv1_only_where_permessage_deflate_allows_it() {
        // (first byte, allowed, outcome)
        let cases: &[(u8, bool, Result<bool, ProtocolError>)] = &[
            (0x81, false, Ok(false)),
            (0x81, true, Ok(false)),
            (0xc1, true, Ok(true)),
            (0x42, true, Ok(true)),
            (
                0xc1,
                false,
                Err(ProtocolError::ReservedBitsSet { rsv: 0b100 }),
            ),
            (
                0xe1,
                true,
                Err(ProtocolError::ReservedBitsSet { rsv: 0b010 }),
            ),
            (
                0xd1,
                true,
                Err(ProtocolError::ReservedBitsSet { rsv: 0b001 }),
            ),
            (
                0xc0,
                true,
                Err(ProtocolError::CompressedBitMisplaced {
                    opcode: OpCode::Continuation,
                }),
            ),
            (
                0xc9,
                true,
                Err(ProtocolError::CompressedBitMisplaced {
                    opcode: OpCode::Ping,
                }),
            ),
            (
                0xc8,
                true,
                Err(ProtocolError::CompressedBitMisplaced {
                    opcode: OpCode::Close,
                }),
            ),
        ];
        for &(first, allowed, expected) in cases {
            let outcome = FrameHeader::parse_with(&[first, 0x00], allowed)
                .map(|parsed| parsed.expect("two bytes are a whole header").0.rsv1);
            assert_eq!(outcome, expected, "{first:#04x} allowed={allowed}");
        }
    }

    #[test]
    fn opcode_bits_round_trip_and_control_flag() {
        for bits in 0..=0x0f_u8 {
            match OpCode::from_bits(bits) {
                Some(opcode) => {
                    assert_eq!(opcode as u8, bits);
                    assert_eq!(opcode.is_control(), bits >= 8, "{opcode:?}");
                }
                None => assert!(matches!(bits, 3..=7 | 11..=15), "bits {bits}"),
            }
        }
    }

    #[test]
    fn parse_valid_headers_table() {
        // RFC 6455 §5.7 examples plus every length form, each parsed whole and split at every byte.
        let cases: &[(&[u8], FrameHeader, usize)] = &[
            // Unmasked "Hello" text.
            (&[0x81, 0x05], header(true, OpCode::Text, None, 5), 2),
            // Masked "Hello" text.
            (
                &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d],
                header(true, OpCode::Text, Some(KEY), 5),
                6,
            ),
            // First fragment "Hel".
            (&[0x01, 0x03], header(false, OpCode::Text, None, 3), 2),
            // Continuation "lo".
            (
                &[0x80, 0x02],
                header(true, OpCode::Continuation, None, 2),
                2,
            ),
            // Unmasked ping, masked pong.
            (&[0x89, 0x05], header(true, OpCode::Ping, None, 5), 2),
            (
                &[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d],
                header(true, OpCode::Pong, Some(KEY), 5),
                6,
            ),
            // 256-byte binary, 16-bit length.
            (
                &[0x82, 0x7e, 0x01, 0x00],
                header(true, OpCode::Binary, None, 256),
                4,
            ),
            // 64 KiB binary, 64-bit length.
            (
                &[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0],
                header(true, OpCode::Binary, None, 65536),
                10,
            ),
            // Non-minimal encodings are accepted: 5 in 16 bits and in 64 bits, masked.
            (
                &[0x82, 0xfe, 0x00, 0x05, 1, 2, 3, 4],
                header(true, OpCode::Binary, Some([1, 2, 3, 4]), 5),
                8,
            ),
            (
                &[0x82, 0xff, 0, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4],
                header(true, OpCode::Binary, Some([1, 2, 3, 4]), 5),
                14,
            ),
            // Largest legal 64-bit length.
            (
                &[0x02, 0x7f, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                header(false, OpCode::Binary, None, (1 << 63) - 1),
                10,
            ),
            // Largest control frame, empty close.
            (&[0x89, 0x7d], header(true, OpCode::Ping, None, 125), 2),
            (&[0x88, 0x00], header(true, OpCode::Close, None, 0), 2),
        ];
        for &(bytes, expected, expected_len) in cases {
            // Trailing payload bytes must not affect the header.
            let mut with_payload = bytes.to_vec();
            with_payload.extend_from_slice(&[0xee; 3]);
            for buf in [bytes, &with_payload[..]] {
                assert_eq!(
                    FrameHeader::parse(buf),
                    Ok(Some((expected, expected_len))),
                    "{bytes:02x?}"
                );
            }
            for split in 0..bytes.len() {
                assert_eq!(
                    FrameHeader::parse(&bytes[..split]),
                    Ok(None),
                    "{bytes:02x?} split at {split}"
                );
            }
        }
    }

    #[test]
    fn parse_errors_table() {
        use ProtocolError::*;
        let cases: &[(&[u8], ProtocolError)] = &[
            (&[0xc1, 0x80], ReservedBitsSet { rsv: 0b100 }),
            (&[0xa1, 0x80], ReservedBitsSet { rsv: 0b010 }),
            (&[0x91, 0x80], ReservedBitsSet { rsv: 0b001 }),
            (&[0xf1, 0x80], ReservedBitsSet { rsv: 0b111 }),
            (&[0x83, 0x80], ReservedOpCode { opcode: 3 }),
            (&[0x87, 0x80], ReservedOpCode { opcode: 7 }),
            (&[0x8b, 0x80], ReservedOpCode { opcode: 11 }),
            (&[0x8f, 0x80], ReservedOpCode { opcode: 15 }),
            (
                &[0x09, 0x80],
                FragmentedControlFrame {
                    opcode: OpCode::Ping,
                },
            ),
            (
                &[0x08, 0x80],
                FragmentedControlFrame {
                    opcode: OpCode::Close,
                },
            ),
            (
                &[0x89, 0xfe, 0x00, 0x7e],
                ControlFrameTooBig {
                    opcode: OpCode::Ping,
                    payload_len: 126,
                },
            ),
            (
                &[0x8a, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x7e],
                ControlFrameTooBig {
                    opcode: OpCode::Pong,
                    payload_len: 126,
                },
            ),
            (
                &[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0],
                PayloadLengthMsbSet {
                    payload_len: 1 << 63,
                },
            ),
            (
                &[0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                PayloadLengthMsbSet {
                    payload_len: u64::MAX,
                },
            ),
        ];
        for &(bytes, expected) in cases {
            assert_eq!(FrameHeader::parse(bytes), Err(expected), "{bytes:02x?}");
            // The error does not wait for the masking key.
            let mut longer = bytes.to_vec();
            longer.extend_from_slice(&KEY);
            assert_eq!(FrameHeader::parse(&longer), Err(expected), "{bytes:02x?}");
        }
    }

    #[test]
    fn header_len_boundaries() {
        let cases = [
            (0, 2),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
            (usize::MAX, 10),
        ];
        for (payload_len, expected) in cases {
            assert_eq!(
                header_len(payload_len),
                expected,
                "payload_len {payload_len}"
            );
        }
    }

    #[test]
    fn encode_rfc_6455_section_5_7_examples() {
        let cases: &[(OpCode, &[u8], &[u8])] = &[
            (
                OpCode::Text,
                b"Hello",
                &[0x81, 0x05, b'H', b'e', b'l', b'l', b'o'],
            ),
            (
                OpCode::Ping,
                b"Hello",
                &[0x89, 0x05, b'H', b'e', b'l', b'l', b'o'],
            ),
            (OpCode::Close, b"", &[0x88, 0x00]),
        ];
        for &(opcode, payload, expected) in cases {
            assert_eq!(encode(opcode, payload), expected, "{opcode:?}");
        }
        let mut fragment = Vec::new();
        write_header(&mut fragment, false, OpCode::Text, 3);
        assert_eq!(fragment, [0x01, 0x03]);
        let binary = encode(OpCode::Binary, &[0; 256]);
        assert_eq!(binary[..4], [0x82, 0x7e, 0x01, 0x00]);
        let binary = encode(OpCode::Binary, &[0; 65536]);
        assert_eq!(binary[..10], [0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn encode_round_trips_through_parse_with_exact_allocation() {
        for size in SIZES {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let frame = encode(OpCode::Binary, &payload);
            assert_eq!(
                frame.capacity(),
                frame.len(),
                "one allocation of exact size"
            );
            let (parsed, used) = FrameHeader::parse(&frame).unwrap().unwrap();
            assert_eq!(parsed, header(true, OpCode::Binary, None, size as u64));
            assert_eq!(used, header_len(size));
            assert_eq!(frame[used..], payload[..]);
        }
    }

    #[test]
    #[should_panic(expected = "control frame")]
    fn encode_oversized_control_frame_is_a_programmer_error() {
        encode(OpCode::Ping, &[0; CONTROL_PAYLOAD_BYTES_MAX + 1]);
    }

    #[test]
    #[should_panic(expected = "control frame")]
    fn write_fragmented_control_frame_is_a_programmer_error() {
        write_header(&mut Vec::new(), false, OpCode::Pong, 0);
    }

    #[test]
    #[should_panic(expected = "may not be sent")]
    fn encode_close_with_reserved_code_is_a_programmer_error() {
        encode_close(close::NO_STATUS_RECEIVED, "");
    }

    #[test]
    fn encode_close_truncates_reason_at_char_boundary() {
        let long_ascii = "x".repeat(200);
        // 'é' is 2 bytes: 61 of them (122 bytes) fit in 123, the 62nd would straddle the limit.
        let long_two_byte = "é".repeat(100);
        // '€' is 3 bytes: 41 of them (123 bytes) fit exactly.
        let long_three_byte = "€".repeat(50);
        let cases: &[(&str, usize)] = &[
            ("", 0),
            ("bye", 3),
            (&long_ascii, 123),
            (&long_two_byte, 122),
            (&long_three_byte, 123),
        ];
        for &(reason, expected_reason_len) in cases {
            let frame = encode_close(close::GOING_AWAY, reason);
            assert_eq!(frame.capacity(), frame.len());
            let (parsed, used) = FrameHeader::parse(&frame).unwrap().unwrap();
            assert_eq!(parsed.opcode, OpCode::Close);
            assert_eq!(parsed.payload_len as usize, 2 + expected_reason_len);
            assert!(parsed.payload_len as usize <= CONTROL_PAYLOAD_BYTES_MAX);
            assert_eq!(frame[used..used + 2], close::GOING_AWAY.to_be_bytes());
            let sent = std::str::from_utf8(&frame[used + 2..]).unwrap();
            assert_eq!(sent, &reason[..expected_reason_len]);
        }
    }

    #[test]
    fn frame_writer_matches_encode_without_reallocating() {
        for size in SIZES {
            let payload: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
            let mut writer = FrameWriter::with_capacity(OpCode::Binary, size);
            let allocation = writer.buf.as_ptr();
            // Several writes, as a serialiser would make.
            for piece in payload.chunks(1000) {
                writer.write_all(piece).unwrap();
            }
            assert_eq!(writer.payload_len(), size);
            assert_eq!(writer.payload(), &payload[..]);
            let frame = writer.finish();
            assert_eq!(frame, encode(OpCode::Binary, &payload), "size {size}");
            assert_eq!(frame.as_ptr(), allocation, "finish reuses the buffer");
        }
    }

    #[test]
    fn frame_writer_works_with_formatting_and_growth() {
        let mut writer = FrameWriter::new(OpCode::Text);
        let (sku, qty) = ("A-1", 42);
        write!(writer, "{{\"sku\":\"{sku}\",\"qty\":{qty}}}").unwrap();
        writer.flush().unwrap();
        assert_eq!(
            writer.finish(),
            encode(OpCode::Text, br#"{"sku":"A-1","qty":42}"#)
        );
        assert_eq!(FrameWriter::new(OpCode::Pong).finish(), [0x8a, 0x00]);
    }

    #[test]
    #[should_panic(expected = "control frame")]
    fn frame_writer_oversized_control_frame_is_a_programmer_error() {
        let mut writer = FrameWriter::new(OpCode::Close);
        writer
            .write_all(&[0; CONTROL_PAYLOAD_BYTES_MAX + 1])
            .unwrap();
        writer.finish();
    }

    #[test]
    fn test_client_frames_parse_back() {
        for size in SIZES {
            for length in [Length::Minimal, Length::Bits16, Length::Bits64] {
                if length == Length::Bits16 && size > 0xffff {
                    continue;
                }
                let payload = vec![0x42; size];
                let frame = test_client::raw(0x82, Some(KEY), length, &payload);
                let (parsed, used) = FrameHeader::parse(&frame).unwrap().unwrap();
                assert_eq!(parsed, header(true, OpCode::Binary, Some(KEY), size as u64));
                assert_eq!(used + size, frame.len());
            }
        }
    }

    mod prop {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn parse_random_bytes_never_panics_and_is_prefix_consistent(
                bytes in proptest::collection::vec(any::<u8>(), 0..20),
            ) {
                let whole = FrameHeader::parse(&bytes);
                if let Ok(Some((header, used))) = whole {
                    prop_assert!((2..=CLIENT_HEADER_BYTES_MAX).contains(&used));
                    prop_assert!(used <= bytes.len());
                    prop_assert!(header.payload_len < 1 << 63);
                    if header.opcode.is_control() {
                        prop_assert!(header.fin);
                        prop_assert!(header.payload_len <= CONTROL_PAYLOAD_BYTES_MAX as u64);
                    }
                    // Bytes after the header never change the result.
                    prop_assert_eq!(FrameHeader::parse(&bytes[..used]), whole);
                }
                if whole == Ok(None) {
                    prop_assert!(bytes.len() < CLIENT_HEADER_BYTES_MAX);
                }
                // A prefix is either still incomplete or already gives the same answer.
                for split in 0..bytes.len() {
                    let prefix = FrameHeader::parse(&bytes[..split]);
                    prop_assert!(prefix == Ok(None) || prefix == whole, "split {}", split);
                }
            }
        }
    }
}
