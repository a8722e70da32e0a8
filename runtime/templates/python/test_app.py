"""Tests of {{name}}: the pure logic on the host, and the built component
run through `outrun handlers run` (real SQLite, HTTP from
fixtures/http.json, everything rolled back).

    python3 -m unittest        # after building target/{{crate}}.wasm

OUTRUN names the outrun binary (default: `outrun` on PATH)."""

import json
import os
import sqlite3
import subprocess
import tempfile
import unittest
from pathlib import Path

from app import tier

HERE = Path(__file__).resolve().parent
MODULE = HERE / "target" / "{{crate}}.wasm"


class Logic(unittest.TestCase):
    def test_big_orders_and_vips_are_gold(self):
        self.assertEqual(tier(10_000, False), "gold")
        self.assertEqual(tier(500, True), "gold")
        self.assertEqual(tier(9_999, False), "standard")

    def test_the_example_payload_parses(self):
        order = json.loads((HERE / "events" / "order.created.json").read_text())
        self.assertEqual(order["order_id"], 1001)


class Component(unittest.TestCase):
    def run_event(self, payload):
        if not MODULE.is_file():
            self.fail(f"{MODULE} is missing: build it first ({{build}})")
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "app.db"
            with sqlite3.connect(db) as conn:
                conn.executescript((HERE / "schema.sql").read_text())
            out = subprocess.run(
                [os.environ.get("OUTRUN", "outrun"), "handlers", "run", str(MODULE),
                 "--event", "order.created", "--payload", payload,
                 "--http-fixtures", str(HERE / "fixtures" / "http.json"),
                 "--database", f"sqlite://{db}", "--json"],
                capture_output=True, text=True, cwd=HERE,
            )
        try:
            return json.loads(out.stdout)
        except ValueError:
            self.fail(f"outrun handlers run printed no report:\n{out.stdout}\n{out.stderr}")

    def test_an_order_is_tiered_counted_and_welcomed(self):
        r = self.run_event((HERE / "events" / "order.created.json").read_text())
        self.assertEqual(r["outcome"]["status"], "done", r)
        self.assertEqual(r["http"][0]["status"], 200, r)
        self.assertEqual(r["sql"][0]["result"]["affected"], 1, r)
        self.assertEqual([op["op"] for op in r["kv"]], ["get", "set"], r)
        self.assertEqual(r["emitted"][0]["name"], "customer.welcomed", r)
        self.assertEqual(json.loads(r["emitted"][0]["payload"])["tier"], "gold", r)

    def test_a_missing_field_is_a_retryable_failure(self):
        r = self.run_event('{"order_id": 1, "amount_cents": 5}')
        self.assertEqual(r["outcome"]["status"], "error", r)
        self.assertTrue(r["outcome"]["retryable"], r)
        self.assertIn("KeyError: 'customer_id'", r["outcome"]["message"], r)


if __name__ == "__main__":
    unittest.main()
