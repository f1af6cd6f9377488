#!/usr/bin/env bash
# Runs the relay scenario of signaling-bench against the original Go server
# (the seed) and against ours, alternately (seed, ours, seed, ours, ...), each
# server pinned to one CPU and the load generator to another, then prints the
# medians of each and the ratios ours/seed.
#
# Usage: bench/compare_relay.sh [OURS_COMMAND...]
#   OURS_COMMAND  how to start our server; `--host 127.0.0.1 --port PORT` is
#                 appended. Default: $OURS_CMD, else
#                 "<repo>/.venv/bin/signaling-sharded --workers 1".
# Environment (defaults in brackets):
#   TOPICS [10] PEERS [4] WINDOW [4] DURATION [10] WARMUP [2] PAYLOAD [200]
#   ROUNDS [3]          rounds of (seed, ours)
#   SERVER_CPU [0]      CPU the server under test is pinned to
#   CLIENT_CPU [1]      CPU the load generator is pinned to
#   BENCH_THREADS [1]   worker threads of the load generator
#   SEED_DIR            the Go design's source [<repo>/../shared/anchors/seed-go]
#   SEED_BIN            a prebuilt Go binary (skips the Go build)
#   RESULTS_DIR         where JSON lines and server logs go
#                       [<repo>/bench/results/relay-<time>]
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOPICS="${TOPICS:-10}"
PEERS="${PEERS:-4}"
WINDOW="${WINDOW:-4}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
PAYLOAD="${PAYLOAD:-200}"
ROUNDS="${ROUNDS:-3}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
BENCH_THREADS="${BENCH_THREADS:-1}"
SEED_DIR="${SEED_DIR:-$ROOT/../shared/anchors/seed-go}"
RESULTS_DIR="${RESULTS_DIR:-$ROOT/bench/results/relay-$(date +%Y%m%d-%H%M%S)}"

if [ "$#" -gt 0 ]; then
  OURS=("$@")
elif [ -n "${OURS_CMD:-}" ]; then
  read -r -a OURS <<<"$OURS_CMD"
else
  OURS=("$ROOT/.venv/bin/signaling-sharded" --workers 1)
fi

log() { echo "[compare_relay] $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v taskset >/dev/null || die "taskset is required (util-linux)"
command -v python3 >/dev/null || die "python3 is required to summarise the results"
if [ "$(nproc)" -lt 2 ]; then
  log "warning: fewer than 2 CPUs; server and load generator will share one"
fi

mkdir -p "$RESULTS_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
WORK="$(mktemp -d)"
SERVER_PID=""

cleanup() {
  stop_server
  rm -rf "$WORK"
}

# The server process and everything below it (worker processes).
descendants() {
  local pid="$1" child
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    local tree
    tree="$(descendants "$SERVER_PID")"
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    for pid in $tree; do
      kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  SERVER_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# 0 when GET /healthz answers 200.
healthy() {
  local port="$1"
  if command -v curl >/dev/null; then
    [ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:$port/healthz")" = "200" ]
  else
    python3 - "$port" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
  fi
}

wait_ready() {
  local port="$1" name="$2" logfile="$3"
  for _ in $(seq 1 200); do
    if healthy "$port"; then
      return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      log "$name exited before it was ready; last lines of $logfile:"
      tail -n 20 "$logfile" >&2 || true
      return 1
    fi
    sleep 0.1
  done
  log "$name not ready on port $port after 20 s; last lines of $logfile:"
  tail -n 20 "$logfile" >&2 || true
  return 1
}

# --- builds ---------------------------------------------------------------
if [ -z "${SEED_BIN:-}" ]; then
  [ -x "$SEED_DIR/build.sh" ] || die "no Go design at $SEED_DIR (set SEED_DIR or SEED_BIN)"
  log "building the Go design"
  SEED_BIN="$("$SEED_DIR/build.sh" "$WORK/seed" | tail -n 1)"
fi
[ -x "$SEED_BIN" ] || die "Go binary $SEED_BIN is missing"

log "building signaling-bench"
(cd "$ROOT" && cargo build --release -q -p signaling-bench)
BENCH="$ROOT/target/release/signaling-bench"
[ -x "$BENCH" ] || die "$BENCH is missing after the build"
[ -x "${OURS[0]}" ] || command -v "${OURS[0]}" >/dev/null || die "our server ${OURS[0]} is not runnable (pass its command as arguments or OURS_CMD)"

# --- runs -----------------------------------------------------------------
start_server() {
  local name="$1" port="$2" logfile="$3"
  case "$name" in
    seed)
      PORT="$port" GOMAXPROCS=1 taskset -c "$SERVER_CPU" "$SEED_BIN" >"$logfile" 2>&1 &
      ;;
    ours)
      taskset -c "$SERVER_CPU" "${OURS[@]}" --host 127.0.0.1 --port "$port" >"$logfile" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
}

