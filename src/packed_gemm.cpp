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
#include <iterator>
#include <string>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

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
    case WeightType::int4:
      return "int4";
    case WeightType::int4zp:
      return "int4zp";
    case WeightType::w4a8:
      return "w4a8";
  }
  return "?";
}

WeightType parse_weight_type(std::string_view name) {
  std::string all;
  for (WeightType t : kWeightTypes) {
    if (name == to_string(t)) return t;
    all += (all.empty() ? "" : ", ") + std::string(to_string(t));
  }
  moekit::detail::fail("weight type: expected one of ", all, "; got \"", name, "\"");
}

int64_t weight_type_bits(WeightType t) noexcept {
  switch (t) {
    case WeightType::f32:
      return 32;
    case WeightType::bf16:
      return 16;
    case WeightType::int4:
    case WeightType::int4zp:
    case WeightType::w4a8:
      return 4;
    default:
      return 8;
  }
}

int64_t weight_type_bytes(WeightType t) noexcept { return (weight_type_bits(t) + 7) / 8; }

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
    c.pairs = W.type_ == WeightType::bf16 && W.bf16_act_;
    c.n = W.n_;
    c.k = W.k_;
    c.depth = c.pairs ? W.k_ + (W.k_ & 1) : W.k_;
    c.panel = W.panel();
    c.data = W.data_.data();
    c.strip_bytes = W.strip_bytes_;
    c.col_scale =
        W.type_ == WeightType::int8 || W.type_ == WeightType::w8a8 ? W.scales_.data() : nullptr;
    c.fp8_scale = W.type_ == WeightType::fp8 ? W.scales_.data() : nullptr;
    c.k_blocks = W.k_blocks_;
#if defined(__SSE__) || defined(__x86_64__)
    c.daz = (_mm_getcsr() & 0x0040u) != 0;
#else
    c.daz = false;
#endif
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

// The int4zp code of w with scale d (>= 0) and zero point zf: clamp(round(w / d) + z, 0, 15);
// NaN or d = 0 -> the zero point (the value 0).
uint8_t int4zp_code(float w, float d, float zf) noexcept {
  if (!(d > 0.0f) || std::isnan(w)) return static_cast<uint8_t>(zf);
  const float r = std::nearbyint(w / d);
  if (r != r) return static_cast<uint8_t>(zf);
  return static_cast<uint8_t>(std::clamp(r + zf, 0.0f, 15.0f));
}

