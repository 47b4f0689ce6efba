//! HTTP/1.1 responses: build with [`Response`], then queue [`Response::to_bytes`] (or
//! [`Response::head_only`] for a HEAD request) on the connection.
//!
//! Framing is always by `Content-Length`, so a keep-alive client knows where the next response
//! starts; no chunked responses. Statuses that cannot have content (1xx, 204, 304; RFC 9110 §8.6,
//! RFC 9112 §6.3) get neither a `Content-Length` nor a body, so a `101 Switching Protocols` for a
//! WebSocket handshake is exactly the head the client expects.

use super::request::{Method, Request};

const STATUS_LINE_PREFIX: &[u8] = b"HTTP/1.1 ";
const CONTENT_LENGTH_PREFIX: &[u8] = b"Content-Length: ";
const CONNECTION_CLOSE_LINE: &[u8] = b"Connection: close\r\n";
const CRLF: &[u8] = b"\r\n";
/// `usize::MAX` has 20 decimal digits on 64-bit targets.
const DECIMAL_DIGITS_MAX: usize = 20;

/// The reason phrase for `status`, as named by RFC 9110 §15; `""` for a status we never send
/// (the phrase is optional on the wire, RFC 9112 §4).
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// A response waiting to be encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a response does nothing until it is encoded and queued"]
pub struct Response {
    /// Three-digit status code (100..=999).
    pub status: u16,
    /// Extra header fields in order. `Content-Length` is computed from `body`, so one given here
    /// is ignored. Values must not contain CR, LF or NUL; any that do are written as spaces, so a
    /// value echoing client input can never split the response.
    pub headers: Vec<(&'static str, String)>,
    /// The content; ignored for statuses that cannot have any (1xx, 204, 304).
    pub body: Vec<u8>,
    /// Whether the connection stays open afterwards. When false, `Connection: close` is sent
    /// and the caller closes once the bytes are written.
    pub keep_alive: bool,
}

impl Response {
    /// An empty keep-alive response.
    ///
    /// # Panics
    /// If `status` is not three digits: that is a bug in the caller, not client input.
    pub fn new(status: u16) -> Self {
        assert_status_valid(status);
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            keep_alive: true,
        }
    }

