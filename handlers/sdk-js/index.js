// The guest side of outrun for JavaScript handlers built with
// componentize-js (StarlingMonkey) against wit/handler.wit.
//
//   import { handler, emit, sql, log } from './outrun-sdk/index.js';
//   export const handle = handler((event) => {
//     const order = event.json();
//     sql.execute('INSERT INTO seen (id) VALUES ($1)', order.id);
//     emit('order.seen', { id: order.id });
//   });
//
// componentize-js bundles no packages: import this file by a relative path
// (`outrun new --lang js` vendors it as outrun-sdk/).
import * as witEmit from 'outrun:handler/emit@0.1.0';
import * as witSql from 'outrun:handler/sql@0.1.0';
import * as witKv from 'outrun:handler/kv@0.1.0';
import { log as witLog } from 'wasi:logging/logging';
import { get as witConfigGet } from 'wasi:config/store@0.2.0-rc.1';
import { handle as witHttpHandle } from 'wasi:http/outgoing-handler@0.2.12';
import {
  Fields,
  OutgoingRequest,
  OutgoingBody,
  RequestOptions,
} from 'wasi:http/types@0.2.12';

// ---- numbers: WIT u64/s64 are BigInt in StarlingMonkey -------------------

const U64_MAX = (1n << 64n) - 1n;
const S64_MIN = -(1n << 63n);
const S64_MAX = (1n << 63n) - 1n;

function toBig(n, what) {
  if (typeof n === 'bigint') return n;
  if (typeof n === 'number' && Number.isInteger(n)) return BigInt(n);
  throw new HandlerError(`${what}: ${n} is not an integer`, false);
}

/** A number or BigInt as a WIT u64 (BigInt), range-checked. */
export function u64(n, what = 'value') {
  const b = toBig(n, what);
  if (b < 0n || b > U64_MAX) throw new HandlerError(`${what}: ${n} does not fit u64`, false);
  return b;
}

/** A number or BigInt as a WIT s64 (BigInt), range-checked. */
export function s64(n, what = 'value') {
  const b = toBig(n, what);
  if (b < S64_MIN || b > S64_MAX) throw new HandlerError(`${what}: ${n} does not fit s64`, false);
  return b;
}

/** A BigInt from WIT as a Number when it is exactly representable, else the BigInt. */
export function toNumber(b) {
  if (typeof b !== 'bigint') return b;
  return b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(b)
    : b;
}

function ms(seconds, what) {
  if (seconds === undefined || seconds === null) return undefined;
  if (typeof seconds !== 'number' || !(seconds >= 0)) {
    throw new CapabilityError('invalid', `${what} must be a number of seconds >= 0, got ${seconds}`);
  }
  return BigInt(Math.floor(seconds * 1000));
}

// ---- outcomes and errors -------------------------------------------------

/** A failed attempt. retryable: count an attempt and back off; otherwise
 * the event is dead at once. */
export class HandlerError extends Error {
  constructor(message, retryable = true) {
    super(message);
    this.name = 'HandlerError';
    this.retryable = retryable;
  }
}

/** A capability call failed: kind is denied, invalid or unavailable. Denied
 * and invalid calls reject (a retry fails the same way); unavailable retries. */
export class CapabilityError extends HandlerError {
  constructor(kind, detail) {
    const what = {
      denied: 'capability denied',
      invalid: 'invalid capability call',
      unavailable: 'resource unavailable',
    }[kind] ?? kind;
    super(`${what}: ${detail}`, kind === 'unavailable');
    this.name = 'CapabilityError';
    this.kind = kind;
    this.detail = detail;
  }
}

/** Not now: run the event again in `seconds` without spending an attempt. */
export class RetryAfter extends Error {
  constructor(seconds, message = '') {
    super(message);
    this.name = 'RetryAfter';
    this.seconds = seconds;
  }
}

/** Fail permanently: the event goes dead at once. */
export function reject(message) {
  throw new HandlerError(message, false);
}

/** Fail transiently: try again with backoff. */
export function retry(message) {
  throw new HandlerError(message, true);
}

