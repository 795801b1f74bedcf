// SPDX-License-Identifier: Apache-2.0
// Packed-weight GEMM: packing the weights (the loop over columns; each format's quantiser and
// layout is a row of the format table, src/kernels/formats/), the run-time kernel table (scalar always; AVX2+FMA and AVX-512 when compiled in and the CPU
// has them; each entry carries the GEMM and the row kernels of its instruction set), and the
// public entry points. The kernels live in src/kernels/.
#include "moekit/kernels/packed_gemm.hpp"

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "kernels/formats/formats.hpp"
#include "kernels/gemm_internal.hpp"
#include "kernels/rows_internal.hpp"
#include "moekit/cpu.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/gemm.hpp"

namespace moekit::kernels {

// ---------------------------------------------------------------------- weight types

const char* to_string(WeightType t) noexcept {
  return detail::is_weight_type(t) ? detail::weight_format(t).name : "?";
}

WeightType parse_weight_type(std::string_view name) {
  std::string all;
  for (WeightType t : kWeightTypes) {
    if (name == to_string(t)) return t;
    all += (all.empty() ? "" : ", ") + std::string(to_string(t));
  }
  moekit::detail::fail("weight type: expected one of ", all, "; got \"", name, "\"");
}

int64_t weight_type_bits(WeightType t) noexcept { return detail::weight_format(t).bits; }

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
    c.f16_scales = W.f16_scales_;
    c.pairs = W.type_ == WeightType::bf16 && W.bf16_act_;
    c.n = W.n_;
    c.k = W.k_;
    c.depth = c.pairs ? W.k_ + (W.k_ & 1) : W.k_;
    c.panel = W.panel();
    c.data = W.data_ptr();
    c.strip_bytes = W.strip_bytes_;
    const ScaleKind scales = weight_format(W.type_).scales;
    c.col_scale = scales == ScaleKind::per_column ? W.scales_ptr() : nullptr;
    c.fp8_scale = scales == ScaleKind::fp8_blocks ? W.scales_ptr() : nullptr;
    c.k_blocks = scales == ScaleKind::fp8_blocks ? (W.k_ + kFp8Block - 1) / kFp8Block : 0;
    // Only fp8 widening depends on it (GemmCall::daz): no MXCSR read for the other formats.
#if defined(__SSE__) || defined(__x86_64__)
    c.daz = scales == ScaleKind::fp8_blocks && (_mm_getcsr() & 0x0040u) != 0;
#else
    c.daz = false;
#endif
    return true;
  }

  /// Where W's values are (the formats' view).
  static PackLayout layout(const PackedMatrix& W) noexcept {
    const int64_t P = W.panel();
    return PackLayout{W.n_, W.k_, P, W.gated_ ? P / 2 : P, W.strips_, W.gated_, W.bf16_act_,
                      W.kernel_, W.f16_scales_};
  }
};

