//! The listening socket: SO_REUSEPORT so N independent processes share one port and the kernel
//! balances new connections between them (each process binds its own socket, as Workerman's
//! `reusePort` children do).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel accept backlog. Linux clamps it to net.core.somaxconn.
pub const LISTEN_BACKLOG: i32 = 4096;

pub fn bind(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // SO_REUSEPORT: several processes may bind the same address; the kernel hashes each new
    // connection to one of them.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}
