//! The routes for browsers (PROTOCOL.md "The browser client") and CORS on the HTTP API
//! ("Limits that protect the server, and strictness at the edge"), against the real server over
//! raw sockets, so every header (and every repeat of one) is seen as sent.

mod common;

use std::io::Write;

use common::*;

const SHOP: &str = "https://shop.example";
const EVIL: &str = "https://evil.example";

/// One response read off a raw socket.
struct Answer {
    status: u16,
    /// Lower-cased names, values trimmed, in order (repeats kept).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
fn exchange(server: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let body = if method == "POST" {
        r#"{"action":"increase","change":1}"#
    } else {
        ""
    };
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let mut stream = raw(server.addr);
    stream.write_all(request.as_bytes()).unwrap();
    let bytes = read_to_close(&mut stream);
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&bytes)));
    let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    Answer {
        status,
        headers,
        body: bytes[end + 4..].to_vec(),
    }
}

/// Which server a case runs against.
#[derive(Clone, Copy, Debug)]
enum Config {
    /// No `--allowed-origin`: any origin may read.
    Open,
    /// `--allowed-origin https://shop.example`.
    Restricted,
}

struct Case {
    name: &'static str,
    config: Config,
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    /// Headers that must be present exactly once with this value, or (`None`) be absent.
    expect: &'static [(&'static str, Option<&'static str>)],
}

const AUTH: (&str, &str) = ("Authorization", "Bearer test-write-token");
const ACAO: &str = "access-control-allow-origin";
const PREFLIGHT_HEADERS: &str = "Authorization, Content-Type, Idempotency-Key";

fn cases() -> Vec<Case> {
    use Config::*;
    vec![
        Case {
            name: "no Origin: not a cross-origin request, no CORS header",
            config: Open,
            method: "GET",
            path: "/stock/sku-1",
            headers: &[],
            status: 200,
            expect: &[(ACAO, None), ("vary", None)],
        },
        Case {
            name: "any origin may read when no --allowed-origin is set",
            config: Open,
            method: "GET",
            path: "/stock/sku-1",
            headers: &[("Origin", EVIL)],
            status: 200,
            expect: &[(ACAO, Some("*")), ("vary", None)],
        },
        Case {
            name: "a write from any origin",
            config: Open,
            method: "POST",
            path: "/stock/sku-1",
            headers: &[("Origin", SHOP), AUTH],
            status: 200,
            expect: &[(ACAO, Some("*"))],
        },
        Case {
            name: "errors carry it too, so the page can read the error body",
            config: Open,
            method: "POST",
            path: "/stock/sku-1",
            headers: &[("Origin", SHOP)],
            status: 401,
            expect: &[(ACAO, Some("*"))],
        },
        Case {
            name: "unknown route",
            config: Open,
            method: "GET",
            path: "/nope",
            headers: &[("Origin", SHOP)],
            status: 404,
            expect: &[(ACAO, Some("*"))],
        },
        Case {
            name: "a listed origin is echoed, with Vary",
            config: Restricted,
            method: "GET",
            path: "/stock?skus=sku-1",
            headers: &[("Origin", SHOP)],
            status: 200,
            expect: &[(ACAO, Some(SHOP)), ("vary", Some("Origin"))],
        },
        Case {
            name: "a listed origin's write",
            config: Restricted,
            method: "POST",
            path: "/stock/sku-2",
            headers: &[("Origin", SHOP), AUTH],
            status: 200,
            expect: &[(ACAO, Some(SHOP)), ("vary", Some("Origin"))],
        },
        Case {
            name: "an unlisted origin gets no CORS header",
            config: Restricted,
            method: "GET",
            path: "/stock/sku-1",
            headers: &[("Origin", EVIL)],
            status: 200,
            expect: &[(ACAO, None)],
        },
        Case {
            name: "preflight for a write",
            config: Open,
            method: "OPTIONS",
            path: "/stock/sku-1",
            headers: &[
                ("Origin", SHOP),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type, idempotency-key",
                ),
            ],
            status: 204,
            expect: &[
                (ACAO, Some("*")),
                (
                    "access-control-allow-methods",
                    Some("GET, HEAD, POST, OPTIONS"),
                ),
                ("access-control-allow-headers", Some(PREFLIGHT_HEADERS)),
                ("access-control-max-age", Some("600")),
                ("allow", Some("GET, HEAD, POST, OPTIONS")),
            ],
        },
        Case {
            name: "preflight for the batch route from a listed origin",
            config: Restricted,
            method: "OPTIONS",
            path: "/stock/batch",
            headers: &[("Origin", SHOP), ("Access-Control-Request-Method", "POST")],
            status: 204,
            expect: &[
                (ACAO, Some(SHOP)),
                ("vary", Some("Origin")),
                ("access-control-allow-headers", Some(PREFLIGHT_HEADERS)),
            ],
        },
        Case {
            name: "preflight from an unlisted origin: no Access-Control headers, so it fails",
            config: Restricted,
            method: "OPTIONS",
            path: "/stock/batch",
            headers: &[("Origin", EVIL), ("Access-Control-Request-Method", "POST")],
            status: 204,
            expect: &[
                (ACAO, None),
                ("access-control-allow-methods", None),
                ("access-control-allow-headers", None),
            ],
        },
        Case {
            name: "preflight of a read-only route lists only its methods",
            config: Open,
            method: "OPTIONS",
            path: "/healthz",
            headers: &[("Origin", SHOP)],
            status: 204,
            expect: &[("access-control-allow-methods", Some("GET, HEAD, OPTIONS"))],
        },
        Case {
            name: "OPTIONS of an unknown route is still 404",
            config: Open,
            method: "OPTIONS",
            path: "/nope",
            headers: &[("Origin", SHOP)],
            status: 404,
            expect: &[("access-control-allow-methods", None)],
        },
        Case {
            name: "other methods stay 405",
            config: Open,
            method: "DELETE",
            path: "/stock/sku-1",
            headers: &[("Origin", SHOP)],
            status: 405,
            expect: &[(ACAO, Some("*")), ("allow", Some("GET, HEAD, POST"))],
        },
        Case {
            name: "client.js: JavaScript, readable from every origin",
            config: Restricted,
            method: "GET",
            path: "/client.js",
            headers: &[("Origin", EVIL)],
            status: 200,
            expect: &[
                ("content-type", Some("text/javascript; charset=utf-8")),
                (ACAO, Some("*")),
                ("vary", None),
            ],
        },
        Case {
            name: "client.js without an Origin (a plain <script>)",
            config: Open,
            method: "GET",
            path: "/client.js",
            headers: &[],
            status: 200,
            expect: &[
                ("content-type", Some("text/javascript; charset=utf-8")),
                (ACAO, Some("*")),
            ],
        },
        Case {
            name: "client.mjs from a listed origin: still exactly one `*`",
            config: Restricted,
            method: "GET",
            path: "/client.mjs",
            headers: &[("Origin", SHOP)],
            status: 200,
            expect: &[
                ("content-type", Some("text/javascript; charset=utf-8")),
                (ACAO, Some("*")),
            ],
        },
        Case {
            name: "the dashboard at / without an upgrade",
            config: Open,
            method: "GET",
            path: "/",
            headers: &[],
            status: 200,
            expect: &[("content-type", Some("text/html; charset=utf-8"))],
        },
        Case {
            name: "HEAD of the dashboard",
            config: Open,
            method: "HEAD",
            path: "/",
            headers: &[],
            status: 200,
            expect: &[("content-type", Some("text/html; charset=utf-8"))],
        },
        Case {
            name: "the dashboard needs no token even when reads do",
            config: Restricted,
            method: "GET",
            path: "/",
            headers: &[("Origin", SHOP)],
            status: 200,
            expect: &[(ACAO, Some(SHOP))],
        },
        Case {
            name: "the client cannot be written to",
            config: Open,
            method: "POST",
            path: "/client.js",
            headers: &[AUTH],
            status: 405,
            expect: &[("allow", Some("GET, HEAD"))],
        },
    ]
}

