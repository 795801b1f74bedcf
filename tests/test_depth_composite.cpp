// SPDX-License-Identifier: Apache-2.0
// Dr.LLM skip / execute / repeat and Mixture-of-Recursions layers (ROUTING.md section 5)
// against the double-precision reference in tests/reference/depth_composite_ref: random
// layouts with fixed seeds, the FFN and causal-attention blocks, forced and chosen actions,
// windows and tails, frozen decode decisions, hierarchical recursion, padding, thread
// determinism and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/blocks.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layers/drllm.hpp"
#include "moekit/layers/mor.hpp"
#include "reference/depth_composite_ref.hpp"
#include "support/test_helpers.hpp"

namespace {

using moekit::Batch;
using moekit::CausalAttentionBlock;
using moekit::DrLlmLayer;
using moekit::DrLlmOptions;
using moekit::DrLlmRouter;
using moekit::DrLlmWorkspace;
using moekit::FfnBank;
using moekit::FfnBlock;
using moekit::FfnShape;
using moekit::FunctorBank;
using moekit::MoRActivation;
using moekit::MoRLayer;
using moekit::MoROptions;
using moekit::MoRRouter;
using moekit::MoRWorkspace;

constexpr double kTieRel = 1e-6;     // near-tie threshold on deciding scores (ROUTING.md section 0)
constexpr double kRel = 1e-4;        // relative tolerance on outputs
constexpr double kFloorFrac = 1e-5;  // absolute floor: kFloorFrac * max |reference|

// ------------------------------------------------------------------------ helpers
using test_support::Rng;

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& m : v) s += "\n  " + m;
  return s;
}

// Hidden states and batch layout, for the library and the reference.
struct Input {
  int64_t T = 0, d = 0;
  std::vector<float> x;
  std::vector<int32_t> offsets;  // empty: one sequence
  std::vector<uint8_t> pad;      // empty: none
  std::vector<int32_t> pos;      // empty: index in the sequence
  Batch batch() const {
    Batch b = Batch::single(T, d);
    b.sequence_offsets = offsets;
    b.padding = pad;
    b.positions = pos;
    return b;
  }
  ref_dc::Layout layout() const {
    ref_dc::Layout l;
    l.tokens = T;
    l.hidden = d;
    l.offsets.assign(offsets.begin(), offsets.end());
    l.padding = pad;
    l.positions.assign(pos.begin(), pos.end());
    return l;
  }
  int64_t sequences() const {
    return offsets.empty() ? 1 : static_cast<int64_t>(offsets.size()) - 1;
  }
  int64_t seq_begin(int64_t s) const { return offsets.empty() ? 0 : offsets[s]; }
  int64_t seq_end(int64_t s) const { return offsets.empty() ? T : offsets[s + 1]; }
  bool padded(int64_t t) const { return !pad.empty() && pad[t]; }
};

// Sequences of the given lengths; each sequence's tokens get a common random offset vector
// (scale `spread`) plus unit noise, so pooled router inputs differ between sequences.
Input make_input(Rng& rng, const std::vector<int64_t>& lengths, int64_t d, double p_pad,
                 double spread = 1.0) {
  Input in;
  in.d = d;
  in.offsets.push_back(0);
  for (int64_t n : lengths) in.offsets.push_back(in.offsets.back() + static_cast<int32_t>(n));
  in.T = in.offsets.back();
  in.x.resize(static_cast<size_t>(in.T * d));
  for (size_t s = 0; s < lengths.size(); ++s) {
    const std::vector<float> base = rng.vec(static_cast<size_t>(d), spread);
    for (int64_t t = in.offsets[s]; t < in.offsets[s + 1]; ++t)
      for (int64_t c = 0; c < d; ++c)
        in.x[t * d + c] = base[c] + static_cast<float>(rng.uniform(-1, 1));
  }
  if (p_pad > 0) {
    in.pad.assign(static_cast<size_t>(in.T), 0);
    for (uint8_t& p : in.pad) p = rng.coin(p_pad);
  }
  return in;
}

std::vector<int64_t> random_lengths(Rng& rng, int64_t S, int64_t max_len) {
  std::vector<int64_t> v;
  for (int64_t s = 0; s < S; ++s) v.push_back(rng.integer(1, max_len));
  return v;
}

// ------------------------------------------------------------------------ blocks
struct Blocks {
  int64_t d = 0;
  ref_dc::FfnWeights ffn;
  ref_dc::AttentionWeights attn;
};

Blocks random_blocks(Rng& rng, int64_t d, int64_t f) {
  Blocks b;
  b.d = d;
  b.ffn.hidden = d;
  b.ffn.intermediate = f;
  b.ffn.gated = true;
  b.ffn.act = ref_dc::Act::silu;
  const double a_in = std::sqrt(3.0 / double(d)), a_out = std::sqrt(3.0 / double(f));
  b.ffn.gate = rng.vec(static_cast<size_t>(f * d), a_in);
  b.ffn.up = rng.vec(static_cast<size_t>(f * d), a_in);
  b.ffn.down = rng.vec(static_cast<size_t>(d * f), a_out);
  b.attn.hidden = d;
  for (auto* w : {&b.attn.wq, &b.attn.wk, &b.attn.wv, &b.attn.wo})
    *w = rng.vec(static_cast<size_t>(d * d), a_in);
  return b;
}

FfnBank ffn_bank(const Blocks& b) {
  FfnBank bank(1, FfnShape{b.d, b.ffn.intermediate, true, moekit::Activation::silu});
  bank.set_expert(0, b.ffn.gate.data(), b.ffn.up.data(), b.ffn.down.data());
  return bank;
}
FunctorBank<FfnBlock> ffn_functor(const Blocks& b) {
  return FunctorBank<FfnBlock>({FfnBlock(ffn_bank(b))});
}
FunctorBank<CausalAttentionBlock> attention_functor(const Blocks& b) {
  return FunctorBank<CausalAttentionBlock>(
      {CausalAttentionBlock(b.d, b.attn.wq, b.attn.wk, b.attn.wv, b.attn.wo)});
}

