// SPDX-License-Identifier: Apache-2.0
// Config parsing: HF config.json defaults per model type, moekit's own format, and errors
// that name the key.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "moekit/io/any_layer.hpp"
#include "moekit/io/config.hpp"
#include "moekit/io/model.hpp"

namespace {

using moekit::parse_layer_config;

void expect_error(const std::string& json, const std::string& mentions) {
  try {
    parse_layer_config(json, "cfg");
    ADD_FAILURE() << "no error for " << json;
  } catch (const moekit::error& e) {
    EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
  }
}

TEST(ConfigHf, DefaultsAreTheHfConfigClassDefaults) {
  // Missing keys take the HF config-class defaults (transformers' configuration_*.py).
  auto c = parse_layer_config(R"({"model_type": "mixtral"})");
  EXPECT_EQ(c.hidden(), 4096); EXPECT_EQ(c.experts.intermediate, 14336);
  EXPECT_EQ(c.router.num_experts, 8); EXPECT_EQ(c.router.k, 2); EXPECT_TRUE(c.router.norm_topk_prob);
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::mixtral);
  c = parse_layer_config(R"({"model_type": "qwen2_moe"})");
  EXPECT_EQ(c.hidden(), 2048); EXPECT_EQ(c.experts.intermediate, 1408); EXPECT_EQ(c.router.num_experts, 60);
  EXPECT_EQ(c.router.k, 4); EXPECT_FALSE(c.router.norm_topk_prob);
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 5632); EXPECT_TRUE(c.shared->gated);
  c = parse_layer_config(R"({"model_type": "qwen3_moe"})");
  EXPECT_EQ(c.experts.intermediate, 768); EXPECT_EQ(c.router.num_experts, 128); EXPECT_EQ(c.router.k, 8);
  EXPECT_FALSE(c.router.norm_topk_prob); EXPECT_FALSE(c.shared);
  c = parse_layer_config(R"({"model_type": "olmoe"})");
  EXPECT_EQ(c.experts.intermediate, 2048); EXPECT_EQ(c.router.num_experts, 64); EXPECT_EQ(c.router.k, 8);
  EXPECT_FALSE(c.router.norm_topk_prob);
  c = parse_layer_config(R"({"model_type": "olmoe", "num_local_experts": 16, "num_experts_per_tok": 2})");
  EXPECT_EQ(c.router.num_experts, 16);
  c = parse_layer_config(R"({"model_type": "deepseek_v3"})");
  EXPECT_EQ(c.hidden(), 7168); EXPECT_EQ(c.experts.intermediate, 2048); EXPECT_EQ(c.router.num_experts, 256);
  EXPECT_EQ(c.router.k, 8); EXPECT_EQ(c.router.n_group, 8); EXPECT_EQ(c.router.topk_group, 4);
  EXPECT_FLOAT_EQ(c.router.routed_scaling_factor, 2.5f); EXPECT_TRUE(c.router.norm_topk_prob);
  EXPECT_EQ(c.router.score_func, moekit::ScoreFunc::sigmoid); EXPECT_TRUE(c.router_bias);
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 2048); EXPECT_FALSE(c.shared->gated);
  c = parse_layer_config(R"({"model_type": "deepseek_v3", "n_shared_experts": 2, "moe_intermediate_size": 64, "intermediate_size": 999})");
  EXPECT_EQ(c.shared->intermediate, 128); EXPECT_EQ(c.experts.intermediate, 64);
  // Unknown HF keys are ignored; integral floats are integers.
  c = parse_layer_config(R"({"model_type": "mixtral", "vocab_size": 3, "rope_theta": 1e6, "hidden_size": 64.0})");
  EXPECT_EQ(c.hidden(), 64);
}

// DeepSeek-V2-Lite's config.json as published (deepseek-ai/DeepSeek-V2-Lite), untouched but for
// auto_map and rope_scaling, which moekit does not read.
const char* kDeepseekV2Lite = R"({
  "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
  "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
  "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
  "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16,
  "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1,
  "q_lora_rank": null, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
  "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": true,
  "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128, "vocab_size": 102400})";

