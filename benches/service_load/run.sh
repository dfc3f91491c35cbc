#!/usr/bin/env bash
# Load test of the clinic service (examples/clinic-service): phi's sealed
# routes against their plaintext twin in the same process, with a real HTTP
# load generator (wrk, from the distribution's packages; the requests are
# drawn by benches/service_load/route.lua). Not part of CI: it is a benchmark.
#
#   benches/service_load/run.sh                  # PostgreSQL and SQLite, 30 s per route
#   DURATION=10s BACKENDS=sqlite benches/service_load/run.sh
#   ROUTES="get-one list-50" SKIP_COLD=1 benches/service_load/run.sh   # the access log's cost
#   LOG_COST=1 ROUNDS=5 benches/service_load/run.sh   # the same, interleaved
#
# LOG_COST=1 measures only the access log's cost: two services on the same
# database, one with the log (the default) and one started with
# --no-access-log, get-one and list-50 on each alternately, ROUNDS times
# (no twin routes, no cold start), each run's CPU work counted by `perf
# stat` (see `counted`). DB_NAME names the PostgreSQL database
# made anew (default phi_service_load; the cold start's gets `_cold`).
#
# For each backend: a fresh database seeded with 100,000 cases over 100
# providers (both tables, same ids and values); the release-built service;
# for each route pair (get one, list 50, create, find duplicates): a
# warm-up, then the sealed route and its twin alternately, ROUNDS times,
# CONNS connections for DURATION each. Then a cold start: a fresh process
# whose KEK is AWS KMS (a private moto server on a free port), the first
# request to each of 1,000 providers, and moto's own count of Decrypt calls
# (its request recorder). Peak memory is the service's VmHWM.
#
# Results: target/service_load/report.md (and one JSON summary per run).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-5s}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-1}
PROVIDERS=${PROVIDERS:-100}
CASES_PER=${CASES_PER:-1000}
COLD_PROVIDERS=${COLD_PROVIDERS:-1000}
BACKENDS=${BACKENDS:-"postgres sqlite"}
ROUTES=${ROUTES:-"get-one list-50 create duplicates"}
# 1: skip the cold start against moto.
SKIP_COLD=${SKIP_COLD:-0}
LOG_COST=${LOG_COST:-0}
DB_NAME=${DB_NAME:-phi_service_load}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PG_BASE=${PG_BASE:-postgres://postgres@127.0.0.1:5432}
OUT=${OUT:-target/service_load}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "tools"
if ! command -v wrk >/dev/null; then
  apt-get install -y -qq wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
fi
command -v wrk
python3 -c 'import moto.server, boto3' 2>/dev/null || pip install -q "moto[server]"
if [ -z "${BIN:-}" ]; then
  cargo build --release --example clinic-service --features service,postgres,aws-kms
  BIN=$(pwd)/target/release/examples/clinic-service
fi

# One master key for every run of this script (the key store checks a
# KEK id names one key).
[ -f "$OUT/master.key" ] || (umask 077; python3 -c 'import os, base64; print(base64.b64encode(os.urandom(32)).decode())' >"$OUT/master.key")
export PHI_MASTER_KEY_FILE=$OUT/master.key
# The bearer tokens' HS256 secret, new each run; one token per provider.
CLINIC_JWT_SECRET=$(python3 -c 'import os; print(os.urandom(32).hex())')
export CLINIC_JWT_SECRET
tokens() { # PREFIX COUNT FILE: one token per line, provider PREFIX0000's first
  for i in $(seq 0 $(($2 - 1))); do
    "$BIN" token --user load-test --provider "$(printf '%s%04d' "$1" "$i")" --ttl 86400
  done >"$3"
}
export RUST_LOG=${RUST_LOG:-warn}

PID=
BASE=
start_service() { # DATABASE_URL [args…]
  local url=$1
  shift
  : >"$OUT/service.out"
  (cd "$OUT" && exec "$BIN" --database-url "$url" --listen 127.0.0.1:0 --pool-size "$CONNS" "$@" \
    >"$OUT/service.out" 2>>"$OUT/service.log") &
  PID=$!
  for _ in $(seq 600); do
    grep -q '^listening on ' "$OUT/service.out" && break
    kill -0 "$PID" 2>/dev/null || { cat "$OUT/service.log" >&2; exit 1; }
    sleep 0.1
  done
  BASE=$(sed -n 's/^listening on //p' "$OUT/service.out")
}
# One LOG_COST run, with the CPU time of the services and of their
# PostgreSQL backends counted by `perf stat` over the run: per request, a
# measure that the other load of a shared host moves much less than it
# moves the throughput.
counted() { # NAME BACKEND ROUTE
  local pids=$SERVICE_PIDS
  if [ "$2" = postgres ]; then
    pids=$pids,$(psql -Atq "$PG_BASE/$DB_NAME" -c \
      "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
  fi
  perf stat -x, -e task-clock,context-switches -p "$pids" -o "$OUT/$1.perf" -- sleep "${DURATION%s}" &
  local perf=$!
  load "$1" "$DURATION" "$3" ""
  wait "$perf"
}
# LOG_COST=1: the access log's cost, the two services interleaved.
log_cost() { # BACKEND URL
  start_service "$2" --no-access-log
  local nolog_pid=$PID nolog_base=$BASE
  start_service "$2"
  local log_pid=$PID log_base=$BASE
  SERVICE_PIDS=$nolog_pid,$log_pid
  for route in get-one list-50; do
    BASE=$log_base load warmup "$WARMUP" "$route" ""
    BASE=$nolog_base load warmup "$WARMUP" "$route" ""
    for round in $(seq "$ROUNDS"); do
      BASE=$log_base counted "$1-$route-phi-$round" "$1" "$route"
      BASE=$nolog_base counted "$1-$route-nolog-$round" "$1" "$route"
    done
  done
  PID=$log_pid
  echo "$(peak_memory)" >"$OUT/$1-peak-memory.txt"
  stop_service
  PID=$nolog_pid
  stop_service
}
stop_service() {
  kill -TERM "$PID"
  wait "$PID"
}
peak_memory() { awk '/VmHWM/ {print $2 " " $3}' "/proc/$PID/status"; }

fresh_database() { # BACKEND NAME → prints the URL
  case $1 in
    sqlite)
      rm -f "$OUT/$2.db" "$OUT/$2.db-wal" "$OUT/$2.db-shm"
      echo "sqlite://$OUT/$2.db"
      ;;
    postgres)
      # A database of the script's own, made anew each run: its key tables
      # hold the check value of the run's master key, which is new each run.
      psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $2 WITH (FORCE)" >/dev/null
      psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $2" >/dev/null
      echo "$PG_BASE/$2"
      ;;
  esac
}

