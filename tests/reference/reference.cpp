// SPDX-License-Identifier: Apache-2.0
// Double-precision reference of the top-k router family and the sparse MoE layer.
// Plain loops, written for clarity; deliberately includes no moekit header.
#include "reference/reference.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

namespace ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

double dot(const float* a, const float* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }


// Collects messages, keeping the first 20 (then one "omitted" marker).
struct Errors {
  std::vector<std::string>& out;
  template <class... A>
  void add(const A&... parts) {
    if (out.size() > 20) return;
    if (out.size() == 20) {
      out.push_back("... further errors omitted");
      return;
    }
    std::ostringstream os;
    (os << ... << parts);
    out.push_back(os.str());
  }
};

}  // namespace

// Indices 0..n-1 sorted by descending value, ties to the lower index.
std::vector<int64_t> descending_order(const std::vector<double>& v) {
  std::vector<int64_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return v[static_cast<size_t>(a)] > v[static_cast<size_t>(b)];
  });
  return idx;
}

std::vector<double> softmax(const std::vector<double>& x) {
  double m = -kInf;
  for (double v : x) m = std::max(m, v);
  std::vector<double> y(x.size());
  double sum = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    y[i] = std::exp(x[i] - m);
    sum += y[i];
  }
  for (double& v : y) v /= sum;
  return y;
}

// ---------------------------------------------------------------------------- routing

int64_t capacity(const TopKParams& p, int64_t routed_tokens) {
  if (p.capacity_factor == 0.0) return -1;
  const double c = std::ceil((static_cast<double>(routed_tokens * p.k) / static_cast<double>(p.num_experts)) *
                             p.capacity_factor);
  return std::max<int64_t>(p.min_capacity, static_cast<int64_t>(c));
}

