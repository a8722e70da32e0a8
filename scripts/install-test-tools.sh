#!/usr/bin/env bash
# What the test suite needs besides Rust, installed only when missing, so
# `scripts/test.sh` works on a fresh machine (apt packages need root):
# - wasm32-wasip2 and cargo-nextest;
# - promtool (checks the /metrics exposition, tests/ops.rs), redis-server and
#   redis-cli (the private Redis of tests/kv_outage.rs), sqlite3 (the unit
#   test `outrun new --lang js` writes), curl and python3 with venv;
# - cmake and libcurl headers: rdkafka builds its bundled librdkafka with
#   cmake, and rdkafka-sys includes curl.h even without its curl feature;
# - the Kafka-protocol broker Tansu of tests/publish.rs (cargo install, a
#   few minutes the first time);
# - chromium, node and npm, and playwright-core from tests/ui's lock file
#   (the dashboard's browser test, tests/dashboard.rs; Debian's chromium
#   is driven, no browser is downloaded).
# The guest toolchains (componentize-py, componentize-js) are
# scripts/install-guest-toolchains.sh; schemathesis is scripts/api-fuzz.sh.
set -euo pipefail

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v cmake >/dev/null || missing+=(cmake)
dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || missing+=(libcurl4-openssl-dev)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-test-tools: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]}) and run this again" >&2
    exit 1
  fi
  echo "install-test-tools: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

command -v tansu >/dev/null ||
  cargo install tansu --version 0.6.0 --locked --no-default-features --features dynostore

root="$(cd "$(dirname "$0")/.." && pwd)"
[ -d "$root/tests/ui/node_modules/playwright-core" ] ||
  npm ci --prefix "$root/tests/ui" --no-audit --no-fund
