//! `Sec-WebSocket-Extensions` on the server side: the permessage-deflate negotiation of RFC 7692.
//!
//! # Contract
//!
//! [`negotiate`] reads every `Sec-WebSocket-Extensions` field of the request, in order (RFC 9110
//! §5.3: repeated fields are one comma-separated list), and accepts the first permessage-deflate
//! offer it can meet (RFC 7692 §5: offers are listed in the client's order of preference). The
//! result says what the connection agreed and carries the response header value. Offers for other
//! extensions are ignored; an invalid permessage-deflate offer is declined and the next one is
//! tried (RFC 7692 §5.1: unknown parameter, invalid value, repeated parameter). With no acceptable
//! offer the connection goes on without compression: RFC 7692 never asks a server to fail the
//! handshake, only to decline.
//!
//! What we always answer, and why:
//! - `server_no_context_takeover` (§7.1.1.1, the server MAY add it): a broadcast frame is
//!   compressed once and the same bytes go to every subscriber, so no message may depend on an
//!   earlier one sent on the same connection.
//! - `client_no_context_takeover` (§7.1.1.2: the server MAY include it even if the offer did not):
//!   each client message then inflates on its own, so no connection keeps an inflater (a 32 KiB
//!   window and its tables, about 43 KiB with miniz_oxide) between messages.
//! - `server_max_window_bits=N` only when the offer asked for it, with the same N (§7.1.2.1); the
//!   compressed twin of a frame then goes to that connection only if each of its messages is at
//!   most 2^N bytes (no back-reference can reach further), else the plain frame does.
//! - `client_max_window_bits` never: our inflater always has the full 32 KiB window, which reads a
//!   stream made with any smaller one, and an offer without the parameter forbids it in the answer
//!   (§7.1.2.2).
//!
//! Nothing here allocates except the response value of an accepted offer.

use std::fmt;

/// The extension's name (RFC 7692 §7).
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// Smallest and largest LZ77 window sizes, as powers of two (RFC 7692 §7.1.2.1).
pub const WINDOW_BITS_MIN: u8 = 8;
/// The default when a side does not limit the window (RFC 7692 §7.1.2.1, §7.1.2.2).
pub const WINDOW_BITS_MAX: u8 = 15;

/// Parameters one offer may carry once each, as bits of [`Offer::seen`].
const SERVER_NO_CONTEXT_TAKEOVER: u8 = 1;
const CLIENT_NO_CONTEXT_TAKEOVER: u8 = 2;
const SERVER_MAX_WINDOW_BITS: u8 = 4;
const CLIENT_MAX_WINDOW_BITS: u8 = 8;

/// What a connection agreed to (RFC 7692 §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    /// The window our messages to this client may use: `server_max_window_bits`, or 15.
    pub server_window_bits: u8,
}

impl Agreement {
    /// Longest message whose compressed form is valid for this client whatever the compressor's
    /// window: every back-reference stays inside a message, so it is shorter than the message.
    pub fn window_bytes(&self) -> usize {
        1 << self.server_window_bits
    }

    /// The `Sec-WebSocket-Extensions` value that accepts the offer.
    pub fn response_value(&self) -> String {
        let mut value =
            format!("{PERMESSAGE_DEFLATE}; server_no_context_takeover; client_no_context_takeover");
        if self.server_window_bits < WINDOW_BITS_MAX {
            value.push_str("; server_max_window_bits=");
            value.push_str(&self.server_window_bits.to_string());
        }
        value
    }
}

/// Why one permessage-deflate offer was declined (RFC 7692 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decline {
    /// Not `name [; param[=value]]*` with tokens and quoted strings (RFC 6455 §9.1).
    Malformed,
    /// A parameter RFC 7692 does not define for an offer.
    UnknownParameter,
    /// The same parameter twice.
    DuplicateParameter,
    /// A value where none is allowed, none where one is required, or a window size outside 8..=15
    /// (or with a leading zero, which the RFC's grammar excludes).
    InvalidValue,
}

