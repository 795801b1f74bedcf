// SPDX-License-Identifier: Apache-2.0
// Validation at every public entry point (docs/errors.md): each invalid argument throws
// moekit::error whose message names the argument, the expected and the actual value. Then the
// numerical safety of the routers' softmax / logsumexp / sigmoid for logits of +-1e4, checked
// against plain double loops (and tests/reference/sinkhorn_ref for the transport plan).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/blocks.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/layer.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/aux.hpp"
#include "moekit/routers/depth.hpp"
#include "moekit/layers/drllm.hpp"
#include "moekit/routers/expert_choice.hpp"
#include "moekit/routers/gru.hpp"
#include "moekit/layers/mor.hpp"
#include "moekit/routers/prototype.hpp"
#include "moekit/routers/sinkhorn.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"
#include "moekit/tools/arank.hpp"
#include "reference/sinkhorn_ref.hpp"

namespace {

using namespace moekit;  // NOLINT: a test of the whole public surface

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

/// Runs `fn`, expecting a moekit::error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& fn, std::initializer_list<std::string_view> parts) {
  try {
    fn();
  } catch (const moekit::error& e) {
    const std::string m = e.what();
    for (std::string_view p : parts)
      EXPECT_NE(m.find(p), std::string::npos) << "message \"" << m << "\" lacks \"" << p << "\"";
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected moekit::error, got another exception: " << e.what();
    return;
  }
  ADD_FAILURE() << "expected moekit::error, nothing was thrown";
}

std::vector<float> filled(size_t n, float v = 0.1f) { return std::vector<float>(n, v); }

/// `[E, E]` identity: with it, a router's logits are the hidden state itself (exactly).
std::vector<float> identity(int64_t E) {
  std::vector<float> w(static_cast<size_t>(E * E), 0.0f);
  for (int64_t e = 0; e < E; ++e) w[static_cast<size_t>(e * E + e)] = 1.0f;
  return w;
}

TopKOptions topk_options(int64_t E, int64_t k, int64_t d) {
  TopKOptions o;
  o.num_experts = E;
  o.k = k;
  o.hidden = d;
  return o;
}

void make_topk(const TopKOptions& o) {
  TopKRouter r(o, filled(static_cast<size_t>(std::max<int64_t>(o.num_experts * o.hidden, 1))));
}

// ============================================================================== Batch

TEST(ValidateBatch, NegativeTokens) {
  Batch b = Batch::single(-1, 4);
  expect_error([&] { b.validate(); }, {"Batch.tokens", "expected >= 0", "got -1"});
}

TEST(ValidateBatch, HiddenMismatchAtRoute) {
  const TopKRouter r(topk_options(4, 2, 3), filled(12));
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x(10, 0.0f);
  expect_error([&] { r.route(Batch::single(2, 5), x.data(), plan, s); },
               {"Batch.hidden (d)", "expected 3", "got 5"});
}

TEST(ValidateBatch, SequenceOffsetsMustEndAtT) {
  const std::vector<int32_t> offs = {0, 2, 3};
  Batch b = Batch::single(4, 2);
  b.sequence_offsets = offs;
  expect_error([&] { b.validate(2); }, {"Batch.sequence_offsets[S]", "expected 4", "got 3"});
}

TEST(ValidateBatch, SequenceOffsetsNonDecreasing) {
  const std::vector<int32_t> offs = {0, 3, 2, 4};
  Batch b = Batch::single(4, 2);
  b.sequence_offsets = offs;
  expect_error([&] { b.validate(2); },
               {"Batch.sequence_offsets[2]", "non-decreasing", "got 2 after 3"});
}

TEST(ValidateBatch, PaddingLength) {
  const std::vector<uint8_t> pad = {0, 1};
  Batch b = Batch::single(3, 2);
  b.padding = pad;
  expect_error([&] { b.validate(2); }, {"Batch.padding", "expected 3 entries", "got 2"});
}

// ============================================================================== top-k

TEST(ValidateTopK, KZero) {
  expect_error([] { make_topk(topk_options(4, 0, 3)); },
               {"topk router", "k expected in [1, E = 4]", "got 0"});
}

TEST(ValidateTopK, KAboveE) {
  expect_error([] { make_topk(topk_options(4, 5, 3)); },
               {"topk router", "k expected in [1, E = 4]", "got 5"});
}

TEST(ValidateTopK, NumExpertsZero) {
  expect_error([] { make_topk(topk_options(0, 1, 3)); },
               {"num_experts (E) expected >= 1", "got 0"});
}

TEST(ValidateTopK, HiddenZero) {
  expect_error([] { make_topk(topk_options(4, 1, 0)); },
               {"hidden size (d) expected >= 1", "got 0"});
}

TEST(ValidateTopK, ExpertsNotDivisibleByNGroup) {
  TopKOptions o = topk_options(6, 1, 3);
  o.n_group = 4;
  o.topk_group = 1;
  expect_error([&] { make_topk(o); },
               {"num_experts (6) expected divisible by n_group", "n_group = 4"});
}

TEST(ValidateTopK, TopkGroupAboveNGroup) {
  TopKOptions o = topk_options(8, 1, 3);
  o.n_group = 4;
  o.topk_group = 5;
  expect_error([&] { make_topk(o); }, {"topk_group expected in [1, n_group = 4]", "got 5"});
}

TEST(ValidateTopK, TopkGroupZeroWhenGrouped) {
  TopKOptions o = topk_options(8, 1, 3);
  o.n_group = 4;
  o.topk_group = 0;
  expect_error([&] { make_topk(o); }, {"topk_group expected in [1, n_group = 4]", "got 0"});
}

TEST(ValidateTopK, KAboveKeptGroups) {
  TopKOptions o = topk_options(8, 3, 3);
  o.n_group = 4;
  o.topk_group = 1;
  expect_error([&] { make_topk(o); }, {"k expected <= topk_group * E / n_group = 2", "got 3"});
}

TEST(ValidateTopK, TopkSumNeedsKAtLeastTopkGroup) {
  TopKOptions o = topk_options(8, 1, 3);
  o.n_group = 4;
  o.topk_group = 2;
  o.group_score = GroupScore::topk_sum;
  expect_error([&] { make_topk(o); }, {"group_score topk_sum", "k expected >= topk_group = 2", "got 1"});
  o.group_score = static_cast<GroupScore>(7);
  expect_error([&] { make_topk(o); }, {"group_score expected top2_sum, max or topk_sum", "got 7"});
}

TEST(ValidateTopK, NormP) {
  TopKOptions o = topk_options(8, 2, 3);
  o.norm_p = -1;
  expect_error([&] { make_topk(o); }, {"norm_p expected finite and >= 0", "got -1"});
  o.norm_p = 1;
  o.norm_topk_prob = true;
  expect_error([&] { make_topk(o); }, {"norm_p expected 0 with norm_topk_prob or topk_then_softmax", "got 1"});
}

TEST(ValidateTopK, SparseMixer) {
  TopKOptions o = topk_options(8, 3, 3);
  o.sparsemixer_eps = 0.01;
  expect_error([&] { make_topk(o); }, {"sparsemixer_eps (PhiMoE's SparseMixer) expected with k = 2", "got k = 3"});
  o.k = 2;
  o.norm_topk_prob = true;
  expect_error([&] { make_topk(o); }, {"sparsemixer_eps", "norm_topk_prob"});
  o.norm_topk_prob = false;
  o.sparsemixer_eps = -1;
  expect_error([&] { make_topk(o); }, {"sparsemixer_eps expected finite and >= 0", "got -1"});
  o.sparsemixer_eps = 0.01;
  expect_error([&] { TopKRouter(o, std::vector<float>(24, 0.1f), std::vector<float>(8, 0.0f)); },
               {"selection bias expected empty with sparsemixer_eps", "got 8 values"});
}

TEST(ValidateTopK, NegativeNGroup) {
  TopKOptions o = topk_options(8, 1, 3);
  o.n_group = -1;
  expect_error([&] { make_topk(o); }, {"n_group expected >= 0", "got -1"});
}

TEST(ValidateTopK, CapacityFactorNegativeOrNonFinite) {
  for (double c : {-1.0, static_cast<double>(kNaN), static_cast<double>(kInf)}) {
    TopKOptions o = topk_options(4, 1, 3);
    o.capacity_factor = c;
    const std::string got = c < 0 ? "got -1" : std::isnan(c) ? "got nan" : "got inf";
    expect_error([&] { make_topk(o); }, {"capacity_factor expected finite and >= 0", got});
  }
}

TEST(ValidateTopK, MinCapacityNegative) {
  TopKOptions o = topk_options(4, 1, 3);
  o.min_capacity = -2;
  expect_error([&] { make_topk(o); }, {"min_capacity expected >= 0", "got -2"});
}

TEST(ValidateTopK, RoutedScalingFactorNonFiniteOrNotPositive) {
  for (float f : {kNaN, kInf, 0.0f, -2.5f}) {
    TopKOptions o = topk_options(4, 1, 3);
    o.routed_scaling_factor = f;
    std::ostringstream got;
    got << "got " << f;
    expect_error([&] { make_topk(o); },
                 {"routed_scaling_factor expected finite and > 0", got.str()});
  }
}

TEST(ValidateTopK, NoiseEpsOutOfRange) {
  for (float e : {kNaN, 1.0f, -0.1f}) {
    TopKOptions o = topk_options(4, 1, 3);
    o.noise_eps = e;
    std::ostringstream got;
    got << "got " << e;
    expect_error([&] { make_topk(o); }, {"noise_eps expected in [0, 1)", got.str()});
  }
}

