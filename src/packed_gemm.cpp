// SPDX-License-Identifier: Apache-2.0
// Packed-weight GEMM: packing and quantisation of the weights (f32, bf16, int8, w8a8, fp8),
// the run-time kernel table (scalar always; AVX2+FMA and AVX-512 when compiled in and the CPU
// has them; each entry carries the GEMM and the row kernels of its instruction set), and the
// public entry points. The kernels live in src/kernels/.
#include "moekit/kernels/packed_gemm.hpp"

#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/gemm_internal.hpp"
#include "kernels/rows_internal.hpp"
#include "moekit/cpu.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/fp8.hpp"
#include "moekit/kernels/gemm.hpp"

namespace moekit::kernels {

// ---------------------------------------------------------------------- weight types

const char* to_string(WeightType t) noexcept {
  switch (t) {
    case WeightType::f32:
      return "f32";
    case WeightType::bf16:
      return "bf16";
    case WeightType::int8:
      return "int8";
    case WeightType::w8a8:
      return "w8a8";
    case WeightType::fp8:
      return "fp8";
  }
  return "?";
}

WeightType parse_weight_type(std::string_view name) {
  for (WeightType t :
       {WeightType::f32, WeightType::bf16, WeightType::int8, WeightType::w8a8, WeightType::fp8})
    if (name == to_string(t)) return t;
  moekit::detail::fail("weight type: expected one of f32, bf16, int8, w8a8, fp8; got \"", name,
                       "\"");
}

int64_t weight_type_bytes(WeightType t) noexcept {
  switch (t) {
    case WeightType::f32:
      return 4;
    case WeightType::bf16:
      return 2;
    default:
      return 1;
  }
}

// ---------------------------------------------------------------------- packing

namespace {

// "a, b, c" of the kernels' names.
std::string names(const std::vector<const GemmKernel*>& ks) {
  std::string s;
  for (const GemmKernel* k : ks) s += (s.empty() ? "" : ", ") + std::string(k->name);
  return s;
}

}  // namespace

namespace detail {

/// The GEMM entry points' view of a PackedMatrix.
struct PackedAccess {
  /// Fills the matrix part of `c` and the resolved strip range; false when there is nothing
  /// to compute.
  static bool describe(const PackedMatrix& W, int64_t m, int64_t strip_begin, int64_t strip_end,
                       GemmCall& c) noexcept {
    const int64_t end = strip_end < 0 || strip_end > W.strips_ ? W.strips_ : strip_end;
    const int64_t begin = std::clamp<int64_t>(strip_begin, 0, end);
    if (m <= 0 || begin >= end || W.kernel_ == nullptr) return false;
    c.m = m;
    c.strip_begin = begin;
    c.strip_end = end;
    c.type = W.type_;
    c.gated = W.gated_;
    c.bf16_act = W.bf16_act_;
    c.n = W.n_;
    c.k = W.k_;
    c.panel = W.panel();
    c.data = W.data_.data();
    c.strip_bytes = W.strip_bytes_;
    c.col_scale =
        W.type_ == WeightType::int8 || W.type_ == WeightType::w8a8 ? W.scales_.data() : nullptr;
    c.fp8_scale = W.type_ == WeightType::fp8 ? W.scales_.data() : nullptr;
    c.k_blocks = W.k_blocks_;
    return true;
  }
};

namespace {

/// Largest finite magnitude of the block rows [r0, r1) x depths [p0, p1) of `W` (stride ldw).
float block_abs_max(const float* W, int64_t ldw, int64_t r0, int64_t r1, int64_t p0,
                    int64_t p1) noexcept {
  float m = 0.0f;
  for (int64_t r = r0; r < r1; ++r) m = std::max(m, abs_max(W + r * ldw + p0, p1 - p0));
  return m;
}

uint8_t fp8_code(float w, float scale) noexcept {
  if (!(scale > 0.0f) || std::isnan(w)) return 0;
  return float_to_fp8_e4m3(w / scale);
}

}  // namespace
}  // namespace detail

void PackedMatrix::pack(const float* W, int64_t n, int64_t k, int64_t ldw, const PackOptions& opt) {
  pack_impl(W, nullptr, n, k, ldw, false, opt);
}

void PackedMatrix::pack_gated(const float* G, const float* U, int64_t f, int64_t k, int64_t ldw,
                              const PackOptions& opt) {
  pack_impl(G, U, f, k, ldw, true, opt);
}

void PackedMatrix::pack_impl(const float* W0, const float* W1, int64_t n, int64_t k, int64_t ldw,
                             bool gated, const PackOptions& opt) {
  using detail::kFp8Block;
  const char* who = gated ? "PackedMatrix::pack_gated" : "PackedMatrix::pack";
  MOEKIT_CHECK(n >= 0 && k >= 0, who, ": shape expected >= 0, got [", n, ", ", k, "]");
  MOEKIT_CHECK(n == 0 || ldw >= k, who, ": row stride expected >= k = ", k, ", got ", ldw);
  MOEKIT_CHECK(n * k == 0 || (W0 != nullptr && (!gated || W1 != nullptr)), who,
               ": null weight pointer");
  MOEKIT_CHECK(opt.type != WeightType::w8a8 || k <= (int64_t{1} << 31) / (127 * 127), who,
               ": w8a8 sums int32 products of int8 values; k expected <= ",
               (int64_t{1} << 31) / (127 * 127), ", got ", k);
  const GemmKernel* kern = opt.kernel != nullptr ? opt.kernel : &active_gemm_kernel(opt.type);
  MOEKIT_CHECK(gemm_kernel_supported(*kern), who, ": kernel \"", kern->name,
               "\" is compiled in but this CPU cannot run it (kernels it runs: ",
               names(gemm_kernels()), ")");
  const int64_t P = kern->panel, half = P / 2, width = gated ? half : P;
  MOEKIT_DEBUG_ASSERT(P % 2 == 0 && kFp8Block % P == 0);
  kernel_ = kern;
  n_ = n;
  k_ = k;
  gated_ = gated;
  type_ = opt.type;
  bf16_act_ = opt.bf16_activations && opt.type != WeightType::w8a8;
  strips_ = (n + width - 1) / width;
  k_blocks_ = type_ == WeightType::fp8 ? (k + kFp8Block - 1) / kFp8Block : 0;
  const int64_t eb = weight_type_bytes(type_);
  const int64_t k_store = type_ == WeightType::w8a8 ? k + (k & 1) : k;
  strip_bytes_ = (k_store * P * eb + 63) / 64 * 64;
  data_.assign(static_cast<size_t>(strips_ * strip_bytes_), 0);
  scales_.clear();
  if (type_ == WeightType::int8 || type_ == WeightType::w8a8)
    scales_.assign(static_cast<size_t>(strips_ * P), 0.0f);

  // FP8 block grids of the original matrices ([row blocks, k blocks] each; gate, then up).
  const int64_t row_blocks = (n + kFp8Block - 1) / kFp8Block;
  std::vector<float> grid;
  if (type_ == WeightType::fp8) {
    grid.assign(static_cast<size_t>((gated ? 2 : 1) * row_blocks * k_blocks_), 0.0f);
    for (int h = 0; h < (gated ? 2 : 1); ++h)
      for (int64_t rb = 0; rb < row_blocks; ++rb)
        for (int64_t kb = 0; kb < k_blocks_; ++kb)
          grid[static_cast<size_t>((h * row_blocks + rb) * k_blocks_ + kb)] =
              detail::block_abs_max(h == 0 ? W0 : W1, ldw, rb * kFp8Block,
                                    std::min(n, (rb + 1) * kFp8Block), kb * kFp8Block,
                                    std::min(k, (kb + 1) * kFp8Block)) /
              kFp8E4m3Max;
    // The kernel's copy: per (strip, k block, strip half); a strip half lies in one row block.
    scales_.assign(static_cast<size_t>(strips_ * k_blocks_ * 2), 0.0f);
    for (int64_t s = 0; s < strips_; ++s)
      for (int64_t kb = 0; kb < k_blocks_; ++kb)
        for (int64_t hh = 0; hh < 2; ++hh) {
          const int64_t h = gated ? hh : 0, rb = (gated ? s * half : s * P + hh * half) / kFp8Block;
          scales_[static_cast<size_t>((s * k_blocks_ + kb) * 2 + hh)] =
              grid[static_cast<size_t>((h * row_blocks + rb) * k_blocks_ + kb)];
        }
  }

  for (int h = 0; h < (gated ? 2 : 1); ++h)
    for (int64_t r = 0; r < n; ++r) {
      const float* src = (h == 0 ? W0 : W1) + r * ldw;
      const int64_t s = r / width, j = r % width + h * half;
      uint8_t* S = data_.data() + s * strip_bytes_;
      switch (type_) {
        case WeightType::f32:
          for (int64_t p = 0; p < k; ++p) std::memcpy(S + (p * P + j) * 4, src + p, 4);
          break;
        case WeightType::bf16:
          for (int64_t p = 0; p < k; ++p) {
            const uint16_t b = detail::bf16_bits(src[p]);
            std::memcpy(S + (p * P + j) * 2, &b, 2);
          }
          break;
        case WeightType::int8:
        case WeightType::w8a8: {
          const float scale = detail::int8_scale(detail::abs_max(src, k));
          scales_[static_cast<size_t>(s * P + j)] = scale;
          for (int64_t p = 0; p < k; ++p) {
            const int64_t at =
                type_ == WeightType::int8 ? p * P + j : (p / 2) * 2 * P + 2 * j + p % 2;
            S[at] = static_cast<uint8_t>(detail::quantize_s8(src[p], scale));
          }
          break;
        }
        case WeightType::fp8:
          for (int64_t p = 0; p < k; ++p) {
            const float scale = scales_[static_cast<size_t>((s * k_blocks_ + p / kFp8Block) * 2 +
                                                            (j < half ? 0 : 1))];
            S[p * P + j] = detail::fp8_code(src[p], scale);
          }
          break;
      }
    }
}

void PackedMatrix::unpack_row(int64_t r, bool up, float* dst) const noexcept {
  const int64_t P = panel(), half = P / 2, width = gated_ ? half : P;
  const int64_t s = r / width, j = r % width + (gated_ && up ? half : 0);
  const uint8_t* S = strip_data(s);
  for (int64_t p = 0; p < k_; ++p) {
    switch (type_) {
      case WeightType::f32:
        std::memcpy(dst + p, S + (p * P + j) * 4, 4);
        break;
      case WeightType::bf16: {
        uint16_t b;
        std::memcpy(&b, S + (p * P + j) * 2, 2);
        dst[p] = detail::bf16_to_float(b);
        break;
      }
      case WeightType::int8:
        dst[p] = static_cast<float>(static_cast<int8_t>(S[p * P + j])) *
                 scales_[static_cast<size_t>(s * P + j)];
        break;
      case WeightType::w8a8:
        dst[p] = static_cast<float>(static_cast<int8_t>(S[(p / 2) * 2 * P + 2 * j + p % 2])) *
                 scales_[static_cast<size_t>(s * P + j)];
        break;
      case WeightType::fp8:
        dst[p] = fp8_e4m3_to_float(S[p * P + j]) *
                 scales_[static_cast<size_t>((s * k_blocks_ + p / detail::kFp8Block) * 2 +
                                             (j < half ? 0 : 1))];
        break;
    }
  }
}

size_t packed_a_floats(int64_t m, int64_t k) noexcept {
  if (m <= 0) return 0;
  const int64_t rows = (std::min(m, detail::kRowChunk) + detail::kMaxTileRows - 1) /
                       detail::kMaxTileRows * detail::kMaxTileRows;
  return static_cast<size_t>(rows * (k + 1));
}

// ---------------------------------------------------------------------- kernel table

namespace {

// One instruction set: its GEMM and row kernels, and what the CPU must have to run them.
struct KernelEntry {
  const GemmKernel* kernel;
  const RowKernels* rows;
  bool (*supported)() noexcept;
  const char* needs;
};

bool always() noexcept { return true; }
#if defined(MOEKIT_HAVE_KERNEL_AVX2)
bool has_avx2() noexcept {
  const CpuFeatures& f = cpu_features();
  return f.avx2 && f.fma && f.f16c;
}
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512)
bool has_avx512() noexcept {
  const CpuFeatures& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.fma;
}
#endif

// Every compiled kernel, slowest first: the default is the last one the CPU supports. The
// order is by measured speed, not by the age of the instruction set (docs/architecture.md,
// "Kernels": AVX-512 is faster than AVX2 for every weight type on the CPUs measured).
const KernelEntry kTable[] = {
    {&detail::kGemmScalar, &detail::kRowsScalar, always, "nothing beyond x86-64"},
#if defined(MOEKIT_HAVE_KERNEL_AVX2)
    {&detail::kGemmAvx2, &detail::kRowsAvx2, has_avx2, "AVX2, FMA and F16C"},
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512)
    {&detail::kGemmAvx512, &detail::kRowsAvx512, has_avx512, "AVX-512 F, BW, DQ and VL, and FMA"},
#endif
};

