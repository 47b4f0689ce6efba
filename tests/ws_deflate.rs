//! permessage-deflate (RFC 7692, PROTOCOL.md "Compression") on the real server: every negotiation
//! outcome from raw handshakes, compressed and plain frames in both directions, fragmented
//! compressed messages, the inflated-size limit against a zip bomb (1009, bounded memory),
//! `--compression off`, and Python's `websockets`, a real client that offers permessage-deflate by
//! default.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::opcode::*;
use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use stocksync::config::Limits;
use stocksync::ws::deflate::COMPRESS_PAYLOAD_BYTES_MIN;

const RSV1: u8 = 0x40;
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Echo with compression on (the default) and messages of up to 64 KiB.
fn echo() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        start_echo(Limits {
            ws_message_bytes_max: 64 * 1024,
            ..Limits::default()
        })
    })
}

/// A raw handshake offering `extensions` (one header field per entry); the 101 head.
fn handshake(addr: SocketAddr, extensions: &[&str]) -> (TcpStream, String) {
    let mut stream = raw(addr);
    let mut request = upgrade_request("/ws");
    request.truncate(request.len() - 2);
    for value in extensions {
        request.push_str(&format!("Sec-WebSocket-Extensions: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (stream, head)
}

/// The `Sec-WebSocket-Extensions` value of a response head, if any.
fn extensions_answer(head: &str) -> Option<String> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, value)| value.trim().to_string())
}

/// Raw deflate with the sync-flush tail stripped, as a permessage-deflate sender does.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let mut at = 0;
    loop {
        out.reserve(64 * 1024);
        let before = compress.total_in();
        compress
            .compress_vec(&data[at..], &mut out, FlushCompress::Sync)
            .unwrap();
        at += (compress.total_in() - before) as usize;
        if at == data.len() && out.ends_with(&TAIL) && out.len() < out.capacity() {
            break;
        }
    }
    out.truncate(out.len() - TAIL.len());
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(data.len() * 20 + 1024);
    let mut raw = Decompress::new(false);
    raw.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// A masked client frame with RSV1 set.
fn compressed_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = client_frame(fin, opcode, payload);
    frame[0] |= RSV1;
    frame
}

/// JSON-like text of `len` bytes that compresses well.
fn json_text(len: usize) -> String {
    let mut text = String::from("[");
    let mut i = 0;
    while text.len() < len {
        text.push_str(&format!(
            r#"{{"id":"sku-{i}","quantity":{},"on_hand":{},"reserved":0}},"#,
            i % 13,
            i % 17
        ));
        i += 1;
    }
    text.truncate(len);
    text
}

const DEFAULT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[test]
fn negotiation_outcomes_table() {
    // (offers, one header field each; the answer expected)
    let cases: &[(&[&str], Option<&str>)] = &[
        (&[], None),
        (&["permessage-deflate"], Some(DEFAULT)),
        // Chrome, Firefox and Safari send this.
        (
            &["permessage-deflate; client_max_window_bits"],
            Some(DEFAULT),
        ),
        (
            &["permessage-deflate; client_no_context_takeover; server_no_context_takeover"],
            Some(DEFAULT),
        ),
        (
            &["permessage-deflate; server_max_window_bits=10"],
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10",
            ),
        ),
        (
            &["x-webkit-deflate-frame, permessage-deflate"],
            Some(DEFAULT),
        ),
        (
            &["permessage-deflate; server_max_window_bits=9, permessage-deflate"],
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=9",
            ),
        ),
        // Invalid offers are declined and the next one is taken.
        (
            &["permessage-deflate; bogus", "permessage-deflate"],
            Some(DEFAULT),
        ),
        (
            &["permessage-deflate; server_max_window_bits=16, permessage-deflate"],
            Some(DEFAULT),
        ),
        // Nothing acceptable: the connection opens without compression.
        (&["permessage-deflate; bogus"], None),
        (
            &["permessage-deflate; client_no_context_takeover; client_no_context_takeover"],
            None,
        ),
        (&["permessage-deflate; server_max_window_bits"], None),
        (&["permessage-deflate; server_max_window_bits=7"], None),
        (
            &["permessage-deflate; server_no_context_takeover=yes"],
            None,
        ),
        (&["x-webkit-deflate-frame"], None),
    ];
    for (offers, expected) in cases {
        let (mut stream, head) = handshake(echo(), offers);
        assert_eq!(
            extensions_answer(&head).as_deref(),
            *expected,
            "{offers:?}: {head}"
        );
        // Usable either way: a message round-trips (plain, below the threshold).
        stream
            .write_all(&client_frame(true, TEXT, b"still works"))
            .unwrap();
        assert_eq!(
            read_frame(&mut stream),
            (0x80 | TEXT, b"still works".to_vec())
        );
    }
}

