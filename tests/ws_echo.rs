//! The echo service on the real core, driven by a real client (tungstenite) and by raw frames:
//! handshake, messages of every length encoding (RFC 6455 §5.2) echoed byte for byte,
//! fragmentation with control frames between the fragments (§5.4), ping/pong (§5.5.2-3) and the
//! closing handshake (§5.5.1, §7.1).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;

use common::opcode::*;
use common::*;
use stocksync::config::Limits;
use stocksync::ws::handshake;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

/// One echo server for the whole file, default limits (messages up to 1 MiB).
fn echo() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start_echo(Limits::default()))
}

fn client() -> Ws {
    let (ws, response) = tungstenite::connect(format!("ws://{}/any/path", echo())).unwrap();
    assert_eq!(response.status(), 101);
    set_timeout(&ws, std::time::Duration::from_secs(10));
    ws
}

/// A frame as the server sent it.
#[derive(Debug, PartialEq, Eq)]
struct ServerFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Reads one server frame, checking that no RSV bit is set.
fn read_frame(stream: &mut TcpStream) -> ServerFrame {
    let (first, payload) = common::read_frame(stream);
    assert_eq!(first & 0x70, 0, "server set RSV bits");
    ServerFrame {
        fin: first & 0x80 != 0,
        opcode: first & 0x0f,
        payload,
    }
}

