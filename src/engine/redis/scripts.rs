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
//! - `P{inventory}:holds`: hash, hold id -> `"deadline_ms sku units sku units ..."`.
//! - `P{inventory}:held`: hash, SKU id -> units of its `reserved` held by holds.
//! - `P{inventory}:deadlines`: sorted set, hold id scored by its deadline (Redis clock, ms).
//! - `P{inventory}:expired:ID`: the expiry time of hold ID, TTL one hour; `P{inventory}:expired`:
//!   sorted set of the same, by expiry time, for loading.
//! - channel `P{inventory}:changes`: `"epoch seq origin [hold tokens]\n"` then one `"sku on_hand
//!   reserved version\n"` per SKU the change touched (hold tokens: [`parse_hold_token`]).
//!
//! SKU ids are `[A-Za-z0-9._:/-]` (PROTOCOL.md), so a space and a newline never occur in one
//! and the line format needs no escaping.

use sha1::{Digest, Sha1};

use crate::stock::{Action, Stock};

/// Lua shared by the scripts that know holds: the Redis clock (one clock for every
/// process's deadlines, so a commit and an expiry decided by different processes agree on
/// whether a deadline passed), number formatting, stock and packed holds
/// (`"deadline sku units sku units"`, lines in first-taken order), and the hold tokens of a
/// change's head (see [`parse_change`]).
macro_rules! lua_prelude {
    () => {
        r#"
local function fmt(x) return string.format('%d', x) end
-- The change goes to every process, and its result is kept under the idempotency key, in the
-- same script run as the change itself.
local function publish_and_remember(channel, payload, keyed, idem, fp, result, ttl)
  redis.call('PUBLISH', channel, payload)
  if keyed then redis.call('SET', idem, fp .. '\n' .. result, 'EX', ttl) end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function read_stock(stock, sku)
  local packed = redis.call('HGET', stock, sku)
  if packed then
    local a, r, v = string.match(packed, '^(%d+) (%d+) (%d+)$')
    return tonumber(a), tonumber(r), tonumber(v)
  end
  return 0, 0, 0
end
local function unpack_hold(packed)
  local words = {}
  for word in string.gmatch(packed, '%S+') do words[#words + 1] = word end
  local lines, order = {}, {}
  for i = 2, #words - 1, 2 do
    order[#order + 1] = words[i]
    lines[words[i]] = tonumber(words[i + 1])
  end
  return tonumber(words[1]), lines, order
end
-- A key used before: {'dup', results} when it came with the same request (fingerprint `fp`),
-- {'mismatch'} when with another; nil for a new key.
local function seen_key(idem, fp)
  local prev = redis.call('GET', idem)
  if not prev then return nil end
  local sep = string.find(prev, '\n', 1, true)
  if sep and string.sub(prev, 1, sep - 1) == fp then
    return {'dup', string.sub(prev, sep + 1)}
  end
  return {'mismatch'}
end
local function pack_hold(deadline, lines, order)
  local out = {fmt(deadline)}
  for _, sku in ipairs(order) do out[#out + 1] = sku .. ' ' .. fmt(lines[sku]) end
  return table.concat(out, ' ')
end
local function live_token(hold, deadline, lines, order)
  local parts = {}
  for _, sku in ipairs(order) do parts[#parts + 1] = sku .. '=' .. fmt(lines[sku]) end
  return 'L|' .. hold .. '|' .. fmt(deadline) .. '|' .. table.concat(parts, ',')
end
-- Takes a hold's units out of reserved (and out of on_hand for a commit), one version per
-- SKU; returns the state lines. Refuses (before writing anything) if Redis holds a hold whose
-- units are not reserved: only a bug or a hand edit makes that, and going on would underflow.
local function settle(stock, changed, held, seq, lines, order, commit)
  local after = {}
  for _, sku in ipairs(order) do
    local oh, rs, v = read_stock(stock, sku)
    local u = lines[sku]
    if u > rs or (commit and u > oh) then
      return nil, 'hold units of ' .. sku .. ' pass its reserved units'
    end
    if commit then oh = oh - u end
    after[sku] = fmt(oh) .. ' ' .. fmt(rs - u) .. ' ' .. fmt(v + 1)
  end
  local states = {}
  for _, sku in ipairs(order) do
    redis.call('HSET', stock, sku, after[sku])
    redis.call('ZADD', changed, seq, sku)
    if redis.call('HINCRBY', held, sku, -lines[sku]) <= 0 then redis.call('HDEL', held, sku) end
    states[#states + 1] = sku .. ' ' .. after[sku] .. '\n'
  end
  return table.concat(states)
end
"#
    };
}

/// Applies a write (single op or batch) atomically, taking units into holds for ops that
/// name one. KEYS: stock, changed, seq, epoch, idem key (or the epoch key again when the
/// write has none), holds, held, deadlines. ARGV: channel, fingerprint, ttl seconds, new
/// epoch (used only if none exists), has-key flag, origin (the writing process, echoed in the
/// change), expired-marker key prefix, holds max, lines per hold max, ttl_ms max, op count,
/// then six per op: sku, action, amount, if_version (-1 = none), hold ('' = none), ttl_ms
/// (-1 = none), then the SKU limit (`--max-skus`; 0 = none), last so the per-op indices stay
/// put.
///
/// Replies: `{"ok", seq, changes, results}`, `{"dup", results}`, `{"mismatch"}`,
/// `{"full", max}` (the write would create SKUs past the limit: checked here, with HLEN, so
/// processes sharing the inventory cannot pass it together),
/// `{"herr", index, why, detail}` (a hold rule, see [`HoldRefusal`]), or `{"err", index,
/// committed on_hand, reserved, version, working on_hand, reserved, held}`: the state the
/// failing op saw, from which the caller rebuilds the exact error with the same rules code as
/// the embedded store (`crate::stock::store::stage_op`). Hold rules are checked in op order
/// before stock rules, like `crate::stock::holds::Holds::write`.
pub const WRITE: &str = concat!(
    lua_prelude!(),
    r#"
local stock, changed, seqkey, epochkey, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local holdskey, heldkey, deadlines = KEYS[6], KEYS[7], KEYS[8]
local channel, fp, ttl, new_epoch, keyed = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5] == '1'
local origin, marker_prefix = ARGV[6], ARGV[7]
local holds_max, lines_max, ttl_max = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local n = tonumber(ARGV[11])
local FIRST, PER_OP = 12, 6
local skus_max = tonumber(ARGV[FIRST + n * PER_OP]) or 0
local created = 0
if keyed then
  local seen = seen_key(idem, fp)
  if seen then return seen end
end
-- Read only for writes that name a hold: the clock is all they add to a plain write's cost.
local now = nil
-- Hold rules first, in op order (the embedded engine's order). 100 is TTL_MS_MIN.
local named, norder, creating = {}, {}, 0
for i = 0, n - 1 do
  local b = FIRST + i * PER_OP
  local hold = ARGV[b + 4]
  if hold ~= '' then
    local sku, amount, ttlms = ARGV[b], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 5])
    if ttlms >= 0 and (ttlms < 100 or ttlms > ttl_max) then
      return {'herr', i, 'ttl_range', fmt(ttlms)}
    end
    now = now or now_ms()
    local h = named[hold]
    if not h then
      local packed = redis.call('HGET', holdskey, hold)
      if packed then
        local deadline, lines, order = unpack_hold(packed)
        if deadline <= now then return {'herr', i, 'expired', ''} end
        h = {deadline = deadline, lines = lines, order = order, ttl = -1}
      else
        if redis.call('EXISTS', marker_prefix .. hold) == 1 then
          return {'herr', i, 'expired', ''}
        end
        if ttlms < 0 then return {'herr', i, 'ttl_required', ''} end
        creating = creating + 1
        if redis.call('HLEN', holdskey) + creating > holds_max then
          return {'herr', i, 'full', ''}
        end
        h = {deadline = 0, lines = {}, order = {}, ttl = -1}
      end
      named[hold] = h
      norder[#norder + 1] = hold
    end
    if h.lines[sku] then
      h.lines[sku] = h.lines[sku] + amount
    else
      h.lines[sku] = amount
      h.order[#h.order + 1] = sku
    end
    if #h.order > lines_max then return {'herr', i, 'lines', ''} end
    if ttlms >= 0 then h.ttl = ttlms end
  end
end
local epoch = redis.call('GET', epochkey)
if not epoch then
  epoch = new_epoch
  redis.call('SET', epochkey, epoch)
end
local committed, working, order, opsku, heldw = {}, {}, {}, {}, {}
for i = 0, n - 1 do
  local b = FIRST + i * PER_OP
  local sku, action = ARGV[b], ARGV[b + 1]
  local amount, ifv = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local isheld = ARGV[b + 4] ~= ''
  opsku[i + 1] = sku
  local w = working[sku]
  if not w then
    local oh, rs, v = read_stock(stock, sku)
    -- Every stored SKU has a version: one without is created by this write.
    if v == 0 then created = created + 1 end
    committed[sku] = {oh, rs, v}
    w = {oh, rs}
    working[sku] = w
    heldw[sku] = tonumber(redis.call('HGET', heldkey, sku) or '0')
    order[#order + 1] = sku
  end
  local c = committed[sku]
  local oh, rs, hu = w[1], w[2], heldw[sku]
  -- An anonymous release / commit sees only reserved - held (PROTOCOL.md "Holds").
  local free = rs - hu
  if isheld then free = hu end
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
    if ok and isheld then hu = hu + amount end
  elseif action == 'release' then
    if amount > free then ok = false else rs = rs - amount end
    if ok and isheld then hu = hu - amount end
  elseif action == 'commit' then
    if amount > free then ok = false else oh = oh - amount; rs = rs - amount end
    if ok and isheld then hu = hu - amount end
  else
    ok = false
  end
  if not ok then
    return {'err', i, fmt(c[1]), fmt(c[2]), fmt(c[3]), fmt(w[1]), fmt(w[2]), fmt(heldw[sku])}
  end
  w[1], w[2], heldw[sku] = oh, rs, hu
end
if skus_max > 0 and created > 0 and redis.call('HLEN', stock) + created > skus_max then
  return {'full', skus_max}
end
local seq = redis.call('INCR', seqkey)
local after = {}
local head = {epoch, fmt(seq), origin}
for _, hold in ipairs(norder) do
  local h = named[hold]
  local deadline = h.deadline
  if h.ttl >= 0 then deadline = now + h.ttl end
  redis.call('HSET', holdskey, hold, pack_hold(deadline, h.lines, h.order))
  redis.call('ZADD', deadlines, deadline, hold)
  head[#head + 1] = live_token(hold, deadline, h.lines, h.order)
end
local lines = {table.concat(head, ' ') .. '\n'}
for _, sku in ipairs(order) do
  local w, c = working[sku], committed[sku]
  local state = fmt(w[1]) .. ' ' .. fmt(w[2]) .. ' ' .. fmt(c[3] + 1)
  after[sku] = state
  redis.call('HSET', stock, sku, state)
  redis.call('ZADD', changed, seq, sku)
  if #norder > 0 then
    if heldw[sku] > 0 then
      redis.call('HSET', heldkey, sku, fmt(heldw[sku]))
    else
      redis.call('HDEL', heldkey, sku)
    end
  end
  lines[#lines + 1] = sku .. ' ' .. state .. '\n'
end
local payload = table.concat(lines)
local results = {}
for i, sku in ipairs(opsku) do
  results[i] = sku .. ' ' .. after[sku] .. '\n'
end
local result = table.concat(results)
publish_and_remember(channel, payload, keyed, idem, fp, result, ttl)
return {'ok', seq, payload, result}
"#
);

/// Commits, releases or extends a whole hold, atomically (one version per SKU). KEYS: stock,
/// changed, seq, epoch, idem key (or the epoch key again), holds, held, deadlines, the hold's
/// expired marker. ARGV: channel, fingerprint, ttl seconds, has-key flag, origin, hold,
/// action (`commit`, `release`, `extend`), ttl_ms (extend), ttl_ms max.
///
/// Replies like [`WRITE`]: `{"ok", seq, changes, results}` (results: the hold's SKUs after,
/// in line order; none for an extend), `{"dup", results}`, `{"mismatch"}`,
/// `{"herr", 0, why, detail}`.
pub const HOLD: &str = concat!(
    lua_prelude!(),
    r#"
local stock, changed, seqkey, epochkey, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local holdskey, heldkey, deadlines, marker = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local channel, fp, ttl, keyed, origin = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1', ARGV[5]
local hold, action, ttlms, ttl_max = ARGV[6], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
if keyed then
  local seen = seen_key(idem, fp)
  if seen then return seen end
end
-- 100 is TTL_MS_MIN.
if action == 'extend' and (ttlms < 100 or ttlms > ttl_max) then
  return {'herr', 0, 'ttl_range', fmt(ttlms)}
end
local now = now_ms()
local packed = redis.call('HGET', holdskey, hold)
if not packed then
  if redis.call('EXISTS', marker) == 1 then return {'herr', 0, 'expired', ''} end
  return {'herr', 0, 'unknown', ''}
end
local deadline, lines, order = unpack_hold(packed)
if deadline <= now then return {'herr', 0, 'expired', ''} end
local epoch = redis.call('GET', epochkey) or ''
local seq = redis.call('INCR', seqkey)
local token, states
if action == 'extend' then
  deadline = now + ttlms
  redis.call('HSET', holdskey, hold, pack_hold(deadline, lines, order))
  redis.call('ZADD', deadlines, deadline, hold)
  token, states = live_token(hold, deadline, lines, order), ''
else
  local why
  states, why = settle(stock, changed, heldkey, seq, lines, order, action == 'commit')
  if not states then
    redis.call('DECR', seqkey)
    return redis.error_reply(why)
  end
  redis.call('HDEL', holdskey, hold)
  redis.call('ZREM', deadlines, hold)
  token = 'G|' .. hold
end
local payload = epoch .. ' ' .. fmt(seq) .. ' ' .. origin .. ' ' .. token .. '\n' .. states
publish_and_remember(channel, payload, keyed, idem, fp, states, ttl)
return {'ok', seq, payload, states}
"#
);

/// Expires a hold whose deadline passed, idempotently: whichever process runs it first
/// releases the units (one version per SKU), marks the hold expired for an hour and
/// publishes the change; for the others the hold is gone (or its deadline moved later) and
/// nothing happens. KEYS: stock, changed, seq, epoch, holds, held, deadlines, the hold's
/// expired marker, the expired index. ARGV: channel, origin, hold, marker ttl ms.
///
/// Replies: `{"ok", seq, changes}`, `{"gone", seq}` (the current sequence: a process whose
/// replica is at or past it and still knows the hold knows a ghost), or
/// `{"later", deadline, now}`.
pub const EXPIRE_HOLD: &str = concat!(
    lua_prelude!(),
    r#"
local stock, changed, seqkey, epochkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local holdskey, heldkey, deadlines, marker = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local expired_index = KEYS[9]
local channel, origin, hold, marker_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local packed = redis.call('HGET', holdskey, hold)
if not packed then return {'gone', tonumber(redis.call('GET', seqkey) or '0')} end
local now = now_ms()
local deadline, lines, order = unpack_hold(packed)
if deadline > now then return {'later', deadline, now} end
local seq = redis.call('INCR', seqkey)
local states, why = settle(stock, changed, heldkey, seq, lines, order, false)
if not states then
  redis.call('DECR', seqkey)
  return redis.error_reply(why)
end
redis.call('HDEL', holdskey, hold)
redis.call('ZREM', deadlines, hold)
redis.call('SET', marker, fmt(now), 'PX', marker_ms)
-- The index lets a starting process load the markers; entries past the hour go here, a few
-- at a time, as later holds expire.
redis.call('ZADD', expired_index, now, hold)
redis.call('ZREMRANGEBYSCORE', expired_index, '-inf', '(' .. fmt(now - marker_ms))
local epoch = redis.call('GET', epochkey) or ''
local token = 'X|' .. hold .. '|' .. fmt(now) .. '|' .. fmt(deadline)
local payload = epoch .. ' ' .. fmt(seq) .. ' ' .. origin .. ' ' .. token .. '\n' .. states
redis.call('PUBLISH', channel, payload)
return {'ok', seq, payload}
"#
);

/// Up to about ARGV[2] live holds (KEYS[1] the holds hash, ARGV[3] `"hash"`: HSCAN) or
/// expired markers (KEYS[1] the expired index, ARGV[3] `"zset"`: ZSCAN, values are the expiry
/// times) from cursor ARGV[1], read atomically with the current sequence (KEYS[2]). Reply:
/// `{seq, next cursor, {id, value, id, value, ...}}`; cursor `"0"` ends the scan. A scan
/// returns every entry present for its whole length at least once, whatever changes meanwhile
/// (a range by index would skip some).
pub const HOLDS: &str = r#"
local command = 'HSCAN'
if ARGV[3] == 'zset' then command = 'ZSCAN' end
local reply = redis.call(command, KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
return {tonumber(redis.call('GET', KEYS[2]) or '0'), reply[1], reply[2]}
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

// The scripts spell out the shortest ttl_ms.
const _: () = assert!(crate::stock::holds::TTL_MS_MIN == 100);

/// Every script, as loaded on each new command link.
pub const ALL: [&str; 5] = [WRITE, CHANGES_SINCE, HOLD, EXPIRE_HOLD, HOLDS];

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
    pub holds: String,
    pub held: String,
    pub deadlines: String,
    pub expired_prefix: String,
    pub expired_index: String,
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
            holds: format!("{tag}holds"),
            held: format!("{tag}held"),
            deadlines: format!("{tag}deadlines"),
            expired_prefix: format!("{tag}expired:"),
            expired_index: format!("{tag}expired"),
        }
    }
}

/// The wire name of an action in the script.
pub fn action_name(action: Action) -> &'static str {
    action.as_str()
}

/// One `"sku on_hand reserved version"` line.
pub fn parse_state_line(line: &str) -> Option<(&str, Stock)> {
    let (sku, state) = line.split_once(' ')?;
    Some((sku, parse_state(state)?))
}

/// A stored state, `"on_hand reserved version"`.
pub fn parse_state(state: &str) -> Option<Stock> {
    let mut parts = state.split(' ');
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
    stock.is_valid().then_some(stock)
}

/// Every state line of `text` (lines end with `\n`); `None` if one is malformed.
pub fn parse_states(text: &str) -> Option<Vec<(&str, Stock)>> {
    text.lines().map(parse_state_line).collect()
}

/// What a change did to a hold (a token in the change's head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldEvent {
    /// Taken, added to or extended: its lines (first-taken order) and deadline (Redis ms).
    Live {
        hold: String,
        deadline_ms: u64,
        lines: Vec<(String, u64)>,
    },
    /// Committed or released.
    Gone { hold: String },
    /// Expired at `at_ms`; its deadline was `deadline_ms`.
    Expired {
        hold: String,
        at_ms: u64,
        deadline_ms: u64,
    },
}

impl HoldEvent {
    pub fn hold(&self) -> &str {
        match self {
            HoldEvent::Live { hold, .. }
            | HoldEvent::Gone { hold }
            | HoldEvent::Expired { hold, .. } => hold,
        }
    }
}

/// One head token: `L|id|deadline|sku=units,...`, `G|id` or `X|id|at_ms|deadline_ms`. Hold
/// ids and SKUs never hold `|`, `,`, `=` or a space, so nothing needs escaping.
pub fn parse_hold_token(token: &str) -> Option<HoldEvent> {
    let mut parts = token.split('|');
    let kind = parts.next()?;
    let hold = parts.next().filter(|h| !h.is_empty())?.to_string();
    let event = match kind {
        "L" => {
            let deadline_ms = parts.next()?.parse().ok()?;
            let lines = parse_lines(parts.next()?.split(',').map(|l| l.split_once('=')))?;
            HoldEvent::Live {
                hold,
                deadline_ms,
                lines,
            }
        }
        "G" => HoldEvent::Gone { hold },
        "X" => HoldEvent::Expired {
            hold,
            at_ms: parts.next()?.parse().ok()?,
            deadline_ms: parts.next()?.parse().ok()?,
        },
        _ => return None,
    };
    parts.next().is_none().then_some(event)
}

fn parse_lines<'a>(
    pairs: impl Iterator<Item = Option<(&'a str, &'a str)>>,
) -> Option<Vec<(String, u64)>> {
    let mut lines = Vec::new();
    for pair in pairs {
        let (sku, units) = pair?;
        let units: u64 = units.parse().ok()?;
        if sku.is_empty() || units == 0 {
            return None;
        }
        lines.push((sku.to_string(), units));
    }
    (!lines.is_empty()).then_some(lines)
}

/// A live hold as read from Redis: id, deadline (Redis wall ms), lines (SKU, units) in
/// first-taken order.
pub type StoredHold = (String, u64, Vec<(String, u64)>);

/// A hold as stored in the holds hash: `"deadline sku units sku units"`.
pub fn parse_packed_hold(packed: &str) -> Option<(u64, Vec<(String, u64)>)> {
    let mut words = packed.split(' ');
    let deadline_ms = words.next()?.parse().ok()?;
    let mut pairs = Vec::new();
    while let Some(sku) = words.next() {
        pairs.push(words.next().map(|units| (sku, units)));
    }
    Some((deadline_ms, parse_lines(pairs.into_iter())?))
}

/// A hold rule a script refused a write with (`{"herr", index, why, detail}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldRefusal {
    Unknown,
    Expired,
    TtlRequired,
    /// `ttl_ms` out of range: the value sent.
    TtlRange(u64),
    Full,
    Lines,
}

impl HoldRefusal {
    pub fn parse(why: &str, detail: &str) -> Option<HoldRefusal> {
        Some(match why {
            "unknown" => HoldRefusal::Unknown,
            "expired" => HoldRefusal::Expired,
            "ttl_required" => HoldRefusal::TtlRequired,
            "ttl_range" => HoldRefusal::TtlRange(detail.parse().ok()?),
            "full" => HoldRefusal::Full,
            "lines" => HoldRefusal::Lines,
            _ => return None,
        })
    }
}

/// A change as published.
pub struct Change<'a> {
    pub epoch: &'a str,
    pub seq: u64,
    /// The process that wrote it (see `RedisEngine`'s origin).
    pub origin: &'a str,
    pub states: Vec<(&'a str, Stock)>,
    /// What it did to holds, in order.
    pub holds: Vec<HoldEvent>,
}

/// A change as published: `"epoch seq origin [hold tokens]\n"` and its state lines. Hold
/// tokens ride in the head so a process that does not know them (an older version during a
/// rolling upgrade) still reads the states: it only ever read three head fields.
pub fn parse_change(text: &str) -> Option<Change<'_>> {
    let (head, rest) = text.split_once('\n')?;
    let mut parts = head.split(' ');
    let epoch = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    let origin = parts.next()?;
    let holds = parts.map(parse_hold_token).collect::<Option<Vec<_>>>()?;
    Some(Change {
        epoch,
        seq,
        origin,
        states: parse_states(rest)?,
        holds,
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
        let change = parse_change("e 3 p L|h:1/x|1700|a=2,b=1 G|g X|old|9|8\na 5 3 2\n").unwrap();
        assert_eq!(change.states.len(), 1);
        assert_eq!(
            change.holds,
            vec![
                HoldEvent::Live {
                    hold: "h:1/x".into(),
                    deadline_ms: 1700,
                    lines: vec![("a".into(), 2), ("b".into(), 1)]
                },
                HoldEvent::Gone { hold: "g".into() },
                HoldEvent::Expired {
                    hold: "old".into(),
                    at_ms: 9,
                    deadline_ms: 8
                },
            ]
        );
        for bad in ["L|h|1|", "L|h|x|a=1", "L|h|1|a=0", "G|", "Q|h", "X|h|1"] {
            assert!(parse_hold_token(bad).is_none(), "{bad}");
        }
        assert_eq!(
            parse_packed_hold("17 a 2 b 1"),
            Some((17, vec![("a".into(), 2), ("b".into(), 1)]))
        );
        assert!(parse_packed_hold("17 a").is_none());
        assert!(parse_packed_hold("17").is_none());
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = Keys::new("stocksync:");
        for key in [
            &keys.stock,
            &keys.changed,
            &keys.seq,
            &keys.epoch,
            &keys.holds,
            &keys.held,
            &keys.deadlines,
            &keys.expired_prefix,
        ] {
            assert!(key.starts_with("stocksync:{inventory}:"), "{key}");
        }
        assert_eq!(sha1_hex("return 1").len(), 40);
    }
}
