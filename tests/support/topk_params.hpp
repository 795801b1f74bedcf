// SPDX-License-Identifier: Apache-2.0
// The top-k router's options as the double-precision reference's parameters (tests/support:
// one place for helpers shared by the router and layer tests).
#pragma once

#include <vector>

#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"

namespace moekit_test {

inline ref::TopKParams to_ref(const moekit::TopKOptions& o, const std::vector<float>& bias) {
  using moekit::DropPolicy;
  using moekit::GroupScore;
  ref::TopKParams p;
  p.num_experts = o.num_experts;
  p.k = o.k;
  p.hidden = o.hidden;
  p.score_func = o.score_func == moekit::ScoreFunc::softmax ? ref::ScoreFunc::softmax : ref::ScoreFunc::sigmoid;
  p.topk_then_softmax = o.topk_then_softmax;
  p.select_on_logits = o.select_on_logits;
  p.norm_topk_prob = o.norm_topk_prob;
  p.norm_p = o.norm_p;
  p.sparsemixer_eps = o.sparsemixer_eps;
  p.routed_scaling_factor = o.routed_scaling_factor;
  p.uniform_weights = o.uniform_weights;
  p.bias.assign(bias.begin(), bias.end());
  p.n_group = o.n_group;
  p.topk_group = o.topk_group;
  p.group_score = o.group_score == GroupScore::top2_sum ? ref::GroupScore::top2_sum
                  : o.group_score == GroupScore::max    ? ref::GroupScore::max
                                                        : ref::GroupScore::topk_sum;
  p.capacity_factor = o.capacity_factor;
  p.min_capacity = o.min_capacity;
  p.drop_policy = o.drop_policy == DropPolicy::score      ? ref::DropPolicy::score
                  : o.drop_policy == DropPolicy::position ? ref::DropPolicy::position
                                                          : ref::DropPolicy::position_slot_major;
  p.renormalize_after_drop = o.renormalize_after_drop;
  return p;
}

}  // namespace moekit_test
