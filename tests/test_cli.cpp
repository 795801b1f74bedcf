// SPDX-License-Identifier: Apache-2.0
// The `moekit` command line, driven as outside checks drive it: files written here, the
// binary run as a process, outputs and exit codes checked.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/io/trace.hpp"
#include "moekit/offload/locality.hpp"
#include "moekit/kernels/fp8.hpp"
#include "moekit/io/any_layer.hpp"
#include "moekit/io/gguf.hpp"
#include "moekit/io/model.hpp"
#include "support/gguf_writer.hpp"

#ifdef MOEKIT_CLI_PATH
namespace {

namespace fs = std::filesystem;
using moekit::io::DType;

struct Result {
  int code;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Runs `moekit args...` and captures its exit code, stdout and stderr.
Result run_cli(const fs::path& dir, const std::string& args) {
  const fs::path o = dir / "stdout.txt", e = dir / "stderr.txt";
  const std::string cmd = std::string(MOEKIT_CLI_PATH) + " " + args + " >" + o.string() + " 2>" + e.string();
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(o), slurp(e)};
}

class Cli : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(testing::TempDir()) / ("moekit_cli_" + std::string(testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A Mixtral-style layer: E=6, k=2, d=24, f=20, weights as `dtype`, under `prefix`.
  void write_mixtral(const std::string& prefix, DType dtype, const std::string& skip = "",
                     const std::string& misshape = "") {
    std::ofstream(dir_ / "config.json")
        << R"({"model_type": "mixtral", "hidden_size": 24, "intermediate_size": 20, "num_local_experts": 6, "num_experts_per_tok": 2, "vocab_size": 100})";
    std::mt19937 g(7);
    std::normal_distribution<float> n(0.0f, 0.2f);
    std::map<std::string, std::vector<int64_t>> shapes = {{"gate.weight", {6, 24}}};
    for (int e = 0; e < 6; ++e) {
      shapes["experts." + std::to_string(e) + ".w1.weight"] = {20, 24};
      shapes["experts." + std::to_string(e) + ".w3.weight"] = {20, 24};
      shapes["experts." + std::to_string(e) + ".w2.weight"] = {24, 20};
    }
    shapes["lm_head.weight"] = {3, 4};  // extra tensors are ignored
    store_.clear();
    std::vector<moekit::io::OutTensor> out;
    for (auto& [name, shape] : shapes) {
      if (name == skip) continue;
      if (name == misshape) shape[0] += 1;
      int64_t numel = 1;
      for (int64_t s : shape) numel *= s;
      auto& buf = store_[name];
      buf.resize(static_cast<size_t>(numel) * 4);
      if (dtype == DType::F32) {
        for (int64_t i = 0; i < numel; ++i) reinterpret_cast<float*>(buf.data())[i] = n(g);
      } else {
        for (int64_t i = 0; i < numel; ++i)
          reinterpret_cast<uint16_t*>(buf.data())[i] =
              dtype == DType::BF16 ? moekit::io::f32_to_bf16(n(g)) : moekit::io::f32_to_f16(n(g));
      }
      out.push_back({prefix + name, dtype, shape, buf.data()});
    }
    moekit::io::write_safetensors((dir_ / "w.safetensors").string(), out);
  }

  void write_input(int64_t T, int64_t d, float poison = 0.0f, const std::vector<uint8_t>& padding = {}) {
    std::mt19937 g(11);
    std::normal_distribution<float> n(0.0f, 1.0f);
    x_.resize(static_cast<size_t>(T * d));
    for (float& v : x_) v = n(g);
    if (poison != 0.0f && !x_.empty()) x_[x_.size() / 2] = poison;
    pad_ = padding;
    std::vector<moekit::io::OutTensor> t = {{"hidden_states", DType::F32, {T, d}, x_.data()}};
    if (!pad_.empty()) t.push_back({"padding_mask", DType::U8, {T}, pad_.data()});
    moekit::io::write_safetensors((dir_ / "x.safetensors").string(), t);
  }

  std::string run_args(const std::string& prefix) const {
    return "run --config " + (dir_ / "config.json").string() + " --weights " + (dir_ / "w.safetensors").string() +
           " --input " + (dir_ / "x.safetensors").string() + " --output " + (dir_ / "y.safetensors").string() +
           (prefix.empty() ? "" : " --prefix " + prefix);
  }

  void expect_error(const std::string& args, const std::string& mentions) {
    const Result r = run_cli(dir_, args);
    EXPECT_EQ(r.code, 2) << r.err;
    EXPECT_FALSE(fs::exists(dir_ / "y.safetensors"));
    EXPECT_NE(r.err.find(mentions), std::string::npos) << "stderr: " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line expected: " << r.err;
  }

  fs::path dir_;
  std::map<std::string, std::vector<char>> store_;
  std::vector<float> x_;
  std::vector<uint8_t> pad_;
};

// The CLI's output equals the library's forward on the same files, for BF16, F16 and F32.
TEST_F(Cli, RunRoundTripsEveryWeightDtypeWithPrefix) {
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    const std::string prefix = "model.layers.3.block_sparse_moe.";
    write_mixtral(prefix, dt);
    write_input(9, 24);
    fs::remove(dir_ / "y.safetensors");
    const Result r = run_cli(dir_, run_args(prefix) + " --threads 2");
    ASSERT_EQ(r.code, 0) << r.err;
    const auto y = moekit::io::TensorSource::open((dir_ / "y.safetensors").string());
    const auto out = y.read_f32("hidden_states", {9, 24});
    const auto ids = y.read_i32("topk_ids", {9, 2});
    const auto w = y.read_f32("topk_weights", {9, 2});
    EXPECT_EQ(y.tensor("topk_ids").dtype, DType::I32);

    const auto cfg = moekit::load_layer_config((dir_ / "config.json").string());
    const auto src = moekit::io::TensorSource::open((dir_ / "w.safetensors").string());
    const auto layer = moekit::load_layer(cfg, src, prefix);
    std::vector<float> ref(9 * 24);
    moekit::Workspace ws;
    layer.forward(moekit::Batch::single(9, 24), x_.data(), ref.data(), ws, 1);
    double mx = 0;
    for (float v : ref) mx = std::max(mx, static_cast<double>(std::fabs(v)));
    ASSERT_GT(mx, 0.0);
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(out[i], ref[i], 1e-6 * mx) << i;
    for (int64_t t = 0; t < 9; ++t) {
      EXPECT_EQ(ids[t * 2], ws.plan.slot_expert()[t * 2]);
      EXPECT_EQ(ids[t * 2 + 1], ws.plan.slot_expert()[t * 2 + 1]);
      EXPECT_NEAR(w[t * 2] + w[t * 2 + 1], 1.0f, 1e-6f);  // Mixtral renormalises
      EXPECT_GE(w[t * 2], w[t * 2 + 1]);
    }
  }
}

// The flag syntax: --name=value and short forms give the same output file as --name value;
// per-command --help goes to stdout with exit 0; misspelt flags get a suggestion; every missing
// required flag is named at once.
TEST_F(Cli, FlagSyntaxHelpAndSuggestions) {
  write_mixtral("", DType::F32);
  write_input(7, 24);
  const std::string c = (dir_ / "config.json").string(), w = (dir_ / "w.safetensors").string(),
                    x = (dir_ / "x.safetensors").string(), y = (dir_ / "y.safetensors").string();
  ASSERT_EQ(run_cli(dir_, run_args("") + " --threads 2").code, 0);
  const std::string want = slurp(dir_ / "y.safetensors");
  for (const std::string& args : {"run --config=" + c + " --weights=" + w + " --input=" + x + " --output=" + y + " --threads=2",
                                   "run -c " + c + " -w " + w + " -i " + x + " -o " + y + " -t 2",
                                   "run -t 1 --output " + y + " -i " + x + " --weights=" + w + " -c " + c}) {
    fs::remove(dir_ / "y.safetensors");
    const Result r = run_cli(dir_, args);
    ASSERT_EQ(r.code, 0) << args << ": " << r.err;
    EXPECT_EQ(slurp(dir_ / "y.safetensors"), want) << args;
  }
  fs::remove(dir_ / "y.safetensors");
  for (const char* cmd : {"run", "bench", "make-input", "info"}) {
    for (const char* h : {" --help", " -h"}) {
      const Result r = run_cli(dir_, std::string(cmd) + h);
      EXPECT_EQ(r.code, 0) << cmd << h << ": " << r.err;
      EXPECT_TRUE(r.err.empty()) << r.err;
      EXPECT_NE(r.out.find(std::string("moekit ") + cmd), std::string::npos) << r.out;
    }
  }
  const Result rh = run_cli(dir_, "run --help");
  for (const char* flag : {"--config", "--weights", "--model", "--gguf", "--layer", "--input", "--output", "--threads", "--dtype", "-t,", "-m,"})
    EXPECT_NE(rh.out.find(flag), std::string::npos) << flag << " missing from run --help:\n" << rh.out;
  EXPECT_NE(run_cli(dir_, "bench --help").out.find("--output-format"), std::string::npos);
  EXPECT_NE(run_cli(dir_, "--help").out.find("make-input"), std::string::npos);
  expect_error(run_args("") + " --thread 2", "unknown argument \"--thread\"; did you mean --threads?");
  expect_error(run_args("") + " --wieghts " + w, "did you mean --weights?");
  expect_error(run_args("") + " --frobnicate 2", "unknown argument \"--frobnicate\"");
  expect_error(run_args("") + " stray", "unexpected argument \"stray\"");
  expect_error("run --config " + c, "missing required flags --weights, --input, --output");
  expect_error("run --model " + dir_.string(), "missing required flags --input, --output");
  expect_error("make-input --seed 3", "missing required flags --config, --tokens, --output");
  expect_error(run_args("") + " -t 2 --threads 3", "flag --threads given twice");
  expect_error(run_args("") + " --threads", "flag --threads expects a value");
  expect_error("info --bogus", "unknown argument \"--bogus\"");
  expect_error("bench --config=" + c + " --tokens=1 --repeat=0", "--repeat: expected an integer in [1, 1000000]");
}

// make-input writes the input run needs: hidden_states [T, d] from the seed (the same file
// for the same flags, another one for another seed), offsets and positions per sequence, and
// token_scores for token_prune; run accepts it.
TEST_F(Cli, MakeInputWritesWhatRunReads) {
  write_mixtral("", DType::F32);
  const std::string c = (dir_ / "config.json").string();
  const fs::path x = dir_ / "made.safetensors";
  ASSERT_EQ(run_cli(dir_, "make-input --config " + c + " --tokens 10 --sequences 3 --seed 5 -o " + x.string()).code, 0);
  const std::string first = slurp(x);
  {
    const auto t = moekit::io::TensorSource::open(x.string());
    EXPECT_EQ(t.tensor("hidden_states").shape, (std::vector<int64_t>{10, 24}));
    EXPECT_EQ(t.read_i32("sequence_offsets", {4}), (std::vector<int32_t>{0, 3, 6, 10}));
    EXPECT_EQ(t.read_i32("positions", {10}), (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 0, 1, 2, 3}));
    const std::vector<float> h = t.read_f32("hidden_states", {10, 24});
    double sum = 0, sq = 0;
    for (float v : h) {
      ASSERT_TRUE(std::isfinite(v));
      sum += v;
      sq += double(v) * v;
    }
    EXPECT_LT(std::fabs(sum / 240), 0.25);  // standard normal: mean ~0, variance ~1
    EXPECT_NEAR(sq / 240, 1.0, 0.3);
    EXPECT_FALSE(t.contains("token_scores"));
  }
  ASSERT_EQ(run_cli(dir_, "make-input -c " + c + " --tokens=10 --sequences=3 -s 5 --output " + x.string()).code, 0);
  EXPECT_EQ(slurp(x), first) << "not deterministic";
  ASSERT_EQ(run_cli(dir_, "make-input -c " + c + " --tokens 10 --sequences 3 -s 6 -o " + x.string()).code, 0);
  EXPECT_NE(slurp(x), first) << "the seed changes nothing";
  const Result r = run_cli(dir_, "run --config " + c + " --weights " + (dir_ / "w.safetensors").string() + " --input " +
                                     x.string() + " --output " + (dir_ / "y.safetensors").string());
  ASSERT_EQ(r.code, 0) << r.err;
  fs::remove(dir_ / "y.safetensors");
  ASSERT_EQ(run_cli(dir_, "make-input -c " + c + " --tokens 0 -o " + x.string()).code, 0);
  EXPECT_EQ(moekit::io::TensorSource::open(x.string()).tensor("hidden_states").shape, (std::vector<int64_t>{0, 24}));
  // token_prune with FTP's feature router needs token_scores.
  std::ofstream(dir_ / "ftp.json") << R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "token_prune", "tau": null, "sparsity": 0.5, "input": "features"}, "experts": {"type": "swiglu", "intermediate_size": 8}})";
  const Result rf = run_cli(dir_, "make-input -c " + (dir_ / "ftp.json").string() + " --tokens 6 -o " + x.string());
  ASSERT_EQ(rf.code, 0) << rf.err;
  const std::vector<float> sc = moekit::io::TensorSource::open(x.string()).read_f32("token_scores", {6});
  for (float v : sc) EXPECT_TRUE(v >= 0.0f && v < 1.0f) << v;
  expect_error("make-input -c " + c + " --tokens 20000000 -o " + x.string(), "--tokens: expected an integer in [0, 16777216]");
  expect_error("make-input -c " + c + " --tokens 4 --sequences 5 -o " + x.string(), "--sequences: expected an integer in [1, 4]");
  expect_error("make-input -c " + c + " --tokens 4 -o " + c, "is the same file as --config");
  expect_error("make-input -c " + (dir_ / "nope.json").string() + " --tokens 4 -o " + x.string(), "nope.json");
}

