//! HTTP/1.x request parsing on top of httparse.
//!
//! Contract, the same as httparse's `Status::Partial` and `ws::frame`'s `Ok(None)`:
//! - [`parse`] looks at the start of the caller's read buffer and returns one whole request
//!   (head and body) with the number of bytes it used, or `Ok(None)` having consumed nothing.
//!   Pipelined requests follow at `buf[consumed..]`.
//! - After an `Err`, the framing of the stream is lost: answer with [`ParseError::status`] and
//!   `Connection: close`, then close. Do not call `parse` on that buffer again.
//! - Each call re-parses the head from the start, so call again only after new bytes arrived.
//!   The head is never parsed past `Limits::head_bytes_max`, which bounds the cost of a retry
//!   (httparse warns against unbounded retries on a growing buffer).
//! - The read buffer never has to hold more than `head_bytes_max + body_bytes_max` bytes:
//!   `HeadTooLarge` comes as soon as it holds more than `head_bytes_max` bytes without a complete
//!   head, and `BodyTooLarge` as soon as the head declares a `Content-Length` over
//!   `body_bytes_max`, before any of the body has to be buffered.
//!
//! Bodies are framed by `Content-Length` only. Chunked request bodies are refused with 411
//! (RFC 9112 §6.3 allows it: a server may insist on a length), which is simpler and safer than
//! a second framing path that request smuggling attacks could play against the first.

use std::fmt;

/// Size of the header array on the stack: no configuration may allow more headers than this.
pub const HEADERS_MAX_LIMIT: usize = 64;
/// Default [`Limits::headers_max`].
pub const HEADERS_MAX_DEFAULT: usize = 32;
/// Default [`Limits::head_bytes_max`]: request line plus headers.
pub const HEAD_BYTES_MAX_DEFAULT: usize = 8 * 1024;
/// Default [`Limits::body_bytes_max`]: stock updates are small JSON documents.
pub const BODY_BYTES_MAX_DEFAULT: usize = 64 * 1024;

const _: () = assert!(HEADERS_MAX_DEFAULT <= HEADERS_MAX_LIMIT);

/// Bounds on one request. `config::Limits` fills these in; see the module docs for when each
/// one is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most header fields accepted. Values above [`HEADERS_MAX_LIMIT`] act as that limit,
    /// because the header array lives on the stack; config validation should reject them.
    pub headers_max: usize,
    /// Most bytes of request line plus headers, including the blank line that ends them.
    pub head_bytes_max: usize,
    /// Largest `Content-Length` accepted.
    pub body_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            headers_max: HEADERS_MAX_DEFAULT,
            head_bytes_max: HEAD_BYTES_MAX_DEFAULT,
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
        }
    }
}

/// The request method. Method names are case-sensitive (RFC 9110 §9.1), so `get` is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `OPTIONS`
    Options,
    /// `PATCH`
    Patch,
    /// Any other method; [`Request::method_name`] has the name.
    Other,
}

impl Method {
    /// The method called `name`, or `Other`.
    pub fn from_name(name: &str) -> Method {
        match name {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }

    /// The method's name on the wire, or `None` for `Other`.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Method::Get => Some("GET"),
            Method::Head => Some("HEAD"),
            Method::Post => Some("POST"),
            Method::Put => Some("PUT"),
            Method::Delete => Some("DELETE"),
            Method::Options => Some("OPTIONS"),
            Method::Patch => Some("PATCH"),
            Method::Other => None,
        }
    }

    /// Methods whose requests carry content, so a missing `Content-Length` is a 411 rather than
    /// an empty body.
    fn requires_length(self) -> bool {
        matches!(self, Method::Post | Method::Put | Method::Patch)
    }
}

/// One parsed request, owning its data so the read buffer can be reused at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method; `Other` for methods outside the enum.
    pub method: Method,
    /// The method exactly as sent.
    pub method_name: String,
    /// The request target up to the first `?`, still percent-encoded (decode parameters with
    /// [`super::percent_decode`]). Not normalised: `..` segments are passed through, so a
    /// static-file handler must reject them itself. Absolute-form targets
    /// (`http://host/path`) are reduced to their path; `*` stays `*`.
    pub path: String,
    /// What follows the first `?`, still encoded; `Some("")` for a bare `?`.
    pub query: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in arrival order, names as sent. Values have surrounding whitespace
    /// trimmed (httparse does that) and may be any bytes but CR, LF and NUL.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Exactly `Content-Length` bytes; empty without one.
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the first header called `name`, compared case-insensitively (RFC 9110 §5.1).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_values(name).next()
    }

    /// [`Request::header`] as text; `None` if absent or not UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// Values of every header called `name`, in arrival order.
    pub fn header_values<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        self.headers
            .iter()
            .filter(move |(header_name, _)| header_name.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
    }

    /// Whether any header called `name` lists `token` in its comma-separated value, compared
    /// case-insensitively: `Connection: keep-alive, Upgrade` has the token `upgrade`.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name).any(|value| {
            value
                .split(|&byte| byte == b',')
                .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    /// Whether the connection may carry another request after this one (RFC 9112 §9.3):
    /// HTTP/1.1 persists unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            false
        } else if self.minor_version == 0 {
            self.header_has_token("connection", "keep-alive")
        } else {
            true
        }
    }

    /// The value of the first query parameter called `name`, decoded as
    /// `application/x-www-form-urlencoded` (see [`super::percent::form_urlencoded_decode`]:
    /// lenient, as browsers are). A parameter without `=` has the value `""`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(encoded_name, _)| super::percent::form_urlencoded_decode(encoded_name) == name)
            .map(|(_, value)| super::percent::form_urlencoded_decode(value))
    }

    /// Borrowed `(name, value)` pairs, for the WebSocket handshake validator.
    pub fn header_pairs(&self) -> Vec<(&str, &[u8])> {
        self.headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
            .collect()
    }

    /// Whether the request has an `Upgrade` header (a WebSocket handshake, if valid).
    pub fn is_upgrade(&self) -> bool {
        self.header("upgrade").is_some()
    }
}

