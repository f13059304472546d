// What the tests against a real proxy share (not a test file: node --test
// runs it too on Node 20, where every .js under test/ counts, and it
// declares no test). tests/test_js_client.py starts redis-server, the
// daemon with the settings each file needs and a small control server, then
// runs one file with:
//
//   WSPROXY_URL           the proxy's base URL, ws://127.0.0.1:<port>
//   WSPROXY_REDIS_PORT    its redis-server's port on 127.0.0.1
//   WSPROXY_CONTROL       http://127.0.0.1:<port>: POST /restart (a new
//                         daemon on the same port, answered once it is
//                         healthy), POST /jwt?session=S&expires_in=N (a JWT
//                         signed with wsproxy.backend.sign_token)
//
// Without them (npm test alone) the files that need a proxy skip.

import net from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

export const env = {
  url: process.env.WSPROXY_URL || "",
  redisPort: Number(process.env.WSPROXY_REDIS_PORT || 0),
  control: process.env.WSPROXY_CONTROL || "",
};

/** node:test's skip option: a reason when there is no proxy to test against. */
export const needsProxy = env.url && env.redisPort
  ? {}
  : { skip: "no proxy: run PYTHONPATH=$PWD trial tests.test_js_client from the repository" };

let sessions = 0;
/** A session id of its own for each test. */
export function newSession(prefix = "js") {
  sessions += 1;
  return `${prefix}-${process.pid}-${sessions}-${Math.random().toString(36).slice(2, 8)}`;
}

/** Wait until check() is truthy (and return it); fail after timeoutMs with what(). */
export async function until(check, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${typeof what === "function" ? what() : what}`);
    }
    await sleep(10);
  }
}

/** POST to the trial side's control server; its answer as text. */
export async function control(path) {
  if (!env.control) throw new Error("WSPROXY_CONTROL is not set");
  const response = await fetch(`${env.control}${path}`, { method: "POST" });
  const text = await response.text();
  if (!response.ok) throw new Error(`control ${path}: ${response.status} ${text}`);
  return text;
}

// -- a minimal Redis client (RESP2 over a TCP socket) -----------------------

/**
 * One reply parsed from buf at offset: [value, next offset], or null if the
 * buffer does not hold all of it yet. Bulk strings come as Buffers, errors
 * as Error objects (not thrown), arrays as arrays, nil as null.
 */
function parseReply(buf, offset) {
  const end = buf.indexOf("\r\n", offset);
  if (end < 0) return null;
  const kind = String.fromCharCode(buf[offset]);
  const line = buf.toString("utf8", offset + 1, end);
  const next = end + 2;
  switch (kind) {
    case "+":
      return [line, next];
    case "-":
      return [new Error(line), next];
    case ":":
      return [Number(line), next];
    case "$": {
      const length = Number(line);
      if (length < 0) return [null, next];
      if (buf.length < next + length + 2) return null;
      return [buf.subarray(next, next + length), next + length + 2];
    }
    case "*": {
      const count = Number(line);
      if (count < 0) return [null, next];
      const items = [];
      let at = next;
      for (let i = 0; i < count; i++) {
        const item = parseReply(buf, at);
        if (!item) return null;
        items.push(item[0]);
        at = item[1];
      }
      return [items, at];
    }
    default:
      throw new Error(`unexpected RESP reply type ${JSON.stringify(kind)}`);
  }
}

function encodeCommand(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = Buffer.isBuffer(arg) ? arg : Buffer.from(String(arg));
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from("\r\n"));
  }
  return Buffer.concat(parts);
}

/**
 * A Redis connection: await redis.command("SET", "k", "v"). Replies as
 * parseReply gives them; an error reply rejects. After subscribe(), pushed
 * messages go to its callback (channel and message as strings).
 */
export class Redis {
  static connect(port = env.redisPort, host = "127.0.0.1") {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ port, host }, () => {
        socket.off("error", reject);
        resolve(new Redis(socket));
      });
      socket.once("error", reject);
    });
  }

  constructor(socket) {
    this.socket = socket;
    this.buffer = Buffer.alloc(0);
    this.pending = [];
    this.onpush = null;
    socket.on("data", (data) => this._data(data));
    socket.on("error", (err) => this._fail(err));
    socket.on("close", () => this._fail(new Error("Redis connection closed")));
  }

  _data(data) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, data]) : data;
    let offset = 0;
    for (;;) {
      const parsed = parseReply(this.buffer, offset);
      if (!parsed) break;
      offset = parsed[1];
      const value = parsed[0];
      if (this.onpush && Array.isArray(value) && String(value[0]) === "message") {
        this.onpush(String(value[1]), value[2].toString("utf8"));
        continue;
      }
      const waiter = this.pending.shift();
      if (!waiter) continue;
      if (value instanceof Error) waiter.reject(value);
      else waiter.resolve(value);
    }
    this.buffer = this.buffer.subarray(offset);
  }

  _fail(err) {
    for (const waiter of this.pending.splice(0)) waiter.reject(err);
  }

  command(...args) {
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve, reject });
      this.socket.write(encodeCommand(args));
    });
  }

  /** SUBSCRIBE channel on this (then dedicated) connection. */
  async subscribe(channel, onMessage) {
    this.onpush = onMessage;
    await this.command("SUBSCRIBE", channel);
  }

  close() {
    this.socket.destroy();
  }
}

/** A fresh Redis connection, closed when the test ends. */
export async function redisFor(t) {
  const redis = await Redis.connect();
  t.after(() => redis.close());
  return redis;
}

/** Whatever the test leaves open is closed when it ends. */
export function closeAfter(t, client) {
  t.after(() => client.close());
  return client;
}

/** A client's states and details, as it goes. */
export function recordStates(client) {
  const states = [];
  client.addEventListener("statechange", (event) => states.push(event.detail));
  return states;
}

/** An XRANGE entry as { entry: its id, fields: {name: value} } (strings). */
export function fieldsOf([entry, flat]) {
  const fields = {};
  for (let i = 0; i < flat.length; i += 2) fields[flat[i].toString()] = flat[i + 1].toString();
  return { entry: entry.toString(), fields };
}
