// SPDX-License-Identifier: Apache-2.0
// Layerwise recurrent router (RMoE, Qiu et al. arXiv 2408.06793): one GRU cell shared by all
// MoE layers carries a router state over depth; each layer projects its input, steps the
// cell and routes on the new state with the Mixtral rule (ROUTING.md section 4).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "moekit/batch.hpp"
#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/router.hpp"
#include "moekit/routers/topk.hpp"
#include "moekit/routing_plan.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// The recurrent cell of the router (JSON `variant`).
enum class GruVariant {
  gru,  ///< torch.nn.GRUCell: gates r, z, n
  rnn,  ///< torch.nn.RNNCell with tanh: `h = tanh(W_in x + b_in + W_hn h_prev + b_hn)`
};

/// The recurrent cell shared by every MoE layer's GruRouter (hold it in a
/// `std::shared_ptr<const GruCell>`). Input and state are both `[d_r]`. Weights in
/// torch.nn.GRUCell layout: `weight_ih`, `weight_hh [G d_r, d_r]`, `bias_ih`, `bias_hh
/// [G d_r]`, G = 3 gate blocks in the order r, z, n for `gru`, G = 1 for `rnn`. The matrices
/// are packed once for kernels::gemm_packed (the packed copy is the only one). Immutable after
/// construction, so any number of routers may step it concurrently.
class GruCell {
 public:
  GruCell(GruVariant variant, int64_t d_r, const std::vector<float>& weight_ih,
          const std::vector<float>& weight_hh, std::vector<float> bias_ih,
          std::vector<float> bias_hh)
      : variant_(variant), d_r_(d_r), bias_ih_(std::move(bias_ih)), bias_hh_(std::move(bias_hh)) {
    MOEKIT_CHECK(variant_ == GruVariant::gru || variant_ == GruVariant::rnn,
                 "gru cell: variant expected gru or rnn, got ", static_cast<int>(variant_));
    MOEKIT_CHECK(d_r_ >= 1, "gru cell: d_r expected >= 1, got ", d_r_);
    const auto rows = static_cast<size_t>(gates() * d_r_), n = static_cast<size_t>(d_r_);
    check_tensor("router.gru.weight_ih", weight_ih, rows, n);
    check_tensor("router.gru.weight_hh", weight_hh, rows, n);
    check_tensor("router.gru.bias_ih", bias_ih_, rows, 1);
    check_tensor("router.gru.bias_hh", bias_hh_, rows, 1);
    w_ih_.pack(weight_ih.data(), gates() * d_r_, d_r_, d_r_);
    w_hh_.pack(weight_hh.data(), gates() * d_r_, d_r_, d_r_);
  }

  [[nodiscard]] GruVariant variant() const noexcept { return variant_; }
  /// d_r: width of the cell's input and of the router state.
  [[nodiscard]] int64_t state_size() const noexcept { return d_r_; }
  /// Gate blocks G: 3 (r, z, n) for gru, 1 for rnn.
  [[nodiscard]] int64_t gates() const noexcept { return variant_ == GruVariant::gru ? 3 : 1; }
  /// `router.gru.weight_ih [G d_r, d_r]` (unpacked copy).
  [[nodiscard]] std::vector<float> weight_ih() const { return unpack(w_ih_); }
  /// `router.gru.weight_hh [G d_r, d_r]` (unpacked copy).
  [[nodiscard]] std::vector<float> weight_hh() const { return unpack(w_hh_); }
  [[nodiscard]] const std::vector<float>& bias_ih() const noexcept { return bias_ih_; }
  [[nodiscard]] const std::vector<float>& bias_hh() const noexcept { return bias_hh_; }

