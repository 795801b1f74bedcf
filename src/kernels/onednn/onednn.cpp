// SPDX-License-Identifier: Apache-2.0
// The packed GEMM on oneDNN's matmul (Debian's libdnnl-dev; built when MOEKIT_WITH_ONEDNN finds
// it): a library implementation in moekit's kernel table beside its own kernels, for f32,
// bf16 x bf16 and w8a8 (the latter where the CPU sums int8 exactly: VNNI or AMX). Strips of
// 128 output columns, each reordered once at packing from the format's plain `[k, 128]` into
// the blocked layout oneDNN's matmul chooses for it (GemmKernel::to_own; its size may differ:
// padding, and int8 compensation). Each strip is one single-threaded matmul (M = rows of a
// chunk, K = k, N = 128) into a scratch tile, then moekit's epilogue (store, accumulate,
// activation, gated product); w8a8 gets exact int32 sums and applies (float(sum) * row scale)
// * column scale as every other kernel does.
//
// Threads: moekit parallelises over (expert, row block, strip range) tasks itself; oneDNN runs
// with one OpenMP thread per call (omp_set_num_threads(1) around primitive creation and
// execution, restored after), so results do not depend on the thread count. Primitives are
// created once per (format, M, K, row stride) on each thread and kept; the weights' layout
// once per (format, K) and process.
//
// oneDNN sums in its own order, so f32 and bf16 x bf16 agree with the moekit kernels within
// float rounding only (GemmKernel::bit_exact is false); w8a8 agrees bit for bit.
#include <omp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>
#include <vector>

#include "../gemm_internal.hpp"
#include "moekit/cpu.hpp"
#include "moekit/error.hpp"

namespace moekit::kernels::detail {
namespace {

constexpr int64_t kP = 128;
constexpr int64_t kChunk = kRowChunk;  // rows per matmul (the a_pack scratch holds this many)

using dt = dnnl::memory::data_type;

// Sets the calling thread's OpenMP thread count to 1 for the scope (oneDNN then runs
// sequentially inside it), and back.
struct OneThread {
  int saved = omp_get_max_threads();
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(saved); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;
};

// oneDNN's types for a format: activations (src) and weights.
dt src_type(WeightType type) noexcept {
  return type == WeightType::w8a8 ? dt::s8 : type == WeightType::bf16 ? dt::bf16 : dt::f32;
}

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// The plain `[K, kP]` weights of one strip.
dnnl::memory::desc plain_weights(dt type, int64_t K) {
  return dnnl::memory::desc({K, kP}, type, dnnl::memory::dims{kP, 1});
}

// The matmul `[M, K] (rows lda apart) x [K, kP]` of a source type (weights of the same type,
// int32 sums for int8, else f32), its weights in the layout `b`.
dnnl::matmul::primitive_desc matmul_desc(dt type, int64_t M, int64_t K, int64_t lda,
                                         const dnnl::memory::desc& b) {
  const dnnl::memory::desc a({M, K}, type, dnnl::memory::dims{lda, 1});
  const dnnl::memory::desc d({M, kP}, type == dt::s8 ? dt::s32 : dt::f32, dnnl::memory::dims{kP, 1});
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, d), engine());
}

// The blocked layout oneDNN's matmul wants for `[K, kP]` weights of this type (asked once per
// (type, K), with a representative M; the matmuls for every M are created with it).
dnnl::memory::desc blocked_weights(dt type, int64_t K) {
  static std::mutex mutex;
  static std::map<std::pair<int, int64_t>, dnnl::memory::desc> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(type), K);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  OneThread one;
  const dnnl::memory::desc any({K, kP}, type, dnnl::memory::format_tag::any);
  return cache.emplace(key, matmul_desc(type, kChunk, K, K, any).weights_desc()).first->second;
}

// Reorders one strip between two layouts, single-threaded.
void reorder_strip(const dnnl::memory::desc& from, const void* src, const dnnl::memory::desc& to,
                   void* dst) {
  OneThread one;
  dnnl::stream stream(engine());
  dnnl::memory s(from, engine(), const_cast<void*>(src)), d(to, engine(), dst);
  dnnl::reorder(s, d).execute(stream, s, d);
  stream.wait();
}

int64_t own_strip_bytes(WeightType type, bool, int64_t k, int64_t) {
  if (k == 0) return 0;
  try {
    return static_cast<int64_t>(blocked_weights(src_type(type), k).get_size());
  } catch (const dnnl::error& e) {
    moekit::detail::fail("oneDNN: no matmul weights layout for ", to_string(type), " with k = ", k,
                         ": ", e.what());
  }
}

void to_own(WeightType type, bool, int64_t k, const uint8_t* plain, uint8_t* own) {
  if (k == 0) return;
  try {
    const dt t = src_type(type);
    reorder_strip(plain_weights(t, k), plain, blocked_weights(t, k), own);
  } catch (const dnnl::error& e) {
    moekit::detail::fail("oneDNN: reordering ", to_string(type), " weights with k = ", k,
                         " failed: ", e.what());
  }
}

void from_own(WeightType type, bool, int64_t k, const uint8_t* own, uint8_t* plain) noexcept {
  if (k == 0) return;
  try {
    const dt t = src_type(type);
    reorder_strip(blocked_weights(t, k), own, plain_weights(t, k), plain);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moekit: oneDNN reorder to plain weights failed: %s\n", e.what());
    std::abort();
  }
}

// A matmul and the layouts of its operands (the memory objects of each call are made from
// them).
struct Matmul {
  dnnl::matmul prim;
  dnnl::memory::desc a, b, d;
};