enum class BlockKind { ffn_bank, ffn_block, attention };
const BlockKind kKinds[] = {BlockKind::ffn_bank, BlockKind::ffn_block, BlockKind::attention};
const char* kind_name(BlockKind k) {
  return k == BlockKind::ffn_bank    ? "FfnBank"
         : k == BlockKind::ffn_block ? "FfnBlock"
                                     : "CausalAttentionBlock";
}

ref_dc::Block ref_block(const Blocks& b, BlockKind k, const Input& in) {
  return k == BlockKind::attention ? ref_dc::attention_block(b.attn, in.layout())
                                   : ref_dc::ffn_block(b.ffn);
}

// Calls fn(bank) with the library bank of kind k.
template <class Fn>
void with_bank(const Blocks& b, BlockKind k, Fn&& fn) {
  if (k == BlockKind::ffn_bank)
    fn(ffn_bank(b));
  else if (k == BlockKind::ffn_block)
    fn(ffn_functor(b));
  else
    fn(attention_functor(b));
}

bool row_is_zero(const std::vector<float>& out, int64_t t, int64_t d) {
  for (int64_t c = 0; c < d; ++c)
    if (out[static_cast<size_t>(t * d + c)] != 0.0f) return false;
  return true;
}

// Counts of compared and excluded decisions, over a whole test.
struct Tally {
  int64_t compared = 0, near_tie = 0;
  int64_t actions[3] = {0, 0, 0};
};

// ------------------------------------------------------------------------ Dr.LLM helpers
struct DrLlmSetup {
  ref_dc::DrLlmParams params;
  DrLlmRouter router() const {
    DrLlmOptions o;
    o.hidden = params.hidden;
    o.bottleneck = params.bottleneck;
    o.windows = params.windows;
    if (params.penalty) o.router_penalty = params.router_penalty;
    return DrLlmRouter(o, params.w0, params.b0, params.w2, params.b2);
  }
};

// Router weights; `logit_scale` sets the spread of the 3 logits, `bias` the Linear(128, 3) bias.
DrLlmSetup random_drllm(Rng& rng, int64_t d, std::vector<float> bias = {0, 0, 0},
                        int64_t bottleneck = 128, int64_t windows = 8, double logit_scale = 3.0) {
  DrLlmSetup s;
  ref_dc::DrLlmParams& p = s.params;
  p.hidden = d;
  p.bottleneck = bottleneck;
  p.windows = windows;
  p.w0 = rng.vec(static_cast<size_t>(bottleneck * d), 2.0 * std::sqrt(3.0 / double(d)));
  p.b0 = rng.vec(static_cast<size_t>(bottleneck), 0.5);
  p.w2 = rng.vec(static_cast<size_t>(3 * bottleneck),
                 logit_scale * std::sqrt(3.0 / double(bottleneck)));
  p.b2 = std::move(bias);
  return s;
}

// Runs the layer (prefill) and compares decisions and outputs with the reference; returns
// the library's repeats.
template <class Bank>
std::vector<int32_t> check_drllm(const DrLlmLayer<Bank>& layer, const DrLlmSetup& setup,
                                 const ref_dc::Block& block, const Input& in, int threads,
                                 Tally& tally, const std::string& what) {
  SCOPED_TRACE(what + " threads " + std::to_string(threads));
  const int64_t d = in.d, T = in.T, S = in.sequences();
  DrLlmWorkspace ws;
  std::vector<float> out(static_cast<size_t>(T * d), 7.0f);
  layer.forward(in.batch(), in.x.data(), out.data(), ws, threads);
  const ref_dc::DrLlmDecision want = ref_dc::drllm_decide(setup.params, in.x.data(), in.layout());
  EXPECT_EQ(static_cast<int64_t>(ws.repeats.size()), S);
  std::vector<int> repeats(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) {
    repeats[s] = ws.repeats[s];
    // The window-averaged logits themselves (fp32 vs double).
    for (int a = 0; a < 3; ++a)
      EXPECT_NEAR(ws.layer.router.logits[3 * s + a], want.logits[s][a],
                  1e-4 * (1.0 + std::fabs(want.logits[s][a])))
          << "sequence " << s << " logit " << a;
    if (want.windows[s] == 0) {
      EXPECT_EQ(ws.repeats[s], 0) << "empty sequence " << s;
      continue;
    }
    if (want.margin[s] < kTieRel) {
      ++tally.near_tie;
      continue;
    }
    ++tally.compared;
    ++tally.actions[want.repeats[s]];
    EXPECT_EQ(ws.repeats[s], want.repeats[s])
        << "sequence " << s << " logits " << want.logits[s][0] << " " << want.logits[s][1] << " "
        << want.logits[s][2];
  }
  // Outputs on the library's own decisions (so near-tie sequences are still checked).
  const std::vector<double> y = ref_dc::drllm_forward(repeats, block, in.x.data(), in.layout());
  const auto errs = ref_dc::compare_values(y, out.data(), d, kRel, kFloorFrac);
  EXPECT_TRUE(errs.empty()) << join(errs);
  bool executed = false;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = in.seq_begin(s); t < in.seq_end(s); ++t)
      executed = executed || (repeats[s] >= 1 && !in.padded(t));
  if (executed) {
    EXPECT_GT(ref_dc::max_abs(y), 0.0) << "vacuous comparison";
  }
  for (int64_t t = 0; t < T; ++t)
    if (in.padded(t)) {
      EXPECT_TRUE(row_is_zero(out, t, d)) << "padded token " << t;
    }
  // Plan: one slot of weight 1 for unpadded tokens of executing / repeating sequences.
  const moekit::RoutingPlan& plan = ws.layer.plan;
  EXPECT_TRUE(plan.finalized());
  EXPECT_EQ(plan.num_experts(), 1);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = in.seq_begin(s); t < in.seq_end(s); ++t) {
      const int64_t want_slots = !in.padded(t) && repeats[s] >= 1 ? 1 : 0;
      EXPECT_EQ(plan.slots_of(t), want_slots) << "token " << t;
      if (want_slots && plan.slots_of(t) == 1) {
        EXPECT_EQ(plan.slot_weight()[plan.slot_offsets()[t]], 1.0f);
      }
      EXPECT_EQ(ws.layer.router.values[t], static_cast<float>(want_slots));
    }
  return ws.repeats;
}

