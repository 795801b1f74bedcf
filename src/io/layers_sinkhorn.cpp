// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builders of Sinkhorn routing (ROUTING.md section 2): sinkhorn and
// its selective wrapper selective_sinkhorn.
#include <cmath>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/sinkhorn.hpp"

namespace moekit::detail {
namespace {

void read_sinkhorn(Reader& r, SinkhornOptions& o, const LayerConfig& c) {
  o.hidden = c.hidden();
  o.mode = r.choice("mode", "always", {"always", "megatron"}) == "megatron" ? SinkhornMode::megatron
                                                                          : SinkhornMode::always;
  o.num_experts = r.integer("num_experts", 0);
  o.k = r.integer("k", 0);
  o.max_iters = r.integer("max_iters", o.max_iters);
  o.tolerance = r.number("tolerance", o.tolerance);
  o.weight_mode = r.choice("weight_mode", o.weight_mode == SinkhornWeightMode::transport ? "transport" : "selection_only",
                           {"selection_only", "transport"}) == "transport"
                      ? SinkhornWeightMode::transport
                      : SinkhornWeightMode::selection_only;
  if (r.has("cost")) o.cost = r.choice("cost", "logits", {"logits", "probs"}) == "probs" ? SinkhornCost::probs : SinkhornCost::logits;
  r.mark("cost");
  if (r.has("temperature")) o.temperature = static_cast<float>(r.number("temperature", 1.0));
  r.mark("temperature");
}

SinkhornOptions sinkhorn_options(const json& j, const LayerConfig& c) {
  return parse_router_options<SinkhornOptions>(j, [&](Reader& r, SinkhornOptions& o) {
    read_sinkhorn(r, o, c);
  });
}

SelectiveSinkhornOptions selective_options(const json& j, const LayerConfig& c) {
  return parse_router_options<SelectiveSinkhornOptions>(j, [&](Reader& r, SelectiveSinkhornOptions& o) {
    read_sinkhorn(r, o.sinkhorn, c);
    MOEKIT_CHECK(o.sinkhorn.mode == SinkhornMode::always, r.where(),
                 ".mode: expected \"always\" for selective_sinkhorn (it chooses per step between Sinkhorn and "
                 "top-k itself), got \"megatron\"");
    o.p = r.number("p", o.p);
    // Unsigned in the options: a negative JSON value would wrap around silently.
    const auto non_negative = [&r](const char* key) {
      const int64_t v = r.integer(key, 0);
      MOEKIT_CHECK(v >= 0, r.where(), ".", key, ": expected an integer >= 0, got ", v);
      return static_cast<uint64_t>(v);
    };
    o.seed = non_negative("seed");
    o.layer = non_negative("layer");
    o.step = non_negative("step");
    o.training = r.boolean("training", o.training);
    if (r.has("topk")) {
      Reader t(r.raw("topk"), "router.topk");
      o.topk.topk_then_softmax = t.boolean("topk_then_softmax", o.topk.topk_then_softmax);
      o.topk.norm_topk_prob = t.boolean("norm_topk_prob", o.topk.norm_topk_prob);
      o.topk.routed_scaling_factor = static_cast<float>(t.number("routed_scaling_factor", o.topk.routed_scaling_factor));
      o.topk.score_func = t.choice("score_func", "softmax", {"softmax", "sigmoid"}) == "softmax" ? ScoreFunc::softmax : ScoreFunc::sigmoid;
      t.reject_unknown();
    }
    r.mark("topk");
  });
}

template <class R>
std::unique_ptr<AnyLayer> build(R router, const LayerConfig& c, const io::TensorSource* w, const std::string& p, uint64_t& s,
                                double router_values) {
  const int64_t E = router.num_experts(), k = router.k();
  FfnBank bank = ffn_bank(w, p + "experts.", true, E, routed_shape(c), c.expert_names, s, c.pack);
  std::vector<SharedExpert> shared = shared_experts(c, w, p, s);
  const double resident = resident_bytes_of(bank, shared, router_values);
  using L = SparseLayer<R, FfnBank>;
  L layer(std::move(router), std::move(bank), std::move(shared));
  return std::make_unique<SparseAnyLayer<R, FfnBank>>(
      c, std::move(layer),
      [k](const L&, const Workspace& ws, const Batch&) {
        auto t = topk_outputs(ws.plan, k);
        const std::vector<int32_t> it = {static_cast<int32_t>(ws.router.iterations)};
        const std::vector<float> er = {static_cast<float>(ws.router.error)};
        t.push_back(NamedTensor::of("sinkhorn_iterations", io::DType::I32, {1}, it));
        t.push_back(NamedTensor::of("sinkhorn_error", io::DType::F32, {1}, er));
        return t;
      },
      resident);
}

}  // namespace

void validate_sinkhorn(const json& j, const LayerConfig& c) { (void)sinkhorn_options(j, c); }
double weight_bytes_sinkhorn(const json& j, const LayerConfig& c) {
  const double E = static_cast<double>(sinkhorn_options(j, c).num_experts);
  return routed_layer_bytes(c, E * static_cast<double>(c.hidden()), E);
}
double weight_bytes_selective_sinkhorn(const json& j, const LayerConfig& c) {
  const double E = static_cast<double>(selective_options(j, c).sinkhorn.num_experts);
  return routed_layer_bytes(c, E * static_cast<double>(c.hidden()), E);
}
void validate_selective_sinkhorn(const json& j, const LayerConfig& c) { (void)selective_options(j, c); }

std::unique_ptr<AnyLayer> build_sinkhorn_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                               const std::string& p, uint64_t seed) {
  const SinkhornOptions o = sinkhorn_options(j, c);
  uint64_t s = splitmix64(seed);
  auto gate = tensor_or_random(w, p + "gate.weight", {o.num_experts, c.hidden()}, s, scale_of(c));
  const double rv = static_cast<double>(gate.size());
  return build(SinkhornRouter(o, std::move(gate)), c, w, p, s, rv);
}

std::unique_ptr<AnyLayer> build_selective_sinkhorn_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                                         const std::string& p, uint64_t seed) {
  const SelectiveSinkhornOptions o = selective_options(j, c);
  uint64_t s = splitmix64(seed);
  auto gate = tensor_or_random(w, p + "gate.weight", {o.sinkhorn.num_experts, c.hidden()}, s,
                               scale_of(c));
  const double rv = static_cast<double>(gate.size());
  return build(SelectiveSinkhornRouter(o, gate), c, w, p, s, rv);
}

}  // namespace moekit::detail
