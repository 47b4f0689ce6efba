//! A connection's bounded queue of outgoing frames, and [`Frame`], the shared bytes it holds.
//!
//! Frames are shared and immutable: a broadcast frame is built once and each subscriber's queue
//! holds a clone of the handle, which is a refcount bump, never a copy. A frame may also carry a
//! compressed twin, built lazily at most once, the first time it is queued to a connection that
//! takes compressed frames (see [`Frame::compressible`]); every such connection then gets a handle
//! to that one twin. The queue itself never refuses a frame: its owner (the event loop) compares
//! [`SendQueue::bytes`] and [`SendQueue::len`] with the configured marks and decides between
//! backpressure, conflation and close.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::ops::Deref;
use std::rc::Rc;

/// Builds the compressed twin of a frame's bytes: `None` when compressing does not pay. The
/// transport does not know the encoding (the WebSocket layer provides it: permessage-deflate).
pub type Compress = fn(&[u8]) -> Option<Compressed>;

/// A frame's compressed twin.
#[derive(Debug)]
pub struct Compressed {
    /// The frame bytes as compressed.
    pub bytes: Vec<u8>,
    /// The peer's decompression window this twin needs: a connection with a smaller one gets the
    /// plain frame.
    pub window_bytes: usize,
}

/// One complete frame (or run of frames) of bytes on the wire, shared by every connection it is
/// queued to. Cloning is a refcount bump.
#[derive(Clone)]
pub struct Frame(Rc<Shared>);

struct Shared {
    bytes: Vec<u8>,
    /// How to build the compressed twin; `None` for bytes that have none (HTTP, control frames).
    compress: Option<Compress>,
    /// The twin, once asked for: `None` inside when compressing did not pay.
    twin: OnceCell<Option<(Frame, usize)>>,
}

impl Frame {
    /// Bytes that go out as they are to every connection.
    pub fn plain(bytes: Vec<u8>) -> Frame {
        Frame(Rc::new(Shared {
            bytes,
            compress: None,
            twin: OnceCell::new(),
        }))
    }

    /// Bytes with a compressed twin for the connections that take it, built by `compress` the
    /// first time one of them is sent this frame, and shared by all of them after that.
    pub fn compressible(bytes: Vec<u8>, compress: Compress) -> Frame {
        Frame(Rc::new(Shared {
            bytes,
            compress: Some(compress),
            twin: OnceCell::new(),
        }))
    }

    /// The handle to queue for a connection whose peer decompresses with a window of
    /// `window_bytes` (0: takes no compressed frames).
    pub fn for_window(&self, window_bytes: usize) -> &Frame {
        let Some(compress) = self.0.compress.filter(|_| window_bytes > 0) else {
            return self;
        };
        let twin = self.0.twin.get_or_init(|| {
            compress(&self.0.bytes).map(|c| (Frame::plain(c.bytes), c.window_bytes))
        });
        match twin {
            Some((twin, needed)) if *needed <= window_bytes => twin,
            _ => self,
        }
    }

    /// Whether the compressed twin has been built (for tests and metrics).
    pub fn has_twin(&self) -> bool {
        matches!(self.0.twin.get(), Some(Some(_)))
    }

    /// Handles to these bytes alive (for tests: a refcount, not a copy, per queue).
    pub fn handles(&self) -> usize {
        Rc::strong_count(&self.0)
    }
}

impl Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("bytes", &self.0.bytes.len())
            .field("compressible", &self.0.compress.is_some())
            .finish()
    }
}

impl From<Vec<u8>> for Frame {
    fn from(bytes: Vec<u8>) -> Frame {
        Frame::plain(bytes)
    }
}

impl From<&[u8]> for Frame {
    fn from(bytes: &[u8]) -> Frame {
        Frame::plain(bytes.to_vec())
    }
}

/// How many buffers one vectored write gathers (Linux's IOV_MAX is 1024; 64 already covers a
/// whole iteration's worth of updates for one subscriber in practice).
pub const IOVECS_PER_WRITE_MAX: usize = 64;

/// A drained queue keeps the storage of its frames behind the head for the next burst (a
/// subscriber under a steady stream of updates would otherwise re-grow it on every loop turn),
/// unless a burst grew it past this many slots (1 KiB): a queue that held a big backlog once
/// does not keep its size for ever.
const RETAINED_SLOTS_MAX: usize = 64;