  /// Floats of scratch one step() of `rows` rows needs.
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return static_cast<size_t>(2 * rows * gates() * d_r_) + kernels::packed_a_floats(rows, d_r_);
  }
  /// FLOPs of one step of one row (the two matrix products; the pointwise gates ignored).
  [[nodiscard]] double flops_per_step() const noexcept {
    return 4.0 * static_cast<double>(gates()) * static_cast<double>(d_r_) *
           static_cast<double>(d_r_);
  }

  /// One step for `rows` tokens: `h [rows, d_r]` (row stride ldo) from inputs `x [rows, d_r]`
  /// (stride ldx) and states `h_prev [rows, d_r]` (stride ldh; null means zeros, bitwise the
  /// result of explicit zero rows). `h` may alias `h_prev` with the same stride. fp32; each
  /// row's result depends on that row only (kernels::gemm_packed sums sequentially over k),
  /// so it is the same whatever `rows` and however a batch is split.
  void step(int64_t rows, const float* x, int64_t ldx, const float* h_prev, int64_t ldh, float* h,
            int64_t ldo, float* scratch) const noexcept {
    const int64_t n = d_r_, G = gates(), w = G * n;
    float* gi = scratch;        // [rows, G d_r]: x W_ih^T
    float* gh = gi + rows * w;  // [rows, G d_r]: h_prev W_hh^T
    float* a_pack = gh + rows * w;
    kernels::gemm_packed(rows, x, ldx, w_ih_, gi, w, a_pack);
    if (h_prev != nullptr) {
      kernels::gemm_packed(rows, h_prev, ldh, w_hh_, gh, w, a_pack);
    } else {
      std::fill(gh, gh + rows * w, 0.0f);  // what the GEMM gives for zero rows: +0
    }
    for (int64_t t = 0; t < rows; ++t) {
      float* a = gi + t * w;
      float* b = gh + t * w;
      for (int64_t i = 0; i < w; ++i) {
        a[i] += bias_ih_[static_cast<size_t>(i)];
        b[i] += bias_hh_[static_cast<size_t>(i)];
      }
      float* out = h + t * ldo;
      const float* hp = h_prev != nullptr ? h_prev + t * ldh : nullptr;
      // Gates (run-time dispatched row kernel: PyTorch's GRUCell / RNNCell formulas).
      kernels::gru_gates(variant_ == GruVariant::rnn, a, b, hp, out, n);  // out may alias hp
    }
  }

 private:
  static std::vector<float> unpack(const kernels::PackedMatrix& m) {
    std::vector<float> w(static_cast<size_t>(m.n() * m.k()));
    for (int64_t r = 0; r < m.n(); ++r) m.unpack_row(r, false, w.data() + r * m.k());
    return w;
  }

  static void check_tensor(const char* name, const std::vector<float>& w, size_t rows,
                           size_t cols) {
    if (cols == 1) {
      MOEKIT_CHECK(w.size() == rows, "gru cell: ", name, " expected [", rows, "] values, got ",
                   w.size());
    } else {
      MOEKIT_CHECK(w.size() == rows * cols, "gru cell: ", name, " expected [", rows, ", ", cols,
                   "] = ", rows * cols, " values, got ", w.size());
    }
    detail::check_finite(w, "gru cell", name, cols == 1 ? 0 : cols);
  }

  GruVariant variant_;
  int64_t d_r_;
  kernels::PackedMatrix w_ih_;
  kernels::PackedMatrix w_hh_;
  std::vector<float> bias_ih_;
  std::vector<float> bias_hh_;
};

/// Parameters of the recurrent router (ROUTING.md section 4); field names are the JSON keys
/// of `{"router": {"type": "gru", ...}}` (`hidden` comes from the top-level `hidden_size`).
struct GruRouterOptions {
  int64_t num_experts = 0;               ///< E
  int64_t k = 0;                         ///< experts per token
  int64_t hidden = 0;                    ///< d
  int64_t d_r = 256;                     ///< router state width
  GruVariant variant = GruVariant::gru;  ///< the shared cell's kind
  /// Multiplies the k renormalised weights (RMoE's `moe_weight` when the model has a shared
  /// expert); finite and > 0.
  float routed_scaling_factor = 1.0f;

  /// Throws moekit::error naming the first invalid parameter.
  void validate() const {
    MOEKIT_CHECK(num_experts >= 1, "gru router: num_experts (E) expected >= 1, got ", num_experts);
    MOEKIT_CHECK(k >= 1 && k <= num_experts, "gru router: k expected in [1, E = ", num_experts,
                 "], got ", k);
    MOEKIT_CHECK(hidden >= 1, "gru router: hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(d_r >= 1, "gru router: d_r expected >= 1, got ", d_r);
    MOEKIT_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0,
                 "gru router: routed_scaling_factor expected finite and > 0, got ", routed_scaling_factor);
    MOEKIT_CHECK(variant == GruVariant::gru || variant == GruVariant::rnn,
                 "gru router: variant expected gru or rnn, got ", static_cast<int>(variant));
  }
};

