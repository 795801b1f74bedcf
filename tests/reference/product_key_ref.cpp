// SPDX-License-Identifier: Apache-2.0
#include "reference/product_key_ref.hpp"

#include <cmath>

namespace ref::product_key {
namespace {

std::vector<double> log_softmax(const std::vector<double>& z) {
  const std::vector<double> p = softmax(z);
  std::vector<double> out(p.size());
  for (size_t i = 0; i < p.size(); ++i) out[i] = std::log(p[i]);
  return out;
}

}  // namespace

Routing route(const Params& p, const float* kx, const float* ky, const float* x, int64_t T, const uint8_t* padding) {
  int64_t n = 0;
  while ((n + 1) * (n + 1) <= p.num_experts) ++n;
  const int64_t d = p.hidden, q = p.split_query ? d / 2 : d;
  Routing r;
  r.tokens = T;
  r.experts = p.num_experts;
  r.k = p.k;
  r.token.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    TokenRouting& tr = r.token[static_cast<size_t>(t)];
    if (padding != nullptr && padding[t]) {
      tr.padded = true;
      continue;
    }
    std::vector<double> za(static_cast<size_t>(n)), zb(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      double sa = 0, sb = 0;
      for (int64_t c = 0; c < q; ++c) {
        sa += double(kx[i * q + c]) * x[t * d + c];
        sb += double(ky[i * q + c]) * x[t * d + (p.split_query ? q : 0) + c];
      }
      za[static_cast<size_t>(i)] = sa;
      zb[static_cast<size_t>(i)] = sb;
    }
    const std::vector<double> a = log_softmax(za), b = log_softmax(zb);
    tr.selection.resize(static_cast<size_t>(n * n));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) tr.selection[static_cast<size_t>(i * n + j)] = a[size_t(i)] + b[size_t(j)];
    tr.order = descending_order(tr.selection);
    for (int64_t s = 0; s < p.k; ++s) {
      const int64_t e = tr.order[static_cast<size_t>(s)];
      tr.slots.push_back({e, std::exp(a[size_t(e / n)]) * std::exp(b[size_t(e % n)]), false});
    }
  }
  apply_capacity(r, -1, DropPolicy::score, false, 1.0);
  return r;
}

std::vector<double> atomic_expert(const float* down, const float* up, int64_t d, int64_t e, Activation act,
                                  const std::vector<double>& x) {
  double z = 0;
  for (int64_t c = 0; c < d; ++c) z += double(down[e * d + c]) * x[static_cast<size_t>(c)];
  const double h = activate(act, z);
  std::vector<double> y(static_cast<size_t>(d));
  for (int64_t c = 0; c < d; ++c) y[static_cast<size_t>(c)] = h * up[e * d + c];
  return y;
}

}  // namespace ref::product_key