#[test]
fn compression_off_declines_every_offer() {
    let addr = start_echo(Limits {
        ws_compression: false,
        ..Limits::default()
    });
    let (mut stream, head) = handshake(addr, &["permessage-deflate; client_max_window_bits"]);
    assert_eq!(extensions_answer(&head), None, "{head}");
    // Without the extension, RSV1 is a protocol error (RFC 6455 §5.2): 1002.
    stream
        .write_all(&compressed_frame(true, TEXT, &deflate(b"Hello")))
        .unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x80 | CLOSE);
    assert_eq!(&payload[..2], &1002u16.to_be_bytes());
    // The real binary: --compression off, and STOCKSYNC_COMPRESSION=off.
    let server = Server::start(&["--compression", "off"]);
    let (_stream, head) = handshake(server.addr, &["permessage-deflate"]);
    assert_eq!(extensions_answer(&head), None, "--compression off: {head}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", "none"])
        .env("STOCKSYNC_COMPRESSION", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start stocksync");
    let addr = read_listen_addr(&mut child);
    wait_listening(addr);
    let (_stream, head) = handshake(addr, &["permessage-deflate"]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        extensions_answer(&head),
        None,
        "STOCKSYNC_COMPRESSION=off: {head}"
    );
    let server = Server::start(&[]);
    let (_stream, head) = handshake(server.addr, &["permessage-deflate"]);
    assert_eq!(
        extensions_answer(&head).as_deref(),
        Some(DEFAULT),
        "on by default"
    );
}

#[test]
fn compressed_and_plain_frames_both_directions() {
    let (mut stream, head) = handshake(echo(), &["permessage-deflate"]);
    assert_eq!(extensions_answer(&head).as_deref(), Some(DEFAULT));
    let big = json_text(20_000);
    let small = "{\"type\":\"ping\"}";
    // (what the client sends, compressed?; the text; whether the echo must come back compressed)
    let cases: &[(bool, &str, bool)] = &[
        (true, small, false),
        (false, small, false),
        (true, &big, true),
        (false, &big, true),
        (true, "", false),
    ];
    for &(compress, text, expect_compressed) in cases {
        let frame = if compress {
            compressed_frame(true, TEXT, &deflate(text.as_bytes()))
        } else {
            client_frame(true, TEXT, text.as_bytes())
        };
        stream.write_all(&frame).unwrap();
        let (first, payload) = read_frame(&mut stream);
        assert_eq!(first & 0x0f, TEXT);
        assert_eq!(
            first & RSV1 != 0,
            expect_compressed,
            "{compress} {}",
            text.len()
        );
        let echoed = if first & RSV1 != 0 {
            assert!(payload.len() < text.len() / 3, "compressed well");
            inflate(&payload)
        } else {
            payload
        };
        assert_eq!(echoed, text.as_bytes());
        assert!(text.len() < COMPRESS_PAYLOAD_BYTES_MIN || expect_compressed);
    }
    // Binary too.
    let bytes = json_text(5000).into_bytes();
    stream
        .write_all(&compressed_frame(true, BINARY, &deflate(&bytes)))
        .unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x80 | RSV1 | BINARY);
    assert_eq!(inflate(&payload), bytes);
}