TEST(ConfigHf, DeepseekV2) {
  auto c = parse_layer_config(kDeepseekV2Lite);
  EXPECT_EQ(c.hidden(), 2048); EXPECT_EQ(c.experts.intermediate, 1408); EXPECT_EQ(c.router.num_experts, 64);
  EXPECT_EQ(c.router.k, 6); EXPECT_EQ(c.router.n_group, 0); EXPECT_FALSE(c.router.norm_topk_prob);
  EXPECT_EQ(c.router.score_func, moekit::ScoreFunc::softmax); EXPECT_FALSE(c.router_bias);
  EXPECT_FLOAT_EQ(c.router.routed_scaling_factor, 1.0f);
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 2 * 1408); EXPECT_FALSE(c.shared->gated);
  EXPECT_EQ(c.shared->names, "shared_experts.");
  // DeepSeek-V2 (236B) routing keys: group_limited_greedy, the group's max, scaling 16.
  c = parse_layer_config(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "n_routed_experts": 160,
      "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0,
      "n_shared_experts": 2, "moe_intermediate_size": 1536, "hidden_size": 5120})");
  EXPECT_EQ(c.router.n_group, 8); EXPECT_EQ(c.router.topk_group, 3);
  EXPECT_EQ(c.router.group_score, moekit::GroupScore::max);
  EXPECT_FLOAT_EQ(c.router.routed_scaling_factor, 16.0f); EXPECT_EQ(c.shared->intermediate, 3072);
  // Class defaults (hidden 4096, 64 experts of 1407, 2 shared), null shared experts: none.
  c = parse_layer_config(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 4, "n_shared_experts": null})");
  EXPECT_EQ(c.hidden(), 4096); EXPECT_EQ(c.experts.intermediate, 1407); EXPECT_FALSE(c.shared);
  expect_error(R"({"model_type": "deepseek_v2"})", "num_experts_per_tok: expected an integer (DeepseekV2Config has no default)");
  expect_error(R"({"model_type": "deepseek_v2", "num_experts_per_tok": null})", "num_experts_per_tok");
  expect_error(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "norm_topk_prob": true})", "norm_topk_prob: expected false");
  expect_error(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "topk_method": "noaux_tc"})", "topk_method");
  expect_error(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "scoring_func": "sigmoid"})", "scoring_func");
  expect_error(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "mlp_bias": true})", "mlp_bias");
  expect_error(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "topk_method": "group_limited_greedy"})",
               "n_group / .topk_group: expected integers >= 1");
  expect_error(R"({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "topk_method": "group_limited_greedy",
      "n_group": 5, "topk_group": 2})", "divisible by n_group");
}

// GLM-4.5-Air's and Qwen3-Next-80B-A3B's config.json as published (zai-org/GLM-4.5-Air,
// Qwen/Qwen3-Next-80B-A3B-Instruct), keys moekit does not read included.
const char* kGlm45Air = R"({
  "architectures": ["Glm4MoeForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
  "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
  "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408,
  "norm_topk_prob": true, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
  "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
  "num_hidden_layers": 46, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.54.0", "use_cache": true, "use_qk_norm": false, "vocab_size": 151552})";
const char* kQwen3Next = R"({
  "architectures": ["Qwen3NextForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4,
  "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
  "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
  "mlp_only_layers": [], "model_type": "qwen3_next", "moe_intermediate_size": 512, "norm_topk_prob": true,
  "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48,
  "num_key_value_heads": 2, "output_router_logits": false, "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 10000000, "router_aux_loss_coef": 0.001,
  "shared_expert_intermediate_size": 512, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.57.0.dev0", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})";

TEST(ConfigHf, Glm4MoeAndQwen3Next) {
  auto c = parse_layer_config(kGlm45Air);
  EXPECT_EQ(c.hidden(), 4096); EXPECT_EQ(c.experts.intermediate, 1408); EXPECT_EQ(c.router.num_experts, 128);
  EXPECT_EQ(c.router.k, 8); EXPECT_EQ(c.router.score_func, moekit::ScoreFunc::sigmoid); EXPECT_TRUE(c.router_bias);
  EXPECT_TRUE(c.router.norm_topk_prob); EXPECT_FALSE(c.router.grouped());
  EXPECT_FLOAT_EQ(c.router.routed_scaling_factor, 1.0f);
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 1408); EXPECT_FALSE(c.shared->gated);
  // Class defaults; num_local_experts is an alias of n_routed_experts; groups use V3's rule.
  c = parse_layer_config(R"({"model_type": "glm4_moe", "num_local_experts": 64, "n_group": 8, "topk_group": 2})");
  EXPECT_EQ(c.router.num_experts, 64); EXPECT_EQ(c.router.n_group, 8);
  EXPECT_EQ(c.router.group_score, moekit::GroupScore::top2_sum); EXPECT_EQ(c.router.k, 8);
  c = parse_layer_config(kQwen3Next);
  EXPECT_EQ(c.hidden(), 2048); EXPECT_EQ(c.experts.intermediate, 512); EXPECT_EQ(c.router.num_experts, 512);
  EXPECT_EQ(c.router.k, 10); EXPECT_TRUE(c.router.norm_topk_prob); EXPECT_FALSE(c.router_bias);
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 512); EXPECT_TRUE(c.shared->gated);
  EXPECT_EQ(c.shared->names, "shared_expert.");
  c = parse_layer_config(R"({"model_type": "qwen3_next", "shared_expert_intermediate_size": 0})");
  EXPECT_FALSE(c.shared); EXPECT_TRUE(c.router.norm_topk_prob);
  expect_error(R"({"model_type": "glm4_moe", "n_routed_experts": 100, "n_group": 8, "topk_group": 2})",
               "divisible by n_group");
}

