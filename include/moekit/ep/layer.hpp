// SPDX-License-Identifier: Apache-2.0
// moekit::ep::ExpertParallelLayer: a SparseLayer whose experts live on several MPI ranks.
// Each rank routes its own tokens, sends each kept slot's row to the rank that computes that
// expert (MPI_Alltoallv), runs the rows it receives through the layer's own expert machinery
// (SparseLayer::run_experts), sends the outputs back and combines them on the token's home
// rank (SparseLayer::combine_outputs). Part of the optional moekit::ep component.
#pragma once

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "moekit/activations.hpp"
#include "moekit/batch.hpp"
#include "moekit/ep/comm.hpp"
#include "moekit/ep/placement.hpp"
#include "moekit/ep/sharded_bank.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/layer.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::ep {

/// What the ranks that did not fail throw when another rank failed in a collective call (the
/// failing rank throws its own moekit::error): a caller can report only the original error.
class remote_error : public moekit::error {
 public:
  remote_error(int rank, const std::string& what) : moekit::error(what), rank_(rank) {}
  /// The lowest rank that failed.
  [[nodiscard]] int rank() const noexcept { return rank_; }

 private:
  int rank_;
};

/// The element type of the rows on the wire (dispatch and combine).
enum class Wire : uint8_t {
  f32,   ///< exact: the output equals the single-process layer's bit for bit
  bf16,  ///< half the bytes: rows are rounded (to nearest even) when sent, both ways
};
/// How expert rows are assigned to ranks.
enum class Balance : uint8_t {
  none,  ///< every expert's rows on its owners (plain_plan)
  llep,  ///< least-loaded expert parallelism (llep_plan), shipping weights where needed
};

struct Options {
  Wire wire = Wire::f32;
  Balance balance = Balance::none;
  LlepOptions llep{};
  /// Splits the batch's tokens into this many micro-batches: the dispatch of micro-batch i + 1
  /// (MPI_Ialltoallv) is in flight while the experts of micro-batch i run, and the return of i
  /// while i + 1 runs. Results do not depend on it. In [1, 64]; the same on every rank.
  int micro_batches = 1;
};

/// What the last forward did on this rank (loads and plan are the same on every rank).
struct Stats {
  int64_t tokens = 0;             ///< this rank's tokens
  int64_t rows_sent = 0;          ///< kept slots whose rows left for another rank
  int64_t rows_computed = 0;      ///< expert rows this rank computed (its own and others')
  int64_t bytes_sent = 0;         ///< to other ranks: dispatched rows, returned rows, shipped weights
  int64_t bytes_received = 0;     ///< from other ranks, the same
  int64_t weight_bytes_sent = 0;  ///< of bytes_sent: expert weights shipped (LLEP guests)
  int64_t guests = 0;             ///< experts this rank ran with shipped weights
  std::vector<int64_t> expert_load;  ///< `[E]` kept slots per expert, all ranks
  std::vector<int64_t> rank_load;    ///< `[P]` rows each rank computed
  bool rebalanced = false;           ///< LLEP moved work
  double seconds_route = 0, seconds_exchange = 0, seconds_experts = 0, seconds_combine = 0;
};

/// The scratch of ExpertParallelLayer::forward(); reuse it across calls.
struct EpWorkspace {
  Workspace home;    ///< this rank's tokens: plan, expert rows, combine
  Workspace remote;  ///< the rows this rank computes for every rank
  DispatchPlan dispatch;
  std::vector<int64_t> gathered, loads, send_counts, recv_counts, rows_to, rows_from;
  std::vector<int32_t> send_pos, micro, ids;
  std::vector<float> ones, send_f32, recv_f32, back_f32, ret_f32, rows_f32;
  std::vector<uint16_t> send_16, recv_16, back_16, ret_16;
  std::vector<uint8_t> weights_out, weights_in;
};

template <Router R, ExpertBank B>
class ExpertParallelLayer {
  static_assert(!ContextAwareBank<B>, "moekit::ep: banks that need the BlockContext (whole tokens) cannot be split over ranks");

