// SPDX-License-Identifier: Apache-2.0
// Internal: bounded reads of small files (configs, shard indexes) that refuse directories,
// FIFOs and devices before reading a byte, what such a path is, for messages, and the strict
// linear-time parser every untrusted JSON goes through.
#pragma once

#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace moekit::detail {

/// "a directory", "a FIFO", "a character device", ... for a non-regular st_mode.
const char* file_kind(mode_t mode) noexcept;

/// The whole of the regular file `path` (at most `max_bytes`), opened without blocking (a FIFO
/// cannot hang it). Throws moekit::error starting with `where`: cannot open, not a regular file
/// (naming what it is), larger than `max_bytes`, read failure.
std::string read_regular_file(const std::string& where, const std::string& path,
                              std::uint64_t max_bytes);

/// `s` in single quotes for an error message, control characters and backslashes escaped
/// (messages stay on one line whatever a file holds), cut after `max_chars` bytes.
std::string quoted(std::string_view s, std::size_t max_chars = 256);

/// Parses untrusted JSON text into a DOM in time linear in its size (a SAX parser of its own:
/// nlohmann's callback parser rescans an object's members after each nested value ends, which
/// is quadratic in the member count). Rejects duplicate object keys (nlohmann keeps the last),
/// nesting deeper than `max_depth`, and a NUL byte. Errors: `<what>: <invalid> (<parser
/// message>)`, `<what>: duplicate key '<k>' ...`, `<what>: JSON nested deeper than ...`.
nlohmann::json parse_untrusted_json(const std::string& what, const char* first, const char* last,
                                    int max_depth, const char* invalid);

}  // namespace moekit::detail
