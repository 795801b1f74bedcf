// SPDX-License-Identifier: Apache-2.0
// Product-key routing (routers/product_key.hpp) against the double-precision brute force over
// all n^2 experts (tests/reference/product_key_ref), on random n, k (k above n included), d,
// split queries and padding; thread determinism; the atomic-expert layer against the
// reference forward; argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/layer.hpp"
#include "moekit/routers/product_key.hpp"
#include "reference/product_key_ref.hpp"
#include "reference/reference.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::ProductKeyOptions;
using moekit::ProductKeyRouter;
using moekit::RoutingPlan;
using test_support::expect_error;
using test_support::join;
using test_support::Rng;

struct Case {
  ProductKeyOptions o;
  int64_t T = 0;
  std::vector<float> kx, ky, x;
  std::vector<uint8_t> pad;
  [[nodiscard]] Batch batch() const {
    Batch b = Batch::single(T, o.hidden);
    if (!pad.empty()) b.padding = pad;
    return b;
  }
  [[nodiscard]] ref::product_key::Params params() const { return {o.num_experts, o.k, o.hidden, o.split_query}; }
};

Case random_case(Rng& rng) {
  Case c;
  const int64_t n = rng.integer(1, 24);
  c.o.num_experts = n * n;
  c.o.k = rng.integer(1, std::min<int64_t>(n * n, 20));
  c.o.split_query = rng.coin(0.5);
  c.o.hidden = 2 * rng.integer(1, 16);
  c.T = rng.integer(0, 30);
  const int64_t q = c.o.query_width();
  const double s = rng.uniform(0.2, 3.0) / std::sqrt(double(q));
  c.kx = rng.vec(static_cast<size_t>(n * q), s);
  c.ky = rng.vec(static_cast<size_t>(n * q), s);
  c.x = rng.vec(static_cast<size_t>(c.T * c.o.hidden), 1.7);
  if (rng.coin(0.3)) {
    c.pad.assign(static_cast<size_t>(c.T), 0);
    for (auto& v : c.pad) v = rng.coin(0.3);
  }
  return c;
}

TEST(ProductKey, ExactTopKEqualsBruteForce) {
  Rng rng(2407);
  int64_t compared = 0, near = 0;
  for (int i = 0; i < 200; ++i) {
    const Case c = random_case(rng);
    SCOPED_TRACE("case " + std::to_string(i) + ": E " + std::to_string(c.o.num_experts) + " k " + std::to_string(c.o.k));
    ProductKeyRouter r(c.o, c.kx, c.ky);
    RoutingPlan plan;
    moekit::RouterScratch s;
    r.route(c.batch(), c.x.data(), plan, s, 1);
    const ref::Routing want =
        ref::product_key::route(c.params(), c.kx.data(), c.ky.data(), c.x.data(), c.T, c.pad.empty() ? nullptr : c.pad.data());
    const ref::CompareReport rep = ref::compare_routing(want, ref::view_of(plan));
    EXPECT_TRUE(rep.errors.empty()) << join(rep.errors);
    const auto inv = ref::plan_invariant_errors(ref::view_of(plan), c.pad.empty() ? nullptr : c.pad.data(), c.o.k);
    EXPECT_TRUE(inv.empty()) << join(inv);
    compared += rep.compared;
    near += rep.near_tie;
  }
  EXPECT_GT(compared, 2000);
  EXPECT_LT(near, compared / 20);
}

TEST(ProductKey, ThreadsGiveIdenticalPlans) {
  Rng rng(3);
  for (int i = 0; i < 20; ++i) {
    const Case c = random_case(rng);
    ProductKeyRouter r(c.o, c.kx, c.ky);
    RoutingPlan a, b;
    moekit::RouterScratch sa, sb;
    r.route(c.batch(), c.x.data(), a, sa, 1);
    r.route(c.batch(), c.x.data(), b, sb, 2);
    EXPECT_TRUE(std::equal(a.slot_expert().begin(), a.slot_expert().end(), b.slot_expert().begin(), b.slot_expert().end()));
    EXPECT_TRUE(test_support::same_bits(a.slot_weight(), b.slot_weight()));
  }
}

