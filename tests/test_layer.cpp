// SPDX-License-Identifier: Apache-2.0
// SparseLayer<TopKRouter, FfnBank> (and FunctorBank) against the double-precision reference
// in tests/reference: random shapes and options, every preset, edge cases, thread and
// workspace determinism, argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/io/config.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"
#include "reference/reference.hpp"
#include "support/float16_ref.hpp"
#include "support/topk_params.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Activation;
using moekit::Batch;
using moekit::DropPolicy;
using moekit::FfnBank;
using moekit::FfnShape;
using moekit::RoutingPlan;
using moekit::ScoreFunc;
using moekit::TopKOptions;
using moekit::TopKRouter;
using moekit::Workspace;
using Layer = moekit::SparseLayer<TopKRouter, FfnBank>;

constexpr double kRel = 1e-4;        // relative tolerance on outputs
constexpr double kFloorFrac = 1e-5;  // absolute floor: 1e-5 * max |reference|

// ------------------------------------------------------------------------ helpers

using test_support::Rng;

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& m : v) s += "\n  " + m;
  return s;
}

ref::Activation to_ref(Activation a) {
  switch (a) {
    case Activation::silu: return ref::Activation::silu;
    case Activation::gelu: return ref::Activation::gelu;
    case Activation::gelu_tanh: return ref::Activation::gelu_tanh;
    case Activation::relu: return ref::Activation::relu;
  }
  return ref::Activation::silu;
}

using moekit_test::to_ref;

// Random FFN weights, variance 1/fan_in (uniform), HF layout.
ref::Ffn random_ffn(Rng& rng, int64_t d, int64_t f, bool gated, Activation act) {
  ref::Ffn r;
  r.hidden = d;
  r.intermediate = f;
  r.gated = gated;
  r.act = to_ref(act);
  const double a_in = std::sqrt(3.0 / double(d)), a_out = std::sqrt(3.0 / double(f));
  if (gated) r.gate = rng.vec(static_cast<size_t>(f * d), a_in);
  r.up = rng.vec(static_cast<size_t>(f * d), a_in);
  r.down = rng.vec(static_cast<size_t>(d * f), a_out);
  return r;
}

void load(FfnBank& bank, int64_t e, const ref::Ffn& f) {
  bank.set_expert(e, f.gated ? f.gate.data() : nullptr, f.up.data(), f.down.data());
}

struct SharedSpec {
  int64_t intermediate;
  bool gated;
  bool residual = false;  // DeepSpeed PR-MoE coefficient
};

// What a layer is made of: router options, expert shape, shared experts.
struct LayerSpec {
  TopKOptions opt;
  FfnShape shape;
  std::vector<SharedSpec> shared;
  bool bias = false;
  bool weight_on_input = false;
};

// A library layer and the same weights for the reference.
struct Built {
  std::unique_ptr<Layer> layer;
  ref::TopKParams params;
  std::vector<float> W, bias;
  std::vector<ref::Ffn> experts;
  std::vector<ref::Shared> shared;
  bool weight_on_input = false;
};

Built build(LayerSpec spec, Rng& rng, double logit_std = 2.0) {
  Built b;
  TopKOptions& o = spec.opt;
  const int64_t d = o.hidden, E = o.num_experts;
  spec.shape.hidden = d;
  b.W = rng.vec(static_cast<size_t>(E * d), 3.0 * logit_std / std::sqrt(double(d)));
  if (spec.bias) b.bias = rng.vec(static_cast<size_t>(E), 0.1);
  FfnBank bank(E, spec.shape);
  for (int64_t e = 0; e < E; ++e) {
    b.experts.push_back(random_ffn(rng, d, spec.shape.intermediate, spec.shape.gated, spec.shape.act));
    load(bank, e, b.experts.back());
  }
  std::vector<moekit::SharedExpert> shared;
  for (const SharedSpec& s : spec.shared) {
    ref::Shared rs;
    rs.ffn = random_ffn(rng, d, s.intermediate, spec.shape.gated, spec.shape.act);
    if (s.gated) rs.gate = rng.vec(static_cast<size_t>(d), std::sqrt(3.0 / double(d)));
    if (s.residual) {
      rs.coefficient = rng.vec(static_cast<size_t>(2 * d), 2.0 * std::sqrt(3.0 / double(d)));
      rs.coefficient_bias = rng.vec(2, 0.5);
    }
    FfnShape sh = spec.shape;
    sh.intermediate = s.intermediate;
    moekit::SharedExpert se{FfnBank(1, sh), rs.gate, rs.coefficient, rs.coefficient_bias};
    load(se.ffn, 0, rs.ffn);
    shared.push_back(std::move(se));
    b.shared.push_back(std::move(rs));
  }
  b.params = to_ref(o, b.bias);
  b.layer = std::make_unique<Layer>(TopKRouter(o, b.W, b.bias), std::move(bank), std::move(shared));
  b.layer->set_weight_on_input(spec.weight_on_input);
  b.weight_on_input = spec.weight_on_input;
  return b;
}

// Hidden states and batch layout.
struct Input {
  int64_t T = 0, d = 0;
  std::vector<float> x;
  std::vector<uint8_t> pad;
  std::vector<int32_t> offsets;
  Batch batch() const {
    Batch b = Batch::single(T, d);
    b.padding = pad;
    b.sequence_offsets = offsets;
    return b;
  }
  const uint8_t* pad_ptr() const { return pad.empty() ? nullptr : pad.data(); }
  bool padded(int64_t t) const { return !pad.empty() && pad[static_cast<size_t>(t)]; }
  int64_t routed() const {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) n += !padded(t);
    return n;
  }
};

Input random_input(Rng& rng, int64_t T, int64_t d, double p_padding) {
  Input in;
  in.T = T;
  in.d = d;
  in.x = rng.vec(static_cast<size_t>(T * d), 1.0);
  if (T > 0 && rng.coin(0.5)) {
    const int64_t S = rng.integer(1, std::min<int64_t>(T, 5));
    std::vector<int32_t> cuts{0, static_cast<int32_t>(T)};
    for (int64_t s = 1; s < S; ++s) cuts.push_back(static_cast<int32_t>(rng.integer(0, T)));
    std::sort(cuts.begin(), cuts.end());
    in.offsets = cuts;
  }
  if (rng.coin(p_padding)) {
    in.pad.assign(static_cast<size_t>(T), 0);
    const double rate = rng.uniform(0.05, 0.6);
    for (uint8_t& p : in.pad) p = rng.coin(rate);
  }
  return in;
}

struct Knobs {
  double p_group = 0.25, p_capacity = 0.35, p_padding = 0.3, p_sigmoid = 0.3, p_tts = 0.2, p_bias = 0.3,
         p_shared = 0.4;
};

LayerSpec random_spec(Rng& rng, const Knobs& kn = {}) {
  LayerSpec s;
  TopKOptions& o = s.opt;
  if (rng.coin(kn.p_group)) {
    const int64_t G = std::vector<int64_t>{2, 4, 8}[static_cast<size_t>(rng.integer(0, 2))];
    const int64_t g = rng.integer(1, 64 / G);
    o.num_experts = G * g;
    o.n_group = G;
    o.topk_group = rng.integer(1, G);
    o.k = rng.integer(1, std::min<int64_t>(o.topk_group * g, rng.coin(0.7) ? 8 : 64));
  } else {
    o.num_experts = rng.integer(1, 64);
    o.k = rng.integer(1, std::min<int64_t>(o.num_experts, rng.coin(0.7) ? 8 : 64));
  }
  o.hidden = rng.coin(0.2) ? rng.integer(1, 8) : rng.integer(1, 96);
  if (rng.coin(kn.p_sigmoid)) o.score_func = ScoreFunc::sigmoid;
  else if (rng.coin(kn.p_tts)) o.topk_then_softmax = true;
  o.norm_topk_prob = rng.coin(0.5);
  if (rng.coin(0.4)) o.routed_scaling_factor = static_cast<float>(rng.uniform(0.5, 3.0));
  if (rng.coin(kn.p_capacity)) {
    const double cfs[] = {0.5, 1.0, 1.25, 2.0, rng.uniform(0.1, 3.0)};
    o.capacity_factor = cfs[rng.integer(0, 4)];
    if (rng.coin(0.4)) o.min_capacity = rng.integer(1, 5);
    o.drop_policy = static_cast<DropPolicy>(rng.integer(0, 2));
    o.renormalize_after_drop = rng.coin(0.5);
  }
  s.bias = rng.coin(kn.p_bias);
  s.weight_on_input = rng.coin(0.2);
  s.shape.intermediate = rng.integer(1, 80);
  s.shape.gated = rng.coin(0.6);
  s.shape.act = static_cast<Activation>(rng.integer(0, 3));
  if (rng.coin(kn.p_shared)) {
    const int64_t n = rng.integer(1, 2);
    for (int64_t j = 0; j < n; ++j) s.shared.push_back({rng.integer(1, 80), rng.coin(0.5)});
    if (!s.shared[0].gated && rng.coin(0.5)) s.shared[0].residual = true;
  }
  return s;
}

