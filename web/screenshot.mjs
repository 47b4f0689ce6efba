// Regenerates docs/dashboard.png: a server with a small catalogue, the dashboard in headless
// Chromium with a write token entered, and a few live changes (one still flashing).
// Run: cargo build && STOCKSYNC_BIN=target/debug/stocksync node web/screenshot.mjs
import { TOKEN, http, launchChromium, startServer, write } from "./test/harness.mjs";

const COLOURS = ["black", "navy", "red", "white", "olive"];
const SIZES = ["S", "M", "L", "XL"];
const server = await startServer();
const ops = [];
for (const [n, item] of ["tee", "hoodie", "cap", "sock"].entries()) {
  for (const colour of COLOURS) {
    for (const size of SIZES) {
      const quantity = (n * 31 + colour.length * 7 + size.length * 13) % 60;
      ops.push({ id: `shop:${item}/${colour}.${size}`, action: "set", quantity });
    }
  }
}
for (let i = 0; i < ops.length; i += 100) {
  await http(server.http, "POST", "/stock/batch", { body: { ops: ops.slice(i, i + 100) }, token: TOKEN });
}
const browser = await launchChromium();
const page = await browser.context.newPage();
await page.goto(`${server.http}/`);
await page.fill("#token", TOKEN);
await page.click("#use-token");
await page.locator("#status[data-status=open]").waitFor();
await write(server, "shop:cap/black.M", { action: "reserve", change: 3 });
await write(server, "shop:cap/navy.L", { action: "decrease", change: 4 });
await page.fill("#op-sku", "shop:cap/black.S");
await page.selectOption("#op-action", "reserve");
await page.fill("#op-amount", "2");
await page.click("#op-apply");
await page.locator("#write-result.ok").waitFor();
await page.waitForTimeout(250);
await page.screenshot({ path: new URL("../docs/dashboard.png", import.meta.url).pathname });
await browser.close();
await server.kill();
