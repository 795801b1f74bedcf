// SPDX-License-Identifier: Apache-2.0
// MoBA's gate and the blocked attention kernel (include/moekit/attention/moba.hpp).
//
// The attention runs on moekit's packed GEMMs: keys and values are packed once per call in
// tiles of at most kKeyTile keys (K tile `[n, d]`, V tile transposed `[d, n]`), each tile's
// scores come from one GEMM over the gathered queries, the softmax is online (running maximum
// and sum) and `P V` is a second GEMM. MoBA's work is key-block-centric (flash-moba): the
// queries that chose an earlier block run against it in chunks of up to kQueryTile, each own
// block per tile of queries, every (query, kept block) leaving a partial (maximum, sum,
// numerators) that the token merges in block order. Dense causal attention runs
// flash-attention's loop over query tiles. Each partial and output row is computed by one
// work item in a fixed order, so results do not depend on the thread count. Exceptions inside
// the parallel regions are caught and rethrown after them.
#include "moekit/attention/moba.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>

#include "moekit/detail/threads.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"

namespace moekit::attention {

struct MobaAccess {
  static void reset(MobaPlan& p, int64_t T, int64_t H, int64_t k, int64_t B, int64_t most_blocks,
                    const std::vector<int64_t>& cu) {
    p.cu_ = cu;
    p.tokens_ = T;
    p.heads_ = H;
    p.top_k_ = k;
    p.block_size_ = B;
    p.stride_ = std::min(k, most_blocks);
    p.blocks_.assign(static_cast<size_t>(T * H * p.stride_), -1);
    p.count_.assign(static_cast<size_t>(T * H), 0);
    p.keys_attended_ = p.causal_keys_ = 0;
  }
  static int32_t* blocks(MobaPlan& p, int64_t t, int64_t h) {
    return p.blocks_.data() + static_cast<size_t>((t * p.heads_ + h) * p.stride_);
  }
  static int32_t& count(MobaPlan& p, int64_t t, int64_t h) { return p.count_[static_cast<size_t>(t * p.heads_ + h)]; }
  static const std::vector<int64_t>& cu(const MobaPlan& p) { return p.cu_; }
  static void totals(MobaPlan& p, int64_t attended, int64_t causal) {
    p.keys_attended_ = attended;
    p.causal_keys_ = causal;
  }
};

namespace {

constexpr int64_t kKeyTile = 512;    // keys per packed tile (columns of a score GEMM)
constexpr int64_t kQueryTile = 128;  // queries per work item (rows of its GEMMs)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Dims {
  int64_t T, H, Hk, d, group;  // group = H / Hk
  int64_t B, k;
  float scale;
  std::vector<int64_t> cu;  // [S + 1]
};

Dims check(const char* who, const AttentionShape& s, std::span<const int64_t> cu, const MobaOptions& opt,
           bool gate) {
  Dims D{};
  MOEKIT_CHECK(s.tokens >= 0, who, ": tokens expected >= 0, got ", s.tokens);
  MOEKIT_CHECK(s.heads >= 1, who, ": heads expected >= 1, got ", s.heads);
  MOEKIT_CHECK(s.kv_heads >= 0, who, ": kv_heads expected >= 0 (0: the same as heads), got ", s.kv_heads);
  MOEKIT_CHECK(s.head_dim >= 1, who, ": head_dim expected >= 1, got ", s.head_dim);
  const int64_t Hk = s.kv_heads == 0 ? s.heads : s.kv_heads;
  MOEKIT_CHECK(s.heads % Hk == 0, who, ": kv_heads expected to divide heads (", s.heads, "), got ", Hk);
  constexpr int64_t kMax = int64_t{1} << 40;
  MOEKIT_CHECK(s.heads <= kMax / s.head_dim && s.tokens < kMax / (s.heads * s.head_dim), who,
               ": tokens * heads * head_dim expected < 2^40, got ", s.tokens, " x ", s.heads, " x ", s.head_dim);
  MOEKIT_CHECK(opt.block_size >= 1 && opt.block_size <= (int64_t{1} << 40), who, ": block_size expected in [1, 2^40], got ",
               opt.block_size);
  MOEKIT_CHECK(!gate || opt.top_k >= 1, who, ": top_k expected >= 1, got ", opt.top_k);
  MOEKIT_CHECK(!gate || opt.top_k <= (int64_t{1} << 20), who, ": top_k expected <= 2^20, got ", opt.top_k);
  MOEKIT_CHECK(std::isfinite(opt.scale) && opt.scale >= 0.0f, who,
               ": scale expected finite and >= 0 (0: head_dim^-1/2), got ", opt.scale);
  D.T = s.tokens;
  D.H = s.heads;
  D.Hk = Hk;
  D.d = s.head_dim;
  D.group = s.heads / Hk;
  D.B = opt.block_size;
  D.k = opt.top_k;
  D.scale = opt.scale > 0.0f ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  if (cu.empty()) {
    D.cu = {0, s.tokens};
  } else {
    MOEKIT_CHECK(cu.size() >= 2, who, ": cu_seqlens expected empty or >= 2 entries, got ", cu.size());
    MOEKIT_CHECK(cu.front() == 0, who, ": cu_seqlens[0] expected 0, got ", cu.front());
    MOEKIT_CHECK(cu.back() == s.tokens, who, ": cu_seqlens' last entry expected tokens (", s.tokens, "), got ",
                 cu.back());
    for (size_t i = 1; i < cu.size(); ++i)
      MOEKIT_CHECK(cu[i] >= cu[i - 1], who, ": cu_seqlens expected non-decreasing, got ", cu[i - 1], " then ", cu[i],
                   " at ", i);
    D.cu.assign(cu.begin(), cu.end());
  }
  for (size_t i = 1; i < D.cu.size(); ++i)
    MOEKIT_CHECK(D.cu[i] - D.cu[i - 1] <= std::numeric_limits<int32_t>::max(), who,
                 ": sequence length expected <= 2^31 - 1, got ", D.cu[i] - D.cu[i - 1], " (sequence ", i - 1, ")");
  return D;
}

void check_finite(const char* who, const char* name, const float* x, int64_t n) {
  if (n == 0) return;
  MOEKIT_CHECK(x != nullptr, who, ": ", name, " is null");
  const int64_t i = kernels::first_non_finite(x, n);
  MOEKIT_CHECK(i < 0, who, ": ", name, " expected finite, got ", i < 0 ? 0.0f : x[i], " at element ", i);
}

int64_t blocks_of(int64_t n, int64_t B) { return n == 0 ? 0 : (n - 1) / B + 1; }

// Sequence s's first block in the batch's block numbering.
std::vector<int64_t> block_offsets(const Dims& D) {
  std::vector<int64_t> off(D.cu.size(), 0);
  for (size_t s = 0; s + 1 < D.cu.size(); ++s) off[s + 1] = off[s] + blocks_of(D.cu[s + 1] - D.cu[s], D.B);
  return off;
}

// Each global block's sequence.
std::vector<int64_t> sequence_of_blocks(const Dims& D, const std::vector<int64_t>& boff) {
  std::vector<int64_t> seq_of(static_cast<size_t>(boff.back()));
  for (size_t s = 0; s + 1 < D.cu.size(); ++s)
    for (int64_t b = boff[s]; b < boff[s + 1]; ++b) seq_of[static_cast<size_t>(b)] = static_cast<int64_t>(s);
  return seq_of;
}

// Key tiles: block j of a sequence splits into tiles of at most kKeyTile keys.
int64_t tiles_of(int64_t n) { return (n + kKeyTile - 1) / kKeyTile; }

struct TileIndex {
  std::vector<int64_t> first;  // per global block: its first tile in the global tile numbering
  int64_t count = 0;
};

TileIndex tile_index(const Dims& D, const std::vector<int64_t>& boff) {
  TileIndex ti;
  ti.first.assign(static_cast<size_t>(boff.back()) + 1, 0);
  for (size_t s = 0; s + 1 < D.cu.size(); ++s) {
    const int64_t n = D.cu[s + 1] - D.cu[s];
    for (int64_t j = 0; j < boff[s + 1] - boff[s]; ++j) {
      const int64_t len = std::min(D.B, n - j * D.B);
      ti.first[static_cast<size_t>(boff[s] + j + 1)] = ti.first[static_cast<size_t>(boff[s] + j)] + tiles_of(len);
    }
  }
  ti.count = ti.first.back();
  return ti;
}

// Packs every key tile (K `[n, d]`) and value tile (V^T `[d, n]`) of every kv head.
void pack_tiles(const Dims& D, const float* k, const float* v, const std::vector<int64_t>& boff,
                const TileIndex& ti, MobaWorkspace& ws, int threads) {
  const int64_t nb = boff.back();
  ws.keys.resize(static_cast<size_t>(D.Hk * ti.count));
  ws.values.resize(static_cast<size_t>(D.Hk * ti.count));
  ws.transpose.resize(static_cast<size_t>(threads * D.d * kKeyTile));
  const std::vector<int64_t> seq_of = sequence_of_blocks(D, boff);
  const int64_t work = D.Hk * nb;
  kernels::PackOptions f32{};
  f32.kernel = &kernels::active_gemm_kernel(kernels::WeightType::f32, false);  // throws here, not in the region
  std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t w = 0; w < work; ++w) {
    try {
    const int64_t g = w / nb, b = w % nb, s = seq_of[static_cast<size_t>(b)];
    const int64_t n = D.cu[s + 1] - D.cu[s], j = b - boff[s];
    const int64_t len = std::min(D.B, n - j * D.B);
    float* tr = ws.transpose.data() + static_cast<size_t>(omp_get_thread_num() * D.d * kKeyTile);
    for (int64_t t0 = 0, tile = ti.first[static_cast<size_t>(b)]; t0 < len; t0 += kKeyTile, ++tile) {
      const int64_t tn = std::min(kKeyTile, len - t0);
      const int64_t row0 = D.cu[s] + j * D.B + t0;  // the tile's first token
      const size_t slot = static_cast<size_t>(g * ti.count + tile);
      ws.keys[slot].pack(k + (row0 * D.Hk + g) * D.d, tn, D.d, D.Hk * D.d, f32);
      for (int64_t p = 0; p < tn; ++p) {
        const float* src = v + ((row0 + p) * D.Hk + g) * D.d;
        for (int64_t r = 0; r < D.d; ++r) tr[r * tn + p] = src[r];
      }
      ws.values[slot].pack(tr, D.d, tn, tn, f32);
    }
    } catch (...) {
#pragma omp critical(moekit_moba_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
}

// Online-softmax state of up to kQueryTile queries: running maxima (scaled scores), sums and
// numerators `[n, d]`, plus the GEMM buffers.
struct Scratch {
  float *Qg, *S, *Og, *acc, *m, *l, *corr, *a_pack;
  explicit Scratch(float* p, int64_t d) {
    Qg = p;                         // [n, d] gathered queries
    S = Qg + kQueryTile * d;        // [n, kKeyTile] scores, then P
    Og = S + kQueryTile * kKeyTile;  // [n, d] P V
    acc = Og + kQueryTile * d;      // [n, d]
    m = acc + kQueryTile * d;
    l = m + kQueryTile;
    corr = l + kQueryTile;
    a_pack = corr + kQueryTile;
  }
  void reset(int64_t n, int64_t d) const {
    for (int64_t r = 0; r < n; ++r) {
      m[r] = kNegInf;
      l[r] = 0.0f;
    }
    std::memset(acc, 0, static_cast<size_t>(n * d) * sizeof(float));
  }
};

size_t scratch_floats(const Dims& D) {
  return static_cast<size_t>(3 * kQueryTile * D.d + kQueryTile * kKeyTile + 3 * kQueryTile) +
         kernels::packed_a_floats(kQueryTile, std::max(D.d, kKeyTile));
}

// One key block j of sequence s for queries `query[0, n)` (sequence-local indices) of head h,
// state row r for query[r]: every tile of the block, in order; `own`: the queries' own block
// (keys after a query masked, rows without a key yet skipped).
void block_pass(const Dims& D, int64_t s, int64_t h, int64_t j, bool own, const int32_t* query, int64_t n,
                const float* q, const std::vector<int64_t>& boff, const TileIndex& ti, const MobaWorkspace& ws,
                const Scratch& x) {
  const int64_t d = D.d, g = h / D.group;
  const int64_t seq_n = D.cu[s + 1] - D.cu[s], row_base = D.cu[s];
  const int64_t len = std::min(D.B, seq_n - j * D.B);
  const int64_t b = boff[static_cast<size_t>(s)] + j;
  int32_t rows[kQueryTile];
  for (int64_t t0 = 0, tile = ti.first[static_cast<size_t>(b)]; t0 < len; t0 += kKeyTile, ++tile) {
    const int64_t tn = std::min(kKeyTile, len - t0);
    const int64_t key0 = j * D.B + t0;  // local index of the tile's first key
    int64_t nr = 0;
    for (int64_t r = 0; r < n; ++r)
      if (!own || key0 <= query[r]) rows[nr++] = static_cast<int32_t>(r);
    if (nr == 0) continue;
    for (int64_t rr = 0; rr < nr; ++rr)
      std::memcpy(x.Qg + rr * d, q + ((row_base + query[rows[rr]]) * D.H + h) * d, static_cast<size_t>(d) * sizeof(float));
    const size_t slot = static_cast<size_t>(g * ti.count + tile);
    kernels::gemm_packed(nr, x.Qg, d, ws.keys[slot], x.S, kKeyTile, x.a_pack);
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t r = rows[rr];
      float* srow = x.S + rr * kKeyTile;
      const int64_t valid = own ? std::min(tn, query[r] - key0 + 1) : tn;
      float mx = srow[0];
      for (int64_t c = 1; c < valid; ++c) mx = srow[c] > mx ? srow[c] : mx;
      const float m_new = std::max(x.m[r], mx * D.scale);
      x.corr[rr] = std::exp(x.m[r] - m_new);  // 0 for a query's first tile (m = -inf)
      const float sum = kernels::exp_sum(srow, D.scale, m_new, srow, valid);
      for (int64_t c = valid; c < tn; ++c) srow[c] = 0.0f;
      x.l[r] = x.l[r] * x.corr[rr] + sum;
      x.m[r] = m_new;
    }
    kernels::gemm_packed(nr, x.S, kKeyTile, ws.values[slot], x.Og, d, x.a_pack);
    for (int64_t rr = 0; rr < nr; ++rr) {
      float* a = x.acc + rows[rr] * d;
      kernels::scale_row(x.corr[rr], a, a, d);
      kernels::axpy_row(1.0f, x.Og + rr * d, a, d);
    }
  }
}

// Dense causal attention: a work item is a tile of queries [i0, i0 + n) of block c of
// sequence s, head h; every block up to c, ascending, then out = acc / l.
struct DenseItem {
  int64_t s, h, c, i0, n;
};

std::vector<DenseItem> dense_items(const Dims& D) {
  std::vector<DenseItem> items;
  for (size_t s = 0; s + 1 < D.cu.size(); ++s) {
    const int64_t n = D.cu[s + 1] - D.cu[s];
    for (int64_t h = 0; h < D.H; ++h)
      for (int64_t c = 0; c < blocks_of(n, D.B); ++c) {
        const int64_t b0 = c * D.B, b1 = std::min(n, b0 + D.B);
        for (int64_t i0 = b0; i0 < b1; i0 += kQueryTile)
          items.push_back({static_cast<int64_t>(s), h, c, i0, std::min(kQueryTile, b1 - i0)});
      }
  }
  return items;
}

// The checks and packing both attentions share; false when there is nothing to compute.
// `qk_checked`: the gate of the same call has already checked q and k.
bool prepare(const char* who, const Dims& D, const float* q, const float* k, const float* v, float* out,
             MobaWorkspace& ws, int threads, std::vector<int64_t>& boff, TileIndex& ti, bool qk_checked = false) {
  const size_t nq = static_cast<size_t>(D.T * D.H * D.d), nkv = static_cast<size_t>(D.T * D.Hk * D.d);
  if (!qk_checked) {
    check_finite(who, "q", q, static_cast<int64_t>(nq));
    check_finite(who, "k", k, static_cast<int64_t>(nkv));
  }
  check_finite(who, "v", v, static_cast<int64_t>(nkv));
  MOEKIT_CHECK(nq == 0 || out != nullptr, who, ": out is null");
  MOEKIT_CHECK(detail::apart(out, nq, q, nq) && detail::apart(out, nq, k, nkv) && detail::apart(out, nq, v, nkv), who,
               ": out expected not to overlap q, k or v");
  if (D.T == 0) return false;
  boff = block_offsets(D);
  ti = tile_index(D, boff);
  pack_tiles(D, k, v, boff, ti, ws, threads);
  if (ws.scratch.size() < static_cast<size_t>(threads)) ws.scratch.resize(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) ws.scratch[static_cast<size_t>(t)].resize(scratch_floats(D));
  return true;
}

}  // namespace

