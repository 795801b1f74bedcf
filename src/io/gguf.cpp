// SPDX-License-Identifier: Apache-2.0
// GGUF reader: mmap, a bounds-checked parse of the untrusted header, and dequantisation of the
// block formats as ggml's dequantize_row_* (ggml-org/ggml src/ggml-quants.c at d99724f,
// ggml-common.h for the block layouts, gguf.cpp / docs/gguf.md for the file layout).
#include "moekit/io/gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <map>

#include "files.hpp"
#include "moekit/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "mxfp4.hpp"

namespace moekit::io {
namespace {

using detail::fail;

std::string q(const std::string& s) { return detail::quoted(s, 200); }

// Block size (elements) and bytes per block of the ggml types whose size moekit knows (the
// ones it reads, and others so a directory holding them is still validated). 0: unknown.
struct TypeSize {
  int64_t block, bytes;
};
TypeSize type_size(uint32_t t) noexcept {
  switch (t) {
    case 0: return {1, 4};      // F32
    case 1: return {1, 2};      // F16
    case 2: return {32, 18};    // Q4_0
    case 3: return {32, 20};    // Q4_1
    case 6: return {32, 22};    // Q5_0
    case 7: return {32, 24};    // Q5_1
    case 8: return {32, 34};    // Q8_0
    case 9: return {32, 36};    // Q8_1
    case 10: return {256, 84};  // Q2_K
    case 11: return {256, 110}; // Q3_K
    case 12: return {256, 144}; // Q4_K
    case 13: return {256, 176}; // Q5_K
    case 14: return {256, 210}; // Q6_K
    case 15: return {256, 292}; // Q8_K
    case 24: return {1, 1};     // I8
    case 25: return {1, 2};     // I16
    case 26: return {1, 4};     // I32
    case 27: return {1, 8};     // I64
    case 28: return {1, 8};     // F64
    case 30: return {1, 2};     // BF16
    case 39: return {32, 17};   // MXFP4
    default: return {0, 0};
  }
}

bool readable(uint32_t t) noexcept {
  switch (static_cast<GgmlType>(t)) {
    case GgmlType::f32: case GgmlType::f16: case GgmlType::q4_0: case GgmlType::q8_0:
    case GgmlType::q4_k: case GgmlType::q6_k: case GgmlType::bf16: case GgmlType::mxfp4: return true;
  }
  return false;
}

// Metadata value types (gguf.h enum gguf_type).
enum : uint32_t { kU8 = 0, kI8, kU16, kI16, kU32, kI32, kF32, kBool, kString, kArray, kU64, kI64, kF64 };
const char* kv_type_name(uint32_t t) {
  static const char* names[] = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
                                "BOOL",  "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64"};
  return t <= kF64 ? names[t] : "unknown";
}

struct Value {
  uint32_t type = 0;
  int64_t i = 0;   // signed integers, and unsigned ones <= INT64_MAX
  uint64_t u = 0;  // unsigned integers
  double f = 0;
  bool b = false;
  std::string s;
  uint32_t elem = 0;  // arrays: element type and count (contents are skipped)
  uint64_t count = 0;
};

constexpr uint64_t kMaxTensors = uint64_t{1} << 22;
constexpr uint64_t kMaxKv = uint64_t{1} << 22;
constexpr uint64_t kMaxString = uint64_t{1} << 30;

// Bounds-checked little-endian reads from the header.
struct Cursor {
  const std::byte* p;
  uint64_t size, pos = 0;
  const std::string& where;

  void need(uint64_t n, const char* what) const {
    if (n > size - pos) fail(where, ": truncated: ", what, " needs ", n, " bytes at offset ", pos, ", the file has ", size - pos, " left");
  }
  template <class T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str(const char* what) {
    const auto n = get<uint64_t>(what);
    MOEKIT_CHECK(n <= kMaxString, where, ": ", what, " length ", n, " at offset ", pos - 8, " expected <= 2^30");
    need(n, what);
    std::string s(reinterpret_cast<const char*>(p + pos), n);
    pos += n;
    return s;
  }
  void skip(uint64_t n, const char* what) {
    need(n, what);
    pos += n;
  }
};

uint64_t scalar_bytes(uint32_t t) {
  switch (t) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: return 8;
    default: return 0;
  }
}