std::string describe(const LayerSpec& s, const Input& in) {
  const TopKOptions& o = s.opt;
  char buf[480];
  std::snprintf(buf, sizeof buf,
                "T=%lld E=%lld k=%lld d=%lld f=%lld %s act=%d %s%s norm=%d scale=%g bias=%d groups=%lld/%lld "
                "cap=%g min=%lld policy=%d renorm=%d shared=%zu padded=%d seqs=%zu weight_on_input=%d",
                (long long)in.T, (long long)o.num_experts, (long long)o.k, (long long)o.hidden,
                (long long)s.shape.intermediate, s.shape.gated ? "gated" : "plain", static_cast<int>(s.shape.act),
                o.score_func == ScoreFunc::softmax ? "softmax" : "sigmoid", o.topk_then_softmax ? "+tts" : "",
                o.norm_topk_prob, o.routed_scaling_factor, s.bias, (long long)o.n_group, (long long)o.topk_group,
                o.capacity_factor, (long long)o.min_capacity, static_cast<int>(o.drop_policy), o.renormalize_after_drop,
                s.shared.size(), !in.pad.empty(), in.offsets.empty() ? size_t{1} : in.offsets.size() - 1,
                s.weight_on_input);
  return buf;
}

struct Totals {
  int64_t cases = 0, compared = 0, near_tie = 0, capacity_excluded = 0;
};
Totals g_totals;

class TotalsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf("[ layer ref ] cases: %lld, tokens compared exactly: %lld, excluded as near-ties: %lld, "
                "excluded for capacity near-ties: %lld\n",
                (long long)g_totals.cases, (long long)g_totals.compared, (long long)g_totals.near_tie, (long long)g_totals.capacity_excluded);
  }
};
[[maybe_unused]] ::testing::Environment* const g_env = ::testing::AddGlobalTestEnvironment(new TotalsPrinter);

struct Result {
  std::vector<float> out;
  ref::CompareReport rep;
  double ref_max = 0.0;
};

// Runs the layer, checks the plan, routing, outputs (against the reference's own routing,
// skipping near-tie tokens, and against the library's plan for every token).
Result check_layer(const Built& b, const Input& in, int threads = 1, Workspace* reuse = nullptr,
                   const ref::CompareOptions& co = {}) {
  Result r;
  const int64_t d = in.d, T = in.T;
  Workspace fresh;
  Workspace& ws = reuse ? *reuse : fresh;
  r.out.assign(static_cast<size_t>(T * d), std::numeric_limits<float>::quiet_NaN());
  b.layer->forward(in.batch(), in.x.data(), r.out.data(), ws, threads);

  const ref::PlanView view = ref::view_of(ws.plan);
  const auto inv = ref::plan_invariant_errors(view, in.pad_ptr(), b.params.k);
  EXPECT_TRUE(inv.empty()) << "plan invariants:" << join(inv);
  const ref::Routing want = ref::route_topk(b.params, b.W.data(), in.x.data(), T, in.pad_ptr());
  r.rep = ref::compare_routing(want, view, co);
  EXPECT_TRUE(r.rep.errors.empty()) << "routing:" << join(r.rep.errors);

  const std::vector<double> y = ref::moe_forward(want, b.experts, b.shared, in.x.data(), T, d, b.weight_on_input);
  r.ref_max = ref::max_abs(y);
  const auto e1 = ref::compare_values(y, r.out.data(), d, kRel, kFloorFrac, r.rep.excluded);
  EXPECT_TRUE(e1.empty()) << "output vs reference:" << join(e1);
  const std::vector<double> y_plan =
      ref::moe_forward(ref::routing_from_view(view, in.pad_ptr()), b.experts, b.shared, in.x.data(), T, d,
                       b.weight_on_input);
  const auto e2 = ref::compare_values(y_plan, r.out.data(), d, kRel, kFloorFrac);
  EXPECT_TRUE(e2.empty()) << "output vs reference on the library's plan:" << join(e2);

  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < d; ++i) {
      const float v = r.out[static_cast<size_t>(t * d + i)];
      if (in.padded(t)) {
        EXPECT_EQ(v, 0.0f) << "padded token " << t;
      } else {
        EXPECT_TRUE(std::isfinite(v)) << "token " << t;
      }
    }
  // No vacuous pass: some routed token has a non-zero reference output.
  if (in.routed() > 0) {
    EXPECT_GT(r.ref_max, 0.0) << "reference output is all zero";
  }
  ++g_totals.cases;
  if (co.exclude_near_ties) {
    g_totals.compared += r.rep.compared;
    g_totals.near_tie += r.rep.near_tie;
    g_totals.capacity_excluded += r.rep.capacity_excluded;
  }
  return r;
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected moekit::error mentioning \"" << needle << "\", nothing thrown";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" does not mention \"" << needle << "\"";
  }
}

LayerSpec simple_spec(int64_t E, int64_t k, int64_t d, int64_t f) {
  LayerSpec s;
  s.opt.num_experts = E;
  s.opt.k = k;
  s.opt.hidden = d;
  s.shape.intermediate = f;
  return s;
}

// A preset's LayerConfig shrunk to test sizes.
LayerSpec preset_spec(const std::string& name, Rng& rng, int variant) {
  const moekit::LayerConfig c = moekit::preset_defaults(name);
  LayerSpec s;
  s.opt = c.router;
  s.shape = c.experts;
  s.bias = c.router_bias;
  if (s.opt.num_experts > 32) s.opt.num_experts = c.router.grouped() ? 32 : 16;
  s.opt.k = std::min(s.opt.k, s.opt.num_experts);
  s.opt.hidden = std::vector<int64_t>{24, 37, 64, 96, 5}[static_cast<size_t>(variant % 5)];
  s.shape.intermediate = rng.integer(8, 80);
  if (c.shared) {
    // DeepSeek-V3: width n_shared_experts * moe_intermediate_size (n_shared = 1 by default).
    const int64_t w = c.shared->intermediate == c.experts.intermediate ? s.shape.intermediate : rng.integer(8, 80);
    s.shared.push_back({w, c.shared->gated});
  }
  // Released Qwen3 / OLMoE checkpoints set norm_topk_prob; test both.
  if ((name == "qwen3_moe" || name == "olmoe" || name == "qwen2_moe") && variant % 2) s.opt.norm_topk_prob = true;
  if (name == "switch" && variant % 2) s.shape.act = Activation::gelu;
  return s;
}

// ------------------------------------------------------------------------ random comparisons

TEST(LayerRandom, MatchesReferenceAllOptions) {
  Rng rng(0x1A7E5);
  int64_t compared = 0, excluded = 0, routed = 0;
  for (int i = 0; i < 140; ++i) {
    const LayerSpec spec = random_spec(rng);
    const Built b = build(spec, rng, rng.uniform(0.5, 4.0));
    const Input in = random_input(rng, rng.integer(0, 70), spec.opt.hidden, 0.3);
    SCOPED_TRACE("case " + std::to_string(i) + ": " + describe(spec, in));
    const Result r = check_layer(b, in, i % 5 == 0 ? 2 : 1);  // threads: see LayerThreads
    compared += r.rep.compared;
    excluded += r.rep.near_tie + r.rep.capacity_excluded;
    routed += in.routed();
    if (HasFailure()) return;
  }
  EXPECT_GT(compared, routed / 2);
  EXPECT_LE(excluded, routed / 50 + 2);
}

