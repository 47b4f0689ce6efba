//! A small router from method and path to a caller-defined route value (usually an enum).
//!
//! Patterns, fixed at start-up:
//! - exact: `/healthz` matches only `/healthz`;
//! - segment: `/stock/{sku}` matches `/stock/` plus one non-empty segment without `/`;
//! - tail: `/stock/{*sku}` matches `/stock/` plus any non-empty rest, `/` included (SKU ids may
//!   contain `/`).
//!
//! Parameters come back still percent-encoded, borrowed from the path: decode them with
//! [`percent_decode`] (so `/stock/a%2Fb` can name the SKU `a/b` under a segment pattern).
//!
//! Precedence: exact patterns first, then parameter patterns by longer prefix, a segment before
//! a tail with the same prefix. The first pattern that matches the path *and* has a route for
//! the method wins, so a `POST /stock/reserve` action does not hide the SKU `reserve` from
//! `GET /stock/{sku}`. Only when no matching pattern has the method is the answer
//! `MethodNotAllowed`, listing every method the matching patterns accept. HEAD is served by the
//! GET route unless a HEAD route is registered.

pub use super::percent::percent_decode;
use super::request::Method;

/// Methods in the order an `Allow` header lists them.
const ALLOW_ORDER: [Method; 7] = [
    Method::Get,
    Method::Head,
    Method::Post,
    Method::Put,
    Method::Patch,
    Method::Delete,
    Method::Options,
];

/// The result of [`Router::find`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match<'p, R> {
    /// A route for this method and path.
    Found {
        /// The value given to [`Router::add`].
        route: R,
        /// The parameter, still percent-encoded; `None` for exact patterns.
        param: Option<&'p str>,
    },
    /// No pattern matches the path: 404.
    NotFound,
    /// Patterns match the path but none has this method: 405 with this `Allow` value
    /// (RFC 9110 §15.5.6), e.g. `"GET, HEAD"`.
    MethodNotAllowed {
        /// Comma-separated methods, HEAD included wherever GET is.
        allow: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(&'static str),
    /// INVARIANT: the prefix ends with `/`.
    Segment {
        prefix: &'static str,
    },
    /// INVARIANT: the prefix ends with `/`.
    Tail {
        prefix: &'static str,
    },
}

impl Pattern {
    /// Parses a pattern; see the module docs for the forms.
    ///
    /// # Panics
    /// On any other form: patterns are written by us, so a bad one is a bug caught at start-up.
    fn parse(pattern: &'static str) -> Pattern {
        assert!(
            pattern.starts_with('/'),
            "pattern {pattern:?} must start with '/'"
        );
        let Some(open) = pattern.rfind("/{") else {
            assert!(
                !pattern.contains(['{', '}']),
                "stray brace in pattern {pattern:?}"
            );
            return Pattern::Exact(pattern);
        };
        let (prefix, param) = pattern.split_at(open + 1);
        let name = param
            .strip_prefix('{')
            .and_then(|rest| rest.strip_suffix('}'))
            .unwrap_or_else(|| panic!("parameter must end pattern {pattern:?}"));
        assert!(
            !prefix.contains(['{', '}']),
            "one parameter at most in {pattern:?}"
        );
        let (tail, name) = match name.strip_prefix('*') {
            Some(name) => (true, name),
            None => (false, name),
        };
        assert!(
            !name.is_empty() && !name.contains(['{', '}', '/', '*']),
            "bad parameter name in pattern {pattern:?}"
        );
        if tail {
            Pattern::Tail { prefix }
        } else {
            Pattern::Segment { prefix }
        }
    }

    /// `Some(param)` if `path` matches; the parameter is `None` for exact patterns.
    fn match_path<'p>(&self, path: &'p str) -> Option<Option<&'p str>> {
        match *self {
            Pattern::Exact(exact) => (path == exact).then_some(None),
            Pattern::Segment { prefix } => path
                .strip_prefix(prefix)
                .filter(|rest| !rest.is_empty() && !rest.contains('/'))
                .map(Some),
            Pattern::Tail { prefix } => path
                .strip_prefix(prefix)
                .filter(|rest| !rest.is_empty())
                .map(Some),
        }
    }

    /// Sort key: smaller is tried first.
    fn precedence(&self) -> (u8, std::cmp::Reverse<usize>, u8) {
        match *self {
            Pattern::Exact(_) => (0, std::cmp::Reverse(0), 0),
            Pattern::Segment { prefix } => (1, std::cmp::Reverse(prefix.len()), 0),
            Pattern::Tail { prefix } => (1, std::cmp::Reverse(prefix.len()), 1),
        }
    }
}

/// One pattern and the routes registered on it, one per method.
#[derive(Clone, Debug)]
struct Entry<R> {
    pattern: Pattern,
    routes: Vec<(Method, R)>,
}

