//! The wire contract (PROTOCOL.md): parsing client messages into typed requests, the error codes
//! and their HTTP statuses, and the JSON of every reply. Only this layer maps errors to codes.

pub mod error;
mod hot_parse;
pub mod messages;
pub mod reply;

pub use error::{ApiError, ErrorCode};
pub use messages::{ClientRequest, OpSpec, WriteRequest};
