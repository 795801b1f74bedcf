// SPDX-License-Identifier: Apache-2.0
// GGUF files for the tests (tests/support: one place for helpers): a writer of the file layout
// (ggml-org/ggml docs/gguf.md and src/gguf.cpp at d99724f: magic, version 3, i64 counts,
// key / value pairs, tensor infos, data aligned to 32), the reference quantisers of
// ggml-quants.c (quantize_row_q4_0_ref, quantize_row_q8_0_ref, same commit) and a per-element
// reference dequantiser written from ggml-common.h's block layouts.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moekit/io/safetensors.hpp"

namespace moekit_test {

/// ggml type numbers the tests write.
constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14, kBF16 = 30, kMXFP4 = 39;

struct GgufKv {
  std::string key;
  uint32_t type;               // gguf_type
  std::vector<uint8_t> value;  // the encoded value
};

struct GgufOut {
  std::string name;
  uint32_t type;  // ggml_type
  std::vector<int64_t> ne;
  std::vector<uint8_t> data;
};

namespace gguf_detail {
template <class T>
void put(std::vector<uint8_t>& b, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  b.insert(b.end(), p, p + sizeof(T));
}
inline void put_str(std::vector<uint8_t>& b, const std::string& s) {
  put<uint64_t>(b, s.size());
  b.insert(b.end(), s.begin(), s.end());
}
}  // namespace gguf_detail

inline GgufKv kv_u32(std::string k, uint32_t v) {
  GgufKv kv{std::move(k), 4, {}};
  gguf_detail::put(kv.value, v);
  return kv;
}
inline GgufKv kv_f32(std::string k, float v) {
  GgufKv kv{std::move(k), 6, {}};
  gguf_detail::put(kv.value, v);
  return kv;
}
inline GgufKv kv_bool(std::string k, bool v) { return GgufKv{std::move(k), 7, {static_cast<uint8_t>(v)}}; }
inline GgufKv kv_str(std::string k, const std::string& v) {
  GgufKv kv{std::move(k), 8, {}};
  gguf_detail::put_str(kv.value, v);
  return kv;
}
/// An array of strings (as a tokenizer's vocabulary), which a reader must walk past.
inline GgufKv kv_str_array(std::string k, const std::vector<std::string>& v) {
  GgufKv kv{std::move(k), 9, {}};
  gguf_detail::put<uint32_t>(kv.value, 8);
  gguf_detail::put<uint64_t>(kv.value, v.size());
  for (const auto& s : v) gguf_detail::put_str(kv.value, s);
  return kv;
}

/// The bytes of a GGUF v3 file with these key / value pairs and tensors, data aligned to 32.
inline std::vector<std::byte> gguf_bytes(const std::vector<GgufKv>& kvs, const std::vector<GgufOut>& tensors) {
  using namespace gguf_detail;
  std::vector<uint8_t> b = {'G', 'G', 'U', 'F'};
  put<uint32_t>(b, 3);
  put<int64_t>(b, static_cast<int64_t>(tensors.size()));
  put<int64_t>(b, static_cast<int64_t>(kvs.size()));
  for (const auto& kv : kvs) {
    put_str(b, kv.key);
    put<uint32_t>(b, kv.type);
    b.insert(b.end(), kv.value.begin(), kv.value.end());
  }
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    put_str(b, t.name);
    put<uint32_t>(b, static_cast<uint32_t>(t.ne.size()));
    for (int64_t n : t.ne) put<int64_t>(b, n);
    put<uint32_t>(b, t.type);
    put<uint64_t>(b, offset);
    offset += (t.data.size() + 31) / 32 * 32;
  }
  b.resize((b.size() + 31) / 32 * 32, 0);
  for (const auto& t : tensors) {
    b.insert(b.end(), t.data.begin(), t.data.end());
    b.resize(b.size() + (32 - t.data.size() % 32) % 32, 0);
  }
  std::vector<std::byte> out(b.size());
  std::memcpy(out.data(), b.data(), b.size());
  return out;
}

