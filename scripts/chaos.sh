#!/usr/bin/env bash
# The fault suite (docs/reliability.md): real `outrun serve` processes drain
# events whose handler inserts one row each, while the script kills runtimes
# with SIGKILL, restarts PostgreSQL in immediate mode, and terminates every
# backend of the database in a storm. Afterwards each scenario checks that no
# event is left live, none is dead, every event's row exists exactly once and
# every group's rows were written in enqueue order.
#
#   scripts/chaos.sh                        # CHAOS=short: the CI run, debug binary
#   CHAOS=full PROFILE=release scripts/chaos.sh
#   SCENARIOS="kill storm" scripts/chaos.sh # a subset (kill, pg-restart, storm)
#
# Environment:
#   CHAOS=short|full        sizes (default short)
#   PROFILE=debug|release   which outrun binary to build and run (default debug)
#   SCENARIOS               space-separated subset of: kill pg-restart storm
#   OUTRUN_TEST_POSTGRES_URL  server to use (default postgres://postgres@127.0.0.1:5432/postgres);
#                           the script creates and drops its own database there
#   CHAOS_PG_RESTART        command that restarts PostgreSQL in immediate mode
#                           (default: pg_ctlcluster --skip-systemctl-redirect 15 main restart -m immediate)
#   CHAOS_SEED              seed for the random kill points (default: random; printed)
#   CHAOS_DRAIN_TIMEOUT     seconds a drain may take after the faults end (default 180 short, 600 full)
#   CHAOS_KILLS, CHAOS_KILL_PG_EVENTS, ... override one size of the mode (see below)
#   CHAOS_SKIP_BUILD=1      use the binary and guests already built
#   CHAOS_KEEP=1            keep the work directory (logs, configs, SQLite file) even on success
#
# Runs as root on a fresh machine: installs psql, sqlite3, python3, awk and
# ps with apt-get only when they are missing (Rust must be there). Exit status 0 only if every check
# of every scenario passed; failed checks are named at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CHAOS=${CHAOS:-short}
PROFILE=${PROFILE:-debug}
SCENARIOS=${SCENARIOS:-kill pg-restart storm}
PG_URL=${OUTRUN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PG_RESTART=${CHAOS_PG_RESTART:-pg_ctlcluster --skip-systemctl-redirect 15 main restart -m immediate}
SEED=${CHAOS_SEED:-$((RANDOM * 32768 + RANDOM))}
RANDOM=$SEED
GROUPS_N=50 # events with an even k carry group g<(k/2) % 50>; odd ones none

# Sizes per mode; each can be overridden by CHAOS_<NAME> (e.g. CHAOS_KILLS=3).
case $CHAOS in
short)
  KILL_PG_EVENTS=3000 KILL_LITE_EVENTS=1500 KILLS=5 KILL_FEED_SECS=12
  RESTART_EVENTS=3000 PG_RESTARTS=1 RESTART_GAP=4 RESTART_FEED_SECS=10
  STORM_EVENTS=3000 STORM_SECS=5 STORM_FEED_SECS=8
  DRAIN_TIMEOUT=180
  ;;
full)
  KILL_PG_EVENTS=20000 KILL_LITE_EVENTS=10000 KILLS=20 KILL_FEED_SECS=50
  RESTART_EVENTS=20000 PG_RESTARTS=3 RESTART_GAP=6 RESTART_FEED_SECS=25
  STORM_EVENTS=20000 STORM_SECS=15 STORM_FEED_SECS=20
  DRAIN_TIMEOUT=600
  ;;
*)
  echo "chaos.sh: CHAOS must be short or full, not '$CHAOS'" >&2
  exit 2
  ;;