    /// Adds a header field (repeats are kept: `Set-Cookie`, `Vary`...).
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        debug_assert!(
            is_token(name),
            "header name {name:?} is not an RFC 9110 token"
        );
        self.headers.push((name, value.into()));
        self
    }

    /// Sets the body and its `Content-Type`, replacing any earlier `Content-Type`.
    pub fn body(mut self, content_type: &'static str, body: Vec<u8>) -> Self {
        self.headers
            .retain(|(name, _)| !name.eq_ignore_ascii_case("content-type"));
        self.body = body;
        self.header("Content-Type", content_type)
    }

    /// A response with a JSON body.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response::new(status).body("application/json", body)
    }

    /// A response with a plain UTF-8 text body.
    pub fn text(status: u16, body: &str) -> Self {
        Response::new(status).body("text/plain; charset=utf-8", body.as_bytes().to_vec())
    }

    /// Marks the connection to close after this response.
    pub fn close(mut self) -> Self {
        self.keep_alive = false;
        self
    }

    /// Fits the connection handling to what `request` allows (RFC 9112 §9.3): closes if the
    /// client did not ask to keep the connection, and for an HTTP/1.0 client that did, says
    /// `Connection: keep-alive`, without which it would expect the connection to close.
    pub fn for_request(self, request: &Request) -> Self {
        if !request.keep_alive() {
            self.close()
        } else if request.minor_version == 0 && self.keep_alive {
            self.header("Connection", "keep-alive")
        } else {
            self
        }
    }

    /// The whole response: status line, headers, `Content-Length`, `Connection: close` when not
    /// keeping alive, blank line, body. One allocation, sized exactly up front.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode(true)
    }

    /// The response to a HEAD request: the same head, including the `Content-Length` the body
    /// would have (RFC 9110 §9.3.2), and no body.
    pub fn head_only(&self) -> Vec<u8> {
        self.encode(false)
    }

    /// [`Response::head_only`] for a HEAD request, [`Response::to_bytes`] otherwise.
    pub fn to_bytes_for(&self, method: Method) -> Vec<u8> {
        self.encode(method != Method::Head)
    }

    /// Whether the status allows content (RFC 9110 §8.6: no `Content-Length` in 1xx and 204;
    /// RFC 9112 §6.3: 1xx, 204 and 304 end at the blank line).
    fn has_content(&self) -> bool {
        !matches!(self.status, 100..=199 | 204 | 304)
    }

    fn sent_headers(&self) -> impl Iterator<Item = &(&'static str, String)> {
        self.headers
            .iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("content-length"))
    }

    fn encoded_len(&self, include_body: bool) -> usize {
        let reason = reason(self.status);
        let mut len = STATUS_LINE_PREFIX.len() + 3 + 1 + reason.len() + CRLF.len();
        for (name, value) in self.sent_headers() {
            len += name.len() + 2 + value.len() + CRLF.len();
        }
        if self.has_content() {
            len += CONTENT_LENGTH_PREFIX.len() + decimal_len(self.body.len()) + CRLF.len();
            if include_body {
                len += self.body.len();
            }
        }
        if !self.keep_alive {
            len += CONNECTION_CLOSE_LINE.len();
        }
        len + CRLF.len()
    }

    fn encode(&self, include_body: bool) -> Vec<u8> {
        assert_status_valid(self.status);
        debug_assert!(
            self.has_content() || self.body.is_empty(),
            "status {} cannot have a body",
            self.status
        );
        let len = self.encoded_len(include_body);
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(STATUS_LINE_PREFIX);
        push_decimal(&mut out, usize::from(self.status));
        out.push(b' ');
        out.extend_from_slice(reason(self.status).as_bytes());
        out.extend_from_slice(CRLF);
        for (name, value) in self.sent_headers() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            // RFC 9110 §5.5: CR, LF and NUL are never valid in a field value; writing them
            // would let a value that echoes client input inject headers or a second response.
            out.extend(value.bytes().map(|byte| match byte {
                b'\r' | b'\n' | b'\0' => b' ',
                _ => byte,
            }));
            out.extend_from_slice(CRLF);
        }
        if self.has_content() {
            out.extend_from_slice(CONTENT_LENGTH_PREFIX);
            push_decimal(&mut out, self.body.len());
            out.extend_from_slice(CRLF);
        }
        if !self.keep_alive {
            out.extend_from_slice(CONNECTION_CLOSE_LINE);
        }
        out.extend_from_slice(CRLF);
        if include_body && self.has_content() {
            out.extend_from_slice(&self.body);
        }
        debug_assert_eq!(out.len(), len, "encoded_len disagrees with encode");
        out
    }
}

fn assert_status_valid(status: u16) {
    // RFC 9110 §15: a status code is exactly three digits.
    assert!(
        (100..=999).contains(&status),
        "status {status} is not a three-digit code"
    );
}

/// RFC 9110 §5.6.2 token characters, for checking our own header names.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

fn decimal_len(mut value: usize) -> usize {
    let mut digits = 1;
    while value >= 10 {
        value /= 10;
        digits += 1;
    }
    digits
}

