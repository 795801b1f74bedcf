#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Expert parallelism on this machine (docs/scale-out.md): builds moekit_bench_ep (Release, with
# MPI), runs it under mpirun with 2 and 4 ranks (4 oversubscribed on a 2-core machine) at 256
# and 2048 tokens per rank, writes build/bench/ep.jsonl and prints the tables of
# bench/ep_model.py: measured throughput against one process, rank loads, bytes per token,
# and the modelled time per layer at 8 to 256 ranks for a few network bandwidths.
# Usage: scripts/bench_ep.sh [moekit_bench_ep flags, e.g. --experts 64 --k 6]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" libopenmpi-dev openmpi-bin
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3
build=${BUILD_DIR:-$root/build/bench}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_EXAMPLES=OFF \
  -DMOEKIT_WITH_MPI=ON >/dev/null
cmake --build "$build" -j "$(nproc)" --target moekit_bench_ep
# Open MPI refuses root unless told; --bind-to none lets rank 0's one-process peer use every core.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cores=$(nproc)
out="$build/ep.jsonl"
: >"$out"
for np in 2 4; do
  threads=$(( cores / np ))
  [ "$threads" -ge 1 ] || threads=1
  for tokens in 256 2048; do
    echo "moekit: bench/ep: $np ranks, $tokens tokens per rank, $threads thread(s) per rank" >&2
    mpirun -q --oversubscribe --bind-to none -np "$np" "$build/bench/moekit_bench_ep" --tokens "$tokens" \
      --threads "$threads" --repeat 5 "$@" >>"$out"
  done
done
"$py" "$root/bench/ep_model.py" "$out"