impl<R: Copy> Entry<R> {
    fn route_for(&self, method: Method) -> Option<R> {
        let route_with = |wanted: Method| {
            self.routes
                .iter()
                .find(|(route_method, _)| *route_method == wanted)
                .map(|&(_, route)| route)
        };
        // RFC 9110 §9.3.2: HEAD is GET without the body, so the GET handler answers it.
        route_with(method).or_else(|| match method {
            Method::Head => route_with(Method::Get),
            _ => None,
        })
    }
}

/// Routes, kept sorted by precedence so [`Router::find`] is one pass.
#[derive(Clone, Debug)]
pub struct Router<R: Copy> {
    /// INVARIANT: sorted by `Pattern::precedence`; no two entries share a pattern.
    entries: Vec<Entry<R>>,
}

impl<R: Copy> Default for Router<R> {
    fn default() -> Self {
        Router::new()
    }
}

impl<R: Copy> Router<R> {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            entries: Vec::new(),
        }
    }

    /// Routes `method` requests for paths matching `pattern` to `route`.
    ///
    /// # Panics
    /// On a malformed pattern, on `Method::Other` (its name is not kept, so it could never be
    /// told apart from other unknown methods), and on a method registered twice for the same
    /// pattern. All are bugs in the route table, caught at start-up.
    pub fn add(&mut self, method: Method, pattern: &'static str, route: R) -> &mut Self {
        assert!(
            method != Method::Other,
            "cannot route Method::Other ({pattern:?})"
        );
        let parsed = Pattern::parse(pattern);
        let position = self
            .entries
            .iter()
            .position(|entry| entry.pattern == parsed);
        let entry = match position {
            Some(index) => &mut self.entries[index],
            None => {
                let index = self
                    .entries
                    .partition_point(|entry| entry.pattern.precedence() <= parsed.precedence());
                self.entries.insert(
                    index,
                    Entry {
                        pattern: parsed,
                        routes: Vec::new(),
                    },
                );
                &mut self.entries[index]
            }
        };
        assert!(
            entry.routes.iter().all(|&(existing, _)| existing != method),
            "{method:?} {pattern:?} registered twice"
        );
        entry.routes.push((method, route));
        self
    }

    /// The route for `method` and `path` (the path without its query, still percent-encoded).
    pub fn find<'p>(&self, method: Method, path: &'p str) -> Match<'p, R> {
        let mut allowed = [false; ALLOW_ORDER.len()];
        let mut path_matched = false;
        for entry in &self.entries {
            let Some(param) = entry.pattern.match_path(path) else {
                continue;
            };
            if let Some(route) = entry.route_for(method) {
                return Match::Found { route, param };
            }
            path_matched = true;
            for &(route_method, _) in &entry.routes {
                mark_allowed(&mut allowed, route_method);
                if route_method == Method::Get {
                    mark_allowed(&mut allowed, Method::Head);
                }
            }
        }
        if !path_matched {
            return Match::NotFound;
        }
        let allow = ALLOW_ORDER
            .iter()
            .zip(allowed)
            .filter(|&(_, is_allowed)| is_allowed)
            .filter_map(|(method, _)| method.name())
            .collect::<Vec<_>>()
            .join(", ");
        Match::MethodNotAllowed { allow }
    }
}

