// SPDX-License-Identifier: Apache-2.0
// Reading (memory-mapped, validated) and writing (atomic) of .safetensors checkpoints.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit::io {

/// Element types of the safetensors format (https://github.com/huggingface/safetensors).
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

/// The dtype's name as spelled in a safetensors header: "F32", "BF16", "F8_E4M3", ...
const char* dtype_name(DType dtype);
/// Bytes per element.
std::size_t dtype_size(DType dtype);

/// A read-only view of one tensor inside a mapped file. `data` points at `nbytes` bytes in the
/// file's dtype and byte order (little-endian); it is NOT necessarily aligned, and stays valid as
/// long as the file (or source) that handed out the view is alive.
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;  ///< empty = scalar
  const std::byte* data;
  std::size_t nbytes;
  /// Product of `shape` (1 for a scalar, 0 if any extent is 0).
  int64_t numel() const;
};

/// One .safetensors file, memory-mapped read-only. The header is treated as untrusted: open()
/// validates all of it and throws moekit::error on anything malformed. Move-only; unmaps in its
/// destructor. Views returned by tensor() stay valid across moves of the file object; a moved-from
/// file may only be destroyed or assigned to. All const members are safe to call concurrently.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  /// The same checks on bytes already in memory (e.g. read by an engine's own loader);
  /// `name` stands for the path in messages. The object owns the bytes.
  static SafetensorsFile from_bytes(const std::string& name, std::vector<std::byte> bytes);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& path() const;
  bool contains(const std::string& name) const;
  /// Throws moekit::error naming the tensor and the file if absent.
  const TensorView& tensor(const std::string& name) const;
  /// All tensor names, sorted.
  std::vector<std::string> names() const;
  /// Every file this source read: the .safetensors file, or the index and each shard.
  std::vector<std::string> files() const;
  /// Throws moekit::error (as the readers below word it) unless tensor `name` exists and has
  /// exactly `expected_shape`; reads no data (to validate a whole layer before allocating it).
  void expect_shape(const std::string& name, const std::vector<int64_t>& expected_shape) const;
  /// The header's "__metadata__" map (empty if absent).
  const std::map<std::string, std::string>& metadata() const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::unique_ptr<Impl> impl);
  static void parse(Impl& impl, const std::byte* bytes, std::uint64_t size, const std::string& where);
  std::unique_ptr<Impl> impl_;
};

/// Where a model's weights come from: either one .safetensors file or a sharded checkpoint's
/// `model.safetensors.index.json` (`{"weight_map": {name: shard file relative to the index's
/// folder}}`). Every shard is opened (and validated) once, in open(). Move-only (a moved-from
/// source may only be destroyed or assigned to); const members are safe to call concurrently.
class TensorSource {
 public:
  /// A path ending in ".json" is read as an index; anything else as a single .safetensors file.
  static TensorSource open(const std::string& path);
  /// A source holding one already opened file (e.g. SafetensorsFile::from_bytes).
  static TensorSource of(SafetensorsFile file);

  TensorSource(TensorSource&&) noexcept;
  TensorSource& operator=(TensorSource&&) noexcept;
  TensorSource(const TensorSource&) = delete;
  TensorSource& operator=(const TensorSource&) = delete;
  ~TensorSource();

  bool contains(const std::string& name) const;
  /// Throws moekit::error naming the tensor and the file (or index) if absent.
  const TensorView& tensor(const std::string& name) const;
  /// All tensor names, sorted.
  std::vector<std::string> names() const;
  /// Every file this source read: the .safetensors file, or the index and each shard.
  std::vector<std::string> files() const;
  /// Throws moekit::error (as the readers below word it) unless tensor `name` exists and has
  /// exactly `expected_shape`; reads no data (to validate a whole layer before allocating it).
  void expect_shape(const std::string& name, const std::vector<int64_t>& expected_shape) const;

  // The readers below check the tensor's shape against `expected_shape` (same rank; an entry of
  // -1 matches any extent) and its dtype, and throw moekit::error naming the tensor, the file,
  // and the expected and actual shape/dtype on a mismatch.

