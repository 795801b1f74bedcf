// SPDX-License-Identifier: Apache-2.0
// Which GEMM kernel this build of moekit runs (see kernels/packed_gemm.hpp).
#pragma once

namespace moekit::kernels {

/// Name of the expert GEMM kernel in use, e.g. "packed-6x16-avx2" (for `moekit info`).
const char* gemm_backend() noexcept;

}  // namespace moekit::kernels
