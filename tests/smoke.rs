//! The server starts, accepts a subscriber and a writer, and broadcasts a change.

mod common;

use common::*;
use serde_json::json;

#[test]
fn a_write_reaches_a_subscriber() {
    let server = Server::start(&[]);
    let mut sub = subscribed_client(&server, &["sku-1"]);
    let mut writer = server.writer();
    let ack = request(
        &mut writer,
        json!({"type":"stock_update","id":1,"stock":{"id":"sku-1","action":"set","quantity":5}}),
    );
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["id"], 1);
    let update = recv(&mut sub);
    assert_eq!(update["type"], "stock_update");
    assert_eq!(update["stock"]["quantity"], 5);
    assert_eq!(update["stock"]["version"], 1);
}
