// SPDX-License-Identifier: Apache-2.0
// Double-precision reference of Sinkhorn routing (see sinkhorn_ref.hpp).
#include "reference/sinkhorn_ref.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace sinkhorn_ref {
namespace {

const double kInf = std::numeric_limits<double>::infinity();

double logsumexp(const std::vector<double>& v) {
  double m = -kInf;
  for (double a : v) m = std::max(m, a);
  double s = 0.0;
  for (double a : v) s += std::exp(a - m);
  return m + std::log(s);
}

std::vector<double> softmax(const std::vector<double>& v) {
  const double lse = logsumexp(v);
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = std::exp(v[i] - lse);
  return out;
}

}  // namespace

Result route(const Params& p, const float* gate_weight, const float* x, int64_t T,
             const uint8_t* padding) {
  const int64_t E = p.num_experts, d = p.hidden, k = p.k;
  Result res;
  res.tokens = T;
  res.experts = E;
  res.k = k;
  res.logits.assign(static_cast<size_t>(T * E), 0.0);
  res.log_plan.assign(static_cast<size_t>(T * E), -kInf);
  res.padded.assign(static_cast<size_t>(T), 0);
  res.experts_of.resize(static_cast<size_t>(T));
  res.weights_of.resize(static_cast<size_t>(T));
  res.boundary_gap.assign(static_cast<size_t>(T), kInf);
  res.order_gap.assign(static_cast<size_t>(T), kInf);

  // Logits of the unpadded tokens, in token order.
  std::vector<int64_t> tokens;
  for (int64_t t = 0; t < T; ++t) {
    res.padded[static_cast<size_t>(t)] = padding != nullptr && padding[t] != 0;
    if (res.padded[static_cast<size_t>(t)]) continue;
    tokens.push_back(t);
    for (int64_t e = 0; e < E; ++e) {
      double s = 0.0;
      for (int64_t j = 0; j < d; ++j)
        s += static_cast<double>(x[t * d + j]) * static_cast<double>(gate_weight[e * d + j]);
      res.logits[static_cast<size_t>(t * E + e)] = s;
    }
  }
  const auto R = static_cast<int64_t>(tokens.size());
  res.routed = R;
  if (R == 0) return res;

  // log K = C / xi.
  std::vector<std::vector<double>> logK(static_cast<size_t>(R),
                                        std::vector<double>(static_cast<size_t>(E)));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = tokens[static_cast<size_t>(r)];
    std::vector<double> L(res.logits.begin() + t * E, res.logits.begin() + (t + 1) * E);
    const std::vector<double> C = p.cost == Cost::probs ? softmax(L) : L;
    for (int64_t e = 0; e < E; ++e)
      logK[static_cast<size_t>(r)][static_cast<size_t>(e)] =
          C[static_cast<size_t>(e)] / p.temperature;
  }

  // Sinkhorn: rows sum to 1, columns to R / E.
  const double col_target = static_cast<double>(R) / static_cast<double>(E);
  std::vector<double> log_u(static_cast<size_t>(R), 0.0), log_v(static_cast<size_t>(E), 0.0);
  for (int64_t it = 1; it <= p.max_iters; ++it) {
    for (int64_t r = 0; r < R; ++r) {
      std::vector<double> a(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e)
        a[static_cast<size_t>(e)] =
            logK[static_cast<size_t>(r)][static_cast<size_t>(e)] + log_v[static_cast<size_t>(e)];
      log_u[static_cast<size_t>(r)] = -logsumexp(a);
    }
    double err = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      double col = 0.0;
      for (int64_t r = 0; r < R; ++r)
        col += std::exp(logK[static_cast<size_t>(r)][static_cast<size_t>(e)] +
                        log_u[static_cast<size_t>(r)] + log_v[static_cast<size_t>(e)]);
      err = std::max(err, std::fabs(col - col_target) / col_target);
    }
    for (int64_t e = 0; e < E; ++e) {
      std::vector<double> a(static_cast<size_t>(R));
      for (int64_t r = 0; r < R; ++r)
        a[static_cast<size_t>(r)] =
            logK[static_cast<size_t>(r)][static_cast<size_t>(e)] + log_u[static_cast<size_t>(r)];
      log_v[static_cast<size_t>(e)] = std::log(col_target) - logsumexp(a);
    }
    res.error_history.push_back(err);
    res.iterations = it;
    res.error = err;
    if (err < p.tolerance) break;
  }

  // Plan (one token: the unique plan 1/E), top-k and weights per token.
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = tokens[static_cast<size_t>(r)];
    const double* L = res.logits.data() + t * E;
    double* lp = res.log_plan.data() + t * E;
    for (int64_t e = 0; e < E; ++e)
      lp[e] = R == 1 ? std::log(1.0 / static_cast<double>(E))
                     : log_u[static_cast<size_t>(r)] +
                           logK[static_cast<size_t>(r)][static_cast<size_t>(e)] +
                           log_v[static_cast<size_t>(e)];
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      if (lp[a] != lp[b]) return lp[a] > lp[b];
      if (L[a] != L[b]) return L[a] > L[b];
      return a < b;
    });
    std::vector<int64_t>& ids = res.experts_of[static_cast<size_t>(t)];
    std::vector<double>& w = res.weights_of[static_cast<size_t>(t)];
    ids.assign(order.begin(), order.begin() + k);
    if (k < E)
      res.boundary_gap[static_cast<size_t>(t)] =
          lp[order[static_cast<size_t>(k - 1)]] - lp[order[static_cast<size_t>(k)]];
    for (int64_t j = 0; j + 1 < k; ++j)
      res.order_gap[static_cast<size_t>(t)] =
          std::min(res.order_gap[static_cast<size_t>(t)],
                   lp[ids[static_cast<size_t>(j)]] - lp[ids[static_cast<size_t>(j) + 1]]);
    if (p.weight_mode == WeightMode::transport) {
      double sum = 0.0;
      for (int64_t e : ids) sum += std::exp(lp[e] - lp[ids[0]]);
      for (int64_t e : ids) w.push_back(std::exp(lp[e] - lp[ids[0]]) / sum);
    } else if (k == 1) {
      w.push_back(1.0 / (1.0 + std::exp(-L[ids[0]])));
    } else {
      const std::vector<double> s = softmax(std::vector<double>(L, L + E));
      for (int64_t e : ids) w.push_back(s[static_cast<size_t>(e)]);
    }
  }
  return res;
}

