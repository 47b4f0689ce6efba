//! Percent-decoding (RFC 3986 §2.1) for path parameters and query strings.
//!
//! Two flavours, because the two places have different specs:
//! - [`percent_decode`] is strict: a path parameter such as a SKU id either decodes cleanly or is
//!   rejected, so `/stock/a%2` never silently becomes a different SKU.
//! - [`form_urlencoded_decode`] follows the WHATWG `application/x-www-form-urlencoded` parser,
//!   which is lenient by spec ('+' is a space, a stray '%' stays literal, bad UTF-8 becomes
//!   U+FFFD), so query strings behave as they do in browsers and `URLSearchParams`.

/// Decodes `%XX` escapes. `+` stays `+` (it means a space only in form data).
///
/// Returns `None` if an escape is not followed by two hex digits or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            out.push(escaped_byte(bytes, index)?);
            index += 3;
        } else {
            out.push(byte);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes one name or value of `application/x-www-form-urlencoded` data (WHATWG URL
/// standard §5.1): `+` becomes a space, valid `%XX` escapes become bytes, anything else is kept
/// as is, and invalid UTF-8 is replaced by U+FFFD.
pub fn form_urlencoded_decode(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        match (byte, escaped_byte(bytes, index)) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                index += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                index += 1;
            }
            _ => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The byte encoded by the `%XX` escape starting at `bytes[index]`, if it is one.
fn escaped_byte(bytes: &[u8], index: usize) -> Option<u8> {
    if bytes.get(index) != Some(&b'%') {
        return None;
    }
    let high = hex_value(*bytes.get(index + 1)?)?;
    let low = hex_value(*bytes.get(index + 2)?)?;
    Some(high << 4 | low)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decode_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", Some("")),
            ("abc-123", Some("abc-123")),
            ("a%2Fb", Some("a/b")),
            ("a%2fb", Some("a/b")),
            ("%41%42", Some("AB")),
            ("a+b", Some("a+b")),
            ("%C3%A9", Some("é")),
            ("é", Some("é")),
            ("%", None),
            ("%4", None),
            ("%4G", None),
            ("abc%", None),
            ("%zz", None),
            ("%C3", None), // half a UTF-8 sequence
            ("%FF", None),
        ];
        for &(input, expected) in cases {
            assert_eq!(
                percent_decode(input).as_deref(),
                expected,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn form_urlencoded_decode_table() {
        let cases: &[(&str, &str)] = &[
            ("", ""),
            ("plain", "plain"),
            ("a+b", "a b"),
            ("a%20b", "a b"),
            ("a%2Bb", "a+b"),
            ("100%", "100%"),
            ("%zz", "%zz"),
            ("%4", "%4"),
            ("%C3%A9", "é"),
            ("%FF", "\u{FFFD}"),
        ];
        for &(input, expected) in cases {
            assert_eq!(form_urlencoded_decode(input), expected, "input {input:?}");
        }
    }
}
