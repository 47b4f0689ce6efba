//! Server-side decoding of client frames into messages (RFC 6455 §5, §6.2).
//!
//! # Contract
//!
//! The caller owns the read buffer. It calls [`Decoder::decode`] with the unconsumed bytes, drops the
//! `consumed` bytes it is told about, and calls again until `Ok(None)` (more bytes are needed) or an
//! error. `Ok(None)` never consumes or changes anything, so the caller simply retries once more bytes
//! have arrived. A frame is decoded only when it is wholly in the buffer, so the buffer must be able to
//! hold [`Decoder::frame_bytes_max`] bytes; the size limit is checked from the frame header, before any
//! of the payload has to be buffered.
//!
//! On an error the caller sends a close frame with [`ProtocolError::close_code`] and stops decoding:
//! RFC 6455 §7.1.7 "Fail the WebSocket Connection". The decoder's state after an error is unspecified
//! (but safe to use and to drop).
//!
//! Payloads are unmasked in place in the caller's buffer. A message that fits in one frame is returned
//! borrowing that buffer (no copy); only a fragmented message is assembled in the decoder, in memory
//! that exists only while such a message is open.
//!
//! With permessage-deflate negotiated ([`Decoder::with_compression`]), a message whose first frame
//! has RSV1 set is inflated as its frames arrive (RFC 7692 §7.2.2) into the same kind of assembly,
//! with an inflater that exists only while that message is open. The limit applies to the inflated
//! size: inflating stops, and the message fails with [`ProtocolError::MessageTooBig`], as soon as
//! the output would pass it, whatever the compressed size.

use std::fmt;

use super::close;
use super::deflate::{compressed_bytes_max, Inflate, InflateError};
use super::frame::{FrameHeader, OpCode, CLIENT_HEADER_BYTES_MAX, CONTROL_PAYLOAD_BYTES_MAX};
use super::mask::apply_mask;

/// Upper bound on `size_of::<Decoder>()`: one is kept per connection, so an idle one must stay small.
pub const DECODER_BYTES_MAX: usize = 24;
const _: () = assert!(std::mem::size_of::<Decoder>() <= DECODER_BYTES_MAX);

/// A complete message or control frame, borrowing either the caller's buffer (single frame) or the
/// decoder (assembled from fragments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, already checked to be UTF-8 (RFC 6455 §5.6, §8.1).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
    /// A ping; RFC 6455 §5.5.2 asks for a pong with the same payload.
    Ping(&'a [u8]),
    /// A pong (RFC 6455 §5.5.3).
    Pong(&'a [u8]),
    /// A close frame; `None` when it carried no status code (RFC 6455 §5.5.1).
    Close(Option<CloseFrame<'a>>),
}

/// The body of a close frame (RFC 6455 §5.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// Status code; always one that [`close::is_valid_received`] accepts.
    pub code: u16,
    /// Reason, possibly empty; at most 123 bytes.
    pub reason: &'a str,
}

/// A violation of RFC 6455 by the client. Each one fails the connection (RFC 6455 §7.1.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// RSV1-3 set with no extension negotiated that gives them a meaning (RFC 6455 §5.2). `rsv`
    /// holds RSV1..RSV3 as bits 2..0 (RSV1 is left out when permessage-deflate is negotiated).
    ReservedBitsSet {
        /// The three reserved bits, RSV1 as the most significant.
        rsv: u8,
    },
    /// RSV1 ("Per-Message Compressed") on a control frame or a continuation frame (RFC 7692 §6.1).
    CompressedBitMisplaced {
        /// The frame's opcode.
        opcode: OpCode,
    },
    /// A compressed message that is not a valid raw deflate stream (RFC 7692 §7.2.2, RFC 1951).
    InvalidCompressedData,
    /// An opcode reserved for future use, 3-7 or 11-15 (RFC 6455 §5.2).
    ReservedOpCode {
        /// The opcode bits.
        opcode: u8,
    },
    /// A control frame with FIN clear (RFC 6455 §5.5).
    FragmentedControlFrame {
        /// The control opcode.
        opcode: OpCode,
    },
    /// A control frame with more than 125 bytes of payload (RFC 6455 §5.5).
    ControlFrameTooBig {
        /// The control opcode.
        opcode: OpCode,
        /// The announced payload length.
        payload_len: u64,
    },
    /// A 64-bit payload length with its most significant bit set (RFC 6455 §5.2).
    PayloadLengthMsbSet {
        /// The announced payload length.
        payload_len: u64,
    },
    /// A client frame without a masking key (RFC 6455 §5.1).
    UnmaskedFrameFromClient {
        /// The frame's opcode.
        opcode: OpCode,
    },
    /// A continuation frame with no fragmented message open (RFC 6455 §5.4).
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still open (RFC 6455 §5.4).
    ExpectedContinuation {
        /// The opcode that arrived instead of a continuation.
        opcode: OpCode,
    },
    /// The message (all fragments so far plus this frame) exceeds the configured limit.
    MessageTooBig {
        /// Bytes the message would have with this frame's payload.
        message_bytes: u64,
        /// The decoder's limit.
        message_bytes_max: usize,
    },
    /// A text message that is not UTF-8 (RFC 6455 §5.6, §8.1).
    InvalidUtf8 {
        /// Bytes of the message that are valid UTF-8 before the bad (or unfinished) sequence.
        valid_up_to: usize,
    },
    /// A close frame with a 1-byte payload: too short for the status code (RFC 6455 §5.5.1).
    CloseFrameTruncatedCode,
    /// A close frame whose status code may not be sent (RFC 6455 §7.4).
    InvalidCloseCode {
        /// The status code received.
        code: u16,
    },
    /// A close frame whose reason is not UTF-8 (RFC 6455 §5.5.1, §8.1).
    InvalidCloseReason {
        /// Bytes of the reason that are valid UTF-8 before the bad sequence.
        valid_up_to: usize,
    },
}

