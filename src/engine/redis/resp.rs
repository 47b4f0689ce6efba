//! RESP2, the Redis protocol (<https://redis.io/docs/latest/develop/reference/protocol-spec/>):
//! commands out as arrays of bulk strings, replies in, parsed incrementally.
//!
//! [`parse`] returns `Ok(None)` on incomplete input and consumes nothing, so a caller keeps
//! appending bytes and tries again. Every length is bounded ([`BULK_BYTES_MAX`],
//! [`ARRAY_LEN_MAX`], [`DEPTH_MAX`]): a broken or hostile peer gets an error, never an
//! allocation of the size it names.

use std::fmt;

/// Largest bulk string accepted in a reply (a catch-up chunk of states is the largest we ask
/// for; see `super::CATCH_UP_CHUNK_SKUS`).
pub const BULK_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most elements of one reply array.
pub const ARRAY_LEN_MAX: usize = 1 << 20;
/// Deepest nesting of arrays (our replies nest two deep).
pub const DEPTH_MAX: usize = 8;
/// Longest line (a simple string or an error, whose text Redis may make long: a failing
/// script's message quotes the script's position and error).
pub const LINE_BYTES_MAX: usize = 64 * 1024;

/// One reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
}

impl Value {
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(b) => Some(b),
            Value::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// An integer reply, or a bulk string holding one (Lua numbers come back as integers).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            other => other.as_str().and_then(|s| s.parse().ok()),
        }
    }
}

/// Why a reply could not be parsed: the link is out of step and must be dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RespError {
    UnknownType(u8),
    BadLength,
    BadInteger,
    TooLarge { size: usize, max: usize },
    TooDeep,
    MissingCrlf,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::UnknownType(b) => write!(f, "unknown RESP type byte 0x{b:02x}"),
            RespError::BadLength => write!(f, "bad RESP length"),
            RespError::BadInteger => write!(f, "bad RESP integer"),
            RespError::TooLarge { size, max } => {
                write!(f, "RESP value of {size} over the limit of {max}")
            }
            RespError::TooDeep => write!(f, "RESP arrays nested more than {DEPTH_MAX} deep"),
            RespError::MissingCrlf => write!(f, "RESP value not ended by CRLF"),
        }
    }
}

impl std::error::Error for RespError {}

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    push_header(out, b'*', args.len());
    for arg in args {
        let arg = arg.as_ref();
        push_header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    let mut digits = [0u8; 20];
    let mut n = len;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Parses one reply from the front of `buf`: `Ok(Some((value, consumed)))`, or `Ok(None)` if
/// `buf` does not hold a whole reply yet.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, RespError> {
    // A large reply arrives in many reads: first check, without allocating, that it is whole,
    // so the values are built once instead of once per read.
    let mut at = 0;
    if parse_at(buf, &mut at, 0, false)?.is_none() {
        return Ok(None);
    }
    let mut at = 0;
    match parse_at(buf, &mut at, 0, true)? {
        Some(value) => Ok(Some((value, at))),
        None => Ok(None),
    }
}