TEST(ValidateTopK, TopkThenSoftmaxNeedsSoftmax) {
  TopKOptions o = topk_options(4, 1, 3);
  o.topk_then_softmax = true;
  o.score_func = ScoreFunc::sigmoid;
  expect_error([&] { make_topk(o); },
               {"topk_then_softmax expected with score_func softmax", "got sigmoid"});
}

TEST(ValidateTopK, EnumValuesOutOfRange) {
  TopKOptions o = topk_options(4, 1, 3);
  o.score_func = static_cast<ScoreFunc>(7);
  expect_error([&] { make_topk(o); }, {"score_func expected softmax or sigmoid", "got 7"});
  o = topk_options(4, 1, 3);
  o.drop_policy = static_cast<DropPolicy>(9);
  expect_error([&] { make_topk(o); },
               {"drop_policy expected score, position or position_slot_major", "got 9"});
  o = topk_options(4, 1, 3);
  o.noise = static_cast<TrainingNoise>(5);
  expect_error([&] { make_topk(o); }, {"noise expected none, jitter or noisy_topk", "got 5"});
}

TEST(ValidateTopK, GateWeightSize) {
  expect_error([] { TopKRouter r(topk_options(4, 1, 3), filled(11)); },
               {"gate.weight expected [4, 3] = 12 values", "got 11"});
}

TEST(ValidateTopK, GateWeightNonFinite) {
  for (float bad : {kNaN, kInf, -kInf}) {
    std::vector<float> w = filled(12);
    w[7] = bad;  // row 2, column 1
    std::ostringstream got;
    got << "got " << bad;
    expect_error([&] { TopKRouter r(topk_options(4, 1, 3), w); },
                 {"topk router: gate.weight[2, 1] expected finite", got.str()});
  }
}

TEST(ValidateTopK, BiasSizeAndFinite) {
  expect_error([] { TopKRouter r(topk_options(4, 1, 3), filled(12), filled(3)); },
               {"e_score_correction_bias expected [4]", "got 3 values"});
  expect_error(
      [] {
        TopKRouter r(topk_options(4, 1, 3), filled(12), {0, kInf, 0, 0});
      },
      {"e_score_correction_bias[1] expected finite", "got inf"});
  TopKRouter r(topk_options(4, 1, 3), filled(12));
  expect_error(
      [&] {
        r.set_bias({0, 0, kNaN, 0});
      },
      {"e_score_correction_bias[2] expected finite", "got nan"});
  expect_error([&] { r.set_bias(filled(5)); },
               {"e_score_correction_bias expected [4]", "got 5 values"});
}

TEST(ValidateTopK, NoiseWeight) {
  TopKOptions o = topk_options(4, 1, 3);
  o.noise = TrainingNoise::noisy_topk;
  expect_error([&] { TopKRouter r(o, filled(12)); },
               {"noisy_topk needs a noise weight [4, 3]", "got 0 values"});
  std::vector<float> nw = filled(12);
  nw[4] = kNaN;
  expect_error([&] { TopKRouter r(o, filled(12), {}, nw); },
               {"noise_weight[1, 1] expected finite", "got nan"});
  expect_error([&] { TopKRouter r(topk_options(4, 1, 3), filled(12), {}, filled(12)); },
               {"noise_weight expected empty", "got 12 values"});
}

TEST(ValidateTopK, RouteNullHidden) {
  const TopKRouter r(topk_options(4, 1, 3), filled(12));
  RoutingPlan plan;
  RouterScratch s;
  expect_error([&] { r.route(Batch::single(2, 3), nullptr, plan, s); },
               {"hidden states pointer is null", "T = 2"});
}

TEST(ValidateTopK, RouteLogitOverflowOrNaN) {
  const TopKRouter r(topk_options(4, 1, 3), filled(12, 1e30f));
  RoutingPlan plan;
  RouterScratch s;
  std::vector<float> x = {0, 0, 0, 1e30f, 1e30f, 1e30f};  // finite, but x . w overflows
  expect_error([&] { r.route(Batch::single(2, 3), x.data(), plan, s); },
               {"topk router: logit of token 1, expert 0 expected finite", "got inf"});
  x = {0, 0, 0, 0, kNaN, 0};  // route() called directly (no layer scan)
  const TopKRouter r2(topk_options(4, 1, 3), filled(12));
  expect_error([&] { r2.route(Batch::single(2, 3), x.data(), plan, s); },
               {"logit of token 1", "got nan"});
}

// ============================================================================== Sinkhorn

SinkhornOptions sinkhorn_options(int64_t E, int64_t k, int64_t d) {
  SinkhornOptions o;
  o.num_experts = E;
  o.k = k;
  o.hidden = d;
  return o;
}

void make_sinkhorn(const SinkhornOptions& o) {
  SinkhornRouter r(o, filled(static_cast<size_t>(std::max<int64_t>(o.num_experts * o.hidden, 1))));
}

TEST(ValidateSinkhorn, KZeroAndAboveE) {
  expect_error([] { make_sinkhorn(sinkhorn_options(4, 0, 3)); },
               {"sinkhorn router: k expected in [1, E = 4]", "got 0"});
  expect_error([] { make_sinkhorn(sinkhorn_options(4, 6, 3)); },
               {"sinkhorn router: k expected in [1, E = 4]", "got 6"});
  expect_error([] { make_sinkhorn(sinkhorn_options(0, 1, 3)); },
               {"num_experts (E) expected >= 1", "got 0"});
  expect_error([] { make_sinkhorn(sinkhorn_options(4, 1, 0)); },
               {"hidden size (d) expected >= 1", "got 0"});
}

TEST(ValidateSinkhorn, MaxItersZero) {
  SinkhornOptions o = sinkhorn_options(4, 1, 3);
  o.max_iters = 0;
  expect_error([&] { make_sinkhorn(o); }, {"max_iters expected >= 1", "got 0"});
}

TEST(ValidateSinkhorn, ToleranceNegativeOrNonFinite) {
  for (double t : {-1.0, static_cast<double>(kNaN), static_cast<double>(kInf)}) {
    SinkhornOptions o = sinkhorn_options(4, 1, 3);
    o.tolerance = t;
    std::ostringstream got;
    got << "got " << t;
    expect_error([&] { make_sinkhorn(o); }, {"tolerance expected finite and >= 0", got.str()});
  }
}

TEST(ValidateSinkhorn, TemperatureNonPositiveOrNonFinite) {
  for (float xi : {0.0f, -1.0f, kNaN, kInf}) {
    SinkhornOptions o = sinkhorn_options(4, 1, 3);
    o.temperature = xi;
    std::ostringstream got;
    got << "got " << xi;
    expect_error([&] { make_sinkhorn(o); },
                 {"temperature (xi) expected finite and > 0", got.str()});
  }
}

TEST(ValidateSinkhorn, EnumValuesOutOfRange) {
  SinkhornOptions o = sinkhorn_options(4, 1, 3);
  o.weight_mode = static_cast<SinkhornWeightMode>(4);
  expect_error([&] { make_sinkhorn(o); },
               {"weight_mode expected selection_only or transport", "got 4"});
  o = sinkhorn_options(4, 1, 3);
  o.cost = static_cast<SinkhornCost>(3);
  expect_error([&] { make_sinkhorn(o); }, {"cost expected logits or probs", "got 3"});
}

TEST(ValidateSinkhorn, GateWeightSizeAndFinite) {
  expect_error([] { SinkhornRouter r(sinkhorn_options(4, 1, 3), filled(13)); },
               {"sinkhorn router: gate.weight expected [4, 3] = 12 values", "got 13"});
  std::vector<float> w = filled(12);
  w[11] = -kInf;
  expect_error([&] { SinkhornRouter r(sinkhorn_options(4, 1, 3), w); },
               {"sinkhorn router: gate.weight[3, 2] expected finite", "got -inf"});
}

TEST(ValidateSinkhorn, TemperatureTooSmallForTheLogits) {
  SinkhornOptions o = sinkhorn_options(2, 1, 1);
  o.temperature = 1e-38f;
  const SinkhornRouter r(o, {1e4f, -1e4f});
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x = {1.0f, 2.0f};
  expect_error([&] { r.route(Batch::single(2, 1), x.data(), plan, s); },
               {"cost / temperature of token 0, expert 0 expected finite", "got inf", "too small"});
}

TEST(ValidateSelectiveSinkhorn, ProbabilityOutOfRange) {
  for (double p : {1.5, -0.1, static_cast<double>(kNaN)}) {
    SelectiveSinkhornOptions o;
    o.sinkhorn = sinkhorn_options(4, 1, 3);
    o.p = p;
    std::ostringstream got;
    got << "got " << p;
    expect_error([&] { SelectiveSinkhornRouter r(o, filled(12)); },
                 {"selective sinkhorn router: p expected in [0, 1]", got.str()});
  }
}