/** Run the event again in `seconds` without spending an attempt. */
export function retryAfter(seconds, message = '') {
  if (typeof seconds !== 'number' || !(seconds >= 0)) {
    throw new HandlerError(`retryAfter: seconds must be >= 0, got ${seconds}`, false);
  }
  throw new RetryAfter(seconds, message);
}

// A capability import's err(cap-error) arrives as a thrown value whose
// `payload` is the variant.
function call(fn, ...args) {
  try {
    return fn(...args);
  } catch (e) {
    const p = e && e.payload;
    if (p && typeof p.tag === 'string') throw new CapabilityError(p.tag, String(p.val));
    throw e;
  }
}

// ---- the event and the export --------------------------------------------

/** One outbox event. createdAt/expiresAt: ms since the Unix epoch (Numbers). */
export class Event {
  constructor(raw) {
    this.id = raw.id;
    this.name = raw.name;
    this.payload = raw.payload;
    this.groupId = raw.groupId ?? null;
    this.attempt = raw.attempt;
    this.maxAttempts = raw.maxAttempts;
    this.createdAt = toNumber(raw.createdAt);
    this.expiresAt = raw.expiresAt === undefined || raw.expiresAt === null ? null : toNumber(raw.expiresAt);
  }

  /** The payload parsed; a payload that does not parse rejects the event. */
  json() {
    try {
      return JSON.parse(this.payload);
    } catch (e) {
      reject(`payload of ${this.name} ${this.id} is not valid JSON: ${e.message}`);
    }
  }

  get isLastAttempt() {
    return this.attempt >= this.maxAttempts;
  }
}

function describe(e) {
  if (e instanceof Error) {
    // The first stack frame says where (StarlingMonkey: fn@file:line:col).
    const frame = typeof e.stack === 'string' ? e.stack.split('\n').find((l) => l.trim()) : '';
    const where = frame ? ` (at ${frame.trim()})` : '';
    return `${e.name}: ${e.message}${where}`;
  }
  try {
    return `thrown: ${JSON.stringify(e)}`;
  } catch {
    return `thrown: ${String(e)}`;
  }
}

/**
 * Make `fn(event)` the component's `handle` export:
 *   export const handle = handler((event) => { ... });
 * Return normally for done. A HandlerError (reject/retry) keeps its retry
 * semantics, retryAfter() reschedules, and anything else thrown is a
 * retryable failure carrying its message (not a trap).
 */
export function handler(fn) {
  return function handle(raw) {
    try {
      const result = fn(new Event(raw));
      if (result && typeof result.then === 'function') {
        throw new HandlerError('the handler returned a Promise: handle must be synchronous', false);
      }
      return { tag: 'done' };
    } catch (e) {
      if (e instanceof RetryAfter) {
        if (e.message) log.info(`retry after ${e.seconds} s: ${e.message}`);
        return { tag: 'retry-after', val: BigInt(Math.floor(e.seconds * 1000)) };
      }
      if (e instanceof HandlerError) {
        throw { payload: { message: e.message, retryable: e.retryable } };
      }
      const message = describe(e);
      try {
        log.error(e instanceof Error && e.stack ? `${message}\n${e.stack}` : message);
      } catch {
        // logging must not hide the error
      }
      throw { payload: { message, retryable: true } };
    }
  };
}

// ---- emit ----------------------------------------------------------------

/**
 * Enqueue event `name` in the transaction that acknowledges this one.
 * payload: any JSON-serialisable value (a string is sent as it is).
 * options: { groupId, delay (s), expiresIn (s), maxRetry, idempotencyKey },
 * all optional.
 */
export function emit(name, payload, options = {}) {
  let text = payload;
  if (typeof payload !== 'string') {
    try {
      text = JSON.stringify(payload);
    } catch (e) {
      throw new CapabilityError('invalid', `payload of emitted event \`${name}\` cannot be serialised as JSON: ${e.message}`);
    }
  }
  const o = {
    groupId: options.groupId ?? undefined,
    delayMs: ms(options.delay, 'delay'),
    expiresInMs: ms(options.expiresIn, 'expiresIn'),
    maxRetry: options.maxRetry ?? undefined,
    idempotencyKey: options.idempotencyKey ?? undefined,
  };
  call(witEmit.emit, name, text, o);
}