impl ProtocolError {
    /// The status code to close the connection with (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 { .. }
            | ProtocolError::InvalidCloseReason { .. }
            | ProtocolError::InvalidCompressedData => close::INVALID_PAYLOAD,
            ProtocolError::MessageTooBig { .. } => close::MESSAGE_TOO_BIG,
            ProtocolError::ReservedBitsSet { .. }
            | ProtocolError::CompressedBitMisplaced { .. }
            | ProtocolError::ReservedOpCode { .. }
            | ProtocolError::FragmentedControlFrame { .. }
            | ProtocolError::ControlFrameTooBig { .. }
            | ProtocolError::PayloadLengthMsbSet { .. }
            | ProtocolError::UnmaskedFrameFromClient { .. }
            | ProtocolError::UnexpectedContinuation
            | ProtocolError::ExpectedContinuation { .. }
            | ProtocolError::CloseFrameTruncatedCode
            | ProtocolError::InvalidCloseCode { .. } => close::PROTOCOL_ERROR,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ProtocolError::ReservedBitsSet { rsv } => {
                write!(
                    f,
                    "reserved bits set (RSV1-3 = {rsv:03b}) with no extension"
                )
            }
            ProtocolError::CompressedBitMisplaced { opcode } => {
                write!(f, "RSV1 (compressed) set on a {opcode:?} frame")
            }
            ProtocolError::InvalidCompressedData => {
                write!(f, "compressed message is not valid deflate data")
            }
            ProtocolError::ReservedOpCode { opcode } => write!(f, "reserved opcode {opcode}"),
            ProtocolError::FragmentedControlFrame { opcode } => {
                write!(f, "fragmented control frame ({opcode:?})")
            }
            ProtocolError::ControlFrameTooBig {
                opcode,
                payload_len,
            } => write!(
                f,
                "control frame ({opcode:?}) payload of {payload_len} bytes, \
                 max {CONTROL_PAYLOAD_BYTES_MAX}"
            ),
            ProtocolError::PayloadLengthMsbSet { payload_len } => {
                write!(
                    f,
                    "64-bit payload length {payload_len:#x} has its top bit set"
                )
            }
            ProtocolError::UnmaskedFrameFromClient { opcode } => {
                write!(f, "unmasked {opcode:?} frame from client")
            }
            ProtocolError::UnexpectedContinuation => {
                write!(f, "continuation frame with no fragmented message open")
            }
            ProtocolError::ExpectedContinuation { opcode } => write!(
                f,
                "{opcode:?} frame while a fragmented message is open (expected continuation)"
            ),
            ProtocolError::MessageTooBig {
                message_bytes,
                message_bytes_max,
            } => write!(
                f,
                "message of {message_bytes} bytes, max {message_bytes_max}"
            ),
            ProtocolError::InvalidUtf8 { valid_up_to } => {
                write!(f, "text message is not UTF-8 after byte {valid_up_to}")
            }
            ProtocolError::CloseFrameTruncatedCode => {
                write!(f, "close frame payload of 1 byte (status code needs 2)")
            }
            ProtocolError::InvalidCloseCode { code } => write!(f, "invalid close code {code}"),
            ProtocolError::InvalidCloseReason { valid_up_to } => {
                write!(f, "close reason is not UTF-8 after byte {valid_up_to}")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Decodes one client's frames into messages; one per connection. See the module docs.
#[derive(Debug)]
pub struct Decoder {
    /// Largest message accepted, counting all fragments (inflated, when compressed). A `u32`
    /// (4 GiB - 1; `Limits::validate` keeps the configured limit below it) so that the limit,
    /// the flag and the two boxes take three words per connection, not four.
    message_bytes_max: u32,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    compression: bool,
    /// The fragmented message being assembled, or just delivered. Boxed so an idle decoder is two
    /// words; `None` whenever no fragmented message is open, except between delivering one and the
    /// next call to [`Decoder::decode`], which frees it (the delivered message borrows it until then).
    fragments: Option<Box<Fragments>>,
    /// Fail fast on invalid UTF-8 (RFC 6455 §8.1): how far the text frame at the front of the
    /// caller's buffer, still incomplete, has been checked already, so each call checks only the
    /// bytes that arrived since. `None` unless such a frame is waiting for its payload.
    peek: Option<Box<Peek>>,
}

#[derive(Clone, Copy, Debug)]
struct Peek {
    /// Payload bytes of the incomplete frame already checked.
    checked: usize,
    /// The character cut off where checking stopped.
    tail: Utf8Tail,
}

/// Bytes unmasked at a time into a stack buffer while peeking (the caller's buffer must stay
/// untouched until the whole frame is there).
const PEEK_CHUNK_BYTES: usize = 512;

#[derive(Debug)]
struct Fragments {
    assembly: Assembly,
    /// The final fragment has arrived and the message was returned; free on the next decode.
    delivered: bool,
    /// The message is compressed: its inflater, until the final fragment.
    inflate: Option<Inflate>,
    /// The message is compressed (stays set after `inflate` is used up).
    compressed: bool,
}

#[derive(Clone, Debug)]
enum Assembly {
    Text {
        /// The complete UTF-8 characters received so far.
        text: String,
        /// The unfinished character at the end of the fragments so far.
        tail: Utf8Tail,
    },
    Binary {
        bytes: Vec<u8>,
    },
}

/// The 0-3 bytes of a UTF-8 sequence cut by a fragment boundary (RFC 3629 §3: sequences are at most
/// 4 bytes). INVARIANT: `bytes[..len]` is a proper prefix of a valid sequence.
#[derive(Clone, Copy, Debug, Default)]
struct Utf8Tail {
    bytes: [u8; 4],
    len: usize,
}

impl Decoder {
    /// A decoder that accepts messages of up to `message_bytes_max` bytes (all fragments together).
    /// A limit of 4 GiB or more acts as 4 GiB - 1.
    pub fn new(message_bytes_max: usize) -> Self {
        Decoder {
            message_bytes_max: u32::try_from(message_bytes_max).unwrap_or(u32::MAX),
            compression: false,
            fragments: None,
            peek: None,
        }
    }

    /// The same decoder on a connection that negotiated permessage-deflate (RFC 7692) when
    /// `negotiated`: RSV1 on a message's first frame then means "compressed".
    pub fn with_compression(mut self, negotiated: bool) -> Self {
        self.compression = negotiated;
        self
    }

    /// The message size limit this decoder was built with.
    pub fn message_bytes_max(&self) -> usize {
        self.message_bytes_max as usize
    }

    /// Largest frame (header and payload) the decoder can ask the caller to buffer before it can be
    /// decoded; any larger frame is refused from its header.
    pub fn frame_bytes_max(&self) -> usize {
        CLIENT_HEADER_BYTES_MAX
            .saturating_add(self.payload_bytes_max().max(CONTROL_PAYLOAD_BYTES_MAX))
    }

    /// Largest data frame payload: the message limit, or with compression the most that deflate
    /// can take to encode a message within it.
    fn payload_bytes_max(&self) -> usize {
        if self.compression {
            compressed_bytes_max(self.message_bytes_max())
        } else {
            self.message_bytes_max()
        }
    }

    /// Whether a fragmented message has started and not yet ended.
    pub fn in_fragmented_message(&self) -> bool {
        self.fragments.as_ref().is_some_and(|f| !f.delivered)
    }

    /// Bytes held for a fragmented message (0 when none is open); for memory accounting.
    pub fn buffered_bytes(&self) -> usize {
        self.fragments.as_ref().map_or(0, |f| f.assembly.len())
    }

    /// Decodes the first frame at the start of `buf`.
    ///
    /// The payload is unmasked in place. Returns:
    /// - `Ok(None)`: the frame is incomplete; nothing was consumed and `buf` is unchanged.
    /// - `Ok(Some((consumed, Some(message))))`: a whole message or control frame.
    /// - `Ok(Some((consumed, None)))`: a non-final fragment was consumed; the message is not complete.
    ///
    /// `consumed` is always at least 2 and at most `buf.len()`. Errors are reported as soon as the
    /// header shows them (protocol state, size limit), or once the payload has arrived (UTF-8, close
    /// frame contents).
    pub fn decode<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> Result<Option<(usize, Option<Message<'a>>)>, ProtocolError> {
        if self.fragments.as_ref().is_some_and(|f| f.delivered) {
            // The caller is done with the message we lent out: free it rather than keep the capacity.
            self.fragments = None;
        }
        let Some((header, header_bytes)) = FrameHeader::parse_with(buf, self.compression)? else {
            return Ok(None);
        };
        // RFC 6455 §5.1: "a client MUST mask all frames that it sends to the server".
        let Some(key) = header.mask else {
            return Err(ProtocolError::UnmaskedFrameFromClient {
                opcode: header.opcode,
            });
        };
        let payload_len = self.admit(&header)?;
        // Cannot overflow: `admit` bounded payload_len by message_bytes_max or 125, and a buffer
        // that large plus a 14-byte header would not fit in memory anyway; saturate to stay safe.
        let frame_bytes = header_bytes.saturating_add(payload_len);
        if buf.len() < frame_bytes {
            self.peek_text(&header, key, &buf[header_bytes..])?;
            return Ok(None);
        }
        self.peek = None;
        let payload = &mut buf[header_bytes..frame_bytes];
        apply_mask(payload, key);
        let payload: &'a [u8] = payload;

        let open_compressed = self
            .fragments
            .as_deref()
            .is_some_and(|f| f.compressed && !f.delivered);
        if header.rsv1 || (header.opcode == OpCode::Continuation && open_compressed) {
            return self.inflate_frame(&header, payload, frame_bytes);
        }
        let message = match header.opcode {
            OpCode::Ping => Message::Ping(payload),
            OpCode::Pong => Message::Pong(payload),
            OpCode::Close => Message::Close(parse_close(payload)?),
            // `admit` ensured no fragmented message is open.
            OpCode::Text if header.fin => match std::str::from_utf8(payload) {
                Ok(text) => Message::Text(text),
                Err(error) => {
                    return Err(ProtocolError::InvalidUtf8 {
                        valid_up_to: error.valid_up_to(),
                    })
                }
            },
            OpCode::Binary if header.fin => Message::Binary(payload),
            OpCode::Text | OpCode::Binary => {
                let assembly = if header.opcode == OpCode::Text {
                    Assembly::Text {
                        text: String::new(),
                        tail: Utf8Tail::default(),
                    }
                } else {
                    Assembly::Binary { bytes: Vec::new() }
                };
                let message_bytes_max = self.message_bytes_max();
                let fragments = self.fragments.insert(Box::new(Fragments {
                    assembly,
                    delivered: false,
                    inflate: None,
                    compressed: false,
                }));
                fragments.assembly.push(payload, message_bytes_max)?;
                return Ok(Some((frame_bytes, None)));
            }
            OpCode::Continuation => {
                let message_bytes_max = self.message_bytes_max();
                let Some(fragments) = self.fragments.as_deref_mut() else {
                    // `admit` already checked this; kept so the borrow needs no unwrap.
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                fragments.assembly.push(payload, message_bytes_max)?;
                if !header.fin {
                    return Ok(Some((frame_bytes, None)));
                }
                fragments.delivered = true;
                fragments.assembly.message()?
            }
        };
        Ok(Some((frame_bytes, Some(message))))
    }

    /// A frame of a compressed message: its first (RSV1 set) or a continuation. The payload is
    /// inflated into the assembly; the final frame adds the RFC 7692 §7.2.2 tail and delivers.
    fn inflate_frame<'a>(
        &'a mut self,
        header: &FrameHeader,
        payload: &[u8],
        frame_bytes: usize,
    ) -> Result<Option<(usize, Option<Message<'a>>)>, ProtocolError> {
        let message_bytes_max = self.message_bytes_max();
        if header.rsv1 {
            // `admit` ensured no fragmented message is open.
            let assembly = match header.opcode {
                OpCode::Text => Assembly::Text {
                    text: String::new(),
                    tail: Utf8Tail::default(),
                },
                _ => Assembly::Binary { bytes: Vec::new() },
            };
            self.fragments = Some(Box::new(Fragments {
                assembly,
                delivered: false,
                inflate: Some(Inflate::start()),
                compressed: true,
            }));
        }
        let Some(fragments) = self.fragments.as_deref_mut() else {
            return Err(ProtocolError::UnexpectedContinuation);
        };
        let Fragments {
            assembly, inflate, ..
        } = fragments;
        let Some(inflater) = inflate.as_mut() else {
            return Err(ProtocolError::UnexpectedContinuation);
        };
        let mut failure = None;
        let mut sink = |chunk: &[u8]| {
            let message_bytes = assembly.len() + chunk.len();
            if message_bytes > message_bytes_max {
                failure = Some(ProtocolError::MessageTooBig {
                    message_bytes: message_bytes as u64,
                    message_bytes_max,
                });
                return Err(InflateError::TooBig {
                    bytes: message_bytes as u64,
                });
            }
            assembly.push(chunk, message_bytes_max).map_err(|error| {
                failure = Some(error);
                InflateError::Corrupt
            })
        };
        let mut outcome = inflater.push(payload, &mut sink);
        if outcome.is_ok() && header.fin {
            if let Some(inflater) = inflate.take() {
                outcome = inflater.finish(&mut sink);
            }
        }
        if let Err(error) = outcome {
            return Err(failure.unwrap_or(match error {
                InflateError::TooBig { bytes } => ProtocolError::MessageTooBig {
                    message_bytes: bytes,
                    message_bytes_max,
                },
                InflateError::Corrupt => ProtocolError::InvalidCompressedData,
            }));
        }
        if !header.fin {
            return Ok(Some((frame_bytes, None)));
        }
        fragments.delivered = true;
        let message = fragments.assembly.message()?;
        Ok(Some((frame_bytes, Some(message))))
    }

    /// Checks the part of an incomplete text frame's payload that has arrived, so invalid UTF-8
    /// fails the connection at once instead of after the rest of a large frame (Autobahn 6.4.x
    /// "fail fast"). Works on an unmasked copy: `buf` stays as it was.
    fn peek_text(
        &mut self,
        header: &FrameHeader,
        key: [u8; 4],
        available: &[u8],
    ) -> Result<(), ProtocolError> {
        // A compressed payload is not text until it is inflated.
        let starting_tail = match (header.opcode, self.fragments.as_deref()) {
            (OpCode::Text, _) if !header.rsv1 => Utf8Tail::default(),
            (
                OpCode::Continuation,
                Some(Fragments {
                    assembly: Assembly::Text { tail, .. },
                    delivered: false,
                    compressed: false,
                    ..
                }),
            ) => *tail,
            _ => return Ok(()),
        };
        let peek = self.peek.get_or_insert_with(|| {
            Box::new(Peek {
                checked: 0,
                tail: starting_tail,
            })
        });
        let mut scratch = [0u8; PEEK_CHUNK_BYTES];
        let mut sink = Discard(peek.checked);
        while peek.checked < available.len() {
            let at = peek.checked;
            let n = (available.len() - at).min(PEEK_CHUNK_BYTES);
            scratch[..n].copy_from_slice(&available[at..at + n]);
            // The mask key is applied by payload offset (RFC 6455 §5.3): rotate it to `at`.
            let rotated = [
                key[at % 4],
                key[(at + 1) % 4],
                key[(at + 2) % 4],
                key[(at + 3) % 4],
            ];
            apply_mask(&mut scratch[..n], rotated);
            push_text(&mut sink, &mut peek.tail, &scratch[..n])?;
            peek.checked += n;
        }
        Ok(())
    }

    /// Checks what the header alone can tell against the decoder's state, and returns the payload
    /// length as a `usize`. Runs before the payload is buffered.
    fn admit(&self, header: &FrameHeader) -> Result<usize, ProtocolError> {
        let open = self.fragments.as_deref().filter(|f| !f.delivered);
        let compressed = header.rsv1 || open.is_some_and(|f| f.compressed);
        let buffered_bytes = match header.opcode {
            // RFC 6455 §5.4: control frames MAY be injected in the middle of a fragmented message,
            // and do not count towards its size. `FrameHeader::parse` bounded them to 125 bytes.
            OpCode::Ping | OpCode::Pong | OpCode::Close => 0,
            // A compressed message's inflated size is checked as it is inflated; here only the
            // frame itself must fit the limit, as the caller buffers it whole.
            OpCode::Continuation => match open {
                Some(fragments) if fragments.compressed => 0,
                Some(fragments) => fragments.assembly.len(),
                None => return Err(ProtocolError::UnexpectedContinuation),
            },
            OpCode::Text | OpCode::Binary => match open {
                Some(_) => {
                    return Err(ProtocolError::ExpectedContinuation {
                        opcode: header.opcode,
                    })
                }
                None => 0,
            },
        };
        // RFC 6455 §10.4: limit what a peer can make us buffer. Checked here, from the length field,
        // so an oversized frame is refused before its payload is read.
        let message_bytes = (buffered_bytes as u64).saturating_add(header.payload_len);
        let too_big = ProtocolError::MessageTooBig {
            message_bytes,
            message_bytes_max: self.message_bytes_max(),
        };
        let payload_len = usize::try_from(header.payload_len).map_err(|_| too_big)?;
        let bytes_max = if compressed && !header.opcode.is_control() {
            self.payload_bytes_max()
        } else {
            self.message_bytes_max()
        };
        if !header.opcode.is_control() && message_bytes > bytes_max as u64 {
            return Err(too_big);
        }
        Ok(payload_len)
    }
}

/// RFC 6455 §5.5.1: an empty body, or a 2-byte code followed by a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, ProtocolError> {
    let Some((code, reason)) = payload.split_first_chunk::<{ close::CODE_BYTES }>() else {
        return if payload.is_empty() {
            Ok(None)
        } else {
            Err(ProtocolError::CloseFrameTruncatedCode)
        };
    };
    let code = u16::from_be_bytes(*code);
    if !close::is_valid_received(code) {
        return Err(ProtocolError::InvalidCloseCode { code });
    }
    match std::str::from_utf8(reason) {
        Ok(reason) => Ok(Some(CloseFrame { code, reason })),
        Err(error) => Err(ProtocolError::InvalidCloseReason {
            valid_up_to: error.valid_up_to(),
        }),
    }
}

impl Assembly {
    /// Bytes of the message received so far.
    fn len(&self) -> usize {
        match self {
            Assembly::Text { text, tail } => text.len() + tail.len,
            Assembly::Binary { bytes } => bytes.len(),
        }
    }