/// Why a request was refused. Each maps to one response status via [`ParseError::status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// httparse rejected the request line or a header.
    Malformed(httparse::Error),
    /// No complete head within `max` bytes.
    HeadTooLarge {
        /// `Limits::head_bytes_max`.
        max: usize,
    },
    /// More than `max` header fields.
    TooManyHeaders {
        /// `Limits::headers_max`, capped at [`HEADERS_MAX_LIMIT`].
        max: usize,
    },
    /// `Content-Length` is over `max`.
    BodyTooLarge {
        /// The declared `Content-Length`.
        length: u64,
        /// `Limits::body_bytes_max`.
        max: usize,
    },
    /// A `Transfer-Encoding` header, or POST/PUT/PATCH without `Content-Length`.
    LengthRequired,
    /// A `Content-Length` that is not all digits, overflows, or disagrees with another one.
    BadContentLength,
    /// A well-formed `HTTP/x.y` version other than 1.0 and 1.1.
    UnsupportedVersion,
    /// A header that must appear at most once appeared again (first-wins or last-wins would
    /// let two parties read one request differently: two tokens, two idempotency keys).
    DuplicateHeader {
        /// The header's name, lowercase.
        name: &'static str,
    },
    /// HTTP/1.1 without `Host` (RFC 9112 §3.2: a server must answer 400).
    MissingHost,
}

/// Headers a request may carry at most once; a repeat is [`ParseError::DuplicateHeader`].
pub const SINGLE_HEADERS: [&str; 5] = [
    "authorization",
    "idempotency-key",
    "origin",
    "host",
    "content-length",
];

impl ParseError {
    /// The response status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ParseError::Malformed(_) => 400,
            ParseError::HeadTooLarge { .. } => 431,
            ParseError::TooManyHeaders { .. } => 431,
            ParseError::BodyTooLarge { .. } => 413,
            ParseError::LengthRequired => 411,
            ParseError::BadContentLength => 400,
            ParseError::UnsupportedVersion => 505,
            ParseError::DuplicateHeader { .. } | ParseError::MissingHost => 400,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Malformed(error) => write!(f, "malformed request: {error}"),
            ParseError::HeadTooLarge { max } => {
                write!(f, "request head larger than {max} bytes")
            }
            ParseError::TooManyHeaders { max } => write!(f, "more than {max} header fields"),
            ParseError::BodyTooLarge { length, max } => {
                write!(f, "content length {length} over the limit of {max} bytes")
            }
            ParseError::LengthRequired => {
                f.write_str("request body needs a Content-Length (no Transfer-Encoding)")
            }
            ParseError::BadContentLength => f.write_str("invalid Content-Length"),
            ParseError::UnsupportedVersion => f.write_str("HTTP version not supported"),
            ParseError::DuplicateHeader { name } => write!(f, "more than one {name} header"),
            ParseError::MissingHost => f.write_str("HTTP/1.1 request without a Host header"),
        }
    }
}

impl std::error::Error for ParseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ParseError::Malformed(error) => Some(error),
            _ => None,
        }
    }
}

/// Parses one request (head and body) from the start of `buf`.
///
/// - `Ok(None)`: incomplete; nothing consumed, read more and call again.
/// - `Ok(Some((request, consumed)))`: a whole request; the next one starts at `buf[consumed..]`.
///
/// # Errors
/// The request is invalid or over a limit: answer with `error.status()` and close (see the
/// module docs).
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize)>, ParseError> {
    let mut header_storage = [httparse::EMPTY_HEADER; HEADERS_MAX_LIMIT];
    let Some(head) = parse_head(buf, limits, &mut header_storage)? else {
        return Ok(None);
    };
    let body = buf
        .get(head.head_len..)
        .and_then(|rest| rest.get(..head.body_len));
    let Some(body) = body else {
        return Ok(None);
    };
    let consumed = head.head_len + body.len();
    Ok(Some((head.into_request(body), consumed)))
}

