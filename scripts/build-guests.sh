#!/usr/bin/env bash
# Build every guest component in handlers/ for wasm32-wasip2 and copy them to
# target/guests/<crate_name>.wasm, where the tests, the demo and the example
# config find them. The probe test guest is built a second time with
# `--features v2` (target/guests/probe_v2.wasm) for the hot-reload tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "installing the wasm32-wasip2 target" >&2
  rustup target add wasm32-wasip2
fi

# Guest crates: workspace members under handlers/ with a cdylib target.
mapfile -t guests < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if "/handlers/" in p["manifest_path"] and any("cdylib" in t["crate_types"] for t in p["targets"]):
        print(p["name"])
')
if [ ${#guests[@]} -eq 0 ]; then
  echo "no guest crates found under handlers/" >&2
  exit 1
fi

out=target/guests
mkdir -p "$out"
build() { cargo build --quiet --profile guest --target wasm32-wasip2 "$@"; }
# Cargo writes where CARGO_TARGET_DIR says; the copies stay in this
# checkout's target/guests, where the tests and the example config look.
built=${CARGO_TARGET_DIR:-target}/wasm32-wasip2/guest
copy() { cp "$built/$1.wasm" "$out/$2.wasm.tmp" && mv "$out/$2.wasm.tmp" "$out/$2.wasm"; }

args=()
for g in "${guests[@]}"; do args+=(-p "$g"); done
build "${args[@]}"
for g in "${guests[@]}"; do copy "${g//-/_}" "${g//-/_}"; done

if printf '%s\n' "${guests[@]}" | grep -qx probe; then
  build -p probe --features v2
  copy probe probe_v2
  # Leave the plain build as the uplifted artifact again.
  build -p probe
fi
ls -1 "$out" | sed 's/^/built target\/guests\//' >&2
