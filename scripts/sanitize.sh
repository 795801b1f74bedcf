#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The test suite under sanitizers (CMake option MOEKIT_SANITIZE):
#   asan  GCC, -fsanitize=address,undefined: every test (the CLI binary the tests spawn too)
#   tsan  clang + LLVM's OpenMP runtime with its TSan support (archer), -fsanitize=thread:
#         the threaded tests (test_threads.cpp: one layer shared by std::threads, calls from
#         inside a parallel region, every router family at 1/2/3 threads; test_dtype_layer.cpp:
#         the decode column split; test_layer.cpp) (GCC's libgomp is not instrumented and
#         would report false races); without MPI (Open MPI is not instrumented either)
# Both build at -O1 with line tables (-g1) to keep CI time down.
# Usage: scripts/sanitize.sh asan|tsan|all   (BUILD_ROOT=... default build/)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}
broot=${BUILD_ROOT:-$root/build}
jobs=$(nproc)

run_asan() {
  local build="$broot/asan"
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-O1 -DMOEKIT_SANITIZE=address,undefined \
    -DMOEKIT_BUILD_BENCH=OFF -DMOEKIT_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$build" -j "$jobs" --target moekit_tests
  echo "moekit: tests under ASan+UBSan"
  (cd "$build" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 OMP_NUM_THREADS=2 \
     ctest --output-on-failure -j "$jobs")
}

run_tsan() {
  "$root/scripts/deps.sh" clang libclang-rt-dev libomp-dev
  local build="$broot/tsan"
  local archer
  archer=$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | sort -V | tail -n 1 || true)
  CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-O1 -DMOEKIT_SANITIZE=thread \
    -DMOEKIT_BUILD_BENCH=OFF -DMOEKIT_BUILD_EXAMPLES=OFF -DMOEKIT_BUILD_CLI=OFF \
    -DMOEKIT_WITH_ONEDNN=OFF -DMOEKIT_WITH_MPI=OFF \
    "-DMOEKIT_TEST_ONLY=test_threads.cpp;test_dtype_layer.cpp;test_layer.cpp" >/dev/null
  cmake --build "$build" -j "$jobs" --target moekit_tests
  echo "moekit: tests under TSan (OpenMP tool: ${archer:-none})"
  # archer tells TSan about OpenMP's barriers and regions; libomp itself is not instrumented,
  # so its internal bookkeeping is ignored (as archer asks), moekit's code is fully checked.
  (cd "$build" && OMP_TOOL_LIBRARIES="$archer" \
     TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1" \
     OMP_NUM_THREADS=2 ctest --output-on-failure -j "$jobs")
}

case "$what" in
  asan) run_asan ;;
  tsan) run_tsan ;;
  all) run_asan; run_tsan ;;
  *) echo "usage: scripts/sanitize.sh asan|tsan|all" >&2; exit 2 ;;
esac
