//! Model-based property tests: [`Store`] against a naive reference written from the contract
//! alone (PROTOCOL.md "Operations"): a `HashMap` of names to `(on_hand, reserved, version)`,
//! i128 arithmetic, and clone-then-commit batches.
//!
//! After every step the store and the model must agree on every result, error and state; stock
//! never breaks `reserved <= on_hand <= 1e12`; an accepted batch moves units only by its ops'
//! amounts; and names interned just to read are given back.

use std::collections::HashMap;

use proptest::prelude::*;

use super::ops::{Action, BatchError, Op, OpError, CHANGE_MAX, ON_HAND_MAX};
use super::store::{SkuId, Stock, Store};

/// `(on_hand, reserved, version)`; only written (known) SKUs are present.
type Model = HashMap<String, (u64, u64, u64)>;

/// An op as generated: `if_version` is an offset from the SKU's version when the step runs, so
/// it lands on or next to the real version instead of almost always missing.
#[derive(Clone, Copy, Debug)]
struct Planned {
    name: usize,
    action: Action,
    amount: u64,
    if_version: Option<i8>,
}

#[derive(Clone, Debug)]
enum Step {
    Apply(Vec<Planned>),
    /// Apply, then undo as after a failed log write: the model does not change.
    ApplyThenUndo(Vec<Planned>),
    Check(Vec<Planned>),
    Forget(usize),
    /// Intern a fresh name as a read would, then forget it.
    Peek(u16),
}

#[derive(Clone, Debug)]
struct Resolved {
    name: String,
    action: Action,
    amount: u64,
    if_version: Option<u64>,
}

/// What the model says a batch does: the new model, the touched names in first-touch order and
/// each op's result.
type ModelOutcome = Result<(Model, Vec<String>, Vec<(u64, u64, u64)>), (usize, OpError)>;

fn model_apply(model: &Model, ops: &[Resolved]) -> ModelOutcome {
    let mut scratch = model.clone();
    let mut touched: Vec<String> = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        let committed = model.get(&op.name).copied().unwrap_or_default();
        let working = scratch.get(&op.name).copied().unwrap_or_default();
        let next = model_op(op, committed, working).map_err(|error| (index, error))?;
        scratch.insert(op.name.clone(), next);
        if !touched.contains(&op.name) {
            touched.push(op.name.clone());
        }
    }
    for name in &touched {
        let version = model.get(name).map_or(0, |state| state.2);
        scratch.get_mut(name).unwrap().2 = version + 1;
    }
    let results = ops.iter().map(|op| scratch[&op.name]).collect();
    Ok((scratch, touched, results))
}

fn model_op(
    op: &Resolved,
    committed: (u64, u64, u64),
    working: (u64, u64, u64),
) -> Result<(u64, u64, u64), OpError> {
    use Action::*;
    let amount = i128::from(op.amount);
    let action = op.action;
    let (min, max) = if action == Set {
        (0, 1_000_000_000_000)
    } else {
        (1, 1_000_000_000)
    };
    let invalid = OpError::InvalidChange {
        action,
        amount: Some(amount),
    };
    if amount < min || amount > max {
        return Err(invalid);
    }
    if let Some(expected) = op.if_version {
        if expected != committed.2 {
            return Err(OpError::VersionConflict {
                expected,
                current: stock_of(committed),
            });
        }
    }
    let (on_hand, reserved) = (i128::from(working.0), i128::from(working.1));
    let available = on_hand - reserved;
    let short_stock = OpError::InsufficientStock {
        available: available as u64,
        requested: op.amount,
    };
    let short_reserved = OpError::InsufficientReserved {
        reserved: working.1,
        requested: op.amount,
    };
    let (on_hand, reserved) = match action {
        Set if amount < reserved => {
            return Err(OpError::BelowReserved {
                reserved: working.1,
                quantity: op.amount,
            })
        }
        Set => (amount, reserved),
        Increase if on_hand + amount > 1_000_000_000_000 => return Err(invalid),
        Increase => (on_hand + amount, reserved),
        Decrease | Reserve if amount > available => return Err(short_stock),
        Decrease => (on_hand - amount, reserved),
        Reserve => (on_hand, reserved + amount),
        Release | Commit if amount > reserved => return Err(short_reserved),
        Release => (on_hand, reserved - amount),
        Commit => (on_hand - amount, reserved - amount),
    };
    Ok((on_hand as u64, reserved as u64, working.2))
}

