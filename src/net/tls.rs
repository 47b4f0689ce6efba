//! TLS as a transport under HTTP and WebSocket (`--tls-cert`, `--tls-key`): one rustls
//! `ServerConnection` per TLS client, driven non-blocking the way rustls' own mio example does.
//!
//! Contract, for the loop:
//! - [`TlsSession::read`] behaves like a non-blocking socket read of *decrypted* bytes: `Ok(0)` is
//!   the end of the stream, `WouldBlock` means the socket is drained and nothing decrypted is left.
//!   Call it until `WouldBlock` (edge-triggered readiness). A TLS failure is `InvalidData`; the
//!   alert rustls queued has already been tried once.
//! - After reads, [`TlsSession::wants_write`] says the session has ciphertext of its own to send
//!   (handshake messages): the connection must be flushed even with an empty send queue.
//! - [`TlsSession::flush`] takes the place of [`SendQueue::write_to`]: queued (shared) frames are
//!   fed into the session's writer, which is where per-connection encryption happens, and the
//!   ciphertext is written until the socket would block. Frames stay shared until that moment,
//!   so a broadcast is still built once.
//!
//! Plain connections pay nothing: the loop holds `Option<Box<TlsSession>>`, one pointer that is
//! `None` for them (and the same size as the pointer, thanks to the null niche).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use super::send_queue::{Flushed, SendQueue};

/// Ciphertext (and, during the handshake, plaintext) one session may buffer before its writer
/// refuses more: the send queue keeps the rest, where its marks and conflation apply. This is
/// rustls' default, named here because it bounds what a TLS connection holds beyond its queue.
pub const TLS_BUFFER_BYTES_MAX: usize = 64 * 1024;

/// Bytes of a plain request on the TLS port read (and discarded) before it is answered, so the
/// answer is not destroyed by a reset for unread input.
const PLAIN_REQUEST_DISCARD_BYTES_MAX: usize = 16 * 1024;

/// TLS record content type "handshake" (RFC 8446 §5.1): every TLS client's first byte.
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;

/// The answer to plain HTTP on the TLS port (nginx answers 400 there too), then the close.
const PLAIN_HTTP_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: application/json\r\n\
Content-Length: 89\r\n\
Connection: close\r\n\
\r\n\
{\"error\":{\"code\":\"bad_request\",\
\"message\":\"this port speaks TLS: use https:// or wss://\"}}";

/// Where the certificate chain and key are read from (PEM), at start and on every SIGHUP.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read { path: PathBuf, error: io::Error },
    /// The certificate file holds no `CERTIFICATE` block.
    NoCertificate { path: PathBuf },
    /// A PEM file is malformed, or the key file holds no private key.
    Pem { path: PathBuf, error: String },
    /// rustls refused the pair (key does not match the certificate, unsupported key type, ...).
    Rejected(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            TlsError::NoCertificate { path } => {
                write!(f, "{}: no PEM certificate in it", path.display())
            }
            TlsError::Pem { path, error } => write!(f, "{}: {error}", path.display()),
            TlsError::Rejected(e) => write!(f, "certificate and key refused: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// Builds the server configuration from the PEM pair: TLS 1.3 and 1.2 only, ALPN `http/1.1`
/// (HTTP/2 clients fall back to it; WebSocket needs HTTP/1.1 anyway).
pub fn load_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|error| TlsError::Read {
            path: path.clone(),
            error,
        })
    };
    let cert_pem = read(&files.cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: files.cert.clone(),
            error: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        error: format!("no usable private key ({e})"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rejected)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Rejected)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The listener's TLS side: the files and the configuration new connections get. A reload
/// swaps the configuration; connections already open keep the one they started with.
pub struct TlsAcceptor {
    files: TlsFiles,
    config: Arc<ServerConfig>,
}

impl TlsAcceptor {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = load_config(&files)?;
        Ok(TlsAcceptor { files, config })
    }

    /// Re-reads the pair; on error the old configuration stays in force.
    pub fn reload(&mut self) -> Result<(), TlsError> {
        self.config = load_config(&self.files)?;
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub fn session(&self) -> Result<TlsSession, rustls::Error> {
        let mut conn = ServerConnection::new(self.config.clone())?;
        conn.set_buffer_limit(Some(TLS_BUFFER_BYTES_MAX));
        Ok(TlsSession {
            conn,
            first_byte_checked: false,
            close_notify_sent: false,
        })
    }
}

/// One client's TLS state.
pub struct TlsSession {
    conn: ServerConnection,
    /// The first byte was seen to be a TLS handshake record (plain HTTP is refused before it).
    first_byte_checked: bool,
    close_notify_sent: bool,
}

/// Why a TLS connection failed: for the loop's logs and its close reason.
#[derive(Debug)]
pub struct NotTls;

impl fmt::Display for NotTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("plain-text request on the TLS port")
    }
}

