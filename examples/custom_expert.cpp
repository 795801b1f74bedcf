// SPDX-License-Identifier: Apache-2.0
// Extending moekit with a user-written expert functor: any type with d_in(), d_out(),
// scratch_floats(rows) and operator()(in [rows, d_in], rows, out [rows, d_out], scratch)
// satisfies moekit::Expert; FunctorBank turns E of them into a bank the layer can run.
#include <moekit/moekit.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

// A low-rank expert: y = B (tanh(A x)), A [r, d], B [d, r].
struct LowRankExpert {
  int64_t d, r;
  std::vector<float> A, B;

  int64_t d_in() const { return d; }
  int64_t d_out() const { return d; }
  size_t scratch_floats(int64_t rows) const { return static_cast<size_t>(rows * r); }
  void operator()(const float* in, int64_t rows, float* out, float* scratch) const {
    for (int64_t i = 0; i < rows; ++i) {
      float* h = scratch + i * r;
      for (int64_t j = 0; j < r; ++j) {
        float s = 0;
        for (int64_t c = 0; c < d; ++c) s += A[j * d + c] * in[i * d + c];
        h[j] = std::tanh(s);
      }
      for (int64_t c = 0; c < d; ++c) {
        float s = 0;
        for (int64_t j = 0; j < r; ++j) s += B[c * r + j] * h[j];
        out[i * d + c] = s;
      }
    }
  }
};
static_assert(moekit::Expert<LowRankExpert>);

int main() {
  const int64_t E = 4, d = 32, r = 8, T = 10;
  std::vector<LowRankExpert> experts;
  for (int64_t e = 0; e < E; ++e) {
    LowRankExpert x{d, r, std::vector<float>(r * d), std::vector<float>(d * r)};
    for (int64_t i = 0; i < r * d; ++i) x.A[i] = x.B[i] = 0.05f * static_cast<float>((i * (e + 3)) % 9) - 0.2f;
    experts.push_back(std::move(x));
  }
  std::vector<float> gate(E * d);
  for (size_t i = 0; i < gate.size(); ++i) gate[i] = 0.02f * static_cast<float>(i % 11) - 0.1f;
  moekit::SparseLayer layer(moekit::TopKRouter({.num_experts = E, .k = 2, .hidden = d, .norm_topk_prob = true}, gate),
                            moekit::FunctorBank<LowRankExpert>(std::move(experts)));
  std::vector<float> x(T * d), y(T * d);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  moekit::Workspace ws;
  layer.forward(moekit::Batch::single(T, d), x.data(), y.data(), ws);
  for (int64_t e = 0; e < E; ++e) std::printf("expert %lld serves %lld tokens\n", static_cast<long long>(e),
                                              static_cast<long long>(ws.plan.kept_of(e)));
}
