// SPDX-License-Identifier: Apache-2.0
// The `moekit` command line: run a layer from a config and safetensors files, benchmark a
// layer, report the CPU and kernels. Its flags, files and exit codes are a contract
// (docs/cli.md): 0 success, 2 bad input or usage (one line on stderr, no output file),
// 1 an unexpected internal failure.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <omp.h>

#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"
#include "moekit/io/packed_layer.hpp"
#include "moekit/tools/eaquant.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/io/trace.hpp"
#include "moekit/offload/locality.hpp"
#include "moekit/cpu.hpp"
#include "moekit/kernels/gemm.hpp"
#include "moekit/kernels/packed_gemm.hpp"
#include "moekit/kernels/vector.hpp"
#include "moekit/moekit.hpp"
#ifdef MOEKIT_HAVE_EP
#include <mpi.h>
#include <sys/wait.h>

#include <cerrno>

#include "moekit/ep/layer.hpp"
#endif

namespace {

using json = nlohmann::json;
using moekit::detail::fail;

// Leaves a command with this exit code; its message is already printed (or deliberately not,
// on the ranks of an expert-parallel run that did not fail).
struct QuietExit {
  int code;
};

// The commit `moekit bench` records (set by CMake for the CLI target; other builds that
// include this file, e.g. the fuzz targets, have none).
#ifndef MOEKIT_GIT_COMMIT
#define MOEKIT_GIT_COMMIT "unknown"
#endif

constexpr const char* kUsage =
    "usage:\n"
    "  moekit run --config C.json --weights W.safetensors|index.json --input X.safetensors\n"
    "             --output Y.safetensors [--prefix P] [--threads N] [--dtype f32|bf16|int8|w8a8|fp8|int4|int4zp|w4a8|ternary|bf16xbf16]\n"
    "  moekit run --model DIR [--layer N] --input X.safetensors --output Y.safetensors [--threads N] [--dtype ...]\n"
    "  moekit run --gguf F.gguf [--layer N] --input X.safetensors --output Y.safetensors [--threads N] [--dtype ...]\n"
    "  moekit bench --config C.json [--tokens T,...] [--threads N,...] [--dtype f32|bf16|int8|w8a8|fp8|int4|int4zp|w4a8|ternary|bf16xbf16,...]\n"
    "               [--repeat R] [--layers L] [--seed S] [-o json|jsonl|csv|md]\n"
    "  moekit run --packed L.safetensors --input X.safetensors --output Y.safetensors [--threads N]\n"
    "  moekit pack --config C.json --weights W.safetensors [--prefix P] | --model DIR [--layer N] [--dtype ...] [--calibrate X.safetensors] --output L.safetensors\n"
    "  moekit make-input --config C.json --tokens T [--sequences S] [--seed S] --output X.safetensors\n"
    "  moekit trace-stats TRACE.safetensors... [--segments M,...] [--cache C,...] [-o json|md]\n"
    "  moekit info\n"
    "  moekit --version\n"
    "Flags take --name value or --name=value; moekit <command> --help describes a command's flags.\n";

// One flag of a sub-command: its long name, an optional short form ("-t") and its help line.
struct FlagSpec {
  const char* name;
  const char* short_name;
  const char* help;
};

// The flags of each command (docs/cli.md), with their help lines; run's and pack's layer flags
// are the same ones.
constexpr FlagSpec kConfigFlag{"config", "-c", "HF config.json or moekit config (with --weights)"};
constexpr FlagSpec kWeightsFlag{"weights", "-w", "one .safetensors file, or a sharded checkpoint's index .json"};
constexpr FlagSpec kPrefixFlag{"prefix", "", "prepended to every weight name, e.g. model.layers.3.mlp."};
constexpr FlagSpec kModelFlag{"model", "-m", "an HF model folder, instead of --config / --weights / --prefix"};
constexpr FlagSpec kDtypeFlag{"dtype", "",
                              "expert weight type: f32 bf16 int8 w8a8 fp8 int4 int4zp w4a8 ternary bf16xbf16 (default: the config's)"};
constexpr const char* kRunHelp =
    "Runs one MoE layer (router, routed and shared experts) on an input file and writes the layer's\n"
    "output (without the residual) and its routing. The layer comes from --config + --weights [+ --prefix],\n"
    "from an HF model folder (--model [--layer N]) or from a GGUF file (--gguf [--layer N]).";
const std::vector<FlagSpec> kRunFlags = {
    kConfigFlag,
    kWeightsFlag,
    kPrefixFlag,
    kModelFlag,
    {"gguf", "", "a GGUF file, instead of --config / --weights / --prefix / --model"},
    {"layer", "-l", "the layer number, with --model or --gguf"},
    {"input", "-i", "input .safetensors: hidden_states [T, d] and optional batch tensors (moekit make-input)"},
    {"output", "-o", "output .safetensors, written atomically"},
    {"packed", "", "a pre-packed layer file (moekit pack), instead of the others above"},
    {"threads", "-t", "threads; 0 (default) = OpenMP's default"},
    kDtypeFlag,
    {"trace", "", "add this layer's routing (the experts each token used) to a routing trace file, "
                  "created or extended (moekit trace-stats reads it)"},
    {"ep", "", "expert parallelism over N MPI ranks (top-k layers): relaunches itself with mpiexec; "
               "under mpirun -np N, the world size"},
    {"ep-placement", "", "with --ep: contiguous (default: rank r holds experts [E r/N, E (r+1)/N)) or round-robin"},
    {"ep-balance", "", "with --ep: none (default) or llep (least-loaded: spill hot experts' rows and weights)"},
    {"ep-wire", "", "with --ep: f32 (default, output equal to one process bit for bit) or bf16 rows on the wire"},
    {"ep-micro-batches", "", "with --ep: micro-batches whose dispatch overlaps the experts (default 1)"},
    {"ep-stats", "", "with --ep: JSON file with the loads, the plan and each rank's traffic and times"},
};
constexpr const char* kPackHelp =
    "Packs a top-k MoE layer once, for this machine's kernels, into a pre-packed layer file that\n"
    "moekit run --packed (and moekit::load_packed_layer) map without copying the experts.";
const std::vector<FlagSpec> kPackFlags = {
    kConfigFlag,
    kWeightsFlag,
    kPrefixFlag,
    kModelFlag,
    {"layer", "-l", "the layer number, with --model"},
    kDtypeFlag,
    {"output", "-o", "the pre-packed layer file to write"},
    {"calibrate", "", "an input file of calibration tokens: EAQuant's expert-aware smoothing (w8a8, w4a8)"},
};
constexpr const char* kBenchHelp =
    "Times forward passes of a layer with random weights and prints one record per configuration\n"
    "(JSON by default). --tokens, --threads and --dtype take comma lists and ranges: 1,16,512  1-8  1-512*2  0-64+16.";
const std::vector<FlagSpec> kBenchFlags = {
    {"config", "-c", "the layer's HF config.json or moekit config"},
    {"tokens", "", "T per forward (default 512); a list"},
    {"threads", "-t", "threads, 0 = OpenMP's default (default 0); a list"},
    {"dtype", "", "expert weight types (default: the config's); a list"},
    {"repeat", "-r", "timed forwards per configuration (default 10)"},
    {"layers", "", "layer instances to rotate over (default: computed from the L3 size)"},
    {"seed", "", "random seed of weights and inputs (default 1)"},
    {"output-format", "-o", "json (default), jsonl, csv or md"},
};
constexpr const char* kMakeInputHelp =
    "Writes an input file for moekit run: random hidden states [T, d] (normal, from --seed) for the\n"
    "config's hidden size, sequence_offsets and positions for --sequences equal sequences, and the\n"
    "tensors the config's router family requires (token_scores for token_prune).";
const std::vector<FlagSpec> kMakeInputFlags = {
    {"config", "-c", "the layer's HF config.json or moekit config"},
    {"tokens", "", "T, the number of tokens, in [0, 2^24]"},
    {"sequences", "", "split the tokens into this many sequences (default 1)"},
    {"seed", "-s", "random seed (default 1)"},
    {"output", "-o", "the .safetensors file to write"},
    {"correlation", "", "rho in [0, 1): each token's hidden state rho x the previous one's plus sqrt(1 - rho^2) "
                        "x fresh noise, within a sequence (default 0: independent tokens)"},
};
constexpr const char* kTraceStatsHelp =
    "Prints what routing traces (moekit run --trace) say about expert offloading, per layer: the per-expert\n"
    "load, the locality metrics SRP and SCH, and the hit rates of an expert cache of C experts under LRU, LFU\n"
    "and Belady's optimum (docs/scale-out.md). Layers with the same number in several files are one stream.";
const std::vector<FlagSpec> kTraceStatsFlags = {
    {"segments", "", "segment lengths m for SRP and SCH: a comma list or ranges (default 16)"},
    {"cache", "", "cache sizes C in experts: a comma list or ranges (default k, 2k, 4k and E/2, those in [k, E])"},
    {"output-format", "-o", "json (default: one object) or md (a table per layer)"},
};

// `s` with control characters escaped (\n, \t, \xHH) appended to `out`.
void append_escaped(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      out += {'\\', 'x', kHex[c >> 4], kHex[c & 15]};
    } else {
      out += ch;
    }
  }
}

// A message as one line of stderr: control characters escaped (a file name or config string
// cannot start a new line or send a terminal escape), every double-quoted value longer than
// 200 characters cut, and the whole at most `max` characters.
std::string one_line(std::string_view m, std::size_t max = 2000) {
  constexpr std::size_t kQuoted = 200;
  std::string out;
  std::size_t i = 0;
  while (i < m.size() && out.size() < max) {
    const std::size_t open = m.find('"', i);
    const std::size_t close = open == std::string_view::npos ? open : m.find('"', open + 1);
    if (close == std::string_view::npos) {  // no (more) quoted value
      append_escaped(out, m.substr(i));
      break;
    }
    append_escaped(out, m.substr(i, open + 1 - i));
    const std::string_view value = m.substr(open + 1, close - open - 1);
    append_escaped(out, value.substr(0, kQuoted));
    if (value.size() > kQuoted) {
      out.append("...\" (").append(std::to_string(value.size())).append(" characters)");
    } else {
      out += '"';
    }
    i = close + 1;
  }
  if (out.size() > max) out = out.substr(0, max) + "...(message cut)";
  return out;
}

// Refuses an --output that is one of the run's input files (same device and inode, however
// the path is spelled: "./a/../x", a hard link or a symlink to it), before anything is written.
void refuse_output_over_inputs(const std::string& out,
                               const std::vector<std::pair<std::string, std::string>>& inputs,
                               const char* flag = "--output") {
  struct stat so {};
  if (::stat(out.c_str(), &so) != 0) return;  // nothing there yet
  for (const auto& [what, path] : inputs) {
    struct stat si {};
    if (::stat(path.c_str(), &si) == 0 && si.st_dev == so.st_dev && si.st_ino == so.st_ino)
      fail(flag, " \"", out, "\" is the same file as ", what, " \"", path, "\": refusing to overwrite an input");
  }
}