TEST(ValidateSelectiveSinkhorn, TopkShapeMismatch) {
  SelectiveSinkhornOptions o;
  o.sinkhorn = sinkhorn_options(4, 2, 3);
  o.topk.num_experts = 5;
  expect_error([&] { SelectiveSinkhornRouter r(o, filled(12)); },
               {"topk.num_experts expected 4", "got 5"});
  o.topk.num_experts = 0;
  o.topk.k = 1;
  expect_error([&] { SelectiveSinkhornRouter r(o, filled(12)); }, {"topk.k expected 2", "got 1"});
  o.topk.k = 0;
  o.topk.hidden = 7;
  expect_error([&] { SelectiveSinkhornRouter r(o, filled(12)); },
               {"topk.hidden expected 3", "got 7"});
  o.topk.hidden = 0;
  o.topk.capacity_factor = -1.0;
  expect_error([&] { SelectiveSinkhornRouter r(o, filled(12)); },
               {"capacity_factor expected finite and >= 0", "got -1"});
}

// ============================================================================== expert choice

ExpertChoiceOptions ec_options(int64_t E, int64_t d) {
  ExpertChoiceOptions o;
  o.num_experts = E;
  o.hidden = d;
  return o;
}

void make_ec(const ExpertChoiceOptions& o) {
  ExpertChoiceRouter r(o,
                       filled(static_cast<size_t>(std::max<int64_t>(o.num_experts * o.hidden, 1))));
}

ExpertChoicePredictor predictor(int64_t E, int64_t d, int64_t H) {
  return {filled(static_cast<size_t>(H * d)), filled(static_cast<size_t>(H)),
          filled(static_cast<size_t>(E * H)), filled(static_cast<size_t>(E))};
}

TEST(ValidateExpertChoice, ShapeOptions) {
  expect_error([] { make_ec(ec_options(0, 3)); },
               {"expert_choice router: num_experts (E) expected >= 1", "got 0"});
  expect_error([] { make_ec(ec_options(4, 0)); },
               {"expert_choice router: hidden size (d) expected >= 1", "got 0"});
  ExpertChoiceOptions o = ec_options(4, 3);
  o.aux_hidden = 0;
  expect_error([&] { make_ec(o); }, {"aux_hidden expected >= 1", "got 0"});
}

TEST(ValidateExpertChoice, CapacityFactor) {
  for (double c : {0.0, -2.0, static_cast<double>(kNaN), static_cast<double>(kInf)}) {
    ExpertChoiceOptions o = ec_options(4, 3);
    o.capacity_factor = c;
    std::ostringstream got;
    got << "got " << c;
    expect_error([&] { make_ec(o); }, {"capacity_factor expected finite and > 0", got.str()});
  }
}

TEST(ValidateExpertChoice, MaxExpertsPerToken) {
  ExpertChoiceOptions o = ec_options(4, 3);
  o.max_experts_per_token = 5;
  expect_error([&] { make_ec(o); }, {"max_experts_per_token expected in [0, E = 4]", "got 5"});
  o.max_experts_per_token = -1;
  expect_error([&] { make_ec(o); }, {"max_experts_per_token expected in [0, E = 4]", "got -1"});
}

TEST(ValidateExpertChoice, DecayOutOfRange) {
  for (double dc : {1.5, -0.5, static_cast<double>(kNaN)}) {
    ExpertChoiceOptions o = ec_options(4, 3);
    o.decay = dc;
    std::ostringstream got;
    got << "got " << dc;
    expect_error([&] { make_ec(o); }, {"decay expected in [0, 1]", got.str()});
  }
}

TEST(ValidateExpertChoice, ModeValues) {
  ExpertChoiceOptions o = ec_options(4, 3);
  o.mode = static_cast<ExpertChoiceMode>(8);
  expect_error([&] { make_ec(o); }, {"mode expected batch, threshold or predictor", "got 8"});
  expect_error([] { (void)parse_expert_choice_mode("causal"); },
               {"mode expected one of batch, threshold, predictor", "got \"causal\""});
  o.mode = ExpertChoiceMode::predictor;
  expect_error([&] { make_ec(o); },
               {"mode predictor needs router.aux.{0,2}.{weight,bias}", "got none"});
}

TEST(ValidateExpertChoice, WeightsSizeAndFinite) {
  std::vector<float> w = filled(12);
  w[5] = kNaN;
  expect_error([&] { ExpertChoiceRouter r(ec_options(4, 3), w); },
               {"expert_choice router: gate.weight[1, 2] expected finite", "got nan"});
  expect_error([] { ExpertChoiceRouter r(ec_options(4, 3), filled(12), {}, filled(3)); },
               {"router.thresholds expected [4]", "got 3 values"});
  expect_error(
      [] {
        ExpertChoiceRouter r(ec_options(4, 3), filled(12), {}, {0, 0, kInf, 0});
      },
      {"router.thresholds[2] expected finite", "got inf"});
  ExpertChoiceOptions o = ec_options(4, 3);
  o.aux_hidden = 2;
  ExpertChoicePredictor p = predictor(4, 3, 2);
  p.weight2.pop_back();
  expect_error([&] { ExpertChoiceRouter r(o, filled(12), p); },
               {"router.aux.2.weight expected [4, 2] = 8 values", "got 7"});
  p = predictor(4, 3, 2);
  p.weight0[4] = kNaN;
  expect_error([&] { ExpertChoiceRouter r(o, filled(12), p); },
               {"router.aux.0.weight[1, 1] expected finite", "got nan"});
  p = predictor(4, 3, 2);
  p.bias2[3] = -kInf;
  expect_error([&] { ExpertChoiceRouter r(o, filled(12), p); },
               {"router.aux.2.bias[3] expected finite", "got -inf"});
}

TEST(ValidateExpertChoice, ThresholdModeNeedsThresholds) {
  ExpertChoiceRouter r(ec_options(4, 3), filled(12));
  r.set_mode(ExpertChoiceMode::threshold);
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x(6, 0.5f);
  expect_error([&] { r.route(Batch::single(2, 3), x.data(), plan, s); },
               {"mode threshold needs router.thresholds [4]", "got none"});
}

TEST(ValidateExpertChoice, OutputsWidthAndSizes) {
  ExpertChoiceOptions o = ec_options(2, 3);
  o.capacity_factor = 1.0;  // kc = floor(4 * 1 / 2) = 2
  const ExpertChoiceRouter r(o, filled(6));
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x(12, 0.5f);
  r.route(Batch::single(4, 3), x.data(), plan, s);  // kc = 2
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  expect_error([&] { expert_choice_outputs(plan, 1, ids, w); },
               {"width (kc) expected >= 2", "got 1"});
  expect_error([&] { expert_choice_outputs(plan, 2, ids, w); },
               {"expert_token_ids expected [2, 2] = 4 values", "got 2"});
  RoutingPlan raw;
  raw.reset(1, 2, [](int64_t) { return 1; });
  expect_error([&] { (void)expert_choice_output_width(raw); },
               {"plan expected finalized", "without finalize()"});
}

// ============================================================================== GRU (RMoE)

struct CellWeights {
  std::vector<float> wih, whh, bih, bhh;
};
CellWeights cell_weights(int64_t G, int64_t dr) {
  const auto n = static_cast<size_t>(G * dr);
  return {filled(n * static_cast<size_t>(dr)), filled(n * static_cast<size_t>(dr)), filled(n),
          filled(n)};
}

TEST(ValidateGru, CellOptionsAndWeights) {
  expect_error([] { GruCell(GruVariant::gru, 0, {}, {}, {}, {}); },
               {"gru cell: d_r expected >= 1", "got 0"});
  expect_error([] { GruCell(static_cast<GruVariant>(3), 2, {}, {}, {}, {}); },
               {"gru cell: variant expected gru or rnn", "got 3"});
  CellWeights c = cell_weights(3, 2);
  expect_error([&] { GruCell(GruVariant::gru, 2, filled(4), c.whh, c.bih, c.bhh); },
               {"router.gru.weight_ih expected [6, 2] = 12 values", "got 4"});
  expect_error([&] { GruCell(GruVariant::gru, 2, c.wih, c.whh, filled(5), c.bhh); },
               {"router.gru.bias_ih expected [6] values", "got 5"});
  c.whh[9] = kNaN;
  expect_error([&] { GruCell(GruVariant::gru, 2, c.wih, c.whh, c.bih, c.bhh); },
               {"gru cell: router.gru.weight_hh[4, 1] expected finite", "got nan"});
  c = cell_weights(1, 2);
  c.bhh[1] = kInf;
  expect_error([&] { GruCell(GruVariant::rnn, 2, c.wih, c.whh, c.bih, c.bhh); },
               {"gru cell: router.gru.bias_hh[1] expected finite", "got inf"});
}

GruRouterOptions gru_options(int64_t E, int64_t k, int64_t d, int64_t dr) {
  GruRouterOptions o;
  o.num_experts = E;
  o.k = k;
  o.hidden = d;
  o.d_r = dr;
  return o;
}

std::shared_ptr<const GruCell> gru_cell(int64_t dr, GruVariant v = GruVariant::gru) {
  const CellWeights c = cell_weights(v == GruVariant::gru ? 3 : 1, dr);
  return std::make_shared<const GruCell>(v, dr, c.wih, c.whh, c.bih, c.bhh);
}

