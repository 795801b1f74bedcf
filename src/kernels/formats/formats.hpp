// SPDX-License-Identifier: Apache-2.0
// The weight formats of the packed GEMM: one row per WeightType in the table of
// src/kernels/formats/table.cpp, each defined in its own unit here (how many bytes a strip
// takes, the scales computed from the whole matrix, how one column is packed and unpacked).
// PackedMatrix does the rest in one place (checks, kernel choice, the loop over columns), so
// adding a format is one unit here, one table row, and the kernels that implement it.
// Private: compiled with the generic flags, never included by the per-ISA units.
#pragma once

#include <cstdint>
#include <vector>

#include "../gemm_internal.hpp"

namespace moekit::kernels::detail {

/// Where a packed matrix's values go: the matrix, its strips and the packing kernel's layout
/// choices.
struct PackLayout {
  int64_t n, k;        ///< the original matrix `[n, k]` (each half of a gated pair)
  int64_t panel;       ///< P: packed columns per strip
  int64_t width;       ///< output columns per strip: P, or P / 2 for a gated pair
  int64_t strips;
  bool gated;          ///< strips hold P/2 gate columns then the same P/2 up columns
  bool bf16_act;       ///< activations rounded to bf16 (bf16 x bf16 layouts)
  const GemmKernel* kernel;  ///< its int8_group, bf16_pairs, bf16_plain
  bool f16_scales = false;   ///< int4 / w4a8: group scales as f16 (PackOptions::f16_scales)

  [[nodiscard]] int64_t half() const noexcept { return panel / 2; }
};

/// Which scales the kernels read (GemmCall::col_scale or fp8_scale).
enum class ScaleKind : uint8_t {
  none,         ///< none, or inside the strips (4-bit group scales)
  per_column,   ///< one f32 per packed column, `[strips, P]`
  fp8_blocks,   ///< one f32 per (strip, 128-deep block, strip half), `[strips, k_blocks, 2]`
};

struct WeightFormat {
  WeightType type;
  const char* name;
  int bits;  ///< per stored value, scales and zero points not counted
  ScaleKind scales;
  /// Bytes of one strip's values (PackedMatrix rounds it up to 64).
  int64_t (*strip_bytes)(const PackLayout& L) noexcept;
  /// Sizes and fills `scales` from the whole matrix before any column is packed (W1: the up
  /// half of a gated pair; rows `ldw` apart); null for a format whose scales come per column.
  void (*prepare)(const PackLayout& L, const float* W0, const float* W1, int64_t ldw,
                  std::vector<float>& scales);
  /// Packs one original row `src[0, k)` as packed column j of strip s (its bytes at S,
  /// zero-filled before), setting its per-column scale if the format has one.
  void (*pack_column)(const PackLayout& L, const float* src, uint8_t* S, int64_t s, int64_t j,
                      std::vector<float>& scales) noexcept;
  /// The values the kernels multiply packed column j of strip s by: `[k]` into dst.
  void (*unpack_column)(const PackLayout& L, const uint8_t* S, const float* scales, int64_t s,
                        int64_t j, float* dst) noexcept;
};

/// The format of `t` (t one of kWeightTypes).
const WeightFormat& weight_format(WeightType t) noexcept;

/// Whether `t` is a valid enum value (one of kWeightTypes).
bool is_weight_type(WeightType t) noexcept;

}  // namespace moekit::kernels::detail
