#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs what is missing, builds moekit (Release) and runs every test.
# Usage: scripts/test.sh   (BUILD_DIR=... to choose the build folder; default build/test)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" python3-numpy libdnnl-dev libopenmpi-dev openmpi-bin
build=${BUILD_DIR:-$root/build/test}
jobs=$(nproc)
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j "$jobs"
# The CLI contract check lives beside the repository (../shared) when it is there.
smoke="$root/../shared/contract/smoke.py"
if [ -f "$smoke" ]; then
  echo "moekit: CLI contract smoke test ($smoke)"
  /usr/bin/python3 "$smoke" "$build/moekit"
fi
# Which kernels the tests below run, and which they skip because this CPU lacks them.
if [ -x "$build/moekit" ]; then
  "$build/moekit" info | /usr/bin/python3 -c '
import json, sys
i = json.load(sys.stdin)
run = i["gemm_kernels_supported"]
skipped = [k for k in i["gemm_kernels_compiled"] if k not in run]
print("moekit: kernels tested on this CPU (%s): %s" % (i["cpu"]["brand"] or i["cpu"]["vendor"], ", ".join(run)))
print("moekit: kernels SKIPPED, this CPU lacks what they need: %s" % (
    "; ".join("%s (needs %s)" % (k, i["gemm_kernels_needs"][k]) for k in skipped) or "none"))'
fi
cd "$build"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ctest --output-on-failure -j "$jobs"
