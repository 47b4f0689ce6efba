/*! stocksync browser client: live stock over one WebSocket. No dependencies.
 *
 *   const c = StockSync.connect("wss://stock.example/ws", { token });
 *   await c.subscribe(["sku-1"], (state) => { ... });  // current state, then every change
 *   const state = await c.update({ id: "sku-1", action: "reserve", change: 1 });
 *
 * This file is a classic script (it sets window.StockSync); /client.mjs is the ES module that
 * exports the same object. The wire format is docs/PROTOCOL.md. Promises reject with an Error
 * whose `code` is the server's error code, or `unavailable` while disconnected.
 *
 * Guarantees: onState never sees a SKU go back a version (states are compared by `version`);
 * the client reconnects by itself with exponential backoff and full jitter and resubscribes;
 * a ping every `pingIntervalMs` notices a connection that died without a close.
 */
"use strict";
(function (root) {
  // Backoff bounds (centrifuge-js uses the same): first retry within 0.5 s, never over 20 s.
  var RECONNECT_DELAY_MIN_MS = 500;
  var RECONNECT_DELAY_MAX_MS = 20000;
  // Browsers hide WebSocket pings from pages, so liveness is checked with the protocol's own
  // {"type":"ping"}: sent after this much silence, and the link is dropped if no message at
  // all arrives within the timeout after it (the server's idle timeout is 60 s).
  var PING_INTERVAL_MS = 20000;
  var PONG_TIMEOUT_MS = 10000;
  // The server refuses more SKUs per subscribe/unsubscribe/get (PROTOCOL.md "Limits").
  var SKUS_PER_MESSAGE_MAX = 1000;
  var WILDCARD = "*";
  var OPEN = 1; // WebSocket.OPEN, also when the WebSocket class is not the browser's

  function failure(code, message, extra) {
    var error = new Error(message || code);
    error.code = code;
    if (extra) {
      for (var key in extra) if (key !== "type" && key !== "id") error[key] = extra[key];
    }
    return error;
  }

  function chunks(list) {
    var out = [];
    for (var i = 0; i < list.length; i += SKUS_PER_MESSAGE_MAX) {
      out.push(list.slice(i, i + SKUS_PER_MESSAGE_MAX));
    }
    return out.length ? out : [[]];
  }

  function Client(url, options) {
    options = options || {};
    this._url = url;
    if (options.token) {
      // Browsers cannot set headers on a WebSocket: the token goes in the URL (PROTOCOL.md).
      this._url += (url.indexOf("?") < 0 ? "?" : "&") + "token=" + encodeURIComponent(options.token);
    }
    this._WebSocket = options.WebSocket || root.WebSocket;
    if (!this._WebSocket) throw new Error("no WebSocket class: pass options.WebSocket");
    this._delayMinMs = options.reconnectDelayMinMs || RECONNECT_DELAY_MIN_MS;
    this._delayMaxMs = options.reconnectDelayMaxMs || RECONNECT_DELAY_MAX_MS;
    this._pingIntervalMs = options.pingIntervalMs || PING_INTERVAL_MS;
    this._pongTimeoutMs = options.pongTimeoutMs || PONG_TIMEOUT_MS;
    this._ws = null;
    this._status = "closed";
    this._closed = false; // close() was called: no more attempts
    this._attempt = 0;
    this._retryTimer = null;
    this._pingTimer = null;
    this._nextId = 1;
    this._pending = new Map(); // request id -> {resolve, reject, stock: [] while chunks arrive}
    this._listeners = new Set(); // {skus: Set, all: bool, onState, seen: Map sku -> version}
    this._statusFns = new Set();
    this._latest = new Map(); // sku -> newest state seen on any connection
    this._open();
  }

  Client.prototype._setStatus = function (status) {
    if (this._status === status) return;
    this._status = status;
    this._statusFns.forEach(function (fn) {
      try {
        fn(status);
      } catch (e) {
        setTimeout(function () { throw e; }); // reported, but cannot break the client
      }
    });
  };

  Client.prototype._open = function () {
    var self = this;
    this._setStatus("connecting");
    var ws;
    try {
      ws = new this._WebSocket(this._url);
    } catch (e) {
      this._lost(null);
      return;
    }
    this._ws = ws;
    ws.onopen = function () {
      if (self._ws !== ws) return;
      self._attempt = 0;
      self._setStatus("open");
      self._armPing();
      self._resubscribe();
    };
    ws.onmessage = function (event) {
      if (self._ws !== ws) return;
      self._armPing();
      var message;
      try {
        message = JSON.parse(event.data);
      } catch (e) {
        return; // not ours to interpret; the server only sends JSON objects
      }
      self._receive(message);
    };
    ws.onclose = function () {
      if (self._ws === ws) self._lost(ws);
    };
    ws.onerror = function () {
      // Always followed by close; handled there.
    };
  };

  // The connection (or the attempt) ended: fail what waited on it, then retry unless closed.
  Client.prototype._lost = function (ws) {
    var self = this;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      // Still swallowed: closing a socket that is connecting reports an error (and Node's
      // `ws` throws an error event that has no listener).
      ws.onerror = function () {};
      try {
        ws.close();
      } catch (e) {
        // already closing
      }
    }
    this._ws = null;
    clearTimeout(this._pingTimer);
    // A subscription's caller waits for the resubscribe (its waiters stay on the listener);
    // anything else fails now. A write's outcome is unknown: retrying it with the same
    // idempotency key applies it at most once.
    this._pending.forEach(function (request) {
      if (!request.listener) request.reject(failure("unavailable", "connection lost"));
    });
    this._pending.clear();
    this._setStatus("closed");
    if (this._closed) return;
    // Exponential backoff with full jitter: a uniform delay below the growing cap, so
    // thousands of pages dropped by one restart do not come back at the same instant.
    var cap = Math.min(this._delayMaxMs, this._delayMinMs * Math.pow(2, this._attempt));
    var delay = Math.max(this._delayMinMs, Math.random() * cap);
    this._attempt = Math.min(this._attempt + 1, 30);
    this._retryTimer = setTimeout(function () {
      self._retryTimer = null;
      if (!self._closed) self._open();
    }, delay);
  };

  Client.prototype._armPing = function () {
    var self = this;
    clearTimeout(this._pingTimer);
    this._pingTimer = setTimeout(function () {
      var ws = self._ws;
      if (!ws || ws.readyState !== OPEN) return;
      ws.send('{"type":"ping"}');
      // Any message re-arms the timer; silence until then means the link is dead.
      self._pingTimer = setTimeout(function () {
        if (self._ws === ws) self._lost(ws);
      }, self._pongTimeoutMs);
    }, this._pingIntervalMs);
  };

  Client.prototype._send = function (message, request) {
    var id = this._nextId++;
    message.id = id;
    this._pending.set(id, request);
    this._ws.send(JSON.stringify(message));
    return id;
  };

  // Sends a request; resolves with the reply's `stock` once every chunk has arrived.
  Client.prototype._request = function (message) {
    var self = this;
    return new Promise(function (resolve, reject) {
      if (!self._ws || self._ws.readyState !== OPEN) {
        reject(failure("unavailable", "not connected"));
        return;
      }
      self._send(message, { resolve: resolve, reject: reject, stock: null });
    });
  };

  Client.prototype._receive = function (message) {
    var type = message.type;
    if (type === "stock_update") {
      this._offer(message.stock);
      return;
    }
    var request = message.id === undefined ? undefined : this._pending.get(message.id);
    if (type === "error") {
      if (!request) return;
      this._pending.delete(message.id);
      var error = failure(message.code, message.message, message);
      if (request.listener) this._dropListener(request.listener, error);
      request.reject(error);
      return;
    }
    if (!request) return; // e.g. the reply to our ping, or to ?skus= in the URL
    var stock = message.stock;
    if (Array.isArray(stock)) stock.forEach(this._offer, this);
    else if (stock) this._offer(stock);
    if (type === "subscribed" || type === "stock" || type === "snapshot") {
      // Big snapshots arrive in chunks: the reply with "more": true, then `snapshot`
      // messages with the same id, the last with "more": false (PROTOCOL.md "Limits").
      // Each chunk's states are passed on as they come; the promise gets them all.
      request.stock = request.stock ? request.stock.concat(stock || []) : stock || [];
      if (message.more) return;
      stock = request.stock;
    }
    this._pending.delete(message.id);
    request.resolve(stock);
  };

  // A state from the server: remembered if newest, then passed to each listener that wants it
  // and has not seen this version or a newer one.
  Client.prototype._offer = function (state) {
    if (!state || typeof state.id !== "string") return;
    var latest = this._latest.get(state.id);
    if (latest && latest.version > state.version) state = latest;
    else this._latest.set(state.id, state);
    this._listeners.forEach(function (listener) {
      if (!listener.all && !listener.skus.has(state.id)) return;
      var seen = listener.seen.get(state.id);
      if (seen !== undefined && seen >= state.version) return;
      listener.seen.set(state.id, state.version);
      try {
        listener.onState(state);
      } catch (e) {
        setTimeout(function () { throw e; });
      }
    });
  };

  // Sends the subscribe(s) for `listener` on the open connection; its waiters (callers of
  // subscribe still waiting for the current states) are answered when every reply is in.
  Client.prototype._subscribeOn = function (listener) {
    var self = this;
    var names = listener.all ? [WILDCARD] : Array.from(listener.skus);
    Promise.all(chunks(names).map(function (part) {
      return new Promise(function (resolve, reject) {
        self._send({ type: "subscribe", skus: part }, {
          resolve: resolve, reject: reject, stock: null, listener: listener,
        });
      });
    })).then(function (parts) {
      var states = flatten(parts);
      var waiters = listener.waiters.splice(0);
      waiters.forEach(function (waiter) { waiter.resolve(states); });
    }, function () {
      // An error reply already dropped the listener; a lost link leaves it for the retry.
    });
  };

  Client.prototype._dropListener = function (listener, error) {
    this._listeners.delete(listener);
    listener.waiters.splice(0).forEach(function (waiter) { waiter.reject(error); });
  };

  Client.prototype._resubscribe = function () {
    this._listeners.forEach(this._subscribeOn, this);
  };

  /** Subscribes to `skus` (ids, or ["*"] for every SKU). `onState(state)` gets the current
   *  state of each, then every change. Resolves with the current states. Kept across
   *  reconnects until `unsubscribe`. */
  Client.prototype.subscribe = function (skus, onState) {
    var self = this;
    if (typeof onState !== "function") throw new TypeError("subscribe(skus, onState)");
    var listener = {
      skus: new Set(skus),
      all: skus.indexOf(WILDCARD) >= 0,
      onState: onState,
      seen: new Map(),
      waiters: [],
    };
    listener.skus.delete(WILDCARD);
    this._listeners.add(listener);
    // States already known are current: hand them over now, the server's reply follows.
    listener.skus.forEach(function (sku) {
      var state = self._latest.get(sku);
      if (state) self._offer(state);
    });
    var done = new Promise(function (resolve, reject) {
      listener.waiters.push({ resolve: resolve, reject: reject });
    });
    // Not connected: the subscribe goes out when the connection opens.
    if (this._ws && this._ws.readyState === OPEN) this._subscribeOn(listener);
    return done;
  };

  function flatten(parts) {
    if (!Array.isArray(parts)) return parts;
    return [].concat.apply([], parts.map(function (p) { return Array.isArray(p) ? p : [p]; }));
  }

  /** Stops updates for `skus` (["*"] ends a wildcard subscription). */
  Client.prototype.unsubscribe = function (skus) {
    var self = this;
    var all = skus.indexOf(WILDCARD) >= 0;
    this._listeners.forEach(function (listener) {
      if (all) listener.all = false;
      skus.forEach(function (sku) {
        listener.skus.delete(sku);
        listener.seen.delete(sku);
      });
      if (!listener.all && listener.skus.size === 0) {
        self._listeners.delete(listener);
        listener.waiters.splice(0).forEach(function (waiter) { waiter.resolve([]); });
      }
    });
    if (!this._ws || this._ws.readyState !== OPEN) return Promise.resolve();
    return Promise.all(chunks(skus).map(function (part) {
      return self._request({ type: "unsubscribe", skus: part });
    })).then(function () {});
  };

  /** Resolves with the current state of each of `skus`, in order. */
  Client.prototype.get = function (skus) {
    var self = this;
    return Promise.all(chunks(skus).map(function (part) {
      return self._request({ type: "get", skus: part });
    })).then(flatten);
  };

  function withKey(message, options) {
    if (options && options.idempotencyKey !== undefined) {
      message.idempotency_key = options.idempotencyKey;
    }
    return message;
  }

  /** Applies one op ({id, action, quantity|change, if_version?}); resolves with the SKU's
   *  new state. Rejects at once with `unavailable` while disconnected (never queued). */
  Client.prototype.update = function (op, options) {
    return this._request(withKey({ type: "stock_update", stock: op }, options));
  };

  /** Applies ops atomically (all or none); resolves with one state per op, in order. */
  Client.prototype.batch = function (ops, options) {
    return this._request(withKey({ type: "stock_batch", ops: ops }, options));
  };

  /** Calls `fn(status)` now and on every change: "connecting", "open" or "closed".
   *  Returns a function that stops the calls. */
  Client.prototype.onStatus = function (fn) {
    var fns = this._statusFns;
    fns.add(fn);
    fn(this._status);
    return function () { fns.delete(fn); };
  };

  /** The current status: "connecting", "open" or "closed". */
  Client.prototype.status = function () {
    return this._status;
  };

  /** Closes for good: pending requests reject with `unavailable`, no more reconnects. */
  Client.prototype.close = function () {
    this._closed = true;
    clearTimeout(this._retryTimer);
    var ws = this._ws;
    var error = failure("unavailable", "client closed");
    this._pending.forEach(function (request) {
      if (!request.listener) request.reject(error);
    });
    this._pending.clear();
    this._listeners.forEach(function (listener) {
      listener.waiters.splice(0).forEach(function (waiter) { waiter.reject(error); });
    });
    if (ws) this._lost(ws);
    else this._setStatus("closed");
  };

  root.StockSync = {
    /** Opens a client for `url` (ws:// or wss://, e.g. "wss://host/ws"). Options: `token`,
     *  and for tests or Node: `WebSocket` (a class), `reconnectDelayMinMs`,
     *  `reconnectDelayMaxMs`, `pingIntervalMs`, `pongTimeoutMs`. */
    connect: function (url, options) {
      return new Client(url, options);
    },
  };
})(typeof window !== "undefined" ? window : globalThis);
