//! Starting a server process from [`Settings`]: tokens, store recovery, the log, the loop.

use log::{error, info, warn};

use super::auth::{Role, Token};
use super::StockService;
use crate::app::Protocol;
use crate::cli::{self, Settings};
use crate::engine::embedded::EmbeddedEngine;
use crate::engine::redis::{RedisConfig, RedisEngine};
use crate::engine::Engine;
use crate::net::{EventLoop, TlsAcceptor};
use crate::stock::{Holds, IdempotencyCache, Store};
use crate::wal::memory::MemoryLog;
use crate::wal::Log;

/// The tokens in force: the write token plus those of the tokens file.
pub fn load_tokens(
    settings_token: Option<&Token>,
    file: Option<&std::path::Path>,
) -> Result<Vec<Token>, String> {
    let mut tokens: Vec<Token> = settings_token.cloned().into_iter().collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read tokens file {}: {e}", path.display()))?;
        tokens.extend(
            cli::read_tokens(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))?,
        );
    }
    super::auth::check_distinct_secrets(&tokens)?;
    Ok(tokens)
}

/// The embedded store (recovered from its data dir) or the Redis replica (loaded).
fn open_engine(
    settings: &Settings,
    service_config: &super::ServiceConfig,
) -> Result<Box<dyn Engine>, String> {
    if let Some(url) = &settings.redis {
        let engine = RedisEngine::start(RedisConfig {
            url: url.clone(),
            prefix: settings.redis_prefix.clone(),
            idempotency_ttl_secs: service_config.idempotency_ttl_secs,
            hold_limits: service_config.hold_limits,
            skus_max: service_config.skus_max,
        })?;
        info!(
            "Redis engine ready: {} SKUs in the replica, prefix {}",
            engine.skus().known_len(),
            settings.redis_prefix
        );
        return Ok(Box::new(engine));
    }
    let keys = IdempotencyCache::new(
        service_config.idempotency_keys_max,
        service_config.idempotency_ttl_secs,
    );
    let holds = Holds::new(service_config.hold_limits);
    let (store, keys, holds, log): (Store, IdempotencyCache, Holds, Box<dyn Log>) =
        match &settings.data_dir {
            None => {
                warn!("no data dir: stock lives in memory only and is lost when the process ends");
                (Store::new(), keys, holds, Box::new(MemoryLog::new()))
            }
            Some(dir) => super::durable::open(dir, settings, keys, holds)?,
        };
    info!(
        "store ready: {} SKUs, {} idempotency keys, {} holds",
        store.known_len(),
        keys.len(),
        holds.live_len()
    );
    let mut engine = EmbeddedEngine::new(store, keys, log, holds);
    // Before the port opens (PROTOCOL.md "Holds"): nobody may see, or act on, a hold whose
    // deadline passed while the server was down.
    let expired = engine.expire_overdue_at_start()?;
    if expired > 0 {
        info!("{expired} holds expired while the server was down; released");
    }
    Ok(Box::new(engine))
}

/// `--workers N`: supervises N worker processes instead of serving (see [`super::workers`]).
pub fn supervise(settings: Settings, args: &[String]) -> Result<(), String> {
    // Each worker loads the pair itself; checking it here first makes a bad one one clear
    // error and a non-zero exit, not a loop of workers dying at start.
    if let Some(files) = settings.tls_files() {
        TlsAcceptor::load(files).map_err(|e| format!("TLS: {e}"))?;
    }
    let token = match &settings.write_token {
        Some(token) => token.clone(),
        None => {
            let secret =
                cli::random_token().map_err(|e| format!("cannot generate a write token: {e}"))?;
            // One token for all workers, printed once.
            println!("stocksync: no --write-token given; this run's write token is {secret}");
            secret
        }
    };
    super::workers::supervise(settings.workers, args, &token)
}

/// Runs the server until SIGINT/SIGTERM. Errors are for the operator (bad data dir, port in
/// use); the process exits non-zero with them.
pub fn run(settings: Settings) -> Result<(), String> {
    // Before anything is opened: a bad pair is the operator's to fix, and exits non-zero.
    let tls = match settings.tls_files() {
        Some(files) => Some(TlsAcceptor::load(files).map_err(|e| format!("TLS: {e}"))?),
        None => None,
    };
    let write_token = match &settings.write_token {
        Some(secret) => Token {
            name: "write-token".into(),
            secret: secret.clone(),
            role: Role::Write,
        },
        None => {
            let secret =
                cli::random_token().map_err(|e| format!("cannot generate a write token: {e}"))?;
            // Printed once so a first run just works; never logged again.
            println!("stocksync: no --write-token given; this run's write token is {secret}");
            Token {
                name: "generated".into(),
                secret,
                role: Role::Write,
            }
        }
    };
    let tokens = load_tokens(Some(&write_token), settings.tokens_file.as_deref())?;
    let mut service_config = settings.service.clone();
    service_config.access.tokens = tokens;
    service_config.tokens_file = settings.tokens_file.clone();
    service_config.fixed_tokens = vec![write_token];

    let mut engine = open_engine(&settings, &service_config)?;
    service_config.role_name = engine.kind().to_string();
    let limits = settings.limits.clone();
    let mut event_loop = EventLoop::bind(settings.listen, limits.clone(), |waker| {
        // The engine's threads wake the loop when a batch is durable (or failed).
        engine.set_waker(waker);
        Protocol::new(StockService::new(service_config, engine), &limits)
    })
    .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    if let Some(tls) = tls {
        info!(
            "TLS on: certificate {}, key {}",
            tls.files().cert.display(),
            tls.files().key.display()
        );
        event_loop.set_tls(tls);
    }
    event_loop
        .handle_signals()
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    super::log_started(event_loop.local_addr());
    match event_loop.run() {
        Ok(_) => Ok(()),
        Err(e) => {
            error!("event loop failed: {e}");
            Err(format!("event loop failed: {e}"))
        }
    }
}
