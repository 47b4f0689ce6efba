//! Close status codes (RFC 6455 §7.4).
//!
//! Only the codes this server sends or must recognise are named. Whether a code received from a peer is
//! acceptable is decided by [`is_valid_received`], which follows RFC 6455 §7.4.1-§7.4.2 and the IANA
//! "WebSocket Close Code Number Registry" (RFC 6455 §11.7).

use super::frame::CONTROL_PAYLOAD_BYTES_MAX;

/// 1000: the purpose of the connection has been fulfilled (RFC 6455 §7.4.1).
pub const NORMAL: u16 = 1000;
/// 1001: the endpoint is going away, e.g. the server is shutting down (RFC 6455 §7.4.1).
pub const GOING_AWAY: u16 = 1001;
/// 1002: the peer broke the protocol (RFC 6455 §7.4.1).
pub const PROTOCOL_ERROR: u16 = 1002;
/// 1003: the endpoint cannot accept this type of data (RFC 6455 §7.4.1).
pub const UNSUPPORTED_DATA: u16 = 1003;
/// 1005: reserved; means "no status code was present". Never sent on the wire (RFC 6455 §7.4.1).
pub const NO_STATUS_RECEIVED: u16 = 1005;
/// 1006: reserved; means "closed without a close frame". Never sent on the wire (RFC 6455 §7.4.1).
pub const ABNORMAL_CLOSURE: u16 = 1006;
/// 1007: a message's data was not consistent with its type, e.g. non-UTF-8 text (RFC 6455 §7.4.1).
pub const INVALID_PAYLOAD: u16 = 1007;
/// 1008: a message violated the endpoint's policy (RFC 6455 §7.4.1).
pub const POLICY_VIOLATION: u16 = 1008;
/// 1009: a message was too big to process (RFC 6455 §7.4.1).
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// 1011: the server hit an unexpected condition (RFC 6455 §7.4.1, IANA registry).
pub const INTERNAL_ERROR: u16 = 1011;
/// 1013: try again later, e.g. the server is overloaded (IANA registry, RFC 6455 §11.7).
pub const TRY_AGAIN_LATER: u16 = 1013;
/// 1015: reserved; means "TLS handshake failed". Never sent on the wire (RFC 6455 §7.4.1).
pub const TLS_HANDSHAKE: u16 = 1015;

/// Bytes of the status code at the start of a close frame payload (RFC 6455 §5.5.1).
pub const CODE_BYTES: usize = 2;

/// Longest reason that fits in a close frame: control payloads are at most 125 bytes and the code
/// takes 2 of them (RFC 6455 §5.5, §5.5.1).
pub const REASON_BYTES_MAX: usize = CONTROL_PAYLOAD_BYTES_MAX - CODE_BYTES;

/// Whether `code` may appear in a close frame received from a peer.
///
/// RFC 6455 §7.4.1-§7.4.2: 1000-1003 and 1007-1014 are defined (1012-1014 were added to the IANA
/// registry later); 1004 is reserved, and 1005, 1006 and 1015 are reserved for local use and MUST NOT be
/// sent; 0-999 are unused; 1016-2999 are reserved for future RFCs; 3000-3999 are registered by libraries
/// and frameworks and 4000-4999 are private use, both of which an endpoint must accept. Anything else is
/// a protocol error (close with 1002).
pub fn is_valid_received(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_valid_received_matches_rfc_6455_ranges() {
        // (code, valid): every boundary of every range, plus the named reserved codes.
        let cases: &[(u16, bool)] = &[
            (0, false),
            (999, false),
            (NORMAL, true),
            (GOING_AWAY, true),
            (PROTOCOL_ERROR, true),
            (UNSUPPORTED_DATA, true),
            (1004, false),
            (NO_STATUS_RECEIVED, false),
            (ABNORMAL_CLOSURE, false),
            (INVALID_PAYLOAD, true),
            (POLICY_VIOLATION, true),
            (MESSAGE_TOO_BIG, true),
            (1010, true),
            (INTERNAL_ERROR, true),
            (1012, true),
            (TRY_AGAIN_LATER, true),
            (1014, true),
            (TLS_HANDSHAKE, false),
            (1016, false),
            (2999, false),
            (3000, true),
            (3999, true),
            (4000, true),
            (4999, true),
            (5000, false),
            (u16::MAX, false),
        ];
        for &(code, valid) in cases {
            assert_eq!(is_valid_received(code), valid, "code {code}");
        }
    }

    #[test]
    fn is_valid_received_exhaustive_count() {
        // 4 (1000-1003) + 8 (1007-1014) + 2000 (3000-4999).
        let valid = (0..=u16::MAX)
            .filter(|&code| is_valid_received(code))
            .count();
        assert_eq!(valid, 4 + 8 + 2000);
    }
}
