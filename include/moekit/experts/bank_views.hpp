// SPDX-License-Identifier: Apache-2.0
// Experts shared between layers: BankRef (a non-owning view of a bank, so several layers or
// iterations run the same expert objects) and ConcatBank (the experts of several banks as one
// bank, ReXMoE's cross-layer pool). Both are ExpertBanks; BankRef of an FfnBank keeps the
// decode column split.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/expert.hpp"
#include "moekit/experts/ffn.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// A bank used by reference: the referenced bank must outlive every layer holding the view.
template <ExpertBank B>
class BankRef {
 public:
  /// The viewed bank's traits, so the layer treats the view as it treats the bank.
  static constexpr bool whole_blocks = whole_blocks_v<B>;
  static constexpr bool applies_weight = applies_weight_v<B>;

  explicit BankRef(const B& bank) noexcept : b_(&bank) {}
  [[nodiscard]] const B& bank() const noexcept { return *b_; }
  [[nodiscard]] int64_t num_experts() const { return b_->num_experts(); }
  [[nodiscard]] int64_t d_in() const { return b_->d_in(); }
  [[nodiscard]] int64_t d_out() const { return b_->d_out(); }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const { return b_->scratch_floats(rows); }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const {
    b_->run(e, in, rows, out, scratch);
  }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch, const BlockContext& ctx) const
    requires ContextAwareBank<B>
  {
    b_->run(e, in, rows, out, scratch, ctx);
  }
  /// Banks holding some experts (offload, moekit::ep): whether expert e is resident.
  [[nodiscard]] bool resident(int64_t e) const
    requires requires(const B& b) { b.resident(int64_t{}); }
  {
    return b_->resident(e);
  }
  [[nodiscard]] double flops_per_row() const
    requires requires(const B& b) { b.flops_per_row(); }
  {
    return b_->flops_per_row();
  }
  [[nodiscard]] double weight_bytes_per_expert() const
    requires requires(const B& b) { b.weight_bytes_per_expert(); }
  {
    return b_->weight_bytes_per_expert();
  }
  // The decode column split, when the bank has it.
  [[nodiscard]] int64_t split_strips(int stage) const
    requires SplittableBank<B>
  {
    return b_->split_strips(stage);
  }
  [[nodiscard]] size_t split_scratch_floats(int64_t rows) const
    requires SplittableBank<B>
  {
    return b_->split_scratch_floats(rows);
  }
  [[nodiscard]] size_t split_hidden_floats(int64_t rows) const
    requires SplittableBank<B>
  {
    return b_->split_hidden_floats(rows);
  }
  void run_split(int stage, int64_t e, const float* in, int64_t rows, float* h, float* out, float* a_pack, int64_t s0,
                 int64_t s1) const noexcept
    requires SplittableBank<B>
  {
    b_->run_split(stage, e, in, rows, h, out, a_pack, s0, s1);
  }

 private:
  const B* b_;
};

/// The experts of several banks of one type, in order: expert e of the concatenation is expert
/// e - (experts of the banks before) of its bank. ReXMoE (Tan et al., arXiv 2510.17483) routes layer l
/// over its own experts and its neighbours': `ConcatBank<BankRef<FfnBank>>({prev, own, next})`
/// with a router over their total count. All banks need the same d_in and d_out.
template <ExpertBank B>
class ConcatBank {
  static_assert(!whole_blocks_v<B> && !applies_weight_v<B> && !ContextAwareBank<B>,
                "ConcatBank: banks of blocks (whole_blocks, applies_weight, BlockContext) are not supported");
  static_assert(!requires(const B& b) { b.resident(int64_t{}); },
                "ConcatBank: banks holding some experts (resident()) are not supported");

