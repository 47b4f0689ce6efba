//! Every way a client can break RFC 6455 gets the right answer, read from a raw socket: a bad
//! handshake gets the right HTTP status (§4.2.1-4.2.2), and a bad frame fails the connection
//! (§7.1.7) with the right close code (§7.4.1), after which the server closes TCP. A client that
//! goes silent is pinged, then closed with 1001; one that answers the pings stays.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;

use common::opcode::*;
use common::*;
use stocksync::config::Limits;

const PROTOCOL_ERROR: u16 = 1002;
const INVALID_PAYLOAD: u16 = 1007;
const MESSAGE_TOO_BIG: u16 = 1009;

/// The message limit of the small-limit echo server.
const SMALL_MESSAGE_BYTES_MAX: usize = 1000;

fn echo() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start_echo(Limits::default()))
}

fn small_echo() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        start_echo(Limits {
            ws_message_bytes_max: SMALL_MESSAGE_BYTES_MAX,
            ..Limits::default()
        })
    })
}

/// A raw connection past the handshake (101 checked), no frame bytes consumed.
fn raw_ws(addr: SocketAddr) -> TcpStream {
    raw_ws_at(addr, "/").0
}

/// Reads frames until the server's close frame, checks its code and that the server then
/// closes the TCP connection. Returns the frames seen before the close.
fn expect_close(stream: &mut TcpStream, code: u16, case: &str) -> Vec<(u8, Vec<u8>)> {
    let mut before = Vec::new();
    loop {
        let (first, payload) = read_frame(stream);
        if first & 0x0f != CLOSE {
            before.push((first, payload));
            continue;
        }
        assert_eq!(first, 0x80 | CLOSE, "{case}: close frame must be final");
        assert!(payload.len() >= 2, "{case}: close without a code");
        assert!(payload.len() <= 125, "{case}: close frame too big");
        let got = u16::from_be_bytes([payload[0], payload[1]]);
        assert_eq!(got, code, "{case}: close code");
        // RFC 6455 §8.1: the reason must itself be UTF-8, or the client fails us in turn.
        assert!(
            std::str::from_utf8(&payload[2..]).is_ok(),
            "{case}: close reason is not UTF-8"
        );
        break;
    }
    let mut rest = Vec::new();
    let n = stream.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "{case}: bytes after the close frame: {rest:?}");
    before
}

/// Sends `bytes` on a fresh WebSocket connection and expects a close with `code` (see
/// `expect_close`); returns the frames before the close.
fn send_until_close(addr: SocketAddr, case: &str, bytes: &[u8], code: u16) -> Vec<(u8, Vec<u8>)> {
    let mut stream = raw_ws(addr);
    stream.write_all(bytes).unwrap();
    expect_close(&mut stream, code, case)
}

/// Sends `bytes` on a fresh WebSocket connection and expects a close with `code` and nothing
/// else before it.
fn check(addr: SocketAddr, case: &str, bytes: &[u8], code: u16) {
    let before = send_until_close(addr, case, bytes, code);
    assert!(
        before.is_empty(),
        "{case}: frames before the close: {before:?}"
    );
}

