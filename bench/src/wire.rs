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

/// The HTTP/1.1 upgrade request for `path` (which may carry `?token=`).
pub fn upgrade_request(host: &str, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WEBSOCKET_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
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
