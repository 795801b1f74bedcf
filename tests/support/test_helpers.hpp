// SPDX-License-Identifier: Apache-2.0
// Helpers the router test files share: a seeded random source, error-message checks, plan
// reading, and random SwiGLU experts as a reference Ffn plus the library bank holding them.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"
#include "moekit/routing_plan.hpp"
#include "reference/reference.hpp"

namespace test_support {

struct Rng {
  explicit Rng(uint64_t seed) : g(seed) {}
  std::mt19937_64 g;
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  bool coin(double p) { return uniform(0.0, 1.0) < p; }
  std::vector<float> vec(size_t n, double a) {
    std::vector<float> v(n);
    for (float& x : v) x = static_cast<float>(uniform(-a, a));
    return v;
  }
};

/// The first 20 messages, one per line.
inline std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 20; ++i) s += "\n  " + v[i];
  if (v.size() > 20) s += "\n  ... " + std::to_string(v.size() - 20) + " more";
  return s;
}

/// Expects `f()` to throw moekit::error whose message contains every needle.
template <class F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected moekit::error mentioning \"" << needles.front() << "\", nothing thrown";
  } catch (const moekit::error& e) {
    for (const std::string& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos)
          << "message \"" << e.what() << "\" does not mention \"" << n << "\"";
  }
}

/// Token t's slot experts / weights in slot order.
inline std::vector<int32_t> experts_of(const moekit::RoutingPlan& p, int64_t t) {
  const auto b = p.slot_offsets()[static_cast<size_t>(t)], e = p.slot_offsets()[static_cast<size_t>(t) + 1];
  return {p.slot_expert().begin() + b, p.slot_expert().begin() + e};
}
inline std::vector<float> weights_of(const moekit::RoutingPlan& p, int64_t t) {
  const auto b = p.slot_offsets()[static_cast<size_t>(t)], e = p.slot_offsets()[static_cast<size_t>(t) + 1];
  return {p.slot_weight().begin() + b, p.slot_weight().begin() + e};
}

/// The same floats bit for bit (memcmp, which must not see the null data() of empty spans).
inline bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

/// A random SwiGLU expert `[f, d]` / `[d, f]` of unit-variance activations.
inline ref::Ffn random_ref_ffn(Rng& rng, int64_t d, int64_t f) {
  ref::Ffn r;
  r.hidden = d;
  r.intermediate = f;
  r.gated = true;
  r.act = ref::Activation::silu;
  const double a_in = std::sqrt(3.0 / double(d)), a_out = std::sqrt(3.0 / double(f));
  r.gate = rng.vec(static_cast<size_t>(f * d), a_in);
  r.up = rng.vec(static_cast<size_t>(f * d), a_in);
  r.down = rng.vec(static_cast<size_t>(d * f), a_out);
  return r;
}

/// The library bank of SwiGLU experts `experts` (f32).
inline moekit::FfnBank bank_of(const std::vector<ref::Ffn>& experts, int64_t d, int64_t f) {
  moekit::FfnBank bank(static_cast<int64_t>(experts.size()), moekit::FfnShape{d, f, true, moekit::Activation::silu});
  for (size_t e = 0; e < experts.size(); ++e)
    bank.set_expert(static_cast<int64_t>(e), experts[e].gate.data(), experts[e].up.data(), experts[e].down.data());
  return bank;
}

}  // namespace test_support
