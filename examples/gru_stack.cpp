// SPDX-License-Identifier: Apache-2.0
// A stack of 3 MoE layers routed by the layerwise recurrent router (RMoE, Qiu et al. arXiv
// 2408.06793): one GRU cell shared by all layers, a projection and an output per layer. The
// caller threads the router state from layer to layer (batch.router_state in, the workspace's
// router.state out) and adds the residual between layers. Prints each layer's routing.
#include <cmath>
#include <cstdio>
#include <memory>
#include <moekit/batch.hpp>
#include <moekit/experts/ffn.hpp>
#include <moekit/layer.hpp>
#include <moekit/routers/gru.hpp>
#include <random>
#include <vector>

using GruLayer = moekit::SparseLayer<moekit::GruRouter, moekit::FfnBank>;

int main() {
  const int64_t L = 3, E = 8, k = 2, d = 64, f = 128, d_r = 32, T = 5;
  std::mt19937 rng(2408);
  auto random = [&](int64_t n, double scale) {
    std::uniform_real_distribution<float> u(static_cast<float>(-scale), static_cast<float>(scale));
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = u(rng);
    return v;
  };

  // The one cell every layer's router shares (torch.nn.GRUCell layout, gates r, z, n).
  const double a = 1.0 / std::sqrt(static_cast<double>(d_r));
  const auto cell = std::make_shared<const moekit::GruCell>(
      moekit::GruVariant::gru, d_r, random(3 * d_r * d_r, a), random(3 * d_r * d_r, a),
      random(3 * d_r, a), random(3 * d_r, a));

  // Per layer: its router (projection [d_r, d], output [E, d_r]) and E SwiGLU experts.
  std::vector<GruLayer> layers;
  for (int64_t l = 0; l < L; ++l) {
    moekit::GruRouterOptions opt{.num_experts = E, .k = k, .hidden = d, .d_r = d_r};
    moekit::GruRouter router(opt, cell, random(d_r * d, 2.0 / std::sqrt(double(d))),
                             random(E * d_r, 6.0 * a));
    moekit::FfnBank experts(E, moekit::FfnShape{.hidden = d, .intermediate = f});
    for (int64_t e = 0; e < E; ++e) {
      const auto gate = random(f * d, 1.7 / std::sqrt(double(d))),
                 up = random(f * d, 1.7 / std::sqrt(double(d)));
      const auto down = random(d * f, 1.7 / std::sqrt(double(f)));
      experts.set_expert(e, gate.data(), up.data(), down.data());
    }
    layers.emplace_back(std::move(router), std::move(experts));
  }
  std::printf("%lld layers share one GRU cell (use count %ld), d_r = %lld\n",
              static_cast<long long>(L), cell.use_count(), static_cast<long long>(d_r));

  // Forward through the stack: the state of layer l is the router_state of layer l + 1.
  std::vector<float> x = random(T * d, 1.0), y(static_cast<size_t>(T * d));
  std::vector<float> state;  // empty: zeros at the first layer
  moekit::Workspace ws;
  for (int64_t l = 0; l < L; ++l) {
    moekit::Batch batch = moekit::Batch::single(T, d);
    batch.router_state = state;
    layers[static_cast<size_t>(l)].forward(batch, x.data(), y.data(), ws);
    state = ws.router.state;                             // [T, d_r], passed on
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];  // residual, added by the caller

    std::printf("layer %lld\n", static_cast<long long>(l));
    const auto offsets = ws.plan.slot_offsets();
    for (int64_t t = 0; t < T; ++t) {
      std::printf("  token %lld ->", static_cast<long long>(t));
      for (int32_t s = offsets[static_cast<size_t>(t)]; s < offsets[static_cast<size_t>(t) + 1];
           ++s)
        std::printf("  expert %d (%.3f)", ws.plan.slot_expert()[static_cast<size_t>(s)],
                    static_cast<double>(ws.plan.slot_weight()[static_cast<size_t>(s)]));
      double norm = 0;
      for (int64_t i = 0; i < d_r; ++i)
        norm += std::pow(state[static_cast<size_t>(t * d_r + i)], 2);
      std::printf("   |h| = %.3f\n", std::sqrt(norm));
    }
  }
}