// ------------------------------------------------------------------------ Dr.LLM tests
TEST(DrLlm, MatchesReferenceOnRandomLayouts) {
  Tally tally;
  int64_t cases = 0;
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    Rng rng(seed);
    const int64_t d = 16 * rng.integer(1, 4);
    const Blocks blocks = random_blocks(rng, d, 2 * d);
    const DrLlmSetup setup =
        random_drllm(rng, d, {0, 0, 0}, rng.coin(0.5) ? 128 : 32, rng.coin(0.7) ? 8 : 3);
    // Short sequences (< 8 tokens), tails (lengths not a multiple of the windows), padding.
    std::vector<int64_t> lengths = random_lengths(rng, rng.integer(3, 8), 40);
    lengths.push_back(rng.integer(1, 7));
    lengths.push_back(8 * rng.integer(1, 4) + rng.integer(1, 7));
    const Input in = make_input(rng, lengths, d, seed % 2 ? 0.15 : 0.0, 1.5);
    for (BlockKind k : kKinds) {
      with_bank(blocks, k, [&](auto bank) {
        const DrLlmLayer layer(setup.router(), std::move(bank));
        const ref_dc::Block block = ref_block(blocks, k, in);
        const std::string what = "seed " + std::to_string(seed) + " " + kind_name(k);
        const std::vector<int32_t> r1 = check_drllm(layer, setup, block, in, 1, tally, what);
        Tally ignore;
        const std::vector<int32_t> r2 = check_drllm(layer, setup, block, in, 2, ignore, what);
        EXPECT_EQ(r1, r2) << "decisions depend on the thread count";
        ++cases;
      });
    }
  }
  std::printf(
      "[ drllm random ] %lld layer runs, %lld sequence decisions compared, %lld near-ties "
      "excluded; "
      "skip/execute/repeat chosen %lld/%lld/%lld\n",
      (long long)cases, (long long)tally.compared, (long long)tally.near_tie,
      (long long)tally.actions[0], (long long)tally.actions[1], (long long)tally.actions[2]);
  EXPECT_GT(tally.compared, 50);
  EXPECT_LE(tally.near_tie * 20, tally.compared + 20);
  // The MLP (no forcing bias) chose every action somewhere.
  for (int a = 0; a < 3; ++a) EXPECT_GT(tally.actions[a], 0) << "action " << a << " never chosen";
}

// The official code's router_penalty blend (continuous_router_decision): -1 always skips,
// 0.5 (the released default) always executes, 1 always repeats, -0.5 is the router alone.
TEST(DrLlm, RouterPenaltyMatchesTheOfficialBlend) {
  for (double pen : {-1.0, -0.75, -0.5, -0.2, 0.0, 0.3, 0.5, 0.8, 1.0}) {
    Tally tally;
    Rng rng(0x9E7 + static_cast<uint64_t>((pen + 1.0) * 100));
    const int64_t d = 16;
    const Blocks blocks = random_blocks(rng, d, 2 * d);
    DrLlmSetup setup = random_drllm(rng, d, {0, 0, 0}, 32, 4);
    setup.params.penalty = true;
    setup.params.router_penalty = pen;
    const Input in = make_input(rng, random_lengths(rng, 12, 30), d, 0.0, 1.5);
    with_bank(blocks, kKinds[0], [&](auto bank) {
      const DrLlmLayer layer(setup.router(), std::move(bank));
      const std::vector<int32_t> r =
          check_drllm(layer, setup, ref_block(blocks, kKinds[0], in), in, 1, tally, "penalty " + std::to_string(pen));
      for (int64_t s = 0; s < in.sequences(); ++s) {
        if (in.seq_end(s) == in.seq_begin(s)) continue;
        if (pen == -1.0) EXPECT_EQ(r[static_cast<size_t>(s)], 0);
        if (pen == 0.5) EXPECT_EQ(r[static_cast<size_t>(s)], 1);
        if (pen == 1.0) EXPECT_EQ(r[static_cast<size_t>(s)], 2);
      }
    });
    EXPECT_GT(tally.compared, 5) << "penalty " << pen;
  }
  DrLlmOptions bad;
  bad.hidden = 4;
  bad.router_penalty = 1.5;
  EXPECT_THROW(bad.validate(), moekit::error);
}

TEST(DrLlm, ForcedActionsByBias) {
  for (int action = 0; action < 3; ++action) {
    Rng rng(100 + action);
    const int64_t d = 32;
    const Blocks blocks = random_blocks(rng, d, 64);
    std::vector<float> bias{0, 0, 0};
    bias[action] = 1000.0f;  // dominates the averaged logits
    const DrLlmSetup setup = random_drllm(rng, d, bias);
    const Input in = make_input(rng, {5, 17, 1, 40, 9}, d, 0.1);
    for (BlockKind k : kKinds) {
      with_bank(blocks, k, [&](auto bank) {
        const DrLlmLayer layer(setup.router(), std::move(bank));
        Tally tally;
        const std::vector<int32_t> r = check_drllm(
            layer, setup, ref_block(blocks, k, in), in, 2, tally,
            std::string("forced action ") + std::to_string(action) + " " + kind_name(k));
        int64_t nonempty = 0;
        for (int64_t s = 0; s < in.sequences(); ++s) {
          bool any = false;
          for (int64_t t = in.seq_begin(s); t < in.seq_end(s); ++t) any = any || !in.padded(t);
          nonempty += any;
          EXPECT_EQ(r[s], any ? action : 0) << "sequence " << s;  // an all-padded sequence skips
        }
        EXPECT_GE(nonempty, 4);
        EXPECT_EQ(tally.compared, nonempty);
        // Non-vacuous: execute / repeat outputs are non-zero, skip outputs exactly zero.
        DrLlmWorkspace ws;
        std::vector<float> out(static_cast<size_t>(in.T * d));
        layer.forward(in.batch(), in.x.data(), out.data(), ws, 1);
        double m = 0;
        for (float v : out) m = std::max(m, double(std::fabs(v)));
        if (action == 0) {
          EXPECT_EQ(m, 0.0);
        } else {
          EXPECT_GT(m, 1e-3);
        }
      });
    }
  }
}

