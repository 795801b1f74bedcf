// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builders of the prototype routers (ROUTING.md section 6): prototype
// (ProMoE) and centroid (MixER nearest centroid).
#include <cmath>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/prototype.hpp"

namespace moekit::detail {
namespace {

ProMoEOptions promoe_options(const json& j, const LayerConfig& c) {
  return parse_router_options<ProMoEOptions>(j, [&](Reader& r, ProMoEOptions& o) {
    o.hidden = c.hidden();
    o.num_experts = r.integer("num_experts", 0);
    o.k = r.integer("k", 0);
    o.tau_r = static_cast<float>(r.number("tau_r", o.tau_r));
    const int64_t u = r.integer("uncond_token_type", o.uncond_token_type);
    MOEKIT_CHECK(u >= INT32_MIN && u <= INT32_MAX, "router.uncond_token_type: expected a 32-bit integer, got ", u);
    o.uncond_token_type = static_cast<int32_t>(u);
  });
}

CentroidOptions centroid_options(const json& j, const LayerConfig& c) {
  return parse_router_options<CentroidOptions>(j, [&](Reader& r, CentroidOptions& o) {
    o.hidden = c.hidden();
    o.num_experts = r.integer("num_experts", 0);
  });
}

}  // namespace

void validate_prototype(const json& j, const LayerConfig& c) { (void)promoe_options(j, c); }
void validate_centroid(const json& j, const LayerConfig& c) { (void)centroid_options(j, c); }
double weight_bytes_prototype(const json& j, const LayerConfig& c) {
  // E routed experts, the unconditional one, and the (ungated) shared expert.
  const double E = static_cast<double>(promoe_options(j, c).num_experts), d = static_cast<double>(c.hidden());
  const double shared_f =
      c.shared_null ? 0.0 : static_cast<double>(c.shared ? c.shared->intermediate : c.experts.intermediate);
  return 4.0 * E * d + routed_expert_bytes(c, E + 1) +
         (c.experts.gated ? 3.0 : 2.0) * d * shared_f * static_cast<double>(kernels::weight_type_bits(c.pack.type)) / 8.0;
}
double weight_bytes_centroid(const json& j, const LayerConfig& c) {
  const double E = static_cast<double>(centroid_options(j, c).num_experts);
  return routed_layer_bytes(c, E * static_cast<double>(c.hidden()), E);
}

std::unique_ptr<AnyLayer> build_prototype_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                                const std::string& p, uint64_t seed) {
  const ProMoEOptions o = promoe_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t E = o.num_experts, d = c.hidden(), k = o.k;
  auto protos = tensor_or_random(w, p + "router.prototypes", {E, d}, s, 1.0);
  // Experts 0..E-1 are `experts.{i}.*`, expert E the unconditional one `uncond_expert.*`.
  FfnBank bank(E + 1, routed_shape(c), c.pack);
  std::vector<float> buf;
  for (int64_t e = 0; e < E; ++e) load_ffn_into(bank, e, w, p + "experts." + std::to_string(e) + ".", c.expert_names, s, buf);
  load_ffn_into(bank, E, w, p + "uncond_expert.", c.expert_names, s, buf);
  // The always-on shared expert: `shared_expert.*` (ungated; a gated one is refused when the
  // config is parsed), width from the config's shared_expert or, without the key, the routed
  // width; `"shared_expert": null` removes it.
  LayerConfig sc = c;
  if (!c.shared_null)
    sc.shared = c.shared.value_or(SharedExpertConfig{c.experts.intermediate, false, "shared_expert."});
  std::vector<SharedExpert> shared = shared_experts(sc, w, p, s);
  const double resident = resident_bytes_of(bank, shared, static_cast<double>(protos.size()));
  using L = SparseLayer<ProMoERouter, FfnBank>;
  L layer(ProMoERouter(o, std::move(protos)), std::move(bank), std::move(shared));
  return std::make_unique<SparseAnyLayer<ProMoERouter, FfnBank>>(
      sc, std::move(layer), [k](const L&, const Workspace& ws, const Batch&) { return topk_outputs(ws.plan, k); }, resident);
}

std::unique_ptr<AnyLayer> build_centroid_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                               const std::string& p, uint64_t seed) {
  const CentroidOptions o = centroid_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t E = o.num_experts, d = c.hidden();
  auto cents = tensor_or_random(w, p + "router.centroids", {E, d}, s, scale_of(c));
  FfnBank bank = ffn_bank(w, p + "experts.", true, E, routed_shape(c), c.expert_names, s, c.pack);
  std::vector<SharedExpert> shared = shared_experts(c, w, p, s);
  const double resident = resident_bytes_of(bank, shared, static_cast<double>(cents.size()));
  using L = SparseLayer<CentroidRouter, FfnBank>;
  L layer(CentroidRouter(o, std::move(cents)), std::move(bank), std::move(shared));
  return std::make_unique<SparseAnyLayer<CentroidRouter, FfnBank>>(
      c, std::move(layer), [](const L&, const Workspace& ws, const Batch&) { return topk_outputs(ws.plan, 1); }, resident);
}

}  // namespace moekit::detail
