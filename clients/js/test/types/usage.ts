// A typed use of the whole public API, checked with tsc --noEmit
// (tests/test_js_client.py test_type_declarations); never run. The lines
// marked @ts-expect-error must not compile.

import {
  State,
  WsProxyClient,
  webSocketTransport,
  type ClientState,
  type MessageInfo,
  type RecoveryInfo,
  type StateDetail,
  type Transport,
  type WsProxyClientOptions,
} from "@wsproxy/client";

const options: WsProxyClientOptions = {
  url: "wss://proxy.example.com", agent: "app", session: "s1", token: "t0k",
  tokenIn: "query", resume: true, labels: true, ack: true, position: "0a:1-1",
  topicPositions: { news: "0a:1-2" }, backoffMs: 500, maxFailures: 10,
};
const client = new WsProxyClient(options);
const jwt = new WsProxyClient({
  url: "wss://p", session: "s", getToken: async ({ attempt, code }) => `${attempt}.${code ?? 0}.s`,
});
const ticket = new WsProxyClient({ url: "wss://p", session: "s", getTicket: () => "ticket-0123456789abcdef" });
// @ts-expect-error: two credentials
new WsProxyClient({ url: "wss://p", session: "s", token: "a", getToken: async () => "b" });
// @ts-expect-error: no credential
new WsProxyClient({ url: "wss://p", session: "s" });
// @ts-expect-error: tokenIn is one of two
new WsProxyClient({ url: "wss://p", session: "s", token: "a", tokenIn: "header" });

client.onmessage = (data, info: MessageInfo) => {
  const text: string = typeof data === "string" ? data : String(data.byteLength);
  const topic: string | null = info.topic;
  void text, topic, info.position, info.isBinary;
};
client.onstatechange = (state: ClientState, detail: StateDetail) => {
  if (state === State.RECONNECTING) void detail.delay;
  if (detail.state === "failed") void detail.message;
};
client.onrecovery = (info: RecoveryInfo) => void [info.topic, info.recovered, info.replayed, info.position, info.reason];
client.onack = ({ id, position }) => void [id.length, position.length];
client.onnack = ({ id, reason }) => void [id, reason];
client.addEventListener("statechange", (event) => void event.detail.reconnects);
client.addEventListener("message", (event) => void event.detail.data);
client.addEventListener("recovery", (event) => void event.detail.recovered);
client.addEventListener("ack", (event) => void event.detail.id);

const sent: boolean | string = client.send("hello", "m1");
client.send(new Uint8Array([1, 2]));
const same: WsProxyClient = client.connect();
void [sent, same, client.unacked.length, client.position, client.topicPositions["news"],
  client.socketUrl, client.transport, client.forgetTopic("news"), client.state, client.reconnects,
  client.attempts, client.failures, jwt, ticket];
client.close(1000, "bye");

// a second transport plugs in like this
const custom: Transport = {
  name: "sse",
  open({ url, protocols }, events) {
    void [url, protocols];
    setTimeout(() => events.close({ code: 1006, reason: "", wasClean: false }), 0);
    return { send: () => {}, close: () => {}, isOpen: () => false };
  },
};
new WsProxyClient({ url: "wss://p", session: "s", token: "t", transports: [webSocketTransport(), custom] });
new WsProxyClient({ url: "wss://p", session: "s", token: "t", WebSocket: globalThis.WebSocket });
