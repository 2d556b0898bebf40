// The test driver of relay.js, shared by Node (relay_views.mjs) and headless Chromium
// (tests/test_relay_js.py): one client and one live view per user, and the commands
// the Python side sends. `relay` is the module as a relay served it; `mint(user,
// account, ttlSeconds)` returns a session token (or a promise of one).

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

export async function createDriver({ relay, mint, wsUrl, users: spec, channel }) {
  const users = {};
  for (const { user, account, filter } of spec) {
    const u = { user, account, filter, ttl: 3600, gate: null };
    // The token provider: a fresh token each call; stalls while the test holds the gate.
    const provider = async () => {
      if (u.gate) await u.gate.promise;
      return mint(user, account, u.ttl);
    };
    u.client = relay.connect(wsUrl, provider, {
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
  for (const u of Object.values(users)) {
    u.view = await u.client.liveView(channel, { filter: u.filter });
  }

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
      case "close":
        for (const x of Object.values(users)) x.client.close();
        return {};
    }
    throw new Error(`unknown command ${cmd.cmd}`);
  }
  return { run };
}
