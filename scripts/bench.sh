#!/usr/bin/env bash
# Regenerate docs/benchmarks.md: build the release binary and the guests, run
# every scenario RUNS times (default 3) on fresh databases, take medians, and
# write the table with the command lines, the machine and the date. The
# floors (what the database does with the same work and no outrun in
# between) run in the same invocation, so every ratio in the file compares
# numbers taken minutes apart on the same machine.
#
#   scripts/bench.sh                 # everything (~20 min on 2 cores, idle)
#   RUNS=1 BIG=0 scripts/bench.sh    # quick: one run each, no 1M-event drain
#   BIG_RUNS=1 scripts/bench.sh      # the 1M-event drain (~3 min a run) once
#
# Sizes: EVENTS (default 100000) for the noop/json drains and the no-op
# floors; EFFECTS_EVENTS (default 20000) for the sql/emit drains, the noop
# drains they are compared with and the effects floors, at
# EFFECTS_CONCURRENCY (default 16, also pgbench's client count);
# POLYGLOT_EVENTS (default 2000) for the fresh-instance Python/JS drains
# (their reuse drains take EFFECTS_EVENTS);
# PGBENCH_SECONDS (default 10).
#
# Trying the script out without touching docs/benchmarks.md: ONLY="label ..."
# runs just those scenarios (labels as in the table; `floors`, `pgbench`,
# `reload` and `criterion` name the other parts) and writes the result to
# OUT (default: a temporary file, printed at the end); BIN=path uses that
# outrun binary instead of building the release one, e.g.
#   ONLY="sqlite-drain-sql floors" RUNS=1 EVENTS=2000 EFFECTS_EVENTS=1000 \
#     BIN=target/release/outrun scripts/bench.sh
#
# PostgreSQL: OUTRUN_BENCH_POSTGRES_URL (default
# postgres://postgres@127.0.0.1:5432/postgres); each run creates and drops its
# own database on that server. Not part of CI (tests/bench.rs is).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
BIG=${BIG:-1}
BIG_RUNS=${BIG_RUNS:-$RUNS}
EVENTS=${EVENTS:-100000}
EFFECTS_EVENTS=${EFFECTS_EVENTS:-20000}
EFFECTS_CONCURRENCY=${EFFECTS_CONCURRENCY:-16}
POLYGLOT_EVENTS=${POLYGLOT_EVENTS:-2000}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-10}
PAYLOAD_BYTES=200
# The floors claim as many rows per statement as the bench's --batch-size.
FLOOR_BATCH=512
ONLY=${ONLY:-}
PG_ADMIN=${OUTRUN_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
OUT=${OUT:-$([ -z "$ONLY" ] && echo docs/benchmarks.md || echo "${TMPDIR:-/tmp}/outrun-benchmarks-partial.md")}

# Tools the floors need, installed only when missing (Debian package names;
# pgbench ships with the server, which postgresql-contrib pulls in).
apt_updated=
need() {
  local probe=$1 package=$2
  if $probe >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if [ -z "$apt_updated" ]; then apt-get update -qq >&2; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >&2
  else
    echo "bench.sh needs \`$probe\` (Debian package $package)" >&2
    exit 1
  fi
}
need "sqlite3 --version" sqlite3
need "psql --version" postgresql-client
need "pgbench --version" postgresql-contrib

# wanted LABEL: whether this invocation runs LABEL.
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

scripts/build-guests.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet -p outrun
  bin=target/release/outrun
else
  bin=$BIN
fi
module=target/guests/bench.wasm
cache="$work/cache"

pg_url() { python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/"+sys.argv[2])))' "$PG_ADMIN" "$1"; }
psql_admin() { psql "$PG_ADMIN" -qAtX -v ON_ERROR_STOP=1 -c "$1" >/dev/null; }
pg_fresh() { # -> URL of a new, empty database
  local name="outrun_bench_$$_$RANDOM"
  psql_admin "CREATE DATABASE $name"
  pg_url "$name"
}
pg_drop() { psql_admin "DROP DATABASE ${1##*/} WITH (FORCE)"; }
now() { date +%s.%N; }
migrate() { local out; out=$("$bin" --database "$1" migrate 2>&1) || { echo "$out" >&2; exit 1; }; }

# run_one BACKEND ARGS... -> one JSON line appended to $work/<label>.jsonl
run_one() {
  local label=$1 backend=$2; shift 2
  local url
  if [ "$backend" = sqlite ]; then
    rm -rf "$work/db" && mkdir -p "$work/db"
    url="sqlite://$work/db/bench.db?mode=rwc"
  else
    url=$(pg_fresh)
  fi
  local config=()
  if [ -n "${BENCH_CONFIG:-}" ]; then config=(--config "$BENCH_CONFIG"); fi
  "$bin" "${config[@]}" --database "$url" bench --module "${BENCH_MODULE:-$module}" --cache-dir "$cache" --json "$@" >>"$work/$label.jsonl"
  if [ "$backend" = postgres ]; then pg_drop "$url"; fi
  tail -n1 "$work/$label.jsonl" >&2
}

scenario() {
  local label=$1 backend=$2; shift 2
  wanted "$label" || return 0
  echo "== $label ($backend): outrun bench $*" >&2
  printf '%s\t%s\t%s\n' "$label" outrun "${BENCH_CONFIG:+(config ${BENCH_CONFIG##*/}, written by scripts/bench.sh) }${BENCH_MODULE:+(--module $BENCH_MODULE instead) }$*" >>"$work/commands.tsv"
  for _ in $(seq "${SCENARIO_RUNS:-$RUNS}"); do run_one "$label" "$backend" "$@"; done
}

# The event payload of the drains: {"id":1,"pad":"xx…"} of PAYLOAD_BYTES.
payload=$(python3 -c 'import sys; b='"'"'{"id":1,"pad":""}'"'"'; n=int(sys.argv[1]); print(b.replace("\"pad\":\"\"", "\"pad\":\"" + "x" * max(0, n - len(b)) + "\""))' "$PAYLOAD_BYTES")
bench_table="CREATE TABLE outrun_bench_rows (event_id TEXT PRIMARY KEY, attempt BIGINT NOT NULL, payload TEXT NOT NULL)"

# floor_record LABEL BACKEND EVENTS START END: one JSON line, as run_one's.
floor_record() {
  python3 -c 'import json,sys; l,b,n,t0,t1=sys.argv[1:]; s=float(t1)-float(t0); print(json.dumps({"floor":True,"backend":b,"events":int(n),"seconds":s,"events_per_sec":int(n)/s}))' \
    "$@" >>"$work/$1.jsonl"
  tail -n1 "$work/$1.jsonl" >&2
}

# The claim as outrun's (same WHERE and order, the lease written to the
# same columns), then the handler's insert and the ack's delete, in one
# transaction per batch of FLOOR_BATCH: the database's work for the same
# events with no round trip, no handler and no runtime.
pg_floor_procedure="
CREATE PROCEDURE outrun_floor(with_insert boolean) LANGUAGE plpgsql AS \$\$
DECLARE
  ids uuid[];
  payloads text[];
  token uuid;
BEGIN
  LOOP
    token := gen_random_uuid();
    WITH ready AS (
      SELECT e.id FROM outbox_events e
      WHERE e.retry < e.max_retry AND e.available_at <= now()
        AND (e.expires_at IS NULL OR e.expires_at > now())
        AND (e.group_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM outbox_events p
            WHERE p.group_id = e.group_id AND p.seq < e.seq AND p.retry < p.max_retry))
      ORDER BY e.available_at, e.seq
      LIMIT $FLOOR_BATCH
      FOR UPDATE SKIP LOCKED),
    leased AS (
      UPDATE outbox_events o
      SET locked_by = 'floor', lock_token = token,
          locked_until = now() + interval '30 s', available_at = now() + interval '30 s'
      FROM ready WHERE o.id = ready.id
      RETURNING o.id, o.payload)
    SELECT array_agg(id ORDER BY id), array_agg(payload ORDER BY id) INTO ids, payloads FROM leased;
    EXIT WHEN ids IS NULL;
    IF with_insert THEN
      INSERT INTO outrun_bench_rows (event_id, attempt, payload)
      SELECT i::text, 1, p FROM unnest(ids, payloads) AS b(i, p);
    END IF;
    DELETE FROM outbox_events WHERE id = ANY(ids) AND lock_token = token;
    COMMIT;
  END LOOP;
END
\$\$;"

# postgres_floor LABEL WITH_INSERT EVENTS
postgres_floor() {
  local label=$1 with_insert=$2 n=$3 url t0 t1 left rows
  url=$(pg_fresh)
  migrate "$url"
  psql "$url" -qAtX -v ON_ERROR_STOP=1 >/dev/null <<SQL
INSERT INTO outbox_events (name, payload) SELECT 'bench.noop', '$payload' FROM generate_series(1, $n);
$bench_table;
$pg_floor_procedure
VACUUM ANALYZE outbox_events;
SQL
  # outrun's claim and ack run with its bookkeeping settings (asynchronous
  # commit, planner pinned to the index), and a handler's insert commits
  # with its ack in a lane or a pipe, asynchronously too
  # (store::lane::lane_settings), so both floors commit that way.
  local opts="-c enable_sort=off -c enable_seqscan=off -c enable_bitmapscan=off -c enable_hashjoin=off -c enable_mergejoin=off -c jit=off -c synchronous_commit=off"
  t0=$(now)
  PGOPTIONS="$opts" psql "$url" -qAtX -v ON_ERROR_STOP=1 -c "CALL outrun_floor($with_insert)" >/dev/null
  t1=$(now)
  left=$(psql "$url" -qAtX -c "SELECT count(*) FROM outbox_events")
  rows=$(psql "$url" -qAtX -c "SELECT count(*) FROM outrun_bench_rows")
  pg_drop "$url"
  if [ "$left" != 0 ] || { [ "$with_insert" = true ] && [ "$rows" != "$n" ]; }; then
    echo "$label: the floor left $left events and wrote $rows rows for $n events" >&2
    exit 1
  fi
  floor_record "$label" postgres "$n" "$t0" "$t1"
}

# sqlite_floor LABEL WITH_INSERT EVENTS: the sqlite3 shell running the same
# statements as outrun's claim and ack (with the handler's insert between)
# from a generated script, on an outrun-migrated file with the same
# journal mode and synchronous setting as outrun's connections.
sqlite_floor() {
  local label=$1 with_insert=$2 n=$3 db="$work/floor.db" script="$work/floor.sql" t0 t1 left rows
  rm -f "$db" "$db-wal" "$db-shm"
  migrate "sqlite://$db?mode=rwc"
  sqlite3 -bail "$db" >/dev/null <<SQL
WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < $n)
INSERT INTO outbox_events (name, payload) SELECT 'bench.noop', '$payload' FROM c;
$bench_table;
SQL
  python3 - "$n" "$FLOOR_BATCH" "$with_insert" >"$script" <<'PY'
import sys, time
n, batch, with_insert = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "true"
now = int(time.time() * 1000)  # after the fill: every event is due
until = now + 30_000
print("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;")
print("CREATE TEMP TABLE batch (rid INTEGER PRIMARY KEY);")
for i in range((n + batch - 1) // batch):
    token = f"floor-{i}"
    print("BEGIN IMMEDIATE;")
    print(f"""INSERT INTO temp.batch SELECT e.rowid FROM outbox_events e
WHERE e.retry < e.max_retry AND e.available_at <= {now}
  AND (e.expires_at IS NULL OR e.expires_at > {now})
  AND (e.locked_until IS NULL OR e.locked_until < {now})
  AND (e.group_id IS NULL OR NOT EXISTS (
      SELECT 1 FROM outbox_events p
      WHERE p.group_id = e.group_id AND p.rowid < e.rowid AND p.retry < p.max_retry))
ORDER BY e.available_at, e.rowid LIMIT {batch};""")
    print(f"UPDATE outbox_events SET locked_by = 'floor', locked_until = {until}, lock_token = '{token}', "
          f"available_at = {until} WHERE rowid IN (SELECT rid FROM temp.batch);")
    if with_insert:
        print("INSERT INTO outrun_bench_rows (event_id, attempt, payload) "
              "SELECT id, 1, payload FROM outbox_events WHERE rowid IN (SELECT rid FROM temp.batch);")
    print(f"DELETE FROM outbox_events WHERE rowid IN (SELECT rid FROM temp.batch) AND lock_token = '{token}';")
    print("DELETE FROM temp.batch;")
    print("COMMIT;")
PY
  t0=$(now)
  sqlite3 -bail "$db" <"$script" >/dev/null
  t1=$(now)
  left=$(sqlite3 "$db" "SELECT count(*) FROM outbox_events")
  rows=$(sqlite3 "$db" "SELECT count(*) FROM outrun_bench_rows")
  rm -f "$db" "$db-wal" "$db-shm"
  if [ "$left" != 0 ] || { [ "$with_insert" = true ] && [ "$rows" != "$n" ]; }; then
    echo "$label: the floor left $left events and wrote $rows rows for $n events" >&2
    exit 1
  fi
  floor_record "$label" sqlite "$n" "$t0" "$t1"
}

floor() {
  local label=$1 backend=$2 with_insert=$3 n=$4 what
  wanted "$label" || wanted floors || return 0
  what="claim + delete"
  if [ "$with_insert" = true ]; then what="claim + insert + delete"; fi
  echo "== $label ($backend floor): $what, $n events, batches of $FLOOR_BATCH" >&2
  printf '%s\t%s\t%s\n' "$label" floor "$what of $n events in batches of $FLOOR_BATCH" >>"$work/commands.tsv"
  for _ in $(seq "$RUNS"); do "${backend}_floor" "$label" "$with_insert" "$n"; done
}

# One INSERT per transaction of the same row as the sql handler's, from
# EFFECTS_CONCURRENCY clients: what PostgreSQL commits without batching.
# pgbench-insert commits as the server is configured (the issue's target is
# against it); pgbench-insert-async commits as outrun's effects transactions
# do (`synchronous_commit = off`), which leaves the round trip per
# statement that outrun's sql drain pays too, once per event.
pgbench_insert() {
  wanted pgbench || return 0
  local cmd="pgbench -n -c $EFFECTS_CONCURRENCY -j 2 -T $PGBENCH_SECONDS -f insert.sql" url out tps label opts
  echo "INSERT INTO outrun_bench_rows (event_id, attempt, payload) VALUES (gen_random_uuid()::text, 1, '$payload');" >"$work/insert.sql"
  printf '%s\t%s\t%s\n' pgbench-insert pgbench "$cmd" >>"$work/commands.tsv"
  printf '%s\t%s\t%s\n' pgbench-insert-async pgbench "PGOPTIONS='-c synchronous_commit=off' $cmd" >>"$work/commands.tsv"
  for _ in $(seq "$RUNS"); do
    # Alternated, so both see the machine in the same minutes.
    for label in pgbench-insert pgbench-insert-async; do
      opts=""
      if [ "$label" = pgbench-insert-async ]; then opts="-c synchronous_commit=off"; fi
      echo "== $label: $cmd${opts:+ with PGOPTIONS=$opts}" >&2
      url=$(pg_fresh)
      psql "$url" -qAtX -v ON_ERROR_STOP=1 -c "$bench_table" >/dev/null
      out=$(cd "$work" && PGOPTIONS="$opts" pgbench -n -c "$EFFECTS_CONCURRENCY" -j 2 -T "$PGBENCH_SECONDS" -f insert.sql "$url" 2>&1) ||
        { echo "$out" >&2; exit 1; }
      pg_drop "$url"
      tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out" | head -n1)
      if [ -z "$tps" ]; then echo "pgbench printed no tps: $out" >&2; exit 1; fi
      python3 -c 'import json,sys; print(json.dumps({"pgbench":True,"backend":"postgres","clients":int(sys.argv[1]),"seconds":int(sys.argv[2]),"tps":float(sys.argv[3])}))' \
        "$EFFECTS_CONCURRENCY" "$PGBENCH_SECONDS" "$tps" >>"$work/$label.jsonl"
      tail -n1 "$work/$label.jsonl" >&2
    done
  done
}

# The first run compiles the guest into the fresh cache; record that too.
rm -rf "$cache"
touch "$work/commands.tsv"
scenario sqlite-drain        sqlite   --events "$EVENTS" --payload-bytes $PAYLOAD_BYTES --handler noop
scenario pg-drain            postgres --events "$EVENTS" --payload-bytes $PAYLOAD_BYTES --handler noop
scenario pg-drain-json       postgres --events "$EVENTS" --payload-bytes $PAYLOAD_BYTES --handler json
scenario sqlite-drain-json   sqlite   --events "$EVENTS" --payload-bytes $PAYLOAD_BYTES --handler json
scenario pg-latency-500      postgres --mode latency --rate 500 --events 5000
scenario pg-drain-10k        postgres --events 10000
if [ "$BIG" = 1 ]; then
  SCENARIO_RUNS=$BIG_RUNS scenario pg-drain-1m postgres --events 1000000
fi
# Handlers with effects, each next to a noop drain of the same size and
# concurrency so sql/noop and emit/noop compare like with like.
effects=(--events "$EFFECTS_EVENTS" --concurrency "$EFFECTS_CONCURRENCY" --payload-bytes $PAYLOAD_BYTES)
for backend in sqlite pg; do
  b=$([ $backend = pg ] && echo postgres || echo sqlite)
  scenario $backend-drain-noop-c$EFFECTS_CONCURRENCY $b "${effects[@]}" --handler noop
  scenario $backend-drain-sql  $b "${effects[@]}" --handler sql
  scenario $backend-drain-emit $b "${effects[@]}" --handler emit
done
# What [[limit]] and [schemas] cost when they do not bind or refuse
# anything: the noop drain with each config, next to the plain drain in
# the same run (the ratios below). The bench payload's "/id" is the same
# in every event, so the per-key limit stays unbound only with a per_key
# above everything in flight.
cat >"$work/limit-rate.toml" <<'TOML'
[[limit]]
event = "bench.noop"
rate = "1000000/s"
TOML
cat >"$work/limit-per-key.toml" <<'TOML'
[[limit]]
event = "bench.noop"
concurrency_key = "/id"
per_key = 1000000
TOML
mkdir -p "$work/schemas"
cat >"$work/schemas/bench.noop.json" <<'JSON'
{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "type": "object",
  "required": ["id", "pad"],
  "additionalProperties": false,
  "properties": {"id": {"type": "integer"}, "pad": {"type": "string"}}
}
JSON
printf '[schemas]\ndir = "%s/schemas"\n' "$work" >"$work/schema.toml"
# Interleaved (plain, rate, per-key, schema; then again), next to a plain
# drain of their own: a plain drain minutes earlier would carry the
# machine's drift into the ratio.
touch "$work/empty.toml"
for backend in sqlite pg; do
  b=$([ $backend = pg ] && echo postgres || echo sqlite)
  for _ in $(seq "$RUNS"); do
    for cfg in empty limit-rate limit-per-key schema; do
      label=$backend-drain-$([ $cfg = empty ] && echo plain || echo $cfg)
      BENCH_CONFIG="$work/$cfg.toml" SCENARIO_RUNS=1 scenario $label $b --events "$EVENTS" --payload-bytes $PAYLOAD_BYTES --handler noop
    done
  done
done
# Python and JavaScript (the bench guests of handlers/bench-{python,js}:
# parse the payload, return): a new instance per event vs a warm pool.
# Fresh instances cost milliseconds each, hence fewer events.
if wanted sqlite-drain-python-fresh || wanted sqlite-drain-python-reuse ||
  wanted sqlite-drain-js-fresh || wanted sqlite-drain-js-reuse; then
  scripts/build-polyglot-guests.sh
fi
for lang in python js; do
  BENCH_MODULE=target/guests/bench_$lang.wasm scenario sqlite-drain-$lang-fresh sqlite \
    --events "$POLYGLOT_EVENTS" --concurrency "$EFFECTS_CONCURRENCY" --payload-bytes $PAYLOAD_BYTES --handler json --instances fresh
  BENCH_MODULE=target/guests/bench_$lang.wasm scenario sqlite-drain-$lang-reuse sqlite \
    --events "$EFFECTS_EVENTS" --concurrency "$EFFECTS_CONCURRENCY" --payload-bytes $PAYLOAD_BYTES --handler json --instances reuse
done
floor sqlite-floor-noop sqlite false "$EVENTS"
floor sqlite-floor-sql  sqlite true  "$EFFECTS_EVENTS"
floor pg-floor-noop     postgres false "$EVENTS"
floor pg-floor-sql      postgres true  "$EFFECTS_EVENTS"
pgbench_insert

if wanted reload; then
  echo "== reload: outrun bench --mode reload --events 30" >&2
  for _ in $(seq "$RUNS"); do
    "$bin" bench --mode reload --module "$module" --events 30 --json >>"$work/reload.jsonl"
    tail -n1 "$work/reload.jsonl" >&2
  done
fi

criterion_out="$work/criterion.txt"
touch "$criterion_out"
if wanted criterion; then
  cargo bench --quiet -p outrun --bench host_overhead 2>/dev/null | tee "$criterion_out" >&2
fi

EFFECTS_CONCURRENCY=$EFFECTS_CONCURRENCY EFFECTS_EVENTS=$EFFECTS_EVENTS EVENTS=$EVENTS \
python3 - "$work" "$RUNS" "$OUT" "$criterion_out" <<'PY'
import json, os, re, statistics, subprocess, sys, datetime, platform
work, runs, out, crit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
conc = int(os.environ["EFFECTS_CONCURRENCY"])
cmds = [l.rstrip("\n").split("\t", 2) for l in open(os.path.join(work, "commands.tsv"))]
# Interleaved scenarios are listed once per run; keep the first of each.
cmds = [c for i, c in enumerate(cmds) if c[0] not in [d[0] for d in cmds[:i]]]
def med(xs): return statistics.median(xs)
def jsonl(name):
    path = os.path.join(work, name + ".jsonl")
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []
rows, floors = [], []
for label, kind, cmd in cmds:
    rs = jsonl(label)
    if kind != "outrun":
        key = "tps" if kind == "pgbench" else "events_per_sec"
        vals = [r[key] for r in rs]
        floors.append({"label": label, "kind": kind, "cmd": cmd, "backend": rs[0]["backend"],
                       "events": rs[0].get("events"), "eps": med(vals), "eps_all": vals})
        continue
    eps = [r["events_per_sec"] for r in rs]
    row = {
        "label": label, "cmd": cmd, "n": len(rs), "backend": rs[0]["backend"],
        "mode": rs[0]["mode"], "handler": rs[0]["handler"], "events": rs[0]["events"],
        "eps": med(eps), "eps_all": eps,
        "enq": med([r["enqueue_per_sec"] for r in rs]),
        "p50": med([r["latency_ms"]["p50"] for r in rs]),
        "p99": med([r["latency_ms"]["p99"] for r in rs]),
        "rss": max(r["peak_rss_mb"] or 0 for r in rs),
        "load": [(round(r["load_ms"], 1), r["module_from_cache"]) for r in rs],
    }
    if rs[0].get("start_latency_ms"):
        row["s50"] = med([r["start_latency_ms"]["p50"] for r in rs])
        row["s99"] = med([r["start_latency_ms"]["p99"] for r in rs])
    if rs[0].get("start_after_commit_ms"):
        row["c50"] = med([r["start_after_commit_ms"]["p50"] for r in rs])
        row["c99"] = med([r["start_after_commit_ms"]["p99"] for r in rs])
        row["e50"] = med([r["enqueue_call_ms"]["p50"] for r in rs])
    rows.append(row)

cpu = "unknown"
for l in open("/proc/cpuinfo"):
    if l.startswith("model name"): cpu = l.split(":", 1)[1].strip(); break
load = open("/proc/loadavg").read().split()[:3]
pgv = subprocess.run(["psql", os.environ.get("OUTRUN_BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"), "-Atc", "show server_version"], capture_output=True, text=True).stdout.strip()
sqlv = subprocess.run(["sqlite3", "--version"], capture_output=True, text=True).stdout.split(" ")[0]
L = []
L.append("# Benchmarks\n")
L.append("Generated by `scripts/bench.sh` (do not edit by hand; rerun it).\n")
L.append(f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
L.append(f"- Machine: {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}; "
         f"load average at the end {' '.join(load)} (the machine is shared, so numbers are noisy)")
L.append(f"- PostgreSQL {pgv} on the same machine; SQLite file in a temp directory (floors: sqlite3 shell {sqlv})")
L.append(f"- Each row: median of the runs listed in the last column ({runs} unless fewer are listed), each on a fresh database\n")
L.append("| scenario | events | events/s (median) | enqueue/s | latency p50 / p99 ms | peak RSS MiB | all runs, events/s |")
L.append("|---|---:|---:|---:|---|---:|---|")
for r in rows:
    if r["mode"] == "latency":
        lat = f"enqueue→start {r['s50']:.2f} / {r['s99']:.2f}; "
        if "c50" in r:
            lat += f"committed→start {r['c50']:.2f} / {r['c99']:.2f}; "
        lat += f"enqueue→acked {r['p50']:.2f} / {r['p99']:.2f}"
        if "e50" in r:
            lat += f" (enqueue call p50 {r['e50']:.2f})"
    else:
        lat = f"start→acked {r['p50']:.2f} / {r['p99']:.2f}"
    allr = ", ".join(f"{x:,.0f}" for x in r["eps_all"])
    L.append(f"| {r['label']} | {r['events']:,} | {r['eps']:,.0f} | {r['enq']:,.0f} | {lat} | {r['rss']:.0f} | {allr} |")
L.append("")
if any(r["handler"] in ("sql", "emit") for r in rows):
    L.append(f"sql: each event's handler does one INSERT through the `sql` capability into a bench table; "
             f"emit: each event emits one follow-up, delayed by an hour and bound to no handler, so it is "
             f"not drained work. After each run the bench checked one row (sql) or one follow-up (emit) per event.\n")
def row(label): return next((r for r in rows if r["label"] == label), None)
ten, big = row("pg-drain-10k"), row("pg-drain-1m")
if ten and big:
    L.append(f"1,000,000 pending vs 10,000 pending (PostgreSQL): {big['eps']:,.0f} vs {ten['eps']:,.0f} events/s "
             f"({100 * big['eps'] / ten['eps']:.0f}%), peak RSS {big['rss']:.0f} MiB.\n")
# The run starts with an empty artifact cache: the first load of each
# module (the bench guest, then the Python and JS ones) compiles it; every
# later load is a restart with an unchanged module and must come from the
# cache.
def module_of(r):
    m = re.search(r"\(--module (\S+) instead\)", r["cmd"])
    return os.path.basename(m.group(1) if m else "target/guests/bench.wasm")
firsts, later = {}, []
for r in rows:
    module = module_of(r)
    for l in r["load"]:
        if module in firsts:
            later.append(l)
        else:
            firsts[module] = l
warm = [l for l in later if l[1]]
if rows:
    compiled = ", ".join(f"{m} {l[0]} ms (from cache: {l[1]})" for m, l in firsts.items())
    L.append(f"Handler load: the first load of each module (empty artifact cache, compiles it): {compiled}; "
             f"later loads (restart, unchanged module) from the cache: {len(warm)} of {len(later)}, in "
             f"{med([l[0] for l in warm]) if warm else float('nan'):.1f} ms median.\n")

def floor(label): return next((f for f in floors if f["label"] == label), None)
if floors:
    L.append("## Floors\n")
    L.append("The database doing the same work with no outrun in between, in the same run as the rows above "
             "(see Command lines for each):\n")
    L.append("| floor | events | events/s (median) | all runs |")
    L.append("|---|---:|---:|---|")
    for f in floors:
        allr = ", ".join(f"{x:,.0f}" for x in f["eps_all"])
        if f["kind"] == "pgbench":
            L.append(f"| {f['label']} | {conc} clients | {f['eps']:,.0f} tps | {allr} |")
        else:
            L.append(f"| {f['label']} | {f['events']:,} | {f['eps']:,.0f} | {allr} |")
    L.append("")

# Ratios of medians, each with its target where the benchmark issue sets one.
def verdict(ok): return "**met**" if ok else "**not met**"
R = []
def ratio(what, num, den, target=None, den_unit="events/s"):
    if not (num and den): return
    v = num["eps"] / den["eps"]
    R.append({"what": what, "num": num, "den": den, "v": v, "target": target, "den_unit": den_unit,
              "ok": None if target is None else v >= target})
for be in ("sqlite", "pg"):
    base = row(f"{be}-drain-noop-c{conc}")
    name = "SQLite" if be == "sqlite" else "PostgreSQL"
    ratio(f"{name} sql / noop", row(f"{be}-drain-sql"), base, 0.6)
    ratio(f"{name} emit / noop", row(f"{be}-drain-emit"), base, 0.6)
for lang, name in (("python", "Python"), ("js", "JavaScript")):
    ratio(f"{name} json, reused / fresh instances", row(f"sqlite-drain-{lang}-reuse"),
          row(f"sqlite-drain-{lang}-fresh"), 5.0)
for be, name in (("sqlite", "SQLite"), ("pg", "PostgreSQL")):
    plain = f"{be}-drain-plain"
    ratio(f"{name} noop, a rate limit that does not bind / none", row(f"{be}-drain-limit-rate"), row(plain), 0.95)
    ratio(f"{name} noop, a per-key limit that does not bind / none", row(f"{be}-drain-limit-per-key"), row(plain), 0.95)
    ratio(f"{name} noop, a schema for the event / none", row(f"{be}-drain-schema"), row(plain), 0.95)
ratio("PostgreSQL sql / pgbench one-insert transactions", row("pg-drain-sql"), floor("pgbench-insert"), 2.0, "tps")
ratio("PostgreSQL sql / pgbench one-insert transactions, asynchronous commit as outrun's",
      row("pg-drain-sql"), floor("pgbench-insert-async"), None, "tps")
ratio("SQLite noop / sqlite3 shell floor (claim + delete)", row("sqlite-drain"), floor("sqlite-floor-noop"), 1.0)
ratio("SQLite sql / sqlite3 shell floor (claim + insert + delete)", row("sqlite-drain-sql"), floor("sqlite-floor-sql"))
ratio("PostgreSQL noop / in-engine floor (claim + delete)", row("pg-drain"), floor("pg-floor-noop"))
ratio("PostgreSQL sql / in-engine floor (claim + insert + delete)", row("pg-drain-sql"), floor("pg-floor-sql"))
if R:
    L.append("## Ratios\n")
    L.append("Medians of this run divided; a target is the benchmark issue's.\n")
    L.append("| ratio | numerator | denominator | ratio | target |")
    L.append("|---|---|---|---:|---|")
    for x in R:
        tgt = "—" if x["target"] is None else f"≥ {x['target']:g}: {verdict(x['ok'])}"
        L.append(f"| {x['what']} | {x['num']['label']} {x['num']['eps']:,.0f} | "
                 f"{x['den']['label']} {x['den']['eps']:,.0f} {x['den_unit']} | {x['v']:.2f} | {tgt} |")
    L.append("")

if os.path.getsize(crit):
    L.append("## Per-event host overhead (criterion, `cargo bench -p outrun --bench host_overhead`)\n")
    L.append("Fresh `Store` + instantiate from `InstancePre` (pooling allocator) + `handle` call + teardown, one event at a time on one thread, no database:\n")
    L.append("```")
    for l in open(crit):
        if re.search(r"time:|^fresh_instance", l): L.append(l.rstrip())
    L.append("```\n")
rl = jsonl("reload")
if rl:
    rel = {k: med([r["latency_ms"][k] for r in rl]) for k in ("p50", "p90", "p99", "max")}
    L.append(f"## Hot reload (`outrun bench --mode reload --events 30`)\n")
    L.append(f"A new version of the {rl[0]['module_bytes']:,}-byte bench guest renamed over the watched file → "
             f"that version serving (watcher, debounce, read, hash, compile, swap), {len(rl)} runs of 30, medians: "
             f"p50 {rel['p50']:.1f} ms, p90 {rel['p90']:.1f} ms, p99 {rel['p99']:.1f} ms, max {rel['max']:.1f} ms.\n")

# Targets of the benchmark issue, judged from the numbers above.
noop_us = None
for l in open(crit):
    m = re.search(r"time:\s*\[[\d.]+ \S+ ([\d.]+) (\S+)", l)
    if m and noop_us is None:
        noop_us = float(m.group(1)) * {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3}.get(m.group(2), float("nan"))
T = []
# The issue sets these at 100k events; a run with EVENTS=… says what it measured.
def k(n): return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"
r = row("pg-drain")
if r: T.append((f"PostgreSQL drain, {k(r['events'])}, 200 B: ≥ 40,000 events/s", f"{r['eps']:,.0f}", verdict(r["eps"] >= 40000)))
r = row("sqlite-drain")
if r: T.append((f"SQLite drain, {k(r['events'])}, 200 B: ≥ 60,000 events/s", f"{r['eps']:,.0f}", verdict(r["eps"] >= 60000)))
if noop_us is not None:
    T.append(("host overhead, fresh instance, noop: ≤ 15 µs median", f"{noop_us:.2f} µs", verdict(noop_us <= 15)))
r = row("pg-latency-500")
if r: T.append(("PostgreSQL at 500/s, enqueue→handler start: p50 ≤ 3 ms, p99 ≤ 20 ms",
                f"p50 {r['s50']:.2f} / p99 {r['s99']:.2f} ms", verdict(r["s50"] <= 3 and r["s99"] <= 20)))
if ten and big:
    ratio_big = big["eps"] / ten["eps"]
    T.append(("1M pending within 20% of 10k pending; peak RSS ≤ 200 MB",
              f"{100 * ratio_big:.0f}%, {big['rss']:.0f} MiB", verdict(ratio_big >= 0.8 and big["rss"] <= 200)))
for x in R:
    if x["target"] is not None:
        T.append((f"{x['what']}: ≥ {x['target']:g}", f"{x['v']:.2f} ({x['num']['eps']:,.0f} / {x['den']['eps']:,.0f})",
                  verdict(x["ok"])))
if rl:
    T.append(("hot reload of a small Rust handler: written → serving ≤ 100 ms",
              f"p50 {rel['p50']:.0f} / p90 {rel['p90']:.0f} / p99 {rel['p99']:.0f} ms ({rl[0]['module_bytes'] // 1000} KB guest)",
              verdict(rel["p50"] <= 100)))
if later:
    T.append(("restart with an unchanged module does not recompile",
              f"{len(warm)} of {len(later)} later loads from the cache", verdict(len(warm) == len(later))))
L.append("## Targets\n")
L.append("| target | measured (medians) | status |")
L.append("|---|---|---|")
for t in T: L.append(f"| {t[0]} | {t[1]} | {t[2]} |")
L.append("")

L.append("## Command lines\n")
L.append("Every scenario runs `target/release/outrun --database URL bench --module target/guests/bench.wasm --cache-dir DIR --json` plus:\n")
for r in rows:
    L.append(f"- {r['label']} ({r['backend']}): `{r['cmd']}`")
L.append("")
if floors:
    L.append("Floors, each on a fresh `outrun migrate`d database filled with the events in one statement (timing excludes the fill):\n")
    for f in floors:
        if f["kind"] == "pgbench":
            L.append(f"- {f['label']}: `{f['cmd']}` on a fresh database holding only the bench table; "
                     f"`insert.sql` is one `INSERT` of the sql handler's row (text key, bigint, 200-byte text)"
                     + ("; each transaction commits asynchronously, as outrun's effects transactions do"
                        if f["label"].endswith("-async") else "; each transaction commits durably (the server's default)"))
        elif f["backend"] == "sqlite":
            L.append(f"- {f['label']}: the sqlite3 shell running a generated script, {f['cmd']}: `BEGIN IMMEDIATE`, "
                     f"outrun's claim (select the batch into a temp table, lease it by rowid), "
                     + ("the handler's `INSERT` of each row, " if "insert" in f["cmd"] else "")
                     + "the ack's `DELETE` by rowid and token, `COMMIT`; WAL, `synchronous = NORMAL` as outrun's connections")
        else:
            L.append(f"- {f['label']}: a PL/pgSQL procedure, {f['cmd']}: outrun's claim statement (`FOR UPDATE SKIP LOCKED`, "
                     f"lease columns written), "
                     + ("one `INSERT` of the handler's row per event, " if "insert" in f["cmd"] else "")
                     + "the ack's `DELETE`, `COMMIT` per batch, with outrun's bookkeeping planner settings"
                     + "; `synchronous_commit = off` like outrun's bookkeeping and effects transactions")
    L.append("")
L.append("Where the time goes, what was changed and measured, and what remains: [benchmarks-notes.md](benchmarks-notes.md).")
open(out, "w").write("\n".join(L) + "\n")
print(f"wrote {out}", file=sys.stderr)
PY
if [ -n "$ONLY" ]; then cat "$OUT"; fi
