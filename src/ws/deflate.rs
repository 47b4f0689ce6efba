//! permessage-deflate (RFC 7692 §7.2): compressing server frames once, inflating client messages
//! within the message size limit.
//!
//! # Contract
//!
//! - [`compress_frames`] takes complete, final, unmasked server frames back to back (one frame, or
//!   a run of them) and returns the same run with each data frame worth compressing replaced by
//!   its compressed form (RSV1 set), or `None` when no frame in it is worth it. Every message is
//!   compressed on its own and the compressor is reset after it (`server_no_context_takeover` is
//!   always negotiated, see [`super::extensions`]), so the result can go to any number of
//!   connections. A frame stays as it is when its payload is shorter than
//!   [`COMPRESS_PAYLOAD_BYTES_MIN`] or when deflate does not make it smaller.
//! - [`Inflate`] inflates one client message, fragment by fragment, appending the RFC 7692 §7.2.2
//!   tail at the end, and hands the output over in chunks of at most [`INFLATE_CHUNK_BYTES`] to a
//!   sink that enforces the size limit: its error stops inflating at once, so a zip bomb costs at
//!   most the limit (plus the thread's one chunk buffer) whatever its compressed size.
//!
//! One compressor and one spare inflater are kept per thread (the event loop's), reset between
//! messages: no connection owns deflate state while it is idle.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::{self, FrameHeader, OpCode};

/// Payloads shorter than this go uncompressed. Measured (docs/BENCHMARKS.md, "Compression"): a
/// `stock_update` of 90-250 bytes deflated on its own saves 5-15 % for about 4 µs of CPU per
/// message, and every client then pays an inflate per message for those few bytes; from 256
/// bytes on, JSON replies shrink by a third or more.
pub const COMPRESS_PAYLOAD_BYTES_MIN: usize = 256;

/// zlib level 1-9. Level 1 is several times faster than the default 6 on our JSON and only a few
/// per cent bigger (docs/BENCHMARKS.md, "Compression").
pub const COMPRESSION_LEVEL: u32 = 1;

/// The window flate2 compresses with (raw deflate, RFC 1951's 32 KiB): what a client with the
/// default `server_max_window_bits` (15) decompresses with.
pub const COMPRESSOR_WINDOW_BITS: u32 = 15;

/// The empty stored block that ends a sync flush: stripped from each compressed message by the
/// sender and appended again by the receiver (RFC 7692 §7.2.1, §7.2.2).
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Output is inflated through a buffer of this size (one per thread) before it joins the message,
/// so the message buffer grows only by what was really produced.
pub const INFLATE_CHUNK_BYTES: usize = 8 * 1024;

/// Largest compressed payload a message of `inflated_bytes_max` bytes can need: deflate stores
/// data it cannot shrink in blocks of up to 65,535 bytes with 5 bytes of header each (RFC 1951
/// §3.2.4), so 1/8192 covers the headers with room to spare, and 64 bytes the block boundaries
/// a sender's flushes add.
pub const fn compressed_bytes_max(inflated_bytes_max: usize) -> usize {
    inflated_bytes_max
        .saturating_add(inflated_bytes_max / 8192)
        .saturating_add(64)
}

/// RSV1, the "Per-Message Compressed" bit (RFC 7692 §6).
pub const RSV1_BIT: u8 = 0x40;

thread_local! {
    /// The loop thread's compressor, reset after every message.
    static COMPRESSOR: RefCell<Compressor> = RefCell::new(Compressor::new());
    /// One inflater kept for the next compressed client message, so a message does not cost a
    /// fresh ~43 KiB allocation; it lives in a connection only while that message arrives.
    static SPARE_INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    /// Where output is inflated before it joins the message: allocated once per thread rather
    /// than zeroed on the stack for every fragment (a client sending 256-byte fragments would
    /// otherwise cost 8 KiB of memset each).
    static INFLATE_CHUNK: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; INFLATE_CHUNK_BYTES].into_boxed_slice());
}

struct Compressor {
    deflate: Compress,
    /// Compressed payload of the frame at hand; its capacity is kept for the next one.
    scratch: Vec<u8>,
}

impl Compressor {
    fn new() -> Self {
        Compressor {
            deflate: Compress::new(Compression::new(COMPRESSION_LEVEL), false),
            scratch: Vec::new(),
        }
    }