LUA=$(pwd)/benches/service_load/route.lua
# wrk: one run of ROUTE on PREFIX ("" sealed, "/plain" twin); its JSON
# summary (route.lua's `done`) to $OUT/NAME.json.
load() { # NAME DURATION ROUTE PREFIX
  wrk -t 2 -c "$CONNS" -d "$2" -s "$LUA" "$BASE" -- "$3" "$4" "$PROVIDERS" "$CASES_PER" "$OUT/tokens.txt" \
    | grep '^{' >"$OUT/$1.json"
}

pair() { # BACKEND ROUTE: warm-up of both, then sealed and twin alternately
  load warmup "$WARMUP" "$2" ""
  load warmup "$WARMUP" "$2" /plain
  for round in $(seq "$ROUNDS"); do
    load "$1-$2-phi-$round" "$DURATION" "$2" ""
    load "$1-$2-plain-$round" "$DURATION" "$2" /plain
  done
}

for backend in $BACKENDS; do
  step "$backend: seeding $((PROVIDERS * CASES_PER)) cases over $PROVIDERS providers"
  url=$(fresh_database "$backend" "$DB_NAME")
  "$BIN" --database-url "$url" seed --providers "$PROVIDERS" --cases-per-provider "$CASES_PER" | tee "$OUT/$backend-seed.txt"
  tokens provider- "$PROVIDERS" "$OUT/tokens.txt"
  if [ "$LOG_COST" = 1 ]; then
    step "$backend: the access log's cost, $CONNS connections, $ROUNDS rounds of $DURATION, interleaved"
    log_cost "$backend" "$url"
    continue
  fi
  start_service "$url"
  step "$backend: load, $CONNS connections, $DURATION per run after $WARMUP warm-up"
  for route in $ROUTES; do
    pair "$backend" "$route"
  done
  echo "$(peak_memory)" >"$OUT/$backend-peak-memory.txt"
  step "$backend: peak memory $(cat "$OUT/$backend-peak-memory.txt")"
  stop_service

  # The access log's cost: the sealed reads again, on a service that
  # writes no access log (the runs above wrote it).
  step "$backend: get-one and list-50 with --no-access-log"
  start_service "$url" --no-access-log
  for route in get-one list-50; do
    load warmup "$WARMUP" "$route" ""
    for round in $(seq "$ROUNDS"); do
      load "$backend-$route-nolog-$round" "$DURATION" "$route" ""
    done
  done
  stop_service
  [ "$SKIP_COLD" = 1 ] && continue

  step "$backend: cold start, $COLD_PROVIDERS providers, KEK on a private moto"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  kms=http://127.0.0.1:$port
  rm -f "$OUT/moto_recording"
  (cd "$OUT" && MOTO_RECORDER_FILEPATH="$OUT/moto_recording" exec python3 -m moto.server -H 127.0.0.1 -p "$port" \
    >"$OUT/moto.log" 2>&1) &
  moto=$!
  for _ in $(seq 100); do curl -fs "$kms/moto-api/" >/dev/null && break; sleep 0.2; done
  export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_ENDPOINT_URL=$kms AWS_EC2_METADATA_DISABLED=true
  key=$(python3 -c 'import boto3, sys; print(boto3.client("kms", endpoint_url=sys.argv[1], region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"])' "$kms")
  cold_url=$(fresh_database "$backend" "${DB_NAME}_cold")
  "$BIN" --database-url "$cold_url" --kek "aws-kms:$key" seed --providers "$COLD_PROVIDERS" --cases-per-provider 1 --prefix cold-
  tokens cold- "$COLD_PROVIDERS" "$OUT/cold-tokens.txt"
  start_service "$cold_url" --kek "aws-kms:$key"
  curl -fs -X POST "$kms/moto-api/recorder/reset-recording" >/dev/null
  curl -fs -X POST "$kms/moto-api/recorder/start-recording" >/dev/null
  started=$(date +%s.%N)
  paste -d ' ' <(seq 0 $((COLD_PROVIDERS - 1))) "$OUT/cold-tokens.txt" | xargs -P "$CONNS" -L 1 sh -c \
    'curl -fs -o /dev/null -w "%{time_total}\n" -H "authorization: Bearer $2" "$0/providers/cold-$(printf %04d "$1")/cases?limit=50"' "$BASE" \
    >"$OUT/$backend-cold-times.txt"
  ended=$(date +%s.%N)
  curl -fs -X POST "$kms/moto-api/recorder/stop-recording" >/dev/null
  decrypts=$(grep -c 'TrentService.Decrypt' "$OUT/moto_recording" || true)
  served=$(wc -l <"$OUT/$backend-cold-times.txt")
  python3 - "$started" "$ended" "$decrypts" "$served" "$OUT/$backend-cold-times.txt" "$(peak_memory)" >"$OUT/$backend-cold.txt" <<'PY'
