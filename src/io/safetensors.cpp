// SPDX-License-Identifier: Apache-2.0
// safetensors reader (mmap, validates the untrusted header) and atomic writer.
#include "moekit/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string_view>
#include <utility>

#include "../kernels/convert_internal.hpp"
#include "files.hpp"
#include "mxfp4.hpp"
#include "moekit/error.hpp"
#include "moekit/kernels/fp8.hpp"

static_assert(std::endian::native == std::endian::little,
              "moekit's safetensors I/O assumes a little-endian host");

namespace moekit::io {
namespace {

using json = nlohmann::json;
using detail::fail;

/// Same limit as the reference implementation (huggingface/safetensors, MAX_HEADER_SIZE).
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
/// The largest index.json we agree to read.
constexpr std::uint64_t kMaxIndexBytes = 100'000'000;
/// Deepest JSON nesting accepted in a header or index (the format needs 3).
constexpr int kMaxJsonDepth = 8;

constexpr DType kAllDtypes[] = {DType::F64, DType::F32,  DType::F16,     DType::BF16,
                                DType::I64, DType::I32,  DType::I16,     DType::I8,
                                DType::U8,  DType::BOOL, DType::F8_E4M3, DType::F8_E5M2};

std::optional<DType> parse_dtype(std::string_view s) {
  for (DType d : kAllDtypes) {
    if (s == dtype_name(d)) return d;
  }
  return std::nullopt;
}

/// `s` quoted for an error message (files.hpp).
std::string q(std::string_view s, std::size_t max_chars = 256) { return detail::quoted(s, max_chars); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

/// A JSON value's description for error messages: its type and a short excerpt.
std::string describe(const json& v) {
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return detail::concat(v.type_name(), ' ', text);
}

json parse_untrusted_json(const std::string& what, const char* first, const char* last) {
  return detail::parse_untrusted_json(what, first, last, kMaxJsonDepth, "invalid JSON");
}

/// A non-negative JSON integer that fits in int64, or nullopt (negative, float, too big, not a
/// number).
std::optional<std::uint64_t> as_index(const json& v, std::uint64_t max) {
  if (!v.is_number_unsigned()) return std::nullopt;
  const auto u = v.get<std::uint64_t>();
  if (u > max) return std::nullopt;
  return u;
}

struct Span {
  std::size_t begin, end;
  const std::string* name;
};

/// Validates one tensor entry of the header and returns its view (data relative to `data`).
TensorView parse_tensor_entry(const std::string& where, const std::string& name, const json& v,
                              const std::byte* data, std::size_t data_len) {
  const std::string at = detail::concat(where, ": tensor ", q(name));
  MOEKIT_CHECK(v.is_object(), at, ": entry is ", describe(v),
               ", expected an object with dtype, shape and data_offsets");

  auto dt = v.find("dtype");
  MOEKIT_CHECK(dt != v.end(), at, ": missing \"dtype\"");
  MOEKIT_CHECK(dt->is_string(), at, ": dtype is ", describe(*dt), ", expected a string");
  const auto dtype = parse_dtype(dt->get_ref<const std::string&>());
  MOEKIT_CHECK(dtype.has_value(), at, ": unknown dtype ", q(dt->get_ref<const std::string&>()),
               ", expected one of F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2");

  auto sh = v.find("shape");
  MOEKIT_CHECK(sh != v.end(), at, ": missing \"shape\"");
  MOEKIT_CHECK(sh->is_array(), at, ": shape is ", describe(*sh), ", expected an array");
  std::vector<int64_t> shape;
  shape.reserve(sh->size());
  int64_t numel = 1;
  for (std::size_t i = 0; i < sh->size(); ++i) {
    const json& e = (*sh)[i];
    const auto extent = as_index(e, std::numeric_limits<int64_t>::max());
    MOEKIT_CHECK(extent.has_value(), at, ": shape[", i, "] is ", describe(e),
                 ", expected a non-negative integer <= ", std::numeric_limits<int64_t>::max());
    shape.push_back(static_cast<int64_t>(*extent));
    MOEKIT_CHECK(!__builtin_mul_overflow(numel, shape.back(), &numel), at, ": shape ",
                 describe(*sh), " has more elements than fit in int64");
  }
  std::size_t nbytes = 0;
  MOEKIT_CHECK(
      !__builtin_mul_overflow(static_cast<std::size_t>(numel), dtype_size(*dtype), &nbytes), at,
      ": shape ", shape_str(shape), " of ", dtype_name(*dtype),
      " has more bytes than fit in size_t");

  auto off = v.find("data_offsets");
  MOEKIT_CHECK(off != v.end(), at, ": missing \"data_offsets\"");
  MOEKIT_CHECK(off->is_array() && off->size() == 2, at, ": data_offsets is ", describe(*off),
               ", expected an array [begin, end] of two non-negative integers");
  const auto begin = as_index((*off)[0], std::numeric_limits<std::size_t>::max());
  const auto end = as_index((*off)[1], std::numeric_limits<std::size_t>::max());
  MOEKIT_CHECK(begin && end, at, ": data_offsets is ", describe(*off),
               ", expected an array [begin, end] of two non-negative integers");
  MOEKIT_CHECK(*begin <= *end, at, ": data_offsets [", *begin, ", ", *end,
               "] has begin > end, expected begin <= end");
  MOEKIT_CHECK(*end <= data_len, at, ": data_offsets [", *begin, ", ", *end,
               "] end beyond the data buffer, expected end <= ", data_len,
               " (file truncated or corrupt?)");
  MOEKIT_CHECK(*end - *begin == nbytes, at, ": data_offsets [", *begin, ", ", *end, "] span ",
               *end - *begin, " bytes, expected ", nbytes, " for ", dtype_name(*dtype), ' ',
               shape_str(shape));

  return TensorView{name, *dtype, std::move(shape), data + *begin, nbytes};
}

/// Checks that the tensors tile the data buffer exactly: no overlap, no hole, nothing trailing
/// (the safetensors spec requires the buffer to be entirely indexed; HF's reader enforces it).
void check_layout(const std::string& where, std::vector<Span>& spans, std::size_t data_len) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::size_t covered = 0;
  const Span* prev = nullptr;
  for (const Span& s : spans) {
    if (s.begin < covered) {
      fail(where, ": tensors ", q(*prev->name), " (bytes [", prev->begin, ", ", prev->end,
           ")) and ", q(*s.name), " (bytes [", s.begin, ", ", s.end,
           ")) overlap, expected disjoint data_offsets");
    }
    MOEKIT_CHECK(s.begin == covered, where, ": tensor ", q(*s.name), " starts at byte ", s.begin,
                 " of the data buffer, expected ", covered,
                 " (a hole: the buffer must be entirely indexed)");
    covered = s.end;
    prev = &s;
  }
  MOEKIT_CHECK(covered == data_len, where, ": the data buffer has ", data_len,
               " bytes but the tensors cover ", covered, ", expected them to cover all of it");
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

std::string errno_str(int err) { return std::strerror(err); }

}  // namespace

// ---- dtypes ----

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F64:
      return "F64";
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::I64:
      return "I64";
    case DType::I32:
      return "I32";
    case DType::I16:
      return "I16";
    case DType::I8:
      return "I8";
    case DType::U8:
      return "U8";
    case DType::BOOL:
      return "BOOL";
    case DType::F8_E4M3:
      return "F8_E4M3";
    case DType::F8_E5M2:
      return "F8_E5M2";
  }
  fail("dtype_name: invalid DType value ", static_cast<int>(dtype));
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F64:
    case DType::I64:
      return 8;
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
      return 2;
    case DType::I8:
    case DType::U8:
    case DType::BOOL:
    case DType::F8_E4M3:
    case DType::F8_E5M2:
      return 1;
  }
  fail("dtype_size: invalid DType value ", static_cast<int>(dtype));
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t e : shape) n *= e;
  return n;
}

