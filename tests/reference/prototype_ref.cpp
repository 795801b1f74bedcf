// SPDX-License-Identifier: Apache-2.0
// Double-precision reference of the prototype routers (ProMoE, nearest centroid, k-means).
// Plain loops, written for clarity; deliberately includes no moekit header.
#include "reference/prototype_ref.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace ref::prototype {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNormFloor = 1e-12;

// Row r of a row-major float matrix with n columns, as doubles.
std::vector<double> row(const float* m, int64_t r, int64_t n) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = m[r * n + i];
  return v;
}

double norm(const std::vector<double>& v) {
  double s = 0.0;
  for (double a : v) s += a * a;
  return std::sqrt(s);
}

// cos(a, b) with each vector divided by max(norm, 1e-12).
double cosine(const std::vector<double>& a, const std::vector<double>& b) {
  const double na = std::max(norm(a), kNormFloor), nb = std::max(norm(b), kNormFloor);
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i] / na) * (b[i] / nb);
  return s;
}

// Expert ids by descending score, ties to the lower id.
std::vector<int64_t> descending(const std::vector<double>& score) {
  std::vector<int64_t> idx(score.size());
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return score[static_cast<size_t>(a)] > score[static_cast<size_t>(b)];
  });
  return idx;
}

double gap(const TokenDecision& t, double a, double b) {
  return std::fabs(a - b) / std::max({std::fabs(a), std::fabs(b), t.tie_scale});
}

}  // namespace

Decisions route_promoe(const ProMoEParams& p, const float* prototypes, const float* x, int64_t T,
                       const uint8_t* padding, const int32_t* token_types) {
  const int64_t E = p.num_experts, d = p.hidden;
  Decisions out;
  out.tokens = T;
  out.experts = E + 1;
  out.token.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    TokenDecision& td = out.token[static_cast<size_t>(t)];
    td.logits.assign(static_cast<size_t>(E), 0.0);
    if (padding != nullptr && padding[t] != 0) {
      td.padded = true;
      continue;
    }
    if (token_types != nullptr && token_types[t] == p.uncond_token_type) {
      // Conditional step: the unconditional expert, weight 1.
      td.unconditional = true;
      td.experts = {E};
      td.weights = {1.0};
      continue;
    }
    // Prototypical step.
    const std::vector<double> xt = row(x, t, d);
    td.score.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e)
      td.score[static_cast<size_t>(e)] = cosine(xt, row(prototypes, e, d));
    double m = -kInf;
    for (int64_t e = 0; e < E; ++e) {
      td.logits[static_cast<size_t>(e)] = td.score[static_cast<size_t>(e)] / p.tau_r;
      m = std::max(m, td.logits[static_cast<size_t>(e)]);
    }
    double z = 0.0;
    for (double l : td.logits) z += std::exp(l - m);
    td.order = descending(td.score);
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t e = td.order[static_cast<size_t>(j)];
      td.experts.push_back(e);
      td.weights.push_back(std::exp(td.logits[static_cast<size_t>(e)] - m) /
                           z);  // not renormalised
    }
    td.tie_scale = 1.0;
  }
  return out;
}

double routing_contrastive_loss(const float* prototypes, int64_t E, int64_t d, const float* x,
                                int64_t T, const std::vector<int64_t>& top1, double temperature) {
  // m_e: mean of the tokens whose top-1 expert is e.
  std::vector<std::vector<double>> mean(static_cast<size_t>(E),
                                        std::vector<double>(static_cast<size_t>(d), 0.0));
  std::vector<int64_t> count(static_cast<size_t>(E), 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = top1[static_cast<size_t>(t)];
    if (e < 0) continue;
    for (int64_t i = 0; i < d; ++i)
      mean[static_cast<size_t>(e)][static_cast<size_t>(i)] += x[t * d + i];
    ++count[static_cast<size_t>(e)];
  }
  std::vector<int64_t> V;
  for (int64_t e = 0; e < E; ++e) {
    if (count[static_cast<size_t>(e)] == 0) continue;
    for (double& v : mean[static_cast<size_t>(e)])
      v /= static_cast<double>(count[static_cast<size_t>(e)]);
    V.push_back(e);
  }
  if (V.size() < 2) return 0.0;
  double loss = 0.0;
  for (int64_t e : V) {
    const std::vector<double> mu = row(prototypes, e, d);
    // -log softmax over e' in V of cos(mu_e, m_e') / temperature, at e' = e.
    double denom = 0.0;
    for (int64_t f : V) denom += std::exp(cosine(mu, mean[static_cast<size_t>(f)]) / temperature);
    const double own = std::exp(cosine(mu, mean[static_cast<size_t>(e)]) / temperature);
    loss += -std::log(own / denom);
  }
  return loss / static_cast<double>(V.size());
}

