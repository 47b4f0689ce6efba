//! What the server hands to browsers: the client library (`/client.js`, `/client.mjs`) and
//! the live dashboard (`GET /` without an upgrade), PROTOCOL.md "The browser client".
//!
//! The files live in `web/` and are compiled into the binary, so a deployment is still one
//! file and the served client always matches the server's protocol.

use crate::http::Response;

/// The client library as a classic script: sets `window.StockSync` (one file cannot be both a
/// classic script and an ES module, since `export` is a syntax error in a classic script).
pub const CLIENT_JS: &str = include_str!("../../web/client.js");
/// The ES module form: imports `client.js` for its side effect and exports `StockSync`.
pub const CLIENT_MJS: &str = include_str!("../../web/client.mjs");
/// The dashboard page, built on `/client.mjs`.
pub const DASHBOARD_HTML: &str = include_str!("../../web/dashboard.html");

/// RFC 9239: `text/javascript` is the one JavaScript media type; browsers refuse to run a
/// module served with a non-JavaScript type.
const JAVASCRIPT_TYPE: &str = "text/javascript; charset=utf-8";
const HTML_TYPE: &str = "text/html; charset=utf-8";
/// Browsers revalidate on every load: the files change with the binary, and a stale client
/// talking to a newer server is the failure this avoids (they are a few KiB).
const CACHE_CONTROL: &str = "no-cache";

/// A script response, readable from every origin: storefronts load the client from their own
/// pages (PROTOCOL.md: `/client.js` carries `Access-Control-Allow-Origin: *` whatever
/// `--allowed-origin` says; the WebSocket origin check still applies to what it connects to).
pub fn script(source: &'static str) -> Response {
    Response::new(200)
        .body(JAVASCRIPT_TYPE, source.as_bytes().to_vec())
        .header("Access-Control-Allow-Origin", "*")
        .header("Cache-Control", CACHE_CONTROL)
        .header("X-Content-Type-Options", "nosniff")
}

/// The dashboard page.
pub fn dashboard() -> Response {
    Response::new(200)
        .body(HTML_TYPE, DASHBOARD_HTML.as_bytes().to_vec())
        .header("Cache-Control", CACHE_CONTROL)
        .header("X-Content-Type-Options", "nosniff")
}
