// SPDX-License-Identifier: Apache-2.0
// load_layer / random_layer: LayerConfig + tensors -> TopKLayer.
#include "moekit/io/model.hpp"

#include <cmath>
#include <vector>

#include "moekit/io/safetensors.hpp"

namespace moekit {
namespace {

struct ExpertTensorNames {
  std::string gate, up, down;
};

ExpertTensorNames names_of(ExpertNames n) {
  if (n == ExpertNames::mixtral) return {"w1", "w3", "w2"};
  return {"gate_proj", "up_proj", "down_proj"};
}

// Reads an FFN expert's HF-layout weights and packs them into the bank.
void load_ffn(const io::TensorSource& src, const std::string& base, const ExpertTensorNames& nm,
              FfnBank& bank, int64_t e, std::vector<float>& buf) {
  const int64_t d = bank.shape().hidden, f = bank.shape().intermediate;
  buf.resize(static_cast<size_t>(3 * f * d));
  float* gate = buf.data();
  float* up = gate + f * d;
  float* down = up + f * d;
  if (bank.shape().gated) src.read_f32_into(base + nm.gate + ".weight", {f, d}, gate);
  src.read_f32_into(base + nm.up + ".weight", {f, d}, up);
  src.read_f32_into(base + nm.down + ".weight", {d, f}, down);
  bank.set_expert(e, gate, up, down);
}

// Deterministic stream of unit-variance values: uniform on [-sqrt(3), sqrt(3)) from splitmix64
// (fast enough to fill gigabytes of benchmark weights).
struct Normal {
  uint64_t state;
  double next() {
    state += 0x9E3779B97F4A7C15ull;
    const double u = static_cast<double>(detail::splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    return (2.0 * u - 1.0) * 1.7320508075688772;
  }
};

void fill(float* p, int64_t n, double scale, Normal& g) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(g.next() * scale);
}

// The routed experts' shape; d always comes from the router (one source of truth).
FfnShape experts_shape(const LayerConfig& c) {
  FfnShape s = c.experts;
  s.hidden = c.hidden();
  return s;
}

}  // namespace

TopKLayer load_layer(const LayerConfig& c, const io::TensorSource& src, const std::string& prefix) {
  const int64_t E = c.router.num_experts, d = c.hidden();
  std::vector<float> gate = src.read_f32(prefix + "gate.weight", {E, d});
  std::vector<float> bias;
  if (c.router_bias) bias = src.read_f32(prefix + "gate.e_score_correction_bias", {E});
  TopKRouter router(c.router, std::move(gate), std::move(bias));
  FfnBank bank(E, experts_shape(c));
  const ExpertTensorNames nm = names_of(c.expert_names);
  std::vector<float> buf;
  for (int64_t e = 0; e < E; ++e) load_ffn(src, prefix + "experts." + std::to_string(e) + ".", nm, bank, e, buf);
  std::vector<SharedExpert> shared;
  if (c.shared) {
    FfnShape s{d, c.shared->intermediate, c.experts.gated, c.experts.act};
    SharedExpert se{FfnBank(1, s), {}};
    load_ffn(src, prefix + c.shared->names, names_of(ExpertNames::hf), se.ffn, 0, buf);
    if (c.shared->gated) se.gate = src.read_f32(prefix + "shared_expert_gate.weight", {1, d});
    shared.push_back(std::move(se));
  }
  return TopKLayer(std::move(router), std::move(bank), std::move(shared));
}

TopKLayer random_layer(const LayerConfig& c, uint64_t seed) {
  const int64_t E = c.router.num_experts, d = c.hidden();
  Normal g{detail::splitmix64(seed)};
  std::vector<float> gate(static_cast<size_t>(E * d));
  fill(gate.data(), E * d, 1.0 / std::sqrt(static_cast<double>(d)), g);
  std::vector<float> bias;
  if (c.router_bias) {
    bias.resize(static_cast<size_t>(E));
    fill(bias.data(), E, 0.01, g);
  }
  TopKRouter router(c.router, std::move(gate), std::move(bias));
  std::vector<float> buf;
  auto fill_bank = [&](FfnBank& bank) {
    const int64_t fe = bank.shape().intermediate;
    buf.resize(static_cast<size_t>(3 * fe * d));
    for (int64_t e = 0; e < bank.num_experts(); ++e) {
      fill(buf.data(), 2 * fe * d, 1.0 / std::sqrt(static_cast<double>(d)), g);
      fill(buf.data() + 2 * fe * d, d * fe, 1.0 / std::sqrt(static_cast<double>(fe)), g);
      bank.set_expert(e, buf.data(), buf.data() + fe * d, buf.data() + 2 * fe * d);
    }
  };
  FfnBank bank(E, experts_shape(c));
  fill_bank(bank);
  std::vector<SharedExpert> shared;
  if (c.shared) {
    SharedExpert se{FfnBank(1, FfnShape{d, c.shared->intermediate, c.experts.gated, c.experts.act}), {}};
    fill_bank(se.ffn);
    if (c.shared->gated) {
      se.gate.resize(static_cast<size_t>(d));
      fill(se.gate.data(), d, 1.0 / std::sqrt(static_cast<double>(d)), g);
    }
    shared.push_back(std::move(se));
  }
  return TopKLayer(std::move(router), std::move(bank), std::move(shared));
}

double layer_weight_bytes(const LayerConfig& c) {
  const double d = static_cast<double>(c.hidden());
  double n = static_cast<double>(c.router.num_experts) * d;  // router
  n += static_cast<double>(c.router.num_experts) * static_cast<double>(experts_shape(c).weights_per_expert());
  if (c.shared) n += (c.experts.gated ? 3.0 : 2.0) * d * static_cast<double>(c.shared->intermediate) + (c.shared->gated ? d : 0.0);
  return 4.0 * n;
}

}  // namespace moekit