esac
for v in KILL_PG_EVENTS KILL_LITE_EVENTS KILLS KILL_FEED_SECS RESTART_EVENTS PG_RESTARTS RESTART_GAP \
  RESTART_FEED_SECS STORM_EVENTS STORM_SECS STORM_FEED_SECS DRAIN_TIMEOUT; do
  o=CHAOS_$v
  if [ -n "${!o:-}" ]; then
    [[ ${!o} =~ ^[0-9]+$ ]] || { echo "chaos.sh: $o must be a whole number" >&2; exit 2; }
    printf -v "$v" %s "${!o}"
  fi
done
CHUNK=250 # events per enqueue transaction

for s in $SCENARIOS; do
  case $s in kill | pg-restart | storm) ;; *)
    echo "chaos.sh: unknown scenario '$s' in SCENARIOS (kill, pg-restart, storm)" >&2
    exit 2
    ;;
  esac
done

T0=$EPOCHREALTIME
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
say() { printf '[%6ss] %s\n' "$(elapsed "$T0" "$(now)")" "$*"; }
die() {
  echo "chaos.sh: $*" >&2
  exit 1
}
# Random integer in [lo, hi].
rand() { echo $(($1 + RANDOM % ($2 - $1 + 1))); }
ms() { awk -v m="$1" 'BEGIN { printf "%.3f", m / 1000 }'; }

# ---------------------------------------------------------------- tools ----
need() { # command package
  command -v "$1" >/dev/null 2>&1 && return
  [ "$(id -u)" = 0 ] || die "'$1' is missing (package $2) and this is not root; install it"
  echo "installing $2 (for '$1')" >&2
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq >&2
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2
}
need psql postgresql-client
need sqlite3 sqlite3
need python3 python3
need awk gawk
need ps procps
if ! command -v cargo >/dev/null 2>&1; then
  die "cargo is missing: install Rust with rustup (https://rustup.rs) first"
fi