// Progress: silent on a non-terminal stderr by default (success prints nothing); with
// MOEKIT_PROGRESS=1 one summary line per phase, counting the experts packed.
TEST_F(Cli, ProgressSummaryOnRequest) {
  write_mixtral("", DType::F32);
  write_input(5, 24);
  const Result quiet = run_cli(dir_, run_args(""));
  ASSERT_EQ(quiet.code, 0) << quiet.err;
  EXPECT_TRUE(quiet.err.empty()) << quiet.err;
  fs::remove(dir_ / "y.safetensors");
  ::setenv("MOEKIT_PROGRESS", "1", 1);
  const Result r = run_cli(dir_, run_args(""));
  const Result b = run_cli(dir_, "bench --config " + (dir_ / "config.json").string() + " --tokens 1,4 --repeat 2 --layers 2");
  ::unsetenv("MOEKIT_PROGRESS");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("moekit run: loading the layer: 6 experts packed ("), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("moekit run: running: "), std::string::npos) << r.err;
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_NE(b.err.find("moekit bench: building layer 1 (f32): 6 experts packed"), std::string::npos) << b.err;
  EXPECT_NE(b.err.find("moekit bench: building layers 2-2: 6 experts packed"), std::string::npos) << b.err;
  EXPECT_NE(b.err.find("moekit bench: timing configuration 2 of 2 (T = 4, "), std::string::npos) << b.err;
  EXPECT_EQ(std::count(b.out.begin(), b.out.end(), '\n'), 2) << b.out;  // stdout: the records only
}