impl fmt::Display for Decline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decline::Malformed => "malformed extension offer",
            Decline::UnknownParameter => "unknown permessage-deflate parameter",
            Decline::DuplicateParameter => "repeated permessage-deflate parameter",
            Decline::InvalidValue => "invalid permessage-deflate parameter value",
        })
    }
}

/// One valid permessage-deflate offer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// The parameters present, as the bit constants above.
    seen: u8,
    /// `server_max_window_bits=N`, if offered.
    server_max_window_bits: Option<u8>,
}

impl Offer {
    /// How we accept it. Every valid offer is one we can meet (see the module docs).
    fn accept(&self) -> Agreement {
        Agreement {
            server_window_bits: self.server_max_window_bits.unwrap_or(WINDOW_BITS_MAX),
        }
    }
}

/// The first acceptable permessage-deflate offer among the request's `Sec-WebSocket-Extensions`
/// fields, or `None`: then the handshake goes on without compression.
///
/// `headers` are the request's fields as name/value pairs, as for [`super::handshake::validate`].
pub fn negotiate(headers: &[(&str, &[u8])]) -> Option<Agreement> {
    offers(headers)
        .find_map(|offer| offer.ok())
        .map(|offer| offer.accept())
}

/// Every permessage-deflate offer of the request, in order, parsed or declined.
pub fn offers<'h>(
    headers: &'h [(&'h str, &'h [u8])],
) -> impl Iterator<Item = Result<Offer, Decline>> + 'h {
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("Sec-WebSocket-Extensions"))
        .flat_map(|&(_, value)| split_outside_quotes(value, b','))
        .filter_map(parse_element)
}

/// One element of the extension list: `None` when it is empty (RFC 9110 §5.6.1 allows empty list
/// elements) or names another extension.
fn parse_element(element: &[u8]) -> Option<Result<Offer, Decline>> {
    let element = element.trim_ascii();
    if element.is_empty() {
        return None;
    }
    let mut parts = split_outside_quotes(element, b';');
    let name = parts.next().unwrap_or_default().trim_ascii();
    if !is_token(name) {
        // Cannot tell which extension it names: it is nobody's offer we could accept.
        return Some(Err(Decline::Malformed));
    }
    if !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE.as_bytes()) {
        return None;
    }
    let mut offer = Offer::default();
    for param in parts {
        if let Err(decline) = offer.add(param) {
            return Some(Err(decline));
        }
    }
    Some(Ok(offer))
}

impl Offer {
    /// Adds one `name[=value]` parameter (RFC 7692 §7.1).
    fn add(&mut self, param: &[u8]) -> Result<(), Decline> {
        let (name, value) = match param.iter().position(|&byte| byte == b'=') {
            Some(at) => (&param[..at], Some(unquote(param[at + 1..].trim_ascii())?)),
            None => (param, None),
        };
        let name = name.trim_ascii();
        if !is_token(name) {
            return Err(Decline::Malformed);
        }
        let bit = match name.to_ascii_lowercase().as_slice() {
            b"server_no_context_takeover" => SERVER_NO_CONTEXT_TAKEOVER,
            b"client_no_context_takeover" => CLIENT_NO_CONTEXT_TAKEOVER,
            b"server_max_window_bits" => SERVER_MAX_WINDOW_BITS,
            b"client_max_window_bits" => CLIENT_MAX_WINDOW_BITS,
            _ => return Err(Decline::UnknownParameter),
        };
        // RFC 7692 §7: "A server MUST decline an extension negotiation offer for this extension
        // if ... The negotiation offer contains multiple extension parameters with the same name."
        if self.seen & bit != 0 {
            return Err(Decline::DuplicateParameter);
        }
        self.seen |= bit;
        match (bit, value) {
            // §7.1.1.1, §7.1.1.2: these parameters have no value.
            (SERVER_NO_CONTEXT_TAKEOVER | CLIENT_NO_CONTEXT_TAKEOVER, None) => Ok(()),
            // §7.1.2.1: server_max_window_bits needs a value.
            (SERVER_MAX_WINDOW_BITS, Some(value)) => {
                self.server_max_window_bits = Some(window_bits(value)?);
                Ok(())
            }
            // §7.1.2.2: client_max_window_bits may have a value; our inflater ignores it.
            (CLIENT_MAX_WINDOW_BITS, None) => Ok(()),
            (CLIENT_MAX_WINDOW_BITS, Some(value)) => window_bits(value).map(|_| ()),
            _ => Err(Decline::InvalidValue),
        }
    }
}

