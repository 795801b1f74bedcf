// SPDX-License-Identifier: Apache-2.0
// Tests of moekit::io safetensors reading/writing, header hardening and float16/bfloat16
// conversion.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moekit/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "support/float16_ref.hpp"
#include "support/synthetic.hpp"

namespace {

namespace fs = std::filesystem;
using moekit::io::DType;
using moekit::io::OutTensor;
using moekit::io::SafetensorsFile;
using moekit::io::TensorSource;
using namespace f16ref;

// ---- helpers ----

/// A fresh directory under testing::TempDir(), removed at the end of the test.
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = (fs::path(testing::TempDir()) / "moekit_st_XXXXXX").string();
    char* made = ::mkdtemp(tmpl.data());
    if (made == nullptr) throw std::runtime_error("mkdtemp failed for " + tmpl);
    dir_ = made;
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }
  std::string operator/(const std::string& name) const { return (dir_ / name).string(); }
  const fs::path& path() const { return dir_; }

 private:
  fs::path dir_;
};

// Entries of a folder (to see that no temporary file is left behind).
std::size_t entries(const fs::path& dir) {
  return static_cast<std::size_t>(std::distance(fs::directory_iterator(dir), fs::directory_iterator()));
}


std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A safetensors file made by hand: length prefix, header text, `data_len` filler bytes.
std::string raw_file(const std::string& header, std::size_t data_len) {
  return le64(header.size()) + header + std::string(data_len, '\x11');
}

/// Runs `f`, expects a moekit::error, returns its message (empty if none was thrown).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moekit::error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected moekit::error, nothing was thrown";
  return {};
}

template <class T>
std::vector<std::byte> bytes_of(const std::vector<T>& v) {
  std::vector<std::byte> out(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

std::vector<std::byte> bytes_of(const moekit::io::TensorView& t) {
  return {t.data, t.data + t.nbytes};
}

// ---- round trip ----

TEST(SafetensorsRoundTrip, AllDtypesThroughWriteAndOpen) {
  ScratchDir dir;
  const std::string path = dir / "model.safetensors";

  const std::vector<float> f32 = {1.5f, -2.25f, 0.0f, 3e-8f, -7e20f, 42.0f};
  const std::vector<int32_t> i32 = {0, -1, 2147483647, -2147483647 - 1};
  const std::vector<uint8_t> u8 = {0, 1, 127, 128, 255};
  const std::vector<float> bf16_vals = {1.0f, -0.5f, 3.140625f, 65280.0f};
  const std::vector<float> f16_vals = {1.0f, -0.5f, 65504.0f, 0x1p-24f};
  std::vector<uint16_t> bf16, f16;
  for (float v : bf16_vals) bf16.push_back(moekit::io::f32_to_bf16(v));
  for (float v : f16_vals) f16.push_back(moekit::io::f32_to_f16(v));
  const std::vector<double> f64 = {0.1, -1e300};
  const std::vector<int64_t> i64 = {-5, 1LL << 40};
  const std::vector<uint8_t> boolean = {1, 0, 1};
  const float scalar = 2.5f;

  const std::vector<OutTensor> out = {
      {"w.f32", DType::F32, {2, 3}, f32.data()}, {"idx.i32", DType::I32, {4}, i32.data()},
      {"mask.u8", DType::U8, {5}, u8.data()},    {"w.bf16", DType::BF16, {2, 2}, bf16.data()},
      {"w.f16", DType::F16, {4, 1}, f16.data()}, {"w.f64", DType::F64, {2}, f64.data()},
      {"idx.i64", DType::I64, {2}, i64.data()},  {"flag.bool", DType::BOOL, {3}, boolean.data()},
      {"empty", DType::F32, {0, 3}, nullptr},    {"scalar", DType::F32, {}, &scalar},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "x\ny"}};
  moekit::io::write_safetensors(path, out, meta);
  EXPECT_EQ(entries(fs::path(path).parent_path()), 1u) << "a temporary file was left behind";

  // Check the bytes independently: prefix, JSON header (as nlohmann sees it), 64-byte alignment.
  const std::string raw = read_bytes(path);
  ASSERT_GE(raw.size(), 8u);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(raw[i]);
  EXPECT_EQ((8 + n) % 64, 0u);  // the data buffer starts 64-byte aligned
  const auto header = nlohmann::json::parse(raw.substr(8, n));
  EXPECT_EQ(header["w.f32"]["dtype"], "F32");
  EXPECT_EQ(header["w.f32"]["shape"], nlohmann::json({2, 3}));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");

  const SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ(file.path(), path);
  const std::vector<std::string> expect_names = {"empty",   "flag.bool", "idx.i32", "idx.i64",
                                                 "mask.u8", "scalar",    "w.bf16",  "w.f16",
                                                 "w.f32",   "w.f64"};
  EXPECT_EQ(file.names(), expect_names);
  EXPECT_EQ(file.metadata(), meta);
  EXPECT_TRUE(file.contains("w.f32"));
  EXPECT_FALSE(file.contains("w"));

  const auto& t = file.tensor("w.f32");
  EXPECT_EQ(t.name, "w.f32");
  EXPECT_EQ(t.dtype, DType::F32);
  EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t.numel(), 6);
  EXPECT_EQ(bytes_of(t), bytes_of(f32));
  EXPECT_EQ(bytes_of(file.tensor("idx.i32")), bytes_of(i32));
  EXPECT_EQ(bytes_of(file.tensor("mask.u8")), bytes_of(u8));
  EXPECT_EQ(bytes_of(file.tensor("w.bf16")), bytes_of(bf16));
  EXPECT_EQ(file.tensor("w.bf16").dtype, DType::BF16);
  EXPECT_EQ(bytes_of(file.tensor("w.f16")), bytes_of(f16));
  EXPECT_EQ(file.tensor("w.f16").dtype, DType::F16);
  EXPECT_EQ(bytes_of(file.tensor("w.f64")), bytes_of(f64));
  EXPECT_EQ(bytes_of(file.tensor("idx.i64")), bytes_of(i64));
  EXPECT_EQ(file.tensor("flag.bool").dtype, DType::BOOL);
  EXPECT_EQ(file.tensor("empty").numel(), 0);
  EXPECT_EQ(file.tensor("empty").nbytes, 0u);
  EXPECT_EQ(file.tensor("scalar").shape, std::vector<int64_t>{});
  EXPECT_EQ(file.tensor("scalar").numel(), 1);

  // Typed readers convert.
  const TensorSource src = TensorSource::open(path);
  EXPECT_EQ(src.names(), expect_names);
  EXPECT_EQ(src.read_f32("w.f32", {2, 3}), f32);
  EXPECT_EQ(src.read_f32("w.bf16", {2, 2}), bf16_vals);  // all exactly representable
  EXPECT_EQ(src.read_f32("w.f16", {4, 1}), f16_vals);
  EXPECT_EQ(src.read_f32("w.f64", {2}), (std::vector<float>{0.1f, -INFINITY}));
  EXPECT_EQ(src.read_f32("empty", {0, 3}), std::vector<float>{});
  EXPECT_EQ(src.read_f32("scalar", {}), std::vector<float>{2.5f});
  EXPECT_EQ(src.read_i32("idx.i32", {4}), i32);
  EXPECT_EQ(src.read_u8("mask.u8", {5}), u8);
  EXPECT_EQ(src.read_u8("flag.bool", {3}), boolean);
  std::vector<float> dst(6, -1.0f);
  src.read_f32_into("w.f32", {-1, 3}, dst.data());
  EXPECT_EQ(dst, f32);
  src.read_f32_into("empty", {0, 3}, nullptr);  // nothing to write, null is fine
}