fn stock_of((on_hand, reserved, version): (u64, u64, u64)) -> Stock {
    Stock {
        on_hand,
        reserved,
        version,
    }
}

struct Harness {
    names: Vec<String>,
    store: Store,
    model: Model,
}

impl Harness {
    fn new(names: Vec<String>) -> Harness {
        Harness {
            names,
            store: Store::new(),
            model: Model::new(),
        }
    }

    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Apply(planned) => self.apply(planned, false)?,
            Step::ApplyThenUndo(planned) => self.apply(planned, true)?,
            Step::Check(planned) => self.check(planned)?,
            Step::Forget(name) => self.forget(*name)?,
            Step::Peek(n) => self.peek(*n)?,
        }
        self.assert_same_state()
    }

    fn resolve(&self, planned: &[Planned]) -> Vec<Resolved> {
        let resolve = |planned: &Planned| {
            let name = self.names[planned.name].clone();
            let version = self.model.get(&name).map_or(0, |state| state.2);
            let if_version = planned
                .if_version
                .map(|offset| version.saturating_add_signed(i64::from(offset)));
            Resolved {
                name,
                action: planned.action,
                amount: planned.amount,
                if_version,
            }
        };
        planned.iter().map(resolve).collect()
    }

    fn ops(&mut self, resolved: &[Resolved]) -> Vec<Op> {
        let intern = |store: &mut Store, op: &Resolved| Op {
            sku: store.intern(&op.name).expect("generated names are valid"),
            action: op.action,
            amount: op.amount,
            if_version: op.if_version,
            held: false,
        };
        resolved
            .iter()
            .map(|op| intern(&mut self.store, op))
            .collect()
    }

    fn apply(&mut self, planned: &[Planned], undo: bool) -> Result<(), TestCaseError> {
        let resolved = self.resolve(planned);
        let ops = self.ops(&resolved);
        let expected = model_apply(&self.model, &resolved);
        let before: Vec<(SkuId, Stock)> = ops
            .iter()
            .map(|op| (op.sku, self.store.get(op.sku)))
            .collect();
        let checked = self.store.check(&ops);
        let expected_check = match &expected {
            Ok(_) => Ok(()),
            Err((index, error)) => Err(BatchError {
                index: *index,
                error: *error,
            }),
        };
        prop_assert_eq!(checked, expected_check);
        match (self.store.apply(&ops), expected) {
            (Err(actual), Err((index, error))) => {
                prop_assert_eq!(actual, BatchError { index, error })
            }
            (Ok(applied), Ok((model_after, touched, results))) => {
                let changed: Vec<(String, Stock)> = applied
                    .changed
                    .iter()
                    .map(|&(id, stock)| (self.store.name(id).to_string(), stock))
                    .collect();
                let expected_changed: Vec<(String, Stock)> = touched
                    .iter()
                    .map(|name| (name.clone(), stock_of(model_after[name])))
                    .collect();
                prop_assert_eq!(changed, expected_changed);
                let results: Vec<Stock> = results.into_iter().map(stock_of).collect();
                prop_assert_eq!(applied.results, results);
                self.assert_conserved(&resolved)?;
                if undo {
                    self.store.undo(&before);
                } else {
                    self.model = model_after;
                }
            }
            (actual, expected) => {
                prop_assert!(false, "store gave {:?}, model {:?}", actual, expected)
            }
        }
        Ok(())
    }

    /// Units move only by the accepted ops' amounts: replaying them on the state before the
    /// batch with plain arithmetic (no rules) must give the store's state after it.
    fn assert_conserved(&self, ops: &[Resolved]) -> Result<(), TestCaseError> {
        let mut ledger: HashMap<&str, (i128, i128)> = HashMap::new();
        for op in ops {
            let (on_hand, reserved, _) = self.model.get(&op.name).copied().unwrap_or_default();
            let entry = ledger
                .entry(op.name.as_str())
                .or_insert((i128::from(on_hand), i128::from(reserved)));
            let amount = i128::from(op.amount);
            match op.action {
                Action::Set => entry.0 = amount,
                Action::Increase => entry.0 += amount,
                Action::Decrease => entry.0 -= amount,
                Action::Reserve => entry.1 += amount,
                Action::Release => entry.1 -= amount,
                Action::Commit => *entry = (entry.0 - amount, entry.1 - amount),
            }
        }
        for (name, (on_hand, reserved)) in ledger {
            let stock = self.store.get(self.store.lookup(name).unwrap());
            prop_assert!(0 <= reserved && reserved <= on_hand);
            prop_assert_eq!(
                (i128::from(stock.on_hand), i128::from(stock.reserved)),
                (on_hand, reserved)
            );
        }
        Ok(())
    }

    fn check(&mut self, planned: &[Planned]) -> Result<(), TestCaseError> {
        let resolved = self.resolve(planned);
        let ops = self.ops(&resolved);
        let expected = match model_apply(&self.model, &resolved) {
            Ok(_) => Ok(()),
            Err((index, error)) => Err(BatchError { index, error }),
        };
        prop_assert_eq!(self.store.check(&ops), expected);
        Ok(())
    }

    fn forget(&mut self, name: usize) -> Result<(), TestCaseError> {
        let name = &self.names[name];
        if let Some(id) = self.store.lookup(name) {
            let known = self.model.contains_key(name);
            prop_assert_eq!(self.store.forget(id), !known);
            prop_assert_eq!(self.store.lookup(name).is_some(), known);
        }
        Ok(())
    }

    fn peek(&mut self, n: u16) -> Result<(), TestCaseError> {
        let interned = self.store.interned_len();
        let name = format!("peek-{n}");
        let id = self.store.intern(&name).expect("valid name");
        prop_assert_eq!(self.store.get(id), Stock::default());
        prop_assert!(self.store.forget(id));
        prop_assert_eq!(self.store.interned_len(), interned);
        Ok(())
    }

    fn assert_same_state(&self) -> Result<(), TestCaseError> {
        for name in &self.names {
            let stock = self
                .store
                .lookup(name)
                .map_or(Stock::default(), |id| self.store.get(id));
            let expected = self
                .model
                .get(name)
                .copied()
                .map_or(Stock::default(), stock_of);
            prop_assert_eq!(stock, expected, "{}", name);
            prop_assert!(stock.reserved <= stock.on_hand && stock.on_hand <= ON_HAND_MAX);
        }
        let mut known: Vec<(String, Stock)> = self
            .store
            .known()
            .map(|(id, stock)| (self.store.name(id).to_string(), stock))
            .collect();
        known.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected: Vec<(String, Stock)> = self
            .model
            .iter()
            .map(|(name, &state)| (name.clone(), stock_of(state)))
            .collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(known, expected);
        prop_assert_eq!(self.store.known_len(), self.model.len());
        prop_assert!(self.store.interned_len() <= self.names.len());
        Ok(())
    }
}

