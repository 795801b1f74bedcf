// SPDX-License-Identifier: Apache-2.0
// Expert types, modality groups and the ERC loss (issue 15) against the plain top-k layer they
// replace. Shape: Mixtral-like E = 8, k = 2, d = 1024, f = 2816, f32; the baseline is
// moekit::random_layer (softmax top-k, SwiGLU FfnBank). Every alternative routes with a copy of
// the baseline's router (or its rows), so the two differ only in what is measured:
//  - expert_types/lora_r16_vs_ffn: LoraExpertBank (LoRA-Mixer, arXiv 2507.00029), rank 16,
//    alpha 32, with the frozen base W0 [d, d] shared by every expert;
//  - expert_types/mofme_vs_ffn: ModulatedFfnBank (MoFME, arXiv 2312.16610), one FFN d -> f -> d
//    modulated per expert by gamma / beta [E, f];
//  - expert_types/mohe_vs_ffn: MoheLayer (MoHETS, arXiv 2601.21866): 4 FAN experts beside 4 of
//    the baseline's SwiGLU experts in one PairBank, plus the gated depthwise-convolution shared
//    expert over the tokens (width f);
//  - modality/moma_g2x4_vs_topk: ModalityGroupRouter (MoMa, arXiv 2407.21770), 2 groups of 4
//    experts with top-2 inside each, token types alternating, on the baseline's own experts
//    (BankRef) against the baseline's top-2 over all 8.
// Reported: the alternative's time (the benchmark's time, manual), `vs_ffn` / `vs_topk` = its
// shortest time / the baseline's shortest, both measured in every iteration, and `ffn_ms` /
// `topk_ms`. Before timing: both outputs finite; LoRA, MoFME and modality outputs of three
// tokens against the experts' formulas in double (modality: every slot inside its token's
// group too); MoHETS' reference is tests/test_mohe.cpp.
//  - aux/erc_loss: moekit::erc_loss (arXiv 2512.23447) on random router and gate weights;
//    `gmacs_per_s` = E^2 f d multiply-adds per second (its double-precision loop, one thread).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.hpp"
#include "moekit/batch.hpp"
#include "moekit/experts/bank_views.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/experts/lora.hpp"
#include "moekit/io/model.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/layer.hpp"
#include "moekit/layers/mohe.hpp"
#include "moekit/routers/aux.hpp"
#include "moekit/routers/modality.hpp"
#include "moekit/routers/topk.hpp"
#include "reference/reference.hpp"

