"""outrun's Python bench guest: parses the payload of every event it gets
and returns, so `outrun bench --module target/guests/bench_python.wasm
--handler noop|json` measures what a Python handler costs per event (the
interpreter's instantiation, or a warm instance with `--instances reuse`),
not what it does."""

from outrun_sdk import handler


@handler
def handle(event):
    event.json()
