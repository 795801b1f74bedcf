// SPDX-License-Identifier: Apache-2.0
// Growing a trained top-k layer by new experts (LLaVA-DyMoE's library-side piece; continual
// learning that adds experts and router rows while the old ones stay frozen): the old experts'
// packed weights are copied unchanged, the new ones packed in the same format, and the router
// gains one row per new expert.
#pragma once

#include <cstdint>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// The layer with `n` new experts appended after its E old ones: router rows `new_gate [n, d]`
/// (selection bias and steering extended with 0 for them, the router's other options kept, so
/// `k` and groups must still validate for E + n), expert weights in HF layout `gate [n, f, d]`
/// (empty for plain FFNs), `up [n, f, d]`, `down [n, d, f]` packed as the old experts are. The
/// old experts' packed bytes, the shared experts and the layer's settings carry over, so a token
/// that never picks a new expert is routed among the old ones by the same scores (with
/// `norm_topk_prob` or top-k-then-softmax also with the same weights, up to rounding; plain
/// softmax weights shrink as the new experts take probability mass). A capacity factor now
/// divides by E + n, so capacities shrink. Experts with biases and group-limited routers are
/// not supported (moekit::error).
inline SparseLayer<TopKRouter, FfnBank> grow_experts(const SparseLayer<TopKRouter, FfnBank>& layer,
                                                     const std::vector<float>& new_gate, const std::vector<float>& gate,
                                                     const std::vector<float>& up, const std::vector<float>& down) {
  const TopKRouter& r = layer.router();
  const FfnBank& bank = layer.experts();
  const FfnShape& sh = bank.shape();
  const int64_t E = r.num_experts(), d = r.hidden_size(), f = sh.intermediate;
  MOEKIT_CHECK(!sh.bias, "grow_experts: experts with biases expected none, got biased experts");
  MOEKIT_CHECK(!r.options().grouped(), "grow_experts: a group-limited router expected none (groups are contiguous "
               "blocks of E / n_group experts: growing E would move old experts between groups), got n_group = ",
               r.options().n_group);
  MOEKIT_CHECK(!new_gate.empty() && new_gate.size() % static_cast<size_t>(d) == 0,
               "grow_experts: new router rows expected [n, ", d, "] with n >= 1, got ", new_gate.size(), " values");
  const auto n = static_cast<int64_t>(new_gate.size()) / d;
  detail::check_weight(up, "grow_experts", "up_proj", static_cast<size_t>(n * f), static_cast<size_t>(d));
  detail::check_weight(down, "grow_experts", "down_proj", static_cast<size_t>(n * d), static_cast<size_t>(f));
  if (sh.gated) {
    detail::check_weight(gate, "grow_experts", "gate_proj", static_cast<size_t>(n * f), static_cast<size_t>(d));
  } else {
    MOEKIT_CHECK(gate.empty(), "grow_experts: gate_proj expected empty for plain experts, got ", gate.size(), " values");
  }
  // The router: old rows then new, biases and steering extended with zeros.
  TopKOptions o = r.options();
  o.num_experts = E + n;
  std::vector<float> W = r.weight();
  W.insert(W.end(), new_gate.begin(), new_gate.end());
  std::vector<float> bias = r.bias(), noise = r.noise_weight();
  if (!bias.empty()) bias.resize(static_cast<size_t>(E + n), 0.0f);
  MOEKIT_CHECK(noise.empty(), "grow_experts: a noisy top-k router expected none (training only), got its noise weight");
  TopKRouter grown(o, std::move(W), std::move(bias));
  if (!r.logit_bias().empty()) {
    std::vector<float> lb = r.logit_bias();
    lb.resize(static_cast<size_t>(E + n), 0.0f);
    grown.set_logit_bias(std::move(lb));
  }
  if (!r.logit_steering().empty()) {
    std::vector<float> st = r.logit_steering();
    st.resize(static_cast<size_t>(E + n), 0.0f);
    grown.set_logit_steering(std::move(st));
  }
  // The bank: old packed matrices as they are, new ones packed with the same options.
  std::vector<kernels::PackedMatrix> in, dn;
  for (int64_t e = 0; e < E; ++e) {
    in.push_back(bank.in_matrix(e));
    dn.push_back(bank.down_matrix(e));
  }
  FfnBank fresh(n, sh, bank.pack_options(), bank.input_smoothing());  // new experts smoothed alike
  for (int64_t e = 0; e < n; ++e)
    fresh.set_expert(e, sh.gated ? gate.data() + e * f * d : nullptr, up.data() + e * f * d, down.data() + e * d * f);
  for (int64_t e = 0; e < n; ++e) {
    in.push_back(fresh.in_matrix(e));
    dn.push_back(fresh.down_matrix(e));
  }
  SparseLayer<TopKRouter, FfnBank> out(std::move(grown), FfnBank::from_packed(sh, std::move(in), std::move(dn), {}, bank.input_smoothing()),
                                       layer.shared_experts());
  out.set_weight_on_input(layer.weight_on_input());
  out.set_output_bias(layer.output_bias());
  out.set_decode_split(layer.decode_split());
  out.set_check_finite(layer.check_finite());
  out.set_non_finite_output(layer.non_finite_output());
  return out;
}

}  // namespace moekit
#pragma GCC visibility pop
