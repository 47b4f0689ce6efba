//! Client side of RFC 6455 as a load tool needs it: the upgrade request, the status of the
//! response, masked client frames, and a frame reader that borrows from the read buffer.
//!
//! Nothing here allocates per frame: the hot path (`next_frame` + `stock_update_quantity`)
//! works on slices of the one big read buffer, so the tool spends its CPU on syscalls, not parsing.

/// A fixed key is allowed: the server only has to echo its hash (RFC 6455 §4.1 asks a browser for
/// a random one to defeat caching proxies, which loopback has none of).
const WEBSOCKET_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Response heads longer than this are refused rather than buffered forever.
const RESPONSE_HEAD_BYTES_MAX: usize = 8192;

pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;

/// The offer `--deflate` sends: permessage-deflate with no parameter but `client_max_window_bits`
/// (RFC 7692 §7.1.2.2: we can deflate with any window the server names; we never do, the tool's
/// messages stay plain). No `server_no_context_takeover`: a server is free to add it or not.
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// The 4 bytes a sender strips from the end of a compressed message and the receiver appends
/// before inflating (RFC 7692 §7.2.2).
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// An inflated message longer than this is refused (a zip bomb must not grow the tool's memory).
pub const INFLATED_BYTES_MAX: usize = 64 << 20;

/// RSV1: the message is compressed (RFC 7692 §6).
pub const RSV1_BIT: u8 = 0x40;

/// The HTTP/1.1 upgrade request for `path` (which may carry `?token=`), offering
/// permessage-deflate when `offer_deflate`.
pub fn upgrade_request(host: &str, path: &str, offer_deflate: bool) -> Vec<u8> {
    let extensions = if offer_deflate {
        format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
    } else {
        String::new()
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WEBSOCKET_KEY}\r\nSec-WebSocket-Version: 13\r\n{extensions}\r\n"
    )
    .into_bytes()
}

/// What the server agreed to, from the `Sec-WebSocket-Extensions` of its 101 response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateAnswer {
    /// `server_no_context_takeover`: every message inflates on its own, so one inflater reset
    /// per message serves all connections; without it each connection keeps its own.
    pub server_no_context_takeover: bool,
}

/// Reads the response head's `Sec-WebSocket-Extensions` (every such field, comma lists
/// included): `Ok(None)` when none, `Ok(Some(..))` for a valid permessage-deflate answer to
/// [`DEFLATE_OFFER`], `Err` for anything a client must fail the connection on (RFC 6455 §4.1: an
/// extension not offered; RFC 7692 §5, §7.1: an unknown, repeated or invalid parameter, or more
/// than one permessage-deflate). Not hot: once per connection.
pub fn deflate_answer(head: &[u8], offered: bool) -> Result<Option<DeflateAnswer>, String> {
    let head = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut answer = None;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("Sec-WebSocket-Extensions") {
            continue;
        }
        for extension in value.split(',').filter(|text| !text.trim().is_empty()) {
            let mut parts = extension.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            if !offered || !name.eq_ignore_ascii_case("permessage-deflate") {
                return Err(format!("extension not offered: `{}`", extension.trim()));
            }
            if answer.is_some() {
                return Err("permessage-deflate accepted twice".into());
            }
            answer = Some(deflate_parameters(parts)?);
        }
    }
    Ok(answer)
}

fn deflate_parameters<'a>(parts: impl Iterator<Item = &'a str>) -> Result<DeflateAnswer, String> {
    let mut seen: Vec<&str> = Vec::new();
    let mut answer = DeflateAnswer {
        server_no_context_takeover: false,
    };
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (part, None),
        };
        if seen.contains(&name) {
            return Err(format!("parameter repeated: {name}"));
        }
        seen.push(name);
        let window_ok = |value: Option<&str>| {
            value
                .and_then(|bits| bits.parse::<u8>().ok())
                .is_some_and(|bits| (8..=15).contains(&bits))
        };
        match (name, value) {
            ("server_no_context_takeover", None) => answer.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => {}
            // Any window from 8 to 15 inflates with our full 32 KiB one.
            ("server_max_window_bits" | "client_max_window_bits", value) if window_ok(value) => {}
            _ => return Err(format!("invalid parameter `{part}`")),
        }
    }
    Ok(answer)
}

