//! `GET /metrics` against the real server: the exposition parses (prometheus-parse plus a strict
//! line check of our own, since that parser is lenient), names follow Prometheus conventions,
//! and the counters move as clients act.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::time::Duration;

use common::*;
use serde_json::json;

fn scrape_text(server: &Server) -> String {
    let response = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
        .get(&server.http("/metrics"))
        .call()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.content_type() == "text/plain",
        "{}",
        response.content_type()
    );
    let mut text = String::new();
    response.into_reader().read_to_string(&mut text).unwrap();
    text
}

/// Every series (`name{labels}` exactly as written) and its value, after checking the text
/// format line by line: HELP and TYPE precede each family's samples, names and label names are
/// legal, values are numbers, no series appears twice.
fn strict_parse(text: &str) -> BTreeMap<String, f64> {
    let legal_name = |name: &str| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut series = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has text");
            assert!(legal_name(name) && !help.is_empty(), "{line}");
            assert!(helped.insert(name.to_string()), "HELP twice: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "stray {line:?}");
        let (key, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let name = key.split('{').next().unwrap();
        assert!(legal_name(name), "{line}");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("{line}"));
                for pair in inner.split(',') {
                    let (label, quoted) = pair.split_once('=').unwrap();
                    assert!(legal_name(label), "{line}");
                    assert!(
                        quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                        "{line}"
                    );
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|base| typed.get(*base).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        let kind = typed
            .get(family)
            .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
        // Conventions: counters end in _total, nothing else does; units are base units.
        assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        for unit in ["_ms", "_milliseconds", "_kb", "_mb", "_minutes"] {
            assert!(!name.contains(unit), "non-base unit: {line}");
        }
        assert!(name.starts_with("stocksync_"), "{line}");
        assert!(
            series.insert(key.to_string(), value).is_none(),
            "series twice: {line}"
        );
    }
    series
}

fn value(series: &BTreeMap<String, f64>, key: &str) -> f64 {
    series.get(key).copied().unwrap_or(0.0)
}

#[test]
fn metrics_parse_and_follow_conventions() {
    let server = Server::start(&[]);
    // Something in every family first, so labelled series exist.
    let mut writer = server.writer();
    request(
        &mut writer,
        json!({"type":"stock_update","stock":{"id":"m","action":"set","quantity":1}}),
    );
    let text = scrape_text(&server);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text format");
    assert!(scrape.samples.len() > 20);
    for sample in &scrape.samples {
        // The parser reports a histogram's _sum and _count as samples of their own.
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|s| sample.metric.strip_suffix(s))
            .filter(|base| scrape.docs.contains_key(*base))
            .unwrap_or(&sample.metric);
        assert!(
            scrape.docs.contains_key(family),
            "{} has no HELP",
            sample.metric
        );
        if let prometheus_parse::Value::Histogram(buckets) = &sample.value {
            // Latency histograms, in seconds: the ack latency, the hold expiry lag, and the
            // Redis engine's own.
            assert!(
                sample.metric == "stocksync_ack_latency_seconds"
                    || sample.metric == "stocksync_hold_expiry_lag_seconds"
                    || (sample.metric.starts_with("stocksync_redis_")
                        && sample.metric.ends_with("_seconds")),
                "unexpected histogram {}",
                sample.metric
            );
            assert!(buckets.windows(2).all(|w| w[0].less_than < w[1].less_than));
            assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
            assert!(buckets.last().unwrap().less_than.is_infinite());
        }
    }
    let series = strict_parse(&text);
    for family in [
        "stocksync_connections_open",
        "stocksync_connections_accepted_total",
        "stocksync_connections_closed_total",
        "stocksync_messages_in_total",
        "stocksync_bytes_in_total",
        "stocksync_bytes_out_total",
        "stocksync_frames_broadcast_total",
        "stocksync_ack_latency_seconds_count",
        "stocksync_ack_latency_seconds_sum",
        "stocksync_uptime_seconds",
    ] {
        assert!(series.contains_key(family), "{family} missing");
    }
    for labelled in [
        "stocksync_connections_rejected_total{reason=\"per_ip\"}",
        "stocksync_slow_consumer_actions_total{action=\"conflated\"}",
        "stocksync_slow_consumer_actions_total{action=\"closed\"}",
        "stocksync_limit_hits_total{limit=\"idle_timeout\"}",
        "stocksync_limit_hits_total{limit=\"write_rate_token\"}",
        "stocksync_ops_total{action=\"set\",result=\"ok\"}",
    ] {
        assert!(series.contains_key(labelled), "{labelled} missing");
    }
}

