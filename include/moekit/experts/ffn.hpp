// SPDX-License-Identifier: Apache-2.0
// Feed-forward experts: SwiGLU (gated SiLU), gated GeLU, and plain GeLU / ReLU FFNs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/activation.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/progress.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Shape of one FFN expert. Gated: `down(act(gate x) * up x)` (SwiGLU when act = silu);
/// plain: `down(act(up x))`. Weights in HF `[out, in]` layout.
struct FfnShape {
  int64_t hidden = 0;        ///< d
  int64_t intermediate = 0;  ///< f
  bool gated = true;
  Activation act = Activation::silu;
  /// Gated only: gpt-oss's clamped SwiGLU `clamped_swiglu(glu, gate x, up x)` (activation.hpp)
  /// instead of `act(gate x) * up x` (`act` is then unused).
  bool clamped = false;
  ClampedSwiglu glu{};
  /// Biases on the first projection(s) and on down (gpt-oss): zero until
  /// FfnBank::set_expert_bias() sets them; added to the sums before the activation.
  bool bias = false;

  void validate(const char* who) const {
    MOEKIT_CHECK(hidden >= 1, who, ": hidden size (d) expected >= 1, got ", hidden);
    MOEKIT_CHECK(intermediate >= 1, who, ": intermediate size (f) expected >= 1, got ", intermediate);
    MOEKIT_CHECK(static_cast<int>(act) >= 0 && static_cast<int>(act) <= static_cast<int>(Activation::relu), who,
                 ": activation expected silu, gelu, gelu_tanh or relu, got enum value ", static_cast<int>(act));
    MOEKIT_CHECK(!clamped || gated, who, ": the clamped SwiGLU expected with gated experts");
    MOEKIT_CHECK(!clamped || (std::isfinite(glu.alpha) && std::isfinite(glu.limit) && glu.limit > 0), who,
                 ": clamped SwiGLU alpha expected finite and limit finite and > 0, got alpha ", glu.alpha,
                 ", limit ", glu.limit);
  }
  /// FLOPs of one row through one expert.
  [[nodiscard]] double flops_per_row() const noexcept {
    return 2.0 * static_cast<double>(hidden) * static_cast<double>(intermediate) * (gated ? 3.0 : 2.0);
  }
  /// Weight values of one expert.
  [[nodiscard]] int64_t weights_per_expert() const noexcept {
    return hidden * intermediate * (gated ? 3 : 2);
  }
  /// Bias values of one expert (0 without `bias`).
  [[nodiscard]] int64_t biases_per_expert() const noexcept {
    return bias ? intermediate * (gated ? 2 : 1) + hidden : 0;
  }
};

