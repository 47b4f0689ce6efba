//! Every limit and tunable of the server in one place, validated once at start.
//!
//! Units go last in names (`_bytes`, `_ms`, `_max`). Each queue's doc says what happens at its
//! limit: backpressure, conflation or close.

use std::fmt;

/// The shared read buffer each loop reads into; per-connection buffers exist only while a partial
/// frame or request is pending.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections per process; above it new sockets are closed at once and counted.
    pub connections_max: usize,
    /// Open connections per client IP; above it new sockets from that IP are closed and counted.
    /// The default equals the total limit: behind a load balancer or a NAT many clients share
    /// one address, so a tighter default would refuse legitimate traffic; internet-facing
    /// servers should set it (`--max-connections-per-ip`).
    pub connections_per_ip_max: usize,
    /// Unconsumed input held for one connection (a partial frame or request). Past it the
    /// connection is closed: the protocol layers refuse larger messages before this is reached.
    pub read_buffer_bytes_max: usize,
    /// Unsent bytes above which a connection is "full": broadcasts to it are conflated (only the
    /// newest state per SKU is kept) and reading from it pauses.
    pub send_queue_high_bytes: usize,
    /// Unsent bytes below which a full connection is "drained" again.
    pub send_queue_low_bytes: usize,
    /// Hard limit on unsent bytes already queued when another frame is added: past it the
    /// connection is closed (WebSocket 1008). One large reply alone never trips it.
    pub send_queue_bytes_max: usize,
    /// Hard limit on queued frames, the same way.
    pub send_queue_frames_max: usize,
    /// Bytes written to one connection per flush before others get their turn.
    pub flush_bytes_per_turn_max: usize,
    /// SO_SNDBUF for accepted sockets (the kernel doubles it); 0 keeps the kernel's
    /// autotuning, which lets a stalled client park up to `tcp_wmem` max (4 MiB by default) in
    /// kernel memory before `send_queue_high_bytes` and conflation ever engage.
    pub socket_send_buffer_bytes: usize,
    /// How long a closing connection may take to drain and say goodbye before it is cut.
    pub close_linger_ms: u64,
    /// After SIGINT/SIGTERM, how long to wait for connections to close before exiting anyway.
    pub shutdown_grace_ms: u64,
    /// A connection must complete its first HTTP request (or WebSocket upgrade) within this.
    pub handshake_timeout_ms: u64,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// Server WebSocket ping interval (0 = no pings).
    pub ping_interval_ms: u64,
    /// Largest WebSocket message accepted (all fragments; inflated size when compressed); larger
    /// ones are closed with 1009.
    pub ws_message_bytes_max: usize,
    /// Accept permessage-deflate offers (RFC 7692); off declines every offer.
    pub ws_compression: bool,
    /// HTTP request head limits (431 past them) and body limit (413 past it).
    pub http_headers_max: usize,
    pub http_head_bytes_max: usize,
    pub http_body_bytes_max: usize,
    /// `--trusted-proxy`: peers whose `X-Forwarded-For` names the client (per-IP limits, logs).
    /// Their own connections are not refused per IP at accept; each is counted against the
    /// client its request head names.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 100_000,
            connections_per_ip_max: 100_000,
            read_buffer_bytes_max: 1024 * 1024 + 64 * 1024,
            send_queue_high_bytes: 256 * 1024,
            send_queue_low_bytes: 64 * 1024,
            send_queue_bytes_max: 4 * 1024 * 1024,
            send_queue_frames_max: 64 * 1024,
            flush_bytes_per_turn_max: 256 * 1024,
            socket_send_buffer_bytes: 128 * 1024,
            close_linger_ms: 3_000,
            shutdown_grace_ms: 5_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            ping_interval_ms: 25_000,
            ws_message_bytes_max: 1024 * 1024,
            ws_compression: true,
            http_headers_max: 32,
            http_head_bytes_max: 8 * 1024,
            http_body_bytes_max: 1024 * 1024,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct LimitError(pub String);

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitError {}

impl Limits {
    /// Checks the relations between limits once, at start.
    pub fn validate(&self) -> Result<(), LimitError> {
        let fail = |s: &str| Err(LimitError(s.to_string()));
        if self.connections_max == 0 || self.connections_per_ip_max == 0 {
            return fail("connection limits must be at least 1");
        }
        if self.send_queue_low_bytes > self.send_queue_high_bytes {
            return fail("send queue low mark must not exceed the high mark");
        }
        if self.send_queue_high_bytes > self.send_queue_bytes_max {
            return fail("send queue high mark must not exceed the hard limit");
        }
        if self.send_queue_frames_max == 0 {
            return fail("send queue frame limit must be at least 1");
        }
        // Each connection's decoder keeps the limit in 32 bits (`ws::Decoder`).
        if self.ws_message_bytes_max > u32::MAX as usize {
            return fail("WebSocket message limit must be below 4 GiB");
        }
        // A whole maximum-size message plus a frame header must fit in the read buffer, or a
        // legal message could never be decoded (compressed, it may be a little longer).
        let ws_payload_bytes_max = if self.ws_compression {
            crate::ws::deflate::compressed_bytes_max(self.ws_message_bytes_max)
        } else {
            self.ws_message_bytes_max
        };
        if self.read_buffer_bytes_max < ws_payload_bytes_max + 14 {
            return fail("read buffer must hold the largest WebSocket message plus its header");
        }
        if self.read_buffer_bytes_max < self.http_head_bytes_max + self.http_body_bytes_max {
            return fail("read buffer must hold the largest HTTP request head plus body");
        }
        if self.handshake_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return fail("timeouts must be positive");
        }
        if self.http_headers_max == 0 || self.http_headers_max > 64 {
            return fail("http header count limit must be within 1..=64");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_consistent() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn inverted_marks_are_refused() {
        let limits = Limits {
            send_queue_low_bytes: 10,
            send_queue_high_bytes: 5,
            ..Default::default()
        };
        assert!(limits.validate().is_err());
        let limits = Limits {
            ws_message_bytes_max: 10 << 20,
            ..Default::default()
        };
        assert!(limits.validate().is_err());
    }

    #[test]
    fn a_message_limit_past_32_bits_is_refused() {
        let bytes = u32::MAX as usize + 1;
        let limits = Limits {
            ws_message_bytes_max: bytes,
            ws_compression: false,
            read_buffer_bytes_max: bytes + (1 << 20),
            ..Default::default()
        };
        assert!(limits.validate().is_err());
        let fits = Limits {
            ws_message_bytes_max: bytes - 1,
            ..limits
        };
        assert_eq!(fits.validate(), Ok(()));
    }
}
