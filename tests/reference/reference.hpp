// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of the token-choice top-k router family and the
// sparse MoE layer (ROUTING.md sections 0 and 1), for tests and benchmarks.
//
// Written for clarity with plain loops; shares no code with the library: reference.cpp
// includes no moekit header and every type here is its own. The comparison helpers at the
// end read a library plan through a template (its public accessors only) into plain
// vectors, so this header needs no moekit header either. No GoogleTest here: the benchmark
// binary compiles reference.cpp too.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace ref {

// ------------------------------------------------------------------------ routing
enum class ScoreFunc { softmax, sigmoid };
enum class DropPolicy { score, position, position_slot_major };
/// Group score: sum of the best two (DeepSeek-V3), the best (DeepSeek-V2), the sum of the best
/// k / topk_group (Megatron).
enum class GroupScore { top2_sum, max, topk_sum };

/// Mirrors ROUTING.md section 1 (all in double).
struct TopKParams {
  int64_t num_experts = 0;  ///< E
  int64_t k = 0;
  int64_t hidden = 0;       ///< d
  ScoreFunc score_func = ScoreFunc::softmax;
  bool topk_then_softmax = false;   ///< select on L (+ bias), weights softmax(L[I])
  bool select_on_logits = false;    ///< sel = L + b, weights still the scores
  bool norm_topk_prob = false;      ///< w / (sum w + 1e-20)
  double norm_p = 0.0;              ///< > 0: w / (sum w^p)^(1/p)
  double sparsemixer_eps = 0.0;     ///< > 0: PhiMoE SparseMixer (k = 2), see reference.cpp
  bool uniform_weights = false;     ///< ReMix: every selected weight 1 / k (before scaling)
  double routed_scaling_factor = 1.0;
  std::vector<double> bias;         ///< [E] selection-only bias; empty = none
  int64_t n_group = 0;              ///< <= 1: no groups
  int64_t topk_group = 0;
  GroupScore group_score = GroupScore::top2_sum;
  double capacity_factor = 0.0;     ///< 0 = dropless
  int64_t min_capacity = 0;
  DropPolicy drop_policy = DropPolicy::score;
  bool renormalize_after_drop = false;
};

struct Slot {
  int64_t expert = 0;
  double weight = 0.0;  ///< final combine weight (0 when dropped)
  bool dropped = false;
};

struct TokenRouting {
  bool padded = false;
  std::vector<Slot> slots;            ///< k slots in slot order (none when padded)
  std::vector<double> selection;      ///< [E] selection scores by expert id, after group masking (-inf)
  std::vector<int64_t> order;         ///< all E experts by descending selection, ties to the lower id
  std::vector<double> group_scores;   ///< [n_group] (grouped routers only)
  std::vector<int64_t> group_order;   ///< groups by descending score, ties to the lower group
};

struct Routing {
  int64_t tokens = 0;
  int64_t experts = 0;
  int64_t k = 0;
  int64_t capacity = -1;  ///< -1 when dropless
  DropPolicy drop_policy = DropPolicy::score;
  std::vector<TokenRouting> token;
  std::vector<int64_t> kept_of;     ///< [E]
  std::vector<int64_t> dropped_of;  ///< [E]
  /// Score policy: smallest relative gap between the last kept and the first dropped
  /// combine weight of an over-full expert (+inf when no expert overflowed; 0 for an exact
  /// tie, which fp32 reproduces when it is structural, e.g. k = 1 with renormalisation).
  double capacity_boundary_gap = std::numeric_limits<double>::infinity();
};

/// Routes `x [T, d]` with the gate weight `W [E, d]` (HF layout). `padding [T]` (1 = padded)
/// may be null.
Routing route_topk(const TopKParams& p, const float* gate_weight, const float* x, int64_t T,
                   const uint8_t* padding = nullptr);

/// Per expert keeps `C` slots of `r` in `policy` order (ROUTING.md section 1), marks the rest
/// dropped with weight 0, optionally rescales each token's survivors to sum to
/// `renormalize_to`, and fills r.capacity, r.kept_of and r.dropped_of. C < 0: dropless.
void apply_capacity(Routing& r, int64_t C, DropPolicy policy, bool renormalize, double renormalize_to);

/// C = max(min_capacity, ceil((double(T_routed * k) / E) * capacity_factor)), -1 if dropless.
int64_t capacity(const TopKParams& p, int64_t routed_tokens);

/// |a - b| / max(|a|, |b|); +inf when b (or a) is -inf and the other is finite; 0 when equal.
double relative_gap(double a, double b);
/// Indices 0..n-1 by descending value, ties to the lower index.
std::vector<int64_t> descending_order(const std::vector<double>& v);
/// Softmax with the maximum subtracted.
std::vector<double> softmax(const std::vector<double>& x);
/// Relative gap between the last chosen and the first unchosen selection score, and (grouped
/// routers) between the last kept and the first masked group score. +inf if nothing unchosen.
double boundary_gap(const TokenRouting& t, int64_t k);
/// Smallest relative gap between consecutive chosen selection scores (slot order ties).
double order_gap(const TokenRouting& t, int64_t k);

// ------------------------------------------------------------------------ experts / layer
enum class Activation { silu, gelu, gelu_tanh, relu };

double activate(Activation a, double x);