// Thrown after a sub-command's --help was printed: the command exits 0.
struct HelpShown {};

size_t edit_distance(const std::string& a, const std::string& b);

// The closest of `names` to `arg` (edit distance at most 2, or a prefix of it), "" if none.
std::string closest_flag(const std::string& arg, const std::vector<FlagSpec>& flags) {
  std::string best;
  size_t best_d = 3;
  const std::string a = arg.substr(0, arg.find('='));
  for (const FlagSpec& f : flags) {
    const std::string n = std::string("--") + f.name;
    const size_t dist = n.rfind(a, 0) == 0 && a.size() > 3 ? 0 : edit_distance(a, n);
    if (dist < best_d) {
      best_d = dist;
      best = n;
    }
  }
  return best;
}

// Flags of one sub-command, parsed with CLI11: `--name value` or `--name=value` (a short form
// takes `-t value`), each at most once, in any order; `-h` / `--help` prints the command's help
// to stdout (HelpShown). Unknown arguments are errors naming the closest flag.
std::map<std::string, std::string> parse_flags(const std::string& cmd, const std::string& description, int argc,
                                               char** argv, int first, const std::vector<FlagSpec>& flags,
                                               std::vector<std::string>* positional = nullptr,
                                               const char* positional_help = "") {
  CLI::App app(description, "moekit " + cmd);
  app.allow_extras(true);  // reported below, with a suggestion
  app.set_help_flag("-h,--help", "print this help and exit");
  app.get_formatter()->column_width(34);
  std::vector<std::string> values(flags.size());
  std::vector<CLI::Option*> options(flags.size());
  for (size_t i = 0; i < flags.size(); ++i) {
    std::string names = std::string("--") + flags[i].name;
    if (flags[i].short_name[0] != '\0') names = std::string(flags[i].short_name) + "," + names;
    options[i] = app.add_option(names, values[i], flags[i].help)->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  }
  if (positional != nullptr) app.add_option("FILES", *positional, positional_help);
  std::vector<std::string> args;
  for (int i = argc - 1; i >= first; --i) args.emplace_back(argv[i]);  // CLI11 takes them reversed
  // A known flag as the last argument has no value.
  if (!args.empty()) {
    const std::string& last = args.front();
    for (const FlagSpec& f : flags)
      if (last == std::string("--") + f.name || (f.short_name[0] != '\0' && last == f.short_name))
        fail("flag ", last, " expects a value");
  }
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    throw HelpShown{};
  } catch (const CLI::ParseError& e) {
    fail(e.what());
  }
  const std::vector<std::string> extra = app.remaining();
  if (!extra.empty()) {
    const std::string& a = extra.front();
    if (a.empty() || a[0] != '-') fail("unexpected argument \"", a, "\" (flags are --name value; see moekit ", cmd, " --help)");
    const std::string best = closest_flag(a, flags);
    if (!best.empty()) fail("unknown argument \"", a, "\"; did you mean ", best, "? (see moekit ", cmd, " --help)");
    fail("unknown argument \"", a, "\" (see moekit ", cmd, " --help)");
  }
  std::map<std::string, std::string> out;
  for (size_t i = 0; i < flags.size(); ++i) {
    if (options[i]->count() > 1) fail("flag --", flags[i].name, " given twice");
    if (options[i]->count() == 1) out[flags[i].name] = values[i];
  }
  return out;
}

// Every flag of `names` missing from `f`, reported at once.
void require_flags(const std::map<std::string, std::string>& f, std::initializer_list<const char*> names) {
  std::string missing;
  int n = 0;
  for (const char* name : names)
    if (f.count(name) == 0) missing += std::string(n++ ? ", --" : "--") + name;
  if (n == 1) fail("missing required flag ", missing);
  if (n > 1) fail("missing required flags ", missing);
}

// ---------------------------------------------------------------------------- progress
// Progress on stderr (docs/cli.md): live, updated at most 10 times a second, when stderr is a
// terminal; one summary line per phase when MOEKIT_PROGRESS=1 and stderr is not a terminal;
// nothing otherwise, so a script sees an empty stderr on success.
class Progress {
 public:
  explicit Progress(std::string cmd) : cmd_(std::move(cmd)) {
    const char* env = std::getenv("MOEKIT_PROGRESS");
    const bool forced = env != nullptr && std::string_view(env) == "1";
    const bool off = env != nullptr && std::string_view(env) == "0";
    live_ = !off && ::isatty(2) == 1;
    summary_ = forced && !live_;
    if (live_ || summary_) {
      active_ = this;
      previous_ = moekit::set_progress_hook(&Progress::hook);
    }
  }
  ~Progress() {
    if (active_ == this) {
      end_line();
      moekit::set_progress_hook(previous_);
      active_ = nullptr;
    }
  }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Starts a phase ("loading", "building layer 2 of 4", "timing 3 of 12: T = 512 ..."); the
  // previous one ends (its summary printed in summary mode).
  void phase(std::string name) {
    finish_phase();
    phase_ = std::move(name);
    start_ = std::chrono::steady_clock::now();
    experts_ = 0;
    bytes_ = 0;
    draw(true);
  }
  void finish_phase() {
    if (phase_.empty()) return;
    if (summary_) {
      std::fprintf(stderr, "moekit %s: %s: %s\n", cmd_.c_str(), phase_.c_str(), status().c_str());
    }
    phase_.clear();
  }

 private:
  static void hook(const char*, int64_t bytes) noexcept {
    Progress* p = active_;
    if (p == nullptr) return;
    p->experts_.fetch_add(1, std::memory_order_relaxed);
    p->bytes_.fetch_add(bytes, std::memory_order_relaxed);
    p->draw(false);
  }
  std::string status() const {
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    char buf[160];
    const int64_t n = experts_.load();
    if (n > 0) {
      std::snprintf(buf, sizeof buf, "%lld experts packed (%.2f GB), %.1f s", static_cast<long long>(n),
                    static_cast<double>(bytes_.load()) / 1e9, sec);
    } else {
      std::snprintf(buf, sizeof buf, "%.1f s", sec);
    }
    return buf;
  }
  void draw(bool force) noexcept {
    if (!live_) return;
    const auto now = std::chrono::steady_clock::now();
    if (!force && now - last_ < std::chrono::milliseconds(100)) return;
    bool expected = false;
    if (!drawing_.compare_exchange_strong(expected, true)) return;  // another thread draws
    last_ = now;
    try {
      const std::string line = "moekit " + cmd_ + ": " + phase_ + ": " + status();
      std::fprintf(stderr, "\r\x1b[K%s", line.substr(0, 150).c_str());
      std::fflush(stderr);
      drawn_ = true;
    } catch (...) {
    }
    drawing_ = false;
  }
  void end_line() {
    finish_phase();
    if (live_ && drawn_) {
      std::fputs("\r\x1b[K", stderr);
      std::fflush(stderr);
    }
  }

  static inline Progress* active_ = nullptr;
  std::string cmd_, phase_;
  bool live_ = false, summary_ = false, drawn_ = false;
  moekit::ProgressHook previous_ = nullptr;
  std::chrono::steady_clock::time_point start_{}, last_{};
  std::atomic<int64_t> experts_{0}, bytes_{0};
  std::atomic<bool> drawing_{false};
};

// One integer of a list flag.
int64_t parse_int(const std::string& flag, const std::string& s, int64_t lo, int64_t hi) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end == s.c_str() || *end != '\0' || v < lo || v > hi)
    fail("--", flag, ": expected an integer in [", lo, ", ", hi, "], got \"", s, "\"");
  return v;
}

// A list flag as llama-bench takes them: comma-separated items, each an integer or a range
// `a-b` (step 1), `a-b+s` (adding s) or `a-b*m` (multiplying by m > 1); at most 1024 values.
std::vector<int64_t> int_list_flag(const std::map<std::string, std::string>& f, const std::string& name, int64_t def,
                                   int64_t lo, int64_t hi) {
  auto it = f.find(name);
  if (it == f.end()) return {def};
  std::vector<int64_t> out;
  std::string item;
  std::istringstream in(it->second);
  while (std::getline(in, item, ',')) {
    const size_t dash = item.find('-', 1);
    if (dash == std::string::npos) {
      out.push_back(parse_int(name, item, lo, hi));
    } else {
      const size_t op = item.find_first_of("+*", dash + 1);
      const int64_t a = parse_int(name, item.substr(0, dash), lo, hi);
      const int64_t b = parse_int(name, item.substr(dash + 1, op == std::string::npos ? std::string::npos : op - dash - 1), lo, hi);
      const bool mul = op != std::string::npos && item[op] == '*';
      const int64_t step = op == std::string::npos ? 1 : parse_int(name, item.substr(op + 1), mul ? 2 : 1, hi);
      if (b < a) fail("--", name, ": range \"", item, "\" expected its end >= its start");
      for (int64_t v = a; v <= b; v = mul ? v * step : v + step) {
        out.push_back(v);
        if (out.size() > 1024) fail("--", name, ": more than 1024 values");
        if (mul && v == 0) break;  // 0 * m stays 0
      }
    }
    if (out.size() > 1024) fail("--", name, ": more than 1024 values");
  }
  if (out.empty()) fail("--", name, ": expected at least one value, got \"", it->second, "\"");
  return out;
}

int64_t int_flag(const std::map<std::string, std::string>& f, const std::string& name, int64_t def,
                 int64_t lo, int64_t hi) {
  auto it = f.find(name);
  if (it == f.end()) return def;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(it->second.c_str(), &end, 10);
  if (errno != 0 || end == it->second.c_str() || *end != '\0' || v < lo || v > hi)
    fail("--", name, ": expected an integer in [", lo, ", ", hi, "], got \"", it->second, "\"");
  return v;
}

const std::string& required(const std::map<std::string, std::string>& f, const std::string& name) {
  auto it = f.find(name);
  if (it == f.end()) fail("missing required flag --", name);
  return it->second;
}

// --dtype: the expert weight type that overrides the config's (experts.dtype, default f32);
// "bf16xbf16" is bf16 weights with bf16 activations (experts.bf16_activations). Parsed before
// any file is opened, so a bad flag is reported as such.
struct DtypeFlag {
  moekit::kernels::WeightType type;
  bool bf16_activations;  // set to true by bf16xbf16; the config's otherwise
};
DtypeFlag parse_dtype(const std::string& s) {
  if (s == "bf16xbf16") return DtypeFlag{moekit::kernels::WeightType::bf16, true};
  try {
    return DtypeFlag{moekit::kernels::parse_weight_type(s), false};
  } catch (const moekit::error& e) {
    fail("--dtype: ", e.what(), " (or bf16xbf16: bf16 weights and activations)");
  }
}
std::optional<DtypeFlag> dtype_flag(const std::map<std::string, std::string>& f) {
  auto it = f.find("dtype");
  if (it == f.end()) return std::nullopt;
  return parse_dtype(it->second);
}
// bench: --dtype may list several, comma-separated.
std::vector<std::optional<DtypeFlag>> dtype_list_flag(const std::map<std::string, std::string>& f) {
  auto it = f.find("dtype");
  if (it == f.end()) return {std::nullopt};
  std::vector<std::optional<DtypeFlag>> out;
  std::string item;
  std::istringstream in(it->second);
  while (std::getline(in, item, ',')) out.push_back(parse_dtype(item));
  if (out.empty() || out.size() > 64) fail("--dtype: expected 1 to 64 weight types, got \"", it->second, "\"");
  return out;
}