TEST(LayerRandom, EveryActivationGatedAndPlain) {
  Rng rng(0xAC7);
  for (int act = 0; act < 4; ++act) {
    for (bool gated : {true, false}) {
      for (int rep = 0; rep < 4; ++rep) {
        LayerSpec spec = random_spec(rng);
        spec.shape.act = static_cast<Activation>(act);
        spec.shape.gated = gated;
        const Built b = build(spec, rng);
        const Input in = random_input(rng, rng.integer(1, 70), spec.opt.hidden, 0.3);
        SCOPED_TRACE(describe(spec, in));
        check_layer(b, in, rep == 0 ? 2 : 1);
      }
    }
  }
}

// ------------------------------------------------------------------------ presets

void check_preset(const std::string& name) {
  Rng rng(0x9E5E7 + name.size() * 131 + static_cast<uint64_t>(name[0]));
  for (int variant = 0; variant < 6; ++variant) {
    const LayerSpec spec = preset_spec(name, rng, variant);
    const Built b = build(spec, rng);
    const Input in = random_input(rng, rng.integer(1, 70), spec.opt.hidden, 0.3);
    SCOPED_TRACE(describe(spec, in));
    check_layer(b, in, 1 + variant % 2);
    // Preset semantics visible in the output.
    if (name == "switch") {
      // Top-1 with capacity and no shared expert: a token whose slot was dropped outputs 0.
      Workspace ws;
      std::vector<float> out(static_cast<size_t>(in.T * in.d));
      b.layer->forward(in.batch(), in.x.data(), out.data(), ws, 1);
      for (int64_t t = 0; t < in.T; ++t) {
        const auto s0 = static_cast<size_t>(ws.plan.slot_offsets()[static_cast<size_t>(t)]);
        if (ws.plan.slots_of(t) != 1 || !ws.plan.slot_dropped()[s0]) continue;
        for (int64_t i = 0; i < in.d; ++i) {
          EXPECT_EQ(out[static_cast<size_t>(t * in.d + i)], 0.0f) << "dropped token " << t;
        }
      }
    }
  }
}

TEST(LayerPreset, Mixtral) { check_preset("mixtral"); }
TEST(LayerPreset, Qwen2Moe) { check_preset("qwen2_moe"); }
TEST(LayerPreset, Qwen3Moe) { check_preset("qwen3_moe"); }
TEST(LayerPreset, Olmoe) { check_preset("olmoe"); }
TEST(LayerPreset, DeepseekV3) { check_preset("deepseek_v3"); }
TEST(LayerPreset, Switch) { check_preset("switch"); }

TEST(LayerPresetSemantics, SharedExpertGatingQwen2VersusUngatedDeepseek) {
  // Zero shared gate: Qwen2-MoE multiplies the shared FFN by sigmoid(0) = 1/2; DeepSeek-V3's
  // ungated shared expert adds it at full weight. Check the difference to the routed part.
  Rng rng(0x5AED);
  for (const char* name : {"qwen2_moe", "deepseek_v3"}) {
    LayerSpec spec = preset_spec(name, rng, 0);
    const Built with = build(spec, rng);
    // Same layer without the shared expert.
    std::vector<moekit::SharedExpert> none;
    FfnShape sh = spec.shape;
    sh.hidden = spec.opt.hidden;
    FfnBank bank(spec.opt.num_experts, sh);
    for (int64_t e = 0; e < spec.opt.num_experts; ++e) load(bank, e, with.experts[static_cast<size_t>(e)]);
    FfnShape ssh = sh;
    ssh.intermediate = with.shared[0].ffn.intermediate;
    moekit::SharedExpert se{FfnBank(1, ssh), with.shared[0].gate.empty() ? std::vector<float>{}
                                                                          : std::vector<float>(static_cast<size_t>(sh.hidden), 0.0f)};
    load(se.ffn, 0, with.shared[0].ffn);
    std::vector<moekit::SharedExpert> shared{se};
    const Layer routed_only(TopKRouter(spec.opt, with.W, with.bias), bank, none);
    const Layer zero_gate(TopKRouter(spec.opt, with.W, with.bias), bank, shared);
    const Input in = random_input(rng, 20, spec.opt.hidden, 0.0);
    std::vector<float> a(static_cast<size_t>(20 * in.d)), z(a.size());
    Workspace ws;
    routed_only.forward(in.batch(), in.x.data(), a.data(), ws, 1);
    zero_gate.forward(in.batch(), in.x.data(), z.data(), ws, 1);
    const double g = std::string(name) == "qwen2_moe" ? 0.5 : 1.0;
    std::vector<double> want;
    for (int64_t t = 0; t < 20; ++t) {
      const std::vector<double> xt(in.x.begin() + t * in.d, in.x.begin() + (t + 1) * in.d);
      const std::vector<double> s = ref::ffn_forward(with.shared[0].ffn, xt);
      for (int64_t i = 0; i < in.d; ++i) want.push_back(g * s[static_cast<size_t>(i)]);
    }
    std::vector<float> diff(a.size());
    for (size_t i = 0; i < a.size(); ++i) diff[i] = z[i] - a[i];
    const auto errs = ref::compare_values(want, diff.data(), in.d, 1e-3, 1e-4);
    EXPECT_TRUE(errs.empty()) << name << join(errs);
    EXPECT_GT(ref::max_abs(want), 0.0);
  }
}

// ------------------------------------------------------------------------ edge cases

TEST(LayerEdge, EmptyBatch) {
  Rng rng(1);
  LayerSpec spec = simple_spec(8, 2, 12, 16);
  spec.shared.push_back({10, true});
  spec.opt.capacity_factor = 1.0;
  const Built b = build(spec, rng);
  Workspace ws;
  b.layer->forward(Batch::single(0, 12), nullptr, nullptr, ws, 2);
  EXPECT_EQ(ws.plan.num_tokens(), 0);
  EXPECT_EQ(ws.plan.num_slots(), 0);
  Input in;
  in.d = 12;
  check_layer(b, in, 1);
}

TEST(LayerEdge, SingleToken) {
  Rng rng(2);
  for (int i = 0; i < 40; ++i) {
    const LayerSpec spec = random_spec(rng);
    const Built b = build(spec, rng);
    Input in = random_input(rng, 1, spec.opt.hidden, 0.0);
    SCOPED_TRACE(describe(spec, in));
    check_layer(b, in, i % 5 == 0 ? 2 : 1);
  }
}

TEST(LayerEdge, KEqualsOneAndKEqualsE) {
  Rng rng(3);
  for (int64_t E : {1, 2, 5, 16, 64}) {
    for (bool all : {false, true}) {
      LayerSpec spec = random_spec(rng, Knobs{0.0, 0.3, 0.3, 0.3, 0.2, 0.3, 0.4});
      spec.opt.num_experts = E;
      spec.opt.k = all ? E : 1;
      spec.shape.intermediate = std::min<int64_t>(spec.shape.intermediate, 24);
      const Built b = build(spec, rng);
      const Input in = random_input(rng, rng.integer(1, 40), spec.opt.hidden, 0.3);
      SCOPED_TRACE(describe(spec, in));
      check_layer(b, in, all ? 2 : 1);
    }
  }
}

TEST(LayerEdge, AllPaddingGivesZeros) {
  Rng rng(4);
  for (double cf : {0.0, 1.0}) {
    LayerSpec spec = simple_spec(6, 2, 20, 12);
    spec.shared = {{8, true}, {9, false}};  // shared experts skip padding too
    spec.opt.capacity_factor = cf;
    const Built b = build(spec, rng);
    Input in = random_input(rng, 9, 20, 0.0);
    in.pad.assign(9, 1);
    Workspace ws;
    std::vector<float> out(9 * 20, std::numeric_limits<float>::quiet_NaN());
    b.layer->forward(in.batch(), in.x.data(), out.data(), ws, 2);
    for (float v : out) EXPECT_EQ(v, 0.0f);
    EXPECT_EQ(ws.plan.num_slots(), 0);
    check_layer(b, in, 1);
  }
}

