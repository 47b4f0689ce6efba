//! Contract error codes, and the one place that maps internal errors to them.

use std::fmt;

use crate::stock::{HoldError, OpError, Stock};

/// Every error code of PROTOCOL.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    UnknownAction,
    InvalidSku,
    InvalidChange,
    Unauthorized,
    InsufficientStock,
    InsufficientReserved,
    BelowReserved,
    VersionConflict,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
    NotFound,
    MethodNotAllowed,
    UnknownHold,
    HoldExpired,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::UnknownAction,
        ErrorCode::InvalidSku,
        ErrorCode::InvalidChange,
        ErrorCode::Unauthorized,
        ErrorCode::InsufficientStock,
        ErrorCode::InsufficientReserved,
        ErrorCode::BelowReserved,
        ErrorCode::VersionConflict,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::UnknownHold,
        ErrorCode::HoldExpired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::InvalidSku => "invalid_sku",
            ErrorCode::InvalidChange => "invalid_change",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InsufficientStock => "insufficient_stock",
            ErrorCode::InsufficientReserved => "insufficient_reserved",
            ErrorCode::BelowReserved => "below_reserved",
            ErrorCode::VersionConflict => "version_conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::UnknownHold => "unknown_hold",
            ErrorCode::HoldExpired => "hold_expired",
        }
    }

    /// PROTOCOL.md "HTTP API": 400 malformed/invalid, 401, 404, 405, 409 stock rules and
    /// version conflict, 413, 429, 503.
    /// Codes of the stock rules (counted per op in the metrics, like successes).
    pub fn is_stock_rule(self) -> bool {
        matches!(
            self,
            ErrorCode::InvalidChange
                | ErrorCode::InsufficientStock
                | ErrorCode::InsufficientReserved
                | ErrorCode::BelowReserved
                | ErrorCode::VersionConflict
        )
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::UnknownType
            | ErrorCode::UnknownAction
            | ErrorCode::InvalidSku
            | ErrorCode::InvalidChange => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound | ErrorCode::UnknownHold => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::InsufficientStock
            | ErrorCode::InsufficientReserved
            | ErrorCode::BelowReserved
            | ErrorCode::VersionConflict
            | ErrorCode::HoldExpired => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// An error reply: code, human message, and for ops the failing index (batches) and the
/// current state (version conflicts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub index: Option<usize>,
    /// (SKU name, its current state) for `version_conflict`.
    pub stock: Option<(String, Stock)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            index: None,
            stock: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn at(mut self, index: Option<usize>) -> Self {
        self.index = index;
        self
    }

    /// Maps a stock rule violation. `sku` names the op's SKU (for the conflict's state).
    pub fn from_op(error: &OpError, sku: &str) -> Self {
        let code = match error {
            OpError::InvalidSku => ErrorCode::InvalidSku,
            OpError::InvalidChange { .. } => ErrorCode::InvalidChange,
            OpError::InsufficientStock { .. } => ErrorCode::InsufficientStock,
            OpError::InsufficientReserved { .. } => ErrorCode::InsufficientReserved,
            OpError::BelowReserved { .. } => ErrorCode::BelowReserved,
            OpError::VersionConflict { .. } => ErrorCode::VersionConflict,
        };
        let stock = match error {
            OpError::VersionConflict { current, .. } => Some((sku.to_string(), *current)),
            _ => None,
        };
        ApiError {
            code,
            message: error.to_string(),
            index: None,
            stock,
        }
    }
}

impl ApiError {
    /// Maps a hold rule refusal (PROTOCOL.md "Holds"): `unknown_hold`, `hold_expired`, a
    /// missing or out-of-range `ttl_ms` is `bad_request`, a hold limit is `too_large`.
    pub fn from_hold(error: &HoldError, hold: &str) -> Self {
        let code = match error {
            HoldError::Unknown => ErrorCode::UnknownHold,
            HoldError::Expired => ErrorCode::HoldExpired,
            HoldError::TtlRequired | HoldError::TtlOutOfRange { .. } => ErrorCode::BadRequest,
            HoldError::HoldsFull { .. } | HoldError::TooManyLines { .. } => ErrorCode::TooLarge,
        };
        Self::new(code, format!("hold `{hold}`: {error}"))
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_name_and_a_client_or_server_status() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        for code in ErrorCode::ALL {
            assert!((400..=503).contains(&code.http_status()), "{code:?}");
        }
    }
}