// pack once, run --packed: the same output file contents as run on the checkpoint with the
// same --dtype; flags that the packed file decides are refused.
TEST_F(Cli, PackThenRunPackedEqualsRun) {
  write_mixtral("model.layers.1.block_sparse_moe.", DType::BF16);
  write_input(9, 24);
  const std::string c = (dir_ / "config.json").string(), w = (dir_ / "w.safetensors").string(),
                    x = (dir_ / "x.safetensors").string(), y = (dir_ / "y.safetensors").string(),
                    p = (dir_ / "packed.safetensors").string();
  for (const char* dtype : {"f32", "int4", "bf16xbf16"}) {
    fs::remove(y);
    const Result r1 = run_cli(dir_, run_args("model.layers.1.block_sparse_moe.") + " --dtype " + dtype);
    ASSERT_EQ(r1.code, 0) << r1.err;
    const auto want = moekit::io::TensorSource::open(y);
    const std::vector<float> hw = want.read_f32("hidden_states", {9, 24});
    const std::vector<int32_t> iw = want.read_i32("topk_ids", {9, 2});
    fs::remove(y);
    const Result rp = run_cli(dir_, "pack -c " + c + " -w " + w + " --prefix model.layers.1.block_sparse_moe. --dtype " +
                                        dtype + " -o " + p);
    ASSERT_EQ(rp.code, 0) << rp.err;
    EXPECT_TRUE(rp.err.empty()) << rp.err;
    const Result rr = run_cli(dir_, "run --packed " + p + " -i " + x + " -o " + y + " -t 2");
    ASSERT_EQ(rr.code, 0) << rr.err;
    const auto got = moekit::io::TensorSource::open(y);
    EXPECT_EQ(got.read_f32("hidden_states", {9, 24}), hw) << dtype;
    EXPECT_EQ(got.read_i32("topk_ids", {9, 2}), iw) << dtype;
  }
  fs::remove(y);
  expect_error("run --packed " + p + " -i " + x + " -o " + y + " --dtype f32", "--packed and --dtype exclude each other");
  expect_error("run --packed " + p + " -c " + c + " -i " + x + " -o " + y, "--packed and --config exclude each other");
  expect_error("run --packed " + x + " -i " + x + " -o " + y, "not a file `moekit pack` wrote");
  expect_error("run --packed " + p + " -i " + x + " -o " + p, "is the same file as --packed");
  expect_error("pack -c " + c + " -w " + w + " -o " + w, "is the same file as --weights");
  expect_error("pack -c " + c, "missing required flags --weights, --output");
  std::ofstream(dir_ / "sk.json") << R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "sinkhorn", "num_experts": 6, "k": 2}, "experts": {"type": "swiglu", "intermediate_size": 20}})";
  expect_error("pack -c " + (dir_ / "sk.json").string() + " -w " + w + " -o " + p, "moekit pack writes top-k layers");
}

// pack --calibrate: EAQuant's smoothing from a calibration input file. The packed w8a8 layer
// routes as the f32 run does, stays close to it, and holds the smoothing (format 2); a weight
// type without int8 activations, a calibration file that is not an input for this layer, and
// an output over the calibration file are refused.
TEST_F(Cli, PackCalibrateSmoothsTheInt8Activations) {
  write_mixtral("model.layers.1.block_sparse_moe.", DType::F32);
  write_input(40, 24);
  const std::string c = (dir_ / "config.json").string(), w = (dir_ / "w.safetensors").string(),
                    x = (dir_ / "x.safetensors").string(), y = (dir_ / "y.safetensors").string(),
                    p = (dir_ / "packed.safetensors").string();
  const std::string pre = " --prefix model.layers.1.block_sparse_moe.";
  const Result r0 = run_cli(dir_, run_args("model.layers.1.block_sparse_moe.") + " --dtype f32");
  ASSERT_EQ(r0.code, 0) << r0.err;
  const auto want = moekit::io::TensorSource::open(y);
  const std::vector<float> hw = want.read_f32("hidden_states", {40, 24});
  const std::vector<int32_t> iw = want.read_i32("topk_ids", {40, 2});
  fs::remove(y);
  for (const char* dtype : {"w8a8", "w4a8"}) {
    const Result rp = run_cli(dir_, "pack -c " + c + " -w " + w + pre + " --dtype " + dtype + " --calibrate " + x + " -o " + p);
    ASSERT_EQ(rp.code, 0) << rp.err;
    EXPECT_EQ(moekit::io::SafetensorsFile::open(p).metadata().at("moekit.packed"), "2");
    const Result rr = run_cli(dir_, "run --packed " + p + " -i " + x + " -o " + y + " -t 2");
    ASSERT_EQ(rr.code, 0) << rr.err;
    const auto got = moekit::io::TensorSource::open(y);
    EXPECT_EQ(got.read_i32("topk_ids", {40, 2}), iw) << dtype;
    const std::vector<float> h = got.read_f32("hidden_states", {40, 24});
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < h.size(); ++i) {
      num += (h[i] - hw[i]) * (h[i] - hw[i]);
      den += hw[i] * hw[i];
    }
    EXPECT_GT(num, 0.0) << dtype;  // quantised: not the f32 output
    EXPECT_LT(std::sqrt(num / den), 0.2) << dtype;
    fs::remove(y);
  }
  expect_error("pack -c " + c + " -w " + w + pre + " --dtype int4 --calibrate " + x + " -o " + p,
               "--calibrate: EAQuant smooths the int8 activations of w8a8 and w4a8");
  expect_error("pack -c " + c + " -w " + w + pre + " --calibrate " + x + " -o " + p, "quantises no activations");
  expect_error("pack -c " + c + " -w " + w + pre + " --dtype w8a8 --calibrate " + x + " -o " + x,
               "is the same file as --calibrate");
  expect_error("pack -c " + c + " -w " + w + pre + " --dtype w8a8 --calibrate " + w + " -o " + p, "hidden_states");
  write_input(0, 24);
  expect_error("pack -c " + c + " -w " + w + pre + " --dtype w8a8 --calibrate " + x + " -o " + p,
               "at least one unpadded calibration token");
  write_input(4, 24, std::numeric_limits<float>::quiet_NaN());
  expect_error("pack -c " + c + " -w " + w + pre + " --dtype w8a8 --calibrate " + x + " -o " + p, "is not finite");
  write_input(4, 16);
  expect_error("pack -c " + c + " -w " + w + pre + " --dtype w8a8 --calibrate " + x + " -o " + p, "hidden_states");
}