TEST(ValidateGru, RouterOptions) {
  const auto cell = gru_cell(2);
  auto make = [&](GruRouterOptions o) {
    GruRouter r(o, cell, filled(static_cast<size_t>(std::max<int64_t>(o.d_r * o.hidden, 1))),
                filled(static_cast<size_t>(std::max<int64_t>(o.num_experts * o.d_r, 1))));
  };
  expect_error([&] { make(gru_options(4, 0, 3, 2)); },
               {"gru router: k expected in [1, E = 4]", "got 0"});
  expect_error([&] { make(gru_options(4, 5, 3, 2)); },
               {"gru router: k expected in [1, E = 4]", "got 5"});
  expect_error([&] { make(gru_options(0, 1, 3, 2)); },
               {"gru router: num_experts (E) expected >= 1", "got 0"});
  expect_error([&] { make(gru_options(4, 1, 0, 2)); },
               {"gru router: hidden size (d) expected >= 1", "got 0"});
  expect_error([&] { make(gru_options(4, 1, 3, 0)); }, {"gru router: d_r expected >= 1", "got 0"});
  GruRouterOptions o = gru_options(4, 1, 3, 2);
  o.variant = static_cast<GruVariant>(4);
  expect_error([&] { make(o); }, {"gru router: variant expected gru or rnn", "got 4"});
}

TEST(ValidateGru, RouterCellAndWeights) {
  const GruRouterOptions o = gru_options(4, 1, 3, 2);
  expect_error([&] { GruRouter r(o, nullptr, filled(6), filled(8)); },
               {"cell expected a GruCell", "got null"});
  expect_error([&] { GruRouter r(o, gru_cell(3), filled(6), filled(8)); },
               {"cell state size expected d_r = 2", "got 3"});
  expect_error([&] { GruRouter r(o, gru_cell(2, GruVariant::rnn), filled(6), filled(8)); },
               {"cell variant expected gru", "got rnn"});
  expect_error([&] { GruRouter r(o, gru_cell(2), filled(5), filled(8)); },
               {"router.proj.weight expected [2, 3] = 6 values", "got 5"});
  expect_error([&] { GruRouter r(o, gru_cell(2), filled(6), filled(9)); },
               {"router.out.weight expected [4, 2] = 8 values", "got 9"});
  std::vector<float> proj = filled(6);
  proj[4] = kNaN;
  expect_error([&] { GruRouter r(o, gru_cell(2), proj, filled(8)); },
               {"router.proj.weight[1, 1] expected finite", "got nan"});
  std::vector<float> out = filled(8);
  out[7] = kInf;
  expect_error([&] { GruRouter r(o, gru_cell(2), filled(6), out); },
               {"router.out.weight[3, 1] expected finite", "got inf"});
}

TEST(ValidateGru, RouteRouterStateShapeAndValues) {
  const GruRouter r(gru_options(4, 1, 3, 2), gru_cell(2), filled(6), filled(8));
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x(6, 0.5f);
  std::vector<float> state(3, 0.0f);
  Batch b = Batch::single(2, 3);
  b.router_state = state;
  expect_error([&] { r.route(b, x.data(), plan, s); },
               {"Batch.router_state expected [T, d_r] = [2, 2] = 4 values", "got 3"});
  state = {0, 0, kNaN, 0};
  b.router_state = state;
  expect_error([&] { r.route(b, x.data(), plan, s); },
               {"Batch.router_state[1, 0] expected finite", "got nan"});
}

TEST(ValidateGru, RouteProjectionOverflow) {
  const GruRouter r(gru_options(4, 1, 3, 2), gru_cell(2), filled(6, 1e30f), filled(8));
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x = {0, 0, 0, 1e30f, 1e30f, 1e30f};
  expect_error([&] { r.route(Batch::single(2, 3), x.data(), plan, s); },
               {"router.proj.weight x hidden_states of token 1", "expected finite"});
}

// ============================================================================== depth routers

MoDOptions mod_options(int64_t d) {
  MoDOptions o;
  o.hidden = d;
  return o;
}

TEST(ValidateMoD, Options) {
  auto make = [](MoDOptions o) {
    MoDRouter r(o, filled(static_cast<size_t>(std::max<int64_t>(o.hidden, 1))));
  };
  expect_error([&] { make(mod_options(0)); },
               {"mod router: hidden size (d) expected >= 1", "got 0"});
  for (double ratio : {1.5, -0.25, static_cast<double>(kNaN)}) {
    MoDOptions o = mod_options(3);
    o.ratio = ratio;
    std::ostringstream got;
    got << "got " << ratio;
    expect_error([&] { make(o); }, {"mod router: ratio expected in [0, 1]", got.str()});
  }
  MoDOptions o = mod_options(3);
  o.alpha = kInf;
  expect_error([&] { make(o); }, {"mod router: alpha expected finite", "got inf"});
  for (double t : {0.0, 1.0, static_cast<double>(kNaN)}) {
    o = mod_options(3);
    o.threshold = t;
    std::ostringstream got;
    got << "got " << t;
    expect_error([&] { make(o); }, {"mod router: threshold expected in (0, 1)", got.str()});
  }
  o = mod_options(3);
  o.activation = static_cast<DepthActivation>(6);
  expect_error([&] { make(o); }, {"activation expected raw, sigmoid or tanh", "got 6"});
  o = mod_options(3);
  o.mode = static_cast<MoDMode>(6);
  expect_error([&] { make(o); }, {"mode expected capacity, threshold or aux_predictor", "got 6"});
}

TEST(ValidateMoD, Weights) {
  expect_error([] { MoDRouter r(mod_options(4), filled(8)); },
               {"router.weight expected [1, 4] = 4 values", "got 8"});
  expect_error(
      [] {
        MoDRouter r(mod_options(4), {0, 0, kNaN, 0});
      },
      {"mod router: router.weight[0, 2] expected finite", "got nan"});
  MoDOptions o = mod_options(4);
  o.mode = MoDMode::aux_predictor;
  expect_error([&] { MoDRouter r(o, filled(4)); },
               {"router.aux.weight (mode aux_predictor) expected [1, 4] = 4 values", "got 0"});
  expect_error(
      [&] {
        MoDRouter r(o, filled(4), {0, kInf, 0, 0});
      },
      {"router.aux.weight (mode aux_predictor)[0, 1] expected finite", "got inf"});
  expect_error([] { MoDRouter r(mod_options(4), filled(4), filled(4)); },
               {"router.aux.weight expected only with mode aux_predictor", "got 4 values"});
}

TEST(ValidateMoD, RouteLogitOverflow) {
  const MoDRouter r(mod_options(2), filled(2, 1e30f));
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x = {1, 1, 1e30f, 1e30f};
  expect_error([&] { r.route(Batch::single(2, 2), x.data(), plan, s); },
               {"mod router: logit 0 of token 1 expected finite", "got inf"});
}

TEST(ValidateGammaMod, OptionsAndWeight) {
  auto make = [](GammaModOptions o) {
    GammaModRouter r(o, filled(static_cast<size_t>(2 * std::max<int64_t>(o.hidden, 1))));
  };
  GammaModOptions o;
  expect_error([&] { make(o); }, {"gamma_mod router: hidden size (d) expected >= 1", "got 0"});
  o.hidden = 3;
  o.ratio = 2.0;
  expect_error([&] { make(o); }, {"gamma_mod router: ratio expected in [0, 1]", "got 2"});
  o.ratio = 0.5;
  o.prefill_threshold = 0.0;
  expect_error([&] { make(o); }, {"prefill_threshold expected in (0, 1)", "got 0"});
  o.prefill_threshold = 0.005;
  o.decode_threshold = kNaN;
  expect_error([&] { make(o); }, {"decode_threshold expected in (0, 1)", "got nan"});
  o.decode_threshold = 0.5;
  o.phase = static_cast<GammaModPhase>(5);
  expect_error([&] { make(o); }, {"phase expected capacity, prefill or decode", "got 5"});
  o.phase = GammaModPhase::capacity;
  expect_error([&] { GammaModRouter r(o, filled(3)); },
               {"gamma_mod router: router.weight expected [2, 3] = 6 values", "got 3"});
  std::vector<float> w = filled(6);
  w[3] = kNaN;
  expect_error([&] { GammaModRouter r(o, w); },
               {"gamma_mod router: router.weight[1, 0] expected finite", "got nan"});
}

TEST(ValidateTokenPrune, OptionsAndWeight) {
  TokenPruneOptions o;
  o.hidden = 3;
  o.tau = 1.0;
  expect_error([&] { TokenPruneRouter r(o, filled(3)); },
               {"token_prune router: tau expected in (0, 1)", "got 1"});
  o.tau = 0.5;
  o.sparsity = 1.2;
  expect_error([&] { TokenPruneRouter r(o, filled(3)); },
               {"sparsity expected in [0, 1]", "got 1.2"});
  o.sparsity = static_cast<double>(kNaN);
  expect_error([&] { TokenPruneRouter r(o, filled(3)); },
               {"sparsity expected in [0, 1]", "got nan"});
  o.sparsity.reset();
  expect_error(
      [&] {
        TokenPruneRouter r(o, {0, kInf, 0});
      },
      {"token_prune router: router.weight[0, 1] expected finite", "got inf"});
}

