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
# It also checks that the installed package carries no ISA flags (-march, -m<isa>) to users and
# no private dependency (Eigen, nlohmann_json). Then the shared library (BUILD_SHARED_LIBS=ON):
# its soname, that it exports no internal symbol, the examples built and run against it with
# find_package, and the integration example built with pkg-config alone, against the shared
# and the static library.
# Usage: scripts/consumer_test.sh   (BUILD_DIR=... for the library build; default build/consumer)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" clang libomp-dev pkg-config
build=${BUILD_DIR:-$root/build/consumer}
prefix=$(mktemp -d /tmp/moekit-prefix.XXXXXX)
shared_prefix=$(mktemp -d /tmp/moekit-shared-prefix.XXXXXX)
trap 'rm -rf "$prefix" "$shared_prefix"' EXIT
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
if grep -qE 'find_dependency\((Eigen|nlohmann)|Eigen3::|nlohmann_json::' "$prefix"/lib*/cmake/moekit/*.cmake "$prefix"/lib*/pkgconfig/moekit.pc; then
  echo "moekit: consumer test FAILED: the installed package refers to a private dependency (Eigen / nlohmann_json)" >&2
  exit 1
fi

has_avx512=$(grep -qw avx512bw /proc/cpuinfo 2>/dev/null && echo 1 || echo 0)
consumer() {  # name, then extra cmake arguments (CXX from the environment)
  local name=$1
  shift
  echo "moekit: consumer test: building examples/ against ${CONSUMER_PREFIX:-$prefix} ($name)"
  cmake -S "$root/examples" -B "$build/$name" -DCMAKE_PREFIX_PATH="${CONSUMER_PREFIX:-$prefix}" "$@" >/dev/null
  cmake --build "$build/$name" -j "$jobs"
}
consumer gcc-release -DCMAKE_BUILD_TYPE=Release
OMP_NUM_THREADS=2 "$build/gcc-release/example_basic_layer"
OMP_NUM_THREADS=2 "$build/gcc-release/example_moe_stack"
# moekit::ep (find_package(moekit COMPONENTS ep)): the expert-parallel example under mpirun.
if [ -x "$build/gcc-release/example_expert_parallel" ]; then
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
    mpirun -q --oversubscribe -np 2 "$build/gcc-release/example_expert_parallel"
elif grep -q 'moekit::ep' "$prefix"/lib*/cmake/moekit/*.cmake 2>/dev/null; then
  echo "moekit: consumer test FAILED: moekit::ep is installed but the example was not built" >&2
  exit 1
fi
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
OMP_NUM_THREADS=2 "$build/clang-release/example_engine_integration"

# pkg-config against the static library: one compiler command, no CMake.
pc_build() {  # prefix, output, extra pkg-config flags
  local pc_path
  pc_path=$(dirname "$(find "$1" -name moekit.pc | head -1)")
  # shellcheck disable=SC2046
  g++ -std=c++20 -O2 "$root/examples/engine_integration.cpp" -o "$2" \
    $(PKG_CONFIG_PATH="$pc_path" pkg-config --cflags moekit) $(PKG_CONFIG_PATH="$pc_path" pkg-config $3 --libs moekit)
}
pc_build "$prefix" "$build/pc-static" --static
OMP_NUM_THREADS=2 "$build/pc-static"
echo "moekit: consumer test: pkg-config build against the static library ran"

# The shared library.
cmake -S "$root" -B "$build/shared-lib" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DMOEKIT_BUILD_TESTS=OFF \
  -DMOEKIT_BUILD_BENCH=OFF -DMOEKIT_BUILD_EXAMPLES=OFF -DMOEKIT_BUILD_CLI=ON -DCMAKE_INSTALL_PREFIX="$shared_prefix" >/dev/null
cmake --build "$build/shared-lib" -j "$jobs"
# Components: the library alone, then the headers, then the CLI.
cmake --install "$build/shared-lib" --component library >/dev/null
if [ -e "$shared_prefix/include/moekit/layer.hpp" ] || [ -e "$shared_prefix/bin/moekit" ]; then
  echo "moekit: consumer test FAILED: --component library installed headers or the CLI" >&2
  exit 1
fi
cmake --install "$build/shared-lib" --component headers >/dev/null
cmake --install "$build/shared-lib" --component cli >/dev/null
so=$(find "$shared_prefix" -name "libmoekit.so.*.*.*" | head -1)
soname=$(readelf -d "$so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
version=$(sed -n 's/^project(moekit VERSION \([0-9]*\.[0-9]*\).*/\1/p' "$root/CMakeLists.txt")
if [ "$soname" != "libmoekit.so.$version" ]; then
  echo "moekit: consumer test FAILED: soname '$soname', expected libmoekit.so.$version" >&2
  exit 1
fi
leaked=$(nm -D --defined-only "$so" | c++filt | grep -E 'nlohmann|Eigen::|moekit::kernels::detail|moekit::io::detail|\(anonymous namespace\)' | head -5 || true)
if [ -n "$leaked" ]; then
  echo "moekit: consumer test FAILED: libmoekit.so exports internal symbols, e.g.: $leaked" >&2
  exit 1
fi
echo "moekit: consumer test: $soname exports $(nm -D --defined-only "$so" | grep -c ' [TWBDRVu] ') symbols, none internal"
"$shared_prefix/bin/moekit" info >/dev/null
CONSUMER_PREFIX=$shared_prefix consumer shared-release -DCMAKE_BUILD_TYPE=Release
OMP_NUM_THREADS=2 "$build/shared-release/example_basic_layer"
OMP_NUM_THREADS=2 "$build/shared-release/example_engine_integration"
pc_build "$shared_prefix" "$build/pc-shared" ""
OMP_NUM_THREADS=2 LD_LIBRARY_PATH=$(dirname "$so") "$build/pc-shared"
echo "moekit: consumer test passed (static: gcc Release, gcc Debug, gcc Debug with AVX-512 flags, clang Release, pkg-config; shared: soname, symbols, components, find_package, pkg-config)"