void read_scalar(Cursor& c, uint32_t t, Value& v, const std::string& key) {
  v.type = t;
  switch (t) {
    case kU8: v.u = c.get<uint8_t>("a value"); break;
    case kI8: v.i = c.get<int8_t>("a value"); break;
    case kU16: v.u = c.get<uint16_t>("a value"); break;
    case kI16: v.i = c.get<int16_t>("a value"); break;
    case kU32: v.u = c.get<uint32_t>("a value"); break;
    case kI32: v.i = c.get<int32_t>("a value"); break;
    case kU64: v.u = c.get<uint64_t>("a value"); break;
    case kI64: v.i = c.get<int64_t>("a value"); break;
    case kF32: v.f = c.get<float>("a value"); break;
    case kF64: v.f = c.get<double>("a value"); break;
    case kBool: {
      const auto b = c.get<uint8_t>("a value");
      MOEKIT_CHECK(b <= 1, c.where, ": metadata ", q(key), ": BOOL value ", int{b}, ", expected 0 or 1");
      v.b = b != 0;
      break;
    }
    case kString: v.s = c.str("a string value"); break;
    default: fail(c.where, ": metadata ", q(key), ": value type ", t, ", expected 0..12");
  }
  if (t == kU8 || t == kU16 || t == kU32 || t == kU64) v.i = v.u <= INT64_MAX ? static_cast<int64_t>(v.u) : -1;
}

// ---- dequantisation (ggml-quants.c dequantize_row_*) ----
float f16(const uint8_t* p) { return f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

void dequant_row(uint32_t type, const uint8_t* x, int64_t n, float* y) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::f32:
      std::memcpy(y, x, static_cast<size_t>(n) * 4);
      return;
    case GgmlType::f16:
      for (int64_t i = 0; i < n; ++i) y[i] = f16(x + 2 * i);
      return;
    case GgmlType::bf16:
      for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_f32(static_cast<uint16_t>(x[2 * i] | (x[2 * i + 1] << 8)));
      return;
    case GgmlType::q4_0:  // d (f16), qs[16]: element j low nibble, j + 16 high; (q - 8) d
      for (int64_t b = 0; b < n / 32; ++b, x += 18, y += 32) {
        const float d = f16(x);
        for (int j = 0; j < 16; ++j) {
          y[j] = static_cast<float>((x[2 + j] & 0x0F) - 8) * d;
          y[j + 16] = static_cast<float>((x[2 + j] >> 4) - 8) * d;
        }
      }
      return;
    case GgmlType::q8_0:  // d (f16), qs[32] int8; q d
      for (int64_t b = 0; b < n / 32; ++b, x += 34, y += 32) {
        const float d = f16(x);
        for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(x[2 + j])) * d;
      }
      return;
    case GgmlType::q4_k:  // d, dmin (f16), scales[12] (6-bit scale / min pairs), qs[128]
      for (int64_t b = 0; b < n / 256; ++b, x += 144) {
        const float d = f16(x), dmin = f16(x + 2);
        const uint8_t* sc = x + 4;
        const uint8_t* qs = x + 16;
        auto scale_min = [sc](int j, uint8_t& s, uint8_t& m) {  // get_scale_min_k4
          if (j < 4) {
            s = sc[j] & 63;
            m = sc[j + 4] & 63;
          } else {
            s = static_cast<uint8_t>((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4));
            m = static_cast<uint8_t>((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4));
          }
        };
        for (int c = 0; c < 4; ++c, qs += 32) {
          uint8_t s1, m1, s2, m2;
          scale_min(2 * c, s1, m1);
          scale_min(2 * c + 1, s2, m2);
          const float d1 = d * s1, mm1 = dmin * m1, d2 = d * s2, mm2 = dmin * m2;
          for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(qs[l] & 0x0F) - mm1;
          for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(qs[l] >> 4) - mm2;
        }
      }
      return;
    case GgmlType::q6_k:  // ql[128], qh[64], scales[16] int8, d (f16)
      for (int64_t b = 0; b < n / 256; ++b, x += 210) {
        const float d = f16(x + 208);
        const uint8_t* ql = x;
        const uint8_t* qh = x + 128;
        const auto* sc = reinterpret_cast<const int8_t*>(x + 192);
        for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128)
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * static_cast<float>(q1);
            y[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
            y[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
            y[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
          }
      }
      return;
    case GgmlType::mxfp4:  // e (e8m0), qs[16]: element j low nibble, j + 16 high
      for (int64_t b = 0; b < n / 32; ++b, x += 17, y += 32)
        detail::mxfp4_block_to_f32(x + 1, x[0], detail::Mxfp4Order::halves, y);
      return;
  }
}

}  // namespace