/// One inflater for the connections whose server resets its compressor per message, and the
/// buffer messages inflate into; counters for the summary.
pub struct Inflater {
    shared: flate2::Decompress,
    pub out: Vec<u8>,
    pub messages: u64,
    pub compressed_bytes: u64,
    pub inflated_bytes: u64,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater {
            shared: flate2::Decompress::new(false),
            out: Vec::new(),
            messages: 0,
            compressed_bytes: 0,
            inflated_bytes: 0,
        }
    }
}

impl Inflater {
    /// Inflates one compressed message with the shared inflater (reset first: the server said
    /// `server_no_context_takeover`) or with the connection's own (`context`, kept across
    /// messages). The text is in `self.out`.
    pub fn inflate(
        &mut self,
        context: Option<&mut flate2::Decompress>,
        payload: &[u8],
    ) -> Result<&[u8], String> {
        let decompress = match context {
            Some(own) => own,
            None => {
                self.shared.reset(false);
                &mut self.shared
            }
        };
        inflate_message(decompress, payload, &mut self.out, INFLATED_BYTES_MAX)?;
        self.messages += 1;
        self.compressed_bytes += payload.len() as u64;
        self.inflated_bytes += self.out.len() as u64;
        Ok(&self.out)
    }
}

/// Inflates `payload` (raw deflate, its 00 00 ff ff tail stripped, RFC 7692 §7.2.2) into `out`,
/// refusing more than `max` bytes.
pub fn inflate_message(
    decompress: &mut flate2::Decompress,
    payload: &[u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), String> {
    out.clear();
    for part in [payload, &DEFLATE_TAIL[..]] {
        let mut input = part;
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(out.len().max(4096));
            }
            let before = decompress.total_in();
            let status = decompress
                .decompress_vec(input, out, flate2::FlushDecompress::Sync)
                .map_err(|error| format!("inflate: {error}"))?;
            input = &input[(decompress.total_in() - before) as usize..];
            if out.len() > max {
                return Err(format!("inflated message over {max} bytes"));
            }
            // Done with this part once its input is used up and the output did not fill up
            // (a full buffer may hide more output).
            let room_left = out.len() < out.capacity();
            if status == flate2::Status::StreamEnd || (input.is_empty() && room_left) {
                break;
            }
        }
    }
    Ok(())
}

/// What the bytes read so far say about the upgrade response.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseHead {
    /// The head is not complete yet.
    Partial,
    /// `101 Switching Protocols`; frames start at this offset.
    Upgraded(usize),
    /// Any other status (0 when the head is malformed or too long).
    Refused(u16),
}

pub fn parse_response_head(buf: &[u8]) -> ResponseHead {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > RESPONSE_HEAD_BYTES_MAX {
            ResponseHead::Refused(0)
        } else {
            ResponseHead::Partial
        };
    };
    // "HTTP/1.1 101 ..."
    let status = buf
        .get(9..12)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse::<u16>().ok())
        .unwrap_or(0);
    if status == 101 && buf.starts_with(b"HTTP/1.1 ") {
        ResponseHead::Upgraded(end + 4)
    } else {
        ResponseHead::Refused(status)
    }
}

/// The benchmark contract's subscribe-to-everything message, as a masked client frame.
pub fn subscribe_all_frame(key: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_client_frame(
        &mut frame,
        OPCODE_TEXT,
        br#"{"type":"subscribe","skus":["*"]}"#,
        key,
    );
    frame
}

/// A subscribe to one SKU only, as a masked client frame (several load-tool processes, each with
/// its own SKU, on one inventory).
pub fn subscribe_one_frame(sku: &str, key: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::new();
    let payload = format!(r#"{{"type":"subscribe","skus":["{sku}"]}}"#);
    encode_client_frame(&mut frame, OPCODE_TEXT, payload.as_bytes(), key);
    frame
}

/// Appends a masked client frame (RFC 6455 §5.2, §5.3) with FIN set.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, byte)| byte ^ mask[i & 3]),
    );
}

