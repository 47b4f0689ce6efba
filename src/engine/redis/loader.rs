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
    for script in [scripts::WRITE, scripts::CHANGES_SINCE] {
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
            info!(
                "loaded {} SKUs from Redis at {url} in {} ms (through change {})",
                replica.known_len(),
                started.elapsed().as_millis(),
                chunk.seq
            );
            return Ok(Loaded {
                replica,
                applied_seq: chunk.seq,
                epoch: chunk.epoch,
            });
        }
        from = chunk.through;
    }
}