  /// Reads F32, F16, BF16 or F64 as float (F64 is rounded to nearest float), and block-scaled
  /// FP8: an F8_E4M3 matrix `W [n, k]` with its companion `W_scale_inv`
  /// `[ceil(n/128), ceil(k/128)]` (F32/BF16/F16; DeepSeek-V3's layout) is dequantised to
  /// `e4m3(q) * scale_inv[i/128][j/128]`; a missing companion is an error naming it.
  std::vector<float> read_f32(const std::string& name,
                              const std::vector<int64_t>& expected_shape) const;
  /// As read_f32, into `dst`, which must hold numel() floats.
  void read_f32_into(const std::string& name, const std::vector<int64_t>& expected_shape,
                     float* dst) const;
  /// Elements [first, first + count) of the tensor in row-major order, converted as read_f32
  /// (F32, F16, BF16, F64; not block-scaled FP8), into `dst`: one expert of a fused 3-D
  /// expert tensor. The range must lie inside the tensor.
  void read_f32_range_into(const std::string& name, const std::vector<int64_t>& expected_shape, int64_t first,
                           int64_t count, float* dst) const;
  /// Rows [first_row, first_row + rows) of an MXFP4 matrix (gpt-oss's released experts):
  /// `base + "_blocks"` U8 `blocks_shape` = [..., R, G, 16] and `base + "_scales"` U8
  /// [..., R, G], rows counted over all leading axes; row r's K = 32 G values go to
  /// dst [r, K]: byte j of a block holds element 2j (low nibble) and 2j + 1 (high nibble),
  /// e2m1 codes (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, bit 3 the sign) times 2^(scale byte - 127).
  void read_mxfp4_rows_into(const std::string& base, const std::vector<int64_t>& blocks_shape, int64_t first_row,
                            int64_t rows, float* dst) const;
  /// Reads I32, or I64 with every value range-checked into int32.
  std::vector<int32_t> read_i32(const std::string& name,
                                const std::vector<int64_t>& expected_shape) const;
  /// Reads U8 or BOOL (raw bytes).
  std::vector<uint8_t> read_u8(const std::string& name,
                               const std::vector<int64_t>& expected_shape) const;

 private:
  struct Impl;
  explicit TensorSource(std::unique_ptr<Impl> impl);
  void read_f32_into_checked(const std::string& name, const std::vector<int64_t>& expected_shape, float* dst,
                             std::vector<float>* grow, const char* reader) const;
  const std::string& shard_path(const std::string& name) const;  // file holding `name`
  std::unique_ptr<Impl> impl_;
};

/// One tensor to write. `data` holds numel * dtype_size(dtype) bytes already in `dtype`
/// (F32 as float, I32 as int32_t, U8/BOOL as uint8_t, BF16/F16 as uint16_t bits, ...).
struct OutTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
};

/// Writes a .safetensors file atomically: to a fresh temporary file in `path`'s folder
/// (`.moekit-<name>.XXXXXX`, created exclusively, never through a symlink), fsync, then rename
/// over `path`, so a failed write never leaves a partial file at `path` (nor a leftover
/// temporary file), and concurrent writers of the same `path` each leave a complete file. Tensors are laid out
/// in the given order; the header is space-padded so the data buffer starts 64-byte aligned in the file.
/// Throws moekit::error on invalid tensors (duplicate or empty names, negative extents, null data)
/// or any I/O failure.
void write_safetensors(const std::string& path, const std::vector<OutTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// Exact widening of bfloat16 bits to float.
float bf16_to_f32(uint16_t bits);
/// Float to bfloat16 bits, round to nearest, ties to even; overflow goes to inf, NaN stays NaN.
uint16_t f32_to_bf16(float value);
/// Exact widening of IEEE binary16 bits (including subnormals, inf, NaN) to float.
float f16_to_f32(uint16_t bits);
/// Float to IEEE binary16 bits, round to nearest, ties to even (subnormals included); overflow
/// goes to inf, NaN stays NaN.
uint16_t f32_to_f16(float value);

}  // namespace moekit::io
#pragma GCC visibility pop