namespace moekit_bench {
namespace {

using Clock = std::chrono::steady_clock;
using moekit::TopKLayer;
using moekit::TopKRouter;
using LoraLayer = moekit::SparseLayer<TopKRouter, moekit::LoraExpertBank>;
using MofmeLayer = moekit::SparseLayer<TopKRouter, moekit::ModulatedFfnBank>;
using MoheBank = moekit::PairBank<moekit::FanExpertBank, moekit::FfnBank>;
using MoheRouted = moekit::SparseLayer<TopKRouter, MoheBank>;
using MoheFull = moekit::MoheLayer<TopKRouter, MoheBank>;
using ModalityRouter = moekit::ModalityGroupRouter<TopKRouter>;
using ModalityLayer = moekit::SparseLayer<ModalityRouter, moekit::BankRef<moekit::FfnBank>>;

constexpr int64_t kE = 8, kK = 2, kD = 1024, kF = 2816;
constexpr int64_t kRank = 16, kLoraAlpha = 32;
constexpr int64_t kHalf = kE / 2;  // MoHE: FAN experts [0, 4), SwiGLU [4, 8); MoMa: group size
constexpr int64_t kTokens[] = {16, 512};

struct ErcShape {
  int64_t E, d, f;
};
constexpr ErcShape kErcShapes[] = {{8, 1024, 2816}, {64, 256, 512}};

enum class Kind { lora, mofme, mohe, modality };

const char* name_of(Kind k) {
  switch (k) {
    case Kind::lora: return "expert_types/lora_r16_vs_ffn";
    case Kind::mofme: return "expert_types/mofme_vs_ffn";
    case Kind::mohe: return "expert_types/mohe_vs_ffn";
    case Kind::modality: return "modality/moma_g2x4_vs_topk";
  }
  return "?";
}

/// Layers built on first use and dropped after their last T (registration order = run
/// order). The modality layer views the baseline's experts: it is dropped first.
struct Cache {
  std::unique_ptr<TopKLayer> base;
  std::unique_ptr<LoraLayer> lora;
  std::unique_ptr<MofmeLayer> mofme;
  std::unique_ptr<MoheFull> mohe;
  std::unique_ptr<ModalityLayer> modality;
};

Cache& cache() {
  static Cache c;
  return c;
}

const TopKLayer& baseline() {
  Cache& c = cache();
  if (!c.base) {
    const moekit::LayerConfig config = sized_config("mixtral", kE, kK, kD, kF);
    c.base = std::make_unique<TopKLayer>(moekit::random_layer(config, 1515));
  }
  return *c.base;
}

// The LoRA experts' weights: base W0 [d, d], A [E, r, d], B [E, d, r] (deterministic: the
// reference check before timing regenerates them).
struct LoraWeights {
  std::vector<float> w0, a, b;
};
LoraWeights lora_weights() {
  const double sd = 1.0 / std::sqrt(double(kD)), sr = 1.0 / std::sqrt(double(kRank));
  return {uniform_floats(kD * kD, sd, 101), uniform_floats(kE * kRank * kD, sd, 102),
          uniform_floats(kE * kD * kRank, sr, 103)};
}
constexpr double kLoraScale = double(kLoraAlpha) / double(kRank);

const LoraLayer& lora_layer() {
  Cache& c = cache();
  if (!c.lora) {
    const TopKLayer& base = baseline();
    LoraWeights w = lora_weights();
    moekit::LoraExpertBank bank(kE, kD, kRank, std::move(w.w0), std::move(w.a), std::move(w.b),
                                static_cast<float>(kLoraScale));
    c.lora = std::make_unique<LoraLayer>(TopKRouter(base.router()), std::move(bank));
  }
  return *c.lora;
}

// MoFME's shared FFN up [f, d], down [d, f] and per-expert gamma, beta [E, f] (GELU).
struct MofmeWeights {
  std::vector<float> up, down, gamma, beta;
};
MofmeWeights mofme_weights() {
  MofmeWeights w{uniform_floats(kF * kD, 1.0 / std::sqrt(double(kD)), 201),
                 uniform_floats(kD * kF, 1.0 / std::sqrt(double(kF)), 202), uniform_floats(kE * kF, 0.2, 203),
                 uniform_floats(kE * kF, 0.1, 204)};
  for (float& g : w.gamma) g += 1.0f;
  return w;
}

const MofmeLayer& mofme_layer() {
  Cache& c = cache();
  if (!c.mofme) {
    const TopKLayer& base = baseline();
    MofmeWeights w = mofme_weights();
    moekit::ModulatedFfnBank bank(kE, kD, kF, std::move(w.up), std::move(w.down), std::move(w.gamma),
                                  std::move(w.beta), moekit::Activation::gelu);
    c.mofme = std::make_unique<MofmeLayer>(TopKRouter(base.router()), std::move(bank));
  }
  return *c.mofme;
}

// `W [rows, cols] x` in double (the reference checks below).
std::vector<double> matvec(int64_t rows, int64_t cols, const float* wbase, const std::vector<double>& x) {
  std::vector<double> y(static_cast<size_t>(rows), 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) y[static_cast<size_t>(i)] += double(wbase[i * cols + j]) * x[static_cast<size_t>(j)];
  return y;
}

/// Tokens 0, T / 2 and T - 1 of `y` against sum over their kept slots of w * expert(e, x_t) in
/// double: nullptr when within 1e-3 x max |reference| + 1e-4, else why not.
template <class F>
const char* matches_reference(const moekit::RoutingPlan& plan, const std::vector<float>& x, const std::vector<float>& y,
                              int64_t T, const F& expert) {
  const auto offs = plan.slot_offsets();
  for (const int64_t t : {int64_t{0}, T / 2, T - 1}) {
    const std::vector<double> xt(x.begin() + t * kD, x.begin() + (t + 1) * kD);
    std::vector<double> want(static_cast<size_t>(kD), 0.0);
    for (int32_t s = offs[static_cast<size_t>(t)]; s < offs[static_cast<size_t>(t) + 1]; ++s) {
      if (plan.slot_dropped()[static_cast<size_t>(s)]) continue;
      const std::vector<double> o = expert(int64_t{plan.slot_expert()[static_cast<size_t>(s)]}, xt);
      for (int64_t j = 0; j < kD; ++j)
        want[static_cast<size_t>(j)] += double(plan.slot_weight()[static_cast<size_t>(s)]) * o[static_cast<size_t>(j)];
    }
    double scale = 0.0;
    for (const double v : want) scale = std::max(scale, std::fabs(v));
    for (int64_t j = 0; j < kD; ++j)
      if (std::fabs(double(y[static_cast<size_t>(t * kD + j)]) - want[static_cast<size_t>(j)]) > 1e-3 * scale + 1e-4)
        return "output differs from the double-precision reference";
  }
  return nullptr;
}

const MoheFull& mohe_layer() {
  Cache& c = cache();
  if (!c.mohe) {
    const TopKLayer& base = baseline();
    const double sd = 1.0 / std::sqrt(double(kD)), sf = 1.0 / std::sqrt(double(kF));
    moekit::FanExpertBank fan(kHalf, kD, kF, uniform_floats(kHalf * (kF / 4) * kD, sd, 301),
                              uniform_floats(kHalf * (kF / 2) * kD, sd, 302),
                              uniform_floats(kHalf * (kD / 4) * kF, sf, 303),
                              uniform_floats(kHalf * (kD / 2) * kF, sf, 304));
    // The SwiGLU half: the baseline's experts 4..7, repacked into a bank of their own.
    moekit::FfnBank ffn(kE - kHalf, base.experts().shape());
    std::vector<float> g(static_cast<size_t>(kF * kD)), u(g.size()), dn(static_cast<size_t>(kD * kF));
    for (int64_t e = 0; e < kE - kHalf; ++e) {
      base.experts().get_expert(kHalf + e, g.data(), u.data(), dn.data());
      ffn.set_expert(e, g.data(), u.data(), dn.data());
    }
    moekit::DwConvExpert conv(kD, kF, uniform_floats(kD * 3, 0.5, 305), uniform_floats(kF * kD, sd, 306),
                              uniform_floats(kD * kF, sf, 307));
    MoheRouted routed(TopKRouter(base.router()), MoheBank(std::move(fan), std::move(ffn)));
    c.mohe = std::make_unique<MoheFull>(std::move(routed), std::move(conv), uniform_floats(kD, sd, 308));
  }
  return *c.mohe;
}

const ModalityLayer& modality_layer() {
  Cache& c = cache();
  if (!c.modality) {
    const TopKLayer& base = baseline();
    // Group g: the baseline's router rows [4 g, 4 g + 4) and its options with E = 4 (k = 2).
    moekit::TopKOptions o = base.router().options();
    o.num_experts = kHalf;
    const std::vector<float>& w = base.router().weight();
    std::vector<TopKRouter> routers;
    routers.emplace_back(o, std::vector<float>(w.begin(), w.begin() + kHalf * kD));
    routers.emplace_back(o, std::vector<float>(w.begin() + kHalf * kD, w.end()));
    ModalityRouter router(std::move(routers), std::vector<std::vector<int32_t>>{{0}, {1}});
    c.modality =
        std::make_unique<ModalityLayer>(std::move(router), moekit::BankRef<moekit::FfnBank>(base.experts()));
  }
  return *c.modality;
}

/// Runs `candidate` and `base` once; skips with an error unless `y` and `yb` (their outputs)
/// are finite and `check()` returns null; then runs both in every iteration, the candidate
/// timed as the benchmark. Counters: `ratio` = shortest candidate / shortest baseline time,
/// `base_ms` the shortest baseline time.
template <class C, class B, class K>
void time_against(benchmark::State& state, const C& candidate, const B& base, const std::vector<float>& y,
                  const std::vector<float>& yb, const K& check, const char* ratio, const char* base_ms) {
  candidate();
  base();
  if (moekit::kernels::first_non_finite(y.data(), static_cast<int64_t>(y.size())) >= 0 ||
      moekit::kernels::first_non_finite(yb.data(), static_cast<int64_t>(yb.size())) >= 0) {
    state.SkipWithError("non-finite output before timing");
    return;
  }
  if (const char* why = check()) {
    state.SkipWithError(why);
    return;
  }
  const float* out = y.data();
  const float* out_base = yb.data();
  double c_min = 1e300, b_min = 1e300;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    candidate();
    benchmark::DoNotOptimize(out);
    const auto t1 = Clock::now();
    base();
    benchmark::DoNotOptimize(out_base);
    const auto t2 = Clock::now();
    const double dc = std::chrono::duration<double>(t1 - t0).count();
    state.SetIterationTime(dc);
    c_min = std::min(c_min, dc);
    b_min = std::min(b_min, std::chrono::duration<double>(t2 - t1).count());
  }
  state.counters[ratio] = c_min / b_min;
  state.counters[base_ms] = b_min * 1e3;
  state.counters["threads"] = bench_threads();
}

void run_layer(benchmark::State& state, Kind kind, int64_t T) {
  try {
    const TopKLayer& base = baseline();
    const int threads = bench_threads();
    const moekit::Batch batch = moekit::Batch::single(T, kD);
    std::vector<int32_t> types(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) types[static_cast<size_t>(t)] = static_cast<int32_t>(t % 2);
    moekit::Batch typed = batch;
    typed.token_types = types;
    const std::vector<float> x = uniform_floats(T * kD, 1.0, 0xE7E0000ull + static_cast<uint64_t>(T));
    std::vector<float> y(x.size()), yb(x.size());
    moekit::Workspace ws, wsb;
    const auto run_base = [&] { base.forward(batch, x.data(), yb.data(), wsb, threads); };
    // MoHETS adds the depthwise convolution over the tokens: its output is checked finite
    // here and against a transcription of the official layer in tests/test_mohe.cpp.
    const auto no_check = []() -> const char* { return nullptr; };
    switch (kind) {
      case Kind::lora: {
        const LoraLayer& L = lora_layer();
        const auto run = [&] { L.forward(batch, x.data(), y.data(), ws, threads); };
        // E_e(x) = W0 x + scale B_e (A_e x)
        const auto check = [&]() -> const char* {
          const LoraWeights w = lora_weights();
          return matches_reference(ws.plan, x, y, T, [&](int64_t e, const std::vector<double>& xt) {
            std::vector<double> out = matvec(kD, kD, w.w0.data(), xt);
            const std::vector<double> ax = matvec(kRank, kD, w.a.data() + e * kRank * kD, xt);
            const std::vector<double> bax = matvec(kD, kRank, w.b.data() + e * kD * kRank, ax);
            for (int64_t j = 0; j < kD; ++j) out[static_cast<size_t>(j)] += kLoraScale * bax[static_cast<size_t>(j)];
            return out;
          });
        };
        time_against(state, run, run_base, y, yb, check, "vs_ffn", "ffn_ms");
        break;
      }
      case Kind::mofme: {
        const MofmeLayer& L = mofme_layer();
        const auto run = [&] { L.forward(batch, x.data(), y.data(), ws, threads); };
        // E_e(x) = down gelu(gamma_e * (up x) + beta_e)
        const auto check = [&]() -> const char* {
          const MofmeWeights w = mofme_weights();
          return matches_reference(ws.plan, x, y, T, [&](int64_t e, const std::vector<double>& xt) {
            std::vector<double> h = matvec(kF, kD, w.up.data(), xt);
            for (int64_t i = 0; i < kF; ++i) {
              const auto q = static_cast<size_t>(e * kF + i);
              h[static_cast<size_t>(i)] = ref::activate(ref::Activation::gelu, double(w.gamma[q]) * h[static_cast<size_t>(i)] + double(w.beta[q]));
            }
            return matvec(kD, kF, w.down.data(), h);
          });
        };
        time_against(state, run, run_base, y, yb, check, "vs_ffn", "ffn_ms");
        break;
      }
      case Kind::mohe: {
        const MoheFull& L = mohe_layer();
        const auto run = [&] { L.forward(batch, x.data(), y.data(), ws, threads); };
        time_against(state, run, run_base, y, yb, no_check, "vs_ffn", "ffn_ms");
        break;
      }
      case Kind::modality: {
        const ModalityLayer& L = modality_layer();
        const auto run = [&] { L.forward(typed, x.data(), y.data(), ws, threads); };
        // k slots per token, each on its group's experts: type 0 -> [0, 4), type 1 -> [4, 8).
        // The baseline's own SwiGLU experts, in double.
        std::vector<ref::Ffn> ffns;
        for (int64_t e = 0; e < kE; ++e) {
          ref::Ffn r;
          r.hidden = kD;
          r.intermediate = kF;
          r.gate.resize(static_cast<size_t>(kF * kD));
          r.up.resize(r.gate.size());
          r.down.resize(static_cast<size_t>(kD * kF));
          base.experts().get_expert(e, r.gate.data(), r.up.data(), r.down.data());
          ffns.push_back(std::move(r));
        }
        const auto in_group = [&]() -> const char* {
          if (const char* why = matches_reference(ws.plan, x, y, T, [&](int64_t e, const std::vector<double>& xt) {
                return ref::ffn_forward(ffns[static_cast<size_t>(e)], xt);
              }))
            return why;
          const auto experts = ws.plan.slot_expert();
          for (int64_t t = 0; t < T; ++t) {
            if (ws.plan.slots_of(t) != kK) return "modality: a token without k slots";
            for (int32_t s = ws.plan.slot_offsets()[static_cast<size_t>(t)]; s < ws.plan.slot_offsets()[static_cast<size_t>(t) + 1]; ++s)
              if ((experts[static_cast<size_t>(s)] < kHalf) != (t % 2 == 0))
                return "modality: a slot outside its token's group";
          }
          return nullptr;
        };
        time_against(state, run, run_base, y, yb, in_group, "vs_topk", "topk_ms");
        break;
      }
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
  if (T != kTokens[std::size(kTokens) - 1]) return;
  Cache& c = cache();
  switch (kind) {
    case Kind::lora: c.lora.reset(); break;
    case Kind::mofme: c.mofme.reset(); break;
    case Kind::mohe: c.mohe.reset(); break;
    case Kind::modality:  // the last layer registered: the baseline goes too, after its view
      c.modality.reset();
      c.base.reset();
      break;
  }
}

void run_erc(benchmark::State& state, int64_t E, int64_t d, int64_t f) {
  try {
    const double sd = 1.0 / std::sqrt(double(d));
    const std::vector<float> router = uniform_floats(E * d, sd, 401 + static_cast<uint64_t>(E));
    const std::vector<float> gate = uniform_floats(E * f * d, sd, 402 + static_cast<uint64_t>(E));
    const moekit::ErcResult first = moekit::erc_loss(router, gate, E, d, f);
    if (!std::isfinite(first.loss) || !std::isfinite(first.alpha_zero)) {
      state.SkipWithError("erc_loss: non-finite loss before timing");
      return;
    }
    for (auto _ : state) {
      moekit::ErcResult r = moekit::erc_loss(router, gate, E, d, f);
      benchmark::DoNotOptimize(r.loss);
    }
    const double gmacs = double(E) * double(E) * double(f) * double(d) * 1e-9;
    state.counters["gmacs_per_s"] = benchmark::Counter(gmacs, benchmark::Counter::kIsIterationInvariantRate);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void register_expert_type_benchmarks() {
  for (Kind kind : {Kind::lora, Kind::mofme, Kind::mohe, Kind::modality})
    for (int64_t T : kTokens) {
      const std::string name = std::string(name_of(kind)) + "/E:8/k:2/d:1024/f:2816/T:" + std::to_string(T);
      auto* b = benchmark::RegisterBenchmark(name.c_str(), run_layer, kind, T)
                    ->UseManualTime()
                    ->Unit(benchmark::kMillisecond);
      // MoFME's and MoHE's experts run row by row (matrix-vector products re-reading 17-23 MB
      // of weights per row): up to seconds per forward at T = 512, so a fixed count there.
      if (T <= 16) {
        b->MinTime(0.2);
      } else if (kind == Kind::mofme || kind == Kind::mohe) {
        b->Iterations(2);
      } else {
        b->MinTime(0.5);
      }
    }
  // ERC: one thread of double-precision dot products, ~0.2-1 s per call on a 3 GHz core.
  for (const ErcShape& s : kErcShapes) {
    const std::string name = "aux/erc_loss/E:" + std::to_string(s.E) + "/d:" + std::to_string(s.d) +
                             "/f:" + std::to_string(s.f);
    benchmark::RegisterBenchmark(name.c_str(), run_erc, s.E, s.d, s.f)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(3);
  }
}

}  // namespace

// Registered at static initialisation (bench/main.cpp is not edited per family).
[[maybe_unused]] static const int registered_expert_types = (register_expert_type_benchmarks(), 0);

}  // namespace moekit_bench
