//! Command-line flags and `STOCKSYNC_*` environment variables, parsed into a validated
//! [`Settings`]. A flag beats its variable; both beat the default.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::Limits;
use crate::engine::redis::url::RedisUrl;
use crate::server::auth::{Role, Token};
use crate::server::ServiceConfig;

/// How the log syncs to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync every group-commit batch before acknowledging it (the default).
    Always,
    /// Never fsync: acknowledged writes can be lost on power failure or kernel crash (but not
    /// on a process crash). For benchmarks and throwaway data only.
    Never,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `None`: keep nothing on disk (`--data-dir none`).
    pub data_dir: Option<PathBuf>,
    pub fsync: FsyncPolicy,
    pub write_token: Option<String>,
    pub tokens_file: Option<PathBuf>,
    /// Log segment size past which a snapshot is taken.
    pub snapshot_log_bytes: u64,
    pub limits: Limits,
    pub service: ServiceConfig,
    /// `--redis`: the shared inventory's Redis; `None` runs the embedded engine.
    pub redis: Option<RedisUrl>,
    pub redis_prefix: String,
    /// `--workers`: worker processes to start and supervise (1 = this process serves).
    pub workers: usize,
    /// `--tls-cert` / `--tls-key`: the listener speaks TLS with this pair.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Settings {
    /// The TLS pair, when both halves were given (`parse` refuses one without the other).
    pub fn tls_files(&self) -> Option<crate::net::TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::net::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

struct Flag {
    name: &'static str,
    env: &'static str,
    value: &'static str,
    help: &'static str,
}

