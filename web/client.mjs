// The stocksync client as an ES module: client.js is a classic script (it sets
// globalThis.StockSync), imported here for that effect and re-exported.
import "./client.js";
export const StockSync = globalThis.StockSync;
export default StockSync;
