//! The server's side of the opening handshake (RFC 6455 §4.2).
//!
//! Independent of the HTTP parser: [`validate`] takes the request method, the HTTP minor version and
//! the header fields as name/value pairs (what `httparse::Request` provides), and returns the client's
//! key. [`response_101`] and [`rejection`] produce complete HTTP responses as bytes.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest as _, Sha1};

/// Appended to the client's key before hashing (RFC 6455 §1.3, §4.2.2).
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version we speak (RFC 6455 §4.1, §11.3.5).
pub const VERSION: &str = "13";

/// Bytes of the nonce a `Sec-WebSocket-Key` carries, base64-encoded (RFC 6455 §4.1).
pub const KEY_NONCE_BYTES: usize = 16;

/// Why a request cannot be upgraded to a WebSocket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// The method was not `GET` (RFC 6455 §4.1).
    MethodNotGet,
    /// HTTP/1.0: the handshake needs HTTP/1.1 or later (RFC 6455 §4.1).
    HttpVersionTooOld,
    /// No `Upgrade` header with the token `websocket` (RFC 6455 §4.2.1 item 3).
    MissingUpgrade,
    /// No `Connection` header with the token `Upgrade` (RFC 6455 §4.2.1 item 4).
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` absent or not 13 (RFC 6455 §4.2.1 item 6, §4.4).
    UnsupportedVersion {
        /// The version(s) the client asked for, if any (lossily decoded, comma-joined if repeated).
        got: Option<String>,
    },
    /// No `Sec-WebSocket-Key` header (RFC 6455 §4.2.1 item 5).
    MissingKey,
    /// A `Sec-WebSocket-Key` that is repeated or is not the base64 of 16 bytes (RFC 6455 §4.1,
    /// §11.3.1).
    BadKey,
}

impl HandshakeError {
    /// The HTTP status to refuse the request with.
    ///
    /// 405 for the method (RFC 9110 §15.5.6); 426 when the client must upgrade to something we speak
    /// (RFC 9110 §15.5.22, RFC 6455 §4.2.2 item 4 for the version); 400 for the rest (RFC 6455
    /// §4.2.1: "the server MUST stop processing the client's handshake and return an HTTP response
    /// with an appropriate error code (such as 400 Bad Request)").
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::MethodNotGet => 405,
            HandshakeError::UnsupportedVersion { .. } | HandshakeError::MissingUpgrade => 426,
            HandshakeError::HttpVersionTooOld
            | HandshakeError::MissingConnectionUpgrade
            | HandshakeError::MissingKey
            | HandshakeError::BadKey => 400,
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::MethodNotGet => write!(f, "WebSocket handshake must use GET"),
            HandshakeError::HttpVersionTooOld => {
                write!(f, "WebSocket handshake needs HTTP/1.1 or later")
            }
            HandshakeError::MissingUpgrade => write!(f, "missing 'Upgrade: websocket' header"),
            HandshakeError::MissingConnectionUpgrade => {
                write!(f, "missing 'Connection: Upgrade' header")
            }
            HandshakeError::UnsupportedVersion { got: None } => write!(
                f,
                "missing Sec-WebSocket-Version header (supported: {VERSION})"
            ),
            HandshakeError::UnsupportedVersion { got: Some(got) } => write!(
                f,
                "unsupported Sec-WebSocket-Version {got:?} (supported: {VERSION})"
            ),
            HandshakeError::MissingKey => write!(f, "missing Sec-WebSocket-Key header"),
            HandshakeError::BadKey => write!(
                f,
                "Sec-WebSocket-Key must appear once and be base64 of {KEY_NONCE_BYTES} bytes"
            ),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)) (RFC 6455 §4.2.2 item 5.4).
///
/// `key` is used as sent (after trimming, which [`validate`] does); it is not base64-decoded.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(GUID.as_bytes());
    STANDARD.encode(sha1.finalize())
}

/// Checks that a request is a valid WebSocket opening handshake (RFC 6455 §4.2.1) and returns its
/// `Sec-WebSocket-Key` value with surrounding whitespace trimmed.
///
/// `http_minor_version` is the `x` of `HTTP/1.x` (httparse's `version`). Header names are compared
/// case-insensitively (RFC 9110 §5.1); `Upgrade` and `Connection` are comma-separated lists whose
/// tokens are compared case-insensitively (RFC 6455 §4.2.1), and repeated fields are read as one list
/// (RFC 9110 §5.3). Checks run in the order of the [`HandshakeError`] variants, so the first problem
/// is the one reported.
pub fn validate<'h>(
    method: &str,
    http_minor_version: u8,
    headers: &[(&'h str, &'h [u8])],
) -> Result<&'h [u8], HandshakeError> {
    // Methods are case-sensitive (RFC 9110 §9.1).
    if method != "GET" {
        return Err(HandshakeError::MethodNotGet);
    }
    if http_minor_version < 1 {
        return Err(HandshakeError::HttpVersionTooOld);
    }
    if !values(headers, "Upgrade").any(|value| has_token(value, "websocket")) {
        return Err(HandshakeError::MissingUpgrade);
    }
    if !values(headers, "Connection").any(|value| has_token(value, "Upgrade")) {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    let mut versions = values(headers, "Sec-WebSocket-Version");
    match (versions.next(), versions.next()) {
        (Some(version), None) if version.trim_ascii() == VERSION.as_bytes() => {}
        (None, _) => return Err(HandshakeError::UnsupportedVersion { got: None }),
        _ => {
            // Rare and refused: allocating to report it is fine.
            let got = values(headers, "Sec-WebSocket-Version")
                .map(|value| String::from_utf8_lossy(value.trim_ascii()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(HandshakeError::UnsupportedVersion { got: Some(got) });
        }
    }
    let mut keys = values(headers, "Sec-WebSocket-Key");
    let key = match (keys.next(), keys.next()) {
        (None, _) => return Err(HandshakeError::MissingKey),
        // RFC 6455 §11.3.1: it "MUST NOT appear more than once in an HTTP request".
        (Some(_), Some(_)) => return Err(HandshakeError::BadKey),
        (Some(key), None) => key.trim_ascii(),
    };
    if !is_valid_key(key) {
        return Err(HandshakeError::BadKey);
    }
    Ok(key)
}

/// RFC 6455 §4.1: "a base64-encoded value that, when decoded, is 16 bytes in length".
fn is_valid_key(key: &[u8]) -> bool {
    // 16 bytes encode to 24 characters; the decoder wants room for its estimate of 18 bytes, and a
    // longer key fails with OutputSliceTooSmall, which is the answer we want anyway.
    let mut decoded = [0u8; 24];
    matches!(
        STANDARD.decode_slice(key, &mut decoded),
        Ok(KEY_NONCE_BYTES)
    )
}

/// Values of every header field called `name`, compared case-insensitively.
fn values<'h, 'n>(
    headers: &'n [(&'h str, &'h [u8])],
    name: &'n str,
) -> impl Iterator<Item = &'h [u8]> + 'n
where
    'h: 'n,
{
    headers
        .iter()
        .filter(move |(header, _)| header.eq_ignore_ascii_case(name))
        .map(|&(_, value)| value)
}

/// Whether a comma-separated header value contains `token`, case-insensitively.
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The `101 Switching Protocols` response accepting the handshake (RFC 6455 §4.2.2 item 5).
///
/// `key` is the value [`validate`] returned.
pub fn response_101(key: &[u8]) -> Vec<u8> {
    response_101_with(key, None)
}

/// [`response_101`] with a `Sec-WebSocket-Extensions` field when extensions were agreed
/// (RFC 6455 §4.2.2 item 5.5; the value comes from [`super::extensions::Agreement`]).
pub fn response_101_with(key: &[u8], extensions: Option<&str>) -> Vec<u8> {
    let accept = accept_key(key);
    let mut response = Vec::with_capacity(128);
    response.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\n\
          Upgrade: websocket\r\n\
          Connection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    response.extend_from_slice(accept.as_bytes());
    if let Some(extensions) = extensions {
        response.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        response.extend_from_slice(extensions.as_bytes());
    }
    response.extend_from_slice(b"\r\n\r\n");
    response
}

/// A complete HTTP/1.1 response refusing the handshake, after which the connection is closed.
///
/// 426 responses carry `Upgrade: websocket` (RFC 9110 §15.5.22: a 426 MUST name the protocol to
/// upgrade to) and, for a version problem, `Sec-WebSocket-Version: 13` (RFC 6455 §4.2.2 item 4); a 405
/// carries `Allow: GET` (RFC 9110 §15.5.6). The body is the error's message as plain text.
pub fn rejection(err: &HandshakeError) -> Vec<u8> {
    let status = err.status();
    let reason = match status {
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        _ => "Bad Request",
    };
    let mut extra_headers = String::new();
    match err {
        HandshakeError::MethodNotGet => extra_headers.push_str("Allow: GET\r\n"),
        HandshakeError::MissingUpgrade => extra_headers.push_str("Upgrade: websocket\r\n"),
        HandshakeError::UnsupportedVersion { .. } => {
            extra_headers.push_str("Upgrade: websocket\r\n");
            extra_headers.push_str("Sec-WebSocket-Version: ");
            extra_headers.push_str(VERSION);
            extra_headers.push_str("\r\n");
        }
        HandshakeError::HttpVersionTooOld
        | HandshakeError::MissingConnectionUpgrade
        | HandshakeError::MissingKey
        | HandshakeError::BadKey => {}
    }
    // Every error body of the server is JSON (PROTOCOL.md "Limits"), handshake ones included.
    let body = serde_json::json!({"error": {"code": "bad_request", "message": err.to_string()}})
        .to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\n\
         {extra_headers}\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         \r\n\
         {body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";
    /// RFC 6455 §1.3's worked example.
    const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    type Headers = Vec<(&'static str, &'static [u8])>;

    /// The headers of RFC 6455 §1.2's example request.
    fn good_headers() -> Headers {
        vec![
            ("Host", b"server.example.com"),
            ("Upgrade", b"websocket"),
            ("Connection", b"Upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Origin", b"http://example.com"),
            ("Sec-WebSocket-Protocol", b"chat, superchat"),
            ("Sec-WebSocket-Version", b"13"),
        ]
    }

    /// `good_headers` with every `remove` field removed (case-insensitively) and `extra` appended.
    fn headers_with(remove: &str, extra: &[(&'static str, &'static [u8])]) -> Headers {
        let mut headers: Vec<_> = good_headers()
            .into_iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case(remove))
            .collect();
        headers.extend_from_slice(extra);
        headers
    }

    #[test]
    fn accept_key_rfc_6455_example() {
        assert_eq!(accept_key(RFC_KEY), RFC_ACCEPT);
    }

    #[test]
    fn validate_accepts_table() {
        /// (name, headers, expected key)
        type Case = (&'static str, Headers, &'static [u8]);
        let cases: &[Case] = &[
            ("RFC 6455 §1.2 example", good_headers(), RFC_KEY),
            (
                "names and tokens in any case",
                vec![
                    ("upgrade", b"WebSocket"),
                    ("CONNECTION", b"upgrade"),
                    ("sec-websocket-key", RFC_KEY),
                    ("SEC-WEBSOCKET-VERSION", b"13"),
                ],
                RFC_KEY,
            ),
            (
                "token lists with whitespace",
                headers_with(
                    "Connection",
                    &[
                        ("Connection", b"keep-alive, Upgrade"),
                        ("Upgrade", b"h2c,  websocket "),
                    ],
                ),
                RFC_KEY,
            ),
            (
                "Connection repeated as separate fields",
                headers_with(
                    "Connection",
                    &[("Connection", b"keep-alive"), ("Connection", b"Upgrade")],
                ),
                RFC_KEY,
            ),
            (
                "key and version padded with whitespace",
                headers_with(
                    "Sec-WebSocket-Key",
                    &[("Sec-WebSocket-Key", b" dGhlIHNhbXBsZSBub25jZQ== \t")],
                ),
                RFC_KEY,
            ),
        ];
        for (name, headers, key) in cases {
            for minor in [1, 2] {
                assert_eq!(validate("GET", minor, headers), Ok(*key), "{name}");
            }
        }
    }

    #[test]
    fn validate_errors_table() {
        use HandshakeError::*;
        /// (name, method, HTTP minor version, headers, expected error)
        type Case = (&'static str, &'static str, u8, Headers, HandshakeError);
        let cases: Vec<Case> = vec![
            ("POST", "POST", 1, good_headers(), MethodNotGet),
            ("lower-case get", "get", 1, good_headers(), MethodNotGet),
            ("HTTP/1.0", "GET", 0, good_headers(), HttpVersionTooOld),
            (
                "no Upgrade",
                "GET",
                1,
                headers_with("Upgrade", &[]),
                MissingUpgrade,
            ),
            (
                "Upgrade without websocket token",
                "GET",
                1,
                headers_with("Upgrade", &[("Upgrade", b"websockets, h2c")]),
                MissingUpgrade,
            ),
            (
                "no Connection",
                "GET",
                1,
                headers_with("Connection", &[]),
                MissingConnectionUpgrade,
            ),
            (
                "Connection without Upgrade token",
                "GET",
                1,
                headers_with("Connection", &[("Connection", b"keep-alive, upgrades")]),
                MissingConnectionUpgrade,
            ),
            (
                "no version",
                "GET",
                1,
                headers_with("Sec-WebSocket-Version", &[]),
                UnsupportedVersion { got: None },
            ),
            (
                "version 8",
                "GET",
                1,
                headers_with("Sec-WebSocket-Version", &[("Sec-WebSocket-Version", b"8")]),
                UnsupportedVersion {
                    got: Some("8".to_string()),
                },
            ),
            (
                "version repeated",
                "GET",
                1,
                headers_with(
                    "Sec-WebSocket-Version",
                    &[
                        ("Sec-WebSocket-Version", b"13"),
                        ("Sec-WebSocket-Version", b"8"),
                    ],
                ),
                UnsupportedVersion {
                    got: Some("13, 8".to_string()),
                },
            ),
            (
                "no key",
                "GET",
                1,
                headers_with("Sec-WebSocket-Key", &[]),
                MissingKey,
            ),
            (
                "key repeated",
                "GET",
                1,
                headers_with("", &[("Sec-WebSocket-Key", RFC_KEY)]),
                BadKey,
            ),
            (
                "key not base64",
                "GET",
                1,
                headers_with(
                    "Sec-WebSocket-Key",
                    &[("Sec-WebSocket-Key", b"not base64 at all!!!!!==")],
                ),
                BadKey,
            ),
            (
                "key of 15 bytes",
                "GET",
                1,
                headers_with(
                    "Sec-WebSocket-Key",
                    &[("Sec-WebSocket-Key", b"AAAAAAAAAAAAAAAAAAAA")],
                ),
                BadKey,
            ),
            (
                "key of 17 bytes",
                "GET",
                1,
                headers_with(
                    "Sec-WebSocket-Key",
                    &[("Sec-WebSocket-Key", b"AAAAAAAAAAAAAAAAAAAAAAA=")],
                ),
                BadKey,
            ),
            (
                "key far too long",
                "GET",
                1,
                headers_with("Sec-WebSocket-Key", &[("Sec-WebSocket-Key", &[b'A'; 400])]),
                BadKey,
            ),
            (
                "empty key",
                "GET",
                1,
                headers_with("Sec-WebSocket-Key", &[("Sec-WebSocket-Key", b"")]),
                BadKey,
            ),
        ];
        for (name, method, minor, headers, expected) in cases {
            assert_eq!(validate(method, minor, &headers), Err(expected), "{name}");
        }
    }

    #[test]
    fn status_codes() {
        use HandshakeError::*;
        let cases = [
            (MethodNotGet, 405),
            (HttpVersionTooOld, 400),
            (MissingUpgrade, 426),
            (MissingConnectionUpgrade, 400),
            (UnsupportedVersion { got: None }, 426),
            (
                UnsupportedVersion {
                    got: Some("8".into()),
                },
                426,
            ),
            (MissingKey, 400),
            (BadKey, 400),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error:?}");
        }
    }

    #[test]
    fn response_101_is_exact() {
        let expected = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {RFC_ACCEPT}\r\n\r\n"
        );
        assert_eq!(String::from_utf8(response_101(RFC_KEY)).unwrap(), expected);
        let with = String::from_utf8(response_101_with(RFC_KEY, Some("permessage-deflate")));
        assert_eq!(
            with.unwrap(),
            expected.replace(
                "\r\n\r\n",
                "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
            )
        );
    }

    #[test]
    fn rejection_responses_table() {
        use HandshakeError::*;
        // (error, status line, headers that must be present, headers that must not be)
        let cases: &[(HandshakeError, &str, &[&str], &[&str])] = &[
            (
                MethodNotGet,
                "HTTP/1.1 405 Method Not Allowed\r\n",
                &["Allow: GET\r\n"],
                &["Upgrade:", "Sec-WebSocket-Version:"],
            ),
            (
                HttpVersionTooOld,
                "HTTP/1.1 400 Bad Request\r\n",
                &[],
                &["Upgrade:", "Sec-WebSocket-Version:"],
            ),
            (
                MissingUpgrade,
                "HTTP/1.1 426 Upgrade Required\r\n",
                &["Upgrade: websocket\r\n"],
                &["Sec-WebSocket-Version:"],
            ),
            (
                MissingConnectionUpgrade,
                "HTTP/1.1 400 Bad Request\r\n",
                &[],
                &["Upgrade:"],
            ),
            (
                UnsupportedVersion {
                    got: Some("8".into()),
                },
                "HTTP/1.1 426 Upgrade Required\r\n",
                &["Sec-WebSocket-Version: 13\r\n", "Upgrade: websocket\r\n"],
                &[],
            ),
            (
                UnsupportedVersion { got: None },
                "HTTP/1.1 426 Upgrade Required\r\n",
                &["Sec-WebSocket-Version: 13\r\n"],
                &[],
            ),
            (
                MissingKey,
                "HTTP/1.1 400 Bad Request\r\n",
                &[],
                &["Upgrade:"],
            ),
            (BadKey, "HTTP/1.1 400 Bad Request\r\n", &[], &["Upgrade:"]),
        ];
        for (error, status_line, present, absent) in cases {
            let response = String::from_utf8(rejection(error)).unwrap();
            assert!(response.starts_with(status_line), "{response}");
            let (head, body) = response.split_once("\r\n\r\n").unwrap();
            for header in *present {
                assert!(
                    response.contains(header),
                    "{error:?}: {header} in {response}"
                );
            }
            for header in *absent {
                assert!(!head.contains(header), "{error:?}: {header} in {response}");
            }
            assert!(head.contains("\r\nContent-Type: application/json"));
            assert!(head.contains("\r\nConnection: close"));
            assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
            let body: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["error"]["code"], "bad_request");
            assert_eq!(body["error"]["message"], error.to_string());
        }
    }
}
