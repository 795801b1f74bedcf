// SPDX-License-Identifier: Apache-2.0
// `moekit run` / `bench` builder of modality expert groups (MoMa, arXiv 2407.21770): each
// token's type (the input's `token_types`, 0 when absent) selects a group, whose own top-k
// router routes it among the group's experts only.
#include <cmath>
#include <string>
#include <vector>

#include "json_reader.hpp"
#include "layer_registry.hpp"
#include "moekit/routers/modality.hpp"
#include "moekit/routers/topk.hpp"

namespace moekit::detail {
namespace {

struct GroupSpec {
  TopKOptions options;
  std::vector<int32_t> types;
};

// The groups of a `modality` router object: `groups` [G] of top-k router objects, each with
// its `token_types`.
std::vector<GroupSpec> md_groups(const json& j, const LayerConfig& c) {
  Reader r(j, "router");
  r.mark("type");
  MOEKIT_CHECK(r.has("groups"), "router.groups: required for router type \"modality\" (an array of top-k routers with token_types)");
  const json& gs = r.raw("groups");
  r.reject_unknown();
  MOEKIT_CHECK(gs.is_array() && !gs.empty() && gs.size() <= 1024, "router.groups: expected an array of 1 to 1024 groups");
  std::vector<GroupSpec> out;
  int64_t total = 0;
  for (size_t g = 0; g < gs.size(); ++g) {
    const std::string where = "router.groups[" + std::to_string(g) + "]";
    MOEKIT_CHECK(gs[g].is_object(), where, ": expected an object");
    Reader rg(gs[g], where);
    GroupSpec spec;
    MOEKIT_CHECK(rg.has("token_types"), where, ".token_types: required (the token types this group takes)");
    const json& tt = rg.raw("token_types");
    MOEKIT_CHECK(tt.is_array() && !tt.empty() && tt.size() <= 4096, where, ".token_types: expected an array of 1 to 4096 integers");
    for (const json& v : tt) {
      MOEKIT_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < (int64_t{1} << 20), where,
                   ".token_types: expected integers in [0, 2^20), got ", v.dump());
      spec.types.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    LayerConfig gc;
    gc.router.hidden = c.hidden();
    parse_topk_router(rg, gc);
    MOEKIT_CHECK(!gc.router_bias && !gc.router_logit_bias && !gc.weight_on_input, where,
                 ": e_score_correction_bias, logit_bias and weight_on_input are not supported in a group");
    try {
      gc.router.validate();
    } catch (const error& e) {
      fail(where, ": ", e.what());
    }
    total += gc.router.num_experts;
    MOEKIT_CHECK(total <= (int64_t{1} << 24), "router.groups: expected at most 2^24 experts in all, got more");
    spec.options = gc.router;
    out.push_back(std::move(spec));
  }
  return out;
}

int64_t total_experts(const std::vector<GroupSpec>& gs) {
  int64_t n = 0;
  for (const GroupSpec& g : gs) n += g.options.num_experts;
  return n;
}

}  // namespace

void validate_modality(const json& j, const LayerConfig& c) {
  const std::vector<GroupSpec> gs = md_groups(j, c);
  std::vector<std::vector<int32_t>> types;
  for (const GroupSpec& g : gs) types.push_back(g.types);
  // Each type in one group: checked as the router will (without building it).
  std::vector<int64_t> owner;
  for (size_t g = 0; g < types.size(); ++g)
    for (const int32_t t : types[g]) {
      if (static_cast<size_t>(t) >= owner.size()) owner.resize(static_cast<size_t>(t) + 1, -1);
      MOEKIT_CHECK(owner[static_cast<size_t>(t)] < 0, "router.groups: token type ", t, " expected in one group, got groups ",
                   owner[static_cast<size_t>(t)], " and ", g);
      owner[static_cast<size_t>(t)] = static_cast<int64_t>(g);
    }
}
double weight_bytes_modality(const json& j, const LayerConfig& c) {
  const double E = static_cast<double>(total_experts(md_groups(j, c)));
  return routed_layer_bytes(c, E * static_cast<double>(c.hidden()), E);
}

std::unique_ptr<AnyLayer> build_modality_layer(const json& j, const LayerConfig& c, const io::TensorSource* w,
                                               const std::string& p, uint64_t seed) {
  const std::vector<GroupSpec> gs = md_groups(j, c);
  uint64_t s = splitmix64(seed);
  const int64_t d = c.hidden(), E = total_experts(gs);
  std::vector<TopKRouter> routers;
  std::vector<std::vector<int32_t>> types;
  double router_values = 0.0;
  int64_t width = 0;
  for (size_t g = 0; g < gs.size(); ++g) {
    const int64_t Eg = gs[g].options.num_experts;
    auto gate = tensor_or_random(w, p + "router.groups." + std::to_string(g) + ".weight", {Eg, d}, s, scale_of(c));
    router_values += static_cast<double>(gate.size());
    routers.emplace_back(gs[g].options, std::move(gate));
    types.push_back(gs[g].types);
    width = std::max(width, gs[g].options.k);
  }
  using R = ModalityGroupRouter<TopKRouter>;
  R router(std::move(routers), std::move(types));
  FfnBank bank = ffn_bank(w, p + "experts.", true, E, routed_shape(c), c.expert_names, s, c.pack);
  std::vector<SharedExpert> shared = shared_experts(c, w, p, s);
  const double resident = resident_bytes_of(bank, shared, router_values);
  using L = SparseLayer<R, FfnBank>;
  L layer(std::move(router), std::move(bank), std::move(shared));
  return std::make_unique<SparseAnyLayer<R, FfnBank>>(
      c, std::move(layer),
      [width](const L& l, const Workspace& ws, const Batch& b) {
        std::vector<NamedTensor> out = topk_outputs(ws.plan, width);
        const int64_t T = ws.plan.num_tokens();
        std::vector<int32_t> group(static_cast<size_t>(T), -1);
        for (int64_t t = 0; t < T; ++t)
          if (!b.is_padding(t)) group[static_cast<size_t>(t)] = static_cast<int32_t>(l.router().group_of(b, t));
        out.push_back(NamedTensor::of("token_group", io::DType::I32, {T}, group));
        return out;
      },
      resident);
}

}  // namespace moekit::detail
