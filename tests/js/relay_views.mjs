// Drives relay.js, fetched from a running relay, for tests/test_relay_js.py:
//   node --experimental-websocket relay_views.mjs HTTP_BASE JWT_SECRET CHANNEL USERS_JSON
// One client and one live view per user ({user, account, filter}). Reads one JSON
// command per line on stdin, answers each with {"ev": "done", "id": ...} on stdout.
import { createHmac } from "node:crypto";
import readline from "node:readline";

const [base, secret, channel, usersJson] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");

// The module exactly as the relay serves it.
const response = await fetch(base + "/relay.js");
const contentType = response.headers.get("content-type");
const source = await response.text();
const relay = await import("data:text/javascript;base64," + Buffer.from(source).toString("base64"));

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
function mint(user, account, ttl) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub: user, account_id: account, iat: now, exp: now + ttl });
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

const users = {};
for (const { user, account, filter } of JSON.parse(usersJson)) {
  const u = { user, account, filter, ttl: 3600, gate: null };
  // The token provider: a fresh token each call; stalls while the test holds the gate.
  const provider = async () => {
    if (u.gate) await u.gate.promise;
    return mint(user, account, u.ttl);
  };
  u.client = relay.connect(base.replace(/^http/, "ws") + "/ws", provider, {
    backoffBase: 0.05,
    backoffMax: 0.5,
    connectTimeout: 2,
  });
  u.nextState = (wanted) =>
    new Promise((resolve) => {
      const stop = u.client.onState((event) => {
        if (event === wanted) {
          stop();
          resolve();
        }
      });
    });
  users[user] = u;
}
for (const u of Object.values(users)) u.view = await u.client.liveView(channel, { filter: u.filter });
out({ ev: "ready", contentType });

async function run(cmd) {
  const u = users[cmd.user];
  switch (cmd.cmd) {
    case "connected":
      await Promise.all(Object.values(users).map((x) => x.client.whenConnected()));
      return {};
    case "expire": {
      // A 2 s session whose renewal stalls past its exp: the session lapses on the relay.
      u.ttl = 2;
      u.gate = null;
      await u.client.renew();
      u.gate = deferred();
      await u.nextState("expired");
      const renewed = u.nextState("renewed");
      u.ttl = 3600;
      u.gate.resolve();
      u.gate = null;
      await renewed;
      return {};
    }
    case "rows": {
      if (!u.view.rows.has(cmd.until)) {
        await new Promise((resolve) => {
          const stop = u.view.onChange((kind, id) => {
            if (id === cmd.until && kind !== "deleted") {
              stop();
              resolve();
            }
          });
        });
      }
      return { rows: Object.fromEntries(u.view.rows), synced: u.view.synced };
    }
    case "chat": {
      await u.client.join(cmd.room);
      const heard = new Promise((resolve) => {
        const stop = u.client.onMessage(cmd.room, (msg) => {
          stop();
          resolve(msg);
        });
      });
      await u.client.publish(cmd.room, cmd.text);
      return { heard: await heard };
    }
    case "counts": {
      const counts = {};
      for (const [name, x] of Object.entries(users)) {
        counts[name] = {
          connections: x.client.stats.connections,
          expiries: x.client.stats.expiries,
          snapshots: x.view.snapshots,
          resumes_asked: x.client.stats.resumesAsked,
        };
      }
      return { counts };
    }
    case "exit":
      for (const x of Object.values(users)) x.client.close();
      setTimeout(() => process.exit(0), 50);
      return {};
  }
  throw new Error(`unknown command ${cmd.cmd}`);
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  run(cmd).then(
    (result) => out({ ev: "done", id: cmd.id, ...result }),
    (err) => out({ ev: "done", id: cmd.id, error: String(err && err.stack) }),
  );
});
