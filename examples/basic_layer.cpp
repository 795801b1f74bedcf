// SPDX-License-Identifier: Apache-2.0
// The README's usage example: a Mixtral-style top-2 layer with SwiGLU experts, one forward.
#include <moekit/moekit.hpp>

#include <cstdio>
#include <vector>

int main() {
  const int64_t E = 8, k = 2, d = 64, f = 128, T = 16;
  std::vector<float> gate(E * d), w_gate(f * d), w_up(f * d), w_down(d * f), x(T * d), y(T * d);
  for (size_t i = 0; i < gate.size(); ++i) gate[i] = 0.01f * static_cast<float>(i % 13) - 0.06f;
  for (size_t i = 0; i < w_up.size(); ++i) w_gate[i] = w_up[i] = w_down[i] = 0.001f * static_cast<float>(i % 7);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i % 17) - 0.8f;

  moekit::TopKOptions opt{.num_experts = E, .k = k, .hidden = d, .norm_topk_prob = true};
  moekit::FfnBank experts(E, {.hidden = d, .intermediate = f, .gated = true, .act = moekit::Activation::silu});
  for (int64_t e = 0; e < E; ++e) experts.set_expert(e, w_gate.data(), w_up.data(), w_down.data());  // HF [out, in]
  moekit::SparseLayer layer(moekit::TopKRouter(opt, gate), std::move(experts));

  moekit::Workspace ws;  // one per calling thread; reused, so steady-state forwards allocate nothing
  layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws, /*threads=*/2);
  std::printf("token 0 -> experts %d (w %.3f), %d (w %.3f); y[0] = %g\n", ws.plan.slot_expert()[0],
              ws.plan.slot_weight()[0], ws.plan.slot_expert()[1], ws.plan.slot_weight()[1], y[0]);
}