// ---- sql -----------------------------------------------------------------

class Float {
  constructor(v) {
    this.v = v;
  }
}

function sqlValue(v, index) {
  if (v === null || v === undefined) return { tag: 'null' };
  if (v instanceof Float) return { tag: 'float', val: v.v };
  switch (typeof v) {
    case 'boolean':
      return { tag: 'boolean', val: v };
    case 'bigint':
      return { tag: 'int', val: s64(v, `parameter $${index}`) };
    case 'number':
      // A whole Number is an int; sql.float(2) passes 2.0 as a float.
      return Number.isSafeInteger(v) ? { tag: 'int', val: BigInt(v) } : { tag: 'float', val: v };
    case 'string':
      return { tag: 'text', val: v };
    default:
  }
  if (v instanceof Uint8Array) return { tag: 'blob', val: v };
  if (v instanceof ArrayBuffer) return { tag: 'blob', val: new Uint8Array(v) };
  if (v instanceof Date) return { tag: 'text', val: v.toISOString() };
  if (typeof v === 'object') return { tag: 'text', val: JSON.stringify(v) };
  throw new CapabilityError('invalid', `parameter $${index}: cannot pass a ${typeof v} to SQL`);
}

function jsValue(v) {
  switch (v.tag) {
    case 'null':
      return null;
    case 'int':
      return toNumber(v.val);
    default:
      return v.val;
  }
}

/** The result of sql.query: columns, rows (arrays of values); iterating
 * yields one object per row. Integers are Numbers when safe, else BigInt. */
export class Rows {
  constructor(columns, rows) {
    this.columns = columns;
    this.rows = rows;
  }
  get length() {
    return this.rows.length;
  }
  *[Symbol.iterator]() {
    for (const row of this.rows) yield Object.fromEntries(this.columns.map((c, i) => [c, row[i]]));
  }
  first() {
    const [row] = this;
    return row ?? null;
  }
  scalar() {
    return this.rows.length && this.rows[0].length ? this.rows[0][0] : null;
  }
}

export const sql = {
  /** Pass a whole Number as a float (JS cannot tell 2.0 from 2). */
  float(v) {
    return new Float(v);
  },
  /** Run a statement; returns the number of rows it affected (a Number). */
  execute(statement, ...params) {
    return toNumber(call(witSql.execute, statement, params.map((p, i) => sqlValue(p, i + 1))));
  },
  /** Run a statement that returns rows. */
  query(statement, ...params) {
    const raw = call(witSql.query, statement, params.map((p, i) => sqlValue(p, i + 1)));
    return new Rows(raw.columns, raw.rows.map((r) => r.map(jsValue)));
  },
};

// ---- kv ------------------------------------------------------------------

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function ttlMs(ttl) {
  if (ttl === undefined || ttl === null) return undefined;
  if (typeof ttl !== 'number' || !(ttl > 0)) throw new CapabilityError('invalid', `kv ttl must be > 0 seconds, got ${ttl}`);
  return BigInt(Math.max(1, Math.floor(ttl * 1000)));
}

/** Key-value store; keys are confined to the handler's prefix. TTLs in seconds. */
export const kv = {
  get(key) {
    return call(witKv.get, key) ?? null;
  },
  getString(key) {
    const v = kv.get(key);
    return v === null ? null : decoder.decode(v);
  },
  set(key, value, { ttl } = {}) {
    const bytes = typeof value === 'string' ? encoder.encode(value) : value;
    call(witKv.set, key, bytes, ttlMs(ttl));
  },
  delete(key) {
    return call(witKv.delete, key);
  },
  exists(key) {
    return call(witKv.exists, key);
  },
  expire(key, ttl) {
    return call(witKv.expire, key, ttlMs(ttl));
  },
  setAdd(key, ...members) {
    return call(witKv.setAdd, key, members);
  },
  setRemove(key, ...members) {
    return call(witKv.setRemove, key, members);
  },
  setMembers(key) {
    return call(witKv.setMembers, key);
  },
};

// ---- log and config ------------------------------------------------------