/// Parses (with `build`) or only measures (without: every value comes back as `Nil`) one
/// reply at `*at`.
fn parse_at(
    buf: &[u8],
    at: &mut usize,
    depth: usize,
    build: bool,
) -> Result<Option<Value>, RespError> {
    if depth > DEPTH_MAX {
        return Err(RespError::TooDeep);
    }
    let Some(&kind) = buf.get(*at) else {
        return Ok(None);
    };
    let Some(line_end) = find_crlf(buf, *at + 1) else {
        // A line that never ends is garbage, not a slow peer.
        if buf.len() - *at > LINE_BYTES_MAX {
            return Err(RespError::MissingCrlf);
        }
        return Ok(None);
    };
    let line = &buf[*at + 1..line_end];
    let after_line = line_end + 2;
    match kind {
        b'+' | b'-' => {
            *at = after_line;
            if !build {
                return Ok(Some(Value::Nil));
            }
            let text = String::from_utf8_lossy(line).into_owned();
            Ok(Some(if kind == b'+' {
                Value::Simple(text)
            } else {
                Value::Error(text)
            }))
        }
        b':' => {
            let n = parse_int(line)?;
            *at = after_line;
            Ok(Some(Value::Int(n)))
        }
        b'$' => {
            let len = parse_int(line)?;
            if len == -1 {
                *at = after_line;
                return Ok(Some(Value::Nil));
            }
            let len = usize::try_from(len).map_err(|_| RespError::BadLength)?;
            if len > BULK_BYTES_MAX {
                return Err(RespError::TooLarge {
                    size: len,
                    max: BULK_BYTES_MAX,
                });
            }
            let end = after_line + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::MissingCrlf);
            }
            *at = end + 2;
            if !build {
                return Ok(Some(Value::Nil));
            }
            Ok(Some(Value::Bulk(buf[after_line..end].to_vec())))
        }
        b'*' => {
            let len = parse_int(line)?;
            if len == -1 {
                *at = after_line;
                return Ok(Some(Value::Nil));
            }
            let len = usize::try_from(len).map_err(|_| RespError::BadLength)?;
            if len > ARRAY_LEN_MAX {
                return Err(RespError::TooLarge {
                    size: len,
                    max: ARRAY_LEN_MAX,
                });
            }
            let mut cursor = after_line;
            // Capacity bounded by what the buffer could hold, not by what the peer claims.
            let capacity = if build { len.min(buf.len() / 3 + 1) } else { 0 };
            let mut items = Vec::with_capacity(capacity);
            for _ in 0..len {
                match parse_at(buf, &mut cursor, depth + 1, build)? {
                    Some(item) if build => items.push(item),
                    Some(_) => {}
                    None => return Ok(None),
                }
            }
            *at = cursor;
            if !build {
                return Ok(Some(Value::Nil));
            }
            Ok(Some(Value::Array(items)))
        }
        other => Err(RespError::UnknownType(other)),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_int(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError::BadInteger)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = Vec::new();
        encode(&mut out, &["SET", "k", ""]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_every_type() {
        let cases: &[(&[u8], Value)] = &[
            (b"+OK\r\n", Value::Simple("OK".into())),
            (b"-ERR x\r\n", Value::Error("ERR x".into())),
            (b":-42\r\n", Value::Int(-42)),
            (b"$3\r\nabc\r\n", Value::Bulk(b"abc".to_vec())),
            (b"$0\r\n\r\n", Value::Bulk(Vec::new())),
            (b"$-1\r\n", Value::Nil),
            (b"*-1\r\n", Value::Nil),
            (
                b"*2\r\n:1\r\n*1\r\n$1\r\nx\r\n",
                Value::Array(vec![
                    Value::Int(1),
                    Value::Array(vec![Value::Bulk(b"x".to_vec())]),
                ]),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse(input),
                Ok(Some((expected.clone(), input.len()))),
                "{input:?}"
            );
            // Split at every byte: a prefix is incomplete and consumes nothing.
            for cut in 0..input.len() {
                assert_eq!(parse(&input[..cut]), Ok(None), "{input:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn refuses_garbage_and_huge_lengths() {
        assert_eq!(parse(b"?x\r\n"), Err(RespError::UnknownType(b'?')));
        assert_eq!(parse(b":abc\r\n"), Err(RespError::BadInteger));
        assert_eq!(parse(b"$-2\r\n"), Err(RespError::BadLength));
        assert!(matches!(
            parse(b"$999999999999\r\n"),
            Err(RespError::TooLarge { .. })
        ));
        assert!(matches!(
            parse(b"*99999999\r\n"),
            Err(RespError::TooLarge { .. })
        ));
        assert_eq!(parse(b"$1\r\nabX\r\n"), Err(RespError::MissingCrlf));
        assert_eq!(parse(&[b'+'; 100]), Ok(None), "a long line may still end");
        assert_eq!(
            parse(&vec![b'+'; LINE_BYTES_MAX + 2]),
            Err(RespError::MissingCrlf)
        );
        let deep = "*1\r\n".repeat(DEPTH_MAX + 2);
        assert_eq!(parse(deep.as_bytes()), Err(RespError::TooDeep));
    }

    #[test]
    fn parses_replies_back_to_back() {
        let buf = b"+OK\r\n:5\r\n";
        let (first, n) = parse(buf).unwrap().unwrap();
        assert_eq!(first, Value::Simple("OK".into()));
        assert_eq!(parse(&buf[n..]).unwrap().unwrap().0, Value::Int(5));
    }
}
