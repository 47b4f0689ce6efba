import "./client.js";
export const StockSync = globalThis.StockSync;
export default StockSync;
