// SPDX-License-Identifier: Apache-2.0
// EAQuant's scales (moekit/tools/eaquant.hpp): get_scale, calcu_outlier_mask with Otsu's split.
#include "moekit/tools/eaquant.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moekit::eaquant {
namespace {

constexpr double kClamp = 1e-5;

// torch.quantile's linear interpolation on ascending `a`.
double quantile(const std::vector<double>& a, double q) {
  const double pos = q * static_cast<double>(a.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, a.size() - 1);
  return a[lo] + (a[hi] - a[lo]) * (pos - static_cast<double>(lo));
}

// Otsu's split of `v` (outlier candidates beyond the fence), sorted descending: for each cut
// the gap between the two sides minus one side's unbiased variance (the lower side's for the
// positive tail, the upper side's for the negative tail), the first best cut kept. Returns
// the new threshold (the official outlier_threshold) or `fallback` when no cut scores above
// the official initial -1000 (where the official code raises).
double otsu_threshold(std::vector<double> v, bool positive, double fallback) {
  std::sort(v.begin(), v.end(), [](double a, double b) { return a > b; });
  const size_t n = v.size();
  // Unbiased variances of every prefix v[0..i] and suffix v[i..n), by Welford's updates
  // (stable where sums of squares would cancel).
  std::vector<double> pre(n, 0.0), suf(n + 1, 0.0);
  double mean = 0.0, m2 = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double delta = v[i] - mean;
    mean += delta / static_cast<double>(i + 1);
    m2 += delta * (v[i] - mean);
    pre[i] = i == 0 ? 0.0 : m2 / static_cast<double>(i);
  }
  mean = m2 = 0.0;
  for (size_t i = n; i-- > 0;) {
    const size_t m = n - i;
    const double delta = v[i] - mean;
    mean += delta / static_cast<double>(m);
    m2 += delta * (v[i] - mean);
    suf[i] = m == 1 ? 0.0 : m2 / static_cast<double>(m - 1);
  }
  double best = -1000.0, threshold = fallback;
  for (size_t i = 0; i + 1 < n; ++i) {
    const double gap = std::fabs(v[i] - v[i + 1]);
    const double metric = gap - (positive ? suf[i + 1] : pre[i]);
    if (metric > best) {
      best = metric;
      threshold = positive ? v[i + 1] : v[i];
    }
  }
  return threshold;
}

}  // namespace

std::vector<float> smoothing_factors(std::span<const float> act_absmax, std::span<const float> weight_absmax,
                                     double alpha) {
  MOEKIT_CHECK(act_absmax.size() == weight_absmax.size(), "eaquant::smoothing_factors: ", act_absmax.size(),
               " activation and ", weight_absmax.size(), " weight maxima, expected as many");
  MOEKIT_CHECK(alpha > 0.0 && alpha < 1.0, "eaquant::smoothing_factors: alpha expected in (0, 1), got ", alpha);
  std::vector<float> s(act_absmax.size());
  for (size_t j = 0; j < s.size(); ++j) {
    const double a = std::max(static_cast<double>(act_absmax[j]), kClamp);
    const double w = std::max(static_cast<double>(weight_absmax[j]), kClamp);
    MOEKIT_CHECK(std::isfinite(a) && std::isfinite(w), "eaquant::smoothing_factors: channel ", j,
                 " has a non-finite maximum (activation ", act_absmax[j], ", weight ", weight_absmax[j], ")");
    s[j] = static_cast<float>(std::max(std::pow(a, alpha) / std::pow(w, 1.0 - alpha), kClamp));
  }
  return s;
}

