#!/usr/bin/env bash
# Build the Python and JavaScript example handlers into
# target/guests/example_python.wasm and target/guests/example_js.wasm, with
# the pinned toolchains of scripts/install-guest-toolchains.sh (installed
# when missing). Each component takes 20-30 s to build, so one whose inputs
# (example, SDK, wit/) are older than it is kept; tests use these artifacts.
# OUTRUN_POLYGLOT_FORCE=1 rebuilds anyway.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(scripts/install-guest-toolchains.sh)
export PATH="$bin:$PATH"
out=target/guests
mkdir -p "$out"

# Whether $1 is missing or older than any source file (.py, .js, .wit)
# under the other arguments.
stale() {
  local target=$1
  shift
  [ "${OUTRUN_POLYGLOT_FORCE:-0}" = 1 ] && return 0
  [ -f "$target" ] || return 0
  [ -n "$(find "$@" -type f \( -name '*.py' -o -name '*.js' -o -name '*.wit' \) \
    -newer "$target" -not -path '*/__pycache__/*' -print -quit)" ]
}

# Each build writes to a temporary file and renames it into place, so a
# failed build never leaves a half-written component where tests look.
if stale "$out/example_python.wasm" handlers/example-python handlers/sdk-python wit; then
  echo "building $out/example_python.wasm (componentize-py)" >&2
  start=$SECONDS
  componentize-py -d wit -w handler componentize app \
    -p handlers/example-python -p handlers/sdk-python \
    -o "$out/example_python.wasm.tmp" >&2
  mv "$out/example_python.wasm.tmp" "$out/example_python.wasm"
  echo "built $out/example_python.wasm in $((SECONDS - start)) s" >&2
fi

if stale "$out/example_js.wasm" handlers/example-js handlers/sdk-js wit; then
  echo "building $out/example_js.wasm (componentize-js)" >&2
  start=$SECONDS
  # The layout `outrun new --lang js` writes: the SDK vendored beside app.js.
  stage=target/polyglot/example-js
  rm -rf "$stage"
  mkdir -p "$stage/outrun-sdk"
  cp handlers/example-js/*.js "$stage/"
  cp handlers/sdk-js/index.js handlers/sdk-js/package.json "$stage/outrun-sdk/"
  componentize-js "$stage/app.js" --wit wit --world-name handler \
    -o "$out/example_js.wasm.tmp" >&2
  mv "$out/example_js.wasm.tmp" "$out/example_js.wasm"
  echo "built $out/example_js.wasm in $((SECONDS - start)) s" >&2
fi
