// SPDX-License-Identifier: Apache-2.0
// Expert offloading: a layer that keeps at most C of its E experts resident and loads (and
// packs) a missing one on demand, e.g. from the memory-mapped checkpoint, with LRU or LFU
// eviction and a prefetch hook for the next layer's predicted experts.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "moekit/activations.hpp"
#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/layer.hpp"
#include "moekit/offload/locality.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::offload {

/// What a CachedFfnBank did since it was built (or reset_stats()).
struct CacheStats {
  int64_t hits = 0;          ///< experts a call needed that were resident
  int64_t misses = 0;        ///< experts a call needed that had to be loaded
  int64_t prefetched = 0;    ///< experts loaded by prefetch()
  int64_t evictions = 0;
  double bytes_loaded = 0;   ///< packed bytes of every load (misses and prefetches)
  double seconds_loading = 0;
};

/// An ExpertBank of E experts of one shape of which at most `capacity` are resident. `loader(e)`
/// returns expert e as a one-expert FfnBank (load_expert() reads and packs it from a mapped
/// checkpoint). make_resident() / prefetch() change what is resident between calls (not while
/// the layer runs); run() on a non-resident expert throws.
class CachedFfnBank {
 public:
  using Loader = std::function<FfnBank(int64_t expert)>;

  /// `policy`: lru or lfu (belady needs the future: replay_cache() gives its bound).
  CachedFfnBank(int64_t experts, FfnShape shape, int64_t capacity, Loader loader, CachePolicy policy = CachePolicy::lru)
      : shape_(shape), capacity_(capacity), loader_(std::move(loader)), policy_(policy) {
    shape_.validate("offload::CachedFfnBank");
    MOEKIT_CHECK(experts >= 1 && experts <= (int64_t{1} << 20), "offload::CachedFfnBank: experts expected in [1, 2^20], got ",
                 experts);
    MOEKIT_CHECK(capacity >= 1 && capacity <= experts, "offload::CachedFfnBank: capacity expected in [1, ", experts,
                 "], got ", capacity);
    MOEKIT_CHECK(policy == CachePolicy::lru || policy == CachePolicy::lfu,
                 "offload::CachedFfnBank: policy expected lru or lfu (belady is offline: replay_cache)");
    MOEKIT_CHECK(static_cast<bool>(loader_), "offload::CachedFfnBank: loader expected");
    slots_.resize(static_cast<size_t>(experts));
    last_.assign(static_cast<size_t>(experts), -1);
    freq_.assign(static_cast<size_t>(experts), 0);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return static_cast<int64_t>(slots_.size()); }
  [[nodiscard]] int64_t d_in() const noexcept { return shape_.hidden; }
  [[nodiscard]] int64_t d_out() const noexcept { return shape_.hidden; }
  /// Room for any loaded expert, smoothed (FfnBank input smoothing) or not.
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return FfnBank::scratch_floats_for(shape_, rows, true);
  }
  [[nodiscard]] double flops_per_row() const noexcept { return shape_.flops_per_row(); }
  [[nodiscard]] int64_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] CachePolicy policy() const noexcept { return policy_; }
  [[nodiscard]] bool resident(int64_t e) const noexcept {
    return e >= 0 && e < num_experts() && slots_[static_cast<size_t>(e)].has_value();
  }
  [[nodiscard]] int64_t num_resident() const noexcept { return resident_; }
  [[nodiscard]] const CacheStats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept { stats_ = {}; }

  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const {
    MOEKIT_CHECK(resident(e), "offload::CachedFfnBank: expert ", e, " is not resident (make_resident first)");
    slots_[static_cast<size_t>(e)]->run(0, in, rows, out, scratch);
  }

  /// One use of the experts `need` (distinct, at most capacity()): the resident ones are hits,
  /// each missing one (ascending id) is loaded, evicting by the policy among the resident experts
  /// not in `need`. Then their recency and frequency count this use. The rules of replay_cache().
  void make_resident(std::span<const int64_t> need) {
    MOEKIT_CHECK(static_cast<int64_t>(need.size()) <= capacity_, "offload::CachedFfnBank: ", need.size(),
                 " experts needed at once, capacity ", capacity_);
    std::vector<int64_t> sorted(need.begin(), need.end());
    std::sort(sorted.begin(), sorted.end());
    MOEKIT_CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(), "offload::CachedFfnBank: an expert listed twice");
    for (const int64_t e : sorted) {
      MOEKIT_CHECK(e >= 0 && e < num_experts(), "offload::CachedFfnBank: expert expected in [0, ", num_experts(), "), got ", e);
      if (resident(e)) {
        ++stats_.hits;
      } else {
        ++stats_.misses;
        load(e, sorted);
      }
    }
    ++clock_;
    for (const int64_t e : sorted) {
      last_[static_cast<size_t>(e)] = clock_;
      ++freq_[static_cast<size_t>(e)];
    }
  }

  /// Loads the predicted experts `next` that are not resident (in the given order, at most
  /// capacity()), evicting by the policy among resident experts not in `next`; not a use.
  void prefetch(std::span<const int64_t> next) {
    std::vector<int64_t> keep;
    for (const int64_t e : next) {
      if (static_cast<int64_t>(keep.size()) == capacity_) break;
      if (e < 0 || e >= num_experts() || std::find(keep.begin(), keep.end(), e) != keep.end()) continue;
      keep.push_back(e);
    }
    for (const int64_t e : keep)
      if (!resident(e)) {
        load(e, keep);
        ++stats_.prefetched;
      }
  }

  /// Drops every resident expert.
  void clear() noexcept {
    for (auto& s : slots_) s.reset();
    resident_ = 0;
  }

 private:
  void load(int64_t e, const std::vector<int64_t>& keep) {
    if (resident_ == capacity_) {
      int64_t victim = -1;
      for (int64_t c = 0; c < num_experts(); ++c) {
        if (!resident(c) || std::find(keep.begin(), keep.end(), c) != keep.end()) continue;
        const auto cc = static_cast<size_t>(c);
        if (victim < 0) {
          victim = c;
          continue;
        }
        const auto v = static_cast<size_t>(victim);
        const bool better = policy_ == CachePolicy::lru
                                ? last_[cc] < last_[v]
                                : (freq_[cc] < freq_[v] || (freq_[cc] == freq_[v] && last_[cc] < last_[v]));
        if (better) victim = c;
      }
      MOEKIT_CHECK(victim >= 0, "offload::CachedFfnBank: no expert to evict for expert ", e);
      slots_[static_cast<size_t>(victim)].reset();
      --resident_;
      ++stats_.evictions;
    }
    const auto t0 = std::chrono::steady_clock::now();
    FfnBank b = loader_(e);
    const FfnShape& s = b.shape();
    MOEKIT_CHECK(b.num_experts() == 1 && s.hidden == shape_.hidden && s.intermediate == shape_.intermediate &&
                     s.gated == shape_.gated && s.bias == shape_.bias && s.act == shape_.act && s.clamped == shape_.clamped &&
                     (!s.clamped || (s.glu.alpha == shape_.glu.alpha && s.glu.limit == shape_.glu.limit)),
                 "offload::CachedFfnBank: the loader returned a bank of ", b.num_experts(), " experts [", s.hidden, ", ",
                 s.intermediate, "] (or another activation, gating or bias), expected one expert of the bank's shape [",
                 shape_.hidden, ", ", shape_.intermediate, "]");
    stats_.bytes_loaded += b.weight_bytes_per_expert();
    slots_[static_cast<size_t>(e)] = std::move(b);
    ++resident_;
    stats_.seconds_loading += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  FfnShape shape_;
  int64_t capacity_;
  Loader loader_;
  CachePolicy policy_;
  std::vector<std::optional<FfnBank>> slots_;
  std::vector<int64_t> last_, freq_;
  int64_t clock_ = 0, resident_ = 0;
  CacheStats stats_;
};

