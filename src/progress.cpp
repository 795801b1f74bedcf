// SPDX-License-Identifier: Apache-2.0
#include "moekit/progress.hpp"

#include <atomic>

namespace moekit {
namespace {
std::atomic<ProgressHook> g_hook{nullptr};
}  // namespace

ProgressHook set_progress_hook(ProgressHook hook) noexcept { return g_hook.exchange(hook); }

namespace detail {
void report_progress(const char* what, int64_t bytes) noexcept {
  if (ProgressHook h = g_hook.load(std::memory_order_relaxed)) h(what, bytes);
}
}  // namespace detail

}  // namespace moekit
