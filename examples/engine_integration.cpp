// SPDX-License-Identifier: Apache-2.0
// docs/integration.md's worked example: what an inference engine does with moekit.
//  1. Its hidden states are bf16 rows inside a larger buffer (a row pitch wider than d).
//  2. It routes itself (its own gate and top-k): RoutingPlan::from_topk builds the plan.
//  3. It runs the layer on its own thread pool (std::thread here): begin / run_task /
//     combine / finish, no OpenMP in its path; the output is written back as bf16 in place.
//  4. It checks the result against moekit's one-call forward_plan (the same bits).
#include <moekit/moekit.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

namespace {

uint16_t to_bf16(float x) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

int main() {
  const int64_t E = 8, k = 2, d = 64, f = 96, T = 24, pitch = d + 32;  // pitch: elements per row
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](size_t n, float scale) {
    std::vector<float> v(n);
    for (float& x : v) x = scale * normal(rng);
    return v;
  };

  // The MoE block's experts (the engine loads them from its checkpoint).
  moekit::FfnBank experts(E, {.hidden = d, .intermediate = f, .gated = true, .act = moekit::Activation::silu});
  for (int64_t e = 0; e < E; ++e) {
    const auto g = randn(f * d, 0.1f), u = randn(f * d, 0.1f), dn = randn(d * f, 0.1f);
    experts.set_expert(e, g.data(), u.data(), dn.data());  // HF layout: [out, in]
  }
  const std::vector<float> gate = randn(E * d, 0.2f);
  moekit::SparseLayer layer(moekit::TopKRouter({.num_experts = E, .k = k, .hidden = d}, gate), std::move(experts));

  // 1. bf16 hidden states, row t at buf[t * pitch].
  std::vector<uint16_t> buf(static_cast<size_t>(T * pitch), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < d; ++j) buf[t * pitch + j] = to_bf16(normal(rng));
  const moekit::Batch batch = moekit::Batch::single(T, d);
  const auto in = moekit::ActivationsIn::bf16(buf.data(), pitch);

  // 2. The engine's own routing: softmax over its gate's logits, top-k, renormalised.
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<float> weights(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> x(d), p(E);
    moekit::kernels::bf16_to_f32(buf.data() + t * pitch, x.data(), d);
    for (int64_t e = 0; e < E; ++e) {
      p[e] = 0.0f;
      for (int64_t j = 0; j < d; ++j) p[e] += gate[e * d + j] * x[j];
    }
    std::vector<int32_t> order(E);
    for (int32_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += std::exp(p[order[j]] - p[order[0]]);
    for (int64_t j = 0; j < k; ++j) {
      ids[t * k + j] = order[j];
      weights[t * k + j] = std::exp(p[order[j]] - p[order[0]]) / sum;
    }
  }
  const moekit::RoutingPlan plan = moekit::RoutingPlan::from_topk(ids.data(), weights.data(), T, k, E);

  // The one-call reference: forward_plan, bf16 out to a separate buffer.
  std::vector<uint16_t> want(static_cast<size_t>(T * pitch), 0);
  moekit::Workspace ws_ref;
  layer.forward_plan(batch, in, plan, moekit::ActivationsOut::bf16(want.data(), pitch), ws_ref, /*threads=*/1);

  // 3. The engine's pool: two workers take tasks from a shared counter, then split the combine
  // ggml-style (ith / nth). The output overwrites the input rows (in place).
  const int workers = 2;
  moekit::Workspace ws;  // one per layer call in flight; reused across calls
  const auto out = moekit::ActivationsOut::bf16(buf.data(), pitch);
  layer.begin(batch, in, plan, ws, workers, out);  // converts the input once, lays out the tasks
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w)
    pool.emplace_back([&, w] {
      for (int64_t i; (i = next.fetch_add(1)) < layer.num_tasks(ws);) layer.run_task(batch, ws, i, w);
    });
  for (auto& th : pool) th.join();
  pool.clear();
  for (int w = 0; w < workers; ++w) pool.emplace_back([&, w] { layer.combine(batch, out, ws, w, w, workers); });
  for (auto& th : pool) th.join();
  layer.finish(batch, out, ws);  // NaN / infinity check of the output

  // 4. Same bits as the one-call path.
  int64_t differ = 0;
  for (int64_t t = 0; t < T; ++t) differ += std::memcmp(&buf[t * pitch], &want[t * pitch], d * sizeof(uint16_t)) != 0;
  std::printf("%lld tokens, %lld tasks on %d engine threads; rows differing from forward_plan: %lld\n",
              static_cast<long long>(T), static_cast<long long>(layer.num_tasks(ws)), workers,
              static_cast<long long>(differ));
  return differ == 0 ? 0 : 1;
}
