//! The six stock actions, their amount ranges and the errors that reject them
//! (PROTOCOL.md "Operations").
//!
//! [`Action::apply`] is pure arithmetic on one [`Stock`]: it never touches the version. The
//! store (`super::store`) adds versions, `if_version` and batch atomicity on top of it.
//!
//! Amount ranges: a `set` carries `quantity` in `0..=ON_HAND_MAX`, every other action carries
//! `change` in `1..=CHANGE_MAX`. Anything else is [`OpError::InvalidChange`], whether it is caught
//! when parsing ([`Op::check_amount`]) or when applying (the store re-checks, so an `Op` built by
//! hand cannot slip past the rules).

use std::fmt;
use std::ops::RangeInclusive;

use super::store::{SkuId, Stock};

/// Most physical units one SKU may hold (PROTOCOL.md "Stock model": `0 <= on_hand <= 1e12`).
pub const ON_HAND_MAX: u64 = 1_000_000_000_000;

/// Largest `change` of one op (PROTOCOL.md "Operations": `1..=1e9`).
pub const CHANGE_MAX: u64 = 1_000_000_000;

// `increase` adds in u64 before comparing with ON_HAND_MAX, so the sum must not wrap.
const _: () = assert!(ON_HAND_MAX.checked_add(CHANGE_MAX).is_some());
const _: () = assert!(CHANGE_MAX <= ON_HAND_MAX);
// JSON integers arrive as i128 in `check_amount`; every valid amount must fit.
const _: () = assert!((ON_HAND_MAX as u128) < (i128::MAX as u128));

/// What an op does to a SKU. Wire names are lowercase (`set`, `increase`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `on_hand = quantity`.
    Set,
    /// `on_hand += change`.
    Increase,
    /// `on_hand -= change`, only from units not reserved.
    Decrease,
    /// `reserved += change`, only from units not reserved.
    Reserve,
    /// `reserved -= change`: a reservation was cancelled.
    Release,
    /// `on_hand -= change` and `reserved -= change`: a reservation became a sale.
    Commit,
}

impl Action {
    /// Every action, in wire-table order.
    pub const ALL: [Action; 6] = [
        Action::Set,
        Action::Increase,
        Action::Decrease,
        Action::Reserve,
        Action::Release,
        Action::Commit,
    ];

    /// The action named `name` on the wire. Case-sensitive: `SET` is an unknown action.
    pub fn parse(name: &str) -> Option<Action> {
        match name {
            "set" => Some(Action::Set),
            "increase" => Some(Action::Increase),
            "decrease" => Some(Action::Decrease),
            "reserve" => Some(Action::Reserve),
            "release" => Some(Action::Release),
            "commit" => Some(Action::Commit),
            _ => None,
        }
    }