    /// Appends a fragment's payload; `admit` has checked it fits in `message_bytes_max`.
    fn push(&mut self, data: &[u8], message_bytes_max: usize) -> Result<(), ProtocolError> {
        debug_assert!(self.len() + data.len() <= message_bytes_max);
        match self {
            Assembly::Text { text, tail } => {
                // The unfinished character in `tail` joins `text` along with `data`.
                let incoming = tail.len + data.len();
                if let Some(additional) =
                    growth(text.len(), text.capacity(), incoming, message_bytes_max)
                {
                    text.reserve_exact(additional);
                }
                push_text(text, tail, data)
            }
            Assembly::Binary { bytes } => {
                if let Some(additional) =
                    growth(bytes.len(), bytes.capacity(), data.len(), message_bytes_max)
                {
                    bytes.reserve_exact(additional);
                }
                bytes.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// The complete message, after its final fragment was pushed.
    fn message(&self) -> Result<Message<'_>, ProtocolError> {
        match self {
            // RFC 6455 §8.1: the whole message must be UTF-8, so a character cut off by the end of
            // the message is invalid.
            Assembly::Text { text, tail } if tail.len > 0 => Err(ProtocolError::InvalidUtf8 {
                valid_up_to: text.len(),
            }),
            Assembly::Text { text, .. } => Ok(Message::Text(text)),
            Assembly::Binary { bytes } => Ok(Message::Binary(bytes)),
        }
    }
}

/// How much to reserve before appending `additional` bytes to a buffer of `len` of `capacity`:
/// `None` if it fits; otherwise double, as `Vec` would (so many small fragments cost amortised O(1)
/// per byte), but never past `bytes_max`, so the assembly never holds more than the limit.
fn growth(len: usize, capacity: usize, additional: usize, bytes_max: usize) -> Option<usize> {
    let needed = len.saturating_add(additional);
    if needed <= capacity {
        return None;
    }
    let target = needed.max(capacity.saturating_mul(2).min(bytes_max));
    Some(target - len)
}

/// Appends a fragment of a text message, validating UTF-8 as it arrives so invalid text fails at the
/// first fragment that shows it (RFC 6455 §8.1: "as soon as" the endpoint finds invalid data).
///
/// Only complete characters go into `text`, each validated once with `str::from_utf8`; a character
/// split across fragments waits in `tail`. `Utf8Error::error_len() == None` is how `from_utf8` says
/// "incomplete, could still become valid" as opposed to "invalid".
/// Where validated text goes: the message being assembled, or nowhere (a fail-fast check of a
/// frame that has not fully arrived).
trait TextSink {
    fn push_str(&mut self, text: &str);
    fn len(&self) -> usize;
}

impl TextSink for String {
    fn push_str(&mut self, text: &str) {
        String::push_str(self, text);
    }
    fn len(&self) -> usize {
        String::len(self)
    }
}

/// Counts validated bytes and keeps none of them.
struct Discard(usize);

impl TextSink for Discard {
    fn push_str(&mut self, text: &str) {
        self.0 += text.len();
    }
    fn len(&self) -> usize {
        self.0
    }
}

fn push_text<S: TextSink>(
    text: &mut S,
    tail: &mut Utf8Tail,
    mut data: &[u8],
) -> Result<(), ProtocolError> {
    if tail.len > 0 {
        // Finish the character left over from the previous fragment.
        let width = utf8_sequence_len(tail.bytes[0]);
        let taken = width.saturating_sub(tail.len).min(data.len());
        let (head, rest) = data.split_at(taken);
        tail.bytes[tail.len..tail.len + taken].copy_from_slice(head);
        tail.len += taken;
        data = rest;
        match std::str::from_utf8(&tail.bytes[..tail.len]) {
            Ok(character) => {
                text.push_str(character);
                tail.len = 0;
            }
            // Still unfinished, and `data` is used up: wait for the next fragment.
            Err(error) if error.error_len().is_none() => return Ok(()),
            Err(_) => {
                return Err(ProtocolError::InvalidUtf8 {
                    valid_up_to: text.len(),
                })
            }
        }
    }
    let (complete, unfinished) = data.split_at(incomplete_tail_start(data));
    match std::str::from_utf8(complete) {
        Ok(complete) => text.push_str(complete),
        Err(error) => {
            return Err(ProtocolError::InvalidUtf8 {
                valid_up_to: text.len() + error.valid_up_to(),
            })
        }
    }
    if !unfinished.is_empty() {
        match std::str::from_utf8(unfinished) {
            Err(error) if error.valid_up_to() == 0 && error.error_len().is_none() => {
                tail.bytes[..unfinished.len()].copy_from_slice(unfinished);
                tail.len = unfinished.len();
            }
            _ => {
                return Err(ProtocolError::InvalidUtf8 {
                    valid_up_to: text.len(),
                })
            }
        }
    }
    Ok(())
}

/// Where the character cut off by the end of `data` starts, or `data.len()` if none is.
///
/// Only the last 3 bytes can hold an unfinished character (RFC 3629 §3: at most 4 bytes). Invalid
/// bytes are left in the complete part, where `from_utf8` reports them.
fn incomplete_tail_start(data: &[u8]) -> usize {
    let search_from = data.len().saturating_sub(3);
    for (start, &byte) in data.iter().enumerate().skip(search_from).rev() {
        if !is_utf8_continuation(byte) {
            return if utf8_sequence_len(byte) > data.len() - start {
                start
            } else {
                data.len()
            };
        }
    }
    data.len()
}

fn is_utf8_continuation(byte: u8) -> bool {
    byte & 0xc0 == 0x80
}

/// Length of the UTF-8 sequence a lead byte starts (RFC 3629 §4), or 0 for a byte that cannot lead.
fn utf8_sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::frame::CONTROL_PAYLOAD_BYTES_MAX;
    use super::super::test_client::{self, frame, Length, KEY};
    use super::*;

    /// Limit for the tables: big enough for every size they use.
    const TABLE_MESSAGE_BYTES_MAX: usize = 70_000;

    /// An owned copy of a [`Message`], so results can be kept past the next decode.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    impl Owned {
        fn of(message: &Message<'_>) -> Owned {
            match *message {
                Message::Text(text) => Owned::Text(text.to_owned()),
                Message::Binary(bytes) => Owned::Binary(bytes.to_vec()),
                Message::Ping(bytes) => Owned::Ping(bytes.to_vec()),
                Message::Pong(bytes) => Owned::Pong(bytes.to_vec()),
                Message::Close(close) => {
                    Owned::Close(close.map(|close| (close.code, close.reason.to_owned())))
                }
            }
        }

        fn text(text: &str) -> Owned {
            Owned::Text(text.to_owned())
        }
    }

