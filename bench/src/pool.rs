//! Opening many connections at a bounded number in flight, and routing readiness events to them.
//! A connection's mio token is its index in the `conns` vector, so lookup is an index, not a hash.

use crate::net::{self, CloseCounts, Conn, Phase, Target};
use crate::wire;
use mio::{Events, Interest, Poll, Token};
use std::time::{Duration, Instant};

/// Shared event-loop parts every scenario uses.
pub struct Looper {
    pub poll: Poll,
    pub events: Events,
    pub buf: Vec<u8>,
    pub closes: CloseCounts,
    /// `--deflate`: connections started from now on offer permessage-deflate.
    pub offer_deflate: bool,
    /// Connections the server agreed permessage-deflate with.
    pub deflate_negotiated: u64,
    pub inflater: wire::Inflater,
    /// Bytes read from every socket, as on the wire.
    pub bytes_read: u64,
}

impl Looper {
    pub fn new() -> Result<Looper, String> {
        Ok(Looper {
            poll: Poll::new().map_err(|error| format!("epoll: {error}"))?,
            events: Events::with_capacity(4096),
            buf: vec![0; net::READ_BUFFER_BYTES],
            closes: CloseCounts::default(),
            offer_deflate: false,
            deflate_negotiated: 0,
            inflater: wire::Inflater::default(),
            bytes_read: 0,
        })
    }

    /// The summary's `deflate` part: what was agreed and what came compressed.
    pub fn deflate_json(&self) -> serde_json::Value {
        serde_json::json!({
            "offered": self.offer_deflate,
            "negotiated": self.deflate_negotiated,
            "compressed_messages": self.inflater.messages,
            "compressed_bytes": self.inflater.compressed_bytes,
            "inflated_bytes": self.inflater.inflated_bytes,
        })
    }

    /// Waits up to `timeout` and pumps every ready connection. Returns how many were opened.
    pub fn turn<S>(
        &mut self,
        conns: &mut [Conn<S>],
        timeout: Duration,
        mut on_open: impl FnMut(&mut Conn<S>),
        mut on_text: impl FnMut(&mut S, &mut Vec<u8>, &[u8], Instant),
    ) -> usize {
        if let Err(error) = self.poll.poll(&mut self.events, Some(timeout)) {
            if error.kind() != std::io::ErrorKind::Interrupted {
                eprintln!("poll failed: {error}");
            }
            return 0;
        }
        let mut opened = 0;
        for event in self.events.iter() {
            let Some(conn) = conns.get_mut(event.token().0) else {
                continue;
            };
            let pumped = conn.pump(&mut self.buf, &mut self.inflater, &mut on_text);
            self.bytes_read += pumped.bytes_read;
            if pumped.opened {
                opened += 1;
                self.deflate_negotiated += u64::from(conn.deflate_negotiated());
                on_open(conn);
                if !conn.out.is_empty() && conn.flush().is_err() {
                    conn.phase = Phase::Closed;
                    self.closes.add(net::CloseReason::Dropped);
                }
            }
            if let Some(reason) = pumped.closed {
                self.closes.add(reason);
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
        }
        opened
    }

    /// Starts connection `index` of `target` (token = position in `conns`).
    pub fn start<S>(
        &mut self,
        conns: &mut Vec<Conn<S>>,
        target: &Target,
        index: usize,
        path: &str,
        state: S,
    ) -> bool {
        let stream = match net::connect(target.source(index), target.addr) {
            Ok(stream) => stream,
            Err(error) => {
                if self.closes.connect_failed == 0 {
                    eprintln!("connect from {}: {error}", target.source(index));
                }
                self.closes.add(net::CloseReason::ConnectFailed);
                return false;
            }
        };
        let mut conn = Conn::new(stream, &target.host(), path, self.offer_deflate, state);
        let token = Token(conns.len());
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(error) = self
            .poll
            .registry()
            .register(&mut conn.stream, token, interest)
        {
            eprintln!("register: {error}");
            self.closes.add(net::CloseReason::ConnectFailed);
            return false;
        }
        conns.push(conn);
        true
    }
}

/// The result of opening a group of connections.
pub struct Opened {
    pub open: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

impl Opened {
    pub fn rate_per_s(&self) -> f64 {
        self.open as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Opens `count` connections (source addresses round-robin from `first_index`), with at most
/// `in_flight_max` connects/handshakes outstanding, until all are open or failed or `deadline`.
#[allow(clippy::too_many_arguments)]
pub fn open_many<S>(
    looper: &mut Looper,
    conns: &mut Vec<Conn<S>>,
    target: &Target,
    first_index: usize,
    count: usize,
    in_flight_max: usize,
    deadline: Instant,
    label: &str,
    mut make: impl FnMut(usize) -> (String, S),
    mut on_open: impl FnMut(&mut Conn<S>),
    mut on_text: impl FnMut(&mut S, &mut Vec<u8>, &[u8], Instant),
) -> Opened {
    let started_at = Instant::now();
    let base = conns.len();
    let failed_before = looper.closes.total();
    let mut started = 0;
    let mut open = 0;
    let mut next_progress = started_at + Duration::from_secs(1);
    loop {
        let failed = (looper.closes.total() - failed_before) as usize;
        while started < count && started - open - failed.min(started - open) < in_flight_max {
            let (path, state) = make(started);
            looper.start(conns, target, first_index + started, &path, state);
            started += 1;
        }
        let failed = (looper.closes.total() - failed_before) as usize;
        if open + failed >= count || Instant::now() >= deadline {
            break;
        }
        open += looper.turn(
            &mut conns[..],
            Duration::from_millis(50),
            &mut on_open,
            &mut on_text,
        );
        let now = Instant::now();
        if now >= next_progress {
            eprintln!(
                "[{label}] opening: {open}/{count} open, {failed} failed, {:.1}s",
                (now - started_at).as_secs_f64()
            );
            next_progress += Duration::from_secs(1);
        }
    }
    let open_now = conns[base..]
        .iter()
        .filter(|conn| conn.phase == Phase::Open)
        .count();
    Opened {
        open: open_now,
        failed: count - open_now,
        elapsed: started_at.elapsed(),
    }
}
