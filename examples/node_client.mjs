// A Node client for wsproxy: the client package (clients/js, @wsproxy/client;
// the same module the browser page uses) under Node's own WebSocket, with
// labels and resume, printing what arrives:
//
//   node examples/node_client.mjs ws://127.0.0.1:8080 demo s3cret            # Node 22+
//   node --experimental-websocket examples/node_client.mjs ws://127.0.0.1:8080 demo s3cret  # Node 20, 21
//
// Arguments: the proxy's base URL (no path), the session id, its token;
// options: --agent A (default app), --no-resume (a proxy without RESUME=true),
// --no-labels (a proxy without TOPICS=true). Needs no npm install: it imports
// ../clients/js/src/index.js (an application would import "@wsproxy/client").
//
// Output (stdout): "[#topic] message" for a message on a topic, "< message"
// for one to the session itself (binary ones as "<n> bytes: <hex>"); states
// and recovery reports on stderr. Ctrl-C closes normally (1000).

if (typeof WebSocket === "undefined") {
  console.error("node_client: this Node has no global WebSocket: use Node 22 or later, " +
    "or run it with node --experimental-websocket (Node 20.10+, 21)");
  process.exit(2);
}

const { WsProxyClient } = await import(new URL("../clients/js/src/index.js", import.meta.url));

const args = process.argv.slice(2);
const flag = (name) => {
  const at = args.indexOf(name);
  if (at < 0) return false;
  args.splice(at, 1);
  return true;
};
const option = (name, fallback) => {
  const at = args.indexOf(name);
  if (at < 0) return fallback;
  const [, value] = args.splice(at, 2);
  return value;
};
const agent = option("--agent", "app");
const resume = !flag("--no-resume");
const labels = !flag("--no-labels");
if (args.length !== 3 || args.some((a) => a.startsWith("--"))) {
  console.error("usage: node_client.mjs URL SESSION TOKEN [--agent A] [--no-resume] [--no-labels]");
  process.exit(2);
}
const [url, session, token] = args;

const hex = (buffer) => Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join(" ");
const shown = (data, isBinary) => (isBinary ? `${data.byteLength} bytes: ${hex(data)}` : data);

const client = new WsProxyClient({ url, agent, session, token, resume, labels, maxFailures: 5 });
client.onmessage = (data, info) => {
  if (!labels) {
    console.log(`< ${shown(data, info)}`);
  } else if (info.topic !== null) {
    console.log(`[#${info.topic}] ${shown(data, info.isBinary)}`);
  } else {
    console.log(`< ${shown(data, info.isBinary)}`);
  }
};
client.onrecovery = ({ topic, recovered, replayed, reason }) => {
  const what = topic ? `#${topic}` : "session";
  console.error(recovered ? `recovery ${what}: ${replayed} replayed` : `recovery ${what}: LOST (${reason})`);
};
client.onstatechange = (state, detail) => {
  const why = detail.code !== undefined ? ` (${detail.code}${detail.reason ? ` ${detail.reason}` : ""})` : "";
  console.error(`state: ${state}${why}`);
  if (state === "closed" || state === "failed") process.exit(state === "closed" ? 0 : 1);
};
process.on("SIGINT", () => client.close());
process.on("SIGTERM", () => client.close());
client.connect();
