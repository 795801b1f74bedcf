#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs what is missing, builds moekit (Release) and runs the benchmark suite, then prints
# a summary table and writes the reports: build/bench/results.json (Google Benchmark JSON),
# results.md (a Markdown table) and routing.png / dtypes.png (GFLOP/s and GB/s against T per
# routing scheme and weight type, with the same run's peaks as lines; bench/report.py).
# Extra arguments go to moekit_bench (e.g. --benchmark_filter=mixtral).
# Usage: scripts/bench.sh [google-benchmark flags]
#        scripts/bench.sh --compare OLD.json NEW.json   (the per-benchmark change; no build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" python3-matplotlib libbenchmark-tools
# Debian's python3 (with its matplotlib), also when another python3 comes first in PATH.
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3
if [ "${1:-}" = "--compare" ]; then
  [ $# -eq 3 ] || { echo "usage: scripts/bench.sh --compare OLD.json NEW.json" >&2; exit 2; }
  exec "$py" "$root/bench/report.py" --compare "$2" "$3"
fi
build=${BUILD_DIR:-$root/build/bench}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target moekit_bench
"$build/bench/moekit_bench" --benchmark_out="$build/results.json" --benchmark_out_format=json "$@"
"$py" "$root/bench/summary.py" "$build/results.json"
"$py" "$root/bench/report.py" "$build/results.json" --out "$build"
