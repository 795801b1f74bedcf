// SPDX-License-Identifier: Apache-2.0
// EAQuant's expert-aware smoothing (arXiv 2506.13329) for layers whose experts quantise their
// activations (w8a8, w4a8): per-channel scales from calibration tokens that move the input's
// outlier channels into the weights, one scale shared by every expert so the router reads
// the hidden state unchanged.
//
// Semantics follow the official code, darren-fzq1/EAQuant 37c45090 (quantize/smooth.py:
// get_scale, merge_scale with the default "max" merge, calcu_outlier_mask; quantize/
// outlier_finder.py: otsu; utils.py: get_act_scales, get_act_per_channel_scales; main.py's
// defaults alpha 0.6, otsu_ratio 0.65, otsu_smooth_rate 0.7):
//  - expert e's factor for input channel j is `s_ej = A_ej^a / W_ej^(1-a)`, where A_ej is the
//    largest |x_j| over the calibration tokens routed to e, W_ej the largest |w_rj| over e's
//    gate and up rows (A, W and s clamped below at 1e-5), a = alpha;
//  - the layer's factor is the largest over the experts that saw a token and the shared
//    experts (whose A is over every token): `s_j = max(max_e s_ej, max_sh s_shj)`. The
//    official code folds 1 / s into the RMSNorm before the layer and s into the router, the
//    experts and the shared experts; moekit does not own the norm, so each bank divides its
//    input by s (FfnBank's input smoothing) and the router reads x as before: routing is
//    bit-identical to the unsmoothed layer's;
//  - per expert, the down projection's input h (`act(gate x) * up x`) gets an outlier scale
//    from each channel's largest and smallest value (an exponential average over the
//    calibration sequences, 0.9 old + 0.1 new, as the official hooks see one sample at a
//    time): channels beyond an interquartile fence, narrowed by Otsu's split, are divided by
//    `(value / largest normal value)^rate`; the scale is folded into the weights (up rows / s,
//    down columns * s), so nothing changes at run time. Gated, unclamped experts only (for a
//    plain `act(up x)` or gpt-oss's clamp the fold is not exact).
// Deviations, each where the official code would fail: an expert no calibration token reached
// takes no part in the merge (the official code has no statistics for it and stops); a down
// scale that comes out NaN, infinite or <= 0 (a reference value of 0 or of the wrong sign) is
// 1; when no Otsu cut scores above the official initial -1000 the fence stays (the official
// code raises). With SparseLayer::set_weight_on_input the statistics read the rows the
// experts see, `w x`.
// Not carried over: the router's KL-searched weight clipping (moekit's routers stay f32) and
// the calibration-time token cap per expert, which feeds the official learned rotations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/layer.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::eaquant {

/// EAQuant's knobs, with the official defaults.
struct Options {
  double alpha = 0.6;              ///< migration strength a in (0, 1)
  bool smooth_down = true;         ///< also the down projections' outlier scales
  double otsu_ratio = 0.65;        ///< the fence's quantiles: ratio and 1 - ratio, ratio in (0.5, 1)
  double otsu_smooth_rate = 0.7;   ///< exponent on an outlier channel's ratio, in (0, 1]
  double fence = 1.5;              ///< interquartile multiple of the fence, >= 0

  void validate() const {
    MOEKIT_CHECK(alpha > 0.0 && alpha < 1.0, "eaquant::Options: alpha expected in (0, 1), got ", alpha);
    MOEKIT_CHECK(otsu_ratio > 0.5 && otsu_ratio < 1.0, "eaquant::Options: otsu_ratio expected in (0.5, 1), got ",
                 otsu_ratio);
    MOEKIT_CHECK(otsu_smooth_rate > 0.0 && otsu_smooth_rate <= 1.0,
                 "eaquant::Options: otsu_smooth_rate expected in (0, 1], got ", otsu_smooth_rate);
    MOEKIT_CHECK(fence >= 0.0 && std::isfinite(fence), "eaquant::Options: fence expected finite and >= 0, got ", fence);
  }
};

