// SPDX-License-Identifier: Apache-2.0
#include "reference/dynamic_k_ref.hpp"

#include <algorithm>
#include <cmath>

namespace ref::dynamic_k {

double tsallis(const std::vector<double>& p, double q, bool normalize) {
  const double n = static_cast<double>(p.size());
  double s = 0.0, top = 0.0;
  if (q == 1.0) {
    for (double v : p)
      if (v > 0) s -= v * std::log(v);
    top = std::log(n);
  } else {
    double sum = 0.0;
    for (double v : p) sum += std::pow(v, q);
    s = (1.0 - sum) / (q - 1.0);
    top = (1.0 - std::pow(n, 1.0 - q)) / (q - 1.0);
  }
  if (!normalize) return s;
  return top > 0 ? s / top : 0.0;
}

Result route(const Params& p, const float* W, const float* x, int64_t T, const uint8_t* padding, double tie) {
  const int64_t E = p.num_experts, d = p.hidden, kmax = p.k_max == 0 ? E : p.k_max;
  Result res;
  Routing& r = res.routing;
  r.tokens = T;
  r.experts = E;
  r.k = p.mode == Mode::tsallis ? E : kmax;
  r.token.resize(static_cast<size_t>(T));
  res.entropy.assign(static_cast<size_t>(T), 0.0);
  res.fragile.assign(static_cast<size_t>(T), 0);
  int64_t slots = 0;
  for (int64_t t = 0; t < T; ++t) {
    TokenRouting& tr = r.token[static_cast<size_t>(t)];
    if (padding != nullptr && padding[t] != 0) {
      tr.padded = true;
      continue;
    }
    // Logits (+ steering) and the softmax, in double.
    std::vector<double> L(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      double z = 0.0;
      for (int64_t i = 0; i < d; ++i) z += static_cast<double>(x[t * d + i]) * static_cast<double>(W[e * d + i]);
      L[static_cast<size_t>(e)] = z + (p.steering.empty() ? 0.0 : p.steering[static_cast<size_t>(e)]);
    }
    const std::vector<double> prob = softmax(L);
    tr.selection = prob;
    tr.order = descending_order(prob);
    auto pr = [&](int64_t j) { return prob[static_cast<size_t>(tr.order[static_cast<size_t>(j)])]; };
    bool fragile = false;
    int64_t n = 0;
    bool all = false;
    if (p.mode == Mode::tsallis) {
      const double s = tsallis(prob, p.q, p.entropy_normalize);
      res.entropy[static_cast<size_t>(t)] = s;
      fragile |= std::fabs(s - p.entropy_threshold) <= tie * std::max(1.0, std::fabs(p.entropy_threshold));
      all = s > p.entropy_threshold;
    }
    if (all) {
      n = E;
    } else if (p.mode == Mode::threshold) {
      for (int64_t j = 0; j < E; ++j) {
        if (pr(j) >= p.threshold) n = j + 1;
        fragile |= std::fabs(pr(j) - p.threshold) <= tie * std::max(p.threshold, 1e-30);
      }
    } else {
      // Cumulative probabilities c_j of the first j + 1 experts.
      double c = 0.0;
      bool done = false;
      for (int64_t j = 0; j < E; ++j) {
        c += pr(j);
        fragile |= std::fabs(c - p.top_p) <= tie;
        if (done) continue;
        if (p.rule == Rule::reach) {
          n = j + 1;  // the smallest prefix with c >= top_p
          done = c >= p.top_p;
        } else if (c <= p.top_p) {
          n = j + 1;  // every prefix with c <= top_p
        } else {
          done = true;
        }
      }
    }
    n = std::min(std::max(n, p.k_min), all ? E : kmax);
    if (n > 0 && n < E) fragile |= relative_gap(pr(n - 1), pr(n)) <= tie;
    res.fragile[static_cast<size_t>(t)] = fragile ? 1 : 0;
    std::vector<double> w(static_cast<size_t>(n));
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += (w[static_cast<size_t>(j)] = pr(j));
    if (p.norm_topk_prob)
      for (double& v : w) v /= (sum + 1e-20);
    for (int64_t j = 0; j < n; ++j) tr.slots.push_back({tr.order[static_cast<size_t>(j)], w[static_cast<size_t>(j)], false});
    slots += n;
  }
  int64_t C = -1;
  if (p.capacity_factor > 0) {
    const double c = std::ceil((static_cast<double>(slots) / static_cast<double>(E)) * p.capacity_factor);
    C = std::max(p.min_capacity, static_cast<int64_t>(c));
  }
  apply_capacity(r, C, p.drop_policy, p.renormalize_after_drop, 1.0);
  return res;
}

}  // namespace ref::dynamic_k