# --------------------------------------------------------------- server ----
# The server URL with its database replaced by $1 (query string kept).
db_url() {
  local base=${PG_URL%%\?*} query=
  [ "$base" != "$PG_URL" ] && query="?${PG_URL#*\?}"
  local rest=${base#*://}
  if [[ $rest == */* ]]; then base=${base%/*}; fi
  echo "$base/$1$query"
}
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}
pg_admin() { psql "$PG_URL" -X -q -v ON_ERROR_STOP=1 -At "$@"; }
if ! err=$(pg_admin -c 'SELECT 1' 2>&1 >/dev/null); then
  die "PostgreSQL is unreachable at $PG_URL (set OUTRUN_TEST_POSTGRES_URL to point elsewhere): $err"
fi

# ---------------------------------------------------------------- build ----
case $PROFILE in
debug) BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/outrun BUILD=(cargo build -p outrun) ;;
release) BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/outrun BUILD=(cargo build --release -p outrun) ;;
*) die "PROFILE must be debug or release, not '$PROFILE'" ;;
esac
# Only the probe guest is needed (scripts/build-guests.sh builds them all).
GUEST_BUILD=(cargo build --quiet --profile guest --target wasm32-wasip2 -p probe)
if [ -z "${CHAOS_SKIP_BUILD:-}" ]; then
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "installing the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
  fi
  say "building: ${BUILD[*]}; ${GUEST_BUILD[*]}"
  "${BUILD[@]}"
  "${GUEST_BUILD[@]}"
fi
PROBE_BUILT=${CARGO_TARGET_DIR:-$ROOT/target}/wasm32-wasip2/guest/probe.wasm
[ -x "$BIN" ] || die "no binary at $BIN (unset CHAOS_SKIP_BUILD to build it)"
[ -f "$PROBE_BUILT" ] || die "no guest at $PROBE_BUILT (unset CHAOS_SKIP_BUILD to build it)"

# ----------------------------------------------------- work dir, cleanup ----
WORK=$(mktemp -d /tmp/outrun-chaos.XXXXXX)
# The runtimes watch their module for hot reload: give them a private copy,
# so a build elsewhere in the tree cannot swap the handler mid-run.
PROBE=$WORK/probe.wasm
cp "$PROBE_BUILT" "$PROBE"
RUN_ID="chaos_$$_$(date +%s)"
DATABASES=()
declare -A RT_PID=() RT_CONFIG=() RT_STARTS=() RT_EXITS=() RT_KILLS=()
BG_PIDS=()
FAILURES=()

cleanup() {
  local status=$?
  set +e
  for name in "${!RT_PID[@]}"; do
    kill -9 "${RT_PID[$name]}" 2>/dev/null
  done
  for pid in "${BG_PIDS[@]}"; do
    kill "$pid" 2>/dev/null
  done
  wait 2>/dev/null
  for db in "${DATABASES[@]}"; do
    pg_admin -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 ||
      echo "chaos.sh: could not drop database $db on $PG_URL" >&2
  done
  if [ "$status" = 0 ] && [ -z "${CHAOS_KEEP:-}" ]; then
    rm -rf "$WORK"
  else
    echo "logs, configs and the SQLite file are kept in $WORK" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { # check-name message
  FAILURES+=("$SCENARIO: $1")
  say "FAIL $1: $2"
}
pass() { say "ok   $1"; }

# ------------------------------------------------------------- databases ----
# Application tables of the handler, created beside the outbox. chaos_rows
# has no unique key on the event, so a duplicate execution shows up as a
# second row. `prev` is the highest n of the event's group the handler saw
# committed when it ran: the group's previous event, if the FIFO held.
# chaos_chunks records each enqueue transaction, so a retried enqueue whose
# first COMMIT did go through is recognised and not repeated.
PG_TABLES="
CREATE TABLE chaos_rows (id bigserial PRIMARY KEY, k bigint NOT NULL, grp text NOT NULL, n bigint NOT NULL,
                         prev bigint, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX chaos_rows_grp ON chaos_rows (grp, n);
CREATE TABLE chaos_chunks (chunk int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());"
LITE_TABLES="
CREATE TABLE chaos_rows (id INTEGER PRIMARY KEY AUTOINCREMENT, k INTEGER NOT NULL, grp TEXT NOT NULL, n INTEGER NOT NULL,
                         prev INTEGER, at REAL NOT NULL DEFAULT (julianday('now')));
CREATE INDEX chaos_rows_grp ON chaos_rows (grp, n);
CREATE TABLE chaos_chunks (chunk INTEGER PRIMARY KEY);"

new_pg_db() { # name -> creates it, migrates it, creates the app tables
  local db=$1
  pg_admin -c "CREATE DATABASE \"$db\"" >/dev/null
  DATABASES+=("$db")
  local out
  out=$("$BIN" --database "$(db_url "$db")" migrate 2>&1) || die "outrun migrate on database $db failed: $out"
  psql "$(db_url "$db")" -X -q -v ON_ERROR_STOP=1 -c "$PG_TABLES" >/dev/null
}
new_lite_db() { # path
  local out
  out=$("$BIN" --database "sqlite://$1?mode=rwc" migrate 2>&1) || die "outrun migrate on $1 failed: $out"
  sqlite3 "$1" "$LITE_TABLES"
}

# One query on a backend: q pg:<db>|lite:<path> SQL. Prints rows as a|b.
q() {
  case $1 in
  pg:*) psql "$(db_url "${1#pg:}")" -X -q -v ON_ERROR_STOP=1 -At -c "$2" ;;
  lite:*) sqlite3 -cmd ".timeout 30000" "${1#lite:}" "$2" ;;
  esac
}
url_of() {
  case $1 in
  pg:*) db_url "${1#pg:}" ;;
  lite:*) echo "sqlite://${1#lite:}?mode=rwc" ;;
  esac
}

# The payload: probe.sql runs one INSERT of (k, group, n = k, prev). Events
# with an even k carry a group; odd ones none (grp '' in chaos_rows).
HANDLER_SQL='INSERT INTO chaos_rows (k, grp, n, prev) VALUES ($1, $2, $3, (SELECT max(n) FROM chaos_rows WHERE grp = $2))'
enqueue_sql() { # backend chunk first last
  local from=$3 to=$4
  case $1 in
  pg:*)
    cat <<SQL
BEGIN;
INSERT INTO chaos_chunks (chunk) VALUES ($2);
INSERT INTO outbox_events (name, payload, group_id)
SELECT 'probe.sql',
       json_build_object('execute', json_build_array(json_build_object(
           'sql', '$HANDLER_SQL', 'params', json_build_array(k, coalesce(g, ''), k))))::text,
       g
FROM (SELECT k, CASE WHEN k % 2 = 0 THEN 'g' || ((k / 2) % $GROUPS_N) END AS g
      FROM generate_series($from, $to) AS k) s
ORDER BY k;
COMMIT;
SQL
    ;;
  lite:*)
    cat <<SQL
BEGIN IMMEDIATE;
INSERT INTO chaos_chunks (chunk) VALUES ($2);
WITH RECURSIVE s(k) AS (SELECT $from UNION ALL SELECT k + 1 FROM s WHERE k < $to)
INSERT INTO outbox_events (name, payload, group_id)
SELECT 'probe.sql',
       json_object('execute', json_array(json_object(
           'sql', '$HANDLER_SQL', 'params', json_array(k, coalesce(g, ''), k)))),
       g
FROM (SELECT k, CASE WHEN k % 2 = 0 THEN 'g' || ((k / 2) % $GROUPS_N) END AS g FROM s)
ORDER BY k;
COMMIT;
SQL
    ;;
  esac
}

# Enqueue events 1..total in chunks spread over `secs` seconds, each chunk in
# one transaction, retried until it is known to be committed (the database
# may be down or the connection terminated at any moment). Runs in the
# background; writes "ok" or the reason it gave up to $WORK/feed.<tag>.
feed() { # backend total secs tag
  local be=$1 total=$2 secs=$3 tag=$4
  local chunks=$(((total + CHUNK - 1) / CHUNK))
  local gap_ms=$((secs * 1000 / chunks))
  local c from to tries out
  for ((c = 0; c < chunks; c++)); do
    from=$((c * CHUNK + 1))
    to=$(((c + 1) * CHUNK))
    ((to > total)) && to=$total
    tries=0
    while :; do
      if out=$(enqueue_sql "$be" "$c" "$from" "$to" | case $be in
        pg:*) psql "$(url_of "$be")" -X -q -v ON_ERROR_STOP=1 2>&1 ;;
        lite:*) sqlite3 -bail -cmd ".timeout 30000" "${be#lite:}" 2>&1 ;;
        esac); then
        break
      fi
      # Committed after all (the connection died after COMMIT was sent)?
      if [ "$(q "$be" "SELECT count(*) FROM chaos_chunks WHERE chunk = $c" 2>/dev/null)" = 1 ]; then
        break
      fi
      tries=$((tries + 1))
      if ((tries > 240)); then
        echo "chunk $c still not enqueued after $tries attempts: $out" >"$WORK/feed.$tag"
        return 1
      fi
      sleep 0.25
    done
    sleep "$(ms "$gap_ms")"
  done
  echo ok >"$WORK/feed.$tag"
}

# -------------------------------------------------------------- runtimes ----
write_config() { # name backend
  cat >"$WORK/$1.toml" <<TOML
# chaos.sh runtime $1
database_url = "$(url_of "$2")"
cache_dir = "$WORK/cache"

[runtime]
concurrency = 8
batch_size = 32
poll_interval = "200ms"
lease_duration = "2s"        # a killed runtime's events run again 2 s later
max_retry = 8
backoff_base = "500ms"
backoff_max = "5s"
shutdown_grace = "2s"
cleanup_interval = "10s"

[log]
format = "text"

[[handler]]
name = "chaos"
module = "$PROBE"
events = ["probe.sql"]
timeout = "10s"
[handler.allow]
sql = true
TOML
  RT_CONFIG[$1]=$WORK/$1.toml
  RT_STARTS[$1]=0
  RT_EXITS[$1]=0
  RT_KILLS[$1]=0
}
start_rt() {
  local name=$1
  echo "---- start $((RT_STARTS[$name] + 1)) at $(date +%T.%N)" >>"$WORK/$name.log"
  "$BIN" serve --config "${RT_CONFIG[$name]}" >>"$WORK/$name.log" 2>&1 &
  RT_PID[$name]=$!
  RT_STARTS[$name]=$((RT_STARTS[$name] + 1))
}
alive() {
  local s
  s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]
}
kill9_rt() {
  local name=$1 pid=${RT_PID[$1]}
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "---- SIGKILL at $(date +%T.%N)" >>"$WORK/$name.log"
  RT_KILLS[$name]=$((${RT_KILLS[$name]} + 1))
}
# A runtime that exited without being killed is a failure of the scenario
# (it must survive database outages); restart it so the drain can finish.
check_rts() {
  local name code
  for name in "${!RT_PID[@]}"; do
    if ! alive "${RT_PID[$name]}"; then
      code=0
      wait "${RT_PID[$name]}" 2>/dev/null || code=$?
      RT_EXITS[$name]=$((RT_EXITS[$name] + 1))
      say "runtime $name exited by itself (status $code); its log ends with:"
      tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
      start_rt "$name"
    fi
  done
}
wait_ready() { # name... : until each logged "dispatch loop started" once per start
  local deadline=$((SECONDS + 120)) name n
  for name in "$@"; do
    while :; do
      n=$(grep -c "dispatch loop started" "$WORK/$name.log" || true)
      ((n >= ${RT_STARTS[$name]})) && break
      if ((SECONDS > deadline)); then
        tail -n 20 "$WORK/$name.log" >&2
        die "runtime $name did not start within 120 s (log: $WORK/$name.log)"
      fi
      check_rts
      sleep 0.2
    done
  done
}
stop_rts() { # SIGTERM, then SIGKILL after 15 s
  local name pid deadline
  for name in "${!RT_PID[@]}"; do kill -TERM "${RT_PID[$name]}" 2>/dev/null || true; done
  deadline=$((SECONDS + 15))
  for name in "${!RT_PID[@]}"; do
    pid=${RT_PID[$name]}
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if alive "$pid"; then
      fail "shutdown" "runtime $name did not stop within 15 s of SIGTERM"
      kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  RT_PID=()
}

# --------------------------------------------------------------- checks ----
stats() { # backend -> "live dead" from `outrun events stats --json`
  local j
  j=$("$BIN" --database "$(url_of "$1")" events stats --json 2>/dev/null) || return 1
  python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(s["pending"]+s["scheduled"]+s["running"], s["dead"])' "$j"
}
# Wait (at most 10 s) until some event of the backend is running, so the
# next fault hits handlers in flight rather than an idle runtime.
wait_busy() { # backend
  local deadline=$((SECONDS + 10)) j
  while ((SECONDS < deadline)); do
    j=$("$BIN" --database "$(url_of "$1")" events stats --json 2>/dev/null) &&
      python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["running"] > 0 else 1)' "$j" &&
      return 0
    sleep 0.05
  done
  say "(no event was running within 10 s; injecting the fault anyway)"
}
# Wait until no event is live on any of the backends; fail on timeout.
wait_drain() { # timeout backend...
  local timeout=$1
  shift
  local deadline=$((SECONDS + timeout)) be st all_done last=
  while :; do
    all_done=1
    last=
    for be in "$@"; do
      if st=$(stats "$be"); then
        last+=" $be: live ${st% *} dead ${st#* };"
        [ "${st% *}" = 0 ] || all_done=
      else
        last+=" $be: stats failed;"
        all_done=
      fi
    done
    [ -n "$all_done" ] && return 0
    if ((SECONDS > deadline)); then
      fail "drain" "events still live ${timeout}s after the faults ended:$last"
      for name in "${!RT_PID[@]}"; do
        say "last lines of runtime $name ($WORK/$name.log):"
        tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
      done
      return 1
    fi
    check_rts
    sleep 0.5
  done
}
# Figures and checks of one backend; appends a row to the summary table.
check_backend() { # backend events kills restarts seconds logs...
  local be=$1 n=$2 kills=$3 restarts=$4 secs=$5
  shift 5
  local st live dead rows distinct dups lost order retried eps
  st=$(stats "$be") || st="? ?"
  live=${st% *} dead=${st#* }
  IFS='|' read -r rows distinct < <(q "$be" "SELECT count(*), count(DISTINCT k) FROM chaos_rows")
  dups=$((rows - distinct))
  lost=$((n - distinct))
  # A grouped row is out of order if a row of its group with a smaller n
  # was written after it (id order), or if, when its handler ran, the
  # group's previous row was not yet committed (prev is not that row's n).
  local distinct_from="IS DISTINCT FROM"
  [[ $be == lite:* ]] && distinct_from="IS NOT"
  order=$(q "$be" "SELECT count(*) FROM (
                     SELECT r.n, r.prev, lag(r.n) OVER (PARTITION BY r.grp ORDER BY r.id) AS before,
                            (SELECT max(p.n) FROM chaos_rows p WHERE p.grp = r.grp AND p.n < r.n) AS predecessor
                     FROM chaos_rows r WHERE r.grp <> '') s
                   WHERE before >= n OR prev $distinct_from predecessor")
  retried=$(cat "$@" | grep -cE "event failed; will retry|committing the handler's effects failed" || true)
  eps=$(awk -v n="$n" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
  local tag="$SCENARIO/${be%%:*}"
  say "$tag: $n events, $rows rows ($distinct distinct), live $live, dead $dead, duplicates $dups, lost $lost, order violations $order, retried $retried, ${secs}s, $eps events/s"
  [ "$live" = 0 ] && pass "$tag no live event left" || fail "$tag live" "$live events still live"
  if [ "$dead" = 0 ]; then
    pass "$tag 0 dead"
  else
    fail "$tag dead" "$dead dead events; most frequent last_error:"
    q "$be" "SELECT count(*) || ' x ' || substr(last_error, 1, 200) FROM outbox_events
             WHERE retry >= max_retry GROUP BY last_error ORDER BY count(*) DESC LIMIT 5" | sed 's/^/    /'
  fi
  [ "$dups" = 0 ] && [ "$lost" = 0 ] && [ "$rows" = "$n" ] &&
    pass "$tag every row exactly once" ||
    fail "$tag rows" "$rows rows for $n events: $dups duplicates, $lost events without a row"
  [ "$order" = 0 ] && pass "$tag group order kept" ||
    fail "$tag order" "$order rows written before an earlier event of their group"
  ROWS+=("| $tag | $n | $kills | $restarts | $secs | $eps | $dead | $dups | $lost | $order | $retried |")
}
ROWS=()

# ------------------------------------------------------------- scenarios ----
# Faults run in the foreground while feed() enqueues in the background; then
# the drain is awaited and checked.
start_feed() { # backend total secs tag
  rm -f "$WORK/feed.$4"
  feed "$@" &
  BG_PIDS+=($!)
  FEED_PIDS+=($!)
}
finish_feed() { # tags...: wait for the feeders; fail if one gave up
  local pid tag
  for pid in "${FEED_PIDS[@]}"; do wait "$pid" || true; done
  FEED_PIDS=()
  for tag in "$@"; do
    if [ "$(cat "$WORK/feed.$tag" 2>/dev/null)" != ok ]; then
      fail "enqueue" "$tag: $(cat "$WORK/feed.$tag" 2>/dev/null || echo 'feeder died')"
    fi
  done
}
FEED_PIDS=()

scenario_kill() {
  SCENARIO=kill
  local db="${RUN_ID}_kill" lite="$WORK/kill.db"
  say "== (a) kill -9: two runtimes on PostgreSQL database $db, one on SQLite $lite; $KILLS kills"
  new_pg_db "$db"
  new_lite_db "$lite"
  write_config kill-pg1 "pg:$db"
  write_config kill-pg2 "pg:$db"
  write_config kill-lite "lite:$lite"
  local names=(kill-pg1 kill-pg2 kill-lite)
  for n in "${names[@]}"; do start_rt "$n"; done
  wait_ready "${names[@]}"
  local t0=$EPOCHREALTIME kills=0 victim
  start_feed "pg:$db" "$KILL_PG_EVENTS" "$KILL_FEED_SECS" kill-pg
  start_feed "lite:$lite" "$KILL_LITE_EVENTS" "$KILL_FEED_SECS" kill-lite
  for ((i = 0; i < KILLS; i++)); do
    sleep "$(ms "$(rand 500 2500)")"
    check_rts
    victim=${names[$((RANDOM % 3))]}
    kill9_rt "$victim"
    kills=$((kills + 1))
    say "kill -9 $victim ($kills/$KILLS)"
    sleep "$(ms "$(rand 100 1000)")"
    start_rt "$victim"
  done
  finish_feed kill-pg kill-lite
  wait_drain "$DRAIN_TIMEOUT" "pg:$db" "lite:$lite" || true
  local secs
  secs=$(elapsed "$t0" "$EPOCHREALTIME")
  stop_rts
  local pg_kills=$((${RT_KILLS[kill-pg1]} + ${RT_KILLS[kill-pg2]})) lite_kills=${RT_KILLS[kill-lite]}
  check_backend "pg:$db" "$KILL_PG_EVENTS" "$pg_kills" "$pg_kills" "$secs" "$WORK/kill-pg1.log" "$WORK/kill-pg2.log"
  check_backend "lite:$lite" "$KILL_LITE_EVENTS" "$lite_kills" "$lite_kills" "$secs" "$WORK/kill-lite.log"
  check_exits kill-pg1 kill-pg2 kill-lite
}

check_exits() {
  local name bad=
  for name in "$@"; do
    if ((${RT_EXITS[$name]} > 0)); then
      fail "runtimes kept running" "$name exited ${RT_EXITS[$name]} time(s) without being killed (see $WORK/$name.log)"
      bad=1
    fi
  done
  [ -n "$bad" ] || pass "$SCENARIO runtimes kept running"
}

pg_up() { pg_admin -c 'SELECT 1' >/dev/null 2>&1; }

scenario_pg_restart() {
  SCENARIO=pg-restart
  local db="${RUN_ID}_restart"
  say "== (b) PostgreSQL restarted in immediate mode $PG_RESTARTS time(s) during a drain of database $db"
  local cmd=${PG_RESTART%% *}
  command -v "$cmd" >/dev/null 2>&1 ||
    { fail "pg-restart" "cannot restart PostgreSQL: '$cmd' not found (set CHAOS_PG_RESTART)"; return; }
  new_pg_db "$db"
  write_config restart-pg1 "pg:$db"
  write_config restart-pg2 "pg:$db"
  local names=(restart-pg1 restart-pg2)
  for n in "${names[@]}"; do start_rt "$n"; done
  wait_ready "${names[@]}"
  local t0=$EPOCHREALTIME restarts=0 t
  start_feed "pg:$db" "$RESTART_EVENTS" "$RESTART_FEED_SECS" restart
  for ((i = 0; i < PG_RESTARTS; i++)); do
    sleep "$RESTART_GAP"
    check_rts
    wait_busy "pg:$db"
    say "restarting PostgreSQL: $PG_RESTART"
    t=$EPOCHREALTIME
    if ! out=$($PG_RESTART 2>&1); then
      fail "pg-restart" "'$PG_RESTART' failed: $out"
    fi
    restarts=$((restarts + 1))
    local deadline=$((SECONDS + 60))
    until pg_up; do
      ((SECONDS > deadline)) && die "PostgreSQL at $PG_URL did not come back within 60 s of '$PG_RESTART'"
      sleep 0.2
    done
    say "PostgreSQL accepts connections again after $(elapsed "$t" "$EPOCHREALTIME")s ($restarts/$PG_RESTARTS)"
  done
  finish_feed restart
  wait_drain "$DRAIN_TIMEOUT" "pg:$db" || true
  local secs
  secs=$(elapsed "$t0" "$EPOCHREALTIME")
  check_rts
  stop_rts
  check_backend "pg:$db" "$RESTART_EVENTS" 0 "$restarts" "$secs" "$WORK/restart-pg1.log" "$WORK/restart-pg2.log"
  check_exits "${names[@]}"
}

scenario_storm() {
  SCENARIO=storm
  local db="${RUN_ID}_storm"
  say "== (c) every backend of database $db terminated twice a second for ${STORM_SECS}s during a drain"
  new_pg_db "$db"
  write_config storm-pg1 "pg:$db"
  write_config storm-pg2 "pg:$db"
  local names=(storm-pg1 storm-pg2)
  for n in "${names[@]}"; do start_rt "$n"; done
  wait_ready "${names[@]}"
  local t0=$EPOCHREALTIME terminated=0 rounds=0 n
  start_feed "pg:$db" "$STORM_EVENTS" "$STORM_FEED_SECS" storm
  sleep 2
  wait_busy "pg:$db"
  # Rounds on a fixed 500 ms schedule (a round itself takes a psql start).
  local start_us=${EPOCHREALTIME/./} next_us wait_us
  for ((rounds = 0; rounds < STORM_SECS * 2; rounds++)); do
    n=$(pg_admin -c "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = '$db' AND pid <> pg_backend_pid()" 2>/dev/null || echo 0)
    terminated=$((terminated + n))
    next_us=$((start_us + (rounds + 1) * 500000))
    wait_us=$((next_us - ${EPOCHREALTIME/./}))
    ((wait_us > 0)) && sleep "$(ms $((wait_us / 1000)))"
  done
  say "storm over: $terminated backends terminated in $rounds rounds"
  check_rts
  finish_feed storm
  wait_drain "$DRAIN_TIMEOUT" "pg:$db" || true
  local secs
  secs=$(elapsed "$t0" "$EPOCHREALTIME")
  check_rts
  stop_rts
  check_backend "pg:$db" "$STORM_EVENTS" "$terminated" 0 "$secs" "$WORK/storm-pg1.log" "$WORK/storm-pg2.log"
  check_exits "${names[@]}"
}

say "chaos.sh: CHAOS=$CHAOS PROFILE=$PROFILE seed=$SEED scenarios: $SCENARIOS; server $PG_URL; work dir $WORK"
for s in $SCENARIOS; do
  case $s in
  kill) scenario_kill ;;
  pg-restart) scenario_pg_restart ;;
  storm) scenario_storm ;;
  esac
done

echo
echo "CHAOS=$CHAOS PROFILE=$PROFILE seed=$SEED, total $(elapsed "$T0" "$EPOCHREALTIME")s"
echo
echo "| scenario | events | kills | restarts | seconds | events/s | dead | duplicates | lost | order violations | retried |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
if ((${#FAILURES[@]})); then
  echo "FAILED checks (${#FAILURES[@]}):"
  printf '  - %s\n' "${FAILURES[@]}"
  exit 1
fi
echo "all checks passed"
