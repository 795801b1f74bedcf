// SPDX-License-Identifier: Apache-2.0
// SparseLayer: route -> gather per expert -> expert functors -> weighted combine (+ shared).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include <omp.h>

#include "moekit/activations.hpp"
#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/kernels/combine.hpp"
#include "moekit/kernels/gather.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Every scratch buffer of a forward pass. One per calling thread; reuse it across calls:
/// it grows when a larger batch arrives and never shrinks, so a steady-state forward of the
/// same or smaller shape allocates nothing in moekit's code. After forward(), `plan` holds
/// the routing plan of that call and `router.logits` its router logits.
struct Workspace {
  RoutingPlan plan;
  RouterScratch router;

  struct Task {
    int32_t expert;  ///< routed expert id, or -1 - j for shared expert j
    int32_t begin;   ///< first row (position in the expert's block / in the unpadded list)
    int32_t end;
  };
  std::vector<Task> tasks;
  std::vector<float> expert_out;     ///< `[S_kept, d]` outputs in expert CSR order
  std::vector<float> shared_out;     ///< `[n_shared, T_routed, d]`
  std::vector<int32_t> unpadded;     ///< unpadded token ids (when the batch has padding)
  std::vector<int32_t> row_of_token; ///< token -> row in the unpadded list, -1 for padding
  std::vector<float> thread_scratch; ///< per thread: gather block + expert scratch
  std::vector<float> row_weights;    ///< `[S_kept]` routing weight of each expert row (context-aware banks)
  int64_t routed_rows = 0;           ///< unpadded tokens of the current call
  int64_t rows_max = 0;              ///< rows of a worker's gather block
  size_t per_worker = 0;             ///< floats of a worker slot's scratch
  int workers = 0;                   ///< worker slots the buffers are laid out for (begin())
  // Decode (column-split) path.
  struct Piece {
    int32_t task;   ///< index into tasks
    int32_t s0, s1; ///< strip range
  };
  std::vector<Piece> pieces;
  std::vector<float> split_in;       ///< gathered inputs: routed rows in plan order, then shared rows
  std::vector<float> split_h;        ///< hidden activations of every task
  std::vector<size_t> split_hoff;    ///< per task: offset into split_h
  std::vector<const float*> combine_rows;
  std::vector<float> combine_weights;
  /// The input as f32 rows `[T, d]` when the caller's rows are not f32 and contiguous (or
  /// partly overlap the output): converted once, then read by the router, the gather, the
  /// shared experts and the combine.
  std::vector<float> hidden_f32;
  std::vector<float> out_rows;       ///< per worker: one f32 output row before it is rounded (bf16 / f16 out)
  std::vector<float> aux;            ///< scratch of composite layers around a SparseLayer (MoheLayer)
  const float* hidden = nullptr;     ///< the f32 rows of the current call (the caller's, or hidden_f32)
  /// After a forward with NonFiniteOutput::count: the unpadded output rows holding a NaN or an
  /// infinity (0 otherwise, and always 0 when the call threw or checks are off).
  int64_t non_finite_rows = 0;
};

/// SCMoE's contrast (arXiv 2405.14507) of a strong and a weak output `[n]` (layer outputs or
/// next-token logits): `out = strong + beta (strong - weak)`, in f32; `out` may be `strong` or
/// `weak`. With `alpha` > 0 (the paper's adaptive plausibility constraint, for logits), entries
/// whose strong softmax probability is below alpha times the largest get -inf: those with
/// `strong_v < max(strong) + ln(alpha)`. Throws for a non-finite beta or alpha outside [0, 1].
inline void self_contrast(const float* strong, const float* weak, int64_t n, float beta, float* out, float alpha = 0.0f) {
  MOEKIT_CHECK(std::isfinite(beta), "self_contrast: beta expected finite, got ", beta);
  MOEKIT_CHECK(alpha >= 0.0f && alpha <= 1.0f, "self_contrast: alpha expected in [0, 1], got ", alpha);
  MOEKIT_CHECK(n == 0 || (strong != nullptr && weak != nullptr && out != nullptr), "self_contrast: null pointer for n = ", n);
  float cut = -std::numeric_limits<float>::infinity();
  if (alpha > 0.0f && n > 0) cut = *std::max_element(strong, strong + n) + std::log(alpha);
  for (int64_t i = 0; i < n; ++i) {
    const float s = strong[i];
    out[i] = s < cut ? -std::numeric_limits<float>::infinity() : s + beta * (s - weak[i]);
  }
}

/// What SparseLayer does when a finite input gives a non-finite output row (an overflow
/// inside an expert or the combine).
enum class NonFiniteOutput : uint8_t {
  error,  ///< throw moekit::error naming the first bad value (the default)
  count,  ///< keep the output as computed and count the rows in Workspace::non_finite_rows
};

/// The generic sparse MoE layer: `y_t = sum_slots w * E_e(x_t) + sum_j g_j(x_t) * S_j(x_t)`
/// for unpadded tokens, 0 for padding. The caller adds the residual. `B` holds the routed
/// experts, `SB` the type of each shared expert's one-expert bank (SharedExpertOf<SB>): an
/// FfnBank by default, any ExpertBank that needs no BlockContext otherwise. Both run through
/// the same tasks; the decode column split covers shared experts when SB is a SplittableBank
/// (else a decode batch with shared experts runs as whole tasks).
template <Router R, ExpertBank B, ExpertBank SB = FfnBank>
class SparseLayer {
  static_assert(!ContextAwareBank<SB> && !whole_blocks_v<SB> && !applies_weight_v<SB>,
                "SparseLayer: a shared-expert bank gets row blocks without a BlockContext or weights");

 public:
  using shared_type = SharedExpertOf<SB>;
  /// Rows per (expert, row block) task: fixed, so results never depend on the thread count.
  static constexpr int64_t kRowBlock = 96;
  /// Decode: when every task has at most this many rows and several threads run, threads
  /// split each expert's output columns instead of taking whole experts (SplittableBank).
  static constexpr int64_t kSplitRows = 16;