// One member of every table entry, in table order (of the entries this CPU supports only,
// when `supported_only`).
template <class T>
std::vector<const T*> column(const T* KernelEntry::*member, bool supported_only) {
  std::vector<const T*> v;
  for (const KernelEntry& e : kTable)
    if (!supported_only || e.supported()) v.push_back(e.*member);
  return v;
}

const KernelEntry* entry_of(const GemmKernel& k) noexcept {
  for (const KernelEntry& e : kTable)
    if (e.kernel == &k) return &e;
  return nullptr;
}

// The choice (MOEKIT_KERNEL or the best supported entry), or why there is none; read once.
struct Choice {
  const KernelEntry* entry = nullptr;
  std::string error;
  std::string why;
};

const Choice& choice() noexcept {
  static const Choice c = [] {
    Choice c;
    const KernelEntry* best = nullptr;
    for (const KernelEntry& e : kTable)
      if (e.supported()) best = &e;
    const char* env = std::getenv("MOEKIT_KERNEL");
    if (env == nullptr || *env == '\0') {
      c.entry = best;
      c.why = std::string("the fastest compiled kernel this CPU runs (it needs ") + best->needs + ")";
      return c;
    }
    const std::string want = env;
    if (want == "simd") {
      if (best != &kTable[0]) {
        c.entry = best;
        c.why = "MOEKIT_KERNEL=simd: the fastest SIMD kernel this CPU runs";
      } else {
        c.error = "MOEKIT_KERNEL=simd: no SIMD kernel " +
                  std::string(compiled_gemm_kernels().size() > 1
                                  ? "compiled into moekit runs on this CPU (compiled: "
                                  : "is compiled into moekit (compiled: ") +
                  names(compiled_gemm_kernels()) + ")";
      }
      return c;
    }
    for (const KernelEntry& e : kTable) {
      if (want != e.kernel->name) continue;
      if (e.supported()) {
        c.entry = &e;
        c.why = "MOEKIT_KERNEL=" + want;
      } else {
        c.error = "MOEKIT_KERNEL=" + want + ": this CPU cannot run that kernel (it needs " +
                  e.needs + "); kernels this CPU runs: " + names(gemm_kernels());
      }
      return c;
    }
    c.error = "MOEKIT_KERNEL: expected \"scalar\", \"simd\" or one of the compiled kernels (" +
              names(compiled_gemm_kernels()) + "), got \"" + want + "\"";
    return c;
  }();
  return c;
}

}  // namespace

