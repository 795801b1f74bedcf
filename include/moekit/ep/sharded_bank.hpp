// SPDX-License-Identifier: Apache-2.0
// ShardedFfnBank: the FFN experts one rank holds, addressed by their global ids, plus guest
// experts whose packed weights another rank shipped (least-loaded expert parallelism).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/experts/ffn.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::ep {

/// An ExpertBank of `experts` global experts of which this rank holds `held` (ascending ids,
/// `local` holds them in that order: local expert i is global expert held[i]). Running an
/// expert it neither holds nor hosts as a guest throws moekit::error. Guests (add_guest) are
/// one-expert banks over a copy of the shipped packed bytes: they run with the same kernels,
/// so their outputs equal the owner's bit for bit.
class ShardedFfnBank {
 public:
  ShardedFfnBank(int64_t experts, std::vector<int64_t> held, FfnBank local)
      : experts_(experts), held_(std::move(held)), local_(std::move(local)) {
    MOEKIT_CHECK(experts >= 1 && experts <= std::numeric_limits<int32_t>::max(),
                 "ep::ShardedFfnBank: experts expected in [1, 2^31), got ", experts);
    MOEKIT_CHECK(!held_.empty() && static_cast<int64_t>(held_.size()) == local_.num_experts(),
                 "ep::ShardedFfnBank: held ids expected one per local expert (", local_.num_experts(), "), at least one, got ",
                 held_.size());
    where_.assign(static_cast<size_t>(experts), kAbsent);
    for (size_t i = 0; i < held_.size(); ++i) {
      MOEKIT_CHECK(held_[i] >= 0 && held_[i] < experts && (i == 0 || held_[i] > held_[i - 1]),
                   "ep::ShardedFfnBank: held[", i, "] expected an expert id in [0, ", experts, ") above held[", i - 1,
                   "], got ", held_[i]);
      where_[static_cast<size_t>(held_[i])] = static_cast<int32_t>(i);
    }
  }
  /// The shard of a full bank: copies the packed matrices of `held` (for tests and for engines
  /// that load everything once and then drop what they do not keep).
  static ShardedFfnBank from_full(const FfnBank& full, std::vector<int64_t> held) {
    std::vector<kernels::PackedMatrix> in, down;
    std::vector<float> biases;
    const int64_t nb = full.shape().biases_per_expert();
    for (const int64_t e : held) {
      MOEKIT_CHECK(e >= 0 && e < full.num_experts(), "ep::ShardedFfnBank::from_full: expert ", e, " expected in [0, ",
                   full.num_experts(), ")");
      in.push_back(full.in_matrix(e));
      down.push_back(full.down_matrix(e));
      if (nb > 0) biases.insert(biases.end(), full.biases().begin() + e * nb, full.biases().begin() + (e + 1) * nb);
    }
    MOEKIT_CHECK(!in.empty(), "ep::ShardedFfnBank::from_full: held expected at least one expert, got none");
    FfnBank local = FfnBank::from_packed(full.shape(), std::move(in), std::move(down), std::move(biases),
                                         full.input_smoothing());
    return ShardedFfnBank(full.num_experts(), std::move(held), std::move(local));
  }

  [[nodiscard]] int64_t num_experts() const noexcept { return experts_; }
  [[nodiscard]] int64_t d_in() const noexcept { return local_.d_in(); }
  [[nodiscard]] int64_t d_out() const noexcept { return local_.d_out(); }
  [[nodiscard]] const FfnShape& shape() const noexcept { return local_.shape(); }
  [[nodiscard]] size_t scratch_floats(int64_t rows) const noexcept { return local_.scratch_floats(rows); }
  [[nodiscard]] const std::vector<int64_t>& held() const noexcept { return held_; }
  [[nodiscard]] const FfnBank& local() const noexcept { return local_; }
  /// Held or hosted as a guest.
  [[nodiscard]] bool resident(int64_t e) const noexcept {
    return e >= 0 && e < experts_ && where_[static_cast<size_t>(e)] != kAbsent;
  }
  [[nodiscard]] bool holds(int64_t e) const noexcept { return resident(e) && where_[static_cast<size_t>(e)] >= 0; }
  [[nodiscard]] int64_t num_guests() const noexcept { return static_cast<int64_t>(guests_.size()); }