namespace {

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
  const char* who = gated ? "PackedMatrix::pack_gated" : "PackedMatrix::pack";
  MOEKIT_CHECK(detail::is_weight_type(opt.type), who, ": weight type expected one of kWeightTypes, got enum value ",
               static_cast<int>(opt.type));
  MOEKIT_CHECK(n >= 0 && k >= 0, who, ": shape expected >= 0, got [", n, ", ", k, "]");
  MOEKIT_CHECK(n == 0 || ldw >= k, who, ": row stride expected >= k = ", k, ", got ", ldw);
  MOEKIT_CHECK(n * k == 0 || (W0 != nullptr && (!gated || W1 != nullptr)), who,
               ": null weight pointer");
  MOEKIT_CHECK(opt.type != WeightType::w8a8 || k <= (int64_t{1} << 31) / (127 * 127), who,
               ": w8a8 sums int32 products of int8 values; k expected <= ",
               (int64_t{1} << 31) / (127 * 127), ", got ", k);
  MOEKIT_CHECK(!opt.f16_scales || opt.type == WeightType::int4 || opt.type == WeightType::w4a8, who,
               ": f16_scales expected with int4 or w4a8 weights, got ", to_string(opt.type));
  const bool bf16_act = opt.bf16_activations && !quantises_activations(opt.type);
  const GemmKernel* kern =
      opt.kernel != nullptr ? opt.kernel : &active_gemm_kernel(opt.type, bf16_act);
  set_layout(who, kern, opt.type, bf16_act, opt.f16_scales, gated, n, k);
  ext_data_ = nullptr;
  ext_scales_ = nullptr;
  ext_scale_count_ = 0;
  keep_.reset();
  const int64_t P = kern->panel, width = gated ? P / 2 : P;
  const detail::WeightFormat& format = detail::weight_format(type_);
  const detail::PackLayout L = detail::PackedAccess::layout(*this);
  const int64_t plain_bytes = (format.strip_bytes(L) + 63) / 64 * 64;
  // A kernel with its own layout: the format packs into a plain copy, converted per strip.
  const bool own = kern->to_own != nullptr;
  std::vector<uint8_t, xsimd::aligned_allocator<uint8_t, 64>> plain;
  plain.assign(static_cast<size_t>(strips_ * plain_bytes), 0);
  scales_.clear();
  if (format.prepare != nullptr) format.prepare(L, W0, W1, ldw, scales_);
  for (int h = 0; h < (gated ? 2 : 1); ++h)
    for (int64_t r = 0; r < n; ++r) {
      const int64_t s = r / width, j = r % width + h * (P / 2);
      format.pack_column(L, (h == 0 ? W0 : W1) + r * ldw, plain.data() + s * plain_bytes, s, j,
                         scales_);
    }
  if (!own) {
    data_ = std::move(plain);
    return;
  }
  data_.assign(static_cast<size_t>(strips_ * strip_bytes_), 0);
  for (int64_t s = 0; s < strips_; ++s)
    kern->to_own(type_, bf16_act_, k, plain.data() + s * plain_bytes, data_.data() + s * strip_bytes_);
}

void PackedMatrix::set_layout(const char* who, const GemmKernel* kern, WeightType type, bool bf16_act, bool f16_scales,
                              bool gated, int64_t n, int64_t k) {
  MOEKIT_CHECK(gemm_kernel_supported(*kern), who, ": kernel \"", kern->name,
               "\" is compiled in but this CPU cannot run it (kernels it runs: ", names(gemm_kernels()), ")");
  MOEKIT_CHECK(kern->implements(type, bf16_act), who, ": kernel \"", kern->name, "\" does not implement ",
               to_string(type), " weights with ", bf16_act ? "bf16" : "f32", " activations");
  const int64_t P = kern->panel, width = gated ? P / 2 : P;
  MOEKIT_DEBUG_ASSERT(P % 2 == 0 && detail::kFp8Block % P == 0);
  kernel_ = kern;
  n_ = n;
  k_ = k;
  gated_ = gated;
  type_ = type;
  bf16_act_ = bf16_act;
  f16_scales_ = f16_scales;
  strips_ = (n + width - 1) / width;
  const detail::WeightFormat& format = detail::weight_format(type_);
  const int64_t plain_bytes = (format.strip_bytes(detail::PackedAccess::layout(*this)) + 63) / 64 * 64;
  strip_bytes_ = kern->to_own != nullptr ? (kern->own_strip_bytes(type_, bf16_act_, k, P) + 63) / 64 * 64 : plain_bytes;
}

PackedMatrix::Layout PackedMatrix::layout() const {
  return Layout{type_, bf16_act_, f16_scales_, gated_, n_, k_, kernel_ != nullptr ? kernel_->name : ""};
}