/// E FFN experts of one shape. Weights are packed once, in set_expert(), into the GEMM's
/// strip layout (kernels::PackedMatrix), stored as `pack.type` (kernels::WeightType);
/// for gated experts gate and up are interleaved so one GEMM computes both and the activation
/// runs in its epilogue. The packed copy is the only one.
class FfnBank {
 public:
  FfnBank() = default;
  /// A bank of `num_experts` experts with zero weights; fill them with set_expert().
  FfnBank(int64_t num_experts, FfnShape shape, kernels::PackOptions pack = {})
      : shape_(shape), experts_(num_experts), pack_(pack) {
    shape_.validate("FfnBank");
    MOEKIT_CHECK(num_experts >= 1, "FfnBank: num_experts expected >= 1, got ", num_experts);
    MOEKIT_CHECK(static_cast<size_t>(pack_.type) < std::size(kernels::kWeightTypes),
                 "FfnBank: weight type expected one of kernels::kWeightTypes, got enum value ",
                 static_cast<int>(pack_.type));
    in_.resize(static_cast<size_t>(num_experts));
    down_.resize(static_cast<size_t>(num_experts));
    if (shape_.bias) biases_.assign(static_cast<size_t>(num_experts * shape_.biases_per_expert()), 0.0f);
    const std::vector<float> zero(static_cast<size_t>(shape_.hidden * shape_.intermediate), 0.0f);
    for (int64_t e = 0; e < num_experts; ++e) pack_expert(e, zero.data(), zero.data(), zero.data());
  }
  /// A bank whose experts see their input divided channel-wise by `input_smoothing` `[d]`
  /// (finite, > 0), with every gate / up column j multiplied by `input_smoothing[j]` before it
  /// is packed: the same function in real arithmetic, `W x = (W diag(s)) (diag(s)^-1 x)`, with
  /// the input's outlier channels moved into the weights (SmoothQuant; EAQuant's router-
  /// consistent smoothing, tools/eaquant.hpp, which computes s). set_expert() and get_expert()
  /// take and return the unsmoothed weights. An empty vector is no smoothing.
  FfnBank(int64_t num_experts, FfnShape shape, kernels::PackOptions pack, std::vector<float> input_smoothing)
      : FfnBank(num_experts, shape, pack) {
    set_smoothing(std::move(input_smoothing), "FfnBank");
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return experts_; }
  [[nodiscard]] int64_t d_in() const noexcept { return shape_.hidden; }
  [[nodiscard]] int64_t d_out() const noexcept { return shape_.hidden; }
  [[nodiscard]] const FfnShape& shape() const noexcept { return shape_; }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept {
    return scratch_floats_for(shape_, rows, !smooth_.empty());
  }
  /// Scratch floats of `rows` rows through an expert of `shape`: enough for any bank of that
  /// shape with `smoothed` (input smoothing adds `rows * d`), for unsmoothed banks without.
  [[nodiscard]] static size_t scratch_floats_for(const FfnShape& shape, int64_t rows, bool smoothed = false) noexcept {
    return static_cast<size_t>(rows * shape.intermediate) +
           kernels::packed_a_floats(rows, std::max(shape.hidden, shape.intermediate)) +
           (smoothed ? static_cast<size_t>(rows * shape.hidden) : 0);
  }

  /// Packs expert e's weights: `gate [f, d]` (gated only, else ignored and may be null),
  /// `up [f, d]`, `down [d, f]`, all HF `[out, in]` layout.
  void set_expert(int64_t e, const float* gate, const float* up, const float* down_w) {
    MOEKIT_CHECK(e >= 0 && e < experts_, "FfnBank::set_expert: expert expected in [0, ", experts_, "), got ", e);
    MOEKIT_CHECK(!shape_.gated || gate != nullptr, "FfnBank::set_expert: gated expert ", e, " needs a gate weight");
    MOEKIT_CHECK(up != nullptr && down_w != nullptr, "FfnBank::set_expert: expert ", e, " needs up and down weights");
    const int64_t d = shape_.hidden, f = shape_.intermediate;
    // Non-finite weights would silently poison every token routed here: refuse them.
    auto finite = [&](const float* w, int64_t rows, int64_t cols, const char* name) {
      const int64_t i = kernels::first_non_finite(w, rows * cols);
      if (i >= 0)
        detail::fail("FfnBank::set_expert: expert ", e, " ", name, "[", i / cols, ", ", i % cols,
                     "] expected finite, got ", w[i]);
    };
    if (shape_.gated) finite(gate, f, d, "gate");
    finite(up, f, d, "up");
    finite(down_w, d, f, "down");
    if (!smooth_.empty()) {  // gate / up columns times s: the packed weights see x / s
      std::vector<float> g(shape_.gated ? static_cast<size_t>(f * d) : 0), u(static_cast<size_t>(f * d));
      for (int64_t r = 0; r < f; ++r)
        for (int64_t j = 0; j < d; ++j) {
          const float s = smooth_[static_cast<size_t>(j)];
          if (shape_.gated) g[static_cast<size_t>(r * d + j)] = gate[r * d + j] * s;
          u[static_cast<size_t>(r * d + j)] = up[r * d + j] * s;
        }
      // s up to ~1e25 can overflow a large weight: refuse, as for non-finite weights.
      if (shape_.gated) finite(g.data(), f, d, "gate times the input smoothing");
      finite(u.data(), f, d, "up times the input smoothing");
      pack_expert(e, g.data(), u.data(), down_w);
    } else {
      pack_expert(e, gate, up, down_w);
    }
    detail::report_progress("expert packed", static_cast<int64_t>(weight_bytes_per_expert()));
  }