/// How often the generator strays from ops that can succeed, against weights of 240 for a
/// small amount and for no `if_version`. (proptest refuses a weight of 0.)
#[derive(Clone, Copy)]
struct Mix {
    odd_amount_weight: u32,
    if_version_weight: u32,
}

/// An amount: `(true, n)` is a plausible one, scaled to the action by [`plausible`];
/// `(false, n)` is used as is (zero, the range edges, anything).
fn amount(mix: Mix) -> impl Strategy<Value = (bool, u64)> + Clone {
    let edges = vec![
        CHANGE_MAX - 1,
        CHANGE_MAX,
        CHANGE_MAX + 1,
        ON_HAND_MAX - CHANGE_MAX,
        ON_HAND_MAX - 1,
        ON_HAND_MAX,
        ON_HAND_MAX + 1,
        u64::MAX,
    ];
    prop_oneof![
        240 => (0..=60u64).prop_map(|n| (true, n)),
        mix.odd_amount_weight => Just((false, 0u64)),
        mix.odd_amount_weight => prop::sample::select(edges).prop_map(|n| (false, n)),
        mix.odd_amount_weight => any::<u64>().prop_map(|n| (false, n)),
    ]
}

/// Sets stock up to 50 units or to within 10 of `ON_HAND_MAX` (so increases meet the ceiling),
/// changes by 1 to 8: most ops fit the stock and succeed, and the rest fail on the stock rules
/// rather than on their amount.
fn plausible(action: Action, n: u64) -> u64 {
    match action {
        Action::Set if n > 50 => ON_HAND_MAX - (n - 51),
        Action::Set => n,
        _ => n % 8 + 1,
    }
}