 public:
  static constexpr bool kSharded = std::is_same_v<B, ShardedFfnBank>;
  static constexpr int64_t kMaxRows = std::numeric_limits<int>::max();

  /// `layer`: the router, shared experts and the bank of this rank (a ShardedFfnBank holding
  /// exactly placement.experts_of(comm.rank()), or any bank holding every expert). The same
  /// router, shared experts and placement on every rank. Collective (every rank constructs its
  /// layer together): checks that all ranks agree on the options and the experts' packed layout.
  /// Throws moekit::error on a mismatch (every rank, for a disagreement between ranks).
  ExpertParallelLayer(SparseLayer<R, B> layer, Placement placement, Comm comm, Options options = {})
      : layer_(std::move(layer)), placement_(std::move(placement)), comm_(comm), opt_(std::move(options)) {
    std::exception_ptr failure;
    std::string sig;
    try {  // local checks, agreed below (one collective) so no rank is left waiting
      MOEKIT_CHECK(placement_.experts() == layer_.num_experts(), "ep::ExpertParallelLayer: placement has ",
                   placement_.experts(), " experts, expected the layer's ", layer_.num_experts());
      MOEKIT_CHECK(placement_.ranks() == comm_.size(), "ep::ExpertParallelLayer: placement is for ", placement_.ranks(),
                   " ranks, the communicator has ", comm_.size());
      MOEKIT_CHECK(opt_.micro_batches >= 1 && opt_.micro_batches <= 64,
                   "ep::ExpertParallelLayer: micro_batches expected in [1, 64], got ", opt_.micro_batches);
      if constexpr (kSharded)
        MOEKIT_CHECK(layer_.experts().held() == placement_.experts_of(comm_.rank()), "ep::ExpertParallelLayer: rank ",
                     comm_.rank(), " bank holds ", layer_.experts().held().size(),
                     " experts, expected exactly the placement's ", placement_.experts_of(comm_.rank()).size());
      if (opt_.balance == Balance::llep) (void)llep_plan(std::vector<int64_t>(static_cast<size_t>(num_experts()), 0),
                                                         placement_, opt_.llep);  // checks the options now
      MOEKIT_CHECK(hidden_size() <= (int64_t{1} << 28), "ep::ExpertParallelLayer: hidden size ", hidden_size(),
                   " expected <= 2^28 (a row's bytes must fit MPI's int counts)");
      // Collective: every rank must agree on what shapes the exchanges (micro-batches, wire,
      // balance, LLEP knobs) and on the packed layout of shipped experts (kernel, type, bytes).
      // (appended piece by piece: GCC 12 warns falsely on chained std::string operator+)
      for (const std::string& part :
           {std::to_string(opt_.micro_batches), std::to_string(static_cast<int>(opt_.wire)),
            std::to_string(static_cast<int>(opt_.balance)), std::to_string(opt_.llep.lambda), std::to_string(opt_.llep.alpha),
            std::to_string(opt_.llep.min_tokens), std::to_string(opt_.llep.max_guests), std::to_string(num_experts()),
            std::to_string(hidden_size())})
        sig.append(part).append("/");
      for (const int64_t g : opt_.llep.max_guests_per_rank) sig.append(std::to_string(g)).append(",");
      if constexpr (kSharded) {
        const FfnBank& b = layer_.experts().local();
        sig.append("/").append(b.in_matrix(0).layout().kernel).append("/");
        sig.append(std::to_string(static_cast<int>(b.weight_type()))).append("/");
        sig.append(std::to_string(layer_.experts().payload_bytes()));
        // Guests run under the receiving rank's input smoothing (EAQuant): it must be the same.
        for (const float v : b.input_smoothing()) sig.append(std::to_string(std::bit_cast<uint32_t>(v))).append(",");
      }
    } catch (...) {
      failure = std::current_exception();
    }
    const std::vector<int64_t> mine = {failure ? 1 : 0, static_cast<int64_t>(std::hash<std::string>{}(sig) & 0x7FFFFFFFFFFFFFFF)};
    std::vector<int64_t> all(2 * static_cast<size_t>(comm_.size()));
    comm_.allgather(mine, all);
    agree(failure, [&](int r) { return all[2 * static_cast<size_t>(r)] != 0; }, "checking its layer");
    for (int r = 0; r < comm_.size(); ++r)
      MOEKIT_CHECK(all[2 * static_cast<size_t>(r) + 1] == all[1], "ep::ExpertParallelLayer: rank ", r,
                   " differs from rank 0 in its options (micro-batches, wire, balance, LLEP knobs), E, d, or its experts' "
                   "packed layout (kernel, weight type, input smoothing: shipped weights need the same on every rank)");
  }