std::string ggml_type_name(uint32_t type) {
  switch (type) {
    case 0: return "F32";
    case 1: return "F16";
    case 2: return "Q4_0";
    case 3: return "Q4_1";
    case 6: return "Q5_0";
    case 7: return "Q5_1";
    case 8: return "Q8_0";
    case 9: return "Q8_1";
    case 10: return "Q2_K";
    case 11: return "Q3_K";
    case 12: return "Q4_K";
    case 13: return "Q5_K";
    case 14: return "Q6_K";
    case 15: return "Q8_K";
    case 30: return "BF16";
    case 39: return "MXFP4";
    default: return "type " + std::to_string(type);
  }
}

struct GgufFile::Impl {
  std::string path;
  uint32_t version = 0;
  void* base = MAP_FAILED;
  std::size_t len = 0;
  std::vector<std::byte> owned;
  std::map<std::string, Value> kv;
  std::map<std::string, GgufTensor> tensors;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    if (base != MAP_FAILED) ::munmap(base, len);
  }

  void parse(const std::byte* bytes, uint64_t size) {
    const std::string where = "GGUF file " + q(path);
    Cursor c{bytes, size, 0, where};
    c.need(4, "the magic");
    MOEKIT_CHECK(std::memcmp(bytes, "GGUF", 4) == 0, where, ": not a GGUF file (the first 4 bytes are not \"GGUF\")");
    c.pos = 4;
    version = c.get<uint32_t>("the version");
    MOEKIT_CHECK(version == 2 || version == 3, where, ": version ", version,
                 ", expected 2 or 3 (a version with its low 16 bits zero is a big-endian file: not supported)");
    const auto n_tensors = c.get<uint64_t>("the tensor count");
    const auto n_kv = c.get<uint64_t>("the metadata count");
    MOEKIT_CHECK(n_tensors <= kMaxTensors, where, ": tensor count ", n_tensors, " expected <= 2^22");
    MOEKIT_CHECK(n_kv <= kMaxKv, where, ": metadata count ", n_kv, " expected <= 2^22");
    for (uint64_t i = 0; i < n_kv; ++i) {
      const std::string key = c.str("a metadata key");
      MOEKIT_CHECK(!key.empty(), where, ": metadata key ", i, " is empty");
      MOEKIT_CHECK(!kv.count(key), where, ": metadata key ", q(key), " appears twice");
      Value v;
      const auto t = c.get<uint32_t>("a value type");
      if (t == kArray) {
        v.type = kArray;
        v.elem = c.get<uint32_t>("an array element type");
        v.count = c.get<uint64_t>("an array length");
        MOEKIT_CHECK(v.elem != kArray, where, ": metadata ", q(key), ": arrays of arrays are not supported");
        if (v.elem == kString) {
          MOEKIT_CHECK(v.count <= (size - c.pos) / 8, where, ": metadata ", q(key), ": array of ", v.count,
                       " strings cannot fit in the file");
          for (uint64_t j = 0; j < v.count; ++j) (void)c.skip(c.get<uint64_t>("a string length"), "a string");
        } else {
          const uint64_t eb = scalar_bytes(v.elem);
          MOEKIT_CHECK(eb > 0, where, ": metadata ", q(key), ": array element type ", v.elem, ", expected 0..12");
          MOEKIT_CHECK(v.count <= (size - c.pos) / eb, where, ": metadata ", q(key), ": array of ", v.count,
                       " elements runs past the end of the file");
          c.skip(v.count * eb, "an array");
        }
      } else {
        read_scalar(c, t, v, key);
      }
      kv.emplace(key, std::move(v));
    }
    uint64_t alignment = 32;
    if (auto it = kv.find("general.alignment"); it != kv.end()) {
      MOEKIT_CHECK(it->second.type == kU32, where, ": general.alignment has type ", kv_type_name(it->second.type),
                   ", expected UINT32");
      alignment = it->second.u;
      MOEKIT_CHECK(alignment >= 1 && alignment <= (uint64_t{1} << 30) && (alignment & (alignment - 1)) == 0, where,
                   ": general.alignment ", alignment, " expected a power of two <= 2^30");
    }
    std::vector<GgufTensor*> order;
    for (uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensor t;
      t.name = c.str("a tensor name");
      MOEKIT_CHECK(!t.name.empty() && t.name.size() < 64, where, ": tensor ", i, " name ", q(t.name),
                   " expected 1..63 bytes (GGML_MAX_NAME)");
      MOEKIT_CHECK(!tensors.count(t.name), where, ": tensor ", q(t.name), " appears twice");
      const auto nd = c.get<uint32_t>("a tensor's dimension count");
      MOEKIT_CHECK(nd >= 1 && nd <= 4, where, ": tensor ", q(t.name), ": ", nd, " dimensions, expected 1..4");
      t.n_dims = static_cast<int>(nd);
      int64_t numel = 1;
      for (uint32_t j = 0; j < nd; ++j) {
        t.ne[j] = c.get<int64_t>("a tensor extent");
        MOEKIT_CHECK(t.ne[j] >= 0 && t.ne[j] <= (int64_t{1} << 40), where, ": tensor ", q(t.name), ": extent ",
                     t.ne[j], " of axis ", j, " expected in [0, 2^40]");
        MOEKIT_CHECK(!__builtin_mul_overflow(numel, t.ne[j], &numel) && numel <= (int64_t{1} << 48), where,
                     ": tensor ", q(t.name), ": element count overflows (more than 2^48)");
      }
      t.type = c.get<uint32_t>("a tensor type");
      t.offset = c.get<uint64_t>("a tensor offset");
      const TypeSize ts = type_size(t.type);
      if (ts.block > 0) {
        MOEKIT_CHECK(t.ne[0] % ts.block == 0, where, ": tensor ", q(t.name), ": ne0 ", t.ne[0], " of type ",
                     ggml_type_name(t.type), " expected a multiple of its block size ", ts.block);
        t.nbytes = static_cast<uint64_t>(numel / ts.block) * static_cast<uint64_t>(ts.bytes);
      }
      MOEKIT_CHECK(t.offset % alignment == 0, where, ": tensor ", q(t.name), ": offset ", t.offset,
                   " expected a multiple of the alignment ", alignment);
      order.push_back(&tensors.emplace(t.name, std::move(t)).first->second);
    }
    const uint64_t data_start = (c.pos + alignment - 1) / alignment * alignment;
    MOEKIT_CHECK(n_tensors == 0 || data_start <= size, where, ": the data section (at ", data_start,
                 ") starts past the end of the file (", size, " bytes)");
    std::sort(order.begin(), order.end(), [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
    uint64_t end = 0;
    for (GgufTensor* t : order) {
      MOEKIT_CHECK(t->offset >= end, where, ": tensor ", q(t->name), " (offset ", t->offset,
                   ") overlaps the previous tensor's data (ending at ", end, ")");
      MOEKIT_CHECK(t->offset <= size - std::min(size, data_start) && t->nbytes <= size - data_start - t->offset, where,
                   ": tensor ", q(t->name), ": ", t->nbytes, " bytes at data offset ", t->offset,
                   " run past the end of the file (", size, " bytes, data from ", data_start, ")");
      t->data = bytes + data_start + t->offset;
      end = t->offset + t->nbytes;
    }
  }

  const Value* find(const std::string& key) const {
    const auto it = kv.find(key);
    return it == kv.end() ? nullptr : &it->second;
  }
  [[noreturn]] void wrong_type(const std::string& key, const Value& v, const char* want) const {
    fail("GGUF file ", q(path), ": metadata ", q(key), " has type ", kv_type_name(v.type), ", expected ", want);
  }
};

GgufFile::GgufFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

GgufFile GgufFile::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  const std::string where = "GGUF file " + q(path);
  // O_NONBLOCK: a FIFO cannot hang the open before the regular-file check.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(where, ": cannot open for reading: ", std::strerror(errno));
  struct stat st {};
  const bool stat_ok = ::fstat(fd, &st) == 0;
  if (!stat_ok || !S_ISREG(st.st_mode)) {
    ::close(fd);
    MOEKIT_CHECK(stat_ok, where, ": cannot stat");
    fail(where, ": is ", detail::file_kind(st.st_mode), ", expected a regular file");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < 24) {
    ::close(fd);
    fail(where, ": file is ", size, " bytes, expected at least 24 (the header)");
  }
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (base == MAP_FAILED) fail(where, ": mmap of ", size, " bytes failed: ", std::strerror(err));
  impl->base = base;
  impl->len = size;
  impl->parse(static_cast<const std::byte*>(base), size);
  return GgufFile(std::move(impl));
}

