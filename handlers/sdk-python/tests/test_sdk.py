"""Host tests of the Python SDK against the real bindings componentize-py
generates from wit/ (`componentize-py bindings`): the generated types are
real, the imports (which only a component can call) are replaced by
recorders. componentize-py must be on PATH.

    python3 -m unittest discover -s handlers/sdk-python/tests
"""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
_bindings = tempfile.TemporaryDirectory()
subprocess.run(
    ["componentize-py", "-d", str(ROOT / "wit"), "-w", "handler", "bindings", _bindings.name],
    check=True,
    capture_output=True,
)
sys.path[:0] = [_bindings.name, str(ROOT / "handlers" / "sdk-python")]

from componentize_py_types import Err  # noqa: E402
from wit_world.imports import emit as wit_emit  # noqa: E402
from wit_world.imports import kv as wit_kv  # noqa: E402
from wit_world.imports import logging as wit_logging  # noqa: E402
from wit_world.imports import outrun_handler_types as types  # noqa: E402
from wit_world.imports import sql as wit_sql  # noqa: E402

import outrun_sdk  # noqa: E402
from outrun_sdk import CapabilityError, emit, handler, kv, reject, retry, retry_after, sql  # noqa: E402


def event(payload='{"a": 1}'):
    return types.Event(
        id="e1", name="t.e", payload=payload, group_id=None, attempt=1,
        max_attempts=5, created_at=1, expires_at=None,
    )


class Recorder:
    """Replaces an import; records its arguments, returns or raises."""

    def __init__(self, result=None, error=None):
        self.calls = []
        self.result = result
        self.error = error

    def __call__(self, *args):
        self.calls.append(args)
        if self.error is not None:
            raise Err(self.error)
        return self.result


class Patched(unittest.TestCase):
    def patch(self, module, name, recorder):
        old = getattr(module, name)
        setattr(module, name, recorder)
        self.addCleanup(setattr, module, name, old)
        return recorder

    def setUp(self):
        self.logs = self.patch(wit_logging, "log", Recorder())


class Handle(Patched):
    def handle(self, fn, payload='{"a": 1}'):
        module = type(sys)("app_under_test")
        sys.modules["app_under_test"] = module
        self.addCleanup(sys.modules.pop, "app_under_test", None)
        fn.__module__ = "app_under_test"
        handler(fn)
        return module.WitWorld().handle(event(payload))

    def error(self, fn, payload='{"a": 1}'):
        with self.assertRaises(Err) as caught:
            self.handle(fn, payload)
        return caught.exception.value

    def test_returning_is_done_and_the_payload_parses(self):
        seen = []
        self.assertEqual(self.handle(lambda e: seen.append(e.json())), types.Outcome_Done())
        self.assertEqual(seen, [{"a": 1}])

    def test_a_payload_that_is_not_json_rejects(self):
        e = self.error(lambda e: e.json(), payload="nope")
        self.assertFalse(e.retryable)
        self.assertIn("payload of t.e e1 is not valid JSON", e.message)

    def test_reject_retry_and_retry_after(self):
        e = self.error(lambda e: reject("bad input"))
        self.assertEqual((e.message, e.retryable), ("bad input", False))
        e = self.error(lambda e: retry("later"))
        self.assertEqual((e.message, e.retryable), ("later", True))
        self.assertEqual(
            self.handle(lambda e: retry_after(2.5, "busy")), types.Outcome_RetryAfter(2500)
        )

    def test_an_exception_is_retryable_with_the_tracebacks_last_line(self):
        def boom(e):
            return {}["missing"]

        e = self.error(boom)
        self.assertTrue(e.retryable)
        self.assertTrue(e.message.startswith("KeyError: 'missing' (at "), e.message)
        self.assertIn("in boom)", e.message)
        level, _, text = self.logs.calls[-1]
        self.assertEqual(level, wit_logging.Level.ERROR)
        self.assertIn("Traceback (most recent call last)", text)

    def test_capability_errors_keep_their_retry_semantics(self):
        self.patch(wit_sql, "execute", Recorder(error=types.CapError_Denied("grant sql")))
        e = self.error(lambda e: sql.execute("x"))
        self.assertFalse(e.retryable)
        self.assertEqual(e.message, "capability denied: grant sql")
        self.patch(wit_sql, "execute", Recorder(error=types.CapError_Unavailable("db down")))
        e = self.error(lambda e: sql.execute("x"))
        self.assertTrue(e.retryable)
        self.assertIn("db down", e.message)