/// Writes `value` in decimal without `format!`, which would allocate a `String` per response.
fn push_decimal(out: &mut Vec<u8>, mut value: usize) {
    let mut digits = [0u8; DECIMAL_DIGITS_MAX];
    let mut start = digits.len();
    loop {
        start -= 1;
        // The remainder is below 10, so the cast cannot truncate.
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_response_bytes_are_exact() {
        let response = Response::text(200, "ok");
        assert_eq!(
            response.to_bytes(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 2\r\n\r\nok"
        );
        assert_eq!(
            response.head_only(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 2\r\n\r\n"
        );
        assert_eq!(response.to_bytes_for(Method::Head), response.head_only());
        assert_eq!(response.to_bytes_for(Method::Get), response.to_bytes());
    }

    #[test]
    fn encoding_table() {
        let cases: Vec<(Response, &[u8])> = vec![
            (
                Response::new(404).close(),
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
            (
                Response::json(409, b"{}".to_vec()).header("Retry-After", "1"),
                b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
                  Content-Length: 2\r\n\r\n{}",
            ),
            (
                Response::new(101)
                    .header("Upgrade", "websocket")
                    .header("Connection", "Upgrade"),
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\n\r\n",
            ),
            (Response::new(204), b"HTTP/1.1 204 No Content\r\n\r\n"),
            (
                Response::new(599),
                b"HTTP/1.1 599 \r\nContent-Length: 0\r\n\r\n",
            ),
            (
                // A given Content-Length is ignored; the computed one is the only one sent.
                Response::text(200, "abc").header("Content-Length", "99"),
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
                  Content-Length: 3\r\n\r\nabc",
            ),
            (
                // A value echoing client input cannot split the response.
                Response::new(200).header("X-Sku", "a\r\nSet-Cookie: x\0"),
                b"HTTP/1.1 200 OK\r\nX-Sku: a  Set-Cookie: x \r\nContent-Length: 0\r\n\r\n",
            ),
            (
                // body() replaces the content type.
                Response::text(200, "x").body("application/json", b"[]".to_vec()),
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
                  \r\n[]",
            ),
        ];
        for (response, expected) in cases {
            let bytes = response.to_bytes();
            assert_eq!(bytes, expected, "{:?}", String::from_utf8_lossy(&bytes));
            assert_eq!(bytes.capacity(), bytes.len(), "sized up front");
        }
    }

    #[test]
    fn content_length_digits_at_every_power_of_ten() {
        for len in [0, 1, 9, 10, 99, 100, 999, 1000, 65_536] {
            let response = Response::new(200).body("application/octet-stream", vec![b'x'; len]);
            let bytes = response.to_bytes();
            let expected = format!("Content-Length: {len}\r\n");
            let head_end = bytes.len() - len;
            let head = std::str::from_utf8(&bytes[..head_end]).unwrap();
            assert!(head.contains(&expected), "{head:?}");
            assert_eq!(response.head_only().len(), head_end);
        }
        let mut out = Vec::new();
        push_decimal(&mut out, usize::MAX);
        assert_eq!(out, usize::MAX.to_string().as_bytes());
        assert_eq!(decimal_len(usize::MAX), usize::MAX.to_string().len());
    }

    #[test]
    fn every_status_we_use_has_its_reason() {
        let cases = [
            (101, "Switching Protocols"),
            (200, "OK"),
            (204, "No Content"),
            (400, "Bad Request"),
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (404, "Not Found"),
            (405, "Method Not Allowed"),
            (408, "Request Timeout"),
            (409, "Conflict"),
            (411, "Length Required"),
            (413, "Content Too Large"),
            (426, "Upgrade Required"),
            (429, "Too Many Requests"),
            (431, "Request Header Fields Too Large"),
            (500, "Internal Server Error"),
            (503, "Service Unavailable"),
            (505, "HTTP Version Not Supported"),
        ];
        for (status, phrase) in cases {
            assert_eq!(reason(status), phrase, "{status}");
        }
        assert_eq!(reason(299), "");
    }

    fn request(bytes: &[u8]) -> Request {
        super::super::request::parse(bytes, &Default::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn for_request_follows_the_client_keep_alive() {
        let cases: &[(&[u8], &[u8])] = &[
            (
                b"GET / HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
            ),
            (
                b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            ),
            (
                b"GET / HTTP/1.0\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            ),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n",
            ),
        ];
        for &(request_bytes, expected) in cases {
            let response = Response::new(204).for_request(&request(request_bytes));
            assert_eq!(response.to_bytes(), expected);
        }
        // A response already closing stays closing, without a contradicting keep-alive header.
        let closing = Response::new(204).close().for_request(&request(
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ));
        assert_eq!(
            closing.to_bytes(),
            b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    #[should_panic(expected = "three-digit")]
    fn two_digit_status_is_a_bug() {
        let _ = Response::new(99);
    }
}
