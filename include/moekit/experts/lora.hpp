// SPDX-License-Identifier: Apache-2.0
// Expert types built on shared weights: LoRA experts over one frozen base projection
// (LoRA-Mixer, arXiv 2507.00029) and feature-modulated experts sharing one FFN (MoFME, arXiv
// 2312.16610). Both are ExpertBanks in f32 (plain loops over kernels::dot; no packed kernels).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "moekit/activation.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// E LoRA experts of rank r on a d -> d projection: `E_e(x) = [W0 x] + scale B_e (A_e x)` with
/// `W0 [d, d]` the frozen base (held once, shared by every expert; optional), `A [E, r, d]`,
/// `B [E, d, r]` (PEFT's lora_A / lora_B, HF [out, in] layout), `scale` = lora_alpha / r.
/// With the base in every expert the layer is `sum w (W0 x + ...)`: W0 x once when the weights
/// sum to 1 (norm_topk_prob). Without it (`base` empty) experts are the low-rank deltas alone,
/// LoRA-Mixer's `y = W0 x + sum w B_e A_e x` with W0 x added by the caller.
class LoraExpertBank {
 public:
  LoraExpertBank(int64_t num_experts, int64_t hidden, int64_t rank, std::vector<float> base, std::vector<float> a,
                 std::vector<float> b, float scale)
      : E_(num_experts), d_(hidden), r_(rank), base_(std::make_shared<const std::vector<float>>(std::move(base))),
        a_(std::move(a)), b_(std::move(b)), scale_(scale) {
    MOEKIT_CHECK(E_ >= 1 && d_ >= 1 && r_ >= 1, "LoraExpertBank: experts, hidden size and rank expected >= 1, got ", E_,
                 ", ", d_, ", ", r_);
    MOEKIT_CHECK(static_cast<double>(E_) * static_cast<double>(r_) * static_cast<double>(d_) < 0x1p40 &&
                     static_cast<double>(d_) * static_cast<double>(d_) < 0x1p40,
                 "LoraExpertBank: E r d and d d expected < 2^40 values, got E = ", E_, ", r = ", r_, ", d = ", d_);
    MOEKIT_CHECK(std::isfinite(scale_), "LoraExpertBank: scale expected finite, got ", scale_);
    if (!base_->empty()) detail::check_weight(*base_, "LoraExpertBank", "base weight", static_cast<size_t>(d_), static_cast<size_t>(d_));
    detail::check_weight(a_, "LoraExpertBank", "lora_A", static_cast<size_t>(E_ * r_), static_cast<size_t>(d_));
    detail::check_weight(b_, "LoraExpertBank", "lora_B", static_cast<size_t>(E_ * d_), static_cast<size_t>(r_));
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return E_; }
  [[nodiscard]] int64_t d_in() const noexcept { return d_; }
  [[nodiscard]] int64_t d_out() const noexcept { return d_; }
  [[nodiscard]] size_t scratch_floats(int64_t) const noexcept { return static_cast<size_t>(r_); }
  [[nodiscard]] double flops_per_row() const noexcept {
    return 4.0 * static_cast<double>(r_ * d_) + (base_->empty() ? 0.0 : 2.0 * static_cast<double>(d_ * d_));
  }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const noexcept {
    const float* A = a_.data() + e * r_ * d_;
    const float* B = b_.data() + e * d_ * r_;
    for (int64_t q = 0; q < rows; ++q) {
      const float* x = in + q * d_;
      float* y = out + q * d_;
      kernels::matvec_rows(x, A, r_, d_, scratch);  // A x [r]
      for (int64_t i = 0; i < r_; ++i) scratch[i] *= scale_;
      kernels::matvec_rows(scratch, B, d_, r_, y);  // B (scale A x) [d]
      if (!base_->empty())
        for (int64_t i = 0; i < d_; ++i) y[i] += kernels::dot(x, base_->data() + i * d_, d_);
    }
  }

 private:
  int64_t E_, d_, r_;
  std::shared_ptr<const std::vector<float>> base_;
  std::vector<float> a_, b_;
  float scale_;
};

/// E feature-modulated experts sharing one FFN (MoFME's Feature Modulated Expert):
/// `E_e(x) = down act(gamma_e * (up x) + beta_e)` with `up [f, d]`, `down [d, f]` held once and
/// per-expert `gamma [E, f]`, `beta [E, f]` (feature-wise linear modulation of the hidden
/// activations): E experts for the weights of one FFN plus 2 E f.
class ModulatedFfnBank {
 public:
  ModulatedFfnBank(int64_t num_experts, int64_t hidden, int64_t intermediate, std::vector<float> up,
                   std::vector<float> down, std::vector<float> gamma, std::vector<float> beta,
                   Activation act = Activation::gelu)
      : E_(num_experts), d_(hidden), f_(intermediate), up_(std::move(up)), down_(std::move(down)),
        gamma_(std::move(gamma)), beta_(std::move(beta)), act_(act) {
    MOEKIT_CHECK(E_ >= 1 && d_ >= 1 && f_ >= 1, "ModulatedFfnBank: experts, hidden and intermediate size expected >= 1, got ",
                 E_, ", ", d_, ", ", f_);
    MOEKIT_CHECK(static_cast<double>(f_) * static_cast<double>(d_) < 0x1p40 &&
                     static_cast<double>(E_) * static_cast<double>(f_) < 0x1p40,
                 "ModulatedFfnBank: f d and E f expected < 2^40 values, got E = ", E_, ", d = ", d_, ", f = ", f_);
    detail::check_weight(up_, "ModulatedFfnBank", "up_proj", static_cast<size_t>(f_), static_cast<size_t>(d_));
    detail::check_weight(down_, "ModulatedFfnBank", "down_proj", static_cast<size_t>(d_), static_cast<size_t>(f_));
    detail::check_weight(gamma_, "ModulatedFfnBank", "gamma", static_cast<size_t>(E_), static_cast<size_t>(f_));
    detail::check_weight(beta_, "ModulatedFfnBank", "beta", static_cast<size_t>(E_), static_cast<size_t>(f_));
    MOEKIT_CHECK(static_cast<int>(act_) >= 0 && static_cast<int>(act_) <= static_cast<int>(Activation::relu),
                 "ModulatedFfnBank: activation expected silu, gelu, gelu_tanh or relu, got ", static_cast<int>(act_));
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return E_; }
  [[nodiscard]] int64_t d_in() const noexcept { return d_; }
  [[nodiscard]] int64_t d_out() const noexcept { return d_; }
  [[nodiscard]] size_t scratch_floats(int64_t) const noexcept { return static_cast<size_t>(f_); }
  [[nodiscard]] double flops_per_row() const noexcept { return 4.0 * static_cast<double>(d_ * f_); }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* h) const noexcept {
    const float* g = gamma_.data() + e * f_;
    const float* b = beta_.data() + e * f_;
    for (int64_t q = 0; q < rows; ++q) {
      kernels::matvec_rows(in + q * d_, up_.data(), f_, d_, h);
      for (int64_t i = 0; i < f_; ++i) h[i] = activate(act_, g[i] * h[i] + b[i]);
      kernels::matvec_rows(h, down_.data(), d_, f_, out + q * d_);
    }
  }

 private:
  int64_t E_, d_, f_;
  std::vector<float> up_, down_, gamma_, beta_;
  Activation act_;
};

static_assert(ExpertBank<LoraExpertBank>);
static_assert(ExpertBank<ModulatedFfnBank>);

}  // namespace moekit
#pragma GCC visibility pop
