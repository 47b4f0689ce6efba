// Comparison peer: Node.js with the `ws` package. Every `stock_update` text message from any
// connection is re-broadcast to every open connection, the way the `ws` README shows broadcast
// ("send to all clients"), with compression off (the ws default for servers).
//
// usage: node server.js [PORT]   (listens on 127.0.0.1:PORT, default 9104)
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 9104);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });

wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    if (isBinary || !data.includes('"stock_update"')) return;
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(data, { binary: false });
    }
  });
});
wss.on('listening', () => console.error(`node ws peer listening on 127.0.0.1:${port}`));