/// One frame borrowed from the read buffer.
pub struct Frame<'a> {
    pub opcode: u8,
    /// RSV1: a compressed message (permessage-deflate).
    pub compressed: bool,
    pub payload: &'a [u8],
}

/// What the start of `buf` holds.
pub enum NextFrame<'a> {
    /// A complete frame and the bytes it took.
    Complete(Frame<'a>, usize),
    /// Not a whole frame yet: keep the bytes and read more.
    Partial,
}

/// Reads the frame at the start of `buf`. Server frames are unmasked (RFC 6455 §5.1); a masked
/// one is still stepped over correctly, its payload just stays masked.
pub fn next_frame(buf: &[u8]) -> NextFrame<'_> {
    if buf.len() < 2 {
        return NextFrame::Partial;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at): (u64, usize) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return NextFrame::Partial;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return NextFrame::Partial;
            }
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(bytes), 10)
        }
        short => (u64::from(short), 2),
    };
    if masked {
        at += 4;
    }
    let Ok(len) = usize::try_from(len) else {
        return NextFrame::Partial;
    };
    let Some(end) = at.checked_add(len) else {
        return NextFrame::Partial;
    };
    if buf.len() < end {
        return NextFrame::Partial;
    }
    NextFrame::Complete(
        Frame {
            opcode,
            compressed: buf[0] & RSV1_BIT != 0,
            payload: &buf[at..end],
        },
        end,
    )
}

/// `Some(K)` when `payload` is a `stock_update` carrying `"quantity":K`.
///
/// Deliberately not a JSON parser: stocksync writes `{"type":"stock_update","stock":{...}}` and
/// the peers re-broadcast the publisher's own `{"type":"stock_update","stock":{...}}`, so the type
/// sits in the first bytes and `"quantity":` appears once.
pub fn stock_update_quantity(payload: &[u8]) -> Option<u64> {
    let head = &payload[..payload.len().min(40)];
    find(head, b"\"stock_update\"")?;
    let at = find(payload, b"\"quantity\":")? + b"\"quantity\":".len();
    let mut digits = payload[at..]
        .iter()
        .skip_while(|byte| **byte == b' ')
        .peekable();
    digits.peek().filter(|byte| byte.is_ascii_digit())?;
    let mut value: u64 = 0;
    for byte in digits.take_while(|byte| byte.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
    }
    Some(value)
}

