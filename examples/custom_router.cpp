// SPDX-License-Identifier: Apache-2.0
// Extending moekit with a user-written router: any type with num_experts(), hidden_size() and
// route(batch, hidden, plan, scratch, threads) satisfies moekit::Router, and runs through the
// same SparseLayer, kernels and experts. This one hashes each token's position to one expert
// (hash routing, Roller et al. arXiv 2106.04426) with weight 1.
#include <moekit/moekit.hpp>

#include <cstdio>
#include <vector>

struct HashRouter {
  int64_t E, d;
  int64_t num_experts() const { return E; }
  int64_t hidden_size() const { return d; }
  void route(const moekit::Batch& b, const float* /*hidden*/, moekit::RoutingPlan& plan,
             moekit::RouterScratch& /*scratch*/, int /*threads*/) const {
    b.validate(d);
    plan.reset(b.tokens, E, [&](int64_t t) { return b.is_padding(t) ? 0 : 1; });  // one slot per token
    for (int64_t t = 0; t < b.tokens; ++t) {
      if (b.is_padding(t)) continue;
      plan.token_experts(t)[0] = static_cast<int32_t>((t * 2654435761u) % static_cast<uint64_t>(E));
      plan.token_weights(t)[0] = 1.0f;
    }
    plan.finalize();  // builds the expert side; no router writes it by hand
  }
};
static_assert(moekit::Router<HashRouter>);

int main() {
  const int64_t E = 4, d = 16, f = 32, T = 12;
  moekit::FfnBank experts(E, {.hidden = d, .intermediate = f, .gated = false, .act = moekit::Activation::relu});
  std::vector<float> up(f * d, 0.01f), down(d * f, 0.02f);
  for (int64_t e = 0; e < E; ++e) experts.set_expert(e, nullptr, up.data(), down.data());
  moekit::SparseLayer layer(HashRouter{E, d}, std::move(experts));
  std::vector<float> x(T * d, 1.0f), y(T * d);
  moekit::Workspace ws;
  layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws);
  for (int64_t t = 0; t < T; ++t) std::printf("token %lld -> expert %d\n", static_cast<long long>(t), ws.plan.slot_expert()[t]);
}
