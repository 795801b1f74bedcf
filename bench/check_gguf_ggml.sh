#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Optional: `moekit run --gguf` against ggml (llama.cpp's CPU backend) on GGUF MoE layers that
# ggml itself quantised and wrote. bench/ggml/gguf_moe.c writes each file, an input, and the
# layer's output from a graph built as llama.cpp's build_moe_ffn; moekit runs the same file on
# the same input. Prints, per case, the relative Frobenius difference ||y_moekit - y_ggml|| /
# ||y_ggml|| and the largest absolute one. ggml multiplies quantised weights by activations it
# quantises too (Q8_0 / Q8_K), so the two differ by that activation rounding (about 1e-3 of the
# output); `--dtype w4a8` on Q4_0 computes what ggml computes for Q4_0 (int8 activations per 32).
# Builds ggml from a source tree you provide (nothing is downloaded); not part of CI.
# Usage: bench/check_gguf_ggml.sh GGML_SOURCE_DIR [MOEKIT_BINARY]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=${1:?usage: bench/check_gguf_ggml.sh GGML_SOURCE_DIR [MOEKIT_BINARY]}
moekit=${2:-$root/build/bench/moekit}
build=${BUILD_DIR:-$root/build/ggml}
[ -x "$moekit" ] || { echo "no moekit binary at $moekit (build it first, or pass its path)" >&2; exit 2; }
cmake -S "$root/bench/ggml" -B "$build" -DGGML_SOURCE="$(cd "$src" && pwd)" >/dev/null
cmake --build "$build" -j "$(nproc)" --target gguf_moe >/dev/null
work=$(mktemp -d /tmp/moekit-gguf-XXXXXX)
trap 'rm -rf "$work"' EXIT
printf '%-10s %-5s %-22s %-8s %-6s %12s %12s\n' arch type "(E,k,d,f,T)" ggml dtype "rel. diff" "max |diff|"
while read -r arch type E k d f T mode dtypes; do
  "$build/gguf_moe" "$arch" "$type" "$E" "$k" "$d" "$f" "$T" "$work/m" "$mode" >/dev/null
  python3 - "$work/m.x.f32" "$work/x.safetensors" "$d" "$T" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
d, T = int(sys.argv[3]), int(sys.argv[4])
h = json.dumps({"hidden_states": {"dtype": "F32", "shape": [T, d], "data_offsets": [0, len(raw)]}}).encode()
h += b" " * (-len(h) % 8)
open(sys.argv[2], "wb").write(struct.pack("<Q", len(h)) + h + raw)
PY
  for dt in $dtypes; do
    rm -f "$work/y.safetensors"
    "$moekit" run --gguf "$work/m.gguf" --input "$work/x.safetensors" --output "$work/y.safetensors" --dtype "$dt"
    python3 - "$work/m.y.f32" "$work/y.safetensors" "$arch" "$type" "($E,$k,$d,$f,$T)" "$mode" "$dt" <<'PY'
import json, math, struct, sys
ref = open(sys.argv[1], "rb").read()
g = struct.unpack("<%df" % (len(ref) // 4), ref)
blob = open(sys.argv[2], "rb").read()
n = struct.unpack_from("<Q", blob)[0]
meta = json.loads(blob[8:8 + n])["hidden_states"]
a, b = meta["data_offsets"]
m = struct.unpack_from("<%df" % ((b - a) // 4), blob, 8 + n + a)
num = math.sqrt(sum((x - y) ** 2 for x, y in zip(m, g)))
den = math.sqrt(sum(y * y for y in g))
print("%-10s %-5s %-22s %-8s %-6s %12.2e %12.2e" % (sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7],
                                                   num / den, max(abs(x - y) for x, y in zip(m, g))))
PY
  done
done <<'CASES'
qwen3moe f32 8 2 256 512 16 native f32
qwen3moe q4_0 8 2 256 512 16 dequant f32
qwen3moe q4_0 8 2 256 512 16 native f32 w4a8
qwen3moe q8_0 8 2 256 512 16 dequant f32
qwen3moe q8_0 8 2 256 512 16 native f32
qwen3moe q4_k 8 2 256 512 16 dequant f32
qwen3moe q4_k 8 2 256 512 16 native f32
qwen3moe q6_k 8 2 256 512 16 dequant f32
qwen3moe q6_k 8 2 256 512 16 native f32
qwen3moe f16 8 2 256 512 16 native f32
deepseek2 q4_0 16 4 512 256 16 dequant f32
deepseek2 q4_0 16 4 512 256 16 native f32 w4a8
deepseek2 q4_k 16 4 512 256 16 dequant f32
deepseek2 q4_k 16 4 512 256 16 native f32
CASES