std::vector<float> outlier_scale(std::span<const float> channel_max, std::span<const float> channel_min,
                                 const Options& options) {
  options.validate();
  const size_t n = channel_max.size();
  MOEKIT_CHECK(channel_min.size() == n && n >= 1, "eaquant::outlier_scale: expected as many minima as maxima (>= 1), got ",
               channel_max.size(), " and ", channel_min.size());
  std::vector<double> mx(channel_max.begin(), channel_max.end()), mn(channel_min.begin(), channel_min.end());
  for (size_t c = 0; c < n; ++c)
    MOEKIT_CHECK(std::isfinite(mx[c]) && std::isfinite(mn[c]), "eaquant::outlier_scale: channel ", c,
                 " has a non-finite statistic (max ", channel_max[c], ", min ", channel_min[c], ")");
  std::vector<double> smx = mx, smn = mn;
  std::sort(smx.begin(), smx.end());
  std::sort(smn.begin(), smn.end());
  const double r = options.otsu_ratio;
  const double q1n = quantile(smn, 1.0 - r), q3n = quantile(smn, r);
  double fence_neg = q1n - options.fence * (q3n - q1n);
  const double q1p = quantile(smx, 1.0 - r), q3p = quantile(smx, r);
  double fence_pos = q3p + options.fence * (q3p - q1p);
  std::vector<double> cand;
  for (double v : mx)
    if (v > fence_pos) cand.push_back(v);
  if (cand.size() > 1) fence_pos = otsu_threshold(cand, true, fence_pos);
  cand.clear();
  for (double v : mn)
    if (v < fence_neg) cand.push_back(v);
  if (cand.size() > 1) fence_neg = otsu_threshold(cand, false, fence_neg);
  // The largest maximum and the smallest minimum among the normal channels.
  double max_value = -std::numeric_limits<double>::infinity(), min_value = std::numeric_limits<double>::infinity();
  for (size_t c = 0; c < n; ++c) {
    if (!(mx[c] > fence_pos)) max_value = std::max(max_value, mx[c]);
    if (!(mn[c] < fence_neg)) min_value = std::min(min_value, mn[c]);
  }
  std::vector<float> s(n, 1.0f);
  for (size_t c = 0; c < n; ++c) {
    double pos = 1.0, neg = 1.0;
    if (mx[c] > fence_pos) pos = std::pow(mx[c] / max_value, options.otsu_smooth_rate);
    if (mn[c] < fence_neg) neg = std::pow(mn[c] / min_value, options.otsu_smooth_rate);
    // Official: max(pos, neg) when the normal minimum is nonzero, else pos (torch.max
    // propagates a NaN from either side); a 0 becomes 1.
    double v = pos;
    if (min_value != 0.0) v = std::isnan(pos) || std::isnan(neg) ? std::nan("") : std::max(pos, neg);
    if (v == 0.0) v = 1.0;
    // Deviation: a non-finite or negative scale (a reference value of 0 or the wrong sign),
    // where the official code stops on its NaN assertion, leaves the channel alone.
    if (!std::isfinite(v) || v <= 0.0 || !std::isfinite(static_cast<float>(v)) || static_cast<float>(v) <= 0.0f) v = 1.0;
    s[c] = static_cast<float>(v);
  }
  return s;
}

void fold_down_scale(std::span<const float> s, int64_t d, int64_t f, float* up, float* up_bias, float* down) {
  MOEKIT_CHECK(static_cast<int64_t>(s.size()) == f, "eaquant::fold_down_scale: scale expected [", f, "] values, got ",
               s.size());
  for (int64_t c = 0; c < f; ++c) {
    const float v = s[static_cast<size_t>(c)];
    MOEKIT_CHECK(std::isfinite(v) && v > 0.0f, "eaquant::fold_down_scale: scale[", c, "] expected finite and > 0, got ", v);
    for (int64_t j = 0; j < d; ++j) up[c * d + j] /= v;
    if (up_bias != nullptr) up_bias[c] /= v;
  }
  for (int64_t r = 0; r < d; ++r)
    for (int64_t c = 0; c < f; ++c) down[r * f + c] *= s[static_cast<size_t>(c)];
}

}  // namespace moekit::eaquant
