#!/usr/bin/env bash
# Runs the fake upstream, the daemon (rate limits off, synchronous=full) and the load generator
# in both modes in one go, and prints throughput, the daemon/direct ratio, the daemon's CPU time
# per exchange and the added latency at a steady rate. Usage:
#   bench/run.sh [N] [CONCURRENCY]        (defaults: 20000 64)
# BENCH_SMOKE=1 makes a short run that only checks the tools work (CI).
# BENCH_POSTGRES_URL=postgres://… (an empty database) runs the daemon on PostgreSQL instead of
# SQLite, and BENCH_REPLICAS=N runs N replicas on it, the load spread over them (CPU time and
# context switches are then the sum over the replicas).
# BENCH_DAEMON_ENV="VAR=value …" adds environment variables to the daemon only (e.g.
# TOKIO_WORKER_THREADS=1), to compare settings in one go.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
C=${2:-64}
RATE_N=${RATE_N:-4000}
if [[ "${BENCH_SMOKE:-}" == 1 ]]; then N=300; C=16; RATE_N=100; fi
PROFILE=${BENCH_PROFILE:-release}
cargo build --quiet --profile "$PROFILE"
BIN="target/$PROFILE/token-broker"
[[ "$PROFILE" == dev ]] && BIN=target/debug/token-broker
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# Ports below the kernel's ephemeral range (32768 and up by default), from which outgoing
# connections take their local ports: one picked there may be taken by the time it is bound.
FAKE_PORT=$((10000 + RANDOM % 6000))
FAKE="http://127.0.0.1:$FAKE_PORT"
"$BIN" fake-upstream --listen "127.0.0.1:$FAKE_PORT" --code-ttl-secs 3600 >"$WORK/fake.log" 2>&1 &
PIDS+=($!)

# Storage: a fresh SQLite file, or the PostgreSQL database given (keys made once, shared).
STORAGE=(TOKEN_BROKER_STORAGE__PATH="$WORK/broker.db" TOKEN_BROKER_STORAGE__SYNCHRONOUS=full)
REPLICAS=1
if [[ -n "${BENCH_POSTGRES_URL:-}" ]]; then
    REPLICAS=${BENCH_REPLICAS:-1}
    STORAGE=(TOKEN_BROKER_STORAGE__URL="$BENCH_POSTGRES_URL"
             TOKEN_BROKER_SECURITY__KEY_FILE="$WORK/broker.key"
             TOKEN_BROKER_AUDIT__FINGERPRINT_KEY_FILE="$WORK/fingerprint.key")
    env "${STORAGE[@]}" "$BIN" keys init >/dev/null 2>&1
fi
DAEMONS=()
OPS_PORTS=()
TARGETS=""
for r in $(seq "$REPLICAS"); do
    GRPC_PORT=$((16000 + RANDOM % 8000))
    OPS_PORT=$((24000 + RANDOM % 8000))
    # shellcheck disable=SC2086 # BENCH_DAEMON_ENV is a list of words.
    env "${STORAGE[@]}" ${BENCH_DAEMON_ENV:-} \
        TOKEN_BROKER_SERVER__LISTEN="127.0.0.1:$GRPC_PORT" \
        TOKEN_BROKER_SERVER__METRICS_LISTEN="127.0.0.1:$OPS_PORT" \
        TOKEN_BROKER_UPSTREAM__TOKEN_URL="$FAKE/v1/token" \
        TOKEN_BROKER_LIMITS__GLOBAL_RPS=0 \
        TOKEN_BROKER_LIMITS__DEFAULT_CLIENT_RPS=0 \
        TOKEN_BROKER_QUEUE__MAX_PENDING=10000000 \
        RUST_LOG=warn \
        "$BIN" serve >"$WORK/broker-$r.log" 2>&1 &
    DAEMONS+=($!)
    PIDS+=($!)
    OPS_PORTS+=("$OPS_PORT")
    TARGETS="${TARGETS:+$TARGETS,}http://127.0.0.1:$GRPC_PORT"
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$GRPC_PORT") 2>/dev/null && break
        sleep 0.1
    done
done