TEST(DrLlm, RepeatIsTwoApplications) {
  // repeat = x2 - x with x1 = x + f(x), x2 = x1 + f(x1); checked against execute run twice.
  Rng rng(7);
  const int64_t d = 32;
  const Blocks blocks = random_blocks(rng, d, 64);
  const Input in = make_input(rng, {12, 3}, d, 0.0);
  const DrLlmLayer layer(random_drllm(rng, d).router(), ffn_functor(blocks));
  DrLlmWorkspace ws;
  std::vector<float> once(in.x.size()), twice(in.x.size()), second(in.x.size());
  const std::vector<int32_t> one{1, 1}, two{2, 2};
  layer.forward_frozen(in.batch(), in.x.data(), one, once.data(), ws, 1);
  layer.forward_frozen(in.batch(), in.x.data(), two, twice.data(), ws, 1);
  std::vector<float> x1(in.x.size());
  for (size_t i = 0; i < x1.size(); ++i) x1[i] = in.x[i] + once[i];
  layer.forward_frozen(in.batch(), x1.data(), one, second.data(), ws, 1);
  for (size_t i = 0; i < x1.size(); ++i)
    ASSERT_NEAR(twice[i], once[i] + second[i], 1e-5 * (1 + std::fabs(twice[i])));
}

TEST(DrLlm, WindowsTailsAndShortSequences) {
  // Sequences of every length 1..20 and 64: W = min(8, T_s) windows of floor(T_s / W) tokens.
  Rng rng(11);
  const int64_t d = 24;
  const DrLlmSetup setup = random_drllm(rng, d);
  std::vector<int64_t> lengths;
  for (int64_t n = 1; n <= 20; ++n) lengths.push_back(n);
  lengths.push_back(64);
  const Input in = make_input(rng, lengths, d, 0.0);
  const DrLlmRouter router = setup.router();
  moekit::RouterScratch sa, sb;
  router.decide(in.batch(), in.x.data(), sa, 1);
  const ref_dc::DrLlmDecision want = ref_dc::drllm_decide(setup.params, in.x.data(), in.layout());
  for (size_t s = 0; s < lengths.size(); ++s) {
    EXPECT_EQ(want.windows[s], std::min<int64_t>(8, lengths[s]));
    for (int a = 0; a < 3; ++a)
      EXPECT_NEAR(sa.logits[3 * s + a], want.logits[s][a],
                  1e-4 * (1 + std::fabs(want.logits[s][a])));
  }
  // Tail tokens (beyond W * floor(T_s / W)) are not router inputs: changing them changes no logit.
  Input changed = in;
  int64_t tails = 0;
  for (size_t s = 0; s < lengths.size(); ++s) {
    const int64_t n = lengths[s], W = std::min<int64_t>(8, n), used = W * (n / W);
    for (int64_t t = in.offsets[s] + used; t < in.offsets[s + 1]; ++t, ++tails)
      for (int64_t c = 0; c < d; ++c)
        changed.x[t * d + c] = 1000.0f * static_cast<float>(c % 3) - 500.0f;
  }
  EXPECT_GT(tails, 20);
  router.decide(changed.batch(), changed.x.data(), sb, 2);
  for (size_t i = 0; i < 3 * lengths.size(); ++i)
    EXPECT_EQ(sa.logits[i], sb.logits[i]) << "logit " << i;
}

TEST(DrLlm, EmptyBatchesAndSequences) {
  Rng rng(12);
  const int64_t d = 16;
  const Blocks blocks = random_blocks(rng, d, 32);
  const DrLlmSetup setup = random_drllm(rng, d, {0, 0, 1000});
  const DrLlmLayer layer(setup.router(), attention_functor(blocks));
  DrLlmWorkspace ws;
  // T = 0: one sequence, and three empty sequences.
  for (const std::vector<int32_t>& offs :
       {std::vector<int32_t>{}, std::vector<int32_t>{0, 0, 0, 0}}) {
    Batch b = Batch::single(0, d);
    b.sequence_offsets = offs;
    EXPECT_NO_THROW(layer.forward(b, nullptr, nullptr, ws, 2));
    EXPECT_EQ(ws.repeats, std::vector<int32_t>(static_cast<size_t>(b.num_sequences()), 0));
    EXPECT_EQ(ws.layer.plan.num_tokens(), 0);
    EXPECT_NO_THROW(layer.forward_frozen(b, nullptr, ws.repeats, nullptr, ws, 1));
  }
  // An empty sequence and an all-padded one between real ones: they skip, output 0.
  Input in = make_input(rng, {6, 0, 4, 9}, d, 0.0);
  in.pad.assign(static_cast<size_t>(in.T), 0);
  for (int64_t t = in.offsets[2]; t < in.offsets[3]; ++t) in.pad[t] = 1;
  Tally tally;
  const std::vector<int32_t> r =
      check_drllm(layer, setup, ref_block(blocks, BlockKind::attention, in), in, 2, tally,
                  "empty and padded sequences");
  EXPECT_EQ(r, (std::vector<int32_t>{2, 0, 0, 2}));
}