void moba_gate(const AttentionShape& shape, const float* q, const float* k, std::span<const int64_t> cu_seqlens,
               const MobaOptions& opt, MobaPlan& plan, MobaWorkspace& ws, int threads) {
  const char* who = "moba_gate";
  const Dims D = check(who, shape, cu_seqlens, opt, true);
  check_finite(who, "q", q, D.T * D.H * D.d);
  check_finite(who, "k", k, D.T * D.Hk * D.d);
  const int nt = detail::resolve_threads(threads);
  const std::vector<int64_t> boff = block_offsets(D);
  int64_t most = 0;
  for (size_t s = 0; s + 1 < boff.size(); ++s) most = std::max(most, boff[s + 1] - boff[s]);
  MobaAccess::reset(plan, D.T, D.H, D.k, D.B, most, D.cu);
  const int64_t nb = boff.back(), d = D.d;
  // Block means per kv head, `[Hk, nb, d]`, each summed in double (token order) and rounded
  // once.
  ws.means.assign(static_cast<size_t>(D.Hk * nb * d), 0.0f);
  const std::vector<int64_t> seq_of = sequence_of_blocks(D, boff);
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> sum(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t w = 0; w < D.Hk * nb; ++w) {
      const int64_t g = w / nb, b = w % nb, s = seq_of[static_cast<size_t>(b)];
      const int64_t j = b - boff[static_cast<size_t>(s)], n = D.cu[s + 1] - D.cu[s];
      const int64_t len = std::min(D.B, n - j * D.B);
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t p = 0; p < len; ++p) {
        const float* row = k + ((D.cu[s] + j * D.B + p) * D.Hk + g) * d;
        for (int64_t r = 0; r < d; ++r) sum[static_cast<size_t>(r)] += row[r];
      }
      float* mean = ws.means.data() + (g * nb + b) * d;
      for (int64_t r = 0; r < d; ++r) mean[r] = static_cast<float>(sum[static_cast<size_t>(r)] / static_cast<double>(len));
    }
  }
  int64_t attended = 0, causal = 0;
  // Per sequence, token and head: scores of the earlier blocks, the top k - 1 (higher score
  // first, then the lower index), ascending, then the own block.
  for (size_t s = 0; s + 1 < D.cu.size(); ++s) {
    const int64_t n = D.cu[s + 1] - D.cu[s];
    const int64_t work = n * D.H;
    std::exception_ptr failure;
#pragma omp parallel num_threads(nt) reduction(+ : attended, causal)
    {
      std::vector<float> score;
      std::vector<int32_t> idx;
#pragma omp for schedule(static)
      for (int64_t w = 0; w < work; ++w) {
        try {
        const int64_t i = w / D.H, h = w % D.H, g = h / D.group, c = i / D.B, t = D.cu[s] + i;
        int32_t* out = MobaAccess::blocks(plan, t, h);
        const int64_t keep = std::min<int64_t>(D.k - 1, c);
        if (keep > 0) {
          score.resize(static_cast<size_t>(c));
          idx.resize(static_cast<size_t>(c));
          kernels::matvec_rows(q + (t * D.H + h) * d, ws.means.data() + (g * nb + boff[s]) * d, c, d, score.data());
          for (int64_t j = 0; j < c; ++j) idx[static_cast<size_t>(j)] = static_cast<int32_t>(j);
          auto better = [&](int32_t a, int32_t b) {  // higher first, NaN (overflowed sums) last, then lower index
            const float sa = score[static_cast<size_t>(a)], sb = score[static_cast<size_t>(b)];
            const bool na = std::isnan(sa), nb2 = std::isnan(sb);
            if (na || nb2) return na != nb2 ? nb2 : a < b;
            if (sa != sb) return sa > sb;
            return a < b;
          };
          std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), better);
          std::sort(idx.begin(), idx.begin() + keep);
          std::copy(idx.begin(), idx.begin() + keep, out);
        }
        out[keep] = static_cast<int32_t>(c);
        MobaAccess::count(plan, t, h) = static_cast<int32_t>(keep + 1);
        int64_t keys = i - c * D.B + 1;
        for (int64_t x = 0; x < keep; ++x) keys += std::min(D.B, n - out[x] * D.B);
        attended += keys;
        causal += i + 1;
        } catch (...) {
#pragma omp critical(moekit_moba_failure)
          if (!failure) failure = std::current_exception();
        }
      }
    }
    if (failure) std::rethrow_exception(failure);
  }
  MobaAccess::totals(plan, attended, causal);
}

