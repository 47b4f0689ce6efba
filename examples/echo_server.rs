//! An echo server on stocksync's core: every text or binary message is sent straight back, and
//! an upgrade is accepted on any path. Made for WebSocket conformance suites (e.g. Autobahn's
//! fuzzingclient), which expect exactly this.
//!
//! `cargo run --release --example echo_server -- --listen 127.0.0.1:9001`

use std::net::SocketAddr;

use stocksync::app::echo::Echo;
use stocksync::app::Protocol;
use stocksync::config::Limits;
use stocksync::net::EventLoop;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut listen: SocketAddr = "127.0.0.1:9001".parse().expect("default address");
    let mut limits = Limits {
        // Conformance suites send messages of up to 16 MiB.
        ws_message_bytes_max: 16 * 1024 * 1024,
        read_buffer_bytes_max: 17 * 1024 * 1024,
        send_queue_bytes_max: 64 * 1024 * 1024,
        ..Limits::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--listen", Some(v)) => match v.parse() {
                Ok(addr) => listen = addr,
                Err(e) => exit_usage(&format!("bad --listen {v}: {e}")),
            },
            ("--max-message-bytes", Some(v)) => match v.parse::<usize>() {
                Ok(n) => {
                    limits.ws_message_bytes_max = n;
                    limits.read_buffer_bytes_max = limits.read_buffer_bytes_max.max(n + 64);
                }
                Err(e) => exit_usage(&format!("bad --max-message-bytes {v}: {e}")),
            },
            _ => exit_usage(&format!("unknown argument {arg}")),
        }
    }
    let mut event_loop =
        match EventLoop::bind(listen, limits.clone(), |_| Protocol::new(Echo, &limits)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {listen}: {e}");
                std::process::exit(1);
            }
        };
    if let Err(e) = event_loop.handle_signals() {
        eprintln!("cannot install signal handlers: {e}");
        std::process::exit(1);
    }
    log::info!("echo server listening on {}", event_loop.local_addr());
    if let Err(e) = event_loop.run() {
        eprintln!("event loop failed: {e}");
        std::process::exit(1);
    }
}

fn exit_usage(message: &str) -> ! {
    eprintln!("{message}\nusage: echo_server [--listen ADDR] [--max-message-bytes N]");
    std::process::exit(2);
}