 private:
  void pack_expert(int64_t e, const float* gate, const float* up, const float* down_w) {
    const int64_t d = shape_.hidden, f = shape_.intermediate;
    if (shape_.gated) {
      in_[static_cast<size_t>(e)].pack_gated(gate, up, f, d, d, pack_);
    } else {
      in_[static_cast<size_t>(e)].pack(up, f, d, d, pack_);
    }
    down_[static_cast<size_t>(e)].pack(down_w, d, f, f, pack_);
  }

 public:

  /// Sets expert e's biases (shape().bias only): `gate_b [f]` (gated only, else ignored and may
  /// be null), `up_b [f]`, `down_b [d]`; kept in f32.
  void set_expert_bias(int64_t e, const float* gate_b, const float* up_b, const float* down_b) {
    MOEKIT_CHECK(shape_.bias, "FfnBank::set_expert_bias: the bank was built without biases (FfnShape::bias)");
    MOEKIT_CHECK(e >= 0 && e < experts_, "FfnBank::set_expert_bias: expert expected in [0, ", experts_, "), got ", e);
    MOEKIT_CHECK((!shape_.gated || gate_b != nullptr) && up_b != nullptr && down_b != nullptr,
                 "FfnBank::set_expert_bias: expert ", e, " needs every bias (gate, up, down)");
    const int64_t d = shape_.hidden, f = shape_.intermediate;
    auto put = [&](const float* src, int64_t n, float* dst, const char* name) {
      const int64_t i = kernels::first_non_finite(src, n);
      if (i >= 0) detail::fail("FfnBank::set_expert_bias: expert ", e, " ", name, "[", i, "] expected finite, got ", src[i]);
      std::copy(src, src + n, dst);
    };
    if (shape_.gated) put(gate_b, f, bias_gate(e), "gate bias");
    put(up_b, f, bias_up(e), "up bias");
    put(down_b, d, bias_down(e), "down bias");
  }

  /// Expert e's biases (null without shape().bias): `[f]` gate (gated only), `[f]` up, `[d]` down.
  [[nodiscard]] const float* gate_bias(int64_t e) const noexcept {
    return shape_.bias && shape_.gated ? biases_.data() + e * shape_.biases_per_expert() : nullptr;
  }
  [[nodiscard]] const float* up_bias(int64_t e) const noexcept {
    return shape_.bias ? biases_.data() + e * shape_.biases_per_expert() + (shape_.gated ? shape_.intermediate : 0)
                       : nullptr;
  }
  [[nodiscard]] const float* down_bias(int64_t e) const noexcept {
    return shape_.bias ? biases_.data() + (e + 1) * shape_.biases_per_expert() - shape_.hidden : nullptr;
  }

  /// How the weights are stored (type, bf16 activations, kernel).
  [[nodiscard]] const kernels::PackOptions& pack_options() const noexcept { return pack_; }
  /// Expert e's packed matrices: gate/up (or up) `[f, d]` and down `[d, f]` (to save them).
  [[nodiscard]] const kernels::PackedMatrix& in_matrix(int64_t e) const { return in_.at(static_cast<size_t>(e)); }
  [[nodiscard]] const kernels::PackedMatrix& down_matrix(int64_t e) const { return down_.at(static_cast<size_t>(e)); }
  /// Every expert's biases (shape().bias): per expert `[f]` gate (gated), `[f]` up, `[d]` down.
  [[nodiscard]] const std::vector<float>& biases() const noexcept { return biases_; }

