// SPDX-License-Identifier: Apache-2.0
// Bounded reads of small files (files.hpp).
#include "files.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "moekit/error.hpp"

namespace moekit::detail {

const char* file_kind(mode_t mode) noexcept {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

std::string read_regular_file(const std::string& where, const std::string& path,
                              std::uint64_t max_bytes) {
  using moekit::detail::fail;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(where, ": cannot open for reading: ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(where, ": cannot stat: ", std::strerror(errno));
  MOEKIT_CHECK(S_ISREG(st.st_mode), where, ": is ", file_kind(st.st_mode),
               ", expected a regular file");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  MOEKIT_CHECK(size <= max_bytes, where, ": file is ", size, " bytes, expected at most ",
               max_bytes);
  std::string text(static_cast<std::size_t>(size), '\0');
  std::size_t got = 0;
  while (got < text.size()) {
    const ssize_t r = ::read(fd, text.data() + got, text.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(where, ": read failed: ", std::strerror(errno));
    if (r == 0) break;  // shrank while reading
    got += static_cast<std::size_t>(r);
  }
  text.resize(got);
  return text;
}

std::string quoted(std::string_view s, std::size_t max_chars) {
  std::string out = "'";
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i == max_chars) {
      out += concat("...(", s.size(), " bytes)");
      break;
    }
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F || c == '\\') {
      static constexpr char kHex[] = "0123456789abcdef";
      out += c == '\\' ? std::string("\\\\") : std::string{'\\', 'x', kHex[c >> 4], kHex[c & 15]};
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "'";
}

namespace {

using json = nlohmann::json;

// SAX handler that builds the DOM itself (members inserted once, in O(log n)), refusing
// duplicate keys and deep nesting as they are read. Containers on the stack are never moved
// while open: a value is only appended to the innermost open container.
class StrictDom {
 public:
  StrictDom(json& root, const std::string& what, int max_depth, const char* invalid)
      : root_(root), what_(what), max_depth_(max_depth), invalid_(invalid) {}

  bool null() { return put(json(nullptr)) != nullptr; }
  bool boolean(bool v) { return put(json(v)) != nullptr; }
  bool number_integer(json::number_integer_t v) { return put(json(v)) != nullptr; }
  bool number_unsigned(json::number_unsigned_t v) { return put(json(v)) != nullptr; }
  bool number_float(json::number_float_t v, const json::string_t&) { return put(json(v)) != nullptr; }
  bool string(json::string_t& v) { return put(json(std::move(v))) != nullptr; }
  bool binary(json::binary_t& v) { return put(json::binary(std::move(v))) != nullptr; }
  bool start_object(std::size_t) { return open(json::object()); }
  bool start_array(std::size_t) { return open(json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(json::string_t& k) {
    json& obj = *stack_.back();
    if (obj.contains(k))
      fail(what_, ": duplicate key ", moekit::detail::quoted(k), " in JSON object at nesting level ",
                           stack_.size());
    slot_ = &obj[k];
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    fail(what_, ": ", invalid_, " (", e.what(), ")");
  }

 private:
  json* put(json v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(v));
      return &top.back();
    }
    *slot_ = std::move(v);
    return slot_;
  }
  bool open(json v) {
    if (static_cast<int>(stack_.size()) >= max_depth_)
      fail(what_, ": JSON nested deeper than ", max_depth_, " levels");
    stack_.push_back(put(std::move(v)));
    return true;
  }
  bool close() {
    stack_.pop_back();
    return true;
  }

  json& root_;
  const std::string& what_;
  int max_depth_;
  const char* invalid_;
  std::vector<json*> stack_;
  json* slot_ = nullptr;
};

}  // namespace

json parse_untrusted_json(const std::string& what, const char* first, const char* last,
                          int max_depth, const char* invalid) {
  // nlohmann stops at a NUL byte as if the input ended there, which would let arbitrary bytes
  // hide after it. Valid JSON never contains a raw NUL.
  if (const void* nul = std::memchr(first, 0, static_cast<std::size_t>(last - first))) {
    fail(what, ": ", invalid, " (NUL byte at offset ",
                         static_cast<const char*>(nul) - first, ")");
  }
  json root;
  StrictDom sax(root, what, max_depth, invalid);
  json::sax_parse(first, last, &sax);
  return root;
}

}  // namespace moekit::detail
