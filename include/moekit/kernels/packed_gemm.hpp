// SPDX-License-Identifier: Apache-2.0
// GEMM against weights packed once at load time, in f32 or reduced precision, on the best
// kernel the CPU supports (chosen at run time; compiled in src/packed_gemm.cpp, src/kernels/).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>
#include <xsimd/xsimd.hpp>

#include "moekit/activation.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::kernels {

class PackedMatrix;
struct GemmKernel;
namespace detail {
struct GemmCall;
struct PackedAccess;
}  // namespace detail

/// How a packed weight matrix stores its values (all kernels compute in f32 or exact int32).
///  - f32:  as given.
///  - bf16: rounded to bfloat16 (round to nearest even), widened to f32 in the kernel.
///  - int8: symmetric int8 per output channel (scale = max|w_row| / 127), weight-only: the
///          kernel multiplies f32 activations by the widened int8 values, scales in the epilogue.
///  - w8a8: int8 weights as `int8`, and each row of activations quantised on the fly to
///          symmetric int8 (scale = max|a_row| / 127); exact int32 dot products, both scales
///          applied in the epilogue.
///  - int4: 4-bit codes in groups of 32 depths per output column, GGUF Q4_0's grid: each group
///          has a bf16 scale d = m / -8 (m: the group's value of largest finite magnitude,
///          with its sign; d rounded to bf16, or to f16 with PackOptions::f16_scales, Q4_0's
///          own storage) and codes q = clamp(round(w / d), -8, 7), so a weight is q * d; 4.5
///          bits per weight. The kernels widen the codes in registers (decode) or into L1
///          (prefill).
///  - int4zp: 4-bit codes with a zero point, GPTQ's quantiser (AutoGPTQ / gptq `quant.py`,
///          as AWQ stores it): per group of 32 depths and column, the range [min(w, 0),
///          max(w, 0)] of the finite values gives d = (max - min) / 15 (rounded to bf16),
///          z = round(-min / d) in [0, 15] and q = clamp(round(w / d) + z, 0, 15), so a
///          weight is (q - z) * d; 4.75 bits per weight (a bf16 scale and a byte of zero
///          point per 32). Computed as int4.
///  - w4a8: int4's weights (the same codes and scales, 4.5 bits per weight), and each row of
///          activations quantised on the fly per group of 32 depths to symmetric int8 (GGUF
///          Q8_0's grid with an f32 scale: d_a = max|a_group| / 127, codes as w8a8's): exact
///          int32 sums per group, then per group g in order
///          `c = fma(float(sum_g), d_w * d_a, c)` (d_w * d_a rounded to f32), from c = 0. What
///          llama.cpp computes for Q4_0 weights on a CPU (Q4_0 x Q8_0), summed in this order.
///  - ternary: codes {-1, 0, +1} with one f32 scale per output column (MoTE's ternary experts,
///          BitNet b1.58's grid): the scale is the mean |w| of the column's finite values
///          (absmean), or m when every finite non-zero value of the column is +-m (an already
///          ternary column packs back exactly), and q = clamp(round(w / scale), -1, 1), so a
///          weight is q * scale; 2 bits per weight plus 32 bits per column. Weight-only: f32
///          (or bf16-rounded) activations times the codes, the scale in the epilogue, as int8.
///  - fp8:  FP8 e4m3 (OCP, max 448) with one f32 scale per 128 x 128 block of `[n, k]`
///          (scale = max|w_block| / 448; DeepSeek-V3's `weight_scale_inv` layout); for a gated
///          pair the gate and up matrices each have their own block grid.
/// Rounding is to nearest even everywhere. Scales use the largest finite magnitude; an
/// all-zero row / block gets scale 0. bf16 keeps NaN and infinities; int8, int4 and fp8 store
/// NaN as 0 and saturate infinities to the extreme code.
enum class WeightType : uint8_t { f32, bf16, int8, w8a8, fp8, int4, int4zp, w4a8, ternary };

/// Every weight type, in enum order (the one list tools and tests iterate).
inline constexpr WeightType kWeightTypes[] = {WeightType::f32,  WeightType::bf16, WeightType::int8,
                                              WeightType::w8a8, WeightType::fp8,  WeightType::int4,
                                              WeightType::int4zp, WeightType::w4a8, WeightType::ternary};

/// Whether activations of this type are quantised to int8 inside the GEMM (w8a8, w4a8): then
/// PackOptions::bf16_activations does not apply.
constexpr bool quantises_activations(WeightType t) noexcept {
  return t == WeightType::w8a8 || t == WeightType::w4a8;
}

