// SPDX-License-Identifier: Apache-2.0
// The README's usage example: a Mixtral-style top-2 layer with SwiGLU experts, one forward.
#include <cstdio>
#include <vector>

#include <moekit/moekit.hpp>

int main() {
  const int64_t E = 8, k = 2, d = 64, f = 128, T = 16;
  moekit::TopKOptions opt{.num_experts = E, .k = k, .hidden = d, .norm_topk_prob = true};
  std::vector<float> gate(E * d, 0.01f);
  for (int64_t i = 0; i < E * d; ++i) gate[i] = 0.01f * static_cast<float>((i * 37) % 11 - 5);
  moekit::FfnBank experts(E, {.hidden = d, .intermediate = f, .gated = true, .act = moekit::Activation::silu});
  std::vector<float> w_gate(f * d, 0.02f), w_up(f * d, 0.03f), w_down(d * f, 0.01f);
  for (int64_t e = 0; e < E; ++e) experts.set_expert(e, w_gate.data(), w_up.data(), w_down.data());
  moekit::SparseLayer layer(moekit::TopKRouter(opt, gate), std::move(experts));

  std::vector<float> x(T * d, 0.5f), y(T * d);
  for (int64_t i = 0; i < T * d; ++i) x[i] = 0.01f * static_cast<float>(i % 97);
  moekit::Workspace ws;  // reuse across calls: steady-state forwards allocate nothing
  layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, /*threads=*/2);
  std::printf("moekit %s: token 0 -> experts %d, %d; y[0] = %g\n", moekit::version(),
              ws.plan.slot_expert()[0], ws.plan.slot_expert()[1], y[0]);
  return 0;
}
