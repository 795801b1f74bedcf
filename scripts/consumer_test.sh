#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The consumer's view: installs moekit to a temporary prefix, builds examples/ against it with
# find_package(moekit) as a separate project, and runs one example.
# Usage: scripts/consumer_test.sh   (BUILD_DIR=... for the library build; default build/consumer)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build/consumer}
prefix=$(mktemp -d /tmp/moekit-prefix.XXXXXX)
trap 'rm -rf "$prefix"' EXIT
jobs=$(nproc)
rm -rf "$build"
cmake -S "$root" -B "$build/lib" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_BENCH=OFF \
  -DMOEKIT_BUILD_EXAMPLES=OFF -DMOEKIT_BUILD_CLI=OFF -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null
cmake --build "$build/lib" -j "$jobs"
cmake --install "$build/lib" >/dev/null
cmake -S "$root/examples" -B "$build/examples" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$build/examples" -j "$jobs"
echo "moekit: consumer test: examples built against $prefix with find_package(moekit); running basic_layer"
OMP_NUM_THREADS=2 "$build/examples/example_basic_layer"
