#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Tables from bench/ep's JSON lines (scripts/bench_ep.sh): what was measured on this machine,
and a model of one layer's time at more ranks on a real network, for planning a cluster.

Measured: tokens/s of the expert-parallel layer against one process on the same tokens in the
same run, the max / mean rank load, bytes exchanged per token (rows out and back, plus shipped
expert weights), and where the time went.

Model, per layer and micro-batch-free (docs/scale-out.md):
    t(Q) = (max/mean load at Q) * (N k / Q) / r  +  (N / Q) * b(Q) / B  +  2 * l
with N tokens in the global batch, k experts per token, r the expert rows per second one rank
computes (measured: the busiest rank's rows over its expert time), b(Q) the bytes per token
on the wire at Q ranks (the measured bytes per token of a uniform run at P ranks, scaled from
its (P - 1) / P share of remote slots to (Q - 1) / Q), B a rank's network bandwidth and
l the latency of one all-to-all. LLEP's weight shipping is left out: once a skew is steady the
guests stay resident (moekit::ep ships each once).
Usage: bench/ep_model.py ep.jsonl [--batch N] [--bandwidth GBps ...] [--latency-us L]"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("--batch", type=int, default=16384, help="global tokens per layer call (default 16384)")
    ap.add_argument("--bandwidth", type=float, nargs="+", default=[12.5, 50.0],
                    help="GB/s per rank (default 12.5 = 100 Gb/s and 50 = 400 Gb/s)")
    ap.add_argument("--latency-us", type=float, default=20.0, help="one all-to-all's latency (default 20 us)")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.jsonl) if l.strip()]
    meas = [r for r in rows if not r.get("projection")]
    proj = [r for r in rows if r.get("projection")]
    if not meas:
        sys.exit("ep_model.py: no measurements in " + a.jsonl)
    print("## Measured (one machine, shared memory)\n")
    print("| ranks | tokens/rank | routing | balance | micro | wire | ms | tokens/s | one process tokens/s | ratio | max/mean load | bytes/token | ms exchange | ms experts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in meas:
        print("| %d | %d | %s | %s | %d | %s | %.1f | %.0f | %.0f | %.2f | %.2f | %.0f | %.1f | %.1f |" % (
            r["ranks"], r["tokens_per_rank"], r["routing"], r["balance"], r["micro_batches"], r["wire"], r["ms"],
            r["tokens_per_s"], r["one_process_tokens_per_s"], r["tokens_per_s"] / r["one_process_tokens_per_s"],
            r["max_over_mean_load"], r["bytes_per_token"], r["ms_exchange"], r["ms_experts"]))
    # Rows per second of one rank: the best plain, f32, one-micro-batch run (a rank with a core
    # of its own; oversubscribed runs share cores).
    base = [r for r in meas if r["balance"] == "none" and r["micro_batches"] == 1 and r["wire"] == "f32"]
    best = max(base, key=lambda r: r["expert_rows_per_s_busiest_rank"])
    rate = best["expert_rows_per_s_busiest_rank"]
    k = best["k"]
    # Bytes per token on the wire at Q ranks, from the measured exchange: a uniform, plain run's
    # bytes per token at P ranks covers (P - 1) / P of each token's k slots (those whose expert
    # lives elsewhere), out and back; at Q ranks the share is (Q - 1) / Q.
    uni = [r for r in meas if r["routing"] == "uniform" and r["balance"] == "none" and r["micro_batches"] == 1]
    per_slot = {}
    for wire in ("f32", "bf16"):
        runs = sorted((r for r in uni if r["wire"] == wire), key=lambda r: (r["ranks"], r["tokens_per_rank"]))
        if runs:
            r = runs[-1]
            per_slot[wire] = r["bytes_per_token"] / ((r["ranks"] - 1) / r["ranks"])
    # Each bench run prints the projection for its routing; keep one per (ranks, routing).
    proj = list({(p["ranks"], p["routing"]): p for p in proj}.values())
    proj.sort(key=lambda p: (p["routing"] != "uniform", p["ranks"]))
    print("\n## Model: one layer at more ranks (r = %.0f expert rows/s per rank, measured; N = %d tokens, k = %d;"
          " bytes per token from the measured exchange: %s)\n"
          % (rate, a.batch, k, ", ".join("%s %.0f at full share" % kv for kv in per_slot.items()) or "analytic"))
    hdr = "| ranks | routing | max/mean plain | max/mean LLEP |"
    sep = "|---|---|---|---|"
    for bw in a.bandwidth:
        hdr += " ms plain f32 @%g GB/s | ms LLEP bf16 @%g GB/s |" % (bw, bw)
        sep += "---|---|"
    print(hdr)
    print(sep)
    for p in proj:
        Q = p["ranks"]
        line = "| %d | %s | %.2f | %.2f |" % (Q, p["routing"], p["max_over_mean_plain"], p["max_over_mean_llep"])
        for bw in a.bandwidth:
            def t(mm, bpt):
                compute = mm * a.batch * k / Q / rate
                wire = (a.batch / Q) * bpt / (bw * 1e9)
                return 1e3 * (compute + wire + 2 * a.latency_us * 1e-6)
            share = (Q - 1) / Q
            b32 = per_slot["f32"] * share if "f32" in per_slot else p["bytes_per_token_f32"]
            b16 = per_slot["bf16"] * share if "bf16" in per_slot else p["bytes_per_token_bf16"]
            line += " %.2f | %.2f |" % (t(p["max_over_mean_plain"], b32), t(p["max_over_mean_llep"], b16))
        print(line)


if __name__ == "__main__":
    main()