run_one() {
  local name="$1" round="$2" port logfile out
  port="$(free_port)"
  logfile="$RESULTS_DIR/$name-$round.log"
  out="$RESULTS_DIR/$name.jsonl"
  start_server "$name" "$port" "$logfile"
  wait_ready "$port" "$name" "$logfile" || { stop_server; return 1; }
  log "round $round: $name (pid $SERVER_PID, port $port)"
  if ! taskset -c "$CLIENT_CPU" "$BENCH" relay \
      --url "ws://127.0.0.1:$port" --topics "$TOPICS" --peers "$PEERS" \
      --window "$WINDOW" --duration "$DURATION" --warmup "$WARMUP" \
      --payload-bytes "$PAYLOAD" --threads "$BENCH_THREADS" \
      --server-pid "$SERVER_PID" >>"$out" 2>"$RESULTS_DIR/$name-$round.summary"; then
    log "signaling-bench failed against $name:"
    cat "$RESULTS_DIR/$name-$round.summary" >&2
    stop_server
    return 1
  fi
  sed 's/^/    /' "$RESULTS_DIR/$name-$round.summary" >&2
  stop_server
}

log "results in $RESULTS_DIR"
log "topics=$TOPICS peers=$PEERS window=$WINDOW duration=${DURATION}s warmup=${WARMUP}s payload=${PAYLOAD}B rounds=$ROUNDS"
log "ours: ${OURS[*]}"
for round in $(seq 1 "$ROUNDS"); do
  run_one seed "$round" || die "run against seed failed"
  run_one ours "$round" || die "run against ours failed"
done

# --- summary --------------------------------------------------------------
python3 - "$RESULTS_DIR/seed.jsonl" "$RESULTS_DIR/ours.jsonl" <<'EOF'
import json, statistics, sys

def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None

seed, ours = load(sys.argv[1]), load(sys.argv[2])
metrics = [
    ("relays/s", "relays_per_s", "{:.0f}"),
    ("rtt p99 us", "rtt_p99_us", "{:.0f}"),
    ("server cpu us/relay", "server_cpu_us_per_relay", "{:.2f}"),
    ("server cpu share", "server_cpu_share", "{:.3f}"),
    ("client cpu share", "client_cpu_share", "{:.3f}"),
]
fmt_or_dash = lambda f, v: "-" if v is None else f.format(v)
print(f"relay scenario, medians of {len(seed)} seed and {len(ours)} ours runs")
print(f"{'metric':<22}{'seed':>12}{'ours':>12}{'ours/seed':>12}")
for label, key, f in metrics:
    s, o = median(seed, key), median(ours, key)
    ratio = f"{o / s:.3f}" if s and o is not None else "-"
    print(f"{label:<22}{fmt_or_dash(f, s):>12}{fmt_or_dash(f, o):>12}{ratio:>12}")
for name, rows in (("seed", seed), ("ours", ours)):
    errors = {}
    for r in rows:
        for code, n in r.get("errors", {}).items():
            errors[code] = errors.get(code, 0) + n
    lost = sum(r.get("timeouts", 0) + r.get("disconnects", 0) for r in rows)
    if errors or lost:
        print(f"{name}: errors {errors}, timeouts+disconnects {lost}")
EOF
