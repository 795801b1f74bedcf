// SPDX-License-Identifier: Apache-2.0
// save_packed_layer / load_packed_layer (moekit/io/packed_layer.hpp).
#include "moekit/io/packed_layer.hpp"

#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "files.hpp"
#include "layer_registry.hpp"
#include "moekit/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/version.hpp"

namespace moekit {
namespace {

using nlohmann::json;
using detail::fail;
constexpr const char* kFormat = "1";
// Format 2: format 1 plus `input_smoothing` tensors (EAQuant; a moekit that only knows format 1
// would ignore them and compute on unsmoothed inputs, so it must refuse such files).
constexpr const char* kFormatSmoothed = "2";

json layout_json(const kernels::PackedMatrix::Layout& L) {
  return {{"type", kernels::to_string(L.type)}, {"bf16_activations", L.bf16_activations}, {"f16_scales", L.f16_scales},
          {"gated", L.gated},                   {"n", L.n},                                {"k", L.k},
          {"kernel", L.kernel}};
}

kernels::PackedMatrix::Layout layout_of(const json& j, const std::string& where) {
  try {
    kernels::PackedMatrix::Layout L;
    L.type = kernels::parse_weight_type(j.at("type").get<std::string>());
    L.bf16_activations = j.at("bf16_activations").get<bool>();
    L.f16_scales = j.at("f16_scales").get<bool>();
    L.gated = j.at("gated").get<bool>();
    L.n = j.at("n").get<int64_t>();
    L.k = j.at("k").get<int64_t>();
    L.kernel = j.at("kernel").get<std::string>();
    return L;
  } catch (const json::exception& e) {
    fail(where, ": malformed layout (", e.what(), ")");
  }
}

// The tensors and layouts of one bank under `base` ("experts." or "shared.<j>.").
struct Writer {
  std::vector<io::OutTensor> packed, plain;
  json layouts = json::object();
  bool smoothed = false;