// ---- float conversions ----

float bf16_to_f32(uint16_t bits) { return kernels::detail::from_bf16_bits(bits); }
uint16_t f32_to_bf16(float value) { return kernels::detail::to_bf16_bits(value); }
float f16_to_f32(uint16_t bits) { return kernels::detail::from_f16_bits(bits); }
uint16_t f32_to_f16(float value) { return kernels::detail::to_f16_bits(value); }

// ---- SafetensorsFile ----

struct SafetensorsFile::Impl {
  std::string path;
  void* base = MAP_FAILED;
  std::size_t len = 0;
  std::vector<std::byte> owned;  // from_bytes(): the bytes themselves (no mapping)
  std::map<std::string, TensorView> tensors;
  std::map<std::string, std::string> metadata;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    if (base != MAP_FAILED) ::munmap(base, len);
  }
};

SafetensorsFile::SafetensorsFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  const std::string where = detail::concat("safetensors file ", q(path, 4096));

  Fd file;
  // O_NONBLOCK so that a FIFO cannot hang us before the regular-file check below.
  file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (file.fd < 0) fail(where, ": cannot open for reading: ", errno_str(errno));
  struct stat st {};
  if (::fstat(file.fd, &st) != 0) fail(where, ": cannot stat: ", errno_str(errno));
  MOEKIT_CHECK(S_ISREG(st.st_mode), where, ": is ", detail::file_kind(st.st_mode),
               ", expected a regular file");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  MOEKIT_CHECK(size >= 8, where, ": file is ", size,
               " bytes, expected at least 8 (the header length prefix)");
  MOEKIT_CHECK(size <= std::numeric_limits<std::size_t>::max(), where, ": file of ", size,
               " bytes is too large to map");

  // The whole file is mapped (>= 8 bytes, so never a zero-length mapping, even when the data
  // buffer is empty). The mapping outlives the descriptor.
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, file.fd, 0);
  if (base == MAP_FAILED) fail(where, ": mmap of ", size, " bytes failed: ", errno_str(errno));
  impl->base = base;
  impl->len = size;
  parse(*impl, static_cast<const std::byte*>(base), size, where);
  return SafetensorsFile(std::move(impl));
}