fn frames(list: &[(bool, u8, &[u8])]) -> Vec<u8> {
    list.iter()
        .flat_map(|&(fin, opcode, payload)| client_frame(fin, opcode, payload))
        .collect()
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

#[test]
fn unmasked_frame_is_a_protocol_error() {
    // RFC 6455 §5.1: the server MUST close on an unmasked client frame.
    check(echo(), "unmasked text", b"\x81\x05hello", PROTOCOL_ERROR);
    check(echo(), "unmasked ping", b"\x89\x00", PROTOCOL_ERROR);
}

#[test]
fn reserved_bits_are_a_protocol_error() {
    for rsv in [0x40u8, 0x20, 0x10, 0x70] {
        let mut frame = client_frame(true, TEXT, b"hi");
        frame[0] |= rsv;
        check(echo(), &format!("rsv {rsv:#x}"), &frame, PROTOCOL_ERROR);
    }
    // On a control frame and on a continuation too.
    let mut ping = client_frame(true, PING, b"");
    ping[0] |= 0x40;
    check(echo(), "rsv1 on ping", &ping, PROTOCOL_ERROR);
    let mut bytes = client_frame(false, TEXT, b"a");
    let mut continuation = client_frame(true, CONTINUATION, b"b");
    continuation[0] |= 0x20;
    bytes.extend(continuation);
    check(echo(), "rsv2 on continuation", &bytes, PROTOCOL_ERROR);
}

#[test]
fn reserved_opcodes_are_a_protocol_error() {
    for opcode in (3u8..=7).chain(11..=15) {
        check(
            echo(),
            &format!("opcode {opcode}"),
            &client_frame(true, opcode, b"x"),
            PROTOCOL_ERROR,
        );
    }
}

#[test]
fn control_frame_over_125_bytes_is_a_protocol_error() {
    for opcode in [PING, PONG, CLOSE] {
        let mut payload = vec![b'a'; 126];
        if opcode == CLOSE {
            payload[..2].copy_from_slice(&1000u16.to_be_bytes());
        }
        check(
            echo(),
            &format!("control {opcode:#x} of 126 bytes"),
            &client_frame(true, opcode, &payload),
            PROTOCOL_ERROR,
        );
    }
    // Refused from the header alone: the payload never has to arrive.
    let header_only = &client_frame(true, PING, &[0u8; 126])[..8];
    check(echo(), "oversized ping header", header_only, PROTOCOL_ERROR);
}

#[test]
fn fragmented_control_frame_is_a_protocol_error() {
    for opcode in [PING, PONG, CLOSE] {
        check(
            echo(),
            &format!("control {opcode:#x} without FIN"),
            &client_frame(false, opcode, b""),
            PROTOCOL_ERROR,
        );
    }
}

#[test]
fn bad_continuation_is_a_protocol_error() {
    let cases: &[(&str, Vec<u8>)] = &[
        (
            "continuation without a start",
            frames(&[(true, CONTINUATION, b"x")]),
        ),
        (
            "non-final continuation without a start",
            frames(&[(false, CONTINUATION, b"x")]),
        ),
        (
            "continuation after a complete message",
            frames(&[(true, TEXT, b"a"), (true, CONTINUATION, b"b")]),
        ),
        (
            "text inside a fragmented text",
            frames(&[(false, TEXT, b"a"), (true, TEXT, b"b")]),
        ),
        (
            "binary inside a fragmented text",
            frames(&[(false, TEXT, b"a"), (false, BINARY, b"b")]),
        ),
        (
            "text inside a fragmented binary, after a ping",
            frames(&[(false, BINARY, b"a"), (true, PING, b""), (true, TEXT, b"b")]),
        ),
    ];
    for (case, bytes) in cases {
        let before = send_until_close(echo(), case, bytes, PROTOCOL_ERROR);
        // Only what the valid frames before the violation earn: an echo, a pong.
        for (first, _) in before {
            assert!(
                first == 0x80 | TEXT || first == 0x80 | PONG,
                "{case}: unexpected frame {first:#x}"
            );
        }
    }
}

#[test]
fn invalid_utf8_in_a_text_message_is_1007() {
    let cases: &[(&str, Vec<u8>)] = &[
        ("lone continuation byte", frames(&[(true, TEXT, b"ab\x80")])),
        ("overlong encoding", frames(&[(true, TEXT, b"\xc0\xaf")])),
        ("surrogate", frames(&[(true, TEXT, b"\xed\xa0\x80")])),
        (
            "above U+10FFFF",
            frames(&[(true, TEXT, b"\xf4\x90\x80\x80")]),
        ),
        (
            "truncated at the end",
            frames(&[(true, TEXT, b"ok\xe2\x82")]),
        ),
        (
            "split across fragments",
            frames(&[(false, TEXT, b"ok \xe2\x82"), (true, CONTINUATION, b"(")]),
        ),
        (
            "unfinished when the message ends",
            frames(&[(false, TEXT, b"ok"), (true, CONTINUATION, b"\xf0\x9f\x98")]),
        ),
        (
            "bad in a middle fragment, after a ping",
            frames(&[
                (false, TEXT, b"fine "),
                (true, PING, b""),
                (false, CONTINUATION, b"\xff"),
                (true, CONTINUATION, b"end"),
            ]),
        ),
    ];
    for (case, bytes) in cases {
        let before = send_until_close(echo(), case, bytes, INVALID_PAYLOAD);
        assert!(
            before.iter().all(|(first, _)| *first == 0x80 | PONG),
            "{case}"
        );
    }
}

#[test]
fn invalid_utf8_fails_fast_before_the_message_ends() {
    // RFC 6455 §8.1: an endpoint must fail as soon as the bytes are known to be invalid, not at the
    // end of the message. Only a first fragment is sent; the message never ends.
    check(
        echo(),
        "invalid first fragment",
        &client_frame(false, TEXT, b"ok \xc3\x28 and more"),
        INVALID_PAYLOAD,
    );
}

#[test]
fn invalid_utf8_in_a_close_reason_is_1007() {
    check(
        echo(),
        "close reason \\xff",
        &client_frame(true, CLOSE, &close_payload(1000, b"bad \xff reason")),
        INVALID_PAYLOAD,
    );
    check(
        echo(),
        "close reason cut mid-character",
        &client_frame(true, CLOSE, &close_payload(1000, b"\xe2\x82")),
        INVALID_PAYLOAD,
    );
}

#[test]
fn invalid_close_codes_are_a_protocol_error() {
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        check(
            echo(),
            &format!("close code {code}"),
            &client_frame(true, CLOSE, &code.to_be_bytes()),
            PROTOCOL_ERROR,
        );
    }
}