TEST(LayerEdge, NaNInPaddedRowsIsIgnored) {
  // Padded tokens are never routed: garbage there must not leak or throw.
  Rng rng(5);
  LayerSpec spec = simple_spec(4, 2, 16, 8);
  spec.shared.push_back({8, true});
  const Built b = build(spec, rng);
  Input in = random_input(rng, 6, 16, 0.0);
  in.pad = {0, 1, 0, 0, 1, 0};
  for (int64_t i = 0; i < 16; ++i) in.x[static_cast<size_t>(16 + i)] = std::numeric_limits<float>::quiet_NaN();
  Workspace ws;
  std::vector<float> out(6 * 16);
  b.layer->forward(in.batch(), in.x.data(), out.data(), ws, 2);
  for (int64_t t = 0; t < 6; ++t)
    for (int64_t i = 0; i < 16; ++i) {
      const float v = out[static_cast<size_t>(t * 16 + i)];
      if (in.padded(t)) {
        EXPECT_EQ(v, 0.0f);
      }
      else EXPECT_TRUE(std::isfinite(v));
    }
}

TEST(LayerEdge, CapacityOverflowEachPolicy) {
  // Dropped slots contribute nothing; tokens dropped everywhere output only the shared part.
  Rng rng(6);
  for (int policy = 0; policy < 3; ++policy) {
    for (bool renorm : {false, true}) {
      for (int64_t minc : {0, 3}) {
        for (int rep = 0; rep < 3; ++rep) {
          LayerSpec spec = random_spec(rng, Knobs{0.2, 0.0, 0.3, 0.3, 0.2, 0.3, 0.5});
          spec.opt.capacity_factor = rng.uniform(0.2, 0.8);
          spec.opt.min_capacity = minc;
          spec.opt.drop_policy = static_cast<DropPolicy>(policy);
          spec.opt.renormalize_after_drop = renorm;
          const Built b = build(spec, rng);
          const Input in = random_input(rng, rng.integer(10, 70), spec.opt.hidden, 0.3);
          SCOPED_TRACE(describe(spec, in));
          check_layer(b, in, rep == 0 ? 2 : 1);
        }
      }
    }
  }
}

TEST(LayerEdge, AllEqualLogitsTieToLowerExpert) {
  // Zero router weight: experts 0..k-1 for every token, weights 1/E (softmax).
  Rng rng(7);
  LayerSpec spec = simple_spec(8, 3, 19, 11);
  Built b = build(spec, rng);
  b.W.assign(8 * 19, 0.0f);
  b.layer = std::make_unique<Layer>(TopKRouter(spec.opt, b.W), b.layer->experts());
  const Input in = random_input(rng, 15, 19, 0.0);
  ref::CompareOptions exact;
  exact.exclude_near_ties = false;
  const Result r = check_layer(b, in, 2, nullptr, exact);
  EXPECT_EQ(r.rep.compared, 15);
}

// ------------------------------------------------------------------------ threads and workspace

TEST(LayerThreads, BitIdenticalAcrossThreadCountsAndRuns) {
  Rng rng(8);
  for (int i = 0; i < 9; ++i) {
    LayerSpec spec = random_spec(rng);
    if (i % 3 == 0) {  // few experts, many tokens: several 64-row blocks per expert
      spec = simple_spec(3, 2, 40, 24);
      spec.shared.push_back({16, i % 2 == 0});
    }
    const Built b = build(spec, rng);
    const Input in = random_input(rng, i % 3 == 0 ? 300 : rng.integer(1, 70), spec.opt.hidden, 0.3);
    SCOPED_TRACE(describe(spec, in));
    std::vector<std::vector<float>> outs;
    Workspace reused;
    for (int threads : {1, 2, 2, 1}) {
      Workspace fresh;
      std::vector<float> out(static_cast<size_t>(in.T * in.d));
      b.layer->forward(in.batch(), in.x.data(), out.data(), threads == 2 && !outs.empty() ? reused : fresh, threads);
      outs.push_back(out);
    }
    for (size_t j = 1; j < outs.size(); ++j) EXPECT_TRUE(bits_equal(outs[0], outs[j])) << "run " << j;
    Workspace w1, w2;
    std::vector<float> o1(outs[0].size()), o2(outs[0].size());
    b.layer->forward(in.batch(), in.x.data(), o1.data(), w1, 1);
    b.layer->forward(in.batch(), in.x.data(), o2.data(), w2, 2);
    const ref::PlanView p1 = ref::view_of(w1.plan), p2 = ref::view_of(w2.plan);
    EXPECT_EQ(p1.slot_expert, p2.slot_expert);
    EXPECT_EQ(p1.slot_dropped, p2.slot_dropped);
    EXPECT_TRUE(bits_equal(p1.slot_weight, p2.slot_weight));
    EXPECT_EQ(p1.expert_slots, p2.expert_slots);
  }
}

TEST(LayerWorkspace, ReusedAcrossBatchSizesMatchesFresh) {
  Rng rng(9);
  LayerSpec spec = random_spec(rng);
  spec.shared = {{20, true}};
  const Built b = build(spec, rng);
  Workspace reused;
  for (int64_t T : {50, 3, 0, 70, 1, 17, 200, 5}) {
    const Input in = random_input(rng, T, spec.opt.hidden, 0.5);
    std::vector<float> a(static_cast<size_t>(T * in.d), 1.0f), f(a.size(), 2.0f);
    Workspace fresh;
    b.layer->forward(in.batch(), in.x.data(), a.data(), reused, 2);
    b.layer->forward(in.batch(), in.x.data(), f.data(), fresh, 1);
    EXPECT_TRUE(bits_equal(a, f)) << "T=" << T;
    check_layer(b, in, 1, &reused);
  }
}

// ------------------------------------------------------------------------ custom experts

// A user-written expert: scales each row by a per-expert constant.
struct ScaleExpert {
  int64_t d;
  float c;
  [[nodiscard]] int64_t d_in() const { return d; }
  [[nodiscard]] int64_t d_out() const { return d; }
  [[nodiscard]] size_t scratch_floats(int64_t) const { return 0; }
  void operator()(const float* in, int64_t rows, float* out, float*) const {
    for (int64_t i = 0; i < rows * d; ++i) out[i] = c * in[i];
  }
};
static_assert(moekit::Expert<ScaleExpert>);

TEST(LayerFunctorBank, ScalingFunctorMatchesReference) {
  Rng rng(10);
  for (int i = 0; i < 20; ++i) {
    Knobs kn;
    kn.p_shared = 0.0;
    LayerSpec spec = random_spec(rng, kn);
    const int64_t E = spec.opt.num_experts, d = spec.opt.hidden;
    std::vector<ScaleExpert> fns;
    std::vector<double> c;
    for (int64_t e = 0; e < E; ++e) {
      fns.push_back({d, static_cast<float>(rng.uniform(-2.0, 2.0))});
      c.push_back(fns.back().c);
    }
    const std::vector<float> W = rng.vec(static_cast<size_t>(E * d), 6.0 / std::sqrt(double(d)));
    const std::vector<float> bias = spec.bias ? rng.vec(static_cast<size_t>(E), 0.1) : std::vector<float>{};
    const moekit::SparseLayer<TopKRouter, moekit::FunctorBank<ScaleExpert>> layer(
        TopKRouter(spec.opt, W, bias), moekit::FunctorBank<ScaleExpert>(fns));
    const Input in = random_input(rng, rng.integer(0, 70), d, 0.3);
    SCOPED_TRACE(describe(spec, in));
    std::vector<float> out(static_cast<size_t>(in.T * d), std::numeric_limits<float>::quiet_NaN());
    Workspace ws;
    layer.forward(in.batch(), in.x.data(), out.data(), ws, 1 + i % 2);
    const ref::Routing want = ref::route_topk(to_ref(spec.opt, bias), W.data(), in.x.data(), in.T, in.pad_ptr());
    const ref::CompareReport rep = ref::compare_routing(want, ref::view_of(ws.plan));
    EXPECT_TRUE(rep.errors.empty()) << join(rep.errors);
    const ref::ExpertFn scale = [&](int64_t e, const std::vector<double>& x) {
      std::vector<double> y(x);
      for (double& v : y) v *= c[static_cast<size_t>(e)];
      return y;
    };
    const std::vector<double> y = ref::moe_forward(want, scale, {}, in.x.data(), in.T, d);
    const auto errs = ref::compare_values(y, out.data(), d, kRel, kFloorFrac, rep.excluded);
    EXPECT_TRUE(errs.empty()) << join(errs);
    if (in.routed() > 0) {
      EXPECT_GT(ref::max_abs(y), 0.0);
    }
    ++g_totals.cases;
    g_totals.compared += rep.compared;
    g_totals.near_tie += rep.near_tie;
    g_totals.capacity_excluded += rep.capacity_excluded;
  }
}

