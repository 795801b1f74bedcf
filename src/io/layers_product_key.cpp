// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builder of product-key routing over n^2 one-neuron experts (PEER,
// OmniMoE; ROUTING.md section 7): the experts section is a plain FFN of intermediate size 1,
// which is exactly an atomic expert `act(u . x) v`, held as PEER's embedding tables.
#include <cmath>
#include <string>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/product_key.hpp"

namespace moekit::detail {
namespace {

ProductKeyOptions pk_options(const json& j, const LayerConfig& c) {
  ProductKeyOptions o = parse_router_options<ProductKeyOptions>(j, [&](Reader& r, ProductKeyOptions& p) {
    p.hidden = c.hidden();
    p.num_experts = r.integer("num_experts", 0);
    p.k = r.integer("k", 0);
    p.split_query = r.boolean("split_query", p.split_query);
  });
  const FfnShape sh = routed_shape(c);
  MOEKIT_CHECK(!sh.gated && !sh.bias && sh.intermediate == 1, "router.type \"product_key\": experts expected atomic ",
               "(one neuron: a plain \"gelu\", \"gelu_tanh\" or \"relu\" FFN of intermediate_size 1 without biases), got ",
               sh.gated ? "gated experts" : sh.bias ? "experts with biases" : "intermediate_size ", sh.gated || sh.bias ? "" : std::to_string(sh.intermediate));
  // Sizes before anything is allocated: the family's E never reaches the config's topk
  // bounds. E <= 2^24 keeps the layer's per-worker combine buffers (E wide) small.
  MOEKIT_CHECK(o.num_experts <= (int64_t{1} << 24), "router.type \"product_key\": num_experts expected at most 2^24, got ",
               o.num_experts);
  const double values = 2.0 * static_cast<double>(o.num_experts) * static_cast<double>(o.hidden) +
                        2.0 * static_cast<double>(o.side()) * static_cast<double>(o.query_width());
  MOEKIT_CHECK(values <= 0x1p40, "router.type \"product_key\": keys and embeddings expected at most 2^40 values, got ",
               values);
  MOEKIT_CHECK(c.pack.type == kernels::WeightType::f32 && !c.pack.bf16_activations,
               "router.type \"product_key\": atomic experts are f32 (experts.dtype / --dtype f32), got ",
               kernels::to_string(c.pack.type), c.pack.bf16_activations ? " with bf16 activations" : "");
  return o;
}

}  // namespace

void validate_product_key(const json& j, const LayerConfig& c) { (void)pk_options(j, c); }
double weight_bytes_product_key(const json& j, const LayerConfig& c) {
  const ProductKeyOptions o = pk_options(j, c);
  return routed_layer_bytes(c, 2.0 * static_cast<double>(o.side()) * static_cast<double>(o.query_width()),
                            static_cast<double>(o.num_experts));
}

std::unique_ptr<AnyLayer> build_product_key_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                                  const std::string& p, uint64_t seed) {
  const ProductKeyOptions o = pk_options(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t E = o.num_experts, d = c.hidden(), n = o.side(), q = o.query_width();
  auto kx = tensor_or_random(w, p + "router.keys_x", {n, q}, s, 1.0 / std::sqrt(static_cast<double>(q)));
  auto ky = tensor_or_random(w, p + "router.keys_y", {n, q}, s, 1.0 / std::sqrt(static_cast<double>(q)));
  auto down = tensor_or_random(w, p + "experts.down_embed", {E, d}, s, 1.0 / std::sqrt(static_cast<double>(d)));
  auto up = tensor_or_random(w, p + "experts.up_embed", {E, d}, s, 1.0);
  std::vector<SharedExpert> shared = shared_experts(c, w, p, s);
  double resident = 4.0 * static_cast<double>(kx.size() + ky.size() + down.size() + up.size());
  for (const SharedExpert& sh : shared)
    resident += sh.ffn.weight_bytes_per_expert() + 4.0 * static_cast<double>(sh.gate.size() + sh.coefficient.size() +
                                                                               sh.coefficient_bias.size());
  using L = SparseLayer<ProductKeyRouter, AtomicExpertBank>;
  L layer(ProductKeyRouter(o, std::move(kx), std::move(ky)),
          AtomicExpertBank(E, d, std::move(down), std::move(up), routed_shape(c).act), std::move(shared));
  const int64_t k = o.k;
  return std::make_unique<SparseAnyLayer<ProductKeyRouter, AtomicExpertBank>>(
      c, std::move(layer), [k](const L&, const Workspace& ws, const Batch&) { return topk_outputs(ws.plan, k); }, resident);
}

}  // namespace moekit::detail
