// SPDX-License-Identifier: Apache-2.0
// QMoE's dictionary, its greedy coder and the dictionary-coded ternary experts
// (include/moekit/experts/qmoe.hpp).
#include "moekit/experts/qmoe.hpp"

#include <cfloat>
#include <cmath>
#include <queue>
#include <tuple>

namespace moekit {
namespace qmoe {
namespace {

// The dictionary: entry id's parent (-1 for a single pair), last pair symbol and length, the
// trie's children, and the decode table.
struct Dictionary {
  std::vector<int32_t> parent;
  std::vector<uint8_t> symbol, pairs;
  std::vector<int32_t> child;  // [size + 1, 9]: row `size` is the root
  std::vector<uint64_t> table;

  Dictionary() {
    // Best first over pair sequences: a pair of z zero ternaries has probability
    // 0.885^z 0.0575^(2 - z); a sequence the product. Ties: the earlier pushed first (the
    // order is fixed, so the dictionary is).
    const double lz = std::log(0.885), lnz = std::log(0.0575);
    auto pair_logp = [&](int s) {
      const int z = (s % 3 == 0) + (s / 3 == 0);
      return z * lz + (2 - z) * lnz;
    };
    using Node = std::tuple<double, int64_t, int32_t, uint8_t, uint8_t>;  // -logp, order, parent, sym, pairs
    std::priority_queue<Node, std::vector<Node>, std::greater<Node>> q;
    int64_t order = 0;
    for (int s = 0; s < 9; ++s) q.emplace(-pair_logp(s), order++, -1, static_cast<uint8_t>(s), 1);
    parent.reserve(kDictionarySize);
    while (static_cast<int64_t>(parent.size()) < kDictionarySize) {
      const auto [nlp, ord, par, sym, len] = q.top();
      q.pop();
      const auto id = static_cast<int32_t>(parent.size());
      parent.push_back(par);
      symbol.push_back(sym);
      pairs.push_back(len);
      if (len < kMaxPairs)
        for (int s = 0; s < 9; ++s) q.emplace(nlp - pair_logp(s), order++, id, static_cast<uint8_t>(s), len + 1);
    }
    child.assign(static_cast<size_t>((kDictionarySize + 1) * 9), -1);
    table.assign(static_cast<size_t>(kDictionarySize), 0);
    for (int32_t id = 0; id < kDictionarySize; ++id) {
      const int32_t p = parent[static_cast<size_t>(id)];
      child[static_cast<size_t>((p < 0 ? kDictionarySize : p) * 9 + symbol[static_cast<size_t>(id)])] = id;
      // Masks: the parent's, plus this entry's last pair at ternaries 2 (len - 1), + 1.
      const uint64_t len = pairs[static_cast<size_t>(id)];
      uint64_t e = p < 0 ? 0 : table[static_cast<size_t>(p)] & ((uint64_t{1} << 56) - 1);
      const int s = symbol[static_cast<size_t>(id)];
      for (int h = 0; h < 2; ++h) {
        const int t = h == 0 ? s % 3 : s / 3;
        const uint64_t pos = 2 * (len - 1) + static_cast<uint64_t>(h);
        if (t == 1) e |= uint64_t{1} << pos;
        if (t == 2) e |= uint64_t{1} << (28 + pos);
      }
      table[static_cast<size_t>(id)] = e | len << 56;
    }
  }
};

const Dictionary& dict() {
  static const Dictionary d;
  return d;
}

}  // namespace

std::vector<uint8_t> dictionary_entry(int64_t id) {
  MOEKIT_CHECK(id >= 0 && id < kDictionarySize, "qmoe::dictionary_entry: id expected in [0, 65536), got ", id);
  const Dictionary& d = dict();
  std::vector<uint8_t> out(d.pairs[static_cast<size_t>(id)]);
  for (int64_t x = id, i = static_cast<int64_t>(out.size()) - 1; x >= 0; x = d.parent[static_cast<size_t>(x)], --i)
    out[static_cast<size_t>(i)] = d.symbol[static_cast<size_t>(x)];
  return out;
}

const uint64_t* decode_table() { return dict().table.data(); }

}  // namespace qmoe

TernaryDictMatrix::TernaryDictMatrix(const float* W, int64_t n, int64_t k, int64_t ldw) : n_(n), k_(k) {
  const char* who = "TernaryDictMatrix";
  MOEKIT_CHECK(n >= 1 && k >= 1, who, ": shape expected >= 1 each, got [", n, ", ", k, "]");
  MOEKIT_CHECK(static_cast<double>(n) * static_cast<double>(k) < 0x1p40, who, ": n k expected < 2^40, got [", n, ", ",
               k, "]");
  MOEKIT_CHECK(ldw >= k, who, ": row stride expected >= k = ", k, ", got ", ldw);
  MOEKIT_CHECK(W != nullptr, who, ": null weight pointer");
  const qmoe::Dictionary& d = qmoe::dict();
  constexpr int32_t root = qmoe::kDictionarySize;
  offsets_.assign(static_cast<size_t>(n + 1), 0);
  lo_.resize(static_cast<size_t>(n));
  hi_.resize(static_cast<size_t>(n));
  codes_.reserve(static_cast<size_t>(n * k / 8));
  std::vector<uint8_t> t(static_cast<size_t>(k + 1));
  for (int64_t r = 0; r < n; ++r) {
    const float* w = W + r * ldw;
    float lo = 0.0f, hi = 0.0f;
    for (int64_t p = 0; p < k; ++p)
      if (std::fabs(w[p]) <= FLT_MAX) {
        lo = std::min(lo, w[p]);
        hi = std::max(hi, w[p]);
      }
    lo_[static_cast<size_t>(r)] = lo;
    hi_[static_cast<size_t>(r)] = hi;
    // QMoE's grid: hi above hi / 2, lo below lo / 2 (NaN compares false: 0).
    for (int64_t p = 0; p < k; ++p)
      t[static_cast<size_t>(p)] = hi > 0.0f && w[p] > 0.5f * hi ? 2 : lo < 0.0f && w[p] < 0.5f * lo ? 1 : 0;
    t[static_cast<size_t>(k)] = 0;  // the pad of an odd row
    // Greedy longest match down the prefix-closed trie.
    int32_t node = root;
    for (int64_t p = 0; p < k; p += 2) {
      const int s = t[static_cast<size_t>(p)] + 3 * t[static_cast<size_t>(p + 1)];
      const int32_t next = d.child[static_cast<size_t>(node * 9 + s)];
      if (next >= 0) {
        node = next;
        continue;
      }
      codes_.push_back(static_cast<uint16_t>(node));
      node = d.child[static_cast<size_t>(root * 9 + s)];
    }
    codes_.push_back(static_cast<uint16_t>(node));
    offsets_[static_cast<size_t>(r + 1)] = static_cast<int64_t>(codes_.size());
  }
  codes_.shrink_to_fit();
}

void TernaryDictMatrix::decode_row(int64_t r, float* dst) const noexcept {
  kernels::tdict_decode(codes_.data() + offsets_[static_cast<size_t>(r)], qmoe::decode_table(), lo_[static_cast<size_t>(r)],
                        hi_[static_cast<size_t>(r)], dst, k_);
}

void TernaryDictMatrix::gemm(int64_t m, const float* x, int64_t ldx, float* y, int64_t ldy, float* scratch,
                             bool accumulate) const noexcept {
  for (int64_t r = 0; r < n_; ++r) {
    decode_row(r, scratch);
    for (int64_t i = 0; i < m; ++i) {
      const float v = kernels::dot(x + i * ldx, scratch, k_);
      y[i * ldy + r] = accumulate ? y[i * ldy + r] + v : v;
    }
  }
}

TernaryDictFfnBank::TernaryDictFfnBank(int64_t num_experts, int64_t hidden, int64_t intermediate,
                                       const std::vector<float>& gate, const std::vector<float>& up,
                                       const std::vector<float>& down, Activation act)
    : E_(num_experts), d_(hidden), f_(intermediate), act_(act) {
  const char* who = "TernaryDictFfnBank";
  MOEKIT_CHECK(E_ >= 1 && d_ >= 1 && f_ >= 1, who, ": experts, hidden and intermediate size expected >= 1, got ", E_, ", ",
               d_, ", ", f_);
  MOEKIT_CHECK(static_cast<double>(E_) * static_cast<double>(d_) * static_cast<double>(f_) < 0x1p40, who,
               ": E d f expected < 2^40 values, got ", E_, " x ", d_, " x ", f_);
  MOEKIT_CHECK(static_cast<int>(act) >= 0 && static_cast<int>(act) <= static_cast<int>(Activation::relu), who, ": activation expected silu, gelu, gelu_tanh or relu, got enum value ",
               static_cast<int>(act));
  const size_t want = static_cast<size_t>(E_ * d_ * f_);
  MOEKIT_CHECK(gate.size() == want && up.size() == want && down.size() == want, who,
               ": gate, up and down expected [E, f, d] / [E, d, f] = ", want, " values each, got ", gate.size(), ", ",
               up.size(), ", ", down.size());
  for (int64_t e = 0; e < E_; ++e) {
    gate_.emplace_back(gate.data() + e * f_ * d_, f_, d_, d_);
    up_.emplace_back(up.data() + e * f_ * d_, f_, d_, d_);
    down_.emplace_back(down.data() + e * d_ * f_, d_, f_, f_);
  }
}

size_t TernaryDictFfnBank::bytes() const noexcept {
  size_t b = 0;
  for (int64_t e = 0; e < E_; ++e) b += gate_[static_cast<size_t>(e)].bytes() + up_[static_cast<size_t>(e)].bytes() +
                                       down_[static_cast<size_t>(e)].bytes();
  return b;
}

void TernaryDictFfnBank::run(int64_t e, const float* in, int64_t rows, float* out, float* scratch) const noexcept {
  float* g = scratch;            // [rows, f]
  float* u = g + rows * f_;      // [rows, f]
  float* buf = u + rows * f_;    // a decoded row
  gate_[static_cast<size_t>(e)].gemm(rows, in, d_, g, f_, buf);
  up_[static_cast<size_t>(e)].gemm(rows, in, d_, u, f_, buf);
  for (int64_t i = 0; i < rows * f_; ++i) g[i] = activate(act_, g[i]) * u[i];
  down_[static_cast<size_t>(e)].gemm(rows, g, f_, out, d_, buf);
}

}  // namespace moekit
