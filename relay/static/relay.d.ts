// Types of relay.js, the JavaScript client served by relay at GET /relay.js.

/** A session token (a JWT), or a promise of one; called on every (re)connect and renewal. */
export type TokenProvider = () => string | Promise<string>;

export interface ConnectOptions {
  /** The app's public key (sent as the `pk` query parameter). */
  publicKey?: string;
  /** A WebSocket constructor, where there is no global one (e.g. the `ws` package). */
  WebSocket?: new (url: string) => WebSocket;
  /** Reconnect backoff in seconds: the first delay, and the longest (defaults 0.25, 10). */
  backoffBase?: number;
  backoffMax?: number;
  /** Renew the session this many seconds before `exp` (or at 3/4 of a shorter life). Default 30. */
  refreshMargin?: number;
  /** Give up a connection attempt that has not reached `init` after this many seconds. Default 10. */
  connectTimeout?: number;
  /** Seconds of silence before the client checks the relay with an echo (0: never). Default 30. */
  heartbeat?: number;
}

export interface Message {
  /** "chan_out", "db_created", "db_updated", "db_deleted", "db_synced" or "error" (a notice). */
  type: string;
  channel: string;
  data: string;
  pos: string;
  /** For notices: "truncated", "dropped", "pruned" or "". */
  reason: string;
}

export type ChangeKind = "created" | "updated" | "deleted";
export type Row = Record<string, unknown>;

export type StateEvent =
  | "connected"
  | "authenticated"
  | "expired"
  | "renewed"
  | "disconnected"
  | "error"
  | "channel_error";

export interface Stats {
  connections: number;
  auths: number;
  expiries: number;
  snapshotsAsked: number;
  resumesAsked: number;
}

export class LiveView {
  readonly channel: string;
  readonly filter: string | null;
  readonly idColumn: string;
  /** The rows by id (as a string). */
  rows: Map<string, Row>;
  /** True once a snapshot is complete; false while a reload is in progress. */
  synced: boolean;
  /** The subscription ended for good (table dropped, join refused); `error` says why. */
  ended: boolean;
  error: string | null;
  /** The `pos` of the last event applied. */
  position: string;
  /** Snapshots completed (1 + reloads). */
  snapshots: number;
  onChange(cb: (kind: ChangeKind, id: string, row: Row | null) => void): () => void;
  whenSynced(): Promise<void>;
}

export class RefusedError extends Error {
  channel: string;
  text: string;
}

export class DisconnectedError extends Error {}

export class Client {
  readonly url: string;
  sid: string;
  connected: boolean;
  stats: Stats;
  onState(cb: (event: StateEvent, detail: string) => void): () => void;
  /** Every frame on `channel` (every channel: null). */
  onMessage(channel: string | null, cb: (msg: Message) => void): () => void;
  whenConnected(): Promise<void>;
  /** Join and stay joined across reconnects; rejects with RefusedError. */
  join(channel: string): Promise<void>;
  /** A Map of rows of a db- channel kept in sync; resolves after the first snapshot. */
  liveView(channel: string, options?: { filter?: string | null; idColumn?: string }): Promise<LiveView>;
  /** Resolves on the relay's `ok`; rejects with RefusedError or DisconnectedError. */
  publish(channel: string, data: string): Promise<void>;
  /** Authenticate again now with a fresh token. */
  renew(): Promise<void>;
  close(): void;
}

export function connect(url: string, tokenProvider: TokenProvider, options?: ConnectOptions): Client;
export function backoffDelay(attempt: number, base: number, cap: number): number;
export function tokenExpiry(token: string): number | null;
export function refreshDelay(exp: number, margin: number, now?: number): number;
