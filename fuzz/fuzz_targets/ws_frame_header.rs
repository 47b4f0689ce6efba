//! `FrameHeader::parse` (src/ws/frame.rs) on arbitrary bytes: never a panic; a parsed header
//! uses at most 14 bytes of what is there, obeys RFC 6455 §5.2/§5.5 (control frames final and
//! at most 125 bytes, 64-bit length below 2^63), and parses the same from its own bytes alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stocksync::ws::frame::{FrameHeader, CLIENT_HEADER_BYTES_MAX, CONTROL_PAYLOAD_BYTES_MAX};

fuzz_target!(|data: &[u8]| {
    match FrameHeader::parse(data) {
        Ok(Some((header, used))) => {
            assert!(used >= 2 && used <= data.len() && used <= CLIENT_HEADER_BYTES_MAX);
            assert!(header.payload_len < 1 << 63);
            if header.opcode.is_control() {
                assert!(header.fin);
                assert!(header.payload_len <= CONTROL_PAYLOAD_BYTES_MAX as u64);
            }
            assert_eq!(FrameHeader::parse(&data[..used]), Ok(Some((header, used))));
            // No prefix of a complete header is complete or an error.
            for cut in 0..used {
                assert_eq!(FrameHeader::parse(&data[..cut]), Ok(None));
            }
        }
        Ok(None) => assert!(data.len() < CLIENT_HEADER_BYTES_MAX),
        Err(error) => {
            let _ = error.close_code();
        }
    }
});
