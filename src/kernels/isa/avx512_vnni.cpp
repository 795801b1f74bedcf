// SPDX-License-Identifier: Apache-2.0
// w8a8 on AVX512-VNNI (vpdpbusd: 4 byte products summed into each int32 lane, 64 multiply-adds
// per instruction against vpmaddwd's 32 plus an add), 12 x 32 register tile (w4a8: 6 x 32). A
// specialised kernel: it implements w8a8 and w4a8 only; the table runs every other format on the general AVX-512
// kernel. Compiled with -mavx512vnni on top of the AVX-512 flags (see CMakeLists.txt), run only
// on CPUs that report AVX512-VNNI.
//
// vpdpbusd multiplies unsigned by signed bytes, so the weights are stored + 128 (1..255) and
// each activation row's 128 * (sum of its codes) is subtracted in the epilogue. Sums wrap
// modulo 2^32 on the way (vpdpbusd does not saturate) and the true sum fits int32 (k is
// bounded at packing), so the result is the exact int32 sum, identical to the other kernels'.
// w4a8 needs no offset: its codes are unsigned nibbles already (q + 8), and each group's sum
// starts at -8 * (the sum of the group's activation codes).
#include "avx512_ops.hpp"

#if !defined(__AVX512VNNI__)
#error "avx512_vnni.cpp must be compiled with -mavx512vnni (and the AVX-512 flags)"
#endif

namespace moekit::kernels::detail {
namespace {

template <>
struct IsaOps<Avx512> : Avx512Ops {
  static constexpr int kInt8Group = 4;
  // acc + sum over the 4 bytes of each lane of u8(b) * s8(a), wrapping. Inline assembly with
  // the accumulator tied ("+v"): with _mm512_dpbusd_epi32, GCC 12 copied every accumulator
  // out and back and spilled it to the stack on each step (0.75x the bf16 kernel's speed).
  static __m512i dpbusd(__m512i acc, __m512i b, __m512i a) noexcept {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(a));
    return acc;
  }
};

bool implements_int8_dot(WeightType type, bool) noexcept {
  return type == WeightType::w8a8 || type == WeightType::w4a8;
}

}  // namespace

extern const GemmKernel kGemmAvx512Vnni;
const GemmKernel kGemmAvx512Vnni{"avx512_vnni",
                                 SimdGemm<Avx512>::P,
                                 IsaOps<Avx512>::kTileRows,
                                 &SimdGemm<Avx512>::run_quantised,
                                 &implements_int8_dot,
                                 4,
                                 false};

}  // namespace moekit::kernels::detail
