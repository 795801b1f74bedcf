// SPDX-License-Identifier: Apache-2.0
// How many OpenMP threads a moekit call uses.
#pragma once

#include <omp.h>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::detail {

/// Threads for one call: 1 inside an active parallel region (never oversubscribe a host
/// pool), `requested` when > 0, otherwise OpenMP's default for a new region.
inline int resolve_threads(int requested) noexcept {
  if (omp_in_parallel()) return 1;
  if (requested > 0) return requested;
  const int n = omp_get_max_threads();
  return n > 0 ? n : 1;
}

}  // namespace moekit::detail
#pragma GCC visibility pop
