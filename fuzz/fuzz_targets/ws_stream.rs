//! The WebSocket decoder (src/ws/codec.rs) on an arbitrary byte stream cut into arbitrary reads,
//! as the event loop drives it: never a panic, never a byte consumed beyond the buffer, never
//! more than the message limit buffered, and "need more" only while less than one whole frame
//! (`frame_bytes_max`) is buffered, so the caller's read buffer limit is never exceeded. After
//! an error the stream goes on one byte later, to exercise the decoder in every state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stocksync::ws::{Decoder, Message};

fuzz_target!(|data: &[u8]| {
    let [limit, chunk, ref stream @ ..] = *data else {
        return;
    };
    let message_bytes_max = usize::from(limit) * 4;
    let chunk = usize::from(chunk).max(1);
    let mut decoder = Decoder::new(message_bytes_max);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    while fed < stream.len() {
        let end = (fed + chunk).min(stream.len());
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(None) => {
                    assert!(
                        before < decoder.frame_bytes_max(),
                        "would read past the limit"
                    );
                    break;
                }
                Ok(Some((used, message))) => {
                    assert!(used >= 2 && used <= before);
                    if let Some(Message::Text(text))
                    | Some(Message::Close(Some(stocksync::ws::CloseFrame {
                        reason: text,
                        ..
                    }))) = message
                    {
                        assert!(std::str::from_utf8(text.as_bytes()).is_ok());
                    }
                    assert!(decoder.buffered_bytes() <= message_bytes_max);
                    buf.drain(..used);
                }
                Err(error) => {
                    let _ = error.close_code();
                    buf.drain(..1);
                }
            }
            if buf.is_empty() {
                break;
            }
        }
    }
});