static_assert(ExpertBank<CachedFfnBank>);

/// A layer whose routed experts live in a CachedFfnBank. forward() routes, makes the batch's
/// experts resident (in groups of at most capacity() when a batch needs more), runs them
/// through the layer's own machinery and combines: the output equals the fully resident
/// layer's bit for bit. prefetch() loads the next call's predicted experts on a background
/// thread while the engine computes something else (another layer); the next forward() on this
/// layer waits for it.
template <Router R>
class OffloadedLayer {
 public:
  explicit OffloadedLayer(SparseLayer<R, CachedFfnBank> layer) : layer_(std::move(layer)) {}
  /// Moving waits for the other's prefetch first (its thread points at the other object).
  OffloadedLayer(OffloadedLayer&& o) : layer_((o.wait(), std::move(o.layer_))), sub_(std::move(o.sub_)) {}
  OffloadedLayer& operator=(OffloadedLayer&& o) {
    if (this != &o) {
      wait();
      o.wait();
      layer_ = std::move(o.layer_);
      sub_ = std::move(o.sub_);
    }
    return *this;
  }
  ~OffloadedLayer() {
    try {
      wait();
    } catch (...) {  // a failed prefetch nobody waited for: nothing to report to at destruction
    }
  }

  [[nodiscard]] const SparseLayer<R, CachedFfnBank>& layer() const noexcept { return layer_; }
  [[nodiscard]] const CachedFfnBank& cache() const noexcept { return layer_.experts(); }
  [[nodiscard]] int64_t hidden_size() const noexcept { return layer_.hidden_size(); }
  [[nodiscard]] int64_t num_experts() const noexcept { return layer_.num_experts(); }