# CPU time (user + sys) of every replica, in clock ticks.
cpu_ticks() { for pid in "${DAEMONS[@]}"; do awk '{print $14 + $15}' "/proc/$pid/stat"; done | awk '{s += $1} END {print s}'; }
# Context switches (voluntary + involuntary) of every thread of every replica. Threads that end
# during the run take their counts with them, so this is a lower bound.
ctx_switches() {
    for pid in "${DAEMONS[@]}"; do cat /proc/"$pid"/task/*/status 2>/dev/null; done |
        awk '/ctxt_switches/ {s += $2} END {print s + 0}'
}
TICK=$(getconf CLK_TCK)
bench() { "$BIN" bench --fake "$FAKE" --target "$TARGETS" "$@"; }

BACKEND=SQLite
[[ -n "${BENCH_POSTGRES_URL:-}" ]] && BACKEND=PostgreSQL
echo "== throughput: $N exchanges, concurrency $C, $REPLICAS replica(s) on $BACKEND"
bench --direct -n "$N" -c "$C" --json "$WORK/direct.json"
BEFORE=$(cpu_ticks)
CTX_BEFORE=$(ctx_switches)
bench -n "$N" -c "$C" --json "$WORK/daemon.json"
AFTER=$(cpu_ticks)
CTX_AFTER=$(ctx_switches)

batches() {
    for port in "${OPS_PORTS[@]}"; do curl -s "127.0.0.1:$port/metrics"; done | awk '
        /^token_broker_sqlite_batch_changes_sum/ {sum+=$2}
        /^token_broker_sqlite_batch_changes_count/ {count+=$2}
        END {printf "%d %d\n", sum, count}'
}
read -r SUM1 COUNT1 < <(batches)
# Jobs submitted, and those whose first attempt started in their submission's commit.
starts() {
    for port in "${OPS_PORTS[@]}"; do curl -s "127.0.0.1:$port/metrics"; done | awk '
        /^token_broker_jobs_submitted_total/ {submitted+=$2}
        /^token_broker_jobs_started_at_submission_total/ {started+=$2}
        END {printf "%d %d\n", submitted, started}'
}
read -r SUBMITTED1 STARTED1 < <(starts)

echo "== latency: $RATE_N exchanges at 200/s"
bench --direct -n "$RATE_N" -c 64 --rate 200 --json "$WORK/direct-rate.json"
read -r SUM2 COUNT2 < <(batches)
bench -n "$RATE_N" -c 64 --rate 200 --json "$WORK/daemon-rate.json"
read -r SUM3 COUNT3 < <(batches)
read -r SUBMITTED3 STARTED3 < <(starts)
echo "started at submission: $STARTED1 of $SUBMITTED1 under full load, $(( STARTED3 - STARTED1 )) of $(( SUBMITTED3 - SUBMITTED1 )) at 200/s"
echo "changes per commit: $(( SUM1 / (COUNT1 > 0 ? COUNT1 : 1) )) under full load, $(( (SUM3 - SUM2) / ((COUNT3 - COUNT2) > 0 ? (COUNT3 - COUNT2) : 1) )) at 200/s (means)"

python3 - "$WORK" "$BEFORE" "$AFTER" "$TICK" "$N" "$CTX_BEFORE" "$CTX_AFTER" <<'PY'
import json, sys
work, before, after, tick, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ctx_before, ctx_after = int(sys.argv[6]), int(sys.argv[7])
load = lambda name: json.load(open(f"{work}/{name}.json"))
direct, daemon = load("direct"), load("daemon")
direct_rate, daemon_rate = load("direct-rate"), load("daemon-rate")
cpu_us = (after - before) / tick * 1e6 / max(daemon["succeeded"], 1)
print("== summary")
print(f"daemon throughput      {daemon['per_second']:8.0f} exchanges/s")
print(f"direct throughput      {direct['per_second']:8.0f} exchanges/s")
print(f"ratio                  {daemon['per_second'] / direct['per_second']:8.3f}")
print(f"daemon CPU / exchange  {cpu_us:8.1f} us")
print(f"context switches / exchange {(ctx_after - ctx_before) / max(daemon['succeeded'], 1):5.1f} (all daemon threads)")
for q in ("p50", "p99"):
    added = daemon_rate["latency_ms"][q] - direct_rate["latency_ms"][q]
    print(f"added latency {q}      {added:8.2f} ms (daemon {daemon_rate['latency_ms'][q]:.2f}, direct {direct_rate['latency_ms'][q]:.2f})")
PY