// databricks/dbrx-instruct and ibm-granite/granite-3.0-1b-a400m-instruct config.json as
// published (auto_map left out).
const char* kDbrx = R"({
  "architectures": ["DbrxForCausalLM"], "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "",
  "rope_theta": 500000}, "d_model": 6144, "emb_pdrop": 0.0, "ffn_config": {"ffn_hidden_size": 10752,
  "model_type": "", "moe_jitter_eps": 0.01, "moe_loss_weight": 0.05, "moe_num_experts": 16, "moe_top_k": 4},
  "initializer_range": 0.02, "max_seq_len": 32768, "model_type": "dbrx", "n_heads": 48, "n_layers": 40,
  "output_router_logits": false, "resid_pdrop": 0.0, "router_aux_loss_coef": 0.05, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.38.2", "use_cache": true, "vocab_size": 100352})";
const char* kGraniteMoe = R"({
  "architectures": ["GraniteMoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.1,
  "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
  "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 512,
  "logits_scaling": 6.0, "max_position_embeddings": 4096, "model_type": "granitemoe", "num_attention_heads": 16,
  "num_experts_per_tok": 8, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
  "pad_token_id": 0, "residual_multiplier": 0.22, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 10000,
  "router_aux_loss_coef": 0.01, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.46.0.dev0", "use_cache": true, "vocab_size": 49155})";

TEST(ConfigHf, DbrxAndGraniteMoe) {
  auto c = parse_layer_config(kDbrx);
  EXPECT_EQ(c.hidden(), 6144); EXPECT_EQ(c.experts.intermediate, 10752); EXPECT_EQ(c.router.num_experts, 16);
  EXPECT_EQ(c.router.k, 4); EXPECT_DOUBLE_EQ(c.router.norm_p, 1.0); EXPECT_FALSE(c.router.norm_topk_prob);
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::dbrx); EXPECT_FALSE(c.shared);
  EXPECT_STREQ(moekit::router_weight_name(c.expert_names), "router.layer.weight");
  c = parse_layer_config(R"({"model_type": "dbrx"})");  // DbrxConfig / DbrxFFNConfig defaults
  EXPECT_EQ(c.hidden(), 2048); EXPECT_EQ(c.experts.intermediate, 3584); EXPECT_EQ(c.router.num_experts, 4);
  EXPECT_EQ(c.router.k, 1);
  c = parse_layer_config(R"({"model_type": "dbrx", "ffn_config": {"moe_normalize_expert_weights": null,
      "ffn_act_fn": {"name": "gelu"}}})");
  EXPECT_EQ(c.router.norm_p, 0.0); EXPECT_EQ(c.experts.act, moekit::Activation::gelu);
  expect_error(R"({"model_type": "dbrx", "ffn_config": {"moe_normalize_expert_weights": 0}})",
               "ffn_config.moe_normalize_expert_weights: expected a number > 0");
  expect_error(R"({"model_type": "dbrx", "ffn_config": {"moe_top_k": 5}})", "k expected in [1, E = 4], got 5");
  expect_error(R"({"model_type": "dbrx", "ffn_config": 3})", "ffn_config: expected a JSON object");
  c = parse_layer_config(kGraniteMoe);
  EXPECT_EQ(c.hidden(), 1024); EXPECT_EQ(c.experts.intermediate, 512); EXPECT_EQ(c.router.num_experts, 32);
  EXPECT_EQ(c.router.k, 8); EXPECT_TRUE(c.router.topk_then_softmax); EXPECT_FALSE(c.router.norm_topk_prob);
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::granite);
  c = parse_layer_config(R"({"model_type": "granitemoe"})");
  EXPECT_EQ(c.hidden(), 4096); EXPECT_EQ(c.experts.intermediate, 11008); EXPECT_EQ(c.router.num_experts, 8);
  EXPECT_EQ(c.router.k, 2);
}

// meta-llama/Llama-4-Scout-17B-16E-Instruct's config.json as published (vision_config shortened).
const char* kLlama4Scout = R"({
  "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080, "eoi_token_index": 200081,
  "image_token_index": 200092, "model_type": "llama4",
  "text_config": {"_attn_implementation_autoset": true, "attention_bias": false, "attention_chunk_size": 8192,
    "attention_dropout": 0.0, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "for_llm_compressor": false, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "model_type": "llama4_text",
    "no_rope_layers": [], "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
    "num_key_value_heads": 8, "num_local_experts": 16, "output_router_logits": false, "pad_token_id": 200018,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
    "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16", "use_cache": true,
    "use_qk_norm": true, "vocab_size": 202048},
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.51.0.dev0",
  "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34}})";