SafetensorsFile SafetensorsFile::from_bytes(const std::string& name, std::vector<std::byte> bytes) {
  auto impl = std::make_unique<Impl>();
  impl->path = name;
  impl->owned = std::move(bytes);
  const std::string where = detail::concat("safetensors buffer ", q(name, 4096));
  const auto size = static_cast<std::uint64_t>(impl->owned.size());
  MOEKIT_CHECK(size >= 8, where, ": buffer is ", size, " bytes, expected at least 8 (the header length prefix)");
  parse(*impl, impl->owned.data(), size, where);
  return SafetensorsFile(std::move(impl));
}

void SafetensorsFile::parse(Impl& impl_ref, const std::byte* bytes, std::uint64_t size, const std::string& where) {
  Impl* impl = &impl_ref;
  std::uint64_t n = 0;
  std::memcpy(&n, bytes, 8);  // little-endian u64 (host is little-endian, asserted above)
  MOEKIT_CHECK(n <= kMaxHeaderBytes, where, ": header length is ", n, " bytes, expected at most ",
               kMaxHeaderBytes);
  MOEKIT_CHECK(n <= size - 8, where, ": header length is ", n, " bytes, expected at most ",
               size - 8, " (the file is ", size, " bytes; truncated or not a safetensors file?)");

  const char* header = reinterpret_cast<const char*>(bytes + 8);
  const json h = parse_untrusted_json(where + " header", header, header + n);
  MOEKIT_CHECK(h.is_object(), where, ": header is ", describe(h), ", expected a JSON object");

  const std::byte* data = bytes + 8 + n;
  const std::size_t data_len = size - 8 - n;
  std::vector<Span> spans;
  spans.reserve(h.size());
  for (const auto& [key, value] : h.items()) {
    if (key == "__metadata__") {
      MOEKIT_CHECK(value.is_object(), where, ": __metadata__ is ", describe(value),
                   ", expected an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        MOEKIT_CHECK(mv.is_string(), where, ": __metadata__ entry ", q(mk), " is ", describe(mv),
                     ", expected a string");
        impl->metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    TensorView view = parse_tensor_entry(where, key, value, data, data_len);
    // Keys are unique (parse_untrusted_json rejects duplicates), so emplace always inserts.
    auto [it, inserted] = impl->tensors.emplace(key, std::move(view));
    MOEKIT_CHECK(inserted, where, ": duplicate tensor name ", q(key));
    const auto begin = static_cast<std::size_t>(it->second.data - data);
    spans.push_back(Span{begin, begin + it->second.nbytes, &it->first});
  }
  check_layout(where, spans, data_len);
}

const std::string& SafetensorsFile::path() const { return impl_->path; }

bool SafetensorsFile::contains(const std::string& name) const {
  return impl_->tensors.count(name) != 0;
}

const TensorView& SafetensorsFile::tensor(const std::string& name) const {
  auto it = impl_->tensors.find(name);
  if (it == impl_->tensors.end()) {
    fail("safetensors file ", q(impl_->path, 4096), ": no tensor named ", q(name),
         " (the file has ", impl_->tensors.size(), " tensors)");
  }
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->tensors.size());
  for (const auto& kv : impl_->tensors) out.push_back(kv.first);
  return out;  // std::map iterates in sorted order
}