PackedMatrix PackedMatrix::view(const Layout& L, const uint8_t* data, size_t data_bytes, const float* scales,
                                size_t scale_count, std::shared_ptr<const void> keep) {
  const char* who = "PackedMatrix::view";
  MOEKIT_CHECK(detail::is_weight_type(L.type), who, ": weight type expected one of kWeightTypes, got enum value ",
               static_cast<int>(L.type));
  MOEKIT_CHECK(L.n >= 1 && L.k >= 1 && L.n <= (int64_t{1} << 31) && L.k <= (int64_t{1} << 31), who,
               ": shape expected in [1, 2^31] each, got [", L.n, ", ", L.k, "]");
  MOEKIT_CHECK(!L.f16_scales || L.type == WeightType::int4 || L.type == WeightType::w4a8, who,
               ": f16_scales expected with int4 or w4a8 weights, got ", to_string(L.type));
  const GemmKernel* kern = nullptr;
  for (const GemmKernel* k : compiled_gemm_kernels())
    if (L.kernel == k->name) kern = k;
  MOEKIT_CHECK(kern != nullptr, who, ": packed for kernel \"", L.kernel, "\", which this build does not have (it has ",
               names(compiled_gemm_kernels()), "); pack the weights again with this build");
  PackedMatrix m;
  m.set_layout(who, kern, L.type, L.bf16_activations && !quantises_activations(L.type), L.f16_scales, L.gated, L.n, L.k);
  const detail::ScaleKind kind = detail::weight_format(L.type).scales;
  const int64_t want_scales = kind == detail::ScaleKind::per_column ? m.strips_ * kern->panel
                              : kind == detail::ScaleKind::fp8_blocks
                                  ? m.strips_ * ((L.k + detail::kFp8Block - 1) / detail::kFp8Block) * 2
                                  : 0;
  MOEKIT_CHECK(data_bytes == static_cast<size_t>(m.strips_ * m.strip_bytes_), who, ": ", to_string(L.type), " [", L.n, ", ",
               L.k, "]", L.gated ? " gated" : "", " packed for ", L.kernel, " expected ", m.strips_ * m.strip_bytes_,
               " bytes, got ", data_bytes);
  MOEKIT_CHECK(scale_count == static_cast<size_t>(want_scales), who, ": expected ", want_scales, " scales, got ",
               scale_count);
  MOEKIT_CHECK(data != nullptr && reinterpret_cast<uintptr_t>(data) % 64 == 0, who,
               ": packed values expected at a 64-byte aligned address");
  MOEKIT_CHECK(scale_count == 0 || (scales != nullptr && reinterpret_cast<uintptr_t>(scales) % alignof(float) == 0), who,
               ": scales expected at a 4-byte aligned address");
  for (size_t i = 0; i < scale_count; ++i)
    MOEKIT_CHECK(std::isfinite(scales[i]), who, ": scale ", i, " expected finite, got ", scales[i]);
  m.ext_data_ = data;
  m.ext_scales_ = scales;
  m.ext_scale_count_ = scale_count;
  m.keep_ = std::move(keep);
  return m;
}

void PackedMatrix::unpack_row(int64_t r, bool up, float* dst) const noexcept {
  const detail::PackLayout L = detail::PackedAccess::layout(*this);
  const int64_t s = r / L.width, j = r % L.width + (gated_ && up ? L.half() : 0);
  const detail::WeightFormat& format = detail::weight_format(type_);
  if (kernel_->from_own == nullptr) {
    format.unpack_column(L, strip_data(s), scales_ptr(), s, j, dst);
    return;
  }
  // The kernel's own layout: back to the format's for this strip (tests and I/O only).
  std::vector<uint8_t> plain(static_cast<size_t>(format.strip_bytes(L)));
  kernel_->from_own(type_, bf16_act_, k_, strip_data(s), plain.data());
  format.unpack_column(L, plain.data(), scales_ptr(), s, j, dst);
}

