// Type declarations for @wsproxy/client (src/index.js); the behaviour is
// described in src/index.js's header and README.md.

/** The client's states. */
export declare const State: Readonly<{
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
  FAILED: "failed";
}>;
export type ClientState = (typeof State)[keyof typeof State];

/** What getToken and getTicket are called with, before every attempt. */
export interface CredentialRequest {
  /** The attempt's number (client.attempts), from 1. */
  attempt: number;
  /** The close code that ended the last connection or attempt; undefined after connect(). */
  code: number | undefined;
}

export type CredentialCallback = (request: CredentialRequest) => string | Promise<string>;

/** A message from the backend; an ArrayBuffer for binary frames. */
export type MessageData = string | ArrayBuffer;
/** What send() takes (Blobs only without ack). */
export type SendData = string | ArrayBuffer | ArrayBufferView | Blob;

/** Where a message came from (labels: true). */
export interface MessageInfo {
  /** The topic's name, or null for a message to the session itself. */
  topic: string | null;
  /** The message's position (a recoverable message), or null. */
  position: string | null;
  isBinary: boolean;
}

/** A recovery report (resume: true): after each open, and on a gap. */
export interface RecoveryInfo {
  /** With labels: the topic the report is about, null for the session's own. */
  topic?: string | null;
  /** false: messages were lost (reload the application's state). */
  recovered: boolean;
  /** How many replayed messages follow. */
  replayed: number;
  position: string | null;
  reason: string;
}

export interface AckInfo {
  id: string;
  /** The stream entry's id. */
  position: string;
}

export interface NackInfo {
  id: string;
  reason: string;
}

/** The detail of a state change (onstatechange, the "statechange" event). */
export interface StateDetail {
  state: ClientState;
  previous: ClientState;
  reconnects: number;
  failures: number;
  /** connecting: the attempt's number and the proxy's base URL. */
  attempt?: number;
  url?: string;
  /** open: the subprotocol the server chose ("bearer", or "") and the transport's name. */
  protocol?: string;
  transport?: string;
  /** reconnecting, closed, failed: how the last connection or attempt ended. */
  code?: number;
  reason?: string;
  wasClean?: boolean;
  /** reconnecting: the delay before the next attempt, ms. */
  delay?: number;
  /** reconnecting after close 3000 with getToken. */
  expired?: boolean;
  /** closed: by close() (true) or by the server (false). */
  byClient?: boolean;
  /** A credential callback's or a transport's error. */
  error?: string;
  /** failed: why the client gave up. */
  message?: string;
}

/** What a transport's open() is asked to reach. */
export interface TransportTarget {
  /** The WebSocket URL of the attempt, with its query. */
  url: string;
  /** ["bearer", token] when the token travels as the subprotocol. */
  protocols: [string, string] | undefined;
}

export interface CloseInfo {
  code: number;
  reason: string;
  wasClean: boolean;
}

/** What a transport reports to the client (never synchronously from open()). */
export interface TransportEvents {
  open(protocol: string): void;
  message(data: MessageData): void;
  /** Once, at the end, also when the attempt never opened (1006). */
  close(info: CloseInfo): void;
}

/** One attempt's connection, as a transport returns it. */
export interface TransportConnection {
  send(data: string | ArrayBuffer | ArrayBufferView | Blob): void;
  close(code?: number, reason?: string): void;
  isOpen(): boolean;
}

/** A way to carry a connection (WebSocket; later SSE + POST). */
export interface Transport {
  name: string;
  /** May throw if the transport cannot start here. */
  open(target: TransportTarget, events: TransportEvents): TransportConnection;
}

/** A WebSocket class (the browser's, Node's, the ws package's). */
export interface WebSocketClass {
  new (url: string, protocols?: string | string[]): any;
  readonly OPEN?: number;
}

/** The WebSocket transport, with the global WebSocket or the class given. */
export declare function webSocketTransport(options?: { WebSocket?: WebSocketClass | null }): Transport;