TEST(ValidateDrLlm, OptionsAndWeights) {
  const int64_t d = 3, h = 2;
  auto make = [&](DrLlmOptions o, std::vector<float> w0, std::vector<float> b0,
                  std::vector<float> w2, std::vector<float> b2) {
    DrLlmRouter r(o, std::move(w0), std::move(b0), std::move(w2), std::move(b2));
  };
  const DrLlmOptions ok{d, h, 8};
  expect_error(
      [&] {
        make({0, h, 8}, {}, {}, {}, {});
      },
      {"drllm router: hidden size (d) expected >= 1", "got 0"});
  expect_error(
      [&] {
        make({d, 0, 8}, {}, {}, {}, {});
      },
      {"drllm router: bottleneck expected >= 1", "got 0"});
  expect_error(
      [&] {
        make({d, h, 0}, {}, {}, {}, {});
      },
      {"drllm router: windows expected >= 1", "got 0"});
  expect_error([&] { make(ok, filled(5), filled(2), filled(6), filled(3)); },
               {"router.0.weight expected [2, 3] = 6 values", "got 5"});
  expect_error([&] { make(ok, filled(6), filled(2), filled(6), filled(2)); },
               {"router.2.bias expected [3]", "got 2 values"});
  expect_error(
      [&] {
        make(ok, filled(6), filled(2), filled(6), {0, kNaN, 0});
      },
      {"drllm router: router.2.bias[1] expected finite", "got nan"});
  std::vector<float> w2 = filled(6);
  w2[3] = kInf;
  expect_error([&] { make(ok, filled(6), filled(2), w2, filled(3)); },
               {"drllm router: router.2.weight[1, 1] expected finite", "got inf"});
}

TEST(ValidateDrLlm, FrozenRepeats) {
  const Batch b = Batch::single(4, 3);
  const std::vector<int32_t> two = {1, 1};
  expect_error([&] { DrLlmRouter::check_repeats(b, two); },
               {"repeats expected [1]", "got 2 values"});
  const std::vector<int32_t> three = {3};
  expect_error([&] { DrLlmRouter::check_repeats(b, three); },
               {"repeats[0] expected 0 (skip), 1 (execute) or 2 (repeat)", "got 3"});
}

TEST(ValidateMoR, Options) {
  auto make = [](MoROptions o) {
    const auto n = static_cast<size_t>(std::max<int64_t>(o.num_recursions * o.hidden, 1));
    MoRRouter r(std::move(o), filled(n));
  };
  MoROptions o;
  expect_error([&] { make(o); }, {"mor router: hidden size (d) expected >= 1", "got 0"});
  o.hidden = 3;
  o.num_recursions = 0;
  expect_error([&] { make(o); }, {"num_recursions (N_r) expected >= 1", "got 0"});
  o.num_recursions = 2;
  for (double a : {0.0, static_cast<double>(kNaN)}) {
    o.alpha = a;
    std::ostringstream got;
    got << "got " << a;
    expect_error([&] { make(o); }, {"mor router: alpha expected finite and > 0", got.str()});
  }
  o.alpha = 1.0;
  o.capacity_factors = {0.5};
  expect_error([&] { make(o); },
               {"capacity_factors expected empty (default) or [N_r = 2] values", "got 1"});
  for (double cf : {0.0, 1.5, static_cast<double>(kNaN)}) {
    o.capacity_factors = {1.0, cf};
    std::ostringstream got;
    got << "got " << cf;
    expect_error([&] { make(o); }, {"capacity_factors[1] expected in (0, 1]", got.str()});
  }
  o.capacity_factors.clear();
  o.act = static_cast<MoRActivation>(7);
  expect_error([&] { make(o); }, {"mor router: act expected sigmoid, tanh or raw", "got 7"});
  expect_error([] { (void)parse_mor_activation("relu"); },
               {"act expected one of sigmoid, tanh, raw", "got \"relu\""});
}

TEST(ValidateMoR, WeightsAndRouteStep) {
  MoROptions o;
  o.hidden = 3;
  o.num_recursions = 2;
  expect_error([&] { MoRRouter r(o, filled(5)); },
               {"router.steps.{r}.weight expected N_r = 2 rows of [1, 3] = 6 values", "got 5"});
  std::vector<float> theta = filled(6);
  theta[4] = kNaN;
  expect_error([&] { MoRRouter r(o, theta); },
               {"router.steps.1.weight[0, 1] expected finite", "got nan"});
  const MoRRouter r(o, filled(6));
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x(6, 0.5f);
  std::vector<uint8_t> active(2, 1);
  expect_error([&] { r.route_step(2, Batch::single(2, 3), x.data(), active, plan, s); },
               {"recursion expected in [0, N_r = 2)", "got 2"});
  std::vector<uint8_t> short_active(1, 1);
  expect_error([&] { r.route_step(0, Batch::single(2, 3), x.data(), short_active, plan, s); },
               {"active expected [2]", "got 1 values"});
}

// ============================================================================== prototype routers

ProMoEOptions promoe_options(int64_t E, int64_t k, int64_t d) {
  ProMoEOptions o;
  o.num_experts = E;
  o.k = k;
  o.hidden = d;
  return o;
}

TEST(ValidateProMoE, Options) {
  auto make = [](ProMoEOptions o) {
    ProMoERouter r(o, filled(static_cast<size_t>(std::max<int64_t>(o.num_experts * o.hidden, 1))));
  };
  expect_error([&] { make(promoe_options(4, 0, 3)); },
               {"promoe router: k expected in [1, E = 4]", "got 0"});
  expect_error([&] { make(promoe_options(4, 5, 3)); },
               {"promoe router: k expected in [1, E = 4]", "got 5"});
  expect_error([&] { make(promoe_options(0, 1, 3)); },
               {"promoe router: num_experts (E) expected in [1, 2^31 - 1)", "got 0"});
  expect_error([&] { make(promoe_options(4, 1, 0)); },
               {"promoe router: hidden size (d) expected >= 1", "got 0"});
  for (float tau : {0.0f, kNaN, kInf, 1e-40f}) {
    ProMoEOptions o = promoe_options(4, 1, 3);
    o.tau_r = tau;
    std::ostringstream got;
    got << "got " << tau;
    expect_error([&] { make(o); }, {"promoe router: tau_r expected finite and >= ", got.str()});
  }
}

TEST(ValidateProMoE, Prototypes) {
  expect_error([] { ProMoERouter r(promoe_options(4, 1, 3), filled(11)); },
               {"router.prototypes expected [4, 3] = 12 values", "got 11"});
  std::vector<float> p = filled(12);
  p[7] = kNaN;
  expect_error([&] { ProMoERouter r(promoe_options(4, 1, 3), p); },
               {"promoe router: router.prototypes[2, 1] expected finite", "got nan"});
  ProMoERouter r(promoe_options(4, 1, 3), filled(12));
  expect_error([&] { r.set_prototypes(p); },
               {"router.prototypes[2, 1] expected finite", "got nan"});
}

TEST(ValidateProMoE, ContrastiveLossArguments) {
  const ProMoERouter r(promoe_options(2, 1, 3), {1, 0, 0, 0, 1, 0});
  RoutingPlan plan;
  RouterScratch s;
  const std::vector<float> x = {1, 0, 0, 0, 1, 0};
  r.route(Batch::single(2, 3), x.data(), plan, s);
  for (double t : {0.0, static_cast<double>(kNaN)}) {
    std::ostringstream got;
    got << "got " << t;
    expect_error([&] { (void)routing_contrastive_loss(r, Batch::single(2, 3), x.data(), plan, t); },
                 {"routing_contrastive_loss: temperature expected finite and > 0", got.str()});
  }
  expect_error([&] { (void)routing_contrastive_loss(r, Batch::single(1, 3), x.data(), plan); },
               {"plan tokens expected 1", "got 2"});
}

TEST(ValidateCentroid, OptionsAndCentroids) {
  CentroidOptions o;
  o.hidden = 3;
  expect_error([&] { CentroidRouter r(o, {}); },
               {"nearest_centroid router: num_experts (E) expected in [1, 2^31 - 1)", "got 0"});
  o.num_experts = 2;
  o.hidden = 0;
  expect_error([&] { CentroidRouter r(o, {}); },
               {"nearest_centroid router: hidden size (d) expected >= 1", "got 0"});
  o.hidden = 3;
  expect_error([&] { CentroidRouter r(o, filled(5)); },
               {"router.centroids expected [2, 3] = 6 values", "got 5"});
  expect_error(
      [&] {
        CentroidRouter r(o, {0, 0, 0, 0, kInf, 0});
      },
      {"router.centroids[1, 1] expected finite", "got inf"});
  expect_error(
      [&] {
        CentroidRouter r(o, {3e19f, 3e19f, 3e19f, 0, 0, 0});
      },
      {"router.centroids row 0 expected a squared norm representable in float"});
}

// ============================================================================== blocks, plan,
// layer

TEST(ValidateBlocks, CausalAttentionBlock) {
  expect_error([] { CausalAttentionBlock b(0, {}, {}, {}, {}); },
               {"CausalAttentionBlock: hidden size (d) expected >= 1", "got 0"});
  const std::vector<float> w = filled(4);
  expect_error([&] { CausalAttentionBlock b(2, filled(3), w, w, w); },
               {"wq expected [2, 2] = 4 values", "got 3"});
  const std::vector<float> bad = {0, 0, 0, kNaN};
  expect_error([&] { CausalAttentionBlock b(2, w, w, w, bad); },
               {"CausalAttentionBlock: wo[1, 1] expected finite", "got nan"});
}

TEST(ValidateBlocks, FfnBlockOneExpert) {
  expect_error(
      [] {
        FfnBlock b(FfnBank(2, FfnShape{3, 4, true, Activation::silu}));
      },
      {"FfnBlock: bank expected 1 expert", "got 2"});
}

