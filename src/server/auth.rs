//! Tokens and what they allow. Secrets are compared in constant time and never logged.

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Write,
}

#[derive(Clone, Debug)]
pub struct Token {
    /// A name for logs and metrics (the secret never appears there).
    pub name: String,
    pub secret: String,
    pub role: Role,
}

/// Refuses token lists where one secret has two names: `check` would take the first and the
/// other name (perhaps with another role) would silently never apply.
pub fn check_distinct_secrets(tokens: &[Token]) -> Result<(), String> {
    for (i, token) in tokens.iter().enumerate() {
        if let Some(other) = tokens[..i]
            .iter()
            .find(|other| constant_time_eq(other.secret.as_bytes(), token.secret.as_bytes()))
        {
            return Err(format!(
                "tokens `{}` and `{}` have the same secret; give each secret one name",
                other.name, token.name
            ));
        }
    }
    Ok(())
}

/// Compares two secrets in time that depends only on their lengths, not on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// The access rules: named tokens with roles, and whether reading needs a token at all.
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub tokens: Vec<Token>,
    pub public_read: bool,
}

/// The outcome of presenting (or not presenting) a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// No token given.
    Anonymous,
    /// A known token.
    Token { name: String, role: Role },
    /// A token was given but matches none.
    Invalid,
}

impl Access {
    pub fn check(&self, presented: Option<&str>) -> Grant {
        let Some(secret) = presented else {
            return Grant::Anonymous;
        };
        if secret.is_empty() {
            // A malformed Authorization header (see `presented_token`); no secret is empty.
            return Grant::Invalid;
        }
        // Every token is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for token in &self.tokens {
            if constant_time_eq(token.secret.as_bytes(), secret.as_bytes()) && found.is_none() {
                found = Some(token);
            }
        }
        match found {
            Some(token) => Grant::Token {
                name: token.name.clone(),
                role: token.role,
            },
            None => Grant::Invalid,
        }
    }

    /// The role a grant carries: `None` means no access at all.
    pub fn role(&self, grant: &Grant) -> Option<Role> {
        match grant {
            Grant::Token { role, .. } => Some(*role),
            Grant::Anonymous if self.public_read => Some(Role::Read),
            _ => None,
        }
    }
}

/// A fixed one-second window of writes: cheap, and exact enough for abuse control.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateWindow {
    start_ms: u64,
    count: u32,
}

impl RateWindow {
    /// Counts one write at `now_ms` if fewer than `per_second` were counted in the current
    /// window; `false` means refuse it (a refused write does not count).
    pub fn allow(&mut self, now_ms: u64, per_second: u32) -> bool {
        if now_ms >= self.start_ms.saturating_add(1000) {
            self.start_ms = now_ms;
            self.count = 0;
        }
        if self.count >= per_second {
            return false;
        }
        self.count += 1;
        true
    }
}

/// Write rate windows per token name, shared by every connection and request using the token.
/// Bounded by the number of configured tokens (names come only from a successful check).
#[derive(Debug, Default)]
pub struct TokenRates {
    windows: std::collections::HashMap<String, RateWindow>,
}

impl TokenRates {
    pub fn allow(&mut self, name: &str, now_ms: u64, per_second: u32) -> bool {
        if let Some(window) = self.windows.get_mut(name) {
            return window.allow(now_ms, per_second);
        }
        let mut window = RateWindow::default();
        let allowed = window.allow(now_ms, per_second);
        self.windows.insert(name.to_string(), window);
        allowed
    }
}

/// The token of a request: `Authorization: Bearer T`, else `?token=T`.
///
/// An `Authorization` header that is not `Bearer` with a non-empty token (`Basic ..`, an empty
/// `Bearer`, bytes that are not UTF-8) presents an empty secret, which matches no token: the
/// request is refused as an invalid token, not served as anonymous (PROTOCOL.md "Limits").
pub fn presented_token(req: &crate::http::Request) -> Option<String> {
    if req.header("authorization").is_some() {
        let bearer = req.header_str("authorization").and_then(|value| {
            let value = value.trim();
            let scheme = value.get(..7)?;
            let token = value.get(7..)?.trim();
            (scheme.eq_ignore_ascii_case("bearer ") && !token.is_empty()).then_some(token)
        });
        return Some(bearer.unwrap_or_default().to_string());
    }
    req.query_param("token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_roles() {
        let access = Access {
            tokens: vec![
                Token {
                    name: "erp".into(),
                    secret: "s3cret".into(),
                    role: Role::Write,
                },
                Token {
                    name: "shop".into(),
                    secret: "view".into(),
                    role: Role::Read,
                },
            ],
            public_read: true,
        };
        assert_eq!(
            access.role(&access.check(Some("s3cret"))),
            Some(Role::Write)
        );
        assert_eq!(access.role(&access.check(Some("view"))), Some(Role::Read));
        assert_eq!(access.check(Some("s3cre")), Grant::Invalid);
        assert_eq!(access.role(&access.check(None)), Some(Role::Read));
        let closed = Access {
            public_read: false,
            ..access
        };
        assert_eq!(closed.role(&closed.check(None)), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn rate_windows() {
        let mut window = RateWindow::default();
        assert!(window.allow(5, 2));
        assert!(window.allow(6, 2));
        assert!(!window.allow(999, 2));
        assert!(window.allow(1005, 2), "a new window starts a second later");
        let mut rates = TokenRates::default();
        assert!(rates.allow("erp", 0, 1));
        assert!(!rates.allow("erp", 10, 1));
        assert!(rates.allow("shop", 10, 1), "each token has its own window");
    }
}