/// What calibrate() found.
struct Smoothing {
  std::vector<float> input;  ///< s `[d]`: every bank's input smoothing (FfnBank)
  /// Per routed expert: the down projection's outlier scale `[f]`, all 1 when no token reached
  /// the expert; empty when down smoothing is off or does not apply.
  std::vector<std::vector<float>> down;
  /// Per shared expert (when any bank has down scales): its down scale `[f_j]`, all 1 when its
  /// shape takes no fold.
  std::vector<std::vector<float>> shared_down;
  std::vector<int64_t> tokens;                  ///< calibration rows each routed expert saw
};

/// get_scale: `clamp(clamp(A, 1e-5)^alpha / clamp(W, 1e-5)^(1 - alpha), 1e-5)` per channel, from
/// the activations' and the weights' per-channel largest magnitudes `[n]`.
std::vector<float> smoothing_factors(std::span<const float> act_absmax, std::span<const float> weight_absmax,
                                     double alpha);

/// calcu_outlier_mask (with otsu): the down projection's outlier scale `[n]` from each input
/// channel's largest and smallest calibration value.
std::vector<float> outlier_scale(std::span<const float> channel_max, std::span<const float> channel_min,
                                 const Options& options = {});

/// Folds a down scale `s [f]` into one gated expert's weights (HF layout, in place): up rows
/// and the up bias (may be null) divided by s, down columns multiplied.
void fold_down_scale(std::span<const float> s, int64_t d, int64_t f, float* up, float* up_bias, float* down);

namespace detail {
// Per-channel largest |x| of rows [n, d] into `m [d]` (max with what is there).
inline void absmax_rows(const float* rows, int64_t n, int64_t d, std::vector<float>& m) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j) m[static_cast<size_t>(j)] = std::max(m[static_cast<size_t>(j)], std::fabs(rows[r * d + j]));
}
// Largest |w| per input column over an expert's gate and up rows.
inline std::vector<float> weight_absmax(const FfnBank& bank, int64_t e) {
  const FfnShape& sh = bank.shape();
  const int64_t d = sh.hidden, f = sh.intermediate;
  std::vector<float> g(sh.gated ? static_cast<size_t>(f * d) : 0), u(static_cast<size_t>(f * d)), dn(static_cast<size_t>(d * f));
  bank.get_expert(e, sh.gated ? g.data() : nullptr, u.data(), dn.data());
  std::vector<float> m(static_cast<size_t>(d), 0.0f);
  absmax_rows(u.data(), f, d, m);
  if (sh.gated) absmax_rows(g.data(), f, d, m);
  return m;
}
// The down statistics of one bank expert: per sequence, each h channel's max and min over the
// rows of that sequence, averaged 0.9 / 0.1 across sequences in order (the official hook).
struct DownStats {
  std::vector<float> max, min;
  bool seen = false;
  // One sequence's max / min `hi`, `lo` [f] into the average.
  void add(std::vector<float>& hi, std::vector<float>& lo, int64_t f) {
    if (!seen) {
      max = std::move(hi);
      min = std::move(lo);
      seen = true;
      return;
    }
    for (int64_t c = 0; c < f; ++c) {
      max[static_cast<size_t>(c)] = max[static_cast<size_t>(c)] * 0.9f + hi[static_cast<size_t>(c)] * 0.1f;
      min[static_cast<size_t>(c)] = min[static_cast<size_t>(c)] * 0.9f + lo[static_cast<size_t>(c)] * 0.1f;
    }
  }
};
// Feeds `rows [n, d]` of one sequence through expert e's first half into `stats`, 96 rows at a
// time (max and min are exact under any blocking; memory stays small for long sequences).
inline void observe_down(const FfnBank& bank, int64_t e, const float* rows, int64_t n, DownStats& stats) {
  if (n == 0) return;
  const int64_t d = bank.shape().hidden, f = bank.shape().intermediate, block = 96;
  std::vector<float> h(static_cast<size_t>(std::min(n, block) * f)), scratch(bank.scratch_floats(std::min(n, block)));
  std::vector<float> hi(static_cast<size_t>(f), -INFINITY), lo(static_cast<size_t>(f), INFINITY);
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t m = std::min(block, n - r0);
    bank.hidden_activations(e, rows + r0 * d, m, h.data(), scratch.data());
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < f; ++c) {
        hi[static_cast<size_t>(c)] = std::max(hi[static_cast<size_t>(c)], h[static_cast<size_t>(r * f + c)]);
        lo[static_cast<size_t>(c)] = std::min(lo[static_cast<size_t>(c)], h[static_cast<size_t>(r * f + c)]);
      }
  }
  stats.add(hi, lo, f);
}
inline bool down_applies(const FfnShape& sh) { return sh.gated && !sh.clamped; }
}  // namespace detail

