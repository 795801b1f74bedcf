#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The consumer's view: installs moekit to a temporary prefix and builds examples/ against it
# with find_package(moekit) as a separate project, the ways users do:
#   - GCC, Release, and runs one example;
#   - GCC, Debug (-O0): header code must compile at any optimisation level;
#   - GCC, -O0 with the user's own AVX-512 flags (-mavx512f -mavx512bw): moekit's headers must
#     not instantiate xsimd's AVX-512 code (Debian's xsimd 8.1 fails to compile some at -O0);
#     built, run only on a CPU with AVX-512;
#   - clang, Release, and runs one example.
# It also checks that the installed package carries no ISA flags (-march, -m<isa>) to users.
# Usage: scripts/consumer_test.sh   (BUILD_DIR=... for the library build; default build/consumer)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" clang libomp-dev
build=${BUILD_DIR:-$root/build/consumer}
prefix=$(mktemp -d /tmp/moekit-prefix.XXXXXX)
trap 'rm -rf "$prefix"' EXIT
jobs=$(nproc)
rm -rf "$build"
cmake -S "$root" -B "$build/lib" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_BENCH=OFF \
  -DMOEKIT_BUILD_EXAMPLES=OFF -DMOEKIT_BUILD_CLI=OFF -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null
cmake --build "$build/lib" -j "$jobs"
cmake --install "$build/lib" >/dev/null

flags=$(grep -hoE -- '-march=[^ ";]*|-m(avx|sse|fma|f16c)[a-z0-9.]*' "$prefix"/lib*/cmake/moekit/*.cmake || true)
if [ -n "$flags" ]; then
  echo "moekit: consumer test FAILED: the installed package passes ISA flags to its users: $flags" >&2
  exit 1
fi
echo "moekit: consumer test: the installed package carries no ISA flags"

has_avx512=$(grep -qw avx512bw /proc/cpuinfo 2>/dev/null && echo 1 || echo 0)
consumer() {  # name, then extra cmake arguments (CXX from the environment)
  local name=$1
  shift
  echo "moekit: consumer test: building examples/ against $prefix ($name)"
  cmake -S "$root/examples" -B "$build/$name" -DCMAKE_PREFIX_PATH="$prefix" "$@" >/dev/null
  cmake --build "$build/$name" -j "$jobs"
}
consumer gcc-release -DCMAKE_BUILD_TYPE=Release
OMP_NUM_THREADS=2 "$build/gcc-release/example_basic_layer"
consumer gcc-debug -DCMAKE_BUILD_TYPE=Debug
OMP_NUM_THREADS=2 "$build/gcc-debug/example_basic_layer"
consumer gcc-debug-avx512 -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS=-mavx512f -mavx512bw"
if [ "$has_avx512" = 1 ]; then
  OMP_NUM_THREADS=2 "$build/gcc-debug-avx512/example_basic_layer"
else
  echo "moekit: consumer test: gcc-debug-avx512 built; not run (this CPU has no AVX-512)"
fi
CXX=clang++ consumer clang-release -DCMAKE_BUILD_TYPE=Release
OMP_NUM_THREADS=2 "$build/clang-release/example_basic_layer"
echo "moekit: consumer test passed (gcc Release, gcc Debug, gcc Debug with AVX-512 flags, clang Release)"