const std::map<std::string, std::string>& SafetensorsFile::metadata() const {
  return impl_->metadata;
}

// ---- TensorSource ----

struct TensorSource::Impl {
  std::string path;                             // the .safetensors file or the index
  std::vector<SafetensorsFile> shards;          // each opened once
  std::map<std::string, std::size_t> shard_of;  // tensor name -> index into shards
};

TensorSource::TensorSource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TensorSource::TensorSource(TensorSource&&) noexcept = default;
TensorSource& TensorSource::operator=(TensorSource&&) noexcept = default;
TensorSource::~TensorSource() = default;

namespace {

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

TensorSource TensorSource::of(SafetensorsFile file) {
  auto impl = std::make_unique<Impl>();
  impl->path = file.path();
  impl->shards.push_back(std::move(file));
  for (auto& name : impl->shards.front().names()) impl->shard_of.emplace(std::move(name), 0);
  return TensorSource(std::move(impl));
}

TensorSource TensorSource::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  if (!ends_with(path, ".json")) {
    impl->shards.push_back(SafetensorsFile::open(path));
    for (auto& name : impl->shards.front().names()) impl->shard_of.emplace(std::move(name), 0);
    return TensorSource(std::move(impl));
  }

  namespace fs = std::filesystem;
  const std::string where = detail::concat("safetensors index ", q(path, 4096));
  const std::string text = detail::read_regular_file(where, path, kMaxIndexBytes);
  const json index = parse_untrusted_json(where, text.data(), text.data() + text.size());
  MOEKIT_CHECK(index.is_object(), where, ": content is ", describe(index),
               ", expected a JSON object with a \"weight_map\"");
  auto wm = index.find("weight_map");
  MOEKIT_CHECK(wm != index.end(), where, ": missing \"weight_map\"");
  MOEKIT_CHECK(wm->is_object(), where, ": weight_map is ", describe(*wm),
               ", expected an object {tensor name: shard file}");

  const fs::path folder = fs::path(path).parent_path();
  std::map<std::string, std::size_t> shard_index;  // normalised relative shard path -> shard
  for (const auto& [name, file] : wm->items()) {
    MOEKIT_CHECK(file.is_string() && !file.get_ref<const std::string&>().empty(), where,
                 ": weight_map entry for tensor ", q(name), " is ", describe(file),
                 ", expected a non-empty shard file name");
    const fs::path rel = fs::path(file.get_ref<const std::string&>()).lexically_normal();
    const bool escapes =
        rel.is_absolute() || rel.has_root_name() ||
        std::any_of(rel.begin(), rel.end(), [](const fs::path& p) { return p == ".."; });
    MOEKIT_CHECK(!escapes, where, ": weight_map maps tensor ", q(name), " to ",
                 q(file.get_ref<const std::string&>(), 4096),
                 ", expected a path relative to the index's folder, without '..'");
    auto [it, inserted] = shard_index.emplace(rel.string(), impl->shards.size());
    if (inserted) {
      try {
        impl->shards.push_back(SafetensorsFile::open((folder / rel).string()));
      } catch (const moekit::error& e) {
        fail(where, ": shard for tensor ", q(name), ": ", e.what());
      }
    }
    const SafetensorsFile& shard = impl->shards[it->second];
    MOEKIT_CHECK(shard.contains(name), where, ": weight_map maps tensor ", q(name), " to ",
                 q(shard.path(), 4096), ", which does not contain it");
    impl->shard_of.emplace(name, it->second);
  }
  return TensorSource(std::move(impl));
}

