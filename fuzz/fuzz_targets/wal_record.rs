//! Write-ahead-log records (src/wal/record.rs) on arbitrary bytes, as a record body read back
//! from disk: never a panic; a body that decodes re-encodes to a frame whose body decodes to the
//! same record and whose key `record_key` finds without decoding the states; and every proper
//! prefix of a decodable body is refused (a torn write never reads as a shorter record).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stocksync::wal::record::{
    decode_record, encode_record, record_key, record_seq, FRAME_HEADER_BYTES,
};

fuzz_target!(|data: &[u8]| {
    let Ok((seq, record)) = decode_record(data) else {
        // A body that does not decode may still name its sequence; it must not panic.
        let _ = record_seq(data);
        let _ = record_key(data);
        return;
    };
    assert_eq!(record_seq(data), Some(seq));
    let mut frame = Vec::new();
    // A record decoded from at most a fuzzer input is far below the frame limit.
    let len = encode_record(&mut frame, seq, &record).expect("fits a frame");
    assert_eq!(len, frame.len());
    let body = &frame[FRAME_HEADER_BYTES..];
    assert_eq!(decode_record(body), Ok((seq, record.clone())));
    let key = record_key(body).expect("a decodable body has a readable key");
    assert_eq!(key.map(|k| k.key.to_string()), record.key.map(|k| k.key));
    for cut in 0..data.len() {
        assert!(decode_record(&data[..cut]).is_err(), "prefix of {cut} bytes decoded");
    }
});
