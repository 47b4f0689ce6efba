//! Heap held by one idle TLS session on the server side, counted by a global allocator: the
//! handshake and a request/response go through the same rustls calls the loop makes, then the
//! clients are dropped and what the server sessions still hold is divided by their number.

use std::io::{Cursor, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live_bytes;

/// Moves `from`'s ciphertext into `to`, processes it, and drains `to`'s plaintext.
fn transfer(from: &mut dyn FnMut(&mut Vec<u8>), to_read: &mut dyn FnMut(&[u8])) {
    let mut wire = Vec::new();
    from(&mut wire);
    if !wire.is_empty() {
        to_read(&wire);
    }
}

fn server_pump(server: &mut ServerConnection, bytes: &[u8]) {
    let mut cursor = Cursor::new(bytes);
    while (cursor.position() as usize) < bytes.len() {
        server.read_tls(&mut cursor).unwrap();
        server.process_new_packets().unwrap();
    }
    let mut sink = [0u8; 4096];
    while let Ok(n) = server.reader().read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

fn client_pump(client: &mut ClientConnection, bytes: &[u8]) {
    let mut cursor = Cursor::new(bytes);
    while (cursor.position() as usize) < bytes.len() {
        client.read_tls(&mut cursor).unwrap();
        client.process_new_packets().unwrap();
    }
    let mut sink = [0u8; 4096];
    while let Ok(n) = client.reader().read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

#[test]
fn an_idle_tls_session_holds_under_8_kib() {
    const SESSIONS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("c.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.path().join("k.pem"), certified.key_pair.serialize_pem()).unwrap();
    let files = stocksync::net::TlsFiles {
        cert: dir.path().join("c.pem"),
        key: dir.path().join("k.pem"),
    };
    let server_config = stocksync::net::tls::load_config(&files).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    // One session first, so lazily built shared state (session cache, ...) is not counted.
    let mut servers = Vec::with_capacity(SESSIONS + 1);
    let mut clients = Vec::with_capacity(SESSIONS + 1);
    let open = |servers: &mut Vec<ServerConnection>, clients: &mut Vec<ClientConnection>| {
        let mut server = ServerConnection::new(server_config.clone()).unwrap();
        server.set_buffer_limit(Some(stocksync::net::tls::TLS_BUFFER_BYTES_MAX));
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(client_config.clone(), name).unwrap();
        client
            .writer()
            .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        while client.is_handshaking() || server.is_handshaking() || client.wants_write() {
            transfer(
                &mut |wire| {
                    while client.wants_write() {
                        client.write_tls(wire).unwrap();
                    }
                },
                &mut |bytes| server_pump(&mut server, bytes),
            );
            transfer(
                &mut |wire| {
                    while server.wants_write() {
                        server.write_tls(wire).unwrap();
                    }
                },
                &mut |bytes| client_pump(&mut client, bytes),
            );
        }
        server
            .writer()
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .unwrap();
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        client_pump(&mut client, &wire);
        servers.push(server);
        clients.push(client);
    };
    open(&mut servers, &mut clients);
    let before = live_bytes();
    for _ in 0..SESSIONS {
        open(&mut servers, &mut clients);
    }
    clients.clear();
    let after = live_bytes();
    // The Vec holding the sessions was allocated up front: the growth is the sessions' heap
    // (the struct itself lives in the Vec, allocated before `before`), plus our box below.
    let per_session =
        (after - before) as usize / SESSIONS + std::mem::size_of::<ServerConnection>();
    eprintln!(
        "heap per idle server TLS session: {per_session} bytes (ServerConnection itself: {} \
         bytes)",
        std::mem::size_of::<ServerConnection>()
    );
    assert!(
        per_session < 8 * 1024,
        "{per_session} bytes per idle TLS session"
    );
    drop(servers);
}
