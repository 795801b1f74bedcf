// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of the prototype routers (ROUTING.md section 6):
// ProMoE (arXiv 2510.24711) with its routing contrastive loss, and nearest-centroid routing
// with one k-means step (MixER). Plain loops written for clarity; includes no moekit header
// (only the top-k reference's Routing type, to run ref::moe_forward on these decisions).
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.hpp"

namespace ref::prototype {

/// Mirrors ROUTING.md section 6, ProMoE.
struct ProMoEParams {
  int64_t num_experts = 0;  ///< E routed experts; expert E is the unconditional one
  int64_t k = 0;
  int64_t hidden = 0;  ///< d
  double tau_r = 1.0;
  int32_t uncond_token_type = 1;
};

/// One token's routing.
struct TokenDecision {
  bool padded = false;
  bool unconditional = false;    ///< ProMoE: routed to the unconditional expert E
  std::vector<int64_t> experts;  ///< slot order
  std::vector<double> weights;   ///< per slot
  /// `[E]` selection score by expert id: ProMoE the cosine, nearest centroid the negative
  /// squared distance. Empty for padded and unconditional tokens.
  std::vector<double> score;
  std::vector<int64_t> order;  ///< the E experts by descending score, ties to the lower id
  /// Magnitude of the terms the score is computed from (near-tie floor): 1 for cosines,
  /// `||x||^2 + max_e ||c_e||^2` for squared distances.
  double tie_scale = 1.0;
  /// `[E]` what the library leaves in RouterScratch::logits: ProMoE `s / tau_r`, nearest
  /// centroid `-||x - c_e||^2`; zeros for padded (and unconditional) tokens.
  std::vector<double> logits;
};

struct Decisions {
  int64_t tokens = 0;
  int64_t experts = 0;  ///< experts of the plan (ProMoE: E + 1)
  std::vector<TokenDecision> token;
};

/// ProMoE: `prototypes [E, d]`, `x [T, d]`; `padding [T]` (1 = padded) and `token_types [T]`
/// may be null (no padding; all conditional).
Decisions route_promoe(const ProMoEParams& p, const float* prototypes, const float* x, int64_t T,
                       const uint8_t* padding, const int32_t* token_types);

/// ProMoE routing contrastive loss: `top1[t]` is token t's top-1 routed expert, or -1 for
/// tokens that do not take part (padded, unconditional). Temperature default 0.1.
double routing_contrastive_loss(const float* prototypes, int64_t E, int64_t d, const float* x,
                                int64_t T, const std::vector<int64_t>& top1,
                                double temperature = 0.1);

/// Nearest centroid, top-1, weight 1: `centroids [E, d]`, `x [T, d]`, `padding` may be null.
Decisions route_centroid(const float* centroids, int64_t E, int64_t d, const float* x, int64_t T,
                         const uint8_t* padding);

struct KMeans {
  std::vector<double> centroids;    ///< `[E, d]` after the step
  std::vector<int64_t> counts;      ///< `[E]`
  std::vector<int64_t> assignment;  ///< `[T]`, -1 for padded tokens
  double inertia = 0.0;             ///< sum of squared distances to the old centroids
};

/// One k-means step (assignment by route_centroid, then means; empty clusters keep theirs).
KMeans kmeans_step(const float* centroids, int64_t E, int64_t d, const float* x, int64_t T,
                   const uint8_t* padding);

/// |a - b| / max(|a|, |b|, tie_scale) between the k-th and (k+1)-th scores in `order`
/// (+inf when k = E or the token has no scores).
double boundary_gap(const TokenDecision& t, int64_t k);
/// Smallest such gap between consecutive chosen scores (slot-order near-ties).
double order_gap(const TokenDecision& t, int64_t k);

/// The decisions as a top-k reference Routing (for ref::moe_forward).
Routing as_routing(const Decisions& d);

}  // namespace ref::prototype
