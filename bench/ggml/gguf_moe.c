// SPDX-License-Identifier: Apache-2.0
// A llama.cpp-quantised GGUF MoE layer and its output as llama.cpp computes it, for checking
// `moekit run --gguf` against ggml (bench/check_gguf_ggml.sh). Writes, for a fixed seed:
//   OUT.gguf   one MoE layer (blk.0.*) of architecture ARCH, its expert weights quantised by
//              ggml_quantize_chunk to TYPE (q4_0, q8_0, q4_k, q6_k, f16), written by ggml's gguf
//              writer; router (and exp_probs_b) in F32, as convert_hf_to_gguf.py stores them
//   OUT.x.f32  the input [T, d], raw little-endian f32
//   OUT.y.f32  the layer's output [T, d] from a ggml graph built as llama.cpp's build_moe_ffn
//              (src/llama-graph.cpp: mul_mat router, softmax or sigmoid, + exp_probs_b for the
//              selection, argsort_top_k, get_rows weights, sum / clamp(6.1e-5) / div, scale,
//              mul_mat_id gate and up, swiglu, mul_mat_id down, times the weights, summed)
// ARCH: qwen3moe (softmax, renormalised) or deepseek2 (sigmoid, exp_probs_b, renormalised,
// scale 2.5, the V3 flags written as metadata). MODE native: the graph multiplies the
// quantised weights as llama.cpp does (ggml quantises the activations to Q8_0 / Q8_K for the
// dot products); dequant: the graph multiplies F32 copies of the same weights dequantised by
// ggml's own to_float (so only summation order separates it from exact arithmetic).
// Usage: gguf_moe ARCH TYPE E k d f T OUT native|dequant
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"

static uint64_t state = 0x2545F4914F6CDD1Dull;
static double uniform(void) {  // splitmix64 -> [0, 1)
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}
static float gauss(float s) {  // Box-Muller
  const double u1 = 1.0 - uniform(), u2 = uniform();
  return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2) * s);
}

// A [ne0, ne1, ne2] tensor of `type` holding s x Gaussian values (quantised row by row).
static struct ggml_tensor* weights(struct ggml_context* ctx, enum ggml_type type, int64_t ne0, int64_t ne1,
                                   int64_t ne2, float s, const char* name) {
  struct ggml_tensor* t = ne2 > 1 ? ggml_new_tensor_3d(ctx, type, ne0, ne1, ne2) : ggml_new_tensor_2d(ctx, type, ne0, ne1);
  ggml_set_name(t, name);
  const int64_t rows = ne1 * ne2;
  float* tmp = malloc(sizeof(float) * (size_t)(rows * ne0));
  for (int64_t i = 0; i < rows * ne0; ++i) tmp[i] = gauss(s);
  if (type == GGML_TYPE_F32) {
    memcpy(t->data, tmp, sizeof(float) * (size_t)(rows * ne0));
  } else {
    ggml_quantize_chunk(type, tmp, t->data, 0, rows, ne0, NULL);
  }
  free(tmp);
  return t;
}