TEST(ConfigHf, Llama4) {
  auto c = parse_layer_config(kLlama4Scout);
  EXPECT_EQ(c.hidden(), 5120); EXPECT_EQ(c.experts.intermediate, 8192); EXPECT_EQ(c.router.num_experts, 16);
  EXPECT_EQ(c.router.k, 1); EXPECT_EQ(c.router.score_func, moekit::ScoreFunc::sigmoid);
  EXPECT_TRUE(c.router.select_on_logits); EXPECT_FALSE(c.router.norm_topk_prob); EXPECT_TRUE(c.weight_on_input);
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::llama4);
  EXPECT_STREQ(moekit::router_weight_name(c.expert_names), "router.weight");
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 8192); EXPECT_FALSE(c.shared->gated);
  EXPECT_EQ(c.shared->names, "shared_expert.");
  c = parse_layer_config(R"({"model_type": "llama4_text", "hidden_size": 64, "intermediate_size": 32,
      "num_local_experts": 128, "num_experts_per_tok": 1})");  // Maverick-like, flat
  EXPECT_EQ(c.router.num_experts, 128); EXPECT_EQ(c.shared->intermediate, 32);
  expect_error(R"({"model_type": "llama4"})", "text_config: expected the text model's object");
  expect_error(R"({"model_type": "llama4", "text_config": {"num_experts_per_tok": 17}})", "k expected in [1, E = 16]");
}

// baidu/ERNIE-4.5-21B-A3B-PT and tencent/Hunyuan-A13B-Instruct config.json as published
// (rope and token keys shortened).
const char* kErnie45 = R"({
  "architectures": ["Ernie4_5_MoeForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
  "hidden_size": 2560, "intermediate_size": 12288, "max_position_embeddings": 131072, "model_type": "ernie4_5_moe",
  "num_attention_heads": 20, "num_key_value_heads": 4, "num_hidden_layers": 28, "pad_token_id": 0,
  "rms_norm_eps": 1e-05, "use_cache": false, "vocab_size": 103424, "rope_theta": 500000, "use_bias": false,
  "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_intermediate_size": 1536,
  "moe_capacity": [64, 64, 64], "moe_gate": "topk", "moe_k": 6, "moe_layer_interval": 1, "moe_use_aux_free": true,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16"})";
const char* kHunyuanA13B = R"({
  "architectures": ["HunYuanMoEV1ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "eos_token_id": 127960, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 32768,
  "model_type": "hunyuan_v1_moe", "moe_drop_tokens": false, "moe_intermediate_size": [3072, 3072, 3072, 3072],
  "moe_layer_num_skipped": 0, "moe_random_routing_dropped_token": false, "moe_topk": [8, 8, 8, 8],
  "num_attention_heads": 32, "num_experts": 64, "num_hidden_layers": 4, "num_key_value_heads": 8,
  "num_shared_expert": [1, 1, 1, 1], "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "use_cache": true, "use_mixed_mlp_moe": true, "use_qk_norm": true,
  "vocab_size": 128167})";