// ------------------------------------------------------------------------ external plans

TEST(LayerForwardPlan, HandBuiltPlanWithVariableSlots) {
  // forward_plan accepts any finalised plan: 0..E slots per token, dropped slots.
  Rng rng(11);
  LayerSpec spec = simple_spec(5, 2, 21, 13);
  spec.shared.push_back({7, false});
  const Built b = build(spec, rng);
  const Input in = random_input(rng, 12, 21, 0.0);
  RoutingPlan plan;
  plan.reset(12, 5, [](int64_t t) { return t % 6; });  // 0..5 slots
  for (int64_t t = 0; t < 12; ++t) {
    auto ids = plan.token_experts(t);
    auto w = plan.token_weights(t);
    auto dr = plan.token_dropped(t);
    for (size_t j = 0; j < ids.size(); ++j) {  // distinct experts: a rotation
      ids[j] = static_cast<int32_t>((t + static_cast<int64_t>(j)) % 5);
      w[j] = static_cast<float>(rng.uniform(-1.0, 1.0));
    }
    if (ids.size() > 2) {
      dr[1] = 1;
      w[1] = 0.0f;
    }
  }
  plan.finalize();
  std::vector<float> out(12 * 21, std::numeric_limits<float>::quiet_NaN());
  Workspace ws;
  b.layer->forward_plan(in.batch(), in.x.data(), plan, out.data(), ws, 2);
  const std::vector<double> y = ref::moe_forward(ref::routing_from_view(ref::view_of(plan), nullptr), b.experts,
                                                 b.shared, in.x.data(), 12, 21);
  const auto errs = ref::compare_values(y, out.data(), 21, kRel, kFloorFrac);
  EXPECT_TRUE(errs.empty()) << join(errs);
  EXPECT_GT(ref::max_abs(y), 0.0);
}

// An engine's own routing (ids / weights, -1 for no slot): RoutingPlan::from_topk gives the
// same layer output as the router's plan (bit for bit, same slot order), on random shapes with
// padding and dropped choices; bad ids and weights are errors naming the slot.
TEST(LayerForwardPlan, FromTopkEqualsTheRoutersPlan) {
  Rng rng(21);
  for (int trial = 0; trial < 12; ++trial) {
    const int64_t E = rng.integer(2, 9), k = rng.integer(1, E), d = rng.integer(4, 24), T = rng.integer(0, 40);
    LayerSpec spec = simple_spec(E, k, d, rng.integer(4, 20));
    const Built b = build(spec, rng);
    const Input in = random_input(rng, T, d, trial % 2 ? 0.3 : 0.0);
    std::vector<float> y(static_cast<size_t>(T * d)), y2(y.size());
    Workspace ws, ws2;
    b.layer->forward(in.batch(), in.x.data(), y.data(), ws, 2);
    std::vector<int32_t> ids(static_cast<size_t>(T * k));
    std::vector<float> w(ids.size());
    ws.plan.to_topk(k, ids.data(), w.data());  // padded tokens: -1 / 0
    const RoutingPlan plan = RoutingPlan::from_topk(ids.data(), w.data(), T, k, E);
    b.layer->forward_plan(in.batch(), in.x.data(), plan, y2.data(), ws2, trial % 3);
    ASSERT_EQ(y, y2) << "trial " << trial;
    // Dropping the last choice of every token: the same as a plan without it.
    if (k > 1 && T > 0) {
      for (int64_t t = 0; t < T; ++t) ids[t * k + k - 1] = -1;
      const RoutingPlan p2 = RoutingPlan::from_topk(ids.data(), w.data(), T, k, E);
      for (int64_t t = 0; t < T; ++t) EXPECT_EQ(p2.slots_of(t), in.batch().is_padding(t) ? 0 : k - 1);
    }
  }
  const int32_t dup[4] = {0, 0, 1, 2};
  const int32_t out_of_range[4] = {0, 4, 1, 2};
  const float wt[4] = {0.5f, 0.5f, 0.5f, 0.5f}, nan_w[4] = {0.5f, 0.5f, std::numeric_limits<float>::quiet_NaN(), 0.5f};
  const int32_t ok[4] = {0, 1, 1, 2};
  expect_error([&] { (void)RoutingPlan::from_topk(dup, wt, 2, 2, 4); }, "token 0 chooses expert 0 twice");
  expect_error([&] { (void)RoutingPlan::from_topk(out_of_range, wt, 2, 2, 4); }, "ids[0, 1] expected in [0, 4) or -1");
  expect_error([&] { (void)RoutingPlan::from_topk(ok, nan_w, 2, 2, 4); }, "weights[1, 0] expected finite");
  expect_error([&] { (void)RoutingPlan::from_topk(ok, wt, 2, 5, 4); }, "k expected <= E = 4");
  expect_error([&] { (void)RoutingPlan::from_topk(nullptr, wt, 2, 2, 4); }, "null ids or weights");
  // A padded token with slots is refused by forward_plan.
  Rng r2(5);
  const Built b = build(simple_spec(4, 2, 8, 6), r2);
  Input in = random_input(r2, 2, 8, 0.0);
  std::vector<uint8_t> pad = {0, 1};
  Batch bp = in.batch();
  bp.padding = pad;
  std::vector<float> y(16);
  Workspace ws;
  const RoutingPlan p = RoutingPlan::from_topk(ok, wt, 2, 2, 4);
  expect_error([&] { b.layer->forward_plan(bp, in.x.data(), p, y.data(), ws); }, "padded token 1 has 2 slots");
}

// Engine-owned threads: begin / run_task / combine / finish from a std::thread pool (tasks
// taken from an atomic counter, in any order) give forward()'s output bit for bit, for several
// worker counts and token splits, with shared experts and padding.
TEST(LayerExecutor, EngineThreadsEqualForward) {
  Rng rng(33);
  for (int trial = 0; trial < 8; ++trial) {
    const int64_t E = rng.integer(2, 8), k = rng.integer(1, E), d = rng.integer(4, 40), T = rng.integer(0, 300);
    LayerSpec spec = simple_spec(E, k, d, rng.integer(4, 48));
    if (trial % 2) spec.shared.push_back({static_cast<int64_t>(rng.integer(4, 24)), trial % 4 == 1});
    const Built b = build(spec, rng);
    const Input in = random_input(rng, T, d, trial % 3 == 0 ? 0.25 : 0.0);
    std::vector<float> want(static_cast<size_t>(T * d));
    Workspace wf;
    b.layer->forward(in.batch(), in.x.data(), want.data(), wf, 1);
    for (int workers : {1, 3}) {
      std::vector<float> y(want.size(), std::numeric_limits<float>::quiet_NaN());
      Workspace ws;
      const Batch batch = in.batch();
      b.layer->begin(batch, in.x.data(), ws, workers);
      std::atomic<int64_t> next{0};
      const int64_t n = b.layer->num_tasks(ws), parts = 5;
      std::vector<std::thread> pool;
      for (int w = 0; w < workers; ++w)
        pool.emplace_back([&, w] {
          for (int64_t i; (i = next.fetch_add(1)) < n;) b.layer->run_task(batch, in.x.data(), ws, n - 1 - i, w);
        });
      for (auto& t : pool) t.join();
      pool.clear();
      for (int w = 0; w < workers; ++w)
        pool.emplace_back([&, w] {
          for (int64_t part = w; part < parts; part += workers) b.layer->combine(batch, in.x.data(), y.data(), ws, w, part, parts);
        });
      for (auto& t : pool) t.join();
      b.layer->finish(batch, y.data(), ws);
      ASSERT_EQ(std::memcmp(y.data(), want.data(), y.size() * sizeof(float)), 0)
          << "trial " << trial << ", " << workers << " workers: not forward()'s output bit for bit";
    }
  }
  Rng r2(3);
  const Built b = build(simple_spec(4, 2, 8, 6), r2);
  const Input in = random_input(r2, 5, 8, 0.0);
  Workspace ws;
  expect_error([&] { b.layer->begin(in.batch(), in.x.data(), ws, 0); }, "workers expected in [1, 4096]");
  b.layer->begin(in.batch(), in.x.data(), ws, 2);
  expect_error([&] { b.layer->run_task(in.batch(), in.x.data(), ws, b.layer->num_tasks(ws), 0); }, "out of range");
  expect_error([&] { b.layer->run_task(in.batch(), in.x.data(), ws, 0, 2); }, "worker 2 of 2");
  std::vector<float> y(40);
  expect_error([&] { b.layer->combine(in.batch(), in.x.data(), y.data(), ws, 0, 3, 3); }, "part 3 of 3");
}