const FLAGS: &[Flag] = &[
    Flag {
        name: "--listen",
        env: "STOCKSYNC_LISTEN",
        value: "ADDR",
        help: "address to listen on (default 0.0.0.0:2346)",
    },
    Flag {
        name: "--data-dir",
        env: "STOCKSYNC_DATA_DIR",
        value: "DIR",
        help:
            "write-ahead log and snapshots (default ./stocksync-data; `none` keeps nothing on disk)",
    },
    Flag {
        name: "--fsync",
        env: "STOCKSYNC_FSYNC",
        value: "always|never",
        help: "fdatasync each batch before acking (default always; never = benchmarks only)",
    },
    Flag {
        name: "--redis",
        env: "STOCKSYNC_REDIS",
        value: "URL",
        help: "keep the stock in Redis, shared by every process on it: redis://[user:password@]host:port[/db]",
    },
    Flag {
        name: "--redis-prefix",
        env: "STOCKSYNC_REDIS_PREFIX",
        value: "PREFIX",
        help: "key prefix of the inventory in Redis (default stocksync:)",
    },
    Flag {
        name: "--workers",
        env: "STOCKSYNC_WORKERS",
        value: "N|auto",
        help: "worker processes on the listen address, supervised (default 1; auto = cores; N > 1 needs --redis)",
    },
    Flag {
        name: "--write-token",
        env: "STOCKSYNC_WRITE_TOKEN",
        value: "TOKEN",
        help: "token with write rights (default: a random one, printed at start)",
    },
    Flag {
        name: "--tokens",
        env: "STOCKSYNC_TOKENS",
        value: "FILE",
        help: "tokens file, lines of `name role secret` (role read|write); reloaded on SIGHUP",
    },
    Flag {
        name: "--public-read",
        env: "STOCKSYNC_PUBLIC_READ",
        value: "true|false",
        help: "allow reads without a token (default true)",
    },
    Flag {
        name: "--allowed-origin",
        env: "STOCKSYNC_ALLOWED_ORIGINS",
        value: "ORIGIN[,ORIGIN]",
        help: "browser origins allowed to open a WebSocket and to read the HTTP API (CORS) (default any)",
    },
    Flag {
        name: "--tls-cert",
        env: "STOCKSYNC_TLS_CERT",
        value: "PATH",
        help: "PEM certificate chain: the port speaks TLS 1.2/1.3 (https://, wss://); re-read on SIGHUP",
    },
    Flag {
        name: "--tls-key",
        env: "STOCKSYNC_TLS_KEY",
        value: "PATH",
        help: "PEM private key of --tls-cert; re-read with it on SIGHUP",
    },
    Flag {
        name: "--trusted-proxy",
        env: "STOCKSYNC_TRUSTED_PROXIES",
        value: "ADDR[,ADDR]",
        help: "proxies whose X-Forwarded-For names the client (per-IP limits, logs); ignored from anyone else",
    },
    Flag {
        name: "--max-connections",
        env: "STOCKSYNC_MAX_CONNECTIONS",
        value: "N",
        help: "open connections per process (default 100000)",
    },
    Flag {
        name: "--max-connections-per-ip",
        env: "STOCKSYNC_MAX_CONNECTIONS_PER_IP",
        value: "N",
        help: "open connections per client IP (default 100000, the total limit: set it when clients connect directly, not through a proxy)",
    },
    Flag {
        name: "--max-message-bytes",
        env: "STOCKSYNC_MAX_MESSAGE_BYTES",
        value: "N",
        help: "largest WebSocket message (default 1048576; 1009 past it)",
    },
    Flag {
        name: "--compression",
        env: "STOCKSYNC_COMPRESSION",
        value: "on|off",
        help: "accept permessage-deflate offers (RFC 7692); off declines them (default on)",
    },
    Flag {
        name: "--max-subscriptions",
        env: "STOCKSYNC_MAX_SUBSCRIPTIONS",
        value: "N",
        help: "SKUs one connection may subscribe to (default 10000)",
    },
    Flag {
        name: "--max-skus",
        env: "STOCKSYNC_MAX_SKUS",
        value: "N",
        help: "distinct SKUs; a write creating one past it gets `too_large` (default 1000000)",
    },
    Flag {
        name: "--max-writes-in-flight",
        env: "STOCKSYNC_MAX_WRITES_IN_FLIGHT",
        value: "N",
        help: "writes one connection may have waiting for the log or Redis; past it the connection is not read until they drain (default 256)",
    },
    Flag {
        name: "--write-rate",
        env: "STOCKSYNC_WRITE_RATE",
        value: "N",
        help: "write messages per second per connection (a batch counts once), 0 = unlimited (default 0)",
    },
    Flag {
        name: "--token-write-rate",
        env: "STOCKSYNC_TOKEN_WRITE_RATE",
        value: "N",
        help: "write messages per second per token over all its connections (a batch counts once), 0 = unlimited (default 0)",
    },
    Flag {
        name: "--holds-max",
        env: "STOCKSYNC_HOLDS_MAX",
        value: "N",
        help: "live holds in total; a reserve creating one more gets `too_large` (default 1000000)",
    },
    Flag {
        name: "--hold-lines-max",
        env: "STOCKSYNC_HOLD_LINES_MAX",
        value: "N",
        help: "SKUs in one hold; past it `too_large` (default 100)",
    },
    Flag {
        name: "--hold-ttl-max-ms",
        env: "STOCKSYNC_HOLD_TTL_MAX_MS",
        value: "MS",
        help: "longest ttl_ms of a hold, 100..=86400000; past it `bad_request` (default 86400000)",
    },
    Flag {
        name: "--idempotency-keys-max",
        env: "STOCKSYNC_IDEMPOTENCY_KEYS_MAX",
        value: "N",
        help: "embedded engine: idempotency keys remembered (24 h each); keyed writes past it get `unavailable` (default 1000000)",
    },
    Flag {
        name: "--send-high-bytes",
        env: "STOCKSYNC_SEND_HIGH_BYTES",
        value: "N",
        help: "unsent bytes past which updates to a client are conflated (default 262144)",
    },
    Flag {
        name: "--send-max-bytes",
        env: "STOCKSYNC_SEND_MAX_BYTES",
        value: "N",
        help: "unsent bytes past which a client is disconnected, 1008 (default 4194304)",
    },
    Flag {
        name: "--socket-send-buffer",
        env: "STOCKSYNC_SOCKET_SEND_BUFFER",
        value: "BYTES",
        help: "SO_SNDBUF per connection, 0 = kernel autotuning (default 131072)",
    },
    Flag {
        name: "--ping-interval",
        env: "STOCKSYNC_PING_INTERVAL",
        value: "SECS",
        help: "WebSocket ping interval, 0 = none (default 25)",
    },
    Flag {
        name: "--idle-timeout",
        env: "STOCKSYNC_IDLE_TIMEOUT",
        value: "SECS",
        help: "close connections silent this long (default 60)",
    },
    Flag {
        name: "--handshake-timeout",
        env: "STOCKSYNC_HANDSHAKE_TIMEOUT",
        value: "SECS",
        help: "time to complete the first request (default 10)",
    },
    Flag {
        name: "--snapshot-log-bytes",
        env: "STOCKSYNC_SNAPSHOT_LOG_BYTES",
        value: "N",
        help: "log size that triggers a snapshot (default 67108864)",
    },
];