TEST(ConfigHf, Ernie45AndHunyuan) {
  auto c = parse_layer_config(kErnie45);
  EXPECT_EQ(c.hidden(), 2560); EXPECT_EQ(c.experts.intermediate, 1536); EXPECT_EQ(c.router.num_experts, 64);
  EXPECT_EQ(c.router.k, 6); EXPECT_TRUE(c.router.norm_topk_prob); EXPECT_TRUE(c.router_bias);
  EXPECT_TRUE(c.router_bias_ernie); EXPECT_EQ(c.router.score_func, moekit::ScoreFunc::softmax);
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 3072); EXPECT_FALSE(c.shared->gated);
  c = parse_layer_config(R"({"model_type": "ernie4_5_moe", "num_experts": 8, "num_experts_per_tok": 2,
      "moe_num_shared_experts": 0})");  // attribute_map aliases
  EXPECT_EQ(c.router.num_experts, 8); EXPECT_EQ(c.router.k, 2); EXPECT_FALSE(c.shared);
  expect_error(R"({"model_type": "ernie4_5_moe", "use_bias": true})", "use_bias: expected false");
  expect_error(R"({"model_type": "ernie4_5_moe", "moe_norm_min": 0.1})", "moe_norm_min: expected a number in [0, 1e-10]");
  c = parse_layer_config(kHunyuanA13B);
  EXPECT_EQ(c.hidden(), 4096); EXPECT_EQ(c.experts.intermediate, 3072); EXPECT_EQ(c.router.num_experts, 64);
  EXPECT_EQ(c.router.k, 8); EXPECT_TRUE(c.router.norm_topk_prob); EXPECT_EQ(c.router_weight, "gate.wg.weight");
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->intermediate, 3072); EXPECT_EQ(c.shared->names, "shared_mlp.");
  c = parse_layer_config(R"({"model_type": "hunyuan_v1_moe"})");  // class defaults: one expert, top-1
  EXPECT_EQ(c.router.num_experts, 1); EXPECT_EQ(c.router.k, 1); EXPECT_EQ(c.experts.intermediate, 11008);
  expect_error(R"({"model_type": "hunyuan_v1_moe", "num_experts": 8, "moe_topk": [2, 4]})",
               "moe_topk: a per-layer list whose values differ (2 at layer 0, 4 at layer 1) is not supported");
  expect_error(R"({"model_type": "hunyuan_v1_moe", "num_experts": 8, "moe_topk": []})", "non-empty per-layer list");
  expect_error(R"({"model_type": "hunyuan_v1_moe", "num_experts": 8, "moe_topk": ["2"]})", "moe_topk[0]: expected an integer");
  expect_error(R"({"model_type": "hunyuan_v1_moe", "intermediate_size": 64, "moe_intermediate_size": 32})",
               "moe_intermediate_size: expected 64");
  expect_error(R"({"model_type": "hunyuan_v1_moe", "num_shared_expert": 2})", "num_shared_expert: expected 1");
  expect_error(R"({"model_type": "hunyuan_v1_moe", "moe_drop_tokens": true})", "moe_drop_tokens: expected false");
}

TEST(ConfigHf, Phimoe) {
  // microsoft/Phi-3.5-MoE-instruct's MoE keys (the rest of its config.json is not read).
  auto c = parse_layer_config(R"({"architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe",
      "hidden_size": 4096, "intermediate_size": 6400, "num_local_experts": 16, "num_experts_per_tok": 2,
      "router_jitter_noise": 0.01, "input_jitter_noise": 0.01, "hidden_act": "silu", "lm_head_bias": true,
      "attention_bias": true, "rope_scaling": {"type": "longrope"}, "sliding_window": 131072})");
  EXPECT_EQ(c.router.k, 2); EXPECT_DOUBLE_EQ(c.router.sparsemixer_eps, 0.01);
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::mixtral); EXPECT_FALSE(c.shared);
  EXPECT_FALSE(c.router.norm_topk_prob);
  expect_error(R"({"model_type": "phimoe", "num_experts_per_tok": 3})", "num_experts_per_tok: expected 2");
  expect_error(R"({"model_type": "phimoe", "router_jitter_noise": 0})", "router_jitter_noise: expected a number > 0");
}

TEST(ConfigHf, GptOss) {
  // openai/gpt-oss-20b's config.json MoE keys (attention, rope and the rest are not read).
  auto c = parse_layer_config(R"({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
      "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
      "experts_per_token": 4, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9, "hidden_act": "silu",
      "num_hidden_layers": 24, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"],
      "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.mlp.router"]}})");
  EXPECT_EQ(c.router.num_experts, 32); EXPECT_EQ(c.router.k, 4); EXPECT_EQ(c.hidden(), 2880);
  EXPECT_EQ(c.experts.intermediate, 2880);
  EXPECT_TRUE(c.router.topk_then_softmax); EXPECT_TRUE(c.router_logit_bias); EXPECT_FALSE(c.router_bias);
  EXPECT_TRUE(c.experts.clamped); EXPECT_TRUE(c.experts.bias); EXPECT_TRUE(c.experts.gated);
  EXPECT_FLOAT_EQ(c.experts.glu.limit, 7.0f); EXPECT_FLOAT_EQ(c.experts.glu.alpha, 1.702f);
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::gpt_oss); EXPECT_FALSE(c.shared);
  EXPECT_EQ(c.router_weight_tensor(), "router.weight");
  // The released alias alone, and the attribute_map alias of num_local_experts.
  c = parse_layer_config(R"({"model_type": "gpt_oss", "num_experts": 16, "experts_per_token": 2, "swiglu_limit": 5})");
  EXPECT_EQ(c.router.num_experts, 16); EXPECT_EQ(c.router.k, 2); EXPECT_FLOAT_EQ(c.experts.glu.limit, 5.0f);
  expect_error(R"({"model_type": "gpt_oss", "swiglu_limit": 0})", "limit finite and > 0");
  expect_error(R"({"model_type": "gpt_oss", "num_experts_per_tok": 200})", "k expected in [1, E = 128]");
  // moekit's format: the preset, and the same pieces spelled out.
  auto m = parse_layer_config(R"({"moekit_config_version": 1, "hidden_size": 64,
      "router": {"num_experts": 8, "k": 2, "topk_then_softmax": true, "logit_bias": true},
      "experts": {"type": "swiglu_clamped", "intermediate_size": 32, "bias": true, "swiglu_limit": 3.5,
                  "names": "gpt_oss"}})");
  EXPECT_TRUE(m.router_logit_bias); EXPECT_TRUE(m.experts.clamped); EXPECT_TRUE(m.experts.bias);
  EXPECT_FLOAT_EQ(m.experts.glu.limit, 3.5f); EXPECT_EQ(m.expert_names, moekit::ExpertNames::gpt_oss);
  m = parse_layer_config(R"({"moekit_config_version": 1, "preset": "gpt_oss", "experts": {"type": "swiglu"}})");
  EXPECT_FALSE(m.experts.clamped);
  expect_error(R"({"moekit_config_version": 1, "preset": "gpt_oss", "experts": {"type": "relu"}})",
               "fused expert tensors");
}

