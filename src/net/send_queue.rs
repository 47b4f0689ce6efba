//! A connection's bounded queue of outgoing frames.
//!
//! Frames are shared, immutable byte slices (`Rc<[u8]>`): a broadcast frame is built once and each
//! subscriber's queue holds a clone of the handle, which is a refcount bump, never a copy.
//! The queue itself never refuses a frame: its owner (the event loop) compares [`SendQueue::bytes`]
//! and [`SendQueue::len`] with the configured marks and decides between backpressure, conflation
//! and close.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

/// One complete frame of bytes on the wire, shared by every connection it is queued to.
pub type Frame = Rc<[u8]>;

/// How many buffers one vectored write gathers (Linux's IOV_MAX is 1024; 64 already covers a
/// whole iteration's worth of updates for one subscriber in practice).
pub const IOVECS_PER_WRITE_MAX: usize = 64;

/// A drained queue keeps its storage for the next burst if a burst of more than
/// `LIGHT_USE_FRAMES_MAX` frames needed it (a subscriber under a steady stream of updates would
/// otherwise re-grow its queue on every loop turn) and up to this many slots (1 KiB).
const RETAINED_SLOTS_MAX: usize = 64;

/// A queue that never held more than this many frames since it last drained (a reply now and
/// then) gives its storage back, so idle connections hold none.
const LIGHT_USE_FRAMES_MAX: u32 = 2;

#[derive(Default)]
pub struct SendQueue {
    frames: VecDeque<Frame>,
    /// Bytes of `frames[0]` already written.
    /// INVARIANT: `head_written < frames[0].len()` whenever `frames` is non-empty.
    head_written: u32,
    /// Most frames held at once since the queue last drained.
    peak_frames: u32,
    /// Unsent bytes over all frames.
    bytes: usize,
}

/// What one call to [`SendQueue::write_to`] achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued reached the socket.
    All,
    /// The socket would block: wait for WRITABLE.
    WouldBlock,
    /// The per-call byte budget ran out with data left: come back next iteration.
    Budget,
}

impl SendQueue {
    pub fn push(&mut self, frame: Frame) {
        if frame.is_empty() {
            return;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        self.peak_frames = self.peak_frames.max(self.frames.len() as u32);
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn clear(&mut self) {
        self.frames = VecDeque::new();
        self.head_written = 0;
        self.bytes = 0;
    }

    /// Writes queued frames with vectored writes until the queue is empty, the writer would
    /// block, or `budget_bytes` have been written. Returns the bytes written and the outcome.
    pub fn write_to<W: Write>(
        &mut self,
        writer: &mut W,
        budget_bytes: usize,
    ) -> io::Result<(usize, Flushed)> {
        let mut written_total = 0;
        while !self.frames.is_empty() {
            if written_total >= budget_bytes {
                return Ok((written_total, Flushed::Budget));
            }
            let mut slices: [IoSlice<'_>; IOVECS_PER_WRITE_MAX] =
                [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
            let mut count = 0;
            for (i, frame) in self.frames.iter().take(IOVECS_PER_WRITE_MAX).enumerate() {
                let start = if i == 0 {
                    self.head_written as usize
                } else {
                    0
                };
                slices[i] = IoSlice::new(&frame[start..]);
                count += 1;
            }
            let written = match writer.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((written_total, Flushed::WouldBlock))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            written_total += written;
            self.consume(written);
        }
        if self.peak_frames <= LIGHT_USE_FRAMES_MAX || self.frames.capacity() > RETAINED_SLOTS_MAX {
            self.frames = VecDeque::new();
        }
        self.peak_frames = 0;
        Ok((written_total, Flushed::All))
    }

    fn consume(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let head_left = self.frames[0].len() - self.head_written as usize;
            if written >= head_left {
                written -= head_left;
                self.frames.pop_front();
                self.head_written = 0;
            } else {
                // A frame is far smaller than 4 GiB (frames are capped by the message limit).
                self.head_written += written as u32;
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `chunk` bytes per call and would-blocks after `limit`.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
        limit: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let room = self.limit - self.out.len();
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                for &byte in b.iter() {
                    if n == self.chunk || n == room {
                        self.out.extend_from_slice(&[]);
                        return Ok(n);
                    }
                    self.out.push(byte);
                    n += 1;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frames(n: usize) -> (SendQueue, Vec<u8>) {
        let mut q = SendQueue::default();
        let mut expected = Vec::new();
        for i in 0..n {
            let f: Vec<u8> = (0..(i % 7 + 1)).map(|j| (i * 31 + j) as u8).collect();
            expected.extend_from_slice(&f);
            q.push(Rc::from(f));
        }
        (q, expected)
    }

    #[test]
    fn partial_writes_resume_mid_frame_in_order() {
        for chunk in [1, 2, 3, 5, 64, 1000] {
            let (mut q, expected) = frames(200);
            let mut w = Trickle {
                out: Vec::new(),
                chunk,
                limit: usize::MAX,
            };
            let (n, outcome) = q.write_to(&mut w, usize::MAX).unwrap();
            assert_eq!(outcome, Flushed::All);
            assert_eq!(n, expected.len());
            assert_eq!(w.out, expected, "chunk {chunk}");
            assert_eq!(q.bytes(), 0);
            assert!(q.is_empty());
        }
    }

    #[test]
    fn would_block_keeps_the_rest_and_its_byte_count() {
        let (mut q, expected) = frames(50);
        let mut w = Trickle {
            out: Vec::new(),
            chunk: 3,
            limit: 17,
        };
        let (n, outcome) = q.write_to(&mut w, usize::MAX).unwrap();
        assert_eq!((n, outcome), (17, Flushed::WouldBlock));
        assert_eq!(q.bytes(), expected.len() - 17);
        w.limit = usize::MAX;
        q.write_to(&mut w, usize::MAX).unwrap();
        assert_eq!(w.out, expected);
    }

    #[test]
    fn budget_stops_early_and_later_calls_continue() {
        let (mut q, expected) = frames(100);
        let mut w = Trickle {
            out: Vec::new(),
            chunk: 10,
            limit: usize::MAX,
        };
        let (_, outcome) = q.write_to(&mut w, 25).unwrap();
        assert_eq!(outcome, Flushed::Budget);
        assert!(q.bytes() > 0);
        while q.write_to(&mut w, 25).unwrap().1 == Flushed::Budget {}
        assert_eq!(w.out, expected);
    }

    #[test]
    fn shared_frame_is_not_copied_per_queue() {
        let frame: Frame = Rc::from(vec![1u8, 2, 3]);
        let mut queues: Vec<SendQueue> = (0..10).map(|_| SendQueue::default()).collect();
        for q in &mut queues {
            q.push(frame.clone());
        }
        assert_eq!(Rc::strong_count(&frame), 11);
    }
}
