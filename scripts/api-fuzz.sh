#!/usr/bin/env bash
# Fuzz the admin API with schemathesis (PyPI) against the OpenAPI document a
# running `outrun serve` publishes at /v1/openapi.json, on a throwaway SQLite
# database: a bounded number of generated requests per operation, each must
# get an answer that is not a server error (no 5xx, no dropped connection).
#
# Uses the `outrun` binary in target/debug (builds it when missing) and
# schemathesis from $SCHEMATHESIS, PATH, or a venv under target/ (installed
# there when missing). OUTRUN_FUZZ_EXAMPLES sets the examples per operation.
set -euo pipefail
cd "$(dirname "$0")/.."

examples="${OUTRUN_FUZZ_EXAMPLES:-30}"
venv="${CARGO_TARGET_DIR:-target}/schemathesis-venv"
st="${SCHEMATHESIS:-}"
if [ -z "$st" ]; then
  if command -v schemathesis >/dev/null; then
    st=schemathesis
  else
    if [ ! -x "$venv/bin/schemathesis" ]; then
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet schemathesis
    fi
    st="$venv/bin/schemathesis"
  fi
fi

bin="${CARGO_TARGET_DIR:-target}/debug/outrun"
[ -x "$bin" ] || cargo build --bin outrun
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="fuzz-$(date +%s)-$RANDOM"
serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

export OUTRUN_DATABASE_URL="sqlite://$work/outbox.db"
"$bin" migrate >/dev/null
OUTRUN_ADMIN_TOKEN="$token" OUTRUN_LOG=warn \
  "$bin" serve --admin "127.0.0.1:$port" 2>"$work/serve.log" &
serve_pid=$!
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/v1/openapi.json" >/dev/null

# The token goes with every request, so the changing routes are fuzzed
# past the 401 too.
status=0
"$st" run "http://127.0.0.1:$port/v1/openapi.json" \
  --url "http://127.0.0.1:$port" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error \
  --max-examples "$examples" \
  --generation-deterministic \
  --workers 1 || status=$?
if ! kill -0 "$serve_pid" 2>/dev/null; then
  echo "api-fuzz: outrun serve died during the run; its log:" >&2
  cat "$work/serve.log" >&2
  exit 1
fi
if grep -q "panicked" "$work/serve.log"; then
  echo "api-fuzz: outrun serve panicked; its log:" >&2
  cat "$work/serve.log" >&2
  exit 1
fi
exit "$status"