/// "f32", "bf16", "int8", "w8a8", "fp8", "int4", "int4zp", "w4a8", "ternary".
const char* to_string(WeightType t) noexcept;
/// Parses the names above; throws moekit::error naming the accepted ones.
WeightType parse_weight_type(std::string_view name);
/// Bits per stored weight value (32, 16, 8, 8, 8, 4, 4, 4, 2), scales and zero points not
/// counted.
int64_t weight_type_bits(WeightType t) noexcept;
/// Bytes per stored weight value rounded up (4, 2, 1, 1, 1, and 1 for the 4- and 2-bit types);
/// weight_type_bits() is exact.
int64_t weight_type_bytes(WeightType t) noexcept;

/// How to pack a matrix.
struct PackOptions {
  WeightType type = WeightType::f32;
  /// Round every activation (the A operand) to bf16 before it is multiplied (what a bf16
  /// engine computes); accumulation stays f32. Ignored for w8a8 and w4a8 (activations are
  /// int8).
  /// With bf16 weights ("bf16 x bf16", what vdpbf16ps computes) every product is exact in f32
  /// and each output sums the depths in pairs, the odd depth first: for q = 0, 1, ...
  /// `c = (c + a[2q+1] w[2q+1]) + a[2q] w[2q]` (one rounding each; an odd k gets a zero
  /// pad), on every kernel, so they agree bit for bit; on the AVX512-BF16 kernel denormal
  /// inputs and sums are flushed to zero (as the instruction does), elsewhere they are kept.
  bool bf16_activations = false;
  /// Kernel to pack for (one this CPU supports and that implements the format, else pack()
  /// throws); null = active_gemm_kernel(type, bf16_activations).
  const GemmKernel* kernel = nullptr;
  /// int4 and w4a8 only: store each group's scale as f16 (GGUF Q4_0's storage) instead of
  /// bf16. The scale is then `m / -8` rounded to f16, so weights that came from Q4_0 blocks
  /// (dequantised) are packed back into the same scales and codes exactly, and compute as
  /// llama.cpp's Q4_0 does.
  bool f16_scales = false;
};

/// One compiled implementation of the packed GEMMs (a row of the run-time kernel table).
/// `panel` is the strip width its packing uses; a PackedMatrix remembers the kernel that
/// packed it and always runs on it. A general kernel implements every weight type; a
/// specialised one (a bf16 dot-product or VNNI kernel) only the formats `implements` accepts,
/// and the table chooses per format (see active_gemm_kernel(WeightType, bool)).
struct GemmKernel {
  const char* name;   ///< "scalar", the xsimd arch of a general SIMD kernel ("fma3+avx2",
                      ///< "avx512bw"), or a specialised kernel's ISA ("avx512_bf16", "avx512_vnni")
  int64_t panel;      ///< output columns per packed strip
  int64_t tile_rows;  ///< rows of its register tile (1 for the scalar kernel)
  /// Runs one GEMM (every format it implements, every epilogue); internal, use gemm_packed().
  void (*run)(const detail::GemmCall& call) noexcept;
  /// Whether it computes weights of `type` with activations rounded to bf16 or not.
  bool (*implements)(WeightType type, bool bf16_activations) noexcept;
  /// w8a8 and w4a8 packing: int8 depths per 32-bit lane, 2 (int16 pairs, vpmaddwd) or 4
  /// (VNNI: w8a8 weights stored + 128 as unsigned bytes for vpdpbusd).
  int int8_group = 2;
  /// bf16 weights with bf16 activations: depth pairs interleaved per column (`[k/2, panel, 2]`,
  /// the operand layout of vdpbf16ps) rather than `[k, panel]` with each pair's rows swapped.
  bool bf16_pairs = false;
  /// bf16 weights with bf16 activations stored plain, `[k, panel]` in depth order (a library
  /// kernel that sums in its own order); overrides bf16_pairs.
  bool bf16_plain = false;
  /// Plain GEMMs equal the scalar kernel's bit for bit (every moekit kernel: they sum each
  /// output sequentially over k). False for a library kernel (oneDNN), which sums in its own
  /// order: its f32 and bf16 results agree within float rounding, its w8a8 ones exactly
  /// (integer sums).
  bool bit_exact = true;
  /// A kernel that keeps its strips in a layout of its own (a library's blocked weights):
  /// the bytes of one strip (type, bf16 activations, depth k, panel), and the conversion of
  /// one strip from the format's layout to its own and back. Null: the format's layout.
  /// `to_own` may throw moekit::error (packing reports it).
  int64_t (*own_strip_bytes)(WeightType type, bool bf16_act, int64_t k, int64_t panel) = nullptr;
  void (*to_own)(WeightType type, bool bf16_act, int64_t k, const uint8_t* plain,
                 uint8_t* own) = nullptr;
  void (*from_own)(WeightType type, bool bf16_act, int64_t k, const uint8_t* own,
                   uint8_t* plain) noexcept = nullptr;
};

