// SPDX-License-Identifier: Apache-2.0
// Activations of FFN experts, scalar and SIMD.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>

#include <xsimd/xsimd.hpp>

#include "moekit/error.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Activation of an FFN's hidden layer.
enum class Activation {
  silu,       ///< x * sigmoid(x) (HF "silu", "swish")
  gelu,       ///< exact erf GeLU (HF "gelu")
  gelu_tanh,  ///< tanh approximation (HF "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
  relu,       ///< max(x, 0)
};

/// Parses an HF `hidden_act` string; throws moekit::error for unknown names.
inline Activation parse_activation(const std::string& name) {
  if (name == "silu" || name == "swish") return Activation::silu;
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") return Activation::gelu_tanh;
  if (name == "relu") return Activation::relu;
  detail::fail("hidden_act: expected one of silu, swish, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu; got \"",
               name, "\"");
}

inline const char* activation_name(Activation a) noexcept {
  switch (a) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::gelu_tanh: return "gelu_tanh";
    case Activation::relu: return "relu";
  }
  return "?";
}

/// Applies the activation to one value.
inline float activate(Activation a, float x) noexcept {
  switch (a) {
    case Activation::silu: return x / (1.0f + std::exp(-x));
    case Activation::gelu: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case Activation::gelu_tanh:
      return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case Activation::relu: return x > 0.0f ? x : 0.0f;
  }
  return x;
}

/// Applies the activation to a SIMD batch (same formulas as activate()).
template <class B>
inline B activate(Activation a, const B& x) noexcept {
  switch (a) {
    case Activation::silu: return x / (B(1.0f) + xsimd::exp(-x));
    case Activation::gelu: return B(0.5f) * x * (B(1.0f) + xsimd::erf(x * B(0.70710678118654752f)));
    case Activation::gelu_tanh:
      return B(0.5f) * x * (B(1.0f) + xsimd::tanh(B(0.7978845608028654f) * (x + B(0.044715f) * x * x * x)));
    case Activation::relu: return xsimd::max(x, B(0.0f));
  }
  return x;
}

/// gpt-oss's clamped SwiGLU (HF `GptOssExperts`): with gate g and up u (biases included),
/// `g' = min(g, limit)`, `u' = clamp(u, -limit, limit)`,
/// `h = (u' + 1) * g' * sigmoid(alpha * g')`. Released models: alpha 1.702, limit 7.
struct ClampedSwiglu {
  float alpha = 1.702f;
  float limit = 7.0f;
};

/// The clamped SwiGLU of one (gate, up) pair.
inline float clamped_swiglu(const ClampedSwiglu& c, float g, float u) noexcept {
  g = std::min(g, c.limit);
  u = std::min(std::max(u, -c.limit), c.limit);
  return (u + 1.0f) * (g * (1.0f / (1.0f + std::exp(-(g * c.alpha)))));
}

/// The clamped SwiGLU of SIMD batches (same formula as the scalar one).
template <class B>
inline B clamped_swiglu(const ClampedSwiglu& c, B g, B u) noexcept {
  g = xsimd::min(g, B(c.limit));
  u = xsimd::min(xsimd::max(u, B(-c.limit)), B(c.limit));
  return (u + B(1.0f)) * (g * (B(1.0f) / (B(1.0f) + xsimd::exp(-(g * B(c.alpha))))));
}

}  // namespace moekit
#pragma GCC visibility pop
