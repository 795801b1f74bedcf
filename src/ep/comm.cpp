// SPDX-License-Identifier: Apache-2.0
// moekit::ep::Comm over MPI.
#include "moekit/ep/comm.hpp"

#include <limits>
#include <vector>

#include "moekit/error.hpp"

namespace moekit::ep {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// Counts and displacements (in rows) as MPI's ints, checked; one contiguous row type.
using Layout = Exchange::State;

void fill(std::span<const int64_t> rows, std::vector<int>& counts, std::vector<int>& displs, const char* what) {
  counts.resize(rows.size());
  displs.resize(rows.size());
  int64_t off = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    MOEKIT_CHECK(rows[r] >= 0 && rows[r] <= kIntMax && off <= kIntMax, "ep::Comm::alltoallv: ", what, " rows of rank ",
                 r, " expected in [0, 2^31) with an offset below 2^31, got ", rows[r], " at ", off);
    counts[r] = static_cast<int>(rows[r]);
    displs[r] = static_cast<int>(off);
    off += rows[r];
  }
}

void make_layout(Layout& L, int size, std::span<const int64_t> send_rows, std::span<const int64_t> recv_rows,
                 size_t row_bytes) {
  MOEKIT_CHECK(static_cast<int>(send_rows.size()) == size && static_cast<int>(recv_rows.size()) == size,
               "ep::Comm::alltoallv: row counts expected one per rank (", size, "), got ", send_rows.size(), " and ",
               recv_rows.size());
  MOEKIT_CHECK(row_bytes >= 1 && row_bytes <= static_cast<size_t>(kIntMax), "ep::Comm::alltoallv: row bytes expected in [1, 2^31), got ",
               row_bytes);
  fill(send_rows, L.send_counts, L.send_displs, "send");
  fill(recv_rows, L.recv_counts, L.recv_displs, "receive");
  MPI_Type_contiguous(static_cast<int>(row_bytes), MPI_BYTE, &L.row);
  MPI_Type_commit(&L.row);
}

}  // namespace

Exchange::Exchange(Exchange&&) noexcept = default;
Exchange& Exchange::operator=(Exchange&& o) noexcept {
  if (this != &o) {
    wait();
    state_ = std::move(o.state_);
  }
  return *this;
}
Exchange::~Exchange() { wait(); }
void Exchange::wait() {
  if (!state_) return;
  MPI_Wait(&state_->request, MPI_STATUS_IGNORE);
  state_.reset();
}
bool Exchange::test() {
  if (!state_) return true;
  int done = 0;
  MPI_Test(&state_->request, &done, MPI_STATUS_IGNORE);
  if (done) state_.reset();
  return done != 0;
}

Comm::Comm(MPI_Comm comm) : comm_(comm) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  MOEKIT_CHECK(initialised, "ep::Comm: MPI is not initialised (call MPI_Init first)");
  MOEKIT_CHECK(comm != MPI_COMM_NULL, "ep::Comm: communicator expected, got MPI_COMM_NULL");
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

void Comm::allgather(std::span<const int64_t> mine, std::span<int64_t> all) const {
  MOEKIT_CHECK(all.size() == mine.size() * static_cast<size_t>(size_) && mine.size() <= static_cast<size_t>(kIntMax),
               "ep::Comm::allgather: expected ", mine.size(), " x ", size_, " values, got ", all.size());
  MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_INT64_T, all.data(), static_cast<int>(mine.size()),
                MPI_INT64_T, comm_);
}

void Comm::alltoall(std::span<const int64_t> send, std::span<int64_t> recv) const {
  MOEKIT_CHECK(send.size() == recv.size() && send.size() % static_cast<size_t>(size_) == 0 &&
                   send.size() / static_cast<size_t>(size_) <= static_cast<size_t>(kIntMax),
               "ep::Comm::alltoall: expected equal buffers of n x ", size_, " values, got ", send.size(), " and ",
               recv.size());
  const int n = static_cast<int>(send.size() / static_cast<size_t>(size_));
  MPI_Alltoall(send.data(), n, MPI_INT64_T, recv.data(), n, MPI_INT64_T, comm_);
}

void Comm::alltoallv(const void* send, std::span<const int64_t> send_rows, void* recv,
                     std::span<const int64_t> recv_rows, size_t row_bytes) const {
  Layout L;
  make_layout(L, size_, send_rows, recv_rows, row_bytes);
  MPI_Alltoallv(send, L.send_counts.data(), L.send_displs.data(), L.row, recv, L.recv_counts.data(),
                L.recv_displs.data(), L.row, comm_);
}

Exchange Comm::ialltoallv(const void* send, std::span<const int64_t> send_rows, void* recv,
                          std::span<const int64_t> recv_rows, size_t row_bytes) const {
  Exchange x;
  x.state_ = std::make_unique<Exchange::State>();
  Layout& L = *x.state_;
  make_layout(L, size_, send_rows, recv_rows, row_bytes);
  MPI_Ialltoallv(send, L.send_counts.data(), L.send_displs.data(), L.row, recv, L.recv_counts.data(),
                 L.recv_displs.data(), L.row, comm_, &x.state_->request);
  return x;
}

bool Comm::all(bool ok) const {
  int v = ok ? 1 : 0, r = 0;
  MPI_Allreduce(&v, &r, 1, MPI_INT, MPI_MIN, comm_);
  return r == 1;
}

int Comm::first(bool flag) const {
  int v = flag ? rank_ : size_, r = size_;
  MPI_Allreduce(&v, &r, 1, MPI_INT, MPI_MIN, comm_);
  return r == size_ ? -1 : r;
}

double Comm::max(double v) const {
  double r = v;
  MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_MAX, comm_);
  return r;
}

void Comm::sum(std::span<int64_t> v) const {
  MOEKIT_CHECK(v.size() <= static_cast<size_t>(kIntMax), "ep::Comm::sum: too many values: ", v.size());
  MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_INT64_T, MPI_SUM, comm_);
}

}  // namespace moekit::ep