void apply_dtype(const std::optional<DtypeFlag>& d, moekit::LayerConfig& cfg) {
  if (!d) return;
  cfg.pack.type = d->type;
  if (d->bf16_activations) cfg.pack.bf16_activations = true;
}

// ---------------------------------------------------------------------------- run
// The input file of `run` (docs/cli.md): hidden_states and the optional batch tensors.
struct Input {
  int64_t tokens = 0;
  std::vector<float> x;
  std::vector<int32_t> offsets, positions, types;
  std::vector<uint8_t> padding;
  std::vector<float> state, scores;

  // A Batch viewing these arrays (valid while this object lives); an absent tensor is an
  // empty array, which Batch reads as "not given".
  [[nodiscard]] moekit::Batch batch(int64_t d) const {
    moekit::Batch b = moekit::Batch::single(tokens, d);
    b.sequence_offsets = offsets;
    b.positions = positions;
    b.padding = padding;
    b.token_types = types;
    b.router_state = state;
    b.token_scores = scores;
    return b;
  }
};

Input read_input(const moekit::io::TensorSource& input, const std::string& in_path, int64_t d) {
  Input in;
  if (!input.contains("hidden_states")) fail(in_path, ": tensor \"hidden_states\" [T, ", d, "] is missing");
  const auto& hv = input.tensor("hidden_states");
  if (hv.shape.size() != 2) fail(in_path, ": tensor \"hidden_states\" expected shape [T, ", d, "], got rank ", hv.shape.size());
  const int64_t T = in.tokens = hv.shape[0];
  in.x = input.read_f32("hidden_states", {T, d});
  if (input.contains("sequence_offsets")) in.offsets = input.read_i32("sequence_offsets", {-1});
  if (input.contains("positions")) in.positions = input.read_i32("positions", {T});
  if (input.contains("padding_mask")) in.padding = input.read_u8("padding_mask", {T});
  if (input.contains("token_types")) in.types = input.read_i32("token_types", {T});
  if (input.contains("router_state")) in.state = input.read_f32("router_state", {T, -1});
  if (input.contains("token_scores")) in.scores = input.read_f32("token_scores", {T});
  const int64_t bad = moekit::kernels::first_non_finite(in.x.data(), static_cast<int64_t>(in.x.size()));
  if (bad >= 0) fail(in_path, ": hidden_states[", bad / d, ", ", bad % d, "] is not finite (", in.x[static_cast<size_t>(bad)], ")");
  return in;
}

// ---------------------------------------------------------------------------- finding a layer
// The MoE block prefixes of a checkpoint: every tensor name ending in the router weight's name,
// that suffix removed (sorted by name).
std::vector<std::string> moe_block_prefixes(const moekit::io::TensorSource& w, const std::string& router) {
  std::vector<std::string> out;
  for (const std::string& n : w.names())
    if (n == router || n.ends_with("." + router)) out.push_back(n.substr(0, n.size() - router.size()));
  return out;
}

// The layer number inside a block prefix: the component after "layers", "blocks", "h" or
// "layer" ("model.layers.12.mlp." -> 12), or -1.
int64_t layer_of(const std::string& prefix) {
  std::vector<std::string> parts;
  size_t b = 0;
  for (size_t i = 0; i <= prefix.size(); ++i)
    if (i == prefix.size() || prefix[i] == '.') {
      parts.push_back(prefix.substr(b, i - b));
      b = i + 1;
    }
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    const std::string& p = parts[i];
    const std::string& n = parts[i + 1];
    if ((p == "layers" || p == "blocks" || p == "h" || p == "layer") && !n.empty() && n.size() <= 9 &&
        n.find_first_not_of("0123456789") == std::string::npos)
      return std::stoll(n);
  }
  return -1;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// "a, b, ... (N blocks: layers x-y)": the prefixes a message lists (at most 6 named).
std::string list_prefixes(const std::vector<std::string>& ps) {
  std::string s;
  for (size_t i = 0; i < ps.size() && i < 6; ++i) s += (i ? ", \"" : "\"") + ps[i] + "\"";
  if (ps.size() > 6) s += ", ...";
  int64_t lo = -1, hi = -1;
  for (const std::string& p : ps) {
    const int64_t l = layer_of(p);
    if (l >= 0) {
      lo = lo < 0 ? l : std::min(lo, l);
      hi = std::max(hi, l);
    }
  }
  s += " (" + std::to_string(ps.size()) + (ps.size() == 1 ? " block" : " blocks");
  if (lo >= 0) s += ", layers " + std::to_string(lo) + "-" + std::to_string(hi);
  return s + ")";
}

// A --prefix under which the router weight is missing: fail naming the blocks the checkpoint
// has and the closest one.
void check_prefix(const moekit::io::TensorSource& w, const std::string& weights_path, const moekit::LayerConfig& c,
                  const std::string& prefix) {
  if (c.router_type != "topk") return;  // other families name their tensors themselves
  const std::string router = c.router_weight_tensor();
  if (w.contains(prefix + router)) return;
  const std::vector<std::string> blocks = moe_block_prefixes(w, router);
  if (blocks.empty())
    fail("--prefix \"", prefix, "\": no tensor \"", prefix + router, "\" in ", weights_path, ", and no tensor there ends in \".",
         router, "\" (the router weight of this config's layout): is it the checkpoint of this config?");
  const std::string* best = &blocks.front();
  for (const std::string& b : blocks)
    if (edit_distance(b, prefix) < edit_distance(*best, prefix)) best = &b;
  fail("--prefix \"", prefix, "\": no tensor \"", prefix + router, "\" in ", weights_path, "; did you mean \"", *best,
       "\"? The checkpoint's MoE blocks: ", list_prefixes(blocks));
}

// --model DIR: config.json, the weights (model.safetensors.index.json, model.safetensors, or
// the folder's only .safetensors file).
struct ModelDir {
  std::string config, weights;
};
ModelDir model_dir(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) fail("--model \"", dir, "\": expected a model folder");
  const std::string base = dir.empty() || dir.back() == '/' ? dir : dir + "/";
  auto exists = [](const std::string& p) {
    struct stat s {};
    return ::stat(p.c_str(), &s) == 0;
  };
  ModelDir m{base + "config.json", ""};
  if (!exists(m.config)) fail("--model \"", dir, "\": no config.json in the folder");
  if (exists(base + "model.safetensors.index.json")) {
    m.weights = base + "model.safetensors.index.json";
  } else if (exists(base + "model.safetensors")) {
    m.weights = base + "model.safetensors";
  } else {
    std::vector<std::string> found;
    if (DIR* d = ::opendir(dir.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0) found.push_back(n);
        if (found.size() > 2) break;
      }
      ::closedir(d);
    }
    if (found.size() != 1)
      fail("--model \"", dir, "\": expected model.safetensors.index.json, model.safetensors or one .safetensors file, found ",
           found.empty() ? "none" : "several .safetensors files and no index");
    m.weights = base + found.front();
  }
  return m;
}

// The block prefix of --layer N (or of the only MoE block when --layer is not given).
std::string layer_prefix(const moekit::io::TensorSource& w, const std::string& weights_path,
                         const moekit::LayerConfig& c, int64_t layer) {
  MOEKIT_CHECK(c.router_type == "topk", "--model: expected an HF config.json (top-k MoE), got router type \"",
               c.router_type, "\"; use --config / --weights / --prefix");
  const std::vector<std::string> blocks = moe_block_prefixes(w, c.router_weight_tensor());
  if (blocks.empty())
    fail("--model: no MoE block in ", weights_path, ": no tensor ends in \".", c.router_weight_tensor(), "\"");
  if (layer < 0) {
    if (blocks.size() == 1) return blocks.front();
    fail("--layer: required, the checkpoint has ", list_prefixes(blocks));
  }
  std::vector<std::string> hits;
  for (const std::string& b : blocks)
    if (layer_of(b) == layer) hits.push_back(b);
  if (hits.size() == 1) return hits.front();
  if (hits.empty()) fail("--layer ", layer, ": no MoE block in that layer; the checkpoint's MoE blocks: ", list_prefixes(blocks));
  fail("--layer ", layer, ": several MoE blocks in that layer: ", list_prefixes(hits), "; use --config / --weights / --prefix");
}

// --gguf FILE [--layer N]: the GGUF file's MoE layer N (or its only one).
std::unique_ptr<moekit::AnyLayer> gguf_layer(const std::string& path, int64_t layer_no,
                                             const std::optional<DtypeFlag>& dtype, moekit::LayerConfig& cfg) {
  const moekit::io::GgufFile g = moekit::io::GgufFile::open(path);
  if (layer_no < 0) {
    const std::vector<int64_t> layers = moekit::gguf_moe_layers(g);
    if (layers.size() != 1) {
      std::string list;
      for (size_t i = 0; i < layers.size() && i < 8; ++i) list += (i ? ", " : "") + std::to_string(layers[i]);
      if (layers.size() > 8) list += ", ... (" + std::to_string(layers.size()) + " layers)";
      fail("--layer: required, ", path, " has ",
           layers.empty() ? "no MoE layer (no blk.N.ffn_gate_inp.weight)" : "MoE layers " + list);
    }
    layer_no = layers.front();
  }
  cfg = moekit::gguf_layer_config(g, layer_no);
  apply_dtype(dtype, cfg);
  return moekit::load_any_layer_gguf(g, layer_no, cfg);
}

// The config, weights and prefix of `run` and `pack` from --config / --weights / --prefix or
// --model [--layer N]; the output must be none of the files read.
struct LayerSource {
  moekit::LayerConfig cfg;
  std::string config_path;
  std::unique_ptr<moekit::io::TensorSource> weights;
  std::string prefix;
};
LayerSource layer_source(const std::map<std::string, std::string>& f, const std::optional<DtypeFlag>& dtype,
                         int64_t layer_no, const std::string& out_path, const std::string& in_path) {
  const bool by_model = f.count("model") != 0;
  const ModelDir md = by_model ? model_dir(f.at("model")) : ModelDir{required(f, "config"), required(f, "weights")};
  LayerSource s;
  s.config_path = md.config;
  s.cfg = moekit::load_layer_config(md.config);
  apply_dtype(dtype, s.cfg);
  std::vector<std::pair<std::string, std::string>> inputs = {{"--config", md.config}, {"--weights", md.weights}};
  if (!in_path.empty()) inputs.emplace_back("--input", in_path);
  refuse_output_over_inputs(out_path, inputs);
  // The weights' mapping is released once the layer holds its own (packed) copy.
  s.weights = std::make_unique<moekit::io::TensorSource>(moekit::io::TensorSource::open(md.weights));
  std::vector<std::pair<std::string, std::string>> shards;
  for (const std::string& shard : s.weights->files()) shards.emplace_back("a weight shard", shard);
  refuse_output_over_inputs(out_path, shards);
  s.prefix = by_model ? layer_prefix(*s.weights, md.weights, s.cfg, layer_no) : (f.count("prefix") ? f.at("prefix") : "");
  check_prefix(*s.weights, md.weights, s.cfg, s.prefix);
  return s;
}

