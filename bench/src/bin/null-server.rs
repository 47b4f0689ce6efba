//! null-server: the machine's limit for stocksync's design. One mio loop, a minimal upgrade, and
//! for every `stock_update` text frame received from any connection, that payload framed once and
//! written to every connection; the updates of one loop turn are coalesced into one write per
//! connection. No JSON, no state, no subscriptions: whatever a real server does beyond this is
//! its overhead.
//!
//! usage: null-server [--addr 127.0.0.1:9001]

use base64::Engine;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use sha1::{Digest, Sha1};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

const LISTENER: Token = Token(usize::MAX);
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// A connection with more unsent bytes than this is closed (the load tool keeps queues short).
const OUT_BYTES_MAX: usize = 16 << 20;
/// Request heads longer than this are refused.
const HEAD_BYTES_MAX: usize = 8192;
/// RFC 6455 §1.3.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

struct Conn {
    stream: TcpStream,
    upgraded: bool,
    /// Partial request head or partial frame.
    pending_in: Vec<u8>,
    /// Bytes the socket did not take yet.
    out: Vec<u8>,
    closing: bool,
}

fn main() {
    let mut addr: SocketAddr = "127.0.0.1:9001".parse().expect("constant address");
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [flag, value] if flag == "--addr" => match value.parse() {
            Ok(parsed) => addr = parsed,
            Err(_) => fail(&format!("bad --addr `{value}`")),
        },
        _ => fail("usage: null-server [--addr 127.0.0.1:9001]"),
    }
    if let Err(error) = serve(addr) {
        fail(&format!("null-server: {error}"));
    }
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2);
}

fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    eprintln!("null-server listening on {addr}");
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    // Server frames of every stock_update read in this loop turn.
    let mut batch: Vec<u8> = Vec::new();
    let mut to_close: Vec<usize> = Vec::new();
    loop {
        if let Err(error) = poll.poll(&mut events, None) {
            if error.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&listener, &poll, &mut conns, &mut free);
                continue;
            }
            let index = event.token().0;
            let Some(Some(conn)) = conns.get_mut(index) else {
                continue;
            };
            if event.is_writable() && !conn.out.is_empty() && flush(conn).is_err() {
                conn.closing = true;
            }
            if (event.is_readable() || event.is_read_closed()) && !conn.closing {
                read_all(conn, &mut buf, &mut batch);
            }
            if conn.closing {
                to_close.push(index);
            }
        }
        if !batch.is_empty() {
            for (index, slot) in conns.iter_mut().enumerate() {
                let Some(conn) = slot else { continue };
                if !conn.upgraded || conn.closing {
                    continue;
                }
                if conn.out.is_empty() {
                    match write_some(&mut conn.stream, &batch) {
                        Ok(written) if written == batch.len() => continue,
                        Ok(written) => conn.out.extend_from_slice(&batch[written..]),
                        Err(_) => {
                            conn.closing = true;
                            to_close.push(index);
                            continue;
                        }
                    }
                } else {
                    conn.out.extend_from_slice(&batch);
                }
                if conn.out.len() > OUT_BYTES_MAX {
                    conn.closing = true;
                    to_close.push(index);
                }
            }
            batch.clear();
        }
        for index in to_close.drain(..) {
            if let Some(mut conn) = conns.get_mut(index).and_then(Option::take) {
                let _ = poll.registry().deregister(&mut conn.stream);
                free.push(index);
            }
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
) {
    loop {
        let (mut stream, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == ErrorKind::WouldBlock => return,
            Err(error) => {
                // EMFILE and friends: report and let the next readiness retry.
                eprintln!("accept: {error}");
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let index = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        let interest = Interest::READABLE | Interest::WRITABLE;
        if poll
            .registry()
            .register(&mut stream, Token(index), interest)
            .is_err()
        {
            free.push(index);
            continue;
        }
        conns[index] = Some(Conn {
            stream,
            upgraded: false,
            pending_in: Vec::new(),
            out: Vec::new(),
            closing: false,
        });
    }
}

/// Reads until the socket is drained (edge-triggered), upgrading and collecting updates.
fn read_all(conn: &mut Conn, buf: &mut Vec<u8>, batch: &mut Vec<u8>) {
    loop {
        let kept = conn.pending_in.len();
        if buf.len() < kept + READ_BUFFER_BYTES {
            buf.resize(kept + READ_BUFFER_BYTES, 0);
        }
        buf[..kept].copy_from_slice(&conn.pending_in);
        conn.pending_in.clear();
        let read = match conn.stream.read(&mut buf[kept..]) {
            Ok(0) => {
                conn.closing = true;
                return;
            }
            Ok(n) => n,
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                conn.pending_in.extend_from_slice(&buf[..kept]);
                return;
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {
                conn.pending_in.extend_from_slice(&buf[..kept]);
                continue;
            }
            Err(_) => {
                conn.closing = true;
                return;
            }
        };
        let filled = kept + read;
        let mut at = 0;
        if !conn.upgraded {
            let Some(end) = find(&buf[..filled], b"\r\n\r\n") else {
                if filled > HEAD_BYTES_MAX {
                    conn.closing = true;
                    return;
                }
                conn.pending_in.extend_from_slice(&buf[..filled]);
                continue;
            };
            if !upgrade(conn, &buf[..end]) {
                conn.closing = true;
                return;
            }
            at = end + 4;
        }
        at += read_frames(conn, &mut buf[at..filled], batch);
        if conn.closing {
            return;
        }
        conn.pending_in.extend_from_slice(&buf[at..filled]);
        if read < buf.len() - kept {
            return;
        }
    }
}

/// Answers the upgrade request in `head` with 101 (RFC 6455 §4.2.2).
fn upgrade(conn: &mut Conn, head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let key = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    });
    let Some(key) = key else { return false };
    let mut hasher = Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(ACCEPT_GUID.as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(hasher.finalize());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    conn.upgraded = true;
    conn.out.extend_from_slice(response.as_bytes());
    flush(conn).is_ok()
}

/// Consumes the complete client frames at the start of `data`; returns the bytes used.
fn read_frames(conn: &mut Conn, data: &mut [u8], batch: &mut Vec<u8>) -> usize {
    let mut at = 0;
    loop {
        let rest = &mut data[at..];
        if rest.len() < 2 {
            return at;
        }
        let opcode = rest[0] & 0x0f;
        let masked = rest[1] & 0x80 != 0;
        let (len, mut header) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&rest[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(bytes)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => return at,
            short => (usize::from(short), 2),
        };
        let mut mask = [0u8; 4];
        if masked {
            if rest.len() < header + 4 {
                return at;
            }
            mask.copy_from_slice(&rest[header..header + 4]);
            header += 4;
        }
        if len > OUT_BYTES_MAX {
            conn.closing = true;
            return at;
        }
        if rest.len() < header + len {
            return at;
        }
        let payload = &mut rest[header..header + len];
        if masked {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i & 3];
            }
        }
        match opcode {
            0x1 if find(&payload[..payload.len().min(40)], b"\"stock_update\"").is_some() => {
                batch.push(0x81);
                if len < 126 {
                    batch.push(len as u8);
                } else if len <= usize::from(u16::MAX) {
                    batch.push(126);
                    batch.extend_from_slice(&(len as u16).to_be_bytes());
                } else {
                    batch.push(127);
                    batch.extend_from_slice(&(len as u64).to_be_bytes());
                }
                batch.extend_from_slice(payload);
            }
            0x8 => {
                conn.closing = true;
                return at + header + len;
            }
            0x9 if len < 126 => {
                conn.out.push(0x8A);
                conn.out.push(len as u8);
                conn.out.extend_from_slice(payload);
                if flush(conn).is_err() {
                    conn.closing = true;
                }
            }
            // Subscribe messages and everything else need no answer from a null server.
            _ => {}
        }
        at += header + len;
    }
}

fn write_some(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(error) if error.kind() == ErrorKind::WouldBlock => break,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(written)
}

fn flush(conn: &mut Conn) -> std::io::Result<()> {
    let written = write_some(&mut conn.stream, &conn.out)?;
    conn.out.drain(..written);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