pub fn usage() -> String {
    let mut out = String::from(
        "stocksync: real-time inventory sync server\n\nusage: stocksync [FLAGS]\n\nEach flag can also be set by its environment variable.\n\n",
    );
    // One column for `--flag VALUE`, as wide as the widest, so every description starts at
    // the same place and the environment variable sits under it.
    let width = FLAGS
        .iter()
        .map(|f| f.name.len() + 1 + f.value.len())
        .max()
        .unwrap_or(0);
    for f in FLAGS {
        let left = format!("{} {}", f.name, f.value);
        let _ = writeln!(out, "  {left:<width$}  {}", f.help);
        let _ = writeln!(out, "  {:<width$}  env {}", "", f.env);
    }
    let _ = writeln!(out, "  {:<width$}  this text", "--help");
    let _ = writeln!(out, "  {:<width$}  the version", "--version");
    out.push_str("\nRUST_LOG=debug for per-connection logs.\n");
    out
}

/// `stocksync VERSION`, for `--version`.
pub fn version() -> String {
    format!("stocksync {}\n", env!("CARGO_PKG_VERSION"))
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{flag}: `{value}` is not a valid number"))
}

fn parse_bool(flag: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{flag}: `{value}` is not true or false")),
    }
}

impl Settings {
    pub fn defaults() -> Settings {
        Settings {
            listen: SocketAddr::from(([0, 0, 0, 0], 2346)),
            data_dir: Some(PathBuf::from("stocksync-data")),
            fsync: FsyncPolicy::Always,
            write_token: None,
            tokens_file: None,
            snapshot_log_bytes: 64 * 1024 * 1024,
            limits: Limits::default(),
            service: ServiceConfig::default(),
            redis: None,
            redis_prefix: "stocksync:".into(),
            workers: 1,
            tls_cert: None,
            tls_key: None,
        }
    }