int cmd_run_ep(const std::map<std::string, std::string>& f, int64_t ranks);
int64_t ep_ranks(const std::map<std::string, std::string>& f);

// --trace FILE: checked before the layer runs (not one of the run's files; an existing file must
// be a routing trace, which is extended, never clobbered).
void check_trace_flag(const std::map<std::string, std::string>& f) {
  if (!f.count("trace")) return;
  const std::string& t = f.at("trace");
  std::vector<std::pair<std::string, std::string>> files;
  for (const char* k : {"output", "input", "config", "weights", "packed", "gguf", "ep-stats"})
    if (f.count(k)) {
      if (f.at(k) == t) fail("--trace \"", t, "\" is also --", k);
      files.emplace_back(std::string("--") + k, f.at(k));
    }
  refuse_output_over_inputs(t, files, "--trace");
  struct stat st {};
  if (::stat(t.c_str(), &st) != 0) return;  // a new file
  if (!S_ISREG(st.st_mode)) fail("--trace \"", t, "\": not a regular file");
  if (!moekit::io::is_trace_file(t))
    fail("--trace \"", t, "\": exists and is not a routing trace; refusing to overwrite it");
}

// The layer number a trace records: --layer, else the number in the block prefix
// ("model.layers.12.mlp." -> 12), else 0.
int64_t trace_layer_number(const std::map<std::string, std::string>& f, const std::string& prefix) {
  if (f.count("layer")) return int_flag(f, "layer", -1, 0, int64_t{1} << 30);
  return std::max<int64_t>(layer_of(prefix), 0);
}

// Adds (or replaces) layer `layer` of the trace file with `t` (and the input's sequences).
void write_trace_layer(const std::string& path, int64_t layer, moekit::offload::LayerTrace t,
                       const std::vector<int32_t>& sequence_offsets) {
  t.sequence_offsets = sequence_offsets.size() >= 2 ? sequence_offsets : std::vector<int32_t>{};
  moekit::io::RoutingTrace trace;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) trace = moekit::io::read_trace(path);
  trace.layers[layer] = std::move(t);
  moekit::io::write_trace(path, trace);
}

// The layer flags of `run` (with or without --ep): which source, and the required ones.
void check_run_layer_flags(const std::map<std::string, std::string>& f) {
  const bool by_model = f.count("model") != 0, by_gguf = f.count("gguf") != 0, by_packed = f.count("packed") != 0;
  if (by_packed)
    for (const char* k : {"config", "weights", "prefix", "model", "gguf", "layer", "dtype"})
      if (f.count(k)) fail("--packed and --", k, " exclude each other (the packed file holds the layer and its weight type)");
  if (by_model && by_gguf) fail("--model and --gguf exclude each other");
  if (by_model || by_gguf) {
    for (const char* k : {"config", "weights", "prefix"})
      if (f.count(k))
        fail(by_model ? "--model" : "--gguf", " and --", k, " exclude each other (",
             by_model ? "--model finds the config, weights and prefix)" : "the GGUF file holds the config and weights)");
  } else if (f.count("layer")) {
    fail("--layer needs --model or --gguf (with --config / --weights, name the block with --prefix)");
  }
  if (by_model || by_gguf || by_packed) {
    require_flags(f, {"input", "output"});
  } else {
    require_flags(f, {"config", "weights", "input", "output"});
  }
}

int64_t launcher_rank();

int cmd_run(const std::map<std::string, std::string>& f) {
  int64_t ep = 0;
  try {
    ep = ep_ranks(f);
  } catch (const moekit::error&) {
    if (launcher_rank() > 0) throw QuietExit{2};  // under a launcher, rank 0 reports
    throw;
  }
  if (ep > 0) return cmd_run_ep(f, ep);
  const auto dtype = dtype_flag(f);
  const bool by_gguf = f.count("gguf") != 0, by_packed = f.count("packed") != 0;
  check_run_layer_flags(f);
  check_trace_flag(f);
  const int64_t layer_no = int_flag(f, "layer", -1, 0, int64_t{1} << 30);
  const int threads = static_cast<int>(int_flag(f, "threads", 0, 0, 4096));
  const std::string out_path = required(f, "output");
  std::unique_ptr<moekit::AnyLayer> layer;
  const std::string in_path = required(f, "input");
  moekit::LayerConfig cfg;
  std::string block_prefix;  // the MoE block's tensor prefix (for --trace's layer number)
  Progress progress("run");
  progress.phase("loading the layer");
  if (by_packed) {
    refuse_output_over_inputs(out_path, {{"--packed", f.at("packed")}, {"--input", in_path}});
    layer = moekit::load_any_layer_packed(f.at("packed"));
    cfg = layer->config();
  } else if (by_gguf) {
    refuse_output_over_inputs(out_path, {{"--gguf", f.at("gguf")}, {"--input", in_path}});
    layer = gguf_layer(f.at("gguf"), layer_no, dtype, cfg);
  } else {
    LayerSource src = layer_source(f, dtype, layer_no, out_path, in_path);
    cfg = src.cfg;
    block_prefix = src.prefix;
    layer = moekit::load_any_layer(cfg, *src.weights, src.prefix);
  }
  const int64_t d = cfg.hidden();
  progress.phase("running");
  const Input in = read_input(moekit::io::TensorSource::open(in_path), in_path, d);
  const int64_t T = in.tokens;
  std::vector<float> y(static_cast<size_t>(T * d));
  layer->forward(in.batch(d), in.x.data(), y.data(), threads);
  // Every family's output, scanned once (the top-k layer checks its own; the depth / skip
  // families do not): a finite input must not give a silently non-finite output file.
  for (int64_t t = 0; t < T; ++t) {
    if (!in.padding.empty() && in.padding[static_cast<size_t>(t)] != 0) continue;
    const int64_t j = moekit::kernels::first_non_finite(y.data() + t * d, d);
    if (j >= 0)
      fail("the layer's output hidden_states[", t, ", ", j, "] is ", y[static_cast<size_t>(t * d + j)],
           " although the input is finite: an expert, block or the combine overflowed f32 (weights or "
           "activations too large); nothing written");
  }
  const std::vector<moekit::NamedTensor> extra = layer->outputs();
  std::vector<moekit::io::OutTensor> out = {{"hidden_states", moekit::io::DType::F32, {T, d}, y.data()}};
  for (const auto& t : extra) out.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  std::optional<moekit::offload::LayerTrace> trace;
  if (f.count("trace")) {  // before anything is written: a family without a plan writes nothing
    const moekit::RoutingPlan* plan = layer->routing_plan();
    if (plan == nullptr) fail("--trace: the ", cfg.router_type, " family has no expert routing to trace");
    trace = moekit::offload::LayerTrace::from_plan(*plan);
  }
  moekit::io::write_safetensors(out_path, out, {{"producer", std::string("moekit ") + moekit::version()}});
  if (trace) write_trace_layer(f.at("trace"), trace_layer_number(f, block_prefix), std::move(*trace), in.offsets);
  return 0;
}

// ---------------------------------------------------------------------------- run --ep
// Expert parallelism (docs/scale-out.md): `moekit run --ep N ...` relaunches itself as
// `mpiexec -q -n N moekit run ...`; under an MPI launcher (Open MPI, MPICH's Hydra, PMIx) with
// more than one rank, `run` splits the tokens into N contiguous parts, each rank holds its
// shard of the experts and rank 0 writes the whole output, equal to one process's.
char** g_argv = nullptr;  // the command line, for the relaunch

