//! examples/php/push_stock.php run with Debian's php-cli and php-curl against the real server,
//! over plain HTTP and over native TLS (curl with OpenSSL: a TLS client we did not write).

mod common;

use std::path::Path;
use std::process::Command;

use common::tls::SelfSigned;
use common::{http_json, Server, TOKEN};

const PHP_MISSING: &str = "php-cli with the curl extension is needed for this test: \
     apt-get install php-cli php-curl (scripts/test.sh installs them as root)";

/// Runs the example with `args`; returns its stdout, failing with its stderr.
fn run_example(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/php/push_stock.php");
    let probe = Command::new("php")
        .args(["-r", "exit(function_exists('curl_init') ? 0 : 3);"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run php ({e}): {PHP_MISSING}"));
    assert!(probe.success(), "php has no curl extension: {PHP_MISSING}");
    let output = Command::new("php")
        .arg(&script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "push_stock.php failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

fn check_output_and_stock(stdout: &str, quantity_of: impl Fn(&str) -> u64) {
    assert!(stdout.contains("set shirt-red: quantity 20"), "{stdout}");
    assert!(stdout.contains("batch shirt-blue: quantity 5"), "{stdout}");
    assert!(stdout.contains("batch shirt-red: quantity 17"), "{stdout}");
    assert!(
        stdout.contains("retry: duplicate=true, shirt-red quantity 17"),
        "{stdout}"
    );
    assert!(
        stdout.contains("refused: insufficient_stock (HTTP 409), shirt-red still 17"),
        "{stdout}"
    );
    assert_eq!(quantity_of("shirt-red"), 17);
    assert_eq!(quantity_of("shirt-blue"), 5);
}

#[test]
fn the_php_back_office_script_pushes_stock_over_http() {
    let server = Server::start(&[]);
    let url = format!("http://{}", server.addr);
    let stdout = run_example(&["--url", &url, "--token", TOKEN, "--run", "plain"]);
    check_output_and_stock(&stdout, |sku| {
        let (status, state) = http_json("GET", &server.http(&format!("/stock/{sku}")), &[], None);
        assert_eq!(status, 200);
        state["quantity"].as_u64().unwrap()
    });
    // The keys were recorded: a second run with the same run id changes nothing.
    let stdout = run_example(&["--url", &url, "--token", TOKEN, "--run", "plain"]);
    assert!(stdout.contains("set shirt-red: quantity 20"), "{stdout}");
    let (_, state) = http_json("GET", &server.http("/stock/shirt-red"), &[], None);
    assert_eq!(
        state["quantity"], 17,
        "a repeated run applied its changes again"
    );
}

#[test]
fn the_php_back_office_script_pushes_stock_over_native_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let (cert_path, key_path) = cert.write(dir.path());
    let server = Server::start(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);
    let url = format!("https://localhost:{}", server.addr.port());
    let stdout = run_example(&[
        "--url",
        &url,
        "--token",
        TOKEN,
        "--cacert",
        cert_path.to_str().unwrap(),
    ]);
    let config = cert.client_config();
    check_output_and_stock(&stdout, |sku| {
        let (status, body) = common::tls::https(
            server.addr,
            &config,
            "GET",
            &format!("/stock/{sku}"),
            &[],
            None,
        );
        assert_eq!(status, 200);
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        state["quantity"].as_u64().unwrap()
    });
}