    /// Parses flags (without the program name) over environment variables over defaults.
    /// `Ok(None)` means `--help` was asked for.
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Settings>, String> {
        let mut given: Vec<(&'static str, String)> = Vec::new();
        for flag in FLAGS {
            if let Some(value) = env(flag.env) {
                given.push((flag.name, value));
            }
        }
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            if arg == "--help" || arg == "-h" {
                return Ok(None);
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            let flag = FLAGS
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| format!("unknown flag `{arg}` (see --help)"))?;
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("{} needs a value", flag.name))?
                }
            };
            given.push((flag.name, value));
            i += 1;
        }
        let mut s = Settings::defaults();
        for (name, value) in given {
            s.apply(name, &value)?;
        }
        s.limits.validate().map_err(|e| e.0)?;
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together: give both, or neither".into());
        }
        if s.workers > 1 && s.redis.is_none() {
            return Err(format!(
                "--workers {} needs --redis: without a shared Redis every worker would hold an \
                 inventory of its own, and clients would see different stock depending on the \
                 process the kernel gave them",
                s.workers
            ));
        }
        Ok(Some(s))
    }

    fn apply(&mut self, name: &str, value: &str) -> Result<(), String> {
        let secs_to_ms = |v: u64| v.saturating_mul(1000);
        match name {
            "--listen" => {
                self.listen = value.parse().map_err(|_| {
                    format!("--listen: `{value}` is not an address like 0.0.0.0:2346")
                })?
            }
            "--redis" => self.redis = Some(RedisUrl::parse(value.trim())?),
            "--redis-prefix" => {
                if value.is_empty() || value.contains(['{', '}']) {
                    return Err(format!(
                        "--redis-prefix: `{value}` must be non-empty and without braces"
                    ));
                }
                self.redis_prefix = value.to_string();
            }
            "--workers" => {
                self.workers = match value.trim() {
                    "auto" => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => match parse_number::<usize>(name, n)? {
                        0 => return Err("--workers: must be at least 1".into()),
                        n => n,
                    },
                };
            }
            "--data-dir" => {
                self.data_dir = match value {
                    "" | "none" => None,
                    dir => Some(PathBuf::from(dir)),
                }
            }
            "--fsync" => {
                self.fsync = match value {
                    "always" => FsyncPolicy::Always,
                    "never" => FsyncPolicy::Never,
                    _ => return Err(format!("--fsync: `{value}` is not always or never")),
                }
            }
            "--write-token" => {
                if value.is_empty() {
                    return Err("--write-token: empty token".into());
                }
                self.write_token = Some(value.to_string());
            }
            "--tokens" => self.tokens_file = Some(PathBuf::from(value)),
            "--tls-cert" => self.tls_cert = Some(PathBuf::from(value)),
            "--tls-key" => self.tls_key = Some(PathBuf::from(value)),
            "--trusted-proxy" => {
                for item in value.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    let ip = item.parse().map_err(|_| {
                        format!("--trusted-proxy: `{item}` is not an IP address like 127.0.0.1")
                    })?;
                    self.limits.trusted_proxies.push(ip);
                }
            }
            "--public-read" => self.service.access.public_read = parse_bool(name, value)?,
            "--allowed-origin" => self.service.allowed_origins.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(String::from),
            ),
            "--max-connections" => self.limits.connections_max = parse_number(name, value)?,
            "--max-connections-per-ip" => {
                self.limits.connections_per_ip_max = parse_number(name, value)?
            }
            "--max-message-bytes" => {
                let bytes: usize = parse_number(name, value)?;
                self.limits.ws_message_bytes_max = bytes;
                let needed = bytes + 64 * 1024;
                self.limits.read_buffer_bytes_max = self.limits.read_buffer_bytes_max.max(needed);
            }
            "--compression" => self.limits.ws_compression = parse_bool(name, value)?,
            "--max-subscriptions" => {
                self.service.subscriptions_per_conn_max = parse_number(name, value)?
            }
            "--max-skus" => self.service.skus_max = parse_number(name, value)?,
            "--max-writes-in-flight" => {
                self.service.writes_in_flight_per_conn_max = parse_number(name, value)?
            }
            "--write-rate" => self.service.writes_per_conn_per_sec = parse_number(name, value)?,
            "--token-write-rate" => {
                self.service.writes_per_token_per_sec = parse_number(name, value)?
            }
            "--holds-max" => self.service.hold_limits.holds_max = parse_number(name, value)?,
            "--hold-lines-max" => match parse_number(name, value)? {
                0 => return Err("--hold-lines-max: must be at least 1".into()),
                n => self.service.hold_limits.lines_max = n,
            },
            "--hold-ttl-max-ms" => {
                let ttl_ms: u64 = parse_number(name, value)?;
                let range = crate::stock::holds::TTL_MS_MIN..=crate::stock::holds::TTL_MS_MAX;
                if !range.contains(&ttl_ms) {
                    return Err(format!(
                        "--hold-ttl-max-ms: {ttl_ms} is not in {}..={}",
                        range.start(),
                        range.end()
                    ));
                }
                self.service.hold_limits.ttl_ms_max = ttl_ms;
            }
            "--idempotency-keys-max" => {
                self.service.idempotency_keys_max = parse_number(name, value)?
            }
            "--send-high-bytes" => {
                self.limits.send_queue_high_bytes = parse_number(name, value)?;
                self.limits.send_queue_low_bytes = self
                    .limits
                    .send_queue_low_bytes
                    .min(self.limits.send_queue_high_bytes / 4);
            }
            "--send-max-bytes" => self.limits.send_queue_bytes_max = parse_number(name, value)?,
            "--socket-send-buffer" => {
                self.limits.socket_send_buffer_bytes = parse_number(name, value)?
            }
            "--ping-interval" => {
                self.limits.ping_interval_ms = secs_to_ms(parse_number(name, value)?)
            }
            "--idle-timeout" => {
                self.limits.idle_timeout_ms = secs_to_ms(parse_number(name, value)?)
            }
            "--handshake-timeout" => {
                self.limits.handshake_timeout_ms = secs_to_ms(parse_number(name, value)?)
            }
            "--snapshot-log-bytes" => self.snapshot_log_bytes = parse_number(name, value)?,
            _ => return Err(format!("unknown flag `{name}`")),
        }
        Ok(())
    }
}