function logAt(level) {
  return (message, context = '') => witLog(level, context, String(message));
}

/** Lines go to outrun's log with the handler, event id and version. */
export const log = {
  trace: logAt('trace'),
  debug: logAt('debug'),
  info: logAt('info'),
  warn: logAt('warn'),
  error: logAt('error'),
};

/** Handler config values (`config = {...}` in [handler.allow]). */
export const config = {
  get(key, fallback = null) {
    let v;
    try {
      v = witConfigGet(key);
    } catch (e) {
      const p = e && e.payload;
      throw new HandlerError(`reading config key \`${key}\` failed: ${p ? p.val : e}`, true);
    }
    return v === undefined || v === null ? fallback : v;
  },
  require(key) {
    const v = config.get(key);
    if (v === null) {
      throw new HandlerError(`config key \`${key}\` is not set; add it to this handler's config in the runtime's config file`, true);
    }
    return v;
  },
};

// ---- http ----------------------------------------------------------------

/** Statuses worth retrying: the server is overloaded, down or slow. */
export function isTransientStatus(status) {
  return status >= 500 || status === 408 || status === 429;
}

/** No response: kind is denied, invalid, timeout or transport. */
export class HttpError extends HandlerError {
  constructor(kind, method, url, detail) {
    const text = {
      denied: `${method} ${url}: host not allowed; add it to \`http\` in [handler.allow]`,
      invalid: `${method} ${url}: invalid request: ${detail}`,
      timeout: `${method} ${url}: no response within ${detail}`,
      transport: `${method} ${url}: ${detail}`,
    }[kind];
    super(text, kind === 'timeout' || kind === 'transport');
    this.name = 'HttpError';
    this.kind = kind;
  }
}

export class Response {
  constructor(status, headers, body, request = '') {
    this.status = status;
    this.headers = headers;
    this.body = body;
    this.request = request;
  }
  get ok() {
    return this.status >= 200 && this.status < 300;
  }
  header(name) {
    const n = name.toLowerCase();
    const found = this.headers.find(([k]) => k.toLowerCase() === n);
    return found ? found[1] : null;
  }
  text() {
    return decoder.decode(this.body);
  }
  /** The body parsed; a body that does not parse rejects. */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (e) {
      throw new HandlerError(`${this.request}: response body is not JSON (${e.message}): ${this.text().slice(0, 200)}`, false);
    }
  }
  /** This response if 2xx; 5xx, 429 and 408 retry, any other status rejects. */
  raiseForStatus() {
    if (this.ok) return this;
    throw new HandlerError(`${this.request}: status ${this.status}: ${this.text().slice(0, 200)}`, isTransientStatus(this.status));
  }
}

const METHODS = ['get', 'head', 'post', 'put', 'delete', 'options', 'patch'];

function errorFromCode(code, method, url, timeout) {
  const tag = code && code.tag;
  if (tag === 'HTTP-request-denied') return new HttpError('denied', method, url, '');
  if (tag === 'HTTP-request-URI-invalid' || tag === 'HTTP-request-method-invalid') return new HttpError('invalid', method, url, tag);
  if (/timeout/i.test(tag ?? '')) return new HttpError('timeout', method, url, `${timeout} s`);
  if (tag === 'DNS-error') {
    const detail = code.val?.rcode ?? code.val?.infoCode ?? '';
    return new HttpError('transport', method, url, `DNS lookup failed ${detail}`.trim());
  }
  if (tag === 'connection-refused') return new HttpError('transport', method, url, 'connection refused');
  if (tag === 'internal-error' && code.val) return new HttpError('transport', method, url, code.val);
  return new HttpError('transport', method, url, tag ?? String(code));
}

