// SPDX-License-Identifier: Apache-2.0
// Which GEMM kernel this build of moekit runs (see kernels/packed_gemm.hpp).
#pragma once

#include <cstdint>
#include <string>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::kernels {

enum class WeightType : uint8_t;

/// Name of the general expert GEMM kernel in use (f32 weights), e.g. "packed-6x16-fma3+avx2"
/// (for `moekit info`).
const char* gemm_backend() noexcept;

/// The same for the kernel experts of weight type `type` (with bf16 activations or not) run
/// on, e.g. "packed-12x32-avx512_bf16"; throws moekit::error for an invalid MOEKIT_KERNEL.
std::string gemm_backend(WeightType type, bool bf16_activations);

}  // namespace moekit::kernels
#pragma GCC visibility pop
