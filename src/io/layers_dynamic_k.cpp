// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builder of dynamic-k routing (ROUTING.md section 7): top-p, threshold
// and the Tsallis hybrid, with an optional layer-wise k_max schedule.
#include <string>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/dynamic_k.hpp"

namespace moekit::detail {
namespace {

DynamicKOptions dk_options(const json& j, const LayerConfig& c) {
  return parse_router_options<DynamicKOptions>(j, [&](Reader& r, DynamicKOptions& o) {
    o.hidden = c.hidden();
    o.num_experts = r.integer("num_experts", 0);
    const std::string mode = r.choice("mode", "top_p", {"top_p", "threshold", "tsallis"});
    o.mode = mode == "top_p" ? DynamicKMode::top_p : mode == "threshold" ? DynamicKMode::threshold : DynamicKMode::tsallis;
    o.top_p = r.number("top_p", o.top_p);
    o.top_p_rule = r.choice("top_p_rule", "reach", {"reach", "within"}) == "reach" ? TopPRule::reach : TopPRule::within;
    o.threshold = r.number("threshold", o.threshold);
    o.k_min = r.integer("k_min", o.k_min);
    o.k_max = r.integer("k_max", o.k_max);
    o.entropy_index = r.number("entropy_index", o.entropy_index);
    o.entropy_threshold = r.number("entropy_threshold", o.entropy_threshold);
    o.entropy_normalize = r.boolean("entropy_normalize", o.entropy_normalize);
    o.norm_topk_prob = r.boolean("norm_topk_prob", o.norm_topk_prob);
    o.capacity_factor = r.number("capacity_factor", o.capacity_factor);
    o.min_capacity = r.integer("min_capacity", o.min_capacity);
    o.drop_policy = parse_drop_policy(r.string("drop_policy", "score"), r.where() + ".drop_policy");
    o.renormalize_after_drop = r.boolean("renormalize_after_drop", o.renormalize_after_drop);
    // A layer-wise budget: k_max becomes layer `layer_index`'s entry of the schedule over
    // `num_layers` layers between schedule_k_lo and k_max (0: E).
    const std::string sched =
        r.choice("schedule", "none", {"none", "uniform", "descending", "ascending", "pyramid", "wave"});
    const int64_t layers = r.integer("num_layers", 0), layer = r.integer("layer_index", -1),
                  k_lo = r.integer("schedule_k_lo", 1);
    if (sched == "none") {
      MOEKIT_CHECK(!r.has("num_layers") && !r.has("layer_index") && !r.has("schedule_k_lo"), r.where(),
                   ": num_layers, layer_index and schedule_k_lo expected only with a schedule, got schedule \"none\"");
      return;
    }
    MOEKIT_CHECK(o.num_experts >= 1, r.where(), ".num_experts: expected >= 1, got ", o.num_experts);
    MOEKIT_CHECK(layers >= 1 && layers <= 1'000'000, r.where(), ".num_layers: expected in [1, 1e6] with a schedule, got ",
                 layers);
    MOEKIT_CHECK(layer >= 0 && layer < layers, r.where(), ".layer_index: expected in [0, num_layers = ", layers,
                 "), got ", layer);
    const int64_t k_hi = o.k_max == 0 ? o.num_experts : o.k_max;
    MOEKIT_CHECK(k_lo >= 1 && k_lo <= k_hi, r.where(), ".schedule_k_lo: expected in [1, k_max = ", k_hi, "], got ", k_lo);
    const DynamicKSchedule s = sched == "uniform"      ? DynamicKSchedule::uniform
                               : sched == "descending" ? DynamicKSchedule::descending
                               : sched == "ascending"  ? DynamicKSchedule::ascending
                               : sched == "pyramid"    ? DynamicKSchedule::pyramid
                                                       : DynamicKSchedule::wave;
    o.k_max = dynamic_k_schedule(s, layers, k_lo, k_hi)[static_cast<size_t>(layer)];
    MOEKIT_CHECK(o.k_min <= o.k_max, r.where(), ".k_min: expected <= the scheduled k_max of layer ", layer, " (",
                 o.k_max, "), got ", o.k_min);
  });
}

}  // namespace

void validate_dynamic_k(const json& j, const LayerConfig& c) { (void)dk_options(j, c); }
double weight_bytes_dynamic_k(const json& j, const LayerConfig& c) {
  const double E = static_cast<double>(dk_options(j, c).num_experts);
  return routed_layer_bytes(c, E * static_cast<double>(c.hidden()), E);
}

std::unique_ptr<AnyLayer> build_dynamic_k_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                                const std::string& p, uint64_t seed) {
  const DynamicKOptions o = dk_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t E = o.num_experts, d = c.hidden();
  auto gate = tensor_or_random(w, p + "gate.weight", {E, d}, s, scale_of(c));
  FfnBank bank = ffn_bank(w, p + "experts.", true, E, routed_shape(c), c.expert_names, s, c.pack);
  std::vector<SharedExpert> shared = shared_experts(c, w, p, s);
  const double resident = resident_bytes_of(bank, shared, static_cast<double>(gate.size()));
  using L = SparseLayer<DynamicKRouter, FfnBank>;
  L layer(DynamicKRouter(o, std::move(gate)), std::move(bank), std::move(shared));
  const int64_t width = o.width();
  return std::make_unique<SparseAnyLayer<DynamicKRouter, FfnBank>>(
      c, std::move(layer),
      [width](const L&, const Workspace& ws, const Batch&) {
        std::vector<NamedTensor> out = topk_outputs(ws.plan, width);
        const int64_t T = ws.plan.num_tokens();
        std::vector<int32_t> n(static_cast<size_t>(T));
        for (int64_t t = 0; t < T; ++t) n[static_cast<size_t>(t)] = ws.plan.slot_offsets()[t + 1] - ws.plan.slot_offsets()[t];
        out.push_back(NamedTensor::of("num_selected", io::DType::I32, {T}, n));
        return out;
      },
      resident);
}

}  // namespace moekit::detail
