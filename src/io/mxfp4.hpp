// SPDX-License-Identifier: Apache-2.0
// Internal: one MXFP4 block (32 e2m1 codes in 16 bytes, one e8m0 scale) to f32, in the two
// nibble orders checkpoints use (HF gpt-oss safetensors, GGUF's block_mxfp4).
#pragma once

#include <cmath>
#include <cstdint>

namespace moekit::detail {

/// How a 16-byte block orders its 32 codes: HF's gpt-oss tensors put element 2j in the low
/// nibble of byte j and 2j + 1 in the high one; GGUF (ggml block_mxfp4, as block_q4_0) puts
/// element j in the low nibble and j + 16 in the high one.
enum class Mxfp4Order { pairs, halves };

/// The 32 values of one block: e2m1 codes (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, bit 3 the sign)
/// times 2^(scale - 127), exact in f32; a non-zero code under a scale byte of 255 (OCP's NaN
/// scale) or large enough to overflow gives an infinity.
inline void mxfp4_block_to_f32(const uint8_t* bytes, uint8_t scale, Mxfp4Order order, float* out) noexcept {
  static constexpr float kE2m1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  float lut[16];  // ldexp per code: 0 stays 0 where 2^(scale - 127) alone would overflow
  for (int c = 0; c < 16; ++c) lut[c] = std::ldexp(kE2m1[c], static_cast<int>(scale) - 127);
  for (int j = 0; j < 16; ++j) {
    const float lo = lut[bytes[j] & 0x0F], hi = lut[bytes[j] >> 4];
    if (order == Mxfp4Order::pairs) {
      out[2 * j] = lo;
      out[2 * j + 1] = hi;
    } else {
      out[j] = lo;
      out[j + 16] = hi;
    }
  }
}

}  // namespace moekit::detail