  void run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const {
    const auto [bank, i] = find(e);
    bank->run(i, in, rows, out, scratch);
  }
  [[nodiscard]] int64_t split_strips(int stage) const noexcept { return local_.split_strips(stage); }
  [[nodiscard]] size_t split_hidden_floats(int64_t rows) const noexcept { return local_.split_hidden_floats(rows); }
  [[nodiscard]] size_t split_scratch_floats(int64_t rows) const noexcept { return local_.split_scratch_floats(rows); }
  /// As FfnBank::run_split; the expert must be resident (moekit::ep checks before it runs).
  void run_split(int stage, int64_t e, const float* in, int64_t rows, float* h, float* out, float* a_pack, int64_t s0,
                 int64_t s1) const noexcept {
    const int32_t w = where_[static_cast<size_t>(e)];
    MOEKIT_DEBUG_ASSERT(w != kAbsent);  // a precondition (noexcept): callers check resident(e) first
    if (w == kAbsent) return;
    if (w >= 0) {
      local_.run_split(stage, w, in, rows, h, out, a_pack, s0, s1);
    } else {
      guests_[static_cast<size_t>(kGuest0 - w)].bank.run_split(stage, 0, in, rows, h, out, a_pack, s0, s1);
    }
  }
  [[nodiscard]] double flops_per_row() const noexcept { return local_.flops_per_row(); }

  // ---- Shipping an expert's weights (what LLEP sends with spilled rows).
  /// Bytes of one expert's payload: its packed values, scales and biases.
  [[nodiscard]] size_t payload_bytes() const noexcept {
    return part_bytes(0) + part_bytes(1) + part_bytes(2) + part_bytes(3) + part_bytes(4);
  }
  /// Writes resident expert e's payload (payload_bytes() bytes) to `dst`.
  void write_payload(int64_t e, uint8_t* dst) const {
    const auto [bank, i] = find(e);
    const kernels::PackedMatrix& a = bank->in_matrix(i);
    const kernels::PackedMatrix& b = bank->down_matrix(i);
    const int64_t nb = shape().biases_per_expert();
    const void* src[5] = {a.packed_data().data(), b.packed_data().data(), a.packed_scales().data(),
                          b.packed_scales().data(), nb > 0 ? bank->biases().data() + i * nb : nullptr};
    for (int p = 0; p < 5; ++p) {
      if (part_bytes(p) > 0) std::memcpy(dst, src[p], part_bytes(p));
      dst += part_bytes(p);
    }
  }
  /// Hosts expert e (not held here) from a payload another rank's write_payload() wrote (same
  /// shape, weight type and kernel on both sides). Copies it into 64-byte aligned memory and
  /// checks it as PackedMatrix::view does (sizes, alignment, finite scales and biases).
  void add_guest(int64_t e, std::span<const uint8_t> payload) {
    MOEKIT_CHECK(e >= 0 && e < experts_, "ep::ShardedFfnBank::add_guest: expert expected in [0, ", experts_, "), got ", e);
    MOEKIT_CHECK(!resident(e), "ep::ShardedFfnBank::add_guest: expert ", e, " is already resident");
    MOEKIT_CHECK(payload.size() == payload_bytes(), "ep::ShardedFfnBank::add_guest: payload of expert ", e,
                 " expected ", payload_bytes(), " bytes, got ", payload.size());
    const size_t n = (payload.size() + 63) / 64 * 64;
    std::shared_ptr<uint8_t> mem(static_cast<uint8_t*>(std::aligned_alloc(64, std::max<size_t>(n, 64))), std::free);
    MOEKIT_CHECK(mem != nullptr, "ep::ShardedFfnBank::add_guest: cannot allocate ", n, " bytes");
    std::memcpy(mem.get(), payload.data(), payload.size());
    size_t off[6] = {0};
    for (int p = 0; p < 5; ++p) off[p + 1] = off[p] + part_bytes(p);
    const uint8_t* base = mem.get();
    std::vector<kernels::PackedMatrix> in, down;
    in.push_back(kernels::PackedMatrix::view(local_.in_matrix(0).layout(), base + off[0], part_bytes(0),
                                             reinterpret_cast<const float*>(base + off[2]), part_bytes(2) / 4, mem));
    down.push_back(kernels::PackedMatrix::view(local_.down_matrix(0).layout(), base + off[1], part_bytes(1),
                                               reinterpret_cast<const float*>(base + off[3]), part_bytes(3) / 4, mem));
    std::vector<float> biases(part_bytes(4) / 4);
    if (!biases.empty()) std::memcpy(biases.data(), base + off[4], part_bytes(4));
    guests_.push_back(
        {e, FfnBank::from_packed(shape(), std::move(in), std::move(down), std::move(biases), local_.input_smoothing())});
    where_[static_cast<size_t>(e)] = kGuest0 - static_cast<int32_t>(guests_.size() - 1);
  }
  /// Drops guest e (its memory is freed); a no-op when e is not a guest.
  void remove_guest(int64_t e) noexcept {
    for (size_t g = 0; g < guests_.size(); ++g) {
      if (guests_[g].expert != e) continue;
      guests_.erase(guests_.begin() + static_cast<std::ptrdiff_t>(g));
      where_[static_cast<size_t>(e)] = kAbsent;
      for (size_t i = g; i < guests_.size(); ++i)
        where_[static_cast<size_t>(guests_[i].expert)] = kGuest0 - static_cast<int32_t>(i);
      return;
    }
  }
  /// Drops every guest (their memory is freed).
  void clear_guests() noexcept {
    for (const Guest& g : guests_) where_[static_cast<size_t>(g.expert)] = kAbsent;
    guests_.clear();
  }

