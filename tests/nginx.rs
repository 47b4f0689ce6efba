//! stocksync behind a real nginx (Debian's package), configured as docs/DEPLOY.md says: TLS at
//! nginx with a certificate made at test time, HTTP/1.1 upstream with the Upgrade/Connection
//! headers, buffering off, `X-Forwarded-For` appended. Clients bind 127.0.0.x source addresses,
//! so nginx sees several client hosts and `--trusted-proxy` can be told apart from its absence.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::{self, SelfSigned};
use common::{free_port, Server, TOKEN};
use serde_json::json;

const NGINX_MISSING: &str =
    "nginx is needed for this test: apt-get install nginx (scripts/test.sh installs it as root)";

fn nginx_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("{NGINX_MISSING}");
}

/// A foreground nginx with its own prefix, config and logs in a temporary directory.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream: SocketAddr, cert: &SelfSigned) -> Nginx {
        let binary = nginx_binary();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = cert.write(dir.path());
        let port = free_port();
        let prefix = dir.path().display();
        // As root, nginx's workers would run as `nobody`, who cannot enter our temp dir.
        // SAFETY: geteuid has no preconditions and touches no memory.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root root;"
        } else {
            ""
        };
        let config = format!(
            r#"{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream stocksync {{
        server {upstream};
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://stocksync;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 75s;
            proxy_send_timeout 75s;
            proxy_buffering off;
        }}
    }}
}}
"#,
            cert = cert_path.display(),
            key = key_path.display(),
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&config_path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {NGINX_MISSING}", binary.display()));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut nginx = Nginx { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited with {status}: {}", nginx.error_log());
            }
            assert!(Instant::now() < deadline, "nginx did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_host(last: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

#[test]
fn a_wss_subscriber_and_an_https_write_through_nginx() {
    let cert = SelfSigned::new();
    let server = Server::start(&["--trusted-proxy", "127.0.0.1"]);
    let nginx = Nginx::start(server.addr, &cert);
    let config = cert.client_config();

    let mut subscriber = tls::wss(nginx.addr, client_host(2), &config, "/ws", &[]).unwrap();
    tls::send(
        &mut subscriber,
        json!({"type": "subscribe", "skus": ["shirt-red"]}),
    );
    assert_eq!(tls::recv(&mut subscriber)["type"], "subscribed");

    let auth = format!("Bearer {TOKEN}");
    let mut https = tls::tls_connect(nginx.addr, client_host(3), &config).unwrap();
    let (status, body) = tls::http(
        &mut https,
        "POST",
        "/stock/shirt-red",
        &[("Authorization", &auth), ("Idempotency-Key", "nginx-1")],
        Some(r#"{"action":"set","quantity":12}"#),
    );
    assert_eq!(status, 200, "{body}\n{}", nginx.error_log());
    let update = tls::recv(&mut subscriber);
    assert_eq!(update["type"], "stock_update");
    assert_eq!(update["stock"]["quantity"], 12);

    // The legacy path too (an upgrade at `/`, subscribed to `*`), and a write over wss.
    let mut legacy = tls::wss(nginx.addr, client_host(4), &config, "/", &[]).unwrap();
    let mut writer = tls::wss(
        nginx.addr,
        client_host(5),
        &config,
        &format!("/ws?token={TOKEN}"),
        &[],
    )
    .unwrap();
    tls::send(
        &mut writer,
        json!({"type": "stock_update", "stock": {"id": "shirt-red", "action": "decrease", "change": 2}}),
    );
    assert_eq!(tls::recv(&mut writer)["type"], "ack");
    assert_eq!(tls::recv(&mut legacy)["stock"]["quantity"], 10);
    assert_eq!(tls::recv(&mut subscriber)["stock"]["quantity"], 10);
}

/// Opens a wss connection through nginx from 127.0.0.`host`, retrying for a moment while the
/// server still counts a connection that just closed (the start-up probe).
fn open_from(nginx: &Nginx, config: &std::sync::Arc<rustls::ClientConfig>, host: u8) -> tls::Wss {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tls::wss(nginx.addr, client_host(host), config, "/ws", &[]) {
            Ok(ws) => return ws,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connection from 127.0.0.{host} refused: {e}"),
        }
    }
}

/// The HTTP status of a refused wss handshake through nginx.
fn refused_status(result: Result<tls::Wss, Box<tungstenite::Error>>) -> u16 {
    match result.map_err(|e| *e) {
        Ok(_) => panic!("the connection was accepted"),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

#[test]
fn per_ip_limits_see_the_client_address_only_with_trusted_proxy() {
    let cert = SelfSigned::new();
    let config = cert.client_config();

    // Trusted: each client host has its own two connections.
    let server = Server::start(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--max-connections-per-ip",
        "2",
    ]);
    let nginx = Nginx::start(server.addr, &cert);
    let _a1 = open_from(&nginx, &config, 2);
    let _a2 = open_from(&nginx, &config, 2);
    let third = tls::wss(nginx.addr, client_host(2), &config, "/ws", &[]);
    assert_eq!(refused_status(third), 429, "the third from one client host");
    // What the client claims in its own X-Forwarded-For is not believed: nginx appends the
    // address it saw, and only that last hop counts.
    let spoofed = tls::wss(
        nginx.addr,
        client_host(2),
        &config,
        "/ws",
        &[("X-Forwarded-For", "10.9.9.9")],
    );
    assert_eq!(refused_status(spoofed), 429, "a spoofed header got through");
    let _b1 = open_from(&nginx, &config, 3);
    let _b2 = open_from(&nginx, &config, 3);
    // HTTP requests are attributed the same way.
    let mut https = tls::tls_connect(nginx.addr, client_host(2), &config).unwrap();
    let (status, body) = tls::http(&mut https, "GET", "/healthz", &[], None);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limited"), "{body}");
    let mut https = tls::tls_connect(nginx.addr, client_host(4), &config).unwrap();
    let (status, _) = tls::http(&mut https, "GET", "/healthz", &[], None);
    assert_eq!(status, 200);
    drop((nginx, server));

    // Not trusted: every connection is nginx's own (127.0.0.1), and the header is ignored,
    // so two clients on different hosts already fill the limit.
    let server = Server::start(&["--max-connections-per-ip", "2"]);
    let nginx = Nginx::start(server.addr, &cert);
    let _c1 = open_from(&nginx, &config, 2);
    let _c2 = open_from(&nginx, &config, 3);
    let other_host = tls::wss(nginx.addr, client_host(4), &config, "/ws", &[]);
    // stocksync closes nginx's upstream connection at accept: nginx answers 502.
    assert_eq!(refused_status(other_host), 502);
}
