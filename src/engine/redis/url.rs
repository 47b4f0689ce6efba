//! `redis://[user:password@]host:port[/db]` (PROTOCOL.md, the Redis engine).

use std::net::{SocketAddr, ToSocketAddrs};

/// Redis' own default port, used when the URL names none.
pub const DEFAULT_PORT: u16 = 6379;

#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

// The password never reaches a log line.
impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = if self.password.is_some() { "***@" } else { "" };
        write!(f, "redis://{auth}{}:{}/{}", self.host, self.port, self.db)
    }
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| {
            if url.starts_with("rediss://") {
                "rediss:// (TLS to Redis) is not supported yet; use redis://".to_string()
            } else {
                format!("`{url}` is not a redis://[user:password@]host:port[/db] URL")
            }
        })?;
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, path),
            None => (rest, ""),
        };
        let (credentials, hostport) = match authority.rsplit_once('@') {
            Some((credentials, hostport)) => (Some(credentials), hostport),
            None => (None, authority),
        };
        let (user, password) = match credentials {
            None => (None, None),
            Some(credentials) => match credentials.split_once(':') {
                Some((user, password)) => (
                    (!user.is_empty()).then(|| user.to_string()),
                    Some(password.to_string()),
                ),
                None => (None, Some(credentials.to_string())),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("bad IPv6 host in `{url}`"))?;
            (host, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(format!("no host in `{url}`"));
        }
        let port = match port {
            Some(port) => port
                .parse()
                .map_err(|_| format!("bad port `{port}` in the Redis URL"))?,
            None => DEFAULT_PORT,
        };
        let db = match path {
            "" => 0,
            db => db
                .parse()
                .map_err(|_| format!("bad database `{db}` in the Redis URL"))?,
        };
        Ok(RedisUrl {
            host: host.to_string(),
            port,
            user,
            password,
            db,
        })
    }

    /// Resolves the host (at start; a name that moves needs a restart, like most clients).
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve Redis host {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("Redis host {} has no address", self.host))
    }

    /// The commands that open a session: AUTH and SELECT, as needed.
    pub fn session_commands(&self) -> Vec<Vec<String>> {
        let mut commands = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = vec!["AUTH".to_string()];
            auth.extend(self.user.clone());
            auth.push(password.clone());
            commands.push(auth);
        }
        if self.db != 0 {
            commands.push(vec!["SELECT".to_string(), self.db.to_string()]);
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let url = RedisUrl::parse("redis://u:p@w@h.example:7000/3").unwrap();
        assert_eq!(
            (url.user.as_deref(), url.password.as_deref()),
            (Some("u"), Some("p@w"))
        );
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("h.example", 7000, 3)
        );
        let url = RedisUrl::parse("redis://127.0.0.1").unwrap();
        assert_eq!((url.port, url.db, url.password), (DEFAULT_PORT, 0, None));
        let url = RedisUrl::parse("redis://:secret@[::1]:6380").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 6380));
        assert_eq!(url.password.as_deref(), Some("secret"));
        assert!(!format!("{url:?}").contains("secret"));
        for bad in [
            "http://x",
            "rediss://x:1",
            "redis://",
            "redis://h:port",
            "redis://h:1/x",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