interface CommonOptions {
  /** The proxy's base URL, no path: "wss://proxy.example.com". */
  url: string;
  /** The agent id in the path (default "app"). */
  agent?: string;
  /** The session id. */
  session: string;
  /** Where a token travels (default "subprotocol"). */
  tokenIn?: "subprotocol" | "query";
  backoffMs?: number;
  maxBackoffMs?: number;
  /** Consecutive attempts that never opened before "failed" (default 10). */
  maxFailures?: number;
  connectTimeoutMs?: number;
  stableMs?: number;
  /** Resumable session (the proxy needs RESUME=true). */
  resume?: boolean;
  /** With resume: the position to resume from at the first connect. */
  position?: string;
  /** Acknowledged sends (the proxy needs UPSTREAM=stream). */
  ack?: boolean;
  /** Labelled topics (the proxy needs TOPICS=true). */
  labels?: boolean;
  /** With resume and labels: {topic: position} to resume from at the first connect. */
  topicPositions?: Record<string, string> | null;
  nackRetryMs?: number;
  maxUnacked?: number;
  /** The WebSocket class of the default transport (default: the global one). */
  WebSocket?: WebSocketClass | null;
  /** Transports in order of preference (default: [webSocketTransport()]). */
  transports?: Transport[] | null;
}

/** Exactly one credential: a static token, or a callback per attempt. */
export type WsProxyClientOptions = CommonOptions &
  (
    | { token: string; getToken?: undefined; getTicket?: undefined }
    | { getToken: CredentialCallback; token?: undefined; getTicket?: undefined }
    | { getTicket: CredentialCallback; token?: undefined; getToken?: undefined }
  );

export interface WsProxyClientEventMap {
  statechange: CustomEvent<StateDetail>;
  message: CustomEvent<{ data: MessageData; isBinary: boolean; topic?: string | null; position?: string | null }>;
  recovery: CustomEvent<RecoveryInfo>;
  ack: CustomEvent<AckInfo>;
  nack: CustomEvent<NackInfo>;
}

export declare class WsProxyClient extends EventTarget {
  constructor(options: WsProxyClientOptions);
  /** The options with the defaults filled in. */
  readonly options: Required<CommonOptions> & { token?: string; getToken?: CredentialCallback; getTicket?: CredentialCallback };
  readonly state: ClientState;
  /** Successful opens after the first one. */
  readonly reconnects: number;
  /** Connection attempts made. */
  readonly attempts: number;
  /** Consecutive attempts that never reached open. */
  readonly failures: number;
  /** Without labels: (data, isBinary); with labels: (data, info). */
  onmessage: ((data: MessageData, info: any) => void) | null;
  onstatechange: ((state: ClientState, detail: StateDetail) => void) | null;
  onrecovery: ((info: RecoveryInfo) => void) | null;
  onack: ((info: AckInfo) => void) | null;
  onnack: ((info: NackInfo) => void) | null;
  /** With ack: the ids not acknowledged yet, oldest first. */
  readonly unacked: string[];
  /** The name of the transport the current or next attempt uses. */
  readonly transport: string;
  /** The WebSocket URL (never with a token or ticket from a callback). */
  readonly socketUrl: string;
  /** With resume: the last position received ("" before the first). */
  readonly position: string;
  /** With resume and labels: {topic: the last position received on it}. */
  readonly topicPositions: Record<string, string>;
  /** With resume and labels: stop asking to resume this topic. */
  forgetTopic(topic: string): boolean;
  /** Start connecting (again, after "closed" or "failed"). */
  connect(): this;
  /** Without ack: false if not open. With ack: the message's id, or false if maxUnacked wait. */
  send(data: SendData, id?: string): boolean | string;
  /** Close normally and stop reconnecting. */
  close(code?: number, reason?: string): void;
  addEventListener<K extends keyof WsProxyClientEventMap>(
    type: K, listener: (event: WsProxyClientEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof WsProxyClientEventMap>(
    type: K, listener: (event: WsProxyClientEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}