std::vector<std::string> TensorSource::files() const {
  std::vector<std::string> out = {impl_->path};
  for (const SafetensorsFile& f : impl_->shards)
    if (f.path() != impl_->path) out.push_back(f.path());
  return out;
}

void TensorSource::expect_shape(const std::string& name, const std::vector<int64_t>& expected) const {
  const TensorView& v = tensor(name);
  MOEKIT_CHECK(v.shape == expected, "safetensors file ", q(shard_path(name), 4096), ": tensor ", q(name),
               " has shape ", shape_str(v.shape), " (", dtype_name(v.dtype), "), expected shape ",
               shape_str(expected));
}

bool TensorSource::contains(const std::string& name) const {
  return impl_->shard_of.count(name) != 0;
}

const TensorView& TensorSource::tensor(const std::string& name) const {
  auto it = impl_->shard_of.find(name);
  if (it == impl_->shard_of.end()) {
    fail("tensor source ", q(impl_->path, 4096), ": no tensor named ", q(name), " (it has ",
         impl_->shard_of.size(), " tensors)");
  }
  return impl_->shards[it->second].tensor(name);
}

const std::string& TensorSource::shard_path(const std::string& name) const {
  auto it = impl_->shard_of.find(name);
  return it == impl_->shard_of.end() ? impl_->path : impl_->shards[it->second].path();
}

std::vector<std::string> TensorSource::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->shard_of.size());
  for (const auto& kv : impl_->shard_of) out.push_back(kv.first);
  return out;
}

namespace {

/// Checks the tensor's dtype is one of `accepted` and its shape matches `expected` (-1 = any
/// extent). `path` is the file holding the tensor.
const TensorView& checked_view(const TensorView& v, const std::string& path,
                               const std::vector<int64_t>& expected,
                               std::initializer_list<DType> accepted, const char* reader) {
  const std::string& name = v.name;
  const std::string at = detail::concat("safetensors file ", q(path, 4096), ": tensor ", q(name));
  for (std::size_t i = 0; i < expected.size(); ++i) {
    MOEKIT_CHECK(expected[i] >= -1, reader, "(", q(name), "): expected_shape ", shape_str(expected),
                 " has entry ", expected[i], " at ", i, ", expected >= 0 or -1 (any)");
  }
  bool ok = std::find(accepted.begin(), accepted.end(), v.dtype) != accepted.end();
  if (!ok) {
    std::string want;
    for (DType d : accepted) want += detail::concat(want.empty() ? "" : " or ", dtype_name(d));
    fail(at, " has dtype ", dtype_name(v.dtype), " shape ", shape_str(v.shape), ", expected dtype ",
         want, " for ", reader);
  }
  ok = expected.size() == v.shape.size();
  for (std::size_t i = 0; ok && i < expected.size(); ++i) {
    ok = expected[i] == -1 || expected[i] == v.shape[i];
  }
  MOEKIT_CHECK(ok, at, " has shape ", shape_str(v.shape), " (", dtype_name(v.dtype),
               "), expected shape ", shape_str(expected));
  return v;
}

template <class T>
T load(const std::byte* p) {
  T t;
  std::memcpy(&t, p, sizeof(T));  // data in a mapped file need not be aligned
  return t;
}

}  // namespace

namespace {

constexpr std::initializer_list<DType> kFloatDtypes = {DType::F32, DType::F16, DType::BF16,
                                                       DType::F64};

/// Converts a checked F32/F16/BF16/F64 tensor to float.
void to_f32(const TensorView& v, float* dst) {
  const auto n = static_cast<std::size_t>(v.numel());
  switch (v.dtype) {
    case DType::F32:
      if (n) std::memcpy(dst, v.data, n * sizeof(float));
      break;
    case DType::F16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load<uint16_t>(v.data + 2 * i));
      break;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load<uint16_t>(v.data + 2 * i));
      break;
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load<double>(v.data + 8 * i));
      break;
    default:
      MOEKIT_DEBUG_ASSERT(false);
  }
}

}  // namespace

