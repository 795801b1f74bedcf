// SPDX-License-Identifier: Apache-2.0
// GGUF files (llama.cpp's model format, versions 2 and 3): metadata, tensor directory, and rows
// of F32 / F16 / BF16 / Q4_0 / Q8_0 / Q4_K / Q6_K / MXFP4 tensors dequantised to f32.
// Implemented in src/io/gguf.cpp; docs/config.md ("GGUF files").
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::io {

/// ggml tensor types moekit reads (ggml.h `enum ggml_type` values).
enum class GgmlType : uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, q4_k = 12, q6_k = 14, bf16 = 30, mxfp4 = 39 };

/// "F32", "Q4_K", ... for a supported type, "type N" otherwise.
std::string ggml_type_name(uint32_t type);

/// One tensor of the directory. `ne[0]` is the contiguous axis (an HF `[out, in]` matrix has
/// ne = {in, out}); unused axes are 1.
struct GgufTensor {
  std::string name;
  uint32_t type = 0;  ///< a GgmlType value
  int n_dims = 0;
  std::array<int64_t, 4> ne{1, 1, 1, 1};
  uint64_t offset = 0;  ///< from the start of the data section
  uint64_t nbytes = 0;
  const std::byte* data = nullptr;  ///< into the mapping (valid while the file lives)

  /// Rows of the tensor seen as a matrix [ne1 * ne2 * ne3, ne0].
  [[nodiscard]] int64_t rows() const noexcept { return ne[1] * ne[2] * ne[3]; }
};

/// A GGUF file, memory-mapped and validated when opened: the header, every metadata value
/// and the tensor directory are bounds-checked (counts, string lengths, array sizes, dims,
/// types, alignment, offsets and sizes inside the file, no overlaps), so a hostile file is an
/// error naming the problem, never a crash or a huge allocation. Tensors of types moekit does
/// not read may be listed; reading them is an error naming the type.
class GgufFile {
 public:
  static GgufFile open(const std::string& path);
  /// A GGUF image held in memory (tests, fuzzing); `name` is used in messages.
  static GgufFile from_bytes(const std::string& name, std::vector<std::byte> bytes);

  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;
  ~GgufFile();

  [[nodiscard]] const std::string& path() const noexcept;
  [[nodiscard]] uint32_t version() const noexcept;

  /// Metadata. Each getter returns nullopt for a missing key and throws moekit::error naming
  /// the key for a value of another type. get_int accepts every integer type (a UINT64 above
  /// INT64_MAX is an error); get_float FLOAT32 and FLOAT64.
  [[nodiscard]] bool has(const std::string& key) const;
  [[nodiscard]] std::optional<int64_t> get_int(const std::string& key) const;
  [[nodiscard]] std::optional<double> get_float(const std::string& key) const;
  [[nodiscard]] std::optional<bool> get_bool(const std::string& key) const;
  [[nodiscard]] std::optional<std::string> get_string(const std::string& key) const;

  [[nodiscard]] bool contains(const std::string& name) const;
  /// Throws moekit::error naming the tensor and the file if absent.
  [[nodiscard]] const GgufTensor& tensor(const std::string& name) const;
  /// Every tensor name, sorted.
  [[nodiscard]] std::vector<std::string> tensor_names() const;

  /// Rows [first, first + count) of tensor `name` seen as [rows(), ne0], dequantised to f32
  /// into dst [count, ne0] as ggml's dequantize_row_* does (F32 / F16 / BF16 exactly; block
  /// types as scale x code, in f32). Throws for a type moekit does not read or a range outside
  /// the tensor.
  void read_rows_f32(const std::string& name, int64_t first, int64_t count, float* dst) const;

 private:
  struct Impl;
  explicit GgufFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moekit::io
#pragma GCC visibility pop