TEST(DrLlm, FrozenDecisionsForDecode) {
  Rng rng(13);
  const int64_t d = 32;
  const Blocks blocks = random_blocks(rng, d, 64);
  const DrLlmSetup setup = random_drllm(rng, d);
  const std::vector<int64_t> lengths{10, 5, 20, 7};
  const Input prefill = make_input(rng, lengths, d, 0.0, 1.5);
  for (BlockKind k : kKinds) {
    with_bank(blocks, k, [&](auto bank) {
      SCOPED_TRACE(kind_name(k));
      const DrLlmLayer layer(setup.router(), std::move(bank));
      DrLlmWorkspace ws;
      std::vector<float> out(prefill.x.size()), frozen(prefill.x.size());
      layer.forward(prefill.batch(), prefill.x.data(), out.data(), ws, 2);
      const std::vector<int32_t> decided = ws.repeats;
      // Frozen on the prefill batch reproduces the prefill exactly.
      layer.forward_frozen(prefill.batch(), prefill.x.data(), decided, frozen.data(), ws, 2);
      EXPECT_EQ(out, frozen);
      // Decode steps: one new token per sequence at the next position, under frozen decisions.
      // A mix of actions is given explicitly too (the decisions of a prefill are whatever it
      // chose).
      for (const std::vector<int32_t>& repeats : {decided, std::vector<int32_t>{2, 0, 1, 2}}) {
        for (int step = 0; step < 3; ++step) {
          Input dec = make_input(rng, {1, 1, 1, 1}, d, 0.0, 1.5);
          dec.pos.resize(4);
          for (int s = 0; s < 4; ++s) dec.pos[s] = static_cast<int32_t>(lengths[s] + step);
          std::vector<float> y(dec.x.size(), 3.0f);
          layer.forward_frozen(dec.batch(), dec.x.data(), repeats, y.data(), ws, 1);
          EXPECT_EQ(ws.repeats, repeats);
          const std::vector<int> rep(repeats.begin(), repeats.end());
          const std::vector<double> want =
              ref_dc::drllm_forward(rep, ref_block(blocks, k, dec), dec.x.data(), dec.layout());
          EXPECT_GT(ref_dc::max_abs(want), 0.0);
          const auto errs = ref_dc::compare_values(want, y.data(), d, kRel, kFloorFrac);
          EXPECT_TRUE(errs.empty()) << join(errs);
        }
      }
    });
  }
}

TEST(DrLlm, PaddingIsIgnored) {
  Rng rng(14);
  const int64_t d = 16;
  const Blocks blocks = random_blocks(rng, d, 32);
  const DrLlmSetup setup = random_drllm(rng, d);
  Input in = make_input(rng, {13, 30, 6}, d, 0.3);
  const DrLlmLayer layer(setup.router(), attention_functor(blocks));
  DrLlmWorkspace ws;
  std::vector<float> a(in.x.size()), b(in.x.size());
  layer.forward(in.batch(), in.x.data(), a.data(), ws, 1);
  const std::vector<int32_t> ra = ws.repeats;
  for (int64_t t = 0; t < in.T; ++t)
    if (in.padded(t))
      for (int64_t c = 0; c < d; ++c) in.x[t * d + c] = 1e30f;
  layer.forward(in.batch(), in.x.data(), b.data(), ws, 2);
  EXPECT_EQ(ws.repeats, ra);
  EXPECT_EQ(a, b);
}

TEST(DrLlm, Errors) {
  Rng rng(15);
  const int64_t d = 16;
  const Blocks blocks = random_blocks(rng, d, 32);
  const DrLlmSetup setup = random_drllm(rng, d);
  const ref_dc::DrLlmParams& p = setup.params;
  const DrLlmOptions o{d, 128, 8};
  EXPECT_THROW(DrLlmRouter(DrLlmOptions{0, 128, 8}, p.w0, p.b0, p.w2, p.b2), moekit::error);
  EXPECT_THROW(DrLlmRouter(DrLlmOptions{d, 128, 0}, p.w0, p.b0, p.w2, p.b2), moekit::error);
  EXPECT_THROW(DrLlmRouter(DrLlmOptions{d, 64, 8}, p.w0, p.b0, p.w2, p.b2), moekit::error);
  EXPECT_THROW(DrLlmRouter(o, p.w0, p.b0, p.w2, {0, 0}), moekit::error);
  std::vector<float> bad = p.w2;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(DrLlmRouter(o, p.w0, p.b0, bad, p.b2), moekit::error);
  try {
    DrLlmRouter(o, std::vector<float>(10), p.b0, p.w2, p.b2);
    ADD_FAILURE() << "no throw";
  } catch (const moekit::error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("router.0.weight"), std::string::npos) << m;
    EXPECT_NE(m.find("10"), std::string::npos) << m;
  }

  const DrLlmLayer layer(setup.router(), ffn_functor(blocks));
  Input in = make_input(rng, {9, 4}, d, 0.0);
  DrLlmWorkspace ws;
  std::vector<float> out(in.x.size());
  in.x[3 * d + 2] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(layer.forward(in.batch(), in.x.data(), out.data(), ws, 2), moekit::error);
  in.x[3 * d + 2] = std::numeric_limits<float>::quiet_NaN();
  try {
    layer.forward(in.batch(), in.x.data(), out.data(), ws, 1);
    ADD_FAILURE() << "no throw";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("sequence 0"), std::string::npos) << e.what();
  }
  in.x[3 * d + 2] = 0.5f;
  EXPECT_THROW(
      layer.forward_frozen(in.batch(), in.x.data(), std::vector<int32_t>{1}, out.data(), ws),
      moekit::error);
  EXPECT_THROW(
      layer.forward_frozen(in.batch(), in.x.data(), std::vector<int32_t>{1, 3}, out.data(), ws),
      moekit::error);
  EXPECT_THROW(
      layer.forward_frozen(in.batch(), in.x.data(), std::vector<int32_t>{-1, 0}, out.data(), ws),
      moekit::error);
  Batch wrong = in.batch();
  wrong.hidden = d + 1;
  EXPECT_THROW(layer.forward(wrong, in.x.data(), out.data(), ws), moekit::error);
  // A two-expert bank is not one block.
  EXPECT_THROW((DrLlmLayer<FunctorBank<FfnBlock>>(
                   setup.router(), FunctorBank<FfnBlock>(
                                       {FfnBlock(ffn_bank(blocks)), FfnBlock(ffn_bank(blocks))}))),
               moekit::error);
}

