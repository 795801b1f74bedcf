#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Expert parallelism (moekit::ep) under mpirun, after scripts/test.sh: installs Open MPI when
# missing, then runs the MPI tests (2 ranks, 3 and 4 oversubscribed), `moekit run --ep` (its
# CLI test), the expert-parallel example, and a small bench/ep run through bench/ep_model.py
# (the benchmark and its model must run; the figures come from scripts/bench_ep.sh).
# Usage: scripts/ep_test.sh   (BUILD_DIR=... default build/test)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" libopenmpi-dev openmpi-bin
build=${BUILD_DIR:-$root/build/test}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_WITH_MPI=ON -DMOEKIT_BUILD_BENCH=ON >/dev/null
cmake --build "$build" -j "$(nproc)" --target moekit_ep_tests moekit_tests example_expert_parallel moekit_bench_ep
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
(cd "$build" && ctest --output-on-failure -R 'EpMpi|ExpertParallel')
echo "moekit: ep: the MPI tests on 3 ranks (oversubscribed)"
mpirun -q --oversubscribe -np 3 "$build/tests/moekit_ep_tests" --gtest_brief=1
mpirun -q --oversubscribe -np 3 "$build/examples/example_expert_parallel"
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3
out=$(mktemp /tmp/moekit-ep-bench.XXXXXX)
trap 'rm -f "$out"' EXIT
mpirun -q --oversubscribe --bind-to none -np 2 "$build/bench/moekit_bench_ep" --experts 8 --hidden 64 --ffn 96 \
  --tokens 64 --repeat 1 >"$out"
"$py" "$root/bench/ep_model.py" "$out" >/dev/null
echo "moekit: ep: bench/ep ran ($(wc -l <"$out") records) and bench/ep_model.py read it"
