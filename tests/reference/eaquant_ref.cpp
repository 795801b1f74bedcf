// SPDX-License-Identifier: Apache-2.0
#include "reference/eaquant_ref.hpp"

#include <algorithm>
#include <cmath>
#include <functional>

namespace ref {
namespace {

double torch_quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const double lo = std::floor(pos), hi = std::ceil(pos);
  return v[static_cast<size_t>(lo)] + (v[static_cast<size_t>(hi)] - v[static_cast<size_t>(lo)]) * (pos - lo);
}

// torch.var (unbiased); intra_category_variance gives 0 for a single value.
double var(const std::vector<double>& v) {
  if (v.size() == 1) return 0.0;
  double m = 0.0;
  for (double x : v) m += x;
  m /= static_cast<double>(v.size());
  double s = 0.0;
  for (double x : v) s += (x - m) * (x - m);
  return s / static_cast<double>(v.size() - 1);
}

// otsu(data, pos): returns outlier_threshold, or `none` when no cut beat -1000.
double otsu(std::vector<double> data, bool pos, double none) {
  std::sort(data.begin(), data.end(), std::greater<double>());
  double metric = -1000.0, threshold = none;
  for (size_t idx = 0; idx < data.size(); ++idx) {
    const std::vector<double> up(data.begin(), data.begin() + static_cast<long>(idx) + 1);
    const std::vector<double> bottom(data.begin() + static_cast<long>(idx) + 1, data.end());
    if (bottom.empty()) continue;
    const double min_outlier = *std::min_element(up.begin(), up.end());
    const double max_outlier = *std::max_element(bottom.begin(), bottom.end());
    const double inter = std::fabs(min_outlier - max_outlier);
    const double cur = pos ? inter - var(bottom) : inter - var(up);
    if (cur > metric) {
      metric = cur;
      threshold = pos ? bottom[0] : up.back();
    }
  }
  return threshold;
}

}  // namespace

std::vector<double> eaquant_get_scale(const std::vector<double>& act_absmax, const std::vector<double>& weight_absmax,
                                      double alpha) {
  std::vector<double> s(act_absmax.size());
  for (size_t j = 0; j < s.size(); ++j) {
    const double a = std::max(act_absmax[j], 1e-5), w = std::max(weight_absmax[j], 1e-5);
    s[j] = std::max(std::pow(a, alpha) / std::pow(w, 1.0 - alpha), 1e-5);
  }
  return s;
}

std::vector<double> eaquant_outlier_mask(const std::vector<double>& mx, const std::vector<double>& mn, double ratio,
                                         double smooth_rate, double fence) {
  const size_t n = mx.size();
  const double q1_neg = torch_quantile(mn, 1 - ratio), q3_neg = torch_quantile(mn, ratio);
  double outlier_neg = q1_neg - fence * (q3_neg - q1_neg);
  const double q1_pos = torch_quantile(mx, 1 - ratio), q3_pos = torch_quantile(mx, ratio);
  double outlier_pos = q3_pos + fence * (q3_pos - q1_pos);
  std::vector<double> sel;
  for (double v : mx)
    if (v > outlier_pos) sel.push_back(v);
  if (sel.size() > 1) outlier_pos = otsu(sel, true, outlier_pos);
  sel.clear();
  for (double v : mn)
    if (v < outlier_neg) sel.push_back(v);
  if (sel.size() > 1) outlier_neg = otsu(sel, false, outlier_neg);
  std::vector<double> mask_pos(n, 1.0), mask_neg(n, 1.0);
  for (size_t c = 0; c < n; ++c) {
    if (mx[c] > outlier_pos) mask_pos[c] = 0.0;
    if (mn[c] < outlier_neg) mask_neg[c] = 0.0;
  }
  double max_value = -INFINITY, min_value = INFINITY;
  for (size_t c = 0; c < n; ++c) {
    if (mask_pos[c] == 1.0) max_value = std::max(max_value, mx[c]);
    if (mask_neg[c] == 1.0) min_value = std::min(min_value, mn[c]);
  }
  for (size_t c = 0; c < n; ++c) {
    if (mask_pos[c] == 0.0) mask_pos[c] = std::pow(mx[c] / max_value, smooth_rate);
    if (mask_neg[c] == 0.0) mask_neg[c] = std::pow(mn[c] / min_value, smooth_rate);
  }
  std::vector<double> mask(n);
  for (size_t c = 0; c < n; ++c) {
    // torch.max(a, b) is NaN when either is.
    mask[c] = min_value != 0.0 ? (std::isnan(mask_pos[c]) || std::isnan(mask_neg[c]) ? NAN : std::max(mask_pos[c], mask_neg[c]))
                               : mask_pos[c];
    if (mask[c] == 0.0) mask[c] = 1.0;
    if (!std::isfinite(mask[c]) || mask[c] <= 0.0) mask[c] = 1.0;  // moekit's deviation
  }
  return mask;
}

}  // namespace ref
