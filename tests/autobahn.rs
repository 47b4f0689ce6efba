//! The Autobahn TestSuite, every case (1.* to 13.*: framing, pings, reserved bits, opcodes,
//! fragmentation, UTF-8, close handling, 9.* messages up to 16 MiB and 12.*/13.* permessage-deflate
//! with every offer the suite makes), against the echo service on the real core. The cases are
//! Autobahn's own case files, run by kosoku (PyPI), a maintained Python 3 driver of them; see
//! `tests/autobahn/fuzzingclient.py`. A case fails the test unless its behaviour and its close
//! behaviour are OK, NON-STRICT or INFORMATIONAL.
//!
//! Needs Python 3 and the venv `.ci/run` creates (`.venv-autobahn`, with kosoku); without it the
//! test fails saying what to install.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use stocksync::config::Limits;

/// Cases run at once: the echo loop is one thread and kosoku's runner another, so two keeps both
/// cores busy; the whole suite takes about a minute and a half that way on 2 cores in a debug build
/// (docs/BENCHMARKS.md, "Compression").
const PARALLEL_CASES: &str = "2";

#[test]
fn autobahn_fuzzingclient_every_case_passes() {
    let python = common::python_with(&["kosoku"]);
    // The limits of examples/echo_server.rs: Autobahn's 9.* cases send messages of up to 16 MiB.
    let addr = common::start_echo(Limits {
        ws_message_bytes_max: 16 * 1024 * 1024,
        read_buffer_bytes_max: 17 * 1024 * 1024,
        send_queue_bytes_max: 64 * 1024 * 1024,
        ..Limits::default()
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/autobahn/fuzzingclient.py");
    let started = Instant::now();
    let status = Command::new(&python)
        .arg(&script)
        .arg(format!("ws://{addr}"))
        .args(["--parallel", PARALLEL_CASES])
        .status()
        .expect("run the Autobahn driver");
    eprintln!(
        "autobahn: whole run {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "Autobahn cases failed (each is listed above with the runner's reason); driver {status}"
    );
}