    /// The wire name, inverse of [`Action::parse`].
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Set => "set",
            Action::Increase => "increase",
            Action::Decrease => "decrease",
            Action::Reserve => "reserve",
            Action::Release => "release",
            Action::Commit => "commit",
        }
    }

    /// The JSON field that carries this action's amount.
    pub fn amount_field(self) -> &'static str {
        match self {
            Action::Set => "quantity",
            _ => "change",
        }
    }

    /// The amounts this action accepts. A `set` to 0 empties a SKU; a change of 0 would be a
    /// version bump that changes nothing, which the contract rules out.
    pub fn amount_range(self) -> RangeInclusive<u64> {
        match self {
            Action::Set => 0..=ON_HAND_MAX,
            _ => 1..=CHANGE_MAX,
        }
    }

    /// The state after this action, or why it is refused. The version is left alone.
    ///
    /// Panics if `stock` breaks its invariant: every `Stock` the store hands out keeps it.
    pub fn apply(self, stock: Stock, amount: u64) -> Result<Stock, OpError> {
        assert!(
            stock.is_valid(),
            "stock invariant broken before {self:?}: {stock:?}"
        );
        if !self.amount_range().contains(&amount) {
            return Err(self.invalid(amount));
        }
        let available = stock.quantity();
        let reserved = stock.reserved;
        let mut after = stock;
        match self {
            Action::Set if amount < reserved => {
                return Err(OpError::BelowReserved {
                    reserved,
                    quantity: amount,
                });
            }
            Action::Set => after.on_hand = amount,
            // Cannot wrap: on_hand <= ON_HAND_MAX and the sum is checked at compile time.
            Action::Increase if stock.on_hand + amount > ON_HAND_MAX => {
                return Err(self.invalid(amount));
            }
            Action::Increase => after.on_hand += amount,
            Action::Decrease | Action::Reserve if amount > available => {
                return Err(OpError::InsufficientStock {
                    available,
                    requested: amount,
                });
            }
            Action::Decrease => after.on_hand -= amount,
            Action::Reserve => after.reserved += amount,
            Action::Release | Action::Commit if amount > reserved => {
                return Err(OpError::InsufficientReserved {
                    reserved,
                    requested: amount,
                });
            }
            Action::Release => after.reserved -= amount,
            Action::Commit => {
                after.on_hand -= amount;
                after.reserved -= amount;
            }
        }
        assert!(
            after.is_valid(),
            "{self:?} {amount} broke the invariant: {after:?}"
        );
        Ok(after)
    }

    fn invalid(self, amount: u64) -> OpError {
        OpError::InvalidChange {
            action: self,
            amount: Some(i128::from(amount)),
        }
    }
}

/// One operation on one SKU, already parsed and range-checked by the caller (the store checks
/// the range again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// The SKU, interned in the store the op is applied to.
    pub sku: SkuId,
    /// What to do.
    pub action: Action,
    /// `quantity` for [`Action::Set`], `change` for every other action.
    pub amount: u64,
    /// Apply only if the SKU's version before the batch equals this.
    pub if_version: Option<u64>,
    /// The op acts on units of a hold (PROTOCOL.md "Holds"): a `reserve` adds to the SKU's held
    /// units, a `release` / `commit` takes from them. An op without it (anonymous) may not
    /// take held units: `release` / `commit` see only `reserved - held` (see `super::store`).
    pub held: bool,
}

impl Op {
    /// An op without `if_version`.
    pub fn new(sku: SkuId, action: Action, amount: u64) -> Op {
        Op {
            sku,
            action,
            amount,
            if_version: None,
            held: false,
        }
    }

    /// An op on a hold's units (see [`Op::held`]).
    pub fn held(sku: SkuId, action: Action, amount: u64) -> Op {
        Op {
            held: true,
            ..Op::new(sku, action, amount)
        }
    }

    /// Checks an amount as parsed from the wire: `None` if the field was missing or not an
    /// integer. Out of [`Action::amount_range`] (negative, zero change, too large) is
    /// [`OpError::InvalidChange`] carrying what was sent.
    pub fn check_amount(action: Action, amount: Option<i128>) -> Result<u64, OpError> {
        amount
            .and_then(|amount| u64::try_from(amount).ok())
            .filter(|amount| action.amount_range().contains(amount))
            .ok_or(OpError::InvalidChange { action, amount })
    }
}

/// Why an op was refused. Every variant maps to one contract error code ([`OpError::code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpError {
    /// The SKU id breaks the rules of `super::sku`.
    InvalidSku,
    /// The amount is missing, not an integer, out of its range, or an `increase` would push
    /// `on_hand` past [`ON_HAND_MAX`]. `amount` is what was sent (`None`: missing or not an
    /// integer).
    InvalidChange {
        /// The action whose amount was refused.
        action: Action,
        /// The amount as sent.
        amount: Option<i128>,
    },
    /// `decrease` or `reserve` of more than the units available (`on_hand - reserved`).
    InsufficientStock {
        /// Units available before the op.
        available: u64,
        /// Units the op asked for.
        requested: u64,
    },
    /// `release` or `commit` of more than is reserved.
    InsufficientReserved {
        /// Units reserved before the op.
        reserved: u64,
        /// Units the op asked for.
        requested: u64,
    },
    /// `set` to fewer units than are reserved: reservations would be left without stock.
    BelowReserved {
        /// Units reserved before the op.
        reserved: u64,
        /// The `quantity` the op asked for.
        quantity: u64,
    },
    /// `if_version` did not match the SKU's version before the batch.
    VersionConflict {
        /// The `if_version` sent.
        expected: u64,
        /// The SKU's state (and version) before the batch; the contract returns it to the
        /// client so it can retry without another read.
        current: Stock,
    },
}

