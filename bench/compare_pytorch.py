#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Times the same MoE layers in PyTorch eager (the HF-Mixtral-style loop over experts) and in
moekit (`moekit bench`), f32 and bf16 on both sides (moekit also bf16 weights with f32
activations, and w8a8), and prints the ratios moekit / PyTorch side by side (f32 vs f32,
moekit bf16xbf16 vs PyTorch bf16: both round weights and activations to bf16). Optional: needs Debian's python3-torch (and libopenblas0-pthread for a fast sgemm);
writes a PNG plot of GFLOP/s against T next to the JSON results when python3-matplotlib is
installed. Run it with Debian's python: /usr/bin/python3 bench/compare_pytorch.py --moekit PATH

The PyTorch layer follows HF MixtralSparseMoeBlock: router logits, softmax, top-k,
renormalise, then per expert: gather its tokens, down(silu(gate x) * up x) * weight,
index_add into the output. Both sides use one set of weights (moekit bench --layers 1).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def torch_layer(torch, E, k, d, f, dtype):
    g = torch.Generator().manual_seed(0)
    W = {
        "gate": torch.randn(E, d, generator=g) / d ** 0.5,
        "w1": torch.randn(E, f, d, generator=g) / d ** 0.5,
        "w3": torch.randn(E, f, d, generator=g) / d ** 0.5,
        "w2": torch.randn(E, d, f, generator=g) / f ** 0.5,
    }
    W = {n: t.to(dtype) for n, t in W.items()}

    def forward(x):
        logits = x.float() @ W["gate"].float().T
        p = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(p, k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(ids, E).permute(2, 1, 0)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = torch.nn.functional.silu(xe @ W["w1"][e].T) * (xe @ W["w3"][e].T)
            out.index_add_(0, tok, (h @ W["w2"][e].T) * w[tok, slot, None])
        return out

    return forward


def time_torch(torch, forward, T, d, dtype, repeat):
    xs = [torch.randn(T, d).to(dtype) for _ in range(3)]
    with torch.no_grad():
        forward(xs[0])
        ts = []
        for r in range(repeat):
            t0 = time.perf_counter()
            forward(xs[r % 3])
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_moekit(binary, E, k, d, f, T, threads, repeat, dtype="f32"):
    cfg = {"model_type": "mixtral", "hidden_size": d, "intermediate_size": f, "num_local_experts": E, "num_experts_per_tok": k}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cfg, fh)
        path = fh.name
    try:
        r = subprocess.run([binary, "bench", "--config", path, "--tokens", str(T), "--threads", str(threads), "--repeat",
                            str(repeat), "--layers", "1", "--dtype", dtype], capture_output=True, text=True, check=True)
    finally:
        os.unlink(path)
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moekit", required=True, help="path to the moekit binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="1,16,128,512")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="compare_pytorch.json")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("compare_pytorch.py needs Debian's python3-torch (run with /usr/bin/python3)")
    torch.set_num_threads(args.threads)
    rows = []
    # "mk bf16": bf16 weights, f32 activations; "mk bf16x": bf16 weights and activations, what
    # PyTorch's bf16 layer computes (the "x bf16" ratio compares those two).
    print("%-22s %5s %9s %9s %9s %9s %10s %10s %8s %8s" % ("shape (E,k,d,f)", "T", "mk f32", "mk bf16", "mk bf16x",
                                                            "mk w8a8", "torch f32", "torch bf16", "x f32", "x bf16"))
    for (E, k, d, f) in ((8, 2, 1024, 2816), (64, 8, 1024, 1408)):
        layers = {dt: torch_layer(torch, E, k, d, f, dt) for dt in (torch.float32, torch.bfloat16)}
        for T in (int(t) for t in args.tokens.split(",")):
            m = time_moekit(args.moekit, E, k, d, f, T, args.threads, args.repeat)
            mb = time_moekit(args.moekit, E, k, d, f, T, args.threads, args.repeat, "bf16")
            mbx = time_moekit(args.moekit, E, k, d, f, T, args.threads, args.repeat, "bf16xbf16")
            mq = time_moekit(args.moekit, E, k, d, f, T, args.threads, args.repeat, "w8a8")
            flops = m["gflops"] * m["median_ms"] / 1e3 * 1e9  # executed FLOPs of one forward
            tf = time_torch(torch, layers[torch.float32], T, d, torch.float32, args.repeat)
            tb = time_torch(torch, layers[torch.bfloat16], T, d, torch.bfloat16, args.repeat)
            row = {"E": E, "k": k, "d": d, "f": f, "T": T, "moekit_gflops": m["gflops"], "moekit_bf16_gflops": mb["gflops"],
                   "moekit_bf16xbf16_gflops": mbx["gflops"], "moekit_bf16xbf16_kernel": mbx["kernel"],
                   "moekit_w8a8_gflops": mq["gflops"], "torch_f32_gflops": flops / tf / 1e9,
                   "torch_bf16_gflops": flops / tb / 1e9}
            rows.append(row)
            print("%-22s %5d %9.1f %9.1f %9.1f %9.1f %10.1f %10.1f %8.2f %8.2f" % (
                "(%d,%d,%d,%d)" % (E, k, d, f), T, row["moekit_gflops"], row["moekit_bf16_gflops"],
                row["moekit_bf16xbf16_gflops"], row["moekit_w8a8_gflops"], row["torch_f32_gflops"],
                row["torch_bf16_gflops"], row["moekit_gflops"] / row["torch_f32_gflops"],
                row["moekit_bf16xbf16_gflops"] / row["torch_bf16_gflops"]))
    with open(args.out, "w") as fh:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, fh, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for (E, k) in sorted({(r["E"], r["k"]) for r in rows}):
            sel = [r for r in rows if r["E"] == E]
            Ts = [r["T"] for r in sel]
            ax.plot(Ts, [r["moekit_gflops"] for r in sel], "o-", label="moekit f32 E=%d k=%d" % (E, k))
            ax.plot(Ts, [r["moekit_bf16xbf16_gflops"] for r in sel], "D-", label="moekit bf16xbf16 E=%d k=%d" % (E, k))
            ax.plot(Ts, [r["torch_f32_gflops"] for r in sel], "s--", label="PyTorch f32 E=%d k=%d" % (E, k))
            ax.plot(Ts, [r["torch_bf16_gflops"] for r in sel], "^:", label="PyTorch bf16 E=%d k=%d" % (E, k))
        ax.set_xscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("GFLOP/s (executed)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        png = os.path.splitext(args.out)[0] + ".png"
        fig.savefig(png, dpi=110)
        print("plot:", png)
    except ImportError:
        print("(python3-matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