#[test]
fn fragmented_compressed_message_with_a_ping_between() {
    let (mut stream, _) = handshake(echo(), &["permessage-deflate"]);
    let text = json_text(30_000);
    let compressed = deflate(text.as_bytes());
    let pieces: Vec<&[u8]> = compressed.chunks(compressed.len() / 4 + 1).collect();
    let last = pieces.len() - 1;
    for (index, piece) in pieces.iter().enumerate() {
        let frame = if index == 0 {
            compressed_frame(index == last, TEXT, piece)
        } else {
            client_frame(index == last, CONTINUATION, piece)
        };
        stream.write_all(&frame).unwrap();
        if index == 1 {
            stream.write_all(&client_frame(true, PING, b"mid")).unwrap();
            assert_eq!(read_frame(&mut stream), (0x80 | PONG, b"mid".to_vec()));
        }
    }
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x80 | RSV1 | TEXT);
    assert_eq!(inflate(&payload), text.as_bytes());
    // RSV1 on a continuation frame is a protocol error (RFC 7692 §6.1).
    stream
        .write_all(&compressed_frame(false, TEXT, &compressed[..10]))
        .unwrap();
    stream
        .write_all(&compressed_frame(true, CONTINUATION, &compressed[10..20]))
        .unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x80 | CLOSE);
    assert_eq!(&payload[..2], &1002u16.to_be_bytes());
}

#[test]
fn zip_bomb_closes_1009_and_memory_stays_bounded() {
    let server = Server::start(&["--max-message-bytes", "65536"]);
    let before = status_kb(server.child.id(), "VmHWM");
    // 256 MiB of zeros deflate to about 256 KiB: sent in 4 fragments under the frame limit.
    let bomb = deflate(&vec![0u8; 256 * 1024 * 1024]);
    assert!(bomb.len() < 300 * 1024, "{}", bomb.len());
    let (mut stream, head) = handshake(server.addr, &["permessage-deflate"]);
    assert_eq!(extensions_answer(&head).as_deref(), Some(DEFAULT));
    let pieces: Vec<&[u8]> = bomb.chunks(60 * 1024).collect();
    for (index, piece) in pieces.iter().enumerate() {
        let fin = index == pieces.len() - 1;
        let frame = if index == 0 {
            compressed_frame(fin, TEXT, piece)
        } else {
            client_frame(fin, CONTINUATION, piece)
        };
        // The server may close after the first fragment; later writes may fail.
        if stream.write_all(&frame).is_err() {
            break;
        }
    }
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x80 | CLOSE);
    assert_eq!(&payload[..2], &1009u16.to_be_bytes(), "{payload:?}");
    // A single-frame bomb as well, small enough for the frame limit: 64 MiB in ~64 KiB.
    let bomb = deflate(&vec![b'a'; 48 * 1024 * 1024]);
    let (mut stream, _) = handshake(server.addr, &["permessage-deflate"]);
    stream
        .write_all(&compressed_frame(true, BINARY, &bomb))
        .unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x80 | CLOSE);
    assert_eq!(&payload[..2], &1009u16.to_be_bytes());
    let after = status_kb(server.child.id(), "VmHWM");
    assert!(
        after - before < 16 * 1024,
        "peak RSS grew by {} KiB inflating bombs of 256 MiB and 48 MiB",
        after - before
    );
}

