// SPDX-License-Identifier: Apache-2.0
// Logit steering and test-time re-routing (ROUTING.md section 7). A steering vector delta [E]
// is added to a router's logits (TopKRouter / DynamicKRouter::set_logit_steering), changing
// selection and weights. Rewiring Experts (arXiv 2510.14853) optimises one delta per layer at
// test time by gradient steps on the model's own next-token loss; the engine backpropagates
// that loss to each MoE layer's output, and these helpers carry it the rest of the way:
//   dLoss/dy (engine) -> SparseLayer::slot_weight_gradient -> logit_gradient (this file)
//   -> steering_gradient -> steering_sgd_step -> set_logit_steering.
// Selection (which experts) is piecewise constant in the logits: like autograd through
// torch.topk, only the chosen experts' weights carry a gradient.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/routers/dynamic_k.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// How a router turns a token's logits into the weights of its chosen slots.
enum class WeightForm {
  softmax,                ///< w_j = c softmax(L)_{i_j}                      (p over all E)
  softmax_renormalized,   ///< w_j = c softmax(L_I)_j   (= p_{i_j} / sum_I p; norm_topk_prob, topk_then_softmax)
  sigmoid,                ///< w_j = c sigmoid(L_{i_j})
  sigmoid_renormalized,   ///< w_j = c sigmoid(L_{i_j}) / sum_I sigmoid(L_i)
};

namespace detail {

// dLoss/dL of one token: `L [E]` its logits, `ids [n]` / `g [n]` its slots' experts and
// dLoss/dw (0 for a dropped slot, which still counts in a renormalisation's sum), `c` the
// scaling factor; writes `out [E]`. In double.
inline void weight_logit_gradient(WeightForm form, const float* L, int64_t E, const int32_t* ids, const float* g,
                                  int64_t n, double c, float* out) {
  std::vector<double> grad(static_cast<size_t>(E), 0.0);
  if (form == WeightForm::softmax || form == WeightForm::softmax_renormalized) {
    // q = softmax over all E (softmax) or over the chosen (renormalised).
    double m = -INFINITY;
    if (form == WeightForm::softmax) {
      for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(L[e]));
    } else {
      for (int64_t j = 0; j < n; ++j) m = std::max(m, static_cast<double>(L[ids[j]]));
    }
    std::vector<double> q(static_cast<size_t>(E), 0.0);
    double z = 0.0;
    if (form == WeightForm::softmax) {
      for (int64_t e = 0; e < E; ++e) z += (q[static_cast<size_t>(e)] = std::exp(static_cast<double>(L[e]) - m));
    } else {
      for (int64_t j = 0; j < n; ++j) z += (q[static_cast<size_t>(ids[j])] = std::exp(static_cast<double>(L[ids[j]]) - m));
    }
    for (double& v : q) v /= z;
    // dw_j/dL_e = c q_{i_j} (1[e = i_j] - q_e)  =>  grad_e = c q_e (G_e - sum_j g_j q_{i_j}).
    double dot = 0.0;
    for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(g[j]) * q[static_cast<size_t>(ids[j])];
    for (int64_t j = 0; j < n; ++j) grad[static_cast<size_t>(ids[j])] += static_cast<double>(g[j]);
    for (int64_t e = 0; e < E; ++e) {
      const bool member = form == WeightForm::softmax || q[static_cast<size_t>(e)] > 0;
      grad[static_cast<size_t>(e)] = member ? c * q[static_cast<size_t>(e)] * (grad[static_cast<size_t>(e)] - dot) : 0.0;
    }
  } else {
    auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
    double S = 1.0, dot = 0.0;
    if (form == WeightForm::sigmoid_renormalized) {
      S = 1e-20;
      for (int64_t j = 0; j < n; ++j) S += sig(L[ids[j]]);
      for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(g[j]) * sig(L[ids[j]]) / S;
    }
    // w_j = c s_j / S: dw_j/dL_e = c s_e (1 - s_e) (1[e = i_j] - s_j / S) / S (S = 1, no sum term, unnormalised).
    for (int64_t j = 0; j < n; ++j) {
      const double s = sig(L[ids[j]]);
      grad[static_cast<size_t>(ids[j])] = c * s * (1.0 - s) * (static_cast<double>(g[j]) - dot) / S;
    }
  }
  for (int64_t e = 0; e < E; ++e) out[e] = static_cast<float>(grad[static_cast<size_t>(e)]);
}