// `run --ep N`: the layer split over N MPI ranks (relaunched under mpiexec) writes the file one
// process writes: hidden_states, topk_ids and topk_weights equal bit for bit with f32 rows on
// the wire, for every placement, LLEP and micro-batches; bf16 rows stay close. Bad --ep input
// exits 2 with one line (from one rank only).
TEST_F(Cli, ExpertParallelRunEqualsOneProcess) {
#ifndef MOEKIT_TEST_HAVE_EP
  GTEST_SKIP() << "built without MPI (moekit::ep)";
#else
  // Under ASan (scripts/sanitize.sh) the ranks run without leak detection: Open MPI never frees
  // what MPI_Init allocates (in components it dlopens, which no suppression can name).
  struct Restore {
    std::string old;
    bool had;
    ~Restore() { had ? setenv("ASAN_OPTIONS", old.c_str(), 1) : unsetenv("ASAN_OPTIONS"); }
  } restore{std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "", std::getenv("ASAN_OPTIONS") != nullptr};
  setenv("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1:strict_string_checks=1", 1);
  write_mixtral("", DType::F32);
  std::vector<uint8_t> pad(23, 0);
  pad[4] = pad[17] = 1;
  write_input(23, 24, 0.0f, pad);
  const std::string y = (dir_ / "y.safetensors").string(), s = (dir_ / "stats.json").string();
  const Result r0 = run_cli(dir_, run_args(""));
  ASSERT_EQ(r0.code, 0) << r0.err;
  const auto want = moekit::io::TensorSource::open(y);
  const auto hw = want.read_f32("hidden_states", {23, 24});
  const auto iw = want.read_i32("topk_ids", {23, 2});
  const auto ww = want.read_f32("topk_weights", {23, 2});
  for (const std::string& extra : std::vector<std::string>{"--ep 2", "--ep 3 --ep-placement round-robin --ep-balance llep --ep-micro-batches 2 -t 1",
                                  "--ep 4 --ep-stats " + s, "--ep 1"}) {
    fs::remove(y);
    const Result r = run_cli(dir_, run_args("") + " " + extra);
    ASSERT_EQ(r.code, 0) << extra << ": " << r.err;
    EXPECT_TRUE(r.err.empty()) << extra << ": " << r.err;
    const auto got = moekit::io::TensorSource::open(y);
    EXPECT_EQ(got.read_f32("hidden_states", {23, 24}), hw) << extra;
    EXPECT_EQ(got.read_i32("topk_ids", {23, 2}), iw) << extra;
    EXPECT_EQ(got.read_f32("topk_weights", {23, 2}), ww) << extra;
  }
  const auto st = nlohmann::json::parse(slurp(s));
  EXPECT_EQ(st["ranks"], 4);
  EXPECT_EQ(st["tokens"], 23);
  int64_t kept = 0, computed = 0, tokens = 0;
  for (const auto& v : st["expert_load"]) kept += v.get<int64_t>();
  for (const auto& v : st["rank_load"]) computed += v.get<int64_t>();
  for (const auto& r : st["per_rank"]) tokens += r["tokens"].get<int64_t>();
  EXPECT_EQ(kept, 21 * 2);  // 21 unpadded tokens, k = 2
  EXPECT_EQ(computed, kept);
  EXPECT_EQ(tokens, 23);
  fs::remove(y);
  const Result rb = run_cli(dir_, run_args("") + " --ep 2 --ep-wire bf16");
  ASSERT_EQ(rb.code, 0) << rb.err;
  const auto hb = moekit::io::TensorSource::open(y).read_f32("hidden_states", {23, 24});
  double err = 0, ref = 0;
  for (size_t i = 0; i < hb.size(); ++i) {
    err = std::max(err, std::abs(double(hb[i]) - hw[i]));
    ref = std::max(ref, std::abs(double(hw[i])));
  }
  EXPECT_GT(err, 0.0);  // the rows were rounded
  EXPECT_LE(err, 0.02 * ref);
  fs::remove(y);
  expect_error(run_args("") + " --ep 2 --ep-balance most", "--ep-balance: expected none or llep");
  expect_error(run_args("") + " --ep 7", "would hold no expert");
  expect_error(run_args("") + " --ep-wire bf16", "--ep-wire needs --ep N");
  expect_error(run_args("") + " --ep 0", "--ep");
  expect_error(run_args("") + " --ep 2 --ep-stats " + (dir_ / "x.safetensors").string(), "--ep-stats");
  write_input(23, 24, std::nanf(""));
  expect_error(run_args("") + " --ep 2", "not finite");
  std::ofstream(dir_ / "config.json") << R"({"moekit_config_version": 1, "hidden_size": 24, "router": {"type": "sinkhorn", "num_experts": 6, "k": 2}, "experts": {"type": "swiglu", "intermediate_size": 20}})";
  write_input(23, 24);
  expect_error(run_args("") + " --ep 2", "not supported over ranks");
#endif
}

// `run --trace` records each token's experts (the layer number from the prefix) and
// `trace-stats` reports the loads, SRP, SCH and cache hit rates the library computes on it.
TEST_F(Cli, TraceThenTraceStats) {
  const std::string prefix = "model.layers.3.block_sparse_moe.";
  write_mixtral(prefix, DType::F32);
  write_input(30, 24);
  const std::string y = (dir_ / "y.safetensors").string(), t = (dir_ / "t.safetensors").string();
  const Result r = run_cli(dir_, run_args(prefix) + " --trace " + t);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  const auto ids = moekit::io::TensorSource::open(y).read_i32("topk_ids", {30, 2});
  moekit::io::RoutingTrace tr = moekit::io::read_trace(t);
  ASSERT_EQ(tr.layers.count(3), 1u);
  EXPECT_EQ(tr.layers.at(3).ids, ids);
  EXPECT_EQ(tr.layers.at(3).num_experts, 6);
  // Running again replaces that layer; another layer number adds one.
  fs::remove(y);
  ASSERT_EQ(run_cli(dir_, run_args(prefix) + " --trace " + t).code, 0);
  fs::remove(y);
  ASSERT_EQ(run_cli(dir_, "run -c " + (dir_ / "config.json").string() + " -w " + (dir_ / "w.safetensors").string() +
                              " --prefix " + prefix + " -i " + (dir_ / "x.safetensors").string() + " -o " + y +
                              " --layer 5 --trace " + t)
                .code,
            2);  // --layer needs --model or --gguf: nothing written
  tr = moekit::io::read_trace(t);
  EXPECT_EQ(tr.layers.size(), 1u);
  EXPECT_EQ(tr.layers.at(3).tokens(), 30);

  const Result s = run_cli(dir_, "trace-stats " + t + " --segments 4,16 --cache 2-6");
  ASSERT_EQ(s.code, 0) << s.err;
  const auto j = nlohmann::json::parse(s.out);
  ASSERT_EQ(j["layers"].size(), 1u);
  const auto& L = j["layers"][0];
  EXPECT_EQ(L["layer"], 3);
  EXPECT_EQ(L["tokens"], 30);
  int64_t total = 0;
  for (const auto& v : L["expert_load"]) total += v.get<int64_t>();
  EXPECT_EQ(total, 60);
  const moekit::offload::LayerTrace& lt = tr.layers.at(3);
  for (const int64_t m : {4, 16}) {
    EXPECT_EQ(L["srp"][std::to_string(m)].get<double>(), moekit::offload::srp(lt, m));
    const auto sc = moekit::offload::sch(lt, m);
    for (int64_t c = 2; c <= 6; ++c)
      EXPECT_EQ(L["sch"][std::to_string(m)][std::to_string(c)].get<double>(), sc[static_cast<size_t>(c - 1)]);
  }
  for (int64_t c = 2; c <= 6; ++c) {
    EXPECT_EQ(L["cache_hit_rate"][std::to_string(c)]["lru"].get<double>(),
              moekit::offload::replay_cache(lt, c, moekit::offload::CachePolicy::lru).hit_rate());
    EXPECT_EQ(L["cache_hit_rate"][std::to_string(c)]["belady"].get<double>(),
              moekit::offload::replay_cache(lt, c, moekit::offload::CachePolicy::belady).hit_rate());
  }
  const Result md = run_cli(dir_, "trace-stats " + t + " -o md");
  ASSERT_EQ(md.code, 0) << md.err;
  EXPECT_NE(md.out.find("## layer 3: 30 tokens, 6 experts, k = 2"), std::string::npos) << md.out;
  // Sizes outside [k, E] are reported as null, not computed.
  const auto j1 = nlohmann::json::parse(run_cli(dir_, "trace-stats " + t + " --cache 1,7").out);
  EXPECT_TRUE(j1["layers"][0]["cache_hit_rate"]["1"]["lru"].is_null());
  EXPECT_TRUE(j1["layers"][0]["cache_hit_rate"]["7"]["lru"].is_null());

  const std::string x = (dir_ / "x.safetensors").string();
  expect_error("trace-stats", "expected at least one routing trace file");
  expect_error("trace-stats " + x, "not a routing trace");
  expect_error("trace-stats " + t + " --segments 0", "--segments");
  expect_error("trace-stats " + t + " -o xml", "--output-format");
  expect_error(run_args(prefix) + " --trace " + x, "--trace");
  fs::copy_file(x, dir_ / "other.safetensors");
  expect_error(run_args(prefix) + " --trace " + (dir_ / "other.safetensors").string(), "is not a routing trace");
}

