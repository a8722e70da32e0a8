// Types of the outrun JavaScript SDK (index.js).

/** A WIT u64/s64 value: StarlingMonkey passes them as BigInt. */
export type Int64 = bigint;

/** A number or BigInt as a WIT u64 (BigInt), range-checked. */
export function u64(n: number | bigint, what?: string): bigint;
/** A number or BigInt as a WIT s64 (BigInt), range-checked. */
export function s64(n: number | bigint, what?: string): bigint;
/** A BigInt as a Number when exactly representable, else the BigInt. */
export function toNumber(b: bigint): number | bigint;
export function toNumber<T>(b: T): T;

/** A failed attempt; retryable: count an attempt and back off, else dead at once. */
export class HandlerError extends Error {
  constructor(message: string, retryable?: boolean);
  retryable: boolean;
}

export type CapabilityErrorKind = 'denied' | 'invalid' | 'unavailable';

/** A capability call failed. Denied and invalid reject; unavailable retries. */
export class CapabilityError extends HandlerError {
  constructor(kind: CapabilityErrorKind, detail: string);
  kind: CapabilityErrorKind;
  detail: string;
}

/** Not now: run the event again in `seconds` without spending an attempt. */
export class RetryAfter extends Error {
  constructor(seconds: number, message?: string);
  seconds: number;
}

/** Fail permanently: the event goes dead at once. */
export function reject(message: string): never;
/** Fail transiently: try again with backoff. */
export function retry(message: string): never;
/** Run the event again in `seconds` without spending an attempt. */
export function retryAfter(seconds: number, message?: string): never;

/** One outbox event. */
export class Event {
  readonly id: string;
  readonly name: string;
  /** The payload as stored: JSON text. */
  readonly payload: string;
  readonly groupId: string | null;
  /** 1 on the first delivery. */
  readonly attempt: number;
  readonly maxAttempts: number;
  /** ms since the Unix epoch. */
  readonly createdAt: number;
  /** ms since the Unix epoch, null if the event does not expire. */
  readonly expiresAt: number | null;
  /** The payload parsed; a payload that does not parse rejects the event. */
  json<T = any>(): T;
  readonly isLastAttempt: boolean;
}

/** The raw WIT shapes handle() receives and returns. */
export interface WitEvent {
  id: string;
  name: string;
  payload: string;
  groupId?: string;
  attempt: number;
  maxAttempts: number;
  createdAt: bigint;
  expiresAt?: bigint;
}
export type WitOutcome = { tag: 'done' } | { tag: 'retry-after'; val: bigint };

/**
 * Make `fn(event)` the component's `handle` export:
 *   export const handle = handler((event) => { ... });
 * Return normally for done; a thrown HandlerError keeps its retry semantics,
 * anything else thrown is a retryable failure carrying its message.
 */
export function handler(fn: (event: Event) => void): (event: WitEvent) => WitOutcome;

export interface EmitOptions {
  /** Events of one group run one at a time, in insertion order. */
  groupId?: string;
  /** Do not run before this many seconds from now. */
  delay?: number;
  /** Dead (reason `expired`) if not started within this many seconds. */
  expiresIn?: number;
  /** Defaults to the runtime's max_retry. */
  maxRetry?: number;
  /** Same key as a live event: no second event. */
  idempotencyKey?: string;
}

/** Enqueue `name` in the transaction that acknowledges this event. A string
 * payload is sent as it is (it must be JSON text); anything else is
 * JSON.stringify'd. */
export function emit(name: string, payload: unknown, options?: EmitOptions): void;

/** A value sql.float() marks as a float. */
export interface SqlFloat {
  readonly v: number;
}

/** Parameters: whole Numbers and BigInts pass as int, other Numbers as
 * float, booleans, strings, null/undefined, Uint8Array/ArrayBuffer as blob,
 * Date as ISO text, other objects as JSON text. */
export type SqlParam =
  | null
  | undefined
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | ArrayBuffer
  | Date
  | SqlFloat
  | object;

/** A column value: integers as Number when safe, else BigInt. */
export type SqlValue = null | boolean | number | bigint | string | Uint8Array;

export class Rows implements Iterable<Record<string, SqlValue>> {
  readonly columns: string[];
  readonly rows: SqlValue[][];
  readonly length: number;
  [Symbol.iterator](): Iterator<Record<string, SqlValue>>;
  first(): Record<string, SqlValue> | null;
  scalar(): SqlValue;
}

export const sql: {
  /** Pass a whole Number as a float (JS cannot tell 2.0 from 2). */
  float(v: number): SqlFloat;
  /** Run a statement; returns the number of rows it affected. */
  execute(statement: string, ...params: SqlParam[]): number;
  /** Run a statement that returns rows. */
  query(statement: string, ...params: SqlParam[]): Rows;
};

/** Key-value store; keys are confined to the handler's prefix. TTLs in seconds. */
export const kv: {
  get(key: string): Uint8Array | null;
  getString(key: string): string | null;
  set(key: string, value: string | Uint8Array, options?: { ttl?: number }): void;
  delete(key: string): boolean;
  exists(key: string): boolean;
  expire(key: string, ttl: number | null): boolean;
  setAdd(key: string, ...members: string[]): number;
  setRemove(key: string, ...members: string[]): number;
  setMembers(key: string): string[];
};

type LogFn = (message: unknown, context?: string) => void;
export const log: { trace: LogFn; debug: LogFn; info: LogFn; warn: LogFn; error: LogFn };

export const config: {
  get(key: string): string | null;
  get(key: string, fallback: string): string;
  require(key: string): string;
};

export function isTransientStatus(status: number): boolean;

export type HttpErrorKind = 'denied' | 'invalid' | 'timeout' | 'transport';
/** No response: denied and invalid reject, timeout and transport retry. */
export class HttpError extends HandlerError {
  kind: HttpErrorKind;
}

export class Response {
  readonly status: number;
  /** Names lower case, as wasi:http delivers them. */
  readonly headers: [string, string][];
  readonly body: Uint8Array;
  readonly ok: boolean;
  header(name: string): string | null;
  text(): string;
  /** The body parsed; a body that does not parse rejects. */
  json<T = any>(): T;
  /** This response if 2xx; 5xx, 429 and 408 retry, other statuses reject. */
  raiseForStatus(): Response;
}

export interface RequestOptions {
  headers?: Record<string, string> | [string, string][];
  body?: string | Uint8Array;
  /** Sent as JSON with content-type application/json. */
  json?: unknown;
  /** Seconds for the whole exchange (default 10). */
  timeout?: number;
}

export const http: {
  request(method: string, url: string, options?: RequestOptions): Response;
  get(url: string, options?: RequestOptions): Response;
  post(url: string, options?: RequestOptions): Response;
  delete(url: string, options?: RequestOptions): Response;
};