  void forward(const Batch& batch, const float* hidden, float* out, Workspace& ws, int threads = 0) {
    forward(batch, ActivationsIn::f32(hidden), ActivationsOut::f32(out), ws, threads);
  }
  void forward(const Batch& batch, ActivationsIn hidden, ActivationsOut out, Workspace& ws, int threads = 0) {
    wait();
    // Checked before the cache changes (combine_outputs() checks the view again).
    MOEKIT_CHECK(batch.tokens <= 0 || out.data != nullptr, "offload::OffloadedLayer::forward: out expected non-null for T = ",
                 batch.tokens);
    const float* x = layer_.route(batch, hidden, ws, threads, out);
    run_plan(batch, x, ws.plan, out, ws, threads);
  }

  /// forward() on a finalised plan made elsewhere (pre-gating: PreGatingRouter::route_all, whose
  /// active_experts() of this layer's plan went to prefetch() while an earlier layer ran). The
  /// same cache use and grouping as forward(); the output equals the resident layer's
  /// forward_plan() bit for bit.
  void forward_plan(const Batch& batch, const float* hidden, const RoutingPlan& plan, float* out, Workspace& ws,
                    int threads = 0) {
    forward_plan(batch, ActivationsIn::f32(hidden), plan, ActivationsOut::f32(out), ws, threads);
  }
  void forward_plan(const Batch& batch, ActivationsIn hidden, const RoutingPlan& plan, ActivationsOut out, Workspace& ws,
                    int threads = 0) {
    wait();
    MOEKIT_CHECK(batch.tokens <= 0 || out.data != nullptr,
                 "offload::OffloadedLayer::forward_plan: out expected non-null for T = ", batch.tokens);
    const float* x = layer_.accept_plan(batch, hidden, plan, ws, out);
    run_plan(batch, x, plan, out, ws, threads);
  }

  /// The experts this layer's router picks for `hidden` (e.g. the current layer's input, a
  /// common predictor of the next layer's routing), ascending.
  [[nodiscard]] std::vector<int64_t> predict(const Batch& batch, const float* hidden, Workspace& ws, int threads = 0) const {
    layer_.route(batch, ActivationsIn::f32(hidden), ws, threads);
    std::vector<int64_t> e;
    for (int64_t i = 0; i < num_experts(); ++i)
      if (ws.plan.kept_of(i) > 0) e.push_back(i);
    return e;
  }

  /// Starts loading `experts` (at most capacity(), in order) on a background thread.
  void prefetch(std::vector<int64_t> experts) {
    wait();
    pending_ = std::async(std::launch::async, [this, ex = std::move(experts)] { layer_.experts().prefetch(ex); });
  }
  /// Waits for a prefetch in flight; rethrows what its loader threw.
  void wait() {
    if (pending_.valid()) pending_.get();
  }