// The launcher's world size, or 0 when not started by one.
int64_t launcher_world_size() {
  // MOEKIT_EP_CHILD: set by run --ep's own relaunch (never relaunch again, whatever launcher).
  for (const char* v : {"MOEKIT_EP_CHILD", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"})
    if (const char* s = std::getenv(v); s != nullptr && *s != '\0') {
      char* end = nullptr;
      const long n = std::strtol(s, &end, 10);
      if (end != s && *end == '\0' && n >= 1) return n;
    }
  return std::getenv("PMIX_RANK") != nullptr ? 1 : 0;
}

// This process's rank under a launcher (0 when not started by one).
int64_t launcher_rank() {
  for (const char* v : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"})
    if (const char* s = std::getenv(v); s != nullptr && *s != '\0') return std::strtol(s, nullptr, 10);
  return 0;
}

// 0: an ordinary run. Else the number of ranks of an expert-parallel run (checked flags).
int64_t ep_ranks(const std::map<std::string, std::string>& f) {
  const bool flag = f.count("ep") != 0;
  const int64_t world = launcher_world_size();
  for (const char* k : {"ep-placement", "ep-balance", "ep-wire", "ep-micro-batches", "ep-stats"})
    if (f.count(k) && !flag && world <= 1) fail("--", k, " needs --ep N (or mpirun -np N)");
  const int64_t n = flag ? int_flag(f, "ep", 1, 1, 1024) : 0;
  if (world > 0 && n > 0 && world != n) fail("--ep ", n, ": this launcher started ", world, " ranks; use mpirun -np ", n);
  if (world > 1) return world;
  return n;  // --ep 1 and single-rank launches run the same path on one rank
}

#ifndef MOEKIT_HAVE_EP
int cmd_run_ep(const std::map<std::string, std::string>&, int64_t) {
  fail("--ep: this moekit was built without MPI (install libopenmpi-dev openmpi-bin and rebuild)");
}
#else
#ifndef MOEKIT_MPIEXEC
#define MOEKIT_MPIEXEC "mpiexec"
#endif

// `mpiexec -q -n N --oversubscribe <this binary> <the same arguments>`; its exit code.
int relaunch_under_mpiexec(int64_t n) {
  // --bind-to none: each rank's threads may use every core it shares (the thread count below
  // divides the cores among the ranks of a node).
  std::vector<std::string> args = {MOEKIT_MPIEXEC, "-q", "-n", std::to_string(n), "--oversubscribe", "--bind-to", "none"};
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (len <= 0) fail("--ep: cannot find this program's path (/proc/self/exe) to relaunch it under mpiexec");
  args.emplace_back(exe, static_cast<size_t>(len));
  for (char** a = g_argv + 1; *a != nullptr; ++a) args.emplace_back(*a);
  setenv("MOEKIT_EP_CHILD", std::to_string(n).c_str(), 1);  // the ranks never relaunch
  if (geteuid() == 0) {  // Open MPI refuses root unless told; the caller already runs as root
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(nullptr);
  // mpiexec's stderr (its own and the ranks') comes back through a pipe, line by line, minus
  // libevent's "[warn] Epoll ..." teardown notices: Open MPI 4.1's launcher prints them at
  // random when ranks exit early (a refused input), and they would break the one-line error.
  int fds[2];
  if (pipe(fds) != 0) fail("--ep: cannot start mpiexec: pipe failed");
  const pid_t pid = fork();
  if (pid < 0) fail("--ep: cannot start mpiexec: fork failed");
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], STDERR_FILENO);
    close(fds[1]);
    execvp(argv[0], argv.data());
    std::fprintf(stderr, "moekit run: error: --ep: cannot start %s (install openmpi-bin)\n", argv[0]);
    _exit(2);
  }
  close(fds[1]);
  std::string line;
  const auto forward = [&line] {
    if (line.rfind("[warn] Epoll ", 0) != 0) {
      std::fwrite(line.data(), 1, line.size(), stderr);
      std::fflush(stderr);
    }
    line.clear();
  };
  char buf[4096];
  for (;;) {
    const ssize_t n = read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (ssize_t i = 0; i < n; ++i) {
      line.push_back(buf[i]);
      if (buf[i] == '\n' || buf[i] == '\r') forward();  // '\r': progress lines stay live
    }
  }
  if (!line.empty()) forward();
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) fail("--ep: waiting for mpiexec failed");
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  std::fprintf(stderr, "moekit run: internal error: mpiexec ended by signal %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return 1;
}

// Each rank's stats of the last forward, gathered; rank 0 writes them as JSON.
template <class Layer>
void write_ep_stats(const std::string& path, const Layer& layer, const moekit::ep::Comm& comm, int64_t T) {
  const moekit::ep::Stats& s = layer.stats();
  const int P = comm.size();
  const std::vector<int64_t> mine = {s.tokens, s.rows_computed, s.rows_sent, s.bytes_sent, s.bytes_received,
                                     s.weight_bytes_sent, s.guests};
  std::vector<int64_t> all(mine.size() * static_cast<size_t>(P));
  comm.allgather(mine, all);
  const double times[4] = {s.seconds_route, s.seconds_exchange, s.seconds_experts, s.seconds_combine};
  std::vector<double> all_times(4 * static_cast<size_t>(P));
  MPI_Allgather(times, 4, MPI_DOUBLE, all_times.data(), 4, MPI_DOUBLE, comm.get());
  if (comm.rank() != 0) return;
  json per = json::array();
  int64_t bytes = 0;
  for (int r = 0; r < P; ++r) {
    const int64_t* v = all.data() + static_cast<size_t>(r) * mine.size();
    const double* t = all_times.data() + 4 * static_cast<size_t>(r);
    bytes += v[3];
    per.push_back({{"rank", r}, {"tokens", v[0]}, {"rows_computed", v[1]}, {"rows_sent", v[2]}, {"bytes_sent", v[3]},
                   {"bytes_received", v[4]}, {"weight_bytes_sent", v[5]}, {"guests", v[6]}, {"seconds_route", t[0]},
                   {"seconds_exchange", t[1]}, {"seconds_experts", t[2]}, {"seconds_combine", t[3]}});
  }
  const auto& o = layer.options();
  int64_t max_load = 0, sum_load = 0;
  for (int64_t v : s.rank_load) {
    max_load = std::max(max_load, v);
    sum_load += v;
  }
  const json j = {{"ranks", P},
                  {"tokens", T},
                  {"balance", o.balance == moekit::ep::Balance::llep ? "llep" : "none"},
                  {"wire", o.wire == moekit::ep::Wire::bf16 ? "bf16" : "f32"},
                  {"micro_batches", o.micro_batches},
                  {"expert_load", s.expert_load},
                  {"rank_load", s.rank_load},
                  {"max_over_mean_load", sum_load > 0 ? static_cast<double>(max_load) * P / static_cast<double>(sum_load) : 0.0},
                  {"rebalanced", s.rebalanced},
                  {"bytes_per_token", T > 0 ? static_cast<double>(bytes) / static_cast<double>(T) : 0.0},
                  {"per_rank", per}};
  std::ofstream out(path);
  out << j.dump(1) << "\n";
  out.close();
  if (!out) fail("--ep-stats: cannot write \"", path, "\"");
}

int cmd_run_ep(const std::map<std::string, std::string>& f, int64_t ranks) {
  namespace ep = moekit::ep;
  ep::Options opt;
  std::string placement_name, stats_path;
  try {  // the flags, checked before any launch; under a launcher only rank 0 reports
    placement_name = f.count("ep-placement") ? f.at("ep-placement") : "contiguous";
    if (placement_name != "contiguous" && placement_name != "round-robin")
      fail("--ep-placement: expected contiguous or round-robin, got \"", placement_name, "\"");
    const std::string balance = f.count("ep-balance") ? f.at("ep-balance") : "none";
    if (balance != "none" && balance != "llep") fail("--ep-balance: expected none or llep, got \"", balance, "\"");
    opt.balance = balance == "llep" ? ep::Balance::llep : ep::Balance::none;
    const std::string wire = f.count("ep-wire") ? f.at("ep-wire") : "f32";
    if (wire != "f32" && wire != "bf16") fail("--ep-wire: expected f32 or bf16, got \"", wire, "\"");
    opt.wire = wire == "bf16" ? ep::Wire::bf16 : ep::Wire::f32;
    opt.micro_batches = static_cast<int>(int_flag(f, "ep-micro-batches", 1, 1, 64));
    stats_path = f.count("ep-stats") ? f.at("ep-stats") : "";
    (void)dtype_flag(f);
    check_run_layer_flags(f);
    check_trace_flag(f);
    (void)int_flag(f, "layer", -1, 0, int64_t{1} << 30);
    (void)int_flag(f, "threads", 0, 0, 4096);
    if (!stats_path.empty()) {
      std::vector<std::pair<std::string, std::string>> files;
      for (const char* k : {"output", "input", "config", "weights", "packed", "gguf"})
        if (f.count(k)) {
          if (f.at(k) == stats_path) fail("--ep-stats \"", stats_path, "\" is also --", k);
          files.emplace_back(std::string("--") + k, f.at(k));
        }
      refuse_output_over_inputs(stats_path, files, "--ep-stats");
    }
  } catch (const moekit::error&) {
    if (launcher_rank() > 0) throw QuietExit{2};
    throw;
  }
  if (launcher_world_size() == 0) return relaunch_under_mpiexec(ranks);
  const auto dtype = dtype_flag(f);
  const bool by_gguf = f.count("gguf") != 0, by_packed = f.count("packed") != 0;
  const int64_t layer_no = int_flag(f, "layer", -1, 0, int64_t{1} << 30);
  int threads = static_cast<int>(int_flag(f, "threads", 0, 0, 4096));
  const std::string out_path = required(f, "output"), in_path = required(f, "input");

  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  struct Finalize {
    ~Finalize() { MPI_Finalize(); }
  } finalize;
  const ep::Comm comm(MPI_COMM_WORLD);
  const int me = comm.rank(), P = comm.size();
  if (P != ranks) {  // a launcher whose world size the environment did not tell
    if (me == 0)
      std::fprintf(stderr, "moekit run: error: --ep %lld: MPI started %d ranks; use mpirun -np %lld\n",
                   static_cast<long long>(ranks), P, static_cast<long long>(ranks));
    throw QuietExit{2};
  }
  if (threads == 0) {  // the node's cores shared among the ranks on it
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, me, MPI_INFO_NULL, &node);
    int local = 1;
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
    threads = std::max(1, omp_get_num_procs() / std::max(local, 1));
  }
  // Failures before the layer runs are local (each rank loads and reads): the lowest failing
  // rank prints its error, every rank exits 2.
  const auto agree = [&](const std::string& err) {
    const int first = comm.first(!err.empty());
    if (first < 0) return;
    if (first == me) std::fprintf(stderr, "moekit run: error: %s\n", one_line(err).c_str());
    throw QuietExit{2};
  };
  std::string err;
  moekit::LayerConfig cfg;
  std::string block_prefix;
  std::optional<moekit::TopKLayer> full;
  std::optional<moekit::SparseLayer<moekit::TopKRouter, ep::ShardedFfnBank>> mine;
  ep::Placement placement;
  Input in;
  try {
    std::optional<LayerSource> src;
    if (by_packed) {
      refuse_output_over_inputs(out_path, {{"--packed", f.at("packed")}, {"--input", in_path}});
      full.emplace(moekit::load_packed_layer(f.at("packed"), &cfg));
    } else if (by_gguf) {
      refuse_output_over_inputs(out_path, {{"--gguf", f.at("gguf")}, {"--input", in_path}});
      const moekit::io::GgufFile g = moekit::io::GgufFile::open(f.at("gguf"));
      int64_t ln = layer_no;
      if (ln < 0) {
        const std::vector<int64_t> layers = moekit::gguf_moe_layers(g);
        if (layers.size() != 1) fail("--layer: required, ", f.at("gguf"), " has ", layers.size(), " MoE layers");
        ln = layers.front();
      }
      cfg = moekit::gguf_layer_config(g, ln);
      apply_dtype(dtype, cfg);
      full.emplace(moekit::load_gguf_layer(g, ln, cfg));
    } else {
      src.emplace(layer_source(f, dtype, layer_no, out_path, in_path));
      cfg = src->cfg;
      block_prefix = src->prefix;
      if (cfg.router_type != "topk")
        fail("--ep: the ", cfg.router_type, " family is not supported over ranks (top-k layers: every HF model type)");
    }
    if (cfg.router.capacity_factor > 0)
      fail("--ep: capacity_factor ", cfg.router.capacity_factor,
           " limits each expert over the whole batch; each rank routes its own tokens, so the output would differ "
           "from one process (use a dropless config)");
    const int64_t E = cfg.router.num_experts;
    placement = placement_name == "round-robin" ? ep::Placement::round_robin(E, P) : ep::Placement::contiguous(E, P);
    if (placement.experts_of(me).empty())
      fail("--ep ", P, ": rank ", me, " would hold no expert (the layer has ", E, "); use at most ", E, " ranks");
    if (full) {  // a packed file or GGUF: loaded whole, then this rank keeps its shard
      mine.emplace(full->router(), ep::ShardedFfnBank::from_full(full->experts(), placement.experts_of(me)),
                   full->shared_experts());
      mine->set_weight_on_input(full->weight_on_input());
      mine->set_output_bias(full->output_bias());
      full.reset();
    } else {  // a safetensors checkpoint: only this rank's experts are read and packed
      mine.emplace(moekit::load_layer_shard(cfg, *src->weights, src->prefix, placement.experts_of(me)));
    }
    in = read_input(moekit::io::TensorSource::open(in_path), in_path, cfg.hidden());
  } catch (const moekit::error& e) {
    err = e.what();
  }
  agree(err);
  const int64_t d = cfg.hidden(), E = cfg.router.num_experts, T = in.tokens, k = cfg.router.k;
  const int64_t t0 = T * me / P, t1 = T * (me + 1) / P, n = t1 - t0;
  ep::ExpertParallelLayer<moekit::TopKRouter, ep::ShardedFfnBank> layer(std::move(*mine), placement, comm, opt);
  moekit::Batch batch = moekit::Batch::single(n, d);
  if (!in.padding.empty()) batch.padding = std::span<const uint8_t>(in.padding.data() + t0, static_cast<size_t>(n));
  std::vector<float> y(static_cast<size_t>(n * d));
  ep::EpWorkspace ws;
  try {
    layer.forward(batch, in.x.data() + t0 * d, y.data(), ws, threads);
    err.clear();
  } catch (const ep::remote_error&) {
    err = " ";  // another rank reports it
  } catch (const moekit::error& e) {
    err = e.what();
  }
  {
    const int first = comm.first(!err.empty() && err != " ");
    if (!err.empty()) {
      if (first == me) std::fprintf(stderr, "moekit run: error: %s\n", one_line(err).c_str());
      throw QuietExit{2};
    }
  }
  // Rank 0 gathers the rows and the routing, checks and writes the file.
  std::vector<int32_t> ids(static_cast<size_t>(n * k));
  std::vector<float> w(static_cast<size_t>(n * k));
  ws.home.plan.to_topk(k, ids.data(), w.data());
  std::vector<int64_t> rows(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r) rows[static_cast<size_t>(r)] = T * (r + 1) / P - T * r / P;
  std::vector<float> Y(me == 0 ? static_cast<size_t>(T * d) : 0), W(me == 0 ? static_cast<size_t>(T * k) : 0);
  std::vector<int32_t> I(me == 0 ? static_cast<size_t>(T * k) : 0);
  const auto gather = [&](const void* mine_rows, void* all, size_t row_bytes) {
    // Rows to rank 0 only: every other rank sends to rank 0, rank 0 receives from all.
    std::vector<int64_t> to(static_cast<size_t>(P), 0), from(static_cast<size_t>(P), 0);
    to[0] = n;
    if (me == 0) from = rows;
    if (row_bytes > 0) comm.alltoallv(mine_rows, to, all, from, row_bytes);
  };
  gather(y.data(), Y.data(), static_cast<size_t>(d) * sizeof(float));
  if (k > 0) {
    gather(ids.data(), I.data(), static_cast<size_t>(k) * sizeof(int32_t));
    gather(w.data(), W.data(), static_cast<size_t>(k) * sizeof(float));
  }
  if (!stats_path.empty()) write_ep_stats(stats_path, layer, comm, T);
  if (me != 0) return 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!in.padding.empty() && in.padding[static_cast<size_t>(t)] != 0) continue;
    const int64_t j = moekit::kernels::first_non_finite(Y.data() + t * d, d);
    if (j >= 0)
      fail("the layer's output hidden_states[", t, ", ", j, "] is ", Y[static_cast<size_t>(t * d + j)],
           " although the input is finite: an expert or the combine overflowed f32; nothing written");
  }
  std::vector<moekit::io::OutTensor> out = {{"hidden_states", moekit::io::DType::F32, {T, d}, Y.data()},
                                            {"topk_ids", moekit::io::DType::I32, {T, k}, I.data()},
                                            {"topk_weights", moekit::io::DType::F32, {T, k}, W.data()}};
  moekit::io::write_safetensors(out_path, out, {{"producer", std::string("moekit ") + moekit::version()}});
  if (f.count("trace")) {
    moekit::offload::LayerTrace t;
    t.num_experts = E;
    t.k = k;
    t.ids = I;
    write_trace_layer(f.at("trace"), trace_layer_number(f, block_prefix), std::move(t), in.offsets);
  }
  return 0;
}
#endif