    /// `payload` deflated on its own, without the sync-flush tail, if that is shorter than it.
    fn compress(&mut self, payload: &[u8]) -> Option<&[u8]> {
        self.deflate.reset();
        self.scratch.clear();
        // Room for the payload's own length plus the tail: a result that does not fit is no
        // smaller than the payload, so it is not worth finishing.
        self.scratch.reserve(payload.len() + TAIL.len());
        let room = payload.len() + TAIL.len();
        let status = self
            .deflate
            .compress_vec(payload, &mut self.scratch, FlushCompress::Sync);
        let finished = matches!(status, Ok(Status::Ok))
            && self.deflate.total_in() == payload.len() as u64
            && self.scratch.len() < room;
        self.deflate.reset();
        if !finished || !self.scratch.ends_with(&TAIL) {
            return None;
        }
        let compressed = &self.scratch[..self.scratch.len() - TAIL.len()];
        (compressed.len() < payload.len()).then_some(compressed)
    }
}

/// A run of frames with its data messages compressed, and what a client needs to read it.
#[derive(Debug, PartialEq, Eq)]
pub struct CompressedRun {
    /// The frames, compressed ones with RSV1 set.
    pub bytes: Vec<u8>,
    /// How far back a back-reference in the run may reach: the longest compressed message, or
    /// the compressor's 32 KiB window if shorter. A client whose window (`server_max_window_bits`)
    /// is at least this can read the run.
    pub window_bytes: usize,
}

/// The run `frames` with every data message worth compressing compressed; `None` if none is.
///
/// `frames` must be complete, final, unmasked server frames without RSV bits (what
/// [`frame::encode`] and [`frame::FrameWriter`] make); anything else is left as it is.
pub fn compress_frames(frames: &[u8]) -> Option<CompressedRun> {
    COMPRESSOR.with(|compressor| {
        let mut compressor = compressor.borrow_mut();
        let mut out: Option<CompressedRun> = None;
        let mut at = 0;
        while at < frames.len() {
            let Ok(Some((header, header_bytes))) = FrameHeader::parse(&frames[at..]) else {
                debug_assert!(false, "not a run of server frames");
                return None;
            };
            let payload_len = usize::try_from(header.payload_len).ok()?;
            let end = at.checked_add(header_bytes)?.checked_add(payload_len)?;
            let payload = frames.get(at + header_bytes..end)?;
            let data = matches!(header.opcode, OpCode::Text | OpCode::Binary);
            let compressed = if data && header.fin && header.mask.is_none() {
                (payload.len() >= COMPRESS_PAYLOAD_BYTES_MIN)
                    .then(|| compressor.compress(payload))
                    .flatten()
            } else {
                None
            };
            match (compressed, &mut out) {
                (Some(compressed), out) => {
                    let run = out.get_or_insert_with(|| {
                        let mut bytes = Vec::with_capacity(frames.len());
                        bytes.extend_from_slice(&frames[..at]);
                        CompressedRun {
                            bytes,
                            window_bytes: 0,
                        }
                    });
                    let start = run.bytes.len();
                    frame::write_header(&mut run.bytes, true, header.opcode, compressed.len());
                    run.bytes[start] |= RSV1_BIT;
                    run.bytes.extend_from_slice(compressed);
                    // Back-references reach at most the message's start or the compressor's
                    // own window (2^15), whichever is nearer.
                    let reach = payload.len().min(1 << COMPRESSOR_WINDOW_BITS);
                    run.window_bytes = run.window_bytes.max(reach);
                }
                (None, Some(run)) => run.bytes.extend_from_slice(&frames[at..end]),
                (None, None) => {}
            }
            at = end;
        }
        out
    })
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// The inflated message would pass the limit; `bytes` is how far it got.
    TooBig {
        /// Inflated bytes the message would have with the chunk that passed the limit.
        bytes: u64,
    },
    /// Not a valid raw deflate stream (RFC 1951).
    Corrupt,
}

/// The inflater of one compressed client message: it exists from the message's first frame to its
/// last (see the module docs).
#[derive(Debug)]
pub struct Inflate {
    /// `None` once the stream has ended with a final block (BFINAL). Bytes after it are ignored,
    /// as zlib leaves them unused: RFC 7692 §7.2.3.4 has senders that end a message that way.
    raw: Option<Decompress>,
}

