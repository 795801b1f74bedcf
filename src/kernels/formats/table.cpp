// SPDX-License-Identifier: Apache-2.0
// The table of weight formats, one row per WeightType in enum order.
#include <iterator>

#include "formats.hpp"

namespace moekit::kernels::detail {

extern const WeightFormat kFormatF32, kFormatBf16, kFormatInt8, kFormatW8a8, kFormatFp8,
    kFormatInt4, kFormatInt4zp, kFormatW4a8, kFormatTernary;

namespace {

const WeightFormat* const kFormats[] = {&kFormatF32,  &kFormatBf16, &kFormatInt8,
                                        &kFormatW8a8, &kFormatFp8,  &kFormatInt4,
                                        &kFormatInt4zp, &kFormatW4a8, &kFormatTernary};
static_assert(std::size(kFormats) == std::size(kWeightTypes),
              "one format per weight type, in enum order");

}  // namespace

bool is_weight_type(WeightType t) noexcept {
  return static_cast<size_t>(t) < std::size(kFormats);
}

const WeightFormat& weight_format(WeightType t) noexcept {
  return *kFormats[is_weight_type(t) ? static_cast<size_t>(t) : 0];
}

}  // namespace moekit::kernels::detail