Routing route_topk(const TopKParams& p, const float* W, const float* x, int64_t T, const uint8_t* padding) {
  const int64_t E = p.num_experts, k = p.k, d = p.hidden;
  const bool grouped = p.n_group > 1;
  Routing r;
  r.tokens = T;
  r.experts = E;
  r.k = k;
  r.drop_policy = p.drop_policy;
  r.token.resize(static_cast<size_t>(T));
  int64_t routed = 0;

  for (int64_t t = 0; t < T; ++t) {
    TokenRouting& tr = r.token[static_cast<size_t>(t)];
    if (padding != nullptr && padding[t] != 0) {
      tr.padded = true;
      continue;
    }
    ++routed;
    // Logits and scores.
    std::vector<double> L(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) L[static_cast<size_t>(e)] = dot(x + t * d, W + e * d, d);
    std::vector<double> score(static_cast<size_t>(E), 0.0);
    if (!p.topk_then_softmax) {
      if (p.score_func == ScoreFunc::softmax) {
        score = softmax(L);
      } else {
        for (int64_t e = 0; e < E; ++e) score[static_cast<size_t>(e)] = sigmoid(L[static_cast<size_t>(e)]);
      }
    }
    // Selection scores: (L or score) + selection-only bias.
    std::vector<double>& sel = tr.selection;
    sel.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      const auto i = static_cast<size_t>(e);
      sel[i] = (p.topk_then_softmax || p.select_on_logits || p.sparsemixer_eps > 0 ? L[i] : score[i]) +
               (p.bias.empty() ? 0.0 : p.bias[i]);
    }
    // Group-limited selection.
    if (grouped) {
      const int64_t G = p.n_group, g = E / G;
      tr.group_scores.resize(static_cast<size_t>(G));
      for (int64_t gi = 0; gi < G; ++gi) {
        std::vector<double> members(sel.begin() + gi * g, sel.begin() + (gi + 1) * g);
        std::sort(members.begin(), members.end(), std::greater<>());
        double gs = 0.0;
        switch (p.group_score) {
          case GroupScore::top2_sum:
            gs = g == 1 ? members[0] : members[0] + members[1];
            break;
          case GroupScore::max:
            gs = members[0];
            break;
          case GroupScore::topk_sum:
            for (int64_t i = 0; i < std::min(p.k / p.topk_group, g); ++i) gs += members[static_cast<size_t>(i)];
            break;
        }
        tr.group_scores[static_cast<size_t>(gi)] = gs;
      }
      tr.group_order = descending_order(tr.group_scores);
      for (int64_t j = p.topk_group; j < G; ++j) {
        const int64_t gi = tr.group_order[static_cast<size_t>(j)];
        for (int64_t e = gi * g; e < (gi + 1) * g; ++e) sel[static_cast<size_t>(e)] = -kInf;
      }
    }
    // Top-k: descending selection score, ties to the lower expert id.
    tr.order = descending_order(sel);
    std::vector<double> w(static_cast<size_t>(k));
    if (p.sparsemixer_eps > 0) {
      // PhiMoE sparsemixer (HF modeling_phimoe.py, inference): pick j is the j-th largest
      // logit m; its weight is exp(0) / sum of exp(L_e - m) over the candidates e (all but
      // the earlier pick) with (m - L_e) / max(|L_e|, m) <= 2 eps.
      for (int64_t j = 0; j < 2; ++j) {
        const double m = L[static_cast<size_t>(tr.order[static_cast<size_t>(j)])];
        double sum = 0.0;
        for (int64_t e = 0; e < E; ++e) {
          const double le = L[static_cast<size_t>(e)];
          if (j == 1 && e == tr.order[0]) continue;
          const double factor = std::max(std::fabs(le), m);
          if ((m - le) / factor > 2.0 * p.sparsemixer_eps) continue;
          sum += std::exp(le - m);
        }
        w[static_cast<size_t>(j)] = 1.0 / sum;
      }
    } else if (p.topk_then_softmax) {
      std::vector<double> picked(static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j) picked[static_cast<size_t>(j)] = L[static_cast<size_t>(tr.order[static_cast<size_t>(j)])];
      w = softmax(picked);
    } else {
      for (int64_t j = 0; j < k; ++j) w[static_cast<size_t>(j)] = score[static_cast<size_t>(tr.order[static_cast<size_t>(j)])];
      if (p.norm_topk_prob) {
        double sum = 0.0;
        for (double v : w) sum += v;
        for (double& v : w) v /= (sum + 1e-20);
      } else if (p.norm_p > 0) {
        double sum = 0.0;
        for (double v : w) sum += std::pow(v, p.norm_p);
        const double norm = std::pow(sum, 1.0 / p.norm_p);
        if (norm > 0)
          for (double& v : w) v /= norm;
      }
    }
    if (p.uniform_weights)
      for (double& v : w) v = 1.0 / static_cast<double>(k);
    for (double& v : w) v *= p.routed_scaling_factor;
    for (int64_t j = 0; j < k; ++j)
      tr.slots.push_back({tr.order[static_cast<size_t>(j)], w[static_cast<size_t>(j)], false});
  }

  // Capacity: per expert keep C slots in policy order, drop the rest (weight 0).
  apply_capacity(r, capacity(p, routed), p.drop_policy, p.renormalize_after_drop, p.routed_scaling_factor);
  return r;
}

