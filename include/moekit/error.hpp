// SPDX-License-Identifier: Apache-2.0
// moekit::error, the one exception type for invalid arguments, and the check helpers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Thrown for every invalid argument, shape, configuration or file. The message
/// names the argument, the expected and the actual value.
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class... Args>
[[nodiscard]] std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw ::moekit::error(concat(std::forward<Args>(args)...));
}

/// Whether the float ranges [a, a + na) and [b, b + nb) share no element (null or empty ranges
/// never overlap): the check behind "output expected apart from the input".
inline bool apart(const float* a, size_t na, const float* b, size_t nb) noexcept {
  if (a == nullptr || b == nullptr || na == 0 || nb == 0) return true;
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return pa + na * sizeof(float) <= pb || pb + nb * sizeof(float) <= pa;
}

}  // namespace detail
}  // namespace moekit

/// Always-on check of a user-visible contract: throws moekit::error with the message parts.
#define MOEKIT_CHECK(cond, ...)                       \
  do {                                                \
    if (!(cond)) ::moekit::detail::fail(__VA_ARGS__); \
  } while (0)

/// Debug-only check of an internal invariant.
#ifdef NDEBUG
#define MOEKIT_DEBUG_ASSERT(cond) ((void)0)
#else
#include <cassert>
#define MOEKIT_DEBUG_ASSERT(cond) assert(cond)
#endif
#pragma GCC visibility pop