// ------------------------------------------------------------------------ engine activations

// The engine's rows: f32 / bf16 / f16, contiguous or strided, in and out. The reference is the
// f32 contiguous forward() on the widened input; a 16-bit output must be that output rounded
// to nearest even (f16ref, an independent search over the 16-bit patterns), f32 output equal
// bit for bit; the gaps between strided rows are never written.
struct View16 {
  moekit::ActivationType type;
  int64_t stride;
  std::vector<uint16_t> h;  // 16-bit storage
  std::vector<float> f;     // f32 storage
};

uint16_t ref_round16(moekit::ActivationType t, float x) {
  return t == moekit::ActivationType::bf16 ? f16ref::ref_to_bf16(x) : f16ref::ref_to_f16(x);
}
float ref_widen16(moekit::ActivationType t, uint16_t h) {
  return static_cast<float>(t == moekit::ActivationType::bf16 ? f16ref::ref_bf16(h) : f16ref::ref_f16(h));
}

// `x [T, d]` stored as `t` with `stride` (gaps hold a sentinel); `widened`: the values it holds.
View16 store_rows(moekit::ActivationType t, const std::vector<float>& x, int64_t T, int64_t d, int64_t stride,
                  std::vector<float>* widened) {
  View16 v{t, stride, {}, {}};
  const size_t n = static_cast<size_t>(T > 0 ? (T - 1) * stride + d : 0);
  if (widened != nullptr) widened->assign(x.size(), 0.0f);
  if (t == moekit::ActivationType::f32) {
    v.f.assign(n, -12345.0f);
  } else {
    v.h.assign(n, 0xABCDu);
  }
  for (int64_t r = 0; r < T; ++r)
    for (int64_t j = 0; j < d; ++j) {
      const float val = x[static_cast<size_t>(r * d + j)];
      const size_t at = static_cast<size_t>(r * stride + j);
      float w = val;
      if (t == moekit::ActivationType::f32) {
        v.f[at] = val;
      } else {
        v.h[at] = ref_round16(t, val);
        w = ref_widen16(t, v.h[at]);
      }
      if (widened != nullptr) (*widened)[static_cast<size_t>(r * d + j)] = w;
    }
  return v;
}
moekit::ActivationsIn in_view(const View16& v) {
  return {v.type == moekit::ActivationType::f32 ? static_cast<const void*>(v.f.data()) : v.h.data(), v.type, v.stride};
}
moekit::ActivationsOut out_view(View16& v) {
  return {v.type == moekit::ActivationType::f32 ? static_cast<void*>(v.f.data()) : v.h.data(), v.type, v.stride};
}

// Output view `got` against the f32 output `want [T, d]`; gaps untouched.
void expect_rounded_output(const View16& got, const std::vector<float>& want, int64_t T, int64_t d,
                           const std::string& what) {
  for (int64_t r = 0; r < T; ++r)
    for (int64_t j = 0; j < got.stride; ++j) {
      const size_t at = static_cast<size_t>(r * got.stride + j);
      if (at >= (got.type == moekit::ActivationType::f32 ? got.f.size() : got.h.size())) break;
      const float w = j < d ? want[static_cast<size_t>(r * d + j)] : 0.0f;
      if (got.type == moekit::ActivationType::f32) {
        const float g = got.f[at];
        if (j >= d) {
          ASSERT_EQ(g, -12345.0f) << what << ": gap written at row " << r;
        } else {
          ASSERT_EQ(std::memcmp(&g, &w, sizeof g), 0) << what << ": out[" << r << ", " << j << "] " << g << " vs " << w;
        }
      } else if (j >= d) {
        ASSERT_EQ(got.h[at], 0xABCDu) << what << ": gap written at row " << r;
      } else {
        ASSERT_EQ(got.h[at], ref_round16(got.type, w)) << what << ": out[" << r << ", " << j << "] of " << w;
      }
    }
}