#[test]
fn cors_and_browser_routes_table() {
    let open = Server::start(&[]);
    let restricted = Server::start(&["--allowed-origin", SHOP, "--public-read", "false"]);
    let mut failures = Vec::new();
    for case in cases() {
        let server = match case.config {
            Config::Open => &open,
            Config::Restricted => &restricted,
        };
        let mut headers = case.headers.to_vec();
        // The restricted server needs a token for reads; the dashboard and client must not.
        if matches!(case.config, Config::Restricted)
            && case.path.starts_with("/stock")
            && !headers.contains(&AUTH)
        {
            headers.push(AUTH);
        }
        let answer = exchange(server, case.method, case.path, &headers);
        if answer.status != case.status {
            failures.push(format!("{}: status {}", case.name, answer.status));
        }
        for &(name, expected) in case.expect {
            let values = answer.values(name);
            let ok = match expected {
                Some(value) => values == [value],
                None => values.is_empty(),
            };
            if !ok {
                failures.push(format!("{}: {name} = {values:?}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn served_files_are_the_ones_in_web() {
    let server = Server::start(&[]);
    let files = [
        ("/client.js", include_str!("../web/client.js")),
        ("/client.mjs", include_str!("../web/client.mjs")),
        ("/", include_str!("../web/dashboard.html")),
    ];
    for (path, source) in files {
        let answer = exchange(&server, "GET", path, &[]);
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.body, source.as_bytes(), "{path}");
        let head = exchange(&server, "HEAD", path, &[]);
        assert_eq!(
            head.values("content-length"),
            [source.len().to_string().as_str()],
            "{path}"
        );
        assert!(head.body.is_empty(), "{path}: HEAD has no body");
    }
    // The dashboard is built on the client module, and the module on the classic script.
    assert!(include_str!("../web/dashboard.html").contains("./client.mjs"));
    assert!(include_str!("../web/client.mjs").contains("./client.js"));
}

#[test]
fn an_upgrade_at_root_is_still_a_websocket() {
    let server = Server::start(&[]);
    // The Workerman-style page: `/` with an upgrade hears every change.
    let (mut stream, _head) = raw_ws_at(server.addr, "/");
    let mut writer = server.writer();
    let ack = request(
        &mut writer,
        serde_json::json!({"type":"stock_update","stock":{"id":"root-1","action":"set","quantity":3}}),
    );
    assert_eq!(ack["type"], "ack", "{ack}");
    let (_, payload) = read_frame(&mut stream);
    let update: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(update["type"], "stock_update");
    assert_eq!(update["stock"]["quantity"], 3);
}

#[test]
fn the_websocket_origin_check_is_unchanged_by_cors() {
    let server = Server::start(&["--allowed-origin", SHOP]);
    // CORS lets any page read client.js, but an unlisted origin still cannot open a socket.
    let mut stream = raw(server.addr);
    let request =
        upgrade_request("/ws").replace("\r\n\r\n", &format!("\r\nOrigin: {EVIL}\r\n\r\n"));
    stream.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    let (_stream, head) = {
        let mut stream = raw(server.addr);
        let request =
            upgrade_request("/ws").replace("\r\n\r\n", &format!("\r\nOrigin: {SHOP}\r\n\r\n"));
        stream.write_all(request.as_bytes()).unwrap();
        let head = read_head(&mut stream);
        (stream, head)
    };
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
}