// The per-token loop shared by the routers' logit_gradient.
inline void plan_logit_gradient(WeightForm form, double c, const Batch& batch, std::span<const float> logits,
                                const RoutingPlan& plan, std::span<const float> grad_weight, std::span<float> grad_logits,
                                const char* who) {
  const int64_t T = plan.num_tokens(), E = plan.num_experts();
  MOEKIT_CHECK(plan.finalized() && batch.tokens == T, who, ": expected the finalised plan of this batch (", batch.tokens,
               " tokens), got a plan of ", T);
  MOEKIT_CHECK(static_cast<int64_t>(logits.size()) == T * E, who, ": logits expected [", T, ", ", E, "], got ",
               logits.size(), " values");
  MOEKIT_CHECK(static_cast<int64_t>(grad_weight.size()) == plan.num_slots(), who, ": grad_weight expected [",
               plan.num_slots(), "] (one per slot), got ", grad_weight.size(), " values");
  MOEKIT_CHECK(static_cast<int64_t>(grad_logits.size()) == T * E, who, ": grad_logits expected [", T, ", ", E,
               "], got ", grad_logits.size(), " values");
  const auto offs = plan.slot_offsets();
  const auto dropped = plan.slot_dropped();
  std::vector<float> g;
  for (int64_t t = 0; t < T; ++t) {
    float* out = grad_logits.data() + t * E;
    const int32_t b = offs[static_cast<size_t>(t)], n = offs[static_cast<size_t>(t) + 1] - b;
    if (batch.is_padding(t) || n == 0) {
      std::fill(out, out + E, 0.0f);
      continue;
    }
    g.assign(grad_weight.begin() + b, grad_weight.begin() + b + n);
    for (int32_t j = 0; j < n; ++j)
      if (dropped[static_cast<size_t>(b + j)]) g[static_cast<size_t>(j)] = 0.0f;  // weight 0 whatever L is
    weight_logit_gradient(form, logits.data() + t * E, E, plan.slot_expert().data() + b, g.data(), n, c, out);
  }
}

}  // namespace detail

/// dLoss/dL `[T, E]` of a TopKRouter's call from dLoss/dw `[S]` of its plan's slots
/// (SparseLayer::slot_weight_gradient), `logits` = RouterScratch::logits of that call. Not
/// defined (moekit::error) for SparseMixer, norm_p and renormalize_after_drop.
inline void logit_gradient(const TopKRouter& r, const Batch& batch, std::span<const float> logits,
                           const RoutingPlan& plan, std::span<const float> grad_weight, std::span<float> grad_logits) {
  const TopKOptions& o = r.options();
  MOEKIT_CHECK(o.sparsemixer_eps == 0 && o.norm_p == 0 && !(o.capacity_factor > 0 && o.renormalize_after_drop),
               "topk router: logit_gradient expected no sparsemixer_eps, norm_p or renormalize_after_drop");
  if (o.uniform_weights) {  // weights 1 / k whatever the logits: no gradient
    detail::plan_logit_gradient(WeightForm::softmax, 0.0, batch, logits, plan, grad_weight, grad_logits,
                                "topk router: logit_gradient");
    return;
  }
  const bool renorm = o.norm_topk_prob || o.topk_then_softmax;
  const WeightForm f = o.score_func == ScoreFunc::softmax
                           ? (renorm ? WeightForm::softmax_renormalized : WeightForm::softmax)
                           : (renorm ? WeightForm::sigmoid_renormalized : WeightForm::sigmoid);
  detail::plan_logit_gradient(f, o.routed_scaling_factor, batch, logits, plan, grad_weight, grad_logits,
                              "topk router: logit_gradient");
}