TEST(SafetensorsRoundTrip, NoTensorsAndMetadataOnly) {
  ScratchDir dir;
  moekit::io::write_safetensors(dir / "none.safetensors", {});
  const auto a = SafetensorsFile::open(dir / "none.safetensors");
  EXPECT_TRUE(a.names().empty());
  EXPECT_TRUE(a.metadata().empty());

  moekit::io::write_safetensors(dir / "meta.safetensors", {}, {{"k", "v"}});
  const auto b = SafetensorsFile::open(dir / "meta.safetensors");
  EXPECT_TRUE(b.names().empty());
  EXPECT_EQ(b.metadata().at("k"), "v");

  // Hand-made minimal files: "{}" with an empty data buffer, and a space-padded header.
  write_bytes(dir / "min.safetensors", raw_file("{}", 0));
  EXPECT_TRUE(SafetensorsFile::open(dir / "min.safetensors").names().empty());
  write_bytes(dir / "pad.safetensors",
              raw_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}     )", 2));
  EXPECT_EQ(SafetensorsFile::open(dir / "pad.safetensors").tensor("a").nbytes, 2u);
}

TEST(SafetensorsRoundTrip, UnalignedDataIsReadCorrectly) {
  ScratchDir dir;
  // A 1-byte tensor first puts the F32 data at an odd address.
  const float vals[3] = {1.0f, -2.0f, 3.5f};
  std::string header = R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                       R"("f":{"dtype":"F32","shape":[3],"data_offsets":[1,13]}})";
  std::string bytes = le64(header.size()) + header + std::string(1, '\x07');
  bytes.append(reinterpret_cast<const char*>(vals), sizeof vals);
  write_bytes(dir / "odd.safetensors", bytes);
  const auto src = TensorSource::open(dir / "odd.safetensors");
  EXPECT_EQ(src.read_f32("f", {3}), (std::vector<float>{1.0f, -2.0f, 3.5f}));
  EXPECT_EQ(src.read_u8("b", {1}), std::vector<uint8_t>{7});
}

TEST(SafetensorsRoundTrip, MoveKeepsViewsValid) {
  ScratchDir dir;
  const std::vector<int32_t> v = {1, 2, 3};
  moekit::io::write_safetensors(dir / "m.safetensors", {{"v", DType::I32, {3}, v.data()}});
  auto a = SafetensorsFile::open(dir / "m.safetensors");
  const auto* view = &a.tensor("v");
  SafetensorsFile b = std::move(a);
  EXPECT_EQ(&b.tensor("v"), view);
  EXPECT_EQ(bytes_of(b.tensor("v")), bytes_of(v));
  SafetensorsFile c = SafetensorsFile::open(dir / "m.safetensors");
  c = std::move(b);
  EXPECT_EQ(bytes_of(c.tensor("v")), bytes_of(v));
}

TEST(SafetensorsRoundTrip, OverwriteIsAtomicForOpenReaders) {
  ScratchDir dir;
  const std::string path = dir / "w.safetensors";
  const std::vector<float> old_v = {1, 2}, new_v = {3, 4, 5};
  moekit::io::write_safetensors(path, {{"x", DType::F32, {2}, old_v.data()}});
  const auto before = SafetensorsFile::open(path);
  moekit::io::write_safetensors(path, {{"x", DType::F32, {3}, new_v.data()}});
  // The open mapping still sees the old file; a fresh open sees the new one.
  EXPECT_EQ(bytes_of(before.tensor("x")), bytes_of(old_v));
  EXPECT_EQ(TensorSource::open(path).read_f32("x", {3}), new_v);
}

// ---- typed readers: shape and dtype checks ----

class SafetensorsReaders : public testing::Test {
 protected:
  void SetUp() override {
    const std::vector<int64_t> big = {1, -(1LL << 40)};
    moekit::io::write_safetensors(path_, {{"layers.0.w", DType::F32, {2, 3}, w_.data()},
                                          {"ids", DType::I32, {2}, ids_.data()},
                                          {"big", DType::I64, {2}, big.data()}});
    src_ = std::make_unique<TensorSource>(TensorSource::open(path_));
  }
  ScratchDir dir_;
  std::string path_ = dir_ / "r.safetensors";
  std::vector<float> w_ = {1, 2, 3, 4, 5, 6};
  std::vector<int32_t> ids_ = {7, 8};
  std::unique_ptr<TensorSource> src_;
};