  /// A bank over matrices packed elsewhere, e.g. PackedMatrix::view()s of a file `moekit pack`
  /// wrote, mapped: `in[e]` is expert e's gate/up matrix (PackedMatrix::pack_gated; for a
  /// gated shape) or up matrix `[f, d]`, `down[e]` its down matrix `[d, f]`, all of one weight
  /// type; `biases` as biases() (shape.bias), else empty. Nothing is packed or copied.
  /// `input_smoothing` as the constructor's: the smoothing the matrices were packed with
  /// (input_smoothing() of the bank they came from), empty for none.
  static FfnBank from_packed(FfnShape shape, std::vector<kernels::PackedMatrix> in, std::vector<kernels::PackedMatrix> down,
                             std::vector<float> biases = {}, std::vector<float> input_smoothing = {}) {
    shape.validate("FfnBank::from_packed");
    const auto E = static_cast<int64_t>(in.size());
    MOEKIT_CHECK(E >= 1 && down.size() == in.size(), "FfnBank::from_packed: expected as many down as gate/up matrices, ",
                 "at least one, got ", in.size(), " and ", down.size());
    const kernels::PackedMatrix& first = in.front();
    for (int64_t e = 0; e < E; ++e) {
      const kernels::PackedMatrix& a = in[static_cast<size_t>(e)];
      const kernels::PackedMatrix& b = down[static_cast<size_t>(e)];
      MOEKIT_CHECK(a.n() == shape.intermediate && a.k() == shape.hidden && a.gated() == shape.gated &&
                       b.n() == shape.hidden && b.k() == shape.intermediate && !b.gated(),
                   "FfnBank::from_packed: expert ", e, " matrices expected [", shape.intermediate, ", ", shape.hidden, "]",
                   shape.gated ? " gated" : "", " and [", shape.hidden, ", ", shape.intermediate, "], got [", a.n(), ", ",
                   a.k(), "]", a.gated() ? " gated" : "", " and [", b.n(), ", ", b.k(), "]", b.gated() ? " gated" : "");
      for (const kernels::PackedMatrix* m : {&a, &b})
        MOEKIT_CHECK(m->weight_type() == first.weight_type() && m->bf16_activations() == first.bf16_activations() &&
                         m->f16_scales() == first.f16_scales(),
                     "FfnBank::from_packed: expert ", e, " is ", kernels::to_string(m->weight_type()),
                     ", expected every matrix as expert 0's (", kernels::to_string(first.weight_type()), ")");
    }
    MOEKIT_CHECK(biases.size() == (shape.bias ? static_cast<size_t>(E * shape.biases_per_expert()) : size_t{0}),
                 "FfnBank::from_packed: biases expected ", shape.bias ? E * shape.biases_per_expert() : 0, " values, got ",
                 biases.size());
    for (size_t i = 0; i < biases.size(); ++i)
      MOEKIT_CHECK(std::isfinite(biases[i]), "FfnBank::from_packed: bias ", i, " expected finite, got ", biases[i]);
    FfnBank bank;
    bank.shape_ = shape;
    bank.experts_ = E;
    bank.pack_.type = first.weight_type();
    bank.pack_.bf16_activations = first.bf16_activations();
    bank.pack_.f16_scales = first.f16_scales();
    bank.in_ = std::move(in);
    bank.down_ = std::move(down);
    bank.biases_ = std::move(biases);
    bank.set_smoothing(std::move(input_smoothing), "FfnBank::from_packed");
    return bank;
  }
  /// The input smoothing s `[d]` (empty for none): experts compute on `x / s` with gate / up
  /// columns packed as `W diag(s)`.
  [[nodiscard]] const std::vector<float>& input_smoothing() const noexcept { return smooth_; }
  [[nodiscard]] kernels::WeightType weight_type() const noexcept { return pack_.type; }