  SparseLayer(R router, B experts, std::vector<SharedExpertOf<SB>> shared = {})
      : router_(std::move(router)), experts_(std::move(experts)), shared_(std::move(shared)) {
    MOEKIT_CHECK(router_.num_experts() == experts_.num_experts(), "SparseLayer: router has ",
                 router_.num_experts(), " experts, expert bank expected the same, got ",
                 experts_.num_experts());
    MOEKIT_CHECK(router_.hidden_size() == experts_.d_in(), "SparseLayer: experts' d_in expected ",
                 router_.hidden_size(), " (the router's hidden size), got ", experts_.d_in());
    MOEKIT_CHECK(experts_.d_out() == experts_.d_in(), "SparseLayer: experts' d_out expected ",
                 experts_.d_in(), " (= d_in), got ", experts_.d_out());
    for (size_t j = 0; j < shared_.size(); ++j) {
      MOEKIT_CHECK(shared_[j].ffn.num_experts() == 1, "SparseLayer: shared expert ", j,
                   " expected a one-expert bank, got ", shared_[j].ffn.num_experts());
      MOEKIT_CHECK(shared_[j].ffn.d_in() == hidden_size() && shared_[j].ffn.d_out() == hidden_size(),
                   "SparseLayer: shared expert ", j, " d_in and d_out expected ", hidden_size(),
                   " (the hidden size), got ", shared_[j].ffn.d_in(), " and ", shared_[j].ffn.d_out());
      MOEKIT_CHECK(shared_[j].gate.empty() || static_cast<int64_t>(shared_[j].gate.size()) == hidden_size(),
                   "SparseLayer: shared expert ", j, " gate expected [", hidden_size(), "], got ",
                   shared_[j].gate.size(), " values");
      detail::check_finite(shared_[j].gate, "SparseLayer", "shared expert gate");
      MOEKIT_CHECK(std::isfinite(shared_[j].scale), "SparseLayer: shared expert ", j, " scale expected finite, got ",
                   shared_[j].scale);
      if (shared_[j].coefficient.empty() && shared_[j].coefficient_bias.empty()) continue;
      MOEKIT_CHECK(residual_ < 0, "SparseLayer: shared experts ", residual_, " and ", j,
                   " both have a residual coefficient, expected at most one");
      MOEKIT_CHECK(shared_[j].gate.empty(), "SparseLayer: shared expert ", j,
                   " has a residual coefficient and a gate, expected one of them");
      MOEKIT_CHECK(static_cast<int64_t>(shared_[j].coefficient.size()) == 2 * hidden_size() &&
                       shared_[j].coefficient_bias.size() == 2,
                   "SparseLayer: shared expert ", j, " residual coefficient expected [2, ", hidden_size(),
                   "] and bias [2], got ", shared_[j].coefficient.size(), " and ", shared_[j].coefficient_bias.size(),
                   " values");
      detail::check_finite(shared_[j].coefficient, "SparseLayer", "residual coefficient.weight");
      detail::check_finite(shared_[j].coefficient_bias, "SparseLayer", "residual coefficient.bias");
      residual_ = static_cast<int64_t>(j);
    }
  }

  [[nodiscard]] int64_t hidden_size() const noexcept { return router_.hidden_size(); }
  [[nodiscard]] int64_t num_experts() const noexcept { return router_.num_experts(); }
  [[nodiscard]] const R& router() const noexcept { return router_; }
  [[nodiscard]] R& router() noexcept { return router_; }
  [[nodiscard]] const B& experts() const noexcept { return experts_; }
  /// The bank, to change it between calls (e.g. moekit::ep adds and drops guest experts).
  [[nodiscard]] B& experts() noexcept { return experts_; }
  [[nodiscard]] const std::vector<SharedExpertOf<SB>>& shared_experts() const noexcept { return shared_; }

  /// Routes `hidden [T, d]` and writes `out [T, d]`. `threads` <= 0 uses OpenMP's default;
  /// inside an active parallel region the call runs on the calling thread alone.
  /// The plan is left in `ws.plan`.
  /// Unless set_check_finite(false), a NaN or infinity in an unpadded row of `hidden` is an
  /// error (moekit::error naming the token and column), found before routing; so is one in an
  /// unpadded row of `out` afterwards (finite input, non-finite output: an overflow inside an
  /// expert or the combine), never returned silently.
  /// With set_non_finite_output(NonFiniteOutput::count) such output rows are counted in
  /// `ws.non_finite_rows` instead.
  void forward(const Batch& batch, const float* hidden, float* out, Workspace& ws, int threads = 0) const {
    forward(batch, ActivationsIn::f32(hidden), ActivationsOut::f32(out), ws, threads);
  }

  /// forward() on the engine's own activations: f32, bf16 or f16 rows with a row stride (see
  /// ActivationsIn). f32 contiguous rows are read where they are; others are converted to f32
  /// once (one pass, fused with the finite check) into `ws.hidden_f32`, from which the router,
  /// the gather and the shared experts read. Each output row is combined in f32 and rounded to
  /// the output type (to nearest even) as it is stored, inside the combine. So the result equals
  /// forward() on the widened input, rounded once: bit for bit. `out` may be the same view as
  /// `hidden` (in place); any other overlap is detected and the input is copied first.
  void forward(const Batch& batch, ActivationsIn hidden, ActivationsOut out, Workspace& ws, int threads = 0) const {
    ws.non_finite_rows = 0;
    batch.validate(hidden_size());
    const ActivationsOut o = resolve(out, "SparseLayer::forward", batch.tokens);
    const float* x = input_rows(batch, hidden, &o, ws, "SparseLayer::forward");
    router_.route(batch, x, ws.plan, ws.router, threads);
    run_plan(batch, x, ws.plan, o, ws, threads);
    if (check_finite_) check_output(batch, o, "SparseLayer::forward", ws);
  }

  /// Runs the experts for a given finalised plan (from any router) and combines. Checks
  /// `hidden` for NaN / infinity as forward() does.
  void forward_plan(const Batch& batch, const float* hidden, const RoutingPlan& plan, float* out,
                    Workspace& ws, int threads = 0) const {
    forward_plan(batch, ActivationsIn::f32(hidden), plan, ActivationsOut::f32(out), ws, threads);
  }
  /// forward_plan() on the engine's own activations (as the second forward()).
  void forward_plan(const Batch& batch, ActivationsIn hidden, const RoutingPlan& plan, ActivationsOut out,
                    Workspace& ws, int threads = 0) const {
    ws.non_finite_rows = 0;
    batch.validate(hidden_size());
    const ActivationsOut o = resolve(out, "SparseLayer::forward_plan", batch.tokens);
    const float* x = input_rows(batch, hidden, &o, ws, "SparseLayer::forward_plan");
    check_padded_slots(batch, plan);
    run_plan(batch, x, plan, o, ws, threads);
    if (check_finite_) check_output(batch, o, "SparseLayer::forward_plan", ws);
  }

  /// Self-contrast (SCMoE, Shi et al., arXiv 2405.14507): one routing and one expert pass
  /// give the strong output `strong [T, d]` (exactly forward()'s) and the weak output
  /// `weak [T, d]`, where each token keeps only its routed slot of rank `rank` (1 = its first
  /// choice; at most the slots the router gave it) with weight 1, plus the same shared experts.
  /// A token with fewer slots, or whose rank-`rank` slot was dropped, gets only the shared part;
  /// the output bias (set_output_bias) is added to both. The weak output reads the expert rows
  /// the strong pass computed: no expert runs twice. Both outputs are checked for non-finite
  /// rows as forward() checks its own (with NonFiniteOutput::count, ws.non_finite_rows counts
  /// both). The three arrays must not overlap (no in-place call). Not defined (moekit::error)
  /// with the weight on the input, banks applying the weight, or a residual coefficient. f32
  /// rows; self_contrast() forms `z_s + beta (z_s - z_w)`.
  void forward_contrast(const Batch& batch, const float* hidden, float* strong, float* weak, int64_t rank,
                        Workspace& ws, int threads = 0) const {
    MOEKIT_CHECK(!weight_on_input_ && !applies_weight_v<B> && residual_ < 0,
                 "SparseLayer::forward_contrast: expected the routing weight on the expert output, got weight on the "
                 "input, a bank applying it, or a residual coefficient");
    MOEKIT_CHECK(rank >= 1 && rank <= num_experts(), "SparseLayer::forward_contrast: rank expected in [1, E = ",
                 num_experts(), "], got ", rank);
    MOEKIT_CHECK(batch.tokens == 0 || weak != nullptr, "SparseLayer::forward_contrast: weak output pointer is null");
    const int64_t n = batch.tokens * hidden_size();
    auto apart = [n](const float* a, const float* b) {
      return detail::apart(a, static_cast<size_t>(n), b, static_cast<size_t>(n));
    };
    MOEKIT_CHECK(apart(weak, hidden) && apart(weak, strong) && apart(strong, hidden),
                 "SparseLayer::forward_contrast: the input, the strong and the weak output expected apart (no in-place "
                 "call: the weak combine reads the input after the strong one is written)");
    forward(batch, hidden, strong, ws, threads);
    const int64_t T = batch.tokens;
    const ActivationsOut o = resolve(ActivationsOut::f32(weak), "SparseLayer::forward_contrast", T);
    const float* x = ws.hidden;
    const int nt = detail::resolve_threads(threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) combine_token(batch, x, ws.plan, o, ws, t, omp_get_thread_num(), rank - 1);
    if (check_finite_) {  // the weak rows are checked as forward() checks the strong ones (counts add up)
      const int64_t strong_bad = ws.non_finite_rows;
      check_output(batch, o, "SparseLayer::forward_contrast (weak output)", ws);
      ws.non_finite_rows += strong_bad;
    }
  }