TEST_F(SafetensorsReaders, WrongShapeNamesTensorAndShapes) {
  const std::string msg = error_of([&] { (void)src_->read_f32("layers.0.w", {3, 2}); });
  EXPECT_NE(msg.find("layers.0.w"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[3, 2]"), std::string::npos) << msg;
  EXPECT_NE(msg.find(path_), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;

  const std::string rank = error_of([&] { (void)src_->read_f32("layers.0.w", {6}); });
  EXPECT_NE(rank.find("layers.0.w"), std::string::npos) << rank;
  std::vector<float> dst(6);
  const std::string into = error_of([&] {
    src_->read_f32_into("layers.0.w", {2, 3, 1}, dst.data());
  });
  EXPECT_NE(into.find("layers.0.w"), std::string::npos) << into;
  EXPECT_NE(error_of([&] { (void)src_->read_i32("ids", {3}); }).find("ids"), std::string::npos);
}

TEST_F(SafetensorsReaders, WildcardsMatchAnyExtent) {
  EXPECT_EQ(src_->read_f32("layers.0.w", {-1, 3}), w_);
  EXPECT_EQ(src_->read_f32("layers.0.w", {-1, -1}), w_);
  EXPECT_EQ(src_->read_i32("ids", {-1}), ids_);
  const std::string msg = error_of([&] { (void)src_->read_f32("layers.0.w", {-2, 3}); });
  EXPECT_NE(msg.find("-2"), std::string::npos) << msg;
  std::string null_dst = error_of([&] { src_->read_f32_into("layers.0.w", {2, 3}, nullptr); });
  EXPECT_NE(null_dst.find("null"), std::string::npos) << null_dst;
}

TEST_F(SafetensorsReaders, WrongDtypeNamesTensorAndDtypes) {
  const std::string a = error_of([&] { (void)src_->read_i32("layers.0.w", {2, 3}); });
  EXPECT_NE(a.find("layers.0.w"), std::string::npos) << a;
  EXPECT_NE(a.find("F32"), std::string::npos) << a;
  EXPECT_NE(a.find("I32"), std::string::npos) << a;
  const std::string b = error_of([&] { (void)src_->read_f32("ids", {2}); });
  EXPECT_NE(b.find("ids"), std::string::npos) << b;
  EXPECT_NE(error_of([&] { (void)src_->read_u8("ids", {2}); }).find("ids"), std::string::npos);
}

TEST_F(SafetensorsReaders, I64OutOfInt32RangeIsAnError) {
  const std::string msg = error_of([&] { (void)src_->read_i32("big", {2}); });
  EXPECT_NE(msg.find("big"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::to_string(-(1LL << 40))), std::string::npos) << msg;
}

TEST_F(SafetensorsReaders, RangesReadOneSliceOrNameTheOverrun) {
  std::vector<float> dst(6, -1.0f);
  src_->read_f32_range_into("layers.0.w", {2, 3}, 3, 3, dst.data());  // row 1 of [2, 3]
  EXPECT_EQ(std::vector<float>(dst.begin(), dst.begin() + 3), (std::vector<float>{4, 5, 6}));
  EXPECT_EQ(dst[3], -1.0f);
  src_->read_f32_range_into("layers.0.w", {2, 3}, 6, 0, nullptr);  // empty at the end
  for (auto [first, count] : {std::pair<int64_t, int64_t>{4, 3}, {-1, 2}, {0, 7}, {7, 0}, {2, INT64_MAX}}) {
    const std::string msg = error_of([&] { src_->read_f32_range_into("layers.0.w", {2, 3}, first, count, dst.data()); });
    EXPECT_NE(msg.find("expected inside the tensor's 6"), std::string::npos) << msg;
  }
  EXPECT_NE(error_of([&] { src_->read_f32_range_into("layers.0.w", {3, 2}, 0, 1, dst.data()); }).find("[2, 3]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { src_->read_f32_range_into("ids", {2}, 0, 1, dst.data()); }).find("I32"), std::string::npos);
  EXPECT_NE(error_of([&] { src_->read_f32_range_into("layers.0.w", {2, 3}, 0, 1, nullptr); }).find("null"),
            std::string::npos);
}

// MXFP4 (gpt-oss): every byte value in every nibble position, scales from 2^-127 to overflow,
// against a decode of the e2m1 bits (sign, 2-bit exponent with bias 1, 1-bit mantissa).
TEST(SafetensorsMxfp4, RowsDecodeEveryCodeAndScale) {
  ScratchDir dir;
  const std::string path = dir / "m.safetensors";
  const int64_t E = 2, R = 3, G = 8;  // 2 x 3 rows of 256 values: every byte twice per expert
  std::vector<uint8_t> blocks(static_cast<size_t>(E * R * G * 16)), scales(static_cast<size_t>(E * R * G));
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = static_cast<uint8_t>((i * 37 + 11) % 256);
  const uint8_t kScales[] = {0, 1, 100, 126, 127, 128, 200, 254, 255};
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = kScales[i % std::size(kScales)];
  moekit::io::write_safetensors(path, {{"w_blocks", DType::U8, {E, R, G, 16}, blocks.data()},
                                       {"w_scales", DType::U8, {E, R, G}, scales.data()}});
  const TensorSource src = TensorSource::open(path);
  auto e2m1 = [](int c) {
    const double sign = (c & 8) ? -1.0 : 1.0;
    const int e = (c >> 1) & 3, m = c & 1;
    return sign * (e == 0 ? 0.5 * m : (1.0 + 0.5 * m) * std::ldexp(1.0, e - 1));
  };
  std::vector<float> got(static_cast<size_t>(2 * G * 32), -7.0f);
  src.read_mxfp4_rows_into("w", {E, R, G, 16}, 3, 2, got.data());  // rows 3, 4 of 6
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t k = 0; k < G * 32; ++k) {
      const int64_t blk = (3 + r) * G + k / 32, byte = blk * 16 + (k % 32) / 2;
      const int code = k % 2 == 0 ? blocks[static_cast<size_t>(byte)] & 15 : blocks[static_cast<size_t>(byte)] >> 4;
      // in double, then rounded: 6 x 2^128 overflows to an infinity, 0 x 2^128 stays 0
      const auto want = static_cast<float>(e2m1(code) * std::ldexp(1.0, scales[static_cast<size_t>(blk)] - 127));
      const float g = got[static_cast<size_t>(r * G * 32 + k)];
      ASSERT_TRUE(g == want) << "row " << r << " col " << k << ": " << g << " vs " << want;
      ASSERT_EQ(std::signbit(g), std::signbit(want)) << "row " << r << " col " << k;
    }
  EXPECT_NE(error_of([&] { src.read_mxfp4_rows_into("w", {E, R, G, 16}, 5, 2, got.data()); })
                .find("expected inside the tensor's 6"), std::string::npos);
  EXPECT_NE(error_of([&] { src.read_mxfp4_rows_into("w", {E, R, G + 1, 16}, 0, 1, got.data()); }).find("w_blocks"),
            std::string::npos);
  EXPECT_NE(error_of([&] { src.read_mxfp4_rows_into("v", {E, R, G, 16}, 0, 1, got.data()); }).find("v_blocks"),
            std::string::npos);
  EXPECT_NE(error_of([&] { src.read_mxfp4_rows_into("w", {E, R, G, 8}, 0, 1, got.data()); }).find("[..., R, G, 16]"),
            std::string::npos);
}

TEST_F(SafetensorsReaders, MissingTensorNamesTensorAndFile) {
  const std::string a = error_of([&] { (void)src_->tensor("layers.1.w"); });
  EXPECT_NE(a.find("layers.1.w"), std::string::npos) << a;
  EXPECT_NE(a.find(path_), std::string::npos) << a;
  EXPECT_NE(error_of([&] { (void)src_->read_f32("nope", {1}); }).find("nope"), std::string::npos);
  const auto file = SafetensorsFile::open(path_);
  const std::string b = error_of([&] { (void)file.tensor("nope"); });
  EXPECT_NE(b.find("nope"), std::string::npos) << b;
  EXPECT_NE(b.find(path_), std::string::npos) << b;
  EXPECT_FALSE(src_->contains("nope"));
  EXPECT_TRUE(src_->contains("ids"));
}

// ---- sharded checkpoints ----

TEST(SafetensorsIndex, TwoShards) {
  ScratchDir dir;
  fs::create_directory(dir.path() / "ckpt");
  const std::vector<float> a = {1, 2, 3, 4}, c = {9};
  const std::vector<int32_t> b = {5, 6};
  moekit::io::write_safetensors(
      dir / "ckpt/model-00001-of-00002.safetensors",
      {{"a", DType::F32, {2, 2}, a.data()}, {"b", DType::I32, {2}, b.data()}});
  moekit::io::write_safetensors(dir / "ckpt/model-00002-of-00002.safetensors",
                                {{"c", DType::F32, {1}, c.data()}});
  write_bytes(dir / "ckpt/model.safetensors.index.json", R"({
    "metadata": {"total_size": 28},
    "weight_map": {"a": "model-00001-of-00002.safetensors",
                   "b": "./model-00001-of-00002.safetensors",
                   "c": "model-00002-of-00002.safetensors"}})");

  TensorSource src = TensorSource::open(dir / "ckpt/model.safetensors.index.json");
  EXPECT_EQ(src.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(src.read_f32("a", {2, 2}), a);
  EXPECT_EQ(src.read_i32("b", {2}), b);
  EXPECT_EQ(src.read_f32("c", {1}), c);
  EXPECT_EQ(src.tensor("c").name, "c");
  EXPECT_TRUE(src.contains("b"));
  EXPECT_FALSE(src.contains("d"));
  // "a" and "b" come from one mapping of shard 1 ("./" normalised away), laid out back to back.
  EXPECT_EQ(src.tensor("b").data, src.tensor("a").data + 16);
  // Errors name the shard file holding the tensor.
  const std::string msg = error_of([&] { (void)src.read_f32("c", {2}); });
  EXPECT_NE(msg.find("model-00002-of-00002.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'c'"), std::string::npos) << msg;
  const std::string missing = error_of([&] { (void)src.tensor("d"); });
  EXPECT_NE(missing.find("model.safetensors.index.json"), std::string::npos) << missing;

  // TensorSource is movable.
  TensorSource moved = std::move(src);
  EXPECT_EQ(moved.read_f32("c", {1}), c);
}

TEST(SafetensorsIndex, BadIndexesAreRejected) {
  ScratchDir dir;
  const std::vector<float> a = {1};
  moekit::io::write_safetensors(dir / "s.safetensors", {{"a", DType::F32, {1}, a.data()}});
  const std::map<std::string, std::pair<std::string, std::string>> cases = {
      {"not_json", {"{", "invalid JSON"}},
      {"array", {"[]", "expected a JSON object"}},
      {"no_weight_map", {R"({"metadata": {}})", "weight_map"}},
      {"weight_map_array", {R"({"weight_map": []})", "weight_map"}},
      {"value_not_string", {R"({"weight_map": {"a": 3}})", "'a'"}},
      {"absolute", {R"({"weight_map": {"a": "/etc/passwd"}})", "relative"}},
      {"dotdot", {R"({"weight_map": {"a": "../s.safetensors"}})", "relative"}},
      {"missing_shard", {R"({"weight_map": {"a": "gone.safetensors"}})", "gone.safetensors"}},
      {"tensor_not_in_shard", {R"({"weight_map": {"zz": "s.safetensors"}})", "'zz'"}},
      {"duplicate",
       {R"({"weight_map": {"a": "s.safetensors", "a": "s.safetensors"}})", "duplicate"}},
  };
  for (const auto& [label, c] : cases) {
    SCOPED_TRACE(label);
    const std::string path = dir / (label + ".index.json");
    write_bytes(path, c.first);
    const std::string msg = error_of([&] { (void)TensorSource::open(path); });
    EXPECT_NE(msg.find(c.second), std::string::npos) << msg;
  }
  EXPECT_NE(error_of([&] {
              (void)TensorSource::open(dir / "absent.index.json");
            }).find("absent.index.json"),
            std::string::npos);
}

// ---- malformed headers ----

struct BadHeader {
  std::string label;
  std::string header;
  std::size_t data_len;
  std::string expect;  // a substring of the message: which check fired
};
// Test names and failure messages show the label, not the struct's bytes.
void PrintTo(const BadHeader& b, std::ostream* os) { *os << b.label; }

std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":)" + dtype + R"(,"shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

std::vector<BadHeader> bad_headers() {
  const std::string ok = entry(R"("F32")", "[1]", "[0,4]");
  return {
      {"empty_header", "", 0, "invalid JSON"},
      {"not_json", "{", 0, "invalid JSON"},
      {"trailing_garbage", "{} x", 0, "invalid JSON"},
      {"nul_byte", std::string("{}\0", 3), 0, "invalid JSON"},
      {"invalid_utf8", "{\"\xff\":" + ok + "}", 4, "invalid JSON"},
      {"array", "[]", 0, "expected a JSON object"},
      {"string", R"("hello")", 0, "expected a JSON object"},
      {"null", "null", 0, "expected a JSON object"},
      {"number", "8", 0, "expected a JSON object"},
      {"deep_nesting", std::string(100000, '[') + std::string(100000, ']'), 0, "nested"},
      {"entry_not_object", R"({"a":3})", 0, "expected an object"},
      {"unknown_dtype", R"({"a":)" + entry(R"("F128")", "[1]", "[0,4]") + "}", 4, "unknown dtype"},
      {"lowercase_dtype", R"({"a":)" + entry(R"("f32")", "[1]", "[0,4]") + "}", 4, "unknown dtype"},
      {"dtype_not_string", R"({"a":)" + entry("4", "[1]", "[0,4]") + "}", 4, "dtype"},
      {"missing_dtype", R"({"a":{"shape":[1],"data_offsets":[0,4]}})", 4, "dtype"},
      {"negative_shape", R"({"a":)" + entry(R"("F32")", "[-1]", "[0,4]") + "}", 4, "shape[0]"},
      {"fractional_shape", R"({"a":)" + entry(R"("F32")", "[1.5]", "[0,4]") + "}", 4, "shape[0]"},
      {"float_shape", R"({"a":)" + entry(R"("F32")", "[1, 1.0]", "[0,4]") + "}", 4, "shape[1]"},
      {"string_shape", R"({"a":)" + entry(R"("F32")", R"(["1"])", "[0,4]") + "}", 4, "shape[0]"},
      {"shape_not_array", R"({"a":)" + entry(R"("F32")", "1", "[0,4]") + "}", 4, "shape"},
      {"missing_shape", R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", 4, "shape"},
      {"shape_over_int64", R"({"a":)" + entry(R"("U8")", "[9223372036854775808]", "[0,0]") + "}", 0,
       "shape[0]"},
      {"shape_over_uint64", R"({"a":)" + entry(R"("U8")", "[18446744073709551616]", "[0,0]") + "}",
       0, "shape[0]"},
      {"numel_overflow", R"({"a":)" + entry(R"("U8")", "[4294967296,4294967296]", "[0,0]") + "}", 0,
       "int64"},
      {"numel_overflow_with_zero_later",
       R"({"a":)" + entry(R"("U8")", "[4294967296,4294967296,0]", "[0,0]") + "}", 0, "int64"},
      {"nbytes_overflow", R"({"a":)" + entry(R"("F64")", "[2305843009213693952]", "[0,0]") + "}", 0,
       "size_t"},
      {"missing_offsets", R"({"a":{"dtype":"F32","shape":[1]}})", 4, "data_offsets"},
      {"offsets_one", R"({"a":)" + entry(R"("F32")", "[1]", "[4]") + "}", 4, "data_offsets"},
      {"offsets_three", R"({"a":)" + entry(R"("F32")", "[1]", "[0,4,4]") + "}", 4, "data_offsets"},
      {"offsets_negative", R"({"a":)" + entry(R"("F32")", "[1]", "[-4,0]") + "}", 4,
       "data_offsets"},
      {"offsets_float", R"({"a":)" + entry(R"("F32")", "[1]", "[0,4.0]") + "}", 4, "data_offsets"},
      {"offsets_object", R"({"a":)" + entry(R"("F32")", "[1]", R"({"0":4})") + "}", 4,
       "data_offsets"},
      {"begin_after_end", R"({"a":)" + entry(R"("F32")", "[0]", "[4,0]") + "}", 4, "begin > end"},
      {"end_beyond_buffer", R"({"a":)" + entry(R"("F32")", "[2]", "[0,8]") + "}", 4, "beyond"},
      {"end_huge", R"({"a":)" + entry(R"("F32")", "[1]", "[0,18446744073709551615]") + "}", 4,
       "beyond"},
      {"nbytes_mismatch", R"({"a":)" + entry(R"("F32")", "[2]", "[0,4]") + "}", 4, "expected 8"},
      {"overlap",
       R"({"a":)" + entry(R"("F32")", "[2]", "[0,8]") + R"(,"b":)" +
           entry(R"("F32")", "[2]", "[4,12]") + "}",
       12, "overlap"},
      {"overlap_identical",
       R"({"a":)" + entry(R"("F32")", "[1]", "[0,4]") + R"(,"b":)" +
           entry(R"("F32")", "[1]", "[0,4]") + "}",
       4, "overlap"},
      {"empty_inside_other",
       R"({"a":)" + entry(R"("F32")", "[2]", "[0,8]") + R"(,"b":)" +
           entry(R"("F32")", "[0]", "[4,4]") + "}",
       8, "overlap"},
      {"hole",
       R"({"a":)" + entry(R"("F32")", "[1]", "[0,4]") + R"(,"b":)" +
           entry(R"("F32")", "[1]", "[8,12]") + "}",
       12, "hole"},
      {"trailing_data", R"({"a":)" + ok + "}", 8, "cover"},
      {"data_without_tensors", "{}", 4, "cover"},
      {"duplicate_name", R"({"a":)" + ok + R"(,"a":)" + ok + "}", 4, "duplicate"},
      {"duplicate_field", R"({"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       4, "duplicate"},
      {"metadata_not_object", R"({"__metadata__":3})", 0, "__metadata__"},
      {"metadata_value_not_string", R"({"__metadata__":{"k":1}})", 0, "__metadata__"},
  };
}

class SafetensorsMalformed : public testing::TestWithParam<BadHeader> {};

TEST_P(SafetensorsMalformed, IsRejectedWithAClearError) {
  ScratchDir dir;
  const BadHeader& c = GetParam();
  const std::string path = dir / "bad.safetensors";
  write_bytes(path, raw_file(c.header, c.data_len));
  const std::string msg = error_of([&] { (void)SafetensorsFile::open(path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find(c.expect), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_THROW((void)TensorSource::open(path), moekit::error);
}

INSTANTIATE_TEST_SUITE_P(SafetensorsHeaders, SafetensorsMalformed, testing::ValuesIn(bad_headers()),
                         [](const testing::TestParamInfo<BadHeader>& info) {
                           return info.param.label;
                         });

// A header with 100k tensors (a DeepSeek-V3 index lists ~90k) parses correctly; its speed is
// measured in bench/bench_io.cpp (the parser is linear-time: see io/files.hpp).
TEST(SafetensorsManyTensors, HundredThousandTensorHeader) {
  const int64_t n = 100000;
  const auto f = SafetensorsFile::from_bytes("many", moekit_test::many_tensor_safetensors(n));
  ASSERT_EQ(f.names().size(), static_cast<size_t>(n));
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{4242}, n - 1}) {
    const auto& t = f.tensor("layers." + std::to_string(i) + ".w");
    float v;
    std::memcpy(&v, t.data, 4);
    EXPECT_EQ(v, static_cast<float>(i));
  }
}

TEST(SafetensorsMalformedFile, TooShortForTheLengthPrefix) {
  ScratchDir dir;
  for (std::size_t len : {0, 1, 7}) {
    const std::string path = dir / "short.safetensors";
    write_bytes(path, std::string(len, '\0'));
    const std::string msg = error_of([&] { (void)SafetensorsFile::open(path); });
    EXPECT_NE(msg.find("at least 8"), std::string::npos) << msg;
  }
}

TEST(SafetensorsMalformedFile, HeaderLengthBeyondFileOrLimit) {
  ScratchDir dir;
  const std::string path = dir / "len.safetensors";
  for (std::uint64_t n :
       {std::uint64_t{3}, std::uint64_t{1000}, std::numeric_limits<std::uint64_t>::max(),
        std::numeric_limits<std::uint64_t>::max() - 7}) {
    write_bytes(path, le64(n) + "{}");
    const std::string msg = error_of([&] { (void)SafetensorsFile::open(path); });
    EXPECT_NE(msg.find("header length"), std::string::npos) << msg;
  }
  // A sparse file larger than the limit, with N just above it: rejected by the limit, before any
  // attempt to parse 100 MB of zeros.
  write_bytes(path, le64(100'000'001));
  ASSERT_EQ(::truncate(path.c_str(), 100'000'100), 0);
  const std::string msg = error_of([&] { (void)SafetensorsFile::open(path); });
  EXPECT_NE(msg.find("at most 100000000"), std::string::npos) << msg;
}

TEST(SafetensorsMalformedFile, EveryTruncationIsRejected) {
  ScratchDir dir;
  const std::string good = dir / "good.safetensors";
  const std::vector<float> a = {1, 2, 3};
  const std::vector<uint16_t> b = {1, 2};
  moekit::io::write_safetensors(
      good, {{"a", DType::F32, {3}, a.data()}, {"b", DType::BF16, {2}, b.data()}});
  const std::string bytes = read_bytes(good);
  const std::string cut = dir / "cut.safetensors";
  for (std::size_t len = 0; len < bytes.size(); ++len) {
    SCOPED_TRACE(len);
    write_bytes(cut, bytes.substr(0, len));
    EXPECT_THROW((void)SafetensorsFile::open(cut), moekit::error);
  }
  write_bytes(cut, bytes);
  EXPECT_NO_THROW((void)SafetensorsFile::open(cut));
}

TEST(SafetensorsMalformedFile, NotARegularFileOrMissing) {
  ScratchDir dir;
  const std::string missing = error_of([&] { (void)SafetensorsFile::open(dir / "nope"); });
  EXPECT_NE(missing.find("nope"), std::string::npos) << missing;
  const std::string is_dir = error_of([&] { (void)SafetensorsFile::open(dir.path().string()); });
  EXPECT_NE(is_dir.find("is a directory, expected a regular file"), std::string::npos) << is_dir;
  const std::string fifo = dir / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::string is_fifo = error_of([&] { (void)SafetensorsFile::open(fifo); });  // no hang
  EXPECT_NE(is_fifo.find("is a FIFO, expected a regular file"), std::string::npos) << is_fifo;
}

// ---- writing: invalid input and failures leave nothing behind ----

TEST(SafetensorsWrite, InvalidTensorsWriteNothing) {
  ScratchDir dir;
  const std::string path = dir / "w.safetensors";
  const std::vector<float> v = {1, 2};
  moekit::io::write_safetensors(path, {{"keep", DType::F32, {2}, v.data()}});
  const std::string before = read_bytes(path);
  const std::vector<std::vector<OutTensor>> bad = {
      {{"x", DType::F32, {2}, v.data()}, {"x", DType::F32, {2}, v.data()}},
      {{"x", DType::F32, {-2}, v.data()}},
      {{"x", DType::F32, {2}, nullptr}},
      {{"", DType::F32, {2}, v.data()}},
      {{"__metadata__", DType::F32, {2}, v.data()}},
      {{"bad\xff", DType::F32, {2}, v.data()}},
      {{"x", static_cast<DType>(99), {2}, v.data()}},
      {{"x", DType::F32, {1LL << 62, 4}, v.data()}},
  };
  for (std::size_t i = 0; i < bad.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_THROW(moekit::io::write_safetensors(path, bad[i]), moekit::error);
    EXPECT_EQ(read_bytes(path), before);
    EXPECT_EQ(entries(dir.path()), 1u) << "a temporary file was left behind";
  }
}

TEST(SafetensorsWrite, UnwritablePathLeavesNothingBehind) {
  ScratchDir dir;
  const std::vector<float> v = {1, 2};
  const std::vector<OutTensor> t = {{"x", DType::F32, {2}, v.data()}};

  const std::string in_missing_dir = dir / "no/such/dir/w.safetensors";
  const std::string msg = error_of([&] { moekit::io::write_safetensors(in_missing_dir, t); });
  EXPECT_NE(msg.find(in_missing_dir), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir / "no"));

  // The temporary file can be written but the final rename fails (target is a directory).
  const std::string onto_dir = dir / "a_directory";
  fs::create_directory(onto_dir);
  EXPECT_THROW(moekit::io::write_safetensors(onto_dir, t), moekit::error);
  EXPECT_TRUE(fs::is_directory(onto_dir));
  EXPECT_EQ(entries(dir.path()), 1u) << "a temporary file was left behind";
}

TEST(SafetensorsWrite, ReadOnlyDirectoryLeavesNothingBehind) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions";
  ScratchDir dir;
  fs::permissions(dir.path(), fs::perms::owner_read | fs::perms::owner_exec);
  const std::vector<float> v = {1};
  EXPECT_THROW(
      moekit::io::write_safetensors(dir / "w.safetensors", {{"x", DType::F32, {1}, v.data()}}),
      moekit::error);
  fs::permissions(dir.path(), fs::perms::owner_all);
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(SafetensorsWrite, FailureMidWriteKeepsTheOldFile) {
  ScratchDir dir;
  const std::string path = dir / "w.safetensors";
  const std::vector<float> small = {1, 2};
  moekit::io::write_safetensors(path, {{"x", DType::F32, {2}, small.data()}});
  const std::string before = read_bytes(path);

  // Make write() fail with EFBIG after 4 KiB: the data below is 64 KiB.
  const std::vector<float> large(16384, 1.0f);
  rlimit old_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit limit = old_limit;
  limit.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
  std::string msg = error_of([&] {
    moekit::io::write_safetensors(path, {{"x", DType::F32, {16384}, large.data()}});
  });
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);

  EXPECT_NE(msg.find("write failed"), std::string::npos) << msg;
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(entries(dir.path()), 1u) << "a temporary file was left behind";
}

// The temporary name is never predictable: a symlink planted where the old writer put its
// ".tmp" file (or any other name) does not redirect the write.
TEST(SafetensorsWrite, PlantedSymlinkIsNotFollowed) {
  ScratchDir dir;
  const std::string path = dir / "w.safetensors", victim = dir / "victim.txt";
  std::ofstream(victim) << "precious";
  fs::create_symlink(victim, path + ".tmp");
  const std::vector<float> v = {1, 2};
  moekit::io::write_safetensors(path, {{"x", DType::F32, {2}, v.data()}});
  EXPECT_EQ(read_bytes(victim), "precious");
  EXPECT_EQ(moekit::io::SafetensorsFile::open(path).names(), std::vector<std::string>{"x"});
  EXPECT_EQ(entries(dir.path()), 3u);  // the file, the victim, the planted link
}

// Concurrent writers of one path each publish a complete file: every read sees exactly one
// writer's tensors, never a mix, and no temporary file is left.
TEST(SafetensorsWrite, ConcurrentWritersEachLeaveACompleteFile) {
  ScratchDir dir;
  const std::string path = dir / "w.safetensors";
  const std::vector<float> a(4096, 1.0f), b(8192, 2.0f);
  auto writer = [&](const std::vector<float>& v, const char* name) {
    for (int i = 0; i < 20; ++i)
      moekit::io::write_safetensors(path, {{name, DType::F32, {static_cast<int64_t>(v.size())}, v.data()}});
  };
  std::thread ta(writer, std::cref(a), "a"), tb(writer, std::cref(b), "b");
  for (int i = 0; i < 40; ++i) {
    if (!fs::exists(path)) continue;
    const auto f = moekit::io::SafetensorsFile::open(path);
    const auto names = f.names();
    ASSERT_EQ(names.size(), 1u);
    const auto& t = f.tensor(names[0]);
    ASSERT_EQ(t.shape[0], names[0] == "a" ? 4096 : 8192);
  }
  ta.join();
  tb.join();
  EXPECT_EQ(entries(dir.path()), 1u) << "a temporary file was left behind";
}

// ---- float16 / bfloat16 conversion ----

TEST(SafetensorsConvert, F16DecodeAllPatterns) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = moekit::io::f16_to_f32(static_cast<uint16_t>(h));
    if (!same_bits(got, ref_f16(static_cast<uint16_t>(h)))) {
      if (++bad <= 5) ADD_FAILURE() << std::hex << "f16 0x" << h << " -> " << got;
    }
  }
  EXPECT_EQ(bad, 0);
  // Spot checks that guard against a vacuous reference.
  EXPECT_EQ(moekit::io::f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(moekit::io::f16_to_f32(0x0001), 0x1p-24f);
  EXPECT_EQ(moekit::io::f16_to_f32(0x03FF), 1023 * 0x1p-24f);
  EXPECT_EQ(moekit::io::f16_to_f32(0x7BFF), 65504.0f);
  EXPECT_EQ(moekit::io::f16_to_f32(0xFC00), -INFINITY);
  EXPECT_TRUE(std::isnan(moekit::io::f16_to_f32(0x7E00)));
}

TEST(SafetensorsConvert, BF16DecodeAllPatterns) {
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float got = moekit::io::bf16_to_f32(static_cast<uint16_t>(b));
    if (!same_bits(got, ref_bf16(static_cast<uint16_t>(b)))) {
      if (++bad <= 5) ADD_FAILURE() << std::hex << "bf16 0x" << b << " -> " << got;
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(moekit::io::bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(moekit::io::bf16_to_f32(0xC000), -2.0f);
}

/// Every pattern round-trips; NaNs stay NaN with their sign.
template <class Enc, class Dec>
void check_round_trip(Enc enc, Dec dec, uint16_t exp_mask) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const uint16_t back = enc(dec(bits));
    const bool is_nan = (bits & exp_mask) == exp_mask && (bits & ~exp_mask & 0x7FFF) != 0;
    const bool ok = is_nan ? ((back & exp_mask) == exp_mask && (back & ~exp_mask & 0x7FFF) != 0 &&
                              (back & 0x8000) == (bits & 0x8000))
                           : back == bits;
    if (!ok && ++bad <= 5) ADD_FAILURE() << std::hex << "0x" << h << " -> 0x" << back;
  }
  EXPECT_EQ(bad, 0);
}

TEST(SafetensorsConvert, F16EncodeRoundTripsAllPatterns) {
  check_round_trip(moekit::io::f32_to_f16, moekit::io::f16_to_f32, 0x7C00);
}

TEST(SafetensorsConvert, BF16EncodeRoundTripsAllPatterns) {
  check_round_trip(moekit::io::f32_to_bf16, moekit::io::bf16_to_f32, 0x7F80);
}

/// Midpoints between neighbours (ties go to the even pattern), and one float either side of them.
template <class Enc, class Ref>
void check_midpoints(Enc enc, Ref ref, uint16_t inf_bits, double next_pow2) {
  int bad = 0;
  for (uint32_t h = 0; h < inf_bits; ++h) {
    const double lo = ref(static_cast<uint16_t>(h));
    const double hi = h + 1 == inf_bits ? next_pow2 : ref(static_cast<uint16_t>(h + 1));
    const auto mid = static_cast<float>((lo + hi) / 2);
    ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);  // exact in float
    const uint16_t even = (h % 2 == 0) ? h : h + 1;
    for (const uint16_t sign : {uint16_t{0}, uint16_t{0x8000}}) {
      const float s = sign ? -1.0f : 1.0f;
      const struct {
        float x;
        uint16_t want;
      } cases[] = {{s * mid, static_cast<uint16_t>(sign | even)},
                   {s * std::nextafter(mid, 0.0f), static_cast<uint16_t>(sign | h)},
                   {s * std::nextafter(mid, INFINITY), static_cast<uint16_t>(sign | (h + 1))}};
      for (const auto& c : cases) {
        const uint16_t got = enc(c.x);
        if (got != c.want && ++bad <= 5) {
          ADD_FAILURE() << std::hex << "x=" << c.x << " got 0x" << got << " want 0x" << c.want;
        }
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(SafetensorsConvert, F16EncodeTiesToEvenAtEveryMidpoint) {
  check_midpoints(moekit::io::f32_to_f16, ref_f16, 0x7C00, 65536.0);
  EXPECT_EQ(moekit::io::f32_to_f16(65520.0f), 0x7C00);  // tie above max finite -> inf
  EXPECT_EQ(moekit::io::f32_to_f16(65519.996f), 0x7BFF);
  EXPECT_EQ(moekit::io::f32_to_f16(0x1p-25f), 0x0000);  // tie between 0 and the min subnormal
  EXPECT_EQ(moekit::io::f32_to_f16(0x1.8p-24f), 0x0002);
  EXPECT_EQ(moekit::io::f32_to_f16(-0x1p-30f), 0x8000);
  EXPECT_EQ(moekit::io::f32_to_f16(1e10f), 0x7C00);
  EXPECT_EQ(moekit::io::f32_to_f16(-INFINITY), 0xFC00);
  EXPECT_EQ(moekit::io::f32_to_f16(std::numeric_limits<float>::max()), 0x7C00);
  EXPECT_EQ(moekit::io::f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
}

TEST(SafetensorsConvert, BF16EncodeTiesToEven) {
  check_midpoints(moekit::io::f32_to_bf16, ref_bf16, 0x7F80, std::ldexp(1.0, 128));
  using moekit::io::f32_to_bf16;
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F808000)), 0x3F80);  // tie, down to even
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F818000)), 0x3F82);  // tie, up to even
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F808001)), 0x3F81);  // above the tie
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F807FFF)), 0x3F80);  // below the tie
  EXPECT_EQ(f32_to_bf16(from_bits(0x7F7FFFFF)), 0x7F80);  // max float rounds to inf
  EXPECT_EQ(f32_to_bf16(from_bits(0x80000000)), 0x8000);
  EXPECT_EQ(f32_to_bf16(INFINITY), 0x7F80);
  for (uint32_t nan : {0x7F800001u, 0xFF800001u, 0x7FC00000u, 0x7FFFFFFFu}) {
    const uint16_t b = f32_to_bf16(from_bits(nan));
    EXPECT_TRUE(std::isnan(moekit::io::bf16_to_f32(b))) << std::hex << nan;
    EXPECT_EQ(b & 0x8000, (nan >> 16) & 0x8000);
  }
  EXPECT_TRUE(std::isnan(moekit::io::f16_to_f32(moekit::io::f32_to_f16(from_bits(0x7F800001)))));
}

