//! The Lua scripts that decide every write in Redis, and the text formats they exchange with
//! us. Key layout and why: docs/SCALING.md.
//!
//! Keys (each starts with the prefix P, and all share the hash tag `{inventory}`, so a Redis
//! Cluster keeps them in one slot: atomic batches across SKUs need that):
//! - `P{inventory}:stock`: hash, SKU id -> `"on_hand reserved version"`.
//! - `P{inventory}:changed`: sorted set, SKU id scored by the global sequence of its last change (a
//!   catch-up reads "every SKU changed after seq N" from it).
//! - `P{inventory}:seq`: the global change sequence, +1 per accepted write.
//! - `P{inventory}:epoch`: a random id made when the inventory is first written; if it changes or
//!   vanishes, Redis lost its data.
//! - `P{inventory}:idem:KEY`: an applied idempotency key: `"fingerprint\nresults"`, with a TTL.
//! - channel `P{inventory}:changes`: `"epoch seq origin\n"` then one `"sku on_hand reserved version\n"` per
//!   SKU the change touched.
//!
//! SKU ids are `[A-Za-z0-9._:/-]` (PROTOCOL.md), so a space and a newline never occur in one
//! and the line format needs no escaping.

use sha1::{Digest, Sha1};

use crate::stock::{Action, Stock};

/// Applies a write (single op or batch) atomically. KEYS: stock, changed, seq, epoch, idem
/// key (or the epoch key again when the write has none). ARGV: channel, fingerprint, ttl
/// seconds, new epoch (used only if none exists), has-key flag, origin (the writing process,
/// echoed in the change), op count, then four per op: sku, action, amount, if_version
/// (-1 = none), then the SKU limit (`--max-skus`; 0 = none), last so the per-op indices stay put.
///
/// Replies: `{"ok", seq, changes, results}`, `{"dup", results}`, `{"mismatch"}`,
/// `{"full", max}` (the write would create SKUs past the limit: checked here, with HLEN, so
/// processes sharing the inventory cannot pass it together), or
/// `{"err", index, committed on_hand, reserved, version, working on_hand, reserved}`: the
/// state the failing op saw, from which the caller rebuilds the exact error with the same
/// rules code as the embedded store (`crate::stock::store::stage_op`).
pub const WRITE: &str = r#"
local stock, changed, seqkey, epochkey, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local channel, fp, ttl, new_epoch, keyed = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5] == '1'
local origin, n = ARGV[6], tonumber(ARGV[7])
local skus_max = tonumber(ARGV[8 + n * 4]) or 0
local created = 0
local function fmt(x) return string.format('%d', x) end
if keyed then
  local prev = redis.call('GET', idem)
  if prev then
    local sep = string.find(prev, '\n', 1, true)
    if sep and string.sub(prev, 1, sep - 1) == fp then
      return {'dup', string.sub(prev, sep + 1)}
    end
    return {'mismatch'}
  end
end
local epoch = redis.call('GET', epochkey)
if not epoch then
  epoch = new_epoch
  redis.call('SET', epochkey, epoch)
