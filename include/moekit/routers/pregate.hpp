// SPDX-License-Identifier: Apache-2.0
// Pre-gating (Read-ME, Cai et al., arXiv 2410.19123): every layer's experts are decided from
// the token embeddings before the stack runs, so an engine knows each layer's expert set in
// advance and can prefetch (offload::OffloadedLayer::prefetch, CachedFfnBank::prefetch, or its
// own madvise loop) while earlier layers compute. Each layer then runs its plan with
// SparseLayer::forward_plan().
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/error.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// The experts a finalised plan runs (kept slots), ascending: what to prefetch for its layer.
inline std::vector<int64_t> active_experts(const RoutingPlan& plan) {
  MOEKIT_CHECK(plan.finalized(), "active_experts: plan expected finalized, got a plan without finalize()");
  std::vector<int64_t> e;
  for (int64_t i = 0; i < plan.num_experts(); ++i)
    if (plan.kept_of(i) > 0) e.push_back(i);
  return e;
}

/// L layers' routing decided up front. Each layer l has a top-k router (any TopKOptions: scores,
/// normalisation, groups, capacity) whose input is the token embeddings, `gates[l] [E_l, d_emb]`;
/// or the engine's own pre-gating network supplies the logits (plans_from_logits).
class PreGatingRouter {
 public:
  /// One TopKRouter per layer, all reading the embedding width (their `hidden`).
  explicit PreGatingRouter(std::vector<TopKRouter> layers) : layers_(std::move(layers)) {
    MOEKIT_CHECK(!layers_.empty(), "pregate router: expected at least one layer, got 0");
    for (size_t l = 1; l < layers_.size(); ++l)
      MOEKIT_CHECK(layers_[l].hidden_size() == layers_[0].hidden_size(), "pregate router: layer ", l,
                   " embedding width expected ", layers_[0].hidden_size(), ", got ", layers_[l].hidden_size());
  }
  [[nodiscard]] int64_t num_layers() const noexcept { return static_cast<int64_t>(layers_.size()); }
  [[nodiscard]] int64_t embedding_size() const noexcept { return layers_[0].hidden_size(); }
  [[nodiscard]] const TopKRouter& layer(int64_t l) const { return layers_.at(static_cast<size_t>(l)); }

  /// Routes `embeddings [T, d_emb]` for every layer: `plans[l]` finalised (resized to L).
  /// `scratch.sub[l].logits` holds layer l's logits afterwards.
  void route_all(const Batch& batch, const float* embeddings, std::vector<RoutingPlan>& plans, RouterScratch& scratch,
                 int threads = 0) const {
    plans.resize(layers_.size());
    scratch.sub.resize(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) layers_[l].route(batch, embeddings, plans[l], scratch.sub[l], threads);
  }

  /// The same from the logits of the engine's pre-gating network, `logits[l] [T, E_l]` (e.g. a
  /// small transformer over the embeddings, as Read-ME trains): selection, weights and capacity
  /// of each layer's options (TopKRouter::route_logits).
  void plans_from_logits(const Batch& batch, const std::vector<std::span<const float>>& logits,
                         std::vector<RoutingPlan>& plans, RouterScratch& scratch, int threads = 0) const {
    MOEKIT_CHECK(logits.size() == layers_.size(), "pregate router: expected logits for ", layers_.size(),
                 " layers, got ", logits.size());
    plans.resize(layers_.size());
    scratch.sub.resize(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l)
      layers_[l].route_logits(batch, logits[l], plans[l], scratch.sub[l], threads);
  }

 private:
  std::vector<TopKRouter> layers_;
};

}  // namespace moekit
#pragma GCC visibility pop