fn planned(names_len: usize, mix: Mix) -> impl Strategy<Value = Planned> + Clone {
    let if_version = prop_oneof![
        240 => Just(None),
        mix.if_version_weight => (-1i8..=1).prop_map(Some),
    ];
    // Stock must come in before it can go out, so the actions that add are commoner.
    let action = prop_oneof![
        2 => Just(Action::Set),
        2 => Just(Action::Increase),
        1 => Just(Action::Decrease),
        2 => Just(Action::Reserve),
        1 => Just(Action::Release),
        1 => Just(Action::Commit),
    ];
    (0..names_len, action, amount(mix), if_version).prop_map(
        |(name, action, (is_plausible, n), if_version)| {
            let amount = if is_plausible {
                plausible(action, n)
            } else {
                n
            };
            Planned {
                name,
                action,
                amount,
                if_version,
            }
        },
    )
}

fn step(names_len: usize, batch_len_max: usize, mix: Mix) -> impl Strategy<Value = Step> {
    let batch = prop::collection::vec(planned(names_len, mix), 1..=batch_len_max);
    prop_oneof![
        6 => planned(names_len, mix).prop_map(|op| Step::Apply(vec![op])),
        3 => batch.clone().prop_map(Step::Apply),
        1 => batch.clone().prop_map(Step::ApplyThenUndo),
        1 => batch.prop_map(Step::Check),
        1 => (0..names_len).prop_map(Step::Forget),
        1 => any::<u16>().prop_map(Step::Peek),
    ]
}

fn names(count: usize) -> Vec<String> {
    let fixed = ["a", "sku-1", "x/y:z.w_v", "Batch"];
    let extra = (fixed.len()..count).map(|i| format!("s{i}"));
    fixed
        .iter()
        .take(count)
        .map(|name| name.to_string())
        .chain(extra)
        .collect()
}

/// About one op in twenty has an odd amount, and one in ten an `if_version`.
const NARROW: Mix = Mix {
    odd_amount_weight: 4,
    if_version_weight: 30,
};
/// Wide batches fail at their first bad op, so keep bad ops rare enough that many batches get
/// past `BATCH_LINEAR_SCAN_SKUS_MAX` distinct SKUs and exercise the indexed lookup.
const WIDE: Mix = Mix {
    odd_amount_weight: 1,
    if_version_weight: 1,
};
const WIDE_NAMES: usize = 40;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(4, 5, NARROW), 1..40)) {
        let mut harness = Harness::new(names(4));
        for step in &steps {
            harness.run(step)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn store_matches_model_on_wide_batches(
        steps in prop::collection::vec(step(WIDE_NAMES, 60, WIDE), 1..8),
        rare in prop::collection::vec(step(WIDE_NAMES, 60, NARROW), 0..3),
    ) {
        let mut harness = Harness::new(names(WIDE_NAMES));
        // Stock every SKU first, so the random ops that follow mostly succeed.
        let stock_up = (0..WIDE_NAMES).flat_map(|name| {
            let set = Planned { name, action: Action::Set, amount: 1_000, if_version: Some(0) };
            [set, Planned { action: Action::Reserve, amount: 500, if_version: None, ..set }]
        });
        harness.run(&Step::Apply(stock_up.collect()))?;
        for step in steps.iter().chain(&rare) {
            harness.run(step)?;
        }
    }
}