/// The kernels compiled into this build that this CPU can run, in table order: the portable
/// scalar one always, then the general SIMD ones (AVX2+FMA, AVX-512), then the specialised
/// ones (AVX512-VNNI, AVX512-BF16), those whose instructions the CPU supports (CPUID, checked
/// once).
const std::vector<const GemmKernel*>& gemm_kernels() noexcept;

/// Every kernel compiled into this build, supported by this CPU or not (for `moekit info`).
const std::vector<const GemmKernel*>& compiled_gemm_kernels() noexcept;

/// Whether this CPU can run `kernel` (false for a compiled-in kernel whose instruction set it
/// lacks).
bool gemm_kernel_supported(const GemmKernel& kernel) noexcept;

/// What the CPU needs to run `kernel` (for messages and `moekit info`), e.g. "AVX2, FMA and F16C".
const char* gemm_kernel_needs(const GemmKernel& kernel) noexcept;

/// The general kernel (one that implements every format): the one f32 matrices use and whose
/// row kernels (kernels/vector.hpp) run. The fastest general kernel this CPU supports (the
/// table is ordered by measured speed, not by the age of the instruction set), within what
/// the environment variable MOEKIT_KERNEL allows (read once): "scalar", "simd" (every SIMD
/// kernel) or a comma-separated list of kernel names; a list naming only specialised
/// kernels extends the fastest general one. Throws moekit::error for an unknown name or a
/// kernel this CPU cannot run.
const GemmKernel& active_gemm_kernel();

/// The kernel new matrices of weight type `type` use (with activations rounded to bf16 when
/// `bf16_activations`): the last kernel of the table that this CPU runs, that MOEKIT_KERNEL
/// allows and that implements that format (a general kernel always does). On a CPU with
/// AVX512-BF16 the bf16 x bf16 format runs on "avx512_bf16", with AVX512-VNNI w8a8 and w4a8 on
/// "avx512_vnni"; the rest on active_gemm_kernel(). Throws as active_gemm_kernel() does.
const GemmKernel& active_gemm_kernel(WeightType type, bool bf16_activations = false);

/// Why active_gemm_kernel(type, bf16_activations) is the kernel it is, in one sentence.
std::string gemm_kernel_reason(WeightType type, bool bf16_activations = false);

/// Whether the table gives `kernel` the format (when it implements it) without MOEKIT_KERNEL
/// naming it: true for moekit's own kernels; for a library kernel (oneDNN) only where it is
/// expected to beat them (bf16 x bf16 with AMX-BF16, w8a8 with AMX-INT8, AMX granted).
bool gemm_kernel_by_default(const GemmKernel& kernel, WeightType type,
                            bool bf16_activations) noexcept;

/// Whether `kernel` implements weights of `type` with (or without) bf16 activations.
bool gemm_kernel_implements(const GemmKernel& kernel, WeightType type,
                            bool bf16_activations) noexcept;

/// A weight matrix `W [n, k]` (HF `[out, in]` layout) repacked for gemm_packed(): strips of
/// `panel()` output columns, each stored k-major (`[k, panel]`; w8a8 interleaves groups of 2
/// or 4 depths, bf16 x bf16 pairs, as the kernel packing it needs), zero-padded past n. A gated pair (gate, up) packs into one matrix whose strips hold
/// `panel()/2` gate columns followed by the same `panel()/2` up columns, so the activation
/// fuses into the GEMM epilogue.
/// Packing happens once; the packed copy replaces the HF-layout one.
class PackedMatrix {
 public:
  /// Output columns per strip (two SIMD registers for the SIMD kernel).
  [[nodiscard]] int64_t panel() const noexcept { return kernel_ ? kernel_->panel : 0; }
  /// The kernel this matrix was packed for (and runs on).
  [[nodiscard]] const GemmKernel& kernel() const noexcept { return *kernel_; }