fn mark_allowed(allowed: &mut [bool; ALLOW_ORDER.len()], method: Method) {
    if let Some(index) = ALLOW_ORDER.iter().position(|&listed| listed == method) {
        allowed[index] = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Route {
        Health,
        HealthHead,
        Metrics,
        StockList,
        StockGet,
        StockPut,
        StockReserve,
        StockTail,
        BulkTail,
        Static,
    }

    fn router() -> Router<Route> {
        let mut router = Router::new();
        router
            .add(Method::Get, "/healthz", Route::Health)
            .add(Method::Head, "/healthz", Route::HealthHead)
            .add(Method::Get, "/metrics", Route::Metrics)
            .add(Method::Get, "/stock", Route::StockList)
            .add(Method::Get, "/stock/{sku}", Route::StockGet)
            .add(Method::Put, "/stock/{sku}", Route::StockPut)
            .add(Method::Post, "/stock/reserve", Route::StockReserve)
            .add(Method::Delete, "/stock/{*sku}", Route::StockTail)
            .add(Method::Post, "/stock/bulk/{*rest}", Route::BulkTail)
            .add(Method::Get, "/static/{*file}", Route::Static);
        router
    }

    fn found(route: Route, param: Option<&str>) -> Match<'_, Route> {
        Match::Found { route, param }
    }

    fn not_allowed(allow: &str) -> Match<'static, Route> {
        Match::MethodNotAllowed {
            allow: allow.to_owned(),
        }
    }

    #[test]
    fn find_table() {
        let router = router();
        let cases: &[(Method, &str, Match<'_, Route>)] = &[
            // Exact.
            (Method::Get, "/healthz", found(Route::Health, None)),
            (Method::Get, "/metrics", found(Route::Metrics, None)),
            (Method::Get, "/stock", found(Route::StockList, None)),
            (Method::Get, "/healthz/", Match::NotFound),
            (Method::Get, "/", Match::NotFound),
            (Method::Get, "", Match::NotFound),
            // Segment parameter: one non-empty segment, still encoded.
            (
                Method::Get,
                "/stock/abc",
                found(Route::StockGet, Some("abc")),
            ),
            (
                Method::Put,
                "/stock/abc",
                found(Route::StockPut, Some("abc")),
            ),
            (
                Method::Get,
                "/stock/a%2Fb",
                found(Route::StockGet, Some("a%2Fb")),
            ),
            (Method::Get, "/stock/", Match::NotFound),
            // Tail parameter: the whole non-empty rest, '/' included.
            (
                Method::Delete,
                "/stock/a/b/c",
                found(Route::StockTail, Some("a/b/c")),
            ),
            (
                Method::Delete,
                "/stock/abc",
                found(Route::StockTail, Some("abc")),
            ),
            (Method::Delete, "/stock/", Match::NotFound),
            (
                Method::Get,
                "/static/css/site.css",
                found(Route::Static, Some("css/site.css")),
            ),
            (Method::Get, "/static/", Match::NotFound),
            // A longer prefix wins over a shorter one.
            (
                Method::Post,
                "/stock/bulk/x/y",
                found(Route::BulkTail, Some("x/y")),
            ),
            // Exact wins over a parameter for the same method...
            (
                Method::Post,
                "/stock/reserve",
                found(Route::StockReserve, None),
            ),
            // ...but does not hide the parameter route from other methods.
            (
                Method::Get,
                "/stock/reserve",
                found(Route::StockGet, Some("reserve")),
            ),
            // 405 lists every method of every pattern matching the path.
            (Method::Post, "/healthz", not_allowed("GET, HEAD")),
            (
                Method::Post,
                "/stock/abc",
                not_allowed("GET, HEAD, PUT, DELETE"),
            ),
            (
                Method::Patch,
                "/stock/reserve",
                not_allowed("GET, HEAD, POST, PUT, DELETE"),
            ),
            (Method::Get, "/stock/a/b", not_allowed("DELETE")),
            (Method::Other, "/metrics", not_allowed("GET, HEAD")),
            (Method::Options, "/stock", not_allowed("GET, HEAD")),
            // HEAD: its own route if registered, else the GET route.
            (Method::Head, "/healthz", found(Route::HealthHead, None)),
            (Method::Head, "/metrics", found(Route::Metrics, None)),
            (
                Method::Head,
                "/stock/abc",
                found(Route::StockGet, Some("abc")),
            ),
            (Method::Head, "/stock/a/b", not_allowed("DELETE")),
        ];
        for (method, path, expected) in cases {
            assert_eq!(&router.find(*method, path), expected, "{method:?} {path:?}");
        }
    }

    #[test]
    fn precedence_does_not_depend_on_insertion_order() {
        let mut router = Router::new();
        router
            .add(Method::Get, "/a/{*rest}", 1)
            .add(Method::Get, "/a/{x}", 2)
            .add(Method::Get, "/a/b/{*rest}", 3)
            .add(Method::Get, "/a/b", 4);
        let cases = [
            ("/a/b", 4, None),
            ("/a/c", 2, Some("c")),
            ("/a/b/c", 3, Some("c")),
            ("/a/c/d", 1, Some("c/d")),
        ];
        for (path, route, param) in cases {
            assert_eq!(
                router.find(Method::Get, path),
                Match::Found { route, param },
                "{path}"
            );
        }
    }

    #[test]
    fn params_decode_with_percent_decode() {
        let router = router();
        let Match::Found {
            param: Some(param), ..
        } = router.find(Method::Get, "/stock/a%2Fb%20c")
        else {
            panic!("no match");
        };
        assert_eq!(percent_decode(param).as_deref(), Some("a/b c"));
    }

    #[test]
    fn bad_patterns_panic() {
        let patterns: &[&'static str] = &[
            "healthz",
            "/stock/{sku}/history",
            "/stock/{}",
            "/stock/{*}",
            "/{a}/{b}",
            "/stock/{sku",
            "/stock{sku}",
            "/a}",
        ];
        for &pattern in patterns {
            let result = std::panic::catch_unwind(|| {
                Router::new().add(Method::Get, pattern, 0u8);
            });
            assert!(result.is_err(), "{pattern:?} accepted");
        }
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_route_panics() {
        Router::new()
            .add(Method::Get, "/stock/{sku}", 0u8)
            .add(Method::Get, "/stock/{id}", 1u8);
    }

    #[test]
    #[should_panic(expected = "Method::Other")]
    fn other_method_cannot_be_routed() {
        Router::new().add(Method::Other, "/x", 0u8);
    }
}