/// Whether the caller should send `HTTP/1.1 100 Continue` now: `buf` starts with a valid
/// HTTP/1.1 head carrying `Expect: 100-continue` whose body has not fully arrived.
///
/// Clients such as curl wait for the interim response (or a timeout of about a second) before
/// sending the body (RFC 9110 §10.1.1), so without it large POSTs stall. Send it at most once per
/// request. HTTP/1.0 requests never get one: §10.1.1 says to ignore the expectation there.
pub fn expects_continue(buf: &[u8], limits: &Limits) -> bool {
    let mut header_storage = [httparse::EMPTY_HEADER; HEADERS_MAX_LIMIT];
    let Ok(Some(head)) = parse_head(buf, limits, &mut header_storage) else {
        return false;
    };
    let body_missing = buf.len() - head.head_len < head.body_len;
    body_missing
        && head.minor_version == 1
        && head.headers.iter().any(|header| {
            header.name.eq_ignore_ascii_case("expect")
                && header.value.eq_ignore_ascii_case(b"100-continue")
        })
}

/// A complete, valid head borrowed from the read buffer; its body may not have arrived yet.
struct Head<'h, 'b> {
    method_name: &'b str,
    target: &'b str,
    minor_version: u8,
    headers: &'h [httparse::Header<'b>],
    head_len: usize,
    /// INVARIANT: at most `Limits::body_bytes_max`.
    body_len: usize,
}

impl Head<'_, '_> {
    fn into_request(self, body: &[u8]) -> Request {
        let (path, query) = split_target(self.target);
        Request {
            method: Method::from_name(self.method_name),
            method_name: self.method_name.to_owned(),
            path: path.to_owned(),
            query: query.map(str::to_owned),
            minor_version: self.minor_version,
            headers: self
                .headers
                .iter()
                .map(|header| (header.name.to_owned(), header.value.to_vec()))
                .collect(),
            body: body.to_vec(),
        }
    }
}

fn parse_head<'h, 'b>(
    buf: &'b [u8],
    limits: &Limits,
    header_storage: &'h mut [httparse::Header<'b>; HEADERS_MAX_LIMIT],
) -> Result<Option<Head<'h, 'b>>, ParseError> {
    let headers_max = limits.headers_max.min(HEADERS_MAX_LIMIT);
    // Parse no further than the head may reach: that bounds the work per call, and a partial
    // head in a buffer longer than the window is then exactly "too large".
    let window = &buf[..buf.len().min(limits.head_bytes_max)];
    let mut request = httparse::Request::new(&mut header_storage[..headers_max]);
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) if buf.len() > limits.head_bytes_max => {
            return Err(ParseError::HeadTooLarge {
                max: limits.head_bytes_max,
            });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ParseError::TooManyHeaders { max: headers_max });
        }
        Err(httparse::Error::Version) if names_http_version(window) => {
            return Err(ParseError::UnsupportedVersion);
        }
        Err(error) => return Err(ParseError::Malformed(error)),
    };
    let httparse::Request {
        method,
        path,
        version,
        headers,
    } = request;
    let method_name = method.expect("httparse sets the method on Complete");
    let minor_version = version.expect("httparse sets the version on Complete");
    check_single_headers(headers)?;
    let body_len = body_length(Method::from_name(method_name), headers, limits)?;
    Ok(Some(Head {
        method_name,
        target: path.expect("httparse sets the path on Complete"),
        minor_version,
        headers,
        head_len,
        body_len,
    }))
}

/// httparse reports every version but 1.0 and 1.1 as `Error::Version`. A well-formed
/// `HTTP/<digit>...` (say `HTTP/2.0`, sent by a client that skipped negotiation) is a version we
/// do not speak, 505 (RFC 9110 §15.6.6); anything else is garbage, 400.
fn names_http_version(window: &[u8]) -> bool {
    // httparse skips empty lines before the request line (RFC 9112 §2.2); so do we.
    let line_start = window
        .iter()
        .position(|&byte| byte != b'\r' && byte != b'\n')
        .unwrap_or(window.len());
    let line = &window[line_start..];
    let line_end = line
        .iter()
        .position(|&byte| byte == b'\r' || byte == b'\n')
        .unwrap_or(line.len());
    // RFC 9112 §3: method SP request-target SP HTTP-version, exactly. A line with more parts
    // (a space inside the target) is an invalid request line, 400, even if it ends in HTTP/1.1.
    let mut parts = line[..line_end].split(|&byte| byte == b' ');
    let version = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(version), None) => version,
        _ => return false,
    };
    version
        .strip_prefix(b"HTTP/")
        .and_then(<[u8]>::first)
        .is_some_and(u8::is_ascii_digit)
}

