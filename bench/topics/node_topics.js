// A COPY of ../shared/peers/node_bridge.js, extended for the topics benchmark
// (python -m bench.topics, issue 27) with the same fan-out as wsproxy's topics:
// after the token check, SMEMBERS session:{sid}:topics; per topic one Redis
// subscription per process on topic:T:down (Map topic -> Set(ws): subscribed at
// the topic's first socket, unsubscribed at its last), and per message one loop
// of ws.send over the topic's sockets (text or binary decided once per message).
// Everything else is the bridge as it is: the peer for side-by-side benchmarks,
// the bridge a Node.js team would write in an afternoon (ws + ioredis, with
// bufferutil/utf-8-validate), same contract as wsproxy's core:
// GET /{agent}/ws/{sid}, Bearer token checked against session:{sid}:auth (GET + EXPIRE),
// one shared subscriber connection, subscribe confirmed before 101, :down -> client, client -> :up.
//   node node_topics.js PORT REDIS_URL      (NODE_PATH must hold ws and ioredis)
const http = require("http");
const { WebSocketServer } = require("ws");
const Redis = require("ioredis");

const port = Number(process.argv[2] || 8080);
const url = process.argv[3] || "redis://127.0.0.1:6379";
const cmd = new Redis(url, { enableAutoPipelining: true });
const sub = new Redis(url);
const listeners = new Map(); // channel -> Set(ws)
// topic -> { sockets: Set(ws), ready: Promise of the subscription }
const topics = new Map();
const TOPIC_CHANNEL = /^topic:(.+):down$/;

sub.on("messageBuffer", (channel, message) => {
  const name = channel.toString();
  let set = listeners.get(name);
  if (!set) {
    const m = TOPIC_CHANNEL.exec(name);
    const topic = m && topics.get(m[1]);
    if (!topic) return;
    set = topic.sockets;
  }
  let text = true;
  try { new TextDecoder("utf-8", { fatal: true }).decode(message); } catch { text = false; }
  for (const ws of set) ws.send(message, { binary: !text });
});

// joins ws's topics, subscribing to each topic new to this process
async function joinTopics(names) {
  const joined = [];
  for (const name of names) {
    let topic = topics.get(name);
    if (!topic) {
      topic = { sockets: new Set(), ready: sub.subscribe(`topic:${name}:down`) };
      topics.set(name, topic);
    }
    joined.push(topic);
  }
  await Promise.all(joined.map((t) => t.ready));
  return joined;
}

function leaveTopics(ws, names) {
  for (const name of names) {
    const topic = topics.get(name);
    if (!topic) continue;
    topic.sockets.delete(ws);
    if (!topic.sockets.size) { topics.delete(name); sub.unsubscribe(`topic:${name}:down`); }
  }
}

const wss = new WebSocketServer({ noServer: true, maxPayload: 1 << 20 });
const server = http.createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ status: "healthy", redis: "connected", active_connections: wss.clients.size,
                             topics: topics.size }));
    return;
  }
  res.writeHead(404); res.end();
});

server.on("upgrade", async (req, socket, head) => {
  const m = /^\/([^/]+)\/ws\/([A-Za-z0-9._~-]{1,128})(\?|$)/.exec(req.url);
  if (!m) { socket.end("HTTP/1.1 404 Not Found\r\n\r\n"); return; }
  const sid = m[2];
  const auth = req.headers["authorization"] || "";
  const token = auth.startsWith("Bearer ") ? auth.slice(7) : null;
  if (!token) { socket.end("HTTP/1.1 401 Unauthorized\r\n\r\n"); return; }
  let names = [];
  try {
    const stored = await cmd.getBuffer(`session:${sid}:auth`);
    const given = Buffer.from(token);
    if (!stored || stored.length !== given.length || !require("crypto").timingSafeEqual(stored, given)) {
      socket.end("HTTP/1.1 403 Forbidden\r\n\r\n"); return;
    }
    await cmd.expire(`session:${sid}:auth`, 10800);
    names = (await cmd.smembers(`session:${sid}:topics`)).sort();
    const down = `session:${sid}:down`;
    if (!listeners.has(down)) { listeners.set(down, new Set()); await sub.subscribe(down); }
    const joined = await joinTopics(names);
    wss.handleUpgrade(req, socket, head, (ws) => {
      listeners.get(down).add(ws);
      for (const topic of joined) topic.sockets.add(ws);
      const up = `session:${sid}:up`;
      ws.on("message", (data) => { cmd.publish(up, data); });
      ws.on("close", () => {
        const set = listeners.get(down);
        if (set) { set.delete(ws); if (!set.size) { listeners.delete(down); sub.unsubscribe(down); } }
        leaveTopics(ws, names);
      });
    });
  } catch (e) {
    socket.end("HTTP/1.1 503 Service Unavailable\r\n\r\n");
  }
});

server.listen(port, "127.0.0.1");