    type Outcome = Result<Option<(usize, Option<Owned>)>, ProtocolError>;

    fn decode_owned(decoder: &mut Decoder, buf: &mut [u8]) -> Outcome {
        let len = buf.len();
        let outcome = decoder
            .decode(buf)
            .map(|decoded| decoded.map(|(used, message)| (used, message.as_ref().map(Owned::of))));
        if let Ok(Some((used, _))) = outcome {
            assert!((2..=len).contains(&used), "consumed {used} of {len}");
        }
        outcome
    }

    /// A decoder that has been fed `setup` frames, each decoding without error.
    fn decoder_after(message_bytes_max: usize, setup: &[Vec<u8>]) -> Decoder {
        let mut decoder = Decoder::new(message_bytes_max);
        for setup_frame in setup {
            let mut buf = setup_frame.clone();
            let outcome = decode_owned(&mut decoder, &mut buf);
            assert!(
                matches!(outcome, Ok(Some((used, _))) if used == setup_frame.len()),
                "setup frame {setup_frame:02x?} gave {outcome:?}"
            );
        }
        decoder
    }

    fn assembly_capacity(decoder: &Decoder) -> usize {
        decoder
            .fragments
            .as_ref()
            .map_or(0, |fragments| match &fragments.assembly {
                Assembly::Text { text, .. } => text.capacity(),
                Assembly::Binary { bytes } => bytes.capacity(),
            })
    }

    /// Decodes `frame_bytes` after `setup`, whole and split at `splits`: every strict prefix must be
    /// `Ok(None)` and leave the buffer untouched, and the whole frame (alone or followed by the next
    /// frame's first bytes) must then decode to `expected`.
    fn check_valid(
        name: &str,
        setup: &[Vec<u8>],
        frame_bytes: &[u8],
        splits: impl Iterator<Item = usize>,
        expected: &Option<Owned>,
    ) {
        let base = decoder_after(TABLE_MESSAGE_BYTES_MAX, setup);
        let expected: Outcome = Ok(Some((frame_bytes.len(), expected.clone())));
        for split in splits {
            let mut decoder = decoder_after(TABLE_MESSAGE_BYTES_MAX, setup);
            let mut prefix = frame_bytes[..split].to_vec();
            assert_eq!(
                decode_owned(&mut decoder, &mut prefix),
                Ok(None),
                "{name}: split at {split}"
            );
            assert_eq!(
                prefix,
                frame_bytes[..split],
                "{name}: Ok(None) changed the buffer"
            );
            assert_eq!(
                decoder.in_fragmented_message(),
                base.in_fragmented_message(),
                "{name}: Ok(None) changed the state"
            );
            let mut whole = frame_bytes.to_vec();
            assert_eq!(
                decode_owned(&mut decoder, &mut whole),
                expected,
                "{name}: whole after split at {split}"
            );
        }
        let mut followed = frame_bytes.to_vec();
        followed.extend_from_slice(&[0x81, 0x80]);
        assert_eq!(
            decode_owned(
                &mut decoder_after(TABLE_MESSAGE_BYTES_MAX, setup),
                &mut followed
            ),
            expected,
            "{name}: followed by another frame"
        );
    }

    #[test]
    fn idle_decoder_is_small() {
        assert!(std::mem::size_of::<Decoder>() <= DECODER_BYTES_MAX);
        // Two boxes that are `None` while idle, the limit and the compression flag in the third
        // word: nothing on the heap. (The flag's spare values also hold the tag of the enum a
        // decoder lives in.)
        assert_eq!(
            std::mem::size_of::<Decoder>(),
            3 * std::mem::size_of::<usize>()
        );
        assert!(Decoder::new(100).peek.is_none());
    }

    /// Autobahn 6.4.3/6.4.4: invalid UTF-8 in a text frame whose payload is still arriving fails
    /// as soon as the bad bytes are in, not after the whole frame; valid prefixes never do.
    #[test]
    fn invalid_utf8_fails_before_an_incomplete_frame_has_arrived() {
        let mut text = "κόσμε ".repeat(40).into_bytes();
        let bad_at = 37; // inside the payload, far from its end
        text[bad_at] = 0xff;
        let mut bytes = frame(true, OpCode::Text, &text);
        let header_len = bytes.len() - text.len();
        let mut decoder = Decoder::new(10_000);
        // Everything before the bad byte: nothing wrong yet, nothing consumed.
        for end in header_len..header_len + bad_at {
            let mut prefix = bytes[..end].to_vec();
            assert!(
                matches!(decoder.decode(&mut prefix), Ok(None)),
                "prefix of {end}"
            );
            assert_eq!(prefix, bytes[..end], "the caller's bytes are untouched");
        }
        // The bad byte has arrived, the rest of the frame has not.
        let err = decoder
            .decode(&mut bytes[..header_len + bad_at + 1])
            .unwrap_err();
        assert!(matches!(err, ProtocolError::InvalidUtf8 { .. }), "{err:?}");
        assert_eq!(err.close_code(), close::INVALID_PAYLOAD);

        // A continuation frame of a text message is checked from where the message stands: a
        // character split between fragments is fine, a bad one fails early.
        let mut decoder = Decoder::new(10_000);
        let first = "ab\u{20AC}".as_bytes(); // '€' is 3 bytes; send 1 of them here
        let mut opening = frame(false, OpCode::Text, &first[..3]);
        assert!(matches!(decoder.decode(&mut opening), Ok(Some((_, None)))));
        let mut rest = first[3..].to_vec();
        rest.extend_from_slice(&[b'x'; 200]);
        let mut cont = frame(true, OpCode::Continuation, &rest);
        let cont_header = cont.len() - rest.len();
        let mut partial = cont[..cont_header + 10].to_vec();
        assert!(matches!(decoder.decode(&mut partial), Ok(None)));
        cont[cont_header + 150] ^= 0x80; // 'x' (0x78) becomes 0xf8: never valid in UTF-8
        let err = decoder.decode(&mut cont[..cont_header + 151]).unwrap_err();
        assert!(matches!(err, ProtocolError::InvalidUtf8 { .. }), "{err:?}");
    }

    #[test]
    fn frame_bytes_max_covers_header_and_largest_payload() {
        assert_eq!(Decoder::new(1000).frame_bytes_max(), 14 + 1000);
        assert_eq!(Decoder::new(10).frame_bytes_max(), 14 + 125);
        // The limit is kept in 32 bits: more acts as 4 GiB - 1.
        let unbounded = Decoder::new(usize::MAX);
        assert_eq!(unbounded.message_bytes_max(), u32::MAX as usize);
        assert_eq!(unbounded.frame_bytes_max(), 14 + u32::MAX as usize);
        let compressing = Decoder::new(1 << 20).with_compression(true);
        assert_eq!(compressing.frame_bytes_max(), 14 + (1 << 20) + 128 + 64);
        assert_eq!(Decoder::new(1000).message_bytes_max(), 1000);
    }

