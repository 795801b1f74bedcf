#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs what is missing, builds moekit (Release) and runs the benchmark suite, then prints
# a summary table. Results: build/bench/results.json. Extra arguments go to moekit_bench
# (e.g. --benchmark_filter=mixtral).
# Usage: scripts/bench.sh [google-benchmark flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh"
build=${BUILD_DIR:-$root/build/bench}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target moekit_bench
"$build/bench/moekit_bench" --benchmark_out="$build/results.json" --benchmark_out_format=json "$@"
python3 "$root/bench/summary.py" "$build/results.json"
