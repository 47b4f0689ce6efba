//! One connection to Redis on the loop's poll: a non-blocking socket the loop owns
//! ([`crate::net::outbound`]), an output buffer written until `WouldBlock`, and an input buffer
//! parsed into replies. It knows RESP, not what the replies mean.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use super::resp::{self, RespError, Value};
use crate::net::{Ctx, OutboundId};

/// Bytes read per `read` call.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Unparsed input kept at most (a reply larger than this is a broken link). Catch-up replies
/// are chunked far below it.
pub const INPUT_BYTES_MAX: usize = 2 * resp::BULK_BYTES_MAX;
/// Commands queued but not yet written, at most; past it the engine refuses new writes
/// (`unavailable`) until the link drains.
pub const OUTPUT_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Why a link ended.
#[derive(Debug)]
pub enum LinkError {
    Io(io::Error),
    Closed,
    Protocol(RespError),
    InputTooLarge,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Closed => write!(f, "connection closed by Redis"),
            LinkError::Protocol(e) => write!(f, "protocol error: {e}"),
            LinkError::InputTooLarge => write!(f, "reply over {INPUT_BYTES_MAX} bytes"),
        }
    }
}

pub struct Link {
    id: OutboundId,
    output: Vec<u8>,
    input: Vec<u8>,
    /// Bytes of `input` already parsed and handed out.
    parsed: usize,
    connected: bool,
}

impl Link {
    pub fn connect(cx: &mut Ctx<'_>, addr: SocketAddr) -> io::Result<Link> {
        let id = cx.connect(addr)?;
        Ok(Link {
            id,
            output: Vec::new(),
            input: Vec::new(),
            parsed: 0,
            connected: false,
        })
    }

    pub fn id(&self) -> OutboundId {
        self.id
    }

    /// Whether the TCP connect completed (a first writable event without error).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Queues a command; it is written by [`Link::flush`].
    pub fn command<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        resp::encode(&mut self.output, args);
    }

    pub fn output_len(&self) -> usize {
        self.output.len()
    }

    /// Writes queued commands until done or `WouldBlock`.
    pub fn flush(&mut self, cx: &mut Ctx<'_>) -> Result<(), LinkError> {
        if self.output.is_empty() {
            return Ok(());
        }
        let Some(stream) = cx.outbound(self.id) else {
            return Err(LinkError::Closed);
        };
        let mut written = 0;
        while written < self.output.len() {
            match stream.write(&self.output[written..]) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => {
                    written += n;
                    self.connected = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Still connecting: the writable event will come.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => return Err(LinkError::Io(e)),
            }
        }
        self.output.drain(..written);
        Ok(())
    }

    /// Handles readiness: checks a pending connect, writes, reads everything available and
    /// appends each whole reply to `replies`.
    pub fn on_ready(
        &mut self,
        cx: &mut Ctx<'_>,
        writable: bool,
        replies: &mut Vec<Value>,
    ) -> Result<(), LinkError> {
        let Some(stream) = cx.outbound(self.id) else {
            return Err(LinkError::Closed);
        };
        if let Ok(Some(e)) = stream.take_error() {
            return Err(LinkError::Io(e));
        }
        if writable && !self.connected {
            match stream.peer_addr() {
                Ok(_) => self.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(LinkError::Io(e)),
            }
        }
        self.flush(cx)?;
        self.read(cx, replies)
    }

    fn read(&mut self, cx: &mut Ctx<'_>, replies: &mut Vec<Value>) -> Result<(), LinkError> {
        let Some(stream) = cx.outbound(self.id) else {
            return Err(LinkError::Closed);
        };
        loop {
            if self.input.len() > INPUT_BYTES_MAX {
                return Err(LinkError::InputTooLarge);
            }
            let start = self.input.len();
            self.input.resize(start + READ_CHUNK_BYTES, 0);
            let result = stream.read(&mut self.input[start..]);
            let n = match result {
                Ok(n) => n,
                Err(e) => {
                    self.input.truncate(start);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::NotConnected => break,
                        _ => return Err(LinkError::Io(e)),
                    }
                }
            };
            self.input.truncate(start + n);
            if n == 0 {
                return Err(LinkError::Closed);
            }
            self.connected = true;
        }
        while let Some((value, used)) =
            resp::parse(&self.input[self.parsed..]).map_err(LinkError::Protocol)?
        {
            self.parsed += used;
            replies.push(value);
        }
        if self.parsed > 0 {
            self.input.drain(..self.parsed);
            self.parsed = 0;
        }
        if self.input.capacity() > 4 * READ_CHUNK_BYTES && self.input.len() < READ_CHUNK_BYTES {
            self.input.shrink_to(READ_CHUNK_BYTES);
        }
        Ok(())
    }

    pub fn close(self, cx: &mut Ctx<'_>) {
        cx.disconnect(self.id);
    }
}