impl std::error::Error for NotTls {}

impl TlsSession {
    /// Reads decrypted bytes into `buf`; see the module contract.
    pub fn read(&mut self, stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                // 0: the peer's close_notify, the clean end of the stream.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // UnexpectedEof: TCP closed without close_notify; the loop treats it as a close.
                Err(e) => return Err(e),
            }
            if !self.first_byte_checked {
                self.check_first_byte(stream, buf)?;
            }
            match self.conn.read_tls(stream) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert rustls queued says why; one best-effort write, then the close.
                let _ = self.conn.write_tls(stream);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// A client speaking plain HTTP to the TLS port gets one short plain-text 400 and the close,
    /// instead of a TLS alert it cannot read: nothing of it reaches rustls.
    fn check_first_byte(&mut self, stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
        let mut first = [0u8; 1];
        match stream.peek(&mut first) {
            Ok(0) => return Ok(()), // EOF: read_tls reports it
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        if first[0] == CONTENT_TYPE_HANDSHAKE {
            self.first_byte_checked = true;
            return Ok(());
        }
        // Read what the client sent (a request head fits) so that closing with unread input
        // does not turn into a reset that destroys the answer.
        let discard = buf.len().min(PLAIN_REQUEST_DISCARD_BYTES_MAX);
        let _ = stream.read(&mut buf[..discard]);
        let _ = stream.write(PLAIN_HTTP_REFUSAL);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        Err(io::Error::new(io::ErrorKind::InvalidData, NotTls))
    }

    /// The session has ciphertext of its own waiting (handshake, alerts, a resumed write).
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Feeds queued frames into the session and writes ciphertext until the socket would block,
    /// the byte budget (plaintext bytes taken from the queue) is spent, or all is out. With
    /// `closing`, once the queue is empty the close_notify alert follows (RFC 8446 §6.1).
    pub fn flush(
        &mut self,
        stream: &mut TcpStream,
        queue: &mut SendQueue,
        budget_bytes: usize,
        closing: bool,
    ) -> io::Result<(usize, Flushed)> {
        if !self.write_buffered(stream)? {
            return Ok((0, Flushed::WouldBlock));
        }
        let (written, outcome) = queue.write_to(
            &mut Sealer {
                session: self,
                stream,
            },
            budget_bytes,
        )?;
        if outcome != Flushed::All {
            return Ok((written, outcome));
        }
        if closing && !self.close_notify_sent {
            self.close_notify_sent = true;
            self.conn.send_close_notify();
        }
        // All of the queue went into the session; it is out only when the session is empty.
        if self.write_buffered(stream)? {
            Ok((written, Flushed::All))
        } else {
            Ok((written, Flushed::WouldBlock))
        }
    }

    /// Writes buffered ciphertext; true when none is left.
    fn write_buffered(&mut self, stream: &mut TcpStream) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(stream) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// The send queue's view of a TLS session: a writer that encrypts what it takes and reports
/// `WouldBlock` while earlier ciphertext is still waiting for the socket.
struct Sealer<'a> {
    session: &'a mut TlsSession,
    stream: &'a mut TcpStream,
}

impl Write for Sealer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.session.write_buffered(self.stream)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // Encrypts into records (rustls joins the slices); bounded by TLS_BUFFER_BYTES_MAX.
        let taken = self.session.conn.writer().write_vectored(bufs)?;
        if taken == 0 {
            // The session's buffer is full (only while the handshake is still going).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // Leftover ciphertext waits; the next call (or the next flush) reports WouldBlock.
        self.session.write_buffered(self.stream)?;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_refusal_is_a_well_formed_response() {
        let text = std::str::from_utf8(PLAIN_HTTP_REFUSAL).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .expect("a Content-Length")
            .parse()
            .expect("a number");
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(json["error"]["code"], "bad_request");
    }
}