/// A raw connection that has completed the handshake; no frame bytes are consumed with the 101.
fn raw_ws() -> TcpStream {
    let (stream, head) = raw_ws_at(echo(), "/chat");
    // RFC 6455 §1.3's worked example: this key must give this accept value.
    assert!(head.contains(&format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\n")));
    stream
}

#[test]
fn handshake_returns_the_rfc_accept_value_and_upgrade_headers() {
    let (_ws, response) = tungstenite::connect(format!("ws://{}/", echo())).unwrap();
    assert_eq!(response.status(), 101);
    let header = |name: &str| {
        response.headers()[name]
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
    };
    assert_eq!(header("upgrade"), "websocket");
    assert_eq!(header("connection"), "upgrade");
    // tungstenite already checked Sec-WebSocket-Accept; check the raw bytes too.
    drop(raw_ws());
    assert_eq!(
        handshake::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

/// A text of exactly `len` bytes mixing 1- to 4-byte characters.
fn text_of_len(len: usize) -> String {
    let mut text = String::with_capacity(len);
    for c in "aé€😀z".chars().cycle() {
        if text.len() + c.len_utf8() > len {
            break;
        }
        text.push(c);
    }
    while text.len() < len {
        text.push('.');
    }
    text
}

/// Every length encoding's edges: 7-bit (0, 125), 16-bit (126, 65535), 64-bit (65536) and
/// 1 MiB, which is also exactly the default message limit.
const SIZES: [usize; 6] = [0, 125, 126, 65535, 65536, 1024 * 1024];

#[test]
fn text_messages_of_every_length_encoding_are_echoed_exactly() {
    let mut ws = client();
    for len in SIZES {
        let text = text_of_len(len);
        assert_eq!(text.len(), len);
        ws.send(Message::text(text.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Text(got) => assert!(got == text, "text of {len} bytes differs"),
            other => panic!("expected text of {len} bytes, got {:?}", kind(&other)),
        }
    }
}

#[test]
fn binary_messages_of_every_length_encoding_are_echoed_exactly() {
    let mut ws = client();
    for len in SIZES {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        ws.send(Message::binary(data.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Binary(got) => assert!(got == data, "binary of {len} bytes differs"),
            other => panic!("expected binary of {len} bytes, got {:?}", kind(&other)),
        }
    }
}

fn kind(message: &Message) -> String {
    match message {
        Message::Text(t) => format!("text({})", t.len()),
        Message::Binary(b) => format!("binary({})", b.len()),
        other => format!("{other:?}"),
    }
}

#[test]
fn echoed_frames_use_the_shortest_length_encoding() {
    // RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the length".
    let mut stream = raw_ws();
    for (len, header_bytes) in [(125usize, 2usize), (126, 4), (65535, 4), (65536, 10)] {
        let payload = vec![b'x'; len];
        stream
            .write_all(&client_frame(true, BINARY, &payload))
            .unwrap();
        let mut head = vec![0u8; header_bytes];
        stream.read_exact(&mut head).unwrap();
        let expected_marker = match header_bytes {
            2 => len as u8,
            4 => 126,
            _ => 127,
        };
        assert_eq!(head[0], 0x80 | BINARY);
        assert_eq!(head[1], expected_marker, "length marker for {len}");
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).unwrap();
        assert_eq!(body, payload);
    }
}

#[test]
fn fragmented_message_with_pings_between_fragments() {
    let mut stream = raw_ws();
    let max_ping = [0x5au8; 125];
    let mut bytes = Vec::new();
    bytes.extend(client_frame(false, TEXT, "Hé".as_bytes()));
    bytes.extend(client_frame(true, PING, b"first"));
    // A character split across fragments: "€" is e2 82 ac.
    bytes.extend(client_frame(false, CONTINUATION, b"llo \xe2\x82"));
    bytes.extend(client_frame(true, PING, &max_ping));
    // An unsolicited pong is allowed anywhere and needs no answer (RFC 6455 §5.5.3).
    bytes.extend(client_frame(true, PONG, b"unsolicited"));
    bytes.extend(client_frame(false, CONTINUATION, b""));
    bytes.extend(client_frame(true, CONTINUATION, b"\xac world"));
    stream.write_all(&bytes).unwrap();

    let expected = [
        (PONG, b"first".to_vec()),
        (PONG, max_ping.to_vec()),
        (TEXT, "Héllo € world".as_bytes().to_vec()),
    ];
    for (opcode, payload) in expected {
        let frame = read_frame(&mut stream);
        assert_eq!(
            frame,
            ServerFrame {
                fin: true,
                opcode,
                payload
            }
        );
    }
}

#[test]
fn fragmented_binary_message_is_echoed_whole_in_one_frame() {
    let mut stream = raw_ws();
    let mut bytes = Vec::new();
    let mut whole = Vec::new();
    for i in 0..10u8 {
        let piece = vec![i; 1000 + i as usize];
        whole.extend_from_slice(&piece);
        let opcode = if i == 0 { BINARY } else { CONTINUATION };
        bytes.extend(client_frame(i == 9, opcode, &piece));
        bytes.extend(client_frame(true, PING, &[i]));
    }
    stream.write_all(&bytes).unwrap();
    for i in 0..10u8 {
        if i == 9 {
            // The message completes with the last fragment, which comes before the last ping.
            let frame = read_frame(&mut stream);
            assert_eq!((frame.fin, frame.opcode), (true, BINARY));
            assert!(frame.payload == whole, "reassembled message differs");
        }
        let pong = read_frame(&mut stream);
        assert_eq!(pong.opcode, PONG, "after fragment {i}");
        assert_eq!(pong.payload, vec![i]);
    }
}

#[test]
fn ping_is_answered_with_a_pong_carrying_its_payload() {
    let mut ws = client();
    for payload in [vec![], b"hello".to_vec(), vec![0xffu8; 125]] {
        ws.send(Message::Ping(payload.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Pong(got) => assert_eq!(got, payload),
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[test]
fn client_close_is_echoed_then_the_tcp_connection_closes() {
    let mut stream = raw_ws();
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice("bye ✓".as_bytes());
    stream
        .write_all(&client_frame(true, CLOSE, &payload))
        .unwrap();
    let frame = read_frame(&mut stream);
    assert_eq!((frame.fin, frame.opcode), (true, CLOSE));
    // RFC 6455 §5.5.1: the endpoint "typically echos the status code it received".
    assert_eq!(&frame.payload[..2], &1000u16.to_be_bytes());
    assert!(std::str::from_utf8(&frame.payload[2..]).is_ok());
    // §7.1.1: after the closing handshake the server closes the TCP connection first.
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn close_without_a_status_code_is_answered_and_closed() {
    let mut stream = raw_ws();
    stream.write_all(&client_frame(true, CLOSE, b"")).unwrap();
    let frame = read_frame(&mut stream);
    assert_eq!(frame.opcode, CLOSE);
    // An empty close may be answered empty or with 1000; never with 1005 on the wire.
    assert!(
        frame.payload.is_empty() || frame.payload[..2] == 1000u16.to_be_bytes(),
        "{:?}",
        frame.payload
    );
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn close_handshake_with_a_real_client() {
    let mut ws = client();
    ws.send(Message::text("before close")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("before close"));
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .unwrap();
    // tungstenite hands back the server's close reply, then reports the connection closed
    // once the server has closed TCP.
    let mut saw_reply = false;
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Normal);
                saw_reply = true;
            }
            Ok(Message::Close(None)) => saw_reply = true,
            Ok(other) => panic!("unexpected {other:?} after close"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake failed: {e}"),
        }
    }
    assert!(saw_reply, "no close frame came back");
}

#[test]
fn messages_after_the_close_frame_are_ignored() {
    // RFC 6455 §5.5.1: after sending a close frame the endpoint sends no more data; the server
    // must not echo data that follows the client's close.
    let mut stream = raw_ws();
    let mut bytes = client_frame(true, CLOSE, &1000u16.to_be_bytes());
    bytes.extend(client_frame(true, TEXT, b"too late"));
    stream.write_all(&bytes).unwrap();
    let frame = read_frame(&mut stream);
    assert_eq!(frame.opcode, CLOSE);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "server sent {rest:?} after its close");
}
