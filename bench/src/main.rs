//! stocksync-bench: a WebSocket load tool for stocksync and any server that speaks the benchmark
//! contract of PROTOCOL.md (subscribe to `*`, re-broadcast `stock_update`).
//!
//! Scenarios: `fanout`, `idle`, `handshake`, `ops`. Each prints a progress line per second on
//! stderr and one JSON summary on stdout, and is bounded by `--duration` and a count.

mod args;
mod fanout;
mod handshake;
mod idle;
mod net;
mod ops;
mod pool;
mod stats;
mod wire;

use args::Args;
use std::net::SocketAddr;

/// A scenario: flags in, JSON summary out.
type Scenario = fn(&Args) -> Result<serde_json::Value, String>;

const USAGE: &str = "\
usage: stocksync-bench SCENARIO [--flag value ...]

scenarios:
  fanout     C subscribers to *, P publishers; --rate R (updates/s, latency) or --window W
             (saturation: at most W updates in flight); reports delivered updates/s, latency
             p50/p90/p99/p999/max, missing and out-of-order deliveries
  idle       open C connections and hold them; reports connect rate and, with --server-pid,
             the server's resident memory per connection
  handshake  connect, upgrade, close, in a loop; reports handshakes/s
  ops        W writers doing reserve/release/commit/batch on N SKUs with Zipf skew; reports
             acked ops/s, ack latency, rejections by code (stocksync only: needs acks);
             --mix increase --batch N: N `increase 1` per message (ops/s and messages/s);
             --server-pid P: the server's CPU over the window; --metrics: growth of the
             server's /metrics counters over the window

common flags:
  --addr 127.0.0.1:2346   server address
  --path /ws              upgrade path
  --token T               write token (publishers, writers), sent as ?token=T
  --sources 1             spread connections over 127.0.0.F .. 127.0.0.(F+N-1)
  --source-first 1        F: first source address
  --duration 10           seconds of measurement (every run is also bounded by a count)
  --label NAME            name in the progress lines and the summary
  --connect-concurrency 256  connects/handshakes in flight
  --output FILE           also write the JSON summary to FILE
  --tls                   connect with TLS (wss://; the certificate is not verified)
  --deflate               (fanout, idle) offer permessage-deflate; compressed messages are
                          inflated before they are read; the summary's `deflate` part says how
                          many connections agreed and how many messages came compressed

One source address gives about 28,000 ephemeral ports, and a process may have 20,000 open
files here: above ~19,000 connections run several processes with different --source-first.
See docs/LOADTEST.md.
";

fn main() {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    // `--tls` applies to every scenario's connections, so it is taken here.
    if raw.iter().any(|arg| arg == "--tls") {
        raw.retain(|arg| arg != "--tls");
        net::enable_tls();
    }
    let Some(scenario) = raw.first() else {
        eprint!("{USAGE}");
        std::process::exit(2);
    };
    let (flags, switches, run): (&[&str], &[&str], Scenario) = match scenario.as_str() {
        "fanout" => (fanout::FLAGS, fanout::SWITCHES, fanout::run),
        "idle" => (idle::FLAGS, idle::SWITCHES, idle::run),
        "handshake" => (handshake::FLAGS, &[], handshake::run),
        "ops" => (ops::FLAGS, ops::SWITCHES, ops::run),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            return;
        }
        other => {
            eprintln!("unknown scenario `{other}`\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let mut known: Vec<&str> = flags.to_vec();
    known.push("output");
    let result = Args::parse(&raw[1..], &known, switches).and_then(|args| {
        let summary = run(&args)?;
        let text = summary.to_string();
        if let Some(path) = args.opt::<String>("output")? {
            std::fs::write(&path, format!("{text}\n"))
                .map_err(|error| format!("{path}: {error}"))?;
        }
        println!("{text}");
        Ok(())
    });
    if let Err(error) = result {
        eprintln!("stocksync-bench {scenario}: {error}");
        std::process::exit(1);
    }
}

/// `--addr`, `--sources`, `--source-first` as a connection target.
pub fn target(args: &Args) -> Result<net::Target, String> {
    let addr: SocketAddr = args.get("addr", "127.0.0.1:2346".parse().expect("constant address"))?;
    let source_count: u8 = args.get("sources", 1)?;
    let source_first: u8 = args.get("source-first", 1)?;
    if source_count == 0 || u16::from(source_first) + u16::from(source_count) > 255 {
        return Err("--sources/--source-first must stay within 127.0.0.1..127.0.0.254".into());
    }
    Ok(net::Target {
        addr,
        source_first,
        source_count,
    })
}

/// `path` with `token=T` appended as a query parameter (nothing when the token is empty).
pub fn with_token(path: &str, token: &str) -> String {
    if token.is_empty() {
        path.to_string()
    } else if path.contains('?') {
        format!("{path}&token={token}")
    } else {
        format!("{path}?token={token}")
    }
}
