// SPDX-License-Identifier: Apache-2.0
// Double-precision reference of expert-choice routing; see expert_choice_ref.hpp.
#include "reference/expert_choice_ref.hpp"

#include <algorithm>
#include <cmath>

namespace ref_ec {

namespace {

bool is_padded(const uint8_t* padding, int64_t t) { return padding != nullptr && padding[t] != 0; }

// Applies the per-token cap and the near-tie marks of a token's decided slots (all kept,
// in expert-id order on entry). `scores_of` are S[t, :].
void order_and_cap(TokenRouting& tok, const double* s, int64_t cap, double tie_rel) {
  // Descending S, ties to the lower expert id (a plain selection sort for clarity).
  std::vector<Slot>& v = tok.slots;
  for (size_t i = 0; i < v.size(); ++i) {
    size_t best = i;
    for (size_t j = i + 1; j < v.size(); ++j) {
      const double sj = s[v[j].expert], sb = s[v[best].expert];
      if (sj > sb || (sj == sb && v[j].expert < v[best].expert)) best = j;
    }
    std::swap(v[i], v[best]);
  }
  // Order near-ties between neighbours (exact ties are deliberate and reproduced by fp32
  // only when the scores are bitwise equal: callers pass tie_rel = 0 for those tests).
  for (size_t i = 0; i + 1 < v.size(); ++i)
    if (relative_gap(s[v[i].expert], s[v[i + 1].expert]) < tie_rel) tok.near_tie = true;
  if (cap > 0 && static_cast<int64_t>(v.size()) > cap) {
    for (size_t j = static_cast<size_t>(cap); j < v.size(); ++j) {
      v[j].dropped = true;
      v[j].weight = 0.0;
    }
  }
}

// Fills kept lists and per-expert near-tie flags from the token side. Ambiguous decisions
// already flagged their own expert; with a cap, any ambiguity of a token (its slot set, its
// order) may move the cap boundary, so every expert of that token is flagged too.
void finish(Routing& r, int64_t cap) {
  r.kept.assign(static_cast<size_t>(r.experts), {});
  if (r.expert_near_tie.empty()) r.expert_near_tie.assign(static_cast<size_t>(r.experts), 0);
  r.near_tie_tokens = 0;
  for (int64_t t = 0; t < r.tokens; ++t) {
    const TokenRouting& tok = r.token[static_cast<size_t>(t)];
    r.near_tie_tokens += tok.near_tie;
    for (const Slot& s : tok.slots) {
      if (!s.dropped) r.kept[static_cast<size_t>(s.expert)].push_back(t);
      if (tok.near_tie && cap > 0 && static_cast<int64_t>(tok.slots.size()) + tok.ambiguous > cap)
        r.expert_near_tie[static_cast<size_t>(s.expert)] = 1;
    }
  }
}

Routing start(const Params& p, const float* W, const float* x, int64_t T, const uint8_t* padding) {
  Routing r;
  r.tokens = T;
  r.experts = p.num_experts;
  r.scores = scores(p, W, x, T, padding);
  r.token.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    r.token[static_cast<size_t>(t)].padded = is_padded(padding, t);
    r.routed += !is_padded(padding, t);
  }
  r.picks.assign(static_cast<size_t>(p.num_experts), {});
  r.expert_near_tie.assign(static_cast<size_t>(p.num_experts), 0);
  return r;
}

// Unpadded tokens sorted by descending S[:, e], ties to the lower token index.
std::vector<int64_t> ranking(const Routing& r, int64_t e) {
  std::vector<int64_t> order;
  for (int64_t t = 0; t < r.tokens; ++t)
    if (!r.token[static_cast<size_t>(t)].padded) order.push_back(t);
  const int64_t E = r.experts;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return r.scores[static_cast<size_t>(a * E + e)] > r.scores[static_cast<size_t>(b * E + e)];
  });
  return order;
}

}  // namespace

int64_t capacity(int64_t routed_tokens, double capacity_factor, int64_t num_experts) {
  if (routed_tokens == 0) return 0;
  const double f = std::floor(double(routed_tokens) * capacity_factor / double(num_experts));
  if (f >= double(routed_tokens)) return routed_tokens;
  return std::max<int64_t>(1, static_cast<int64_t>(f));
}