impl Inflate {
    /// Takes the thread's spare inflater, or makes one.
    pub fn start() -> Self {
        let raw = SPARE_INFLATER
            .with(|spare| spare.borrow_mut().take())
            .unwrap_or_else(|| Decompress::new(false));
        Inflate { raw: Some(raw) }
    }

    /// Inflates `input` (a fragment's payload), handing the output to `sink` in chunks of at most
    /// [`INFLATE_CHUNK_BYTES`]. The sink enforces the size limit: its error stops inflating.
    pub fn push(
        &mut self,
        input: &[u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<(), InflateError>,
    ) -> Result<(), InflateError> {
        INFLATE_CHUNK.with(|chunk| match chunk.try_borrow_mut() {
            Ok(mut chunk) => self.push_through(input, &mut chunk, sink),
            // Only if a sink inflated another message from inside this one: not our callers,
            // but correct anyway with a buffer of its own.
            Err(_) => self.push_through(input, &mut vec![0; INFLATE_CHUNK_BYTES], sink),
        })
    }

    fn push_through(
        &mut self,
        mut input: &[u8],
        chunk: &mut [u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<(), InflateError>,
    ) -> Result<(), InflateError> {
        while let Some(raw) = self.raw.as_mut() {
            let (in_before, out_before) = (raw.total_in(), raw.total_out());
            let status = raw
                .decompress(input, chunk, FlushDecompress::None)
                .map_err(|_| InflateError::Corrupt)?;
            // Both deltas are bounded by the slices just passed in.
            let consumed = (raw.total_in() - in_before) as usize;
            let written = (raw.total_out() - out_before) as usize;
            input = &input[consumed..];
            if written > 0 {
                sink(&chunk[..written])?;
            }
            if status == Status::StreamEnd {
                self.recycle();
                break;
            }
            // Done when the input is used up and the output did not fill the chunk (the inflater
            // has nothing more to give); no progress at all means it waits for more input.
            let full = written == chunk.len();
            if (input.is_empty() && !full) || (consumed == 0 && written == 0) {
                break;
            }
        }
        Ok(())
    }

    /// The end of the message: inflates the RFC 7692 §7.2.2 tail, then gives the inflater back
    /// for the next message (no context is kept: `client_no_context_takeover` is negotiated).
    pub fn finish(
        mut self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), InflateError>,
    ) -> Result<(), InflateError> {
        self.push(&TAIL, sink)?;
        self.recycle();
        Ok(())
    }

    fn recycle(&mut self) {
        if let Some(mut raw) = self.raw.take() {
            raw.reset(false);
            SPARE_INFLATER.with(|spare| *spare.borrow_mut() = Some(raw));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inflates `compressed` (one message, tail stripped) in pieces of `piece` bytes, refusing
    /// output past `max`.
    fn inflate(compressed: &[u8], piece: usize, max: usize) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        let mut sink = |bytes: &[u8]| {
            if out.len() + bytes.len() > max {
                return Err(InflateError::TooBig {
                    bytes: (out.len() + bytes.len()) as u64,
                });
            }
            out.extend_from_slice(bytes);
            Ok(())
        };
        let mut inflate = Inflate::start();
        for part in compressed.chunks(piece.max(1)) {
            inflate.push(part, &mut sink)?;
        }
        inflate.finish(&mut sink)?;
        Ok(out)
    }

    fn json(len: usize) -> Vec<u8> {
        let mut text = String::from("[");
        let mut i = 0;
        while text.len() < len {
            text.push_str(&format!(
                r#"{{"id":"sku-{i}","quantity":{},"on_hand":{},"reserved":0,"version":{}}},"#,
                i % 97,
                i % 89,
                i % 7
            ));
            i += 1;
        }
        text.truncate(len);
        text.into_bytes()
    }

    fn single(payload: &[u8]) -> Vec<u8> {
        frame::encode(OpCode::Text, payload)
    }

    /// Splits a run back into (rsv1, opcode, payload) per frame.
    fn frames_of(run: &[u8]) -> Vec<(bool, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < run.len() {
            let rsv1 = run[at] & RSV1_BIT != 0;
            let mut plain = run[at..].to_vec();
            plain[0] &= !RSV1_BIT;
            let (header, used) = FrameHeader::parse(&plain).unwrap().unwrap();
            let len = header.payload_len as usize;
            out.push((rsv1, header.opcode as u8, plain[used..used + len].to_vec()));
            at += used + len;
        }
        out
    }

    #[test]
    fn compressed_frames_inflate_back_at_every_split() {
        for len in [256, 300, 1000, 5000, 70_000, 200_000] {
            let payload = json(len);
            let run = compress_frames(&single(&payload)).expect("JSON compresses");
            let frames = frames_of(&run.bytes);
            assert_eq!(frames.len(), 1);
            let (rsv1, opcode, compressed) = &frames[0];
            assert!(*rsv1);
            assert_eq!(*opcode, OpCode::Text as u8);
            assert!(compressed.len() < payload.len() / 2, "{len}");
            assert_eq!(run.window_bytes, len.min(32 * 1024));
            for piece in [1, 7, 100, 4096, usize::MAX] {
                assert_eq!(
                    inflate(compressed, piece, len).unwrap(),
                    payload,
                    "{len}/{piece}"
                );
            }
        }
    }

    #[test]
    fn what_does_not_pay_stays_plain() {
        // Below the threshold, incompressible, control frames: nothing to do.
        assert_eq!(
            compress_frames(&single(&json(COMPRESS_PAYLOAD_BYTES_MIN - 1))),
            None
        );
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..4000)
            .map(|_| {
                // xorshift64: no structure deflate could use.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        assert_eq!(
            compress_frames(&frame::encode(OpCode::Binary, &noise)),
            None
        );
        assert_eq!(compress_frames(&frame::encode(OpCode::Ping, b"ping")), None);
        assert_eq!(compress_frames(&[]), None);
    }

    #[test]
    fn runs_compress_frame_by_frame_and_keep_the_rest() {
        let small = single(b"{\"type\":\"pong\"}");
        let big = json(3000);
        let mut run = small.clone();
        run.extend(single(&big));
        run.extend(frame::encode_close(1000, ""));
        run.extend(single(&big));
        let compressed = compress_frames(&run).unwrap();
        let frames = frames_of(&compressed.bytes);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0], (false, 1, b"{\"type\":\"pong\"}".to_vec()));
        assert!(frames[1].0 && frames[3].0);
        assert!(!frames[2].0);
        assert_eq!(frames[2].1, OpCode::Close as u8);
        for index in [1, 3] {
            assert_eq!(inflate(&frames[index].2, 1000, 3000).unwrap(), big);
        }
    }