TEST(DrLlm, LargeBatchThreadedRouter) {
  // Big enough for decide() to split windows over threads (DrLlmRouter::kParallelWork).
  Rng rng(16);
  const int64_t d = 512;
  const Blocks blocks = random_blocks(rng, d, 48);
  const DrLlmSetup setup = random_drllm(rng, d, {0, 0, 0}, 128, 8, 6.0);
  const Input in = make_input(rng, {150, 7, 201, 64, 180}, d, 0.05, 1.5);
  ASSERT_GE(in.T * d, DrLlmRouter::kParallelWork);
  const DrLlmLayer layer(setup.router(), ffn_bank(blocks));
  Tally tally;
  const std::vector<int32_t> r1 =
      check_drllm(layer, setup, ref_block(blocks, BlockKind::ffn_bank, in), in, 1, tally, "large");
  const std::vector<int32_t> r2 =
      check_drllm(layer, setup, ref_block(blocks, BlockKind::ffn_bank, in), in, 2, tally, "large");
  EXPECT_EQ(r1, r2);
  EXPECT_GE(tally.compared, 8);
}

// ------------------------------------------------------------------------ MoR helpers
struct MoRSetup {
  ref_dc::MoRParams params;
  MoRRouter router() const {
    MoROptions o;
    o.hidden = params.hidden;
    o.num_recursions = params.num_recursions;
    o.act = params.act == ref_dc::MoRAct::sigmoid ? MoRActivation::sigmoid
            : params.act == ref_dc::MoRAct::tanh  ? MoRActivation::tanh
                                                  : MoRActivation::raw;
    o.alpha = params.alpha;
    o.capacity_factors = params.capacity_factors;
    o.block_residual = params.block_residual;
    return MoRRouter(o, params.theta);
  }
};

MoRSetup random_mor(Rng& rng, int64_t d, int64_t N, ref_dc::MoRAct act = ref_dc::MoRAct::sigmoid,
                    double alpha = 1.0, std::vector<double> cf = {}) {
  MoRSetup s;
  s.params.hidden = d;
  s.params.num_recursions = N;
  s.params.act = act;
  s.params.alpha = alpha;
  s.params.capacity_factors = std::move(cf);
  s.params.theta = rng.vec(static_cast<size_t>(N * d), std::sqrt(3.0 / double(d)));
  return s;
}

// Runs the layer and compares chosen sets (per sequence, unless a near-tie occurred in it),
// depth, router weights and outputs (on the library's own decisions) with the reference.
template <class Bank>
MoRWorkspace check_mor(const MoRLayer<Bank>& layer, const MoRSetup& setup,
                       const ref_dc::Block& block, const Input& in, int threads, Tally& tally,
                       const std::string& what) {
  SCOPED_TRACE(what + " threads " + std::to_string(threads));
  const int64_t d = in.d, T = in.T, S = in.sequences(), N = setup.params.num_recursions;
  MoRWorkspace ws;
  std::vector<float> out(static_cast<size_t>(T * d), 7.0f);
  layer.forward(in.batch(), in.x.data(), out.data(), ws, threads);
  const ref_dc::MoRResult want = ref_dc::mor_forward(setup.params, block, in.x.data(), in.layout());
  EXPECT_EQ(static_cast<int64_t>(ws.depth.size()), T);
  for (int64_t s = 0; s < S; ++s) {
    if (want.sequence_gap[s] < kTieRel) {
      ++tally.near_tie;
      continue;
    }
    ++tally.compared;
    for (int64_t t = in.seq_begin(s); t < in.seq_end(s); ++t) {
      EXPECT_EQ(ws.depth[t], want.depth[t]) << "token " << t << " of sequence " << s;
      EXPECT_NEAR(ws.router_weights[t], want.router_weights[t],
                  1e-4 * (1 + std::fabs(want.router_weights[t])))
          << "token " << t;
    }
  }
  // Outputs on the library's decisions: chosen at recursion r = depth > r (hierarchical).
  std::vector<std::vector<uint8_t>> forced(static_cast<size_t>(N),
                                           std::vector<uint8_t>(static_cast<size_t>(T), 0));
  for (int64_t r = 0; r < N; ++r)
    for (int64_t t = 0; t < T; ++t) forced[r][t] = ws.depth[t] > r;
  const ref_dc::MoRResult lib =
      ref_dc::mor_forward(setup.params, block, in.x.data(), in.layout(), &forced);
  EXPECT_EQ(lib.depth, std::vector<int>(ws.depth.begin(), ws.depth.end()));
  if (T > 0) {
    EXPECT_GT(ref_dc::max_abs(lib.out), 0.0) << "vacuous comparison";
  }
  const auto errs = ref_dc::compare_values(lib.out, out.data(), d, kRel, kFloorFrac);
  EXPECT_TRUE(errs.empty()) << join(errs);
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_NEAR(ws.router_weights[t], lib.router_weights[t],
                1e-4 * (1 + std::fabs(lib.router_weights[t])));
    if (in.padded(t)) {
      EXPECT_EQ(ws.depth[t], 0);
      EXPECT_EQ(ws.router_weights[t], 0.0f);
      EXPECT_TRUE(row_is_zero(out, t, d)) << "padded token " << t;
    }
  }
  // Per sequence and recursion, the chosen count is min(capacity, chosen at r - 1).
  const MoROptions& o = layer.router().options();
  for (int64_t s = 0; s < S; ++s) {
    int64_t length = 0;
    for (int64_t t = in.seq_begin(s); t < in.seq_end(s); ++t) length += !in.padded(t);
    int64_t prev = length;
    for (int64_t r = 0; r < N; ++r) {
      int64_t n = 0;
      for (int64_t t = in.seq_begin(s); t < in.seq_end(s); ++t) n += ws.depth[t] > r;
      EXPECT_EQ(n, std::min(o.capacity(r, length), prev)) << "sequence " << s << " recursion " << r;
      prev = n;
    }
  }
  return ws;
}

