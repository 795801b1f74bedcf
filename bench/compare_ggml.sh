#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Optional: moekit's 4-bit experts beside ggml's Q4_0 (llama.cpp's CPU backend) on the same
# shapes and thread count, one run. Builds ggml from a source tree you provide (nothing is
# downloaded), then prints, per shape and T: ggml q4_0 and moekit int4 / w4a8 (ms and
# GFLOP/s; all three store 4.5 bits per weight, Q4_0's grid) and the speed ratios moekit / ggml.
# w4a8 computes what ggml does (int8 activations per 32, integer dot products); int4 keeps
# f32 activations. ggml times the expert FFN only (3 mul_mat_id and
# the SwiGLU), moekit the whole layer (router and combine included).
# Usage: bench/compare_ggml.sh GGML_SOURCE_DIR [MOEKIT_BINARY] [THREADS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=${1:?usage: bench/compare_ggml.sh GGML_SOURCE_DIR [MOEKIT_BINARY] [THREADS]}
moekit=${2:-$root/build/bench/moekit}
threads=${3:-2}
build=${BUILD_DIR:-$root/build/ggml}
[ -x "$moekit" ] || { echo "no moekit binary at $moekit (build it first, or pass its path)" >&2; exit 2; }
cmake -S "$root/bench/ggml" -B "$build" -DGGML_SOURCE="$(cd "$src" && pwd)" >/dev/null
cmake --build "$build" -j "$(nproc)" --target moe_ffn_q4_0 >/dev/null
cfg=$(mktemp /tmp/moekit-ggml-XXXXXX.json)
trap 'rm -f "$cfg"' EXIT
printf '%-20s %5s %13s %13s %13s %9s %9s\n' "shape (E,k,d,f)" T "ggml q4_0" "mk int4" "mk w4a8" "int4/ggml" "w4a8/ggml"
for shape in "8 2 1024 2816" "64 8 1024 1408"; do
  read -r E k d f <<<"$shape"
  printf '{"model_type":"mixtral","hidden_size":%d,"intermediate_size":%d,"num_local_experts":%d,"num_experts_per_tok":%d}' \
    "$d" "$f" "$E" "$k" >"$cfg"
  for T in 1 16 512; do
    rep=$([ "$T" -ge 512 ] && echo 5 || echo 50)
    g=$("$build/moe_ffn_q4_0" "$E" "$k" "$d" "$f" "$T" "$threads" "$rep")
    m4=$("$moekit" bench --config "$cfg" --tokens "$T" --threads "$threads" --repeat "$rep" --dtype int4)
    mz=$("$moekit" bench --config "$cfg" --tokens "$T" --threads "$threads" --repeat "$rep" --dtype w4a8)
    python3 - "$g" "$m4" "$mz" "$E" "$k" "$d" "$f" "$T" <<'PY'
import json, sys
g, m4, mz = (json.loads(s) for s in sys.argv[1:4])
E, k, d, f, T = sys.argv[4:9]
cell = lambda r: "%.3f ms %4.0f" % (r["median_ms"], r["gflops"])
print("%-20s %5s %13s %13s %13s %8.2fx %8.2fx" % ("(%s,%s,%s,%s)" % (E, k, d, f), T, cell(g), cell(m4), cell(mz),
                                                  g["median_ms"] / m4["median_ms"], g["median_ms"] / mz["median_ms"]))
PY
  done
done