  // ---- Engine-owned threads (no OpenMP): the same work as forward(), split into calls an
  // engine's own pool runs. begin() routes on the calling thread and lays out the tasks and
  // the buffers of `workers` worker slots; run_task(i, w) runs task i (an expert's row block, or
  // a shared expert's) on worker slot w, from any thread, concurrently with other tasks as long
  // as concurrent calls use distinct slots; combine(w, ith, nth) combines the tokens
  // [T ith / nth, T (ith + 1) / nth) on slot w; finish() runs the output check. Every task
  // must be done before any combine. Results equal forward()'s bit for bit, for any worker
  // count, any order of tasks and any token split.

  // The activations may be bf16 / f16 / strided views as in forward(): begin() converts the
  // input once (pass the output view too when it may overlap the input other than in place),
  // the hidden-less run_task() / combine() read that copy, and combine() rounds each row to
  // the output type.

  /// Routes `hidden` and lays out the work for `workers` (>= 1) worker slots in `ws`.
  void begin(const Batch& batch, const float* hidden, Workspace& ws, int workers) const {
    begin(batch, ActivationsIn::f32(hidden), ws, workers);
  }
  /// begin() on the engine's own activations; `out`: the view combine() will write, when it
  /// may overlap `hidden` (other than the same view), so the input is copied first.
  void begin(const Batch& batch, ActivationsIn hidden, Workspace& ws, int workers, ActivationsOut out = {}) const {
    MOEKIT_CHECK(workers >= 1 && workers <= 4096, "SparseLayer::begin: workers expected in [1, 4096], got ", workers);
    ws.non_finite_rows = 0;
    batch.validate(hidden_size());
    const float* x = input_rows(batch, hidden, out.data != nullptr ? &out : nullptr, ws, "SparseLayer::begin");
    router_.route(batch, x, ws.plan, ws.router, 1);
    check_plan(batch, ws.plan);
    ws.tasks.clear();
    if (batch.tokens > 0) setup(batch, ws.plan, ws, workers);
    ws.workers = workers;
  }
  /// begin() with the engine's own finalised plan (RoutingPlan::from_topk, ...) instead of the
  /// router's: the plan is copied into `ws.plan` (its buffers reused) and checked as
  /// forward_plan() checks it.
  void begin(const Batch& batch, ActivationsIn hidden, const RoutingPlan& plan, Workspace& ws, int workers,
             ActivationsOut out = {}) const {
    MOEKIT_CHECK(workers >= 1 && workers <= 4096, "SparseLayer::begin: workers expected in [1, 4096], got ", workers);
    ws.non_finite_rows = 0;
    batch.validate(hidden_size());
    check_plan(batch, plan);
    check_padded_slots(batch, plan);
    input_rows(batch, hidden, out.data != nullptr ? &out : nullptr, ws, "SparseLayer::begin");
    if (&plan != &ws.plan) ws.plan = plan;
    ws.tasks.clear();
    if (batch.tokens > 0) setup(batch, ws.plan, ws, workers);
    ws.workers = workers;
  }
  /// Tasks of the call begin() laid out.
  [[nodiscard]] int64_t num_tasks(const Workspace& ws) const noexcept { return static_cast<int64_t>(ws.tasks.size()); }
  /// Runs task i on worker slot `worker` (< the begin() count). May throw what an expert throws.
  void run_task(const Batch& batch, const float* hidden, Workspace& ws, int64_t i, int worker) const {
    MOEKIT_CHECK(i >= 0 && i < num_tasks(ws) && worker >= 0 && worker < ws.workers, "SparseLayer::run_task: task ", i,
                 " of ", num_tasks(ws), ", worker ", worker, " of ", ws.workers, " out of range");
    task(batch, hidden, ws.plan, ws, i, worker);
  }
  /// run_task() on the rows begin() read (needed when begin() converted them).
  void run_task(const Batch& batch, Workspace& ws, int64_t i, int worker) const { run_task(batch, ws.hidden, ws, i, worker); }
  /// Combines part ith of nth of the tokens into `out [T, d]` on worker slot `worker`.
  void combine(const Batch& batch, const float* hidden, float* out, Workspace& ws, int worker, int64_t ith,
               int64_t nth) const {
    combine_part(batch, hidden, ActivationsOut::f32(out), ws, worker, ith, nth);
  }
  /// Combines part ith of nth of the tokens into the engine's output view, from the rows
  /// begin() read.
  void combine(const Batch& batch, ActivationsOut out, Workspace& ws, int worker, int64_t ith, int64_t nth) const {
    combine_part(batch, ws.hidden, out, ws, worker, ith, nth);
  }
  /// The output check of forward() (non-finite rows), once every part is combined.
  void finish(const Batch& batch, const float* out, Workspace& ws) const {
    finish(batch, ActivationsOut::f32(const_cast<float*>(out)), ws);
  }
  void finish(const Batch& batch, ActivationsOut out, Workspace& ws) const {
    if (check_finite_ && batch.tokens > 0) check_output(batch, resolve(out, "SparseLayer::finish", batch.tokens), "SparseLayer::finish", ws);
  }

  // ---- Phases, for a forward split over processes (moekit::ep, expert parallelism): route
  // here, run the routed experts wherever they live, combine here. route() + run_experts() on
  // the same plan + combine_outputs() equal forward() bit for bit: an expert's output row
  // depends on that row alone, so the rows of one expert may arrive in any grouping.

  /// Checks and converts the input as forward() does and routes it into `ws.plan`. Returns
  /// the f32 rows `[T, d]` the other phases read (the caller's, or `ws.hidden_f32`). `out`:
  /// the view combine_outputs() will write, when it may overlap `hidden` (other than the same
  /// view), so the input is copied first.
  const float* route(const Batch& batch, ActivationsIn hidden, Workspace& ws, int threads = 0,
                     ActivationsOut out = {}) const {
    ws.non_finite_rows = 0;
    batch.validate(hidden_size());
    const float* x = input_rows(batch, hidden, out.data != nullptr ? &out : nullptr, ws, "SparseLayer::route");
    router_.route(batch, x, ws.plan, ws.router, threads);
    check_plan(batch, ws.plan);
    return x;
  }