TEST(ValidatePlan, ResetAndCapacity) {
  RoutingPlan p;
  expect_error([&] { p.reset(2, 0, [](int64_t) { return 0; }); },
               {"RoutingPlan: experts expected in [1, 2^31)", "got 0"});
  expect_error([&] { p.reset(2, 3, [](int64_t) { return 4; }); },
               {"RoutingPlan: slots of token 0 expected in [0, 3]", "got 4"});
  p.reset(2, 3, [](int64_t) { return 1; });
  expect_error([&] { p.apply_capacity(-1, DropPolicy::score); },
               {"capacity expected >= 0", "got -1"});
  expect_error([&] { p.apply_capacity(1, static_cast<DropPolicy>(8)); },
               {"policy expected score, position or position_slot_major", "got 8"});
  expect_error([&] { p.apply_capacity(1, DropPolicy::score, true, kNaN); },
               {"renormalize_to expected finite", "got nan"});
}

TEST(ValidatePlan, FinalizeChecksIdsAndWeights) {
  RoutingPlan p;
  p.reset(2, 3, [](int64_t) { return 1; });
  p.token_experts(1)[0] = 3;
  expect_error([&] { p.finalize(); },
               {"RoutingPlan: slot 1 expert id expected in [0, 3)", "got 3"});
  p.token_experts(1)[0] = 2;
  p.token_weights(0)[0] = kNaN;
  expect_error([&] { p.finalize(); }, {"RoutingPlan: slot 0 weight expected finite", "got nan"});
}

TEST(ValidateLayer, NonFiniteHiddenAndOptOut) {
  TopKOptions o = topk_options(2, 1, 3);
  SparseLayer<TopKRouter, FfnBank> layer(TopKRouter(o, filled(6)),
                                         FfnBank(2, FfnShape{3, 4, true, Activation::silu}));
  Workspace ws;
  std::vector<float> x(6, 0.5f), y(6);
  x[4] = kInf;
  expect_error(
      [&] { layer.forward(Batch::single(2, 3), x.data(), y.data(), ws); },
      {"SparseLayer::forward: hidden[1, 1] expected finite", "got inf", "set_check_finite(false)"});
  layer.set_check_finite(false);  // the router's own logit scan still refuses the Inf
  expect_error([&] { layer.forward(Batch::single(2, 3), x.data(), y.data(), ws); },
               {"topk router: logit of token 1", "got inf"});
  expect_error(
      [] {
        SparseLayer<TopKRouter, FfnBank> l(TopKRouter(topk_options(2, 1, 3), filled(6)),
                                           FfnBank(3, FfnShape{3, 4, true, Activation::silu}));
      },
      {"SparseLayer: router has 2 experts, expert bank expected the same", "got 3"});
}

// ============================================================================== aux, arank

struct Routed {
  RoutingPlan plan;
  RouterScratch scratch;
};

Routed routed_topk(int64_t T) {
  Routed r;
  const TopKRouter router(topk_options(2, 1, 2), identity(2));
  std::vector<float> x(static_cast<size_t>(2 * T));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 3);
  router.route(Batch::single(T, 2), x.data(), r.plan, r.scratch);
  return r;
}

TEST(ValidateAux, LoadBalancingAndStats) {
  const Routed r = routed_topk(3);
  expect_error(
      [&] {
        (void)load_balancing_loss(r.plan, r.scratch.logits, Batch::single(4, 2),
                                  ScoreFunc::softmax);
      },
      {"load_balancing_loss: batch.tokens expected 3", "got 4"});
  expect_error(
      [&] {
        (void)load_balancing_loss(r.plan, std::span<const float>(r.scratch.logits).first(5),
                                  Batch::single(3, 2), ScoreFunc::softmax);
      },
      {"load_balancing_loss: logits expected [T, E] = [3, 2] = 6 values", "got 5"});
  std::vector<float> L = r.scratch.logits;
  L[3] = kNaN;
  expect_error([&] { (void)routing_stats(r.plan, L, Batch::single(3, 2)); },
               {"routing_stats: logits[1, 1] expected finite", "got nan"});
  RoutingPlan raw;
  raw.reset(3, 2, [](int64_t) { return 1; });
  expect_error([&] { (void)routing_stats(raw, {}, Batch::single(3, 2)); },
               {"routing_stats: plan expected finalized"});
}

TEST(ValidateAux, ZLossAndBiasUpdate) {
  const Routed r = routed_topk(3);
  expect_error([&] { (void)router_z_loss(r.scratch.logits, 0, Batch::single(3, 2)); },
               {"router_z_loss: E expected >= 1", "got 0"});
  expect_error([&] { (void)router_z_loss(r.scratch.logits, 2, Batch::single(4, 2)); },
               {"router_z_loss: logits expected [T, E] = [4, 2] = 8 values", "got 6"});
  expect_error(
      [&] {
        (void)update_selection_bias({0, kInf}, r.plan);
      },
      {"update_selection_bias: bias[1] expected finite", "got inf"});
  expect_error([&] { (void)update_selection_bias({}, r.plan, kNaN); },
               {"update_selection_bias: u expected finite", "got nan"});
  expect_error([&] { (void)update_selection_bias(filled(3), r.plan); },
               {"update_selection_bias: bias expected [2]", "got 3 values"});
}

TEST(ValidateArank, Arguments) {
  const std::vector<float> a = {1, 0, 0, kNaN};
  expect_error([&] { (void)numerical_rank(a.data(), 2, 2); },
               {"numerical_rank: A[1, 1] expected finite", "got nan"});
  expect_error([&] { (void)numerical_rank(a.data(), -1, 2); },
               {"numerical_rank: rows and cols expected >= 0", "got -1 x 2"});
  expect_error([&] { (void)arank(std::span<const float>(a), 0, 1, 2, 2); },
               {"arank: samples expected >= 1", "got 0"});
  expect_error([&] { (void)arank(std::span<const float>(a), 1, 1, 3, 2, false); },
               {"arank: maps expected [1, 1, 3, 2] = 6 values", "got 4"});
  expect_error([&] { (void)arank(std::span<const float>(a), 1, 1, 3, 2); },
               {"arank: strictly_causal expected square maps", "got 3 x 2"});
}

// ============================================================================== config and weights
// files

TEST(ValidateConfig, HfTopkErrorsNameTheFile) {
  expect_error(
      [] {
        (void)parse_layer_config(
            R"({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 5})",
            "c.json");
      },
      {"c.json: topk router: k expected in [1, E = 4]", "got 5"});
  expect_error(
      [] {
        (void)parse_layer_config(
            R"({"model_type": "deepseek_v3", "n_routed_experts": 6, "n_group": 4, "num_experts_per_tok": 2})",
            "ds.json");
      },
      {"ds.json: topk router: num_experts (6) expected divisible by n_group", "n_group = 4"});
  expect_error(
      [] {
        (void)parse_layer_config(R"({"model_type": "deepseek_v3", "routed_scaling_factor": 1e40})",
                                 "ds.json");
      },
      {"routed_scaling_factor expected finite and > 0", "got inf"});
}

TEST(ValidateConfig, MoekitRouterKeys) {
  const std::string head =
      R"({"moekit_config_version": 1, "hidden_size": 8, "experts": {"intermediate_size": 4}, "router": )";
  expect_error(
      [&] {
        (void)parse_layer_config(
            head + R"({"type": "topk", "num_experts": 4, "k": 1, "capacity_factor": -1}})",
            "m.json");
      },
      {"m.json: topk router: capacity_factor expected finite and >= 0", "got -1"});
  expect_error(
      [&] {
        (void)parse_layer_config(
            head + R"({"type": "topk", "num_experts": 4, "k": 1, "noise_seed": -3}})", "m.json");
      },
      {"m.json.router.noise_seed: expected an integer >= 0", "got -3"});
  expect_error(
      [&] {
        (void)parse_layer_config(
            head + R"({"type": "sinkhorn", "num_experts": 4, "k": 1, "temperature": 0}})",
            "m.json");
      },
      {"m.json.router: sinkhorn router: temperature (xi) expected finite and > 0", "got 0"});
  expect_error(
      [&] {
        (void)parse_layer_config(
            head + R"({"type": "selective_sinkhorn", "num_experts": 4, "k": 1, "step": -1}})",
            "m.json");
      },
      {"router.step: expected an integer >= 0", "got -1"});
  expect_error(
      [&] { (void)parse_layer_config(head + R"({"type": "mod", "ratio": 1.5}})", "m.json"); },
      {"m.json.router: mod router: ratio expected in [0, 1]", "got 1.5"});
  expect_error(
      [&] {
        (void)parse_layer_config(
            head + R"({"type": "expert_choice", "num_experts": 4, "decay": 2}})", "m.json");
      },
      {"decay expected in [0, 1]", "got 2"});
}

/// A temporary safetensors file removed at scope exit.
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name)
      : path((std::filesystem::temp_directory_path() /
              ("moekit_validation_" + std::to_string(::getpid()) + "_" + name))
                 .string()) {}
  ~TempFile() { std::filesystem::remove(path); }
};