void apply_capacity(Routing& r, int64_t C, DropPolicy policy, bool renormalize, double renormalize_to) {
  const int64_t T = r.tokens, E = r.experts;
  r.capacity = C;
  r.drop_policy = policy;
  if (r.capacity >= 0) {
    struct Candidate {
      int64_t token, rank;
      double weight;
    };
    for (int64_t e = 0; e < E; ++e) {
      std::vector<Candidate> cand;  // built in token order
      for (int64_t t = 0; t < T; ++t) {
        const auto& slots = r.token[static_cast<size_t>(t)].slots;
        for (size_t j = 0; j < slots.size(); ++j)
          if (slots[j].expert == e) cand.push_back({t, static_cast<int64_t>(j), slots[j].weight});
      }
      if (static_cast<int64_t>(cand.size()) <= C) continue;
      if (policy == DropPolicy::score) {
        std::stable_sort(cand.begin(), cand.end(),
                         [](const Candidate& a, const Candidate& b) { return a.weight > b.weight; });
        if (C > 0)
          r.capacity_boundary_gap = std::min(r.capacity_boundary_gap,
                                             relative_gap(cand[static_cast<size_t>(C - 1)].weight,
                                                          cand[static_cast<size_t>(C)].weight));
      } else if (policy == DropPolicy::position_slot_major) {
        std::stable_sort(cand.begin(), cand.end(),
                         [](const Candidate& a, const Candidate& b) { return a.rank < b.rank; });
      }  // position: token order as built
      for (size_t i = static_cast<size_t>(C); i < cand.size(); ++i) {
        Slot& s = r.token[static_cast<size_t>(cand[i].token)].slots[static_cast<size_t>(cand[i].rank)];
        s.dropped = true;
        s.weight = 0.0;
      }
    }
    if (renormalize) {
      for (TokenRouting& tr : r.token) {
        double sum = 0.0;
        for (const Slot& s : tr.slots)
          if (!s.dropped) sum += s.weight;
        if (sum <= 0.0) continue;
        for (Slot& s : tr.slots)
          if (!s.dropped) s.weight = s.weight / sum * renormalize_to;
      }
    }
  }

  r.kept_of.assign(static_cast<size_t>(E), 0);
  r.dropped_of.assign(static_cast<size_t>(E), 0);
  for (const TokenRouting& tr : r.token)
    for (const Slot& s : tr.slots) ++(s.dropped ? r.dropped_of : r.kept_of)[static_cast<size_t>(s.expert)];
}

double relative_gap(double a, double b) {
  if (a == b) return 0.0;
  if (std::isinf(a) || std::isinf(b)) return kInf;
  return std::fabs(a - b) / std::max(std::fabs(a), std::fabs(b));
}

double boundary_gap(const TokenRouting& t, int64_t k) {
  if (t.padded) return kInf;
  double gap = kInf;
  const auto E = static_cast<int64_t>(t.order.size());
  if (k < E)
    gap = relative_gap(t.selection[static_cast<size_t>(t.order[static_cast<size_t>(k - 1)])],
                       t.selection[static_cast<size_t>(t.order[static_cast<size_t>(k)])]);
  // Group boundary: the last kept group against the first masked one. A group is kept iff
  // its experts are not -inf; count kept groups from the selection.
  if (!t.group_scores.empty()) {
    const auto G = static_cast<int64_t>(t.group_scores.size()), g = E / G;
    int64_t kept = 0;
    for (int64_t gi = 0; gi < G; ++gi)
      kept += t.selection[static_cast<size_t>(gi * g)] != -kInf;
    if (kept < G)
      gap = std::min(gap, relative_gap(t.group_scores[static_cast<size_t>(t.group_order[static_cast<size_t>(kept - 1)])],
                                       t.group_scores[static_cast<size_t>(t.group_order[static_cast<size_t>(kept)])]));
  }
  return gap;
}

double order_gap(const TokenRouting& t, int64_t k) {
  double gap = kInf;
  for (int64_t j = 1; j < k && j < static_cast<int64_t>(t.order.size()); ++j)
    gap = std::min(gap, relative_gap(t.selection[static_cast<size_t>(t.order[static_cast<size_t>(j - 1)])],
                                     t.selection[static_cast<size_t>(t.order[static_cast<size_t>(j)])]));
  return gap;
}

// ---------------------------------------------------------------------------- experts / layer

double activate(Activation a, double x) {
  switch (a) {
    case Activation::silu: return x / (1.0 + std::exp(-x));
    case Activation::gelu: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::gelu_tanh: {
      const double c = std::sqrt(2.0 / 3.14159265358979323846);
      return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
    }
    case Activation::relu: return x > 0.0 ? x : 0.0;
  }
  return x;
}