 public:
  explicit ConcatBank(std::vector<B> banks) : banks_(std::move(banks)) {
    MOEKIT_CHECK(!banks_.empty(), "ConcatBank: expected at least one bank, got 0");
    offsets_.push_back(0);
    for (size_t i = 0; i < banks_.size(); ++i) {
      MOEKIT_CHECK(banks_[i].d_in() == banks_[0].d_in() && banks_[i].d_out() == banks_[0].d_out(), "ConcatBank: bank ", i,
                   " expected d_in / d_out ", banks_[0].d_in(), " / ", banks_[0].d_out(), ", got ", banks_[i].d_in(),
                   " / ", banks_[i].d_out());
      offsets_.push_back(offsets_.back() + banks_[i].num_experts());
    }
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return offsets_.back(); }
  [[nodiscard]] int64_t d_in() const { return banks_[0].d_in(); }
  [[nodiscard]] int64_t d_out() const { return banks_[0].d_out(); }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const {
    size_t m = 0;
    for (const B& b : banks_) m = std::max(m, static_cast<size_t>(b.scratch_floats(rows)));
    return m;
  }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const {
    const size_t i = bank_of(e);
    banks_[i].run(e - offsets_[i], in, rows, out, scratch);
  }
  /// Which bank expert e lives in, and its index there.
  [[nodiscard]] size_t bank_of(int64_t e) const noexcept {
    size_t i = 0;
    while (i + 1 < banks_.size() && e >= offsets_[i + 1]) ++i;
    return i;
  }
  [[nodiscard]] int64_t first_expert_of(size_t bank) const noexcept { return offsets_[bank]; }
  /// The concatenated banks, in order (for a view, the viewed bank is `banks()[i].bank()`).
  [[nodiscard]] const std::vector<B>& banks() const noexcept { return banks_; }

 private:
  std::vector<B> banks_;
  std::vector<int64_t> offsets_;
};

/// Two banks of different types in one: experts [0, E_a) are bank a's, [E_a, E_a + E_b) bank
/// b's (heterogeneous experts in one layer: MoHETS' FAN experts beside FFN experts). Both need
/// the same d_in and d_out; banks of blocks are not supported (as ConcatBank).
template <ExpertBank A, ExpertBank B>
class PairBank {
  static_assert(!whole_blocks_v<A> && !applies_weight_v<A> && !ContextAwareBank<A> && !whole_blocks_v<B> &&
                    !applies_weight_v<B> && !ContextAwareBank<B>,
                "PairBank: banks of blocks (whole_blocks, applies_weight, BlockContext) are not supported");
  static_assert(!requires(const A& a) { a.resident(int64_t{}); } && !requires(const B& b) { b.resident(int64_t{}); },
                "PairBank: banks holding some experts (resident()) are not supported");

 public:
  PairBank(A a, B b) : a_(std::move(a)), b_(std::move(b)) {
    MOEKIT_CHECK(a_.d_in() == b_.d_in() && a_.d_out() == b_.d_out(), "PairBank: bank b expected d_in / d_out ",
                 a_.d_in(), " / ", a_.d_out(), ", got ", b_.d_in(), " / ", b_.d_out());
  }
  [[nodiscard]] int64_t num_experts() const noexcept { return a_.num_experts() + b_.num_experts(); }
  [[nodiscard]] int64_t d_in() const { return a_.d_in(); }
  [[nodiscard]] int64_t d_out() const { return a_.d_out(); }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const {
    return std::max(static_cast<size_t>(a_.scratch_floats(rows)), static_cast<size_t>(b_.scratch_floats(rows)));
  }
  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const {
    if (e < a_.num_experts()) {
      a_.run(e, in, rows, out, scratch);
    } else {
      b_.run(e - a_.num_experts(), in, rows, out, scratch);
    }
  }
  [[nodiscard]] const A& first() const noexcept { return a_; }
  [[nodiscard]] const B& second() const noexcept { return b_; }

 private:
  A a_;
  B b_;
};

static_assert(ExpertBank<BankRef<FfnBank>>);
static_assert(SplittableBank<BankRef<FfnBank>>);
static_assert(ExpertBank<ConcatBank<BankRef<FfnBank>>>);

}  // namespace moekit
#pragma GCC visibility pop