namespace {

constexpr int64_t kFp8Block = 128;

/// Dequantises a checked F8_E4M3 `[n, k]` tensor with its `[ceil(n/128), ceil(k/128)]` block
/// scales (`weight_scale_inv`, already f32): w = e4m3(q) * scale[i / 128][j / 128].
void fp8_to_f32(const TensorView& v, const std::vector<float>& scale, float* dst) {
  const int64_t n = v.shape[0], k = v.shape[1], kb = (k + kFp8Block - 1) / kFp8Block;
  float lut[256];
  for (int b = 0; b < 256; ++b) lut[b] = kernels::fp8_e4m3_to_float(static_cast<uint8_t>(b));
  const auto* q = reinterpret_cast<const uint8_t*>(v.data);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j)
      dst[i * k + j] = lut[q[i * k + j]] * scale[static_cast<std::size_t>((i / kFp8Block) * kb + j / kFp8Block)];
}

}  // namespace

void TensorSource::read_f32_into_checked(const std::string& name, const std::vector<int64_t>& expected_shape,
                                         float* dst, std::vector<float>* grow, const char* reader) const {
  const std::string& file = shard_path(name);
  const TensorView& raw = tensor(name);
  if (raw.dtype == DType::F8_E4M3) {
    const TensorView& v = checked_view(raw, file, expected_shape, {DType::F8_E4M3}, reader);
    MOEKIT_CHECK(v.shape.size() == 2, "safetensors file ", q(file, 4096), ": tensor ", q(name), " is F8_E4M3 ",
                 shape_str(v.shape), ", expected a 2-D weight [out, in] (block-scaled FP8 is read for matrices only)");
    const int64_t n = v.shape[0], k = v.shape[1];
    const std::string sname = name + "_scale_inv";
    const int64_t sn = (n + kFp8Block - 1) / kFp8Block, sk = (k + kFp8Block - 1) / kFp8Block;
    MOEKIT_CHECK(contains(sname), "safetensors file ", q(file, 4096), ": tensor ", q(name),
                 " is F8_E4M3 and needs its 128x128 block scales ", q(sname), " [", sn, ", ", sk,
                 "] (as DeepSeek-V3 checkpoints ship them), which is missing");
    const std::vector<float> scale = read_f32(sname, {sn, sk});
    for (std::size_t i = 0; i < scale.size(); ++i)
      MOEKIT_CHECK(std::isfinite(scale[i]), "safetensors file ", q(shard_path(sname), 4096), ": tensor ", q(sname),
                   " element ", i, " is ", scale[i], ", expected a finite block scale");
    if (grow != nullptr) {
      grow->resize(static_cast<std::size_t>(n * k));
      dst = grow->data();
    }
    fp8_to_f32(v, scale, dst);
    return;
  }
  const TensorView& v = checked_view(raw, file, expected_shape, kFloatDtypes, reader);
  if (grow != nullptr) {
    grow->resize(static_cast<std::size_t>(v.numel()));
    dst = grow->data();
  }
  MOEKIT_CHECK(dst != nullptr || v.numel() == 0, reader, "(", q(name), "): dst is null, expected room for ",
               v.numel(), " floats");
  to_f32(v, dst);
}

std::vector<float> TensorSource::read_f32(const std::string& name,
                                          const std::vector<int64_t>& expected_shape) const {
  std::vector<float> out;
  read_f32_into_checked(name, expected_shape, nullptr, &out, "read_f32");
  return out;
}

void TensorSource::read_f32_into(const std::string& name,
                                 const std::vector<int64_t>& expected_shape, float* dst) const {
  read_f32_into_checked(name, expected_shape, dst, nullptr, "read_f32_into");
}

