#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Reports of a moekit_bench run: a Markdown table and PNG plots, and the comparison of two runs.

  report.py RESULTS.json [--out DIR]
      DIR/results.md (the same-run peaks, then every layer benchmark: T, threads, ms, tokens/s,
      GFLOP/s, GB/s of expert weights, % of the peaks), DIR/routing.png (GFLOP/s against T per
      routing scheme and shape) and DIR/dtypes.png (GFLOP/s and GB/s against T per weight type
      and shape), with the same run's sgemm / bf16 GEMM peaks and triad bandwidth drawn as
      lines. DIR defaults to the results file's folder. Plots need matplotlib (Debian's
      python3-matplotlib); without it only the Markdown is written.
  report.py --compare OLD.json NEW.json
      The per-benchmark change from OLD to NEW: Google Benchmark's compare.py (Debian's
      libbenchmark-tools) when it is installed, else this script's own table (time and GFLOP/s
      change per benchmark both files have).
"""

import json
import os
import re
import subprocess
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summary import LAYER, fmt, peaks, rows_by_name, pct  # noqa: E402

COMPARE_PY = "/usr/share/benchmark/compare.py"


def load(path):
    with open(path) as fh:
        data = json.load(fh)
    return data, rows_by_name(data.get("benchmarks", []))


def series(rows):
    """(kind, group) -> [(T, row)] for layer benchmarks: kind "dtype" (dtype/<type>/...) or
    "routing" (every other preset/shape), group the name without /T:."""
    out = OrderedDict()
    for name, r in rows.items():
        m = LAYER.match(name)
        if not m or "error" in r:
            continue
        preset = m.group("preset")
        kind = "dtype" if preset.startswith("dtype/") else "activations" if preset.startswith("activations/") else "routing"
        group = "%s E%s k%s d%s f%s t%s" % (m.group("preset"), m.group("E"), m.group("k"), m.group("d"),
                                            m.group("f"), m.group("threads"))
        out.setdefault((kind, group), []).append((int(m.group("T")), r, int(m.group("threads"))))
    for v in out.values():
        v.sort(key=lambda x: x[0])
    return out


def peak_for(table, threads):
    if threads in table:
        return table[threads]
    return max(table.values()) if table else None


def markdown(data, rows, pk, images):
    ctx = data.get("context", {})
    lines = ["# moekit benchmark results", ""]
    lines.append("moekit %s, GEMM %s, %s CPUs, %s" % (ctx.get("moekit_version", "?"), ctx.get("moekit_gemm_backend", "?"),
                                                     ctx.get("num_cpus", "?"), ctx.get("date", "")))
    lines += ["", "| peak | threads | value |", "|---|---|---|"]
    names = {"sgemm": "sgemm 2048^3 (Eigen), GFLOP/s", "bf16gemm": "bf16 GEMM 2048^3 (oneDNN), GFLOP/s",
             "fma": "FMA issue rate, GFLOP/s", "triad": "triad 512 MB, GB/s"}
    for kind in ("sgemm", "bf16gemm", "fma", "triad"):
        for t in sorted(pk[kind]):
            lines.append("| %s | %d | %s |" % (names[kind], t, fmt(pk[kind][t])))
    lines += ["", "| benchmark | T | threads | ms | tokens/s | GFLOP/s | % sgemm | % bf16 GEMM | GB/s | % triad |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        m = LAYER.match(name)
        if not m:
            continue
        if "error" in r:
            lines.append("| %s | | | skipped: %s | | | | | | |" % (name, r["error"]))
            continue
        t = int(m.group("threads"))
        g, b = r.get("GFLOP/s"), r.get("GB/s")
        lines.append("| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |" % (
            name.split("/T:")[0], m.group("T"), t, fmt(r.get("real_time"), 3), fmt(r.get("tokens/s")), fmt(g),
            pct(g, peak_for(pk["sgemm"], t)), pct(g, peak_for(pk["bf16gemm"], t)), fmt(b), pct(b, peak_for(pk["triad"], t))))
    if images:
        lines += [""] + ["![%s](%s)" % (os.path.splitext(i)[0], i) for i in images]
    return "\n".join(lines) + "\n"


def plots(groups, pk, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib not found (Debian: python3-matplotlib): no plots", file=sys.stderr)
        return []
    written = []

    def peak_lines(ax, threads, kinds):
        styles = {"sgemm": ("sgemm peak", "k", "--"), "bf16gemm": ("bf16 GEMM peak", "tab:red", "--"),
                  "triad": ("triad", "k", ":")}
        for kind in kinds:
            v = peak_for(pk[kind], threads)
            if v:
                label, color, style = styles[kind]
                ax.axhline(v, color=color, linestyle=style, linewidth=1, label="%s (%s)" % (label, fmt(v)))

    for kind, fname, panels in (("routing", "routing.png", (("GFLOP/s", ("sgemm", "bf16gemm")),)),
                                ("dtype", "dtypes.png", (("GFLOP/s", ("sgemm", "bf16gemm")), ("GB/s", ("triad",))))):
        sel = [(g, pts) for (k, g), pts in groups.items() if k == kind and len(pts) > 1]
        if not sel:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
        threads = max(p[2] for _, pts in sel for p in pts)
        for ax, (counter, kinds) in zip(axes[0], panels):
            for g, pts in sel:
                xs = [p[0] for p in pts if p[1].get(counter) is not None]
                ys = [p[1][counter] for p in pts if p[1].get(counter) is not None]
                if xs:
                    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=g)
            peak_lines(ax, threads, kinds)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens T")
            ax.set_ylabel(counter)
            ax.set_title("%s against T, per %s" % (counter, "routing scheme" if kind == "routing" else "weight type"))
            ax.grid(True, linewidth=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=120)
        plt.close(fig)
        written.append(fname)
    return written


def report(path, out_dir):
    data, rows = load(path)
    pk = peaks(rows)
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    images = plots(series(rows), pk, out_dir)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as fh:
        fh.write(markdown(data, rows, pk, images))
    print("report.py: wrote %s%s" % (md, "".join(", " + os.path.join(out_dir, i) for i in images)))


def compare(old, new):
    if os.path.exists(COMPARE_PY):
        return subprocess.call([sys.executable, COMPARE_PY, "--no-color", "--no-utest", "benchmarks", old, new])
    _, a = load(old)
    _, b = load(new)
    print("%-70s %12s %12s %8s %10s %10s %8s" % ("benchmark", "old ms", "new ms", "time", "old GF/s", "new GF/s", "GF/s"))
    for name, ra in a.items():
        rb = b.get(name)
        if rb is None or "error" in ra or "error" in rb:
            continue
        ta, tb = ra.get("real_time"), rb.get("real_time")
        ga, gb = ra.get("GFLOP/s"), rb.get("GFLOP/s")
        dt = "%+.1f%%" % (100.0 * (tb - ta) / ta) if ta and tb else "-"
        dg = "%+.1f%%" % (100.0 * (gb - ga) / ga) if ga and gb else "-"
        print("%-70s %12s %12s %8s %10s %10s %8s" % (name[:70], fmt(ta, 3), fmt(tb, 3), dt, fmt(ga), fmt(gb), dg))
    return 0


def main(argv):
    if len(argv) == 4 and argv[1] == "--compare":
        return compare(argv[2], argv[3])
    if len(argv) == 2:
        report(argv[1], None)
        return 0
    if len(argv) == 4 and argv[2] == "--out":
        report(argv[1], argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
