// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the output writer (`write_safetensors`, what `moekit run --output` uses).
// The input describes up to 8 tensors: per tensor a dtype byte, a rank byte (0-3), extents
// (one byte each), a name length byte and the name; tensor data is a fixed pattern. Every
// description must either be written, read back identical (names, dtypes, shapes, bytes) and
// leave no temporary file, or be refused with moekit::error leaving nothing at all. Any
// crash, sanitizer report, leftover file or mismatch is a finding.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/safetensors.hpp"

namespace fs = std::filesystem;
using moekit::io::DType;

namespace {
const fs::path& dir() {
  static const fs::path d = [] {
    char tmpl[] = "/tmp/moekit-fuzz-output.XXXXXX";
    if (mkdtemp(tmpl) == nullptr) std::abort();
    return fs::path(tmpl);
  }();
  return d;
}
constexpr DType kTypes[] = {DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32,
                            DType::I64, DType::U8,  DType::BOOL, DType::F8_E4M3};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<moekit::io::OutTensor> out;
  std::vector<std::vector<std::byte>> store;
  size_t at = 0;
  auto next = [&]() -> int { return at < size ? data[at++] : -1; };
  while (out.size() < 8) {
    const int t = next(), rank = next();
    if (t < 0 || rank < 0) break;
    std::vector<int64_t> shape;
    for (int r = 0; r < rank % 4; ++r) {
      const int e = next();
      shape.push_back(e < 0 ? 0 : (e == 255 ? -1 : e % 16));  // 255: a negative extent
    }
    const int n = next();
    std::string name;
    for (int i = 0; i < (n < 0 ? 0 : n % 24); ++i) {
      const int c = next();
      if (c < 0) break;
      name.push_back(static_cast<char>(c));
    }
    const DType dt = kTypes[static_cast<size_t>(t) % std::size(kTypes)];
    int64_t numel = 1;
    for (int64_t e : shape) numel *= e < 0 ? 0 : e;
    store.emplace_back(static_cast<size_t>(numel) * moekit::io::dtype_size(dt));
    for (size_t i = 0; i < store.back().size(); ++i) store.back()[i] = static_cast<std::byte>(i * 37 + out.size());
    out.push_back({name, dt, shape, store.back().data()});
  }
  const fs::path path = dir() / "y.safetensors";
  fs::remove(path);
  bool written = false;
  try {
    moekit::io::write_safetensors(path.string(), out, {{"producer", "fuzz"}});
    written = true;
  } catch (const moekit::error&) {
  }
  // Nothing but the output (when written) is left in the folder.
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir())) {
    (void)e;
    ++files;
  }
  if (files != (written ? 1u : 0u)) std::abort();
  if (!written) return 0;
  if (!fs::exists(path)) std::abort();
  const auto f = moekit::io::SafetensorsFile::open(path.string());
  if (f.names().size() != out.size()) std::abort();
  for (size_t i = 0; i < out.size(); ++i) {
    const auto& v = f.tensor(out[i].name);
    if (v.dtype != out[i].dtype || v.shape != out[i].shape || v.nbytes != store[i].size()) std::abort();
    for (size_t b = 0; b < v.nbytes; ++b)
      if (v.data[b] != store[i][b]) std::abort();
  }
  return 0;
}