#[test]
fn valid_close_codes_are_echoed() {
    // The other side of the table above: these must be accepted, not failed.
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1011, 3000, 3999, 4000, 4999,
    ] {
        send_until_close(
            echo(),
            &format!("valid close code {code}"),
            &client_frame(true, CLOSE, &close_payload(code, b"ok")),
            code,
        );
    }
}

#[test]
fn close_with_a_one_byte_payload_is_a_protocol_error() {
    check(
        echo(),
        "1-byte close",
        &client_frame(true, CLOSE, &[0x03]),
        PROTOCOL_ERROR,
    );
}

#[test]
fn sixty_four_bit_length_with_top_bit_set_is_a_protocol_error() {
    // RFC 6455 §5.2: the most significant bit of a 64-bit length MUST be 0.
    let mut bytes = vec![0x80 | BINARY, 0x80 | 127];
    bytes.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    bytes.extend_from_slice(&[1, 2, 3, 4]);
    check(echo(), "64-bit length MSB", &bytes, PROTOCOL_ERROR);
}

#[test]
fn message_over_the_limit_is_1009() {
    let max = SMALL_MESSAGE_BYTES_MAX;
    // At the limit: accepted and echoed.
    let mut stream = raw_ws(small_echo());
    stream
        .write_all(&client_frame(true, BINARY, &vec![7u8; max]))
        .unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!((first, payload.len()), (0x80 | BINARY, max));
    drop(stream);

    check(
        small_echo(),
        "one frame over the limit",
        &client_frame(true, TEXT, &vec![b'a'; max + 1]),
        MESSAGE_TOO_BIG,
    );
    // Refused from the header: only the header is sent, the payload never arrives.
    let header = &client_frame(true, BINARY, &vec![0u8; max + 1])[..8];
    check(
        small_echo(),
        "oversized header only",
        header,
        MESSAGE_TOO_BIG,
    );
    // A header announcing far more than any buffer may hold.
    let mut huge = vec![0x80 | BINARY, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    check(small_echo(), "1 TiB announced", &huge, MESSAGE_TOO_BIG);
    // Fragments each under the limit whose sum is over it, control frames in between.
    let half = vec![b'b'; max / 2 + 1];
    let bytes = frames(&[
        (false, TEXT, &half),
        (true, PING, b""),
        (true, CONTINUATION, &half),
    ]);
    let before = send_until_close(
        small_echo(),
        "fragments over the limit",
        &bytes,
        MESSAGE_TOO_BIG,
    );
    assert_eq!(before, vec![(0x80 | PONG, vec![])]);
}

#[test]
fn a_failed_connection_does_not_disturb_others() {
    let mut good = raw_ws(echo());
    check(echo(), "unmasked", b"\x81\x01x", PROTOCOL_ERROR);
    good.write_all(&client_frame(true, TEXT, b"still here"))
        .unwrap();
    assert_eq!(read_frame(&mut good), (0x81, b"still here".to_vec()));
}

// ---- Bad handshakes -> HTTP status -------------------------------------------------------

/// An HTTP response read until the server closed the connection.
struct HttpResponse {
    status: u16,
    head: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` and reads one response (head, then a `Content-Length` body). With
/// `expect_closed`, also checks that the server then closes the connection.
fn send_request(addr: SocketAddr, request: &str, expect_closed: bool) -> HttpResponse {
    let mut stream = raw(addr);
    stream.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut stream);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let response = HttpResponse { status, head };
    let length: usize = response
        .header("Content-Length")
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    if expect_closed {
        let n = stream.read(&mut [0u8; 1]).unwrap();
        assert_eq!(n, 0, "connection left open after {}", response.head);
    }
    response
}

const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

fn handshake(method: &str, version: &str, headers: &str) -> String {
    format!("{method} /ws HTTP/{version}\r\nHost: test\r\n{headers}\r\n")
}

/// A header the response must carry, with its value.
type RequiredHeader = Option<(&'static str, &'static str)>;

/// (case, request, status, required header)
fn bad_handshakes() -> Vec<(&'static str, String, u16, RequiredHeader)> {
    let full =
        format!("Upgrade: websocket\r\nConnection: Upgrade\r\n{KEY}Sec-WebSocket-Version: 13\r\n");
    let without = |line: &str| full.replace(line, "");
    vec![
        (
            "POST",
            handshake("POST", "1.1", &format!("{full}Content-Length: 0\r\n")),
            405,
            Some(("Allow", "GET")),
        ),
        (
            "PUT",
            handshake("PUT", "1.1", &format!("{full}Content-Length: 0\r\n")),
            405,
            Some(("Allow", "GET")),
        ),
        ("HTTP/1.0", handshake("GET", "1.0", &full), 400, None),
        (
            "no Upgrade",
            handshake("GET", "1.1", &without("Upgrade: websocket\r\n")),
            426,
            Some(("Upgrade", "websocket")),
        ),
        (
            "no Connection: Upgrade",
            handshake("GET", "1.1", &without("Connection: Upgrade\r\n")),
            400,
            None,
        ),
        (
            "Connection: keep-alive only",
            handshake(
                "GET",
                "1.1",
                &full.replace("Connection: Upgrade", "Connection: keep-alive"),
            ),
            400,
            None,
        ),
        (
            "version 12",
            handshake("GET", "1.1", &full.replace("Version: 13", "Version: 12")),
            426,
            Some(("Sec-WebSocket-Version", "13")),
        ),
        (
            "no version",
            handshake("GET", "1.1", &without("Sec-WebSocket-Version: 13\r\n")),
            426,
            Some(("Sec-WebSocket-Version", "13")),
        ),
        ("no key", handshake("GET", "1.1", &without(KEY)), 400, None),
        (
            "key of 15 bytes",
            handshake(
                "GET",
                "1.1",
                &full.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ"),
            ),
            400,
            None,
        ),
        (
            "key of 17 bytes",
            handshake(
                "GET",
                "1.1",
                &full.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZSE="),
            ),
            400,
            None,
        ),
        (
            "key not base64",
            handshake(
                "GET",
                "1.1",
                &full.replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!!!!!!!!!!!!!!!!!!!!!!"),
            ),
            400,
            None,
        ),
        (
            "key twice",
            handshake("GET", "1.1", &format!("{full}{KEY}")),
            400,
            None,
        ),
    ]
}

fn check_bad_handshakes(addr: SocketAddr, server: &str) {
    for (case, request, status, header) in bad_handshakes() {
        // A refused handshake ends the connection (the echo service answers a request without
        // Upgrade as plain HTTP, which may stay open).
        let expect_closed = !(server == "echo" && case == "no Upgrade");
        let response = send_request(addr, &request, expect_closed);
        assert_eq!(
            response.status, status,
            "{server}, {case}: {}",
            response.head
        );
        if let Some((name, value)) = header {
            assert_eq!(
                response.header(name),
                Some(value),
                "{server}, {case}: {}",
                response.head
            );
        }
        assert_eq!(
            response.header("Sec-WebSocket-Accept"),
            None,
            "{server}, {case}"
        );
    }
}

#[test]
fn bad_handshakes_get_the_right_status_from_the_echo_core() {
    check_bad_handshakes(echo(), "echo");
}

#[test]
fn bad_handshakes_get_the_right_status_from_stocksync() {
    // On /ws the server treats every request as a handshake, so a missing Upgrade is the
    // handshake's own 426 (not a fallback route).
    let server = Server::start(&[]);
    check_bad_handshakes(server.addr, "stocksync /ws");
}

#[test]
fn handshake_tokens_are_case_insensitive_and_listed() {
    // RFC 6455 §4.2.1: Upgrade contains "websocket" and Connection contains "Upgrade", as
    // case-insensitive tokens in comma-separated lists.
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: WebSocket\r\n\
         Connection: keep-alive, UPGRADE\r\n{KEY}Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut stream = raw(echo());
    stream.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 12];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
}

// ---- Heartbeats and the idle timeout ------------------------------------------------------

#[test]
fn silent_client_is_pinged_then_closed_with_1001() {
    let server = Server::start(&["--ping-interval", "1", "--idle-timeout", "2"]);
    let mut stream = raw(server.addr);
    raw_handshake(&mut stream, "/ws");
    // Never answering: the server pings, then gives up with "going away" (RFC 6455 §7.4.1).
    let before = expect_close(&mut stream, 1001, "idle timeout");
    assert!(
        before.iter().any(|(first, _)| *first == 0x80 | PING),
        "no ping before the idle close: {before:?}"
    );
    assert!(before.iter().all(|(first, _)| *first == 0x80 | PING));
}

#[test]
fn client_answering_pings_outlives_the_idle_timeout() {
    let server = Server::start(&["--ping-interval", "1", "--idle-timeout", "2"]);
    let mut stream = raw(server.addr);
    let leftover = raw_handshake(&mut stream, "/ws");
    assert!(leftover.is_empty());
    let started = std::time::Instant::now();
    let mut pongs = 0;
    // Twice the idle timeout, answering every ping as a browser would.
    while started.elapsed() < std::time::Duration::from_secs(4) {
        let (first, payload) = read_frame(&mut stream);
        assert_eq!(
            first,
            0x80 | PING,
            "unexpected frame {first:#x} {payload:?}"
        );
        stream
            .write_all(&client_frame(true, PONG, &payload))
            .unwrap();
        pongs += 1;
    }
    assert!(pongs >= 2, "only {pongs} pings in 4 s");
    // Still open and served.
    stream
        .write_all(&client_frame(true, TEXT, br#"{"type":"ping"}"#))
        .unwrap();
    loop {
        let (first, payload) = read_frame(&mut stream);
        if first == 0x80 | PING {
            continue;
        }
        assert_eq!(first, 0x80 | TEXT);
        let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(reply["type"], "pong");
        break;
    }
}
