//! Loading the replica at start, before the port opens: a blocking client on its own socket
//! (the loop does not run yet), reading every SKU in chunks with the catch-up script, so a new
//! or restarted worker serves the whole inventory from its first connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::resp::{self, Value};
use super::scripts::{self, Keys};
use super::url::RedisUrl;
use crate::stock::Store;

/// How long one start-up round trip may take before the start fails.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);

/// SKUs asked for per HSCAN page while loading (a hint to Redis; ~50 bytes each on the wire).
const LOAD_PAGE_SKUS: usize = 100_000;

/// How a failure to reach Redis at all begins (the process may start without it).
pub const CONNECT_FAILED: &str = "cannot connect to Redis";

/// What the replica starts from.
pub struct Loaded {
    pub replica: Store,
    /// Every change up to this global sequence is in `replica`.
    pub applied_seq: u64,
    pub epoch: String,
    /// Every live hold: id, deadline (Redis ms), lines.
    pub holds: Vec<scripts::StoredHold>,
    /// Holds expired within the last hour (id, expiry ms), as far as the index still has them.
    pub markers: Vec<(String, u64)>,
}

/// A blocking RESP client for start-up.
pub struct BlockingClient {
    stream: TcpStream,
    input: Vec<u8>,
}

impl BlockingClient {
    pub fn connect(addr: SocketAddr, url: &RedisUrl) -> Result<BlockingClient, String> {
        let stream = TcpStream::connect_timeout(&addr, ROUND_TRIP_TIMEOUT)
            .map_err(|e| format!("{CONNECT_FAILED} at {url}: {e}"))?;
        stream
            .set_read_timeout(Some(ROUND_TRIP_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(ROUND_TRIP_TIMEOUT)))
            .map_err(|e| format!("Redis socket: {e}"))?;
        let mut client = BlockingClient {
            stream,
            input: Vec::new(),
        };
        for command in url.session_commands() {
            if let Value::Error(e) = client.call(&command)? {
                return Err(format!("Redis refused {}: {e}", command[0]));
            }
        }
        Ok(client)
    }

    /// Sends one command and reads its reply.
    pub fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Value, String> {
        self.send(args)?;
        self.reply()
    }

    /// Sends one command; its reply is read by [`BlockingClient::reply`].
    pub fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<(), String> {
        let mut out = Vec::new();
        resp::encode(&mut out, args);
        self.stream
            .write_all(&out)
            .map_err(|e| format!("writing to Redis: {e}"))
    }

