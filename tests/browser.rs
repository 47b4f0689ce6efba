//! The JavaScript suites, run from `cargo test`: `web/test/client.test.mjs` (client.js in Node
//! against the real server) and `web/test/browser.test.mjs` (dashboard, client.js on another
//! origin, reconnects and the storefront examples in headless Chromium). Both start the binary
//! cargo built for this test run.
//!
//! Missing tools fail the test with what to install; nothing is skipped: a suite that silently
//! did not run would look exactly like one that passed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Debian's chromium package; playwright-core drives it (a browser download is not possible
/// on our machines).
const CHROMIUM: &str = "/usr/bin/chromium";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_node() {
    let found = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        found,
        "node is missing: install Node.js 20 or newer (apt-get install -y nodejs npm)"
    );
}

/// Installs the dev dependencies (`ws`, `playwright-core`) from package-lock.json once.
fn require_node_modules() {
    // Both tests may get here at once; one `npm ci` at a time.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let modules = repo().join("node_modules");
    if modules.join("ws").is_dir() && modules.join("playwright-core").is_dir() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(repo())
        .status()
        .expect("npm is missing: install it (apt-get install -y npm)");
    assert!(status.success(), "npm ci failed at {}", repo().display());
}

fn run_suite(file: &str) {
    require_node();
    require_node_modules();
    let path: &Path = &repo().join("web/test").join(file);
    let status = Command::new("node")
        .arg("--test")
        .arg(path)
        .env("STOCKSYNC_BIN", env!("CARGO_BIN_EXE_stocksync"))
        .current_dir(repo())
        .status()
        .expect("run node");
    assert!(
        status.success(),
        "node --test {file} failed (see its output above)"
    );
}

#[test]
fn client_js_in_node_against_the_server() {
    run_suite("client.test.mjs");
}

#[test]
fn dashboard_client_and_examples_in_headless_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium (apt-get update && apt-get install -y \
         chromium); the end-to-end tests need a real browser"
    );
    run_suite("browser.test.mjs");
}