// ------------------------------------------------------------------------ MoR tests
TEST(MoR, MatchesReferenceOnRandomLayouts) {
  Tally tally;
  int64_t cases = 0;
  for (uint64_t seed = 1; seed <= 9; ++seed) {
    Rng rng(1000 + seed);
    const int64_t d = 16 * rng.integer(1, 3);
    const int64_t N = 1 + static_cast<int64_t>(seed % 3);  // 1, 2, 3
    const Blocks blocks = random_blocks(rng, d, 2 * d);
    const ref_dc::MoRAct act = seed % 4 == 0   ? ref_dc::MoRAct::tanh
                               : seed % 4 == 1 ? ref_dc::MoRAct::raw
                                               : ref_dc::MoRAct::sigmoid;
    std::vector<double> cf;
    if (seed % 3 == 2)
      for (int64_t r = 0; r < N; ++r) cf.push_back(rng.uniform(0.2, 1.0));
    MoRSetup setup = random_mor(rng, d, N, act, seed % 5 == 0 ? 0.5 : 1.0, cf);
    setup.params.block_residual = seed % 2 == 0;  // both combines
    std::vector<int64_t> lengths = random_lengths(rng, rng.integer(1, 6), 48);
    lengths.push_back(1);
    const Input in = make_input(rng, lengths, d, seed % 2 ? 0.2 : 0.0);
    for (BlockKind k : kKinds) {
      with_bank(blocks, k, [&](auto bank) {
        const MoRLayer layer(setup.router(), std::move(bank));
        const ref_dc::Block block = ref_block(blocks, k, in);
        const std::string what =
            "seed " + std::to_string(seed) + " N_r " + std::to_string(N) + " " + kind_name(k);
        const MoRWorkspace w1 = check_mor(layer, setup, block, in, 1, tally, what);
        Tally ignore;
        const MoRWorkspace w2 = check_mor(layer, setup, block, in, 2, ignore, what);
        EXPECT_EQ(w1.depth, w2.depth) << "decisions depend on the thread count";
        EXPECT_EQ(w1.router_weights, w2.router_weights);
        ++cases;
      });
    }
  }
  std::printf(
      "[ mor random ] %lld layer runs, %lld sequences compared exactly, %lld excluded for "
      "near-ties\n",
      (long long)cases, (long long)tally.compared, (long long)tally.near_tie);
  EXPECT_GT(tally.compared, 50);
  EXPECT_LE(tally.near_tie * 20, tally.compared + 20);
}

TEST(MoR, LargeBatchThreadedRouter) {
  // Big enough for route_step() to split tokens and sequences over threads (kParallelWork).
  Rng rng(26);
  const int64_t d = 512;
  const Blocks blocks = random_blocks(rng, d, 48);
  const MoRSetup setup = random_mor(rng, d, 3);
  const Input in = make_input(rng, {150, 7, 201, 64, 180}, d, 0.05);
  ASSERT_GE(in.T * d, MoRRouter::kParallelWork);
  const MoRLayer layer(setup.router(), ffn_bank(blocks));
  Tally tally;
  const ref_dc::Block block = ref_block(blocks, BlockKind::ffn_bank, in);
  const MoRWorkspace w1 = check_mor(layer, setup, block, in, 1, tally, "large");
  const MoRWorkspace w2 = check_mor(layer, setup, block, in, 2, tally, "large");
  EXPECT_EQ(w1.depth, w2.depth);
  EXPECT_EQ(w1.router_weights, w2.router_weights);
  EXPECT_GE(tally.compared, 8);
}

TEST(MoR, DefaultCapacities) {
  // cf_r = (N_r - r) / N_r: S = 10, N_r = 3 -> 10, 6, 3 tokens; S = 1 -> depth N_r; S = 2 -> 2,
  // 1, 1.
  Rng rng(21);
  const int64_t d = 16;
  const Blocks blocks = random_blocks(rng, d, 32);
  const MoRSetup setup = random_mor(rng, d, 3);
  const Input in = make_input(rng, {10, 1, 2}, d, 0.0);
  const MoRLayer layer(setup.router(), ffn_bank(blocks));
  Tally tally;
  const MoRWorkspace ws = check_mor(layer, setup, ref_block(blocks, BlockKind::ffn_bank, in), in, 2,
                                    tally, "capacities");
  int64_t at_least[4] = {0, 0, 0, 0};
  for (int64_t t = 0; t < 10; ++t)
    for (int r = 0; r <= 3; ++r) at_least[r] += ws.depth[t] >= r;
  EXPECT_EQ(at_least[1], 10);
  EXPECT_EQ(at_least[2], 6);
  EXPECT_EQ(at_least[3], 3);
  EXPECT_EQ(ws.depth[10], 3);
  EXPECT_EQ(ws.depth[11] + ws.depth[12], 4);
  EXPECT_EQ(ws.recursions_run, 3);
  const MoROptions& o = layer.router().options();
  EXPECT_EQ(o.capacity(0, 0), 0);
  EXPECT_EQ(o.capacity(2, 2), 1);
  EXPECT_EQ(o.capacity(1, 49), 32);  // floor(2 * 49 / 3), exact in integers
}

TEST(MoR, SelectionIsHierarchical) {
  // theta_1 = -theta_0 and a zero block (x never changes): recursion 1 must pick the LOWEST
  // step-0 scores among the tokens chosen at step 0, never a token step 0 left out.
  Rng rng(22);
  const int64_t d = 16, T = 30;
  MoRSetup setup = random_mor(rng, d, 2);
  setup.params.block_residual = false;  // x + g f(x): a zero block leaves x as it is
  for (int64_t c = 0; c < d; ++c) setup.params.theta[d + c] = -setup.params.theta[c];
  FfnBank zero(1, FfnShape{d, 8, true, moekit::Activation::silu});
  const MoRLayer layer(setup.router(), std::move(zero));
  const Input in = make_input(rng, {T}, d, 0.0);
  MoRWorkspace ws;
  std::vector<float> out(in.x.size());
  layer.forward(in.batch(), in.x.data(), out.data(), ws, 2);
  std::vector<double> z(T);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c) z[t] += double(setup.params.theta[c]) * in.x[t * d + c];
  std::vector<int64_t> order(T);
  for (int64_t t = 0; t < T; ++t) order[t] = t;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
  // k_0 = max(1, floor(2 * 30 / 2)) = 30: everyone; use N_r = 2 capacities 30 and 15.
  int64_t deep = 0;
  for (int64_t t = 0; t < T; ++t) deep += ws.depth[t] == 2;
  EXPECT_EQ(deep, 15);
  for (int64_t i = 0; i < T; ++i) EXPECT_EQ(ws.depth[order[i]], i < 15 ? 1 : 2) << "rank " << i;
  // With cf = {0.5, 0.25}: 15 chosen at 0 (the top 15 by z), then the 7 of THOSE with the
  // lowest z (ranks 8..14); a flat selection would take ranks 23..29, never chosen at 0.
  MoRSetup half = setup;
  half.params.capacity_factors = {0.5, 0.25};
  const MoRLayer layer2(half.router(), FfnBank(1, FfnShape{d, 8, true, moekit::Activation::silu}));
  layer2.forward(in.batch(), in.x.data(), out.data(), ws, 1);
  for (int64_t i = 0; i < T; ++i)
    EXPECT_EQ(ws.depth[order[i]], i < 8 ? 1 : i < 15 ? 2 : 0) << "rank " << i;
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