/// One MoE layer's recurrent router: `x = W1 X_t` (`router.proj.weight [d_r, d]`), one step
/// of the shared cell from `batch.router_state` (zeros when empty) to the new state `h`,
/// logits `L = W2 h` (`router.out.weight [E, d_r]`), then softmax, top-k (ties to the lower
/// expert id) and renormalisation of the k weights. The new state `[T, d_r]` is left in
/// `RouterScratch::state`; the caller passes it on as the next layer's `batch.router_state`.
/// Padded tokens get no slot and keep their state unchanged (zeros when the input state is
/// empty). Const and thread-safe; the cell is shared read-only.
class GruRouter {
 public:
  /// `proj_weight [d_r, d]` (`router.proj.weight`), `out_weight [E, d_r]`
  /// (`router.out.weight`); the cell's d_r and variant must match the options.
  GruRouter(GruRouterOptions options, std::shared_ptr<const GruCell> cell,
            const std::vector<float>& proj_weight, std::vector<float> out_weight)
      : opt_(options), cell_(std::move(cell)), topk_(make_topk(opt_, out_weight)) {
    MOEKIT_CHECK(cell_ != nullptr, "gru router: cell expected a GruCell, got null");
    MOEKIT_CHECK(cell_->state_size() == opt_.d_r,
                 "gru router: cell state size expected d_r = ", opt_.d_r, ", got ",
                 cell_->state_size());
    MOEKIT_CHECK(cell_->variant() == opt_.variant, "gru router: cell variant expected ",
                 variant_name(opt_.variant), ", got ", variant_name(cell_->variant()));
    const auto d = static_cast<size_t>(opt_.hidden), dr = static_cast<size_t>(opt_.d_r);
    MOEKIT_CHECK(proj_weight.size() == dr * d, "gru router: router.proj.weight expected [", dr,
                 ", ", d, "] = ", dr * d, " values, got ", proj_weight.size());
    detail::check_finite(proj_weight, "gru router", "router.proj.weight", d);
    proj_.pack(proj_weight.data(), opt_.d_r, opt_.hidden, opt_.hidden);
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return opt_.num_experts; }
  [[nodiscard]] int64_t hidden_size() const noexcept { return opt_.hidden; }
  [[nodiscard]] int64_t k() const noexcept { return opt_.k; }
  /// d_r: width of `batch.router_state` and of `RouterScratch::state`.
  [[nodiscard]] int64_t state_size() const noexcept { return opt_.d_r; }
  [[nodiscard]] const GruRouterOptions& options() const noexcept { return opt_; }
  [[nodiscard]] const std::shared_ptr<const GruCell>& cell() const noexcept { return cell_; }
  /// `router.proj.weight [d_r, d]` (unpacked copy).
  [[nodiscard]] std::vector<float> proj_weight() const {
    std::vector<float> w(static_cast<size_t>(opt_.d_r * opt_.hidden));
    for (int64_t r = 0; r < opt_.d_r; ++r) proj_.unpack_row(r, false, w.data() + r * opt_.hidden);
    return w;
  }
  /// `router.out.weight [E, d_r]`.
  [[nodiscard]] const std::vector<float>& out_weight() const noexcept { return topk_.weight(); }

  /// Router FLOPs per routed token (projection, cell step, output logits).
  [[nodiscard]] double flops_per_token() const noexcept {
    const auto d = static_cast<double>(opt_.hidden), dr = static_cast<double>(opt_.d_r);
    return 2.0 * dr * d + cell_->flops_per_step() +
           2.0 * static_cast<double>(opt_.num_experts) * dr;
  }