GgufFile GgufFile::from_bytes(const std::string& name, std::vector<std::byte> bytes) {
  auto impl = std::make_unique<Impl>();
  impl->path = name;
  impl->owned = std::move(bytes);
  impl->parse(impl->owned.data(), impl->owned.size());
  return GgufFile(std::move(impl));
}

const std::string& GgufFile::path() const noexcept { return impl_->path; }
uint32_t GgufFile::version() const noexcept { return impl_->version; }
bool GgufFile::has(const std::string& key) const { return impl_->find(key) != nullptr; }

std::optional<int64_t> GgufFile::get_int(const std::string& key) const {
  const Value* v = impl_->find(key);
  if (v == nullptr) return std::nullopt;
  switch (v->type) {
    case kU8: case kU16: case kU32: case kU64:
      if (v->i < 0) fail("GGUF file ", q(impl_->path), ": metadata ", q(key), " = ", v->u, " expected <= INT64_MAX");
      return v->i;
    case kI8: case kI16: case kI32: case kI64: return v->i;
    default: impl_->wrong_type(key, *v, "an integer");
  }
}

std::optional<double> GgufFile::get_float(const std::string& key) const {
  const Value* v = impl_->find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != kF32 && v->type != kF64) impl_->wrong_type(key, *v, "FLOAT32 or FLOAT64");
  return v->f;
}

