//! Client connections on one mio event loop: bind-before-connect from a chosen 127.0.0.x source
//! address, the upgrade handshake, then frames.
//!
//! mio is edge-triggered: after a readiness event we must read until the kernel has nothing more,
//! or we are never woken again for those bytes. A read that does not fill the buffer means the
//! socket was drained at that instant (new data raises a new edge), so `pump` reads again only
//! when a read filled the whole buffer. All connections share one big read buffer; a connection
//! keeps bytes of its own (`pending_in`) only while a partial frame or response head exists.
//!
//! With `--deflate` a connection offers permessage-deflate; a compressed (RSV1) text message is
//! inflated before `on_text` sees it, through one inflater the loop shares when the server resets
//! its compressor per message (`server_no_context_takeover`, what stocksync always answers), else
//! through the connection's own. A plain frame costs one bit test more than before. The server
//! does not fragment its messages, so a compressed message is one frame (FIN set).

use crate::wire::{self, NextFrame, ResponseHead};
use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// Bytes asked for in one read; large enough for hundreds of small frames.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Where to connect and what to ask for.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Source addresses 127.0.0.{first}..=127.0.0.{first + count - 1}: each gives ~28k ephemeral
    /// ports (net.ipv4.ip_local_port_range), and many servers also limit connections per IP.
    pub source_first: u8,
    pub source_count: u8,
}

impl Target {
    /// The source address for the `index`-th connection (round-robin).
    pub fn source(&self, index: usize) -> Ipv4Addr {
        let offset = (index % usize::from(self.source_count.max(1))) as u8;
        Ipv4Addr::new(127, 0, 0, self.source_first.saturating_add(offset))
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// `--tls`: every connection speaks TLS (wss://). Set once, before any connection is made.
static TLS: OnceLock<Arc<ClientConfig>> = OnceLock::new();

/// Makes every later connection a TLS one. The certificate is not verified: this is a load tool
/// pointed at your own server (self-signed certificates included), and verification is a cost
/// of the client, not of the server under test.
pub fn enable_tls() {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AcceptAnyCertificate(provider.clone()));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let _ = TLS.set(Arc::new(config));
}

#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // Signatures are still checked: the handshake does the same work a real client's does.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Starts a non-blocking connect from `source` (port chosen by the kernel at bind).
pub fn connect(source: Ipv4Addr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    bind_address_no_port(&socket);
    socket.bind(&SocketAddr::new(source.into(), 0).into())?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// IP_BIND_ADDRESS_NO_PORT (Linux 4.2+): bind only the address now and let connect() pick the
/// port for the full 4-tuple. Without it, bind(port 0) must find a port free for *every*
/// destination: it gets slow once tens of thousands of ports sit in TIME_WAIT (the handshake
/// scenario makes ~10^5 of them) and caps each source address at ~28k connections in total.
fn bind_address_no_port(socket: &Socket) {
    let enable: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket we own, with a pointer to a live c_int and its size.
    // Failure (an old kernel) only means falling back to the default port choice.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect in flight; the upgrade request waits in `out`.
    Connecting,
    /// Request sent, waiting for `101`.
    Handshaking,
    Open,
    Closed,
}

/// Why a connection ended, for the summary's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    ConnectFailed,
    /// Upgrade answered with this status (0: malformed).
    Refused(u16),
    /// The server sent a close frame.
    CloseFrame,
    /// EOF or a socket error.
    Dropped,
    /// The server's extension answer, or a compressed frame, broke RFC 7692 (or did not inflate).
    BadDeflate,
}

/// A connection's permessage-deflate state.
pub enum Deflate {
    /// Not offered, or declined by the server.
    Off,
    /// In the upgrade request; the answer is not read yet.
    Offered,
    /// Agreed, server resets per message: the loop's shared inflater does.
    Shared,
    /// Agreed with context takeover: this connection's own inflater, kept across messages.
    Own(Box<flate2::Decompress>),
}

pub struct Conn<S> {
    pub stream: TcpStream,
    pub phase: Phase,
    /// Bytes of a partial response head or frame, kept until the rest arrives.
    pub pending_in: Vec<u8>,
    /// Bytes not yet accepted by the socket (with TLS: by the TLS session, whose own buffer is
    /// bounded by rustls' 64 KiB default, so `out` still shows backpressure).
    pub out: Vec<u8>,
    /// The TLS session with `--tls`.
    tls: Option<Box<ClientConnection>>,
    pub deflate: Deflate,
    pub state: S,
}

/// What one `pump` did to the connection.
#[derive(Default)]
pub struct Pumped {
    /// The upgrade completed during this call.
    pub opened: bool,
    pub closed: Option<CloseReason>,
    /// Bytes read from the socket (response head and frames, as on the wire).
    pub bytes_read: u64,
}

impl<S> Conn<S> {
    /// A connection whose first write will be the upgrade request for `path`, offering
    /// permessage-deflate when `offer_deflate`.
    pub fn new(
        stream: TcpStream,
        host: &str,
        path: &str,
        offer_deflate: bool,
        state: S,
    ) -> Conn<S> {
        Conn {
            stream,
            phase: Phase::Connecting,
            pending_in: Vec::new(),
            out: wire::upgrade_request(host, path, offer_deflate),
            deflate: if offer_deflate {
                Deflate::Offered
            } else {
                Deflate::Off
            },
            tls: TLS.get().map(|config| {
                let name = ServerName::try_from("localhost").expect("a valid DNS name");
                Box::new(
                    ClientConnection::new(config.clone(), name)
                        .expect("a client session from a valid configuration"),
                )
            }),
            state,
        }
    }