void TensorSource::read_f32_range_into(const std::string& name, const std::vector<int64_t>& expected_shape,
                                       int64_t first, int64_t count, float* dst) const {
  const std::string& file = shard_path(name);
  const TensorView& v = checked_view(tensor(name), file, expected_shape, kFloatDtypes, "read_f32_range_into");
  MOEKIT_CHECK(first >= 0 && count >= 0 && first <= v.numel() && count <= v.numel() - first,
               "read_f32_range_into(", q(name), "): elements [", first, ", ", first, " + ", count,
               ") expected inside the tensor's ", v.numel());
  MOEKIT_CHECK(dst != nullptr || count == 0, "read_f32_range_into(", q(name), "): dst is null, expected room for ",
               count, " floats");
  TensorView part = v;
  const std::size_t size = dtype_size(v.dtype);
  part.data = v.data + static_cast<std::size_t>(first) * size;
  part.nbytes = static_cast<std::size_t>(count) * size;
  part.shape = {count};
  to_f32(part, dst);
}

void TensorSource::read_mxfp4_rows_into(const std::string& base, const std::vector<int64_t>& blocks_shape,
                                        int64_t first_row, int64_t rows, float* dst) const {
  const char* reader = "read_mxfp4_rows_into";
  MOEKIT_CHECK(blocks_shape.size() >= 3 && blocks_shape.back() == 16, reader, "(", q(base),
               "): blocks shape expected [..., R, G, 16], got ", shape_str(blocks_shape));
  const std::string bn = base + "_blocks", sn = base + "_scales";
  const TensorView& b = checked_view(tensor(bn), shard_path(bn), blocks_shape, {DType::U8}, reader);
  const std::vector<int64_t> scales_shape(blocks_shape.begin(), blocks_shape.end() - 1);
  const TensorView& sc = checked_view(tensor(sn), shard_path(sn), scales_shape, {DType::U8}, reader);
  const int64_t G = blocks_shape[blocks_shape.size() - 2], total_rows = sc.numel() / std::max<int64_t>(G, 1);
  MOEKIT_CHECK(first_row >= 0 && rows >= 0 && first_row <= total_rows && rows <= total_rows - first_row, reader, "(",
               q(base), "): rows [", first_row, ", ", first_row, " + ", rows, ") expected inside the tensor's ",
               total_rows);
  MOEKIT_CHECK(dst != nullptr || rows == 0, reader, "(", q(base), "): dst is null");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t blk = (first_row + r) * G + gi;
      detail::mxfp4_block_to_f32(reinterpret_cast<const std::uint8_t*>(b.data) + blk * 16,
                                 static_cast<std::uint8_t>(sc.data[blk]), detail::Mxfp4Order::pairs,
                                 dst + r * G * 32 + gi * 32);
    }
}

std::vector<int32_t> TensorSource::read_i32(const std::string& name,
                                            const std::vector<int64_t>& expected_shape) const {
  const std::string& file = shard_path(name);
  const TensorView& v =
      checked_view(tensor(name), file, expected_shape, {DType::I32, DType::I64}, "read_i32");
  const auto n = static_cast<std::size_t>(v.numel());
  std::vector<int32_t> out(n);
  if (v.dtype == DType::I32) {
    if (n) std::memcpy(out.data(), v.data, n * sizeof(int32_t));
    return out;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const auto x = load<int64_t>(v.data + 8 * i);
    MOEKIT_CHECK(
        x >= std::numeric_limits<int32_t>::min() && x <= std::numeric_limits<int32_t>::max(),
        "safetensors file ", q(file, 4096), ": tensor ", q(name), " (I64 ", shape_str(v.shape),
        "): element ", i, " is ", x, ", expected a value in int32 range");
    out[i] = static_cast<int32_t>(x);
  }
  return out;
}

std::vector<uint8_t> TensorSource::read_u8(const std::string& name,
                                           const std::vector<int64_t>& expected_shape) const {
  const std::string& file = shard_path(name);
  const TensorView& v =
      checked_view(tensor(name), file, expected_shape, {DType::U8, DType::BOOL}, "read_u8");
  std::vector<uint8_t> out(v.nbytes);
  if (v.nbytes) std::memcpy(out.data(), v.data, v.nbytes);
  return out;
}

// ---- writer ----