std::optional<bool> GgufFile::get_bool(const std::string& key) const {
  const Value* v = impl_->find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != kBool) impl_->wrong_type(key, *v, "BOOL");
  return v->b;
}

std::optional<std::string> GgufFile::get_string(const std::string& key) const {
  const Value* v = impl_->find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != kString) impl_->wrong_type(key, *v, "STRING");
  return v->s;
}

bool GgufFile::contains(const std::string& name) const { return impl_->tensors.count(name) != 0; }

const GgufTensor& GgufFile::tensor(const std::string& name) const {
  const auto it = impl_->tensors.find(name);
  if (it == impl_->tensors.end()) fail("GGUF file ", q(impl_->path), ": no tensor ", q(name));
  return it->second;
}

std::vector<std::string> GgufFile::tensor_names() const {
  std::vector<std::string> v;
  for (const auto& [n, t] : impl_->tensors) v.push_back(n);
  return v;
}

void GgufFile::read_rows_f32(const std::string& name, int64_t first, int64_t count, float* dst) const {
  const GgufTensor& t = tensor(name);
  MOEKIT_CHECK(readable(t.type), "GGUF file ", q(impl_->path), ": tensor ", q(name), " has type ",
               ggml_type_name(t.type), ", expected F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q6_K or MXFP4");
  MOEKIT_CHECK(first >= 0 && count >= 0 && first <= t.rows() && count <= t.rows() - first, "GGUF file ",
               q(impl_->path), ": tensor ", q(name), ": rows [", first, ", ", first, " + ", count,
               ") expected inside its ", t.rows());
  MOEKIT_CHECK(dst != nullptr || count == 0, "GGUF read_rows_f32(", q(name), "): dst is null");
  const TypeSize ts = type_size(t.type);
  const auto row_bytes = static_cast<uint64_t>(t.ne[0] / ts.block * ts.bytes);
  const auto* base = reinterpret_cast<const uint8_t*>(t.data);
  for (int64_t r = 0; r < count; ++r)
    dequant_row(t.type, base + static_cast<uint64_t>(first + r) * row_bytes, t.ne[0], dst + r * t.ne[0]);
}

}  // namespace moekit::io