TEST(ConfigMoekit, SharedExpertScale) {
  const auto c = parse_layer_config(R"({"moekit_config_version": 1, "preset": "qwen2_moe",
      "shared_expert": {"intermediate_size": 8, "gated": true, "scale": 0.25}})");
  ASSERT_TRUE(c.shared);
  EXPECT_FLOAT_EQ(c.shared->scale, 0.25f);
  expect_error(R"({"moekit_config_version": 1, "preset": "qwen2_moe", "shared_expert": {"scale": "x"}})", "scale");
}

TEST(ConfigMoekit, FusedExpertNames) {
  auto c = parse_layer_config(R"({"moekit_config_version": 1, "preset": "granitemoe", "hidden_size": 8,
      "experts": {"intermediate_size": 4}})");
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::granite);  // an experts object keeps the preset's layout
  c = parse_layer_config(R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 8,
      "experts": {"intermediate_size": 4, "names": "llama4"}})");
  EXPECT_EQ(c.expert_names, moekit::ExpertNames::llama4);
  expect_error(R"({"moekit_config_version": 1, "preset": "switch", "experts": {"names": "dbrx"}})",
               "fused expert tensors (\"dbrx\") expected with router type topk and gated experts");
  expect_error(R"({"moekit_config_version": 1, "preset": "mixtral", "experts": {"names": "fused"}})",
               "experts.names: expected \"hf\", \"mixtral\", \"granite\", \"llama4\", \"dbrx\" or \"gpt_oss\"");
}

TEST(ConfigMoekit, PrototypeSharedExpert) {
  const std::string head = R"({"moekit_config_version": 1, "hidden_size": 8, "experts": {"intermediate_size": 4},
      "router": {"type": "prototype", "num_experts": 4, "k": 1})";
  auto c = parse_layer_config(head + "}");  // no key: the family's default (routed width)
  EXPECT_FALSE(c.shared); EXPECT_FALSE(c.shared_null);
  c = parse_layer_config(head + R"(, "shared_expert": {"intermediate_size": 6}})");
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->names, "shared_expert.");  // ProMoE's name, as documented
  c = parse_layer_config(head + R"(, "shared_expert": null})");
  EXPECT_FALSE(c.shared); EXPECT_TRUE(c.shared_null);
  expect_error(head + R"(, "shared_expert": {"gated": true}})",
               "shared_expert.gated: expected false for the prototype router");
  // The layers built: shared width 4 (default), 6, none.
  const auto bytes = [&](const std::string& tail) {
    return moekit::random_any_layer(parse_layer_config(head + tail), 1)->resident_bytes();
  };
  const double none = bytes(R"(, "shared_expert": null})"), dflt = bytes("}"), six = bytes(R"(, "shared_expert": {"intermediate_size": 6}})");
  EXPECT_LT(none, dflt);
  EXPECT_LT(dflt, six);
}

TEST(ConfigMoekit, ResidualCoefficient) {
  const std::string head = R"({"moekit_config_version": 1, "preset": "mixtral", "hidden_size": 8,
      "experts": {"intermediate_size": 4}, "shared_expert": {"intermediate_size": 6)";
  auto c = parse_layer_config(head + R"(, "residual_coefficient": true}})");
  ASSERT_TRUE(c.shared); EXPECT_TRUE(c.shared->residual_coefficient); EXPECT_FALSE(c.shared->gated);
  // The built layer holds the [2, d] coefficient and its bias.
  const double with = moekit::random_any_layer(c, 1)->resident_bytes();
  const double without = moekit::random_any_layer(parse_layer_config(head + "}}"), 1)->resident_bytes();
  EXPECT_DOUBLE_EQ(with - without, 4.0 * (2 * 8 + 2));
  EXPECT_DOUBLE_EQ(moekit::layer_weight_bytes(c) - moekit::layer_weight_bytes(parse_layer_config(head + "}}")),
                   4.0 * (2 * 8 + 2));
  expect_error(head + R"(, "residual_coefficient": true, "gated": true}})",
               "residual_coefficient: expected false with gated");
}