TEST(SafetensorsConvert, RandomFloatsMatchTheReference) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> any_bits;
  std::uniform_real_distribution<float> moderate(-70000.0f, 70000.0f);
  std::uniform_real_distribution<float> tiny(-1e-4f, 1e-4f);
  int bad = 0, nonzero = 0;
  for (int i = 0; i < 300000; ++i) {
    float x = i % 3 == 0 ? from_bits(any_bits(rng)) : i % 3 == 1 ? moderate(rng) : tiny(rng);
    if (std::isnan(x)) continue;
    const uint16_t h = moekit::io::f32_to_f16(x), h_ref = ref_to_f16(x);
    const uint16_t b = moekit::io::f32_to_bf16(x), b_ref = ref_to_bf16(x);
    nonzero += (h_ref & 0x7FFF) != 0;
    if ((h != h_ref || b != b_ref) && ++bad <= 5) {
      ADD_FAILURE() << std::hex << "x bits 0x" << std::bit_cast<uint32_t>(x) << " f16 0x" << h
                    << " ref 0x" << h_ref << " bf16 0x" << b << " ref 0x" << b_ref;
    }
#ifdef __FLT16_MANT_DIG__
    // GCC's own _Float16 conversion as a second, independent reference.
    const _Float16 g = static_cast<_Float16>(x);
    uint16_t g_bits;
    std::memcpy(&g_bits, &g, 2);
    if (h != g_bits && ++bad <= 5) ADD_FAILURE() << "_Float16 disagrees for " << x;
#endif
  }
  EXPECT_EQ(bad, 0);
  EXPECT_GT(nonzero, 100000);  // the sample is not all zeros/infs
}

}  // namespace