  [[nodiscard]] int64_t hidden_size() const noexcept { return layer_.hidden_size(); }
  [[nodiscard]] int64_t num_experts() const noexcept { return layer_.num_experts(); }
  [[nodiscard]] const SparseLayer<R, B>& layer() const noexcept { return layer_; }
  [[nodiscard]] const Placement& placement() const noexcept { return placement_; }
  [[nodiscard]] const Comm& comm() const noexcept { return comm_; }
  [[nodiscard]] const Options& options() const noexcept { return opt_; }
  [[nodiscard]] const Stats& stats() const noexcept { return stats_; }

  /// Collective: every rank calls it with its own tokens (any count, 0 included). Writes
  /// `out [T, d]` for this rank's tokens: with Wire::f32 equal bit for bit to the single-process
  /// layer's forward() on every rank's tokens concatenated (for routers that decide per token;
  /// batch-level routers, e.g. expert-choice, route each rank's tokens as their own batch).
  /// An error on any rank (bad input, non-finite values) makes every rank throw: the failing
  /// rank its own moekit::error, the others an ep::remote_error naming that rank.
  void forward(const Batch& batch, const float* hidden, float* out, EpWorkspace& ws, int threads = 0) {
    forward(batch, ActivationsIn::f32(hidden), ActivationsOut::f32(out), ws, threads);
  }
  void forward(const Batch& batch, ActivationsIn hidden, ActivationsOut out, EpWorkspace& ws, int threads = 0) {
    using clock = std::chrono::steady_clock;
    const auto seconds = [](clock::time_point a) { return std::chrono::duration<double>(clock::now() - a).count(); };
    const int P = comm_.size(), me = comm_.rank(), M = opt_.micro_batches;
    const int64_t E = num_experts(), d = hidden_size();
    stats_ = Stats{};
    stats_.tokens = batch.tokens;
    const bool wire16 = opt_.wire == Wire::bf16;
    const size_t row_bytes = static_cast<size_t>(d) * (wire16 ? 2 : 4);

    // 1. Route here; every rank learns every rank's per-expert loads (and whether it failed).
    auto t0 = clock::now();
    const float* x = nullptr;
    std::exception_ptr failure;
    try {
      x = layer_.route(batch, hidden, ws.home, threads, out);
    } catch (...) {
      failure = std::current_exception();
    }
    const RoutingPlan& plan = ws.home.plan;
    std::vector<int64_t> mine(static_cast<size_t>(E) + 1, 0);
    if (!failure)
      for (int64_t e = 0; e < E; ++e) mine[static_cast<size_t>(e)] = plan.kept_of(e);
    mine[static_cast<size_t>(E)] = failure ? 1 : 0;
    ws.gathered.resize(static_cast<size_t>(P) * static_cast<size_t>(E + 1));
    comm_.allgather(mine, ws.gathered);
    agree(failure, [&](int r) { return ws.gathered[static_cast<size_t>(r) * static_cast<size_t>(E + 1) + static_cast<size_t>(E)] != 0; },
          "routing");
    const auto count_of = [&](int r, int64_t e) {
      return ws.gathered[static_cast<size_t>(r) * static_cast<size_t>(E + 1) + static_cast<size_t>(e)];
    };
    ws.loads.assign(static_cast<size_t>(E), 0);
    for (int r = 0; r < P; ++r)
      for (int64_t e = 0; e < E; ++e) ws.loads[static_cast<size_t>(e)] += count_of(r, e);
    ws.dispatch = opt_.balance == Balance::llep ? llep_plan(ws.loads, placement_, opt_.llep) : plain_plan(ws.loads, placement_);
    stats_.expert_load = ws.loads;
    stats_.rank_load = ws.dispatch.rank_load;
    stats_.rebalanced = ws.dispatch.rebalanced;
    stats_.seconds_route = seconds(t0);

    // 2. Where each of this rank's kept rows goes: expert e's rows have global indices
    // [sum of lower ranks' counts, + own count); the plan's segments cut that range.
    t0 = clock::now();
    const int64_t T = batch.tokens;
    const size_t cells = static_cast<size_t>(M) * static_cast<size_t>(P) * static_cast<size_t>(E);
    const auto cell = [&](int m, int r, int64_t e) {  // send order: micro-batch, destination, expert
      return (static_cast<size_t>(m) * static_cast<size_t>(P) + static_cast<size_t>(r)) * static_cast<size_t>(E) +
             static_cast<size_t>(e);
    };
    const auto offs = plan.expert_offsets();
    const auto tokens = plan.expert_tokens();
    try {  // local work (allocations can fail on one rank only): agreed before the next collective
      ws.micro.resize(static_cast<size_t>(T));
      for (int m = 0; m < M; ++m)
        for (int64_t t = T * m / M; t < T * (m + 1) / M; ++t) ws.micro[static_cast<size_t>(t)] = m;
      std::vector<int64_t> cnt(cells, 0);
      std::vector<int32_t> dest(static_cast<size_t>(plan.num_kept()));
      for (int64_t e = 0; e < E; ++e) {
        int64_t g = 0;
        for (int r = 0; r < me; ++r) g += count_of(r, e);
        const auto segs = ws.dispatch.of(e);
        size_t si = 0;
        int64_t seg_end = segs.empty() ? 0 : segs[0].rows;
        for (int32_t p = offs[static_cast<size_t>(e)]; p < offs[static_cast<size_t>(e) + 1]; ++p, ++g) {
          while (g >= seg_end) seg_end += segs[++si].rows;
          const int r = segs[si].rank;
          dest[static_cast<size_t>(p)] = r;
          ++cnt[cell(ws.micro[static_cast<size_t>(tokens[static_cast<size_t>(p)])], r, e)];
        }
      }
      // Send positions, and the per-destination counts laid out for the exchange: [dest][m][e].
      std::vector<int64_t> at(cells + 1, 0);
      for (size_t c = 0; c < cells; ++c) at[c + 1] = at[c] + cnt[c];
      ws.send_pos.resize(static_cast<size_t>(plan.num_kept()));
      for (int64_t e = 0; e < E; ++e)
        for (int32_t p = offs[static_cast<size_t>(e)]; p < offs[static_cast<size_t>(e) + 1]; ++p)
          ws.send_pos[static_cast<size_t>(
              at[cell(ws.micro[static_cast<size_t>(tokens[static_cast<size_t>(p)])], dest[static_cast<size_t>(p)], e)]++)] = p;
      ws.send_counts.resize(cells);
      ws.recv_counts.resize(cells);
      for (int r = 0; r < P; ++r)
        for (int m = 0; m < M; ++m)
          for (int64_t e = 0; e < E; ++e)
            ws.send_counts[(static_cast<size_t>(r) * static_cast<size_t>(M) + static_cast<size_t>(m)) * static_cast<size_t>(E) +
                           static_cast<size_t>(e)] = cnt[cell(m, r, e)];
    } catch (...) {
      failure = std::current_exception();
    }
    agree(failure, [](int r) { return r >= 0; }, "planning the dispatch", /*flag_is_rank=*/true);
    comm_.alltoall(ws.send_counts, ws.recv_counts);
    const auto sent = [&](int r, int m, int64_t e) {
      return ws.send_counts[(static_cast<size_t>(r) * static_cast<size_t>(M) + static_cast<size_t>(m)) * static_cast<size_t>(E) +
                            static_cast<size_t>(e)];
    };
    const auto got = [&](int r, int m, int64_t e) {
      return ws.recv_counts[(static_cast<size_t>(r) * static_cast<size_t>(M) + static_cast<size_t>(m)) * static_cast<size_t>(E) +
                            static_cast<size_t>(e)];
    };

    // 3. Ship the weights of experts this rank runs without holding them (LLEP guests).
    ship_guests(ws);

    // 4. Pack every row to send (micro-batch, destination, expert order) in the wire type,
    // scaled by its weight when the layer applies the weight to the expert's input.
    const auto N_send = static_cast<int64_t>(ws.send_pos.size());
    std::vector<int64_t> send_base(static_cast<size_t>(M) + 1, 0), recv_base(static_cast<size_t>(M) + 1, 0);
    std::vector<std::vector<int64_t>> to(static_cast<size_t>(M), std::vector<int64_t>(static_cast<size_t>(P), 0));
    std::vector<std::vector<int64_t>> from = to;
    try {  // local again: agreed before the rows move
      if (wire16) {
        grow(ws.send_16, static_cast<size_t>(N_send * d));
        grow(ws.ret_16, static_cast<size_t>(N_send * d));
      } else {
        grow(ws.send_f32, static_cast<size_t>(N_send * d));
        grow(ws.ret_f32, static_cast<size_t>(N_send * d));
      }
      std::vector<float> row(static_cast<size_t>(d));
      const auto slots = plan.expert_slots();
      for (int64_t j = 0; j < N_send; ++j) {
        const int32_t p = ws.send_pos[static_cast<size_t>(j)];
        const float* src = x + static_cast<int64_t>(tokens[static_cast<size_t>(p)]) * d;
        if (layer_.weight_on_input()) {
          const float w = plan.slot_weight()[static_cast<size_t>(slots[static_cast<size_t>(p)])];
          for (int64_t i = 0; i < d; ++i) row[static_cast<size_t>(i)] = src[i] * w;
          src = row.data();
        }
        if (wire16) {
          kernels::f32_to_bf16(src, ws.send_16.data() + j * d, d);
        } else {
          kernels::copy_row(src, ws.send_f32.data() + j * d, d);
        }
      }

      // 5. Per micro-batch: dispatch (in flight while the previous one computes), experts, return.
      for (int m = 0; m < M; ++m) {
        for (int r = 0; r < P; ++r)
          for (int64_t e = 0; e < E; ++e) {
            to[static_cast<size_t>(m)][static_cast<size_t>(r)] += sent(r, m, e);
            from[static_cast<size_t>(m)][static_cast<size_t>(r)] += got(r, m, e);
          }
        send_base[static_cast<size_t>(m) + 1] =
            send_base[static_cast<size_t>(m)] + std::accumulate(to[static_cast<size_t>(m)].begin(), to[static_cast<size_t>(m)].end(), int64_t{0});
        recv_base[static_cast<size_t>(m) + 1] = recv_base[static_cast<size_t>(m)] +
                                                std::accumulate(from[static_cast<size_t>(m)].begin(),
                                                                from[static_cast<size_t>(m)].end(), int64_t{0});
      }
      for (int m = 0; m < M; ++m)  // one exchange's rows must fit MPI's int counts (Comm checks again)
        MOEKIT_CHECK(send_base[static_cast<size_t>(m) + 1] - send_base[static_cast<size_t>(m)] <= kMaxRows &&
                         recv_base[static_cast<size_t>(m) + 1] - recv_base[static_cast<size_t>(m)] <= kMaxRows,
                     "ep::ExpertParallelLayer: rank ", me, " would exchange more than 2^31 - 1 rows in micro-batch ", m,
                     " (use more micro-batches or ranks)");
      const int64_t N_recv_all = recv_base[static_cast<size_t>(M)];
      if (wire16) {
        grow(ws.recv_16, static_cast<size_t>(N_recv_all * d));
        grow(ws.back_16, static_cast<size_t>(N_recv_all * d));
      } else {
        grow(ws.recv_f32, static_cast<size_t>(N_recv_all * d));
        grow(ws.back_f32, static_cast<size_t>(N_recv_all * d));
      }
    } catch (...) {
      failure = std::current_exception();
    }
    agree(failure, [](int r) { return r >= 0; }, "preparing the exchange", /*flag_is_rank=*/true);
    const int64_t N_recv = recv_base[static_cast<size_t>(M)];
    // Row `i` of one of the wire buffers (bf16 or f32, whichever the wire uses).
    const auto at_row = [&](std::vector<uint16_t>& w16, std::vector<float>& w32, int64_t i) -> void* {
      return wire16 ? static_cast<void*>(w16.data() + i * d) : static_cast<void*>(w32.data() + i * d);
    };
    const auto send_ptr = [&](int64_t i) { return at_row(ws.send_16, ws.send_f32, i); };
    const auto recv_ptr = [&](int64_t i) { return at_row(ws.recv_16, ws.recv_f32, i); };
    const auto back_ptr = [&](int64_t i) { return at_row(ws.back_16, ws.back_f32, i); };
    const auto ret_ptr = [&](int64_t i) { return at_row(ws.ret_16, ws.ret_f32, i); };
    std::vector<Exchange> dispatch(static_cast<size_t>(M)), back(static_cast<size_t>(M));
    dispatch[0] = comm_.ialltoallv(send_ptr(send_base[0]), to[0], recv_ptr(recv_base[0]), from[0], row_bytes);
    stats_.seconds_exchange += seconds(t0);
    for (int m = 0; m < M; ++m) {
      t0 = clock::now();
      dispatch[static_cast<size_t>(m)].wait();
      if (m + 1 < M)
        dispatch[static_cast<size_t>(m) + 1] =
            comm_.ialltoallv(send_ptr(send_base[static_cast<size_t>(m) + 1]), to[static_cast<size_t>(m) + 1],
                             recv_ptr(recv_base[static_cast<size_t>(m) + 1]), from[static_cast<size_t>(m) + 1], row_bytes);
      stats_.seconds_exchange += seconds(t0);
      t0 = clock::now();
      const int64_t b = recv_base[static_cast<size_t>(m)], n = recv_base[static_cast<size_t>(m) + 1] - b;
      try {
        run_received(m, b, n, ws, [&](int r, int64_t e) { return got(r, m, e); }, threads);
      } catch (...) {
        failure = std::current_exception();
      }
      stats_.seconds_experts += seconds(t0);
      t0 = clock::now();
      agree(failure, [&](int r) { return r >= 0; }, "experts", /*flag_is_rank=*/true);
      back[static_cast<size_t>(m)] = comm_.ialltoallv(back_ptr(b), from[static_cast<size_t>(m)],
                                                      ret_ptr(send_base[static_cast<size_t>(m)]), to[static_cast<size_t>(m)], row_bytes);
      stats_.seconds_exchange += seconds(t0);
    }
    t0 = clock::now();
    for (Exchange& xch : back) xch.wait();
    stats_.seconds_exchange += seconds(t0);

    // 6. Every returned row to its place in this rank's expert order; combine here.
    t0 = clock::now();
    const auto rows = layer_.expert_rows(plan, ws.home);
    for (int64_t j = 0; j < N_send; ++j) {
      float* dst = rows.data() + static_cast<int64_t>(ws.send_pos[static_cast<size_t>(j)]) * d;
      if (wire16) {
        kernels::bf16_to_f32(ws.ret_16.data() + j * d, dst, d);
      } else {
        kernels::copy_row(ws.ret_f32.data() + j * d, dst, d);
      }
    }
    stats_.rows_computed = N_recv;
    for (int m = 0; m < M; ++m) {
      const int64_t out_rows = std::accumulate(to[static_cast<size_t>(m)].begin(), to[static_cast<size_t>(m)].end(), int64_t{0}) -
                               to[static_cast<size_t>(m)][static_cast<size_t>(me)];
      const int64_t in_rows =
          std::accumulate(from[static_cast<size_t>(m)].begin(), from[static_cast<size_t>(m)].end(), int64_t{0}) -
          from[static_cast<size_t>(m)][static_cast<size_t>(me)];
      stats_.rows_sent += out_rows;
      stats_.bytes_sent += (out_rows + in_rows) * static_cast<int64_t>(row_bytes);
      stats_.bytes_received += (out_rows + in_rows) * static_cast<int64_t>(row_bytes);
    }
    stats_.bytes_sent += stats_.weight_bytes_sent;
    try {  // the output check may fail on one rank: every rank learns it
      layer_.combine_outputs(batch, x, plan, out, ws.home, threads);
    } catch (...) {
      failure = std::current_exception();
    }
    agree(failure, [](int r) { return r >= 0; }, "the combine", /*flag_is_rank=*/true);
    stats_.seconds_combine = seconds(t0);
  }