impl OpError {
    /// The contract's error code (PROTOCOL.md "WebSocket", errors).
    pub fn code(&self) -> &'static str {
        match self {
            OpError::InvalidSku => "invalid_sku",
            OpError::InvalidChange { .. } => "invalid_change",
            OpError::InsufficientStock { .. } => "insufficient_stock",
            OpError::InsufficientReserved { .. } => "insufficient_reserved",
            OpError::BelowReserved { .. } => "below_reserved",
            OpError::VersionConflict { .. } => "version_conflict",
        }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            OpError::InvalidSku => write!(
                f,
                "SKU id must be 1 to {} bytes of [A-Za-z0-9._:/-] and not `batch`",
                super::sku::SKU_BYTES_MAX
            ),
            OpError::InvalidChange { action, amount } => fmt_invalid_change(f, action, amount),
            OpError::InsufficientStock {
                available,
                requested,
            } => {
                write!(
                    f,
                    "insufficient stock: {requested} requested, {available} available"
                )
            }
            OpError::InsufficientReserved {
                reserved,
                requested,
            } => write!(
                f,
                "insufficient reserved stock: {requested} requested, {reserved} reserved"
            ),
            OpError::BelowReserved { reserved, quantity } => {
                write!(
                    f,
                    "quantity {quantity} is below the {reserved} units reserved"
                )
            }
            OpError::VersionConflict { expected, current } => write!(
                f,
                "version conflict: expected version {expected}, current version is {}",
                current.version
            ),
        }
    }
}

fn fmt_invalid_change(
    f: &mut fmt::Formatter<'_>,
    action: Action,
    amount: Option<i128>,
) -> fmt::Result {
    let field = action.amount_field();
    let range = action.amount_range();
    let in_range = amount
        .and_then(|amount| u64::try_from(amount).ok())
        .is_some_and(|amount| range.contains(&amount));
    match amount {
        // Only `increase` can refuse an in-range amount: the sum would pass ON_HAND_MAX.
        Some(amount) if in_range => write!(
            f,
            "`{}` of {amount} would take on_hand past {ON_HAND_MAX}",
            action.as_str()
        ),
        Some(amount) => write!(
            f,
            "`{}` needs `{field}` in {}..={}, got {amount}",
            action.as_str(),
            range.start(),
            range.end()
        ),
        None => write!(
            f,
            "`{}` needs an integer `{field}` in {}..={}",
            action.as_str(),
            range.start(),
            range.end()
        ),
    }
}

impl std::error::Error for OpError {}

/// A batch was refused: the op at `index` (0-based, in request order) failed with `error`, and
/// nothing in the batch was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchError {
    /// Position of the first failing op.
    pub index: usize,
    /// Why it failed.
    pub error: OpError,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op {}: {}", self.index, self.error)
    }
}