namespace {

void attend_plan(const AttentionShape& shape, const float* q, const float* k, const float* v,
                 std::span<const int64_t> cu_seqlens, const MobaOptions& opt, const MobaPlan& plan, float* out,
                 MobaWorkspace& ws, int threads, bool qk_checked) {
  const char* who = "moba_attention";
  const Dims D = check(who, shape, cu_seqlens, opt, true);
  MOEKIT_CHECK(plan.tokens() == D.T && plan.heads() == D.H && plan.top_k() == D.k && plan.block_size() == D.B, who,
               ": plan expected from moba_gate with this shape and these options (tokens ", D.T, ", heads ", D.H,
               ", top_k ", D.k, ", block_size ", D.B, "), got tokens ", plan.tokens(), ", heads ", plan.heads(),
               ", top_k ", plan.top_k(), ", block_size ", plan.block_size());
  MOEKIT_CHECK(MobaAccess::cu(plan) == D.cu, who, ": plan expected from moba_gate with these cu_seqlens (",
               static_cast<int64_t>(D.cu.size()) - 1, " sequences), got one made for ",
               static_cast<int64_t>(MobaAccess::cu(plan).size()) - 1, " sequences or other offsets");
  const int nt = detail::resolve_threads(threads);
  std::vector<int64_t> boff;
  TileIndex ti;
  if (!prepare(who, D, q, k, v, out, ws, nt, boff, ti, qk_checked)) return;
  int64_t most = 0;  // the most blocks a sequence has
  for (size_t s = 0; s + 1 < boff.size(); ++s) most = std::max(most, boff[s + 1] - boff[s]);
  const int64_t nb = boff.back(), d = D.d, stride = std::min<int64_t>(D.k, most);
  // Each (token, head)'s result per kept block, in its list's order: (m, l, acc [d]).
  const int64_t part = d + 2;
  ws.partial.resize(static_cast<size_t>(D.T * D.H * stride * part));
  // The queries of every earlier block (per head, global block): counting sort, ascending.
  std::vector<int64_t> start(static_cast<size_t>(D.H * nb + 1), 0);
  std::vector<int32_t> queries, where;  // sequence-local query index; its slot in the list
  for (size_t s = 0; s + 1 < D.cu.size(); ++s)
    for (int64_t t = D.cu[s]; t < D.cu[s + 1]; ++t)
      for (int64_t h = 0; h < D.H; ++h) {
        const auto bl = plan.blocks(t, h);
        for (size_t x = 0; x + 1 < bl.size(); ++x) ++start[static_cast<size_t>(h * nb + boff[s] + bl[x] + 1)];
      }
  for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
  queries.resize(static_cast<size_t>(start.back()));
  where.resize(queries.size());
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (size_t s = 0; s + 1 < D.cu.size(); ++s)
      for (int64_t t = D.cu[s]; t < D.cu[s + 1]; ++t)
        for (int64_t h = 0; h < D.H; ++h) {
          const auto bl = plan.blocks(t, h);
          for (size_t x = 0; x + 1 < bl.size(); ++x) {
            const size_t at = static_cast<size_t>(fill[static_cast<size_t>(h * nb + boff[s] + bl[x])]++);
            queries[at] = static_cast<int32_t>(t - D.cu[s]);
            where[at] = static_cast<int32_t>(x);
          }
        }
  }
  // Work items: (head, global block, chunk of its queries); the own blocks as tiles of
  // queries (kind 1).
  struct Item {
    int64_t s, h, j;
    int64_t first, n;  // earlier block: queries[first, first + n); own block: local queries [first, first + n)
    bool own;
  };
  std::vector<Item> items;
  for (size_t s = 0; s + 1 < D.cu.size(); ++s) {
    const int64_t n = D.cu[s + 1] - D.cu[s];
    for (int64_t h = 0; h < D.H; ++h)
      for (int64_t j = 0; j < boff[s + 1] - boff[s]; ++j) {
        const int64_t b0 = j * D.B, b1 = std::min(n, b0 + D.B);
        for (int64_t i0 = b0; i0 < b1; i0 += kQueryTile)
          items.push_back({static_cast<int64_t>(s), h, j, i0, std::min(kQueryTile, b1 - i0), true});
        const size_t list = static_cast<size_t>(h * nb + boff[s] + j);
        for (int64_t f = start[list]; f < start[list + 1]; f += kQueryTile)
          items.push_back({static_cast<int64_t>(s), h, j, f, std::min(kQueryTile, start[list + 1] - f), false});
      }
  }
  auto slot_of = [&](int64_t t, int64_t h, int64_t x) {
    return ws.partial.data() + static_cast<size_t>(((t * D.H + h) * stride + x) * part);
  };
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (size_t w = 0; w < items.size(); ++w) {
    const Item& it = items[w];
    const Scratch x(ws.scratch[static_cast<size_t>(omp_get_thread_num())].data(), d);
    int32_t local[kQueryTile];
    const int32_t* qs = local;
    if (it.own) {
      for (int64_t r = 0; r < it.n; ++r) local[r] = static_cast<int32_t>(it.first + r);
    } else {
      qs = queries.data() + it.first;
    }
    x.reset(it.n, d);
    block_pass(D, it.s, it.h, it.j, it.own, qs, it.n, q, boff, ti, ws, x);
    for (int64_t r = 0; r < it.n; ++r) {
      const int64_t t = D.cu[static_cast<size_t>(it.s)] + qs[r];
      const int64_t pos = it.own ? static_cast<int64_t>(plan.blocks(t, it.h).size()) - 1
                                 : int64_t{where[static_cast<size_t>(it.first + r)]};
      float* p = slot_of(t, it.h, pos);
      p[0] = x.m[r];
      p[1] = x.l[r];
      std::memcpy(p + 2, x.acc + r * d, static_cast<size_t>(d) * sizeof(float));
    }
  }
  // Combine each (token, head)'s blocks in list order: c = sum_b e^(m_b - m) acc_b / sum_b
  // e^(m_b - m) l_b with m the largest m_b.
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t w = 0; w < D.T * D.H; ++w) {
    const int64_t t = w / D.H, h = w % D.H;
    const int64_t nbk = static_cast<int64_t>(plan.blocks(t, h).size());
    float mx = kNegInf;
    for (int64_t x = 0; x < nbk; ++x) mx = std::max(mx, slot_of(t, h, x)[0]);
    float* o = out + (t * D.H + h) * d;
    float l = 0.0f;
    for (int64_t x = 0; x < nbk; ++x) {
      const float* p = slot_of(t, h, x);
      const float e = std::exp(p[0] - mx);
      l += e * p[1];
      if (x == 0) {
        kernels::scale_row(e, p + 2, o, d);
      } else {
        kernels::axpy_row(e, p + 2, o, d);
      }
    }
    kernels::scale_row(1.0f / l, o, o, d);
  }
}

}  // namespace

