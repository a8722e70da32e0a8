#!/usr/bin/env bash
# The demo: builds the guest components and the runtime, then runs
# `outrun demo` on an embedded SQLite database in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guests.sh
exec cargo run --quiet --bin outrun -- demo "$@"