/// A window size: "a decimal integer value without leading zeroes between 8 to 15, inclusive"
/// (RFC 7692 §7.1.2.1, ABNF `%x38-39 / "1" %x30-35`).
fn window_bits(value: &[u8]) -> Result<u8, Decline> {
    match value {
        [digit @ b'8'..=b'9'] => Ok(digit - b'0'),
        [b'1', digit @ b'0'..=b'5'] => Ok(10 + digit - b'0'),
        _ => Err(Decline::InvalidValue),
    }
}

/// A parameter value, a token or a quoted string whose content, once unescaped, must be a token
/// (RFC 6455 §9.1). Since a token holds no `"` or `\`, a valid quoted value has no escapes that
/// change it except `\` before a token character, which is rare enough to decline.
fn unquote(value: &[u8]) -> Result<&[u8], Decline> {
    let inner = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    };
    if is_token(inner) {
        Ok(inner)
    } else {
        Err(Decline::InvalidValue)
    }
}

/// RFC 9110 §5.6.2: `token = 1*tchar`.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

/// Splits at `separator` except inside a quoted string (where `\` escapes the next byte).
fn split_outside_quotes(bytes: &[u8], separator: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let current = rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (at, &byte) in current.iter().enumerate() {
            match byte {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                _ if byte == separator && !quoted => {
                    rest = Some(&current[at + 1..]);
                    return Some(&current[..at]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(current)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agree(values: &[&'static str]) -> Option<Agreement> {
        let headers: Vec<(&str, &[u8])> = values
            .iter()
            .map(|value| ("Sec-WebSocket-Extensions", value.as_bytes()))
            .collect();
        negotiate(&headers)
    }

    const FULL: Option<Agreement> = Some(Agreement {
        server_window_bits: 15,
    });

    const fn bits(server_window_bits: u8) -> Option<Agreement> {
        Some(Agreement { server_window_bits })
    }

    #[test]
    fn negotiation_table() {
        // (header values, in order; outcome)
        let cases: &[(&[&str], Option<Agreement>)] = &[
            (&[], None),
            (&[""], None),
            (&["permessage-deflate"], FULL),
            (&["PerMessage-Deflate"], FULL),
            // What browsers send.
            (&["permessage-deflate; client_max_window_bits"], FULL),
            (&["permessage-deflate;client_max_window_bits=10"], FULL),
            (&["permessage-deflate; client_no_context_takeover"], FULL),
            (&["permessage-deflate; server_no_context_takeover"], FULL),
            (
                &["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
                FULL,
            ),
            (&["permessage-deflate; server_max_window_bits=10"], bits(10)),
            (&["permessage-deflate; server_max_window_bits=8"], bits(8)),
            (&["permessage-deflate; server_max_window_bits=15"], bits(15)),
            (
                &["permessage-deflate; server_max_window_bits=\"9\""],
                bits(9),
            ),
            (
                &["permessage-deflate ; server_max_window_bits = 12 "],
                bits(12),
            ),
            (&["permessage-deflate; SERVER_MAX_WINDOW_BITS=12"], bits(12)),
            // Other extensions are skipped; the first acceptable deflate offer wins.
            (&["x-webkit-deflate-frame, permessage-deflate"], FULL),
            (
                &["foo; bar=\"a,b\", permessage-deflate; server_max_window_bits=9"],
                bits(9),
            ),
            (
                &["permessage-deflate; server_max_window_bits=9, permessage-deflate"],
                bits(9),
            ),
            (
                &[
                    "permessage-deflate",
                    "permessage-deflate; server_max_window_bits=9",
                ],
                FULL,
            ),
            // Invalid offers are declined, and the next one is taken.
            (
                &["permessage-deflate; bogus, permessage-deflate; server_max_window_bits=11"],
                bits(11),
            ),
            (&["permessage-deflate; bogus", "permessage-deflate"], FULL),
            (&[",, permessage-deflate ,"], FULL),
            // Each invalid on its own: declined, no compression, handshake goes on.
            (&["permessage-deflate; bogus"], None),
            (
                &["permessage-deflate; server_no_context_takeover; server_no_context_takeover"],
                None,
            ),
            (
                &["permessage-deflate; client_max_window_bits; client_max_window_bits=9"],
                None,
            ),
            (
                &["permessage-deflate; server_max_window_bits=10; server_max_window_bits=10"],
                None,
            ),
            (&["permessage-deflate; server_no_context_takeover=1"], None),
            (
                &["permessage-deflate; client_no_context_takeover=\"x\""],
                None,
            ),
            (&["permessage-deflate; server_max_window_bits"], None),
            (&["permessage-deflate; server_max_window_bits=7"], None),
            (&["permessage-deflate; server_max_window_bits=16"], None),
            (&["permessage-deflate; server_max_window_bits=08"], None),
            (&["permessage-deflate; server_max_window_bits=0"], None),
            (&["permessage-deflate; server_max_window_bits=-9"], None),
            (&["permessage-deflate; server_max_window_bits="], None),
            (&["permessage-deflate; client_max_window_bits=16"], None),
            (&["permessage-deflate; client_max_window_bits=abc"], None),
            (
                &["permessage-deflate; server_max_window_bits=\"1 0\""],
                None,
            ),
            (&["permessage-deflate; ; server_no_context_takeover"], None),
            (&["permessage-deflate;"], None),
            (&["permessage-deflate; a b"], None),
            (&["\"permessage-deflate\""], None),
            (&["x-webkit-deflate-frame"], None),
        ];
        for (values, expected) in cases {
            assert_eq!(agree(values), *expected, "{values:?}");
        }
    }

    #[test]
    fn declines_say_why() {
        let cases: &[(&str, Decline)] = &[
            ("permessage-deflate; mystery", Decline::UnknownParameter),
            (
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                Decline::DuplicateParameter,
            ),
            (
                "permessage-deflate; server_max_window_bits=99",
                Decline::InvalidValue,
            ),
            (
                "permessage-deflate; server_max_window_bits=\"1\\0\"",
                Decline::InvalidValue,
            ),
            ("permessage-deflate; =9", Decline::Malformed),
            ("permess@ge", Decline::Malformed),
        ];
        for (value, decline) in cases {
            let headers = [("sec-websocket-extensions", value.as_bytes())];
            let found: Vec<_> = offers(&headers).collect();
            assert_eq!(found, vec![Err(*decline)], "{value}");
            assert!(!decline.to_string().is_empty());
        }
    }

    #[test]
    fn other_headers_are_not_read() {
        let headers = [
            ("Sec-WebSocket-Protocol", &b"permessage-deflate"[..]),
            ("X-Sec-WebSocket-Extensions", b"permessage-deflate"),
        ];
        assert_eq!(negotiate(&headers), None);
    }

    #[test]
    fn response_values() {
        assert_eq!(
            FULL.unwrap().response_value(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            bits(9).unwrap().response_value(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=9"
        );
        assert_eq!(bits(9).unwrap().window_bytes(), 512);
        assert_eq!(FULL.unwrap().window_bytes(), 32 * 1024);
    }

    #[test]
    fn split_respects_quotes() {
        let parts: Vec<&[u8]> = split_outside_quotes(br#"a="x,y",b="q\",r",c"#, b',').collect();
        assert_eq!(parts, vec![&br#"a="x,y""#[..], br#"b="q\",r""#, b"c"]);
        let parts: Vec<&[u8]> = split_outside_quotes(b"", b',').collect();
        assert_eq!(parts, vec![&b""[..]]);
    }
}