TEST(ConfigMoekit, SinkhornModes) {
  const std::string head = R"({"moekit_config_version": 1, "hidden_size": 8, "experts": {"intermediate_size": 4},
      "router": {"type": ")";
  (void)parse_layer_config(head + R"(sinkhorn", "num_experts": 4, "k": 2, "mode": "megatron"}})");
  (void)parse_layer_config(head + R"(sinkhorn", "num_experts": 4, "k": 2, "mode": "always"}})");
  expect_error(head + R"(sinkhorn", "num_experts": 4, "k": 2, "mode": "train"}})",
               "router.mode: expected one of always, megatron; got \"train\"");
  expect_error(head + R"(selective_sinkhorn", "num_experts": 4, "k": 2, "mode": "megatron"}})",
               "mode: expected \"always\" for selective_sinkhorn");
}

TEST(ConfigMoekit, GroupScoreIsNamedUnlessImplied) {
  const std::string head = R"({"moekit_config_version": 1, "hidden_size": 8, "experts": {"intermediate_size": 4},
      "router": {"type": "topk", "num_experts": 8, "k": 2, "n_group": 4, "topk_group": 2)";
  auto c = parse_layer_config(head + R"(, "group_score": "topk_sum"}})");
  EXPECT_EQ(c.router.group_score, moekit::GroupScore::topk_sum);
  c = parse_layer_config(head + R"(, "group_score": "max"}})");
  EXPECT_EQ(c.router.group_score, moekit::GroupScore::max);
  // With the selection bias: DeepSeek-V3's rule, as before.
  c = parse_layer_config(head + R"(, "score_func": "sigmoid", "e_score_correction_bias": true}})");
  EXPECT_EQ(c.router.group_score, moekit::GroupScore::top2_sum);
  expect_error(head + "}}", "group_score: required with n_group > 1 and no e_score_correction_bias");
  expect_error(head + R"(, "group_score": "mean"}})", "group_score: expected \"top2_sum\", \"max\" or \"topk_sum\"");
  // The DeepSeek presets fix their rule.
  c = parse_layer_config(R"({"moekit_config_version": 1, "preset": "deepseek_v2", "hidden_size": 8,
      "router": {"num_experts": 8, "k": 2, "n_group": 4, "topk_group": 2}, "experts": {"intermediate_size": 4}})");
  EXPECT_EQ(c.router.group_score, moekit::GroupScore::max);
}

TEST(ConfigHf, ErrorsNameTheKey) {
  expect_error(R"({"model_type": "llama"})", "model_type");
  expect_error(R"({"model_type": "mixtral", "num_experts_per_tok": 9})", "k expected in [1, E = 8], got 9");
  expect_error(R"({"model_type": "mixtral", "num_experts_per_tok": 0})", "got 0");
  expect_error(R"({"model_type": "mixtral", "hidden_size": 1e30})", "hidden_size");
  expect_error(R"({"model_type": "mixtral", "hidden_size": 2.5})", "hidden_size");
  expect_error(R"({"model_type": "mixtral", "hidden_size": "big"})", "hidden_size");
  expect_error(R"({"model_type": "mixtral", "hidden_act": "swishy"})", "hidden_act");
  expect_error(R"({"model_type": "deepseek_v3", "n_routed_experts": 30})", "divisible by n_group");
  expect_error(R"({"model_type": "deepseek_v3", "topk_group": 9})", "topk_group");
  expect_error(R"({"model_type": "deepseek_v3", "topk_method": "group_limited_greedy"})", "topk_method");
  expect_error(R"({"model_type": "deepseek_v3", "routed_scaling_factor": -1})", "routed_scaling_factor");
  expect_error(R"([1, 2])", "JSON object");
  expect_error(R"({"hidden_size": 3})", "neither");
  expect_error(R"({"model_type": )", "not valid JSON");
  // Duplicate keys are errors, also nested, in both formats (nlohmann alone keeps the last).
  expect_error(R"({"model_type": "mixtral", "hidden_size": 8, "hidden_size": 16})", "duplicate key 'hidden_size'");
  expect_error(R"({"moekit_config_version": 1, "preset": "mixtral", "router": {"k": 1, "k": 2}})", "duplicate key 'k'");
  expect_error(std::string(40, '[') + std::string(40, ']'), "nested deeper than 32");
}

