"""CPU benchmark: torch.ops.nvembed.latent_pool vs the eager reference (nvembed_ext.reference.latent_pool_ref),
forward and forward+backward (gradients for hidden_states and every weight), float32, side by side in one run.

    PYTHONPATH=$PWD:$PWD/python pytest -q bench/bench_latent_pool_cpu.py

Writes bench/results/latent_pool_cpu.csv (one row per config / mask / mode: op and reference times, their ratio,
CPU, threads, torch version, date, git commit). Configs:
  * minilm:         d=384, 512 latents, 8 heads x dim_head 48, F=4d   (a MiniLM-sized backbone; plain path)
  * nvembed_scaled: d=256, 64 latents, 8 heads x dim_head=d, F=4d     (the release's shape, scaled down; folded)
both with B=8, L=128. Masks: "padded" = right padding to lengths uniform in [L/4, L] with the first 8 positions
(the instruction) excluded from pooling, as NV-Embed's encode() builds pool_mask; "all" = pool_mask None.
"""
import csv
import datetime
import os
import platform
import subprocess

import pytest
import torch

import nvembed_ext  # noqa: F401  (registers the ops)
from nvembed_ext.reference import latent_pool_ref

CONFIGS = {  # B, L, d, N, H, dim_head, F
    "minilm": (8, 128, 384, 512, 8, 48, 1536),
    "nvembed_scaled": (8, 128, 256, 64, 8, 256, 1024),
}
MASKS = ("padded", "all")
MODES = ("fwd", "fwdbwd")
IMPLS = {"op": torch.ops.nvembed.latent_pool, "ref": latent_pool_ref}
ROUNDS, WARMUP = 9, 1
RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latent_pool_cpu.csv")

_results = {}  # (config, mask, mode, impl) -> pytest-benchmark stats


def _inputs(config, mask_kind):
    B, L, d, N, H, dh, F_ = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    inner = H * dh

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).requires_grad_()

    weights = [r(N, d), r(d, scale=0.2, shift=1.0), r(d, scale=0.2), r(d, scale=0.2, shift=1.0), r(d, scale=0.2),
               r(inner, d, scale=d ** -0.5), r(2 * inner, d, scale=d ** -0.5), r(d, inner, scale=inner ** -0.5),
               r(d, scale=0.2, shift=1.0), r(d, scale=0.2), r(2 * F_, d, scale=d ** -0.5), r(2 * F_, scale=0.2),
               r(d, F_, scale=F_ ** -0.5), r(d, scale=0.2)]
    hs = r(B, L, d)
    mask = None
    if mask_kind == "padded":
        lengths = torch.randint(L // 4, L + 1, (B,), generator=g)
        mask = torch.arange(L)[None, :] < lengths[:, None]
        mask[:, :8] = False
    return hs, mask, weights, H


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_latent_pool_cpu(benchmark, config, mask_kind, mode, impl):
    hs, mask, weights, H = _inputs(config, mask_kind)
    fn = IMPLS[impl]
    params = [hs, *weights]
    grad_out = torch.randn(hs.shape[0], hs.shape[2], generator=torch.Generator().manual_seed(1))

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(hs, mask, *weights, H, True, 1e-5)
    else:
        def run():
            out = fn(hs, mask, *weights, H, True, 1e-5)
            return torch.autograd.grad(out, params, grad_out)

    benchmark.group = f"{config}-{mask_kind}-{mode}"
    benchmark.extra_info.update(config=config, mask=mask_kind, mode=mode, impl=impl,
                                active_tokens=int(mask.sum()) if mask is not None else hs.shape[0] * hs.shape[1])
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if benchmark.stats is not None:
        _results[(config, mask_kind, mode, impl)] = (benchmark.stats.stats, benchmark.extra_info["active_tokens"])


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "nvembed_ext", "python"],
                               cwd=root).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture(scope="module", autouse=True)
def _write_csv():
    yield
    rows = []
    for config in CONFIGS:
        for mask_kind in MASKS:
            for mode in MODES:
                if (config, mask_kind, mode, "op") not in _results or (config, mask_kind, mode, "ref") not in _results:
                    continue
                op, active = _results[(config, mask_kind, mode, "op")]
                ref, _ = _results[(config, mask_kind, mode, "ref")]
                B, L, d, N, H, dh, F_ = CONFIGS[config]
                rows.append(dict(
                    config=config, B=B, L=L, d=d, num_latents=N, num_heads=H, dim_head=dh, ff_dim=F_,
                    mask=mask_kind, active_tokens=active, mode=mode, dtype="float32",
                    op_median_ms=round(op.median * 1e3, 3), ref_median_ms=round(ref.median * 1e3, 3),
                    speedup_median=round(ref.median / op.median, 3),
                    op_min_ms=round(op.min * 1e3, 3), ref_min_ms=round(ref.min * 1e3, 3),
                    speedup_min=round(ref.min / op.min, 3), rounds=ROUNDS,
                    cpu=_cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    git_commit=_git_commit()))
    if not rows:  # e.g. --benchmark-disable
        return
    os.makedirs(os.path.dirname(RESULTS_CSV), exist_ok=True)
    with open(RESULTS_CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
