//! Cross-origin resource sharing (the Fetch standard's CORS protocol) for the HTTP API, so a
//! storefront page on another origin can read stock and, with a token, write it.
//!
//! Policy (PROTOCOL.md "Limits that protect the server, and strictness at the edge"):
//! - a request without `Origin` is not a cross-origin browser request: nothing is added;
//! - no allowed origins configured (or `*` among them): `Access-Control-Allow-Origin: *`;
//! - the request's origin is listed: that origin, with `Vary: Origin` (the answer depends on
//!   the request's origin, so a shared cache must not hand it to another origin);
//! - an unlisted origin: no `Access-Control-Allow-Origin`, so the browser keeps the response
//!   from the page (the request itself is still served: CORS protects readers, not the server;
//!   writes are protected by the token).
//!
//! No `Access-Control-Allow-Credentials`: the API authenticates with a bearer token that the
//! page sends explicitly, never with cookies, so credentialed requests are not needed.

use super::response::Response;

/// Request headers a cross-origin page may send (answered to every preflight).
pub const ALLOWED_HEADERS: &str = "Authorization, Content-Type, Idempotency-Key";

/// How long a browser may reuse a preflight answer: short enough that a change of
/// `--allowed-origin` reaches open pages within minutes, long enough that a page writing
/// steadily preflights about once per ten minutes, not once per write.
pub const PREFLIGHT_MAX_AGE_SECS: u32 = 600;

/// The `Access-Control-Allow-Origin` a response carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowOrigin {
    /// `*`: any origin may read the response.
    Any,
    /// Exactly this origin (sent with `Vary: Origin`).
    Origin(String),
}

impl AllowOrigin {
    /// The answer for a request from `origin` (its `Origin` header) under `allowed` (the
    /// `--allowed-origin` list; empty means any origin). `None`: add no CORS header.
    pub fn for_request(allowed: &[String], origin: Option<&str>) -> Option<AllowOrigin> {
        let origin = origin?;
        if allowed.is_empty() || allowed.iter().any(|listed| listed == "*") {
            return Some(AllowOrigin::Any);
        }
        allowed
            .iter()
            .any(|listed| listed == origin)
            .then(|| AllowOrigin::Origin(origin.to_string()))
    }

    /// Adds `Access-Control-Allow-Origin` (and `Vary: Origin` for a named origin).
    pub fn apply(&self, response: Response) -> Response {
        match self {
            AllowOrigin::Any => response.header("Access-Control-Allow-Origin", "*"),
            AllowOrigin::Origin(origin) => response
                .header("Access-Control-Allow-Origin", origin.as_str())
                .header("Vary", "Origin"),
        }
    }
}

/// Adds the CORS headers for `allow`, if any.
pub fn with_cors(response: Response, allow: Option<&AllowOrigin>) -> Response {
    match allow {
        Some(allow) => allow.apply(response),
        None => response,
    }
}

/// The answer to an `OPTIONS` request on a path served with `methods` (an `Allow` list such
/// as `"GET, HEAD, POST"`): 204 with `Allow`, and for a browser origin the preflight headers.
/// An unlisted origin gets no `Access-Control-*` header at all, so its preflight fails in the
/// browser and the actual request is never sent.
pub fn preflight(methods: &str, allow: Option<&AllowOrigin>) -> Response {
    let methods = format!("{methods}, OPTIONS");
    let response = Response::new(204).header("Allow", methods.as_str());
    match allow {
        Some(allow) => allow
            .apply(response)
            .header("Access-Control-Allow-Methods", methods)
            .header("Access-Control-Allow-Headers", ALLOWED_HEADERS)
            .header("Access-Control-Max-Age", PREFLIGHT_MAX_AGE_SECS.to_string()),
        None => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(origins: &[&str]) -> Vec<String> {
        origins.iter().map(|o| o.to_string()).collect()
    }

    #[test]
    fn allow_origin_table() {
        let shop = "https://shop.example";
        let cases: &[(&[&str], Option<&str>, Option<AllowOrigin>)] = &[
            (&[], None, None),
            (&[], Some(shop), Some(AllowOrigin::Any)),
            (&[shop], None, None),
            (&[shop], Some(shop), Some(AllowOrigin::Origin(shop.into()))),
            (&[shop], Some("https://evil.example"), None),
            // Origins compare exactly: scheme and port are part of the origin.
            (&[shop], Some("http://shop.example"), None),
            (&[shop], Some("https://shop.example:8443"), None),
            (&["*"], Some("https://any.example"), Some(AllowOrigin::Any)),
            (
                &["https://a.example", shop],
                Some(shop),
                Some(AllowOrigin::Origin(shop.into())),
            ),
        ];
        for (allowed, origin, expected) in cases {
            assert_eq!(
                &AllowOrigin::for_request(&list(allowed), *origin),
                expected,
                "{allowed:?} {origin:?}"
            );
        }
    }

    fn header<'r>(response: &'r Response, name: &str) -> Vec<&'r str> {
        response
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn apply_adds_vary_only_for_a_named_origin() {
        let any = AllowOrigin::Any.apply(Response::new(200));
        assert_eq!(header(&any, "access-control-allow-origin"), ["*"]);
        assert!(header(&any, "vary").is_empty());
        let named = AllowOrigin::Origin("https://a.example".into()).apply(Response::new(200));
        assert_eq!(
            header(&named, "access-control-allow-origin"),
            ["https://a.example"]
        );
        assert_eq!(header(&named, "vary"), ["Origin"]);
        assert_eq!(with_cors(Response::new(200), None), Response::new(200));
    }

    #[test]
    fn preflight_lists_methods_and_headers() {
        let response = preflight("GET, HEAD, POST", Some(&AllowOrigin::Any));
        assert_eq!(response.status, 204);
        assert_eq!(header(&response, "allow"), ["GET, HEAD, POST, OPTIONS"]);
        assert_eq!(
            header(&response, "access-control-allow-methods"),
            ["GET, HEAD, POST, OPTIONS"]
        );
        assert_eq!(
            header(&response, "access-control-allow-headers"),
            [ALLOWED_HEADERS]
        );
        assert_eq!(header(&response, "access-control-max-age"), ["600"]);
        let refused = preflight("GET", None);
        assert_eq!(refused.status, 204);
        assert!(refused
            .headers
            .iter()
            .all(|(n, _)| !n.starts_with("Access-Control-")));
    }
}
