// Shared helpers for the JavaScript tests: the real stocksync binary, HTTP calls, a second
// origin to load pages from, and headless Chromium. Run through `cargo test --test browser`,
// which sets STOCKSYNC_BIN to the binary it built.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const TOKEN = "test-write-token";
export const CHROMIUM = "/usr/bin/chromium";
const require = createRequire(import.meta.url);
// How long a server may take to print its address (a debug build on a busy machine).
const START_TIMEOUT_MS = 20000;

export function binary() {
  const path = process.env.STOCKSYNC_BIN;
  if (!path || !existsSync(path)) {
    throw new Error("STOCKSYNC_BIN must name the stocksync binary (run: cargo test --test browser)");
  }
  return path;
}

/** The `ws` package: Node 20 has no WebSocket without a flag. */
export function WebSocketClass() {
  try {
    return require("ws");
  } catch (e) {
    throw new Error("the ws package is missing: run `npm ci` at the repository root");
  }
}

/** Starts stocksync on `listen` (default a free port) with a write token; resolves once it
 *  printed its address. `dataDir` keeps state across a restart. */
export function startServer({ listen = "127.0.0.1:0", dataDir = "none", args = [] } = {}) {
  const child = spawn(binary(), [
    "--listen", listen, "--write-token", TOKEN, "--data-dir", dataDir, ...args,
  ], { stdio: ["ignore", "pipe", process.env.STOCKSYNC_TEST_LOG ? "inherit" : "ignore"] });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error("stocksync did not print its address"));
    }, START_TIMEOUT_MS);
    let out = "";
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const match = /stocksync: listening on (\S+)/.exec(out);
      if (match && timer) {
        clearTimeout(timer);
        const addr = match[1];
        resolve({
          addr,
          port: Number(addr.split(":").pop()),
          child,
          http: `http://${addr}`,
          ws: `ws://${addr}/ws`,
          kill: () => stop(child, "SIGKILL"),
        });
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`stocksync exited (${code}) before listening`));
    });
  });
}

function stop(child, signal) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once("exit", () => resolve());
    child.kill(signal);
  });
}

export function tempDir() {
  const dir = mkdtempSync(join(tmpdir(), "stocksync-js-"));
  return { path: dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** An HTTP call; resolves with {status, headers, body (JSON when it parses)}. */
export async function http(base, method, path, { body, token, headers = {} } = {}) {
  const all = { ...headers };
  if (token) all.authorization = `Bearer ${token}`;
  const response = await fetch(base + path, {
    method, headers: all, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    // not JSON: keep the text
  }
  return { status: response.status, headers: response.headers, body: parsed };
}

/** A write with the test token that must succeed; resolves with the reply body. */
export async function write(server, sku, op) {
  const reply = await http(server.http, "POST", `/stock/${sku}`, { body: op, token: TOKEN });
  if (reply.status !== 200) throw new Error(`write failed: ${reply.status} ${JSON.stringify(reply.body)}`);
  return reply.body;
}

/** A second origin: serves `pages` (path -> HTML) on another port of 127.0.0.1. */
export function pageServer(pages) {
  const server = createServer((req, res) => {
    const page = pages[new URL(req.url, "http://x").pathname];
    res.writeHead(page === undefined ? 404 : 200, { "content-type": "text/html; charset=utf-8" });
    res.end(page === undefined ? "not found" : page);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      resolve({ origin: `http://127.0.0.1:${server.address().port}`, close: () => server.close() });
    });
  });
}

/** Headless Chromium from Debian's package, driven by playwright-core. Fails (never skips)
 *  with what to install when either is missing. */
export async function launchChromium() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)`);
  }
  let chromium;
  try {
    ({ chromium } = require("playwright-core"));
  } catch (e) {
    throw new Error("playwright-core is missing: run `npm ci` at the repository root");
  }
  const profile = tempDir();
  // A persistent context is the way to give Chromium its own fresh --user-data-dir.
  const context = await chromium.launchPersistentContext(profile.path, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    viewport: { width: 1200, height: 760 },
  });
  return {
    context,
    close: async () => {
      await context.close();
      profile.remove();
    },
  };
}

/** Polls `check` until it returns a truthy value or `timeoutMs` passes. */
export async function eventually(check, timeoutMs = 5000, what = "condition") {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