Decisions route_centroid(const float* centroids, int64_t E, int64_t d, const float* x, int64_t T,
                         const uint8_t* padding) {
  Decisions out;
  out.tokens = T;
  out.experts = E;
  out.token.resize(static_cast<size_t>(T));
  double max_c2 = 0.0;
  for (int64_t e = 0; e < E; ++e)
    max_c2 = std::max(max_c2, std::pow(norm(row(centroids, e, d)), 2));
  for (int64_t t = 0; t < T; ++t) {
    TokenDecision& td = out.token[static_cast<size_t>(t)];
    td.logits.assign(static_cast<size_t>(E), 0.0);
    if (padding != nullptr && padding[t] != 0) {
      td.padded = true;
      continue;
    }
    const std::vector<double> xt = row(x, t, d);
    td.score.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      double dist = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        const double diff = xt[static_cast<size_t>(i)] - centroids[e * d + i];
        dist += diff * diff;
      }
      td.score[static_cast<size_t>(e)] = -dist;
      td.logits[static_cast<size_t>(e)] = -dist;
    }
    td.order = descending(td.score);
    td.experts = {td.order[0]};
    td.weights = {1.0};
    td.tie_scale = std::pow(norm(xt), 2) + max_c2;
  }
  return out;
}

KMeans kmeans_step(const float* centroids, int64_t E, int64_t d, const float* x, int64_t T,
                   const uint8_t* padding) {
  const Decisions r = route_centroid(centroids, E, d, x, T, padding);
  KMeans k;
  k.counts.assign(static_cast<size_t>(E), 0);
  k.assignment.assign(static_cast<size_t>(T), -1);
  std::vector<double> sum(static_cast<size_t>(E * d), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const TokenDecision& td = r.token[static_cast<size_t>(t)];
    if (td.padded) continue;
    const int64_t e = td.experts[0];
    k.assignment[static_cast<size_t>(t)] = e;
    ++k.counts[static_cast<size_t>(e)];
    k.inertia += -td.score[static_cast<size_t>(e)];
    for (int64_t i = 0; i < d; ++i) sum[static_cast<size_t>(e * d + i)] += x[t * d + i];
  }
  k.centroids.resize(static_cast<size_t>(E * d));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < d; ++i) {
      const auto j = static_cast<size_t>(e * d + i);
      const int64_t n = k.counts[static_cast<size_t>(e)];
      k.centroids[j] = n == 0 ? static_cast<double>(centroids[j])
                              : sum[j] / static_cast<double>(n);  // empty: stays
    }
  return k;
}

double boundary_gap(const TokenDecision& t, int64_t k) {
  if (t.order.empty() || k >= static_cast<int64_t>(t.order.size())) return kInf;
  return gap(t, t.score[static_cast<size_t>(t.order[static_cast<size_t>(k - 1)])],
             t.score[static_cast<size_t>(t.order[static_cast<size_t>(k)])]);
}

double order_gap(const TokenDecision& t, int64_t k) {
  double g = kInf;
  for (int64_t j = 1; j < k && j < static_cast<int64_t>(t.order.size()); ++j)
    g = std::min(g, gap(t, t.score[static_cast<size_t>(t.order[static_cast<size_t>(j - 1)])],
                        t.score[static_cast<size_t>(t.order[static_cast<size_t>(j)])]));
  return g;
}

Routing as_routing(const Decisions& d) {
  Routing r;
  r.tokens = d.tokens;
  r.experts = d.experts;
  r.token.resize(static_cast<size_t>(d.tokens));
  for (int64_t t = 0; t < d.tokens; ++t) {
    const TokenDecision& td = d.token[static_cast<size_t>(t)];
    TokenRouting& tr = r.token[static_cast<size_t>(t)];
    tr.padded = td.padded;
    for (size_t j = 0; j < td.experts.size(); ++j)
      tr.slots.push_back({td.experts[j], td.weights[j], false});
    r.k = std::max<int64_t>(r.k, static_cast<int64_t>(tr.slots.size()));
  }
  return r;
}

}  // namespace ref::prototype
