// Drives relay.js, fetched from a running relay, for tests/test_relay_js.py:
//   node --experimental-websocket relay_views.mjs HTTP_BASE JWT_SECRET CHANNEL USERS_JSON
// One client and one live view per user ({user, account, filter}; see views_driver.mjs).
// Reads one JSON command per line on stdin, answers each with {"ev": "done", "id": ...}.
import { createHmac } from "node:crypto";
import readline from "node:readline";
import { createDriver } from "./views_driver.mjs";

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

const driver = await createDriver({
  relay,
  mint,
  wsUrl: base.replace(/^http/, "ws") + "/ws",
  users: JSON.parse(usersJson),
  channel,
});
out({ ev: "ready", contentType });

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  driver.run(cmd).then(
    (result) => {
      out({ ev: "done", id: cmd.id, ...result });
      if (cmd.cmd === "close") setTimeout(() => process.exit(0), 50);
    },
    (err) => out({ ev: "done", id: cmd.id, error: String(err && err.stack) }),
  );
});