  void matrix(const std::string& name, const kernels::PackedMatrix& m) {
    const auto data = m.packed_data();
    packed.push_back({name, io::DType::U8, {static_cast<int64_t>(data.size())}, data.data()});
    const auto scales = m.packed_scales();
    if (!scales.empty())
      plain.push_back({name + "_scales", io::DType::F32, {static_cast<int64_t>(scales.size())}, scales.data()});
    layouts[name] = layout_json(m.layout());
  }
  void bank(const std::string& base, const FfnBank& b) {
    for (int64_t e = 0; e < b.num_experts(); ++e) {
      matrix(base + std::to_string(e) + ".in", b.in_matrix(e));
      matrix(base + std::to_string(e) + ".down", b.down_matrix(e));
    }
    if (!b.biases().empty())
      plain.push_back({base + "biases", io::DType::F32, {static_cast<int64_t>(b.biases().size())}, b.biases().data()});
    if (!b.input_smoothing().empty()) {
      plain.push_back({base + "input_smoothing", io::DType::F32, {static_cast<int64_t>(b.input_smoothing().size())},
                       b.input_smoothing().data()});
      smoothed = true;
    }
  }
  void f32(const std::string& name, const std::vector<float>& v, std::vector<int64_t> shape) {
    if (!v.empty()) plain.push_back({name, io::DType::F32, std::move(shape), v.data()});
  }
};

// One bank of `count` experts of `shape` under `base`, viewing the mapped file.
FfnBank read_bank(const io::TensorSource& src, const std::shared_ptr<const void>& keep, const json& layouts,
                  const std::string& base, int64_t count, FfnShape shape, bool smoothed, const std::string& where) {
  std::vector<kernels::PackedMatrix> in, down;
  auto matrix = [&](const std::string& name) {
    MOEKIT_CHECK(layouts.contains(name), where, ": no layout for tensor \"", name, "\" in moekit.layouts");
    const kernels::PackedMatrix::Layout L = layout_of(layouts.at(name), where + ": " + name);
    const io::TensorView& t = src.tensor(name);
    MOEKIT_CHECK(t.dtype == io::DType::U8 && t.shape.size() == 1, where, ": tensor \"", name,
                 "\" expected U8 [bytes], got ", io::dtype_name(t.dtype), " of rank ", t.shape.size());
    const float* scales = nullptr;
    size_t scale_count = 0;
    if (src.contains(name + "_scales")) {
      const io::TensorView& s = src.tensor(name + "_scales");
      MOEKIT_CHECK(s.dtype == io::DType::F32 && s.shape.size() == 1, where, ": tensor \"", name,
                   "_scales\" expected F32 [n], got ", io::dtype_name(s.dtype), " of rank ", s.shape.size());
      scales = reinterpret_cast<const float*>(s.data);
      scale_count = static_cast<size_t>(s.shape[0]);
    }
    try {
      return kernels::PackedMatrix::view(L, reinterpret_cast<const uint8_t*>(t.data), t.nbytes, scales, scale_count, keep);
    } catch (const error& e) {
      fail(where, ": tensor \"", name, "\": ", e.what());
    }
  };
  for (int64_t e = 0; e < count; ++e) {
    in.push_back(matrix(base + std::to_string(e) + ".in"));
    down.push_back(matrix(base + std::to_string(e) + ".down"));
  }
  MOEKIT_CHECK(shape.bias || !src.contains(base + "biases"), where, ": tensor \"", base,
               "biases\", but the config's experts have no biases");
  std::vector<float> biases;
  if (shape.bias) biases = src.read_f32(base + "biases", {count * shape.biases_per_expert()});
  MOEKIT_CHECK(smoothed || !src.contains(base + "input_smoothing"), where, ": tensor \"", base,
               "input_smoothing\" in a format-1 file (format 2 carries smoothing)");
  std::vector<float> smoothing;
  if (src.contains(base + "input_smoothing")) smoothing = src.read_f32(base + "input_smoothing", {shape.hidden});
  try {
    return FfnBank::from_packed(shape, std::move(in), std::move(down), std::move(biases), std::move(smoothing));
  } catch (const error& e) {
    fail(where, ": ", e.what());
  }
}

// Reads tensor `name` into `dst` when the config says the layer has it; a tensor the config
// does not expect is an error (file and config disagree).
void optional_f32(const io::TensorSource& src, const std::string& name, bool expected, const std::vector<int64_t>& shape,
                  std::vector<float>& dst, const std::string& where) {
  if (expected) {
    dst = src.read_f32(name, shape);
    return;
  }
  MOEKIT_CHECK(!src.contains(name), where, ": tensor \"", name, "\", which the config does not have");
}

}  // namespace

void save_packed_layer(const std::string& path, const TopKLayer& layer, const std::string& config_json) {
  Writer w;
  const TopKRouter& r = layer.router();
  const int64_t E = layer.num_experts(), d = layer.hidden_size();
  MOEKIT_CHECK(r.noise_weight().empty(), "save_packed_layer: noisy top-k routers are not supported");
  w.bank("experts.", layer.experts());
  std::vector<float> scales;
  scales.reserve(layer.shared_experts().size());
  for (size_t j = 0; j < layer.shared_experts().size(); ++j) scales.push_back(layer.shared_experts()[j].scale);
  for (size_t j = 0; j < layer.shared_experts().size(); ++j) {
    const SharedExpert& s = layer.shared_experts()[j];
    const std::string base = "shared." + std::to_string(j) + ".";
    w.bank(base, s.ffn);
    w.f32(base + "gate", s.gate, {d});
    w.f32(base + "coefficient", s.coefficient, {2, d});
    w.f32(base + "coefficient_bias", s.coefficient_bias, {2});
    w.plain.push_back({base + "scale", io::DType::F32, {1}, &scales[j]});
  }
  w.f32("router.weight", r.weight(), {E, d});
  w.f32("router.bias", r.bias(), {E});
  w.f32("router.logit_bias", r.logit_bias(), {E});
  std::vector<io::OutTensor> all = std::move(w.packed);  // packed values first: 64-byte multiples
  all.insert(all.end(), w.plain.begin(), w.plain.end());
  io::write_safetensors(path, all,
                        {{"moekit.packed", w.smoothed ? kFormatSmoothed : kFormat},
                         {"moekit.config", config_json},
                         {"moekit.layouts", w.layouts.dump()},
                         {"producer", std::string("moekit ") + version()}});
}

TopKLayer load_packed_layer(const std::string& path, LayerConfig* config_out) {
  const std::string where = "packed layer " + detail::quoted(path, 4096);
  io::SafetensorsFile file = io::SafetensorsFile::open(path);
  const auto& meta = file.metadata();
  auto entry = [&](const char* key) -> const std::string& {
    const auto it = meta.find(key);
    MOEKIT_CHECK(it != meta.end(), where, ": no \"", key,
                 "\" in the metadata: not a file `moekit pack` wrote (or from another version)");
    return it->second;
  };
  const std::string& format = entry("moekit.packed");
  MOEKIT_CHECK(format == kFormat || format == kFormatSmoothed, where, ": format version \"", format, "\", expected \"",
               kFormat, "\" or \"", kFormatSmoothed, "\" (pack it again with this moekit)");
  const bool smoothed = format == kFormatSmoothed;
  LayerConfig c = parse_layer_config(entry("moekit.config"), where + ": moekit.config");
  MOEKIT_CHECK(c.router_type == "topk", where, ": router type \"", c.router_type, "\", expected topk");
  const std::string& layouts_text = entry("moekit.layouts");
  const json layouts = detail::parse_untrusted_json(where + ": moekit.layouts", layouts_text.data(),
                                                    layouts_text.data() + layouts_text.size(), 8, "invalid JSON");
  MOEKIT_CHECK(layouts.is_object(), where, ": moekit.layouts expected a JSON object");
  auto src = std::make_shared<io::TensorSource>(io::TensorSource::of(std::move(file)));
  const std::shared_ptr<const void> keep = src;
  const int64_t E = c.router.num_experts, d = c.hidden();
  FfnBank bank = read_bank(*src, keep, layouts, "experts.", E, detail::routed_shape(c), smoothed, where);
  c.pack.type = bank.weight_type();
  c.pack.bf16_activations = bank.pack_options().bf16_activations;
  c.pack.f16_scales = bank.pack_options().f16_scales;
  std::vector<SharedExpert> shared;
  for (int64_t j = 0; src->contains("shared." + std::to_string(j) + ".0.in"); ++j) {
    MOEKIT_CHECK(c.shared.has_value(), where, ": shared expert tensors, but the config has no shared expert");
    const std::string base = "shared." + std::to_string(j) + ".";
    const FfnShape sh{d, c.shared->intermediate, c.experts.gated, c.experts.act};  // as detail::shared_experts
    SharedExpert s{read_bank(*src, keep, layouts, base, 1, sh, smoothed, where), {}};
    // What the config says the shared expert has, the file must have (and nothing else).
    optional_f32(*src, base + "gate", c.shared->gated, {d}, s.gate, where);
    optional_f32(*src, base + "coefficient", c.shared->residual_coefficient, {2, d}, s.coefficient, where);
    optional_f32(*src, base + "coefficient_bias", c.shared->residual_coefficient, {2}, s.coefficient_bias, where);
    s.scale = src->read_f32(base + "scale", {1})[0];
    shared.push_back(std::move(s));
  }
  MOEKIT_CHECK(shared.empty() == !c.shared.has_value(), where, ": the config has a shared expert, the file none");
  std::vector<float> bias, logit_bias;
  optional_f32(*src, "router.bias", c.router_bias, {E}, bias, where);
  optional_f32(*src, "router.logit_bias", c.router_logit_bias, {E}, logit_bias, where);
  TopKRouter router(c.router, src->read_f32("router.weight", {E, d}), std::move(bias));
  if (!logit_bias.empty()) router.set_logit_bias(std::move(logit_bias));
  TopKLayer layer(std::move(router), std::move(bank), std::move(shared));
  layer.set_weight_on_input(c.weight_on_input);
  if (config_out != nullptr) *config_out = std::move(c);
  return layer;
}

}  // namespace moekit
