//! Authoritative stock: SKU ids, the six stock actions, atomic batches and the idempotency key
//! cache (PROTOCOL.md "Stock model", "Operations", idempotency).
//!
//! This module does no I/O and knows nothing of JSON or networking. The API layer parses a
//! request into names, [`Action`]s and amounts ([`Action::parse`], [`Op::check_amount`]),
//! interns names in the [`Store`], and maps [`OpError::code`] to the wire.
//!
//! A keyed write, in one event-loop turn:
//! 1. `IdempotencyCache::lookup` with the request's [`Fingerprint`]: `Hit` replies with the
//!    recorded result (duplicate), `Mismatch` is `bad_request`, `Miss` goes on.
//! 2. `IdempotencyCache::check_room`; `CacheFull` is `unavailable`.
//! 3. Capture `Store::get` of the touched SKUs, `Store::apply`, then `IdempotencyCache::insert`.
//! 4. Write the log. If it fails: `Store::undo` and `IdempotencyCache::remove`, reply
//!    `unavailable`. Nothing is acked or broadcast before the record is durable.
#![warn(missing_docs)]

pub mod holds;
pub mod idempotency;
mod name_index;
pub mod ops;
pub mod sku;
pub mod store;

#[cfg(test)]
mod proptest_model;

pub use holds::{
    HoldChange, HoldError, HoldLimits, HoldState, HoldWriteError, Holds, Settle, Take,
};
pub use idempotency::{CacheFull, Fingerprint, IdempotencyCache, Lookup};
pub use ops::{Action, BatchError, Op, OpError};
pub use store::{Applied, SkuId, Stock, Store};
