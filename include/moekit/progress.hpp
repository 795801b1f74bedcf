// SPDX-License-Identifier: Apache-2.0
// Progress of long library work (reading and packing expert weights), for programs that show
// it: a process-wide hook, off by default.
#pragma once

#include <cstdint>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Called after each unit of work: `what` names it ("expert packed"), `bytes` the packed
/// bytes it produced. Called from the thread that did the work (FfnBank::set_expert's
/// caller); must be cheap and must not throw.
using ProgressHook = void (*)(const char* what, int64_t bytes) noexcept;

/// Installs `hook` (nullptr: none, the default) for the whole process; returns the previous one.
ProgressHook set_progress_hook(ProgressHook hook) noexcept;

namespace detail {
/// Calls the installed hook, if any.
void report_progress(const char* what, int64_t bytes) noexcept;
}  // namespace detail

}  // namespace moekit
#pragma GCC visibility pop