// The phases of a forward split over processes (moekit::ep): route here, run each expert's
// rows as another process would (its rows from several "sources" concatenated in a shuffled
// grouping, one plan slot per row), put the outputs back, combine here. Must equal forward()
// bit for bit: an expert's output row depends on that row alone.
TEST(LayerPhases, RouteRunExpertsElsewhereCombineEqualsForward) {
  Rng rng(41);
  for (int trial = 0; trial < 14; ++trial) {
    // Later trials: decode sizes with shared experts in the layer, where the remote run takes
    // the decode column split (run_experts() runs no shared task): 4 unpadded tokens, k >= 5,
    // so the remote rows (T k > 16) exceed what the split allows a layer's shared experts.
    const bool decode = trial >= 10;
    const int64_t E = decode ? rng.integer(8, 9) : rng.integer(2, 9), k = decode ? rng.integer(5, E) : rng.integer(1, E),
                  d = rng.integer(4, 48), T = decode ? 4 : rng.integer(0, 260);
    LayerSpec spec = simple_spec(E, k, d, rng.integer(4, 64));
    if (trial % 2 || decode) spec.shared.push_back({static_cast<int64_t>(rng.integer(4, 24)), trial % 4 == 1});
    spec.weight_on_input = trial % 5 == 3;
    const Built b = build(spec, rng);
    const Input in = random_input(rng, T, d, trial % 3 == 0 && !decode ? 0.25 : 0.0);
    const int threads = 1 + trial % 2;
    std::vector<float> want(static_cast<size_t>(T * d));
    Workspace wf;
    b.layer->forward(in.batch(), in.x.data(), want.data(), wf, threads);

    Workspace home, remote;
    const Batch batch = in.batch();
    const float* x = b.layer->route(batch, moekit::ActivationsIn::f32(in.x.data()), home, threads);
    const RoutingPlan& plan = home.plan;
    // "Remote" work: every kept row in a random order, each with the input the sender ships
    // (scaled by its weight when the weight applies to the input).
    const auto slots = plan.expert_slots();
    const auto tokens = plan.expert_tokens();
    std::vector<int64_t> order(slots.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    std::shuffle(order.begin(), order.end(), rng.g);
    const auto N = static_cast<int64_t>(order.size());
    std::vector<float> rows(static_cast<size_t>(N * d));
    std::vector<int32_t> ids(static_cast<size_t>(N));
    std::vector<float> ones(static_cast<size_t>(N), 1.0f);
    for (int64_t r = 0; r < N; ++r) {
      const auto i = static_cast<size_t>(order[static_cast<size_t>(r)]);
      const float w = spec.weight_on_input ? plan.slot_weight()[static_cast<size_t>(slots[i])] : 1.0f;
      for (int64_t j = 0; j < d; ++j) rows[static_cast<size_t>(r * d + j)] = x[tokens[i] * d + j] * w;
      ids[static_cast<size_t>(r)] = plan.slot_expert()[static_cast<size_t>(slots[i])];
    }
    const RoutingPlan there = RoutingPlan::from_topk(ids.data(), ones.data(), N, N > 0 ? 1 : 0, E);
    b.layer->run_experts(rows.data(), there, remote, decode ? 2 : 3 - threads);
    if (decode) EXPECT_FALSE(remote.pieces.empty()) << "trial " << trial << ": the decode split did not run";
    const auto got_rows = b.layer->expert_rows(there, remote);
    const auto home_rows = b.layer->expert_rows(plan, home);
    for (int64_t r = 0; r < N; ++r) {
      // Remote row r (expert order of `there`) back to its place in the home plan's order.
      const int32_t p = there.slot_position()[static_cast<size_t>(r)];
      std::copy_n(got_rows.data() + p * d, d, home_rows.data() + order[static_cast<size_t>(r)] * d);
    }
    std::vector<float> y(want.size(), std::numeric_limits<float>::quiet_NaN());
    b.layer->combine_outputs(batch, x, plan, moekit::ActivationsOut::f32(y.data()), home, threads);
    ASSERT_TRUE(y.empty() || std::memcmp(y.data(), want.data(), y.size() * sizeof(float)) == 0)
        << "trial " << trial << " E " << E << " k " << k << " d " << d << " T " << T;
  }
}

TEST(LayerPhases, CombineOutputsChecksItsArguments) {
  Rng rng(42);
  const Built b = build(simple_spec(4, 2, 8, 16), rng);
  const Input in = random_input(rng, 5, 8, 0.0);
  Workspace ws;
  const float* x = b.layer->route(in.batch(), moekit::ActivationsIn::f32(in.x.data()), ws);
  std::vector<float> y(in.x.size());
  Workspace fresh;
  EXPECT_THROW(b.layer->combine_outputs(in.batch(), x, ws.plan, moekit::ActivationsOut::f32(y.data()), fresh),
               moekit::error);  // expert rows never filled
  EXPECT_THROW(b.layer->combine_outputs(Batch::single(4, 8), x, ws.plan, moekit::ActivationsOut::f32(y.data()), ws),
               moekit::error);  // plan of another batch
  std::vector<float> bad = in.x;
  bad[7] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(b.layer->route(in.batch(), moekit::ActivationsIn::f32(bad.data()), ws), moekit::error);
}

TEST(LayerActivations, SixteenBitAndStridedRowsEqualTheF32Path) {
  using moekit::ActivationType;
  Rng rng(71);
  const ActivationType types[] = {ActivationType::f32, ActivationType::bf16, ActivationType::f16};
  for (int trial = 0; trial < 6; ++trial) {
    const int64_t E = rng.integer(2, 8), k = rng.integer(1, E), d = rng.integer(4, 70), T = rng.integer(0, 150);
    LayerSpec spec = simple_spec(E, k, d, rng.integer(4, 40));
    if (trial % 2) spec.shared.push_back({static_cast<int64_t>(rng.integer(4, 24)), trial % 4 == 1});
    const Built b = build(spec, rng);
    const Input in = random_input(rng, T, d, trial % 3 == 0 ? 0.25 : 0.0);
    const Batch batch = in.batch();
    for (ActivationType ti : types)
      for (ActivationType to : types) {
        const int64_t si = rng.coin(0.5) ? d : d + rng.integer(1, 9), so = rng.coin(0.5) ? d : d + rng.integer(1, 9);
        std::vector<float> xw;
        const View16 vin = store_rows(ti, in.x, T, d, si, &xw);
        std::vector<float> want(static_cast<size_t>(T * d));
        Workspace wf;
        b.layer->forward(batch, xw.data(), want.data(), wf, 1);
        const std::string what = std::string("trial ") + std::to_string(trial) + " " + moekit::to_string(ti) + " (stride " +
                                 std::to_string(si) + ") -> " + moekit::to_string(to) + " (stride " + std::to_string(so) + ")";
        for (int threads : {1, 2}) {
          View16 vout = store_rows(to, std::vector<float>(static_cast<size_t>(T * d), 0.0f), T, d, so, nullptr);
          // Garbage in the output rows: every value must be written.
          for (int64_t r = 0; r < T; ++r)
            for (int64_t j = 0; j < d; ++j) {
              if (vout.f.empty()) {
                vout.h[static_cast<size_t>(r * so + j)] = 0x7E00u;
              } else {
                vout.f[static_cast<size_t>(r * so + j)] = NAN;
              }
            }
          Workspace ws;
          b.layer->forward(batch, in_view(vin), out_view(vout), ws, threads);
          expect_rounded_output(vout, want, T, d, what + ", " + std::to_string(threads) + " threads");
          ASSERT_EQ(ws.plan.num_slots(), wf.plan.num_slots());
        }
        // forward_plan with the same plan.
        {
          View16 vout = store_rows(to, std::vector<float>(static_cast<size_t>(T * d), 0.0f), T, d, so, nullptr);
          Workspace ws;
          b.layer->forward_plan(batch, in_view(vin), wf.plan, out_view(vout), ws, 2);
          expect_rounded_output(vout, want, T, d, what + ", forward_plan");
        }
        // Engine-owned threads with the same views.
        {
          View16 vout = store_rows(to, std::vector<float>(static_cast<size_t>(T * d), 0.0f), T, d, so, nullptr);
          Workspace ws;
          b.layer->begin(batch, in_view(vin), ws, 2);
          std::atomic<int64_t> next{0};
          const int64_t n = b.layer->num_tasks(ws);
          std::vector<std::thread> pool;
          for (int w = 0; w < 2; ++w)
            pool.emplace_back([&, w] {
              for (int64_t i; (i = next.fetch_add(1)) < n;) b.layer->run_task(batch, ws, i, w);
            });
          for (auto& t : pool) t.join();
          for (int64_t part = 0; part < 3; ++part) b.layer->combine(batch, out_view(vout), ws, static_cast<int>(part % 2), part, 3);
          b.layer->finish(batch, out_view(vout), ws);
          expect_rounded_output(vout, want, T, d, what + ", engine threads");
        }
        // Engine-owned threads with the engine's plan (begin with a plan), one worker.
        {
          View16 vout = store_rows(to, std::vector<float>(static_cast<size_t>(T * d), 0.0f), T, d, so, nullptr);
          Workspace ws;
          b.layer->begin(batch, in_view(vin), wf.plan, ws, 1);
          for (int64_t i = b.layer->num_tasks(ws) - 1; i >= 0; --i) b.layer->run_task(batch, ws, i, 0);
          b.layer->combine(batch, out_view(vout), ws, 0, 0, 1);
          b.layer->finish(batch, out_view(vout), ws);
          expect_rounded_output(vout, want, T, d, what + ", engine threads with a given plan");
        }
      }
  }
}

// In place (out is the input's own view) and overlapping views (out one row after the input)
// give what separate buffers give.
TEST(LayerActivations, InPlaceAndOverlappingViews) {
  using moekit::ActivationType;
  Rng rng(72);
  for (int trial = 0; trial < 4; ++trial) {
    const int64_t d = rng.integer(4, 40), T = rng.integer(1, 120);
    LayerSpec spec = simple_spec(6, 2, d, 16);
    if (trial % 2) spec.shared.push_back({12, true});
    const Built b = build(spec, rng);
    const Input in = random_input(rng, T, d, trial == 2 ? 0.25 : 0.0);
    const Batch batch = in.batch();
    std::vector<float> want(in.x.size());
    Workspace ws;
    b.layer->forward(batch, in.x.data(), want.data(), ws, 2);
    // f32 in place.
    std::vector<float> buf = in.x;
    b.layer->forward(batch, buf.data(), buf.data(), ws, 2);
    ASSERT_EQ(std::memcmp(buf.data(), want.data(), buf.size() * sizeof(float)), 0) << "f32 in place, trial " << trial;
    // f32, out one row after the input (overlapping, not the same view).
    std::vector<float> big(static_cast<size_t>((T + 1) * d));
    std::copy(in.x.begin(), in.x.end(), big.begin());
    b.layer->forward(batch, moekit::ActivationsIn::f32(big.data()), moekit::ActivationsOut::f32(big.data() + d), ws, 2);
    ASSERT_EQ(std::memcmp(big.data() + d, want.data(), want.size() * sizeof(float)), 0) << "f32 overlap, trial " << trial;
    // bf16 in place, and with the output one row before the input.
    std::vector<float> xw;
    View16 v = store_rows(ActivationType::bf16, in.x, T, d, d, &xw);
    std::vector<float> want16(in.x.size());
    b.layer->forward(batch, xw.data(), want16.data(), ws, 1);
    b.layer->forward(batch, in_view(v), out_view(v), ws, 2);
    expect_rounded_output(v, want16, T, d, "bf16 in place");
    View16 w = store_rows(ActivationType::bf16, in.x, T, d, d, nullptr);
    std::vector<uint16_t> hb(static_cast<size_t>((T + 1) * d));
    std::copy(w.h.begin(), w.h.end(), hb.begin() + d);
    b.layer->forward(batch, moekit::ActivationsIn::bf16(hb.data() + d), moekit::ActivationsOut::bf16(hb.data()), ws, 2);
    for (size_t i = 0; i < want16.size(); ++i)
      ASSERT_EQ(hb[i], ref_round16(ActivationType::bf16, want16[i])) << "bf16 overlap at " << i;
  }
}

TEST(LayerActivations, BadViewsAndNonFiniteValues) {
  Rng rng(73);
  const int64_t d = 10, T = 5;
  const Built b = build(simple_spec(4, 2, d, 6), rng);
  const Input in = random_input(rng, T, d, 0.0);
  Workspace ws;
  std::vector<uint16_t> h(static_cast<size_t>(T * d));
  for (size_t i = 0; i < h.size(); ++i) h[i] = f16ref::ref_to_bf16(in.x[i]);
  std::vector<float> out(static_cast<size_t>(T * d));
  const auto x16 = moekit::ActivationsIn::bf16(h.data());
  expect_error([&] { b.layer->forward(in.batch(), moekit::ActivationsIn::bf16(h.data(), d - 1), moekit::ActivationsOut::f32(out.data()), ws); },
               "hidden row stride expected in [10");
  expect_error([&] { b.layer->forward(in.batch(), x16, moekit::ActivationsOut::f32(out.data(), 3), ws); },
               "out row stride expected in [10");
  expect_error([&] { b.layer->forward(in.batch(), x16, moekit::ActivationsOut::f32(out.data(), int64_t{1} << 62), ws); },
               "out row stride expected");
  expect_error([&] { b.layer->forward(in.batch(), moekit::ActivationsIn::bf16(nullptr), moekit::ActivationsOut::f32(out.data()), ws); },
               "hidden expected non-null");
  expect_error([&] { b.layer->forward(in.batch(), x16, moekit::ActivationsOut::bf16(nullptr), ws); }, "out expected non-null");
  // A NaN / infinity in a 16-bit input row is named by token and column.
  std::vector<uint16_t> bad = h;
  bad[3 * d + 7] = 0x7FC0u;  // bf16 NaN
  expect_error([&] { b.layer->forward(in.batch(), moekit::ActivationsIn::bf16(bad.data()), moekit::ActivationsOut::f32(out.data()), ws); },
               "hidden[3, 7] expected finite");
  std::vector<uint16_t> badh(h.size(), 0x3C00u);
  badh[2 * d + 1] = 0xFC00u;  // f16 -inf
  expect_error([&] { b.layer->forward(in.batch(), moekit::ActivationsIn::f16(badh.data()), moekit::ActivationsOut::f32(out.data()), ws); },
               "hidden[2, 1] expected finite");
  // An f16 output beyond 65504 is an overflow (an infinity), reported or counted.
  Built big = build(simple_spec(4, 2, d, 6), rng);
  big.layer->set_output_bias(std::vector<float>(static_cast<size_t>(d), 70000.0f));
  std::vector<uint16_t> o16(h.size());
  expect_error([&] { big.layer->forward(in.batch(), x16, moekit::ActivationsOut::f16(o16.data()), ws); }, "out[0, 0] is inf");
  big.layer->set_non_finite_output(moekit::NonFiniteOutput::count);
  big.layer->forward(in.batch(), x16, moekit::ActivationsOut::f16(o16.data()), ws);
  EXPECT_EQ(ws.non_finite_rows, T);
  big.layer->forward(in.batch(), x16, moekit::ActivationsOut::bf16(o16.data()), ws);  // bf16 holds 70000
  EXPECT_EQ(ws.non_finite_rows, 0);
}

// ------------------------------------------------------------------------ errors

TEST(LayerErrors, BadInputsThrowNamingTheArgument) {
  Rng rng(12);
  LayerSpec spec = simple_spec(4, 2, 10, 6);
  const Built b = build(spec, rng);
  const Input in = random_input(rng, 5, 10, 0.0);
  Workspace ws;
  std::vector<float> out(50);
  // NaN / Inf hidden states: route throws, the message says "finite".
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    std::vector<float> x = in.x;
    x[23] = bad;
    expect_error([&] { b.layer->forward(in.batch(), x.data(), out.data(), ws, 2); }, "finite");
  }
  // Wrong hidden size in the Batch.
  expect_error([&] { b.layer->forward(Batch::single(5, 9), in.x.data(), out.data(), ws); }, "Batch.hidden");
  // Bad sequence offsets.
  for (const std::vector<int32_t>& offs : std::vector<std::vector<int32_t>>{{0, 6}, {2, 5}, {0, 4, 3, 5}}) {
    Batch bo = in.batch();
    bo.sequence_offsets = offs;
    expect_error([&] { b.layer->forward(bo, in.x.data(), out.data(), ws); }, "Batch.sequence_offsets");
  }
  // forward_plan with a plan that is not finalised or has the wrong shape.
  RoutingPlan p;
  p.reset(5, 4, [](int64_t) { return 1; });
  expect_error([&] { b.layer->forward_plan(in.batch(), in.x.data(), p, out.data(), ws); }, "finalize");
  p.reset(3, 4, [](int64_t) { return 1; });
  p.finalize();
  expect_error([&] { b.layer->forward_plan(in.batch(), in.x.data(), p, out.data(), ws); }, "plan tokens");
  // The layer still works afterwards.
  check_layer(b, in, 2, &ws);
}