// The int4 code (q + 8) of w with group scale d (either sign): q = clamp(round(w / d), -8,
// 7), round to nearest even; NaN or d = 0 -> q = 0; infinities saturate.
uint8_t int4_code(float w, float d) noexcept {
  if (d == 0.0f || std::isnan(w)) return 8;
  const float r = std::nearbyint(w / d);
  if (r != r) return 8;
  return static_cast<uint8_t>(std::clamp(r, -8.0f, 7.0f) + 8.0f);
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
  const bool bf16_act = opt.bf16_activations && !quantises_activations(opt.type);
  const GemmKernel* kern =
      opt.kernel != nullptr ? opt.kernel : &active_gemm_kernel(opt.type, bf16_act);
  MOEKIT_CHECK(gemm_kernel_supported(*kern), who, ": kernel \"", kern->name,
               "\" is compiled in but this CPU cannot run it (kernels it runs: ",
               names(gemm_kernels()), ")");
  MOEKIT_CHECK(kern->implements(opt.type, bf16_act), who, ": kernel \"", kern->name,
               "\" does not implement ", to_string(opt.type), " weights with ",
               bf16_act ? "bf16" : "f32", " activations");
  const int64_t P = kern->panel, half = P / 2, width = gated ? half : P;
  MOEKIT_DEBUG_ASSERT(P % 2 == 0 && kFp8Block % P == 0);
  kernel_ = kern;
  n_ = n;
  k_ = k;
  gated_ = gated;
  type_ = opt.type;
  bf16_act_ = bf16_act;
  strips_ = (n + width - 1) / width;
  k_blocks_ = type_ == WeightType::fp8 ? (k + kFp8Block - 1) / kFp8Block : 0;
  const int64_t eb = weight_type_bytes(type_);
  // Depth layouts (see detail::GemmCall): w8a8 in groups of G; bf16 x bf16 in pairs.
  const int64_t G = kern->int8_group;
  const bool pairs = type_ == WeightType::bf16 && bf16_act_;
  const int64_t k_store = type_ == WeightType::w8a8 ? (k + G - 1) / G * G
                          : pairs                   ? k + (k & 1)
                                                    : k;
  const bool four = weight_type_bits(type_) == 4;
  const int64_t group_bytes = detail::int4_group_bytes(P, type_ == WeightType::int4zp);
  strip_bytes_ = four ? ((k + detail::kInt4Group - 1) / detail::kInt4Group * group_bytes + 63) / 64 * 64
                      : (k_store * P * eb + 63) / 64 * 64;
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
      // The 4-bit code of depth row q of a group, packed column j: low nibble in the strip's
      // first half, high nibble in the second (w4a8: depths interleaved in groups of G).
      const int64_t nib_g = type_ == WeightType::w4a8 ? G : 1;
      auto put_nibble = [half, j, nib_g](uint8_t* block, int64_t q, uint8_t code) {
        uint8_t& byte = block[detail::nibble_index(q, j % half, half, nib_g)];
        byte = j < half ? static_cast<uint8_t>((byte & 0xF0u) | code)
                        : static_cast<uint8_t>((byte & 0x0Fu) | code << 4);
      };
      switch (type_) {
        case WeightType::f32:
          for (int64_t p = 0; p < k; ++p) std::memcpy(S + (p * P + j) * 4, src + p, 4);
          break;
        case WeightType::bf16:
          for (int64_t p = 0; p < k; ++p) {
            const uint16_t b = detail::bf16_bits(src[p]);
            std::memcpy(S + bf16_index(p, j) * 2, &b, 2);
          }
          break;
        case WeightType::int8:
        case WeightType::w8a8: {
          const float scale = detail::int8_scale(detail::abs_max(src, k));
          scales_[static_cast<size_t>(s * P + j)] = scale;
          for (int64_t p = 0; p < k; ++p) {
            const int8_t q = detail::quantize_s8(src[p], scale);
            if (type_ == WeightType::int8) {
              S[p * P + j] = static_cast<uint8_t>(q);
            } else {  // G = 4 (VNNI) stores q + 128 as an unsigned byte
              S[(p / G) * G * P + G * j + p % G] =
                  static_cast<uint8_t>(G == 4 ? q + 128 : static_cast<uint8_t>(q));
            }
          }
          // w8a8 with G = 4: the padding depths of a real column must read as 0 (+ 128).
          if (type_ == WeightType::w8a8 && G == 4)
            for (int64_t p = k; p < k_store; ++p) S[(p / G) * G * P + G * j + p % G] = 128;
          break;
        }
        case WeightType::fp8:
          for (int64_t p = 0; p < k; ++p) {
            const float scale = scales_[static_cast<size_t>((s * k_blocks_ + p / kFp8Block) * 2 +
                                                            (j < half ? 0 : 1))];
            S[p * P + j] = detail::fp8_code(src[p], scale);
          }
          break;
        case WeightType::int4zp:
          for (int64_t p0 = 0; p0 < k; p0 += detail::kInt4Group) {
            const int64_t p1 = std::min(k, p0 + detail::kInt4Group);
            uint8_t* block = S + p0 / detail::kInt4Group * group_bytes;
            // GPTQ: the finite range widened to include 0; d = range / 15 in bf16; z, q.
            float lo = 0.0f, hi = 0.0f;
            for (int64_t p = p0; p < p1; ++p)
              if (std::fabs(src[p]) <= FLT_MAX) {
                lo = std::min(lo, src[p]);
                hi = std::max(hi, src[p]);
              }
            const uint16_t d_bits = detail::bf16_bits((hi - lo) / 15.0f);
            const float d = detail::bf16_to_float(d_bits);
            const float zf = d > 0.0f ? std::clamp(std::nearbyint(-lo / d), 0.0f, 15.0f) : 0.0f;
            std::memcpy(block + detail::kInt4Group * half + 2 * j, &d_bits, 2);
            block[detail::kInt4Group * half + 2 * P + j] = static_cast<uint8_t>(zf);
            for (int64_t p = p0; p < p1; ++p) {
              put_nibble(block, p - p0, detail::int4zp_code(src[p], d, zf));
            }
          }
          break;
        case WeightType::int4:
        case WeightType::w4a8:
          for (int64_t p0 = 0; p0 < k; p0 += detail::kInt4Group) {
            const int64_t p1 = std::min(k, p0 + detail::kInt4Group);
            uint8_t* block = S + p0 / detail::kInt4Group * group_bytes;
            // d = (the value of largest finite magnitude, signed) / -8, rounded to bf16.
            float m = 0.0f;
            for (int64_t p = p0; p < p1; ++p)
              if (std::fabs(src[p]) <= FLT_MAX && std::fabs(src[p]) > std::fabs(m)) m = src[p];
            const uint16_t d_bits = detail::bf16_bits(m / -8.0f);
            const float d = detail::bf16_to_float(d_bits);
            std::memcpy(block + detail::kInt4Group * half + 2 * j, &d_bits, 2);
            for (int64_t p = p0; p < p1; ++p) {
              put_nibble(block, p - p0, detail::int4_code(src[p], d));
            }
          }
          break;
      }
    }
}

