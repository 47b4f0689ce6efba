//! Input framing at the socket level: however the bytes are cut into reads (one at a time, a
//! frame header split in two, a thousand frames in one write, pipelined requests), the server
//! sees the same requests and messages, and answers each in order.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use common::opcode::*;
use common::*;
use stocksync::config::Limits;

/// The upgrade every session here starts with.
fn upgrade() -> Vec<u8> {
    upgrade_request("/raw").into_bytes()
}

fn echo() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start_echo(Limits::default()))
}

fn connect() -> TcpStream {
    let stream = raw(echo());
    // Each small write leaves as its own segment, so the server really gets many short reads.
    stream.set_nodelay(true).unwrap();
    stream
}

fn write_bytewise(stream: &mut TcpStream, bytes: &[u8]) {
    for byte in bytes {
        stream.write_all(std::slice::from_ref(byte)).unwrap();
    }
}

#[test]
fn whole_session_one_byte_at_a_time() {
    let mut stream = connect();
    write_bytewise(&mut stream, &upgrade());
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains(WS_ACCEPT));

    let text = "byte by byte: ünïcödé €😀";
    write_bytewise(&mut stream, &client_frame(true, TEXT, text.as_bytes()));
    assert_eq!(
        read_frame(&mut stream),
        (0x80 | TEXT, text.as_bytes().to_vec())
    );

    // A 16-bit length, fragmented, a ping between the fragments.
    let binary: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let mut bytes = client_frame(false, BINARY, &binary[..100]);
    bytes.extend(client_frame(true, PING, b"mid"));
    bytes.extend(client_frame(true, CONTINUATION, &binary[100..]));
    write_bytewise(&mut stream, &bytes);
    assert_eq!(read_frame(&mut stream), (0x80 | PONG, b"mid".to_vec()));
    assert_eq!(read_frame(&mut stream), (0x80 | BINARY, binary));

    write_bytewise(
        &mut stream,
        &client_frame(true, CLOSE, &1000u16.to_be_bytes()),
    );
    assert_eq!(
        read_frame(&mut stream),
        (0x80 | CLOSE, 1000u16.to_be_bytes().to_vec())
    );
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0);
}

/// Frame `i` of the batch: alternately text and binary, lengths crossing the 7/16-bit edge.
fn batch_frame(i: usize) -> (u8, Vec<u8>) {
    let len = (i * 37) % 300;
    if i % 2 == 0 {
        let text: String = format!("#{i}:")
            .chars()
            .chain(std::iter::repeat('é'))
            .take(len / 2 + 3)
            .collect();
        (TEXT, text.into_bytes())
    } else {
        (BINARY, (0..len).map(|j| (i + j) as u8).collect())
    }
}

#[test]
fn thousand_frames_in_one_write_are_echoed_in_order() {
    let mut stream = connect();
    stream.write_all(&upgrade()).unwrap();
    assert!(read_head(&mut stream).starts_with("HTTP/1.1 101 "));

    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for i in 0..1000 {
        let (opcode, payload) = batch_frame(i);
        batch.extend(client_frame(true, opcode, &payload));
        expected.push((0x80 | opcode, payload));
        if i % 100 == 99 {
            let ping = format!("ping {i}").into_bytes();
            batch.extend(client_frame(true, PING, &ping));
            expected.push((0x80 | PONG, ping));
        }
    }
    // One write from another thread, so the echoes can be read while it is in progress.
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&batch).unwrap());
    for (n, want) in expected.iter().enumerate() {
        let got = read_frame(&mut stream);
        assert!(got == *want, "frame {n}: got {got:?}, want {want:?}");
    }
    sender.join().unwrap();
}

#[test]
fn upgrade_and_frames_in_one_write() {
    // A client may send its first frames right behind the handshake, before the 101 arrives.
    let mut stream = connect();
    let mut bytes = upgrade();
    bytes.extend(client_frame(true, TEXT, b"first"));
    bytes.extend(client_frame(true, BINARY, &[0u8; 200]));
    bytes.extend(client_frame(true, TEXT, b"third"));
    stream.write_all(&bytes).unwrap();
    assert!(read_head(&mut stream).starts_with("HTTP/1.1 101 "));
    assert_eq!(read_frame(&mut stream), (0x81, b"first".to_vec()));
    assert_eq!(read_frame(&mut stream), (0x82, vec![0u8; 200]));
    assert_eq!(read_frame(&mut stream), (0x81, b"third".to_vec()));
}

#[test]
fn frame_header_split_across_reads_at_every_byte() {
    let mut stream = connect();
    stream.write_all(&upgrade()).unwrap();
    assert!(read_head(&mut stream).starts_with("HTTP/1.1 101 "));
    // 7-bit (6-byte header), 16-bit (8-byte) and 64-bit (14-byte) lengths.
    for len in [5usize, 300, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let frame = client_frame(true, BINARY, &payload);
        let header_bytes = match len {
            0..=125 => 6,
            126..=65535 => 8,
            _ => 14,
        };
        for split in 1..=header_bytes {
            stream.write_all(&frame[..split]).unwrap();
            // Not synchronisation: a pause so the two parts usually arrive as separate reads.
            // The assertion below holds however the kernel delivers them.
            std::thread::sleep(Duration::from_millis(5));
            stream.write_all(&frame[split..]).unwrap();
            let (first, got) = read_frame(&mut stream);
            assert_eq!(first, 0x80 | BINARY);
            assert!(got == payload, "len {len}, split at {split}");
        }
    }
}

#[test]
fn pipelined_http_requests_in_one_write_are_answered_in_order() {
    let server = Server::start(&[]);
    let mut stream = raw(server.addr);
    let requests = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n\
                    GET /no/such/route HTTP/1.1\r\nHost: t\r\n\r\n\
                    HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n\
                    GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n\
                    GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    stream.write_all(requests.as_bytes()).unwrap();
    let bytes = read_to_close(&mut stream);
    let text = String::from_utf8_lossy(&bytes);
    // Responses in request order; nothing after the `Connection: close` one.
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &text[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200", "200"], "{text}");
    assert!(text.contains("stocksync_connections_accepted_total"));
}

#[test]
fn pipelined_http_requests_sent_one_byte_at_a_time() {
    let server = Server::start(&[]);
    let mut stream = raw(server.addr);
    stream.set_nodelay(true).unwrap();
    let requests = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n\
                    GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    write_bytewise(&mut stream, requests.as_bytes());
    let text = String::from_utf8(read_to_close(&mut stream)).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 ").count(), 2, "{text}");
}

/// A message and the peer's FIN that arrive together are one readiness event: the server reads
/// past the message to the end of the stream (a short read there does not mean "nothing
/// more") and closes at once, rather than holding the connection until its idle timeout.
#[test]
fn a_message_and_the_fin_in_one_event_are_both_seen() {
    for round in 0..20 {
        let mut stream = connect();
        stream.write_all(&upgrade()).unwrap();
        let head = read_head(&mut stream);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let text = format!("last words {round}");
        stream
            .write_all(&client_frame(true, TEXT, text.as_bytes()))
            .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => panic!("round {round}: the server did not close after the FIN: {e}"),
            }
        }
    }
}
