#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs the default (portable) build on emulated older CPUs with QEMU's user mode (Debian's
# qemu-user; no AVX-512 in its emulator): Nehalem (x86-64 with SSE4.2, no AVX) must pick the
# scalar kernels, Haswell (AVX2, FMA, F16C) the AVX2 ones, and on each the kernel, row-kernel
# and layer tests must pass and a `moekit bench` forward must run (no SIGILL anywhere).
# Tests that read the host (/proc/cpuinfo, re-running /proc/self/exe natively) are left out.
# Usage: scripts/portability_test.sh   (after scripts/test.sh; BUILD_DIR=... default build/test)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" qemu-user
build=${BUILD_DIR:-$root/build/test}
if [ ! -x "$build/moekit" ] || [ ! -x "$build/tests/moekit_tests" ]; then
  echo "moekit: portability test: no build in $build (run scripts/test.sh first)" >&2
  exit 1
fi
work=$(mktemp -d /tmp/moekit-portability.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat >"$work/layer.json" <<'JSON'
{"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_local_experts": 8, "num_experts_per_tok": 2}
JSON
filter='Kernels*:LayerRandom.*:SinkhornRandom.*:GruRouter.*:TopKRandom.*:DtypeLayer.*'
filter+=':-KernelsDispatch.EnvironmentVariableForcesKernel:KernelsDispatchChild.*'
# (the slowest under emulation, 200 s: numerics of the weight types, the same on every CPU)
filter+=':DtypeLayer.ErrorBoundsAgainstF32OnGaussianData'
# (oneDNN's kernel: a library with its own CPU dispatch; its JIT under emulation is slow)
filter+=':Kernels/KernelsDtype.*/onednn'
# (QEMU's F16C flushes subnormal halves when MXCSR.DAZ is set; the CPUs do not: vcvtph2ps
# ignores DAZ, checked on Zen 5 by this test in scripts/test.sh)
filter+=':Kernels/KernelsDtype.Fp8WideningExactForAnyScaleAndDaz/*'
for spec in "Nehalem scalar" "Haswell fma3+avx2"; do
  cpu=${spec% *}
  want=${spec#* }
  t0=$(date +%s)
  info=$(qemu-x86_64 -cpu "$cpu" "$build/moekit" info 2>/dev/null)
  got=$(printf '%s' "$info" | /usr/bin/python3 -c 'import json, sys; i = json.load(sys.stdin); print(i["row_kernels"], i["gemm_kernel"])')
  if [ "${got%% *}" != "$want" ]; then
    echo "moekit: portability test FAILED: on an emulated $cpu the kernels are \"$got\", expected $want" >&2
    exit 1
  fi
  qemu-x86_64 -cpu "$cpu" "$build/moekit" bench --config "$work/layer.json" --tokens 7 --repeat 2 --layers 1 \
    --threads 2 2>/dev/null >"$work/bench.json"
  if ! OMP_NUM_THREADS=2 qemu-x86_64 -cpu "$cpu" "$build/tests/moekit_tests" --gtest_filter="$filter" --gtest_brief=1 \
      >"$work/tests.log" 2>&1; then
    grep -v "TCG doesn't support" "$work/tests.log" | tail -n 40
    echo "moekit: portability test FAILED: tests on an emulated $cpu" >&2
    exit 1
  fi
  passed=$(grep -oE '\[  PASSED  \] [0-9]+ tests?' "$work/tests.log" | grep -oE '[0-9]+' || echo 0)
  echo "moekit: portability: emulated $cpu runs the $got kernels; moekit bench ran; $passed tests passed ($(($(date +%s) - t0)) s)"
done
