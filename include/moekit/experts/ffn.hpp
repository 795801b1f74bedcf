// SPDX-License-Identifier: Apache-2.0
// Feed-forward experts: SwiGLU (gated SiLU), gated GeLU, and plain GeLU / ReLU FFNs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/kernels/gemm.hpp"

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

/// Shape of one FFN expert. Gated: `down(act(gate x) * up x)` (SwiGLU when act = silu);
/// plain: `down(act(up x))`. Weights in HF `[out, in]` layout.
struct FfnShape {
  int64_t hidden = 0;        ///< d
  int64_t intermediate = 0;  ///< f
  bool gated = true;
  Activation act = Activation::silu;

  void validate(const char* who) const {
    MOEKIT_CHECK(hidden >= 1, who, ": hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(intermediate >= 1, who, ": intermediate size (f) expected >= 1, got ", intermediate);
  }
  /// FLOPs of one row through one expert.
  [[nodiscard]] double flops_per_row() const noexcept {
    return 2.0 * static_cast<double>(hidden) * static_cast<double>(intermediate) * (gated ? 3.0 : 2.0);
  }
  /// Weight values of one expert.
  [[nodiscard]] int64_t weights_per_expert() const noexcept {
    return hidden * intermediate * (gated ? 3 : 2);
  }
};

/// E FFN experts of one shape, weights stored contiguously per expert: for gated experts the
/// gate and up projections are concatenated into one `[2f, d]` matrix (one GEMM), then
/// `down [d, f]`.
class FfnBank {
 public:
  FfnBank() = default;
  /// A bank of `num_experts` experts with zero weights; fill them with set_expert().
  FfnBank(int64_t num_experts, FfnShape shape) : shape_(shape), experts_(num_experts) {
    shape_.validate("FfnBank");
    MOEKIT_CHECK(num_experts >= 1, "FfnBank: num_experts expected >= 1, got ", num_experts);
    const auto n = static_cast<size_t>(num_experts);
    in_proj_.assign(n * static_cast<size_t>(in_rows() * shape_.hidden), 0.0f);
    down_.assign(n * static_cast<size_t>(shape_.hidden * shape_.intermediate), 0.0f);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return experts_; }
  [[nodiscard]] int64_t d_in() const noexcept { return shape_.hidden; }
  [[nodiscard]] int64_t d_out() const noexcept { return shape_.hidden; }
  [[nodiscard]] const FfnShape& shape() const noexcept { return shape_; }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return static_cast<size_t>(rows * in_rows());
  }

  /// Input projection of expert e: `[2f, d]` (gate rows then up rows) or `[f, d]` (up).
  [[nodiscard]] float* in_proj(int64_t e) noexcept { return in_proj_.data() + e * in_rows() * shape_.hidden; }
  [[nodiscard]] const float* in_proj(int64_t e) const noexcept { return in_proj_.data() + e * in_rows() * shape_.hidden; }
  /// Output projection of expert e: `[d, f]`.
  [[nodiscard]] float* down(int64_t e) noexcept { return down_.data() + e * shape_.hidden * shape_.intermediate; }
  [[nodiscard]] const float* down(int64_t e) const noexcept { return down_.data() + e * shape_.hidden * shape_.intermediate; }

  /// Copies expert e's weights: `gate [f, d]` (gated only, else nullptr), `up [f, d]`,
  /// `down [d, f]`, all HF layout.
  void set_expert(int64_t e, const float* gate, const float* up, const float* down_w) {
    MOEKIT_CHECK(e >= 0 && e < experts_, "FfnBank::set_expert: expert expected in [0, ", experts_, "), got ", e);
    MOEKIT_CHECK(!shape_.gated || gate != nullptr, "FfnBank::set_expert: gated expert ", e, " needs a gate weight");
    const int64_t fd = shape_.intermediate * shape_.hidden;
    float* p = in_proj(e);
    if (shape_.gated) {
      std::copy(gate, gate + fd, p);
      p += fd;
    }
    std::copy(up, up + fd, p);
    std::copy(down_w, down_w + fd, down(e));
  }

  /// Runs expert e on `in [rows, d]` into `out [rows, d]`.
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const noexcept {
    const int64_t d = shape_.hidden, f = shape_.intermediate, r = in_rows();
    kernels::gemm_nt(rows, r, d, in, d, in_proj(e), d, scratch, r);
    const Activation act = shape_.act;
    for (int64_t i = 0; i < rows; ++i) {
      float* h = scratch + i * r;
      if (shape_.gated) {
        for (int64_t j = 0; j < f; ++j) h[j] = activate(act, h[j]) * h[f + j];
      } else {
        for (int64_t j = 0; j < f; ++j) h[j] = activate(act, h[j]);
      }
    }
    kernels::gemm_nt(rows, d, f, scratch, r, down(e), f, out, d);
  }

  /// FLOPs of one row through one expert.
  [[nodiscard]] double flops_per_row() const noexcept { return shape_.flops_per_row(); }
  /// Bytes of expert weights (f32) of one expert.
  [[nodiscard]] double weight_bytes_per_expert() const noexcept {
    return 4.0 * static_cast<double>(shape_.weights_per_expert());
  }

 private:
  [[nodiscard]] int64_t in_rows() const noexcept { return shape_.gated ? 2 * shape_.intermediate : shape_.intermediate; }

  FfnShape shape_{};
  int64_t experts_ = 0;
  std::vector<float> in_proj_;
  std::vector<float> down_;
};

static_assert(ExpertBank<FfnBank>);

/// A shared (always-on) expert: an FFN applied to every unpadded token, optionally gated by
/// `sigmoid(gate . x)` (Qwen2-MoE's `shared_expert_gate`, `[1, d]`); ungated as DeepSeek-V3.
struct SharedExpert {
  FfnBank ffn;               ///< a one-expert bank
  std::vector<float> gate;   ///< `[d]`, empty for ungated
};

}  // namespace moekit