// ---------------------------------------------------------------------------- bench
size_t l3_bytes() {
  const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return v > 0 ? static_cast<size_t>(v) : size_t{512} << 20;
}

double physical_bytes() {
  return static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
}

std::string csv_field(const json& v) {
  std::string s = v.is_string() ? v.get<std::string>() : v.dump();
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

// The flat columns of csv and md (nested shape keys flattened).
const char* const kBenchColumns[] = {"preset",      "router",   "num_experts", "k",           "hidden_size",
                                     "intermediate_size", "dtype", "tokens", "threads", "repeat", "layers",
                                     "mean_ms",     "median_ms", "min_ms",     "stddev_ms",   "tokens_per_s",
                                     "gflops",      "weight_gbps", "kernel",   "cpu",         "moekit_version",
                                     "git_commit"};
json bench_column(const json& r, const std::string& c) {
  if (r.contains(c)) return r.at(c);
  return r.at("shape").contains(c) ? r.at("shape").at(c) : json(nullptr);
}

// Per --dtype the layer instances are built once, then timed at every (threads, tokens) pair;
// one record per configuration.
int cmd_bench(const std::map<std::string, std::string>& f) {
  const auto dtypes = dtype_list_flag(f);
  const std::vector<int64_t> tokens_list = int_list_flag(f, "tokens", 512, 0, int64_t{1} << 24);
  const std::vector<int64_t> threads_list = int_list_flag(f, "threads", 0, 0, 4096);
  const int64_t repeat = int_flag(f, "repeat", 10, 1, 1000000);
  const uint64_t seed = static_cast<uint64_t>(int_flag(f, "seed", 1, 0, INT64_MAX));
  const std::string format = f.count("output-format") ? f.at("output-format") : "json";
  if (format != "json" && format != "jsonl" && format != "csv" && format != "md")
    fail("-o / --output-format: expected json, jsonl, csv or md, got \"", format, "\"");
  if (dtypes.size() * threads_list.size() * tokens_list.size() > 4096)
    fail("--dtype x --threads x --tokens: ", dtypes.size() * threads_list.size() * tokens_list.size(),
         " configurations, expected at most 4096");
  const moekit::LayerConfig base = moekit::load_layer_config(required(f, "config"));
  const moekit::CpuFeatures& cpu = moekit::cpu_features();
  std::vector<json> records;
  Progress progress("bench");
  const size_t configurations = dtypes.size() * threads_list.size() * tokens_list.size();
  size_t configuration = 0;
  for (const auto& dtype : dtypes) {
    moekit::LayerConfig cfg = base;
    // Without --dtype, an HF config's torch_dtype picks the weight type when moekit has it.
    if (!dtype && cfg.origin == "hf" && cfg.torch_dtype == "bfloat16") cfg.pack.type = moekit::kernels::WeightType::bf16;
    apply_dtype(dtype, cfg);
    // The first instance tells the resident size; more follow only if they fit.
    std::vector<std::unique_ptr<moekit::AnyLayer>> inst;
    const double budget = 0.5 * physical_bytes();
    const double estimate = moekit::layer_weight_bytes(cfg);
    if (estimate > budget)
      fail("--config: the layer needs ", estimate / 1e9, " GB of weights, more than half of this machine's ",
           physical_bytes() / 1e9, " GB; shrink num_experts or the sizes in a copy of the config");
    progress.phase(std::string("building layer 1 (") + moekit::kernels::to_string(cfg.pack.type) + ')');
    inst.push_back(moekit::random_any_layer(cfg, seed));
    const double layer_bytes = inst[0]->resident_bytes();
    if (layer_bytes > budget)
      fail("--config: the layer holds ", layer_bytes / 1e9, " GB of weights, more than half of this machine's ",
           physical_bytes() / 1e9, " GB");
    // Enough instances that the weights rotated over exceed twice the L3 (not cache-resident).
    int64_t layers = static_cast<int64_t>(std::ceil(2.0 * static_cast<double>(l3_bytes()) / std::max(layer_bytes, 1.0)));
    layers = std::clamp<int64_t>(layers, 1, std::max<int64_t>(1, static_cast<int64_t>(budget / std::max(layer_bytes, 1.0))));
    layers = std::min<int64_t>(layers, 64);
    layers = int_flag(f, "layers", layers, 1, 4096);
    if (layers > 1) progress.phase("building layers 2-" + std::to_string(layers));
    for (int64_t i = 1; i < layers; ++i) inst.push_back(moekit::random_any_layer(cfg, seed + static_cast<uint64_t>(i)));
    const int64_t d = cfg.hidden();
    // Router weights: in resident_bytes for every family; the top-k router's gate here.
    const double router_bytes = cfg.router_type == "topk" ? 4.0 * static_cast<double>(cfg.router.num_experts * d) : 0.0;
    // Other router families keep E and k in their router object (null when they have none).
    const json router = cfg.router_json.empty() ? json::object() : json::parse(cfg.router_json);
    auto shape_value = [&](const char* key, int64_t topk_value) -> json {
      if (cfg.router_type == "topk") return topk_value;
      return router.contains(key) ? router.at(key) : json(nullptr);
    };
    for (const int64_t threads_flag : threads_list)
      for (const int64_t T : tokens_list) {
        const int threads = moekit::detail::resolve_threads(static_cast<int>(threads_flag));
        progress.phase("timing configuration " + std::to_string(++configuration) + " of " + std::to_string(configurations) +
                       " (T = " + std::to_string(T) + ", " + std::to_string(threads) + " threads)");
        std::vector<float> x(static_cast<size_t>(T * d)), y(static_cast<size_t>(T * d));
        uint64_t state = seed * 0x9E3779B97F4A7C15ull + 7;
        auto fresh_input = [&] {
          for (float& v : x) {
            state += 0x9E3779B97F4A7C15ull;
            v = static_cast<float>(static_cast<double>(moekit::detail::splitmix64(state) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
          }
        };
        moekit::Batch batch = moekit::Batch::single(T, d);
        // FTP's feature router reads each token's received attention: uniform in [0, 1), as make-input writes.
        std::vector<float> token_scores;
        if (cfg.router_type == "token_prune") {
          token_scores.resize(static_cast<size_t>(T));
          for (float& v : token_scores) {
            state += 0x9E3779B97F4A7C15ull;
            v = static_cast<float>(static_cast<double>(moekit::detail::splitmix64(state) >> 11) * (1.0 / 9007199254740992.0));
          }
          batch.token_scores = token_scores;
        }
        for (auto& l : inst) {  // warm-up: touches every instance's pages once
          fresh_input();
          l->forward(batch, x.data(), y.data(), threads);
        }
        std::vector<double> ms, gf, gbps, touched;
        for (int64_t r = 0; r < repeat; ++r) {
          fresh_input();
          auto& l = *inst[static_cast<size_t>(r % layers)];
          const auto t0 = std::chrono::steady_clock::now();
          l.forward(batch, x.data(), y.data(), threads);
          const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          const double experts = l.expert_bytes();
          ms.push_back(sec * 1e3);
          gf.push_back(l.executed_flops() / sec / 1e9);
          gbps.push_back((experts + (T > 0 ? router_bytes : 0.0)) / sec / 1e9);
          touched.push_back(experts);
        }
        auto median = [](std::vector<double> v) {
          std::sort(v.begin(), v.end());
          const size_t n = v.size();
          return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
        };
        double mean = 0, var = 0;
        for (double v : ms) mean += v / static_cast<double>(ms.size());
        for (double v : ms) var += (v - mean) * (v - mean);
        const double stddev = ms.size() > 1 ? std::sqrt(var / static_cast<double>(ms.size() - 1)) : 0.0;
        const double med_ms = median(ms);
        records.push_back({
            {"preset", cfg.preset},
            {"router", cfg.router_type},
            {"shape", {{"num_experts", shape_value("num_experts", cfg.router.num_experts)}, {"k", shape_value("k", cfg.router.k)},
                       {"hidden_size", d}, {"intermediate_size", cfg.experts.intermediate}, {"gated", cfg.experts.gated},
                       {"activation", moekit::activation_name(cfg.experts.act)},
                       {"shared_intermediate_size", cfg.shared ? cfg.shared->intermediate : 0}}},
            {"tokens", T},
            {"threads", threads},
            {"dtype", moekit::kernels::to_string(cfg.pack.type)},
            {"bf16_activations", cfg.pack.bf16_activations},
            {"repeat", repeat},
            {"layers", layers},
            {"mean_ms", mean},
            {"median_ms", med_ms},
            {"min_ms", *std::min_element(ms.begin(), ms.end())},
            {"stddev_ms", stddev},
            {"tokens_per_s", med_ms > 0 ? static_cast<double>(T) / (med_ms / 1e3) : 0.0},
            {"gflops", median(gf)},
            {"weight_gbps", median(gbps)},
            {"expert_weight_bytes", median(touched)},
            {"resident_weight_bytes_per_layer", layer_bytes},
            // product_key's atomic (one-neuron) experts are dot products on the row kernels.
            {"kernel", cfg.router_type == "product_key"
                           ? std::string("rows-") + moekit::kernels::row_kernels().name
                           : std::string(moekit::kernels::gemm_backend(cfg.pack.type, cfg.pack.bf16_activations))},
            {"cpu", cpu.brand},
            {"moekit_version", moekit::version()},
            {"git_commit", MOEKIT_GIT_COMMIT},
        });
      }
  }
  if (format == "json" || format == "jsonl") {
    for (const json& r : records) std::printf("%s\n", r.dump().c_str());
  } else if (format == "csv") {
    std::string line;
    for (const char* c : kBenchColumns) line += (line.empty() ? "" : ",") + std::string(c);
    std::printf("%s\n", line.c_str());
    for (const json& r : records) {
      line.clear();
      for (const char* c : kBenchColumns) line += (line.empty() ? "" : ",") + csv_field(bench_column(r, c));
      std::printf("%s\n", line.c_str());
    }
  } else {  // md: a Markdown table
    std::string head = "|", rule = "|";
    for (const char* c : kBenchColumns) {
      head += " " + std::string(c) + " |";
      rule += "---|";
    }
    std::printf("%s\n%s\n", head.c_str(), rule.c_str());
    for (const json& r : records) {
      std::string row = "|";
      for (const char* c : kBenchColumns) {
        const json v = bench_column(r, c);
        std::string cell = v.is_string() ? v.get<std::string>() : v.is_number_float() ? [&] {
          char b[32];
          std::snprintf(b, sizeof b, "%.4g", v.get<double>());
          return std::string(b);
        }() : v.dump();
        for (char& ch : cell)
          if (ch == '|') ch = '/';
        row += " " + cell + " |";
      }
      std::printf("%s\n", row.c_str());
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------- info
// ---------------------------------------------------------------------------- pack
// A top-k layer packed once for this machine's kernels, written as a pre-packed layer file
// (moekit/io/packed_layer.hpp) that `run --packed` maps without copying the experts.
int cmd_pack(const std::map<std::string, std::string>& f) {
  const auto dtype = dtype_flag(f);
  const bool by_model = f.count("model") != 0;
  if (by_model)
    for (const char* k : {"config", "weights", "prefix"})
      if (f.count(k)) fail("--model and --", k, " exclude each other (--model finds the config, weights and prefix)");
  if (!by_model && f.count("layer")) fail("--layer needs --model (with --config / --weights, name the block with --prefix)");
  require_flags(f, by_model ? std::initializer_list<const char*>{"output"}
                            : std::initializer_list<const char*>{"config", "weights", "output"});
  const int64_t layer_no = int_flag(f, "layer", -1, 0, int64_t{1} << 30);
  const std::string& out_path = f.at("output");
  Progress progress("pack");
  progress.phase("packing the layer");
  const std::string calib_path = f.count("calibrate") ? f.at("calibrate") : std::string();
  if (!calib_path.empty()) refuse_output_over_inputs(out_path, {{"--calibrate", calib_path}});
  LayerSource src = layer_source(f, dtype, layer_no, out_path, "");
  if (src.cfg.router_type != "topk")
    fail("--config: router type \"", src.cfg.router_type,
         "\": moekit pack writes top-k layers (HF model types and moekit topk configs) only");
  if (!calib_path.empty() && !moekit::kernels::quantises_activations(src.cfg.pack.type))
    fail("--calibrate: EAQuant smooths the int8 activations of w8a8 and w4a8; the weight type ",
         moekit::kernels::to_string(src.cfg.pack.type), " quantises no activations (pass --dtype w8a8 or w4a8)");
  std::ifstream in(src.config_path, std::ios::binary);
  const std::string config_text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) fail("--config \"", src.config_path, "\": read failed");
  std::optional<moekit::TopKLayer> calibrated;
  if (!calib_path.empty()) {  // EAQuant: statistics on the f32 layer, then the smoothed layer packed
    const Input cal = read_input(moekit::io::TensorSource::open(calib_path), calib_path, src.cfg.hidden());
    moekit::LayerConfig exact = src.cfg;
    exact.pack = {};
    progress.phase("calibrating (EAQuant) on " + std::to_string(cal.tokens) + " tokens");
    const moekit::TopKLayer ref = moekit::load_layer(exact, *src.weights, src.prefix);
    moekit::eaquant::Smoothing sm;
    try {
      sm = moekit::eaquant::calibrate(ref, cal.batch(src.cfg.hidden()), cal.x.data());
    } catch (const moekit::error& e) {
      fail("--calibrate \"", calib_path, "\": ", e.what());
    }
    progress.phase("packing the smoothed layer");
    calibrated.emplace(moekit::eaquant::apply(ref, sm, src.cfg.pack));
  }
  const moekit::TopKLayer layer =
      calibrated ? std::move(*calibrated) : moekit::load_layer(src.cfg, *src.weights, src.prefix);
  progress.phase("writing " + out_path);
  moekit::save_packed_layer(out_path, layer, config_text);
  return 0;
}

// ---------------------------------------------------------------------------- make-input
// Random hidden states for a config (docs/cli.md): hidden_states [T, d] from a normal
// distribution, sequence_offsets and positions for --sequences equal parts, and the tensors
// a family requires (token_scores for token_prune).
int cmd_make_input(const std::map<std::string, std::string>& f) {
  require_flags(f, {"config", "tokens", "output"});
  const int64_t T = int_flag(f, "tokens", 0, 0, int64_t{1} << 24);
  const auto seed = static_cast<uint64_t>(int_flag(f, "seed", 1, 0, std::numeric_limits<int64_t>::max()));
  const int64_t S = int_flag(f, "sequences", 1, 1, std::max<int64_t>(T, 1));
  const std::string& config = f.at("config");
  const std::string& out_path = f.at("output");
  refuse_output_over_inputs(out_path, {{"--config", config}});
  const moekit::LayerConfig cfg = moekit::load_layer_config(config);
  const int64_t d = cfg.hidden();
  if (T * d > (int64_t{1} << 31)) fail("--tokens ", T, " x hidden_size ", d, ": expected at most 2^31 values");
  double rho = 0.0;
  if (f.count("correlation")) {
    const std::string& v = f.at("correlation");
    char* end = nullptr;
    rho = std::strtod(v.c_str(), &end);
    if (v.empty() || end != v.c_str() + v.size() || !std::isfinite(rho) || rho < 0.0 || rho >= 1.0)
      fail("--correlation: expected a number in [0, 1), got \"", v, "\"");
  }
  std::mt19937_64 g(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(T * d));
  for (float& v : x) v = normal(g);
  std::vector<int32_t> offsets(static_cast<size_t>(S + 1)), positions(static_cast<size_t>(T));
  for (int64_t i = 0; i <= S; ++i) offsets[static_cast<size_t>(i)] = static_cast<int32_t>(T * i / S);
  if (rho > 0.0) {  // an AR(1) process over each sequence's tokens (routing locality to measure)
    const auto a = static_cast<float>(rho), b = static_cast<float>(std::sqrt(1.0 - rho * rho));
    for (int64_t i = 0; i < S; ++i)
      for (int64_t t = offsets[static_cast<size_t>(i)] + 1; t < offsets[static_cast<size_t>(i) + 1]; ++t)
        for (int64_t j = 0; j < d; ++j) x[static_cast<size_t>(t * d + j)] = a * x[static_cast<size_t>((t - 1) * d + j)] + b * x[static_cast<size_t>(t * d + j)];
  }
  for (int64_t i = 0; i < S; ++i)
    for (int32_t t = offsets[static_cast<size_t>(i)]; t < offsets[static_cast<size_t>(i) + 1]; ++t)
      positions[static_cast<size_t>(t)] = t - offsets[static_cast<size_t>(i)];
  using moekit::io::DType;
  std::vector<moekit::io::OutTensor> out = {{"hidden_states", DType::F32, {T, d}, x.data()},
                                            {"sequence_offsets", DType::I32, {S + 1}, offsets.data()},
                                            {"positions", DType::I32, {T}, positions.data()}};
  std::vector<float> scores;
  if (cfg.router_type == "token_prune") {  // FTP's feature router reads the attention each token receives
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    scores.resize(static_cast<size_t>(T));
    for (float& v : scores) v = u(g);
    out.push_back({"token_scores", DType::F32, {T}, scores.data()});
  }
  moekit::io::write_safetensors(out_path, out, {{"producer", std::string("moekit ") + moekit::version()}});
  return 0;
}

int cmd_info() {
  const moekit::CpuFeatures& f = moekit::cpu_features();
  // CPUID, counted only where the OS saves the registers (XCR0); "avx512vnni" is the older
  // spelling of avx512_vnni, kept for existing readers.
  const json features = {{"sse4.2", f.sse4_2},       {"avx", f.avx},
                         {"avx2", f.avx2},           {"fma", f.fma},
                         {"f16c", f.f16c},           {"avx512f", f.avx512f},
                         {"avx512bw", f.avx512bw},   {"avx512dq", f.avx512dq},
                         {"avx512vl", f.avx512vl},   {"avx512vnni", f.avx512_vnni},
                         {"avx512_vnni", f.avx512_vnni}, {"avx512_bf16", f.avx512_bf16},
                         {"avx512_fp16", f.avx512_fp16}, {"avx_vnni", f.avx_vnni},
                         {"amx_tile", f.amx_tile},   {"amx_bf16", f.amx_bf16},
                         {"amx_int8", f.amx_int8}};
  json by_type = json::object();
  json type_names = json::array();
  for (const auto t : moekit::kernels::kWeightTypes) type_names.push_back(moekit::kernels::to_string(t));
  for (const auto t : moekit::kernels::kWeightTypes)
    by_type[moekit::kernels::to_string(t)] = {
        {"kernel", moekit::kernels::active_gemm_kernel(t).name},
        {"why", moekit::kernels::gemm_kernel_reason(t)}};
  by_type["bf16xbf16"] = {  // bf16 weights with bf16 activations (--dtype bf16xbf16)
      {"kernel", moekit::kernels::active_gemm_kernel(moekit::kernels::WeightType::bf16, true).name},
      {"why", moekit::kernels::gemm_kernel_reason(moekit::kernels::WeightType::bf16, true)}};
  json out = {{"version", moekit::version()},
              {"cpu", {{"vendor", f.vendor}, {"brand", f.brand}}},
              {"cpu_features", features},
              {"cpu_reported_amx", {{"amx_tile", f.cpu_amx_tile}, {"amx_bf16", f.cpu_amx_bf16},
                                    {"amx_int8", f.cpu_amx_int8}}},
              {"os_saves_state", {{"avx", f.os_avx}, {"avx512", f.os_avx512}, {"amx", f.os_amx}}},
              {"amx_permission", moekit::to_string(moekit::request_amx_permission())},
              {"simd_arch", moekit::kernels::row_kernels().name},
              {"row_kernels", moekit::kernels::row_kernels().name},
              {"gemm_kernel", moekit::kernels::gemm_backend()},
              {"gemm_kernel_by_weight_type", by_type},
              {"gemm_kernels_compiled", [] {
                 json a = json::array();
                 for (const auto* k : moekit::kernels::compiled_gemm_kernels()) a.push_back(k->name);
                 return a;
               }()},
              {"gemm_kernels_supported", [] {
                 json a = json::array();
                 for (const auto* k : moekit::kernels::gemm_kernels()) a.push_back(k->name);
                 return a;
               }()},
              {"gemm_kernels_needs", [] {
                 json o = json::object();
                 for (const auto* k : moekit::kernels::compiled_gemm_kernels())
                   o[k->name] = moekit::kernels::gemm_kernel_needs(*k);
                 return o;
               }()},
              {"weight_types", type_names},
              {"kernel_override", "MOEKIT_KERNEL=scalar|simd|<compiled kernels' names, comma-separated>"},
              {"dispatch", "run time, from CPUID: per weight type, the fastest compiled kernel this CPU supports that implements it (row kernels: the fastest general one)"},
              {"omp_max_threads", omp_get_max_threads()},
              {"l3_bytes", l3_bytes()}};
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

// ---------------------------------------------------------------------------- trace-stats
int cmd_trace_stats(const std::map<std::string, std::string>& f, const std::vector<std::string>& files) {
  if (files.empty()) fail("expected at least one routing trace file (moekit run --trace writes them)");
  const std::vector<int64_t> segments = int_list_flag(f, "segments", 16, 1, int64_t{1} << 20);
  const std::string format = f.count("output-format") ? f.at("output-format") : "json";
  if (format != "json" && format != "md") fail("--output-format: expected json or md, got \"", format, "\"");
  std::map<int64_t, moekit::offload::LayerTrace> layers;
  for (const std::string& path : files) {
    for (auto& [l, t] : moekit::io::read_trace(path).layers) {
      auto it = layers.find(l);
      if (it == layers.end()) {
        layers.emplace(l, std::move(t));
      } else {
        if (it->second.num_experts != t.num_experts)
          fail(path, ": layer ", l, " has ", t.num_experts, " experts, an earlier file ", it->second.num_experts);
        it->second.append(t);
      }
    }
  }
  json out = {{"files", files}, {"layers", json::array()}};
  std::string md;
  for (const auto& [l, t] : layers) {
    const int64_t E = t.num_experts, k = std::max<int64_t>(t.k, 1);
    if (t.tokens() > (int64_t{1} << 32) / E)  // SRP and SCH cost about T x E per segment length
      fail("layer ", l, ": ", t.tokens(), " tokens x ", E, " experts: expected at most 2^32 (split the trace)");
    std::vector<int64_t> sizes;
    if (f.count("cache")) {
      sizes = int_list_flag(f, "cache", 1, 1, int64_t{1} << 20);
    } else {
      for (const int64_t c : {k, 2 * k, 4 * k, E / 2})
        if (c >= k && c <= E && std::find(sizes.begin(), sizes.end(), c) == sizes.end()) sizes.push_back(c);
      std::sort(sizes.begin(), sizes.end());
    }
    const std::vector<int64_t> load = moekit::offload::expert_load(t);
    int64_t total = 0, most = 0;
    for (const int64_t v : load) total += v, most = std::max(most, v);
    json L = {{"layer", l},
              {"tokens", t.tokens()},
              {"sequences", t.sequence_offsets.empty() ? 1 : static_cast<int64_t>(t.sequence_offsets.size()) - 1},
              {"num_experts", E},
              {"k", t.k},
              {"expert_load", load},
              {"max_over_mean_load", total > 0 ? static_cast<double>(most) * static_cast<double>(E) / static_cast<double>(total) : 0.0}};
    json srp = json::object(), sch = json::object(), hits = json::object();
    std::vector<std::vector<double>> sch_of;
    for (const int64_t m : segments) {
      const double v = moekit::offload::srp(t, m);
      srp[std::to_string(m)] = std::isnan(v) ? json(nullptr) : json(v);
      sch_of.push_back(moekit::offload::sch(t, m));
    }
    for (size_t i = 0; i < segments.size(); ++i) {
      json row = json::object();
      for (const int64_t c : sizes) {
        const double v = c >= 1 && c <= E ? sch_of[i][static_cast<size_t>(c - 1)] : std::nan("");
        row[std::to_string(c)] = std::isnan(v) ? json(nullptr) : json(v);
      }
      sch[std::to_string(segments[i])] = row;
    }
    for (const int64_t c : sizes) {
      if (c < std::max<int64_t>(t.k, 1) || c > E) {  // below one token's experts, or above E
        hits[std::to_string(c)] = {{"lru", nullptr}, {"lfu", nullptr}, {"belady", nullptr}};
        continue;
      }
      hits[std::to_string(c)] = {{"lru", moekit::offload::replay_cache(t, c, moekit::offload::CachePolicy::lru).hit_rate()},
                                 {"lfu", moekit::offload::replay_cache(t, c, moekit::offload::CachePolicy::lfu).hit_rate()},
                                 {"belady", moekit::offload::replay_cache(t, c, moekit::offload::CachePolicy::belady).hit_rate()}};
    }
    L["srp"] = srp;
    L["sch"] = sch;
    L["cache_hit_rate"] = hits;
    if (format == "md") {
      const auto num = [](const json& v) {
        if (v.is_null()) return std::string("-");
        char b[32];
        std::snprintf(b, sizeof b, "%.3f", v.get<double>());
        return std::string(b);
      };
      md += "## layer " + std::to_string(l) + ": " + std::to_string(t.tokens()) + " tokens, " + std::to_string(E) +
            " experts, k = " + std::to_string(t.k) + ", max / mean load " + num(L["max_over_mean_load"]) + "\n\n";
      md += "| segment m | SRP(m) |\n|---|---|\n";
      for (const int64_t m : segments) md += "| " + std::to_string(m) + " | " + num(srp[std::to_string(m)]) + " |\n";
      md += "\n| cache C | LRU | LFU | Belady |";
      for (const int64_t m : segments) md += " SCH(" + std::to_string(m) + ") |";
      md += "\n|---|---|---|---|";
      for (size_t i = 0; i < segments.size(); ++i) md += "---|";
      md += "\n";
      for (const int64_t c : sizes) {
        const json& h = hits[std::to_string(c)];
        md += "| " + std::to_string(c) + " | " + num(h["lru"]) + " | " + num(h["lfu"]) + " | " + num(h["belady"]) + " |";
        for (const int64_t m : segments) md += " " + num(sch[std::to_string(m)][std::to_string(c)]) + " |";
        md += "\n";
      }
      md += "\n";
    }
    out["layers"].push_back(std::move(L));
  }
  if (format == "md") {
    std::fputs(md.c_str(), stdout);
  } else {
    std::printf("%s\n", out.dump().c_str());
  }
  return 0;
}

}  // namespace

// The command line as a function: the fuzz targets (fuzz/) call it in-process.
int moekit_cli_main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs("moekit: error: missing command (expected run, bench, pack, make-input, trace-stats or info; see moekit --help)\n", stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  g_argv = argv;
  try {
    if (cmd == "run") return cmd_run(parse_flags(cmd, kRunHelp, argc, argv, 2, kRunFlags));
    if (cmd == "bench") return cmd_bench(parse_flags(cmd, kBenchHelp, argc, argv, 2, kBenchFlags));
    if (cmd == "pack") return cmd_pack(parse_flags(cmd, kPackHelp, argc, argv, 2, kPackFlags));
    if (cmd == "make-input") return cmd_make_input(parse_flags(cmd, kMakeInputHelp, argc, argv, 2, kMakeInputFlags));
    if (cmd == "trace-stats") {
      std::vector<std::string> files;
      const auto f = parse_flags(cmd, kTraceStatsHelp, argc, argv, 2, kTraceStatsFlags, &files, "routing trace files");
      return cmd_trace_stats(f, files);
    }
    if (cmd == "info") {
      parse_flags(cmd, "Prints the CPU's features and the kernels moekit chose, as JSON.", argc, argv, 2, {});
      return cmd_info();
    }
    if (cmd == "--version" || cmd == "version") {
      std::printf("moekit %s\n", moekit::version());
      return 0;
    }
    if (cmd == "--help" || cmd == "-h" || cmd == "help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    fail("unknown command \"", cmd, "\" (expected run, bench, pack, make-input, trace-stats or info)");
  } catch (const HelpShown&) {
    return 0;
  } catch (const QuietExit& q) {
    return q.code;
  } catch (const moekit::error& e) {
    std::fprintf(stderr, "moekit %s: error: %s\n", one_line(cmd, 40).c_str(), one_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moekit %s: internal error: %s\n", one_line(cmd, 40).c_str(),
                 one_line(e.what()).c_str());
    return 1;
  }
}

#ifndef MOEKIT_CLI_NO_MAIN
int main(int argc, char** argv) { return moekit_cli_main(argc, argv); }
#endif