    #[test]
    fn decode_valid_frames_split_at_every_byte() {
        let hel = frame(false, OpCode::Text, b"Hel");
        let euro_start = frame(false, OpCode::Text, &[b'a', 0xe2, 0x82]);
        let ping_125 = vec![0x5a; CONTROL_PAYLOAD_BYTES_MAX];
        let close = |code: u16, reason: &str| {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason.as_bytes());
            frame(true, OpCode::Close, &payload)
        };
        /// (name, frames fed before, frame under test, expected message)
        type Case = (&'static str, Vec<Vec<u8>>, Vec<u8>, Option<Owned>);
        let cases: Vec<Case> = vec![
            (
                "RFC 6455 §5.7 masked Hello",
                vec![],
                vec![
                    0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
                ],
                Some(Owned::text("Hello")),
            ),
            (
                "empty text",
                vec![],
                frame(true, OpCode::Text, b""),
                Some(Owned::text("")),
            ),
            (
                "multi-byte text",
                vec![],
                frame(true, OpCode::Text, "déjà vu €𝄞".as_bytes()),
                Some(Owned::text("déjà vu €𝄞")),
            ),
            (
                "binary",
                vec![],
                frame(true, OpCode::Binary, &[0, 0xff, 0x80]),
                Some(Owned::Binary(vec![0, 0xff, 0x80])),
            ),
            (
                "empty binary",
                vec![],
                frame(true, OpCode::Binary, b""),
                Some(Owned::Binary(vec![])),
            ),
            (
                "non-minimal 16-bit length",
                vec![],
                test_client::raw(0x81, Some(KEY), Length::Bits16, b"abc"),
                Some(Owned::text("abc")),
            ),
            (
                "non-minimal 64-bit length",
                vec![],
                test_client::raw(0x82, Some(KEY), Length::Bits64, b"abc"),
                Some(Owned::Binary(b"abc".to_vec())),
            ),
            (
                "ping",
                vec![],
                frame(true, OpCode::Ping, b"Hello"),
                Some(Owned::Ping(b"Hello".to_vec())),
            ),
            (
                "largest ping",
                vec![],
                frame(true, OpCode::Ping, &ping_125),
                Some(Owned::Ping(ping_125.clone())),
            ),
            (
                "empty pong",
                vec![],
                frame(true, OpCode::Pong, b""),
                Some(Owned::Pong(vec![])),
            ),
            (
                "empty close",
                vec![],
                frame(true, OpCode::Close, b""),
                Some(Owned::Close(None)),
            ),
            (
                "close 1000",
                vec![],
                close(1000, ""),
                Some(Owned::Close(Some((1000, String::new())))),
            ),
            (
                "close 1001 with reason",
                vec![],
                close(1001, "bye"),
                Some(Owned::Close(Some((1001, "bye".into())))),
            ),
            (
                "close 4999 with UTF-8 reason",
                vec![],
                close(4999, "é€"),
                Some(Owned::Close(Some((4999, "é€".into())))),
            ),
            (
                "close with longest reason",
                vec![],
                close(3000, &"r".repeat(123)),
                Some(Owned::Close(Some((3000, "r".repeat(123))))),
            ),
            ("first fragment", vec![], hel.clone(), None),
            (
                "last fragment",
                vec![hel.clone()],
                frame(true, OpCode::Continuation, b"lo"),
                Some(Owned::text("Hello")),
            ),
            (
                "middle fragment",
                vec![hel.clone()],
                frame(false, OpCode::Continuation, b"lo"),
                None,
            ),
            (
                "empty last fragment",
                vec![hel.clone()],
                frame(true, OpCode::Continuation, b""),
                Some(Owned::text("Hel")),
            ),
            (
                "ping between fragments",
                vec![hel.clone()],
                frame(true, OpCode::Ping, b"p"),
                Some(Owned::Ping(b"p".to_vec())),
            ),
            (
                "close between fragments",
                vec![hel.clone()],
                close(1000, ""),
                Some(Owned::Close(Some((1000, String::new())))),
            ),
            (
                "fragmented binary",
                vec![frame(false, OpCode::Binary, &[1, 2])],
                frame(true, OpCode::Continuation, &[3]),
                Some(Owned::Binary(vec![1, 2, 3])),
            ),
            (
                "character split across fragments",
                vec![euro_start.clone()],
                frame(true, OpCode::Continuation, &[0xac]),
                Some(Owned::text("a€")),
            ),
            (
                "character split across three fragments",
                vec![
                    frame(false, OpCode::Text, &[0xf0]),
                    frame(false, OpCode::Continuation, &[0x9d, 0x84]),
                ],
                frame(true, OpCode::Continuation, &[0x9e, b'!']),
                Some(Owned::text("𝄞!")),
            ),
            (
                "text after a completed fragmented message",
                vec![hel.clone(), frame(true, OpCode::Continuation, b"lo")],
                frame(true, OpCode::Text, b"next"),
                Some(Owned::text("next")),
            ),
        ];
        for (name, setup, frame_bytes, expected) in &cases {
            check_valid(name, setup, frame_bytes, 0..frame_bytes.len(), expected);
        }
    }

    #[test]
    fn sizes_round_trip() {
        for size in [0, 125, 126, 65535, 65536] {
            let binary: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let text: String = (0..size)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let cases = [
                (
                    frame(true, OpCode::Binary, &binary),
                    Owned::Binary(binary.clone()),
                ),
                (
                    frame(true, OpCode::Text, text.as_bytes()),
                    Owned::Text(text.clone()),
                ),
            ];
            for (frame_bytes, expected) in cases {
                // Every split inside the header, and a few inside the payload: splitting a 64 KiB
                // frame at every byte would copy gigabytes for no extra coverage.
                let header_bytes = frame_bytes.len() - size;
                let splits = (0..=header_bytes)
                    .chain([header_bytes + size / 2, frame_bytes.len() - 1])
                    .filter(|&split| split < frame_bytes.len());
                check_valid(
                    &format!("size {size}"),
                    &[],
                    &frame_bytes,
                    splits,
                    &Some(expected),
                );
            }
        }
    }

    #[test]
    fn single_frame_messages_borrow_the_callers_buffer() {
        let mut decoder = Decoder::new(100);
        for opcode in [OpCode::Text, OpCode::Binary, OpCode::Ping, OpCode::Pong] {
            let mut buf = frame(true, opcode, b"zero copy");
            let range = buf.as_ptr_range();
            let (_, message) = decoder.decode(&mut buf).unwrap().unwrap();
            let payload = match message.unwrap() {
                Message::Text(text) => text.as_bytes(),
                Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes,
                Message::Close(_) => unreachable!(),
            };
            assert!(range.contains(&payload.as_ptr()), "{opcode:?} was copied");
        }
    }

    #[test]
    fn fragmented_message_with_interleaved_control_frames() {
        let frames = [
            frame(false, OpCode::Text, b"Hel"),
            frame(true, OpCode::Ping, b"1"),
            frame(false, OpCode::Continuation, "lo, wörld".as_bytes()),
            frame(true, OpCode::Pong, b""),
            frame(false, OpCode::Continuation, b""),
            frame(true, OpCode::Ping, b"2"),
            frame(true, OpCode::Continuation, b"!"),
            frame(true, OpCode::Binary, &[7]),
            frame(false, OpCode::Binary, &[1]),
            frame(true, OpCode::Continuation, &[2]),
        ];
        let expected = [
            None,
            Some(Owned::Ping(b"1".to_vec())),
            None,
            Some(Owned::Pong(vec![])),
            None,
            Some(Owned::Ping(b"2".to_vec())),
            Some(Owned::text("Hello, wörld!")),
            Some(Owned::Binary(vec![7])),
            None,
            Some(Owned::Binary(vec![1, 2])),
        ];
        let open_after = [
            true, true, true, true, true, true, false, false, true, false,
        ];
        let mut stream: Vec<u8> = frames.concat();
        let mut decoder = Decoder::new(100);
        let mut at = 0;
        for (index, frame_bytes) in frames.iter().enumerate() {
            let outcome = decode_owned(&mut decoder, &mut stream[at..]);
            assert_eq!(
                outcome,
                Ok(Some((frame_bytes.len(), expected[index].clone()))),
                "frame {index}"
            );
            assert_eq!(
                decoder.in_fragmented_message(),
                open_after[index],
                "frame {index}"
            );
            at += frame_bytes.len();
        }
        assert_eq!(decode_owned(&mut decoder, &mut stream[at..]), Ok(None));
        assert!(decoder.fragments.is_none(), "assembly freed after delivery");
    }

    #[test]
    fn fragment_buffer_is_freed_on_the_next_call_after_delivery() {
        let mut decoder = Decoder::new(1000);
        let mut first = frame(false, OpCode::Binary, &[1; 300]);
        let mut last = frame(true, OpCode::Continuation, &[2; 300]);
        assert_eq!(
            decode_owned(&mut decoder, &mut first),
            Ok(Some((first.len(), None)))
        );
        assert!(decoder.in_fragmented_message());
        assert_eq!(decoder.buffered_bytes(), 300);
        let (_, message) = decoder.decode(&mut last).unwrap().unwrap();
        assert_eq!(
            message.map(|m| Owned::of(&m)).unwrap(),
            Owned::Binary([[1; 300], [2; 300]].concat())
        );
        assert!(!decoder.in_fragmented_message());
        // Still held: the message above borrowed it until this point.
        assert_eq!(decoder.buffered_bytes(), 600);
        assert_eq!(decode_owned(&mut decoder, &mut []), Ok(None));
        assert!(decoder.fragments.is_none());
        assert_eq!(decoder.buffered_bytes(), 0);
    }

