//! permessage-deflate on arbitrary input (src/ws/extensions.rs, src/ws/deflate.rs, and the
//! decoder with compression negotiated): the `Sec-WebSocket-Extensions` parser never panics and
//! only ever agrees to a window of 8-15 bits; inflating arbitrary bytes as a compressed message
//! never panics and never hands out more than the limit; and a stream of frames with RSV1 set
//! decodes without a panic and with no message over the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stocksync::ws::deflate::{Inflate, InflateError};
use stocksync::ws::extensions;
use stocksync::ws::{Decoder, Message};

fuzz_target!(|data: &[u8]| {
    let [selector, limit, ref rest @ ..] = *data else {
        return;
    };
    let bytes_max = usize::from(limit) * 64;
    match selector % 3 {
        0 => {
            let headers = [("Sec-WebSocket-Extensions", rest)];
            if let Some(agreed) = extensions::negotiate(&headers) {
                assert!((8..=15).contains(&agreed.server_window_bits));
                assert!(agreed.response_value().starts_with("permessage-deflate"));
            }
        }
        1 => {
            let mut produced = 0usize;
            let mut sink = |chunk: &[u8]| {
                produced += chunk.len();
                if produced > bytes_max {
                    return Err(InflateError::TooBig {
                        bytes: produced as u64,
                    });
                }
                Ok(())
            };
            let mut inflate = Inflate::start();
            let cut = rest.len() / 2;
            if inflate.push(&rest[..cut], &mut sink).is_ok()
                && inflate.push(&rest[cut..], &mut sink).is_ok()
            {
                let _ = inflate.finish(&mut sink);
            }
        }
        _ => {
            let mut decoder = Decoder::new(bytes_max).with_compression(true);
            let mut buf = rest.to_vec();
            while !buf.is_empty() {
                match decoder.decode(&mut buf) {
                    Ok(None) | Err(_) => break,
                    Ok(Some((used, message))) => {
                        if let Some(Message::Text(text)) = message {
                            assert!(text.len() <= bytes_max);
                        }
                        if let Some(Message::Binary(bytes)) = message {
                            assert!(bytes.len() <= bytes_max);
                        }
                        assert!(used <= buf.len());
                        buf.drain(..used);
                    }
                }
            }
        }
    }
});
