// SPDX-License-Identifier: Apache-2.0
#include "reference/moba_ref.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace ref::moba {

Result attention(const Params& p, const float* q, const float* k, const float* v, int64_t T,
                 const std::vector<int64_t>& cu, double tie) {
  const int64_t H = p.heads, Hk = p.kv_heads, d = p.head_dim, B = p.block_size;
  const double scale = p.scale > 0.0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(d));
  Result r;
  r.blocks.resize(static_cast<size_t>(T * H));
  r.near_tie.assign(static_cast<size_t>(T * H), false);
  r.out.assign(static_cast<size_t>(T * H * d), 0.0);
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t base = cu[s], n = cu[s + 1] - cu[s];
    const int64_t nb = (n + B - 1) / B;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / Hk);
      auto K = [&](int64_t i, int64_t x) { return static_cast<double>(k[((base + i) * Hk + g) * d + x]); };
      auto V = [&](int64_t i, int64_t x) { return static_cast<double>(v[((base + i) * Hk + g) * d + x]); };
      // key_gate_weight: the mean key of each block.
      std::vector<double> mean(static_cast<size_t>(nb * d), 0.0);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t b0 = j * B, b1 = std::min(n, b0 + B);
        for (int64_t x = 0; x < d; ++x) {
          double sum = 0.0;
          for (int64_t i = b0; i < b1; ++i) sum += K(i, x);
          mean[static_cast<size_t>(j * d + x)] = sum / static_cast<double>(b1 - b0);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = base + i, c = i / B;
        const float* qi = q + (t * H + h) * d;
        // Gate over the earlier blocks, best first, ties to the lower index.
        std::vector<double> score(static_cast<size_t>(c));
        for (int64_t j = 0; j < c; ++j) {
          double s2 = 0.0;
          for (int64_t x = 0; x < d; ++x) s2 += static_cast<double>(qi[x]) * mean[static_cast<size_t>(j * d + x)];
          score[static_cast<size_t>(j)] = s2;
        }
        std::vector<int32_t> order(static_cast<size_t>(c));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int32_t a, int32_t b2) { return score[static_cast<size_t>(a)] > score[static_cast<size_t>(b2)]; });
        const int64_t keep = p.dense ? c : std::min(p.top_k - 1, c);
        if (!p.dense && keep > 0 && keep < c) {
          const double a = score[static_cast<size_t>(order[static_cast<size_t>(keep - 1)])];
          const double b2 = score[static_cast<size_t>(order[static_cast<size_t>(keep)])];
          r.near_tie[static_cast<size_t>(t * H + h)] = std::fabs(a - b2) <= tie * (std::fabs(a) + std::fabs(b2) + 1.0);
        }
        std::vector<int32_t> kept(order.begin(), order.begin() + keep);
        std::sort(kept.begin(), kept.end());
        kept.push_back(static_cast<int32_t>(c));
        // One softmax over the kept keys (the own block up to i).
        std::vector<int64_t> keys;
        for (int32_t j : kept)
          for (int64_t x = j * B; x < std::min(n, (j + 1) * B) && x <= i; ++x) keys.push_back(x);
        std::vector<double> w(keys.size());
        double mx = -INFINITY;
        for (size_t a = 0; a < keys.size(); ++a) {
          double s2 = 0.0;
          for (int64_t x = 0; x < d; ++x) s2 += static_cast<double>(qi[x]) * K(keys[a], x);
          w[a] = s2 * scale;
          mx = std::max(mx, w[a]);
        }
        double z = 0.0;
        for (double& x : w) z += (x = std::exp(x - mx));
        for (size_t a = 0; a < keys.size(); ++a)
          for (int64_t x = 0; x < d; ++x) r.out[static_cast<size_t>((t * H + h) * d + x)] += w[a] / z * V(keys[a], x);
        r.blocks[static_cast<size_t>(t * H + h)] = kept;
        r.keys_attended += static_cast<int64_t>(keys.size());
        r.causal_keys += i + 1;
      }
    }
  }
  return r;
}

}  // namespace ref::moba