 private:
  template <class V>
  static void grow(V& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }

  // Collective: when any rank failed, every rank throws (the failing one its own error).
  // `failed(r)` tells whether rank r failed (from gathered flags), or with flag_is_rank the
  // lowest failing rank is found with one reduction.
  template <class Failed>
  void agree(std::exception_ptr failure, Failed&& failed, const char* stage, bool flag_is_rank = false) {
    int bad = -1;
    if (flag_is_rank) {
      bad = comm_.first(failure != nullptr);
    } else {
      for (int r = 0; r < comm_.size() && bad < 0; ++r)
        if (failed(r)) bad = r;
    }
    if (bad < 0) return;
    release_guests();
    if (failure) std::rethrow_exception(failure);
    throw remote_error(bad, moekit::detail::concat("ep::ExpertParallelLayer: rank ", bad, " failed in ", stage,
                                                   " (its own error names the cause)"));
  }

  // Rows [b, b + n) of the receive buffer: from each source in rank order, by expert within a
  // source. One plan slot (weight 1) per row; the layer's experts; outputs back in arrival order.
  template <class Got>
  void run_received(int /*m*/, int64_t b, int64_t n, EpWorkspace& ws, Got&& got, int threads) {
    const int64_t E = num_experts(), d = hidden_size();
    const bool wire16 = opt_.wire == Wire::bf16;
    if (n == 0) return;
    ws.ids.resize(static_cast<size_t>(n));
    int64_t i = 0;
    for (int r = 0; r < comm_.size(); ++r)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t c = got(r, e); c > 0; --c) ws.ids[static_cast<size_t>(i++)] = static_cast<int32_t>(e);
    MOEKIT_CHECK(i == n, "ep::ExpertParallelLayer: received ", n, " rows, counts say ", i);
    if constexpr (kSharded) {
      for (int64_t e = 0; e < E; ++e)
        MOEKIT_CHECK(layer_.experts().resident(e) || std::find(ws.ids.begin(), ws.ids.end(), e) == ws.ids.end(),
                     "ep::ExpertParallelLayer: rank ", comm_.rank(), " received rows of expert ", e,
                     " whose weights it neither holds nor was sent");
    }
    ws.ones.assign(static_cast<size_t>(n), 1.0f);
    RoutingPlan& there = ws.remote.plan;
    there.assign_topk(ws.ids.data(), ws.ones.data(), n, 1, E);
    const float* rows = nullptr;
    if (wire16) {
      grow(ws.rows_f32, static_cast<size_t>(n * d));
      kernels::bf16_to_f32(ws.recv_16.data() + b * d, ws.rows_f32.data(), n * d);
      rows = ws.rows_f32.data();
    } else {
      rows = ws.recv_f32.data() + b * d;
    }
    layer_.run_experts(rows, there, ws.remote, threads);
    const auto outs = layer_.expert_rows(there, ws.remote);
    const auto pos = there.slot_position();
    for (int64_t r = 0; r < n; ++r) {
      const float* src = outs.data() + static_cast<int64_t>(pos[static_cast<size_t>(r)]) * d;
      if (wire16) {
        kernels::f32_to_bf16(src, ws.back_16.data() + (b + r) * d, d);
      } else {
        kernels::copy_row(src, ws.back_f32.data() + (b + r) * d, d);
      }
    }
  }

  // LLEP guests: each guest expert's native rank sends its payload to the ranks that run it.
  // Guests stay resident while consecutive plans keep them (every rank knows what every rank
  // hosts: the plans are the same everywhere), so a steady skew ships each expert once.
  void ship_guests(EpWorkspace& ws) {
    const int P = comm_.size(), me = comm_.rank();
    if constexpr (kSharded) {
      ShardedFfnBank& bank = layer_.experts();
      resident_guests_.resize(static_cast<size_t>(P));
      const auto has = [](const std::vector<int64_t>& v, int64_t e) { return std::find(v.begin(), v.end(), e) != v.end(); };
      // What moves: guests a rank needs and does not host yet.
      std::vector<std::vector<int64_t>> fresh(static_cast<size_t>(P));
      bool any = false;
      for (int r = 0; r < P; ++r)
        for (const int64_t e : ws.dispatch.guests[static_cast<size_t>(r)])
          if (!has(resident_guests_[static_cast<size_t>(r)], e)) {
            fresh[static_cast<size_t>(r)].push_back(e);
            any = true;
          }
      for (const int64_t e : resident_guests_[static_cast<size_t>(me)])  // no longer needed here
        if (!has(ws.dispatch.guests[static_cast<size_t>(me)], e)) bank.remove_guest(e);
      stats_.guests = static_cast<int64_t>(ws.dispatch.guests[static_cast<size_t>(me)].size());
      if (!any) {
        resident_guests_ = ws.dispatch.guests;
        return;
      }
      const auto bytes = static_cast<int64_t>(bank.payload_bytes());
      std::vector<int64_t> to(static_cast<size_t>(P), 0), from(static_cast<size_t>(P), 0);
      for (int r = 0; r < P; ++r)
        for (const int64_t e : fresh[static_cast<size_t>(r)]) {
          if (placement_.native(e) == me) ++to[static_cast<size_t>(r)];
          if (r == me) ++from[static_cast<size_t>(placement_.native(e))];
        }
      const int64_t n_to = std::accumulate(to.begin(), to.end(), int64_t{0});
      const int64_t n_from = std::accumulate(from.begin(), from.end(), int64_t{0});
      std::exception_ptr failure;
      int64_t k = 0;
      try {  // local: agreed before the weights move
        ws.weights_out.resize(static_cast<size_t>(std::max<int64_t>(n_to * bytes, 1)));
        ws.weights_in.resize(static_cast<size_t>(std::max<int64_t>(n_from * bytes, 1)));
        for (int r = 0; r < P; ++r)
          for (const int64_t e : fresh[static_cast<size_t>(r)])
            if (placement_.native(e) == me) bank.write_payload(e, ws.weights_out.data() + (k++) * bytes);
      } catch (...) {
        failure = std::current_exception();
      }
      agree(failure, [](int r) { return r >= 0; }, "packing expert weights to ship", /*flag_is_rank=*/true);
      comm_.alltoallv(ws.weights_out.data(), to, ws.weights_in.data(), from, static_cast<size_t>(bytes));
      // Arrivals: by source rank, then ascending expert (the order each native rank wrote).
      try {
        k = 0;
        for (int s = 0; s < P; ++s)
          for (const int64_t e : fresh[static_cast<size_t>(me)])
            if (placement_.native(e) == s)
              bank.add_guest(e, std::span<const uint8_t>(ws.weights_in.data() + (k++) * bytes, static_cast<size_t>(bytes)));
      } catch (...) {
        failure = std::current_exception();
      }
      stats_.weight_bytes_sent = n_to * bytes;
      stats_.bytes_received += n_from * bytes;
      agree(failure, [](int r) { return r >= 0; }, "receiving expert weights", /*flag_is_rank=*/true);
      resident_guests_ = ws.dispatch.guests;
    } else {
      (void)ws;
      (void)P;
      (void)me;  // every rank holds every expert: nothing to ship
    }
  }

 public:
  /// Frees the guest experts this rank hosts (LLEP keeps them between calls while the plans
  /// need them). Call it on every rank, between forwards: each rank tracks what all host.
  void release_guests() noexcept {
    if constexpr (kSharded) layer_.experts().clear_guests();
    resident_guests_.clear();
  }

 private:
  SparseLayer<R, B> layer_;
  Placement placement_;
  Comm comm_;
  Options opt_;
  Stats stats_;
  std::vector<std::vector<int64_t>> resident_guests_;  // per rank: the guests it hosts now
};

}  // namespace moekit::ep
#pragma GCC visibility pop