/// One FFN expert, HF [out, in] layout: gated `down(act(gate x) * up x)`, plain `down(act(up x))`.
struct Ffn {
  int64_t hidden = 0;        ///< d
  int64_t intermediate = 0;  ///< f
  bool gated = true;
  Activation act = Activation::silu;
  std::vector<float> gate;   ///< [f, d] (gated only)
  std::vector<float> up;     ///< [f, d]
  std::vector<float> down;   ///< [d, f]
};

/// An always-on expert: `sigmoid(gate . x) * ffn(x)`, or `ffn(x)` when `gate` is empty.
struct Shared {
  Ffn ffn;
  std::vector<float> gate;  ///< [d] or empty
  /// DeepSpeed PR-MoE residual coefficient [2, d] and bias [2] (empty: none): c = softmax(W x + b),
  /// the routed sum times c_0 plus this expert times c_1.
  std::vector<float> coefficient{}, coefficient_bias{};
};

std::vector<double> ffn_forward(const Ffn& f, const std::vector<double>& x);

/// A routed expert as a function of its index and one row.
using ExpertFn = std::function<std::vector<double>(int64_t expert, const std::vector<double>& x)>;

/// y_t = sum over kept slots of w * E_e(x_t) + shared experts; 0 for padded tokens. [T, d].
/// With `weight_on_input`: sum of E_e(fl(w x_t)) (the weight applied to the expert's input,
/// the product rounded to float as the layer computes it).
std::vector<double> moe_forward(const Routing& r, const ExpertFn& experts,
                                const std::vector<Shared>& shared, const float* x, int64_t T,
                                int64_t d, bool weight_on_input = false);
std::vector<double> moe_forward(const Routing& r, const std::vector<Ffn>& experts,
                                const std::vector<Shared>& shared, const float* x, int64_t T,
                                int64_t d, bool weight_on_input = false);

// ------------------------------------------------------------------------ comparison support
/// A library plan copied into plain vectors (see view_of).
struct PlanView {
  int64_t tokens = 0, experts = 0, num_slots = 0, num_kept = 0, num_dropped = 0;
  bool finalized = false;
  std::vector<int32_t> slot_offsets, slot_expert, slot_token, slot_position;
  std::vector<float> slot_weight;
  std::vector<uint8_t> slot_dropped;
  std::vector<int32_t> expert_offsets, expert_slots, expert_tokens;
  std::vector<int64_t> kept_of, dropped_of;
};

/// Copies any plan with RoutingPlan's public reading accessors.
template <class Plan>
PlanView view_of(const Plan& p) {
  PlanView v;
  auto copy = [](auto span, auto& out) { out.assign(span.begin(), span.end()); };
  v.tokens = p.num_tokens();
  v.experts = p.num_experts();
  v.num_slots = p.num_slots();
  v.num_kept = p.num_kept();
  v.num_dropped = p.num_dropped();
  v.finalized = p.finalized();
  copy(p.slot_offsets(), v.slot_offsets);
  copy(p.slot_expert(), v.slot_expert);
  copy(p.slot_weight(), v.slot_weight);
  copy(p.slot_dropped(), v.slot_dropped);
  copy(p.slot_token(), v.slot_token);
  copy(p.slot_position(), v.slot_position);
  copy(p.expert_offsets(), v.expert_offsets);
  copy(p.expert_slots(), v.expert_slots);
  copy(p.expert_tokens(), v.expert_tokens);
  for (int64_t e = 0; e < v.experts; ++e) {
    v.kept_of.push_back(p.kept_of(e));
    v.dropped_of.push_back(p.dropped_of(e));
  }
  return v;
}

/// The library's decisions as a reference Routing (to run moe_forward on exactly them).
Routing routing_from_view(const PlanView& v, const uint8_t* padding);

/// Invariants of a finalised plan: CSR shapes, the expert side a stable counting sort of
/// the kept slots (tokens ascending), counts, dropped slots weight 0, padded tokens no slot,
/// unpadded tokens `k` slots (k < 0: any). Returns one message per violation.
std::vector<std::string> plan_invariant_errors(const PlanView& v, const uint8_t* padding, int64_t k);

struct CompareOptions {
  double tie_rel = 1e-6;          ///< near-tie threshold on selection scores (ROUTING.md s. 0)
  bool exclude_near_ties = true;  ///< false for deliberate exact-tie tests
  double weight_rel = 1e-4;
  double weight_abs = 1e-6;
};

struct CompareReport {
  int64_t compared = 0;         ///< unpadded tokens whose choices were compared exactly
  int64_t near_tie = 0;         ///< unpadded tokens excluded for a selection near-tie
  int64_t capacity_excluded = 0;  ///< tokens excluded since a near-tie may move a capacity decision
  int64_t padded = 0;
  std::vector<uint8_t> excluded;  ///< [T] 1 = not compared (outputs should skip it too)
  std::vector<std::string> errors;
};

/// Compares expert choices (exactly, in slot order unless chosen scores near-tie), dropped
/// flags and weights (relative + absolute tolerance) of a plan against the reference.
CompareReport compare_routing(const Routing& want, const PlanView& got, const CompareOptions& o = {});

/// Compares `got [n]` with `want [n]`: |got - want| <= rel |want| + abs_floor_frac * max|want|.
/// Rows (`width` values each) with skip_rows[r] != 0 are skipped (skip_rows may be empty).
std::vector<std::string> compare_values(const std::vector<double>& want, const float* got, int64_t width,
                                        double rel, double abs_floor_frac,
                                        const std::vector<uint8_t>& skip_rows = {});

/// max |v|.
double max_abs(const std::vector<double>& v);

}  // namespace ref
