#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes moekit's golden MoE-block test vectors (PyTorch transcriptions of the HF forward passes).

Hand-run, not part of the build. Needs Debian's PyTorch and NumPy
(apt-get install python3-torch python3-numpy) and Debian's interpreter:

    /usr/bin/python3 tests/golden/make_golden.py            # (re)write every case
    /usr/bin/python3 tests/golden/make_golden.py --check    # re-read the files, recompute in float64 NumPy

Generation transcribes the HF modules in torch, float32 everywhere, with the
deviations fixed by /work/shared/ROUTING.md (sections 0, 1 and 8); see README.md.
The check mode is a second, independent implementation (plain per-token loops in
float64 NumPy, its own safetensors reader) driven only by the files on disk.
"""
import argparse
import json
import math
import os
import struct
import sys
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# Tolerances written to cases.json for the C++ comparison |got - want| <= abs + rel * |want|.
# F32 cases: float32 kernels with another summation order stay within a few 1e-7.
# BF16/F16 cases: loose enough for kernels that round activations to the weight dtype
# before a BF16/FP16 dot product (the generator prints the deviation that causes).
TOL = {"F32": (1e-4, 1e-5), "F16": (2e-3, 2e-3), "BF16": (2e-2, 1e-2)}

# Every case: preset, sizes, weight dtype, tensor prefix. Sizes: T tokens, d hidden,
# f expert width, E experts, k slots per token.
CASES = [
    dict(name="mixtral_basic", preset="mixtral", T=17, d=32, f=48, E=8, k=2,
         dtype="F32", prefix="model.layers.0.block_sparse_moe."),
    dict(name="mixtral_t1", preset="mixtral", T=1, d=16, f=16, E=4, k=2,
         dtype="F32", prefix="model.layers.0.block_sparse_moe."),
    dict(name="qwen2_moe_shared", preset="qwen2_moe", T=13, d=32, f=24, E=8, k=4,
         shared_f=40, norm_topk_prob=False, dtype="BF16", prefix="model.layers.0.mlp."),
    dict(name="qwen3_moe_norm", preset="qwen3_moe", T=21, d=48, f=32, E=16, k=4,
         norm_topk_prob=True, dtype="F16", prefix="model.layers.1.mlp."),
    dict(name="olmoe_basic", preset="olmoe", T=11, d=24, f=40, E=8, k=2,
         norm_topk_prob=False, dtype="F32", prefix=""),
    # norm_topk_prob left out of config.json: the HF OlmoeConfig default (False) applies.
    dict(name="olmoe_default_norm", preset="olmoe", T=6, d=16, f=24, E=4, k=3,
         norm_topk_prob=None, dtype="F32", prefix="model.layers.2.mlp."),
    dict(name="deepseek_v3_grouped", preset="deepseek_v3", T=19, d=32, f=16, E=16, k=4,
         n_group=4, topk_group=2, n_shared=2, scaling=2.5, norm_topk_prob=True,
         bias="random", dtype="BF16", prefix="model.layers.3.mlp."),
    # Every odd expert carries a bias near -1.5, so its selection score is negative: the
    # third slot must come from a kept group (-inf masking); HF's 0.0 fill would pick a
    # masked expert instead.
    dict(name="deepseek_v3_negbias", preset="deepseek_v3", T=8, d=16, f=16, E=8, k=3,
         n_group=4, topk_group=2, n_shared=1, scaling=1.5, norm_topk_prob=False,
         bias="negative_odd", dtype="F32", prefix="model.layers.3.mlp."),
    # DeepSeek-V2-Lite's routing: greedy softmax top-k, no renormalisation, scaling 1.0.
    dict(name="deepseek_v2_greedy", preset="deepseek_v2", T=15, d=32, f=16, E=16, k=6,
         topk_method="greedy", n_shared=2, scaling=1.0, dtype="BF16", prefix="model.layers.1.mlp."),
    # DeepSeek-V2's: group_limited_greedy (group score = the group's best), scaling 16.
    dict(name="deepseek_v2_grouped", preset="deepseek_v2", T=23, d=24, f=16, E=16, k=3,
         topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared=1, scaling=16.0,
         dtype="F32", prefix="model.layers.5.mlp."),
    # GLM-4.5's routing (Glm4MoeTopkRouter = DeepseekV3TopkRouter): sigmoid + bias, one group.
    dict(name="glm4_moe_basic", preset="glm4_moe", T=14, d=32, f=16, E=16, k=4,
         n_group=1, topk_group=1, n_shared=1, scaling=1.0, norm_topk_prob=True,
         bias="random", dtype="BF16", prefix="model.layers.2.mlp."),
    # Qwen3-Next's MoE block (Qwen2MoeSparseMoeBlock): renormalised top-k + gated shared expert.
    dict(name="qwen3_next_shared", preset="qwen3_next", T=12, d=32, f=16, E=16, k=5,
         shared_f=24, norm_topk_prob=True, dtype="F32", prefix="model.layers.3.mlp."),
    # Granite MoE: fused input_linear [E, 2f, d] / output_linear [E, d, f], top-k on the logits
    # then softmax over the k.
    dict(name="granitemoe_fused", preset="granitemoe", T=13, d=24, f=16, E=8, k=3,
         dtype="BF16", prefix="model.layers.4.block_sparse_moe."),
    # DBRX: fused w1 / v1 / w2 [E f, d], weights divided by their p-norm (p = 1 in DBRX; 2 here
    # so that the norm is not the plain sum).
    dict(name="dbrx_pnorm", preset="dbrx", T=11, d=32, f=16, E=8, k=4, norm_p=2.0,
         dtype="F32", prefix="transformer.blocks.1.ffn."),
    # Llama 4: fused gate_up_proj [E, d, 2f] / down_proj [E, f, d], sigmoid top-k of the logits,
    # the weight multiplying the expert's input, an unweighted shared expert.
    dict(name="llama4_weight_on_input", preset="llama4", T=10, d=32, f=16, E=8, k=2,
         dtype="F32", prefix="language_model.model.layers.1.feed_forward."),
    # ERNIE 4.5: top-k of softmax + moe_statics bias [1, E], renormalised, 2 shared experts.
    dict(name="ernie4_5_moe_bias", preset="ernie4_5_moe", T=12, d=32, f=16, E=16, k=4, n_shared=2,
         dtype="BF16", prefix="model.layers.1.mlp."),
    # HunYuan (HunYuanMoEV1Moe): softmax top-k renormalised, gate.wg router, one shared_mlp;
    # Tencent's per-layer lists in config.json.
    dict(name="hunyuan_v1_moe_lists", preset="hunyuan_v1_moe", T=9, d=24, f=16, E=8, k=3,
         dtype="F32", prefix="model.layers.0.mlp."),
    # PhiMoE: SparseMixer top-2 at inference; eps 0.2 (PhiMoE ships 0.01) so that the masked
    # softmaxes hold several experts.
    dict(name="phimoe_sparsemixer", preset="phimoe", T=16, d=32, f=16, E=8, k=2, eps=0.2,
         dtype="F32", prefix="model.layers.0.block_sparse_moe."),
    # gpt-oss: router with a logit bias, top-k of the logits then softmax over the k; experts with
    # biases, gate/up interleaved in gate_up_proj [E, d, 2f], the clamped SwiGLU (weights scaled
    # so that the clamps at +-7 bite). HF's bf16 (dequantised) layout ...
    dict(name="gpt_oss_biased", preset="gpt_oss", T=11, d=32, f=16, E=8, k=4,
         dtype="BF16", prefix="model.layers.0.mlp."),
    # ... and the released MXFP4 layout: gate_up_proj_blocks U8 [E, 2f, d/32, 16] + _scales
    # [E, 2f, d/32], down_proj likewise (e2m1 codes, e8m0 scales), biases and router in BF16.
    dict(name="gpt_oss_mxfp4", preset="gpt_oss", T=9, d=64, f=32, E=8, k=4, mxfp4=True,
         dtype="BF16", prefix="model.layers.3.mlp."),
    # (25/4)*1.12 = 7.000000000000001 in double, so C = 8 (exact arithmetic or float32 give 7).
    dict(name="switch_drop", preset="switch", T=25, d=32, f=64, E=4, k=1,
         capacity_factor=1.12, dtype="F32", prefix=""),
]

GATE_SCALE = 0.3     # router weights: logits of O(1), clear top-k margins
WEIGHT_SCALE = 0.8   # expert weights: normal * WEIGHT_SCALE / sqrt(fan_in), outputs of O(0.1..1)
MIN_MARGIN = 1e-4    # relative gap required between the last chosen and first unchosen score


# --------------------------------------------------------------------------------------
# safetensors (write side of generation; the check mode has its own reader)
# --------------------------------------------------------------------------------------
def bf16_bits(a):
    """float32 array -> uint16 upper halves, rounded to nearest, ties to even (no NaNs here)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def encode(a, dtype):
    """Raw little-endian bytes of a float32/int32 array stored as dtype."""
    a = np.asarray(a)
    if dtype == "F32":
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(a.astype(np.float32).astype("<f2")).tobytes()
    if dtype == "BF16":
        return bf16_bits(a).astype("<u2").tobytes()
    if dtype == "I32":
        return np.ascontiguousarray(a, dtype="<i4").tobytes()
    if dtype == "U8":
        return np.ascontiguousarray(a, dtype=np.uint8).tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors):
    """tensors: list of (name, array, dtype). Header padded with spaces to a multiple of 8."""
    header, chunks, pos = {}, [], 0
    for name, a, dtype in tensors:
        raw = encode(a, dtype)
        header[name] = {"dtype": dtype, "shape": [int(s) for s in np.shape(a)],
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for raw in chunks:
            fh.write(raw)


# --------------------------------------------------------------------------------------
# Generation: torch transcriptions, float32
# --------------------------------------------------------------------------------------
def generate(out_dir):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)

    # Follows MixtralBlockSparseTop2MLP.forward (modeling_mixtral.py, w1/w3/w2), Qwen2MoeMLP.forward
    # (modeling_qwen2_moe.py), Qwen3MoeMLP.forward (modeling_qwen3_moe.py), OlmoeMLP.forward
    # (modeling_olmoe.py) and DeepseekV3MLP.forward (modeling_deepseek_v3.py): down(silu(gate x) * up x).
    def swiglu(x, w_gate, w_up, w_down):
        gated = F.silu(F.linear(x, w_gate))
        return F.linear(gated * F.linear(x, w_up), w_down)

    # moekit's switch expert (ROUTING.md section 1, "ReLU FFN"): down(relu(up x)).
    def relu_ffn(x, w_up, w_down):
        return F.linear(torch.relu(F.linear(x, w_up)), w_down)

    # Follows the routing half of MixtralSparseMoeBlock.forward (modeling_mixtral.py),
    # Qwen2MoeSparseMoeBlock.forward (modeling_qwen2_moe.py), Qwen3MoeSparseMoeBlock.forward
    # (modeling_qwen3_moe.py) and OlmoeSparseMoeBlock.forward (modeling_olmoe.py):
    # float32 softmax over the logits, sorted top-k, optional division by the kept sum.
    def softmax_topk(x, w_router, k, renormalize):
        probs = torch.softmax(F.linear(x, w_router), dim=1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k, dim=-1, sorted=True)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    # Follows the expert loop of the same HF blocks (and DeepseekV3MoE.moe): experts in
    # ascending index, each applied to the rows that picked it, scaled by the slot weight,
    # scattered back with index_add_ into a float32 zero buffer. Slots with id -1 are skipped.
    def combine(x, ids, weights, run_expert, num_experts):
        out = torch.zeros_like(x)
        for e in range(num_experts):
            rows, slots = torch.nonzero(ids == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            contrib = run_expert(e, x[rows]) * weights[rows, slots].unsqueeze(-1)
            out.index_add_(0, rows, contrib)
        return out

    # Follows DeepseekV3TopkRouter.forward / get_topk_indices (modeling_deepseek_v3.py) with the
    # ROUTING.md deviation: unselected groups are masked with -inf (official DeepSeek code),
    # not 0.0. Group score = sum of the top-2 biased scores; weights are the unbiased sigmoid
    # scores; slots sorted by the biased score.
    def deepseek_route(x, w_router, bias, k, n_group, topk_group, renormalize, scaling, mask_value):
        T, E = x.shape[0], w_router.shape[0]
        scores = torch.sigmoid(F.linear(x.float(), w_router.float()))
        choice = scores + bias.unsqueeze(0)
        per_group = choice.view(T, n_group, E // n_group)
        group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)
        kept_groups = torch.topk(group_scores, topk_group, dim=-1, sorted=True).indices
        keep = torch.zeros(T, n_group, dtype=torch.bool)
        keep.scatter_(1, kept_groups, True)
        keep = keep.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        masked = choice.masked_fill(~keep, mask_value)
        ids = torch.topk(masked, k, dim=-1, sorted=True).indices
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * scaling, choice, group_scores

    # Follows DeepseekV2Moe.route_tokens_to_experts (modeling_deepseek_v2.py, transformers commit
    # 0233e509531ace915c8241b4c16c8032a583279c): float32 softmax; "greedy" = top-k of the scores;
    # "group_limited_greedy" = group score is the group's max, the topk_group best groups kept,
    # the others filled with 0.0, top-k of that; weights = chosen scores * routed_scaling_factor
    # (no renormalisation). HF's topk is unsorted: the slots are written in descending score
    # (moekit's slot order; the sum does not depend on it).
    def deepseek_v2_route(x, w_router, k, method, n_group, topk_group, scaling):
        T, E = x.shape[0], w_router.shape[0]
        scores = F.linear(x.float(), w_router.float()).softmax(dim=-1, dtype=torch.float32)
        if method == "greedy":
            weights, ids = torch.topk(scores, k=k, dim=-1, sorted=False)
        else:
            group_scores = scores.view(T, n_group, -1).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, -1)
            tmp = scores.masked_fill(~score_mask.bool(), 0.0)
            weights, ids = torch.topk(tmp, k=k, dim=-1, sorted=False)
        weights = weights * scaling
        order = torch.argsort(weights, dim=-1, descending=True)
        return ids.gather(1, order), weights.gather(1, order)

    def margin_ok(sorted_desc, k):
        """Relative gap between entry k-1 and entry k of a descending float64 row."""
        if k >= len(sorted_desc) or not np.isfinite(sorted_desc[k]):
            return True
        hi, lo = sorted_desc[k - 1], sorted_desc[k]
        return (hi - lo) > MIN_MARGIN * max(abs(hi), 1e-6)

    def make_tensor(gen, shape, scale):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale

    def expert_scale(shape):
        return WEIGHT_SCALE / math.sqrt(shape[-1])

    def stored(t, dtype):
        """The float32 values a reader gets back after storing t as dtype."""
        if dtype == "BF16":
            r = t.to(torch.bfloat16)
            assert np.array_equal(r.view(torch.int16).numpy().view(np.uint16), bf16_bits(t.numpy()))
            return r.float()
        if dtype == "F16":
            return t.half().float()
        return t.clone()

    manifest, summary = [], []
    for case in CASES:
        name, preset = case["name"], case["preset"]
        T, d, f, E, k = case["T"], case["d"], case["f"], case["E"], case["k"]
        dtype = case["dtype"]
        for attempt in range(200):
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * attempt)
            params = {}  # HF name (without prefix) -> (float32 tensor as stored, dtype)

            def add(pname, shape, scale, dt=dtype):
                params[pname] = (stored(make_tensor(gen, shape, scale), dt), dt)
                return params[pname][0]

            def shared_swiglu(names, width):
                """Adds the SwiGLU FFN `names`{gate,up,down}_proj.weight [width]; returns its output on x."""
                sg = add(names + "gate_proj.weight", (width, d), expert_scale((width, d)))
                su = add(names + "up_proj.weight", (width, d), expert_scale((width, d)))
                sd = add(names + "down_proj.weight", (d, width), expert_scale((d, width)))
                return swiglu(x, sg, su, sd)

            rname = {"granitemoe": "router.layer.weight", "dbrx": "router.layer.weight", "llama4": "router.weight",
                     "gpt_oss": "router.weight", "hunyuan_v1_moe": "gate.wg.weight"}.get(preset, "gate.weight")
            w_router = add(rname, (E, d), GATE_SCALE)
            experts = []
            if preset == "granitemoe":
                w_in = add("input_linear.weight", (E, 2 * f, d), expert_scale((f, d)))
                w_out = add("output_linear.weight", (E, d, f), expert_scale((d, f)))
            if preset == "dbrx":
                w1 = add("experts.mlp.w1", (E * f, d), expert_scale((f, d)))
                v1 = add("experts.mlp.v1", (E * f, d), expert_scale((f, d)))
                w2 = add("experts.mlp.w2", (E * f, d), WEIGHT_SCALE / math.sqrt(f))
            if preset == "llama4":
                gate_up = add("experts.gate_up_proj", (E, d, 2 * f), expert_scale((f, d)))
                down_p = add("experts.down_proj", (E, f, d), WEIGHT_SCALE / math.sqrt(f))
            if preset == "gpt_oss":
                r_bias = add("router.bias", (E,), GATE_SCALE)
                if case.get("mxfp4"):
                    # Follows convert_moe_packed_tensors (transformers integrations/mxfp4.py):
                    # per row, byte j of a 16-byte block holds element 2j (low nibble) and
                    # 2j + 1 (high nibble) of the block's 32; value = FP4_VALUES[code] *
                    # 2^(scale - 127); [E, rows, K] transposed to [E, K, rows].
                    fp4 = torch.tensor([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

                    def mxfp4(base, rows, cols, scale_lo, scale_hi):
                        blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
                        scales = torch.randint(scale_lo, scale_hi + 1, (E, rows, cols // 32), generator=gen,
                                               dtype=torch.uint8)
                        params[base + "_blocks"] = (blocks, "U8")
                        params[base + "_scales"] = (scales, "U8")
                        lo, hi = fp4[(blocks & 0x0F).long()], fp4[(blocks >> 4).long()]
                        vals = torch.stack([lo, hi], dim=-1).reshape(E, rows, cols // 32, 32)
                        vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
                        return vals.reshape(E, rows, cols).transpose(1, 2).contiguous()
                    # |code| ~ 2.6 on average: 2^-3..2^-2 keeps gate/up of O(1..10) (clamps bite)
                    gate_up = mxfp4("experts.gate_up_proj", 2 * f, d, 124, 125)
                    down_p = mxfp4("experts.down_proj", d, f, 121, 122)
                else:
                    gate_up = add("experts.gate_up_proj", (E, d, 2 * f), 6.0 / math.sqrt(d))
                    down_p = add("experts.down_proj", (E, f, d), WEIGHT_SCALE / math.sqrt(f))
                gu_bias = add("experts.gate_up_proj_bias", (E, 2 * f), 1.0)
                dn_bias = add("experts.down_proj_bias", (E, d), 0.3)
            for e in range(E if preset not in ("granitemoe", "dbrx", "llama4", "gpt_oss") else 0):
                if preset in ("mixtral", "phimoe"):
                    wg = add(f"experts.{e}.w1.weight", (f, d), expert_scale((f, d)))
                    wu = add(f"experts.{e}.w3.weight", (f, d), expert_scale((f, d)))
                    wd = add(f"experts.{e}.w2.weight", (d, f), expert_scale((d, f)))
                    experts.append((wg, wu, wd))
                elif preset == "switch":
                    wu = add(f"experts.{e}.up_proj.weight", (f, d), expert_scale((f, d)))
                    wd = add(f"experts.{e}.down_proj.weight", (d, f), expert_scale((d, f)))
                    experts.append((wu, wd))
                else:
                    wg = add(f"experts.{e}.gate_proj.weight", (f, d), expert_scale((f, d)))
                    wu = add(f"experts.{e}.up_proj.weight", (f, d), expert_scale((f, d)))
                    wd = add(f"experts.{e}.down_proj.weight", (d, f), expert_scale((d, f)))
                    experts.append((wg, wu, wd))
            x = make_tensor(gen, (T, d), 1.0)

            notes = {}
            if preset in ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe"):
                renorm = True if preset == "mixtral" else bool(case.get("norm_topk_prob"))
                ids, weights = softmax_topk(x, w_router, k, renorm)
                y = combine(x, ids, weights, lambda e, rows: swiglu(rows, *experts[e]), E)
                if preset in ("qwen2_moe", "qwen3_next"):
                    shared_out = shared_swiglu("shared_expert.", case["shared_f"])
                    sgate = add("shared_expert_gate.weight", (1, d), GATE_SCALE)
                    # Follows the tail of Qwen2MoeSparseMoeBlock.forward: the shared expert,
                    # scaled by sigmoid(shared_expert_gate(x)), added to the routed sum.
                    y = y + torch.sigmoid(F.linear(x, sgate)) * shared_out
                sel64 = torch.softmax(F.linear(x.double(), w_router.double()), dim=1).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], k) for r in sel64)
            elif preset in ("deepseek_v3", "glm4_moe"):
                G, TG = case["n_group"], case["topk_group"]
                if case["bias"] == "random":
                    bias = make_tensor(gen, (E,), 0.1)
                else:
                    bias = make_tensor(gen, (E,), 0.05)
                    bias[1::2] -= 1.5
                params["gate.e_score_correction_bias"] = (bias, "F32")
                ids, weights, choice, gscores = deepseek_route(
                    x, w_router, bias, k, G, TG, case["norm_topk_prob"], case["scaling"], float("-inf"))
                y = combine(x, ids, weights, lambda e, rows: swiglu(rows, *experts[e]), E)
                shared_out = shared_swiglu("shared_experts.", case["n_shared"] * f)
                # Follows DeepseekV3MoE.forward: routed sum plus the ungated shared experts.
                y = y + shared_out
                # Margins (float64) on group choice and on the masked selection.
                s64 = 1.0 / (1.0 + np.exp(-(x.double() @ w_router.double().T).numpy()))
                c64 = s64 + bias.double().numpy()
                g64 = np.sort(c64.reshape(T, G, E // G), axis=-1)[..., ::-1][..., :2].sum(-1)
                ok = all(margin_ok(np.sort(r)[::-1], TG) for r in g64)
                masked64 = c64.copy()
                for t in range(T):
                    top_groups = sorted(range(G), key=lambda g: (-g64[t, g], g))[:TG]
                    for g in range(G):
                        if g not in top_groups:
                            masked64[t, g * (E // G):(g + 1) * (E // G)] = -np.inf
                ok = ok and all(margin_ok(np.sort(r)[::-1], k) for r in masked64)
                unbiased_ids, _, _, _ = deepseek_route(
                    x, w_router, torch.zeros(E), k, G, TG, True, 1.0, float("-inf"))
                hf_ids, _, _, _ = deepseek_route(
                    x, w_router, bias, k, G, TG, True, 1.0, 0.0)
                changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, unbiased_ids))
                zero_fill = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, hf_ids))
                notes = {"tokens changed by bias": changed, "tokens where 0.0-fill differs": zero_fill}
                if case["bias"] == "random":
                    ok = ok and changed > 0
                else:
                    ok = ok and zero_fill == T
            elif preset == "deepseek_v2":
                method = case["topk_method"]
                G, TG = case.get("n_group", 1), case.get("topk_group", 1)
                ids, weights = deepseek_v2_route(x, w_router, k, method, G, TG, case["scaling"])
                y = combine(x, ids, weights, lambda e, rows: swiglu(rows, *experts[e]), E)
                shared_out = shared_swiglu("shared_experts.", case["n_shared"] * f)
                # Follows DeepseekV2Moe.forward: routed sum plus the shared experts.
                y = y + shared_out
                p64 = torch.softmax(F.linear(x.double(), w_router.double()), dim=1).numpy()
                if method == "greedy":
                    ok = all(margin_ok(np.sort(r)[::-1], k) for r in p64)
                    notes = {}
                else:
                    g64 = p64.reshape(T, G, E // G).max(-1)
                    ok = all(margin_ok(np.sort(r)[::-1], TG) for r in g64)
                    masked64 = p64.copy()
                    v3_rule = 0
                    for t in range(T):
                        kept = sorted(range(G), key=lambda g: (-g64[t, g], g))[:TG]
                        top2 = np.sort(p64[t].reshape(G, E // G), axis=-1)[:, ::-1][:, :2].sum(-1)
                        v3_rule += set(kept) != set(sorted(range(G), key=lambda g: (-top2[g], g))[:TG])
                        for g in range(G):
                            if g not in kept:
                                masked64[t, g * (E // G):(g + 1) * (E // G)] = -np.inf
                    ok = ok and all(margin_ok(np.sort(r)[::-1], k) for r in masked64)
                    # The case must tell V2's rule from V3's (sum of the best two).
                    notes = {"tokens whose kept groups differ under the top-2 sum": v3_rule}
                    ok = ok and v3_rule > 0
            elif preset == "granitemoe":
                # Follows GraniteMoeTopKGating.forward (modeling_granitemoe.py): float logits,
                # top-k of the logits, softmax over the k; GraniteMoeMoE.forward: per expert
                # input_linear (F.linear with weight[e] [2f, d]), chunk(2): act(first) * second,
                # output_linear (weight[e] [d, f]), times the gate, index_add_.
                logits = F.linear(x, w_router).float()
                top_logits, ids = logits.topk(k, dim=1)
                weights = torch.softmax(top_logits, dim=1)

                def granite_expert(e, rows):
                    h = F.linear(rows, w_in[e])
                    g, u = h.chunk(2, dim=-1)
                    return F.linear(F.silu(g) * u, w_out[e])
                y = combine(x, ids, weights, granite_expert, E)
                l64 = (x.double() @ w_router.double().T).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], k) for r in l64)
            elif preset == "phimoe":
                # Follows sparsemixer(..., training=False) and PhimoeSparseMoeBlock.forward
                # (modeling_phimoe.py): per pick, the max logit, the softmax over the logits within
                # a relative 2 eps (the second pick without the first), read at the pick.
                scores = F.linear(x, w_router)
                eps = case["eps"]
                thr, max_ind = scores.max(dim=-1, keepdim=True)
                factor = scores.abs().clamp(min=thr)
                mask = ((thr - scores) / factor) > (2 * eps)
                g1 = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
                w1 = g1.gather(dim=-1, index=max_ind)
                masked_scores = torch.scatter(scores, -1, max_ind, float("-inf"))
                thr2, max_ind2 = masked_scores.max(dim=-1, keepdim=True)
                factor2 = scores.abs().clamp(min=thr2)
                mask2 = ((thr2 - scores) / factor2) > (2 * eps)
                g2 = torch.softmax(masked_scores.masked_fill(mask2, float("-inf")), dim=-1)
                w2 = g2.gather(dim=-1, index=max_ind2)
                weights = torch.cat((w1, w2), dim=-1)
                ids = torch.cat((max_ind, max_ind2), dim=-1)
                y = combine(x, ids, weights, lambda e, rows: swiglu(rows, *experts[e]), E)
                l64 = (x.double() @ w_router.double().T).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], 2) for r in l64)
                # Thresholds away from the boundary (float vs double), and a few multi-expert softmaxes.
                for t in range(T):
                    for m_, fac in ((thr[t, 0], factor[t]), (thr2[t, 0], factor2[t])):
                        rel = ((float(m_) - l64[t]) / fac.double().numpy())
                        ok = ok and bool(np.all(np.abs(rel - 2 * eps) > 1e-4))
                multi = int((~mask).sum(-1).gt(1).sum() + (~mask2).sum(-1).gt(2).sum())
                notes = {"picks whose softmax holds > 1 expert": multi}
                ok = ok and multi > 0
            elif preset == "hunyuan_v1_moe":
                # Follows HunYuanMoEV1Moe.forward (modeling_hunyuan_v1_moe.py): f32 logits of
                # gate.wg, softmax, top-k, divided by their sum; shared_mlp added.
                probs = F.softmax(F.linear(x.float(), w_router.float()), dim=1, dtype=torch.float)
                weights, ids = torch.topk(probs, k, dim=-1)
                weights = weights / weights.sum(dim=-1, keepdim=True)
                y = combine(x, ids, weights, lambda e, rows: swiglu(rows, *experts[e]), E)
                shared_out = shared_swiglu("shared_mlp.", f)
                y = y + shared_out
                p64 = torch.softmax(F.linear(x.double(), w_router.double()), dim=1).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], k) for r in p64)
            elif preset == "ernie4_5_moe":
                # Follows Ernie4_5_MoeSparseMoeBlock.forward (modeling_ernie4_5_moe.py): f32 logits,
                # softmax, top-k of softmax + moe_statics.e_score_correction_bias, the chosen
                # softmax values / clamp(sum, min=moe_norm_min); shared experts added.
                bias = make_tensor(gen, (1, E), 0.05)
                params["moe_statics.e_score_correction_bias"] = (bias, "F32")
                probs = F.softmax(F.linear(x.float(), w_router.float()), dim=1, dtype=torch.float)
                _, ids = torch.topk(probs + bias.squeeze(), k, dim=-1)
                weights = torch.gather(probs, dim=-1, index=ids)
                weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=1e-12)
                y = combine(x, ids, weights, lambda e, rows: swiglu(rows, *experts[e]), E)
                shared_out = shared_swiglu("shared_experts.", case["n_shared"] * f)
                y = y + shared_out
                p64 = torch.softmax(F.linear(x.double(), w_router.double()), dim=1).numpy() + bias.double().numpy()
                ok = all(margin_ok(np.sort(r)[::-1], k) for r in p64)
                plain = torch.topk(probs, k, dim=-1).indices
                changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, plain))
                notes = {"tokens changed by bias": changed}
                ok = ok and changed > 0
            elif preset == "gpt_oss":
                # Follows GptOssTopKRouter.forward and GptOssExperts.forward (modeling_gpt_oss.py,
                # transformers 6edf5b3): logits = x W^T + b; top-k (sorted) of the logits;
                # softmax over the k; per chosen expert gate_up = x @ gate_up_proj[e] + bias,
                # gate = [..., ::2], up = [..., 1::2], gate.clamp(max=7), up.clamp(-7, 7),
                # glu = gate * sigmoid(1.702 gate), (up + 1) * glu @ down_proj[e] + bias, times the
                # routing weight, summed.
                logits = F.linear(x, w_router, r_bias)
                top_v, top_i = torch.topk(logits, k, dim=-1, sorted=True)
                top_w = torch.softmax(top_v, dim=1)
                y = torch.zeros_like(x)
                for t in range(T):
                    for j in range(k):
                        e = int(top_i[t, j])
                        gu = x[t] @ gate_up[e] + gu_bias[e]
                        g_, u_ = gu[::2].clamp(min=None, max=7.0), gu[1::2].clamp(min=-7.0, max=7.0)
                        glu = g_ * torch.sigmoid(g_ * 1.702)
                        y[t] += top_w[t, j] * (((u_ + 1) * glu) @ down_p[e] + dn_bias[e])
                ids, weights = top_i, top_w
                l64 = (x.double() @ w_router.double().T + r_bias.double()).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], k) for r in l64)
                g_all = torch.einsum("td,edf->tef", x, gate_up) + gu_bias
                clamped = int((g_all[..., ::2] > 7).sum() + (g_all[..., 1::2].abs() > 7).sum())
                notes = {"gate/up values beyond the clamp": clamped}
                ok = ok and clamped > 0
            elif preset == "llama4":
                # Follows Llama4TextMoe.forward and Llama4Router.forward (modeling_llama4.py):
                # top-k of the logits, scores = sigmoid of the chosen logits (-inf elsewhere, so
                # 0), every expert applied to x * its score (bmm with gate_up_proj, chunk(2):
                # up * silu(gate), bmm with down_proj), summed over experts, plus the shared
                # expert (Llama4TextMLP).
                logits = F.linear(x, w_router)
                top_v, top_i = torch.topk(logits, k, dim=1)
                scores = torch.full_like(logits, float("-inf")).scatter_(1, top_i, top_v).transpose(0, 1)
                scores = torch.sigmoid(scores.float())
                routed_in = x.repeat(E, 1) * scores.reshape(-1, 1)
                gu = torch.bmm(routed_in.view(E, -1, d), gate_up)
                g_, u_ = gu.chunk(2, dim=-1)
                routed_out = torch.bmm(u_ * F.silu(g_), down_p).view(-1, d)
                shared_out = shared_swiglu("shared_expert.", f)
                y = shared_out + routed_out.view(E, -1, d).sum(dim=0)
                ids = top_i
                weights = torch.sigmoid(top_v)
                l64 = (x.double() @ w_router.double().T).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], k) for r in l64)
            elif preset == "dbrx":
                # Follows DbrxRouter.forward (modeling_dbrx.py): softmax in float32, top-k,
                # divided by torch.norm(p = moe_normalize_expert_weights); DbrxExpertGLU:
                # act(x w1[e]^T) * (x v1[e]^T) @ w2[e], w1/v1/w2 viewed as [E, f, d].
                probs = F.linear(x, w_router).softmax(dim=-1, dtype=torch.float32)
                top_w, ids = torch.topk(probs, k, dim=-1)
                weights = top_w / torch.norm(top_w, p=case["norm_p"], dim=-1, keepdim=True)
                w1e, v1e, w2e = w1.view(E, f, d), v1.view(E, f, d), w2.view(E, f, d)

                def dbrx_expert(e, rows):
                    return (F.silu(rows.matmul(w1e[e].t())) * rows.matmul(v1e[e].t())).matmul(w2e[e])
                y = combine(x, ids, weights, dbrx_expert, E)
                p64 = torch.softmax(F.linear(x.double(), w_router.double()), dim=1).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], k) for r in p64)
            elif preset == "switch":
                # moekit's switch preset (ROUTING.md section 1; Switch Transformer, arXiv 2101.03961;
                # capacity as Megatron get_capacity): top-1 softmax, weight = top-1 probability,
                # C = max(min_capacity, ceil((T*k/E) * capacity_factor)) in double, each expert keeps
                # its earliest C tokens; dropped slots get id -1, weight 0.
                probs = torch.softmax(F.linear(x, w_router), dim=1, dtype=torch.float32)
                weights, ids = torch.topk(probs, 1, dim=-1, sorted=True)
                capacity = max(0, math.ceil((float(T * k) / E) * case["capacity_factor"]))
                used = [0] * E
                for t in range(T):
                    e = int(ids[t, 0])
                    if used[e] < capacity:
                        used[e] += 1
                    else:
                        ids[t, 0] = -1
                        weights[t, 0] = 0.0
                y = combine(x, ids, weights, lambda e, rows: relu_ffn(rows, *experts[e]), E)
                loads = np.bincount(torch.argmax(probs, dim=1).numpy(), minlength=E)
                dropped = int((ids == -1).sum())
                notes = {"capacity": capacity, "loads": loads.tolist(), "dropped": dropped}
                sel64 = torch.softmax(F.linear(x.double(), w_router.double()), dim=1).numpy()
                ok = all(margin_ok(np.sort(r)[::-1], 1) for r in sel64)
                # an expert loaded beyond C keeps its 8th token with C = 8 but would drop it with C = 7
                ok = ok and 0 < dropped < T and loads.max() > capacity
            else:
                raise ValueError(preset)
            if ok:
                break
        else:
            raise RuntimeError(f"{name}: no attempt met the margin/coverage conditions")

        assert torch.isfinite(y).all() and float(y.abs().max()) > 0.05, name
        # Tolerance sanity: a kernel that rounds the expert activations to the weight dtype
        # (BF16/FP16 dot products) must still pass the tolerances written to cases.json.
        lowp_dev = 0.0  # worst |dy| / (tolerance_abs + tolerance_rel |y|) of such a kernel
        if dtype != "F32" and preset not in ("switch", "granitemoe", "dbrx", "llama4", "gpt_oss"):
            rnd = (lambda t: t.to(torch.bfloat16).float()) if dtype == "BF16" else (lambda t: t.half().float())

            def swiglu_lowp(rows, wg, wu, wd):
                xr = rnd(rows)
                return F.linear(rnd(F.silu(F.linear(xr, wg)) * F.linear(xr, wu)), wd)
            y_lp = combine(x, ids, weights, lambda e, rows: swiglu_lowp(rows, *experts[e]), E)
            y_lp = y_lp + (y - combine(x, ids, weights, lambda e, rows: swiglu(rows, *experts[e]), E))
            rel, absol = TOL[dtype]
            lowp_dev = float(((y_lp - y).abs() / (absol + rel * y.abs())).max())
            assert lowp_dev < 1.0, f"{name}: tolerance too tight for {dtype}-activation kernels"

        config = make_config(case)
        with open(os.path.join(out_dir, f"{name}.config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
            fh.write("\n")
        write_safetensors(os.path.join(out_dir, f"{name}.weights.safetensors"),
                          [(case["prefix"] + n, t.numpy(), dt) for n, (t, dt) in params.items()])
        write_safetensors(os.path.join(out_dir, f"{name}.input.safetensors"),
                          [("hidden_states", x.numpy(), "F32")])
        write_safetensors(os.path.join(out_dir, f"{name}.expected.safetensors"),
                          [("hidden_states", y.numpy(), "F32"),
                           ("topk_ids", ids.to(torch.int32).numpy(), "I32"),
                           ("topk_weights", weights.float().numpy(), "F32")])
        rel, absol = TOL[dtype]
        manifest.append({"name": name, "prefix": case["prefix"], "tolerance_rel": rel, "tolerance_abs": absol})
        summary.append(f"{name:22s} T={T:2d} d={d:2d} f={f:2d} E={E:2d} k={k} {dtype:4s} attempt={attempt} "
                       f"max|y|={float(y.abs().max()):.3f} lowp_dev/tol={lowp_dev:.2f} {notes}")

    with open(os.path.join(out_dir, "cases.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    print("\n".join(summary))


def make_config(case):
    """config.json of a case: HF key names for HF presets, moekit's own format for switch."""
    p, d, f, E, k = case["preset"], case["d"], case["f"], case["E"], case["k"]
    if p == "switch":
        return {"moekit_config_version": 1, "preset": "switch", "hidden_size": d,
                "router": {"num_experts": E, "capacity_factor": case["capacity_factor"]},
                "experts": {"type": "relu", "intermediate_size": f}}
    if p == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": d,
                "intermediate_size": f, "num_local_experts": E, "num_experts_per_tok": k,
                "hidden_act": "silu"}
    if p in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        arch = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "qwen3_next": "Qwen3NextForCausalLM"}[p]
        cfg = {"architectures": [arch],
               "model_type": p, "hidden_size": d,
               "intermediate_size": 4 * d,  # dense-MLP width in HF; unused by the MoE block
               "moe_intermediate_size": f, "num_experts": E, "num_experts_per_tok": k,
               "norm_topk_prob": case["norm_topk_prob"], "hidden_act": "silu"}
        if p in ("qwen2_moe", "qwen3_next"):
            cfg["shared_expert_intermediate_size"] = case["shared_f"]
        return cfg
    if p == "olmoe":
        cfg = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": d,
               "intermediate_size": f, "num_experts": E, "num_experts_per_tok": k, "hidden_act": "silu"}
        if case["norm_topk_prob"] is not None:
            cfg["norm_topk_prob"] = case["norm_topk_prob"]
        return cfg
    if p == "deepseek_v3":
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": d,
                "intermediate_size": 4 * d,  # dense-layer width in HF; unused by the MoE block
                "moe_intermediate_size": f, "n_routed_experts": E, "num_experts_per_tok": k,
                "n_group": case["n_group"], "topk_group": case["topk_group"],
                "routed_scaling_factor": case["scaling"], "n_shared_experts": case["n_shared"],
                "norm_topk_prob": case["norm_topk_prob"], "scoring_func": "sigmoid",
                "topk_method": "noaux_tc", "hidden_act": "silu"}
    if p == "granitemoe":
        return {"architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe", "hidden_size": d,
                "intermediate_size": f, "num_local_experts": E, "num_experts_per_tok": k, "hidden_act": "silu",
                "residual_multiplier": 0.22, "embedding_multiplier": 12.0}  # outside the MoE block
    if p == "dbrx":
        return {"architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": d,
                "ffn_config": {"ffn_hidden_size": f, "moe_num_experts": E, "moe_top_k": k,
                               "moe_normalize_expert_weights": case["norm_p"], "moe_jitter_eps": 0.01,
                               "ffn_act_fn": {"name": "silu"}}}
    if p == "phimoe":
        return {"architectures": ["PhimoeForCausalLM"], "model_type": "phimoe", "hidden_size": d,
                "intermediate_size": f, "num_local_experts": E, "num_experts_per_tok": k,
                "router_jitter_noise": case["eps"], "input_jitter_noise": 0.01, "hidden_act": "silu"}
    if p == "hunyuan_v1_moe":
        return {"architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan_v1_moe", "hidden_size": d,
                "intermediate_size": f, "num_experts": E, "moe_topk": [k, k, k],
                "moe_intermediate_size": [f, f, f], "num_shared_expert": [1, 1, 1], "num_hidden_layers": 3,
                "use_mixed_mlp_moe": True, "moe_drop_tokens": False, "hidden_act": "silu"}
    if p == "ernie4_5_moe":
        return {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_size": d,
                "intermediate_size": 4 * d,  # dense layers; unused by the MoE block
                "moe_intermediate_size": f, "moe_num_experts": E, "moe_k": k,
                "moe_num_shared_experts": case["n_shared"], "moe_norm_min": 1e-12, "use_bias": False,
                "hidden_act": "silu", "moe_layer_start_index": 1}
    if p == "llama4":  # the released multimodal config nests the text model
        return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                "text_config": {"model_type": "llama4_text", "hidden_size": d, "intermediate_size": f,
                                "intermediate_size_mlp": 4 * f,  # dense layers; unused by the MoE block
                                "num_local_experts": E, "num_experts_per_tok": k, "hidden_act": "silu",
                                "interleave_moe_layer_step": 1}}
    if p == "gpt_oss":  # the released config.json's keys (gpt-oss-20b), sizes of the case
        cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": d,
               "intermediate_size": f, "num_local_experts": E, "num_experts_per_tok": k, "experts_per_token": k,
               "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9, "hidden_act": "silu"}
        if case.get("mxfp4"):
            cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        return cfg
    if p == "glm4_moe":
        return {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": d,
                "intermediate_size": 4 * d,  # dense-layer width in HF; unused by the MoE block
                "moe_intermediate_size": f, "n_routed_experts": E, "num_experts_per_tok": k,
                "n_group": case["n_group"], "topk_group": case["topk_group"],
                "routed_scaling_factor": case["scaling"], "n_shared_experts": case["n_shared"],
                "norm_topk_prob": case["norm_topk_prob"], "first_k_dense_replace": 1, "hidden_act": "silu"}
    if p == "deepseek_v2":
        cfg = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": d,
               "intermediate_size": 4 * d,  # dense-layer width in HF; unused by the MoE block
               "moe_intermediate_size": f, "n_routed_experts": E, "num_experts_per_tok": k,
               "n_shared_experts": case["n_shared"], "routed_scaling_factor": case["scaling"],
               "topk_method": case["topk_method"], "norm_topk_prob": False, "scoring_func": "softmax",
               "hidden_act": "silu"}
        if case["topk_method"] == "group_limited_greedy":
            cfg["n_group"], cfg["topk_group"] = case["n_group"], case["topk_group"]
        return cfg
    raise ValueError(p)