// make-input --correlation: neighbouring tokens' hidden states correlate (rho), so their
// routing does: higher SRP and LRU hit rate than independent tokens on the same layer.
TEST_F(Cli, CorrelatedInputsGiveRoutingLocality) {
  write_mixtral("", DType::F32);
  const std::string c = (dir_ / "config.json").string(), w = (dir_ / "w.safetensors").string();
  double srp[2], lru[2];
  for (int i = 0; i < 2; ++i) {
    const std::string x = (dir_ / ("x" + std::to_string(i) + ".safetensors")).string(),
                      t = (dir_ / ("t" + std::to_string(i) + ".safetensors")).string(),
                      y = (dir_ / ("y" + std::to_string(i) + ".safetensors")).string();
    ASSERT_EQ(run_cli(dir_, "make-input -c " + c + " --tokens 400 --sequences 2 -o " + x + (i ? " --correlation 0.95" : "")).code, 0);
    if (i) {  // consecutive rows correlate
      const auto h = moekit::io::TensorSource::open(x).read_f32("hidden_states", {400, 24});
      double xy = 0, xx = 0;
      for (int64_t tk = 1; tk < 200; ++tk)
        for (int64_t j = 0; j < 24; ++j) {
          xy += double(h[static_cast<size_t>(tk * 24 + j)]) * h[static_cast<size_t>((tk - 1) * 24 + j)];
          xx += double(h[static_cast<size_t>(tk * 24 + j)]) * h[static_cast<size_t>(tk * 24 + j)];
        }
      EXPECT_GT(xy / xx, 0.85);
    }
    ASSERT_EQ(run_cli(dir_, "run -c " + c + " -w " + w + " -i " + x + " -o " + y + " --trace " + t).code, 0);
    const auto j = nlohmann::json::parse(run_cli(dir_, "trace-stats " + t + " --segments 8 --cache 3").out);
    EXPECT_EQ(j["layers"][0]["sequences"], 2);
    srp[i] = j["layers"][0]["srp"]["8"].get<double>();
    lru[i] = j["layers"][0]["cache_hit_rate"]["3"]["lru"].get<double>();
  }
  EXPECT_GT(srp[1], srp[0] + 0.1);
  EXPECT_GT(lru[1], lru[0] + 0.1);
  expect_error("make-input -c " + c + " --tokens 4 -o " + (dir_ / "z.safetensors").string() + " --correlation 1", "--correlation");
  expect_error("make-input -c " + c + " --tokens 4 -o " + (dir_ / "z.safetensors").string() + " --correlation nan", "--correlation");
}

TEST_F(Cli, ShardedIndexAndPadding) {
  write_mixtral("", DType::F32);
  // Split the single file into two shards plus an index.
  const auto src = moekit::io::SafetensorsFile::open((dir_ / "w.safetensors").string());
  std::vector<moekit::io::OutTensor> a, b;
  nlohmann::json map;
  int i = 0;
  for (const auto& name : src.names()) {
    const auto& t = src.tensor(name);
    const bool first = (i++ % 2) == 0;
    (first ? a : b).push_back({name, t.dtype, t.shape, t.data});
    map[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  moekit::io::write_safetensors((dir_ / "model-00001-of-00002.safetensors").string(), a);
  moekit::io::write_safetensors((dir_ / "model-00002-of-00002.safetensors").string(), b);
  std::ofstream(dir_ / "model.safetensors.index.json") << nlohmann::json{{"metadata", {}}, {"weight_map", map}}.dump();
  write_input(5, 24, 0.0f, {0, 1, 0, 0, 1});
  const std::string args = "run --config " + (dir_ / "config.json").string() + " --weights " +
                           (dir_ / "model.safetensors.index.json").string() + " --input " +
                           (dir_ / "x.safetensors").string() + " --output " + (dir_ / "y.safetensors").string();
  const Result r = run_cli(dir_, args);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto y = moekit::io::TensorSource::open((dir_ / "y.safetensors").string());
  const auto out = y.read_f32("hidden_states", {5, 24});
  const auto ids = y.read_i32("topk_ids", {5, 2});
  for (int64_t t : {1, 4}) {
    EXPECT_EQ(ids[t * 2], -1);
    for (int c = 0; c < 24; ++c) EXPECT_EQ(out[t * 24 + c], 0.0f);
  }
  EXPECT_GE(ids[0], 0);
}

TEST_F(Cli, MalformedInputsExitTwoWithOneLine) {
  write_mixtral("", DType::F32);
  write_input(4, 24);
  // Corrupt weights header.
  std::ofstream(dir_ / "bad.safetensors", std::ios::binary) << std::string("\x10\0\0\0\0\0\0\0{not json", 17);
  expect_error("run --config " + (dir_ / "config.json").string() + " --weights " + (dir_ / "bad.safetensors").string() +
                   " --input " + (dir_ / "x.safetensors").string() + " --output " + (dir_ / "y.safetensors").string(),
               "bad.safetensors");
  // Missing and mis-shaped tensors are named.
  write_mixtral("", DType::F32, "experts.3.w2.weight");
  expect_error(run_args(""), "experts.3.w2.weight");
  write_mixtral("", DType::F32, "", "experts.1.w1.weight");
  expect_error(run_args(""), "experts.1.w1.weight");
  write_mixtral("", DType::F32);
  // Wrong prefix: the first tensor looked up is missing.
  expect_error(run_args("model.layers.0.mlp."), "model.layers.0.mlp.gate.weight");
  // Input problems.
  write_input(4, 23);
  expect_error(run_args(""), "hidden_states");
  write_input(4, 24, std::nanf(""));
  expect_error(run_args(""), "finite");
  write_input(4, 24);
  // Config problems.
  std::ofstream(dir_ / "config.json") << R"({"model_type": "gpt2", "hidden_size": 24})";
  expect_error(run_args(""), "model_type");
  std::ofstream(dir_ / "config.json")
      << R"({"model_type": "mixtral", "hidden_size": 24, "intermediate_size": 20, "num_local_experts": 6, "num_experts_per_tok": 7})";
  expect_error(run_args(""), "k expected in [1, E = 6], got 7");
  std::ofstream(dir_ / "config.json")
      << R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 24, "routr": {}})";
  expect_error(run_args(""), "unknown key \"routr\"");
  std::ofstream(dir_ / "config.json") << "{\"model_type\": ";
  expect_error(run_args(""), "not valid JSON");
  // Usage problems.
  expect_error(run_args("") + " --bogus 1", "--bogus");
  expect_error("run --config " + (dir_ / "config.json").string(), "missing required flag");
  expect_error("frobnicate", "unknown command");
  expect_error(run_args("") + " --dtype int3", "--dtype");
}