double relative_gap(double a, double b) {
  if (a == b) return 0.0;
  return std::fabs(a - b) / std::max(std::fabs(a), std::fabs(b));
}

std::vector<double> scores(const Params& p, const float* W, const float* x, int64_t T,
                           const uint8_t* padding) {
  const int64_t E = p.num_experts, d = p.hidden;
  std::vector<double> S(static_cast<size_t>(T * E), 0.0);
  std::vector<double> L(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    if (is_padded(padding, t)) continue;
    double m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      double l = 0.0;
      for (int64_t i = 0; i < d; ++i) l += double(x[t * d + i]) * double(W[e * d + i]);
      L[static_cast<size_t>(e)] = l;
      m = std::max(m, l);
    }
    double z = 0.0;
    for (int64_t e = 0; e < E; ++e) z += std::exp(L[static_cast<size_t>(e)] - m);
    for (int64_t e = 0; e < E; ++e)
      S[static_cast<size_t>(t * E + e)] = std::exp(L[static_cast<size_t>(e)] - m) / z;
  }
  return S;
}

Routing route_batch(const Params& p, const float* W, const float* x, int64_t T,
                    const uint8_t* padding, double tie_rel) {
  Routing r = start(p, W, x, T, padding);
  const int64_t E = p.num_experts;
  r.kc = capacity(r.routed, p.capacity_factor, E);
  const auto kc = static_cast<size_t>(r.kc);
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<int64_t> order = ranking(r, e);
    r.picks[static_cast<size_t>(e)].assign(order.begin(),
                                           order.begin() + static_cast<std::ptrdiff_t>(kc));
    for (size_t j = 0; j < kc; ++j) {
      const int64_t t = order[j];
      r.token[static_cast<size_t>(t)].slots.push_back(
          {e, r.scores[static_cast<size_t>(t * E + e)], false});
    }
    // Expert boundary: the last picked and the first unpicked score.
    if (kc > 0 && kc < order.size()) {
      const double last = r.scores[static_cast<size_t>(order[kc - 1] * E + e)];
      const double first_out = r.scores[static_cast<size_t>(order[kc] * E + e)];
      if (relative_gap(last, first_out) < tie_rel) {
        for (int64_t t : order)
          if (relative_gap(r.scores[static_cast<size_t>(t * E + e)], last) < tie_rel ||
              relative_gap(r.scores[static_cast<size_t>(t * E + e)], first_out) < tie_rel) {
            r.token[static_cast<size_t>(t)].near_tie = true;
            ++r.token[static_cast<size_t>(t)].ambiguous;
          }
        r.expert_near_tie[static_cast<size_t>(e)] = 1;
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    TokenRouting& tok = r.token[static_cast<size_t>(t)];
    const double* s = r.scores.data() + t * E;
    // Which slot the cap drops depends on the scores at the cap boundary.
    std::vector<double> picked;
    for (const Slot& sl : tok.slots) picked.push_back(s[sl.expert]);
    std::sort(picked.rbegin(), picked.rend());
    const auto cap = static_cast<size_t>(p.max_experts_per_token);
    if (cap > 0 && picked.size() > cap && relative_gap(picked[cap - 1], picked[cap]) < tie_rel)
      tok.near_tie = true;
    order_and_cap(tok, s, p.max_experts_per_token, tie_rel);
  }
  finish(r, p.max_experts_per_token);
  return r;
}

Routing route_threshold(const Params& p, const float* W, const float* x, int64_t T,
                        const uint8_t* padding, const std::vector<double>& tau, double tie_rel) {
  Routing r = start(p, W, x, T, padding);
  const int64_t E = p.num_experts;
  for (int64_t t = 0; t < T; ++t) {
    TokenRouting& tok = r.token[static_cast<size_t>(t)];
    if (tok.padded) continue;
    const double* s = r.scores.data() + t * E;
    for (int64_t e = 0; e < E; ++e) {
      if (relative_gap(s[e], tau[static_cast<size_t>(e)]) < tie_rel) {
        tok.near_tie = true;
        ++tok.ambiguous;
        r.expert_near_tie[static_cast<size_t>(e)] = 1;
      }
      if (s[e] >= tau[static_cast<size_t>(e)]) tok.slots.push_back({e, s[e], false});
    }
    std::vector<double> picked;
    for (const Slot& sl : tok.slots) picked.push_back(s[sl.expert]);
    std::sort(picked.rbegin(), picked.rend());
    const auto cap = static_cast<size_t>(p.max_experts_per_token);
    if (cap > 0 && picked.size() > cap && relative_gap(picked[cap - 1], picked[cap]) < tie_rel)
      tok.near_tie = true;
    order_and_cap(tok, s, p.max_experts_per_token, tie_rel);
  }
  for (int64_t e = 0; e < E; ++e) {  // picks: tokens by descending score
    for (int64_t t : ranking(r, e))
      if (r.scores[static_cast<size_t>(t * E + e)] >= tau[static_cast<size_t>(e)])
        r.picks[static_cast<size_t>(e)].push_back(t);
  }
  finish(r, p.max_experts_per_token);
  return r;
}

std::vector<double> predictor_logits(const Params& p, const Predictor& a, const float* xt) {
  const int64_t d = p.hidden, H = a.aux_hidden, E = p.num_experts;
  std::vector<double> h(static_cast<size_t>(H)), z(static_cast<size_t>(E));
  for (int64_t j = 0; j < H; ++j) {
    double v = a.b0[static_cast<size_t>(j)];
    for (int64_t i = 0; i < d; ++i)
      v += double(a.w0[static_cast<size_t>(j * d + i)]) * double(xt[i]);
    h[static_cast<size_t>(j)] = v > 0.0 ? v : 0.0;
  }
  for (int64_t e = 0; e < E; ++e) {
    double v = a.b2[static_cast<size_t>(e)];
    for (int64_t j = 0; j < H; ++j)
      v += double(a.w2[static_cast<size_t>(e * H + j)]) * h[static_cast<size_t>(j)];
    z[static_cast<size_t>(e)] = v;
  }
  return z;
}

Routing route_predictor(const Params& p, const float* W, const float* x, int64_t T,
                        const uint8_t* padding, const Predictor& a, double tie_rel) {
  Routing r = start(p, W, x, T, padding);
  const int64_t E = p.num_experts, d = p.hidden, H = a.aux_hidden;
  std::vector<std::vector<double>> zs(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    TokenRouting& tok = r.token[static_cast<size_t>(t)];
    if (tok.padded) continue;
    const float* xt = x + t * d;
    const std::vector<double> z = predictor_logits(p, a, xt);
    zs[static_cast<size_t>(t)] = z;
    // Magnitude scale of each output: |b2| + sum_j |w2_ej h_j| with h over |terms| as well.
    std::vector<double> hmag(static_cast<size_t>(H));
    for (int64_t j = 0; j < H; ++j) {
      double m = std::fabs(double(a.b0[static_cast<size_t>(j)]));
      for (int64_t i = 0; i < d; ++i)
        m += std::fabs(double(a.w0[static_cast<size_t>(j * d + i)]) * double(xt[i]));
      hmag[static_cast<size_t>(j)] = m;
    }
    const double* s = r.scores.data() + t * E;
    for (int64_t e = 0; e < E; ++e) {
      double scale = std::fabs(double(a.b2[static_cast<size_t>(e)]));
      for (int64_t j = 0; j < H; ++j)
        scale +=
            std::fabs(double(a.w2[static_cast<size_t>(e * H + j)])) * hmag[static_cast<size_t>(j)];
      const double ze = z[static_cast<size_t>(e)];
      if (std::fabs(ze) <= 10.0 * tie_rel * scale) {
        tok.near_tie = true;
        ++tok.ambiguous;
        r.expert_near_tie[static_cast<size_t>(e)] = 1;
      }
      const double sig = 1.0 / (1.0 + std::exp(-ze));
      if (sig > 0.5) tok.slots.push_back({e, s[e], false});
    }
    std::vector<double> picked;
    for (const Slot& sl : tok.slots) picked.push_back(s[sl.expert]);
    std::sort(picked.rbegin(), picked.rend());
    const auto cap = static_cast<size_t>(p.max_experts_per_token);
    if (cap > 0 && picked.size() > cap && relative_gap(picked[cap - 1], picked[cap]) < tie_rel)
      tok.near_tie = true;
    order_and_cap(tok, s, p.max_experts_per_token, tie_rel);
  }
  for (int64_t e = 0; e < E; ++e)
    for (int64_t t : ranking(r, e))
      if (1.0 / (1.0 + std::exp(-zs[static_cast<size_t>(t)][static_cast<size_t>(e)])) > 0.5)
        r.picks[static_cast<size_t>(e)].push_back(t);
  finish(r, p.max_experts_per_token);
  return r;
}

std::vector<double> kth_scores(const Params& p, const float* W, const float* x, int64_t T,
                               const uint8_t* padding) {
  Routing r = start(p, W, x, T, padding);
  const int64_t kc = capacity(r.routed, p.capacity_factor, p.num_experts);
  std::vector<double> kth;
  if (kc == 0) return kth;
  for (int64_t e = 0; e < p.num_experts; ++e) {
    std::vector<double> col;
    for (int64_t t = 0; t < T; ++t)
      if (!is_padded(padding, t))
        col.push_back(r.scores[static_cast<size_t>(t * p.num_experts + e)]);
    std::sort(col.begin(), col.end(), [](double a, double b) { return a > b; });
    kth.push_back(col[static_cast<size_t>(kc - 1)]);
  }
  return kth;
}

std::vector<double> calibrate(const Params& p, const std::vector<double>& tau, double decay,
                              const float* W, const float* x, int64_t T, const uint8_t* padding) {
  const std::vector<double> kth = kth_scores(p, W, x, T, padding);
  if (kth.empty()) return tau;
  if (tau.empty()) return kth;
  std::vector<double> out(tau.size());
  for (size_t e = 0; e < tau.size(); ++e) out[e] = decay * tau[e] + (1.0 - decay) * kth[e];
  return out;
}

void expert_outputs(const Routing& r, int64_t width, std::vector<int32_t>& ids,
                    std::vector<double>& weights) {
  const int64_t E = r.experts;
  ids.assign(static_cast<size_t>(E * width), -1);
  weights.assign(static_cast<size_t>(E * width), 0.0);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> kept = r.kept[static_cast<size_t>(e)];
    std::stable_sort(kept.begin(), kept.end(), [&](int64_t a, int64_t b) {
      return r.scores[static_cast<size_t>(a * E + e)] > r.scores[static_cast<size_t>(b * E + e)];
    });
    for (size_t j = 0; j < kept.size() && static_cast<int64_t>(j) < width; ++j) {
      ids[static_cast<size_t>(e * width) + j] = static_cast<int32_t>(kept[j]);
      weights[static_cast<size_t>(e * width) + j] = r.scores[static_cast<size_t>(kept[j] * E + e)];
    }
  }
}