size_t packed_a_floats(int64_t m, int64_t k) noexcept {
  if (m <= 0) return 0;
  // Whole row tiles of the SIMD kernels (12) and of the AMX kernel (16).
  const auto whole = [&](int64_t tile) { return (std::min(m, detail::kRowChunk) + tile - 1) / tile * tile; };
  const int64_t rows = std::max(whole(detail::kMaxTileRows), whole(detail::kAmxTileRows));
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
    defined(MOEKIT_HAVE_KERNEL_AVX512_VNNI) || defined(MOEKIT_HAVE_KERNEL_AMX)
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
#if defined(MOEKIT_HAVE_KERNEL_AMX)
// The tiles need the CPU's AMX-TILE/BF16/INT8, the OS saving the tile state (XCR0) and Linux
// granting it to the process (asked once; a refusal leaves the kernel out, never SIGILL).
bool has_amx() noexcept {
  const CpuFeatures& f = cpu_features();
  return has_avx512() && f.avx512_bf16 && f.avx512_vnni && f.amx_tile && f.amx_bf16 &&
         f.amx_int8 && f.os_amx && request_amx_permission() == AmxPermission::granted;
}
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
#if defined(MOEKIT_HAVE_KERNEL_AMX)
    {&detail::kGemmAmx, nullptr, has_amx,
     "AVX-512 F, BW, DQ and VL, FMA, AVX512-BF16, AVX512-VNNI, AMX-TILE, AMX-BF16 and AMX-INT8, "
     "and Linux granting the tile state"},
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

void gemm_packed_bias(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, const float* bias, float* C,
                      int64_t ldc, float* a_pack, int64_t strip_begin, int64_t strip_end) noexcept {
  MOEKIT_DEBUG_ASSERT(!W.gated());
  detail::GemmCall c{};
  if (!detail::PackedAccess::describe(W, m, strip_begin, strip_end, c)) return;
  c.A = A;
  c.lda = lda;
  c.out = C;
  c.ldo = ldc;
  c.a_pack = a_pack;
  c.mode = detail::GemmMode::store;
  c.bias = bias;
  W.kernel().run(c);
}

namespace {
void run_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, detail::GemmMode mode, Activation act,
               ClampedSwiglu glu, const float* gate_bias, const float* up_bias, float* H, int64_t ldh, float* a_pack,
               int64_t strip_begin, int64_t strip_end) noexcept {
  MOEKIT_DEBUG_ASSERT(W.gated());
  detail::GemmCall c{};
  if (!detail::PackedAccess::describe(W, m, strip_begin, strip_end, c)) return;
  c.A = A;
  c.lda = lda;
  c.out = H;
  c.ldo = ldh;
  c.a_pack = a_pack;
  c.mode = mode;
  c.act = act;
  c.glu = glu;
  c.bias = gate_bias;
  c.bias_up = up_bias;
  W.kernel().run(c);
}
}  // namespace

void gemm_packed_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                       int64_t ldh, float* a_pack, int64_t strip_begin, int64_t strip_end) noexcept {
  run_gated(m, A, lda, W, detail::GemmMode::gated, act, {}, nullptr, nullptr, H, ldh, a_pack, strip_begin, strip_end);
}

void gemm_packed_gated_bias(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                            const float* gate_bias, const float* up_bias, float* H, int64_t ldh, float* a_pack,
                            int64_t strip_begin, int64_t strip_end) noexcept {
  run_gated(m, A, lda, W, detail::GemmMode::gated, act, {}, gate_bias, up_bias, H, ldh, a_pack, strip_begin,
            strip_end);
}

void gemm_packed_gated_clamped(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, ClampedSwiglu glu,
                               const float* gate_bias, const float* up_bias, float* H, int64_t ldh, float* a_pack,
                               int64_t strip_begin, int64_t strip_end) noexcept {
  run_gated(m, A, lda, W, detail::GemmMode::gated_clamped, Activation::silu, glu, gate_bias, up_bias, H, ldh, a_pack,
            strip_begin, strip_end);
}

void gemm_packed_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act, float* H,
                     int64_t ldh, float* a_pack, int64_t strip_begin, int64_t strip_end, const float* bias) noexcept {
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
  c.bias = bias;
  W.kernel().run(c);
}

}  // namespace moekit::kernels
