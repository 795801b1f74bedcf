// SPDX-License-Identifier: Apache-2.0
// moekit's pre-packed layer files (`moekit pack`): a top-k layer whose experts are stored in the
// packed layout of the kernel they run on, so loading maps the file and copies no expert weight.
#pragma once

#include <string>

#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Writes `layer` (built from `config`, whose JSON text is `config_json`: the config file as
/// read) as a pre-packed layer file. The file is a safetensors file (atomically written):
///  - `__metadata__`: `moekit.packed` "1" (the format version; "2" when a bank has input
///    smoothing, which format-1 readers must not ignore), `moekit.config` (config_json),
///    `moekit.layouts` (JSON: each packed tensor's PackedMatrix::Layout), `producer`;
///  - `experts.<e>.in`, `experts.<e>.down` U8 (the packed values, each 64-byte aligned in the
///    file), `experts.<e>.in_scales`, `experts.<e>.down_scales` F32 (formats with scales),
///    `experts.biases` F32 (experts with biases), `experts.input_smoothing` F32 [d] (format 2:
///    FfnBank::input_smoothing(), EAQuant); the same under `shared.<j>.` for shared
///    expert j, with `shared.<j>.gate`, `.coefficient`, `.coefficient_bias` and `.scale` F32;
///  - `router.weight` F32 [E, d], `router.bias` F32 [E] (selection bias), `router.logit_bias`
///    F32 [E], when the router has them.
/// The packed values are only valid for the kernel named in the layouts (packing depends on
/// the kernel): load_packed_layer() refuses another.
void save_packed_layer(const std::string& path, const TopKLayer& layer, const std::string& config_json);

/// Maps a file save_packed_layer() wrote and builds the layer over it: the experts' packed
/// values stay in the mapped file (no copy; resident memory is the pages forward() touches,
/// shared with other processes mapping the same file), the router's tensors are copied. The
/// file's config is parsed again and its weight type set from the packed tensors; `config`
/// (optional) receives it. Every size, layout and value is checked as for any untrusted file.
TopKLayer load_packed_layer(const std::string& path, LayerConfig* config = nullptr);

}  // namespace moekit
#pragma GCC visibility pop
