#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the libFuzzer targets (fuzz/, clang with ASan+UBSan) and runs each for a bounded
# time on a copy of its seed corpus. Fails on any crash, leak, timeout or sanitizer report.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 30; BUILD_DIR=... default build/fuzz)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-30}
build=${BUILD_DIR:-$root/build/fuzz}
"$root/scripts/deps.sh" clang libclang-rt-dev libomp-dev
CXX=${FUZZ_CXX:-clang++} cmake -S "$root/fuzz" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$(nproc)"
total=0
for target in safetensors config input layer output gguf packed; do
  work=$(mktemp -d /tmp/moekit-fuzz-$target.XXXXXX)
  log="$build/fuzz_$target.log"
  echo "moekit: fuzzing $target for ${seconds}s"
  if ! "$build/fuzz_$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
       -artifact_prefix="$build/crash-$target-" "$work" "$root/fuzz/corpus/$target" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "moekit: fuzz_$target FAILED (log: $log; reproducer: $build/crash-$target-*)"
    rm -rf "$work"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  echo "moekit: fuzz_$target: $runs executions, no findings"
  total=$((total + runs))
  rm -rf "$work"
done
echo "moekit: fuzzing done: $total executions in all"
