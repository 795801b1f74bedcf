// SPDX-License-Identifier: Apache-2.0
// Logit steering and test-time re-routing (routers/steering.hpp): a steering vector changes
// selection and weights exactly as a gate row of an extra constant input would (checked
// against the double-precision top-k reference with that augmented gate), and the chain
// dLoss/dy -> slot_weight_gradient -> logit_gradient -> steering_gradient equals central
// finite differences of a plain double-precision forward (the plan's experts held fixed) for
// every weight form; an SGD step lowers the loss; argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/dynamic_k.hpp"
#include "moekit/routers/steering.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"
#include "support/topk_params.hpp"

namespace {

using moekit::Batch;
using moekit::RoutingPlan;
using moekit::ScoreFunc;
using moekit::TopKOptions;
using moekit::TopKRouter;
using moekit::Workspace;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

TEST(Steering, TopKEqualsAnAugmentedGateInTheReference) {
  Rng rng(7);
  int64_t compared = 0;
  for (int i = 0; i < 120; ++i) {
    TopKOptions o;
    o.num_experts = rng.integer(2, 24);
    o.k = rng.integer(1, std::min<int64_t>(o.num_experts, 4));
    o.hidden = rng.integer(1, 24);
    o.score_func = rng.coin(0.5) ? ScoreFunc::softmax : ScoreFunc::sigmoid;
    o.topk_then_softmax = o.score_func == ScoreFunc::softmax && rng.coin(0.3);
    o.norm_topk_prob = !o.topk_then_softmax && rng.coin(0.5);
    o.routed_scaling_factor = rng.coin(0.5) ? 1.0f : 2.5f;
    const int64_t E = o.num_experts, d = o.hidden, T = rng.integer(1, 40);
    const std::vector<float> W = rng.vec(static_cast<size_t>(E * d), 1.0), x = rng.vec(static_cast<size_t>(T * d), 1.0);
    const std::vector<float> delta = rng.vec(static_cast<size_t>(E), 2.0);
    TopKRouter router(o, W);
    router.set_logit_steering(delta);
    RoutingPlan plan;
    moekit::RouterScratch s;
    router.route(Batch::single(T, d), x.data(), plan, s, 1);
    // The reference with gate [W | delta] on inputs [x | 1]: logits W x + delta, in double.
    std::vector<float> Wa(static_cast<size_t>(E * (d + 1))), xa(static_cast<size_t>(T * (d + 1)));
    for (int64_t e = 0; e < E; ++e) {
      std::copy(W.begin() + e * d, W.begin() + (e + 1) * d, Wa.begin() + e * (d + 1));
      Wa[static_cast<size_t>(e * (d + 1) + d)] = delta[static_cast<size_t>(e)];
    }
    for (int64_t t = 0; t < T; ++t) {
      std::copy(x.begin() + t * d, x.begin() + (t + 1) * d, xa.begin() + t * (d + 1));
      xa[static_cast<size_t>(t * (d + 1) + d)] = 1.0f;
    }
    ref::TopKParams p = moekit_test::to_ref(o, {});
    p.hidden = d + 1;
    const ref::Routing want = ref::route_topk(p, Wa.data(), xa.data(), T);
    const ref::CompareReport rep = ref::compare_routing(want, ref::view_of(plan));
    EXPECT_TRUE(rep.errors.empty()) << "case " << i << join(rep.errors);
    compared += rep.compared;
    // Steering off again: the plan of the plain gate.
    router.set_logit_steering({});
    RoutingPlan plain;
    router.route(Batch::single(T, d), x.data(), plain, s, 1);
    const ref::Routing want0 = ref::route_topk(moekit_test::to_ref(o, {}), W.data(), x.data(), T);
    EXPECT_TRUE(ref::compare_routing(want0, ref::view_of(plain)).errors.empty()) << "case " << i;
  }
  EXPECT_GT(compared, 1000);
}

// ------------------------------------------------------------ gradients vs finite differences

enum class Form { softmax, softmax_renorm, topk_then_softmax, sigmoid, sigmoid_renorm, dynamic, dynamic_renorm };

struct GradCase {
  Form form;
  int64_t E, k, d, f, T;
  double scale;
  std::vector<float> W, x, g, delta;
  std::vector<ref::Ffn> experts;
  std::vector<uint8_t> pad;     // padded tokens (no slot)
  double capacity_factor = 0;   // top-k forms: dropped slots keep counting in a renormalisation
  [[nodiscard]] Batch batch() const {
    Batch b = Batch::single(T, d);
    if (!pad.empty()) b.padding = pad;
    return b;
  }
};

// The plain forward loss sum_t <g_t, y_t> in double for steering `delta`, with each token's
// slots (experts, kept flags) held fixed: the weights by the form's formula.
double loss_of(const GradCase& c, const std::vector<double>& delta, const RoutingPlan& plan) {
  const int64_t E = c.E, d = c.d;
  double loss = 0.0;
  for (int64_t t = 0; t < c.T; ++t) {
    std::vector<double> L(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      double z = delta[static_cast<size_t>(e)];
      for (int64_t i = 0; i < d; ++i) z += double(c.W[static_cast<size_t>(e * d + i)]) * c.x[static_cast<size_t>(t * d + i)];
      L[static_cast<size_t>(e)] = z;
    }
    const int32_t b = plan.slot_offsets()[static_cast<size_t>(t)], n = plan.slot_offsets()[static_cast<size_t>(t) + 1] - b;
    std::vector<int64_t> ids;
    for (int32_t j = 0; j < n; ++j) ids.push_back(plan.slot_expert()[static_cast<size_t>(b + j)]);
    std::vector<double> w(static_cast<size_t>(n));
    const bool sig = c.form == Form::sigmoid || c.form == Form::sigmoid_renorm;
    const bool over_chosen = c.form == Form::softmax_renorm || c.form == Form::topk_then_softmax ||
                             c.form == Form::dynamic_renorm || c.form == Form::sigmoid_renorm;
    if (sig) {
      for (int32_t j = 0; j < n; ++j) w[static_cast<size_t>(j)] = 1.0 / (1.0 + std::exp(-L[static_cast<size_t>(ids[j])]));
    } else {
      const std::vector<double> p = ref::softmax(L);
      for (int32_t j = 0; j < n; ++j) w[static_cast<size_t>(j)] = p[static_cast<size_t>(ids[j])];
    }
    if (over_chosen) {
      double s = 0.0;
      for (double v : w) s += v;
      for (double& v : w) v /= s;
    }
    const std::vector<double> xt(c.x.begin() + t * d, c.x.begin() + (t + 1) * d);
    for (int32_t j = 0; j < n; ++j) {
      if (plan.slot_dropped()[static_cast<size_t>(b + j)]) continue;  // weight 0, but counted in the sum above
      const std::vector<double> y = ref::ffn_forward(c.experts[static_cast<size_t>(ids[j])], xt);
      double dot = 0.0;
      for (int64_t i = 0; i < d; ++i) dot += double(c.g[static_cast<size_t>(t * d + i)]) * y[static_cast<size_t>(i)];
      loss += c.scale * w[static_cast<size_t>(j)] * dot;
    }
  }
  return loss;
}

// The library's dLoss/ddelta through the helpers, and the plan of that forward.
template <class R>
std::vector<float> library_gradient(const GradCase& c, const R& router, RoutingPlan& plan_out) {
  const moekit::SparseLayer<R, moekit::FfnBank> layer(router, test_support::bank_of(c.experts, c.d, c.f));
  Workspace ws;
  const Batch b = c.batch();
  std::vector<float> y(static_cast<size_t>(c.T * c.d));
  layer.forward(b, c.x.data(), y.data(), ws, 2);
  std::vector<float> gw(static_cast<size_t>(ws.plan.num_slots())), gl(static_cast<size_t>(c.T * c.E));
  layer.slot_weight_gradient(ws, c.g.data(), gw.data());
  moekit::logit_gradient(layer.router(), b, ws.router.logits, ws.plan, gw, gl);
  plan_out = ws.plan;
  return moekit::steering_gradient(b, gl, c.E);
}

TEST(Steering, GradientMatchesFiniteDifferences) {
  Rng rng(23);
  const Form forms[] = {Form::softmax, Form::softmax_renorm, Form::topk_then_softmax, Form::sigmoid,
                        Form::sigmoid_renorm, Form::dynamic, Form::dynamic_renorm};
  for (int i = 0; i < 70; ++i) {
    GradCase c;
    c.form = forms[i % 7];
    c.E = rng.integer(2, 10);
    c.k = rng.integer(1, c.E);
    c.d = rng.integer(3, 12);
    c.f = rng.integer(3, 10);
    c.T = rng.integer(1, 6);
    const bool dyn = c.form == Form::dynamic || c.form == Form::dynamic_renorm;
    c.scale = dyn || rng.coin(0.5) ? 1.0 : 2.5;
    c.W = rng.vec(static_cast<size_t>(c.E * c.d), 0.8);
    c.x = rng.vec(static_cast<size_t>(c.T * c.d), 1.0);
    c.g = rng.vec(static_cast<size_t>(c.T * c.d), 1.0);
    c.delta = rng.vec(static_cast<size_t>(c.E), 0.5);
    for (int64_t e = 0; e < c.E; ++e) c.experts.push_back(test_support::random_ref_ffn(rng, c.d, c.f));
    if (i % 3 == 1) {  // padding and (top-k forms) a capacity that drops slots
      c.pad.assign(static_cast<size_t>(c.T), 0);
      c.pad[0] = 1;
      if (!dyn) c.capacity_factor = 0.6;
    }
    RoutingPlan plan;
    std::vector<float> got;
    if (dyn) {
      moekit::DynamicKOptions o;
      o.num_experts = c.E;
      o.hidden = c.d;
      o.top_p = rng.uniform(0.3, 0.9);
      o.norm_topk_prob = c.form == Form::dynamic_renorm;
      moekit::DynamicKRouter r(o, c.W);
      r.set_logit_steering(c.delta);
      got = library_gradient(c, r, plan);
    } else {
      TopKOptions o;
      o.num_experts = c.E;
      o.k = c.k;
      o.hidden = c.d;
      o.score_func = c.form == Form::sigmoid || c.form == Form::sigmoid_renorm ? ScoreFunc::sigmoid : ScoreFunc::softmax;
      o.norm_topk_prob = c.form == Form::softmax_renorm || c.form == Form::sigmoid_renorm;
      o.topk_then_softmax = c.form == Form::topk_then_softmax;
      o.routed_scaling_factor = static_cast<float>(c.scale);
      o.capacity_factor = c.capacity_factor;
      TopKRouter r(o, c.W);
      r.set_logit_steering(c.delta);
      got = library_gradient(c, r, plan);
    }
    ASSERT_EQ(static_cast<int64_t>(got.size()), c.E);
    const std::vector<double> d0(c.delta.begin(), c.delta.end());
    double mx = 0.0;
    std::vector<double> fd(static_cast<size_t>(c.E));
    for (int64_t e = 0; e < c.E; ++e) {
      const double h = 1e-5;
      std::vector<double> up = d0, dn = d0;
      up[static_cast<size_t>(e)] += h;
      dn[static_cast<size_t>(e)] -= h;
      fd[static_cast<size_t>(e)] = (loss_of(c, up, plan) - loss_of(c, dn, plan)) / (2 * h);
      mx = std::max(mx, std::fabs(fd[static_cast<size_t>(e)]));
    }
    for (int64_t e = 0; e < c.E; ++e)
      EXPECT_NEAR(got[static_cast<size_t>(e)], fd[static_cast<size_t>(e)], 1e-3 * mx + 1e-6)
          << "case " << i << " form " << static_cast<int>(c.form) << " expert " << e;
    // The gradient sums to 0 for softmax forms (shifting every logit changes nothing).
    if (c.form != Form::sigmoid && c.form != Form::sigmoid_renorm) {
      double s = 0.0;
      for (float v : got) s += v;
      EXPECT_NEAR(s, 0.0, 1e-4 * (mx + 1e-3)) << "case " << i;
    }
  }
}

TEST(Steering, SgdStepLowersTheLoss) {
  // With a small learning rate one step along -grad lowers a smooth loss (experts held fixed).
  Rng rng(5);
  int lowered = 0, cases = 0;
  for (int i = 0; i < 20; ++i) {
    GradCase c;
    c.form = Form::softmax_renorm;
    c.E = 8, c.k = 2, c.d = 8, c.f = 6, c.T = 4, c.scale = 1.0;
    c.W = rng.vec(64, 0.8), c.x = rng.vec(32, 1.0), c.g = rng.vec(32, 1.0), c.delta = {};
    for (int64_t e = 0; e < c.E; ++e) c.experts.push_back(test_support::random_ref_ffn(rng, c.d, c.f));
    TopKOptions o{8, 2, 8};
    o.norm_topk_prob = true;
    RoutingPlan plan;
    const std::vector<float> grad = library_gradient(c, TopKRouter(o, c.W), plan);
    double gn = 0.0;
    for (float v : grad) gn += double(v) * v;
    if (gn < 1e-12) continue;
    std::vector<float> delta;
    moekit::steering_sgd_step(delta, grad, 1e-3);
    const std::vector<double> d0(8, 0.0), d1(delta.begin(), delta.end());
    ++cases;
    lowered += loss_of(c, d1, plan) < loss_of(c, d0, plan);
  }
  EXPECT_EQ(lowered, cases);
  EXPECT_GT(cases, 10);
}

TEST(Steering, UncertaintyScoreAndErrors) {
  // C = mean_t -(1/n) sum log p over the chosen: two tokens, E = 2, logits (0, 0) and (ln 3, 0).
  const std::vector<float> W = {1.0f, 0.0f}, x = {0.0f, std::log(3.0f)};
  TopKRouter r(TopKOptions{2, 1, 1}, W);
  RoutingPlan plan;
  moekit::RouterScratch s;
  r.route(Batch::single(2, 1), x.data(), plan, s, 1);
  const double want = 0.5 * (-std::log(0.5) - std::log(0.75));
  EXPECT_NEAR(moekit::routing_uncertainty(Batch::single(2, 1), s.logits, plan), want, 1e-7);

  std::vector<float> gw(2), gl(4);
  expect_error([&] { moekit::logit_gradient(r, Batch::single(2, 1), s.logits, plan, std::vector<float>(3), gl); },
               {"grad_weight expected [2] (one per slot)", "got 3"});
  expect_error([&] { moekit::logit_gradient(r, Batch::single(3, 1), s.logits, plan, gw, gl); },
               {"expected the finalised plan of this batch (3 tokens)"});
  expect_error([&] { (void)moekit::steering_gradient(Batch::single(2, 1), std::vector<float>(3), 2); },
               {"steering_gradient: grad_logits expected [2, 2]", "got 3"});
  std::vector<float> delta = {1.0f, 2.0f};
  expect_error([&] { moekit::steering_sgd_step(delta, std::vector<float>(3), 0.1); }, {"grad expected [2]", "got 3"});
  expect_error([&] { moekit::steering_sgd_step(delta, std::vector<float>(2, 1e30f), 1e10); }, {"delta[0] would become"});
  expect_error([&] { moekit::steering_sgd_step(delta, std::vector<float>(2), std::nan("")); },
               {"learning_rate expected finite"});
  expect_error([&] { r.set_logit_steering({1.0f, std::nanf("")}); }, {"logit steering[1] expected finite", "got nan"});
  TopKOptions sm{4, 2, 1};
  sm.sparsemixer_eps = 0.01;
  expect_error(
      [&] { moekit::logit_gradient(TopKRouter(sm, std::vector<float>(4, 1.0f)), Batch::single(2, 1), s.logits, plan, gw, gl); },
      {"logit_gradient expected no sparsemixer_eps"});
  // A layer whose weight multiplies the expert input has no slot-weight gradient defined here.
  std::vector<ref::Ffn> ex;
  Rng rng(1);
  for (int e = 0; e < 2; ++e) ex.push_back(test_support::random_ref_ffn(rng, 1, 2));
  moekit::SparseLayer<TopKRouter, moekit::FfnBank> layer(r, test_support::bank_of(ex, 1, 2));
  layer.set_weight_on_input(true);
  Workspace ws;
  std::vector<float> y(2);
  layer.forward(Batch::single(2, 1), x.data(), y.data(), ws, 1);
  expect_error([&] { layer.slot_weight_gradient(ws, y.data(), gw.data()); }, {"expected the routing weight on the expert output"});
}

}  // namespace
