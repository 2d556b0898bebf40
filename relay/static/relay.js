// relay.js — the JavaScript client of relay, served by every relay at GET /relay.js.
// An ES module with no dependencies and no build step (types: relay.d.ts beside it):
//
//   import { connect } from "http://127.0.0.1:8099/relay.js";
//   const rc = connect("ws://127.0.0.1:8099/ws", async () => fetchSessionToken());
//   const view = await rc.liveView("db-tasks_760_", { filter: "status=eq.open" });
//   view.onChange((kind, id, row) => render(view.rows));
//   await rc.join("lobby");
//   rc.onMessage("lobby", (msg) => console.log(msg.data));
//   await rc.publish("lobby", "hello");
//
// What it does for you: authenticates with a token from your callback and
// renews it before its `exp`; reconnects with jittered exponential backoff;
// joins every channel again after a reconnect, each db- channel resuming after
// its last position (`after`), a live view taking a new snapshot the first time
// and whenever the relay says to reload; and resumes on the same socket when a
// session lapsed anyway (the relay replays what was paused).

const DB = "db-";
const SESSION_EXPIRED = "session expired";
const INVALID_TOKEN = "invalid token";
const RELOAD = "reload the data";
const DELAYED = "database unreachable: events on this channel are delayed";
const RETRYABLE = ["try again shortly", "join again shortly"];

/** Between half and all of the exponential bound, at random. */
export function backoffDelay(attempt, base, cap) {
  const bound = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return bound / 2 + Math.random() * (bound / 2);
}