int64_t PackedMatrix::bf16_index(int64_t p, int64_t j) const noexcept {
  const int64_t P = panel();
  if (!bf16_act_ || kernel_->bf16_plain) return p * P + j;
  return kernel_->bf16_pairs ? (p / 2) * 2 * P + 2 * j + p % 2 : (p ^ 1) * P + j;
}

void PackedMatrix::unpack_row(int64_t r, bool up, float* dst) const noexcept {
  const int64_t P = panel(), half = P / 2, width = gated_ ? half : P;
  const int64_t s = r / width, j = r % width + (gated_ && up ? half : 0);
  const int64_t G = kernel_->int8_group;
  const uint8_t* S = strip_data(s);
  for (int64_t p = 0; p < k_; ++p) {
    switch (type_) {
      case WeightType::f32:
        std::memcpy(dst + p, S + (p * P + j) * 4, 4);
        break;
      case WeightType::bf16: {
        uint16_t b;
        std::memcpy(&b, S + bf16_index(p, j) * 2, 2);
        dst[p] = detail::bf16_to_float(b);
        break;
      }
      case WeightType::int8:
        dst[p] = static_cast<float>(static_cast<int8_t>(S[p * P + j])) *
                 scales_[static_cast<size_t>(s * P + j)];
        break;
      case WeightType::w8a8: {
        const uint8_t b = S[(p / G) * G * P + G * j + p % G];
        const int q = G == 4 ? int{b} - 128 : int{static_cast<int8_t>(b)};
        dst[p] = static_cast<float>(q) * scales_[static_cast<size_t>(s * P + j)];
        break;
      }
      case WeightType::fp8:
        dst[p] = fp8_e4m3_to_float(S[p * P + j]) *
                 scales_[static_cast<size_t>((s * k_blocks_ + p / detail::kFp8Block) * 2 +
                                             (j < half ? 0 : 1))];
        break;
      case WeightType::int4:
      case WeightType::int4zp:
      case WeightType::w4a8: {
        const bool zp = type_ == WeightType::int4zp;
        const uint8_t* block = S + p / detail::kInt4Group * detail::int4_group_bytes(P, zp);
        uint16_t d;
        std::memcpy(&d, block + detail::kInt4Group * half + 2 * j, 2);
        const int z = zp ? block[detail::kInt4Group * half + 2 * P + j] : 8;
        const uint8_t byte = block[detail::nibble_index(p % detail::kInt4Group, j % half, half,
                                                        type_ == WeightType::w4a8 ? G : 1)];
        const int q = (j < half ? byte & 0x0F : byte >> 4) - z;
        dst[p] = static_cast<float>(q) * detail::bf16_to_float(d);
        break;
      }
    }
  }
}

size_t packed_a_floats(int64_t m, int64_t k) noexcept {
  if (m <= 0) return 0;
  const int64_t rows = (std::min(m, detail::kRowChunk) + detail::kMaxTileRows - 1) /
                       detail::kMaxTileRows * detail::kMaxTileRows;
  // Row tiles of k floats (or fewer words), plus a scale and an int32 bias per row; w4a8:
  // 16 words per 32 depths (k padded to 32) and a scale and a correction per 32.
  const int64_t groups = (k + detail::kInt4Group - 1) / detail::kInt4Group;
  return static_cast<size_t>(rows * (std::max(k, 18 * groups) + 3));
}

// ---------------------------------------------------------------------- kernel table

namespace {

// One kernel: its GEMM, its row kernels (general kernels; null for a specialised one), what
// the CPU must have to run it, and whether the table takes it without MOEKIT_KERNEL naming it
// (a library kernel only where it is expected to beat moekit's own).
struct KernelEntry {
  const GemmKernel* kernel;
  const RowKernels* rows;
  bool (*supported)() noexcept;
  const char* needs;
  bool (*preferred)(WeightType, bool) noexcept = always_true;