void moba_attention(const AttentionShape& shape, const float* q, const float* k, const float* v,
                    std::span<const int64_t> cu_seqlens, const MobaOptions& opt, const MobaPlan& plan, float* out,
                    MobaWorkspace& ws, int threads) {
  attend_plan(shape, q, k, v, cu_seqlens, opt, plan, out, ws, threads, false);
}

void moba_forward(const AttentionShape& shape, const float* q, const float* k, const float* v,
                  std::span<const int64_t> cu_seqlens, const MobaOptions& opt, MobaPlan& plan, float* out,
                  MobaWorkspace& ws, int threads) {
  moba_gate(shape, q, k, cu_seqlens, opt, plan, ws, threads);  // checks q and k
  attend_plan(shape, q, k, v, cu_seqlens, opt, plan, out, ws, threads, true);
}

void causal_attention(const AttentionShape& shape, const float* q, const float* k, const float* v,
                      std::span<const int64_t> cu_seqlens, const MobaOptions& opt, float* out, MobaWorkspace& ws,
                      int threads) {
  const char* who = "causal_attention";
  const Dims D = check(who, shape, cu_seqlens, opt, false);
  const int nt = detail::resolve_threads(threads);
  std::vector<int64_t> boff;
  TileIndex ti;
  if (!prepare(who, D, q, k, v, out, ws, nt, boff, ti)) return;
  const std::vector<DenseItem> items = dense_items(D);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (size_t w = 0; w < items.size(); ++w) {
    const DenseItem& it = items[w];
    const Scratch x(ws.scratch[static_cast<size_t>(omp_get_thread_num())].data(), D.d);
    int32_t local[kQueryTile];
    for (int64_t r = 0; r < it.n; ++r) local[r] = static_cast<int32_t>(it.i0 + r);
    x.reset(it.n, D.d);
    for (int64_t j = 0; j <= it.c; ++j) block_pass(D, it.s, it.h, j, j == it.c, local, it.n, q, boff, ti, ws, x);
    for (int64_t r = 0; r < it.n; ++r)
      kernels::scale_row(1.0f / x.l[r], x.acc + r * D.d, out + ((D.cu[it.s] + it.i0 + r) * D.H + it.h) * D.d, D.d);
  }
}

}  // namespace moekit::attention
