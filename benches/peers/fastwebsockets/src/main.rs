//! Comparison peer: fastwebsockets (hyper upgrade) on a single-threaded tokio runtime. Every
//! `stock_update` text frame from any connection is re-broadcast to every connection. Written the
//! way a competent user would: the payload is frozen into shared `Bytes` once, sent on one
//! broadcast channel, and each connection's writer task writes everything queued into a
//! `BufWriter` and flushes once per batch (one syscall per batch instead of one per frame).
//!
//! usage: peer-fastwebsockets [PORT]   (listens on 127.0.0.1:PORT, default 9105)

use bytes::Bytes;
use fastwebsockets::{upgrade, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::io::BufWriter;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// Messages a connection may fall behind by before it skips ahead (like a conflating server).
const CHANNEL_CAPACITY: usize = 65_536;
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

fn main() -> std::io::Result<()> {
    let port = std::env::args().nth(1).unwrap_or_else(|| "9105".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(format!("127.0.0.1:{port}")).await?;
        eprintln!("fastwebsockets peer listening on 127.0.0.1:{port}");
        let (sender, _) = broadcast::channel::<Bytes>(CHANNEL_CAPACITY);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let sender = sender.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = service_fn(move |request| upgrade_request(request, sender.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(io, service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

async fn upgrade_request(
    mut request: Request<Incoming>,
    sender: broadcast::Sender<Bytes>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, upgrade) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        let _ = serve(upgrade, sender).await;
    });
    Ok(response)
}

async fn serve(
    upgrade: upgrade::UpgradeFut,
    sender: broadcast::Sender<Bytes>,
) -> Result<(), WebSocketError> {
    let websocket = upgrade.await?;
    let (mut reader, mut writer) = websocket.split(|stream| {
        let (read, write) = tokio::io::split(stream);
        (read, BufWriter::with_capacity(WRITE_BUFFER_BYTES, write))
    });
    let mut receiver = sender.subscribe();
    let write_task = tokio::spawn(async move {
        loop {
            let payload = match receiver.recv().await {
                Ok(payload) => payload,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if writer
                .write_frame(Frame::text(Payload::Borrowed(&payload)))
                .await
                .is_err()
            {
                return;
            }
            loop {
                match receiver.try_recv() {
                    Ok(payload) => {
                        if writer
                            .write_frame(Frame::text(Payload::Borrowed(&payload)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    });
    loop {
        // Pongs and close replies are dropped: the load tool never pings and closes by FIN.
        let frame = reader
            .read_frame::<_, WebSocketError>(&mut |_| async { Ok(()) })
            .await;
        let Ok(frame) = frame else { break };
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text => {
                let payload = match frame.payload {
                    Payload::Bytes(bytes) => bytes.freeze(),
                    other => Bytes::copy_from_slice(&other),
                };
                // The type is the first field of a stock_update (PROTOCOL.md benchmark contract).
                if !contains(&payload[..payload.len().min(40)], b"\"stock_update\"") {
                    continue;
                }
                let _ = sender.send(payload);
            }
            _ => {}
        }
    }
    write_task.abort();
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