/** The `exp` claim of a JWT in seconds, read without verifying it (the relay verifies). */
export function tokenExpiry(token) {
  try {
    let part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    part += "=".repeat((4 - (part.length % 4)) % 4);
    const exp = JSON.parse(atob(part)).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/** Seconds until a session expiring at `exp` should be renewed: `margin` before, or a
 * quarter of the time left when that is shorter. */
export function refreshDelay(exp, margin, now = Date.now() / 1000) {
  const left = exp - now;
  return Math.max(0, left - Math.min(margin, left / 4));
}

const lapsed = (text) => text.startsWith(SESSION_EXPIRED) || text === INVALID_TOKEN;

/** The relay answered a request with an `error` frame. */
export class RefusedError extends Error {
  constructor(channel, text) {
    super(channel ? `${channel}: ${text}` : text);
    this.name = "RefusedError";
    this.channel = channel;
    this.text = text;
  }
}

/** The connection was lost before the relay answered. */
export class DisconnectedError extends Error {
  constructor(message) {
    super(message);
    this.name = "DisconnectedError";
  }
}

/** The rows of one db- channel (under an optional filter) as a Map by id, kept in sync. */
export class LiveView {
  constructor(channel, filter = null, idColumn = "id") {
    this.channel = channel;
    this.filter = filter;
    this.idColumn = idColumn;
    /** @type {Map<string, object>} */
    this.rows = new Map();
    this.synced = false;
    this.ended = false;
    this.error = null;
    this.position = "";
    this.snapshots = 0;
    this._staging = null; // a snapshot being received, swapped in at db_synced
    this._reload = true; // the next join asks for a snapshot
    this._callbacks = new Set();
    this._syncWaiters = [];
    this._first = new Promise((resolve, reject) => {
      this._firstResolve = resolve;
      this._firstReject = reject;
    });
    this._first.catch(() => {});
  }

  /** cb(kind, id, row): kind is "created" | "updated" | "deleted" (row null). Returns a stop function. */
  onChange(cb) {
    this._callbacks.add(cb);
    return () => this._callbacks.delete(cb);
  }

  /** Resolves once a snapshot is complete (at once if it is). */
  whenSynced() {
    if (this.synced) return Promise.resolve();
    return new Promise((resolve) => this._syncWaiters.push(resolve));
  }

  _joinFields() {
    const fields = this._reload || !this.position ? { snapshot: "true" } : { after: this.position };
    if (this.filter) fields.filter = this.filter;
    return fields;
  }

  _joined(fields) {
    if (fields.snapshot === "true") {
      this._staging = new Map();
      this.synced = false;
    }
  }

  _refused(text) {
    this.error = text;
    this.ended = true;
    this._firstReject(new RefusedError(this.channel, text));
  }

  _apply(kind, data, pos, reason = "") {
    if (kind === "db_synced") return this._syncedAt(data || pos);
    if (kind === "error") return this._notice(reason, data, pos);
    const row = JSON.parse(data);
    const key = String(kind === "db_deleted" ? row.id : row[this.idColumn]);
    if (this._staging !== null) {
      if (kind === "db_deleted") this._staging.delete(key);
      else this._staging.set(key, row);
      return;
    }
    if (pos) this.position = pos;
    if (kind === "db_deleted") {
      if (this.rows.delete(key)) this._emit("deleted", key, null);
    } else {
      const existed = this.rows.has(key);
      this.rows.set(key, row);
      this._emit(existed ? "updated" : "created", key, row);
    }
  }

  _syncedAt(pos) {
    const staged = this._staging || new Map();
    this._staging = null;
    const old = this.rows;
    this.rows = staged;
    for (const [key, row] of old) {
      if (!staged.has(key)) this._emit("deleted", key, null);
      else if (JSON.stringify(staged.get(key)) !== JSON.stringify(row)) {
        this._emit("updated", key, staged.get(key));
      }
    }
    for (const [key, row] of staged) if (!old.has(key)) this._emit("created", key, row);
    if (pos) this.position = pos;
    this._reload = false;
    this.snapshots += 1;
    this.synced = true;
    for (const resolve of this._syncWaiters.splice(0)) resolve();
    this._firstResolve();
  }

  _notice(reason, text, pos) {
    if (reason === "truncated") {
      if (this._staging !== null) this._staging.clear();
      const old = this.rows;
      this.rows = new Map();
      for (const key of old.keys()) this._emit("deleted", key, null);
      if (pos && this._staging === null) this.position = pos;
    } else if (reason === "pruned") {
      this._reload = true;
    } else if (reason === "dropped") {
      this.error = text;
      this.ended = true;
    }
  }

  _emit(kind, key, row) {
    for (const cb of [...this._callbacks]) {
      try {
        cb(kind, key, row);
      } catch (err) {
        console.error("relay.js: live view callback failed", err);
      }
    }
  }
}

class Channel {
  constructor(name, view = null) {
    this.name = name;
    this.view = view;
    this.pos = ""; // a plain db- channel's last position
    this.joined = false; // on the current socket
    this.waiters = [];
    this.outstanding = []; // requests the relay has yet to answer, in order
    this.discard = 0; // replacing joins in flight: events before their `joined` are stale
  }
  get isDb() {
    return this.name.startsWith(DB);
  }
  joinFields() {
    if (this.view) return this.view._joinFields();
    return this.isDb && this.pos ? { after: this.pos } : {};
  }
  pop(kinds) {
    const i = this.outstanding.findIndex((r) => kinds.includes(r.kind));
    return i < 0 ? null : this.outstanding.splice(i, 1)[0];
  }
}

/** A reconnecting relay connection. Make one with `connect()`. */
export class Client {
  constructor(url, tokenProvider, options = {}) {
    const base = String(url).replace(/^http/, "ws");
    this.url = /^wss?:\/\/[^/]+\/./.test(base) ? base : base.replace(/\/$/, "") + "/ws";
    if (options.publicKey) {
      const sep = this.url.includes("?") ? "&" : "?";
      this.url += sep + "pk=" + encodeURIComponent(options.publicKey);
    }
    this._provider = tokenProvider;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this._WebSocket) throw new Error("relay.js: no WebSocket; pass options.WebSocket");
    this._backoff = [options.backoffBase ?? 0.25, options.backoffMax ?? 10];
    this._margin = options.refreshMargin ?? 30;
    this._heartbeat = options.heartbeat ?? 30;
    this._connectTimeout = options.connectTimeout ?? 10;
    this.stats = { connections: 0, auths: 0, expiries: 0, snapshotsAsked: 0, resumesAsked: 0 };
    this.sid = "";
    this.connected = false;
    this._channels = new Map();
    this._listeners = new Map(); // channel (or "*") -> Set of callbacks
    this._stateCallbacks = new Set();
    this._closed = false;
    this._attempt = 0;
    this._ws = null;
    this._expiresAt = null;
    this._resetSocketState();
    this._held = []; // frames waiting for a socket token
    this._authWaiters = [];
    this._connectedWaiters = [];
    this._open();
  }

  // --- public API ---------------------------------------------------------------------

  /** cb(event, detail) on "connected", "authenticated", "expired", "renewed",
   * "disconnected", "error", "channel_error". Returns a stop function. */
  onState(cb) {
    this._stateCallbacks.add(cb);
    return () => this._stateCallbacks.delete(cb);
  }

  /** cb(message) for every frame on `channel` (every channel: null). Returns a stop function. */
  onMessage(channel, cb) {
    const key = channel ?? "*";
    if (!this._listeners.has(key)) this._listeners.set(key, new Set());
    this._listeners.get(key).add(cb);
    return () => this._listeners.get(key).delete(cb);
  }

  /** Resolves once authenticated on a live socket. */
  whenConnected() {
    if (this.connected) return Promise.resolve();
    return new Promise((resolve) => this._connectedWaiters.push(resolve));
  }

  /** Join `channel` and stay joined across reconnects. Resolves once joined. */
  join(channel) {
    let ch = this._channels.get(channel);
    if (!ch) {
      ch = new Channel(channel);
      this._channels.set(channel, ch);
      this._sendJoin(ch);
    }
    if (ch.joined) return Promise.resolve();
    return new Promise((resolve, reject) => ch.waiters.push({ resolve, reject }));
  }

  /** Follow a db- channel as a Map of rows; resolves once the first snapshot is in. */
  async liveView(channel, { filter = null, idColumn = "id" } = {}) {
    if (!channel.startsWith(DB)) throw new Error("a live view follows a db- channel");
    if (this._channels.has(channel)) throw new Error(`${channel} is already joined by this client`);
    const view = new LiveView(channel, filter, idColumn);
    const ch = new Channel(channel, view);
    this._channels.set(channel, ch);
    this._sendJoin(ch);
    try {
      await view._first;
    } catch (err) {
      this._channels.delete(channel);
      throw err;
    }
    return view;
  }

  /** Send `data` (a string) to every member of `channel`; resolves on the relay's `ok`. */
  publish(channel, data) {
    const ch = this._channels.get(channel);
    if (!ch) return Promise.reject(new Error(`join ${channel} before publishing to it`));
    return new Promise((resolve, reject) => {
      const frame = { type: "chan_in", channel, data: String(data) };
      this._sendWithToken(frame, ch, { kind: "publish", resolve, reject, frame });
    });
  }

  /** Authenticate again now with a fresh token; resolves once the relay accepted it. */
  async renew() {
    await this.whenConnected();
    const done = new Promise((resolve) => this._authWaiters.push(resolve));
    this._authenticate();
    return done;
  }

  /** Close for good. */
  close() {
    this._closed = true;
    clearTimeout(this._retryTimer);
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, "client closed");
    this._lost();
    const closed = new DisconnectedError("the client was closed");
    for (const { request } of this._held) if (request.reject) request.reject(closed);
    this._held = [];
    for (const ch of this._channels.values()) for (const w of ch.waiters.splice(0)) w.reject(closed);
  }

  // --- the connection loop ------------------------------------------------------------

  _resetSocketState() {
    this._token = "";
    this._authing = false;
    this._authedHere = false;
    this._paused = null;
    this._authPending = false;
    clearTimeout(this._refreshTimer);
    clearTimeout(this._connectTimer);
    clearInterval(this._beatTimer);
  }

  _open() {
    if (this._closed) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch {
      this._attempt += 1;
      this._retry();
      return;
    }
    this._ws = ws;
    this._heard = true;
    this._pinged = false;
    // A handshake that neither completes nor fails (a relay stopping as it accepted
    // us) is given up after connectTimeout seconds; `init` ends the wait.
    this._connectTimer = setTimeout(() => {
      if (ws === this._ws) this._abandon(ws);
    }, this._connectTimeout * 1000);
    ws.onmessage = (e) => {
      if (ws !== this._ws) return;
      this._heard = true;
      let frame;
      try {
        frame = JSON.parse(typeof e.data === "string" ? e.data : String(e.data));
      } catch {
        return;
      }
      if (frame && typeof frame === "object") this._onFrame(frame);
    };
    ws.onclose = () => {
      if (ws !== this._ws) return;
      this._ws = null;
      const served = this._authedHere;
      this._lost();
      this._attempt = served ? 0 : this._attempt + 1;
      this._retry();
    };
    ws.onerror = () => {}; // onclose follows
    if (this._heartbeat > 0) {
      // A relay gone silent (a dead network) is noticed: nothing heard for a beat
      // gets an echo; nothing heard for another beat ends the socket.
      this._beatTimer = setInterval(() => {
        if (ws !== this._ws) return;
        if (this._heard) {
          this._heard = false;
          this._pinged = false;
        } else if (this._pinged) {
          this._abandon(ws); // no answer: the network is gone
        } else {
          this._sendRaw({ type: "echo", data: "ping" });
          this._pinged = true;
        }
      }, this._heartbeat * 1000);
    }
  }

  _abandon(ws) {
    // close() on a socket still connecting may report nothing for a while: act now.
    ws.onclose = ws.onmessage = null;
    try {
      ws.close();
    } catch {}
    this._ws = null;
    this._lost();
    this._attempt += 1;
    this._retry();
  }

  _retry() {
    if (this._closed) return;
    const delay = backoffDelay(this._attempt, ...this._backoff);
    this._retryTimer = setTimeout(() => this._open(), delay * 1000);
  }

  _lost() {
    const wasConnected = this.connected;
    this.connected = false;
    this._resetSocketState();
    for (const ch of this._channels.values()) {
      ch.joined = false;
      ch.discard = 0;
      for (const r of ch.outstanding) {
        if (r.reject) r.reject(new DisconnectedError(`connection lost before ${ch.name} answered`));
      }
      ch.outstanding = [];
    }
    // Held frames were never sent: publishes go out on the next socket.
    this._held = this._held.filter((h) => h.request.kind === "publish");
    if (wasConnected) this._tell("disconnected", "");
  }

  // --- sending --------------------------------------------------------------------------

  _sendRaw(frame) {
    const ws = this._ws;
    if (ws && ws.readyState === 1) ws.send(JSON.stringify(frame));
  }

  _sendWithToken(frame, ch, request) {
    if (!this._token || this._authing || !this._ws) {
      this._held.push({ frame, ch, request });
      return;
    }
    this._sendRaw({ ...frame, token: this._token });
    ch.outstanding.push(request);
  }

  _sendJoin(ch) {
    const fields = ch.joinFields();
    if (ch.joined || ch.outstanding.some((r) => r.kind === "join" || r.kind === "resume")) {
      ch.discard += 1; // a replacing join on a subscribed socket
    }
    if (ch.view) {
      if (fields.snapshot) this.stats.snapshotsAsked += 1;
      else if (fields.after) this.stats.resumesAsked += 1;
    }
    this._sendWithToken({ type: "join", data: ch.name, ...fields }, ch, { kind: "join", fields });
  }

  _flushHeld() {
    const held = this._held;
    this._held = [];
    for (const { frame, ch, request } of held) {
      if (request.kind === "join") {
        if (this._channels.get(ch.name) === ch) this._sendJoin(ch); // with the fields of now
      } else {
        this._sendWithToken(frame, ch, request);
      }
    }
  }

  // --- authentication -----------------------------------------------------------------------

  _authenticate() {
    if (this._authing || this._authPending || !this._ws) return;
    this._authPending = true;
    const ws = this._ws;
    Promise.resolve()
      .then(() => this._provider())
      .then(
        (token) => {
          if (ws !== this._ws) return;
          this._authPending = false;
          this._authing = true;
          this._expiresAt = tokenExpiry(token);
          this._sendRaw({ type: "auth", data: String(token) });
        },
        (err) => {
          if (ws !== this._ws) return;
          this._authPending = false;
          this._tell("error", `token provider failed: ${err}`);
          ws.close(4101, "no token"); // reconnect with backoff and ask again
        },
      );
  }

  _onToken(token) {
    this._token = token;
    this._authing = false;
    this.stats.auths += 1;
    const first = !this._authedHere;
    this._authedHere = true;
    const paused = this._paused;
    this._paused = null;
    if (first) {
      for (const ch of this._channels.values()) this._sendJoin(ch);
    } else if (paused !== null) {
      // The relay rejoins what it paused (`joined` each, db events replayed); the rest is ours.
      for (const ch of this._channels.values()) {
        if (paused.has(ch.name)) {
          ch.outstanding.push({ kind: "resume" });
          if (ch.view && !ch.view.synced) this._sendJoin(ch); // paused mid-snapshot
        } else if (!ch.outstanding.some((r) => r.kind === "join" || r.kind === "resume")) {
          this._sendJoin(ch);
        }
      }
      this._tell("renewed", "");
    }
    if (first || paused !== null) this._held = this._held.filter((h) => h.request.kind !== "join");
    this._flushHeld();
    if (first) {
      this.connected = true;
      for (const resolve of this._connectedWaiters.splice(0)) resolve();
      this._tell("connected", this.sid);
    }
    this._tell("authenticated", this.sid);
    for (const resolve of this._authWaiters.splice(0)) resolve();
    clearTimeout(this._refreshTimer);
    if (this._expiresAt !== null) {
      const delay = refreshDelay(this._expiresAt, this._margin);
      this._refreshTimer = setTimeout(() => this._authenticate(), delay * 1000);
    }
  }

  // --- receiving --------------------------------------------------------------------------------

  _onFrame(frame) {
    const type = String(frame.type ?? "");
    const data = String(frame.data ?? "");
    const name = String(frame.channel ?? "");
    const pos = String(frame.pos ?? "");
    switch (type) {
      case "init":
        clearTimeout(this._connectTimer);
        this.sid = data;
        this.stats.connections += 1;
        this._authenticate();
        break;
      case "token":
        this._onToken(data);
        break;
      case "error":
        this._onError(name, data, String(frame.reason ?? ""), pos);
        break;
      case "joined":
        this._onJoined(name, pos);
        break;
      case "ok": {
        const ch = this._channels.get(name);
        const r = ch && ch.pop(["publish"]);
        if (r) r.resolve();
        break;
      }
      case "db_created":
      case "db_updated":
      case "db_deleted":
      case "db_synced":
        this._onDb(type, name, data, pos);
        break;
      case "chan_out":
        this._deliver({ type, channel: name, data, pos: "", reason: "" });
        break;
    }
  }

  _onJoined(name, pos) {
    const ch = this._channels.get(name);
    if (!ch) return;
    const request = ch.pop(["join", "resume"]);
    ch.joined = true;
    if (request && request.kind === "join") {
      if (ch.discard) ch.discard -= 1;
      if (ch.view) ch.view._joined(request.fields);
      else if (ch.isDb && !request.fields.after) ch.pos = pos; // a resume's replay follows
    }
    for (const w of ch.waiters.splice(0)) w.resolve();
  }

  _onDb(type, name, data, pos) {
    const ch = this._channels.get(name);
    if (!ch || ch.discard) return; // stale: a replacing join is on its way
    if (ch.view) ch.view._apply(type, data, pos);
    else if (pos && type !== "db_synced") ch.pos = pos;
    this._deliver({ type, channel: name, data, pos, reason: "" });
  }

  _onError(name, text, reason, pos) {
    if (!name) {
      if (text.startsWith(SESSION_EXPIRED)) this._expired();
      else if (text === INVALID_TOKEN && this._authing) {
        this._tell("error", text);
        if (this._ws) this._ws.close(4102, "token refused");
      } else this._tell("error", text);
      return;
    }
    const ch = this._channels.get(name);
    if (reason || text.startsWith(DELAYED)) return this._notice(ch, name, text, reason, pos);
    if (!ch) return this._tell("channel_error", `${name}: ${text}`);
    const request = ch.pop(["join", "resume", "publish"]);
    if (request && request.kind === "publish") {
      if (lapsed(text)) {
        this._held.push({ frame: request.frame, ch, request }); // not delivered: sent again
        this._authenticate();
      } else request.reject(new RefusedError(name, text));
      return;
    }
    this._joinFailed(ch, request, text);
  }

  _joinFailed(ch, request, text) {
    if (request && request.kind === "join" && ch.discard) ch.discard -= 1;
    if (lapsed(text)) {
      this._held.push({ frame: null, ch, request: { kind: "join" } });
      this._authenticate();
      return;
    }
    if (text.includes(RELOAD)) {
      if (ch.view) ch.view._reload = true;
      ch.pos = "";
      this._deliver({ type: "error", channel: ch.name, data: text, pos: "", reason: "pruned" });
      this._sendJoin(ch);
      return;
    }
    if (RETRYABLE.some((t) => text.includes(t))) {
      setTimeout(() => {
        if (this._channels.get(ch.name) === ch && this._ws) this._sendJoin(ch);
      }, backoffDelay(2, ...this._backoff) * 1000);
      return;
    }
    // Refused for good (not a watched table, a bad filter, too many rows, ...).
    this._channels.delete(ch.name);
    if (ch.view) ch.view._refused(text);
    for (const w of ch.waiters.splice(0)) w.reject(new RefusedError(ch.name, text));
    this._tell("channel_error", `${ch.name}: ${text}`);
  }

  _notice(ch, name, text, reason, pos) {
    if (ch && !ch.discard) {
      if (ch.view) ch.view._apply("error", text, pos, reason);
      else if (pos && reason === "truncated") ch.pos = pos;
      if (reason === "dropped") this._channels.delete(name);
      else if (reason === "pruned") {
        ch.pos = "";
        this._sendJoin(ch); // reload: a new snapshot replaces the subscription
      }
    }
    this._deliver({ type: "error", channel: name, data: text, pos, reason });
  }

  _expired() {
    this.stats.expiries += 1;
    this._paused = new Set([...this._channels.values()].filter((c) => c.joined).map((c) => c.name));
    for (const ch of this._channels.values()) ch.joined = false;
    this._tell("expired", "");
    this._authenticate();
  }

  _deliver(msg) {
    for (const key of [msg.channel, "*"]) {
      for (const cb of this._listeners.get(key) || []) {
        try {
          cb(msg);
        } catch (err) {
          console.error("relay.js: message callback failed", err);
        }
      }
    }
  }

  _tell(event, detail) {
    for (const cb of [...this._stateCallbacks]) {
      try {
        cb(event, detail);
      } catch (err) {
        console.error("relay.js: state callback failed", err);
      }
    }
  }
}

/** `connect(url, tokenProvider, options)`: a Client that connects at once and stays
 * connected until `close()`. See relay.d.ts for the options. */
export function connect(url, tokenProvider, options = {}) {
  return new Client(url, tokenProvider, options);
}
