// SPDX-License-Identifier: Apache-2.0
// A stack of 4 MoE layers, each with a different router on the same spine (RoutingPlan ->
// SparseLayer -> experts -> combine): top-k (Mixtral-style, renormalised), Sinkhorn
// (selection-only balancing), expert-choice with causal thresholds (calibrated on one batch,
// then used token by token), and Mixture-of-Depths over an FFN block. A batch of two sequences
// (one padded token) flows through with the residual added between layers; each layer prints
// its routing statistics.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <moekit/batch.hpp>
#include <moekit/blocks.hpp>
#include <moekit/experts/ffn.hpp>
#include <moekit/layer.hpp>
#include <moekit/routers/aux.hpp>
#include <moekit/routers/depth.hpp>
#include <moekit/routers/expert_choice.hpp>
#include <moekit/routers/sinkhorn.hpp>
#include <moekit/routers/topk.hpp>

namespace {

constexpr int64_t E = 8, k = 2, d = 64, f = 128;
std::mt19937 rng(2026);

std::vector<float> random(int64_t n, double scale) {
  std::uniform_real_distribution<float> u(static_cast<float>(-scale), static_cast<float>(scale));
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}

// `n` SwiGLU experts with random weights.
moekit::FfnBank experts(int64_t n) {
  moekit::FfnBank bank(n, moekit::FfnShape{.hidden = d, .intermediate = f});
  for (int64_t e = 0; e < n; ++e) {
    const auto gate = random(f * d, 1.7 / std::sqrt(double(d))), up = random(f * d, 1.7 / std::sqrt(double(d)));
    const auto down = random(d * f, 1.7 / std::sqrt(double(f)));
    bank.set_expert(e, gate.data(), up.data(), down.data());
  }
  return bank;
}

// One line of statistics of a layer's last call (its plan and router logits).
void report(const char* name, const moekit::Workspace& ws, const moekit::Batch& batch, bool logits_are_scores) {
  const auto s = moekit::routing_stats(ws.plan, logits_are_scores ? std::span<const float>(ws.router.logits)
                                                                  : std::span<const float>(),
                                       batch);
  int64_t routed = batch.routed_tokens();
  std::printf("%-26s slots/token %.2f  load [", name,
              routed ? static_cast<double>(ws.plan.num_kept()) / static_cast<double>(routed) : 0.0);
  for (size_t e = 0; e < s.load.size(); ++e) std::printf("%s%lld", e ? " " : "", static_cast<long long>(s.load[e]));
  std::printf("]  max/mean %.2f  dropped %.0f%%  mean weight %.3f", s.max_mean_load_ratio, 100.0 * s.drop_rate,
              s.mean_selected_weight);
  if (logits_are_scores) std::printf("  entropy %.3f", s.entropy);
  std::printf("\n");
}

}  // namespace

int main() {
  // Two sequences of 12 and 8 tokens; the last token of the second is padding.
  const int64_t T = 20;
  moekit::Batch batch = moekit::Batch::single(T, d);
  const std::vector<int32_t> offsets = {0, 12, 20};
  std::vector<uint8_t> padding(T, 0);
  padding[T - 1] = 1;
  batch.sequence_offsets = offsets;
  batch.padding = padding;

  const double gate_scale = 3.0 / std::sqrt(double(d));
  // Layer 1: top-k, softmax then renormalised top-2 (Mixtral).
  moekit::TopKOptions tk{.num_experts = E, .k = k, .hidden = d};
  tk.norm_topk_prob = true;
  moekit::SparseLayer topk(moekit::TopKRouter(tk, random(E * d, gate_scale)), experts(E));
  // Layer 2: Sinkhorn balancing decides the selection; weights stay the softmax of the logits.
  moekit::SinkhornOptions sk;
  sk.num_experts = E;
  sk.k = k;
  sk.hidden = d;
  moekit::SparseLayer sinkhorn(moekit::SinkhornRouter(sk, random(E * d, gate_scale)), experts(E));
  // Layer 3: expert choice with causal thresholds: each expert keeps the tokens above its
  // threshold, calibrated here on one batch of the input distribution.
  moekit::ExpertChoiceOptions ec;
  ec.num_experts = E;
  ec.hidden = d;
  ec.capacity_factor = double(k);
  ec.mode = moekit::ExpertChoiceMode::threshold;
  ec.decay = 0.0;  // one calibration batch sets the thresholds outright
  moekit::ExpertChoiceRouter ec_router(ec, random(E * d, gate_scale));
  {
    const std::vector<float> calib = random(256 * d, 1.0);
    ec_router.calibrate(moekit::Batch::single(256, d), calib.data());
  }
  moekit::SparseLayer expert_choice(std::move(ec_router), experts(E));
  // Layer 4: Mixture-of-Depths: the FFN block runs on half the tokens of each sequence.
  moekit::MoDOptions md;
  md.hidden = d;
  md.ratio = 0.5;
  md.activation = moekit::DepthActivation::sigmoid;
  std::vector<moekit::FfnBlock> block;
  block.emplace_back(experts(1));
  moekit::SparseLayer mod(moekit::MoDRouter(md, random(d, gate_scale)), moekit::FunctorBank(std::move(block)));

  // Forward through the stack with the residual between layers: x <- x + layer(x).
  std::vector<float> x = random(T * d, 1.0), y(static_cast<size_t>(T * d));
  moekit::Workspace ws;
  auto step = [&](const auto& layer, const char* name, bool logits_are_scores) {
    layer.forward(batch, x.data(), y.data(), ws);
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    report(name, ws, batch, logits_are_scores);
  };
  std::printf("%lld tokens in 2 sequences (1 padded), d = %lld, E = %lld\n", static_cast<long long>(T),
              static_cast<long long>(d), static_cast<long long>(E));
  step(topk, "1 top-k (k = 2)", true);
  step(sinkhorn, "2 Sinkhorn (k = 2)", true);
  step(expert_choice, "3 expert choice, causal", true);
  step(mod, "4 Mixture-of-Depths 50%", false);
  double norm = 0.0;
  for (float v : x) norm += double(v) * v;
  std::printf("output norm %.4f (padded token's row kept as its input)\n", std::sqrt(norm));
  return 0;
}