/// Refuses a repeat of any of [`SINGLE_HEADERS`].
fn check_single_headers(headers: &[httparse::Header<'_>]) -> Result<(), ParseError> {
    let mut seen = [false; SINGLE_HEADERS.len()];
    for header in headers {
        if let Some(i) = SINGLE_HEADERS
            .iter()
            .position(|name| header.name.eq_ignore_ascii_case(name))
        {
            if seen[i] {
                return Err(ParseError::DuplicateHeader {
                    name: SINGLE_HEADERS[i],
                });
            }
            seen[i] = true;
        }
    }
    Ok(())
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host` is answered 400. Checked by the server
/// on each whole request rather than by [`parse`], which stays a pure framing parser.
pub fn require_host(req: &Request) -> Result<(), ParseError> {
    if req.minor_version == 1 && req.header("host").is_none() {
        return Err(ParseError::MissingHost);
    }
    Ok(())
}

/// The body length the head declares (RFC 9112 §6.3), checked against the limit before any of
/// the body has to be buffered.
fn body_length(
    method: Method,
    headers: &[httparse::Header<'_>],
    limits: &Limits,
) -> Result<usize, ParseError> {
    if headers
        .iter()
        .any(|header| header.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(ParseError::LengthRequired);
    }
    let mut content_length: Option<u64> = None;
    for header in headers {
        if !header.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let length = parse_content_length(header.value).ok_or(ParseError::BadContentLength)?;
        // Differing lengths are the classic request-smuggling setup (RFC 9112 §6.3 item 5);
        // identical repeats are harmless.
        if content_length.is_some_and(|previous| previous != length) {
            return Err(ParseError::BadContentLength);
        }
        content_length = Some(length);
    }
    match content_length {
        None if method.requires_length() => Err(ParseError::LengthRequired),
        None => Ok(0),
        Some(length) => {
            let max = limits.body_bytes_max;
            match usize::try_from(length) {
                Ok(body_len) if body_len <= max => Ok(body_len),
                _ => Err(ParseError::BodyTooLarge { length, max }),
            }
        }
    }
}

/// `Content-Length = 1*DIGIT` (RFC 9110 §8.6): no sign, no spaces inside, no list.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |length, &byte| {
        let digit = match byte {
            b'0'..=b'9' => u64::from(byte - b'0'),
            _ => return None,
        };
        length.checked_mul(10)?.checked_add(digit)
    })
}

/// Splits a request target into path and query (RFC 9112 §3.2).
fn split_target(target: &str) -> (&str, Option<&str>) {
    let origin = strip_absolute_form(target);
    let (path, query) = match origin.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (origin, None),
    };
    // Only an absolute-form target without a path can get here empty ("http://host?q").
    (if path.is_empty() { "/" } else { path }, query)
}

/// A server MUST accept the absolute-form `http://host/path` (RFC 9112 §3.2.2), though only
/// proxies are sent it; what names the resource is the part from the path on.
fn strip_absolute_form(target: &str) -> &str {
    let Some((scheme, rest)) = target.split_once("://") else {
        return target;
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return target;
    }
    match rest.find(['/', '?']) {
        Some(authority_end) => &rest[authority_end..],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits::default()
    }

    struct Valid {
        bytes: &'static [u8],
        method: Method,
        method_name: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        minor_version: u8,
        body: &'static [u8],
        keep_alive: bool,
    }

    const VALID: &[Valid] = &[
        Valid {
            bytes: b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            method: Method::Get,
            method_name: "GET",
            path: "/healthz",
            query: None,
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"GET /stock?sku=a%2Fb&n=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            method: Method::Get,
            method_name: "GET",
            path: "/stock",
            query: Some("sku=a%2Fb&n=1"),
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"POST /stock/abc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     Content-Length: 11\r\n\r\n{\"delta\":1}",
            method: Method::Post,
            method_name: "POST",
            path: "/stock/abc",
            query: None,
            minor_version: 1,
            body: b"{\"delta\":1}",
            keep_alive: true,
        },
        Valid {
            bytes: b"HEAD / HTTP/1.0\r\n\r\n",
            method: Method::Head,
            method_name: "HEAD",
            path: "/",
            query: None,
            minor_version: 0,
            body: b"",
            keep_alive: false,
        },
        Valid {
            bytes: b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            method: Method::Get,
            method_name: "GET",
            path: "/",
            query: None,
            minor_version: 0,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            method: Method::Get,
            method_name: "GET",
            path: "/",
            query: None,
            minor_version: 1,
            body: b"",
            keep_alive: false,
        },
        Valid {
            bytes: b"PUT /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            method: Method::Put,
            method_name: "PUT",
            path: "/x",
            query: None,
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"PATCH /x?dry HTTP/1.1\r\ncontent-length: 003\r\n\r\nabc",
            method: Method::Patch,
            method_name: "PATCH",
            path: "/x",
            query: Some("dry"),
            minor_version: 1,
            body: b"abc",
            keep_alive: true,
        },
        Valid {
            // Bare LF line endings and empty lines before the request line (RFC 9112 §2.2).
            bytes: b"\r\n\nDELETE /stock/a/b HTTP/1.1\nHost: x\n\n",
            method: Method::Delete,
            method_name: "DELETE",
            path: "/stock/a/b",
            query: None,
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"GET /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            method: Method::Get,
            method_name: "GET",
            path: "/x",
            query: None,
            minor_version: 1,
            body: b"hi",
            keep_alive: true,
        },
        Valid {
            bytes: b"OPTIONS * HTTP/1.1\r\n\r\n",
            method: Method::Options,
            method_name: "OPTIONS",
            path: "*",
            query: None,
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"PROPFIND /x HTTP/1.1\r\n\r\n",
            method: Method::Other,
            method_name: "PROPFIND",
            path: "/x",
            query: None,
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"GET http://example.com:8080/stock?a=1 HTTP/1.1\r\n\r\n",
            method: Method::Get,
            method_name: "GET",
            path: "/stock",
            query: Some("a=1"),
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
        Valid {
            bytes: b"GET HTTP://example.com?a=1 HTTP/1.1\r\n\r\n",
            method: Method::Get,
            method_name: "GET",
            path: "/",
            query: Some("a=1"),
            minor_version: 1,
            body: b"",
            keep_alive: true,
        },
    ];

    #[test]
    fn valid_requests_parse() {
        for case in VALID {
            let name = String::from_utf8_lossy(case.bytes);
            let (request, consumed) = parse(case.bytes, &limits())
                .unwrap_or_else(|error| panic!("{name:?}: {error}"))
                .unwrap_or_else(|| panic!("{name:?}: incomplete"));
            assert_eq!(consumed, case.bytes.len(), "{name:?}");
            assert_eq!(request.method, case.method, "{name:?}");
            assert_eq!(request.method_name, case.method_name, "{name:?}");
            assert_eq!(request.path, case.path, "{name:?}");
            assert_eq!(request.query.as_deref(), case.query, "{name:?}");
            assert_eq!(request.minor_version, case.minor_version, "{name:?}");
            assert_eq!(request.body, case.body, "{name:?}");
            assert_eq!(request.keep_alive(), case.keep_alive, "{name:?}");
        }
    }

    #[test]
    fn valid_requests_split_at_every_byte_are_incomplete() {
        for case in VALID {
            for split in 0..case.bytes.len() {
                assert_eq!(
                    parse(&case.bytes[..split], &limits()),
                    Ok(None),
                    "{:?} cut at {split}",
                    String::from_utf8_lossy(case.bytes)
                );
            }
        }
    }

    #[test]
    fn valid_requests_ignore_what_follows() {
        for case in VALID {
            let mut bytes = case.bytes.to_vec();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (_, consumed) = parse(&bytes, &limits()).unwrap().unwrap();
            assert_eq!(consumed, case.bytes.len());
        }
    }

    #[test]
    fn pipelined_requests_parse_one_after_another() {
        let bytes: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            GET /c HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut offset = 0;
        let mut seen = Vec::new();
        while offset < bytes.len() {
            let (request, consumed) = parse(&bytes[offset..], &limits()).unwrap().unwrap();
            assert!(consumed > 0 && consumed <= bytes.len() - offset);
            offset += consumed;
            let keep_alive = request.keep_alive();
            seen.push((request.method, request.path, request.body, keep_alive));
        }
        assert_eq!(offset, bytes.len());
        assert_eq!(
            seen,
            vec![
                (Method::Get, "/a".to_owned(), vec![], true),
                (Method::Post, "/b".to_owned(), b"hello".to_vec(), true),
                (Method::Get, "/c".to_owned(), vec![], false),
            ]
        );
    }

    #[test]
    fn keep_alive_rules() {
        let cases: &[(&[u8], bool)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nConnection: CLOSE\r\n\r\n", false),
            (
                b"GET / HTTP/1.1\r\nConnection: keep-alive , close\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nConnection: close\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.1\r\nConnection: closed\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n", true),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
            (b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n", true),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.0\r\nConnection: keep-alived\r\n\r\n", false),
        ];
        for &(bytes, expected) in cases {
            let (request, _) = parse(bytes, &limits()).unwrap().unwrap();
            assert_eq!(
                request.keep_alive(),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    struct Invalid {
        bytes: &'static [u8],
        limits: Limits,
        error: ParseError,
        status: u16,
    }

    const DEFAULT: Limits = Limits {
        headers_max: HEADERS_MAX_DEFAULT,
        head_bytes_max: HEAD_BYTES_MAX_DEFAULT,
        body_bytes_max: BODY_BYTES_MAX_DEFAULT,
    };

    const INVALID: &[Invalid] = &[
        Invalid {
            bytes: b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::Malformed(httparse::Error::HeaderName),
            status: 400,
        },
        Invalid {
            bytes: b"GET  / HTTP/1.1\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::Malformed(httparse::Error::Token),
            status: 400,
        },
        Invalid {
            bytes: b"GET / FOO/1.1\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::Malformed(httparse::Error::Version),
            status: 400,
        },
        Invalid {
            bytes: b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::Malformed(httparse::Error::HeaderValue),
            status: 400,
        },
        Invalid {
            // httparse takes "b" as the version; the line names HTTP/1.1 only after a space in
            // the target, which makes it invalid (RFC 9112 §3), not an unsupported version.
            bytes: b"GET /a b HTTP/1.1\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::Malformed(httparse::Error::Version),
            status: 400,
        },
        Invalid {
            bytes: b"GET / HTTP/2.0\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::UnsupportedVersion,
            status: 505,
        },
        Invalid {
            bytes: b"\r\nGET / HTTP/1.2\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::UnsupportedVersion,
            status: 505,
        },
        Invalid {
            bytes: b"GET /0123456789abcdef HTTP/1.1\r\n\r\n",
            limits: Limits {
                head_bytes_max: 16,
                ..DEFAULT
            },
            error: ParseError::HeadTooLarge { max: 16 },
            status: 431,
        },
        Invalid {
            bytes: b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n",
            limits: Limits {
                headers_max: 1,
                ..DEFAULT
            },
            error: ParseError::TooManyHeaders { max: 1 },
            status: 431,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            limits: Limits {
                body_bytes_max: 4,
                ..DEFAULT
            },
            error: ParseError::BodyTooLarge { length: 5, max: 4 },
            status: 413,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BodyTooLarge {
                length: u64::MAX,
                max: BODY_BYTES_MAX_DEFAULT,
            },
            status: 413,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nHost: x\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::LengthRequired,
            status: 411,
        },
        Invalid {
            bytes: b"PUT / HTTP/1.0\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::LengthRequired,
            status: 411,
        },
        Invalid {
            bytes: b"PATCH / HTTP/1.1\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::LengthRequired,
            status: 411,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::LengthRequired,
            status: 411,
        },
        Invalid {
            bytes: b"GET / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::LengthRequired,
            status: 411,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::LengthRequired,
            status: 411,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::BadContentLength,
            status: 400,
        },
        // Headers that must appear once (PROTOCOL.md "Limits"): even identical repeats are
        // refused, so no two readers of one request can disagree about it.
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            limits: DEFAULT,
            error: ParseError::DuplicateHeader {
                name: "content-length",
            },
            status: 400,
        },
        Invalid {
            bytes: b"PATCH /x HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 003\r\n\r\nabc",
            limits: DEFAULT,
            error: ParseError::DuplicateHeader {
                name: "content-length",
            },
            status: 400,
        },
        Invalid {
            bytes: b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::DuplicateHeader { name: "host" },
            status: 400,
        },
        Invalid {
            bytes: b"GET / HTTP/1.1\r\nAuthorization: Bearer a\r\nAUTHORIZATION: Bearer b\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::DuplicateHeader {
                name: "authorization",
            },
            status: 400,
        },
        Invalid {
            bytes: b"POST / HTTP/1.1\r\nIdempotency-Key: a\r\nIdempotency-Key: b\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::DuplicateHeader {
                name: "idempotency-key",
            },
            status: 400,
        },
        Invalid {
            bytes: b"GET / HTTP/1.1\r\nOrigin: http://a\r\nOrigin: http://b\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::DuplicateHeader { name: "origin" },
            status: 400,
        },
        Invalid {
            bytes: b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 01\r\n\
                     Content-Length: 2\r\n\r\n",
            limits: DEFAULT,
            error: ParseError::DuplicateHeader {
                name: "content-length",
            },
            status: 400,
        },
    ];

    #[test]
    fn invalid_requests_fail_with_their_status() {
        for case in INVALID {
            let name = String::from_utf8_lossy(case.bytes);
            assert_eq!(parse(case.bytes, &case.limits), Err(case.error), "{name:?}");
            assert_eq!(case.error.status(), case.status, "{name:?}");
            assert!(!case.error.to_string().is_empty());
        }
    }

    #[test]
    fn invalid_requests_split_at_every_byte_are_incomplete_or_fail_alike() {
        for case in INVALID {
            for split in 0..case.bytes.len() {
                let result = parse(&case.bytes[..split], &case.limits);
                assert!(
                    result == Ok(None) || result == Err(case.error),
                    "{:?} cut at {split}: {result:?}",
                    String::from_utf8_lossy(case.bytes)
                );
            }
        }
    }

    #[test]
    fn every_error_variant_has_its_status() {
        let cases = [
            (ParseError::Malformed(httparse::Error::Token), 400),
            (ParseError::HeadTooLarge { max: 1 }, 431),
            (ParseError::TooManyHeaders { max: 1 }, 431),
            (ParseError::BodyTooLarge { length: 2, max: 1 }, 413),
            (ParseError::LengthRequired, 411),
            (ParseError::BadContentLength, 400),
            (ParseError::UnsupportedVersion, 505),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error:?}");
        }
        let malformed = ParseError::Malformed(httparse::Error::Token);
        assert!(std::error::Error::source(&malformed).is_some());
        assert!(std::error::Error::source(&ParseError::LengthRequired).is_none());
    }

    fn request_with_headers(count: usize) -> Vec<u8> {
        let mut bytes = b"GET / HTTP/1.1\r\n".to_vec();
        for index in 0..count {
            bytes.extend_from_slice(format!("X-{index}: v\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        bytes
    }

    #[test]
    fn headers_max_boundary() {
        let bytes = request_with_headers(5);
        let at = Limits {
            headers_max: 5,
            ..limits()
        };
        assert_eq!(parse(&bytes, &at).unwrap().unwrap().0.headers.len(), 5);
        let below = Limits {
            headers_max: 4,
            ..limits()
        };
        assert_eq!(
            parse(&bytes, &below),
            Err(ParseError::TooManyHeaders { max: 4 })
        );
        let none = Limits {
            headers_max: 0,
            ..limits()
        };
        assert!(parse(&request_with_headers(0), &none).unwrap().is_some());
        assert_eq!(
            parse(&request_with_headers(1), &none),
            Err(ParseError::TooManyHeaders { max: 0 })
        );
    }

    #[test]
    fn headers_max_above_the_stack_array_acts_as_the_array_size() {
        let generous = Limits {
            headers_max: HEADERS_MAX_LIMIT + 10,
            ..limits()
        };
        let bytes = request_with_headers(HEADERS_MAX_LIMIT);
        assert!(parse(&bytes, &generous).unwrap().is_some());
        assert_eq!(
            parse(&request_with_headers(HEADERS_MAX_LIMIT + 1), &generous),
            Err(ParseError::TooManyHeaders {
                max: HEADERS_MAX_LIMIT
            })
        );
    }

    #[test]
    fn head_bytes_max_boundary() {
        let bytes: &[u8] = b"GET /stock HTTP/1.1\r\nHost: x\r\n\r\n";
        let at = Limits {
            head_bytes_max: bytes.len(),
            ..limits()
        };
        assert_eq!(parse(bytes, &at).unwrap().unwrap().1, bytes.len());
        let below = Limits {
            head_bytes_max: bytes.len() - 1,
            ..limits()
        };
        assert_eq!(
            parse(bytes, &below),
            Err(ParseError::HeadTooLarge {
                max: bytes.len() - 1
            })
        );
        // Without a complete head: wait while the buffer is within the limit, fail one past it.
        let partial = &bytes[..bytes.len() - 1];
        let limit = Limits {
            head_bytes_max: partial.len() - 1,
            ..limits()
        };
        assert_eq!(parse(&partial[..partial.len() - 1], &limit), Ok(None));
        assert_eq!(
            parse(partial, &limit),
            Err(ParseError::HeadTooLarge {
                max: partial.len() - 1
            })
        );
    }

    #[test]
    fn body_bytes_max_boundary_is_checked_before_the_body_arrives() {
        let limit = Limits {
            body_bytes_max: 5,
            ..limits()
        };
        let at: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse(at, &limit).unwrap().unwrap().0.body, b"hello");
        let head_only = b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(
            parse(head_only, &limit),
            Err(ParseError::BodyTooLarge { length: 6, max: 5 })
        );
    }

    #[test]
    fn largest_request_fits_in_head_plus_body_bytes() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n";
        let limit = Limits {
            head_bytes_max: head.len(),
            body_bytes_max: 4,
            ..limits()
        };
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(b"body");
        assert_eq!(
            parse(&bytes, &limit).unwrap().unwrap().1,
            limit.head_bytes_max + limit.body_bytes_max
        );
    }

    #[test]
    fn headers_are_found_case_insensitively() {
        let bytes = b"GET / HTTP/1.1\r\nContent-Type: text/plain\r\nX-Bin: \xff\r\n\
                      x-dup: 1\r\nX-DUP: 2\r\nUpgrade: websocket\r\n\r\n";
        let (request, _) = parse(bytes, &limits()).unwrap().unwrap();
        assert_eq!(request.header("content-type"), Some(&b"text/plain"[..]));
        assert_eq!(request.header("CONTENT-TYPE"), Some(&b"text/plain"[..]));
        assert_eq!(request.header_str("Content-type"), Some("text/plain"));
        assert_eq!(request.header("x-bin"), Some(&b"\xff"[..]));
        assert_eq!(request.header_str("x-bin"), None);
        assert_eq!(request.header("X-Dup"), Some(&b"1"[..]));
        assert_eq!(request.header_values("x-dup").count(), 2);
        assert_eq!(request.header("missing"), None);
        assert!(request.is_upgrade());
        assert!(request.header_has_token("upgrade", "WebSocket"));
        let pairs = request.header_pairs();
        assert_eq!(pairs.len(), 5);
        assert_eq!(pairs[0], ("Content-Type", &b"text/plain"[..]));
        let (plain, _) = parse(b"GET / HTTP/1.1\r\n\r\n", &limits())
            .unwrap()
            .unwrap();
        assert!(!plain.is_upgrade());
    }

    #[test]
    fn query_params_are_form_decoded() {
        let bytes =
            b"GET /s?a=1&b=x+y&c=%2Fz&a=2&empty=&flag&&d=%zz&%61lias=yes&e=%C3%A9 HTTP/1.1\r\n\r\n";
        let (request, _) = parse(bytes, &limits()).unwrap().unwrap();
        let cases: &[(&str, Option<&str>)] = &[
            ("a", Some("1")),
            ("b", Some("x y")),
            ("c", Some("/z")),
            ("empty", Some("")),
            ("flag", Some("")),
            ("d", Some("%zz")),
            ("alias", Some("yes")),
            ("e", Some("é")),
            ("missing", None),
            ("", None),
        ];
        for &(name, expected) in cases {
            assert_eq!(request.query_param(name).as_deref(), expected, "{name:?}");
        }
        let (no_query, _) = parse(b"GET /s HTTP/1.1\r\n\r\n", &limits())
            .unwrap()
            .unwrap();
        assert_eq!(no_query.query_param("a"), None);
    }

    #[test]
    fn expects_continue_until_the_body_arrives() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n";
        assert!(!expects_continue(&head[..head.len() - 1], &limits()));
        assert!(expects_continue(head, &limits()));
        let mut bytes = head.to_vec();
        bytes.push(b'h');
        assert!(expects_continue(&bytes, &limits()));
        bytes.push(b'i');
        assert!(!expects_continue(&bytes, &limits()));
        let old = b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert!(!expects_continue(old, &limits()));
        let plain = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n";
        assert!(!expects_continue(plain, &limits()));
    }

    /// Properties every `parse` result must have, whatever the input.
    fn check_parse_contract(bytes: &[u8], limits: &Limits) {
        match parse(bytes, limits) {
            Ok(Some((request, consumed))) => {
                assert!(consumed > 0 && consumed <= bytes.len());
                assert!(consumed <= limits.head_bytes_max + limits.body_bytes_max);
                assert!(request.headers.len() <= limits.headers_max);
                // A complete request does not depend on the bytes after it...
                let alone = parse(&bytes[..consumed], limits);
                assert_eq!(alone, Ok(Some((request, consumed))));
                // ...and none of its prefixes is complete or an error.
                for split in 0..consumed {
                    assert_eq!(parse(&bytes[..split], limits), Ok(None), "cut at {split}");
                }
            }
            Ok(None) => {
                assert!(bytes.len() <= limits.head_bytes_max + limits.body_bytes_max);
            }
            Err(error) => {
                assert!(matches!(error.status(), 400 | 411 | 413 | 431 | 505));
            }
        }
    }

    fn any_limits() -> impl Strategy<Value = Limits> {
        (0usize..80, 0usize..300, 0usize..64).prop_map(|(headers, head, body)| Limits {
            headers_max: headers,
            head_bytes_max: head,
            body_bytes_max: body,
        })
    }

    /// Bytes that often matter to the parser, so mutations hit interesting paths.
    fn mutation_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            any::<u8>(),
            proptest::sample::select(b"\r\n :,0123456789\t".to_vec())
        ]
    }

    fn mutate(seed: &[u8], mutations: &[(usize, u8, u8)]) -> Vec<u8> {
        let mut bytes = seed.to_vec();
        for &(position, byte, kind) in mutations {
            match kind {
                0 if !bytes.is_empty() => {
                    let index = position % bytes.len();
                    bytes[index] = byte;
                }
                1 => bytes.insert(position % (bytes.len() + 1), byte),
                _ if !bytes.is_empty() => {
                    bytes.remove(position % bytes.len());
                }
                _ => {}
            }
        }
        bytes
    }

    proptest! {
        #[test]
        fn random_bytes_keep_the_contract(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            limits in any_limits(),
        ) {
            check_parse_contract(&bytes, &limits);
        }

        #[test]
        fn mutated_requests_keep_the_contract(
            seed in 0..VALID.len() + INVALID.len(),
            mutations in proptest::collection::vec(
                (any::<usize>(), mutation_byte(), 0u8..3), 0..6),
            use_default_limits in any::<bool>(),
            limits in any_limits(),
            cut in any::<usize>(),
        ) {
            let seed_bytes = match VALID.get(seed) {
                Some(case) => case.bytes,
                None => INVALID[seed - VALID.len()].bytes,
            };
            let limits = if use_default_limits { Limits::default() } else { limits };
            let bytes = mutate(seed_bytes, &mutations);
            check_parse_contract(&bytes, &limits);
            // A cut exercises the "incomplete" paths as well.
            check_parse_contract(&bytes[..cut % (bytes.len() + 1)], &limits);
        }

        #[test]
        fn head_too_large_once_the_buffer_passes_the_limit(
            head_bytes_max in 16usize..512,
            lines in proptest::collection::vec("[a-z]{1,8}: [ -~]{8,40}", 1..8),
        ) {
            // Every header line is at least 13 bytes, so 512 bytes hold fewer than
            // HEADERS_MAX_LIMIT headers: the only thing wrong is the missing end of head.
            let mut bytes = b"GET / HTTP/1.1\r\n".to_vec();
            for line in lines.iter().cycle() {
                if bytes.len() > head_bytes_max {
                    break;
                }
                bytes.extend_from_slice(line.as_bytes());
                bytes.extend_from_slice(b"\r\n");
            }
            let limits = Limits {
                head_bytes_max,
                headers_max: HEADERS_MAX_LIMIT,
                ..Limits::default()
            };
            prop_assert_eq!(parse(&bytes[..head_bytes_max], &limits), Ok(None));
            prop_assert_eq!(
                parse(&bytes[..head_bytes_max + 1], &limits),
                Err(ParseError::HeadTooLarge { max: head_bytes_max })
            );
            prop_assert_eq!(
                parse(&bytes, &limits),
                Err(ParseError::HeadTooLarge { max: head_bytes_max })
            );
        }
    }
}
