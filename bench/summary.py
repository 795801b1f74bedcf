#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Summarises moekit_bench's Google Benchmark JSON output as a table.

Per preset, shape and T: tokens/s, GFLOP/s, GB/s of expert weights read, their percent of
the measured sgemm peak, the FMA issue-rate peak and triad bandwidth of the same run (same thread count), and the
router's share of the layer time.

Usage: moekit_bench --benchmark_out=FILE --benchmark_out_format=json
       python3 bench/summary.py FILE
Standard library only.
"""

import json
import re
import sys
from collections import OrderedDict

LAYER = re.compile(
    r"^(?P<preset>[^/]+/[^/]+)/E:(?P<E>\d+)/k:(?P<k>\d+)/d:(?P<d>\d+)/f:(?P<f>\d+)"
    r"/T:(?P<T>\d+)/threads:(?P<threads>\d+)(/|$)")
PEAK = re.compile(r"^peak/(?P<kind>sgemm|bf16gemm|triad|fma)/[^/]+/threads:(?P<threads>\d+)(/|$)")


def base_name(b):
    """The benchmark's name without aggregate suffixes (run_name in newer versions)."""
    return b.get("run_name") or b["name"]


def rows_by_name(benchmarks):
    """name -> one dict of counters: the median aggregate when repetitions ran, else the
    mean of the iteration runs. Errors are kept as {'error': message}."""
    runs, medians = OrderedDict(), {}
    for b in benchmarks:
        name = base_name(b)
        if b.get("error_occurred"):
            runs[name] = [{"error": b.get("error_message", "error")}]
            continue
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = b
            continue
        runs.setdefault(name, []).append(b)
    out = OrderedDict()
    for name, rs in runs.items():
        if rs and "error" in rs[0]:
            out[name] = rs[0]
        elif name in medians:
            out[name] = medians[name]
        else:
            keys = [k for k, v in rs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            out[name] = {k: sum(r.get(k, 0.0) for r in rs) / len(rs) for k in keys}
    return out


def peaks(rows):
    """kind -> {threads: value} for the same-run peaks: sgemm, bf16gemm, fma (GFLOP/s) and
    triad (GB/s)."""
    out = {"sgemm": {}, "bf16gemm": {}, "fma": {}, "triad": {}}
    for name, r in rows.items():
        m = PEAK.match(name)
        if not m or "error" in r:
            continue
        kind = m.group("kind")
        out[kind][int(m.group("threads"))] = r.get("GB/s" if kind == "triad" else "GFLOP/s")
    return out


def fmt(v, digits=1):
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return "%.3g" % v
    return "%.*f" % (digits, v)


def pct(v, peak):
    if v is None or not peak:
        return "-"
    return "%.1f%%" % (100.0 * v / peak)


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: summary.py RESULTS.json\n")
        return 2
    with open(argv[1]) as fh:
        data = json.load(fh)
    rows = rows_by_name(data.get("benchmarks", []))

    p = peaks(rows)
    sgemm, triad, fma, bf16 = p["sgemm"], p["triad"], p["fma"], p["bf16gemm"]

    def peak_for(table, threads):
        if threads in table:
            return table[threads]
        return max(table.values()) if table else None

    ctx = data.get("context", {})
    print("moekit %s, gemm %s, %s CPUs @ %s MHz, %s" % (
        ctx.get("moekit_version", "?"), ctx.get("moekit_gemm_backend", "?"), ctx.get("num_cpus", "?"),
        ctx.get("mhz_per_cpu", "?"), ctx.get("date", "")))
    for t in sorted(sgemm):
        print("peak sgemm 2048^3, %d thread(s): %s GFLOP/s" % (t, fmt(sgemm[t])))
    for t in sorted(fma):
        print("peak FMA issue rate (registers only), %d thread(s): %s GFLOP/s" % (t, fmt(fma[t])))
    for t in sorted(bf16):
        print("peak bf16 GEMM 2048^3 (oneDNN), %d thread(s): %s GFLOP/s" % (t, fmt(bf16[t])))
    for t in sorted(triad):
        print("peak triad 512 MB, %d thread(s): %s GB/s" % (t, fmt(triad[t])))
    print()

    header = ["preset", "E", "k", "d", "f", "T", "thr", "tokens/s", "GFLOP/s", "%sgemm", "%fma", "GB/s", "%triad", "router",
              "x eigen"]
    table = []
    errors = []
    for name, r in rows.items():
        m = LAYER.match(name)
        if not m:
            continue
        g = m.groupdict()
        threads = int(g["threads"])
        key = [g["preset"], g["E"], g["k"], g["d"], g["f"], g["T"], g["threads"]]
        if "error" in r:
            table.append(key + ["SKIPPED"] + [""] * 7)
            errors.append("%s: %s" % (name, r["error"]))
            continue
        gflops, gbs, share = r.get("GFLOP/s", r.get("moekit_GFLOP/s")), r.get("GB/s"), r.get("router_share")
        speedup = r.get("speedup")
        table.append(key + [
            fmt(r.get("tokens/s")), fmt(gflops), pct(gflops, peak_for(sgemm, threads)), pct(gflops, peak_for(fma, threads)),
            fmt(gbs), pct(gbs, peak_for(triad, threads)),
            "-" if share is None else "%.2f%%" % (100.0 * share),
            "-" if speedup is None else "%.2fx" % speedup])
    if not table:
        print("no layer benchmarks in %s" % argv[1])
        return 1
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(len(header))]
    left = {0}
    line = lambda row: "  ".join(
        (str(c).ljust(w) if i in left else str(c).rjust(w)) for i, (c, w) in enumerate(zip(row, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    prev = None
    for row in table:
        if prev is not None and row[:5] != prev[:5]:
            print()
        print(line(row))
        prev = row
    roofline(rows, sgemm, triad)
    if errors:
        print()
        for e in errors:
            print("skipped: " + e)
    return 0


def roofline(rows, sgemm, triad):
    """The E x T sweep against the roofline model: per forward, time >= max(FLOPs / sgemm peak,
    expert bytes / triad bandwidth) at the same thread count. FLOPs and bytes per forward come
    from the counters (rate x time); `x model` = measured / model time (1.0 = on the roofline)."""
    sweep = []
    for name, r in rows.items():
        m = LAYER.match(name)
        if not m or not name.startswith("sweep/") or "error" in r:
            continue
        g = m.groupdict()
        threads = int(g["threads"])
        ms = r.get("real_time")
        unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}.get(r.get("time_unit", "ms"), 1.0)
        if ms is None:
            continue
        ms *= unit
        gflop = r.get("GFLOP/s", 0.0) * ms / 1e3
        gbyte = r.get("GB/s", 0.0) * ms / 1e3
        ps = sgemm.get(threads) or (max(sgemm.values()) if sgemm else None)
        pt = triad.get(threads) or (max(triad.values()) if triad else None)
        if not ps or not pt:
            continue
        model = 1e3 * max(gflop / ps, gbyte / pt)
        T = int(g["T"])
        sweep.append((int(g["E"]), T, ms, model, ms / model if model else 0.0, r.get("experts_read", 0.0),
                      1e3 * ms / max(T, 1)))
    if not sweep:
        return
    print()
    print("roofline (sweep, k=8 d=1024 f=512): model = max(FLOPs / sgemm peak, expert bytes / triad)")
    print("%5s %5s %10s %10s %8s %8s %12s" % ("E", "T", "ms", "model ms", "x model", "experts", "us/token"))
    for E, T, ms, model, ratio, experts, per in sorted(sweep, key=lambda x: (x[1], x[0])):
        print("%5d %5d %10.3f %10.3f %8.2f %8.1f %12.2f" % (E, T, ms, model, ratio, experts, per))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
