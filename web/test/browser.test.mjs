// End-to-end in headless Chromium (Debian's package, driven by playwright-core): the dashboard,
// client.js on a page of another origin, reconnects across a server restart, and both
// storefront examples. Run: cargo test --test browser.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import {
  TOKEN, eventually, http, launchChromium, pageServer, startServer, tempDir, write,
} from "./harness.mjs";

// PROTOCOL.md promises delivery "within a millisecond"; a page must show a change within 1 s.
const SHOWN_WITHIN_MS = 1000;

let browser;
before(async () => { browser = await launchChromium(); });
after(async () => { if (browser) await browser.close(); });

async function newPage() {
  const page = await browser.context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.errors = errors;
  return page;
}

const row = (page, sku) => page.locator(`.row[data-sku="${sku}"]`);
const cellText = (page, sku, cls) => row(page, sku).locator(`.${cls}`).textContent();

describe("the dashboard", () => {
  let server;
  before(async () => { server = await startServer(); });
  after(() => server.kill());

  test("shows the stock and follows changes, filters, applies and refuses ops", async () => {
    await write(server, "dash-apple", { action: "set", quantity: 12 });
    await write(server, "dash-pear", { action: "set", quantity: 4 });
    const page = await newPage();
    await page.goto(`${server.http}/`);
    await page.locator("#status[data-status=open]").waitFor();
    assert.equal(await cellText(page, "dash-apple", "available"), "12");
    assert.equal(await page.locator("#write.enabled").count(), 0, "no write form without a token");

    // Another client changes the stock over HTTP: the row follows within a second and flashes.
    const started = Date.now();
    await write(server, "dash-apple", { action: "reserve", change: 5 });
    await page.waitForFunction(
      () => document.querySelector('.row[data-sku="dash-apple"] .available')?.textContent === "7",
      null, { timeout: SHOWN_WITHIN_MS });
    assert.ok(Date.now() - started < SHOWN_WITHIN_MS);
    assert.equal(await cellText(page, "dash-apple", "reserved"), "5");
    assert.equal(await cellText(page, "dash-apple", "version"), "2");
    assert.match(await row(page, "dash-apple").getAttribute("class"), /flash/);
    assert.notEqual(await cellText(page, "dash-apple", "changed"), "—");
    // A SKU written for the first time appears.
    await write(server, "dash-plum", { action: "set", quantity: 1 });
    await row(page, "dash-plum").waitFor({ timeout: SHOWN_WITHIN_MS });

    await page.fill("#filter", "PEA");
    await eventually(async () => (await page.locator(".row:visible").count()) === 1, 2000, "filter");
    assert.equal(await page.locator(".row:visible").first().getAttribute("data-sku"), "dash-pear");
    assert.match(await page.locator("#counts").textContent(), /^1 of 3 SKUs/);
    await page.fill("#filter", "");
    await eventually(async () => (await page.locator(".row:visible").count()) === 3, 2000, "unfiltered");

    await page.fill("#token", TOKEN);
    await page.click("#use-token");
    await page.locator("#write.enabled").waitFor();
    await page.locator("#status[data-status=open]").waitFor();
    await page.fill("#op-sku", "dash-pear");
    await page.selectOption("#op-action", "increase");
    await page.fill("#op-amount", "6");
    await page.click("#op-apply");
    await page.locator("#write-result.ok").waitFor();
    const pear = await http(server.http, "GET", "/stock/dash-pear");
    assert.equal(pear.body.on_hand, 10, "the form's op was applied");
    await page.waitForFunction(
      () => document.querySelector('.row[data-sku="dash-pear"] .on-hand')?.textContent === "10");

    await page.selectOption("#op-action", "decrease");
    await page.fill("#op-amount", "999");
    await page.click("#op-apply");
    await page.locator("#write-result.error").waitFor();
    assert.match(await page.locator("#write-result").textContent(), /insufficient_stock/);

    await page.fill("#batch-ops", JSON.stringify([
      { id: "dash-pear", action: "reserve", change: 2 },
      { id: "dash-apple", action: "commit", change: 5 },
    ]));
    await page.click("#batch-apply");
    await page.locator("#write-result.ok").waitFor();
    const apple = await http(server.http, "GET", "/stock/dash-apple");
    assert.deepEqual([apple.body.on_hand, apple.body.reserved], [7, 0]);
    assert.deepEqual(page.errors, []);
    await page.close();
  });
});

