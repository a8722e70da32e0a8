#!/usr/bin/env bash
# Build the Python and JavaScript example handlers into
# target/guests/example_python.wasm and target/guests/example_js.wasm, and
# the bench guests (handlers/bench-{python,js}, for `outrun bench --module`)
# into target/guests/bench_python.wasm and target/guests/bench_js.wasm, with
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
# $1: the component's stem in target/guests; $2: the app directory.
python_guest() {
  local stem=$1 app=$2
  if stale "$out/$stem.wasm" "$app" handlers/sdk-python wit; then
    echo "building $out/$stem.wasm (componentize-py)" >&2
    local start=$SECONDS
    componentize-py -d wit -w handler componentize app \
      -p "$app" -p handlers/sdk-python \
      -o "$out/$stem.wasm.tmp" >&2
    mv "$out/$stem.wasm.tmp" "$out/$stem.wasm"
    echo "built $out/$stem.wasm in $((SECONDS - start)) s" >&2
  fi
}

js_guest() {
  local stem=$1 app=$2
  if stale "$out/$stem.wasm" "$app" handlers/sdk-js wit; then
    echo "building $out/$stem.wasm (componentize-js)" >&2
    local start=$SECONDS
    # The layout `outrun new --lang js` writes: the SDK vendored beside app.js.
    local stage=target/polyglot/${app##*/}
    rm -rf "$stage"
    mkdir -p "$stage/outrun-sdk"
    cp "$app"/*.js "$stage/"
    cp handlers/sdk-js/index.js handlers/sdk-js/package.json "$stage/outrun-sdk/"
    componentize-js "$stage/app.js" --wit wit --world-name handler \
      -o "$out/$stem.wasm.tmp" >&2
    mv "$out/$stem.wasm.tmp" "$out/$stem.wasm"
    echo "built $out/$stem.wasm in $((SECONDS - start)) s" >&2
  fi
}

python_guest example_python handlers/example-python
js_guest example_js handlers/example-js
python_guest bench_python handlers/bench-python
js_guest bench_js handlers/bench-js
