#!/usr/bin/env bash
# Instructions the daemon runs per exchange (user space, valgrind's callgrind), to judge a
# small step where the wall-clock figures of this noisy machine cannot: the daemon under
# callgrind serves N1 and then, in a second run, N2 exchanges (c = 32, SQLite, synchronous =
# full), and the difference of the two totals over N2 - N1 leaves start-up and shutdown out.
# Kernel time (syscalls, context switches) is not counted. Usage:
#   bench/instructions.sh [BINARY] [N1] [N2]     (defaults: target/release/token-broker 1000 3000)
# Repeated runs of one binary agree within about 1%. The count compares two builds; it is not a
# profile: valgrind's CPU has no SHA extensions, so SHA-256 runs in software (about a fifth of
# the count, under 1% of `perf`'s samples on the real CPU), and `rep movsb`/`rep stosb` count an
# instruction per byte (BENCHMARKS.md, "Instruction counts and what they overstate"). Judge a
# step that changes hashing or copying with `perf`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/token-broker}
N1=${2:-1000}
N2=${3:-3000}
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }

run() {
    local n=$1 work port fake daemon
    work=$(mktemp -d)
    port=$((10000 + RANDOM % 6000))
    "$BIN" fake-upstream --listen "127.0.0.1:$port" --code-ttl-secs 3600 >/dev/null 2>&1 &
    fake=$!
    env TOKEN_BROKER_STORAGE__PATH="$work/broker.db" TOKEN_BROKER_STORAGE__SYNCHRONOUS=full \
        TOKEN_BROKER_SERVER__LISTEN="127.0.0.1:$((port + 1))" \
        TOKEN_BROKER_SERVER__METRICS_LISTEN="127.0.0.1:$((port + 2))" \
        TOKEN_BROKER_UPSTREAM__TOKEN_URL="http://127.0.0.1:$port/v1/token" \
        TOKEN_BROKER_LIMITS__GLOBAL_RPS=0 TOKEN_BROKER_LIMITS__DEFAULT_CLIENT_RPS=0 \
        TOKEN_BROKER_QUEUE__MAX_PENDING=10000000 RUST_LOG=warn \
        valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" "$BIN" serve \
        >"$work/daemon.log" 2>&1 &
    daemon=$!
    until curl -sf "127.0.0.1:$((port + 2))/readyz" >/dev/null; do sleep 0.2; done
    "$BIN" bench --fake "http://127.0.0.1:$port" --target "http://127.0.0.1:$((port + 1))" \
        -n "$n" -c 32 >/dev/null
    kill -INT "$daemon"
    wait "$daemon" || true
    kill "$fake"
    awk '/^summary:/ {print $2}' "$work/callgrind.out"
    rm -rf "$work"
}

first=$(run "$N1")
second=$(run "$N2")
echo "instructions per exchange: $(( (second - first) / (N2 - N1) ))"