describe("the dashboard with 100,000 SKUs", () => {
  // The contract's scale for the dashboard; the table must stay virtualised.
  const SKU_COUNT = 100000;
  const OPS_PER_BATCH = 100; // the server's ops-per-batch limit
  const BATCHES_IN_FLIGHT = 20;
  let server;
  before(async () => {
    server = await startServer();
    let inflight = [];
    for (let b = 0; b < SKU_COUNT / OPS_PER_BATCH; b++) {
      const ops = Array.from({ length: OPS_PER_BATCH }, (_, i) =>
        ({ id: `big-${String(b * OPS_PER_BATCH + i).padStart(6, "0")}`, action: "set", quantity: i }));
      inflight.push(http(server.http, "POST", "/stock/batch", { body: { ops }, token: TOKEN }));
      if (inflight.length === BATCHES_IN_FLIGHT) {
        for (const reply of await Promise.all(inflight)) assert.equal(reply.status, 200);
        inflight = [];
      }
    }
    await Promise.all(inflight);
  });
  after(() => server.kill());

  test("renders only the rows in view, scrolls, filters and follows changes", async () => {
    const page = await newPage();
    await page.goto(`${server.http}/`);
    await page.waitForFunction(
      () => document.getElementById("counts").textContent === "100,000 SKUs", null, { timeout: 20000 });
    const rows = await page.locator(".row").count();
    assert.ok(rows > 10 && rows < 100, `${rows} row elements for 100,000 SKUs`);

    // Scrolled to the middle, the rows there are the ones shown.
    await page.evaluate(() => {
      const viewport = document.getElementById("viewport");
      viewport.scrollTop = viewport.scrollHeight / 2;
    });
    await page.waitForFunction(() => [...document.querySelectorAll(".row")]
      .some((r) => r.dataset.sku === "big-050000" && r.style.display !== "none"));
    await write(server, "big-050000", { action: "set", quantity: 777 });
    await page.waitForFunction(
      () => document.querySelector('.row[data-sku="big-050000"] .available')?.textContent === "777",
      null, { timeout: SHOWN_WITHIN_MS });

    await page.fill("#filter", "big-09999");
    await page.waitForFunction(
      () => document.getElementById("counts").textContent === "10 of 100,000 SKUs");
    assert.equal(await page.locator(".row:visible").count(), 10);
    assert.equal(await page.locator(".row").count(), rows, "the same row elements, re-filled");
    assert.deepEqual(page.errors, []);
    await page.close();
  });
});

// The page another origin serves: imports the client module from the stock server.
function crossOriginPage(server) {
  return `<!doctype html><title>shop</title><script type="module">
    const { StockSync } = await import(${JSON.stringify(server.http + "/client.mjs")});
    window.seen = [];
    window.statuses = [];
    window.client = StockSync.connect(${JSON.stringify(server.ws)},
      { token: ${JSON.stringify(TOKEN)}, reconnectDelayMinMs: 100, reconnectDelayMaxMs: 400 });
    window.client.onStatus((s) => window.statuses.push(s));
    window.initial = await window.client.subscribe(["x-1"], (s) => window.seen.push(s));
    window.ready = true;
  </script>`;
}