/// A connection's outgoing frames, oldest first.
///
/// The oldest frame sits in an inline slot, so a queue of one frame (the common case: one
/// update per subscriber per loop turn, or one reply) needs no heap, and writing it needs no
/// iovec array. Frames behind it go to `rest`, allocated the first time a second frame is
/// queued and kept once drained (up to [`RETAINED_SLOTS_MAX`] slots), so a connection that gets
/// bursts does not allocate per burst either; [`SendQueue::release_spare`] gives it back when
/// the connection has gone quiet (the event loop calls it from the connection's timer), so
/// idle connections hold no heap.
#[derive(Default)]
pub struct SendQueue {
    /// The oldest frame, the one being written.
    /// INVARIANT: `None` only while `rest` is empty (or absent).
    head: Option<Frame>,
    /// Frames behind `head`, oldest first. Boxed on purpose: one word instead of a
    /// `VecDeque`'s four in every connection, idle or not, for one more allocation in the rare
    /// queue that ever holds two frames (and that allocation is kept with the storage).
    #[allow(clippy::box_collection)]
    rest: Option<Box<VecDeque<Frame>>>,
    /// Bytes of `head` already written.
    /// INVARIANT: `head_written < head.len()` whenever `head` is `Some`.
    head_written: u32,
    /// Unsent bytes over all frames.
    bytes: usize,
}