import sys
started, ended, decrypts, served, path, memory = sys.argv[1:]
times = sorted(float(x) for x in open(path))
pct = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1000
print(f"{served} first requests in {float(ended) - float(started):.2f} s; moto Decrypt calls: {decrypts}; "
      f"latency p50 {pct(0.5):.1f} ms, p95 {pct(0.95):.1f} ms, p99 {pct(0.99):.1f} ms; peak memory {memory}")
PY
  cat "$OUT/$backend-cold.txt"
  stop_service
  kill "$moto"
  wait "$moto" 2>/dev/null || true
  unset AWS_ENDPOINT_URL
done

step "report"
python3 - "$OUT" "$BACKENDS" "$ROUNDS" "$LOG_COST" <<'PY' | tee "$OUT/report.md"
import json, os, sys
out, backends, rounds, log_cost = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), sys.argv[4] == "1"
def stats(name):
    runs = [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, rounds + 1)]
    rps = sum(r["requests"] / (r["duration_us"] / 1e6) for r in runs) / len(runs)
    pct = lambda p: sum(r[p] for r in runs) / len(runs) / 1000
    bad = sum(r["non_2xx"] + r["socket_errors"] for r in runs)
    return rps, pct("p50_us"), pct("p95_us"), pct("p99_us"), bad