// --model DIR --layer N finds the config, the weights and the block's prefix; bad layers and
// prefixes name the blocks the checkpoint has.
TEST_F(Cli, ModelFolderAndLayerFindTheBlock) {
  // Two MoE blocks (layers 1 and 2) in one model.safetensors: layer 2 holds layer 1's values
  // times -0.5.
  write_mixtral("model.layers.1.block_sparse_moe.", DType::F32);
  std::vector<moekit::io::OutTensor> all;
  std::map<std::string, std::vector<float>> vals;
  {
    const auto a = moekit::io::TensorSource::open((dir_ / "w.safetensors").string());
    for (const std::string& n : a.names()) {
      const auto& v = a.tensor(n);
      vals[n] = a.read_f32(n, v.shape);
      std::string n2 = n;
      if (n2.rfind("model.layers.1.", 0) == 0) {
        n2.replace(13, 1, "2");
        vals[n2] = vals[n];
        for (float& x : vals[n2]) x *= -0.5f;
      }
    }
    for (auto& [n, b] : vals) all.push_back({n, DType::F32, a.tensor(n.rfind("model.layers.2.", 0) == 0
                                                                         ? "model.layers.1." + n.substr(15)
                                                                         : n).shape, b.data()});
  }
  fs::create_directories(dir_ / "m");
  moekit::io::write_safetensors((dir_ / "w.safetensors").string(), all);
  fs::copy_file(dir_ / "w.safetensors", dir_ / "m" / "model.safetensors");
  fs::copy_file(dir_ / "config.json", dir_ / "m" / "config.json");
  write_input(5, 24);
  const std::string io = " --input " + (dir_ / "x.safetensors").string() + " --output " + (dir_ / "y.safetensors").string();
  for (int layer : {1, 2}) {
    const std::string prefix = "model.layers." + std::to_string(layer) + ".block_sparse_moe.";
    ASSERT_EQ(run_cli(dir_, run_args(prefix)).code, 0);
    const auto want = moekit::io::TensorSource::open((dir_ / "y.safetensors").string()).read_f32("hidden_states", {5, 24});
    fs::remove(dir_ / "y.safetensors");
    const Result r = run_cli(dir_, "run --model " + (dir_ / "m").string() + " --layer " + std::to_string(layer) + io);
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(moekit::io::TensorSource::open((dir_ / "y.safetensors").string()).read_f32("hidden_states", {5, 24}), want);
    fs::remove(dir_ / "y.safetensors");
  }
  const std::string m = "run --model " + (dir_ / "m").string();
  expect_error(m + " --layer 3" + io,
               "--layer 3: no MoE block in that layer; the checkpoint's MoE blocks: \"model.layers.1.block_sparse_moe.\", "
               "\"model.layers.2.block_sparse_moe.\" (2 blocks, layers 1-2)");
  expect_error(m + io, "--layer: required, the checkpoint has");
  expect_error(m + " --prefix x." + io, "--model and --prefix exclude each other");
  expect_error(run_args("") + " --layer 1", "--layer needs --model");
  expect_error("run --model " + (dir_ / "nope").string() + io, "expected a model folder");
  fs::create_directories(dir_ / "empty");
  expect_error("run --model " + (dir_ / "empty").string() + io, "no config.json");
  // A prefix that names no block: the closest one is suggested.
  expect_error(run_args("model.layers.2.block_sparse_moe"),
               "did you mean \"model.layers.2.block_sparse_moe.\"? The checkpoint's MoE blocks");
}

// --gguf FILE --layer N runs the GGUF file's MoE layer as the library builds it; a missing or
// wrong layer names the layers there are, and --gguf excludes the safetensors flags.
TEST_F(Cli, GgufFileAndLayer) {
  using namespace moekit_test;
  std::mt19937 g(5);
  const int64_t d = 64, f = 32, E = 8;
  std::vector<GgufKv> kv = {kv_str("general.architecture", "qwen2moe"), kv_u32("qwen2moe.expert_used_count", 2),
                            kv_u32("qwen2moe.expert_count", 8)};
  std::vector<GgufOut> ts;
  for (int layer : {1, 4}) {
    const std::string p = "blk." + std::to_string(layer) + ".";
    ts.push_back(gguf_tensor(p + "ffn_gate_inp.weight", kF32, {d, E}, g, 0.2f));
    ts.push_back(gguf_tensor(p + "ffn_gate_exps.weight", kQ8_0, {d, f, E}, g, 0.1f));
    ts.push_back(gguf_tensor(p + "ffn_up_exps.weight", kQ4_0, {d, f, E}, g, 0.1f));
    ts.push_back(gguf_tensor(p + "ffn_down_exps.weight", kF16, {f, d, E}, g, 0.1f));
  }
  const std::vector<std::byte> bytes = gguf_bytes(kv, ts);
  std::ofstream(dir_ / "m.gguf", std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                         static_cast<std::streamsize>(bytes.size()));
  write_input(6, d);
  const std::string io = " --input " + (dir_ / "x.safetensors").string() + " --output " + (dir_ / "y.safetensors").string();
  const std::string gg = "run --gguf " + (dir_ / "m.gguf").string();
  const Result r = run_cli(dir_, gg + " --layer 4 --threads 2" + io);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto file = moekit::io::GgufFile::open((dir_ / "m.gguf").string());
  const auto layer = moekit::load_any_layer_gguf(file, 4, moekit::gguf_layer_config(file, 4));
  std::vector<float> want(x_.size());
  layer->forward(moekit::Batch::single(6, d), x_.data(), want.data(), 1);
  const auto out = moekit::io::TensorSource::open((dir_ / "y.safetensors").string());
  EXPECT_EQ(out.read_f32("hidden_states", {6, d}), want);
  EXPECT_EQ(out.read_i32("topk_ids", {6, 2}).size(), 12u);
  fs::remove(dir_ / "y.safetensors");
  expect_error(gg + io, "--layer: required, " + (dir_ / "m.gguf").string() + " has MoE layers 1, 4");
  expect_error(gg + " --layer 2" + io, "layer 2 has no MoE block (no tensor \"blk.2.ffn_gate_inp.weight\"); MoE layers: 1, 4");
  expect_error(gg + " --layer 1 --prefix x." + io, "--gguf and --prefix exclude each other");
  expect_error(gg + " --model " + dir_.string() + io, "--model and --gguf exclude each other");
  expect_error("run --gguf " + (dir_ / "x.safetensors").string() + io, "not a GGUF file");
  expect_error("run --gguf " + (dir_ / "m.gguf").string() + " --layer 1 --input " + (dir_ / "x.safetensors").string() +
                   " --output " + (dir_ / "m.gguf").string(), "--output");
}

// --output naming an input file (however spelled) is refused before anything is written, and
// the input survives.
TEST_F(Cli, OutputThatIsAnInputIsRefused) {
  write_mixtral("", DType::F32);
  write_input(3, 24);
  fs::create_directories(dir_ / "sub");
  fs::create_symlink(dir_ / "x.safetensors", dir_ / "link.safetensors");
  const std::string base = "run --config " + (dir_ / "config.json").string() + " --weights " +
                           (dir_ / "w.safetensors").string() + " --input " + (dir_ / "x.safetensors").string();
  for (const auto& [out, what] : std::vector<std::pair<fs::path, std::string>>{
           {dir_ / "x.safetensors", "--input"},
           {dir_ / "sub" / ".." / "x.safetensors", "--input"},
           {dir_ / "link.safetensors", "--input"},
           {dir_ / "w.safetensors", "--weights"},
           {dir_ / "config.json", "--config"}}) {
    SCOPED_TRACE(out.string());
    const std::string before = slurp(out);
    const Result r = run_cli(dir_, base + " --output " + out.string());
    EXPECT_EQ(r.code, 2) << r.err;
    EXPECT_NE(r.err.find("is the same file as " + what), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(slurp(out), before) << "the input was changed";
  }
  // A shard of an index.
  std::ofstream(dir_ / "index.json") << R"({"weight_map": {"gate.weight": "w.safetensors"}})";
  const Result r = run_cli(dir_, "run --config " + (dir_ / "config.json").string() + " --weights " +
                                     (dir_ / "index.json").string() + " --input " + (dir_ / "x.safetensors").string() +
                                     " --output " + (dir_ / "w.safetensors").string());
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("is the same file as a weight shard"), std::string::npos) << r.err;
}