/// Bytes of one idle connection's queue: the head slot, the pointer to the rest, the head's
/// written bytes and the byte count (48 while every frame lived in an inline `VecDeque`).
pub const SEND_QUEUE_BYTES_MAX: usize = 32;
const _: () = assert!(std::mem::size_of::<SendQueue>() <= SEND_QUEUE_BYTES_MAX);

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
        match self.head {
            None => self.head = Some(frame),
            Some(_) => self.rest.get_or_insert_with(Box::default).push_back(frame),
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        match self.head {
            None => 0,
            Some(_) => 1 + self.rest.as_ref().map_or(0, |rest| rest.len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Whether the queue holds heap storage for frames behind the head (for tests and memory
    /// accounting).
    pub fn holds_storage(&self) -> bool {
        self.rest.is_some()
    }

    /// Gives back the storage kept for frames behind the head, if the queue is empty: the
    /// connection went quiet since its last burst.
    pub fn release_spare(&mut self) {
        if self.head.is_none() {
            self.rest = None;
        }
    }

    pub fn clear(&mut self) {
        self.head = None;
        self.rest = None;
        self.head_written = 0;
        self.bytes = 0;
    }

    /// Writes queued frames until the queue is empty, the writer would block, or
    /// `budget_bytes` have been written: a single frame with one plain write, several with
    /// vectored writes. Returns the bytes written and the outcome.
    pub fn write_to<W: Write>(
        &mut self,
        writer: &mut W,
        budget_bytes: usize,
    ) -> io::Result<(usize, Flushed)> {
        let mut written_total = 0;
        while let Some(head) = &self.head {
            if written_total >= budget_bytes {
                return Ok((written_total, Flushed::Budget));
            }
            let unwritten = &head[self.head_written as usize..];
            let result = match self.rest.as_deref().filter(|rest| !rest.is_empty()) {
                None => writer.write(unwritten),
                Some(rest) => {
                    let mut slices: [IoSlice<'_>; IOVECS_PER_WRITE_MAX] =
                        [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
                    slices[0] = IoSlice::new(unwritten);
                    let mut count = 1;
                    for (slice, frame) in slices[1..].iter_mut().zip(rest.iter()) {
                        *slice = IoSlice::new(frame);
                        count += 1;
                    }
                    writer.write_vectored(&slices[..count])
                }
            };
            let written = match result {
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
        if self
            .rest
            .as_ref()
            .is_some_and(|rest| rest.capacity() > RETAINED_SLOTS_MAX)
        {
            self.rest = None;
        }
        Ok((written_total, Flushed::All))
    }

    fn consume(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let head = self
                .head
                .as_ref()
                .expect("the writer wrote no more than was queued");
            let head_left = head.len() - self.head_written as usize;
            if written >= head_left {
                written -= head_left;
                self.head = self.rest.as_mut().and_then(|rest| rest.pop_front());
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
            q.push(Frame::from(f));
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

    /// A writer that takes everything and counts its calls.
    #[derive(Default)]
    struct Sink {
        out: Vec<u8>,
        writes: usize,
        vectored_writes: usize,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.vectored_writes += 1;
            let before = self.out.len();
            for b in bufs {
                self.out.extend_from_slice(b);
            }
            Ok(self.out.len() - before)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_frame_at_a_time_needs_no_storage_and_one_plain_write() {
        let mut q = SendQueue::default();
        let mut sink = Sink::default();
        for round in 0..10u8 {
            q.push(Frame::from(vec![round; 5]));
            assert_eq!((q.len(), q.bytes()), (1, 5));
            assert!(!q.holds_storage(), "one frame sits in the inline slot");
            assert_eq!(
                q.write_to(&mut sink, usize::MAX).unwrap(),
                (5, Flushed::All)
            );
            assert!(q.is_empty() && !q.holds_storage());
        }
        assert_eq!((sink.writes, sink.vectored_writes), (10, 0));
    }

    #[test]
    fn burst_storage_is_kept_until_released_unless_it_grew_large() {
        let mut q = SendQueue::default();
        let mut sink = Sink::default();
        for _ in 0..3 {
            q.push(Frame::from(vec![1u8; 3]));
        }
        assert_eq!(q.len(), 3);
        assert!(q.holds_storage());
        assert_eq!(
            q.write_to(&mut sink, usize::MAX).unwrap(),
            (9, Flushed::All)
        );
        assert_eq!(sink.vectored_writes, 1, "three frames, one vectored write");
        assert!(q.holds_storage(), "kept for the next burst");
        q.push(Frame::from(vec![2u8; 3]));
        q.release_spare();
        assert!(q.holds_storage(), "not while frames are queued");
        q.write_to(&mut sink, usize::MAX).unwrap();
        q.release_spare();
        assert!(!q.holds_storage(), "given back once quiet");
        for _ in 0..RETAINED_SLOTS_MAX + 2 {
            q.push(Frame::from(vec![3u8; 3]));
        }
        while q.write_to(&mut sink, usize::MAX).unwrap().1 != Flushed::All {}
        assert!(!q.holds_storage(), "a big backlog's storage is not kept");
        assert_eq!(sink.out.len(), 3 * (RETAINED_SLOTS_MAX + 6));
    }

    #[test]
    fn clear_drops_every_frame_and_its_storage() {
        let (mut q, _) = frames(10);
        q.clear();
        assert_eq!((q.len(), q.bytes(), q.holds_storage()), (0, 0, false));
        assert!(q.is_empty());
    }

    #[test]
    fn shared_frame_is_not_copied_per_queue() {
        let frame = Frame::from(vec![1u8, 2, 3]);
        let mut queues: Vec<SendQueue> = (0..10).map(|_| SendQueue::default()).collect();
        for q in &mut queues {
            q.push(frame.clone());
        }
        assert_eq!(frame.handles(), 11);
    }

    thread_local! {
        static COMPRESSIONS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// A stand-in encoding: halves the bytes; needs a window as long as the input.
    fn halve(bytes: &[u8]) -> Option<Compressed> {
        COMPRESSIONS.with(|c| c.set(c.get() + 1));
        (bytes.len() > 1).then(|| Compressed {
            bytes: bytes[..bytes.len() / 2].to_vec(),
            window_bytes: bytes.len(),
        })
    }

    #[test]
    fn compressed_twin_is_built_once_and_shared() {
        let frame = Frame::compressible(vec![7u8; 100], halve);
        let mut plain = SendQueue::default();
        let mut compressed: Vec<SendQueue> = (0..10).map(|_| SendQueue::default()).collect();
        COMPRESSIONS.with(|c| c.set(0));
        plain.push(frame.for_window(0).clone());
        assert!(!frame.has_twin(), "no compressing for a plain connection");
        for q in &mut compressed {
            q.push(frame.for_window(1 << 15).clone());
        }
        assert_eq!(COMPRESSIONS.with(|c| c.get()), 1);
        assert_eq!(plain.bytes(), 100);
        assert!(compressed.iter().all(|q| q.bytes() == 50));
        let twin = frame.for_window(1 << 15);
        assert_eq!(
            twin.handles(),
            11,
            "one twin: its own handle and one per queue"
        );
        // A window too small for the twin gets the plain frame.
        assert_eq!(frame.for_window(64).len(), 100);
        // Compressing that does not pay is remembered too.
        let tiny = Frame::compressible(vec![1u8], halve);
        assert_eq!(tiny.for_window(1 << 15).len(), 1);
        assert_eq!(tiny.for_window(1 << 15).len(), 1);
        assert_eq!(COMPRESSIONS.with(|c| c.get()), 2);
        assert_eq!(Frame::from(&b"abc"[..]).for_window(1 << 15).len(), 3);
    }
}