std::vector<double> ffn_forward(const Ffn& f, const std::vector<double>& x) {
  const int64_t d = f.hidden, n = f.intermediate;
  std::vector<double> h(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    double up = 0.0;
    for (int64_t i = 0; i < d; ++i) up += static_cast<double>(f.up[static_cast<size_t>(j * d + i)]) * x[static_cast<size_t>(i)];
    if (f.gated) {
      double gate = 0.0;
      for (int64_t i = 0; i < d; ++i)
        gate += static_cast<double>(f.gate[static_cast<size_t>(j * d + i)]) * x[static_cast<size_t>(i)];
      h[static_cast<size_t>(j)] = activate(f.act, gate) * up;
    } else {
      h[static_cast<size_t>(j)] = activate(f.act, up);
    }
  }
  std::vector<double> y(static_cast<size_t>(d), 0.0);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < n; ++j)
      y[static_cast<size_t>(i)] += static_cast<double>(f.down[static_cast<size_t>(i * n + j)]) * h[static_cast<size_t>(j)];
  return y;
}

std::vector<double> moe_forward(const Routing& r, const ExpertFn& experts, const std::vector<Shared>& shared,
                                const float* x, int64_t T, int64_t d, bool weight_on_input) {
  std::vector<double> y(static_cast<size_t>(T * d), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const TokenRouting& tr = r.token[static_cast<size_t>(t)];
    if (tr.padded) continue;
    std::vector<double> xt(x + t * d, x + (t + 1) * d);
    double* yt = y.data() + t * d;
    // PR-MoE: the routed part is scaled by c_0 (computed here), the residual expert by c_1.
    double c0 = 1.0, c1 = 1.0;
    for (const Shared& sh : shared) {
      if (sh.coefficient.empty()) continue;
      const double z0 = dot(x + t * d, sh.coefficient.data(), d) + sh.coefficient_bias[0];
      const double z1 = dot(x + t * d, sh.coefficient.data() + d, d) + sh.coefficient_bias[1];
      const double m = std::max(z0, z1);
      c0 = std::exp(z0 - m) / (std::exp(z0 - m) + std::exp(z1 - m));
      c1 = 1.0 - c0;
    }
    std::vector<double> routed(static_cast<size_t>(d), 0.0);
    double* yr = routed.data();
    for (const Slot& s : tr.slots) {
      if (s.dropped) continue;
      if (weight_on_input) {
        std::vector<double> xs(static_cast<size_t>(d));
        for (int64_t i = 0; i < d; ++i)
          xs[static_cast<size_t>(i)] = static_cast<float>(static_cast<float>(s.weight) * x[t * d + i]);
        const std::vector<double> o = experts(s.expert, xs);
        for (int64_t i = 0; i < d; ++i) yr[i] += o[static_cast<size_t>(i)];
        continue;
      }
      const std::vector<double> o = experts(s.expert, xt);
      for (int64_t i = 0; i < d; ++i) yr[i] += s.weight * o[static_cast<size_t>(i)];
    }
    for (int64_t i = 0; i < d; ++i) yt[i] += c0 * yr[i];
    for (const Shared& sh : shared) {
      const double g = !sh.coefficient.empty() ? c1 : sh.gate.empty() ? 1.0 : sigmoid(dot(x + t * d, sh.gate.data(), d));
      const std::vector<double> o = ffn_forward(sh.ffn, xt);
      for (int64_t i = 0; i < d; ++i) yt[i] += g * o[static_cast<size_t>(i)];
    }
  }
  return y;
}

std::vector<double> moe_forward(const Routing& r, const std::vector<Ffn>& experts, const std::vector<Shared>& shared,
                                const float* x, int64_t T, int64_t d, bool weight_on_input) {
  return moe_forward(
      r, [&](int64_t e, const std::vector<double>& xt) { return ffn_forward(experts[static_cast<size_t>(e)], xt); },
      shared, x, T, d, weight_on_input);
}

// ---------------------------------------------------------------------------- comparison

