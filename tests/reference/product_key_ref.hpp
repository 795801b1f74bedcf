// SPDX-License-Identifier: Apache-2.0
// Independent double-precision reference of product-key routing (ROUTING.md section 7; PEER
// arXiv 2407.04202): the brute-force top-k over all n^2 expert scores log p_x(i) + log p_y(j),
// and atomic experts act(u . x) v. Plain loops; includes no moekit header.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.hpp"

namespace ref::product_key {

struct Params {
  int64_t num_experts = 0, k = 0, hidden = 0;
  bool split_query = false;
};

/// Brute force over all E: slots (expert i n + j, weight p_x(i) p_y(j)) in descending score,
/// ties to the lower id; TokenRouting::selection holds all E scores and order their order.
Routing route(const Params& p, const float* keys_x, const float* keys_y, const float* x, int64_t T,
              const uint8_t* padding);

/// act(u_e . x) v_e in double (u = down [E, d], v = up [E, d]).
std::vector<double> atomic_expert(const float* down, const float* up, int64_t d, int64_t e, Activation act,
                                  const std::vector<double>& x);

}  // namespace ref::product_key
