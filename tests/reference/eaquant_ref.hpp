// SPDX-License-Identifier: Apache-2.0
// Double-precision transcription of EAQuant's smoothing scales, from the official code
// (darren-fzq1/EAQuant 37c45090): quantize/smooth.py get_scale and calcu_outlier_mask, and
// quantize/outlier_finder.py otsu, written as plainly as the Python reads (the variance of
// each side recomputed at every cut, torch.quantile's interpolation by hand).
#pragma once

#include <vector>

namespace ref {

/// get_scale for one channel set: clamp(A, 1e-5)^alpha / clamp(W, 1e-5)^(1 - alpha), clamped at 1e-5.
std::vector<double> eaquant_get_scale(const std::vector<double>& act_absmax, const std::vector<double>& weight_absmax,
                                      double alpha);

/// calcu_outlier_mask(per_channel_max, per_channel_min, ratio, smooth_rate, alpha = fence), with
/// moekit's one deviation: a result that is not finite or not > 0 is 1.
std::vector<double> eaquant_outlier_mask(const std::vector<double>& channel_max, const std::vector<double>& channel_min,
                                         double ratio, double smooth_rate, double fence);

}  // namespace ref