// ---- encoders ----
inline std::vector<uint8_t> encode_f32(const std::vector<float>& x) {
  std::vector<uint8_t> b(x.size() * 4);
  std::memcpy(b.data(), x.data(), b.size());
  return b;
}
inline std::vector<uint8_t> encode_f16(const std::vector<float>& x) {
  std::vector<uint8_t> b;
  for (float v : x) gguf_detail::put<uint16_t>(b, moekit::io::f32_to_f16(v));
  return b;
}
inline std::vector<uint8_t> encode_bf16(const std::vector<float>& x) {
  std::vector<uint8_t> b;
  for (float v : x) gguf_detail::put<uint16_t>(b, moekit::io::f32_to_bf16(v));
  return b;
}

/// quantize_row_q4_0_ref: per 32 values, `max` the value of largest magnitude (the first on
/// ties), d = max / -8, id = 1 / d (0 for d = 0), q = min(15, (int8_t)(x id + 8.5f)); stored
/// d as f16, then 16 bytes: value j in the low nibble, j + 16 in the high one.
inline std::vector<uint8_t> quantize_q4_0(const std::vector<float>& x) {
  std::vector<uint8_t> b;
  for (size_t i = 0; i + 32 <= x.size(); i += 32) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j)
      if (amax < std::fabs(x[i + j])) {
        amax = std::fabs(x[i + j]);
        max = x[i + j];
      }
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    gguf_detail::put<uint16_t>(b, moekit::io::f32_to_f16(d));
    for (int j = 0; j < 16; ++j) {
      const auto q0 = static_cast<int8_t>(x[i + j] * id + 8.5f), q1 = static_cast<int8_t>(x[i + 16 + j] * id + 8.5f);
      const int a = q0 < 15 ? q0 : 15, c = q1 < 15 ? q1 : 15;
      b.push_back(static_cast<uint8_t>(a | (c << 4)));
    }
  }
  return b;
}

/// quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) (halves away from zero), d as f16.
inline std::vector<uint8_t> quantize_q8_0(const std::vector<float>& x) {
  std::vector<uint8_t> b;
  for (size_t i = 0; i + 32 <= x.size(); i += 32) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(x[i + j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    gguf_detail::put<uint16_t>(b, moekit::io::f32_to_f16(d));
    for (int j = 0; j < 32; ++j) b.push_back(static_cast<uint8_t>(static_cast<int8_t>(std::roundf(x[i + j] * id))));
  }
  return b;
}

inline double f16_at(const uint8_t* p) {
  return moekit::io::f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

/// Element i of a row of `type` (ggml numbering) starting at `row`, in double, from the block
/// layouts of ggml-common.h read element by element (not the reader's loops).
inline double ref_dequant(uint32_t type, const uint8_t* row, int64_t i) {
  switch (type) {
    case 0: {
      float v;
      std::memcpy(&v, row + 4 * i, 4);
      return v;
    }
    case 1: return f16_at(row + 2 * i);
    case 30: return moekit::io::bf16_to_f32(static_cast<uint16_t>(row[2 * i] | (row[2 * i + 1] << 8)));
    case 2: {  // Q4_0: 18 bytes per 32
      const uint8_t* blk = row + (i / 32) * 18;
      const int j = static_cast<int>(i % 32);
      const int code = j < 16 ? blk[2 + j] & 15 : blk[2 + j - 16] >> 4;
      return (code - 8) * f16_at(blk);
    }
    case 8: {  // Q8_0: 34 bytes per 32
      const uint8_t* blk = row + (i / 32) * 34;
      return static_cast<int8_t>(blk[2 + i % 32]) * f16_at(blk);
    }
    case 12: {  // Q4_K: 144 bytes per 256; sub-block s = i / 32 of 8, 6-bit scale / min
      const uint8_t* blk = row + (i / 256) * 144;
      const int w = static_cast<int>(i % 256), s = w / 32, l = w % 32;
      const uint8_t* sc = blk + 4;
      const int scale = s < 4 ? sc[s] & 63 : (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
      const int min = s < 4 ? sc[s + 4] & 63 : (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
      const uint8_t byte = blk[16 + 32 * (s / 2) + l];
      const int code = s % 2 == 0 ? byte & 15 : byte >> 4;
      return f16_at(blk) * scale * code - f16_at(blk + 2) * min;
    }
    case 14: {  // Q6_K: 210 bytes per 256; 6-bit codes: 4 low bits in ql, 2 high in qh
      const uint8_t* blk = row + (i / 256) * 210;
      const int w = static_cast<int>(i % 256), half = w / 128, r = w % 128, quarter = r / 32, l = r % 32;
      const uint8_t lowb = blk[64 * half + l + (quarter % 2) * 32];
      const int low = quarter < 2 ? lowb & 15 : lowb >> 4;
      const int high = (blk[128 + 32 * half + l] >> (2 * quarter)) & 3;
      const int scale = static_cast<int8_t>(blk[192 + 8 * half + l / 16 + 2 * quarter]);
      return f16_at(blk + 208) * scale * ((low | (high << 4)) - 32);
    }
    case 39: {  // MXFP4: e8m0 byte, 16 bytes (value j low nibble, j + 16 high); e2m1 x 2^(e - 127)
      const uint8_t* blk = row + (i / 32) * 17;
      const int j = static_cast<int>(i % 32);
      const int c = j < 16 ? blk[1 + j] & 15 : blk[1 + j - 16] >> 4;
      const int e = (c >> 1) & 3, m = c & 1;
      const double mag = e == 0 ? 0.5 * m : (1.0 + 0.5 * m) * std::ldexp(1.0, e - 1);
      return ((c & 8) ? -mag : mag) * std::ldexp(1.0, blk[0] - 127);
    }
    default: return NAN;
  }
}

/// Bytes per row of ne0 values of `type`.
inline int64_t gguf_row_bytes(uint32_t type, int64_t ne0) {
  switch (type) {
    case 0: return 4 * ne0;
    case 1: case 30: return 2 * ne0;
    case 2: return ne0 / 32 * 18;
    case 8: return ne0 / 32 * 34;
    case 12: return ne0 / 256 * 144;
    case 14: return ne0 / 256 * 210;
    case 39: return ne0 / 32 * 17;
    default: return 0;
  }
}

// A tensor of `type` with extents `ne`: value types hold scale x Gaussian values (quantised by
// the reference quantisers); K-quants and MXFP4 random blocks with small finite scales.
inline GgufOut gguf_tensor(const std::string& name, uint32_t type, std::vector<int64_t> ne, std::mt19937& g, float scale) {
  int64_t n = 1;
  for (int64_t x : ne) n *= x;
  std::normal_distribution<float> nd(0.0f, scale);
  std::uniform_int_distribution<int> byte(0, 255);
  GgufOut t{name, type, ne, {}};
  if (type == kQ4_K || type == kQ6_K || type == kMXFP4) {
    const int64_t per = type == kMXFP4 ? 32 : 256, bytes = type == kQ4_K ? 144 : type == kQ6_K ? 210 : 17;
    t.data.resize(static_cast<size_t>(n / per * bytes));
    for (auto& b : t.data) b = static_cast<uint8_t>(byte(g));
    std::uniform_real_distribution<float> u(0.5f, 1.0f);
    for (int64_t blk = 0; blk < n / per; ++blk) {
      uint8_t* p = t.data.data() + blk * bytes;
      auto put_f16 = [](uint8_t* at, float v) {
        const uint16_t h = moekit::io::f32_to_f16(v);
        at[0] = static_cast<uint8_t>(h & 0xFF);
        at[1] = static_cast<uint8_t>(h >> 8);
      };
      if (type == kQ4_K) {  // value ~ d * 63 * 15: d ~ scale / 400
        put_f16(p, u(g) * scale / 400.0f);
        put_f16(p + 2, u(g) * scale / 100.0f);
      } else if (type == kQ6_K) {  // value ~ d * 127 * 32
        put_f16(p + 208, u(g) * scale / 2000.0f);
      } else {  // |e2m1| <= 6: 2^(e - 127) ~ scale / 4
        p[0] = static_cast<uint8_t>(127 + static_cast<int>(std::lround(std::log2(scale / 4.0f))) + byte(g) % 2);
      }
    }
    return t;
  }
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = nd(g);
  t.data = type == kF32 ? encode_f32(v) : type == kF16 ? encode_f16(v) : type == kBF16 ? encode_bf16(v)
           : type == kQ4_0 ? quantize_q4_0(v) : quantize_q8_0(v);
  return t;
}

}  // namespace moekit_test
