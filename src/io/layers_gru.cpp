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

// Where the tensors are: moekit's names (router.proj / router.out / router.gru.*), or the
// official RMoE checkpoint's (weight1 / weight2 in the block, the cell's twelve tensors
// weight_ir ... bias_hn under `cell_prefix`), plus the output bias.
struct GruLayout {
  bool rmoe = false;
  std::string cell_prefix;  // rmoe: empty = the prefix before "layers." + "rnn_router."
  bool output_bias = false;
};

GruRouterOptions gru_options(const json& j, const LayerConfig& c, GruLayout* layout = nullptr) {
  return parse_router_options<GruRouterOptions>(j, [&](Reader& r, GruRouterOptions& o) {
    o.hidden = c.hidden();
    o.num_experts = r.integer("num_experts", 0);
    o.k = r.integer("k", 0);
    o.d_r = r.integer("d_r", o.d_r);
    o.variant = r.choice("variant", "gru", {"gru", "rnn"}) == "gru" ? GruVariant::gru : GruVariant::rnn;
    o.routed_scaling_factor = static_cast<float>(r.number("routed_scaling_factor", o.routed_scaling_factor));
    GruLayout l;
    l.rmoe = r.choice("layout", "moekit", {"moekit", "rmoe"}) == "rmoe";
    l.cell_prefix = r.string("cell_prefix", "");
    l.output_bias = r.boolean("output_bias", false);
    if (layout) *layout = l;
  });
}

// RMoE's cell: the per-gate tensors stacked in torch.nn.GRUCell's order (r, z, n).
std::vector<float> rmoe_cell(const io::TensorSource* w, const std::string& cp, const char* kind, const char* what,
                             bool gru, int64_t dr, uint64_t& s, double scale) {
  std::vector<float> out;
  static const std::vector<std::string> kGru = {"r", "z", "n"}, kRnn = {"n"};
  for (const std::string& g : gru ? kGru : kRnn) {
    const std::string name = cp + what + "_" + kind + g;  // e.g. weight_ir, bias_hn
    const std::vector<int64_t> shape = std::string(what) == "weight" ? std::vector<int64_t>{dr, dr} : std::vector<int64_t>{dr};
    auto v = tensor_or_random(w, name, shape, s, scale);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

// The prefix before "layers." of a block prefix ("model.layers.3.block_sparse_moe." ->
// "model."), and the decoder layer's ("model.layers.3.").
std::string model_root(const std::string& p) {
  const size_t at = p.find("layers.");
  return at == std::string::npos ? std::string() : p.substr(0, at);
}
std::string decoder_layer(const std::string& p) {
  const size_t at = p.find("layers.");
  if (at == std::string::npos) return p;
  const size_t dot = p.find('.', at + 7);
  return dot == std::string::npos ? p : p.substr(0, dot + 1);
}

std::string cell_name(const io::TensorSource* w, const std::string& prefix, const std::string& name) {
  if (w == nullptr || w->contains(prefix + name) || !w->contains(name)) return prefix + name;
  return name;
}

}  // namespace

void validate_gru(const json& j, const LayerConfig& c) { (void)gru_options(j, c); }
double weight_bytes_gru(const json& j, const LayerConfig& c) {
  GruLayout lay;
  const GruRouterOptions o = gru_options(j, c, &lay);
  const double E = static_cast<double>(o.num_experts), d = static_cast<double>(c.hidden()),
               dr = static_cast<double>(o.d_r), gates = o.variant == GruVariant::gru ? 3.0 : 1.0;
  const double router = 2.0 * gates * dr * dr + 2.0 * gates * dr + dr * d + E * dr + (lay.output_bias ? d : 0.0);
  return routed_layer_bytes(c, router, E);
}

std::unique_ptr<AnyLayer> build_gru_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                          const std::string& p, uint64_t seed) {
  GruLayout lay;
  const GruRouterOptions o = gru_options(j, c, &lay);
  uint64_t s = splitmix64(seed);
  const int64_t E = o.num_experts, d = c.hidden(), dr = o.d_r, gates = o.variant == GruVariant::gru ? 3 : 1;
  const double sr = 1.0 / std::sqrt(static_cast<double>(dr));
  std::vector<float> wih, whh, bih, bhh, proj, out;
  if (lay.rmoe) {
    const std::string cp = lay.cell_prefix.empty() ? model_root(p) + "rnn_router." : lay.cell_prefix;
    const bool gru = o.variant == GruVariant::gru;
    wih = rmoe_cell(w, cp, "i", "weight", gru, dr, s, sr);
    whh = rmoe_cell(w, cp, "h", "weight", gru, dr, s, sr);
    bih = rmoe_cell(w, cp, "i", "bias", gru, dr, s, sr);
    bhh = rmoe_cell(w, cp, "h", "bias", gru, dr, s, sr);
    proj = tensor_or_random(w, p + "weight1", {dr, d}, s, 1.0 / std::sqrt(static_cast<double>(d)));
    out = tensor_or_random(w, p + "weight2", {E, dr}, s, sr);
  } else {
    wih = tensor_or_random(w, cell_name(w, p, "router.gru.weight_ih"), {gates * dr, dr}, s, sr);
    whh = tensor_or_random(w, cell_name(w, p, "router.gru.weight_hh"), {gates * dr, dr}, s, sr);
    bih = tensor_or_random(w, cell_name(w, p, "router.gru.bias_ih"), {gates * dr}, s, sr);
    bhh = tensor_or_random(w, cell_name(w, p, "router.gru.bias_hh"), {gates * dr}, s, sr);
    proj = tensor_or_random(w, p + "router.proj.weight", {dr, d}, s, 1.0 / std::sqrt(static_cast<double>(d)));
    out = tensor_or_random(w, p + "router.out.weight", {E, dr}, s, sr);
  }
  const double rv = static_cast<double>(wih.size() + whh.size() + 2 * gates * dr + proj.size() + out.size()) +
                    (lay.output_bias ? static_cast<double>(d) : 0.0);
  auto cell = std::make_shared<const GruCell>(o.variant, dr, wih, whh, std::move(bih), std::move(bhh));
  FfnBank bank = ffn_bank(w, p + "experts.", true, E, routed_shape(c), c.expert_names, s, c.pack);
  // RMoE's shared expert (mlp_share) sits beside the MoE block, in the decoder layer.
  std::vector<SharedExpert> shared = shared_experts(c, w, lay.rmoe ? decoder_layer(p) : p, s);
  std::vector<float> bias;
  if (lay.output_bias) {  // added to the MoE output before the routed scale: scaled with it
    bias = tensor_or_random(w, p + (lay.rmoe ? "bias" : "output_bias"), {d}, s, 0.1);
    for (float& v : bias) v *= o.routed_scaling_factor;
  }
  const double resident = resident_bytes_of(bank, shared, rv);
  using L = SparseLayer<GruRouter, FfnBank>;
  L layer(GruRouter(o, std::move(cell), proj, std::move(out)), std::move(bank), std::move(shared));
  layer.set_output_bias(std::move(bias));
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
