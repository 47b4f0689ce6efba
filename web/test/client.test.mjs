// web/client.js against the real stocksync binary, in Node (the `ws` package stands in for the
// browser's WebSocket). Run: cargo test --test browser (or STOCKSYNC_BIN=... node --test web/test/).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { StockSync } from "../client.mjs";
import {
  TOKEN, WebSocketClass, eventually, http, startServer, tempDir, write,
} from "./harness.mjs";

const WebSocket = WebSocketClass();
// Short delays so a reconnect test takes a fraction of a second, not the 0.5-20 s default.
const FAST = { WebSocket, reconnectDelayMinMs: 50, reconnectDelayMaxMs: 300 };

function connect(server, options = {}) {
  return StockSync.connect(server.ws, { ...FAST, ...options });
}

function statusLog(client) {
  const seen = [];
  client.onStatus((s) => seen.push(s));
  return seen;
}

const open = (client) => eventually(() => client.status() === "open", 5000, "open");

describe("client.js against a running server", () => {
  let server;
  before(async () => { server = await startServer(); });
  after(() => server.kill());

  test("subscribe hands the current state first, then every change", async () => {
    await write(server, "sub-1", { action: "set", quantity: 7 });
    const client = connect(server);
    const got = [];
    const initial = await client.subscribe(["sub-1", "sub-never"], (s) => got.push(s));
    assert.deepEqual(initial.map((s) => [s.id, s.quantity, s.version]).sort(),
      [["sub-1", 7, 1], ["sub-never", 0, 0]]);
    assert.equal(got.length, 2, "one onState per SKU for the current state");
    await write(server, "sub-1", { action: "reserve", change: 2 });
    await eventually(() => got.some((s) => s.id === "sub-1" && s.version === 2), 1000, "update");
    const latest = got.filter((s) => s.id === "sub-1").pop();
    assert.deepEqual(latest, { id: "sub-1", quantity: 5, on_hand: 7, reserved: 2, version: 2 });
    await client.unsubscribe(["sub-1"]);
    await write(server, "sub-1", { action: "increase", change: 1 });
    await new Promise((r) => setTimeout(r, 150));
    assert.equal(got.filter((s) => s.id === "sub-1").pop().version, 2, "no update after unsubscribe");
    client.close();
  });

  test("update and batch resolve with states; refusals reject with the error code", async () => {
    const writer = connect(server, { token: TOKEN });
    await open(writer);
    const state = await writer.update({ id: "w-1", action: "set", quantity: 3 });
    assert.deepEqual(state, { id: "w-1", quantity: 3, on_hand: 3, reserved: 0, version: 1 });
    const states = await writer.batch([
      { id: "w-1", action: "reserve", change: 1 },
      { id: "w-2", action: "set", quantity: 9 },
    ]);
    assert.deepEqual(states.map((s) => [s.id, s.quantity, s.version]), [["w-1", 2, 2], ["w-2", 9, 1]]);

    const refusals = [
      [() => writer.update({ id: "w-1", action: "decrease", change: 50 }), "insufficient_stock"],
      [() => writer.update({ id: "bad id!", action: "set", quantity: 1 }), "invalid_sku"],
      [() => writer.update({ id: "w-1", action: "explode", change: 1 }), "unknown_action"],
      [() => writer.update({ id: "w-1", action: "set", quantity: 1, if_version: 1 }), "version_conflict"],
      [() => writer.batch([{ id: "w-2", action: "reserve", change: 1 },
        { id: "w-1", action: "release", change: 5 }]), "insufficient_reserved"],
    ];
    for (const [call, code] of refusals) {
      await assert.rejects(call(), (e) => e instanceof Error && e.code === code, code);
    }
    const conflict = await writer.update({ id: "w-1", action: "set", quantity: 1, if_version: 1 })
      .catch((e) => e);
    assert.equal(conflict.stock.version, 2, "version_conflict carries the current state");
    const batchError = await writer.batch([{ id: "w-2", action: "reserve", change: 1 },
      { id: "w-1", action: "release", change: 5 }]).catch((e) => e);
    assert.equal(batchError.index, 1, "a batch refusal names the failing op");

    const reader = connect(server);
    await open(reader);
    await assert.rejects(reader.update({ id: "w-1", action: "increase", change: 1 }),
      (e) => e.code === "unauthorized");

    const key = "client-test-key-1";
    const first = await writer.update({ id: "w-3", action: "increase", change: 4 }, { idempotencyKey: key });
    const again = await writer.update({ id: "w-3", action: "increase", change: 4 }, { idempotencyKey: key });
    assert.deepEqual(again, first, "a repeated key returns the original state");
    const [stored] = await reader.get(["w-3"]);
    assert.equal(stored.on_hand, 4, "applied once");
    writer.close();
    reader.close();
  });

  test("get answers in order, splitting lists over the server's 1,000 SKUs per message", async () => {
    const client = connect(server);
    await open(client);
    const names = Array.from({ length: 1500 }, (_, i) => `g-${i}`);
    const states = await client.get(names);
    assert.deepEqual(states.map((s) => s.id), names);
    client.close();
  });

  test("a subscription to * brings every known SKU (whole, however the server chunks it)", async () => {
    // Enough states to pass one snapshot chunk (256 KiB is about 3,500 states).
    const count = 5000;
    for (let b = 0; b < count / 100; b++) {
      const ops = Array.from({ length: 100 }, (_, i) => ({ id: `many-${b * 100 + i}`, action: "set", quantity: i }));
      const reply = await http(server.http, "POST", "/stock/batch", { body: { ops }, token: TOKEN });
      assert.equal(reply.status, 200);
    }
    const client = connect(server);
    const seen = new Set();
    const states = await client.subscribe(["*"], (s) => seen.add(s.id));
    const many = states.filter((s) => s.id.startsWith("many-"));
    assert.equal(many.length, count);
    assert.equal([...seen].filter((id) => id.startsWith("many-")).length, count);
    client.close();
  });

  test("close() ends the client for good", async () => {
    const client = connect(server, { token: TOKEN });
    const statuses = statusLog(client);
    await open(client);
    client.close();
    assert.equal(client.status(), "closed");
    await assert.rejects(client.update({ id: "c-1", action: "set", quantity: 1 }),
      (e) => e.code === "unavailable");
    await new Promise((r) => setTimeout(r, 400));
    assert.deepEqual(statuses, ["connecting", "open", "closed"], "no attempt after close()");
  });
});

