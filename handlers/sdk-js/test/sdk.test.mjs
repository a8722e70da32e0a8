// Host tests of the JS SDK: the component's imports are recorders (see
// register.mjs), so what the SDK passes to them and makes of their answers
// is checked without a component.
//   node --import ./handlers/sdk-js/test/register.mjs --test handlers/sdk-js/test/sdk.test.mjs
import { test, beforeEach } from 'node:test';
import assert from 'node:assert/strict';

import {
  emit, handler, http, kv, reject, retry, retryAfter, s64, sql, toNumber, u64,
} from '../index.js';

const SQL = 'outrun:handler/sql@0.1.0';
const EMIT = 'outrun:handler/emit@0.1.0';
const KV = 'outrun:handler/kv@0.1.0';
const LOG = 'wasi:logging/logging';

beforeEach(() => {
  globalThis.calls.length = 0;
  globalThis.fakes = { [LOG]: { log: () => {} } };
});

const event = (payload = '{"a":1}') => ({
  id: 'e1', name: 't.e', payload, attempt: 1, maxAttempts: 5, createdAt: 1700000000000n,
});

function failure(fn, payload) {
  try {
    handler(fn)(event(payload));
  } catch (e) {
    return e.payload;
  }
  assert.fail('the handler did not fail');
}

test('returning is done; the event has Numbers and parses', () => {
  let seen;
  assert.deepEqual(handler((e) => { seen = [e.json(), e.createdAt]; })(event()), { tag: 'done' });
  assert.deepEqual(seen, [{ a: 1 }, 1700000000000]);
});

test('a payload that is not JSON rejects', () => {
  const p = failure((e) => e.json(), 'nope');
  assert.equal(p.retryable, false);
  assert.match(p.message, /payload of t.e e1 is not valid JSON/);
});

test('reject, retry and retryAfter', () => {
  assert.deepEqual(failure(() => reject('bad')), { message: 'bad', retryable: false });
  assert.deepEqual(failure(() => retry('later')), { message: 'later', retryable: true });
  assert.deepEqual(handler(() => retryAfter(1.5))(event()), { tag: 'retry-after', val: 1500n });
});

test('a thrown Error is a retryable failure with its message, not a trap', () => {
  const p = failure(() => { throw new TypeError('x is undefined'); });
  assert.equal(p.retryable, true);
  assert.match(p.message, /^TypeError: x is undefined \(at /);
  const logged = globalThis.calls.find(([i]) => i === LOG);
  assert.equal(logged[2][0], 'error');
});

test('capability errors keep their retry semantics', () => {
  globalThis.fakes[SQL] = { execute: () => { throw { payload: { tag: 'denied', val: 'grant sql' } }; } };
  assert.deepEqual(failure(() => sql.execute('q')), { message: 'capability denied: grant sql', retryable: false });
  globalThis.fakes[SQL] = { execute: () => { throw { payload: { tag: 'unavailable', val: 'down' } }; } };
  assert.equal(failure(() => sql.execute('q')).retryable, true);
});

test('sql parameters convert and results come back as Numbers', () => {
  globalThis.fakes[SQL] = {
    execute: () => 3n,
    query: () => ({ columns: ['k', 'v'], rows: [[{ tag: 'int', val: 7n }, { tag: 'null' }], [{ tag: 'int', val: 1n << 60n }, { tag: 'text', val: 'x' }]] }),
  };
  const bytes = new Uint8Array([1]);
  assert.equal(sql.execute('q', 1, 2.5, 's', true, null, undefined, 5n, bytes, sql.float(2), { a: 1 }), 3);
  assert.deepEqual(globalThis.calls[0][2][1], [
    { tag: 'int', val: 1n }, { tag: 'float', val: 2.5 }, { tag: 'text', val: 's' },
    { tag: 'boolean', val: true }, { tag: 'null' }, { tag: 'null' }, { tag: 'int', val: 5n },
    { tag: 'blob', val: bytes }, { tag: 'float', val: 2 }, { tag: 'text', val: '{"a":1}' },
  ]);
  const rows = sql.query('q');
  assert.deepEqual([...rows], [{ k: 7, v: null }, { k: 1n << 60n, v: 'x' }]);
  assert.equal(rows.scalar(), 7);
  assert.throws(() => sql.execute('q', 1n << 63n), /parameter \$1/);
});

test('emit: options default to unset, durations in seconds', () => {
  globalThis.fakes[EMIT] = { emit: () => {} };
  emit('a.b', { x: 1 });
  emit('a.c', '{"raw":true}', { groupId: 'g', delay: 1.5, expiresIn: 60, maxRetry: 3, idempotencyKey: 'k' });
  assert.deepEqual(globalThis.calls[0][2], ['a.b', '{"x":1}', {
    groupId: undefined, delayMs: undefined, expiresInMs: undefined, maxRetry: undefined, idempotencyKey: undefined,
  }]);
  assert.deepEqual(globalThis.calls[1][2][2], {
    groupId: 'g', delayMs: 1500n, expiresInMs: 60000n, maxRetry: 3, idempotencyKey: 'k',
  });
});

test('kv: strings as UTF-8, TTLs in seconds', () => {
  globalThis.fakes[KV] = { set: () => {}, get: () => new TextEncoder().encode('7') };
  kv.set('k', 'v', { ttl: 1.5 });
  assert.deepEqual(globalThis.calls[0][2], ['k', new TextEncoder().encode('v'), 1500n]);
  assert.equal(kv.getString('k'), '7');
});

test('BigInt helpers', () => {
  assert.equal(u64(5), 5n);
  assert.throws(() => u64(-1), /does not fit u64/);
  assert.equal(s64(-5), -5n);
  assert.throws(() => s64(1.5), /not an integer/);
  assert.equal(toNumber(42n), 42);
  assert.equal(toNumber(1n << 60n), 1n << 60n);
});

// The headers a request goes out with, up to Fields.fromList (the fake
// stops it there).
function headersSent(method, url, options) {
  const HTTP_TYPES = 'wasi:http/types@0.2.12';
  globalThis.calls.length = 0;
  globalThis.fakes[HTTP_TYPES] = { 'Fields.fromList': () => { throw new Error('stop'); } };
  assert.throws(() => http.request(method, url, options), /headers rejected/);
  const [, , [entries]] = globalThis.calls.find(([i, f]) => i === HTTP_TYPES && f === 'Fields.fromList');
  return Object.fromEntries(entries.map(([n, v]) => [n, new TextDecoder().decode(v)]));
}

test('a request that may carry content states its length, 0 included; a GET does not', () => {
  // Without it the host streams the body chunked and ends it after the
  // request went out; a server that answers first may close under its answer.
  assert.equal(headersSent('DELETE', 'http://h/p/1')['content-length'], '0');
  assert.equal(headersSent('post', 'http://h/p', { body: 'abc' })['content-length'], '3');
  assert.equal(headersSent('GET', 'http://h/p/1')['content-length'], undefined);
  assert.equal(
    headersSent('PUT', 'http://h/p', { headers: { 'Content-Length': '0' } })['content-length'], '0',
  );
});
