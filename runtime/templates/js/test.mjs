// Tests of {{name}}: the pure logic with node, and the built component run
// through `outrun handlers run` (real SQLite, HTTP from fixtures/http.json,
// everything rolled back).
//
//   node --test        # after building target/{{crate}}.wasm (npm run build)
//
// OUTRUN names the outrun binary (default: `outrun` on PATH); the database
// is made with the sqlite3 command-line tool.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { tier } from './logic.js';

const here = dirname(fileURLToPath(import.meta.url));
const module = join(here, 'target', '{{crate}}.wasm');

test('big orders and VIPs are gold', () => {
  assert.equal(tier(10000, false), 'gold');
  assert.equal(tier(500, true), 'gold');
  assert.equal(tier(9999, false), 'standard');
});

function runEvent(payload) {
  assert.ok(existsSync(module), `${module} is missing: build it first ({{build}})`);
  const tmp = mkdtempSync(join(tmpdir(), '{{name}}-'));
  try {
    const db = join(tmp, 'app.db');
    execFileSync('sqlite3', [db], { input: readFileSync(join(here, 'schema.sql')) });
    const out = spawnSync(
      process.env.OUTRUN ?? 'outrun',
      ['handlers', 'run', module, '--event', 'order.created', '--payload', payload,
        '--http-fixtures', join(here, 'fixtures', 'http.json'),
        '--database', `sqlite://${db}`, '--json'],
      { cwd: here, encoding: 'utf8' },
    );
    try {
      return JSON.parse(out.stdout);
    } catch {
      assert.fail(`outrun handlers run printed no report:\n${out.stdout}\n${out.stderr}`);
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

test('an order is tiered, counted and welcomed', () => {
  const r = runEvent(readFileSync(join(here, 'events', 'order.created.json'), 'utf8'));
  assert.equal(r.outcome.status, 'done', JSON.stringify(r));
  assert.equal(r.http[0].status, 200);
  assert.equal(r.sql[0].result.affected, 1);
  assert.deepEqual(r.kv.map((op) => op.op), ['get', 'set']);
  assert.equal(r.emitted[0].name, 'customer.welcomed');
  assert.equal(JSON.parse(r.emitted[0].payload).tier, 'gold');
});

test('a thrown Error is a retryable failure', () => {
  const r = runEvent('{"order_id": 1, "amount_cents": 5}');
  assert.equal(r.outcome.status, 'error', JSON.stringify(r));
  assert.equal(r.outcome.retryable, true);
  assert.match(r.outcome.message, /customer_id is missing/);
});