class Capabilities(Patched):
    def test_sql_values_convert(self):
        rec = self.patch(wit_sql, "execute", Recorder(result=3))
        n = sql.execute("q", 1, 2.5, "s", b"\x00", True, None, {"k": [1]})
        self.assertEqual(n, 3)
        self.assertEqual(
            rec.calls[0],
            (
                "q",
                [
                    wit_sql.Value_Int(1),
                    wit_sql.Value_Float(2.5),
                    wit_sql.Value_Text("s"),
                    wit_sql.Value_Blob(b"\x00"),
                    wit_sql.Value_Boolean(True),
                    wit_sql.Value_Null(),
                    wit_sql.Value_Text('{"k": [1]}'),
                ],
            ),
        )

    def test_sql_refuses_what_does_not_convert(self):
        with self.assertRaises(CapabilityError) as c:
            sql.execute("q", 1, 2**63)
        self.assertIn("parameter $2", str(c.exception))
        with self.assertRaises(CapabilityError) as c:
            sql.execute("q", object())
        self.assertIn("parameter $1: cannot pass a object", str(c.exception))

    def test_query_rows_come_back_as_python_values(self):
        raw = wit_sql.Rows(
            columns=["k", "v"],
            rows=[[wit_sql.Value_Int(7), wit_sql.Value_Text("x")], [wit_sql.Value_Int(8), wit_sql.Value_Null()]],
        )
        self.patch(wit_sql, "query", Recorder(result=raw))
        rows = sql.query("q")
        self.assertEqual(list(rows), [{"k": 7, "v": "x"}, {"k": 8, "v": None}])
        self.assertEqual((len(rows), rows.scalar(), rows.first()), (2, 7, {"k": 7, "v": "x"}))

    def test_emit_defaults_and_options(self):
        rec = self.patch(wit_emit, "emit", Recorder())
        emit("a.b", {"x": 1})
        emit("a.c", {"y": 2}, group_id="g", delay=1.5, expires_in=60, max_retry=3, idempotency_key="k")
        self.assertEqual(
            rec.calls[0],
            ("a.b", '{"x": 1}', wit_emit.EmitOptions(None, None, None, None, None)),
        )
        self.assertEqual(rec.calls[1][2], wit_emit.EmitOptions("g", 1500, 60000, 3, "k"))
        with self.assertRaises(CapabilityError):
            emit("a.d", {"bad": object()})

    def test_kv_text_and_ttl(self):
        rec = self.patch(wit_kv, "set", Recorder())
        kv.set("k", "v", ttl=1.5)
        self.assertEqual(rec.calls[0], ("k", b"v", 1500))
        self.patch(wit_kv, "get", Recorder(result=b"7"))
        self.assertEqual(kv.get_str("k"), "7")


class HttpHeaders(Patched):
    """The headers a request goes out with, up to Fields.from_list (the fake
    stops it there)."""

    def sent(self, method, url, **kw):
        seen = []

        class Fields:
            @staticmethod
            def from_list(pairs):
                seen.extend(pairs)
                raise Err(ValueError())

        class Types:
            pass

        Types.Fields = Fields
        self.patch(outrun_sdk._wit, "http_types", lambda: Types)
        with self.assertRaises(outrun_sdk.http.HttpError):
            outrun_sdk.http.request(method, url, **kw)
        return {n: v.decode() for n, v in seen}

    def test_a_request_that_may_carry_content_states_its_length(self):
        # Without it the host streams the body chunked and ends it after the
        # request went out; a server that answers first may close under its
        # answer. A GET goes without.
        self.assertEqual(self.sent("delete", "http://h/p/1")["content-length"], "0")
        self.assertEqual(self.sent("POST", "http://h/p", body="abc")["content-length"], "3")
        self.assertNotIn("content-length", self.sent("GET", "http://h/p/1"))


class OnTheHost(unittest.TestCase):
    def test_capabilities_outside_a_component_say_how_to_test(self):
        # A fresh interpreter without the bindings on its path.
        code = "import outrun_sdk\ntry:\n    outrun_sdk.sql.execute('x')\nexcept RuntimeError as e:\n    print(e)"
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT / "handlers" / "sdk-python",
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        self.assertIn("outrun handlers run", out.stdout)


if __name__ == "__main__":
    unittest.main()