  /// Recovers expert e's weights in HF layout (gate may be null for plain experts).
  void get_expert(int64_t e, float* gate, float* up, float* down_w) const {
    const int64_t d = shape_.hidden, f = shape_.intermediate;
    const auto& in = in_[static_cast<size_t>(e)];
    for (int64_t r = 0; r < f; ++r) {
      if (shape_.gated && gate != nullptr) in.unpack_row(r, false, gate + r * d);
      in.unpack_row(r, shape_.gated, up + r * d);
    }
    for (int64_t r = 0; r < d; ++r) down_[static_cast<size_t>(e)].unpack_row(r, false, down_w + r * f);
    if (!smooth_.empty())  // the stored columns are W diag(s)
      for (int64_t r = 0; r < f; ++r)
        for (int64_t j = 0; j < d; ++j) {
          const float s = smooth_[static_cast<size_t>(j)];
          if (shape_.gated && gate != nullptr) gate[r * d + j] /= s;
          up[r * d + j] /= s;
        }
  }

  /// The activated first projection(s) of expert e, `h [rows, f]` (`act(gate x) * up x` for
  /// gated experts, `act(up x)` for plain ones, biases and smoothing included): what down
  /// multiplies. For calibration (EAQuant's down-projection statistics); `scratch` holds
  /// scratch_floats(rows).
  void hidden_activations(int64_t e, const float* in, int64_t rows, float* h, float* scratch) const noexcept {
    first_half(e, in, rows, h, scratch, 0, -1);
  }

  /// Runs expert e on `in [rows, d]` into `out [rows, d]`; scratch holds scratch_floats(rows).
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const noexcept {
    const int64_t d = shape_.hidden, f = shape_.intermediate;
    float* h = scratch;
    float* a_pack = scratch + rows * f;  // then the smoothed rows (first_half)
    first_half(e, in, rows, h, a_pack, 0, -1);
    kernels::gemm_packed_bias(rows, h, f, down_[static_cast<size_t>(e)], down_bias(e), out, d, a_pack);
  }

  // ---- Column-split execution (decode): threads share one expert's work. Stage 0 writes
  // columns of `h [rows, f]` for strips [s0, s1) of the first matrix; stage 1, after every
  // stage-0 piece of the expert is done, writes columns of `out [rows, d]` for strips
  // [s0, s1) of the down matrix. Results are bit-identical to run() for any split.

  /// Strips of stage 0 (first matrix) or stage 1 (down matrix).
  [[nodiscard]] int64_t split_strips(int stage) const noexcept {
    return experts_ == 0 ? 0 : (stage == 0 ? in_[0].strips() : down_[0].strips());
  }
  /// Floats of the hidden activations `h` of `rows` rows.
  [[nodiscard]] size_t split_hidden_floats(int64_t rows) const noexcept {
    return static_cast<size_t>(rows * shape_.intermediate);
  }
  /// Floats of `a_pack` one split piece needs.
  [[nodiscard]] size_t split_scratch_floats(int64_t rows) const noexcept {
    return kernels::packed_a_floats(rows, std::max(shape_.hidden, shape_.intermediate)) + smoothed_rows_floats(rows);
  }
  /// One piece of the split: stage 0 reads `in [rows, d]`, writes `h`; stage 1 reads `h`,
  /// writes `out [rows, d]`.
  void run_split(int stage, int64_t e, const float* in, int64_t rows, float* h, float* out, float* a_pack,
                 int64_t s0, int64_t s1) const noexcept {
    const int64_t d = shape_.hidden, f = shape_.intermediate;
    (void)d;
    if (stage == 0) {
      first_half(e, in, rows, h, a_pack, s0, s1);
    } else {
      kernels::gemm_packed_bias(rows, h, f, down_[static_cast<size_t>(e)], down_bias(e), out, d, a_pack, s0, s1);
    }
  }

  /// FLOPs of one row through one expert.
  [[nodiscard]] double flops_per_row() const noexcept { return shape_.flops_per_row(); }
  /// Bytes of one expert's weights as stored after packing (values, scales and biases).
  [[nodiscard]] double weight_bytes_per_expert() const noexcept {
    return experts_ == 0 ? 0.0
                         : static_cast<double>(in_[0].bytes() + down_[0].bytes()) +
                               4.0 * static_cast<double>(shape_.biases_per_expert());
  }

