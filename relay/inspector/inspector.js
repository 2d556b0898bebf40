// relay inspector: one WebSocket to this relay, the wire contract by hand.
// Everything shown comes from the network, so it is only ever set as text.

const $ = (id) => document.getElementById(id);
const MAX_LOG = 500;

let ws = null;
let socketToken = "";
let liveChannel = "";
const rows = new Map(); // row id (as JSON text) -> row object
let columns = [];
let adminTimer = null;

function setState(on, text) {
  const el = $("state");
  el.textContent = text;
  el.className = "state " + (on ? "on" : "off");
  for (const id of ["join", "send"]) $(id).disabled = !(on && socketToken);
  $("connect").disabled = on;
  $("disconnect").disabled = !on;
}

function logFrame(direction, frame) {
  const li = document.createElement("li");
  li.className = direction + (frame.type === "error" ? " error" : "");
  li.textContent = (direction === "out" ? "→ " : "← ") + JSON.stringify(frame);
  const log = $("log");
  log.appendChild(li);
  while (log.children.length > MAX_LOG) log.removeChild(log.firstChild);
  li.scrollIntoView({ block: "nearest" });
}

function send(frame) {
  logFrame("out", frame.type === "auth" ? { ...frame, data: "<session token>" } : frame);
  ws.send(JSON.stringify(frame));
}

function connect() {
  const pk = $("public-key").value.trim();
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  ws = new WebSocket(scheme + location.host + "/ws" + (pk ? "?pk=" + encodeURIComponent(pk) : ""));
  socketToken = "";
  setState(false, "connecting");
  ws.onmessage = (event) => onFrame(JSON.parse(event.data));
  ws.onclose = (event) => {
    setState(false, `disconnected (${event.code}${event.reason ? ": " + event.reason : ""})`);
    $("sid").textContent = "";
    $("joined").replaceChildren();
    $("send-channel").replaceChildren();
    ws = null;
  };
}

function onFrame(frame) {
  logFrame("in", frame.type === "token" ? { ...frame, data: "<socket token>" } : frame);
  switch (frame.type) {
    case "init":
      $("sid").textContent = "sid " + frame.data;
      setState(true, "connected");
      if ($("session-token").value.trim()) send({ type: "auth", data: $("session-token").value.trim() });
      break;
    case "token":
      socketToken = frame.data;
      setState(true, "authenticated");
      break;
    case "joined":
      addJoined(frame.channel || frame.data, frame.pos);
      break;
    case "db_created":
    case "db_updated":
      if (frame.channel === liveChannel) upsert(JSON.parse(frame.data));
      break;
    case "db_deleted":
      if (frame.channel === liveChannel) remove(JSON.parse(frame.data));
      break;
    case "db_synced":
      if (frame.channel === liveChannel) $("live-note").textContent = `snapshot loaded (${rows.size} rows), live from ${frame.data}`;
      break;
    case "error":
      if (frame.channel === liveChannel && frame.reason === "truncated") { rows.clear(); render(); }
      if (frame.channel === liveChannel && frame.reason) $("live-note").textContent = frame.data;
      break;
  }
}

function addJoined(name, pos) {
  if (![...$("send-channel").options].some((o) => o.value === name)) {
    const li = document.createElement("li");
    li.textContent = name + (pos ? ` (from ${pos})` : "");
    li.dataset.channel = name;
    $("joined").appendChild(li);
    if (!name.startsWith("db-")) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = name;
      $("send-channel").appendChild(opt);
    }
  }
  if (name.startsWith("db-")) {
    liveChannel = name;
    rows.clear();
    columns = [];
    $("live-channel").textContent = name;
    $("live-note").textContent = "";
    render();
  }
}

const rowKey = (row) => JSON.stringify(row.id);

function upsert(row) {
  for (const col of Object.keys(row)) if (!columns.includes(col)) columns.push(col);
  rows.set(rowKey(row), row);
  render(rowKey(row));
}

function remove(row) {
  rows.delete(rowKey(row));
  render();
}

function cell(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function render(changed) {
  const head = $("rows").tHead.rows[0];
  head.replaceChildren(...columns.map((c) => Object.assign(document.createElement("th"), { textContent: c })));
  const body = $("rows").tBodies[0];
  body.replaceChildren();
  for (const [key, row] of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = key;
    if (key === changed) tr.className = "changed";
    for (const col of columns) {
      const td = document.createElement("td");
      td.textContent = cell(row[col]);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

async function mint() {
  const resp = await fetch("/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user: $("mint-user").value, account: $("mint-account").value, root: $("mint-root").checked }),
  });
  const body = await resp.json();
  if (!resp.ok) { alert(body.error); return; }
  $("session-token").value = body.token;
}

function fillTable(id, rowsOfCells) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rowsOfCells.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(Object.assign(document.createElement("td"), { textContent: String(c) }));
    return tr;
  }));
}

async function pollStatus() {
  const resp = await fetch("/admin/status", { headers: { Authorization: "Bearer " + $("admin-token").value.trim() } });
  const body = await resp.json();
  const out = $("admin-status");
  if (!resp.ok) { out.textContent = body.error || `HTTP ${resp.status}`; return; }
  const l = body.listener;
  const r = body.rates;
  out.textContent = `${body.status}${body.problems.length ? " (" + body.problems.join("; ") + ")" : ""}` +
    ` · ${body.sockets_total} sockets · listener tick ${l.tick} of ${l.newest_tick}` +
    ` · ${r.events_per_second} events/s · ${r.frames_in_per_second} in/s · ${r.frames_out_per_second} out/s`;
  fillTable("admin-sockets", Object.entries(body.sockets));
  fillTable("admin-channels", body.top_channels.map((c) => [c.app, c.channel, c.members]));
}

function watchStatus() {
  if (adminTimer) clearInterval(adminTimer);
  pollStatus();
  adminTimer = setInterval(pollStatus, 2000);
}

document.addEventListener("DOMContentLoaded", async () => {
  $("connect").onclick = connect;
  $("disconnect").onclick = () => ws && ws.close();
  $("mint-button").onclick = mint;
  $("clear").onclick = () => $("log").replaceChildren();
  $("admin-watch").onclick = watchStatus;
  $("join-form").onsubmit = (e) => {
    e.preventDefault();
    const frame = { type: "join", data: $("join-name").value.trim(), token: socketToken };
    if (frame.data.startsWith("db-")) {
      if ($("join-after").value.trim()) frame.after = $("join-after").value.trim();
      if ($("join-filter").value.trim()) frame.filter = $("join-filter").value.trim();
      if ($("join-snapshot").checked) frame.snapshot = "true";
    }
    send(frame);
  };
  $("send-form").onsubmit = (e) => {
    e.preventDefault();
    send({ type: "chan_in", channel: $("send-channel").value, data: $("send-data").value, token: socketToken });
  };
  setState(false, "disconnected");
  const config = await (await fetch("/inspector/config")).json();
  $("mint").hidden = !config.dev_tokens;
  document.body.dataset.ready = "true";
});