// Sizes from a config are checked before anything is allocated or multiplied: an extent past
// 2^31, a product that overflows, or a shape the weight file does not hold is exit 2 with one
// line, never a crash, a bad_alloc or gigabytes allocated first.
TEST_F(Cli, HugeSizesAreRefusedBeforeAllocating) {
  write_mixtral("", DType::F32);
  write_input(3, 24);
  auto config = [&](const std::string& extra) {
    std::ofstream(dir_ / "config.json") << R"({"model_type": "mixtral", "hidden_size": 24, "num_experts_per_tok": 2, )" << extra
                                        << "}";
  };
  config(R"("num_local_experts": 6, "intermediate_size": 2305843009213693953)");  // 2^61 + 1: d * f would wrap
  expect_error(run_args(""), "intermediate size: expected <= 2^31");
  config(R"("num_local_experts": 6, "intermediate_size": 1073741824)");  // 2^30: 6 x 3 x 24 x 2^30 f32 would be 1.8 TB
  expect_error(run_args(""), "has shape [20, 24] (F32), expected shape [1073741824, 24]");
  config(R"("intermediate_size": 20, "num_local_experts": 2147483647)");
  expect_error(run_args(""), "expected at most 2^40 values");
  std::ofstream(dir_ / "config.json")
      << R"({"model_type": "deepseek_v3", "hidden_size": 24, "moe_intermediate_size": 20, "n_shared_experts": 1152921504606846977})";
  expect_error(run_args(""), "n_shared_experts");
  // bench: the same checks, before the random layer is built
  config(R"("num_local_experts": 6, "intermediate_size": 2305843009213693953)");
  const Result r = run_cli(dir_, "bench --config " + (dir_ / "config.json").string() + " --tokens 1 --repeat 1");
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("expected <= 2^31"), std::string::npos) << r.err;
}

// Hostile strings reach stderr escaped, on one line, and cut.
TEST_F(Cli, MessagesStayOneShortLine) {
  write_mixtral("", DType::F32);
  write_input(3, 24);
  std::ofstream(dir_ / "config.json") << "{\"model_type\": \"mix\\ntral\\u001b[31m\"}";
  Result r = run_cli(dir_, run_args(""));
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.find('\x1b'), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("mix\\ntral\\x1b[31m"), std::string::npos) << r.err;
  // a 100,000-character key and a 200,000-element array
  std::ofstream(dir_ / "config.json") << "{\"moekit_config_version\": 1, \"preset\": \"mixtral\", \"" << std::string(100000, 'k')
                                      << "\": 1}";
  r = run_cli(dir_, run_args(""));
  EXPECT_EQ(r.code, 2);
  EXPECT_LT(r.err.size(), 2200u) << r.err.substr(0, 300);
  EXPECT_NE(r.err.find("(100000 characters)"), std::string::npos) << r.err.substr(0, 400);
  {
    std::ofstream out(dir_ / "config.json");
    out << "{\"model_type\": \"mixtral\", \"hidden_size\": [";
    for (int i = 0; i < 200000; ++i) out << (i ? "," : "") << i;
    out << "]}";
  }
  r = run_cli(dir_, run_args(""));
  EXPECT_EQ(r.code, 2);
  EXPECT_LT(r.err.size(), 2200u) << r.err.substr(0, 300);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1);
  // finite input that overflows inside an expert: exit 2, not an all-NaN output
  write_mixtral("", DType::F32);
  write_input(3, 24, 1e30f);
  expect_error(run_args(""), "although the input is finite");
  // a directory as --config is named for what it is
  r = run_cli(dir_, "run --config " + dir_.string() + " --weights " + (dir_ / "w.safetensors").string() + " --input " +
                        (dir_ / "x.safetensors").string() + " --output " + (dir_ / "y.safetensors").string());
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("is a directory, expected a regular file"), std::string::npos) << r.err;
}

TEST_F(Cli, OwnConfigFormatSwitchPreset) {
  std::ofstream(dir_ / "config.json")
      << R"({"moekit_config_version": 1, "preset": "switch", "hidden_size": 24,
            "router": {"num_experts": 6, "capacity_factor": 0.5}, "experts": {"intermediate_size": 20}})";
  std::mt19937 g(3);
  std::normal_distribution<float> n(0.0f, 0.2f);
  std::vector<std::vector<float>> keep;
  std::vector<moekit::io::OutTensor> out;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    keep.emplace_back(static_cast<size_t>(shape[0] * (shape.size() > 1 ? shape[1] : 1)));
    for (float& v : keep.back()) v = n(g);
    out.push_back({name, DType::F32, shape, keep.back().data()});
  };
  keep.reserve(20);
  add("gate.weight", {6, 24});
  for (int e = 0; e < 6; ++e) {
    add("experts." + std::to_string(e) + ".up_proj.weight", {20, 24});
    add("experts." + std::to_string(e) + ".down_proj.weight", {24, 20});
  }
  moekit::io::write_safetensors((dir_ / "w.safetensors").string(), out);
  write_input(12, 24);
  const Result r = run_cli(dir_, run_args(""));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto y = moekit::io::TensorSource::open((dir_ / "y.safetensors").string());
  const auto ids = y.read_i32("topk_ids", {12, 1});
  // C = ceil(12 * 1 / 6 * 0.5) = 1 per expert: at most 6 tokens kept, one per expert.
  std::vector<int> per(6, 0);
  int kept = 0;
  for (int32_t id : ids)
    if (id >= 0) ++per[static_cast<size_t>(id)], ++kept;
  for (int c : per) EXPECT_LE(c, 1);
  EXPECT_GE(kept, 1);
  EXPECT_LT(kept, 12);
}

TEST_F(Cli, BenchAndInfoPrintJson) {
  std::ofstream(dir_ / "config.json")
      << R"({"model_type": "deepseek_v3", "hidden_size": 32, "moe_intermediate_size": 16, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2})";
  Result r = run_cli(dir_, "bench --config " + (dir_ / "config.json").string() + " --tokens 7 --threads 2 --repeat 3 --layers 2");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  for (const char* key : {"tokens", "threads", "dtype", "median_ms", "tokens_per_s", "gflops", "weight_gbps", "expert_weight_bytes", "shape"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["tokens"], 7);
  EXPECT_EQ(j["threads"], 2);
  EXPECT_EQ(j["layers"], 2);
  EXPECT_GT(j["gflops"].get<double>(), 0.0);
  r = run_cli(dir_, "bench --config " + (dir_ / "config.json").string() + " --tokens 0 --repeat 2");
  EXPECT_EQ(r.code, 0) << r.err;
  r = run_cli(dir_, "info");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto info = nlohmann::json::parse(r.out);
  EXPECT_TRUE(info.contains("cpu_features"));
  EXPECT_TRUE(info.contains("gemm_kernel"));
}

// bench as llama-bench is used: lists and ranges of --tokens, --threads, --dtype give one
// record per configuration (dtype-major, then threads, then tokens) in json, jsonl, csv or md;
// statistics, CPU, version and commit in every record; torch_dtype bfloat16 picks bf16.
TEST_F(Cli, BenchListsAndOutputFormats) {
  std::ofstream(dir_ / "config.json") << R"({"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 16,
      "num_local_experts": 4, "num_experts_per_tok": 2, "torch_dtype": "bfloat16"})";
  const std::string base = "bench --config " + (dir_ / "config.json").string() + " --repeat 3 --layers 2";
  Result r = run_cli(dir_, base + " --tokens 1,4-16*2 --threads 1-2 --dtype f32,int4");
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<nlohmann::json> recs;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) recs.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(recs.size(), 2u * 2u * 4u);  // dtypes x threads x tokens {1, 4, 8, 16}
  const int64_t tokens[] = {1, 4, 8, 16};
  for (size_t i = 0; i < recs.size(); ++i) {
    const auto& j = recs[i];
    EXPECT_EQ(j["dtype"], i < 8 ? "f32" : "int4");
    EXPECT_EQ(j["threads"], i % 8 < 4 ? 1 : 2);
    EXPECT_EQ(j["tokens"], tokens[i % 4]);
    for (const char* key : {"mean_ms", "median_ms", "min_ms", "stddev_ms", "cpu", "moekit_version", "git_commit", "kernel"})
      EXPECT_TRUE(j.contains(key)) << key;
    EXPECT_LE(j["min_ms"].get<double>(), j["median_ms"].get<double>());
    EXPECT_GE(j["stddev_ms"].get<double>(), 0.0);
  }
  // Without --dtype the config's torch_dtype (bfloat16) stores bf16 experts.
  r = run_cli(dir_, base + " --tokens 2");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["dtype"], "bf16");
  // csv: a header and one row per configuration; md: a table; jsonl as json.
  r = run_cli(dir_, base + " --tokens 2,3 -o csv");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 3);
  EXPECT_EQ(r.out.rfind("preset,router,num_experts,k,", 0), 0u) << r.out;
  r = run_cli(dir_, base + " --tokens 2 --output-format md");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 3);
  EXPECT_EQ(r.out.rfind("| preset | router |", 0), 0u) << r.out;
  r = run_cli(dir_, base + " --tokens 2 -o jsonl");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(nlohmann::json::accept(r.out)) << r.out;
  // Bad lists and formats: exit 2, one line.
  expect_error(base + " --tokens 8-2", "--tokens: range \"8-2\" expected its end >= its start");
  expect_error(base + " --tokens 1,x", "--tokens: expected an integer in [0, 16777216], got \"x\"");
  expect_error(base + " --tokens 1-2*1", "expected an integer in [2, 16777216], got \"1\"");
  expect_error(base + " --tokens 0-5000", "--tokens: more than 1024 values");
  expect_error(base + " --dtype f32,fp16", "--dtype: weight type");
  expect_error(base + " -o xml", "-o / --output-format: expected json, jsonl, csv or md");
  expect_error(base + " -o csv --output-format md", "given twice");
}

