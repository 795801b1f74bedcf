// SPDX-License-Identifier: Apache-2.0
// Double-precision reference of the layerwise recurrent (GRU) router and a stack of MoE
// layers threading its state. Plain loops; deliberately includes no moekit header.
#include "reference/gru_ref.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace ref::gru {
namespace {

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// y[i] = sum_j W[i, j] x[j] + b[i] for W [rows, n] (b may be empty).
std::vector<double> affine(const std::vector<float>& W, const std::vector<float>& b,
                           const std::vector<double>& x, int64_t rows) {
  const auto n = static_cast<int64_t>(x.size());
  std::vector<double> y(static_cast<size_t>(rows), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j)
      s += static_cast<double>(W[static_cast<size_t>(i * n + j)]) * x[static_cast<size_t>(j)];
    if (!b.empty()) s += static_cast<double>(b[static_cast<size_t>(i)]);
    y[static_cast<size_t>(i)] = s;
  }
  return y;
}

}  // namespace

std::vector<double> cell_step(const Cell& c, const std::vector<double>& x,
                              const std::vector<double>& h_prev) {
  const int64_t n = c.d_r;
  const int64_t G = c.variant == Variant::gru ? 3 : 1;
  const std::vector<double> gi = affine(c.weight_ih, c.bias_ih, x, G * n);       // W_i* x + b_i*
  const std::vector<double> gh = affine(c.weight_hh, c.bias_hh, h_prev, G * n);  // W_h* h + b_h*
  std::vector<double> h(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const auto u = static_cast<size_t>(i);
    if (c.variant == Variant::rnn) {
      h[u] = std::tanh(gi[u] + gh[u]);
      continue;
    }
    const double r = sigmoid(gi[u] + gh[u]);
    const double z = sigmoid(gi[u + n] + gh[u + n]);
    const double cand = std::tanh(gi[u + 2 * n] + r * gh[u + 2 * n]);
    h[u] = (1.0 - z) * cand + z * h_prev[u];
  }
  return h;
}

RouteResult route(const Cell& c, const Router& r, const std::vector<double>& X, int64_t T,
                  const std::vector<double>& state, const uint8_t* padding) {
  const int64_t d = r.hidden, dr = c.d_r, E = r.num_experts, k = r.k;
  RouteResult res;
  Routing& rt = res.routing;
  rt.tokens = T;
  rt.experts = E;
  rt.k = k;
  rt.capacity = -1;
  rt.token.resize(static_cast<size_t>(T));
  rt.kept_of.assign(static_cast<size_t>(E), 0);
  rt.dropped_of.assign(static_cast<size_t>(E), 0);
  res.state.assign(static_cast<size_t>(T * dr), 0.0);
  res.logits.assign(static_cast<size_t>(T * E), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> h_prev(static_cast<size_t>(dr), 0.0);
    if (!state.empty()) h_prev.assign(state.begin() + t * dr, state.begin() + (t + 1) * dr);
    TokenRouting& tr = rt.token[static_cast<size_t>(t)];
    if (padding != nullptr && padding[t] != 0) {
      tr.padded = true;
      std::copy(h_prev.begin(), h_prev.end(), res.state.begin() + t * dr);
      continue;
    }
    const std::vector<double> xt(X.begin() + t * d, X.begin() + (t + 1) * d);
    const std::vector<double> x = affine(r.proj, {}, xt, dr);
    const std::vector<double> h = cell_step(c, x, h_prev);
    std::copy(h.begin(), h.end(), res.state.begin() + t * dr);
    const std::vector<double> L = affine(r.out, {}, h, E);
    std::copy(L.begin(), L.end(), res.logits.begin() + t * E);

    // Mixtral rule: softmax, top-k on the probabilities (ties to the lower id), renormalise.
    double m = L[0];
    for (double v : L) m = std::max(m, v);
    std::vector<double> p(static_cast<size_t>(E));
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e)
      sum += (p[static_cast<size_t>(e)] = std::exp(L[static_cast<size_t>(e)] - m));
    for (double& v : p) v /= sum;
    tr.selection = p;
    tr.order.resize(static_cast<size_t>(E));
    std::iota(tr.order.begin(), tr.order.end(), int64_t{0});
    std::stable_sort(tr.order.begin(), tr.order.end(), [&](int64_t a, int64_t b) {
      return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)];
    });
    double chosen = 0.0;
    for (int64_t j = 0; j < k; ++j)
      chosen += p[static_cast<size_t>(tr.order[static_cast<size_t>(j)])];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = tr.order[static_cast<size_t>(j)];
      tr.slots.push_back({e, p[static_cast<size_t>(e)] / chosen, false});
      ++rt.kept_of[static_cast<size_t>(e)];
    }
  }
  return res;
}

std::vector<StackStep> stack_forward(const Cell& c, const std::vector<StackLayer>& layers,
                                     const float* X0, int64_t T, const uint8_t* padding) {
  std::vector<StackStep> steps;
  if (layers.empty()) return steps;
  const int64_t d = layers.front().router.hidden;
  std::vector<double> X(X0, X0 + T * d);
  std::vector<double> state;  // empty: zeros at the first layer
  for (const StackLayer& layer : layers) {
    StackStep s;
    s.input = X;
    s.route = route(c, layer.router, X, T, state, padding);
    s.output.assign(static_cast<size_t>(T * d), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const TokenRouting& tr = s.route.routing.token[static_cast<size_t>(t)];
      if (tr.padded) continue;
      const std::vector<double> xt(X.begin() + t * d, X.begin() + (t + 1) * d);
      for (const Slot& slot : tr.slots) {
        const std::vector<double> o =
            ffn_forward(layer.experts[static_cast<size_t>(slot.expert)], xt);
        for (int64_t i = 0; i < d; ++i)
          s.output[static_cast<size_t>(t * d + i)] += slot.weight * o[static_cast<size_t>(i)];
      }
    }
    for (size_t i = 0; i < X.size(); ++i) X[i] += s.output[i];
    state = s.route.state;
    steps.push_back(std::move(s));
  }
  return steps;
}

}  // namespace ref::gru