impl std::error::Error for BatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E12: u64 = ON_HAND_MAX;
    const E9: u64 = CHANGE_MAX;

    fn stock(on_hand: u64, reserved: u64) -> Stock {
        Stock {
            on_hand,
            reserved,
            version: 7,
        }
    }

    fn invalid(action: Action, amount: u64) -> OpError {
        OpError::InvalidChange {
            action,
            amount: Some(i128::from(amount)),
        }
    }

    /// (action, on_hand, reserved, amount, `Ok((on_hand, reserved))` after, or the error)
    type ApplyCase = (Action, u64, u64, u64, Result<(u64, u64), OpError>);

    #[test]
    fn apply_table() {
        use Action::*;
        use OpError::*;
        #[rustfmt::skip]
        let cases: &[ApplyCase] = &[
            (Set, 0, 0, 0, Ok((0, 0))),
            (Set, 5, 0, 5, Ok((5, 0))),
            (Set, 5, 2, 2, Ok((2, 2))),
            (Set, 5, 2, 9, Ok((9, 2))),
            (Set, 0, 0, E12, Ok((E12, 0))),
            (Set, 5, 3, 2, Err(BelowReserved { reserved: 3, quantity: 2 })),
            (Set, 5, 3, 0, Err(BelowReserved { reserved: 3, quantity: 0 })),
            (Set, 0, 0, E12 + 1, Err(invalid(Set, E12 + 1))),
            (Set, 0, 0, u64::MAX, Err(invalid(Set, u64::MAX))),
            (Increase, 0, 0, 1, Ok((1, 0))),
            (Increase, 4, 1, E9, Ok((4 + E9, 1))),
            (Increase, E12 - 1, 0, 1, Ok((E12, 0))),
            (Increase, E12 - E9, 0, E9, Ok((E12, 0))),
            (Increase, E12, 0, 1, Err(invalid(Increase, 1))),
            (Increase, E12 - E9 + 1, 0, E9, Err(invalid(Increase, E9))),
            (Increase, 0, 0, 0, Err(invalid(Increase, 0))),
            (Increase, 0, 0, E9 + 1, Err(invalid(Increase, E9 + 1))),
            (Increase, E12, 0, u64::MAX, Err(invalid(Increase, u64::MAX))),
            (Decrease, 5, 0, 5, Ok((0, 0))),
            (Decrease, 5, 2, 3, Ok((2, 2))),
            (Decrease, 5, 2, 4, Err(InsufficientStock { available: 3, requested: 4 })),
            (Decrease, 0, 0, 1, Err(InsufficientStock { available: 0, requested: 1 })),
            (Decrease, 5, 0, 0, Err(invalid(Decrease, 0))),
            (Decrease, E12, 0, E9 + 1, Err(invalid(Decrease, E9 + 1))),
            (Reserve, 5, 0, 5, Ok((5, 5))),
            (Reserve, 5, 2, 3, Ok((5, 5))),
            (Reserve, 5, 2, 4, Err(InsufficientStock { available: 3, requested: 4 })),
            (Reserve, 5, 5, 1, Err(InsufficientStock { available: 0, requested: 1 })),
            (Reserve, 5, 0, 0, Err(invalid(Reserve, 0))),
            (Release, 5, 3, 3, Ok((5, 0))),
            (Release, 5, 3, 1, Ok((5, 2))),
            (Release, 5, 3, 4, Err(InsufficientReserved { reserved: 3, requested: 4 })),
            (Release, 5, 0, 1, Err(InsufficientReserved { reserved: 0, requested: 1 })),
            (Release, 5, 3, 0, Err(invalid(Release, 0))),
            (Commit, 5, 3, 3, Ok((2, 0))),
            (Commit, 5, 5, 2, Ok((3, 3))),
            (Commit, 5, 3, 4, Err(InsufficientReserved { reserved: 3, requested: 4 })),
            (Commit, 5, 0, 1, Err(InsufficientReserved { reserved: 0, requested: 1 })),
            (Commit, E12, E12, E9 + 1, Err(invalid(Commit, E9 + 1))),
            (Commit, E12, E12, E9, Ok((E12 - E9, E12 - E9))),
        ];
        for &(action, on_hand, reserved, amount, expected) in cases {
            let before = stock(on_hand, reserved);
            let got = action.apply(before, amount);
            let expected = expected.map(|(on_hand, reserved)| Stock {
                on_hand,
                reserved,
                version: 7,
            });
            assert_eq!(got, expected, "{action:?} {amount} on {before:?}");
        }
    }

    #[test]
    #[should_panic(expected = "stock invariant broken")]
    fn apply_refuses_a_broken_stock() {
        let _ = Action::Increase.apply(stock(1, 2), 1);
    }

    #[test]
    fn check_amount_table() {
        use Action::*;
        let big = i128::from(u64::MAX) + 1;
        #[rustfmt::skip]
        let cases: &[(Action, Option<i128>, Option<u64>)] = &[
            (Set, Some(0), Some(0)),
            (Set, Some(1), Some(1)),
            (Set, Some(1_000_000_000_000), Some(E12)),
            (Set, Some(1_000_000_000_001), None),
            (Set, Some(-1), None),
            (Set, Some(big), None),
            (Set, Some(i128::MIN), None),
            (Set, None, None),
            (Increase, Some(1), Some(1)),
            (Increase, Some(1_000_000_000), Some(E9)),
            (Increase, Some(1_000_000_001), None),
            (Increase, Some(0), None),
            (Increase, Some(-5), None),
            (Increase, None, None),
            (Decrease, Some(0), None),
            (Decrease, Some(1_000_000_000), Some(E9)),
            (Reserve, Some(big), None),
            (Release, Some(i128::MAX), None),
            (Commit, Some(1_000_000_001), None),
            (Commit, Some(2), Some(2)),
        ];
        for &(action, amount, expected) in cases {
            let expected = expected.ok_or(OpError::InvalidChange { action, amount });
            assert_eq!(
                Op::check_amount(action, amount),
                expected,
                "{action:?} {amount:?}"
            );
        }
    }

    #[test]
    fn parse_and_as_str_round_trip() {
        for action in Action::ALL {
            assert_eq!(Action::parse(action.as_str()), Some(action));
        }
        for name in ["", "SET", "Set", "sets", " set", "add", "cancel", "*"] {
            assert_eq!(Action::parse(name), None, "{name:?}");
        }
    }

    #[test]
    fn codes_and_messages() {
        let current = Stock {
            on_hand: 5,
            reserved: 1,
            version: 3,
        };
        #[rustfmt::skip]
        let cases: &[(OpError, &str, &str)] = &[
            (OpError::InvalidSku, "invalid_sku",
             "SKU id must be 1 to 128 bytes of [A-Za-z0-9._:/-] and not `batch`"),
            (OpError::InvalidChange { action: Action::Set, amount: None }, "invalid_change",
             "`set` needs an integer `quantity` in 0..=1000000000000"),
            (OpError::InvalidChange { action: Action::Reserve, amount: Some(-3) },
             "invalid_change", "`reserve` needs `change` in 1..=1000000000, got -3"),
            (invalid(Action::Increase, 2), "invalid_change",
             "`increase` of 2 would take on_hand past 1000000000000"),
            (OpError::InsufficientStock { available: 3, requested: 4 }, "insufficient_stock",
             "insufficient stock: 4 requested, 3 available"),
            (OpError::InsufficientReserved { reserved: 0, requested: 1 },
             "insufficient_reserved", "insufficient reserved stock: 1 requested, 0 reserved"),
            (OpError::BelowReserved { reserved: 3, quantity: 2 }, "below_reserved",
             "quantity 2 is below the 3 units reserved"),
            (OpError::VersionConflict { expected: 2, current }, "version_conflict",
             "version conflict: expected version 2, current version is 3"),
        ];
        for (error, code, message) in cases {
            assert_eq!(error.code(), *code);
            assert_eq!(error.to_string(), *message);
        }
        let batch = BatchError {
            index: 2,
            error: OpError::InvalidSku,
        };
        assert!(batch.to_string().starts_with("op 2: SKU id must be"));
    }
}