TEST(MoR, EdgeCases) {
  Rng rng(23);
  const int64_t d = 16;
  const Blocks blocks = random_blocks(rng, d, 32);
  const MoRSetup setup = random_mor(rng, d, 3);
  const MoRLayer layer(setup.router(), attention_functor(blocks));
  MoRWorkspace ws;
  for (const std::vector<int32_t>& offs : {std::vector<int32_t>{}, std::vector<int32_t>{0, 0, 0}}) {
    Batch b = Batch::single(0, d);
    b.sequence_offsets = offs;
    EXPECT_NO_THROW(layer.forward(b, nullptr, nullptr, ws, 2));
    EXPECT_TRUE(ws.depth.empty());
  }
  // Empty and all-padded sequences, single tokens, padding elsewhere.
  Input in = make_input(rng, {7, 0, 5, 1, 12}, d, 0.0);
  in.pad.assign(static_cast<size_t>(in.T), 0);
  for (int64_t t = in.offsets[2]; t < in.offsets[3]; ++t) in.pad[t] = 1;
  in.pad[in.offsets[4] + 3] = 1;
  Tally tally;
  const MoRWorkspace w =
      check_mor(layer, setup, ref_block(blocks, BlockKind::attention, in), in, 2, tally, "edges");
  EXPECT_EQ(w.depth[in.offsets[3]], 3);  // the single token runs every recursion
  // The Router interface: route() is recursion 0 on all unpadded tokens.
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  layer.router().route(in.batch(), in.x.data(), plan, scratch, 1);
  for (int64_t t = 0; t < in.T; ++t)
    EXPECT_EQ(plan.slots_of(t), in.padded(t) ? 0 : 1) << "token " << t;
}

TEST(MoR, PaddingIsIgnored) {
  Rng rng(24);
  const int64_t d = 16;
  const Blocks blocks = random_blocks(rng, d, 32);
  const MoRSetup setup = random_mor(rng, d, 3);
  Input in = make_input(rng, {13, 30, 6}, d, 0.3);
  const MoRLayer layer(setup.router(), attention_functor(blocks));
  MoRWorkspace ws;
  std::vector<float> a(in.x.size()), b(in.x.size());
  layer.forward(in.batch(), in.x.data(), a.data(), ws, 1);
  const std::vector<int32_t> da = ws.depth;
  for (int64_t t = 0; t < in.T; ++t)
    if (in.padded(t))
      for (int64_t c = 0; c < d; ++c) in.x[t * d + c] = std::numeric_limits<float>::quiet_NaN();
  layer.forward(in.batch(), in.x.data(), b.data(), ws, 2);
  EXPECT_EQ(ws.depth, da);
  EXPECT_EQ(a, b);
}

TEST(MoR, Errors) {
  Rng rng(25);
  const int64_t d = 16;
  const std::vector<float> theta = rng.vec(static_cast<size_t>(3 * d), 0.3);
  auto opts = [&](int64_t N) {
    MoROptions o;
    o.hidden = d;
    o.num_recursions = N;
    return o;
  };
  EXPECT_THROW(MoRRouter(opts(0), {}), moekit::error);
  EXPECT_THROW(MoRRouter(opts(2), theta), moekit::error);  // theta has 3 rows
  MoROptions o = opts(3);
  o.capacity_factors = {1.0, 0.5};
  EXPECT_THROW(MoRRouter(o, theta), moekit::error);
  o.capacity_factors = {1.0, 0.5, 1.5};
  EXPECT_THROW(MoRRouter(o, theta), moekit::error);
  o.capacity_factors = {1.0, 0.5, 0.0};
  EXPECT_THROW(MoRRouter(o, theta), moekit::error);
  o.capacity_factors.clear();
  o.alpha = 0;
  EXPECT_THROW(MoRRouter(o, theta), moekit::error);
  EXPECT_THROW(moekit::parse_mor_activation("relu"), moekit::error);
  EXPECT_EQ(moekit::parse_mor_activation("tanh"), MoRActivation::tanh);
  std::vector<float> bad = theta;
  bad[d + 1] = std::numeric_limits<float>::infinity();
  try {
    MoRRouter(opts(3), bad);
    ADD_FAILURE() << "no throw";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("router.steps.1.weight"), std::string::npos) << e.what();
  }

  const Blocks blocks = random_blocks(rng, d, 32);
  const MoRLayer layer(MoRRouter(opts(3), theta), ffn_bank(blocks));
  Input in = make_input(rng, {9, 4}, d, 0.0);
  MoRWorkspace ws;
  std::vector<float> out(in.x.size());
  in.x[10 * d + 2] = std::numeric_limits<float>::quiet_NaN();
  try {
    layer.forward(in.batch(), in.x.data(), out.data(), ws, 2);
    ADD_FAILURE() << "no throw";
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find("token 10"), std::string::npos) << e.what();
  }
  Batch wrong = in.batch();
  wrong.hidden = d + 1;
  EXPECT_THROW(layer.forward(wrong, in.x.data(), out.data(), ws), moekit::error);
  std::vector<uint8_t> active(3);
  moekit::RoutingPlan plan;
  moekit::RouterScratch scratch;
  EXPECT_THROW(layer.router().route_step(3, in.batch(), in.x.data(), active, plan, scratch),
               moekit::error);
  EXPECT_THROW(layer.router().route_step(0, in.batch(), in.x.data(), active, plan, scratch),
               moekit::error);
}

}  // namespace