int main(int argc, char** argv) {
  if (argc != 10 || (strcmp(argv[9], "native") && strcmp(argv[9], "dequant"))) {
    fprintf(stderr, "usage: %s ARCH TYPE E k d f T OUT native|dequant\n", argv[0]);
    return 2;
  }
  const int dequant = strcmp(argv[9], "dequant") == 0;
  const char *arch = argv[1], *tname = argv[2], *out = argv[8];
  const int64_t E = atoll(argv[3]), k = atoll(argv[4]), d = atoll(argv[5]), f = atoll(argv[6]), T = atoll(argv[7]);
  const int deepseek = strcmp(arch, "deepseek2") == 0;
  if (!deepseek && strcmp(arch, "qwen3moe") != 0) {
    fprintf(stderr, "ARCH: qwen3moe or deepseek2\n");
    return 2;
  }
  enum ggml_type type = !strcmp(tname, "q4_0") ? GGML_TYPE_Q4_0 : !strcmp(tname, "q8_0") ? GGML_TYPE_Q8_0
                      : !strcmp(tname, "q4_k") ? GGML_TYPE_Q4_K : !strcmp(tname, "q6_k") ? GGML_TYPE_Q6_K
                      : !strcmp(tname, "f16") ? GGML_TYPE_F16 : !strcmp(tname, "f32") ? GGML_TYPE_F32 : GGML_TYPE_COUNT;
  if (type == GGML_TYPE_COUNT || d % ggml_blck_size(type) || f % ggml_blck_size(type) || k < 1 || k > E || T < 1) {
    fprintf(stderr, "bad TYPE or sizes (d and f must be multiples of the block size)\n");
    return 2;
  }
  ggml_cpu_init();
  struct ggml_init_params ip = {(size_t)(3 * E * d * f) * 4 + (size_t)(T * k * (2 * f + d) * 64) + ((size_t)256 << 20), NULL,
                                false};
  struct ggml_context* ctx = ggml_init(ip);
  struct ggml_tensor* w_inp = weights(ctx, GGML_TYPE_F32, d, E, 1, 1.0f / sqrtf((float)d), "blk.0.ffn_gate_inp.weight");
  struct ggml_tensor* w_gate = weights(ctx, type, d, f, E, 1.0f / sqrtf((float)d), "blk.0.ffn_gate_exps.weight");
  struct ggml_tensor* w_up = weights(ctx, type, d, f, E, 1.0f / sqrtf((float)d), "blk.0.ffn_up_exps.weight");
  struct ggml_tensor* w_down = weights(ctx, type, f, d, E, 1.0f / sqrtf((float)f), "blk.0.ffn_down_exps.weight");
  struct ggml_tensor* probs_b = NULL;
  if (deepseek) probs_b = weights(ctx, GGML_TYPE_F32, E, 1, 1, 0.2f, "blk.0.exp_probs_b.bias");
  const float scale = deepseek ? 2.5f : 1.0f;

  struct gguf_context* g = gguf_init_empty();
  char key[128];
  gguf_set_val_str(g, "general.architecture", arch);
#define KEY(s) (snprintf(key, sizeof key, "%s.%s", arch, s), key)
  gguf_set_val_u32(g, KEY("block_count"), 1);
  gguf_set_val_u32(g, KEY("embedding_length"), (uint32_t)d);
  gguf_set_val_u32(g, KEY("expert_count"), (uint32_t)E);
  gguf_set_val_u32(g, KEY("expert_used_count"), (uint32_t)k);
  gguf_set_val_u32(g, KEY("expert_feed_forward_length"), (uint32_t)f);
  if (deepseek) {
    gguf_set_val_u32(g, KEY("expert_gating_func"), 2);
    gguf_set_val_bool(g, KEY("expert_weights_norm"), true);
    gguf_set_val_f32(g, KEY("expert_weights_scale"), scale);
  }
  gguf_add_tensor(g, w_inp);
  gguf_add_tensor(g, w_gate);
  gguf_add_tensor(g, w_up);
  gguf_add_tensor(g, w_down);
  if (probs_b) gguf_add_tensor(g, probs_b);
  char path[4096];
  snprintf(path, sizeof path, "%s.gguf", out);
  if (!gguf_write_to_file(g, path, false)) {
    fprintf(stderr, "cannot write %s\n", path);
    return 1;
  }
  gguf_free(g);

  if (dequant && type != GGML_TYPE_F32) {  // the graph reads ggml's dequantisation of the same bytes
    struct ggml_tensor** ws[3] = {&w_gate, &w_up, &w_down};
    for (int i = 0; i < 3; ++i) {
      struct ggml_tensor* q = *ws[i];
      struct ggml_tensor* fl = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2]);
      ggml_get_type_traits(type)->to_float(q->data, (float*)fl->data, ggml_nelements(q));
      *ws[i] = fl;
    }
  }
  // build_moe_ffn
  struct ggml_tensor* x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d, T);
  for (int64_t i = 0; i < d * T; ++i) ((float*)x->data)[i] = gauss(1.0f);
  struct ggml_tensor* logits = ggml_mul_mat(ctx, w_inp, x);  // [E, T]
  struct ggml_tensor* probs = deepseek ? ggml_sigmoid(ctx, logits) : ggml_soft_max(ctx, logits);
  struct ggml_tensor* sel = probs_b ? ggml_add(ctx, probs, probs_b) : probs;
  struct ggml_tensor* ids = ggml_argsort_top_k(ctx, sel, (int)k);  // [k, T]
  struct ggml_tensor* w = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, E, T), ids);  // [1, k, T]
  w = ggml_reshape_2d(ctx, w, k, T);
  struct ggml_tensor* sum = ggml_clamp(ctx, ggml_sum_rows(ctx, w), 6.103515625e-5f, INFINITY);
  w = ggml_div(ctx, w, sum);
  if (scale != 1.0f) w = ggml_scale(ctx, w, scale);
  w = ggml_reshape_3d(ctx, w, 1, k, T);
  struct ggml_tensor* x3 = ggml_reshape_3d(ctx, x, d, 1, T);
  struct ggml_tensor* up = ggml_mul_mat_id(ctx, w_up, x3, ids);      // [f, k, T]
  struct ggml_tensor* gate = ggml_mul_mat_id(ctx, w_gate, x3, ids);  // [f, k, T]
  struct ggml_tensor* h = ggml_swiglu_split(ctx, gate, up);
  struct ggml_tensor* ex = ggml_mul(ctx, ggml_mul_mat_id(ctx, w_down, h, ids), w);  // [d, k, T]
  struct ggml_tensor* y = ggml_view_2d(ctx, ex, d, T, ex->nb[2], 0);
  for (int64_t j = 1; j < k; ++j) y = ggml_add(ctx, y, ggml_view_2d(ctx, ex, d, T, ex->nb[2], (size_t)j * ex->nb[1]));
  y = ggml_cont(ctx, y);
  struct ggml_cgraph* gf = ggml_new_graph(ctx);
  ggml_build_forward_expand(gf, y);
  ggml_graph_compute_with_ctx(ctx, gf, 2);

  snprintf(path, sizeof path, "%s.x.f32", out);
  FILE* fx = fopen(path, "wb");
  snprintf(path, sizeof path, "%s.y.f32", out);
  FILE* fy = fopen(path, "wb");
  if (!fx || !fy) return 1;
  fwrite(x->data, sizeof(float), (size_t)(d * T), fx);
  fwrite(y->data, sizeof(float), (size_t)(d * T), fy);
  fclose(fx);
  fclose(fy);
  printf("{\"arch\":\"%s\",\"type\":\"%s\",\"E\":%lld,\"k\":%lld,\"d\":%lld,\"f\":%lld,\"T\":%lld}\n", arch, tname,
         (long long)E, (long long)k, (long long)d, (long long)f, (long long)T);
  ggml_free(ctx);
  return 0;
}
