//! SKU ids as the wire contract allows them (PROTOCOL.md "Stock model").
//!
//! A SKU id is 1 to [`SKU_BYTES_MAX`] bytes of `[A-Za-z0-9._:/-]`, and is not one of
//! [`SKU_NAMES_RESERVED`]. `*` is not a SKU: it is the subscription wildcard, and it falls
//! outside the allowed bytes, so no special case is needed for it.
//!
//! Matching is byte-exact and case-sensitive: `Batch` is a valid SKU, `batch` is not.

use super::ops::OpError;

/// Longest SKU id, in bytes (PROTOCOL.md "Stock model").
pub const SKU_BYTES_MAX: usize = 128;

/// Ids that match the byte rules but may not name a SKU. `batch` names the HTTP batch route
/// (`POST /stock/batch`), so a SKU called `batch` could not be written over HTTP.
pub const SKU_NAMES_RESERVED: [&str; 1] = ["batch"];

/// Checks that `name` may identify a SKU. Every name the store interns passes through here.
pub fn validate(name: &str) -> Result<(), OpError> {
    let length_ok = (1..=SKU_BYTES_MAX).contains(&name.len());
    if length_ok && name.bytes().all(is_sku_byte) && !SKU_NAMES_RESERVED.contains(&name) {
        Ok(())
    } else {
        Err(OpError::InvalidSku)
    }
}

/// One byte of `[A-Za-z0-9._:/-]`. Only ASCII qualifies, so a valid id is also valid UTF-8,
/// needs no escaping in JSON and is one byte per character.
pub fn is_sku_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'/' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_table() {
        let longest = "x".repeat(SKU_BYTES_MAX);
        let too_long = "x".repeat(SKU_BYTES_MAX + 1);
        let cases: &[(&str, bool)] = &[
            ("a", true),
            ("sku-1", true),
            ("A.b_c:d/e-f", true),
            ("0123456789", true),
            ("Batch", true),
            ("batches", true),
            ("batch/1", true),
            (".", true),
            (&longest, true),
            ("", false),
            (&too_long, false),
            ("batch", false),
            ("*", false),
            ("a*", false),
            ("a b", false),
            ("a,b", false),
            ("a?b", false),
            ("a%20b", false),
            ("a\"b", false),
            ("a\\b", false),
            ("a\0b", false),
            ("a\nb", false),
            ("é", false),
            ("日本", false),
        ];
        for &(name, valid) in cases {
            let expected = if valid {
                Ok(())
            } else {
                Err(OpError::InvalidSku)
            };
            assert_eq!(validate(name), expected, "{name:?}");
        }
    }

    #[test]
    fn every_byte_outside_the_set_is_rejected() {
        for byte in 0..=u8::MAX {
            let allowed = byte.is_ascii_alphanumeric() || b"._:/-".contains(&byte);
            assert_eq!(is_sku_byte(byte), allowed, "byte {byte:#04x}");
        }
    }
}