# --------------------------------------------------------------------------------------
# Check mode: independent float64 NumPy loops over the files on disk
# --------------------------------------------------------------------------------------
def read_safetensors(path):
    """name -> float64 (floats) or int64 (ints) array; validates the layout strictly."""
    with open(path, "rb") as fh:
        blob = fh.read()
    (hlen,) = struct.unpack_from("<Q", blob, 0)
    assert hlen % 8 == 0, f"{path}: header length {hlen} not a multiple of 8"
    header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    body = blob[8 + hlen:]
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U8": 1}
    out, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        count = int(np.prod(meta["shape"], dtype=np.int64))
        assert end - begin == count * sizes[meta["dtype"]], f"{path}:{name}: size mismatch"
        raw = body[begin:end]
        if meta["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        elif meta["dtype"] == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float64)
        elif meta["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        elif meta["dtype"] == "U8":
            a = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        else:
            a = np.frombuffer(raw, dtype="<i4").astype(np.int64)
        out[name] = a.reshape(meta["shape"])
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        assert begin == pos, f"{path}: gap or overlap in data_offsets"
        pos = end
    assert pos == len(body), f"{path}: trailing bytes"
    return out, header


def ref_silu(z):
    return z / (1.0 + math.exp(-z))


def ref_swiglu(x, wg, wu, wd):
    f = wg.shape[0]
    h = [ref_silu(float(np.dot(wg[j], x))) * float(np.dot(wu[j], x)) for j in range(f)]
    return np.array([sum(wd[i, j] * h[j] for j in range(f)) for i in range(wd.shape[0])])


def ref_relu_ffn(x, wu, wd):
    f = wu.shape[0]
    h = [max(0.0, float(np.dot(wu[j], x))) for j in range(f)]
    return np.array([sum(wd[i, j] * h[j] for j in range(f)) for i in range(wd.shape[0])])


def ref_softmax(logits):
    """Softmax of a list of floats in float64 (max subtracted)."""
    m = max(logits)
    ex = [math.exp(l - m) for l in logits]
    z = sum(ex)
    return [v / z for v in ex]


def ranked(values, candidates):
    """Candidates in descending value, ties to the lower index (ROUTING.md section 0)."""
    return sorted(candidates, key=lambda e: (-values[e], e))


def ref_e2m1(code):
    """An OCP MX FP4 (e2m1) code as a float, from its bits: sign, 2-bit exponent (bias 1), mantissa."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else (1.0 + 0.5 * m) * 2.0 ** (e - 1))


def ref_mxfp4_rows(blocks, scales):
    """[E, R, G, 16] codes + [E, R, G] e8m0 scales -> [E, R, 32 G] float64 (element 2j: low nibble)."""
    E, R, G, _ = blocks.shape
    out = np.zeros((E, R, 32 * G))
    for e in range(E):
        for r in range(R):
            for g in range(G):
                s = 2.0 ** (int(scales[e, r, g]) - 127)
                for j in range(16):
                    b = int(blocks[e, r, g, j])
                    out[e, r, 32 * g + 2 * j] = ref_e2m1(b & 15) * s
                    out[e, r, 32 * g + 2 * j + 1] = ref_e2m1(b >> 4) * s
    return out


def ref_gpt_oss_expert(x, wg, wu, bg, bu, wd, bd, alpha=1.702, limit=7.0):
    """gpt-oss expert: wg, wu [f, d] (HF [out, in]), wd [d, f], biases; the clamped SwiGLU."""
    h = []
    for j in range(wg.shape[0]):
        g = min(float(np.dot(wg[j], x)) + bg[j], limit)
        u = min(max(float(np.dot(wu[j], x)) + bu[j], -limit), limit)
        h.append((u + 1.0) * g / (1.0 + math.exp(-alpha * g)))
    return np.array([sum(wd[i, j] * h[j] for j in range(len(h))) + bd[i] for i in range(wd.shape[0])])


def ref_case(cfg, W, x):
    """Returns (y [T, d], ids [T, k], weights [T, k]) in float64."""
    T, d = x.shape
    preset = cfg.get("model_type") or cfg.get("preset")
    wr = (W["router.layer.weight"] if preset in ("granitemoe", "dbrx")
          else W["router.weight"] if preset in ("llama4", "gpt_oss")
          else W["gate.wg.weight"] if preset == "hunyuan_v1_moe" else W["gate.weight"])
    if preset == "llama4":
        cfg = cfg["text_config"]
    E = wr.shape[0]
    if preset == "switch":
        k = 1
        assert cfg["hidden_size"] == d and cfg["router"]["num_experts"] == E
    elif preset in ("mixtral", "phimoe"):
        k = cfg["num_experts_per_tok"]
        assert cfg["num_local_experts"] == E
    elif preset in ("deepseek_v3", "glm4_moe"):
        k = cfg.get("num_experts_per_tok", 8)
        assert cfg["n_routed_experts"] == E
    elif preset == "deepseek_v2":
        k = cfg["num_experts_per_tok"]
        assert cfg["n_routed_experts"] == E
    elif preset in ("llama4", "gpt_oss"):
        k = cfg["num_experts_per_tok"]
        assert cfg["num_local_experts"] == E
    elif preset == "hunyuan_v1_moe":
        k = cfg["moe_topk"][0] if isinstance(cfg["moe_topk"], list) else cfg["moe_topk"]
        assert cfg["num_experts"] == E
    elif preset == "ernie4_5_moe":
        k = cfg.get("moe_k", 6)
        assert cfg.get("moe_num_experts", 64) == E
    elif preset == "granitemoe":
        k = cfg["num_experts_per_tok"]
        assert cfg["num_local_experts"] == E
    elif preset == "dbrx":
        k = cfg["ffn_config"]["moe_top_k"]
        assert cfg["ffn_config"]["moe_num_experts"] == E
    else:
        k = cfg["num_experts_per_tok"]
        assert cfg["num_experts"] == E
    ids = np.full((T, k), -1, dtype=np.int64)
    wts = np.zeros((T, k))
    for t in range(T):
        logits = [float(np.dot(wr[e], x[t])) for e in range(E)]
        if preset in ("deepseek_v3", "glm4_moe"):
            bias = W.get("gate.e_score_correction_bias", np.zeros(E))
            v3 = preset == "deepseek_v3"  # class defaults: DeepseekV3Config / Glm4MoeConfig
            G, TG = cfg.get("n_group", 8 if v3 else 1), cfg.get("topk_group", 4 if v3 else 1)
            per = E // G
            score = [1.0 / (1.0 + math.exp(-l)) for l in logits]
            sel = [score[e] + bias[e] for e in range(E)]
            gscore = [sum(sorted(sel[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
            groups = ranked(gscore, range(G))[:TG]
            cand = [e for g in groups for e in range(g * per, (g + 1) * per)]
            chosen = ranked(sel, cand)[:k]  # the others are -inf: never chosen
            w = [score[e] for e in chosen]
            if cfg.get("norm_topk_prob", True):
                s = sum(w) + 1e-20
                w = [v / s for v in w]
            w = [v * cfg.get("routed_scaling_factor", 2.5 if v3 else 1.0) for v in w]
        elif preset == "phimoe":
            eps = cfg.get("router_jitter_noise", 0.01)
            chosen = ranked(logits, range(E))[:2]
            w = []
            for j, m in enumerate(logits[e] for e in chosen):
                cand = [e for e in range(E) if not (j == 1 and e == chosen[0])
                        and not ((m - logits[e]) / max(abs(logits[e]), m) > 2 * eps)]
                w.append(1.0 / sum(math.exp(logits[e] - m) for e in cand))
        elif preset == "ernie4_5_moe":
            prob = ref_softmax(logits)
            b = W["moe_statics.e_score_correction_bias"][0]
            chosen = ranked([prob[e] + b[e] for e in range(E)], range(E))[:k]
            ssum = max(sum(prob[e] for e in chosen), cfg.get("moe_norm_min", 1e-12))
            w = [prob[e] / ssum for e in chosen]
        elif preset == "llama4":
            chosen = ranked(logits, range(E))[:k]
            w = [1.0 / (1.0 + math.exp(-logits[e])) for e in chosen]
        elif preset == "gpt_oss":  # the router's bias enters selection and weights
            logits = [logits[e] + W["router.bias"][e] for e in range(E)]
            chosen = ranked(logits, range(E))[:k]
            w = ref_softmax([logits[e] for e in chosen])
        elif preset == "granitemoe":
            chosen = ranked(logits, range(E))[:k]
            w = ref_softmax([logits[e] for e in chosen])
        elif preset == "dbrx":
            prob = ref_softmax(logits)
            chosen = ranked(prob, range(E))[:k]
            pn = cfg["ffn_config"].get("moe_normalize_expert_weights", 1.0)
            norm = sum(prob[e] ** pn for e in chosen) ** (1.0 / pn)
            w = [prob[e] / norm for e in chosen]
        elif preset == "deepseek_v2":
            prob = ref_softmax(logits)
            cand = list(range(E))
            if cfg.get("topk_method", "greedy") == "group_limited_greedy":
                G, TG = cfg["n_group"], cfg["topk_group"]
                per = E // G
                gscore = [max(prob[g * per:(g + 1) * per]) for g in range(G)]
                cand = [e for g in ranked(gscore, range(G))[:TG] for e in range(g * per, (g + 1) * per)]
            chosen = ranked(prob, cand)[:k]
            w = [prob[e] * cfg.get("routed_scaling_factor", 1.0) for e in chosen]
        else:
            prob = ref_softmax(logits)
            chosen = ranked(prob, range(E))[:k]
            w = [prob[e] for e in chosen]
            norm = True if preset in ("mixtral", "hunyuan_v1_moe") else (False if preset == "switch"
                                                     else cfg.get("norm_topk_prob", preset == "qwen3_next"))
            if norm:
                s = sum(w)
                w = [v / s for v in w]
        ids[t] = chosen
        wts[t] = w
    if preset == "switch":
        cf = cfg["router"].get("capacity_factor", 0.0)
        if cf:
            cap = max(cfg["router"].get("min_capacity", 0), math.ceil((float(T * k) / E) * cf))
            taken = [0] * E
            for t in range(T):
                e = int(ids[t, 0])
                if taken[e] < cap:
                    taken[e] += 1
                else:
                    ids[t, 0], wts[t, 0] = -1, 0.0
    if preset == "gpt_oss":  # HF layout [E, d, 2f] (gate_up) / [E, f, d] (down), or MXFP4 rows
        if "experts.gate_up_proj_blocks" in W:
            gu_rows = ref_mxfp4_rows(W["experts.gate_up_proj_blocks"], W["experts.gate_up_proj_scales"])
            dn_rows = ref_mxfp4_rows(W["experts.down_proj_blocks"], W["experts.down_proj_scales"])
        else:
            gu_rows = W["experts.gate_up_proj"].transpose(0, 2, 1)
            dn_rows = W["experts.down_proj"].transpose(0, 2, 1)
        gub, dnb = W["experts.gate_up_proj_bias"], W["experts.down_proj_bias"]
    y = np.zeros((T, d))
    for t in range(T):
        for s in range(k):
            e = int(ids[t, s])
            if e < 0:
                continue
            if preset == "switch":
                out = ref_relu_ffn(x[t], W[f"experts.{e}.up_proj.weight"], W[f"experts.{e}.down_proj.weight"])
            elif preset in ("mixtral", "phimoe"):
                out = ref_swiglu(x[t], W[f"experts.{e}.w1.weight"], W[f"experts.{e}.w3.weight"],
                                 W[f"experts.{e}.w2.weight"])
            elif preset == "llama4":  # weight on the input: E(w x), added unweighted
                gu, f2 = W["experts.gate_up_proj"][e], W["experts.gate_up_proj"].shape[2] // 2
                y[t] += ref_swiglu(wts[t, s] * x[t], gu[:, :f2].T, gu[:, f2:].T, W["experts.down_proj"][e].T)
                continue
            elif preset == "gpt_oss":  # rows 2j gate, 2j + 1 up
                out = ref_gpt_oss_expert(x[t], gu_rows[e][0::2], gu_rows[e][1::2], gub[e][0::2], gub[e][1::2],
                                         dn_rows[e], dnb[e])
            elif preset == "granitemoe":
                wi, f2 = W["input_linear.weight"][e], W["input_linear.weight"].shape[1] // 2
                out = ref_swiglu(x[t], wi[:f2], wi[f2:], W["output_linear.weight"][e])
            elif preset == "dbrx":
                f = cfg["ffn_config"]["ffn_hidden_size"]
                rows = slice(e * f, (e + 1) * f)
                out = ref_swiglu(x[t], W["experts.mlp.w1"][rows], W["experts.mlp.v1"][rows],
                                 W["experts.mlp.w2"][rows].T)
            else:
                out = ref_swiglu(x[t], W[f"experts.{e}.gate_proj.weight"], W[f"experts.{e}.up_proj.weight"],
                                 W[f"experts.{e}.down_proj.weight"])
            y[t] += wts[t, s] * out
        if preset == "hunyuan_v1_moe":
            y[t] += ref_swiglu(x[t], W["shared_mlp.gate_proj.weight"], W["shared_mlp.up_proj.weight"],
                               W["shared_mlp.down_proj.weight"])
        if preset == "llama4":
            y[t] += ref_swiglu(x[t], W["shared_expert.gate_proj.weight"], W["shared_expert.up_proj.weight"],
                               W["shared_expert.down_proj.weight"])
        if preset in ("qwen2_moe", "qwen3_next"):
            g = 1.0 / (1.0 + math.exp(-float(np.dot(W["shared_expert_gate.weight"][0], x[t]))))
            y[t] += g * ref_swiglu(x[t], W["shared_expert.gate_proj.weight"],
                                   W["shared_expert.up_proj.weight"], W["shared_expert.down_proj.weight"])
        if preset in ("deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe"):
            sw = W["shared_experts.gate_proj.weight"]
            if preset == "ernie4_5_moe":
                assert sw.shape[0] == cfg.get("moe_num_shared_experts", 2) * cfg["moe_intermediate_size"]
            else:
                dflt = 2 if preset == "deepseek_v2" else 1
                assert sw.shape[0] == cfg.get("n_shared_experts", dflt) * cfg["moe_intermediate_size"]
            y[t] += ref_swiglu(x[t], sw, W["shared_experts.up_proj.weight"], W["shared_experts.down_proj.weight"])
    return y, ids, wts


def check(out_dir):
    with open(os.path.join(out_dir, "cases.json")) as fh:
        manifest = json.load(fh)
    contract = "/work/shared/contract"
    st = None
    if os.path.exists(os.path.join(contract, "st.py")):  # second reader, only to cross-check ours
        sys.dont_write_bytecode = True
        sys.path.insert(0, contract)
        import st  # noqa: F401
    worst = 0.0
    for entry in manifest:
        name, prefix = entry["name"], entry["prefix"]
        path = lambda kind: os.path.join(out_dir, f"{name}.{kind}")
        with open(path("config.json")) as fh:
            cfg = json.load(fh)
        raw, header = read_safetensors(path("weights.safetensors"))
        assert all(n.startswith(prefix) for n in raw), f"{name}: tensor outside prefix"
        W = {n[len(prefix):]: a for n, a in raw.items()}
        x = read_safetensors(path("input.safetensors"))[0]["hidden_states"]
        want = read_safetensors(path("expected.safetensors"))[0]
        if st is not None:
            for kind in ("weights.safetensors", "input.safetensors", "expected.safetensors"):
                theirs = st.load(path(kind))
                ours = read_safetensors(path(kind))[0]
                assert theirs.keys() == ours.keys()
                assert all(np.array_equal(theirs[n].astype(np.float64), ours[n]) for n in ours)
        y, ids, wts = ref_case(cfg, W, x)
        assert np.array_equal(ids, want["topk_ids"]), f"{name}: topk_ids differ"
        assert abs(y).max() > 0.05, f"{name}: vacuous output"
        dy = np.abs(want["hidden_states"] - y)
        dw = np.abs(want["topk_weights"] - wts)
        # 1e-5 relative, with an absolute floor of 1e-5 of the tensor's largest magnitude (float32
        # rounding of cancelling terms makes near-zero elements meaningless in pure relative terms).
        ok = (np.all(dy <= 1e-5 * (np.abs(y) + np.abs(y).max()))
              and np.all(dw <= 1e-5 * (np.abs(wts) + np.abs(wts).max())))
        rel_y = float(dy.max() / np.abs(y).max())
        rel_w = float(dw.max() / np.abs(wts).max())
        dtypes = sorted({m["dtype"] for n, m in header.items() if n != "__metadata__"})
        print(f"{name:20s} T={x.shape[0]:2d} {','.join(dtypes):8s} ids exact; max|dy|={dy.max():.1e} "
              f"(/max|y| {rel_y:.1e}), max|dw|={dw.max():.1e} (/max|w| {rel_w:.1e}), "
              f"dropped={int((ids < 0).sum())} {'OK' if ok else 'FAIL'}")
        assert ok, f"{name}: values differ beyond 1e-5 relative"
        worst = max(worst, rel_y, rel_w)
    total = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir)
                if os.path.isfile(os.path.join(out_dir, n)))
    print(f"second reader ({'st.py' if st is not None else 'none'}) agrees on every file")
    print(f"all {len(manifest)} cases OK; worst relative difference {worst:.2e}; tests/golden total {total} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the written files with float64 NumPy")
    ap.add_argument("--out", default=HERE, help="output directory (default: this script's directory)")
    args = ap.parse_args()
    if args.check:
        check(args.out)
    else:
        generate(args.out)


if __name__ == "__main__":
    main()