// --dtype: reduced-precision experts through run and bench. The router is f32, so the
// routing is the f32 run's; outputs differ within the type's error.
TEST_F(Cli, DtypeFlagRunsReducedPrecisionExperts) {
  write_mixtral("", DType::F32);
  write_input(10, 24);
  ASSERT_EQ(run_cli(dir_, run_args("")).code, 0);
  const auto y32 = moekit::io::TensorSource::open((dir_ / "y.safetensors").string());
  const auto ref = y32.read_f32("hidden_states", {10, 24});
  const auto ref_ids = y32.read_i32("topk_ids", {10, 2});
  for (const char* dt : {"f32", "bf16", "int8", "w8a8", "fp8", "int4", "int4zp", "w4a8", "ternary", "bf16xbf16"}) {
    SCOPED_TRACE(dt);
    fs::remove(dir_ / "y.safetensors");
    const Result r = run_cli(dir_, run_args("") + " --dtype " + dt + " --threads 2");
    ASSERT_EQ(r.code, 0) << r.err;
    const auto y = moekit::io::TensorSource::open((dir_ / "y.safetensors").string());
    const auto out = y.read_f32("hidden_states", {10, 24});
    EXPECT_EQ(y.read_i32("topk_ids", {10, 2}), ref_ids);
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) num += (out[i] - ref[i]) * (out[i] - ref[i]), den += ref[i] * ref[i];
    const double err = std::sqrt(num / den);
    if (std::string(dt) == "f32") {
      EXPECT_EQ(err, 0.0);
    } else {
      EXPECT_GT(err, 0.0);
      const std::string t = dt;
      EXPECT_LT(err, t == "bf16"        ? 1e-2
                     : t == "bf16xbf16" ? 2e-2
                     : t == "ternary"   ? 0.95
                     : t.rfind("int4", 0) == 0 || t == "w4a8" ? 0.3
                                                               : 8e-2);
    }
    const Result b = run_cli(dir_, "bench --config " + (dir_ / "config.json").string() + " --tokens 5 --repeat 2 --layers 1 --dtype " + dt);
    ASSERT_EQ(b.code, 0) << b.err;
    // bf16xbf16 is bf16 weights with bf16 activations.
    const bool x = std::string(dt) == "bf16xbf16";
    EXPECT_EQ(nlohmann::json::parse(b.out)["dtype"], x ? "bf16" : dt);
    EXPECT_EQ(nlohmann::json::parse(b.out)["bf16_activations"], x);
  }
  fs::remove(dir_ / "y.safetensors");
  expect_error(run_args("") + " --dtype fp16", "f32, bf16, int8, w8a8, fp8, int4, int4zp, w4a8, ternary");
}

// A DeepSeek-V3-style FP8 checkpoint (F8_E4M3 experts with 128x128 `weight_scale_inv`) gives
// the same output as the f32 checkpoint holding its dequantised values.
TEST_F(Cli, Fp8BlockScaledCheckpointEqualsItsDequantisedF32) {
  std::ofstream(dir_ / "config.json")
      << R"({"model_type": "mixtral", "hidden_size": 136, "intermediate_size": 200, "num_local_experts": 4, "num_experts_per_tok": 2})";
  std::mt19937 g(17);
  std::normal_distribution<float> n(0.0f, 0.1f);
  std::vector<std::vector<uint8_t>> q8;
  std::vector<std::vector<float>> f32s, scales;
  q8.reserve(16), f32s.reserve(16), scales.reserve(16);
  std::vector<moekit::io::OutTensor> fp8_out, f32_out;
  std::vector<float> gate(4 * 136);
  for (float& v : gate) v = n(g);
  fp8_out.push_back({"gate.weight", DType::F32, {4, 136}, gate.data()});
  f32_out.push_back({"gate.weight", DType::F32, {4, 136}, gate.data()});
  for (int e = 0; e < 4; ++e)
    for (const char* w : {"w1", "w3", "w2"}) {
      const int64_t rows = std::string(w) == "w2" ? 136 : 200, cols = std::string(w) == "w2" ? 200 : 136;
      const int64_t sn = (rows + 127) / 128, sk = (cols + 127) / 128;
      auto& q = q8.emplace_back(static_cast<size_t>(rows * cols));
      auto& sc = scales.emplace_back(static_cast<size_t>(sn * sk));
      auto& deq = f32s.emplace_back(static_cast<size_t>(rows * cols));
      for (size_t i = 0; i < sc.size(); ++i) sc[i] = 0.0005f * static_cast<float>(i + 1);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          const float s = sc[static_cast<size_t>((i / 128) * sk + j / 128)];
          const uint8_t b = moekit::kernels::float_to_fp8_e4m3(n(g) / s);
          q[static_cast<size_t>(i * cols + j)] = b;
          deq[static_cast<size_t>(i * cols + j)] = moekit::kernels::fp8_e4m3_to_float(b) * s;
        }
      const std::string name = "experts." + std::to_string(e) + "." + w + ".weight";
      fp8_out.push_back({name, DType::F8_E4M3, {rows, cols}, q.data()});
      fp8_out.push_back({name + "_scale_inv", DType::F32, {sn, sk}, sc.data()});
      f32_out.push_back({name, DType::F32, {rows, cols}, deq.data()});
    }
  moekit::io::write_safetensors((dir_ / "w.safetensors").string(), fp8_out);
  moekit::io::write_safetensors((dir_ / "w32.safetensors").string(), f32_out);
  write_input(6, 136);
  ASSERT_EQ(run_cli(dir_, run_args("")).code, 0);
  const auto a = moekit::io::TensorSource::open((dir_ / "y.safetensors").string()).read_f32("hidden_states", {6, 136});
  fs::remove(dir_ / "y.safetensors");
  fs::rename(dir_ / "w32.safetensors", dir_ / "w.safetensors");
  ASSERT_EQ(run_cli(dir_, run_args("")).code, 0);
  const auto b = moekit::io::TensorSource::open((dir_ / "y.safetensors").string()).read_f32("hidden_states", {6, 136});
  double mx = 0;
  for (float v : b) mx = std::max(mx, static_cast<double>(std::fabs(v)));
  ASSERT_GT(mx, 0.0);
  EXPECT_EQ(a, b);
}

}  // namespace
#endif