    #[test]
    fn message_at_the_limit_is_accepted_and_capacity_never_exceeds_it() {
        let limit = 100;
        let mut decoder = Decoder::new(limit);
        let mut single = frame(true, OpCode::Binary, &[0; 100]);
        assert!(matches!(
            decode_owned(&mut decoder, &mut single),
            Ok(Some((_, Some(_))))
        ));
        // Fragments of 1 byte each, to exercise growth, ending exactly at the limit.
        let mut stream = frame(false, OpCode::Text, b"x");
        for _ in 0..98 {
            stream.extend(frame(false, OpCode::Continuation, b"x"));
        }
        stream.extend(frame(true, OpCode::Continuation, b"x"));
        let mut at = 0;
        loop {
            match decode_owned(&mut decoder, &mut stream[at..]) {
                Ok(Some((used, message))) => {
                    at += used;
                    assert!(assembly_capacity(&decoder) <= limit);
                    if let Some(message) = message {
                        assert_eq!(message, Owned::Text("x".repeat(limit)));
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(at, stream.len());
    }

    #[test]
    fn text_capacity_counts_the_unfinished_character_carried_between_fragments() {
        // Regression: growth once ignored the bytes waiting in the UTF-8 tail, so completing a
        // character let `String` grow by itself, past the limit (to its 8-byte minimum here).
        let limit = 4;
        let mut decoder = Decoder::new(limit);
        let mut first = frame(false, OpCode::Text, &[0xf0, 0x9f]);
        let mut last = frame(true, OpCode::Continuation, &[0x98, 0x80]);
        assert_eq!(
            decode_owned(&mut decoder, &mut first),
            Ok(Some((first.len(), None)))
        );
        assert!(assembly_capacity(&decoder) <= limit);
        assert_eq!(
            decode_owned(&mut decoder, &mut last),
            Ok(Some((last.len(), Some(Owned::text("😀")))))
        );
        assert!(assembly_capacity(&decoder) <= limit);
    }

    #[test]
    fn decode_errors_table() {
        use ProtocolError::*;
        let text_open = || vec![frame(false, OpCode::Text, b"ok")];
        let close = |code: u16, reason: &[u8]| {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason);
            frame(true, OpCode::Close, &payload)
        };
        struct Case {
            name: &'static str,
            message_bytes_max: usize,
            setup: Vec<Vec<u8>>,
            frame: Vec<u8>,
            expected: ProtocolError,
            /// The header alone (no payload) is enough to report it.
            from_header: bool,
        }
        let case = |name, setup, frame, expected, from_header| Case {
            name,
            message_bytes_max: 100,
            setup,
            frame,
            expected,
            from_header,
        };
        let cases = vec![
            case(
                "RSV1",
                vec![],
                test_client::raw(0xc1, Some(KEY), Length::Minimal, b"x"),
                ReservedBitsSet { rsv: 0b100 },
                true,
            ),
            case(
                "RSV3 on a continuation",
                text_open(),
                test_client::raw(0x90, Some(KEY), Length::Minimal, b"x"),
                ReservedBitsSet { rsv: 0b001 },
                true,
            ),
            case(
                "opcode 3",
                vec![],
                test_client::raw(0x83, Some(KEY), Length::Minimal, b""),
                ReservedOpCode { opcode: 3 },
                true,
            ),
            case(
                "opcode 11",
                vec![],
                test_client::raw(0x8b, Some(KEY), Length::Minimal, b""),
                ReservedOpCode { opcode: 11 },
                true,
            ),
            case(
                "fragmented ping",
                vec![],
                frame(false, OpCode::Ping, b""),
                FragmentedControlFrame {
                    opcode: OpCode::Ping,
                },
                true,
            ),
            case(
                "126-byte pong",
                vec![],
                frame(true, OpCode::Pong, &[0; 126]),
                ControlFrameTooBig {
                    opcode: OpCode::Pong,
                    payload_len: 126,
                },
                true,
            ),
            case(
                "64-bit length with MSB set",
                vec![],
                vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1],
                PayloadLengthMsbSet {
                    payload_len: (1 << 63) + 1,
                },
                true,
            ),
            case(
                "unmasked text",
                vec![],
                test_client::raw(0x81, None, Length::Minimal, b"Hello"),
                UnmaskedFrameFromClient {
                    opcode: OpCode::Text,
                },
                true,
            ),
            case(
                "unmasked close",
                vec![],
                test_client::raw(0x88, None, Length::Minimal, b""),
                UnmaskedFrameFromClient {
                    opcode: OpCode::Close,
                },
                true,
            ),
            case(
                "continuation with nothing open",
                vec![],
                frame(true, OpCode::Continuation, b"x"),
                UnexpectedContinuation,
                true,
            ),
            case(
                "continuation after the message ended",
                vec![
                    frame(false, OpCode::Binary, b"a"),
                    frame(true, OpCode::Continuation, b"b"),
                ],
                frame(false, OpCode::Continuation, b"c"),
                UnexpectedContinuation,
                true,
            ),
            case(
                "text while text is open",
                text_open(),
                frame(true, OpCode::Text, b"x"),
                ExpectedContinuation {
                    opcode: OpCode::Text,
                },
                true,
            ),
            case(
                "binary while text is open",
                text_open(),
                frame(false, OpCode::Binary, b"x"),
                ExpectedContinuation {
                    opcode: OpCode::Binary,
                },
                true,
            ),
            case(
                "single frame over the limit",
                vec![],
                frame(true, OpCode::Binary, &[0; 101]),
                MessageTooBig {
                    message_bytes: 101,
                    message_bytes_max: 100,
                },
                true,
            ),
            case(
                "fragments over the limit",
                vec![
                    frame(false, OpCode::Binary, &[0; 60]),
                    frame(false, OpCode::Continuation, &[0; 30]),
                ],
                frame(true, OpCode::Continuation, &[0; 11]),
                MessageTooBig {
                    message_bytes: 101,
                    message_bytes_max: 100,
                },
                true,
            ),
            case(
                "huge 64-bit length",
                vec![],
                vec![
                    0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
                ],
                MessageTooBig {
                    message_bytes: (1 << 63) - 1,
                    message_bytes_max: 100,
                },
                true,
            ),
            case(
                "invalid byte in single-frame text",
                vec![],
                frame(true, OpCode::Text, &[b'a', b'b', 0xff]),
                InvalidUtf8 { valid_up_to: 2 },
                false,
            ),
            case(
                "unfinished character ends single-frame text",
                vec![],
                frame(true, OpCode::Text, &[b'a', 0xe2, 0x82]),
                InvalidUtf8 { valid_up_to: 1 },
                false,
            ),
            case(
                "invalid byte in a fragment",
                text_open(),
                frame(false, OpCode::Continuation, &[b'x', 0xc0, 0x80]),
                InvalidUtf8 { valid_up_to: 3 },
                false,
            ),
            case(
                "unfinished character ends a fragmented text",
                vec![frame(false, OpCode::Text, &[b'a', 0xf0, 0x9f])],
                frame(true, OpCode::Continuation, &[0x98]),
                InvalidUtf8 { valid_up_to: 1 },
                false,
            ),
            case(
                "1-byte close",
                vec![],
                frame(true, OpCode::Close, &[0x03]),
                CloseFrameTruncatedCode,
                false,
            ),
            case(
                "close 999",
                vec![],
                close(999, b""),
                InvalidCloseCode { code: 999 },
                false,
            ),
            case(
                "close 1004",
                vec![],
                close(1004, b""),
                InvalidCloseCode { code: 1004 },
                false,
            ),
            case(
                "close 1005",
                vec![],
                close(1005, b""),
                InvalidCloseCode { code: 1005 },
                false,
            ),
            case(
                "close 1006",
                vec![],
                close(1006, b""),
                InvalidCloseCode { code: 1006 },
                false,
            ),
            case(
                "close 1015",
                vec![],
                close(1015, b""),
                InvalidCloseCode { code: 1015 },
                false,
            ),
            case(
                "close 2999",
                vec![],
                close(2999, b""),
                InvalidCloseCode { code: 2999 },
                false,
            ),
            case(
                "close 5000",
                vec![],
                close(5000, b""),
                InvalidCloseCode { code: 5000 },
                false,
            ),
            case(
                "close reason not UTF-8",
                vec![],
                close(1000, &[b'o', b'k', 0xfe]),
                InvalidCloseReason { valid_up_to: 2 },
                false,
            ),
            case(
                "close reason with unfinished character",
                vec![],
                close(1000, &[0xe2, 0x82]),
                InvalidCloseReason { valid_up_to: 0 },
                false,
            ),
        ];
        for case in cases {
            let name = case.name;
            let base = || decoder_after(case.message_bytes_max, &case.setup);
            let mut buf = case.frame.clone();
            assert_eq!(
                decode_owned(&mut base(), &mut buf),
                Err(case.expected),
                "{name}"
            );
            let header_bytes = match FrameHeader::parse(&case.frame) {
                Ok(Some((_, used))) => used,
                _ => case.frame.len().min(CLIENT_HEADER_BYTES_MAX),
            };
            let mut header_only = case.frame[..header_bytes].to_vec();
            let outcome = decode_owned(&mut base(), &mut header_only);
            if case.from_header {
                assert_eq!(outcome, Err(case.expected), "{name}: from the header alone");
            } else {
                assert_eq!(outcome, Ok(None), "{name}: needs the payload");
            }
            let code = match case.expected {
                InvalidUtf8 { .. } | InvalidCloseReason { .. } => close::INVALID_PAYLOAD,
                MessageTooBig { .. } => close::MESSAGE_TOO_BIG,
                _ => close::PROTOCOL_ERROR,
            };
            assert_eq!(case.expected.close_code(), code, "{name}");
            assert!(!case.expected.to_string().is_empty());
        }
    }

    #[test]
    fn utf8_split_across_fragments_table() {
        // (fragments of one text message, Ok(text) or Err((index of the failing fragment, valid_up_to)))
        type Expected = Result<&'static str, (usize, usize)>;
        let cases: &[(&[&[u8]], Expected)] = &[
            (&[b"ab", b"cd"], Ok("abcd")),
            (&[&[0xe2], &[0x82], &[0xac]], Ok("€")),
            (&[&[0xe2, 0x82], &[0xac, b'x']], Ok("€x")),
            (&[&[0xf0], &[0x9d, 0x84, 0x9e]], Ok("𝄞")),
            (&[&[0xf0, 0x9d], &[], &[0x84], &[0x9e]], Ok("𝄞")),
            (&[&[b'a', 0xc3], &[0xa9, 0xc3], &[0xa9]], Ok("aéé")),
            // Never valid as a first byte: fails at the first fragment.
            (&[&[0xff], b"a"], Err((0, 0))),
            (&[&[b'a', 0xf5], &[0x80, 0x80, 0x80]], Err((0, 1))),
            // Overlong (E0 80) and surrogate (ED A0) prefixes are invalid before they are complete.
            (&[&[0xe0, 0x80], &[0x80]], Err((0, 0))),
            (&[&[0xed, 0xa0], &[0x80]], Err((0, 0))),
            (&[&[b'a', 0xf4, 0x90], &[0x80, 0x80]], Err((0, 1))),
            // A valid prefix broken by the next fragment.
            (&[&[0xe2, 0x82], b"A"], Err((1, 0))),
            (&[&[b'a', 0xf0], &[0x9d], &[0x41]], Err((2, 1))),
            (&[&[0xc3], &[0xa9, 0xff]], Err((1, 2))),
            (&[b"ok", &[0x80]], Err((1, 2))),
            // Unfinished at the end: only the final fragment can tell.
            (&[&[b'a', 0xe2], &[0x82]], Err((1, 1))),
            (&[&[b'a', 0xe2], &[0x82], &[]], Err((2, 1))),
        ];
        for (fragments, expected) in cases {
            let mut decoder = Decoder::new(100);
            let last = fragments.len() - 1;
            let mut outcome = None;
            for (index, fragment) in fragments.iter().enumerate() {
                let opcode = if index == 0 {
                    OpCode::Text
                } else {
                    OpCode::Continuation
                };
                let mut buf = frame(index == last, opcode, fragment);
                match decode_owned(&mut decoder, &mut buf) {
                    Ok(Some((_, None))) => assert!(index < last),
                    Ok(Some((_, Some(Owned::Text(text))))) => {
                        outcome = Some(Ok(text));
                        assert_eq!(index, last);
                    }
                    Err(ProtocolError::InvalidUtf8 { valid_up_to }) => {
                        outcome = Some(Err((index, valid_up_to)));
                        break;
                    }
                    other => panic!("{fragments:02x?}: fragment {index} gave {other:?}"),
                }
            }
            let expected = expected.map(str::to_owned);
            assert_eq!(outcome, Some(expected), "{fragments:02x?}");
        }
    }

    /// `data` as a permessage-deflate sender makes it: raw deflate, sync flush, tail stripped
    /// (RFC 7692 §7.2.1).
    fn deflated(data: &[u8]) -> Vec<u8> {
        let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        compress
            .compress_vec(data, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&super::super::deflate::TAIL));
        out.truncate(out.len() - 4);
        out
    }

    /// A masked client frame with RSV1 set.
    fn compressed(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let first = if fin { 0x80 } else { 0 } | 0x40 | opcode as u8;
        test_client::raw(first, Some(KEY), Length::Minimal, payload)
    }

    /// Text long enough to compress well, mixing character widths.
    fn prose(len: usize) -> String {
        let mut text = String::new();
        while text.len() < len {
            text.push_str("stock of sku-été € 𝄞 changed; ");
        }
        while text.len() > len {
            text.pop();
        }
        text
    }

    #[test]
    fn compressed_messages_table() {
        use ProtocolError::*;
        let hello = deflated(b"Hello");
        let long = prose(5000);
        let long_deflated = deflated(long.as_bytes());
        let third = long_deflated.len() / 3;
        let zeros = deflated(&vec![0u8; 1 << 20]);
        let bomb_fragments: Vec<Vec<u8>> = zeros
            .chunks(100)
            .enumerate()
            .map(|(index, piece)| {
                let last = (index + 1) * 100 >= zeros.len();
                if index == 0 {
                    compressed(last, OpCode::Binary, piece)
                } else {
                    frame(last, OpCode::Continuation, piece)
                }
            })
            .collect();
        let too_big = MessageTooBig {
            message_bytes: 64 * 1024 + 1,
            message_bytes_max: 64 * 1024,
        };
        // (name, limit, frames, expected messages, expected error after them)
        type Case = (
            &'static str,
            usize,
            Vec<Vec<u8>>,
            Vec<Owned>,
            Option<ProtocolError>,
        );
        let cases: Vec<Case> = vec![
            (
                "single compressed text",
                100,
                vec![compressed(true, OpCode::Text, &hello)],
                vec![Owned::text("Hello")],
                None,
            ),
            (
                "RFC 7692 §7.2.3.1 bytes",
                100,
                vec![compressed(
                    true,
                    OpCode::Text,
                    &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
                )],
                vec![Owned::text("Hello")],
                None,
            ),
            (
                "RFC 7692 §7.2.3.1, fragmented: RSV1 on the first frame only",
                100,
                vec![
                    compressed(false, OpCode::Text, &[0xf2, 0x48, 0xcd]),
                    frame(true, OpCode::Continuation, &[0xc9, 0xc9, 0x07, 0x00]),
                ],
                vec![Owned::text("Hello")],
                None,
            ),
            (
                "compressed binary, empty",
                100,
                vec![compressed(true, OpCode::Binary, &deflated(b""))],
                vec![Owned::Binary(vec![])],
                None,
            ),
            (
                "fragmented compressed text with a ping between fragments",
                TABLE_MESSAGE_BYTES_MAX,
                vec![
                    compressed(false, OpCode::Text, &long_deflated[..third]),
                    frame(true, OpCode::Ping, b"p"),
                    frame(
                        false,
                        OpCode::Continuation,
                        &long_deflated[third..2 * third],
                    ),
                    frame(false, OpCode::Continuation, &[]),
                    frame(true, OpCode::Continuation, &long_deflated[2 * third..]),
                ],
                vec![Owned::Ping(b"p".to_vec()), Owned::text(&long)],
                None,
            ),
            (
                "compressed, plain, compressed",
                100,
                vec![
                    compressed(true, OpCode::Text, &hello),
                    frame(true, OpCode::Text, b"plain"),
                    frame(false, OpCode::Binary, b"pl"),
                    frame(true, OpCode::Continuation, b"ain"),
                    compressed(true, OpCode::Binary, &hello),
                ],
                vec![
                    Owned::text("Hello"),
                    Owned::text("plain"),
                    Owned::Binary(b"plain".to_vec()),
                    Owned::Binary(b"Hello".to_vec()),
                ],
                None,
            ),
            (
                "exactly at the limit",
                5,
                vec![compressed(true, OpCode::Text, &hello)],
                vec![Owned::text("Hello")],
                None,
            ),
            (
                "one byte past the limit",
                4,
                vec![compressed(true, OpCode::Text, &hello)],
                vec![],
                Some(MessageTooBig {
                    message_bytes: 5,
                    message_bytes_max: 4,
                }),
            ),
            (
                "zip bomb: 1 MiB of zeros in about a kilobyte",
                64 * 1024,
                vec![compressed(true, OpCode::Binary, &zeros)],
                vec![],
                Some(too_big),
            ),
            (
                "zip bomb in fragments",
                64 * 1024,
                bomb_fragments,
                vec![],
                Some(too_big),
            ),
            (
                "invalid deflate data",
                100,
                vec![compressed(true, OpCode::Text, &[0xff, 0xff])],
                vec![],
                Some(InvalidCompressedData),
            ),
            (
                "compressed text that is not UTF-8",
                100,
                vec![compressed(
                    true,
                    OpCode::Text,
                    &deflated(&[b'o', b'k', 0xff]),
                )],
                vec![],
                Some(InvalidUtf8 { valid_up_to: 2 }),
            ),
            (
                "compressed text ending inside a character",
                100,
                vec![compressed(
                    true,
                    OpCode::Text,
                    &deflated(&[b'o', 0xe2, 0x82]),
                )],
                vec![],
                Some(InvalidUtf8 { valid_up_to: 1 }),
            ),
            (
                "RSV1 on a continuation frame",
                100,
                vec![
                    compressed(false, OpCode::Text, &hello[..2]),
                    compressed(true, OpCode::Continuation, &hello[2..]),
                ],
                vec![],
                Some(CompressedBitMisplaced {
                    opcode: OpCode::Continuation,
                }),
            ),
            (
                "RSV1 on a ping",
                100,
                vec![compressed(true, OpCode::Ping, b"")],
                vec![],
                Some(CompressedBitMisplaced {
                    opcode: OpCode::Ping,
                }),
            ),
            (
                "RSV1 on a close",
                100,
                vec![compressed(true, OpCode::Close, &[0x03, 0xe8])],
                vec![],
                Some(CompressedBitMisplaced {
                    opcode: OpCode::Close,
                }),
            ),
            (
                "RSV2 is still reserved",
                100,
                vec![test_client::raw(
                    0x80 | 0x20 | 1,
                    Some(KEY),
                    Length::Minimal,
                    b"x",
                )],
                vec![],
                Some(ReservedBitsSet { rsv: 0b010 }),
            ),
        ];
        for (name, limit, frames, expected, error) in cases {
            let stream = frames.concat();
            for chunks in [&[usize::MAX][..], &[1], &[3, 17, 64]] {
                let mut decoder = Decoder::new(limit).with_compression(true);
                let (messages, failure) = drive(&mut decoder, &stream, chunks, false);
                assert_eq!(messages, expected, "{name} in chunks of {chunks:?}");
                // How far past the limit inflating got depends on where a chunk ended: at
                // most one chunk, which is held in the thread's chunk buffer, not in the message.
                let failure = match (failure, error) {
                    (
                        Some(MessageTooBig {
                            message_bytes,
                            message_bytes_max,
                        }),
                        Some(MessageTooBig { .. }),
                    ) if message_bytes > message_bytes_max as u64
                        && message_bytes
                            <= (message_bytes_max + super::super::deflate::INFLATE_CHUNK_BYTES)
                                as u64 =>
                    {
                        error
                    }
                    _ => failure,
                };
                assert_eq!(failure, error, "{name} in chunks of {chunks:?}");
                if let Some(error) = failure {
                    let code = match error {
                        MessageTooBig { .. } => close::MESSAGE_TOO_BIG,
                        InvalidUtf8 { .. } | InvalidCompressedData => close::INVALID_PAYLOAD,
                        _ => close::PROTOCOL_ERROR,
                    };
                    assert_eq!(error.close_code(), code, "{name}");
                    assert!(!error.to_string().is_empty());
                } else {
                    assert!(!decoder.in_fragmented_message(), "{name}");
                }
            }
        }
    }

    #[test]
    fn rsv1_without_negotiation_is_a_protocol_error() {
        for mut decoder in [Decoder::new(100), Decoder::new(100).with_compression(false)] {
            let mut buf = compressed(true, OpCode::Text, &deflated(b"Hello"));
            let error = decode_owned(&mut decoder, &mut buf).unwrap_err();
            assert_eq!(error, ProtocolError::ReservedBitsSet { rsv: 0b100 });
            assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn compressed_message_memory_is_freed_after_delivery() {
        let text = prose(3000);
        let mut decoder = Decoder::new(10_000).with_compression(true);
        let mut buf = compressed(false, OpCode::Text, &deflated(text.as_bytes()));
        assert_eq!(
            decode_owned(&mut decoder, &mut buf).unwrap().unwrap().1,
            None
        );
        assert!(decoder.in_fragmented_message());
        assert_eq!(decoder.buffered_bytes(), text.len());
        let mut end = frame(true, OpCode::Continuation, &[]);
        let delivered = decode_owned(&mut decoder, &mut end).unwrap().unwrap().1;
        assert_eq!(delivered, Some(Owned::text(&text)));
        let mut ping = frame(true, OpCode::Ping, b"");
        decode_owned(&mut decoder, &mut ping).unwrap();
        assert!(
            decoder.fragments.is_none(),
            "assembly and inflater are gone"
        );
        assert_eq!(decoder.buffered_bytes(), 0);
    }

    /// Feeds `stream` to `decoder` in chunks of the given sizes (cycled), as reads from a socket
    /// would arrive, checking the decoder's invariants after every call. Stops at the first error,
    /// or with `skip_errors` drops one byte and goes on (to stress the decoder after an error).
    fn drive(
        decoder: &mut Decoder,
        stream: &[u8],
        chunks: &[usize],
        skip_errors: bool,
    ) -> (Vec<Owned>, Option<ProtocolError>) {
        let max = decoder.message_bytes_max();
        let mut messages = Vec::new();
        let mut buf = Vec::new();
        let mut fed = 0;
        let mut chunk_sizes = chunks.iter().cycle();
        loop {
            let chunk = chunk_sizes.next().copied().unwrap_or(usize::MAX).max(1);
            let end = fed + chunk.min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..end]);
            fed = end;
            loop {
                let outcome = decode_owned(decoder, &mut buf);
                assert!(decoder.buffered_bytes() <= max, "buffered past the limit");
                assert!(assembly_capacity(decoder) <= max, "capacity past the limit");
                match outcome {
                    Ok(None) => {
                        // "Need more" with a full frame's worth buffered would make the
                        // caller read past the limit it sized its buffer by.
                        assert!(
                            buf.len() < decoder.frame_bytes_max(),
                            "waits past the limit"
                        );
                        break;
                    }
                    Ok(Some((used, message))) => {
                        buf.drain(..used);
                        messages.extend(message);
                    }
                    Err(error) if skip_errors && !buf.is_empty() => {
                        let _ = error.close_code();
                        buf.drain(..1);
                    }
                    Err(error) => return (messages, Some(error)),
                }
            }
            if fed == stream.len() {
                return (messages, None);
            }
        }
    }

    /// One data message as a client might send it: fragmented at `cuts`, with a ping after every
    /// non-final fragment when `pings` is set.
    #[derive(Clone, Debug)]
    struct Planned {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
        pings: bool,
    }

    fn planned() -> impl Strategy<Value = Planned> {
        let payload = prop_oneof![
            ".{0,40}".prop_map(|text: String| (true, text.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|bytes| (false, bytes)),
        ];
        (
            payload,
            proptest::collection::vec(any::<usize>(), 0..4),
            any::<bool>(),
        )
            .prop_map(|((text, payload), cuts, pings)| Planned {
                text,
                payload,
                cuts,
                pings,
            })
    }

    /// Splits `payload` at `cuts` (taken modulo its length + 1, so empty fragments happen too).
    fn fragments<'p>(payload: &'p [u8], cuts: &[usize]) -> Vec<&'p [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut % (payload.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts {
            pieces.push(&payload[start..cut]);
            start = cut;
        }
        pieces.push(&payload[start..]);
        pieces
    }

