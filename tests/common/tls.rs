//! TLS clients for the tests: a self-signed certificate made at test time (rcgen), a rustls
//! client that trusts exactly it, `wss://` over rustls with tungstenite's plain client, and a
//! minimal HTTPS/1.1 client. Every client may bind its source address (127.0.0.x), so a test
//! can look like several client hosts on one machine.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::client::IntoClientRequest;
use tungstenite::WebSocket;

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;
pub type Wss = WebSocket<TlsStream>;

/// A self-signed certificate for `localhost` / 127.0.0.1, written as PEM files.
pub struct SelfSigned {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl SelfSigned {
    pub fn new() -> SelfSigned {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certified = rcgen::generate_simple_self_signed(names).expect("rcgen");
        SelfSigned {
            cert_der: certified.cert.der().clone(),
            cert_pem: certified.cert.pem(),
            key_pem: certified.key_pair.serialize_pem(),
        }
    }

    /// Writes `cert.pem` and `key.pem` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    /// A client configuration trusting this certificate only.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        client_config(std::slice::from_ref(&self.cert_der))
    }
}

pub fn client_config(trusted: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TCP connection to `addr`, from `source` when given (any 127.0.0.0/8 address works on
/// Linux loopback).
pub fn tcp_from(addr: SocketAddr, source: Option<IpAddr>) -> TcpStream {
    let stream = match source {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap(),
        Some(ip) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            socket.bind(&SocketAddr::new(ip, 0).into()).unwrap();
            socket
                .connect_timeout(&addr.into(), Duration::from_secs(5))
                .unwrap();
            socket.into()
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Completes a TLS handshake with `addr` as `localhost`.
pub fn tls_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    config: &Arc<ClientConfig>,
) -> std::io::Result<TlsStream> {
    tls_over(tcp_from(addr, source), config)
}

/// A `wss://` client whose socket takes at most about `receive_buffer` bytes in the kernel: a
/// subscriber that stops reading backs up into the server quickly.
pub fn wss_small_window(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    path: &str,
    receive_buffer: usize,
) -> Wss {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_recv_buffer_size(receive_buffer).unwrap();
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let stream = tls_over(tcp, config).unwrap();
    let request = format!("ws://localhost:{}{path}", addr.port());
    match tungstenite::client(request, stream) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("wss handshake: {e}"),
    }
}

/// Completes a TLS handshake over `tcp`.
pub fn tls_over(tcp: TcpStream, config: &Arc<ClientConfig>) -> std::io::Result<TlsStream> {
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).unwrap();
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// The certificate the server presented.
pub fn presented(stream: &TlsStream) -> CertificateDer<'static> {
    stream.conn.peer_certificates().expect("server certificate")[0].clone()
}

/// A `wss://` client at `path`, with extra request headers.
pub fn wss(
    addr: SocketAddr,
    source: Option<IpAddr>,
    config: &Arc<ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Wss, Box<tungstenite::Error>> {
    let stream = tls_connect(addr, source, config).map_err(|e| Box::new(e.into()))?;
    let mut request = format!("ws://localhost:{}{path}", addr.port())
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tungstenite::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(Box::new(e)),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("blocking handshake"),
    }
}

pub fn send<S: Read + Write>(ws: &mut WebSocket<S>, value: serde_json::Value) {
    ws.send(tungstenite::Message::text(value.to_string()))
        .unwrap();
}

/// The next JSON text message, skipping pings/pongs.
pub fn recv<S: Read + Write>(ws: &mut WebSocket<S>) -> serde_json::Value {
    loop {
        match ws.read().expect("read a message") {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// One HTTP/1.1 request on `stream` (kept alive); returns status and body.
pub fn http<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        request.push_str("Content-Type: application/json\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    stream.flush().unwrap();
    read_response(stream)
}

/// Reads one response with a `Content-Length` body.
pub fn read_response<S: Read>(stream: &mut S) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read response head");
        assert!(n == 1, "connection closed inside a response head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// One HTTPS request on a fresh connection.
pub fn https(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = tls_connect(addr, None, config).expect("TLS handshake");
    http(&mut stream, method, path, headers, body)
}