TEST(ConfigMoekit, PresetsRoutersAndUnknownKeys) {
  auto c = parse_layer_config(R"({"moekit_config_version": 1, "preset": "switch", "hidden_size": 32,
      "router": {"num_experts": 4, "capacity_factor": 1.5, "drop_policy": "score", "min_capacity": 2},
      "experts": {"type": "gelu", "intermediate_size": 16}})");
  EXPECT_EQ(c.router.k, 1); EXPECT_EQ(c.router.num_experts, 4); EXPECT_DOUBLE_EQ(c.router.capacity_factor, 1.5);
  EXPECT_EQ(c.router.drop_policy, moekit::DropPolicy::score); EXPECT_EQ(c.router.min_capacity, 2);
  EXPECT_FALSE(c.experts.gated); EXPECT_EQ(c.experts.act, moekit::Activation::gelu);
  c = parse_layer_config(R"({"moekit_config_version": 1, "hidden_size": 8,
      "router": {"type": "topk", "num_experts": 6, "k": 2, "score_func": "sigmoid", "norm_topk_prob": true,
                 "n_group": 3, "topk_group": 2, "e_score_correction_bias": true, "routed_scaling_factor": 2},
      "experts": {"type": "swiglu", "intermediate_size": 4, "names": "mixtral"},
      "shared_expert": {"intermediate_size": 8, "gated": true}})");
  EXPECT_EQ(c.router.n_group, 3); EXPECT_TRUE(c.router_bias); EXPECT_EQ(c.expert_names, moekit::ExpertNames::mixtral);
  ASSERT_TRUE(c.shared); EXPECT_EQ(c.shared->names, "shared_expert.");
  // null removes a preset's shared expert; null router/experts keep the preset's.
  c = parse_layer_config(R"({"moekit_config_version": 1, "preset": "qwen2_moe", "hidden_size": 8, "shared_expert": null,
      "router": null, "experts": {"intermediate_size": 4}})");
  EXPECT_FALSE(c.shared);
  EXPECT_EQ(c.router.num_experts, 60);
  expect_error(R"({"moekit_config_version": 2, "preset": "switch"})", "moekit_config_version");
  expect_error(R"({"moekit_config_version": 1, "preset": "switch", "extra": 1})", "unknown key \"extra\"");
  expect_error(R"({"moekit_config_version": 1, "preset": "switch", "router": {"kk": 1}})", "unknown key \"kk\"");
  expect_error(R"({"moekit_config_version": 1, "preset": "switch", "experts": {"type": "mlp"}})", "experts.type");
  expect_error(R"({"moekit_config_version": 1, "preset": "mixtral2"})", "preset");
  expect_error(R"({"moekit_config_version": 1, "preset": "switch", "router": {"type": "hash"}})", "router.type");
  expect_error(R"({"moekit_config_version": 1, "hidden_size": 8, "router": {"type": "sinkhorn", "k": 1}, "experts": {"intermediate_size": 4}})",
               "num_experts");
  expect_error(R"({"moekit_config_version": 1, "preset": "switch", "router": {"capacity_factor": -1}})", "capacity_factor");
  expect_error(R"({"moekit_config_version": 1, "preset": "switch", "router": {"drop_policy": "random"}})", "drop_policy");
  expect_error(R"({"moekit_config_version": 1, "hidden_size": 8})", "preset");
}


// The config reader refuses what is not a regular file before reading a byte (a FIFO with no
// writer would block forever, /dev/zero would never end), names what it is, and bounds the size.
TEST(ConfigFile, OnlyBoundedRegularFiles) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("moekit-config-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto error_of = [](const std::string& path) -> std::string {
    try {
      (void)moekit::load_layer_config(path);
    } catch (const moekit::error& e) {
      return e.what();
    }
    return "no error";
  };
  const std::string fifo = (dir / "fifo.json").string();
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_NE(error_of(fifo).find("is a FIFO, expected a regular file"), std::string::npos) << error_of(fifo);
  EXPECT_NE(error_of(dir.string()).find("is a directory, expected a regular file"), std::string::npos);
  EXPECT_NE(error_of("/dev/zero").find("is a character device, expected a regular file"), std::string::npos);
  EXPECT_NE(error_of((dir / "missing.json").string()).find("cannot open for reading"), std::string::npos);
  const fs::path big = dir / "big.json";
  {
    std::ofstream out(big);
    out << "{\"model_type\": \"mixtral\"" << std::string(16u << 20, ' ') << "}";
  }
  EXPECT_NE(error_of(big.string()).find("expected at most 16777216"), std::string::npos) << error_of(big.string());
  const fs::path ok = dir / "ok.json";
  std::ofstream(ok) << R"({"model_type": "mixtral"})";
  EXPECT_EQ(moekit::load_layer_config(ok.string()).hidden(), 4096);
  fs::remove_all(dir);
}

}  // namespace
