//! `--flag value` parsing without a dependency: every scenario names the flags it knows, so a
//! typo is an error instead of a silently ignored setting.

use std::collections::HashMap;
use std::str::FromStr;

pub struct Args {
    values: HashMap<String, String>,
}

impl Args {
    /// Parses `--name value` pairs (and `--name=value`); `switches` take no value.
    pub fn parse(raw: &[String], known: &[&str], switches: &[&str]) -> Result<Args, String> {
        let mut values = HashMap::new();
        let mut iter = raw.iter();
        while let Some(arg) = iter.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument `{arg}`"));
            };
            let (name, inline) = match name.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (name, None),
            };
            if switches.contains(&name) {
                values.insert(name.to_string(), "true".to_string());
                continue;
            }
            if !known.contains(&name) {
                return Err(format!(
                    "unknown flag --{name} (known: --{})",
                    known.join(", --")
                ));
            }
            let value = match inline {
                Some(value) => value,
                None => iter
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("--{name} needs a value"))?,
            };
            values.insert(name.to_string(), value);
        }
        Ok(Args { values })
    }

    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.values.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| format!("--{name}: cannot parse `{text}`")),
        }
    }

    pub fn opt<T: FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        match self.values.get(name) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("--{name}: cannot parse `{text}`")),
        }
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.values
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    pub fn switch(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// A comma-separated list, e.g. `--server-pid 12,13,14`.
    pub fn list<T: FromStr>(&self, name: &str) -> Result<Vec<T>, String> {
        match self.values.get(name) {
            None => Ok(Vec::new()),
            Some(text) => text
                .split(',')
                .filter(|part| !part.is_empty())
                .map(|part| {
                    part.trim()
                        .parse()
                        .map_err(|_| format!("--{name}: cannot parse `{part}`"))
                })
                .collect(),
        }
    }
}