/// The value of `"field":"..."` in a JSON text, for reply types and error codes (not hot).
pub fn string_field<'a>(payload: &'a [u8], field: &str) -> Option<&'a str> {
    let key = format!("\"{field}\":\"");
    let at = find(payload, key.as_bytes())? + key.len();
    let len = payload[at..].iter().position(|byte| *byte == b'"')?;
    std::str::from_utf8(&payload[at..at + len]).ok()
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while from + needle.len() <= haystack.len() {
        let offset = haystack[from..].iter().position(|byte| *byte == first)?;
        let at = from + offset;
        if haystack.len() - at < needle.len() {
            return None;
        }
        if &haystack[at..at + needle.len()] == needle {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantity_is_read_from_both_stocksync_and_peer_forms() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (
                br#"{"type":"stock_update","stock":{"id":"sku-1","quantity":42,"on_hand":42,"reserved":0,"version":7}}"#,
                Some(42),
            ),
            (
                br#"{"type":"stock_update","stock":{"id":"sku-1","action":"set","quantity":1234567}}"#,
                Some(1234567),
            ),
            (br#"{"type":"subscribed","stock":[{"id":"sku-1","quantity":3}]}"#, None),
            (br#"{"type":"ack","stock":{"id":"sku-1","quantity":3}}"#, None),
            (br#"{"type":"stock_update","stock":{"id":"sku-1","quantity":"x"}}"#, None),
        ];
        for (payload, expected) in cases {
            assert_eq!(
                stock_update_quantity(payload),
                *expected,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn a_frame_split_at_every_byte_is_partial_until_whole() {
        let mut frame = vec![0x81, 126, 0, 200];
        frame.extend([b'a'; 200]);
        for cut in 0..frame.len() {
            assert!(
                matches!(next_frame(&frame[..cut]), NextFrame::Partial),
                "cut {cut}"
            );
        }
        match next_frame(&frame) {
            NextFrame::Complete(parsed, used) => {
                assert_eq!(
                    (parsed.opcode, parsed.payload.len(), used),
                    (OPCODE_TEXT, 200, 204)
                );
            }
            NextFrame::Partial => panic!("whole frame reported partial"),
        }
    }

    #[test]
    fn client_frames_unmask_to_the_payload() {
        let mut out = Vec::new();
        encode_client_frame(&mut out, OPCODE_TEXT, b"hello", [1, 2, 3, 4]);
        assert_eq!(out[1], 0x80 | 5);
        let unmasked: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i & 3])
            .collect();
        assert_eq!(unmasked, b"hello");
    }

    /// A frame as stocksync's `ws::deflate` makes it: raw deflate, sync flush, tail stripped.
    fn compressed_frame(text: &[u8]) -> Vec<u8> {
        let mut deflate = flate2::Compress::new(flate2::Compression::fast(), false);
        let mut body = Vec::with_capacity(text.len() + 64);
        deflate
            .compress_vec(text, &mut body, flate2::FlushCompress::Sync)
            .expect("deflate");
        assert_eq!(body[body.len() - 4..], DEFLATE_TAIL);
        body.truncate(body.len() - 4);
        let mut frame = vec![0x80 | RSV1_BIT | OPCODE_TEXT, 126];
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn a_compressed_frame_inflates_to_its_text() {
        let text: Vec<u8> = (0..200)
            .flat_map(|i| format!(r#"{{"id":"sku-{i}","quantity":{i}}},"#).into_bytes())
            .collect();
        let frame = compressed_frame(&text);
        assert!(frame.len() < text.len() / 2);
        let NextFrame::Complete(parsed, used) = next_frame(&frame) else {
            panic!("whole frame reported partial");
        };
        assert_eq!(
            (parsed.opcode, parsed.compressed, used),
            (OPCODE_TEXT, true, frame.len())
        );
        let mut inflater = Inflater::default();
        // Twice through the shared inflater: the reset between messages must work.
        for _ in 0..2 {
            assert_eq!(inflater.inflate(None, parsed.payload).unwrap(), &text[..]);
        }
        assert_eq!(inflater.messages, 2);
        let mut out = Vec::new();
        let mut small = flate2::Decompress::new(false);
        let refused = inflate_message(&mut small, parsed.payload, &mut out, 1000);
        assert!(refused.is_err(), "a message over the limit must be refused");
        let NextFrame::Complete(plain, _) = next_frame(&[0x81, 2, b'o', b'k']) else {
            panic!("plain frame");
        };
        assert!(!plain.compressed);
    }

    #[test]
    fn deflate_answers() {
        let head = |value: &str| {
            format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: {value}\r\n\r\n")
        };
        let stocksync =
            head("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        let shared = DeflateAnswer {
            server_no_context_takeover: true,
        };
        assert_eq!(deflate_answer(stocksync.as_bytes(), true), Ok(Some(shared)));
        let own = head("permessage-deflate; client_max_window_bits=10");
        assert_eq!(
            deflate_answer(own.as_bytes(), true),
            Ok(Some(DeflateAnswer {
                server_no_context_takeover: false
            }))
        );
        let declined = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(deflate_answer(declined, true), Ok(None));
        for bad in [
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; mystery",
            "permessage-deflate, permessage-deflate",
            "x-webkit-deflate-frame",
        ] {
            assert!(deflate_answer(head(bad).as_bytes(), true).is_err(), "{bad}");
        }
        assert!(deflate_answer(stocksync.as_bytes(), false).is_err());
    }

    #[test]
    fn response_heads() {
        assert_eq!(
            parse_response_head(b"HTTP/1.1 101 Switching"),
            ResponseHead::Partial
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81"),
            ResponseHead::Upgraded(36)
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 401 No\r\n\r\n"),
            ResponseHead::Refused(401)
        );
    }
}