  /// route() for a finalised plan made elsewhere (pre-gating, another process, the engine's
  /// own router): checks and converts the input as forward_plan() does and checks `plan`
  /// against the batch, routing nothing. Returns the f32 rows the other phases read.
  const float* accept_plan(const Batch& batch, ActivationsIn hidden, const RoutingPlan& plan, Workspace& ws,
                           ActivationsOut out = {}) const {
    ws.non_finite_rows = 0;
    batch.validate(hidden_size());
    const float* x = input_rows(batch, hidden, out.data != nullptr ? &out : nullptr, ws, "SparseLayer::accept_plan");
    check_plan(batch, plan);
    check_padded_slots(batch, plan);
    return x;
  }

  /// Runs only the routed experts of a finalised `plan` over `rows [plan.num_tokens(), d]`
  /// (no shared experts, no combine, no padding): the outputs are expert_rows(plan, ws),
  /// `[plan.num_kept(), d]` in the plan's expert order (plan.expert_slots()). With
  /// set_weight_on_input(true) each row is scaled by its slot's weight first, as in forward().
  void run_experts(const float* rows, const RoutingPlan& plan, Workspace& ws, int threads = 0) const {
    const Batch batch = Batch::single(plan.num_tokens(), hidden_size());
    check_plan(batch, plan);
    if (plan.num_kept() == 0) return;
    MOEKIT_CHECK(rows != nullptr, "SparseLayer::run_experts: rows expected non-null for ", plan.num_tokens(), " tokens");
    const int nt = detail::resolve_threads(threads);
    setup(batch, plan, ws, nt, kRoutedTasks);
    execute(batch, rows, plan, ws, nt);
  }

  /// The routed experts' output rows of `plan`, `[plan.num_kept(), d]` in expert order: what
  /// run_experts() wrote, or where the caller puts rows computed elsewhere before
  /// combine_outputs(). Grows `ws.expert_out` (never shrinks, keeps its contents).
  std::span<float> expert_rows(const RoutingPlan& plan, Workspace& ws) const {
    const auto n = static_cast<size_t>(plan.num_kept() * hidden_size());
    grow(ws.expert_out, n);
    return {ws.expert_out.data(), n};
  }

  /// The shared experts on the unpadded tokens of `batch`, then the combine of `plan` (as
  /// forward() does) from expert_rows(plan, ws), which the caller filled. `hidden`: the rows
  /// route() returned. Runs the output check of forward().
  void combine_outputs(const Batch& batch, const float* hidden, const RoutingPlan& plan, ActivationsOut out,
                       Workspace& ws, int threads = 0) const {
    batch.validate(hidden_size());
    check_plan(batch, plan);
    check_padded_slots(batch, plan);
    const ActivationsOut o = resolve(out, "SparseLayer::combine_outputs", batch.tokens);
    const int64_t T = batch.tokens;
    if (T == 0) return;
    MOEKIT_CHECK(hidden != nullptr, "SparseLayer::combine_outputs: hidden expected non-null for T = ", T);
    MOEKIT_CHECK(ws.expert_out.size() >= static_cast<size_t>(plan.num_kept() * hidden_size()),
                 "SparseLayer::combine_outputs: expert rows expected [", plan.num_kept(), ", ", hidden_size(),
                 "] (fill expert_rows(plan, ws) first), got ", ws.expert_out.size(), " values");
    const int nt = detail::resolve_threads(threads);
    setup(batch, plan, ws, nt, kSharedTasks);
    execute(batch, hidden, plan, ws, nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) combine_token(batch, hidden, plan, o, ws, t, omp_get_thread_num());
    if (check_finite_) check_output(batch, o, "SparseLayer::combine_outputs", ws);
  }

  /// The NaN / infinity scans of the input and the output (on by default; a vectorised pass
  /// over the unpadded rows each, well under 1% of a forward). Turn them off only for inputs
  /// known to be finite and weights known not to overflow: a non-finite value then propagates
  /// into the routing and the outputs unchecked.
  void set_check_finite(bool on) noexcept { check_finite_ = on; }
  [[nodiscard]] bool check_finite() const noexcept { return check_finite_; }

  /// Error (default) or count for a non-finite output row from a finite input (see forward()).
  void set_non_finite_output(NonFiniteOutput policy) noexcept { non_finite_output_ = policy; }
  [[nodiscard]] NonFiniteOutput non_finite_output() const noexcept { return non_finite_output_; }

 private:
  void combine_part(const Batch& batch, const float* hidden, ActivationsOut out, Workspace& ws, int worker, int64_t ith,
                    int64_t nth) const {
    MOEKIT_CHECK(nth >= 1 && ith >= 0 && ith < nth && worker >= 0 && worker < ws.workers, "SparseLayer::combine: part ",
                 ith, " of ", nth, ", worker ", worker, " of ", ws.workers, " out of range");
    const int64_t T = batch.tokens;
    if (T == 0) return;
    const ActivationsOut o = resolve(out, "SparseLayer::combine", T);
    for (int64_t t = T * ith / nth; t < T * (ith + 1) / nth; ++t) combine_token(batch, hidden, ws.plan, o, ws, t, worker);
  }

  // A view's stride (0: d), checked against the batch: non-null data, stride >= d, and every
  // row's offset representable.
  [[nodiscard]] int64_t checked_stride(const void* data, int64_t stride, int64_t T, const char* who,
                                       const char* what) const {
    const int64_t d = hidden_size();
    if (stride == 0) stride = d;
    if (T == 0) return stride;
    MOEKIT_CHECK(data != nullptr, who, ": ", what, " expected non-null for T = ", T);
    MOEKIT_CHECK(stride >= d && stride <= (int64_t{1} << 40) / T, who, ": ", what, " row stride expected in [", d,
                 " (the hidden size), 2^40 / T], got ", stride);
    return stride;
  }
  [[nodiscard]] ActivationsOut resolve(ActivationsOut out, const char* who, int64_t T) const {
    out.stride = checked_stride(out.data, out.stride, T, who, "out");
    return out;
  }

  // Index of the first non-finite value of row t of a view, or -1; its value as a float.
  [[nodiscard]] static int64_t first_bad(const void* base, ActivationType type, int64_t stride, int64_t t,
                                         int64_t d) noexcept {
    if (type == ActivationType::f32) return kernels::first_non_finite(static_cast<const float*>(base) + t * stride, d);
    const uint16_t* r = static_cast<const uint16_t*>(base) + t * stride;
    const uint16_t m = type == ActivationType::bf16 ? 0x7F80u : 0x7C00u;  // exponent all ones
    for (int64_t j = 0; j < d; ++j)
      if ((r[j] & m) == m) return j;
    return -1;
  }
  [[nodiscard]] static float value_at(const void* base, ActivationType type, int64_t i) noexcept {
    if (type == ActivationType::f32) return static_cast<const float*>(base)[i];
    float v;
    const uint16_t* p = static_cast<const uint16_t*>(base) + i;
    if (type == ActivationType::bf16) {
      kernels::bf16_to_f32(p, &v, 1);
    } else {
      kernels::f16_to_f32(p, &v, 1);
    }
    return v;
  }

  [[noreturn]] static void report_input(const char* who, int64_t t, int64_t j, float v) {
    detail::fail(who, ": hidden[", t, ", ", j, "] expected finite, got ", v,
                 " (non-finite inputs are rejected; set_check_finite(false) skips this check)");
  }