 private:
  static constexpr int32_t kAbsent = -1, kGuest0 = -2;  // where_: >= 0 local index, kGuest0 - g guest g
  struct Guest {
    int64_t expert;
    FfnBank bank;
  };
  // Payload parts: 0 in values, 1 down values, 2 in scales, 3 down scales, 4 biases. The value
  // parts are whole strips (multiples of 64 bytes), so both value parts start aligned.
  [[nodiscard]] size_t part_bytes(int p) const noexcept {
    switch (p) {
      case 0: return local_.in_matrix(0).packed_data().size();
      case 1: return local_.down_matrix(0).packed_data().size();
      case 2: return local_.in_matrix(0).packed_scales().size() * sizeof(float);
      case 3: return local_.down_matrix(0).packed_scales().size() * sizeof(float);
      default: return static_cast<size_t>(shape().biases_per_expert()) * sizeof(float);
    }
  }
  [[nodiscard]] std::pair<const FfnBank*, int64_t> find(int64_t e) const {
    MOEKIT_CHECK(resident(e), "ep::ShardedFfnBank: expert ", e, " is not resident on this rank (held: ", held_.size(),
                 " experts, guests: ", guests_.size(), ")");
    const int32_t w = where_[static_cast<size_t>(e)];
    if (w >= 0) return {&local_, w};
    return {&guests_[static_cast<size_t>(kGuest0 - w)].bank, 0};
  }

  int64_t experts_ = 0;
  std::vector<int64_t> held_;
  FfnBank local_;
  std::vector<int32_t> where_;
  std::vector<Guest> guests_;
};

static_assert(ExpertBank<ShardedFfnBank>);
static_assert(SplittableBank<ShardedFfnBank>);

}  // namespace moekit::ep
#pragma GCC visibility pop
