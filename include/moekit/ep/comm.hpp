// SPDX-License-Identifier: Apache-2.0
// moekit::ep::Comm: the few MPI collectives expert parallelism uses, on a communicator the
// caller owns (part of the optional moekit::ep component; needs MPI).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::ep {

/// A non-blocking exchange in flight (Comm::ialltoallv); wait() completes it. Keeps the count
/// arrays MPI reads until then.
class Exchange {
 public:
  Exchange() = default;
  Exchange(Exchange&&) noexcept;
  Exchange& operator=(Exchange&&) noexcept;
  ~Exchange();
  /// Blocks until the exchange is done (no-op when none is in flight).
  void wait();
  /// Lets MPI progress it; true once done.
  bool test();
  [[nodiscard]] bool active() const noexcept { return state_ != nullptr; }

  struct State {  // what MPI reads until the exchange completes
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
    MPI_Datatype row = MPI_DATATYPE_NULL;
    MPI_Request request = MPI_REQUEST_NULL;
    State() = default;
    State(const State&) = delete;
    State& operator=(const State&) = delete;
    ~State() {
      if (row != MPI_DATATYPE_NULL) MPI_Type_free(&row);
    }
  };

 private:
  friend class Comm;
  std::unique_ptr<State> state_;
};

/// The collectives of one communicator (not owned: the caller keeps it alive and calls
/// MPI_Init / MPI_Finalize). Every call is collective: every rank makes the same calls in the
/// same order. Sizes that do not fit MPI's int counts throw moekit::error before any rank
/// communicates.
class Comm {
 public:
  /// Throws moekit::error when MPI is not initialised or `comm` is MPI_COMM_NULL.
  explicit Comm(MPI_Comm comm = MPI_COMM_WORLD);
  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] MPI_Comm get() const noexcept { return comm_; }

  /// Every rank's `mine` (the same length everywhere), rank-major, into `all [size * n]`.
  void allgather(std::span<const int64_t> mine, std::span<int64_t> all) const;
  /// `send [size * n]` (n values for each destination) -> `recv [size * n]` (n from each source).
  void alltoall(std::span<const int64_t> send, std::span<int64_t> recv) const;
  /// Rows of `row_bytes` bytes: `send_rows[r]` rows to rank r (laid out in rank order in
  /// `send`), `recv_rows[r]` from rank r into `recv` (rank order).
  void alltoallv(const void* send, std::span<const int64_t> send_rows, void* recv, std::span<const int64_t> recv_rows,
                 size_t row_bytes) const;
  /// The same, non-blocking (MPI_Ialltoallv): buffers must stay untouched until wait().
  [[nodiscard]] Exchange ialltoallv(const void* send, std::span<const int64_t> send_rows, void* recv,
                                    std::span<const int64_t> recv_rows, size_t row_bytes) const;
  /// True when every rank passes true.
  [[nodiscard]] bool all(bool ok) const;
  /// The lowest rank that passes true, or -1.
  [[nodiscard]] int first(bool flag) const;
  /// Max over ranks.
  [[nodiscard]] double max(double v) const;
  /// Sum over ranks, element-wise, in place.
  void sum(std::span<int64_t> v) const;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace moekit::ep
#pragma GCC visibility pop
