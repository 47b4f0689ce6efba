//! Comparison peer: tokio + tokio-tungstenite on a single-threaded runtime (one core, like
//! stocksync's loop). Every `stock_update` text message from any connection is re-broadcast to
//! every connection. Written the way a competent user would: one broadcast channel carrying the
//! received `Message` (its payload is shared `Bytes`, so a clone is a refcount bump), one writer
//! task per connection that `feed`s everything queued and flushes once per batch.
//!
//! usage: peer-tokio-tungstenite [PORT]   (listens on 127.0.0.1:PORT, default 9103)

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;

/// Messages a connection may fall behind by before it skips ahead (like a conflating server).
const CHANNEL_CAPACITY: usize = 65_536;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port = std::env::args().nth(1).unwrap_or_else(|| "9103".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    eprintln!("tokio-tungstenite peer listening on 127.0.0.1:{port}");
    let (sender, _) = broadcast::channel::<Message>(CHANNEL_CAPACITY);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, sender.clone()));
    }
}

async fn serve(stream: TcpStream, sender: broadcast::Sender<Message>) {
    let Ok(websocket) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut source) = websocket.split();
    let mut receiver = sender.subscribe();
    let writer = tokio::spawn(async move {
        loop {
            let message = match receiver.recv().await {
                Ok(message) => message,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if sink.feed(message).await.is_err() {
                return;
            }
            // Everything already queued goes out with one flush.
            loop {
                match receiver.try_recv() {
                    Ok(message) => {
                        if sink.feed(message).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(message)) = source.next().await {
        match &message {
            Message::Text(text) if text.as_str().contains("\"stock_update\"") => {
                let _ = sender.send(message);
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    writer.abort();
}