TEST(ValidateWeights, LoadedRouterWeightsAreChecked) {
  const LayerConfig c = parse_layer_config(
      R"({"moekit_config_version": 1, "hidden_size": 2, "experts": {"intermediate_size": 2}, "router": {"type": "topk", "num_experts": 2, "k": 1}})");
  std::vector<float> gate = {1, 0, 0, kNaN};
  const std::vector<float> ffn(4, 0.1f);
  std::vector<io::OutTensor> t = {{"gate.weight", io::DType::F32, {2, 2}, gate.data()}};
  const std::vector<std::string> names = {
      "experts.0.gate_proj.weight", "experts.0.up_proj.weight", "experts.0.down_proj.weight",
      "experts.1.gate_proj.weight", "experts.1.up_proj.weight", "experts.1.down_proj.weight"};
  for (const std::string& n : names) t.push_back({n, io::DType::F32, {2, 2}, ffn.data()});
  const TempFile f("nan_gate.safetensors");
  io::write_safetensors(f.path, t);
  const io::TensorSource src = io::TensorSource::open(f.path);
  expect_error([&] { (void)load_any_layer(c, src); },
               {"topk router: gate.weight[1, 1] expected finite", "got nan"});
  // A mis-shaped tensor names the file, the tensor and both shapes.
  gate.resize(2);
  t[0] = {"gate.weight", io::DType::F32, {1, 2}, gate.data()};
  const TempFile g("short_gate.safetensors");
  io::write_safetensors(g.path, t);
  const io::TensorSource src2 = io::TensorSource::open(g.path);
  expect_error([&] { (void)load_any_layer(c, src2); },
               {"tensor 'gate.weight' has shape [1, 2] (F32), expected shape [2, 2]"});
  expect_error([&] { (void)src2.read_f32("missing.weight", {2}); },
               {"no tensor named 'missing.weight'"});
}

// ============================================================================== +-1e4 logits

/// Double softmax of one row.
std::vector<double> softmax_d(const std::vector<double>& x) {
  const double m = *std::max_element(x.begin(), x.end());
  std::vector<double> y(x.size());
  double s = 0;
  for (size_t i = 0; i < x.size(); ++i) s += (y[i] = std::exp(x[i] - m));
  for (double& v : y) v /= s;
  return y;
}

/// Indices of the k largest, descending, ties to the lower index.
std::vector<int64_t> topk_d(const std::vector<double>& s, int64_t k) {
  std::vector<int64_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return s[static_cast<size_t>(a)] > s[static_cast<size_t>(b)];
  });
  idx.resize(static_cast<size_t>(k));
  return idx;
}

/// Rows of logits with entries of +-1e4 (and neighbours), the hard cases for exp().
std::vector<std::vector<float>> huge_rows() {
  return {{1e4f, -1e4f, 0.0f, 1e4f - 1.0f, -1e4f + 0.5f, 3.0f},
          {-1e4f, -1e4f, -1e4f, -1e4f, -1e4f, -1e4f + 2.0f},
          {1e4f, 1e4f, 1e4f, -1e4f, 1e4f - 0.5f, 0.0f},
          {-1e4f, 0.25f, -0.25f, 1e4f, -1e4f, 9999.0f},
          {-9999.0f, -1e4f, -9998.0f, -1e4f, -1e4f, -9999.5f}};
}

void expect_weight_near(double got, double want) {
  EXPECT_TRUE(std::isfinite(got));
  EXPECT_NEAR(got, want, 1e-6 * std::abs(want) + 1e-30) << "got " << got << ", want " << want;
}

TEST(NumericalSafety, TopKSoftmaxSigmoidAndTopkThenSoftmaxAtPlusMinus1e4) {
  const int64_t E = 6;
  const auto rows = huge_rows();
  const int64_t T = static_cast<int64_t>(rows.size());
  std::vector<float> x;
  for (const auto& r : rows) x.insert(x.end(), r.begin(), r.end());
  for (int variant = 0; variant < 4; ++variant) {
    TopKOptions o = topk_options(E, variant == 3 ? E : 3, E);
    o.score_func = variant == 1 ? ScoreFunc::sigmoid : ScoreFunc::softmax;
    o.topk_then_softmax = variant == 2;
    o.norm_topk_prob = variant == 1;
    const TopKRouter router(o, identity(E));
    RoutingPlan plan;
    RouterScratch s;
    router.route(Batch::single(T, E), x.data(), plan, s);
    for (int64_t t = 0; t < T; ++t) {
      SCOPED_TRACE("variant " + std::to_string(variant) + " token " + std::to_string(t));
      const std::vector<double> L(rows[static_cast<size_t>(t)].begin(),
                                  rows[static_cast<size_t>(t)].end());
      std::vector<int64_t> ids;
      std::vector<double> w;
      if (variant == 2) {  // select on L, softmax over the chosen
        ids = topk_d(L, o.k);
        std::vector<double> picked;
        for (int64_t i : ids) picked.push_back(L[static_cast<size_t>(i)]);
        w = softmax_d(picked);
      } else {
        std::vector<double> score(L.size());
        if (variant == 1) {
          for (size_t e = 0; e < L.size(); ++e) score[e] = 1.0 / (1.0 + std::exp(-L[e]));
        } else {
          score = softmax_d(L);
        }
        ids = topk_d(score, o.k);
        for (int64_t i : ids) w.push_back(score[static_cast<size_t>(i)]);
        if (o.norm_topk_prob) {
          double sum = 0;
          for (double v : w) sum += v;
          for (double& v : w) v /= sum + 1e-20;
        }
      }
      const auto got_ids = plan.token_experts(t);
      const auto got_w = plan.token_weights(t);
      double sum = 0;
      for (int64_t j = 0; j < o.k; ++j) {
        EXPECT_EQ(got_ids[static_cast<size_t>(j)], ids[static_cast<size_t>(j)]) << "slot " << j;
        expect_weight_near(got_w[static_cast<size_t>(j)], w[static_cast<size_t>(j)]);
        sum += got_w[static_cast<size_t>(j)];
      }
      // Weights that must sum to 1: the full softmax (k = E), the topk_then_softmax weights.
      if (variant >= 2) EXPECT_NEAR(sum, 1.0, 1e-6);
    }
  }
}

TEST(NumericalSafety, SinkhornLogDomainAtPlusMinus1e4MatchesDoubleReference) {
  const int64_t E = 6, T = 5;
  const auto rows = huge_rows();
  std::vector<float> x;
  for (const auto& r : rows) x.insert(x.end(), r.begin(), r.end());
  const std::vector<float> W = identity(E);
  int checked = 0;
  for (int mode = 0; mode < 4; ++mode) {
    SinkhornOptions o = sinkhorn_options(E, mode < 2 ? 1 : 2, E);
    o.weight_mode =
        mode % 2 == 0 ? SinkhornWeightMode::selection_only : SinkhornWeightMode::transport;
    o.max_iters = 30;
    o.tolerance = 0.0;  // a fixed number of iterations, as the reference
    const SinkhornRouter router(o, W);
    RoutingPlan plan;
    RouterScratch s;
    router.route(Batch::single(T, E), x.data(), plan, s);
    sinkhorn_ref::Params p;
    p.num_experts = E;
    p.k = o.k;
    p.hidden = E;
    p.max_iters = o.max_iters;
    p.tolerance = 0.0;
    p.cost = o.effective_cost() == SinkhornCost::probs ? sinkhorn_ref::Cost::probs
                                                       : sinkhorn_ref::Cost::logits;
    p.temperature = o.effective_temperature();
    p.weight_mode = mode % 2 == 0 ? sinkhorn_ref::WeightMode::selection_only
                                  : sinkhorn_ref::WeightMode::transport;
    const sinkhorn_ref::Result ref = sinkhorn_ref::route(p, W.data(), x.data(), T);
    EXPECT_EQ(s.iterations, ref.iterations);
    for (int64_t t = 0; t < T; ++t) {
      SCOPED_TRACE("mode " + std::to_string(mode) + " token " + std::to_string(t));
      for (int64_t e = 0; e < E; ++e)
        EXPECT_TRUE(std::isfinite(s.values[static_cast<size_t>(t * E + e)]));
      // Decisions are compared where the reference's deciding plan entries are well apart.
      if (!(ref.boundary_gap[static_cast<size_t>(t)] > 1e-3)) continue;
      ++checked;
      for (int64_t j = 0; j < o.k; ++j) {
        EXPECT_EQ(plan.token_experts(t)[static_cast<size_t>(j)],
                  ref.experts_of[static_cast<size_t>(t)][static_cast<size_t>(j)]);
        const double want = ref.weights_of[static_cast<size_t>(t)][static_cast<size_t>(j)];
        const double got = plan.token_weights(t)[static_cast<size_t>(j)];
        EXPECT_TRUE(std::isfinite(got));
        EXPECT_NEAR(got, want, 1e-4 * std::abs(want) + 1e-6);
      }
      if (o.weight_mode == SinkhornWeightMode::transport) {
        double sum = 0;
        for (int64_t j = 0; j < o.k; ++j) sum += plan.token_weights(t)[static_cast<size_t>(j)];
        EXPECT_NEAR(sum, 1.0, 1e-6);
      }
    }
  }
  EXPECT_GT(checked, 10);  // not vacuous
}

