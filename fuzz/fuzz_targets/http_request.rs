//! HTTP request parsing (src/http/request.rs) on arbitrary bytes, under arbitrary limits, parsed
//! as a pipelined stream: never a panic, never a request past a limit, never a byte consumed
//! beyond the buffer, and "need more" only while the buffer is within head + body limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stocksync::http::request::{parse, Limits, HEADERS_MAX_LIMIT};

fuzz_target!(|data: &[u8]| {
    let [headers, head, body, ref bytes @ ..] = *data else {
        return;
    };
    let limits = Limits {
        headers_max: usize::from(headers) % (HEADERS_MAX_LIMIT + 1),
        head_bytes_max: usize::from(head) * 8,
        body_bytes_max: usize::from(body) * 4,
    };
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        match parse(rest, &limits) {
            Ok(Some((request, used))) => {
                assert!(
                    used > 0 && used <= rest.len(),
                    "consumed {used} of {}",
                    rest.len()
                );
                assert!(used <= limits.head_bytes_max + limits.body_bytes_max);
                assert!(request.headers.len() <= limits.headers_max);
                assert!(request.body.len() <= limits.body_bytes_max);
                at += used;
            }
            Ok(None) => {
                assert!(rest.len() <= limits.head_bytes_max + limits.body_bytes_max);
                return;
            }
            Err(error) => {
                assert!(matches!(error.status(), 400 | 411 | 413 | 431 | 505));
                return;
            }
        }
    }
});