/// EAQuant's statistics and scales for `layer` (unsmoothed banks, any weight type: f32 gives
/// the official statistics exactly) over calibration tokens `hidden [T, d]` of `batch`: the
/// layer's router routes them (its kept slots decide which expert sees which token; padded
/// tokens are skipped), each expert's gate/up/down weights come from get_expert(). The
/// batch's sequences are the official calibration samples (one when it has none).
template <class R>
Smoothing calibrate(const SparseLayer<R, FfnBank>& layer, const Batch& batch, const float* hidden,
                    const Options& options = {}, int threads = 0) {
  options.validate();
  const FfnBank& bank = layer.experts();
  const FfnShape& sh = bank.shape();
  const int64_t d = layer.hidden_size(), E = layer.num_experts(), T = batch.tokens;
  MOEKIT_CHECK(bank.input_smoothing().empty(), "eaquant::calibrate: the experts are already smoothed (calibrate the layer before smoothing)");
  for (const SharedExpert& s : layer.shared_experts())
    MOEKIT_CHECK(s.ffn.input_smoothing().empty(), "eaquant::calibrate: a shared expert is already smoothed");
  MOEKIT_CHECK(batch.routed_tokens() >= 1, "eaquant::calibrate: expected at least one unpadded calibration token, got none");
  Workspace ws;
  const float* x = layer.route(batch, ActivationsIn::f32(hidden), ws, threads);
  const RoutingPlan& plan = ws.plan;
  const auto offs = plan.expert_offsets();
  const auto tokens = plan.expert_tokens();
  // The samples: the batch's sequences, or one.
  std::vector<int64_t> seq_end;
  if (batch.sequence_offsets.empty()) {
    seq_end.push_back(T);
  } else {
    for (size_t i = 1; i < batch.sequence_offsets.size(); ++i) seq_end.push_back(batch.sequence_offsets[i]);
  }
  auto sequence_of = [&](int64_t t) {
    return static_cast<size_t>(std::upper_bound(seq_end.begin(), seq_end.end(), t) - seq_end.begin());
  };
  const bool down = options.smooth_down && detail::down_applies(sh);  // per bank: shared experts decide their own
  Smoothing out;
  out.tokens.assign(static_cast<size_t>(E), 0);
  std::vector<float> merged(static_cast<size_t>(d), 0.0f);
  bool any = false;
  std::vector<float> rows;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = offs[static_cast<size_t>(e) + 1] - offs[static_cast<size_t>(e)];
    out.tokens[static_cast<size_t>(e)] = n;
    if (down) out.down.emplace_back(static_cast<size_t>(sh.intermediate), 1.0f);
    if (n == 0) continue;
    rows.resize(static_cast<size_t>(n * d));
    for (int64_t r = 0; r < n; ++r) {
      const size_t i = static_cast<size_t>(offs[static_cast<size_t>(e)] + r);
      const float* src = x + static_cast<int64_t>(tokens[i]) * d;
      if (layer.weight_on_input()) {  // the rows the expert sees: w x
        kernels::scale_row(plan.slot_weight()[static_cast<size_t>(plan.expert_slots()[i])], src, rows.data() + r * d, d);
      } else {
        std::copy(src, src + d, rows.data() + r * d);
      }
    }
    std::vector<float> a(static_cast<size_t>(d), 0.0f);
    detail::absmax_rows(rows.data(), n, d, a);
    const std::vector<float> s = smoothing_factors(a, detail::weight_absmax(bank, e), options.alpha);
    for (int64_t j = 0; j < d; ++j) merged[static_cast<size_t>(j)] = std::max(merged[static_cast<size_t>(j)], s[static_cast<size_t>(j)]);
    any = true;
    if (down) {  // the expert's rows grouped by sequence, sequences in order
      std::vector<std::pair<size_t, int64_t>> order(static_cast<size_t>(n));
      for (int64_t r = 0; r < n; ++r)
        order[static_cast<size_t>(r)] = {sequence_of(tokens[static_cast<size_t>(offs[static_cast<size_t>(e)] + r)]), r};
      std::stable_sort(order.begin(), order.end(), [](const auto& p, const auto& q) { return p.first < q.first; });
      detail::DownStats st;
      std::vector<float> part;
      for (size_t i = 0; i < order.size();) {
        part.clear();
        const size_t q = order[i].first;
        for (; i < order.size() && order[i].first == q; ++i)
          part.insert(part.end(), rows.begin() + order[i].second * d, rows.begin() + (order[i].second + 1) * d);
        detail::observe_down(bank, e, part.data(), static_cast<int64_t>(part.size()) / d, st);
      }
      out.down.back() = outlier_scale(st.max, st.min, options);
    }
  }
  // Shared experts see every unpadded token.
  for (const SharedExpert& se : layer.shared_experts()) {
    const bool sdown = options.smooth_down && detail::down_applies(se.ffn.shape());
    std::vector<float> a(static_cast<size_t>(d), 0.0f);
    detail::DownStats st;
    std::vector<float> part;
    for (size_t q = 0; q < seq_end.size(); ++q) {
      part.clear();
      const int64_t t0 = q == 0 ? 0 : seq_end[q - 1];
      for (int64_t t = t0; t < seq_end[q]; ++t)
        if (!batch.is_padding(t)) part.insert(part.end(), x + t * d, x + (t + 1) * d);
      const auto n = static_cast<int64_t>(part.size()) / d;
      detail::absmax_rows(part.data(), n, d, a);
      if (sdown) detail::observe_down(se.ffn, 0, part.data(), n, st);
    }
    const std::vector<float> s = smoothing_factors(a, detail::weight_absmax(se.ffn, 0), options.alpha);
    for (int64_t j = 0; j < d; ++j) merged[static_cast<size_t>(j)] = std::max(merged[static_cast<size_t>(j)], s[static_cast<size_t>(j)]);
    any = true;
    // One entry per shared expert when any bank has down scales: all 1 where none apply.
    out.shared_down.push_back(sdown && st.seen ? outlier_scale(st.max, st.min, options)
                                               : std::vector<float>(static_cast<size_t>(se.ffn.shape().intermediate), 1.0f));
  }
  MOEKIT_CHECK(any, "eaquant::calibrate: no calibration token reached an expert");
  bool any_down = !out.down.empty();
  for (size_t j = 0; j < layer.shared_experts().size(); ++j)
    any_down = any_down || (options.smooth_down && detail::down_applies(layer.shared_experts()[j].ffn.shape()));
  if (!any_down) out.shared_down.clear();
  out.input = std::move(merged);
  return out;
}