    /// Reads plain bytes (decrypted with `--tls`). Returns less than `buf` holds only when the
    /// socket is drained (or at EOF), as a plain socket read does: `pump` relies on it.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.stream.read(buf);
        };
        let mut total = 0;
        loop {
            match tls.reader().read(&mut buf[total..]) {
                Ok(0) => return Ok(total),
                Ok(n) => {
                    total += n;
                    if total == buf.len() {
                        return Ok(total);
                    }
                    continue;
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                Err(error) if total > 0 => {
                    let _ = error;
                    return Ok(total);
                }
                Err(error) => return Err(error),
            }
            match tls.read_tls(&mut self.stream) {
                Ok(0) => return Ok(total),
                Ok(_) => {}
                Err(error) if error.kind() == ErrorKind::WouldBlock && total > 0 => {
                    return Ok(total)
                }
                Err(error) => return Err(error),
            }
            tls.process_new_packets()
                .map_err(|error| io::Error::new(ErrorKind::InvalidData, error))?;
            write_tls(tls, &mut self.stream)?;
        }
    }

    /// Whether the server agreed to permessage-deflate.
    pub fn deflate_negotiated(&self) -> bool {
        matches!(self.deflate, Deflate::Shared | Deflate::Own(_))
    }

    /// Writes `out` until it is empty or the socket would block.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            if !self.out.is_empty() {
                let taken = tls.writer().write(&self.out)?;
                self.out.drain(..taken);
            }
            return write_tls(tls, &mut self.stream);
        }
        let mut written = 0;
        while written < self.out.len() {
            match self.stream.write(&self.out[written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        self.out.drain(..written);
        Ok(())
    }

    /// Handles one readiness event: finishes the connect, flushes, reads everything available
    /// and hands each text message to `on_text(state, out, payload, read_at)`, inflated when it
    /// came compressed (through `inflater`). Pings are answered.
    pub fn pump(
        &mut self,
        buf: &mut Vec<u8>,
        inflater: &mut wire::Inflater,
        mut on_text: impl FnMut(&mut S, &mut Vec<u8>, &[u8], Instant),
    ) -> Pumped {
        let mut pumped = Pumped::default();
        if self.phase == Phase::Closed {
            return pumped;
        }
        if self.phase == Phase::Connecting {
            match self.stream.take_error() {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => return self.close(pumped, CloseReason::ConnectFailed),
            }
            match self.stream.peer_addr() {
                Ok(_) => self.phase = Phase::Handshaking,
                Err(error) if error.kind() == ErrorKind::NotConnected => return pumped,
                Err(_) => return self.close(pumped, CloseReason::ConnectFailed),
            }
        }
        if self.flush().is_err() {
            return self.close(pumped, CloseReason::Dropped);
        }
        loop {
            let kept = self.pending_in.len();
            if buf.len() < kept + READ_BUFFER_BYTES {
                buf.resize(kept + READ_BUFFER_BYTES, 0);
            }
            buf[..kept].copy_from_slice(&self.pending_in);
            self.pending_in.clear();
            let read = match self.read_some(&mut buf[kept..]) {
                Ok(0) => {
                    self.pending_in.extend_from_slice(&buf[..kept]);
                    return self.close(pumped, CloseReason::Dropped);
                }
                Ok(n) => n,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    self.pending_in.extend_from_slice(&buf[..kept]);
                    break;
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {
                    self.pending_in.extend_from_slice(&buf[..kept]);
                    continue;
                }
                Err(_) => return self.close(pumped, CloseReason::Dropped),
            };
            let read_at = Instant::now();
            pumped.bytes_read += read as u64;
            let filled = kept + read;
            let mut at = 0;
            if self.phase == Phase::Handshaking {
                match wire::parse_response_head(&buf[..filled]) {
                    ResponseHead::Partial => {
                        self.pending_in.extend_from_slice(&buf[..filled]);
                        continue;
                    }
                    ResponseHead::Refused(status) => {
                        return self.close(pumped, CloseReason::Refused(status));
                    }
                    ResponseHead::Upgraded(head_bytes) => {
                        let offered = matches!(self.deflate, Deflate::Offered);
                        self.deflate = match wire::deflate_answer(&buf[..head_bytes], offered) {
                            Ok(None) => Deflate::Off,
                            Ok(Some(answer)) if answer.server_no_context_takeover => {
                                Deflate::Shared
                            }
                            Ok(Some(_)) => Deflate::Own(Box::new(flate2::Decompress::new(false))),
                            Err(error) => {
                                eprintln!("upgrade answer: {error}");
                                return self.close(pumped, CloseReason::BadDeflate);
                            }
                        };
                        self.phase = Phase::Open;
                        pumped.opened = true;
                        at = head_bytes;
                    }
                }
            }
            while let NextFrame::Complete(frame, used) = wire::next_frame(&buf[at..filled]) {
                match frame.opcode {
                    wire::OPCODE_TEXT if !frame.compressed => {
                        on_text(&mut self.state, &mut self.out, frame.payload, read_at)
                    }
                    wire::OPCODE_TEXT => {
                        let context = match &mut self.deflate {
                            Deflate::Shared => None,
                            Deflate::Own(own) => Some(&mut **own),
                            Deflate::Off | Deflate::Offered => {
                                return self.close(pumped, CloseReason::BadDeflate)
                            }
                        };
                        match inflater.inflate(context, frame.payload) {
                            Ok(text) => on_text(&mut self.state, &mut self.out, text, read_at),
                            Err(error) => {
                                eprintln!("{error}");
                                return self.close(pumped, CloseReason::BadDeflate);
                            }
                        }
                    }
                    wire::OPCODE_PING => {
                        wire::encode_client_frame(&mut self.out, 0xA, frame.payload, [7, 7, 7, 7]);
                    }
                    wire::OPCODE_CLOSE => return self.close(pumped, CloseReason::CloseFrame),
                    // Binary, pong and continuation frames carry nothing the benchmark reads.
                    _ => {}
                }
                at += used;
            }
            self.pending_in.extend_from_slice(&buf[at..filled]);
            if read < buf.len() - kept {
                break;
            }
        }
        if !self.out.is_empty() && self.flush().is_err() {
            return self.close(pumped, CloseReason::Dropped);
        }
        pumped
    }

    fn close(&mut self, mut pumped: Pumped, reason: CloseReason) -> Pumped {
        self.phase = Phase::Closed;
        self.pending_in = Vec::new();
        self.out = Vec::new();
        self.deflate = Deflate::Off;
        pumped.closed = Some(reason);
        pumped
    }
}

/// Writes a session's ciphertext until none is left or the socket would block.
fn write_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Counts of connection outcomes, for every scenario's summary.
#[derive(Default, Debug)]
pub struct CloseCounts {
    pub connect_failed: u64,
    pub refused: u64,
    pub close_frame: u64,
    pub dropped: u64,
    pub bad_deflate: u64,
    pub last_refused_status: u16,
}

impl CloseCounts {
    pub fn add(&mut self, reason: CloseReason) {
        match reason {
            CloseReason::ConnectFailed => self.connect_failed += 1,
            CloseReason::Refused(status) => {
                self.refused += 1;
                self.last_refused_status = status;
            }
            CloseReason::CloseFrame => self.close_frame += 1,
            CloseReason::Dropped => self.dropped += 1,
            CloseReason::BadDeflate => self.bad_deflate += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.connect_failed + self.refused + self.close_frame + self.dropped + self.bad_deflate
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connect_failed": self.connect_failed,
            "refused": self.refused,
            "last_refused_status": self.last_refused_status,
            "closed_by_server": self.close_frame,
            "dropped": self.dropped,
            "bad_deflate": self.bad_deflate,
        })
    }
}
