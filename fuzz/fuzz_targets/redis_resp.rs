//! `resp::parse` (src/engine/redis/resp.rs) on arbitrary bytes, as a Redis reply stream: never
//! a panic; a parsed reply uses no more than what is there, parses the same from its own bytes
//! alone, and no prefix of it is complete.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stocksync::engine::redis::resp::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((value, used))) = parse(data) {
        assert!(used > 0 && used <= data.len());
        assert_eq!(parse(&data[..used]), Ok(Some((value, used))));
        for cut in 0..used {
            assert!(!matches!(parse(&data[..cut]), Ok(Some(_))));
        }
    }
});
