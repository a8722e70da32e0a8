#!/usr/bin/env bash
# The test command: builds the guest components, then runs every test of the
# workspace against SQLite and the local PostgreSQL and Redis
# (OUTRUN_TEST_POSTGRES_URL / OUTRUN_TEST_REDIS_URL point elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guests.sh
exec cargo nextest run --workspace --no-fail-fast "$@"