describe("client.js on a page of another origin", () => {
  let server;
  let shop;
  before(async () => {
    server = await startServer();
    shop = await pageServer({
      "/module": crossOriginPage(server),
      "/classic": `<!doctype html><script src="${server.http}/client.js"></script>`,
      "/blank": "<!doctype html><title>blank</title>",
    });
  });
  after(() => { shop.close(); return server.kill(); });

  test("imports the module, subscribes, sees updates, writes resolve and reject with codes", async () => {
    await write(server, "x-1", { action: "set", quantity: 5 });
    const page = await newPage();
    await page.goto(`${shop.origin}/module`);
    await page.waitForFunction(() => window.ready === true);
    assert.notEqual(new URL(page.url()).origin, new URL(server.http).origin);
    assert.deepEqual(await page.evaluate(() => window.initial.map((s) => [s.id, s.quantity])), [["x-1", 5]]);

    await write(server, "x-1", { action: "increase", change: 2 });
    await page.waitForFunction(() => window.seen.at(-1)?.quantity === 7, null, { timeout: SHOWN_WITHIN_MS });

    const outcome = await page.evaluate(async () => {
      const c = window.client;
      const code = (p) => p.then(() => "resolved", (e) => (e instanceof Error ? e.code : "not an Error"));
      return {
        update: await c.update({ id: "x-1", action: "reserve", change: 1 }, { idempotencyKey: "x-k1" }),
        batch: await c.batch([{ id: "x-1", action: "commit", change: 1 }, { id: "x-2", action: "set", quantity: 3 }]),
        refused: await code(c.update({ id: "x-1", action: "decrease", change: 100 })),
        refusedBatch: await code(c.batch([{ id: "x-2", action: "release", change: 1 }])),
        got: await c.get(["x-2", "x-1"]),
      };
    });
    assert.deepEqual(outcome.update, { id: "x-1", quantity: 6, on_hand: 7, reserved: 1, version: 3 });
    assert.deepEqual(outcome.batch.map((s) => [s.id, s.on_hand, s.version]), [["x-1", 6, 4], ["x-2", 3, 1]]);
    assert.equal(outcome.refused, "insufficient_stock");
    assert.equal(outcome.refusedBatch, "insufficient_reserved");
    assert.deepEqual(outcome.got.map((s) => s.id), ["x-2", "x-1"]);

    // The HTTP API is readable from this origin too (CORS), a preflighted write included.
    const fetched = await page.evaluate(async ([base, token]) => {
      const read = await fetch(`${base}/stock/x-1`).then((r) => r.json());
      const written = await fetch(`${base}/stock/x-1`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}`, "content-type": "application/json", "idempotency-key": "x-k2" },
        body: JSON.stringify({ action: "increase", change: 1 }),
      }).then((r) => r.json());
      return [read.version, written.stock.version];
    }, [server.http, TOKEN]);
    assert.deepEqual(fetched, [4, 5]);
    assert.deepEqual(page.errors, []);
    await page.close();
  });

  test("a classic <script> from the server sets window.StockSync, and so does import()", async () => {
    const page = await newPage();
    await page.goto(`${shop.origin}/classic`);
    assert.equal(await page.evaluate(() => typeof window.StockSync?.connect), "function");
    await page.goto(`${shop.origin}/blank`);
    const viaImport = await page.evaluate(async (url) => {
      if (window.StockSync) return "already there";
      await import(url);
      return typeof window.StockSync?.connect;
    }, `${server.http}/client.js`);
    assert.equal(viaImport, "function");
    await page.close();
  });
});

describe("across a server restart", () => {
  test("the dashboard and a client page reconnect without a reload and never go back", async () => {
    const dir = tempDir();
    let server = await startServer({ dataDir: dir.path });
    const port = server.port;
    const shop = await pageServer({ "/module": crossOriginPage(server) });
    try {
      for (let q = 1; q <= 3; q++) await write(server, "x-1", { action: "set", quantity: q });
      const dashboard = await newPage();
      await dashboard.goto(`${server.http}/`);
      await row(dashboard, "x-1").waitFor();
      const shopPage = await newPage();
      await shopPage.goto(`${shop.origin}/module`);
      await shopPage.waitForFunction(() => window.ready === true);

      await server.kill();
      await dashboard.locator("#status:not([data-status=open])").waitFor();
      await shopPage.waitForFunction(() => window.statuses.includes("closed"));
      const refused = await shopPage.evaluate(() => window.client
        .update({ id: "x-1", action: "increase", change: 1 }).then(() => "resolved", (e) => e.code));
      assert.equal(refused, "unavailable");

      server = await startServer({ listen: `127.0.0.1:${port}`, dataDir: dir.path });
      await dashboard.locator("#status[data-status=open]").waitFor({ timeout: 25000 });
      await shopPage.waitForFunction(() => window.client.status() === "open", null, { timeout: 25000 });
      await write(server, "x-1", { action: "set", quantity: 42 });
      await dashboard.waitForFunction(
        () => document.querySelector('.row[data-sku="x-1"] .available')?.textContent === "42");
      await shopPage.waitForFunction(() => window.seen.at(-1)?.quantity === 42);
      const versions = await shopPage.evaluate(() => window.seen.map((s) => s.version));
      assert.deepEqual(versions, [3, 4], "the current state, then the change after the restart");
      assert.equal(await cellText(dashboard, "x-1", "version"), "4");
      await dashboard.close();
      await shopPage.close();
    } finally {
      shop.close();
      await server.kill();
      dir.remove();
    }
  });
});

describe("the storefront examples", () => {
  test("both product pages follow changes of sku-1", async () => {
    const server = await startServer();
    const examples = new URL("../../examples/", import.meta.url);
    const shop = await pageServer({
      "/storefront.html": readFileSync(new URL("storefront.html", examples), "utf8"),
      "/storefront-client.html": readFileSync(new URL("storefront-client.html", examples), "utf8"),
    });
    try {
      await write(server, "sku-1", { action: "set", quantity: 8 });
      const pages = [];
      for (const name of ["storefront.html", "storefront-client.html"]) {
        const page = await newPage();
        await page.goto(`${shop.origin}/${name}?server=${server.addr}`);
        pages.push(page);
      }
      // The library page shows the current stock at once; the plain one waits for a change.
      await pages[1].waitForFunction(() => document.getElementById("stock").textContent === "8");
      // Both sockets must be subscribed before the change: wait for the server to count them.
      await eventually(async () => {
        const metrics = await http(server.http, "GET", "/metrics");
        return /stocksync_websocket_upgrades_total 2\b/.test(metrics.body);
      }, 5000, "two page connections");
      for (const quantity of [6, 3]) {
        await write(server, "sku-1", { action: "set", quantity });
        for (const page of pages) {
          await page.waitForFunction((q) => document.getElementById("stock").textContent === String(q),
            quantity, { timeout: SHOWN_WITHIN_MS });
        }
      }
      for (const page of pages) {
        assert.deepEqual(page.errors, []);
        await page.close();
      }
    } finally {
      shop.close();
      await server.kill();
    }
  });
});