  static bool always_true(WeightType, bool) noexcept { return true; }
};

bool always() noexcept { return true; }
#if defined(MOEKIT_HAVE_KERNEL_AVX2)
bool has_avx2() noexcept {
  const CpuFeatures& f = cpu_features();
  return f.avx2 && f.fma && f.f16c;
}
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512) || defined(MOEKIT_HAVE_KERNEL_AVX512_BF16) || \
    defined(MOEKIT_HAVE_KERNEL_AVX512_VNNI)
bool has_avx512() noexcept {
  const CpuFeatures& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.fma;
}
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512_BF16)
bool has_avx512_bf16() noexcept { return has_avx512() && cpu_features().avx512_bf16; }
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512_VNNI)
bool has_avx512_vnni() noexcept { return has_avx512() && cpu_features().avx512_vnni; }
#endif

// Every compiled kernel, slowest first: each format runs on the last entry the CPU supports
// that implements it (and MOEKIT_KERNEL allows). The general kernels are ordered by measured
// speed, not by the age of the instruction set (docs/architecture.md, "Kernels": AVX-512 is
// faster than AVX2 for every weight type on the CPUs measured); the specialised ones come
// last, so they take the formats they implement.
const KernelEntry kTable[] = {
    {&detail::kGemmScalar, &detail::kRowsScalar, always, "nothing beyond x86-64"},
#if defined(MOEKIT_HAVE_KERNEL_AVX2)
    {&detail::kGemmAvx2, &detail::kRowsAvx2, has_avx2, "AVX2, FMA and F16C"},
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512)
    {&detail::kGemmAvx512, &detail::kRowsAvx512, has_avx512, "AVX-512 F, BW, DQ and VL, and FMA"},
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512_VNNI)
    {&detail::kGemmAvx512Vnni, nullptr, has_avx512_vnni,
     "AVX-512 F, BW, DQ and VL, FMA, and AVX512-VNNI"},
#endif
#if defined(MOEKIT_HAVE_KERNEL_AVX512_BF16)
    {&detail::kGemmAvx512Bf16, nullptr, has_avx512_bf16,
     "AVX-512 F, BW, DQ and VL, FMA, and AVX512-BF16"},
#endif
#if defined(MOEKIT_HAVE_KERNEL_ONEDNN)
    // oneDNN's matmul (f32, bf16 x bf16, w8a8): taken by default only where AMX is granted
    // (its AMX kernels beat moekit's AVX-512 ones); elsewhere when MOEKIT_KERNEL names it.
    {&detail::kGemmOneDnn, nullptr, always, "nothing beyond x86-64 (oneDNN picks its own ISA)",
     detail::onednn_preferred},
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

// The kernels MOEKIT_KERNEL allows (all this CPU runs when unset), or why the variable is
// wrong; read once. `general` is the best allowed general kernel (f32, the row kernels, and
// every format no allowed specialised kernel implements).
struct Choice {
  std::vector<const KernelEntry*> allowed;  // slowest first, all supported
  // Entries MOEKIT_KERNEL names: they take every format they implement; the others only
  // those they are preferred for (KernelEntry::preferred).
  std::vector<const KernelEntry*> named;
  const KernelEntry* general = nullptr;
  std::string error;
  std::string why;  // how the list was formed, for gemm_kernel_reason()
};

