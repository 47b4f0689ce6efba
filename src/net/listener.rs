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

/// Descriptors kept free beyond connections: the listener, epoll, the waker, the signal pipe,
/// log and snapshot files, and a margin for the odd extra (a tokens file read on SIGHUP).
pub const FDS_RESERVED: u64 = 64;

/// Raises this process's open-file soft limit to its hard limit (servers hold one descriptor
/// per connection) and returns how many connections fit under it, `FDS_RESERVED` kept aside.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the `rlimit` struct we pass, which lives
    // on our stack for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    Ok(limit.rlim_cur.saturating_sub(FDS_RESERVED))
}