TEST(NumericalSafety, ExpertChoiceScoresAtPlusMinus1e4) {
  const int64_t E = 6;
  const auto rows = huge_rows();
  const int64_t T = static_cast<int64_t>(rows.size());
  std::vector<float> x;
  for (const auto& r : rows) x.insert(x.end(), r.begin(), r.end());
  ExpertChoiceOptions o = ec_options(E, E);
  o.capacity_factor = 2.0;  // kc = floor(5 * 2 / 6) = 1
  const ExpertChoiceRouter router(o, identity(E));
  RoutingPlan plan;
  RouterScratch s;
  router.route(Batch::single(T, E), x.data(), plan, s);
  std::vector<std::vector<double>> S;
  for (const auto& r : rows) S.push_back(softmax_d(std::vector<double>(r.begin(), r.end())));
  for (int64_t e = 0; e < E; ++e) {
    // The expert's pick: the token with the largest S[:, e], ties to the lower token.
    int64_t best = 0;
    for (int64_t t = 1; t < T; ++t)
      if (S[static_cast<size_t>(t)][static_cast<size_t>(e)] >
          S[static_cast<size_t>(best)][static_cast<size_t>(e)])
        best = t;
    ASSERT_EQ(plan.kept_of(e), 1);
    const int32_t slot =
        plan.expert_slots()[static_cast<size_t>(plan.expert_offsets()[static_cast<size_t>(e)])];
    EXPECT_EQ(plan.slot_token()[static_cast<size_t>(slot)], best) << "expert " << e;
    expect_weight_near(plan.slot_weight()[static_cast<size_t>(slot)],
                       S[static_cast<size_t>(best)][static_cast<size_t>(e)]);
  }
}

TEST(NumericalSafety, GruSaturatedGatesStayFinite) {
  // Huge projections saturate every gate: sigmoid -> 0 / 1, tanh -> +-1, exactly as in double.
  const int64_t d = 2, dr = 2, E = 3;
  const CellWeights c = cell_weights(3, dr);
  const auto cell =
      std::make_shared<const GruCell>(GruVariant::gru, dr, c.wih, c.whh, c.bih, c.bhh);
  const std::vector<float> proj = {1e4f, 0, 0, -1e4f};
  const std::vector<float> out = {1e4f, 0, 0, 1e4f, -1e4f, -1e4f};  // logits up to +-1e4
  const GruRouter router(gru_options(E, 2, d, dr), cell, proj, out);
  const std::vector<float> x = {1, 1, -1, -1, 1, -1};
  RoutingPlan plan;
  RouterScratch s;
  router.route(Batch::single(3, d), x.data(), plan, s);
  for (float v : s.state) {
    EXPECT_TRUE(std::isfinite(v));
    EXPECT_LE(std::abs(v), 1.0f);
  }
  for (int64_t t = 0; t < 3; ++t) {
    double sum = 0;
    for (float w : plan.token_weights(t)) {
      EXPECT_TRUE(std::isfinite(w));
      sum += w;
    }
    EXPECT_NEAR(sum, 1.0, 1e-6);  // the Mixtral rule renormalises
  }
}

TEST(NumericalSafety, DepthWeightsAtPlusMinus1e4) {
  // MoD sigmoid / tanh weights, gamma-MoD's two-class softmax and MoR's g at +-1e4.
  const std::vector<float> r = {1e4f, -1e4f, 0.5f, -9999.0f};
  const int64_t T = static_cast<int64_t>(r.size());
  for (DepthActivation a : {DepthActivation::sigmoid, DepthActivation::tanh}) {
    MoDOptions o = mod_options(1);
    o.ratio = 1.0;
    o.activation = a;
    o.alpha = 0.5;
    const MoDRouter router(o, {1.0f});
    RoutingPlan plan;
    RouterScratch s;
    router.route(Batch::single(T, 1), r.data(), plan, s);
    for (int64_t t = 0; t < T; ++t) {
      const double z = r[static_cast<size_t>(t)];
      const double want =
          a == DepthActivation::sigmoid ? 1.0 / (1.0 + std::exp(-z)) : 0.5 * std::tanh(z);
      expect_weight_near(s.values[static_cast<size_t>(t)], want);
    }
  }
  GammaModOptions g;
  g.hidden = 1;
  g.ratio = 1.0;
  const GammaModRouter gamma(g, {-1.0f, 1.0f});  // margin z = 2 r
  RoutingPlan plan;
  RouterScratch s;
  gamma.route(Batch::single(T, 1), r.data(), plan, s);
  for (int64_t t = 0; t < T; ++t) {
    const double z = 2.0 * r[static_cast<size_t>(t)];
    expect_weight_near(s.values[static_cast<size_t>(t)], softmax_d({-z / 2, z / 2})[1]);
  }
  MoROptions m;
  m.hidden = 1;
  m.num_recursions = 1;
  m.alpha = 2.0;
  const MoRRouter mor(m, {1.0f});
  mor.route(Batch::single(T, 1), r.data(), plan, s);  // capacity 4: every token chosen
  for (int64_t t = 0; t < T; ++t)
    expect_weight_near(s.values[static_cast<size_t>(t)],
                       2.0 / (1.0 + std::exp(-static_cast<double>(r[static_cast<size_t>(t)]))));
}

TEST(NumericalSafety, AuxQuantitiesAtPlusMinus1e4) {
  // Every sigmoid score underflows to 0 on token 1: the normalised distribution s / sum(s)
  // is taken in the log domain and tends to softmax(L), never 0 / 0.
  const int64_t E = 6;
  const auto rows = huge_rows();
  const int64_t T = static_cast<int64_t>(rows.size());
  std::vector<float> x;
  for (const auto& r : rows) x.insert(x.end(), r.begin(), r.end());
  for (ScoreFunc sf : {ScoreFunc::softmax, ScoreFunc::sigmoid}) {
    TopKOptions o = topk_options(E, 2, E);
    o.score_func = sf;
    const TopKRouter router(o, identity(E));
    RoutingPlan plan;
    RouterScratch s;
    const Batch b = Batch::single(T, E);
    router.route(b, x.data(), plan, s);
    // Double reference: p = softmax(L) or softmax(log sigmoid(L)) (= s / sum s), in double.
    std::vector<double> f(static_cast<size_t>(E), 0.0), P(static_cast<size_t>(E), 0.0);
    double z = 0, entropy = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> l(rows[static_cast<size_t>(t)].begin(),
                            rows[static_cast<size_t>(t)].end());
      const double m = *std::max_element(l.begin(), l.end());
      double se = 0;
      for (double v : l) se += std::exp(v - m);
      z += (m + std::log(se)) * (m + std::log(se));
      if (sf == ScoreFunc::sigmoid)
        for (double& v : l) v = -(std::max(-v, 0.0) + std::log1p(std::exp(-std::abs(v))));
      const std::vector<double> p = softmax_d(l);
      for (int64_t e = 0; e < E; ++e) {
        P[static_cast<size_t>(e)] += p[static_cast<size_t>(e)] / static_cast<double>(T);
        if (p[static_cast<size_t>(e)] > 0)
          entropy -= p[static_cast<size_t>(e)] * std::log(p[static_cast<size_t>(e)]) /
                     static_cast<double>(T);
      }
      for (int32_t e : plan.token_experts(t))
        f[static_cast<size_t>(e)] += 1.0 / static_cast<double>(2 * T);
    }
    double lb = 0;
    for (int64_t e = 0; e < E; ++e) lb += f[static_cast<size_t>(e)] * P[static_cast<size_t>(e)];
    lb *= static_cast<double>(E);
    const double got = load_balancing_loss(plan, s.logits, b, sf);
    EXPECT_TRUE(std::isfinite(got));
    EXPECT_NEAR(got, lb, 1e-9 * lb + 1e-12);
    const RoutingStats st = routing_stats(plan, s.logits, b, sf);
    EXPECT_TRUE(std::isfinite(st.entropy));
    EXPECT_NEAR(st.entropy, entropy, 1e-9 * entropy + 1e-12);
    const double zl = router_z_loss(s.logits, E, b);
    EXPECT_NEAR(zl, z / static_cast<double>(T), 1e-9 * z);
  }
}

TEST(NumericalSafety, ProMoESmallTemperatureAndAttentionHugeScores) {
  // tau_r at the smallest normal float: s / tau_r ~ 1e38, the softmax stays max-subtracted.
  ProMoEOptions o = promoe_options(3, 2, 2);
  o.tau_r = std::numeric_limits<float>::min();
  const ProMoERouter r(o, {1, 0, 0, 1, -1, 0});
  const std::vector<float> x = {1, 0.5f, -1, 0.25f};
  RoutingPlan plan;
  RouterScratch s;
  r.route(Batch::single(2, 2), x.data(), plan, s);
  for (float w : plan.slot_weight()) EXPECT_TRUE(std::isfinite(w));
  EXPECT_EQ(plan.token_experts(0)[0], 0);
  EXPECT_EQ(plan.token_weights(0)[0], 1.0f);  // the top cosine takes all the mass
  EXPECT_EQ(plan.token_experts(1)[0], 2);
  EXPECT_EQ(plan.token_weights(1)[0], 1.0f);
  // Attention scores of ~1e4 / sqrt(d): the max-subtracted softmax picks the larger key.
  const int64_t d = 2;
  const std::vector<float> id = {1, 0, 0, 1}, big = {100, 0, 0, 100};
  const CausalAttentionBlock attn(d, big, big, id, id);
  const std::vector<float> in = {1, 0, 1, 0.1f};
  std::vector<float> y(4), scratch(attn.scratch_floats(2));
  attn(in.data(), 2, y.data(), scratch.data());
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
  // Row 1 attends rows 0 and 1 with scores 1e4 / sqrt(2) and (1e4 + 100) / sqrt(2): row 1 wins.
  EXPECT_NEAR(y[2], 1.0f, 1e-6f);
  EXPECT_NEAR(y[3], 0.1f, 1e-6f);
}

}  // namespace
