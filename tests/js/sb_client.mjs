// Drives the published @staticbackend/js client against a relay:
//   node sb_client.mjs WS_BASE_URL SESSION_TOKEN CHANNEL
// Prints every frame it receives as one JSON line; exits 0 after its own
// message comes back on the channel, 2 on timeout.
import { Backend } from "@staticbackend/js";

const [base, token, channel] = process.argv.slice(2);
const out = (o) => console.log(JSON.stringify(o));
const bkn = new Backend("", base); // a base URL of 10+ characters is used as is

bkn.connectWS(
  token,
  (socketToken) => {
    out({ type: "onAuth", data: socketToken });
    bkn.sendWS(bkn.types.join, channel);
  },
  (pl) => {
    out(pl);
    if (pl.type === "joined") bkn.sendWS(bkn.types.chanIn, "hello from js", channel);
    if (pl.type === "chan_out" && pl.data === "hello from js") process.exit(0);
  },
);

// connectWS answers `init` by authenticating through its SSE sender (a bug of
// @staticbackend/js 1.7.0), so authenticate over the socket once init is in.
const waitForInit = setInterval(() => {
  if (bkn.wsId) {
    clearInterval(waitForInit);
    bkn.sendWS(bkn.types.auth, token);
  }
}, 10);
setTimeout(() => process.exit(2), 10000);