struct Context {
  dnnl::stream stream{engine()};
  // (source type, M, K, source row stride) -> matmul with blocked `[K, kP]` weights.
  std::map<std::tuple<int, int64_t, int64_t, int64_t>, Matmul> prims;
  std::vector<float> tile;  // [kChunk, kP] f32 or s32 sums
};

Context& context() {
  thread_local Context c;
  return c;
}

const Matmul& matmul_for(Context& c, dt src, int64_t M, int64_t K, int64_t lda) {
  const auto key = std::make_tuple(static_cast<int>(src), M, K, lda);
  auto it = c.prims.find(key);
  if (it != c.prims.end()) return it->second;
  const auto pd = matmul_desc(src, M, K, lda, blocked_weights(src, K));
  return c.prims.emplace(key, Matmul{dnnl::matmul(pd), pd.src_desc(), pd.weights_desc(), pd.dst_desc()})
      .first->second;
}

// Rows [m0, m0 + mc) of the call against every strip of its range.
void run_chunk(const GemmCall& g, Context& c, int64_t m0, int64_t mc) {
  const int64_t k = g.k;
  if (k == 0) {  // empty sums (oneDNN has no zero-depth matmul)
    const float zeros[kP] = {};
    for (int64_t s = g.strip_begin; s < g.strip_end; ++s)
      for (int64_t i = 0; i < mc; ++i) epilogue_row(g, m0 + i, s, zeros, kP);
    return;
  }
  const void* src = nullptr;
  int64_t lda = k;
  dt type = dt::f32;
  const float* a_scale = nullptr;
  switch (g.type) {
    case WeightType::f32:
      src = g.A + m0 * g.lda;
      lda = g.lda;
      break;
    case WeightType::bf16: {  // bf16 x bf16: the rows rounded to bf16, in a_pack
      type = dt::bf16;
      auto* a = reinterpret_cast<uint16_t*>(g.a_pack);
      for (int64_t i = 0; i < mc; ++i)
        for (int64_t p = 0; p < k; ++p) a[i * k + p] = bf16_bits(g.A[(m0 + i) * g.lda + p]);
      src = a;
      break;
    }
    default: {  // w8a8: each row quantised to int8 (as quantize_s8), its scale after the rows
      type = dt::s8;
      auto* q = reinterpret_cast<int8_t*>(g.a_pack);
      float* scales = g.a_pack + (mc * k + 3) / 4;
      for (int64_t i = 0; i < mc; ++i) scales[i] = quantize_row(g.A + (m0 + i) * g.lda, k, q + i * k);
      src = q;
      a_scale = scales;
      break;
    }
  }
  const Matmul& mm = matmul_for(c, type, mc, k, lda);
  dnnl::memory a_mem(mm.a, engine(), const_cast<void*>(src));
  dnnl::memory d_mem(mm.d, engine(), c.tile.data());
  float sums[kP];
  for (int64_t s = g.strip_begin; s < g.strip_end; ++s) {
    dnnl::memory b_mem(mm.b, engine(), const_cast<uint8_t*>(g.data + s * g.strip_bytes));
    mm.prim.execute(c.stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, d_mem}});
    c.stream.wait();
    for (int64_t i = 0; i < mc; ++i) {
      const float* acc = c.tile.data() + i * kP;
      if (a_scale != nullptr) {
        const auto* sum = reinterpret_cast<const int32_t*>(acc);
        for (int64_t j = 0; j < kP; ++j)
          sums[j] = static_cast<float>(sum[j]) * a_scale[i] * g.col_scale[s * kP + j];
        acc = sums;
      }
      epilogue_row(g, m0 + i, s, acc, kP);
    }
  }
}

void run(const GemmCall& g) noexcept {
  // oneDNN reports failures (out of memory, an unsupported shape) by exception; a GEMM has no
  // error channel, so they end the process with the reason, as an allocation failure would.
  try {
    OneThread one;
    Context& c = context();
    c.tile.resize(static_cast<size_t>(kChunk * kP));
    for (int64_t m0 = 0; m0 < g.m; m0 += kChunk) run_chunk(g, c, m0, g.m - m0 < kChunk ? g.m - m0 : kChunk);
  } catch (const dnnl::error& e) {
    std::fprintf(stderr, "moekit: oneDNN matmul failed: %s (status %d)\n", e.what(),
                 static_cast<int>(e.status));
    std::abort();
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "moekit: out of memory in the oneDNN GEMM\n");
    std::abort();
  }
}

// Whether this CPU has the integer dot-product instructions oneDNN's int8 matmul needs to sum
// exactly (VNNI or AMX-INT8; without them it multiplies in saturating int16 pairs).
bool onednn_int8_exact() noexcept {
  const CpuFeatures& f = cpu_features();
  return f.avx512_vnni || f.avx_vnni || f.amx_int8;
}

bool implements(WeightType type, bool bf16_act) noexcept {
  switch (type) {
    case WeightType::f32:
      return !bf16_act;
    case WeightType::bf16:
      return bf16_act;
    case WeightType::w8a8:
      return onednn_int8_exact();
    default:
      return false;
  }
}

}  // namespace

bool onednn_preferred(WeightType type, bool bf16_act) noexcept {
  const CpuFeatures& f = cpu_features();
  const bool format = (type == WeightType::bf16 && bf16_act && f.amx_bf16) ||
                      (type == WeightType::w8a8 && f.amx_int8);
  return format && request_amx_permission() == AmxPermission::granted;
}

extern const GemmKernel kGemmOneDnn;
const GemmKernel kGemmOneDnn{"onednn",
                             kP,
                             1,
                             &run,
                             &implements,
                             /*int8_group=*/1,
                             /*bf16_pairs=*/false,
                             /*bf16_plain=*/true,
                             /*bit_exact=*/false,
                             &own_strip_bytes,
                             &to_own,
                             &from_own};

}  // namespace moekit::kernels::detail
