// SPDX-License-Identifier: Apache-2.0
// Activations of FFN experts, scalar and SIMD.
#pragma once

#include <cmath>
#include <string>

#include <xsimd/xsimd.hpp>

#include "moekit/error.hpp"

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

}  // namespace moekit
