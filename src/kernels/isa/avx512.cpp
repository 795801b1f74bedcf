// SPDX-License-Identifier: Apache-2.0
// The packed GEMM and the row kernels for AVX-512 (F, BW, DQ, VL): 12 x 32 register tile. Compiled with
// AVX-512 flags only (see CMakeLists.txt) and run only on CPUs that report them.
#include "avx512_ops.hpp"
#include "../simd_rows.hpp"

namespace moekit::kernels::detail {
namespace {

template <>
struct IsaOps<Avx512> : Avx512Ops {};

}  // namespace

extern const GemmKernel kGemmAvx512;
const GemmKernel kGemmAvx512{Avx512::name(), SimdGemm<Avx512>::P, IsaOps<Avx512>::kTileRows,
                             &SimdGemm<Avx512>::run, &implements_all};

extern const RowKernels kRowsAvx512;
constinit const RowKernels kRowsAvx512 = SimdRows<Avx512>::table(Avx512::name());

}  // namespace moekit::kernels::detail