namespace {

void write_all(int fd, const void* data, std::size_t n, const std::string& where) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<std::size_t>(n, std::size_t{1} << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) fail(where, ": write failed: ", errno_str(errno));
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<OutTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string where = detail::concat("write_safetensors(", q(path, 4096), ")");

  // Validate everything and build the header before touching the file system.
  json header = json::object();
  std::vector<std::size_t> sizes;
  sizes.reserve(tensors.size());
  std::size_t offset = 0;
  for (const OutTensor& t : tensors) {
    const std::string at = detail::concat(where, ": tensor ", q(t.name));
    MOEKIT_CHECK(!t.name.empty(), where, ": a tensor has an empty name, expected a non-empty one");
    MOEKIT_CHECK(t.name != "__metadata__", at, ": the name is reserved for the metadata");
    MOEKIT_CHECK(!header.contains(t.name), at, ": duplicate name, expected unique tensor names");
    const std::size_t esize = dtype_size(t.dtype);  // throws on an invalid enum value
    int64_t numel = 1;
    for (std::size_t i = 0; i < t.shape.size(); ++i) {
      MOEKIT_CHECK(t.shape[i] >= 0, at, ": shape ", shape_str(t.shape), " has extent ", t.shape[i],
                   " at ", i, ", expected >= 0");
      MOEKIT_CHECK(!__builtin_mul_overflow(numel, t.shape[i], &numel), at, ": shape ",
                   shape_str(t.shape), " has more elements than fit in int64");
    }
    std::size_t nbytes = 0;
    std::size_t end = 0;
    MOEKIT_CHECK(!__builtin_mul_overflow(static_cast<std::size_t>(numel), esize, &nbytes) &&
                     !__builtin_add_overflow(offset, nbytes, &end),
                 at, ": shape ", shape_str(t.shape), " is too large");
    MOEKIT_CHECK(nbytes == 0 || t.data != nullptr, at, ": data is null, expected ", nbytes,
                 " bytes of ", dtype_name(t.dtype));
    header[t.name] = {
        {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    sizes.push_back(nbytes);
    offset = end;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;

  std::string text;
  try {
    text = header.dump(-1, ' ', false, json::error_handler_t::strict);
  } catch (const json::exception& e) {
    fail(where, ": tensor names and metadata must be valid UTF-8 (", e.what(), ")");
  }
  // The data buffer starts 64-byte aligned in the file (8 + header), so a mapped tensor whose
  // offset is a multiple of 64 is 64-byte aligned (moekit's pre-packed layers).
  text.append((64 - (8 + text.size()) % 64) % 64, ' ');
  const auto n = static_cast<std::uint64_t>(text.size());

  // A fresh temporary file beside the destination, created exclusively (mkostemp: never an
  // existing file, never through a symlink), so concurrent writers each write their own and
  // the rename below publishes one complete file.
  const std::filesystem::path dest(path);
  const std::filesystem::path dir = dest.has_parent_path() ? dest.parent_path() : ".";
  std::string tmp =
      (dir / (".moekit-" + dest.filename().string().substr(0, 64) + ".XXXXXX")).string();
  Fd file;
  file.fd = ::mkostemp(tmp.data(), O_CLOEXEC);
  if (file.fd < 0) {
    fail(where, ": cannot create a temporary file in ", q(dir.string(), 4096), ": ",
         errno_str(errno));
  }
  try {
    if (::fchmod(file.fd, 0644) != 0)
      fail(where, ": chmod of ", q(tmp, 4096), " failed: ", errno_str(errno));
    write_all(file.fd, &n, 8, where);  // little-endian u64 (host is little-endian)
    write_all(file.fd, text.data(), text.size(), where);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      if (sizes[i]) write_all(file.fd, tensors[i].data, sizes[i], where);
    }
    if (::fsync(file.fd) != 0)
      fail(where, ": fsync of ", q(tmp, 4096), " failed: ", errno_str(errno));
    const int fd = std::exchange(file.fd, -1);
    if (::close(fd) != 0) fail(where, ": close of ", q(tmp, 4096), " failed: ", errno_str(errno));
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      fail(where, ": cannot rename ", q(tmp, 4096), " to ", q(path, 4096), ": ", errno_str(errno));
    }
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
}

}  // namespace moekit::io