/// The same for a DynamicKRouter (weights p, or renormalised with norm_topk_prob). Not defined
/// with renormalize_after_drop.
inline void logit_gradient(const DynamicKRouter& r, const Batch& batch, std::span<const float> logits,
                           const RoutingPlan& plan, std::span<const float> grad_weight, std::span<float> grad_logits) {
  const DynamicKOptions& o = r.options();
  MOEKIT_CHECK(!(o.capacity_factor > 0 && o.renormalize_after_drop),
               "dynamic_k router: logit_gradient expected no renormalize_after_drop");
  detail::plan_logit_gradient(o.norm_topk_prob ? WeightForm::softmax_renormalized : WeightForm::softmax, 1.0, batch,
                              logits, plan, grad_weight, grad_logits, "dynamic_k router: logit_gradient");
}

/// dLoss/ddelta `[E]` of a steering vector added to every token's logits: the sum of
/// `grad_logits [T, E]` over the unpadded tokens, in double.
inline std::vector<float> steering_gradient(const Batch& batch, std::span<const float> grad_logits, int64_t E) {
  MOEKIT_CHECK(E >= 1 && static_cast<int64_t>(grad_logits.size()) == batch.tokens * E,
               "steering_gradient: grad_logits expected [", batch.tokens, ", ", E, "], got ", grad_logits.size(),
               " values");
  std::vector<double> acc(static_cast<size_t>(E), 0.0);
  for (int64_t t = 0; t < batch.tokens; ++t) {
    if (batch.is_padding(t)) continue;
    for (int64_t e = 0; e < E; ++e) acc[static_cast<size_t>(e)] += grad_logits[static_cast<size_t>(t * E + e)];
  }
  return {acc.begin(), acc.end()};
}

/// One gradient-descent step `delta -= learning_rate * grad` (an empty delta starts at 0).
/// Rewiring Experts uses learning rate 0.05 and 5 steps per adaptation phase. Throws when the
/// step would leave delta non-finite.
inline void steering_sgd_step(std::vector<float>& delta, std::span<const float> grad, double learning_rate) {
  MOEKIT_CHECK(std::isfinite(learning_rate) && learning_rate >= 0,
               "steering_sgd_step: learning_rate expected finite and >= 0, got ", learning_rate);
  if (delta.empty()) delta.assign(grad.size(), 0.0f);
  MOEKIT_CHECK(delta.size() == grad.size(), "steering_sgd_step: grad expected [", delta.size(), "], got ", grad.size(),
               " values");
  for (size_t e = 0; e < delta.size(); ++e) {
    const double v = static_cast<double>(delta[e]) - learning_rate * static_cast<double>(grad[e]);
    MOEKIT_CHECK(std::isfinite(v) && std::fabs(v) < 3.0e38, "steering_sgd_step: delta[", e, "] would become ", v,
                 " (gradient ", grad[e], ")");
    delta[e] = static_cast<float>(v);
  }
}

/// Rewiring Experts' layer score `C = mean over unpadded tokens of -(1/n_t) sum_slots log p_e`
/// with `p = softmax(logits_t)` over all E and n_t the token's slots (dropped ones included;
/// tokens without a slot skipped): high when the router is unsure. In double; 0 for an empty batch.
inline double routing_uncertainty(const Batch& batch, std::span<const float> logits, const RoutingPlan& plan) {
  const int64_t T = plan.num_tokens(), E = plan.num_experts();
  MOEKIT_CHECK(plan.finalized() && batch.tokens == T && static_cast<int64_t>(logits.size()) == T * E,
               "routing_uncertainty: expected the finalised plan of this batch and its logits [", T, ", ", E, "], got ",
               logits.size(), " values");
  const auto offs = plan.slot_offsets();
  double sum = 0.0;
  int64_t n_tok = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int32_t b = offs[static_cast<size_t>(t)], n = offs[static_cast<size_t>(t) + 1] - b;
    if (batch.is_padding(t) || n == 0) continue;
    const float* L = logits.data() + t * E;
    double m = -INFINITY, z = 0.0;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(L[e]));
    for (int64_t e = 0; e < E; ++e) z += std::exp(static_cast<double>(L[e]) - m);
    const double lz = m + std::log(z);
    double s = 0.0;
    for (int32_t j = 0; j < n; ++j) s += lz - static_cast<double>(L[plan.slot_expert()[static_cast<size_t>(b + j)]]);
    sum += s / n;
    ++n_tok;
  }
  return n_tok > 0 ? sum / static_cast<double>(n_tok) : 0.0;
}

}  // namespace moekit
#pragma GCC visibility pop