 private:
  // The plan's experts made resident (in groups when they do not fit), run, combined.
  void run_plan(const Batch& batch, const float* x, const RoutingPlan& plan, ActivationsOut out, Workspace& ws,
                int threads) {
    std::vector<int64_t> need;
    for (int64_t e = 0; e < num_experts(); ++e)
      if (plan.kept_of(e) > 0) need.push_back(e);
    CachedFfnBank& bank = layer_.experts();
    if (static_cast<int64_t>(need.size()) <= bank.capacity()) {
      bank.make_resident(need);
      layer_.run_experts(x, plan, ws, threads);
    } else {
      run_in_groups(x, plan, need, ws, threads);
    }
    layer_.combine_outputs(batch, x, plan, out, ws, threads);
  }

  // A batch needing more experts than fit: resident ones first, then the rest, each group made
  // resident and run on a plan of its own rows (token order kept, the same slot weights).
  void run_in_groups(const float* x, const RoutingPlan& plan, std::vector<int64_t> need, Workspace& ws, int threads) {
    CachedFfnBank& bank = layer_.experts();
    // The groups rebuild per-token expert lists: a (hand-built) plan listing an expert twice
    // for one token is refused here, before anything loads.
    const auto sexp = plan.slot_expert();
    const auto soff = plan.slot_offsets();
    for (int64_t t = 0; t < plan.num_tokens(); ++t)
      for (int32_t a = soff[static_cast<size_t>(t)]; a < soff[static_cast<size_t>(t) + 1]; ++a)
        for (int32_t b = a + 1; b < soff[static_cast<size_t>(t) + 1]; ++b)
          MOEKIT_CHECK(sexp[static_cast<size_t>(a)] != sexp[static_cast<size_t>(b)], "offload::OffloadedLayer: token ", t,
                       " lists expert ", sexp[static_cast<size_t>(a)], " twice; a plan needing more experts than the cache holds (",
                       bank.capacity(), ") must list each expert once per token");
    std::stable_partition(need.begin(), need.end(), [&](int64_t e) { return bank.resident(e); });
    const int64_t d = hidden_size(), T = plan.num_tokens(), C = bank.capacity();
    const auto rows = layer_.expert_rows(plan, ws);
    const auto offs = plan.expert_offsets();
    int64_t k = 0;
    for (int64_t t = 0; t < T; ++t) k = std::max(k, plan.slots_of(t));
    std::vector<int32_t> ids(static_cast<size_t>(T * k));
    std::vector<float> w(static_cast<size_t>(T * k));
    for (size_t g = 0; g < need.size(); g += static_cast<size_t>(C)) {
      const std::vector<int64_t> group(need.begin() + static_cast<std::ptrdiff_t>(g),
                                       need.begin() + static_cast<std::ptrdiff_t>(std::min(need.size(), g + static_cast<size_t>(C))));
      bank.make_resident(group);
      plan.to_topk(k, ids.data(), w.data());
      for (int32_t& id : ids)
        if (id >= 0 && std::find(group.begin(), group.end(), id) == group.end()) id = -1;
      sub_.plan.assign_topk(ids.data(), w.data(), T, k, num_experts());
      layer_.run_experts(x, sub_.plan, sub_, threads);
      const auto part = layer_.expert_rows(sub_.plan, sub_);
      const auto soffs = sub_.plan.expert_offsets();
      for (const int64_t e : group)  // expert e's rows: the same tokens in the same order in both plans
        std::copy_n(part.data() + static_cast<int64_t>(soffs[static_cast<size_t>(e)]) * d, plan.kept_of(e) * d,
                    rows.data() + static_cast<int64_t>(offs[static_cast<size_t>(e)]) * d);
    }
  }

  SparseLayer<R, CachedFfnBank> layer_;
  Workspace sub_;
  std::future<void> pending_;
};

}  // namespace moekit::offload
#pragma GCC visibility pop