end
local committed, working, order, opsku = {}, {}, {}, {}
for i = 0, n - 1 do
  local b = 8 + i * 4
  local sku, action = ARGV[b], ARGV[b + 1]
  local amount, ifv = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  opsku[i + 1] = sku
  local w = working[sku]
  if not w then
    local oh, rs, v = 0, 0, 0
    local packed = redis.call('HGET', stock, sku)
    if packed then
      local a, r, ver = string.match(packed, '^(%d+) (%d+) (%d+)$')
      oh, rs, v = tonumber(a), tonumber(r), tonumber(ver)
    else
      created = created + 1
    end
    committed[sku] = {oh, rs, v}
    w = {oh, rs}
    working[sku] = w
    order[#order + 1] = sku
  end
  local c = committed[sku]
  local oh, rs = w[1], w[2]
  local ok = true
  if ifv >= 0 and ifv ~= c[3] then
    ok = false
  elseif action == 'set' then
    if amount < rs then ok = false else oh = amount end
  elseif action == 'increase' then
    if oh + amount > 1000000000000 then ok = false else oh = oh + amount end
  elseif action == 'decrease' then
    if amount > oh - rs then ok = false else oh = oh - amount end
  elseif action == 'reserve' then
    if amount > oh - rs then ok = false else rs = rs + amount end
  elseif action == 'release' then
    if amount > rs then ok = false else rs = rs - amount end
  elseif action == 'commit' then
    if amount > rs then ok = false else oh = oh - amount; rs = rs - amount end
  else
    ok = false
  end
  if not ok then
    return {'err', i, fmt(c[1]), fmt(c[2]), fmt(c[3]), fmt(w[1]), fmt(w[2])}
  end
  w[1], w[2] = oh, rs
end
if skus_max > 0 and created > 0 and redis.call('HLEN', stock) + created > skus_max then
  return {'full', skus_max}
end
local seq = redis.call('INCR', seqkey)
local after = {}
local lines = {epoch .. ' ' .. fmt(seq) .. ' ' .. origin .. '\n'}
for _, sku in ipairs(order) do
  local w, c = working[sku], committed[sku]
  local state = fmt(w[1]) .. ' ' .. fmt(w[2]) .. ' ' .. fmt(c[3] + 1)
  after[sku] = state
  redis.call('HSET', stock, sku, state)
  redis.call('ZADD', changed, seq, sku)
  lines[#lines + 1] = sku .. ' ' .. state .. '\n'
end
local payload = table.concat(lines)
redis.call('PUBLISH', channel, payload)
local results = {}
for i, sku in ipairs(opsku) do
  results[i] = sku .. ' ' .. after[sku] .. '\n'
end
local result = table.concat(results)
if keyed then
  redis.call('SET', idem, fp .. '\n' .. result, 'EX', ttl)
end
return {'ok', seq, payload, result}
"#;

/// Every SKU changed after sequence ARGV[1], oldest change first, at most ARGV[2] of them,
/// read atomically with the current sequence and epoch. KEYS: stock, changed, seq, epoch.
/// Reply: `{seq, epoch, through, more, states}` where `states` holds one
/// `"sku on_hand reserved version\n"` line per SKU, `through` is the sequence of the last
/// one included and `more` is 1 if SKUs changed after it remain.
pub const CHANGES_SINCE: &str = r#"
local stock, changed, seqkey, epochkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local from, limit = ARGV[1], tonumber(ARGV[2])
local seq = redis.call('GET', seqkey) or '0'
local epoch = redis.call('GET', epochkey) or ''
local skus = redis.call('ZRANGEBYSCORE', changed, '(' .. from, '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
local lines = {}
local through = from
local seen = {}
for i = 1, #skus, 2 do
  local state = redis.call('HGET', stock, skus[i])
  if state then lines[#lines + 1] = skus[i] .. ' ' .. state .. '\n' end
  seen[skus[i]] = true
  through = skus[i + 1]
end
local more = 0
if #skus / 2 >= limit then
  more = 1
  -- A batch gives several SKUs one sequence: finish that sequence's group, or the next chunk
  -- (which starts after `through`) would skip the rest of it.
  for _, sku in ipairs(redis.call('ZRANGEBYSCORE', changed, through, through)) do
    if not seen[sku] then
      local state = redis.call('HGET', stock, sku)
      if state then lines[#lines + 1] = sku .. ' ' .. state .. '\n' end
    end
  end
end
return {seq, epoch, through, more, table.concat(lines)}
"#;

/// The SHA1 of a script, as EVALSHA wants it (lowercase hex).
pub fn sha1_hex(script: &str) -> String {
    let digest = Sha1::digest(script.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys of one inventory, under `prefix` with its hash tag.
#[derive(Clone, Debug)]
pub struct Keys {
    pub stock: String,
    pub changed: String,
    pub seq: String,
    pub epoch: String,
    pub idem_prefix: String,
    pub channel: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let tag = format!("{prefix}{{inventory}}:");
        Keys {
            stock: format!("{tag}stock"),
            changed: format!("{tag}changed"),
            seq: format!("{tag}seq"),
            epoch: format!("{tag}epoch"),
            idem_prefix: format!("{tag}idem:"),
            channel: format!("{tag}changes"),
        }
    }
}

/// The wire name of an action in the script.
pub fn action_name(action: Action) -> &'static str {
    action.as_str()
}

/// One `"sku on_hand reserved version"` line.
pub fn parse_state_line(line: &str) -> Option<(&str, Stock)> {
    let mut parts = line.split(' ');
    let sku = parts.next()?;
    let on_hand = parts.next()?.parse().ok()?;
    let reserved = parts.next()?.parse().ok()?;
    let version = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    let stock = Stock {
        on_hand,
        reserved,
        version,
    };
    stock.is_valid().then_some((sku, stock))
}

/// Every state line of `text` (lines end with `\n`); `None` if one is malformed.
pub fn parse_states(text: &str) -> Option<Vec<(&str, Stock)>> {
    text.lines().map(parse_state_line).collect()
}

/// A change as published.
pub struct Change<'a> {
    pub epoch: &'a str,
    pub seq: u64,
    /// The process that wrote it (see `RedisEngine`'s origin).
    pub origin: &'a str,
    pub states: Vec<(&'a str, Stock)>,
}

/// A change as published: `"epoch seq origin\n"` and its state lines.
pub fn parse_change(text: &str) -> Option<Change<'_>> {
    let (head, rest) = text.split_once('\n')?;
    let mut parts = head.split(' ');
    let epoch = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    let origin = parts.next()?;
    Some(Change {
        epoch,
        seq,
        origin,
        states: parse_states(rest)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_lines_round_trip_and_reject_garbage() {
        let states = parse_states("a 5 2 7\nb:1/x 0 0 1\n").unwrap();
        assert_eq!(states[0].0, "a");
        assert_eq!(
            states[0].1,
            Stock {
                on_hand: 5,
                reserved: 2,
                version: 7
            }
        );
        assert_eq!(states[1].0, "b:1/x");
        for bad in ["a 1 2 3 4", "a 1 2", "a x 2 3", "a 1 5 3", "a -1 0 1"] {
            assert!(parse_state_line(bad).is_none(), "{bad}");
        }
        let change = parse_change("e1 42 p7\nsku 3 1 9\n").unwrap();
        assert_eq!(
            (change.epoch, change.seq, change.origin, change.states.len()),
            ("e1", 42, "p7", 1)
        );
        assert!(parse_change("e1 x p\n").is_none());
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = Keys::new("stocksync:");
        for key in [&keys.stock, &keys.changed, &keys.seq, &keys.epoch] {
            assert!(key.starts_with("stocksync:{inventory}:"), "{key}");
        }
        assert_eq!(sha1_hex("return 1").len(), 40);
    }
}