TEST(LayerErrors, MismatchedPartsThrow) {
  Rng rng(13);
  TopKOptions o;
  o.num_experts = 4;
  o.k = 2;
  o.hidden = 8;
  const std::vector<float> W = rng.vec(32, 1.0);
  FfnShape sh;
  sh.hidden = 8;
  sh.intermediate = 4;
  expect_error([&] { Layer l(TopKRouter(o, W), FfnBank(5, sh)); }, "experts");
  FfnShape wide = sh;
  wide.hidden = 9;
  expect_error([&] { Layer l(TopKRouter(o, W), FfnBank(4, wide)); }, "d_in");
  std::vector<moekit::SharedExpert> bad_gate{{FfnBank(1, sh), std::vector<float>(7, 0.0f)}};
  expect_error([&] { Layer l(TopKRouter(o, W), FfnBank(4, sh), bad_gate); }, "gate");
  std::vector<moekit::SharedExpert> two{{FfnBank(2, sh), {}}};
  expect_error([&] { Layer l(TopKRouter(o, W), FfnBank(4, sh), two); }, "one-expert");
  // PR-MoE residual coefficient: [2, d] and [2], no gate, at most one per layer.
  const std::vector<float> c16(16, 0.1f), c2(2, 0.0f);
  std::vector<moekit::SharedExpert> short_coef{{FfnBank(1, sh), {}, std::vector<float>(15, 0.1f), c2}};
  expect_error([&] { Layer l(TopKRouter(o, W), FfnBank(4, sh), short_coef); }, "residual coefficient expected [2, 8]");
  std::vector<moekit::SharedExpert> gated_coef{{FfnBank(1, sh), std::vector<float>(8, 0.1f), c16, c2}};
  expect_error([&] { Layer l(TopKRouter(o, W), FfnBank(4, sh), gated_coef); }, "a residual coefficient and a gate");
  std::vector<moekit::SharedExpert> both;
  both.push_back({FfnBank(1, sh), {}, c16, c2});
  both.push_back({FfnBank(1, sh), {}, c16, c2});
  expect_error([&] { Layer l(TopKRouter(o, W), FfnBank(4, sh), both); }, "both have a residual coefficient");
}

}  // namespace