TEST(ProductKey, AtomicExpertLayerMatchesReference) {
  Rng rng(11);
  for (int i = 0; i < 15; ++i) {
    const Case c = random_case(rng);
    const int64_t E = c.o.num_experts, d = c.o.hidden;
    const std::vector<float> down = rng.vec(static_cast<size_t>(E * d), 1.0 / std::sqrt(double(d))),
                             up = rng.vec(static_cast<size_t>(E * d), 1.0);
    const auto act = i % 2 ? moekit::Activation::gelu : moekit::Activation::relu;
    moekit::SparseLayer layer(ProductKeyRouter(c.o, c.kx, c.ky), moekit::AtomicExpertBank(E, d, down, up, act));
    moekit::Workspace ws;
    std::vector<float> y(static_cast<size_t>(c.T * d), 5.0f);
    layer.forward(c.batch(), c.x.data(), y.data(), ws, 2);
    // The layer's own decisions, run through the reference experts in double.
    const ref::Routing r = ref::routing_from_view(ref::view_of(ws.plan), c.pad.empty() ? nullptr : c.pad.data());
    const auto ract = act == moekit::Activation::gelu ? ref::Activation::gelu : ref::Activation::relu;
    const std::vector<double> want = ref::moe_forward(
        r, [&](int64_t e, const std::vector<double>& xv) { return ref::product_key::atomic_expert(down.data(), up.data(), d, e, ract, xv); },
        {}, c.x.data(), c.T, d);
    const auto errs = ref::compare_values(want, y.data(), d, 1e-4, 1e-5);
    EXPECT_TRUE(errs.empty()) << "case " << i << join(errs);
    EXPECT_EQ(layer.executed_flops(ws.plan, c.batch()),
              double(ws.plan.num_kept()) * 4.0 * d + double(c.batch().routed_tokens()) * 4.0 * c.o.side() * c.o.query_width());
  }
}

TEST(ProductKey, BadArguments) {
  auto opts = [](int64_t E, int64_t k, int64_t d, bool split) { return ProductKeyOptions{E, k, d, split}; };
  expect_error([&] { ProductKeyRouter(opts(8, 2, 4, false), {}, {}); }, {"num_experts (E) expected a square n^2", "got 8"});
  expect_error([&] { ProductKeyRouter(opts(9, 10, 4, false), {}, {}); }, {"k expected in [1, E = 9]", "got 10"});
  expect_error([&] { ProductKeyRouter(opts(9, 2, 3, true), {}, {}); }, {"split_query expected an even hidden size"});
  expect_error([&] { ProductKeyRouter(opts(9, 2, 4, true), std::vector<float>(5), std::vector<float>(6)); },
               {"router.keys_x expected [3, 2] = 6 values", "got 5"});
  std::vector<float> bad(12, 0.1f);
  bad[7] = std::nanf("");
  expect_error([&] { ProductKeyRouter(opts(9, 2, 4, false), std::vector<float>(12, 0.1f), bad); },
               {"router.keys_y[1, 3] expected finite"});
  expect_error([&] { moekit::AtomicExpertBank(4, 2, std::vector<float>(8), std::vector<float>(7)); },
               {"up_embed expected [4, 2] = 8 values", "got 7"});
  ProductKeyRouter r(opts(9, 2, 2, false), std::vector<float>(6, 0.1f), std::vector<float>(6, 0.1f));
  const std::vector<float> x = {1.0f, std::numeric_limits<float>::infinity()};
  RoutingPlan plan;
  moekit::RouterScratch s;
  expect_error([&] { r.route(Batch::single(1, 2), x.data(), plan, s, 1); }, {"key score of token 0", "expected finite"});
}

}  // namespace

