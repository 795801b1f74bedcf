// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: pre-packed layer files (moekit pack, load_packed_layer) on untrusted bytes.
// The bytes are written to a private temporary file (the loader maps a path); every input must
// either load and run a forward, or fail with moekit::error; any crash, sanitizer report or
// other exception is a finding. Seeds (fuzz/corpus/packed) are packed for the scalar kernel,
// which every build and CPU has.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/packed_layer.hpp"

namespace {

const std::string& temp_path() {
  static const std::string path = [] {
    char name[] = "/tmp/moekit-fuzz-packed.XXXXXX";
    const int fd = ::mkstemp(name);
    if (fd < 0) std::abort();
    ::close(fd);
    return std::string(name);
  }();
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = temp_path();
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) std::abort();
    if (size != 0 && std::fwrite(data, 1, size, f) != size) std::abort();
    std::fclose(f);
  }
  try {
    moekit::LayerConfig c;
    const moekit::TopKLayer layer = moekit::load_packed_layer(path, &c);
    const int64_t d = layer.hidden_size();
    if (d <= 4096) {
      std::vector<float> x(static_cast<size_t>(2 * d), 0.5f), y(x.size());
      moekit::Workspace ws;
      try {
        layer.forward(moekit::Batch::single(2, d), x.data(), y.data(), ws, 1);
      } catch (const moekit::error&) {  // e.g. an output overflow from hostile weights
      }
    }
  } catch (const moekit::error&) {
  }
  return 0;
}