/// Reads a tokens file: one token per line, `name role secret`; `#` starts a comment.
pub fn read_tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, role, secret] = parts[..] else {
            return Err(format!("line {}: expected `name role secret`", number + 1));
        };
        let role = match role {
            "read" => Role::Read,
            "write" => Role::Write,
            other => {
                return Err(format!(
                    "line {}: role `{other}` is not read or write",
                    number + 1
                ))
            }
        };
        if secret.len() < 8 {
            return Err(format!(
                "line {}: token `{name}` is shorter than 8 characters",
                number + 1
            ));
        }
        tokens.push(Token {
            name: name.to_string(),
            secret: secret.to_string(),
            role,
        });
    }
    Ok(tokens)
}

/// A random token (128 bits from the kernel's CSPRNG, hex).
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_beat_env_and_env_beats_defaults() {
        let env = |k: &str| match k {
            "STOCKSYNC_LISTEN" => Some("127.0.0.1:1".to_string()),
            "STOCKSYNC_WRITE_TOKEN" => Some("from-env".to_string()),
            _ => None,
        };
        let s = Settings::parse(&args(&["--listen", "127.0.0.1:2"]), env)
            .unwrap()
            .unwrap();
        assert_eq!(s.listen.port(), 2);
        assert_eq!(s.write_token.as_deref(), Some("from-env"));
        let s = Settings::parse(&args(&["--fsync=never", "--data-dir", "none"]), |_| None)
            .unwrap()
            .unwrap();
        assert_eq!(s.fsync, FsyncPolicy::Never);
        assert!(s.data_dir.is_none());
        assert!(s.limits.ws_compression, "compression is on by default");
        let env = |k: &str| (k == "STOCKSYNC_COMPRESSION").then(|| "off".to_string());
        let s = Settings::parse(&[], env).unwrap().unwrap();
        assert!(!s.limits.ws_compression);
        let s = Settings::parse(&args(&["--compression=on"]), env)
            .unwrap()
            .unwrap();
        assert!(s.limits.ws_compression, "the flag beats the variable");
        assert!(Settings::parse(&args(&["--compression", "maybe"]), |_| None).is_err());
        assert!(Settings::parse(&args(&["--help"]), |_| None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn help_descriptions_start_in_one_column() {
        let usage = usage();
        // Where the description starts: after `--flag VALUE` and the two-space gap.
        let starts: Vec<usize> = usage
            .lines()
            .filter(|line| line.starts_with("  --"))
            .map(|line| {
                let description = line[2..].split_once("  ").map_or("", |(_, rest)| rest);
                line.len() - description.trim_start().len()
            })
            .collect();
        assert!(starts.len() > FLAGS.len(), "{usage}");
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "{usage}");
        for flag in FLAGS {
            assert!(usage.contains(&format!("env {}", flag.env)));
        }
        assert!(version().starts_with("stocksync "));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for bad in [
            &["--listen", "nope"][..],
            &["--fsync", "sometimes"],
            &["--max-connections", "-1"],
            &["--bogus", "1"],
            &["--listen"],
            &["--trusted-proxy", "proxy.example"],
            &["--tls-cert", "cert.pem"],
        ] {
            assert!(Settings::parse(&args(bad), |_| None).is_err(), "{bad:?}");
        }
        assert!(usage().contains("STOCKSYNC_WRITE_TOKEN"));
    }

    #[test]
    fn tls_pair_and_trusted_proxies() {
        let s = Settings::parse(
            &args(&[
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
                "--trusted-proxy",
                "127.0.0.1, ::1",
            ]),
            |_| None,
        )
        .unwrap()
        .unwrap();
        let files = s.tls_files().expect("both halves given");
        assert_eq!(files.cert, PathBuf::from("c.pem"));
        assert_eq!(s.limits.trusted_proxies.len(), 2);
        let s = Settings::parse(&[], |_| None).unwrap().unwrap();
        assert!(s.tls_files().is_none() && s.limits.trusted_proxies.is_empty());
        let env = |k: &str| (k == "STOCKSYNC_TLS_KEY").then(|| "k.pem".to_string());
        let err = Settings::parse(&[], env).unwrap_err();
        assert!(err.contains("--tls-cert and --tls-key"), "{err}");
    }

    #[test]
    fn tokens_file() {
        let tokens =
            read_tokens("# comment\nerp write s3cret-123\nshop read viewview\n\n").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[0].role, Role::Write);
        assert!(read_tokens("erp admin s3cret-123").is_err());
        assert!(read_tokens("erp write short").is_err());
        assert!(read_tokens("erp write").is_err());
    }
}