    /// The client frames for `plan`, and the messages the decoder should return for them.
    fn encode_plan(plan: &[Planned], key: [u8; 4]) -> (Vec<u8>, Vec<Owned>) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for message in plan {
            let pieces = fragments(&message.payload, &message.cuts);
            let last = pieces.len() - 1;
            for (index, piece) in pieces.iter().enumerate() {
                let opcode = match (index, message.text) {
                    (0, true) => OpCode::Text,
                    (0, false) => OpCode::Binary,
                    _ => OpCode::Continuation,
                };
                stream.extend(test_client::frame_with_key(
                    index == last,
                    opcode,
                    piece,
                    key,
                ));
                if message.pings && index < last {
                    stream.extend(test_client::frame_with_key(
                        true,
                        OpCode::Ping,
                        &[index as u8],
                        key,
                    ));
                    expected.push(Owned::Ping(vec![index as u8]));
                }
            }
            expected.push(if message.text {
                Owned::Text(String::from_utf8(message.payload.clone()).unwrap())
            } else {
                Owned::Binary(message.payload.clone())
            });
        }
        (stream, expected)
    }

    /// A byte string mixing valid characters of every width with arbitrary bytes.
    fn mostly_utf8() -> impl Strategy<Value = Vec<u8>> {
        let atom = prop_oneof![
            3 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
            1 => any::<u8>().prop_map(|byte| vec![byte]),
            1 => proptest::sample::select(vec![
                vec![0xe0, 0x80], vec![0xed, 0xa0], vec![0xf4, 0x90], vec![0xf0, 0x9f], vec![0xc3],
            ]),
        ];
        proptest::collection::vec(atom, 0..12).prop_map(|atoms| atoms.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn valid_streams_decode_whatever_the_read_sizes(
            plan in proptest::collection::vec(planned(), 0..6),
            key in any::<[u8; 4]>(),
            chunks in proptest::collection::vec(1..64usize, 1..8),
        ) {
            let (stream, expected) = encode_plan(&plan, key);
            let mut decoder = Decoder::new(TABLE_MESSAGE_BYTES_MAX);
            let (messages, error) = drive(&mut decoder, &stream, &chunks, false);
            prop_assert_eq!(error, None);
            prop_assert_eq!(messages, expected);
            prop_assert!(!decoder.in_fragmented_message());
        }

        #[test]
        fn utf8_fails_at_the_first_fragment_that_shows_it(
            bytes in mostly_utf8(),
            cuts in proptest::collection::vec(any::<usize>(), 0..5),
        ) {
            let pieces = fragments(&bytes, &cuts);
            let last = pieces.len() - 1;
            // Reference: the first fragment whose end makes the prefix definitely invalid, or the
            // final fragment if the whole is merely unfinished.
            let mut end = 0;
            let mut expected = None;
            for (index, piece) in pieces.iter().enumerate() {
                end += piece.len();
                match std::str::from_utf8(&bytes[..end]) {
                    Err(error) if error.error_len().is_some() || index == last => {
                        expected = Some(Err((index, error.valid_up_to())));
                        break;
                    }
                    Ok(text) if index == last => expected = Some(Ok(text.to_owned())),
                    _ => {}
                }
            }
            let mut decoder = Decoder::new(1000);
            let mut outcome = None;
            for (index, piece) in pieces.iter().enumerate() {
                let opcode = if index == 0 { OpCode::Text } else { OpCode::Continuation };
                let mut buf = frame(index == last, opcode, piece);
                match decode_owned(&mut decoder, &mut buf) {
                    Ok(Some((_, None))) => prop_assert!(index < last),
                    Ok(Some((_, Some(Owned::Text(text))))) => outcome = Some(Ok(text)),
                    Err(ProtocolError::InvalidUtf8 { valid_up_to }) => {
                        outcome = Some(Err((index, valid_up_to)));
                        break;
                    }
                    other => prop_assert!(false, "fragment {} gave {:?}", index, other),
                }
            }
            prop_assert_eq!(outcome, expected);
        }

        #[test]
        fn mutated_streams_never_panic_or_overrun(
            plan in proptest::collection::vec(planned(), 0..4),
            key in any::<[u8; 4]>(),
            mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            chunks in proptest::collection::vec(1..64usize, 1..8),
            message_bytes_max in 0..400usize,
        ) {
            let (mut stream, _) = encode_plan(&plan, key);
            if !stream.is_empty() {
                let len = stream.len();
                for (at, flip) in mutations {
                    stream[at % len] ^= flip;
                }
            }
            let mut decoder = Decoder::new(message_bytes_max);
            drive(&mut decoder, &stream, &chunks, true);
        }

        #[test]
        fn random_bytes_never_panic_or_overrun(
            stream in proptest::collection::vec(any::<u8>(), 0..300),
            chunks in proptest::collection::vec(1..64usize, 1..8),
            message_bytes_max in 0..400usize,
        ) {
            let mut decoder = Decoder::new(message_bytes_max);
            drive(&mut decoder, &stream, &chunks, true);
            // Also straight through FrameHeader::parse, every suffix.
            for start in 0..stream.len() {
                if let Ok(Some((_, used))) = FrameHeader::parse(&stream[start..]) {
                    prop_assert!(used <= stream.len() - start);
                }
            }
        }
    }
}