const Choice& choice() noexcept {
  static const Choice c = [] {
    Choice c;
    const char* env = std::getenv("MOEKIT_KERNEL");
    const std::string want = env != nullptr ? env : "";
    std::vector<std::string> names_wanted;
    for (size_t at = 0; !want.empty() && at <= want.size();) {
      const size_t comma = std::min(want.find(',', at), want.size());
      names_wanted.push_back(want.substr(at, comma - at));
      at = comma + 1;
    }
    const KernelEntry* best_general = nullptr;
    for (const KernelEntry& e : kTable)
      if (e.supported() && e.rows != nullptr) best_general = &e;
    if (names_wanted.empty()) {
      for (const KernelEntry& e : kTable)
        if (e.supported()) c.allowed.push_back(&e);
      c.general = best_general;
      c.why = "the fastest compiled kernel this CPU runs that implements it";
      return c;
    }
    c.why = "MOEKIT_KERNEL=" + want;
    std::vector<bool> take(std::size(kTable), false);
    for (const std::string& name : names_wanted) {
      if (name == "simd") {
        bool any = false;
        for (size_t i = 1; i < std::size(kTable); ++i)
          if (kTable[i].supported()) take[i] = any = true;
        if (!any) {
          c.error = "MOEKIT_KERNEL=" + want + ": no SIMD kernel " +
                    std::string(compiled_gemm_kernels().size() > 1
                                    ? "compiled into moekit runs on this CPU (compiled: "
                                    : "is compiled into moekit (compiled: ") +
                    names(compiled_gemm_kernels()) + ")";
          return c;
        }
        continue;
      }
      size_t i = 0;
      while (i < std::size(kTable) && name != kTable[i].kernel->name) ++i;
      if (i == std::size(kTable)) {
        c.error = "MOEKIT_KERNEL: expected \"scalar\", \"simd\" or compiled kernels' names (" +
                  names(compiled_gemm_kernels()) + "), comma-separated; got \"" + want + "\"";
        return c;
      }
      if (!kTable[i].supported()) {
        c.error = "MOEKIT_KERNEL=" + want + ": this CPU cannot run " + name + " (it needs " +
                  kTable[i].needs + "); kernels this CPU runs: " + names(gemm_kernels());
        return c;
      }
      take[i] = true;
      c.named.push_back(&kTable[i]);
    }
    for (size_t i = 0; i < std::size(kTable); ++i)
      if (take[i]) {
        c.allowed.push_back(&kTable[i]);
        if (kTable[i].rows != nullptr) c.general = &kTable[i];
      }
    if (c.general == nullptr) {  // only specialised kernels named: they extend the best general
      c.general = best_general;
      c.allowed.insert(c.allowed.begin(), best_general);
      c.why += " (and " + std::string(best_general->kernel->name) + " for the other formats)";
    }
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

bool gemm_kernel_by_default(const GemmKernel& kernel, WeightType type,
                            bool bf16_activations) noexcept {
  const KernelEntry* e = entry_of(kernel);
  return e != nullptr && e->preferred(type, bf16_activations && !quantises_activations(type));
}

bool gemm_kernel_implements(const GemmKernel& kernel, WeightType type,
                            bool bf16_activations) noexcept {
  return kernel.implements(type, bf16_activations && !quantises_activations(type));
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
  MOEKIT_CHECK(choice().general != nullptr, choice().error);
  return *choice().general->kernel;
}

const GemmKernel& active_gemm_kernel(WeightType type, bool bf16_activations) {
  const Choice& c = choice();
  MOEKIT_CHECK(c.general != nullptr, c.error);
  const bool act = bf16_activations && !quantises_activations(type);
  for (auto it = c.allowed.rbegin(); it != c.allowed.rend(); ++it) {
    const KernelEntry* e = *it;
    const bool named = std::find(c.named.begin(), c.named.end(), e) != c.named.end();
    if (gemm_kernel_implements(*e->kernel, type, act) && (named || e->preferred(type, act)))
      return *e->kernel;
  }
  return *c.general->kernel;  // general kernels implement every format
}

std::string gemm_kernel_reason(WeightType type, bool bf16_activations) {
  const GemmKernel& k = active_gemm_kernel(type, bf16_activations);
  const KernelEntry* e = entry_of(k);
  return std::string(k.name) + " implements " + to_string(type) +
         (bf16_activations && !quantises_activations(type) ? " with bf16 activations" : "") +
         "; chosen as " + choice().why + " (it needs " + (e != nullptr ? e->needs : "?") + ")";
}

const RowKernels& row_kernels() noexcept {
  const Choice& c = choice();
  return c.general != nullptr ? *c.general->rows : detail::kRowsScalar;
}

const std::vector<const RowKernels*>& row_kernel_implementations() noexcept {
  static const auto usable = [] {
    std::vector<const RowKernels*> v;
    for (const KernelEntry& e : kTable)
      if (e.supported() && e.rows != nullptr) v.push_back(e.rows);
    return v;
  }();
  return usable;
}

namespace {
std::string backend_label(const GemmKernel& k) {
  if (k.tile_rows == 1) return std::string(k.name) + "-" + std::to_string(k.panel);
  return "packed-" + std::to_string(k.tile_rows) + "x" + std::to_string(k.panel) + "-" + k.name;
}
}  // namespace

const char* gemm_backend() noexcept {
  static const std::string name = [] {
    try {
      return backend_label(active_gemm_kernel());
    } catch (const error& e) {
      return "invalid MOEKIT_KERNEL (" + std::string(e.what()) + ")";
    }
  }();
  return name.c_str();
}

std::string gemm_backend(WeightType type, bool bf16_activations) {
  return backend_label(active_gemm_kernel(type, bf16_activations));
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