  PackedMatrix() = default;
  /// Packs `W [n, k]` with row stride ldw (f32 values), stored as `opt.type`.
  void pack(const float* W, int64_t n, int64_t k, int64_t ldw, const PackOptions& opt = {});
  /// Packs gate and up projections `G, U [f, k]` (row stride ldw) interleaved per strip.
  void pack_gated(const float* G, const float* U, int64_t f, int64_t k, int64_t ldw,
                  const PackOptions& opt = {});
  /// Recovers row r (an output column) of the original matrix, of the gate half for gated
  /// packing when `up` is false, of the up half when true: `[k]` into dst (for tests, I/O).
  /// For reduced types these are the dequantised values the kernel multiplies by.
  void unpack_row(int64_t r, bool up, float* dst) const noexcept;

  [[nodiscard]] WeightType weight_type() const noexcept { return type_; }
  [[nodiscard]] bool bf16_activations() const noexcept { return bf16_act_; }
  /// int4 / w4a8: group scales stored as f16 (PackOptions::f16_scales).
  [[nodiscard]] bool f16_scales() const noexcept { return f16_scales_; }
  /// Output columns one strip covers (panel(), or panel()/2 for gated matrices).
  [[nodiscard]] int64_t strip_columns() const noexcept { return gated_ ? panel() / 2 : panel(); }

  [[nodiscard]] int64_t n() const noexcept { return n_; }  ///< output columns (f for gated)
  [[nodiscard]] int64_t k() const noexcept { return k_; }
  [[nodiscard]] bool gated() const noexcept { return gated_; }
  [[nodiscard]] int64_t strips() const noexcept { return strips_; }
  /// Packed values of strip s (`[k, panel]`, of weight_type_bytes() each; w8a8 interleaves
  /// pairs of k), 64-byte aligned.
  [[nodiscard]] const uint8_t* strip_data(int64_t s) const noexcept {
    return data_ptr() + s * strip_bytes_;
  }
  /// Strip s as f32 values (`[k, panel]`); for f32 matrices only.
  [[nodiscard]] const float* strip(int64_t s) const noexcept {
    return reinterpret_cast<const float*>(strip_data(s));
  }
  /// Bytes this matrix holds: packed values plus scales (the resident weight memory).
  [[nodiscard]] size_t bytes() const noexcept {
    return packed_data().size() + packed_scales().size() * sizeof(float);
  }

  /// Bytes from one strip to the next (a multiple of 64).
  [[nodiscard]] int64_t strip_bytes() const noexcept { return strip_bytes_; }
  /// The packed values (`strips() * strip_bytes()` bytes, 64-byte aligned) and the f32 scales
  /// the kernels read (one per packed column for int8 / w8a8 / ternary, one per fp8 block; empty for the
  /// other formats): what `moekit pack` saves, for view().
  [[nodiscard]] std::span<const uint8_t> packed_data() const noexcept {
    return ext_data_ != nullptr ? std::span<const uint8_t>(ext_data_, static_cast<size_t>(strips_ * strip_bytes_))
                                : std::span<const uint8_t>(data_.data(), data_.size());
  }
  [[nodiscard]] std::span<const float> packed_scales() const noexcept {
    return ext_data_ != nullptr ? std::span<const float>(ext_scales_, ext_scale_count_)
                                : std::span<const float>(scales_.data(), scales_.size());
  }
  /// False for a view(): the values live in memory the matrix only points into.
  [[nodiscard]] bool owns_data() const noexcept { return ext_data_ == nullptr; }

  /// What a packed matrix is besides its bytes: enough to view saved bytes again.
  struct Layout {
    WeightType type = WeightType::f32;
    bool bf16_activations = false;  ///< as bf16_activations() (false for w8a8 / w4a8)
    bool f16_scales = false;
    bool gated = false;
    int64_t n = 0, k = 0;
    std::string kernel;  ///< the name of the kernel it was packed for (GemmKernel::name)
  };
  [[nodiscard]] Layout layout() const;

  /// A matrix over values and scales saved from a matrix of layout `L` (its packed_data() and
  /// packed_scales(), e.g. in a file `moekit pack` wrote, memory-mapped): used where they
  /// are, nothing copied or repacked. `data` must be 64-byte aligned and hold exactly the
  /// bytes such a matrix has, `scales` exactly its scale count, all finite; `L.kernel` must
  /// be a kernel this build has and this CPU runs (packed layouts differ between kernels).
  /// `keep` keeps the memory alive for as long as any copy of the matrix lives. Throws
  /// moekit::error naming what does not match.
  static PackedMatrix view(const Layout& L, const uint8_t* data, size_t data_bytes, const float* scales,
                           size_t scale_count, std::shared_ptr<const void> keep);

