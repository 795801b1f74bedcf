// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builder of expert-choice routing (ROUTING.md section 3).
#include <cmath>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/expert_choice.hpp"

namespace moekit::detail {
namespace {

ExpertChoiceOptions ec_options(const json& j, const LayerConfig& c) {
  return parse_router_options<ExpertChoiceOptions>(j, [&](Reader& r, ExpertChoiceOptions& o) {
    o.hidden = c.hidden();
    o.num_experts = r.integer("num_experts", 0);
    o.capacity_factor = r.number("capacity_factor", o.capacity_factor);
    o.max_experts_per_token = r.integer("max_experts_per_token", o.max_experts_per_token);
    o.mode = parse_expert_choice_mode(r.choice("mode", "batch", {"batch", "threshold", "predictor"}));
    o.decay = r.number("decay", o.decay);
    o.aux_hidden = r.integer("aux_hidden", o.aux_hidden);
  });
}

}  // namespace

void validate_expert_choice(const json& j, const LayerConfig& c) { (void)ec_options(j, c); }
double weight_bytes_expert_choice(const json& j, const LayerConfig& c) {
  const ExpertChoiceOptions o = ec_options(j, c);
  const double E = static_cast<double>(o.num_experts), d = static_cast<double>(c.hidden()),
               H = static_cast<double>(o.aux_hidden);
  double router = E * d;
  if (o.mode == ExpertChoiceMode::predictor) router += H * d + H + E * H + E;
  if (o.mode == ExpertChoiceMode::threshold) router += E;
  return routed_layer_bytes(c, router, E);
}

std::unique_ptr<AnyLayer> build_expert_choice_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                                    const std::string& p, uint64_t seed) {
  const ExpertChoiceOptions o = ec_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t E = o.num_experts, d = c.hidden(), H = o.aux_hidden;
  const double sd = 1.0 / std::sqrt(static_cast<double>(d));
  auto gate = tensor_or_random(w, p + "gate.weight", {E, d}, s, sd);
  ExpertChoicePredictor pred;
  if (o.mode == ExpertChoiceMode::predictor) {
    pred.weight0 = tensor_or_random(w, p + "router.aux.0.weight", {H, d}, s, sd);
    pred.bias0 = tensor_or_random(w, p + "router.aux.0.bias", {H}, s, 0.01);
    pred.weight2 = tensor_or_random(w, p + "router.aux.2.weight", {E, H}, s, 1.0 / std::sqrt(static_cast<double>(H)));
    pred.bias2 = tensor_or_random(w, p + "router.aux.2.bias", {E}, s, 0.01);
  }
  std::vector<float> tau;
  if (o.mode == ExpertChoiceMode::threshold && w != nullptr) tau = w->read_f32(p + "router.thresholds", {E});
  const double rv = static_cast<double>(gate.size() + pred.weight0.size() + pred.weight2.size() + tau.size());
  ExpertChoiceRouter router(o, std::move(gate), std::move(pred), std::move(tau));
  if (o.mode == ExpertChoiceMode::threshold && w == nullptr) {
    // Random weights: calibrate the thresholds on a random batch, as a trainer would.
    const int64_t T = 256;
    std::vector<float> x(static_cast<size_t>(T * d));
    for (float& v : x) {
      s += 0x9E3779B97F4A7C15ull;
      v = static_cast<float>(static_cast<double>(splitmix64(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
    }
    router.calibrate(Batch::single(T, d), x.data());
  }
  FfnBank bank = ffn_bank(w, p + "experts.", true, E, routed_shape(c), c.expert_names, s, c.pack);
  std::vector<SharedExpert> shared = shared_experts(c, w, p, s);
  const double resident = resident_bytes_of(bank, shared, rv);
  using L = SparseLayer<ExpertChoiceRouter, FfnBank>;
  L layer(std::move(router), std::move(bank), std::move(shared));
  return std::make_unique<SparseAnyLayer<ExpertChoiceRouter, FfnBank>>(
      c, std::move(layer),
      [](const L& l, const Workspace& ws, const Batch& b) {
        const int64_t E = ws.plan.num_experts();
        const int64_t width = l.router().options().mode == ExpertChoiceMode::batch ? l.router().capacity(b)
                                                                                  : expert_choice_output_width(ws.plan);
        std::vector<int32_t> ids(static_cast<size_t>(E * width));
        std::vector<float> wt(static_cast<size_t>(E * width));
        expert_choice_outputs(ws.plan, width, ids, wt);
        return std::vector<NamedTensor>{NamedTensor::of("expert_token_ids", io::DType::I32, {E, width}, ids),
                                        NamedTensor::of("expert_token_weights", io::DType::F32, {E, width}, wt)};
      },
      resident);
}

}  // namespace moekit::detail