void marginals(const Result& r, std::vector<double>& column_sums, std::vector<double>& row_sums) {
  const int64_t T = r.tokens, E = r.experts;
  column_sums.assign(static_cast<size_t>(E), 0.0);
  row_sums.assign(static_cast<size_t>(T), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    if (r.padded[static_cast<size_t>(t)]) continue;
    for (int64_t e = 0; e < E; ++e) {
      const double v = std::exp(r.log_plan[static_cast<size_t>(t * E + e)]);
      column_sums[static_cast<size_t>(e)] += v;
      row_sums[static_cast<size_t>(t)] += v;
    }
  }
}

uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z;
}

bool selective_draw(uint64_t seed, uint64_t step, uint64_t layer, double p) {
  const uint64_t h = splitmix64(seed ^ (step * 0x9E3779B97F4A7C15ull) ^ layer);
  if (!(p > 0.0)) return false;
  // p = M * 2^(ex - 53) with M a 53-bit integer; h / 2^64 < p  <=>  h * 2^(53 - ex) < M * 2^64.
  int ex = 0;
  const double m = std::frexp(p, &ex);  // p = m * 2^ex, m in [0.5, 1)
  const auto M = static_cast<unsigned __int128>(std::ldexp(m, 53));
  const int shift = 64 + ex - 53;  // h < M * 2^shift
  if (shift >= 0) return static_cast<unsigned __int128>(h) < (M << shift);
  if (-shift >= 64) return h == 0 ? M > 0 : false;  // M * 2^shift < 1 (M < 2^53, shift <= -64)
  return (static_cast<unsigned __int128>(h) << (-shift)) < M;
}

}  // namespace sinkhorn_ref