def stats1(name, r):
    run = json.load(open(f"{out}/{name}-{r}.json"))
    return run["requests"] / (run["duration_us"] / 1e6)
routes = os.environ.get("ROUTES", "get-one list-50 create duplicates").split()
if log_cost:
    routes = ["get-one", "list-50"]
else:
    print("| backend | route | phi req/s | twin req/s | throughput ratio | phi p50 / p95 / p99 ms | twin p50 / p95 / p99 ms | p95 ratio | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in backends:
        for route in routes:
            p = stats(f"{b}-{route}-phi"); t = stats(f"{b}-{route}-plain")
            bad = p[4] + t[4]
            print(f"| {b} | {route} | {p[0]:.0f} | {t[0]:.0f} | {p[0] / t[0]:.2f}× | {p[1]:.2f} / {p[2]:.2f} / {p[3]:.2f} | "
                  f"{t[1]:.2f} / {t[2]:.2f} / {t[3]:.2f} | {p[2] / t[2]:.2f}× | {bad} |")
    print()
print("The access log's cost (sealed routes; with the log against --no-access-log"
      + (", interleaved):" if log_cost else "):"))
print()
print("| backend | route | req/s with log | req/s without | throughput cost | p95 ms with / without | p95 cost |")
print("|---|---|---|---|---|---|---|")
for b in backends:
    for route in [r for r in ["get-one", "list-50"] if r in routes]:
        p = stats(f"{b}-{route}-phi"); n = stats(f"{b}-{route}-nolog")
        print(f"| {b} | {route} | {p[0]:.0f} | {n[0]:.0f} | {n[0] / p[0]:.3f}× | {p[2]:.2f} / {n[2]:.2f} | {p[2] / n[2]:.3f}× |")
print()
def counted(name):
    """CPU ms and context switches per request over the rounds."""
    cpu = switches = reqs = 0
    for r in range(1, rounds + 1):
        if not os.path.exists(f"{out}/{name}-{r}.perf"):
            return None
        for line in open(f"{out}/{name}-{r}.perf"):
            f = line.strip().split(",")
            if len(f) > 2 and f[0] not in ("", "<not counted>", "<not supported>"):
                if f[2] == "task-clock":
                    cpu += float(f[0])
                elif f[2] == "context-switches":
                    switches += float(f[0])
        reqs += json.load(open(f"{out}/{name}-{r}.json"))["requests"]
    return cpu / reqs, switches / reqs
if log_cost:
    print("CPU time per request (the services' threads, and on PostgreSQL the server's backends of the database):")
    print()
    print("| backend | route | CPU µs with log | without | CPU cost | context switches with / without |")
    print("|---|---|---|---|---|---|")
    for b in backends:
        for route in routes:
            p = counted(f"{b}-{route}-phi"); n = counted(f"{b}-{route}-nolog")
            if p and n:
                print(f"| {b} | {route} | {p[0] * 1000:.1f} | {n[0] * 1000:.1f} | {p[0] / n[0]:.3f}× | {p[1]:.2f} / {n[1]:.2f} |")
    print()
if rounds > 1:
    print("Each round's throughput cost:", "; ".join(
        f"{b} {route}: " + ", ".join(
            f"{stats1(f'{b}-{route}-nolog', r) / stats1(f'{b}-{route}-phi', r):.3f}×" for r in range(1, rounds + 1))
        for b in backends for route in [r for r in ["get-one", "list-50"] if r in routes]))
    print()
for b in backends:
    if os.path.exists(f"{out}/{b}-cold.txt"):
        print(f"- {b}: cold start: {open(f'{out}/{b}-cold.txt').read().strip()}")
    print(f"- {b}: peak memory of the service under load (VmHWM): {open(f'{out}/{b}-peak-memory.txt').read().strip()}")
PY