Routing routing_from_view(const PlanView& v, const uint8_t* padding) {
  Routing r;
  r.tokens = v.tokens;
  r.experts = v.experts;
  r.token.resize(static_cast<size_t>(v.tokens));
  for (int64_t t = 0; t < v.tokens; ++t) {
    TokenRouting& tr = r.token[static_cast<size_t>(t)];
    tr.padded = padding != nullptr && padding[t] != 0;
    for (int32_t s = v.slot_offsets[static_cast<size_t>(t)]; s < v.slot_offsets[static_cast<size_t>(t) + 1]; ++s)
      tr.slots.push_back({v.slot_expert[static_cast<size_t>(s)], static_cast<double>(v.slot_weight[static_cast<size_t>(s)]),
                          v.slot_dropped[static_cast<size_t>(s)] != 0});
    r.k = std::max<int64_t>(r.k, static_cast<int64_t>(tr.slots.size()));
  }
  return r;
}

std::vector<std::string> plan_invariant_errors(const PlanView& v, const uint8_t* padding, int64_t k) {
  std::vector<std::string> out;
  Errors err{out};
  const int64_t T = v.tokens, E = v.experts;
  if (!v.finalized) err.add("plan not finalized");
  if (static_cast<int64_t>(v.slot_offsets.size()) != T + 1) {
    err.add("slot_offsets size ", v.slot_offsets.size(), ", expected ", T + 1);
    return out;
  }
  const auto S = static_cast<size_t>(v.num_slots);
  if (v.slot_offsets[0] != 0 || v.slot_offsets.back() != v.num_slots) err.add("slot_offsets ends wrong");
  if (v.slot_expert.size() != S || v.slot_weight.size() != S || v.slot_dropped.size() != S ||
      v.slot_token.size() != S || v.slot_position.size() != S) {
    err.add("per-slot array sizes differ from num_slots = ", S);
    return out;
  }
  int64_t kept = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int32_t b = v.slot_offsets[static_cast<size_t>(t)], e_ = v.slot_offsets[static_cast<size_t>(t) + 1];
    if (e_ < b) {
      err.add("slot_offsets decrease at token ", t);
      continue;
    }
    const bool padded = padding != nullptr && padding[t] != 0;
    if (padded && e_ != b) err.add("padded token ", t, " has ", e_ - b, " slots, expected 0");
    if (!padded && k >= 0 && e_ - b != k) err.add("token ", t, " has ", e_ - b, " slots, expected ", k);
    std::vector<uint8_t> seen(static_cast<size_t>(E), 0);
    for (int32_t s = b; s < e_; ++s) {
      const auto si = static_cast<size_t>(s);
      const int32_t ex = v.slot_expert[si];
      if (ex < 0 || ex >= E) {
        err.add("slot ", s, " expert ", ex, " out of range");
        continue;
      }
      if (seen[static_cast<size_t>(ex)]++) err.add("token ", t, " has expert ", ex, " twice");
      if (v.slot_token[si] != t) err.add("slot_token[", s, "] = ", v.slot_token[si], ", expected ", t);
      if (!std::isfinite(v.slot_weight[si])) err.add("slot ", s, " weight not finite");
      if (v.slot_dropped[si]) {
        if (v.slot_weight[si] != 0.0f) err.add("dropped slot ", s, " has weight ", v.slot_weight[si], ", expected 0");
        if (v.slot_position[si] != -1) err.add("dropped slot ", s, " has position ", v.slot_position[si], ", expected -1");
      } else {
        ++kept;
        const int32_t pos = v.slot_position[si];
        if (pos < 0 || pos >= static_cast<int32_t>(v.expert_slots.size()) || v.expert_slots[static_cast<size_t>(pos)] != s)
          err.add("kept slot ", s, " position ", pos, " does not point back to it");
      }
    }
  }
  if (v.num_kept != kept) err.add("num_kept ", v.num_kept, ", expected ", kept);
  if (v.num_dropped != v.num_slots - kept) err.add("num_dropped ", v.num_dropped, ", expected ", v.num_slots - kept);
  // Expert side: the stable counting sort of the kept slots.
  std::vector<int32_t> want_offsets{0}, want_slots;
  for (int64_t e = 0; e < E; ++e) {
    int64_t dropped = 0;
    for (size_t s = 0; s < S; ++s) {
      if (v.slot_expert[s] != e) continue;
      if (v.slot_dropped[s]) ++dropped;
      else want_slots.push_back(static_cast<int32_t>(s));
    }
    want_offsets.push_back(static_cast<int32_t>(want_slots.size()));
    const int64_t kept_e = want_offsets.back() - want_offsets[want_offsets.size() - 2];
    if (static_cast<size_t>(e) < v.kept_of.size() && v.kept_of[static_cast<size_t>(e)] != kept_e)
      err.add("kept_of(", e, ") = ", v.kept_of[static_cast<size_t>(e)], ", expected ", kept_e);
    if (static_cast<size_t>(e) < v.dropped_of.size() && v.dropped_of[static_cast<size_t>(e)] != dropped)
      err.add("dropped_of(", e, ") = ", v.dropped_of[static_cast<size_t>(e)], ", expected ", dropped);
  }
  if (v.expert_offsets != want_offsets) err.add("expert_offsets differ from the counting sort of kept slots");
  if (v.expert_slots != want_slots) err.add("expert_slots differ from the stable counting sort of kept slots");
  if (v.expert_tokens.size() != v.expert_slots.size()) {
    err.add("expert_tokens size ", v.expert_tokens.size(), ", expected ", v.expert_slots.size());
  } else {
    for (size_t i = 0; i < v.expert_slots.size(); ++i) {
      const int32_t s = v.expert_slots[i];
      if (s >= 0 && static_cast<size_t>(s) < S && v.expert_tokens[i] != v.slot_token[static_cast<size_t>(s)])
        err.add("expert_tokens[", i, "] = ", v.expert_tokens[i], ", expected the slot's token ", v.slot_token[static_cast<size_t>(s)]);
    }
    for (int64_t e = 0; e + 1 < static_cast<int64_t>(v.expert_offsets.size()); ++e)
      for (int32_t i = v.expert_offsets[static_cast<size_t>(e)] + 1; i < v.expert_offsets[static_cast<size_t>(e) + 1]; ++i)
        if (i > 0 && static_cast<size_t>(i) < v.expert_tokens.size() &&
            v.expert_tokens[static_cast<size_t>(i)] <= v.expert_tokens[static_cast<size_t>(i) - 1])
          err.add("expert ", e, ": tokens not strictly ascending at ", i);
  }
  return out;
}