 private:
  float* bias_gate(int64_t e) noexcept { return const_cast<float*>(gate_bias(e)); }
  float* bias_up(int64_t e) noexcept { return const_cast<float*>(up_bias(e)); }
  float* bias_down(int64_t e) noexcept { return const_cast<float*>(down_bias(e)); }

  // Floats of `rows` smoothed input rows (0 without smoothing).
  [[nodiscard]] size_t smoothed_rows_floats(int64_t rows) const noexcept {
    return smooth_.empty() ? 0 : static_cast<size_t>(rows * shape_.hidden);
  }

  void set_smoothing(std::vector<float> s, const char* who) {
    if (s.empty()) return;
    MOEKIT_CHECK(static_cast<int64_t>(s.size()) == shape_.hidden, who, ": input smoothing expected [", shape_.hidden,
                 "] values, got ", s.size());
    for (size_t j = 0; j < s.size(); ++j)
      MOEKIT_CHECK(std::isfinite(s[j]) && s[j] > 0.0f && std::isfinite(1.0f / s[j]), who, ": input smoothing[", j,
                   "] expected finite and > 0 (with a finite reciprocal), got ", s[j]);
    inv_smooth_.resize(s.size());
    for (size_t j = 0; j < s.size(); ++j) inv_smooth_[j] = 1.0f / s[j];
    smooth_ = std::move(s);
  }

  // `h [rows, f]` = the activated first projection(s) of expert e, strips [s0, s1). `a_pack`
  // holds packed_a_floats(rows, max(d, f)), then (with smoothing) the rows `in / s`.
  void first_half(int64_t e, const float* in, int64_t rows, float* h, float* a_pack, int64_t s0,
                  int64_t s1) const noexcept {
    const int64_t d = shape_.hidden, f = shape_.intermediate;
    const auto& w_in = in_[static_cast<size_t>(e)];
    if (!smooth_.empty()) {
      float* xs = a_pack + kernels::packed_a_floats(rows, std::max(d, f));
      for (int64_t r = 0; r < rows; ++r) kernels::mul_rows(in + r * d, inv_smooth_.data(), xs + r * d, d);
      in = xs;
    }
    if (shape_.clamped) {
      kernels::gemm_packed_gated_clamped(rows, in, d, w_in, shape_.glu, gate_bias(e), up_bias(e), h, f, a_pack, s0, s1);
    } else if (shape_.gated) {
      if (shape_.bias)
        kernels::gemm_packed_gated_bias(rows, in, d, w_in, shape_.act, gate_bias(e), up_bias(e), h, f, a_pack, s0, s1);
      else
        kernels::gemm_packed_gated(rows, in, d, w_in, shape_.act, h, f, a_pack, s0, s1);
    } else {
      kernels::gemm_packed_act(rows, in, d, w_in, shape_.act, h, f, a_pack, s0, s1, up_bias(e));
    }
  }

  FfnShape shape_{};
  int64_t experts_ = 0;
  kernels::PackOptions pack_{};
  std::vector<kernels::PackedMatrix> in_;
  std::vector<kernels::PackedMatrix> down_;
  std::vector<float> biases_;  // per expert: [f] gate (gated), [f] up, [d] down; empty without bias
  std::vector<float> smooth_, inv_smooth_;  // input smoothing s and 1 / s ([d] each), empty for none
};

static_assert(ExpertBank<FfnBank>);

static_assert(SplittableBank<FfnBank>);

/// A shared (always-on) expert as a one-expert FfnBank: SharedExpertOf (expert.hpp) for the
/// gate, PR-MoE's residual coefficient and the scale.
using SharedExpert = SharedExpertOf<FfnBank>;

}  // namespace moekit
#pragma GCC visibility pop