    /// Reads the next reply.
    pub fn reply(&mut self) -> Result<Value, String> {
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            if let Some((value, used)) =
                resp::parse(&self.input).map_err(|e| format!("reading from Redis: {e}"))?
            {
                self.input.drain(..used);
                return Ok(value);
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| format!("reading from Redis: {e}"))?;
            if n == 0 {
                return Err("Redis closed the connection".into());
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Warns when Redis does not persist what it acknowledges (PROTOCOL.md: durability is then
/// Redis's).
fn check_persistence(client: &mut BlockingClient) {
    match client.call(&["CONFIG", "GET", "appendonly"]) {
        Ok(Value::Array(items)) if items.len() == 2 => {
            if items[1].as_str() != Some("yes") {
                warn!(
                    "Redis runs without appendonly: acknowledged writes are lost if Redis \
                     restarts; run it with `appendonly yes` (and `appendfsync always` to survive \
                     power loss)"
                );
            } else if let Ok(Value::Array(sync)) = client.call(&["CONFIG", "GET", "appendfsync"]) {
                if sync.get(1).and_then(Value::as_str) != Some("always") {
                    warn!(
                        "Redis appendfsync is not `always`: a power loss may lose up to a \
                         second of acknowledged writes"
                    );
                }
            }
        }
        _ => warn!(
            "could not check Redis persistence (CONFIG GET is disabled or refused); make sure \
             it runs with appendonly yes"
        ),
    }
}

fn scan_args<'a>(key: &'a str, cursor: &'a str, page: &'a str) -> [&'a str; 5] {
    ["HSCAN", key, cursor, "COUNT", page]
}

/// Connects, loads the scripts, reads or makes the epoch and loads every SKU.
pub fn load(
    addr: SocketAddr,
    url: &RedisUrl,
    keys: &Keys,
    chunk_skus: usize,
) -> Result<Loaded, String> {
    let started = Instant::now();
    let mut client = BlockingClient::connect(addr, url)?;
    check_persistence(&mut client);
    for script in scripts::ALL {
        if let Value::Error(e) = client.call(&["SCRIPT", "LOAD", script])? {
            return Err(format!("Redis refused SCRIPT LOAD: {e}"));
        }
    }
    let fresh = crate::cli::random_token().map_err(|e| format!("cannot make an epoch: {e}"))?;
    // SET NX: of several processes starting at once on a new Redis, one epoch wins.
    client.call(&["SET", keys.epoch.as_str(), fresh.as_str(), "NX"])?;
    let mut replica = Store::new();
    // Bulk first: HSCAN the whole stock hash (no script, big pages), noting the sequence
    // before it; every SKU present throughout the scan comes back at least once, in a state at
    // least as new as at `before`. Then the catch-up script from `before` reads, atomically,
    // everything changed since (created or changed during the scan), so the replica ends exact
    // as of the catch-up's sequence.
    let before = client
        .call(&["GET", keys.seq.as_str()])?
        .as_int()
        .unwrap_or(0)
        .max(0);
    let page = LOAD_PAGE_SKUS.to_string();
    client.send(&scan_args(&keys.stock, "0", &page))?;
    loop {
        let reply = client.reply()?;
        let Value::Array(parts) = reply else {
            return Err(format!("unexpected HSCAN reply: {reply:?}"));
        };
        let (Some(next), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
            return Err("unexpected HSCAN reply".into());
        };
        let next = next
            .as_str()
            .ok_or_else(|| "bad HSCAN cursor".to_string())?;
        // Redis scans the next page while we intern this one.
        let more = next != "0";
        if more {
            client.send(&scan_args(&keys.stock, next, &page))?;
        }
        for pair in fields.chunks(2) {
            let (Some(name), Some(state)) = (
                pair.first().and_then(Value::as_str),
                pair.get(1).and_then(Value::as_str),
            ) else {
                return Err("malformed HSCAN entry".into());
            };
            let stock = scripts::parse_state(state)
                .ok_or_else(|| format!("malformed state of `{name}` in Redis"))?;
            replica
                .restore(name, stock)
                .map_err(|e| format!("SKU `{name}` in Redis: {e}"))?;
        }
        if !more {
            break;
        }
    }
    let mut from = before.to_string();
    let sha = scripts::sha1_hex(scripts::CHANGES_SINCE);
    let limit = chunk_skus.to_string();
    loop {
        let reply = client.call(&[
            "EVALSHA",
            sha.as_str(),
            "4",
            keys.stock.as_str(),
            keys.changed.as_str(),
            keys.seq.as_str(),
            keys.epoch.as_str(),
            from.as_str(),
            limit.as_str(),
        ])?;
        let chunk = super::CatchUpChunk::parse(&reply)?;
        for (name, stock) in scripts::parse_states(&chunk.states)
            .ok_or_else(|| "malformed state in Redis".to_string())?
        {
            // Newer only: the scan may already hold a state as new as the catch-up's.
            let newer = replica
                .lookup(name)
                .map_or(true, |sku| replica.get(sku).version < stock.version);
            if newer {
                replica
                    .restore(name, stock)
                    .map_err(|e| format!("SKU `{name}` in Redis: {e}"))?;
            }
        }
        if !chunk.more {
            let mut holds: Vec<scripts::StoredHold> = scan(
                &mut client,
                keys,
                &keys.holds,
                "hash",
                scripts::parse_packed_hold,
            )?
            .into_iter()
            .map(|(id, (deadline_ms, lines))| (id, deadline_ms, lines))
            .collect();
            let expired = expire_overdue(&mut client, keys, &mut replica, &mut holds)?;
            let markers = scan(&mut client, keys, &keys.expired_index, "zset", |at| {
                at.parse().ok()
            })?;
            info!(
                "loaded {} SKUs and {} holds from Redis at {url} in {} ms (through change {}); \
                 {expired} holds past their deadline expired",
                replica.known_len(),
                holds.len(),
                started.elapsed().as_millis(),
                chunk.seq
            );
            return Ok(Loaded {
                replica,
                applied_seq: chunk.seq,
                epoch: chunk.epoch,
                holds,
                markers,
            });
        }
        from = chunk.through;
    }
}

/// Every entry of the holds hash or the expired index, in scan chunks.
fn scan<T>(
    client: &mut BlockingClient,
    keys: &Keys,
    key: &str,
    kind: &str,
    value: impl Fn(&str) -> Option<T>,
) -> Result<Vec<(String, T)>, String> {
    let sha = scripts::sha1_hex(scripts::HOLDS);
    let count = super::HOLDS_CHUNK.to_string();
    let mut cursor = "0".to_string();
    let mut entries: Vec<(String, T)> = Vec::new();
    // A scan may return an entry twice; the last copy wins.
    let mut seen = std::collections::HashMap::new();
    loop {
        let reply = client.call(&[
            "EVALSHA",
            sha.as_str(),
            "2",
            key,
            keys.seq.as_str(),
            cursor.as_str(),
            count.as_str(),
            kind,
        ])?;
        let chunk = super::HoldsChunk::parse(&reply, &value)?;
        for entry in chunk.entries {
            match seen.get(&entry.0) {
                Some(&at) => entries[at] = entry,
                None => {
                    seen.insert(entry.0.clone(), entries.len());
                    entries.push(entry);
                }
            }
        }
        if chunk.cursor == "0" {
            return Ok(entries);
        }
        cursor = chunk.cursor;
    }
}

/// Expires every hold whose deadline passed while no process ran (PROTOCOL.md "Holds":
/// released at start, before the port opens), applying each change to `replica`. Other
/// processes, if any run, may race: the script is idempotent.
fn expire_overdue(
    client: &mut BlockingClient,
    keys: &Keys,
    replica: &mut Store,
    holds: &mut Vec<scripts::StoredHold>,
) -> Result<usize, String> {
    let now_ms = crate::engine::wall_ms();
    let sha = scripts::sha1_hex(scripts::EXPIRE_HOLD);
    let marker_ms = crate::stock::holds::EXPIRED_MARKER_MS.to_string();
    let mut expired = 0;
    let mut kept = Vec::with_capacity(holds.len());
    for hold in holds.drain(..) {
        if hold.1 > now_ms {
            kept.push(hold);
            continue;
        }
        let marker = format!("{}{}", keys.expired_prefix, hold.0);
        let reply = client.call(&[
            "EVALSHA",
            sha.as_str(),
            "9",
            keys.stock.as_str(),
            keys.changed.as_str(),
            keys.seq.as_str(),
            keys.epoch.as_str(),
            keys.holds.as_str(),
            keys.held.as_str(),
            keys.deadlines.as_str(),
            marker.as_str(),
            keys.expired_index.as_str(),
            keys.channel.as_str(),
            "start",
            hold.0.as_str(),
            marker_ms.as_str(),
        ])?;
        let Value::Array(items) = &reply else {
            return Err(format!(
                "Redis refused to expire hold `{}`: {reply:?}",
                hold.0
            ));
        };
        match items.first().and_then(Value::as_str) {
            Some("ok") => {
                let change = items
                    .get(2)
                    .and_then(Value::as_str)
                    .and_then(scripts::parse_change)
                    .ok_or_else(|| format!("malformed expiry reply {reply:?}"))?;
                for (name, stock) in change.states {
                    let id = replica
                        .intern(name)
                        .map_err(|e| format!("SKU `{name}` in Redis: {e}"))?;
                    if stock.version > replica.get(id).version {
                        replica
                            .restore(name, stock)
                            .map_err(|e| format!("SKU `{name}` in Redis: {e}"))?;
                    }
                }
                expired += 1;
            }
            // Expired by another process meanwhile: the catch-up after start brings it.
            Some("gone") => {}
            // Its deadline is not past by Redis's clock yet: the timers take it.
            _ => kept.push(hold),
        }
    }
    *holds = kept;
    Ok(expired)
}