#[test]
fn counters_move_as_clients_act() {
    let server = Server::start(&[]);
    let before = strict_parse(&scrape_text(&server));

    let mut sub = server.ws("/ws");
    assert_eq!(
        request(&mut sub, json!({"type":"subscribe","skus":["*"]}))["type"],
        "subscribed"
    );
    let mut writer = server.writer();
    for quantity in [5, 6] {
        let ack = request(
            &mut writer,
            json!({"type":"stock_update","stock":{"id":"c","action":"set","quantity":quantity}}),
        );
        assert_eq!(ack["type"], "ack");
    }
    let refused = request(
        &mut writer,
        json!({"type":"stock_update","stock":{"id":"c","action":"decrease","change":99}}),
    );
    assert_eq!(refused["code"], "insufficient_stock");
    let ack = request(
        &mut writer,
        json!({"type":"stock_batch","ops":[
            {"id":"c","action":"reserve","change":1},
            {"id":"d","action":"set","quantity":1}]}),
    );
    assert_eq!(ack["type"], "ack");
    let status = ureq::post(&server.http("/stock/c"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_string(r#"{"action":"increase","change":1}"#)
        .unwrap()
        .status();
    assert_eq!(status, 200);
    // The subscriber saw five updates: c, c, (c, d), c.
    for _ in 0..5 {
        assert_eq!(recv(&mut sub)["type"], "stock_update");
    }
    sub.close(None).unwrap();
    while sub.read().is_ok() {}

    let after = strict_parse(&scrape_text(&server));
    let delta = |key: &str| value(&after, key) - value(&before, key);
    // Connections: the subscriber, the writer, the HTTP client (and the scrapes).
    assert!(delta("stocksync_connections_accepted_total") >= 4.0);
    assert!(delta("stocksync_connections_closed_total") >= 1.0);
    assert!(value(&after, "stocksync_connections_open") >= 2.0);
    assert_eq!(delta("stocksync_websocket_upgrades_total"), 2.0);
    // Messages: subscribe, 2 sets, the refused decrease, the batch, the close.
    assert!(delta("stocksync_messages_in_total") >= 5.0);
    assert!(delta("stocksync_bytes_in_total") > 0.0);
    assert!(delta("stocksync_bytes_out_total") > 0.0);
    assert!(delta("stocksync_http_requests_total") >= 2.0);
    // Ops by action and result.
    assert_eq!(
        delta("stocksync_ops_total{action=\"set\",result=\"ok\"}"),
        3.0
    );
    assert_eq!(
        delta("stocksync_ops_total{action=\"reserve\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        delta("stocksync_ops_total{action=\"increase\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        delta("stocksync_ops_total{action=\"decrease\",result=\"insufficient_stock\"}"),
        1.0
    );
    assert_eq!(
        delta("stocksync_errors_total{code=\"insufficient_stock\"}"),
        1.0
    );
    // Five changed SKU states were framed once each; four changes were acked.
    assert_eq!(delta("stocksync_frames_broadcast_total"), 5.0);
    assert_eq!(delta("stocksync_broadcast_deliveries_total"), 5.0);
    assert_eq!(delta("stocksync_changes_total"), 4.0);
    assert_eq!(delta("stocksync_ack_latency_seconds_count"), 4.0);
    assert_eq!(
        delta("stocksync_ack_latency_seconds_bucket{le=\"+Inf\"}"),
        4.0
    );
    assert!(delta("stocksync_ack_latency_seconds_sum") > 0.0);
    assert_eq!(value(&after, "stocksync_skus_known"), 2.0);
}

#[test]
fn limit_hits_are_counted_by_limit() {
    let server = Server::start(&[
        "--write-rate",
        "1",
        "--max-subscriptions",
        "2",
        "--max-connections-per-ip",
        "3",
    ]);
    let before = strict_parse(&scrape_text(&server));
    let mut writer = server.writer();
    let mut refused = 0;
    for i in 0..5 {
        let reply = request(
            &mut writer,
            json!({"type":"stock_update","stock":{"id":"l","action":"set","quantity":i}}),
        );
        if reply["code"] == "rate_limited" {
            refused += 1;
        }
    }
    assert!(refused >= 3, "at most two windows pass in a quick loop");
    let reply = request(
        &mut writer,
        json!({"type":"subscribe","skus":["a","b","c"]}),
    );
    assert_eq!(reply["code"], "too_large");
    // Two more open connections reach the per-IP limit of 3 (with the writer); the 4th is
    // refused at accept. The scrape itself needs a slot, so it happens after they close.
    let a = raw(server.addr);
    let b = raw(server.addr);
    let mut refused_conn = raw(server.addr);
    assert!(read_to_close(&mut refused_conn).is_empty());
    drop((a, b, writer));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        if let Ok(response) = ureq::get(&server.http("/metrics")).call() {
            break strict_parse(&response.into_string().unwrap());
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    };
    let delta = |key: &str| value(&after, key) - value(&before, key);
    assert_eq!(
        delta("stocksync_limit_hits_total{limit=\"write_rate_connection\"}"),
        refused as f64
    );
    assert_eq!(delta("stocksync_rate_limited_total"), refused as f64);
    assert_eq!(
        delta("stocksync_limit_hits_total{limit=\"subscriptions_max\"}"),
        1.0
    );
    assert!(delta("stocksync_limit_hits_total{limit=\"connections_per_ip_max\"}") >= 1.0);
}

/// A message costs one `recv`: reading stops at a short read instead of going on until the
/// socket says `EAGAIN` (which doubled the reads of a single write). The loop's own counters
/// move too.
#[test]
fn one_read_per_message() {
    let server = Server::start(&[]);
    let mut writer = server.writer();
    let update = |op| serde_json::json!({"type": "stock_update", "stock": op});
    request(&mut writer, update(stock_op("r-0", "set", 100)));
    let before = strict_parse(&scrape_text(&server));
    const WRITES: usize = 50;
    for _ in 0..WRITES {
        let reply = request(&mut writer, update(stock_op("r-0", "increase", 1)));
        assert_eq!(reply["type"], "ack", "{reply}");
    }
    let after = strict_parse(&scrape_text(&server));
    let delta = |key: &str| value(&after, key) - value(&before, key);
    let reads = delta("stocksync_socket_reads_total");
    // The writes, plus the scrapes' own requests and closes.
    assert!(
        (WRITES as f64..=WRITES as f64 + 8.0).contains(&reads),
        "{reads} reads for {WRITES} messages"
    );
    assert!(delta("stocksync_loop_iterations_total") >= WRITES as f64);
    assert!(after.contains_key("stocksync_loop_wakeups_total"));
}