/// Runs a Python `websockets` client script against `url`; returns its stdout.
fn python_client(script: &str, url: &str) -> String {
    let python = python_with(&["websockets"]);
    let output = Command::new(python)
        .args(["-c", script, url])
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// websockets (sync client) offers permessage-deflate by default; it writes 400 SKUs in four
/// compressed batches, subscribes to `*` (a big compressed snapshot) and reports what it saw.
const PYTHON_STOCK_CLIENT: &str = r#"
import json, sys
from websockets.sync.client import connect

url = sys.argv[1]
with connect(url, max_size=None) as ws:
    answer = ws.response.headers.get("Sec-WebSocket-Extensions")
    acked = 0
    for batch in range(4):
        ops = [{"id": f"py-{i}", "action": "set", "quantity": i}
               for i in range(batch * 100, batch * 100 + 100)]
        ws.send(json.dumps({"type": "stock_batch", "id": batch, "ops": ops}))
        ack = json.loads(ws.recv())
        acked += len(ack["stock"])
    ws.send(json.dumps({"type": "subscribe", "id": 2, "skus": ["*"]}))
    snapshot = json.loads(ws.recv())
    print(json.dumps({
        "answer": answer,
        "ack": ack["type"], "acked": acked,
        "snapshot": snapshot["type"], "states": len(snapshot["stock"]),
        "q399": [s["quantity"] for s in snapshot["stock"] if s["id"] == "py-399"],
    }))
"#;

#[test]
fn python_websockets_client_negotiates_and_round_trips() {
    let server = Server::start(&[]);
    let url = format!("ws://{}/ws?token={TOKEN}", server.addr);
    let out = python_client(PYTHON_STOCK_CLIENT, &url);
    let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(seen["answer"], DEFAULT, "{seen}");
    assert_eq!(seen["ack"], "ack");
    assert_eq!(seen["acked"], 400);
    assert_eq!(seen["snapshot"], "subscribed");
    assert_eq!(seen["states"], 400);
    assert_eq!(seen["q399"], serde_json::json!([399]));
    // The same client with compression off on the server: it connects without it.
    let server = Server::start(&["--compression", "off"]);
    let url = format!("ws://{}/ws?token={TOKEN}", server.addr);
    let seen: serde_json::Value =
        serde_json::from_str(python_client(PYTHON_STOCK_CLIENT, &url).trim()).unwrap();
    assert_eq!(seen["answer"], serde_json::Value::Null);
    assert_eq!(seen["states"], 400);
}

/// Reads frames until a text frame arrives; returns (compressed, inflated payload).
fn next_text(stream: &mut TcpStream) -> (bool, Vec<u8>) {
    loop {
        let (first, payload) = read_frame(stream);
        if first & 0x0f != TEXT {
            continue;
        }
        return if first & RSV1 != 0 {
            (true, inflate(&payload))
        } else {
            (false, payload)
        };
    }
}

#[test]
fn snapshots_compressed_once_updates_stay_plain() {
    let server = Server::start(&[]);
    // 1000 SKUs, written over a plain connection.
    let (mut writer, _) = raw_ws_at(server.addr, &format!("/ws?token={TOKEN}"));
    for batch in 0..10 {
        let ops: Vec<serde_json::Value> = (batch * 100..batch * 100 + 100)
            .map(|i| serde_json::json!({"id": format!("snap-{i}"), "action": "set", "quantity": i}))
            .collect();
        let batch = serde_json::json!({"type": "stock_batch", "ops": ops}).to_string();
        writer
            .write_all(&client_frame(true, TEXT, batch.as_bytes()))
            .unwrap();
        let (compressed, _) = next_text(&mut writer);
        assert!(!compressed, "no compression without an offer");
    }
    // Two subscribers, one compressing: the same snapshot, one of them deflated.
    let subscribe = br#"{"type":"subscribe","skus":["*"]}"#;
    let (mut deflating, _) = handshake(server.addr, &["permessage-deflate"]);
    let (mut plain, _) = handshake(server.addr, &[]);
    let mut snapshots = Vec::new();
    for stream in [&mut deflating, &mut plain] {
        stream
            .write_all(&client_frame(true, TEXT, subscribe))
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        snapshots.push(next_text(stream));
    }
    assert!(
        snapshots[0].0,
        "snapshot compressed for the negotiated client"
    );
    assert!(!snapshots[1].0, "plain for the other");
    assert_eq!(snapshots[0].1, snapshots[1].1);
    // An update is a small message: below the threshold it goes plain to both.
    let update = br#"{"type":"stock_update","stock":{"id":"snap-1","action":"set","quantity":7}}"#;
    writer.write_all(&client_frame(true, TEXT, update)).unwrap();
    for stream in [&mut deflating, &mut plain] {
        let (compressed, payload) = next_text(stream);
        assert!(!compressed);
        let update: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(update["stock"]["quantity"], 7);
    }
    let mut rest = Vec::new();
    let _ = plain.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = plain.read_to_end(&mut rest);
}
