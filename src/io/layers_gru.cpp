// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builder of the layerwise recurrent GRU router (RMoE, ROUTING.md
// section 4). The cell is shared by every MoE layer of a model, so `router.gru.*` is looked
// up under the prefix first, then without it.
#include <cmath>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/gru.hpp"

namespace moekit::detail {
namespace {

GruRouterOptions gru_options(const json& j, const LayerConfig& c) {
  return parse_router_options<GruRouterOptions>(j, [&](Reader& r, GruRouterOptions& o) {
    o.hidden = c.hidden();
    o.num_experts = r.integer("num_experts", 0);
    o.k = r.integer("k", 0);
    o.d_r = r.integer("d_r", o.d_r);
    o.variant = r.choice("variant", "gru", {"gru", "rnn"}) == "gru" ? GruVariant::gru : GruVariant::rnn;
  });
}

std::string cell_name(const io::TensorSource* w, const std::string& prefix, const std::string& name) {
  if (w == nullptr || w->contains(prefix + name) || !w->contains(name)) return prefix + name;
  return name;
}

}  // namespace

void validate_gru(const json& j, const LayerConfig& c) { (void)gru_options(j, c); }
double weight_bytes_gru(const json& j, const LayerConfig& c) {
  const GruRouterOptions o = gru_options(j, c);
  const double E = static_cast<double>(o.num_experts), d = static_cast<double>(c.hidden()),
               dr = static_cast<double>(o.d_r), gates = o.variant == GruVariant::gru ? 3.0 : 1.0;
  const double router = 2.0 * gates * dr * dr + 2.0 * gates * dr + dr * d + E * dr;
  return routed_layer_bytes(c, router, E);
}

std::unique_ptr<AnyLayer> build_gru_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                          const std::string& p, uint64_t seed) {
  const GruRouterOptions o = gru_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t E = o.num_experts, d = c.hidden(), dr = o.d_r, gates = o.variant == GruVariant::gru ? 3 : 1;
  const double sr = 1.0 / std::sqrt(static_cast<double>(dr));
  auto wih = tensor_or_random(w, cell_name(w, p, "router.gru.weight_ih"), {gates * dr, dr}, s, sr);
  auto whh = tensor_or_random(w, cell_name(w, p, "router.gru.weight_hh"), {gates * dr, dr}, s, sr);
  auto bih = tensor_or_random(w, cell_name(w, p, "router.gru.bias_ih"), {gates * dr}, s, sr);
  auto bhh = tensor_or_random(w, cell_name(w, p, "router.gru.bias_hh"), {gates * dr}, s, sr);
  auto cell = std::make_shared<const GruCell>(o.variant, dr, wih, whh, std::move(bih), std::move(bhh));
  auto proj = tensor_or_random(w, p + "router.proj.weight", {dr, d}, s, 1.0 / std::sqrt(static_cast<double>(d)));
  auto out = tensor_or_random(w, p + "router.out.weight", {E, dr}, s, sr);
  const double rv = static_cast<double>(wih.size() + whh.size() + 2 * gates * dr + proj.size() + out.size());
  FfnBank bank = ffn_bank(w, p + "experts.", true, E, routed_shape(c), c.expert_names, s, c.pack);
  std::vector<SharedExpert> shared = shared_experts(c, w, p, s);
  const double resident = resident_bytes_of(bank, shared, rv);
  using L = SparseLayer<GruRouter, FfnBank>;
  L layer(GruRouter(o, std::move(cell), proj, std::move(out)), std::move(bank), std::move(shared));
  const int64_t k = o.k;
  return std::make_unique<SparseAnyLayer<GruRouter, FfnBank>>(
      c, std::move(layer),
      [k, dr](const L&, const Workspace& ws, const Batch&) {
        auto t = topk_outputs(ws.plan, k);
        const int64_t T = ws.plan.num_tokens();
        std::vector<float> st(ws.router.state.begin(), ws.router.state.begin() + static_cast<std::ptrdiff_t>(T * dr));
        t.push_back(NamedTensor::of("router_state", io::DType::F32, {T, dr}, st));
        return t;
      },
      resident);
}

}  // namespace moekit::detail