/// `layer` with its experts repacked as `pack` under `smoothing` (calibrate() of this layer):
/// every bank divides its input by `smoothing.input` with gate / up columns multiplied, and
/// the down scales are folded into up and down. The router, the shared experts' gates and
/// coefficients, and the layer's settings are copied; the result computes the same function
/// as `layer` up to rounding, with the activation outliers moved into the weights.
template <class R>
SparseLayer<R, FfnBank> apply(const SparseLayer<R, FfnBank>& layer, const Smoothing& smoothing, kernels::PackOptions pack) {
  const FfnBank& bank = layer.experts();
  const FfnShape& sh = bank.shape();
  const int64_t d = sh.hidden, E = layer.num_experts();
  MOEKIT_CHECK(static_cast<int64_t>(smoothing.input.size()) == d, "eaquant::apply: input smoothing expected [", d,
               "] values, got ", smoothing.input.size());
  MOEKIT_CHECK(smoothing.down.empty() || static_cast<int64_t>(smoothing.down.size()) == E,
               "eaquant::apply: down scales expected for ", E, " experts, got ", smoothing.down.size());
  MOEKIT_CHECK(smoothing.shared_down.empty() || smoothing.shared_down.size() == layer.shared_experts().size(),
               "eaquant::apply: down scales expected for ", layer.shared_experts().size(), " shared experts, got ",
               smoothing.shared_down.size());
  MOEKIT_CHECK(smoothing.down.empty() || detail::down_applies(sh),
               "eaquant::apply: down scales need gated, unclamped experts");
  auto rebuild = [&](const FfnBank& src, const std::vector<std::vector<float>>& downs) {
    const FfnShape& s = src.shape();
    // A shared expert whose shape takes no fold must have all-1 scales (calibrate() gives those).
    bool identity = true;
    for (size_t e = 0; e < downs.size(); ++e) {
      MOEKIT_CHECK(static_cast<int64_t>(downs[e].size()) == s.intermediate, "eaquant::apply: expert ", e,
                   " down scale expected [", s.intermediate, "] values, got ", downs[e].size());
      for (const float x : downs[e]) identity = identity && x == 1.0f;
    }
    MOEKIT_CHECK(identity || detail::down_applies(s), "eaquant::apply: down scales need gated, unclamped experts");
    const int64_t f = s.intermediate, n = src.num_experts();
    FfnBank out(n, s, pack, smoothing.input);
    std::vector<float> g(s.gated ? static_cast<size_t>(f * d) : 0), u(static_cast<size_t>(f * d)), dn(static_cast<size_t>(d * f));
    for (int64_t e = 0; e < n; ++e) {
      src.get_expert(e, s.gated ? g.data() : nullptr, u.data(), dn.data());
      std::vector<float> bg, bu, bd;
      if (s.bias) {
        if (s.gated) bg.assign(src.gate_bias(e), src.gate_bias(e) + f);
        bu.assign(src.up_bias(e), src.up_bias(e) + f);
        bd.assign(src.down_bias(e), src.down_bias(e) + d);
      }
      if (!downs.empty() && !identity) {
        const std::vector<float>& sd = downs[static_cast<size_t>(e)];
        MOEKIT_CHECK(static_cast<int64_t>(sd.size()) == f, "eaquant::apply: expert ", e, " down scale expected [", f,
                     "] values, got ", sd.size());
        fold_down_scale(sd, d, f, u.data(), s.bias ? bu.data() : nullptr, dn.data());
      }
      out.set_expert(e, s.gated ? g.data() : nullptr, u.data(), dn.data());
      if (s.bias) out.set_expert_bias(e, s.gated ? bg.data() : nullptr, bu.data(), bd.data());
    }
    return out;
  };
  FfnBank experts = rebuild(bank, smoothing.down);
  std::vector<SharedExpert> shared;
  for (size_t j = 0; j < layer.shared_experts().size(); ++j) {
    const SharedExpert& se = layer.shared_experts()[j];
    std::vector<std::vector<float>> one;
    if (!smoothing.shared_down.empty()) one.push_back(smoothing.shared_down[j]);
    shared.push_back({rebuild(se.ffn, one), se.gate, se.coefficient, se.coefficient_bias, se.scale});
  }
  SparseLayer<R, FfnBank> out(layer.router(), std::move(experts), std::move(shared));
  out.set_weight_on_input(layer.weight_on_input());
  out.set_output_bias(layer.output_bias());
  out.set_decode_split(layer.decode_split());
  out.set_check_finite(layer.check_finite());
  out.set_non_finite_output(layer.non_finite_output());
  return out;
}

}  // namespace moekit::eaquant
#pragma GCC visibility pop