// `moekit run`'s product_key family: the config's one-neuron plain experts are PEER's atomic
// experts read from `experts.down_embed` (u) / `experts.up_embed` (v) and the router's keys
// from `router.keys_x` / `keys_y`: the AnyLayer equals the layer built directly from the same
// tensors bit for bit, its outputs are the plan's top-k, and the output is the reference
// formula on those decisions. Configs the family cannot run are refused.
TEST(ProductKey, ConfigFamilyReadsPeerTensors) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(testing::TempDir()) / "moekit_pk_family";
  fs::remove_all(dir);
  fs::create_directories(dir);
  Rng rng(17);
  const int64_t d = 16, E = 9, k = 3, T = 7, n = 3;
  const std::string text = R"({"moekit_config_version": 1, "hidden_size": 16,
      "router": {"type": "product_key", "num_experts": 9, "k": 3},
      "experts": {"type": "gelu", "intermediate_size": 1}})";
  const std::vector<float> kx = rng.vec(n * d, 0.5), ky = rng.vec(n * d, 0.5), down = rng.vec(E * d, 0.4),
                           up = rng.vec(E * d, 1.0), x = rng.vec(T * d, 1.5);
  const std::string path = (dir / "w.safetensors").string();
  moekit::io::write_safetensors(path, {{"blk.router.keys_x", moekit::io::DType::F32, {n, d}, kx.data()},
                                       {"blk.router.keys_y", moekit::io::DType::F32, {n, d}, ky.data()},
                                       {"blk.experts.down_embed", moekit::io::DType::F32, {E, d}, down.data()},
                                       {"blk.experts.up_embed", moekit::io::DType::F32, {E, d}, up.data()}});
  const auto src = moekit::io::TensorSource::open(path);
  auto any = moekit::load_any_layer(moekit::parse_layer_config(text), src, "blk.");
  std::vector<float> y(static_cast<size_t>(T * d)), want(y.size());
  any->forward(moekit::Batch::single(T, d), x.data(), y.data(), 2);
  ProductKeyOptions o{.num_experts = E, .k = k, .hidden = d};
  moekit::SparseLayer direct(ProductKeyRouter(o, kx, ky), moekit::AtomicExpertBank(E, d, down, up, moekit::Activation::gelu));
  moekit::Workspace ws;
  direct.forward(moekit::Batch::single(T, d), x.data(), want.data(), ws, 1);
  EXPECT_TRUE(test_support::same_bits(y, want));
  const auto outs = any->outputs();
  ASSERT_EQ(outs.size(), 2u);
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<float> wts(ids.size());
  ws.plan.to_topk(k, ids.data(), wts.data());
  ASSERT_EQ(outs[0].name, "topk_ids");
  EXPECT_EQ(std::memcmp(outs[0].bytes.data(), ids.data(), outs[0].bytes.size()), 0);
  EXPECT_EQ(std::memcmp(outs[1].bytes.data(), wts.data(), outs[1].bytes.size()), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < d; ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ids[static_cast<size_t>(t * k + j)];
        double z = 0.0;
        for (int64_t c = 0; c < d; ++c) z += static_cast<double>(down[e * d + c]) * x[t * d + c];
        acc += wts[static_cast<size_t>(t * k + j)] * 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0))) * up[e * d + i];
      }
      ASSERT_NEAR(y[t * d + i], acc, 1e-5 * (1.0 + std::fabs(acc))) << t << " " << i;
    }
  auto refused = [&](const std::string& router, const std::string& experts, const std::string& needle) {
    expect_error([&] {
      (void)moekit::parse_layer_config(R"({"moekit_config_version": 1, "hidden_size": 16, "router": )" + router +
                                       R"(, "experts": )" + experts + "}");
    }, {needle});
  };
  const std::string pk = R"({"type": "product_key", "num_experts": 9, "k": 3})";
  refused(pk, R"({"type": "swiglu", "intermediate_size": 1})", "experts expected atomic");
  refused(pk, R"({"type": "gelu", "intermediate_size": 2})", "experts expected atomic");
  refused(pk, R"({"type": "gelu", "intermediate_size": 1, "dtype": "int8"})", "atomic experts are f32");
  refused(R"({"type": "product_key", "num_experts": 8, "k": 3})", R"({"type": "gelu", "intermediate_size": 1})",
          "expected a square");
  fs::remove_all(dir);
}