    #[test]
    fn bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 10 * 1024 * 1024];
        let run = compress_frames(&frame::encode(OpCode::Binary, &zeros)).unwrap();
        let (_, _, compressed) = frames_of(&run.bytes).remove(0);
        assert!(compressed.len() < 50_000, "{}", compressed.len());
        let max = 64 * 1024;
        match inflate(&compressed, usize::MAX, max) {
            Err(InflateError::TooBig { bytes }) => {
                assert!(bytes > max as u64 && bytes <= (max + INFLATE_CHUNK_BYTES) as u64)
            }
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        // Exactly at the limit is fine.
        assert_eq!(
            inflate(&compressed, 4096, zeros.len()).unwrap().len(),
            zeros.len()
        );
    }

    #[test]
    fn corrupt_data_is_refused_and_what_follows_a_final_block_ignored() {
        // 0xff: BTYPE 11 is reserved (RFC 1951 §3.2.3).
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 10, 1000),
            Err(InflateError::Corrupt)
        );
        // A final stored block "hi", then bytes after it (zlib leaves them unused too).
        let final_block = [0x01, 0x02, 0x00, 0xfd, 0xff, b'h', b'i'];
        assert_eq!(inflate(&final_block, 100, 1000).unwrap(), b"hi");
        let mut trailing = final_block.to_vec();
        trailing.push(0x00);
        assert_eq!(inflate(&trailing, 1, 1000).unwrap(), b"hi");
    }

    #[test]
    fn rfc_7692_examples_inflate() {
        // §7.2.3.1: "Hello" compressed; §7.2.3.3: a stored block; §7.2.3.4: a final block
        // (BFINAL set) and a byte after it; §7.2.3.5: two deflate blocks.
        let cases: &[&[u8]] = &[
            &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
            &[
                0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
            ],
            &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
            &[
                0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
            ],
        ];
        for case in cases {
            for piece in 1..case.len() + 1 {
                assert_eq!(inflate(case, piece, 5).unwrap(), b"Hello", "{case:02x?}");
            }
            assert!(matches!(
                inflate(case, 3, 4),
                Err(InflateError::TooBig { .. })
            ));
        }
    }
}
