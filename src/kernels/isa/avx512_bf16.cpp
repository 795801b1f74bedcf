// SPDX-License-Identifier: Apache-2.0
// bf16 weights x bf16 activations on AVX512-BF16 (vdpbf16ps: 32 multiply-adds per instruction,
// twice the f32 FMA's), 12 x 32 register tile. A specialised kernel: it implements that one
// format; the table runs every other one on the general AVX-512 kernel. Compiled with
// -mavx512bf16 on top of the AVX-512 flags (see CMakeLists.txt), run only on CPUs that report
// AVX512-BF16.
//
// vdpbf16ps adds, per 32-bit lane, the product of the odd bf16 pair elements, then that of the
// even ones, each rounded to nearest even (the products are exact in f32), with denormal
// inputs and results flushed to zero; checked on AMD Zen 5 against that order bit for bit
// (tests/test_kernels_dtype.cpp compares it with the scalar kernel, which sums in that order).
#include "avx512_ops.hpp"

#if !defined(__AVX512BF16__)
#error "avx512_bf16.cpp must be compiled with -mavx512bf16 (and the AVX-512 flags)"
#endif

namespace moekit::kernels::detail {
namespace {

template <>
struct IsaOps<Avx512> : Avx512Ops {
  // acc + b.odd * a.odd + b.even * a.even per lane, in that order.
  static __m512 dpbf16(__m512 acc, __m512i b, __m512i a) noexcept {
    return _mm512_dpbf16_ps(acc, (__m512bh)b, (__m512bh)a);
  }
};

bool implements_bf16_pairs(WeightType type, bool bf16_activations) noexcept {
  return type == WeightType::bf16 && bf16_activations;
}

}  // namespace

extern const GemmKernel kGemmAvx512Bf16;
const GemmKernel kGemmAvx512Bf16{"avx512_bf16",
                                 SimdGemm<Avx512>::P,
                                 IsaOps<Avx512>::kTileRows,
                                 &SimdGemm<Avx512>::run_dpbf16,
                                 &implements_bf16_pairs,
                                 2,
                                 true};

}  // namespace moekit::kernels::detail