describe("client.js across server failures", () => {
  test("reconnects after a restart, resubscribes and never goes back a version", async () => {
    const dir = tempDir();
    let server = await startServer({ dataDir: dir.path });
    const port = server.port;
    try {
      const client = connect(server, { token: TOKEN });
      const statuses = statusLog(client);
      const versions = [];
      await client.subscribe(["r-1"], (s) => versions.push(s.version));
      for (let q = 1; q <= 3; q++) await write(server, "r-1", { action: "set", quantity: q });
      await eventually(() => versions.at(-1) === 3, 2000, "version 3");

      await server.kill();
      await eventually(() => client.status() !== "open", 3000, "the loss noticed");
      const started = Date.now();
      await assert.rejects(client.update({ id: "r-1", action: "increase", change: 1 }),
        (e) => e.code === "unavailable");
      assert.ok(Date.now() - started < 100, "refused at once, not queued");

      server = await startServer({ listen: `127.0.0.1:${port}`, dataDir: dir.path });
      await open(client);
      await write(server, "r-1", { action: "set", quantity: 10 });
      await eventually(() => versions.at(-1) === 4, 3000, "the change after the restart");
      const state = await client.update({ id: "r-1", action: "increase", change: 1 });
      assert.equal(state.version, 5);
      await eventually(() => versions.at(-1) === 5, 2000, "own write's update");
      for (let i = 1; i < versions.length; i++) {
        assert.ok(versions[i] > versions[i - 1], `versions go forward: ${versions}`);
      }
      const lost = statuses.indexOf("closed");
      assert.ok(lost > 0 && statuses[lost + 1] === "connecting" && statuses.at(-1) === "open",
        `closed, then connecting per attempt, then open: ${statuses}`);
      client.close();
    } finally {
      await server.kill();
      dir.remove();
    }
  });

  test("close() while still connecting ends quietly", async () => {
    // Regression: Node's `ws` reports an aborted handshake as an error event, which throws
    // when no listener is left; the client must keep swallowing it.
    const server = await startServer();
    const url = server.ws;
    await server.kill();
    const client = StockSync.connect(url, FAST);
    assert.equal(client.status(), "connecting");
    client.close();
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(client.status(), "closed");
  });

  test("the application ping notices a server that stopped answering", async () => {
    const server = await startServer();
    try {
      const client = connect(server, { pingIntervalMs: 150, pongTimeoutMs: 250 });
      const statuses = statusLog(client);
      await open(client);
      // A stopped process keeps its sockets open: only the missing pong can tell.
      server.child.kill("SIGSTOP");
      await eventually(() => statuses.includes("closed"), 3000, "the dead link noticed");
      server.child.kill("SIGCONT");
      await eventually(() => client.status() === "open", 5000, "back after SIGCONT");
      client.close();
    } finally {
      server.child.kill("SIGCONT");
      await server.kill();
    }
  });
});

describe("client.js and chunked snapshots (a peer speaking the contract's chunked form)", () => {
  // PROTOCOL.md: a reply over one chunk carries "more": true and is followed by `snapshot`
  // messages with its id. This peer sends exactly that, with an update between the chunks,
  // so the gathering and the version rule are pinned whatever size the real server chunks at.
  test("chunks are gathered and an older state in a later chunk is not passed on", async () => {
    const { WebSocketServer } = WebSocket;
    const peer = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    const state = (id, version) => ({ id, quantity: version, on_hand: version, reserved: 0, version });
    peer.on("connection", (socket) => {
      socket.on("message", (data) => {
        const message = JSON.parse(data);
        if (message.type !== "subscribe") return;
        const id = message.id;
        socket.send(JSON.stringify({ type: "subscribed", id, stock: [state("a", 4)], more: true }));
        socket.send(JSON.stringify({ type: "stock_update", stock: state("b", 7) }));
        socket.send(JSON.stringify({ type: "snapshot", id, stock: [state("b", 6)], more: true }));
        socket.send(JSON.stringify({ type: "snapshot", id, stock: [state("c", 1)], more: false }));
      });
    });
    await new Promise((r) => peer.once("listening", r));
    const client = StockSync.connect(`ws://127.0.0.1:${peer.address().port}/ws`, FAST);
    const passed = [];
    const states = await client.subscribe(["*"], (s) => passed.push(`${s.id}@${s.version}`));
    assert.deepEqual(states.map((s) => s.id), ["a", "b", "c"], "every chunk in the answer");
    assert.deepEqual(passed, ["a@4", "b@7", "c@1"], "b@6 came after b@7 and was held back");
    client.close();
    peer.close();
  });
});
