"""pytest-benchmark glue: every benchmark sets `benchmark.group` (one configuration) and
`benchmark.extra_info["variant"]`; the variant named in extra_info["anchor"] is the baseline of its group. At the
end of the session one CSV row per variant is written with its p20/p50/p80 time and the speedup over the anchor
(anchor time / variant time, so > 1 means faster than the anchor), to $NVEMBED_BENCH_CSV (default
bench/results/cpu_benchmarks.csv, where a run of some of the benchmarks replaces only their groups' rows)."""
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, quantile, write_csv  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not getattr(bs, "benchmarks", None):
        return
    groups = {}
    for b in bs.benchmarks:
        if not b.stats or not b.stats.data:
            continue
        groups.setdefault(b.group, []).append(b)
    env = environment()
    rows = []
    for group, items in groups.items():
        anchor = None
        for b in items:
            if b.extra_info.get("variant") == b.extra_info.get("anchor"):
                anchor = b
        for b in items:
            data = b.stats.data
            row = {"group": group, "variant": b.extra_info.get("variant", b.name), "rounds": len(data),
                   "min_ms": round(b.stats.min * 1e3, 4), "p20_ms": round(quantile(data, 0.2) * 1e3, 4),
                   "p50_ms": round(b.stats.median * 1e3, 4), "p80_ms": round(quantile(data, 0.8) * 1e3, 4)}
            if anchor is not None:
                row["anchor"] = anchor.extra_info.get("variant")
                row["speedup_vs_anchor"] = round(anchor.stats.median / b.stats.median, 3)
                # on shared machines neighbours inflate some rounds of one variant and not the other: the ratio of
                # the fastest rounds is the steadier estimate of what the kernels themselves do
                row["speedup_vs_anchor_min"] = round(anchor.stats.min / b.stats.min, 3)
                if "peak_mem_mb" in b.extra_info and anchor.extra_info.get("peak_mem_mb"):
                    row["mem_ratio_vs_anchor"] = round(b.extra_info["peak_mem_mb"] / anchor.extra_info["peak_mem_mb"], 4)
            for k, v in b.extra_info.items():
                if k not in ("variant", "anchor"):
                    row[k] = v
            row.update(env)
            rows.append(row)
    path = os.environ.get("NVEMBED_BENCH_CSV")
    if not path:
        # the committed table: a run of some benchmarks (one file, -k) replaces their groups' rows and keeps the
        # others, each row with its own commit, date and device columns
        path = os.path.join(os.path.dirname(__file__), "results", "cpu_benchmarks.csv")
        ran = {r["group"] for r in rows}
        kept = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("group") not in ran]
        write_csv(path, kept + rows)
        print(f"\nnvembed: wrote {len(rows)} benchmark rows to {path}, kept {len(kept)} rows of other groups")
    else:
        write_csv(path, rows)
        print(f"\nnvembed: wrote {len(rows)} benchmark rows to {path}")
    for r in rows:
        if "speedup_vs_anchor" in r and r["variant"] != r.get("anchor"):
            mem = f", memory {r['mem_ratio_vs_anchor']:.3f}x" if "mem_ratio_vs_anchor" in r else ""
            print(f"  {r['group']:<48} {r['variant']:<12} {r['p50_ms']:>10.3f} ms  "
                  f"{r['speedup_vs_anchor']:.2f}x vs {r['anchor']} (fastest rounds: "
                  f"{r['speedup_vs_anchor_min']:.2f}x){mem}")