  // The input as f32 rows [T, d]: the caller's when f32, contiguous and not partly overlapping
  // `out` (the same view is fine: each token's combine reads its own row before writing it),
  // else converted into ws.hidden_f32, row by row with the finite check of each row.
  const float* input_rows(const Batch& batch, ActivationsIn in, const ActivationsOut* out, Workspace& ws,
                          const char* who) const {
    const int64_t d = hidden_size(), T = batch.tokens;
    const int64_t stride = checked_stride(in.data, in.stride, T, who, "hidden");
    if (T == 0) return ws.hidden = static_cast<const float*>(in.data);
    bool copy = in.type != ActivationType::f32 || stride != d;
    if (!copy && out != nullptr && out->data != nullptr) {
      const int64_t so = checked_stride(out->data, out->stride, T, who, "out");
      const auto* a = static_cast<const char*>(in.data);
      const auto* b = static_cast<const char*>(out->data);
      const char* a_end = a + ((T - 1) * stride + d) * activation_bytes(in.type);
      const char* b_end = b + ((T - 1) * so + d) * activation_bytes(out->type);
      const bool same = a == b && out->type == in.type && so == stride;
      copy = !same && a < b_end && b < a_end;
    }
    if (!copy) {
      if (check_finite_) check_input_rows(batch, static_cast<const float*>(in.data), who);
      return ws.hidden = static_cast<const float*>(in.data);
    }
    grow(ws.hidden_f32, static_cast<size_t>(T * d));
    for (int64_t t = 0; t < T; ++t) {
      float* row = ws.hidden_f32.data() + t * d;
      const int64_t off = t * stride;
      switch (in.type) {
        case ActivationType::f32: kernels::copy_row(static_cast<const float*>(in.data) + off, row, d); break;
        case ActivationType::bf16: kernels::bf16_to_f32(static_cast<const uint16_t*>(in.data) + off, row, d); break;
        case ActivationType::f16: kernels::f16_to_f32(static_cast<const uint16_t*>(in.data) + off, row, d); break;
      }
      if (check_finite_ && !batch.is_padding(t)) {
        const int64_t j = kernels::first_non_finite(row, d);
        if (j >= 0) report_input(who, t, j, row[j]);
      }
    }
    return ws.hidden = ws.hidden_f32.data();
  }

