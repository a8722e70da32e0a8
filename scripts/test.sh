#!/usr/bin/env bash
# The test command: builds the guest components (the Rust ones, then the
# Python and JavaScript examples with their pinned toolchains), runs every test of the
# workspace against SQLite and the local PostgreSQL and Redis
# (OUTRUN_TEST_POSTGRES_URL / OUTRUN_TEST_REDIS_URL point elsewhere), then
# the short fault suite (scripts/chaos.sh: kill -9, a PostgreSQL restart, a
# backend-termination storm). scripts/api-fuzz.sh fuzzes the admin API in
# between. The fault suite restarts PostgreSQL, so it
# runs alone, after the parallel tests; OUTRUN_SKIP_CHAOS=1 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-tools.sh
scripts/build-guests.sh
scripts/build-polyglot-guests.sh
cargo nextest run --workspace --no-fail-fast "$@"
# The admin API against its OpenAPI document (schemathesis; no 5xx).
scripts/api-fuzz.sh
if [ "${OUTRUN_SKIP_CHAOS:-0}" != 1 ]; then
  CHAOS=short scripts/chaos.sh
fi
