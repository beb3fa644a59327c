#!/usr/bin/env bash
# streamagent against its peers (DBOS, LangGraph + PostgresSaver) on the same machine, in one invocation:
#   W1: instant steps          streamagent: bench/load.py --bursts N           peers: run.sh WORK w1 (8 concurrent)
#   W2: every step waits 200 ms streamagent: bench/load.py --tool-latency-ms 200 --bursts N
#                                                                             peers: run.sh WORK w2 (8 and 64 concurrent)
# then one table: runs/s, CPU ms per run, makespan, and the ratios streamagent / peer.
#
# Usage: bench/compare.sh [--quick] [--out DIR]
#   --quick    a smoke check: 100 runs per workload (peers: 5 latency probes in W2) instead of 2,000
#   --out DIR  keep the logs there (default: a new temp dir, printed at the end)
# Environment: N_RUNS (runs per workload, default 2000, 100 with --quick), PEERS_DIR (default ../shared/peers
# relative to the repository), PEERS_WORK (the peers' venv and results, default /tmp/streamagent-peers;
# the first use installs the venv, a few minutes).
# Everything runs one after the other: each system gets the machine to itself. Exit status 1 if a
# streamagent run did not complete or a peer produced no result.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
quick=0
out=${OUT_DIR:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$quick" = 1 ]; then n=${N_RUNS:-100}; n_lat=${N_LAT:-5}; else n=${N_RUNS:-2000}; n_lat=${N_LAT:-20}; fi
peers=${PEERS_DIR:-$repo/../shared/peers}
work=${PEERS_WORK:-/tmp/streamagent-peers}
[ -x "$peers/run.sh" ] || { echo "no peers at $peers (set PEERS_DIR)" >&2; exit 2; }
peers=$(cd "$peers" && pwd)
if [ -z "$out" ]; then out=$(mktemp -d /tmp/streamagent-compare-XXXXXX); fi
mkdir -p "$out"
cd "$repo"
status=0

step() { echo; echo "=== $1 ($(date +%H:%M:%S), load average $(cut -d' ' -f1-3 /proc/loadavg))"; }

step "streamagent W1: $n runs at once"
.venv/bin/python bench/load.py --bursts "$n" 2>&1 | tee "$out/streamagent_w1.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "streamagent W2: $n runs at once, every API answers after 200 ms"
.venv/bin/python bench/load.py --tool-latency-ms 200 --bursts "$n" 2>&1 | tee "$out/streamagent_w2.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "peers W1: $n runs"
N_RUNS=$n "$peers/run.sh" "$work" w1 2>&1 | tee "$out/peers_w1.log"

step "peers W2: $n runs"
N_RUNS=$n N_LAT=$n_lat "$peers/run.sh" "$work" w2 2>&1 | tee "$out/peers_w2.log"

echo
echo "=== streamagent vs peers, $n runs per workload (logs in $out)"
.venv/bin/python bench/compare_table.py "$out/streamagent_w1.log" "$out/streamagent_w2.log" \
    "$out/peers_w1.log" "$out/peers_w2.log" | tee "$out/table.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