CompareReport compare_routing(const Routing& want, const PlanView& got, const CompareOptions& o) {
  CompareReport rep;
  Errors err{rep.errors};
  if (want.tokens != got.tokens || want.experts != got.experts ||
      static_cast<int64_t>(got.slot_offsets.size()) != got.tokens + 1) {
    err.add("plan shape: tokens ", got.tokens, " experts ", got.experts, ", expected ", want.tokens, " / ", want.experts);
    return rep;
  }
  const int64_t T = want.tokens;
  rep.excluded.assign(static_cast<size_t>(T), 0);
  std::vector<uint8_t> tie(static_cast<size_t>(T), 0), order_tie(static_cast<size_t>(T), 0);
  bool any_tie = false, any_order_tie = false;
  if (o.exclude_near_ties) {
    for (int64_t t = 0; t < T; ++t) {
      const TokenRouting& tr = want.token[static_cast<size_t>(t)];
      if (tr.padded) continue;
      tie[static_cast<size_t>(t)] = boundary_gap(tr, want.k) < o.tie_rel;
      order_tie[static_cast<size_t>(t)] = order_gap(tr, want.k) < o.tie_rel;
      any_tie |= tie[static_cast<size_t>(t)] != 0;
      any_order_tie |= order_tie[static_cast<size_t>(t)] != 0;
    }
  }
  // With capacity, one flipped choice (or a near-equal pair of weights at a score-policy
  // boundary) may move keep/drop decisions of other tokens: then compare choices only.
  // Weights exactly equal in double (k = 1 with renormalisation: all 1) are structural ties
  // that fp32 reproduces, resolved to the lower token: those are compared.
  const bool capacity_uncertain =
      want.capacity >= 0 && o.exclude_near_ties &&
      (any_tie || (want.drop_policy == DropPolicy::position_slot_major && any_order_tie) ||
       (want.drop_policy == DropPolicy::score && want.capacity_boundary_gap > 0.0 &&
        want.capacity_boundary_gap < o.tie_rel));

  for (int64_t t = 0; t < T; ++t) {
    const TokenRouting& tr = want.token[static_cast<size_t>(t)];
    const int32_t b = got.slot_offsets[static_cast<size_t>(t)];
    const int64_t n = got.slot_offsets[static_cast<size_t>(t) + 1] - b;
    if (tr.padded) {
      ++rep.padded;
      if (n != 0) err.add("padded token ", t, ": ", n, " slots, expected 0");
      continue;
    }
    if (n != static_cast<int64_t>(tr.slots.size())) {
      err.add("token ", t, ": ", n, " slots, expected ", tr.slots.size());
      rep.excluded[static_cast<size_t>(t)] = 1;
      continue;
    }
    if (tie[static_cast<size_t>(t)]) {
      ++rep.near_tie;
      rep.excluded[static_cast<size_t>(t)] = 1;
      continue;
    }
    // Match each reference slot with the library slot: by position, or by expert id when
    // two chosen scores near-tie (their slot order may legitimately differ).
    std::vector<int64_t> match(tr.slots.size(), -1);
    for (size_t j = 0; j < tr.slots.size(); ++j) {
      if (!order_tie[static_cast<size_t>(t)]) {
        if (got.slot_expert[static_cast<size_t>(b) + j] == tr.slots[j].expert) match[j] = b + static_cast<int64_t>(j);
      } else {
        for (int64_t s = b; s < b + n; ++s)
          if (got.slot_expert[static_cast<size_t>(s)] == tr.slots[j].expert) match[j] = s;
      }
    }
    bool ok = true;
    for (size_t j = 0; j < tr.slots.size(); ++j) ok &= match[j] >= 0;
    if (!ok) {
      std::ostringstream w, g;
      for (const Slot& s : tr.slots) w << s.expert << ' ';
      for (int64_t s = b; s < b + n; ++s) g << got.slot_expert[static_cast<size_t>(s)] << ' ';
      err.add("token ", t, ": experts [ ", g.str(), "], expected [ ", w.str(), "] (boundary gap ",
              boundary_gap(tr, want.k), ")");
      continue;
    }
    if (capacity_uncertain) {
      ++rep.capacity_excluded;
      rep.excluded[static_cast<size_t>(t)] = 1;
      continue;
    }
    ++rep.compared;
    for (size_t j = 0; j < tr.slots.size(); ++j) {
      const auto s = static_cast<size_t>(match[j]);
      const Slot& ws = tr.slots[j];
      if ((got.slot_dropped[s] != 0) != ws.dropped)
        err.add("token ", t, " slot ", j, " (expert ", ws.expert, "): dropped ", int(got.slot_dropped[s]), ", expected ",
                int(ws.dropped));
      const double gw = got.slot_weight[s];
      if (!(std::fabs(gw - ws.weight) <= o.weight_rel * std::fabs(ws.weight) + o.weight_abs))
        err.add("token ", t, " slot ", j, " (expert ", ws.expert, "): weight ", gw, ", expected ", ws.weight);
    }
  }
  return rep;
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

std::vector<std::string> compare_values(const std::vector<double>& want, const float* got, int64_t width, double rel,
                                        double abs_floor_frac, const std::vector<uint8_t>& skip_rows) {
  std::vector<std::string> out;
  Errors err{out};
  const double floor = abs_floor_frac * max_abs(want);
  for (size_t i = 0; i < want.size(); ++i) {
    const size_t row = width > 0 ? i / static_cast<size_t>(width) : 0;
    if (row < skip_rows.size() && skip_rows[row]) continue;
    const double g = got[i];
    if (!(std::fabs(g - want[i]) <= rel * std::fabs(want[i]) + floor))
      err.add("value [", row, ", ", width > 0 ? i % static_cast<size_t>(width) : i, "]: got ", g, ", expected ", want[i],
              " (tolerance ", rel * std::fabs(want[i]) + floor, ")");
  }
  return out;
}

}  // namespace ref