 private:
  friend struct detail::PackedAccess;
  const uint8_t* data_ptr() const noexcept { return ext_data_ != nullptr ? ext_data_ : data_.data(); }
  const float* scales_ptr() const noexcept { return ext_data_ != nullptr ? ext_scales_ : scales_.data(); }
  // Kernel, shape and strips of a matrix about to be packed or viewed (checked).
  void set_layout(const char* who, const GemmKernel* kern, WeightType type, bool bf16_act, bool f16_scales, bool gated,
                  int64_t n, int64_t k);
  void pack_impl(const float* W0, const float* W1, int64_t n, int64_t k, int64_t ldw, bool gated,
                 const PackOptions& opt);

  int64_t n_ = 0, k_ = 0, strips_ = 0;
  int64_t strip_bytes_ = 0;  // bytes from one strip to the next (a multiple of 64)
  bool gated_ = false;
  WeightType type_ = WeightType::f32;
  bool bf16_act_ = false;
  bool f16_scales_ = false;
  const GemmKernel* kernel_ = nullptr;
  std::vector<uint8_t, xsimd::aligned_allocator<uint8_t, 64>> data_;
  // int8 / w8a8 / ternary: one scale per packed column ([strips, panel]); fp8: one per
  // (strip, k block, strip half) ([strips, k_blocks, 2]); empty otherwise.
  std::vector<float> scales_;
  // view(): the values and scales elsewhere, kept alive by keep_.
  const uint8_t* ext_data_ = nullptr;
  const float* ext_scales_ = nullptr;
  size_t ext_scale_count_ = 0;
  std::shared_ptr<const void> keep_;
};

/// Floats of scratch the GEMMs below need in `a_pack` for m rows of depth k, for any weight
/// type (they repack, and for w8a8 quantise, A into row tiles; the caller owns the memory so
/// the hot path allocates nothing).
size_t packed_a_floats(int64_t m, int64_t k) noexcept;

/// The GEMMs below compute the output columns of strips [strip_begin, strip_end) of W only
/// (strip_end < 0: to the last strip; strip s covers columns [s, s + 1) x strip_columns()),
/// so threads can split one matrix's columns (decode). Columns outside the range are not
/// written. They run on W's kernel. Every output is summed sequentially over k, so results do
/// not depend on m, on how rows or strips are split between calls, or on the thread count.

/// `C[m, n] = A[m, k] W^T` (or `+=` with accumulate) for plain packed W; A, C row-major.
void gemm_packed(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, float* C,
                 int64_t ldc, float* a_pack, bool accumulate = false, int64_t strip_begin = 0,
                 int64_t strip_end = -1) noexcept;

/// `H[m, f] = act(A G^T) * (A U^T)` for gated packed (G, U): the SwiGLU / GeGLU first half.
void gemm_packed_gated(int64_t m, const float* A, int64_t lda, const PackedMatrix& W,
                       Activation act, float* H, int64_t ldh, float* a_pack,
                       int64_t strip_begin = 0, int64_t strip_end = -1) noexcept;

/// `C[m, n] = A W^T + bias` (bias `[n]` added to every row; null = gemm_packed) for plain W.
void gemm_packed_bias(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, const float* bias, float* C,
                      int64_t ldc, float* a_pack, int64_t strip_begin = 0, int64_t strip_end = -1) noexcept;
/// gemm_packed_gated with biases added to the gate and up sums first (`[f]` each, null = none).
void gemm_packed_gated_bias(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                            const float* gate_bias, const float* up_bias, float* H, int64_t ldh, float* a_pack,
                            int64_t strip_begin = 0, int64_t strip_end = -1) noexcept;
/// `H[m, f] = clamped_swiglu(A G^T + gate_bias, A U^T + up_bias)` for gated packed (G, U):
/// gpt-oss's expert first half (activation.hpp ClampedSwiglu); null biases are zero.
void gemm_packed_gated_clamped(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, ClampedSwiglu glu,
                               const float* gate_bias, const float* up_bias, float* H, int64_t ldh, float* a_pack,
                               int64_t strip_begin = 0, int64_t strip_end = -1) noexcept;
/// `H[m, n] = act(A W^T + bias)` for plain packed W (a non-gated FFN's first half; bias `[n]`,
/// null = none).
void gemm_packed_act(int64_t m, const float* A, int64_t lda, const PackedMatrix& W, Activation act,
                     float* H, int64_t ldh, float* a_pack, int64_t strip_begin = 0,
                     int64_t strip_end = -1, const float* bias = nullptr) noexcept;

}  // namespace moekit::kernels
#pragma GCC visibility pop