  // The scan of f32 contiguous input rows (before routing).
  void check_input_rows(const Batch& batch, const float* rows, const char* who) const {
    const int64_t d = hidden_size();
    const int64_t T = batch.tokens;
    if (T == 0) return;
    MOEKIT_CHECK(rows != nullptr, who, ": hidden expected non-null for T = ", T);
    if (batch.padding.empty()) {
      const int64_t i = kernels::first_non_finite(rows, T * d);
      if (i >= 0) report_input(who, i / d, i % d, rows[i]);
      return;
    }
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;  // padded rows may hold anything
      const int64_t j = kernels::first_non_finite(rows + t * d, d);
      if (j >= 0) report_input(who, t, j, rows[t * d + j]);
    }
  }

  // The scan of the output view (stride resolved) after the combine.
  void check_output(const Batch& batch, const ActivationsOut& out, const char* who, Workspace& ws) const {
    const int64_t d = hidden_size(), T = batch.tokens;
    if (T == 0) return;
    const bool count = non_finite_output_ == NonFiniteOutput::count;
    int64_t bad = 0;
    if (batch.padding.empty() && out.type == ActivationType::f32 && out.stride == d && !count) {
      const int64_t i = kernels::first_non_finite(static_cast<const float*>(out.data), T * d);
      if (i >= 0) report_output(who, i / d, i % d, static_cast<const float*>(out.data)[i]);
      return;
    }
    for (int64_t t = 0; t < T; ++t) {
      if (batch.is_padding(t)) continue;
      const int64_t j = first_bad(out.data, out.type, out.stride, t, d);
      if (j < 0) continue;
      if (!count) report_output(who, t, j, value_at(out.data, out.type, t * out.stride + j));
      ++bad;
    }
    if (count) ws.non_finite_rows = bad;
  }
  [[noreturn]] void report_output(const char* who, int64_t t, int64_t j, float v) const {
    detail::fail(who, ": out[", t, ", ", j, "] is ", v,
                 " although the input is finite: an expert or the combine overflowed f32 "
                 "(weights or activations too large); set_non_finite_output(NonFiniteOutput::count) "
                 "counts such rows instead, set_check_finite(false) skips this check");
  }

  void run_plan(const Batch& batch, const float* hidden, const RoutingPlan& plan, const ActivationsOut& out,
                Workspace& ws, int threads) const {
    const int64_t T = batch.tokens;
    check_plan(batch, plan);
    if (T == 0) return;
    MOEKIT_CHECK(hidden != nullptr && out.data != nullptr, "SparseLayer::forward: hidden/out pointers expected non-null for T = ", T);
    const int nt = detail::resolve_threads(threads);
    setup(batch, plan, ws, nt);
    execute(batch, hidden, plan, ws, nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && T > 1)
    for (int64_t t = 0; t < T; ++t) combine_token(batch, hidden, plan, out, ws, t, omp_get_thread_num());
  }

  // Runs the tasks setup() laid out (the decode column split when it applies).
  void execute(const Batch& batch, const float* hidden, const RoutingPlan& plan, Workspace& ws, int nt) const {
    std::exception_ptr failure;
    const auto ntasks = static_cast<int64_t>(ws.tasks.size());
    bool split = false;
    if constexpr (SplittableBank<B> && !whole_blocks_v<B> && !ContextAwareBank<B>) {
      int64_t most = 0;
      for (int64_t e = 0; e < num_experts(); ++e) most = std::max(most, plan.kept_of(e));
      // Shared tasks come last; run_experts() lays out none (the split then ignores them).
      const bool shared_tasks = ntasks > 0 && ws.tasks.back().expert < 0;
      split = nt > 1 && split_enabled_ && most <= kSplitRows &&
              (!shared_tasks || (SplittableBank<SB> && ws.routed_rows <= kSplitRows)) && ntasks > 0;
      if (split) {
        run_split(hidden, plan, !batch.padding.empty(), ws.routed_rows, ws, nt);
      } else if (nt > 1 && split_enabled_ && (shared_.empty() || SplittableBank<SB>)) {
        reserve_split(plan.num_slots(), ws.routed_rows, ws, nt);  // a later, smaller batch allocates nothing
      }
    }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1 && ntasks > 1)
    for (int64_t i = 0; i < (split ? 0 : ntasks); ++i) {
      try {
        task(batch, hidden, plan, ws, i, omp_get_thread_num());
      } catch (...) {
#pragma omp critical(moekit_layer_failure)
        if (!failure) failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
  }

  // A padded row's contents are arbitrary: a given plan must not route it.
  static void check_padded_slots(const Batch& batch, const RoutingPlan& plan) {
    if (!batch.padding.empty() && plan.num_tokens() == batch.tokens)
      for (int64_t t = 0; t < batch.tokens; ++t)
        MOEKIT_CHECK(!batch.is_padding(t) || plan.slots_of(t) == 0, "SparseLayer::forward_plan: padded token ", t,
                     " has ", plan.slots_of(t), " slots, expected none (-1 ids in RoutingPlan::from_topk)");
  }

  void check_plan(const Batch& batch, const RoutingPlan& plan) const {
    MOEKIT_CHECK(plan.finalized(), "SparseLayer::forward_plan: plan expected finalized, got a plan without finalize()");
    MOEKIT_CHECK(plan.num_tokens() == batch.tokens, "SparseLayer::forward_plan: plan tokens expected ", batch.tokens,
                 ", got ", plan.num_tokens());
    MOEKIT_CHECK(plan.num_experts() == num_experts(), "SparseLayer::forward_plan: plan experts expected ",
                 num_experts(), ", got ", plan.num_experts());
  }

  // The tasks of a plan (routed (expert, row block)s, then shared experts' row blocks) and the
  // buffers of `workers` worker slots (scratch per slot, outputs per row).
  static constexpr int kRoutedTasks = 1, kSharedTasks = 2;
  void setup(const Batch& batch, const RoutingPlan& plan, Workspace& ws, int workers,
             int parts = kRoutedTasks | kSharedTasks) const {
    const int64_t d = hidden_size(), T = batch.tokens;
    // Unpadded rows for the shared experts.
    const bool padded = !batch.padding.empty();
    int64_t Tr = T;
    ws.row_of_token.resize(static_cast<size_t>(T));
    if (padded) {
      ws.unpadded.clear();
      for (int64_t t = 0; t < T; ++t) {
        ws.row_of_token[static_cast<size_t>(t)] = batch.is_padding(t) ? -1 : static_cast<int32_t>(ws.unpadded.size());
        if (!batch.is_padding(t)) ws.unpadded.push_back(static_cast<int32_t>(t));
      }
      Tr = static_cast<int64_t>(ws.unpadded.size());
    }
    ws.routed_rows = Tr;
    ws.tasks.clear();
    const auto offs = plan.expert_offsets();
    // Rows per routed task: kRowBlock, or an expert's whole block for whole_blocks banks.
    int64_t block = kRowBlock;
    if constexpr (whole_blocks_v<B>) {
      block = 1;
      for (int64_t e = 0; e < num_experts(); ++e) block = std::max(block, plan.kept_of(e));
    }
    if constexpr (requires(const B& b) { b.resident(int64_t{}); }) {  // banks holding some experts (moekit::ep, offload)
      if (parts & kRoutedTasks)
        for (int64_t e = 0; e < num_experts(); ++e)
          MOEKIT_CHECK(plan.kept_of(e) == 0 || experts_.resident(e), "SparseLayer: expert ", e,
                       " has rows but is not resident in the bank");
    }
    for (int64_t e = 0; e < ((parts & kRoutedTasks) ? num_experts() : 0); ++e)
      for (int32_t b = offs[static_cast<size_t>(e)]; b < offs[static_cast<size_t>(e) + 1]; b += static_cast<int32_t>(block))
        ws.tasks.push_back({static_cast<int32_t>(e), b,
                            static_cast<int32_t>(std::min<int64_t>(b + block, offs[static_cast<size_t>(e) + 1]))});
    for (size_t j = 0; j < ((parts & kSharedTasks) ? shared_.size() : 0); ++j)
      for (int64_t b = 0; b < Tr; b += kRowBlock)
        ws.tasks.push_back({-1 - static_cast<int32_t>(j), static_cast<int32_t>(b),
                            static_cast<int32_t>(std::min<int64_t>(b + kRowBlock, Tr))});
    ws.rows_max = std::max(block, kRowBlock);
    size_t expert_scratch = experts_.scratch_floats(block);
    for (const SharedExpertOf<SB>& sh : shared_) expert_scratch = std::max(expert_scratch, sh.ffn.scratch_floats(kRowBlock));
    ws.per_worker = static_cast<size_t>(ws.rows_max * d) + expert_scratch;
    grow(ws.thread_scratch, ws.per_worker * static_cast<size_t>(workers));
    grow(ws.expert_out, static_cast<size_t>(plan.num_kept() * d));
    grow(ws.shared_out, shared_.size() * static_cast<size_t>(Tr * d));
    if constexpr (ContextAwareBank<B>) {  // each row's routing weight, for BlockContext::weights
      const auto slots = plan.expert_slots();
      const auto sw = plan.slot_weight();
      grow(ws.row_weights, slots.size());
      for (size_t r = 0; r < slots.size(); ++r) ws.row_weights[r] = sw[static_cast<size_t>(slots[r])];
    }
    const size_t width = static_cast<size_t>(num_experts()) + shared_.size();
    grow(ws.combine_rows, width * static_cast<size_t>(workers));
    grow(ws.combine_weights, width * static_cast<size_t>(workers));
    grow(ws.out_rows, static_cast<size_t>(d) * static_cast<size_t>(workers));
    ws.workers = workers;
  }

  // Task i of ws.tasks on worker slot `worker`.
  void task(const Batch& batch, const float* hidden, const RoutingPlan& plan, Workspace& ws, int64_t i,
            int worker) const {
    const int64_t d = hidden_size();
    const Workspace::Task tk = ws.tasks[static_cast<size_t>(i)];
    float* rows_block = ws.thread_scratch.data() + ws.per_worker * static_cast<size_t>(worker);
    float* scratch = rows_block + ws.rows_max * d;
    const int64_t rows = tk.end - tk.begin;
    if (tk.expert >= 0) {
      gather_expert_rows(hidden, plan, tk.begin, rows, rows_block);
      float* dst = ws.expert_out.data() + static_cast<int64_t>(tk.begin) * d;
      if constexpr (ContextAwareBank<B>) {
        const auto tokens = plan.expert_tokens();
        const BlockContext ctx{&batch, tokens.subspan(static_cast<size_t>(tk.begin), static_cast<size_t>(rows)),
                               std::span<const float>(ws.row_weights.data() + tk.begin, static_cast<size_t>(rows))};
        experts_.run(tk.expert, rows_block, rows, dst, scratch, ctx);
      } else {
        experts_.run(tk.expert, rows_block, rows, dst, scratch);
      }
    } else {
      const size_t j = static_cast<size_t>(-1 - tk.expert);
      const float* in = hidden + static_cast<int64_t>(tk.begin) * d;
      if (!batch.padding.empty()) {
        kernels::gather_rows(hidden, d, ws.unpadded.data() + tk.begin, rows, rows_block);
        in = rows_block;
      }
      float* dst = ws.shared_out.data() + (static_cast<int64_t>(j) * ws.routed_rows + tk.begin) * d;
      shared_[j].ffn.run(0, in, rows, dst, scratch);
    }
  }

  // Combine of token t on worker slot `worker`: its rows in slot order, then shared experts
  // (fixed order).
  // `out` has its stride resolved; a bf16 / f16 row is combined in f32 in the worker's out row,
  // then rounded as it is stored.
  // `only_rank` >= 0 (self-contrast's weak output): of the routed slots, only the token's slot
  // of that rank (0-based), with weight 1.
  void combine_token(const Batch& batch, const float* hidden, const RoutingPlan& plan, const ActivationsOut& out,
                     Workspace& ws, int64_t t, int worker, int64_t only_rank = -1) const {
    const int64_t d = hidden_size();
    const bool f32 = out.type == ActivationType::f32;
    float* y = f32 ? static_cast<float*>(out.data) + t * out.stride : ws.out_rows.data() + static_cast<int64_t>(worker) * d;
    if (batch.is_padding(t)) {
      kernels::zero_row(y, d);
      if (!f32) store_row(out, t, y);
      return;
    }
    const size_t width = static_cast<size_t>(num_experts()) + shared_.size();
    const size_t base = width * static_cast<size_t>(worker);
    const float** rows = ws.combine_rows.data() + base;
    float* w = ws.combine_weights.data() + base;
    const auto slot_offsets = plan.slot_offsets();
    const auto pos = plan.slot_position();
    const auto weight = plan.slot_weight();
    // PR-MoE's residual coefficient c = softmax(W_c x + b_c): c_0 on every routed slot,
    // c_1 on its shared expert.
    float c0 = 1.0f, c1 = 1.0f;
    if (residual_ >= 0) {
      const SharedExpertOf<SB>& se = shared_[static_cast<size_t>(residual_)];
      const float z0 = kernels::dot(hidden + t * d, se.coefficient.data(), d) + se.coefficient_bias[0];
      const float z1 = kernels::dot(hidden + t * d, se.coefficient.data() + d, d) + se.coefficient_bias[1];
      const float m = std::max(z0, z1), e0 = std::exp(z0 - m), e1 = std::exp(z1 - m);
      c0 = e0 / (e0 + e1);
      c1 = e1 / (e0 + e1);
    }
    int64_t n = 0;
    for (int32_t sl = slot_offsets[static_cast<size_t>(t)]; sl < slot_offsets[static_cast<size_t>(t) + 1]; ++sl) {
      const int32_t p = pos[static_cast<size_t>(sl)];
      if (p < 0) continue;  // dropped: contributes nothing
      if (only_rank >= 0 && sl - slot_offsets[static_cast<size_t>(t)] != only_rank) continue;
      rows[n] = ws.expert_out.data() + static_cast<int64_t>(p) * d;
      w[n++] = only_rank >= 0 ? 1.0f : (weight_on_input_ || applies_weight_v<B> ? 1.0f : weight[static_cast<size_t>(sl)]) * c0;
    }
    const int64_t r = batch.padding.empty() ? t : ws.row_of_token[static_cast<size_t>(t)];
    for (size_t j = 0; j < shared_.size(); ++j) {
      rows[n] = ws.shared_out.data() + (static_cast<int64_t>(j) * ws.routed_rows + r) * d;
      w[n++] = shared_[j].scale *
               (static_cast<int64_t>(j) == residual_ ? c1
                : shared_[j].gate.empty()
                    ? 1.0f
                    : 1.0f / (1.0f + std::exp(-kernels::dot(hidden + t * d, shared_[j].gate.data(), d))));
    }
    kernels::weighted_sum_rows(rows, w, n, d, y);
    if (!output_bias_.empty())
      for (int64_t i = 0; i < d; ++i) y[i] += output_bias_[static_cast<size_t>(i)];
    if (!f32) store_row(out, t, y);
  }

  void store_row(const ActivationsOut& out, int64_t t, const float* y) const noexcept {
    uint16_t* dst = static_cast<uint16_t*>(out.data) + t * out.stride;
    if (out.type == ActivationType::bf16) {
      kernels::f32_to_bf16(y, dst, hidden_size());
    } else {
      kernels::f32_to_f16(y, dst, hidden_size());
    }
  }

 public:
  /// Where the routing weight applies: to the expert's output (default, `y = sum_j w_j E_j(x)`)
  /// or to its input (`y = sum_j E_j(w_j x)`, Llama 4; vLLM's apply_router_weight_on_input).
  /// Shared experts are not affected.
  void set_weight_on_input(bool on) noexcept { weight_on_input_ = on; }
  [[nodiscard]] bool weight_on_input() const noexcept { return weight_on_input_; }

  /// A bias `[d]` added to every unpadded token's output after the combine (RMoE's
  /// `add_moe_bias`); empty for none.
  void set_output_bias(std::vector<float> bias) {
    MOEKIT_CHECK(bias.empty() || static_cast<int64_t>(bias.size()) == hidden_size(), "SparseLayer: output bias expected [",
                 hidden_size(), "], got ", bias.size(), " values");
    detail::check_finite(bias, "SparseLayer", "output bias");
    output_bias_ = std::move(bias);
  }
  [[nodiscard]] const std::vector<float>& output_bias() const noexcept { return output_bias_; }

  /// Turns the decode column split on (default) or off, e.g. to compare both in a benchmark.
  /// Results are bit-identical either way.
  void set_decode_split(bool on) noexcept { split_enabled_ = on; }
  [[nodiscard]] bool decode_split() const noexcept { return split_enabled_; }

  /// FLOPs a forward of `batch` with this plan executes: kept routed slots, shared experts
  /// and router logits on every unpadded token (needs flops_per_row() on the bank).
  [[nodiscard]] double executed_flops(const RoutingPlan& plan, const Batch& batch) const {
    const double routed = static_cast<double>(batch.routed_tokens());
    double f = static_cast<double>(plan.num_kept()) * experts_.flops_per_row();
    for (const SharedExpertOf<SB>& s : shared_) f += routed * s.ffn.flops_per_row();
    if constexpr (requires { router_.flops_per_token(); }) {
      f += routed * static_cast<double>(router_.flops_per_token());
    } else {
      f += routed * 2.0 * static_cast<double>(num_experts() * hidden_size());
    }
    return f;
  }
  /// The gradient of a loss with respect to each routed slot's combine weight in the last
  /// forward with `ws`: given `grad_out [T, d]` = dLoss/dy of that call (y before the
  /// caller's residual), writes `grad_weight [S]` (S = ws.plan.num_slots()):
  /// `<grad_out_t, E_e(x_t)>` in double for a kept slot (token t, expert e), 0 for a dropped
  /// slot. Reads the expert outputs the forward left in `ws`, so call it before the next call
  /// with `ws`. Test-time re-routing (routers/steering.hpp) turns this into a gradient on the
  /// router logits. Not defined (moekit::error) when the weight multiplies the expert's input
  /// (set_weight_on_input), when the bank applies the weight itself, or with a residual
  /// coefficient (PR-MoE).
  void slot_weight_gradient(const Workspace& ws, const float* grad_out, float* grad_weight) const {
    slot_weight_gradient(ws.plan, ws, grad_out, grad_weight);
  }
  /// The same after forward_plan(): `plan` is the plan that call ran.
  void slot_weight_gradient(const RoutingPlan& plan, const Workspace& ws, const float* grad_out,
                            float* grad_weight) const {
    MOEKIT_CHECK(!weight_on_input_ && !applies_weight_v<B> && residual_ < 0,
                 "SparseLayer::slot_weight_gradient: expected the routing weight on the expert output, got weight on "
                 "the input, a bank applying it, or a residual coefficient");
    const int64_t d = hidden_size(), S = plan.num_slots();
    MOEKIT_CHECK(plan.finalized() && static_cast<int64_t>(ws.expert_out.size()) >= plan.num_kept() * d,
                 "SparseLayer::slot_weight_gradient: expected the workspace of a finished forward");
    MOEKIT_CHECK(S == 0 || (grad_out != nullptr && grad_weight != nullptr),
                 "SparseLayer::slot_weight_gradient: grad_out / grad_weight pointer is null for ", S, " slots");
    const auto pos = plan.slot_position();
    const auto tok = plan.slot_token();
    for (int64_t s = 0; s < S; ++s) {
      const int32_t p = pos[static_cast<size_t>(s)];
      if (p < 0) {
        grad_weight[s] = 0.0f;
        continue;
      }
      const float* e = ws.expert_out.data() + static_cast<int64_t>(p) * d;
      const float* g = grad_out + static_cast<int64_t>(tok[static_cast<size_t>(s)]) * d;
      double acc = 0.0;
      for (int64_t i = 0; i < d; ++i) acc += static_cast<double>(g[i]) * static_cast<double>(e[i]);
      grad_weight[s] = static_cast<float>(acc);
    }
  }

  /// The same for an unpadded batch of plan.num_tokens() tokens.
  [[nodiscard]] double executed_flops(const RoutingPlan& plan) const {
    return executed_flops(plan, Batch::single(plan.num_tokens(), hidden_size()));
  }

 private:
  template <class V>
  static void grow(V& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }

  // Grows the decode path's buffers to what any batch of at most `slots` slots and `Tr`
  // unpadded tokens can need there: at most kSplitRows rows per expert and shared expert.
  void reserve_split(int64_t slots, int64_t Tr, Workspace& ws, int nt) const
    requires SplittableBank<B>
  {
    const int64_t rows = std::min(slots, kSplitRows * num_experts());
    const int64_t shared_rows = shared_.empty() ? 0 : std::min(Tr, kSplitRows);
    const int64_t d = hidden_size();
    grow(ws.split_in, static_cast<size_t>((rows + shared_rows) * d));
    size_t h = experts_.split_hidden_floats(rows);
    if constexpr (SplittableBank<SB>)
      for (const SharedExpertOf<SB>& s : shared_) h += s.ffn.split_hidden_floats(shared_rows);
    grow(ws.split_h, h);
    const size_t tasks = static_cast<size_t>(num_experts()) + shared_.size();
    if (ws.split_hoff.capacity() < tasks) ws.split_hoff.reserve(tasks);
    const size_t pieces = tasks + 8 * static_cast<size_t>(nt);
    if (ws.pieces.capacity() < pieces) ws.pieces.reserve(pieces);
  }

  // Rows [begin, begin + n) of the plan's expert order into `block`, times their slot's
  // weight when the weight applies to the expert's input.
  void gather_expert_rows(const float* hidden, const RoutingPlan& plan, int64_t begin, int64_t n,
                          float* block) const noexcept {
    const int64_t d = hidden_size();
    const int32_t* rows = plan.expert_tokens().data() + begin;
    if (weight_on_input_) {
      kernels::gather_rows_scaled(hidden, d, rows, plan.expert_slots().data() + begin, plan.slot_weight().data(), n,
                                  block);
    } else {
      kernels::gather_rows(hidden, d, rows, n, block);
    }
  }

  // The decode path: gather every task's rows once, then two parallel stages over pieces
  // (task, strip range): the first matrices into split_h, then the down matrices into
  // expert_out / shared_out. Each piece computes whole output columns with the same kernels,
  // so the result equals the unsplit path bit for bit.
  void run_split(const float* hidden, const RoutingPlan& plan, bool padded, int64_t Tr, Workspace& ws, int nt) const
    requires SplittableBank<B>
  {
    const int64_t d = hidden_size(), kept = plan.num_kept();
    const bool routed = !ws.tasks.empty() && ws.tasks.front().expert >= 0;  // combine_outputs() runs shared tasks only
    const bool shared = !ws.tasks.empty() && ws.tasks.back().expert < 0;   // run_experts() runs routed tasks only
    grow(ws.split_in, static_cast<size_t>((kept + (shared ? Tr : 0)) * d));
    if (kept > 0 && routed) gather_expert_rows(hidden, plan, 0, kept, ws.split_in.data());
    const float* shared_in = hidden;
    if (shared && padded) {
      kernels::gather_rows(hidden, d, ws.unpadded.data(), Tr, ws.split_in.data() + kept * d);
      shared_in = ws.split_in.data() + kept * d;
    }
    // Hidden-activation offsets, scratch, and pieces per task (about 8 pieces per thread).
    const auto ntasks = static_cast<int64_t>(ws.tasks.size());
    ws.split_hoff.resize(static_cast<size_t>(ntasks));
    size_t h_total = 0, a_floats = 0;
    for (int64_t i = 0; i < ntasks; ++i) {
      const Workspace::Task& t = ws.tasks[static_cast<size_t>(i)];
      ws.split_hoff[static_cast<size_t>(i)] = h_total;
      const int64_t rows = t.end - t.begin;
      if (t.expert >= 0) {
        h_total += experts_.split_hidden_floats(rows);
        a_floats = std::max(a_floats, experts_.split_scratch_floats(rows));
      } else if constexpr (SplittableBank<SB>) {  // else no shared task reaches the split
        const SB& s = shared_[static_cast<size_t>(-1 - t.expert)].ffn;
        h_total += s.split_hidden_floats(rows);
        a_floats = std::max(a_floats, s.split_scratch_floats(rows));
      }
    }
    grow(ws.split_h, h_total);
    grow(ws.thread_scratch, a_floats * static_cast<size_t>(nt));
    const int64_t pieces_per_task = std::max<int64_t>(1, (8 * nt + ntasks - 1) / ntasks);
    for (int stage = 0; stage < 2; ++stage) {
      ws.pieces.clear();
      for (int64_t i = 0; i < ntasks; ++i) {
        const int32_t e = ws.tasks[static_cast<size_t>(i)].expert;
        int64_t strips = 0;
        if (e >= 0) {
          strips = experts_.split_strips(stage);
        } else if constexpr (SplittableBank<SB>) {
          strips = shared_[static_cast<size_t>(-1 - e)].ffn.split_strips(stage);
        }
        const int64_t n = std::min(pieces_per_task, std::max<int64_t>(strips, 1));
        for (int64_t p = 0; p < n; ++p)
          ws.pieces.push_back({static_cast<int32_t>(i), static_cast<int32_t>(strips * p / n),
                               static_cast<int32_t>(strips * (p + 1) / n)});
      }
      const auto npieces = static_cast<int64_t>(ws.pieces.size());
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t q = 0; q < npieces; ++q) {
        const Workspace::Piece pc = ws.pieces[static_cast<size_t>(q)];
        const Workspace::Task t = ws.tasks[static_cast<size_t>(pc.task)];
        float* a_pack = ws.thread_scratch.data() + a_floats * static_cast<size_t>(omp_get_thread_num());
        float* h = ws.split_h.data() + ws.split_hoff[static_cast<size_t>(pc.task)];
        const int64_t rows = t.end - t.begin;
        // run_split is noexcept (kernels on validated shapes): nothing to catch here.
        if (t.expert >= 0) {
          experts_.run_split(stage, t.expert, ws.split_in.data() + static_cast<int64_t>(t.begin) * d, rows, h,
                             ws.expert_out.data() + static_cast<int64_t>(t.begin) * d, a_pack, pc.s0, pc.s1);
        } else if constexpr (SplittableBank<SB>) {
          const size_t j = static_cast<size_t>(-1 - t.expert);
          shared_[j].ffn.run_split(stage, 0, shared_in + static_cast<int64_t>(t.begin) * d, rows, h,
                                   ws.shared_out.data() + (static_cast<int64_t>(j) * Tr + t.begin) * d, a_pack,
                                   pc.s0, pc.s1);
        }
      }
    }
  }

  R router_;
  B experts_;
  std::vector<SharedExpertOf<SB>> shared_;
  bool split_enabled_ = true;
  bool weight_on_input_ = false;
  std::vector<float> output_bias_;
  int64_t residual_ = -1;  // the shared expert with PR-MoE's residual coefficient, or -1
  bool check_finite_ = true;
  NonFiniteOutput non_finite_output_ = NonFiniteOutput::error;
};

}  // namespace moekit
#pragma GCC visibility pop
