#!/usr/bin/env bash
# Install the pinned toolchains that build Python and JavaScript handlers,
# only what is missing:
#   componentize-py (PyPI) in a virtualenv,
#   @bytecodealliance/componentize-js (StarlingMonkey) with the jco it was
#   tested with, in a node_modules of their own.
# Both go under $OUTRUN_GUEST_TOOLS (default ~/.cache/outrun/guest-tools),
# one directory per pinned version, and get a launcher in its bin/:
#   export PATH="$HOME/.cache/outrun/guest-tools/bin:$PATH"
# Nothing is downloaded at build time afterwards. Needs python3 (with venv)
# and node/npm; they are installed with apt-get when missing (as root).
# Prints the bin directory on stdout.
set -euo pipefail

COMPONENTIZE_PY=0.25.1
COMPONENTIZE_JS=0.23.0
JCO=1.35.0

tools=${OUTRUN_GUEST_TOOLS:-$HOME/.cache/outrun/guest-tools}
bin=$tools/bin
mkdir -p "$bin"

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "install-guest-toolchains: $* missing; install it (apt-get install $*) and run this again" >&2
    exit 1
  fi
  apt-get update -qq && apt-get install -y -qq "$@" >&2
}

if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3 python3-venv
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt_install nodejs npm
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 18 ]; then
  echo "install-guest-toolchains: node $(node --version) is too old for componentize-js $COMPONENTIZE_JS (needs 18 or later)" >&2
  exit 1
fi

# Python: a virtualenv per pinned version, so an upgrade never half-replaces
# the one in use.
py=$tools/componentize-py-$COMPONENTIZE_PY
if [ ! -x "$py/bin/componentize-py" ]; then
  echo "installing componentize-py $COMPONENTIZE_PY into $py" >&2
  rm -rf "$py"
  # A half-made venv is removed, so the next run starts over.
  python3 -m venv "$py" && "$py/bin/pip" install --quiet --disable-pip-version-check \
    "componentize-py==$COMPONENTIZE_PY" >&2 || { rm -rf "$py"; exit 1; }
fi
ln -sfn "$py/bin/componentize-py" "$bin/componentize-py"

# JavaScript: componentize-js is called directly; `jco componentize` 1.35
# cannot read the WIT directory (its WASI shim has no preopens).
js=$tools/componentize-js-$COMPONENTIZE_JS
if [ ! -x "$js/node_modules/.bin/componentize-js" ]; then
  echo "installing componentize-js $COMPONENTIZE_JS (jco $JCO) into $js" >&2
  rm -rf "$js"
  mkdir -p "$js"
  echo '{"private": true}' >"$js/package.json"
  npm install --prefix "$js" --no-audit --no-fund --silent --save-exact \
    "@bytecodealliance/componentize-js@$COMPONENTIZE_JS" "@bytecodealliance/jco@$JCO" >&2 ||
    { rm -rf "$js"; exit 1; }
fi
ln -sfn "$js/node_modules/.bin/componentize-js" "$bin/componentize-js"
ln -sfn "$js/node_modules/.bin/jco" "$bin/jco"

"$bin/componentize-py" --version >&2
echo "componentize-js $("$bin/componentize-js" --version 2>/dev/null || echo "$COMPONENTIZE_JS")" >&2
echo "$bin"
