"""Markdown table of a benchmark CSV written by bench/conftest.py: `python bench/summarize.py [CSV]`."""
import csv
import os
import sys


def main(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    env = rows[0]
    print(f"Device: {env['device']}, {env['threads']} threads, torch {env['torch']}, nvembed CPU ISA "
          f"{env['nvembed_cpu_isa']}, BLAS {env['nvembed_cpu_blas']}; commit {env['commit']}, {env['date']}.\n")
    print("| benchmark | ours p50 (ms) | anchor | anchor p50 (ms) | speedup (p50) | speedup (fastest rounds) "
          "| peak memory vs anchor |")
    print("|---|---|---|---|---|---|---|")
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group, items in by_group.items():
        anchor = next((r for r in items if r["variant"] == r.get("anchor")), None)
        ours = [r for r in items if anchor is not None and r is not anchor]
        for r in ours:
            # several of our variants in one group (e.g. InfoNCE's GEMM paths on CPU tensors): name each
            name = f"{group} [{r['variant']}]" if len(ours) > 1 else group
            mem = r.get("mem_ratio_vs_anchor") or ""
            print(f"| {name} | {float(r['p50_ms']):.1f} | {anchor['variant']} | {float(anchor['p50_ms']):.1f} | "
                  f"{float(r['speedup_vs_anchor']):.2f}x | {float(r['speedup_vs_anchor_min']):.2f}x | "
                  f"{mem and f'{float(mem):.3f}x'} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results",
                                                             "cpu_benchmarks.csv"))