const std::vector<const GemmKernel*>& compiled_gemm_kernels() noexcept {
  static const auto all = column(&KernelEntry::kernel, false);
  return all;
}

bool gemm_kernel_supported(const GemmKernel& kernel) noexcept {
  const KernelEntry* e = entry_of(kernel);
  return e != nullptr && e->supported();
}

const char* gemm_kernel_needs(const GemmKernel& kernel) noexcept {
  const KernelEntry* e = entry_of(kernel);
  return e != nullptr ? e->needs : "";
}

const std::vector<const GemmKernel*>& gemm_kernels() noexcept {
  static const auto usable = column(&KernelEntry::kernel, true);
  return usable;
}

const GemmKernel& active_gemm_kernel() {
  MOEKIT_CHECK(choice().entry != nullptr, choice().error);
  return *choice().entry->kernel;
}

const GemmKernel& active_gemm_kernel(WeightType) { return active_gemm_kernel(); }

std::string gemm_kernel_reason(WeightType type) {
  const GemmKernel& k = active_gemm_kernel(type);
  return std::string(k.name) + " implements " + to_string(type) + "; chosen as " + choice().why;
}

const RowKernels& row_kernels() noexcept {
  const Choice& c = choice();
  return c.entry != nullptr ? *c.entry->rows : detail::kRowsScalar;
}

