// Token refresh against a real proxy with AUTH_MODE=jwt and
// JWT_EXPIRE_CONNECTIONS=true: the proxy closes the connection with 3000
// when its token's exp passes, and the client asks getToken again and
// reconnects at once. The tokens are signed on the trial side
// (wsproxy.backend.sign_token), through its control server.

import { test } from "node:test";
import assert from "node:assert/strict";
import { WsProxyClient } from "../src/index.js";
import { closeAfter, control, env, needsProxy, newSession, recordStates, redisFor, until } from "./helpers.js";

test("close 3000 (token expired): getToken again, reconnected at once", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const session = newSession("jwt");
  const asked = [];
  // the first token expires within 2 s; the next ones last
  const getToken = async (info) => {
    asked.push(info);
    return control(`/jwt?session=${session}&expires_in=${asked.length === 1 ? 2 : 300}`);
  };
  const client = closeAfter(t, new WsProxyClient({ url: env.url, agent: "a", session, getToken, backoffMs: 5000, maxBackoffMs: 5000 }));
  const states = recordStates(client);
  const got = [];
  client.onmessage = (data) => got.push(data);
  client.connect();
  await until(() => client.state === "open", () => `open, not ${JSON.stringify(states)}`);
  assert.equal(states.find((s) => s.state === "open").protocol, "bearer");

  await until(() => client.reconnects === 1 && client.state === "open", () => `a reconnect, not ${JSON.stringify(states)}`, 10000);
  const expired = states.find((s) => s.state === "reconnecting");
  assert.equal(expired.code, 3000);
  assert.equal(expired.reason, "token expired");
  assert.equal(expired.expired, true);
  assert.equal(expired.delay, 0); // not the 5 s backoff
  assert.deepEqual(asked, [{ attempt: 1, code: undefined }, { attempt: 2, code: 3000 }]);
  assert.ok(!client.socketUrl.includes("ey"), client.socketUrl); // no token in the URL

  await until(async () => (await redis.command("PUBLISH", `session:${session}:down`, "after refresh")) === 1, "the proxy's subscription");
  await until(() => got.includes("after refresh"), "a message on the new connection");
});

test("a token the proxy refuses, from getToken: counted, then failed", needsProxy, async (t) => {
  const session = newSession("jwt-bad");
  let calls = 0;
  const getToken = async () => {
    calls += 1;
    return "eyJhbGciOiJIUzI1NiJ9.eyJzZXNzaW9uX2lkIjoieCJ9.bad-signature";
  };
  const client = closeAfter(t, new WsProxyClient({ url: env.url, agent: "a", session, getToken, backoffMs: 20, maxBackoffMs: 20, maxFailures: 2 }));
  const states = recordStates(client);
  client.connect();
  await until(() => client.state === "failed", () => `failed, not ${JSON.stringify(states)}`);
  assert.equal(calls, 2);
  assert.match(states.at(-1).message, /getToken failed, or its token was refused/);
});