  /// Routes `hidden [T, d]` into `plan` (finalised) and writes the new state `[T, d_r]` to
  /// `scratch.state` (`scratch.logits` holds the `[T, E]` logits). `batch.router_state` may
  /// be `scratch.state` itself (in-place threading). Throws moekit::error for a wrong
  /// router_state size or a non-finite router input, projection or state.
  void route(const Batch& batch, const float* hidden, RoutingPlan& plan, RouterScratch& scratch,
             int threads = 0) const {
    batch.validate(opt_.hidden);
    const int64_t T = batch.tokens, d = opt_.hidden, dr = opt_.d_r;
    MOEKIT_CHECK(T == 0 || hidden != nullptr,
                 "gru router: hidden states pointer is null for T = ", T);
    const std::span<const float> prev = batch.router_state;
    MOEKIT_CHECK(prev.empty() || static_cast<int64_t>(prev.size()) == T * dr,
                 "gru router: Batch.router_state expected [T, d_r] = [", T, ", ", dr,
                 "] = ", T * dr, " values (or empty for zeros), got ", prev.size());
    detail::check_finite(prev, "gru router", "Batch.router_state", static_cast<size_t>(dr));

    // Token blocks: at most kMaxBlock rows, at least one block per thread. Each row's result
    // depends on that row only, so the split changes nothing but the speed. Small batches run
    // on one thread (a parallel region costs more than it saves there).
    const double work = static_cast<double>(T) * flops_per_token();
    const int nt = work >= kParallelFlops ? detail::resolve_threads(threads) : 1;
    const int64_t blocks =
        T == 0 ? 0 : std::max<int64_t>(std::min<int64_t>(nt, T), (T + kMaxBlock - 1) / kMaxBlock);
    const int64_t B = blocks == 0 ? 0 : (T + blocks - 1) / blocks;
    const size_t per_thread =
        static_cast<size_t>(2 * B * dr) + kernels::packed_a_floats(B, d) + cell_->scratch_floats(B);
    // Same size as `prev` when that is the old state: no reallocation, in-place stays valid.
    scratch.state.resize(static_cast<size_t>(T * dr));
    if (scratch.buffer.size() < per_thread * static_cast<size_t>(nt))
      scratch.buffer.resize(per_thread * static_cast<size_t>(nt));
    if (scratch.index.size() < static_cast<size_t>(T)) scratch.index.resize(static_cast<size_t>(T));
    int32_t* bad = scratch.index.data();  // per token: 1 = non-finite projection

    // Projection x = X W1^T and the cell step, per token block.
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && blocks > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t t0 = blk * B, m = std::min(B, T - t0);
      if (m <= 0) continue;
      float* x = scratch.buffer.data() +
                 per_thread * static_cast<size_t>(omp_get_thread_num());  // [m, d_r]
      float* h = x + B * dr;                                              // [m, d_r]
      float* a_pack = h + B * dr;
      float* cell_scratch = a_pack + kernels::packed_a_floats(B, d);
      const float* hp = prev.empty() ? nullptr : prev.data() + t0 * dr;
      kernels::gemm_packed(m, hidden + t0 * d, d, proj_, x, dr, a_pack);
      for (int64_t i = 0; i < m; ++i)
        bad[t0 + i] =
            !batch.is_padding(t0 + i) && kernels::first_non_finite(x + i * dr, dr) >= 0 ? 1 : 0;
      cell_->step(m, x, dr, hp, dr, h, dr, cell_scratch);
      for (int64_t i = 0; i < m; ++i) {
        float* dst = scratch.state.data() + (t0 + i) * dr;
        if (!batch.is_padding(t0 + i))
          kernels::copy_row(h + i * dr, dst, dr);
        else if (hp == nullptr)
          kernels::zero_row(dst, dr);  // padded: the state passes through
        else if (hp + i * dr != dst)
          kernels::copy_row(hp + i * dr, dst, dr);
      }
    }
    for (int64_t t = 0; t < T; ++t)
      MOEKIT_CHECK(bad[t] == 0,
                   "gru router: projection router.proj.weight x hidden_states of token ", t,
                   " expected finite, got NaN or Inf (NaN or Inf in hidden_states, or overflow)");

    // Logits L = W2 h, softmax, top-k, renormalise: the top-k router run on the states.
    Batch on_state = batch;
    on_state.hidden = dr;
    on_state.router_state = {};
    const double logit_work = 2.0 * static_cast<double>(T * opt_.num_experts * dr);
    topk_.route(on_state, scratch.state.data(), plan, scratch,
                logit_work >= kParallelFlops ? threads : 1);
  }

  static const char* variant_name(GruVariant v) noexcept {
    return v == GruVariant::gru ? "gru" : "rnn";
  }

  /// Most tokens per block of the projection and cell GEMMs.
  static constexpr int64_t kMaxBlock = 96;
  /// Router FLOPs of a call below which it runs on one thread (results never depend on it).
  static constexpr double kParallelFlops = 1 << 20;

 private:
  static TopKRouter make_topk(const GruRouterOptions& o, std::vector<float>& w) {
    o.validate();
    const auto E = static_cast<size_t>(o.num_experts), dr = static_cast<size_t>(o.d_r);
    MOEKIT_CHECK(w.size() == E * dr, "gru router: router.out.weight expected [", E, ", ", dr,
                 "] = ", E * dr, " values, got ", w.size());
    detail::check_finite(w, "gru router", "router.out.weight", dr);
    TopKOptions t;
    t.num_experts = o.num_experts;
    t.k = o.k;
    t.hidden = o.d_r;
    t.score_func = ScoreFunc::softmax;
    t.norm_topk_prob = true;  // the Mixtral rule
    t.routed_scaling_factor = o.routed_scaling_factor;
    return TopKRouter(t, std::move(w));
  }

  GruRouterOptions opt_;
  std::shared_ptr<const GruCell> cell_;
  TopKRouter topk_;             ///< E x d_r output layer with the Mixtral rule
  kernels::PackedMatrix proj_;  ///< router.proj.weight, packed
};

static_assert(Router<GruRouter>);

}  // namespace moekit
#pragma GCC visibility pop