std::vector<double> ffn_forward(const Ffn& f, const float* x) {
  const int64_t d = f.hidden, n = f.intermediate;
  std::vector<double> h(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    double g = 0.0, u = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      g += double(f.gate[static_cast<size_t>(j * d + i)]) * double(x[i]);
      u += double(f.up[static_cast<size_t>(j * d + i)]) * double(x[i]);
    }
    h[static_cast<size_t>(j)] = g / (1.0 + std::exp(-g)) * u;
  }
  std::vector<double> y(static_cast<size_t>(d));
  for (int64_t i = 0; i < d; ++i) {
    double v = 0.0;
    for (int64_t j = 0; j < n; ++j)
      v += double(f.down[static_cast<size_t>(i * n + j)]) * h[static_cast<size_t>(j)];
    y[static_cast<size_t>(i)] = v;
  }
  return y;
}

std::vector<double> moe_forward(const std::vector<std::vector<Contribution>>& per_token,
                                const std::vector<Ffn>& experts, const float* x, int64_t T,
                                int64_t d) {
  std::vector<double> y(static_cast<size_t>(T * d), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (const Contribution& c : per_token[static_cast<size_t>(t)]) {
      const std::vector<double> o = ffn_forward(experts[static_cast<size_t>(c.expert)], x + t * d);
      for (int64_t i = 0; i < d; ++i)
        y[static_cast<size_t>(t * d + i)] += c.weight * o[static_cast<size_t>(i)];
    }
  }
  return y;
}

}  // namespace ref_ec