const std::vector<const RowKernels*>& row_kernel_implementations() noexcept {
  static const auto usable = column(&KernelEntry::rows, true);
  return usable;
}

const char* gemm_backend() noexcept {
  static const std::string name = [] {
    try {
      const GemmKernel& k = active_gemm_kernel();
      if (k.tile_rows == 1) return std::string(k.name) + "-" + std::to_string(k.panel);
      return "packed-" + std::to_string(k.tile_rows) + "x" + std::to_string(k.panel) + "-" + k.name;
    } catch (const error& e) {
      return "invalid MOEKIT_KERNEL (" + std::string(e.what()) + ")";
    }
  }();
  return name.c_str();
}

// ---------------------------------------------------------------------- entry points

void gemm_packed(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C,
                 int64_t ldc, float* a_pack, bool accumulate, int64_t strip_begin,
                 int64_t strip_end) noexcept {
  MOEKIT_DEBUG_ASSERT(!W.gated());
  detail::GemmCall c{};
  if (!detail::PackedAccess::describe(W, m, strip_begin, strip_end, c)) return;
  c.A = A;
  c.lda = lda;
  c.out = C;
  c.ldo = ldc;
  c.a_pack = a_pack;
  c.mode = accumulate ? detail::GemmMode::accumulate : detail::GemmMode::store;
  W.kernel().run(c);
}

void gemm_packed_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W,
                       Activation act, float* H, int64_t ldh, float* a_pack, int64_t strip_begin,
                       int64_t strip_end) noexcept {
  MOEKIT_DEBUG_ASSERT(W.gated());
  detail::GemmCall c{};
  if (!detail::PackedAccess::describe(W, m, strip_begin, strip_end, c)) return;
  c.A = A;
  c.lda = lda;
  c.out = H;
  c.ldo = ldh;
  c.a_pack = a_pack;
  c.mode = detail::GemmMode::gated;
  c.act = act;
  W.kernel().run(c);
}

void gemm_packed_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                     float* H, int64_t ldh, float* a_pack, int64_t strip_begin,
                     int64_t strip_end) noexcept {
  MOEKIT_DEBUG_ASSERT(!W.gated());
  detail::GemmCall c{};
  if (!detail::PackedAccess::describe(W, m, strip_begin, strip_end, c)) return;
  c.A = A;
  c.lda = lda;
  c.out = H;
  c.ldo = ldh;
  c.a_pack = a_pack;
  c.mode = detail::GemmMode::act;
  c.act = act;
  W.kernel().run(c);
}

}  // namespace moekit::kernels