function splitUrl(url) {
  const m = /^(https?):\/\/([^/?#]+)([^#]*)/i.exec(url);
  if (!m) return null;
  const rest = m[3] || '/';
  return { scheme: m[1].toLowerCase(), authority: m[2], pathWithQuery: rest.startsWith('/') ? rest : `/${rest}` };
}

/**
 * Send a request and read the whole response, blocking the handler.
 * options: { headers (object or [name, value] pairs), body (string or
 * Uint8Array), json (a value sent as JSON), timeout (s, default 10) }.
 */
function request(method, url, options = {}) {
  method = method.toUpperCase();
  const timeout = options.timeout ?? 10;
  const pairs = Array.isArray(options.headers) ? [...options.headers] : Object.entries(options.headers ?? {});
  let body = options.body;
  if (options.json !== undefined) {
    body = JSON.stringify(options.json);
    if (!pairs.some(([n]) => n.toLowerCase() === 'content-type')) pairs.push(['content-type', 'application/json']);
  }
  const data = typeof body === 'string' ? encoder.encode(body) : body ?? new Uint8Array();
  // A request that may carry content states its length, 0 included: without
  // one the host streams the body chunked and ends it after the request went
  // out, and a server that answers before that end (it reads no body for a
  // DELETE) may close the connection under its answer.
  const bodiless = ['GET', 'HEAD', 'OPTIONS'].includes(method);
  if ((data.length || !bodiless) && !pairs.some(([n]) => n.toLowerCase() === 'content-length')) pairs.push(['content-length', String(data.length)]);

  const target = splitUrl(url);
  if (!target) throw new HttpError('invalid', method, url, 'the URL needs http:// or https:// and a host');
  let fields;
  try {
    fields = Fields.fromList(pairs.map(([n, v]) => [n.toLowerCase(), encoder.encode(String(v))]));
  } catch (e) {
    throw new HttpError('invalid', method, url, `headers rejected (${e.payload ? e.payload.tag : e})`);
  }
  const req = new OutgoingRequest(fields);
  try {
    const lower = method.toLowerCase();
    req.setMethod(METHODS.includes(lower) ? { tag: lower } : { tag: 'other', val: method });
    req.setScheme({ tag: target.scheme === 'https' ? 'HTTPS' : 'HTTP' });
    req.setAuthority(target.authority);
    req.setPathWithQuery(target.pathWithQuery);
  } catch {
    throw new HttpError('invalid', method, url, 'method, host or path rejected');
  }
  const outBody = req.body();
  const ns = BigInt(Math.floor(timeout * 1e9));
  const opts = new RequestOptions();
  for (const set of ['setConnectTimeout', 'setFirstByteTimeout', 'setBetweenBytesTimeout']) {
    try {
      opts[set](ns);
    } catch {
      // a host that refuses these options still applies its own limits
    }
  }
  let future;
  try {
    future = witHttpHandle(req, opts);
  } catch (e) {
    throw errorFromCode(e.payload, method, url, timeout);
  }
  if (data.length) {
    const stream = outBody.write();
    for (let i = 0; i < data.length; i += 4096) stream.blockingWriteAndFlush(data.subarray(i, i + 4096));
    // The stream is a child of the body: it must go before finish.
    stream[Symbol.dispose]?.();
  }
  try {
    OutgoingBody.finish(outBody, undefined);
  } catch (e) {
    throw errorFromCode(e.payload, method, url, timeout);
  }
  const ready = future.subscribe();
  ready.block();
  ready[Symbol.dispose]?.();
  const got = future.get();
  if (!got || got.tag !== 'ok') throw new HttpError('transport', method, url, 'response already taken');
  if (got.val.tag !== 'ok') throw errorFromCode(got.val.val, method, url, timeout);
  const response = got.val.val;
  const status = response.status();
  const hdrs = response.headers();
  const headers = hdrs.entries().map(([n, v]) => [n, decoder.decode(v)]);
  hdrs[Symbol.dispose]?.();
  const incoming = response.consume();
  const stream = incoming.stream();
  const chunks = [];
  let total = 0;
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(65536n);
    } catch (e) {
      if (e.payload && e.payload.tag === 'closed') break;
      throw new HttpError('transport', method, url, 'reading the response body failed');
    }
    chunks.push(chunk);
    total += chunk.length;
  }
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    bytes.set(c, at);
    at += c.length;
  }
  return new Response(status, headers, bytes, `${method} ${url}`);
}

export const http = {
  request,
  get: (url, options) => request('GET', url, options),
  post: (url, options) => request('POST', url, options),
  delete: (url, options) => request('DELETE', url, options),
};
