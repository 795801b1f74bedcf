// SPDX-License-Identifier: Apache-2.0
// The MoE expert FFN as llama.cpp builds it (build_moe_ffn: mul_mat_id for gate and up,
// silu(gate) * up, mul_mat_id for down) on ggml's CPU backend with Q4_0 expert weights, timed
// for comparison with `moekit bench --dtype int4` (bench/compare_ggml.sh). Router and the
// weighted sum are not timed here (under 1% of the layer in moekit's figures); expert ids are
// k distinct experts per token from a fixed-seed generator. The last-level cache is flushed
// between timed passes (a 256 MB write). Prints one JSON line.
// Usage: moe_ffn_q4_0 E k d f T threads repeat
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static uint64_t state = 0x9E3779B97F4A7C15ull;
static double uniform(void) {  // splitmix64 -> [0, 1)
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}

static void fill_q4_0(struct ggml_tensor* t, int64_t rows, int64_t n_per_row, float scale) {
  float* tmp = malloc(sizeof(float) * (size_t)n_per_row * 64);
  for (int64_t r0 = 0; r0 < rows; r0 += 64) {
    const int64_t nr = rows - r0 < 64 ? rows - r0 : 64;
    for (int64_t i = 0; i < nr * n_per_row; ++i) tmp[i] = (float)((uniform() * 2.0 - 1.0) * scale);
    // ggml_quantize_chunk reads src + start: quantise the chunk as rows 0.. of its own slice.
    char* dst = (char*)t->data + (size_t)r0 * ggml_row_size(GGML_TYPE_Q4_0, n_per_row);
    ggml_quantize_chunk(GGML_TYPE_Q4_0, tmp, dst, 0, nr, n_per_row, NULL);
  }
  free(tmp);
}

static int cmp(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
  if (argc != 8) {
    fprintf(stderr, "usage: %s E k d f T threads repeat\n", argv[0]);
    return 2;
  }
  const int64_t E = atoll(argv[1]), k = atoll(argv[2]), d = atoll(argv[3]), f = atoll(argv[4]), T = atoll(argv[5]);
  const int threads = atoi(argv[6]), repeat = atoi(argv[7]);
  if (E < 1 || k < 1 || k > E || d % 32 || f % 32 || d < 32 || f < 32 || T < 1 || threads < 1 || repeat < 1) {
    fprintf(stderr, "bad arguments (d and f must be multiples of 32, 1 <= k <= E)\n");
    return 2;
  }
  ggml_cpu_init();
  const size_t wbytes = (size_t)(3 * E * d * f / 32 * 18);
  const size_t act = (size_t)(T * k * (2 * f + d) * 4 * 4 + T * d * 4 * 8);
  struct ggml_init_params ip = {wbytes + act + ((size_t)512 << 20), NULL, false};
  struct ggml_context* ctx = ggml_init(ip);
  struct ggml_tensor* wg = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_0, d, f, E);
  struct ggml_tensor* wu = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_0, d, f, E);
  struct ggml_tensor* wd = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_0, f, d, E);
  fill_q4_0(wg, E * f, d, 1.0f / 32.0f);
  fill_q4_0(wu, E * f, d, 1.0f / 32.0f);
  fill_q4_0(wd, E * d, f, 1.0f / 37.5f);
  struct ggml_tensor* x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, 1, T);
  struct ggml_tensor* ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, k, T);
  for (int64_t i = 0; i < d * T; ++i) ((float*)x->data)[i] = (float)(uniform() * 2.0 - 1.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int32_t e;
      int dup;
      do {  // k distinct experts
        e = (int32_t)(uniform() * (double)E);
        dup = 0;
        for (int64_t i = 0; i < j; ++i) dup |= ((int32_t*)ids->data)[t * k + i] == e;
      } while (dup);
      ((int32_t*)ids->data)[t * k + j] = e;
    }
  struct ggml_tensor* gate = ggml_mul_mat_id(ctx, wg, x, ids);
  struct ggml_tensor* up = ggml_mul_mat_id(ctx, wu, x, ids);
  struct ggml_tensor* h = ggml_mul(ctx, ggml_silu(ctx, gate), up);
  struct ggml_tensor* out = ggml_mul_mat_id(ctx, wd, h, ids);
  struct ggml_cgraph* gf = ggml_new_graph(ctx);
  ggml_build_forward_expand(gf, out);
  const size_t flush_bytes = (size_t)256 << 20;
  char* flush = malloc(flush_bytes);
  double* ms = malloc(sizeof(double) * (size_t)repeat);
  ggml_graph_compute_with_ctx(ctx, gf, threads);  // warm-up
  for (int r = 0; r < repeat; ++r) {
    memset(flush, r, flush_bytes);
    const double t0 = now_ms();
    ggml_graph_compute_with_ctx(ctx, gf, threads);
    ms[r] = now_ms() - t0;
  }
  qsort(ms, (size_t)repeat, sizeof(double), cmp);
  const double med = ms[repeat / 2];
  const double flops = 2.0 * (double)T * (double)k * 3.0 * (double)d * (double)f;
  double checksum = 0;
  for (int64_t i = 0; i < d * k * T; ++i) checksum += ((float*)out->data)[i];
  printf("{\"E\":%lld,\"k\":%lld,\"d\":%lld,\"f\":%lld,\"T\":%lld,\"threads\":%d,\"median_ms\":%.4f,\"min_ms\":%.4f,"
         "\"gflops\":%.2f,\"weight_bytes\":%zu,\"checksum\":%g}\n",
         (long long)E, (long long)k, (long long)d, (long long)f, (long long)T, threads, med, ms[0],
         flops / med * 1e-6, wbytes, checksum);
  free(ms);
  free(flush);
  ggml_free(ctx);
  return 0;
}
