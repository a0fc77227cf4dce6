"""CPU benchmark of nvembed::infonce (tiled) against the naive reference that materializes the B x B*G logits.

Shape: B=2048, G=8, d=256, fp32, in-batch negatives, forward + backward. Targets: time <= 1.5x naive, peak memory
<= 1/10 of naive.

  pytest bench/bench_infonce_cpu.py                 # rows (time, peak memory, ratios) in the session CSV
  python bench/bench_infonce_cpu.py --csv FILE      # interleaved rounds, one summary row

Peak memory is measured in a fresh interpreter per variant (subprocess): after a small warm-up (thread pools, lazy
init) and after creating the inputs, the process's RSS high-water mark is reset (/proc/self/clear_refs) and the
peak above the pre-run RSS is what one fwd+bwd adds. tracemalloc cannot see torch's allocations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, quantile, write_csv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, G, D, TEMPERATURE = 2048, 8, 256, 0.05
WARMUP, ROUNDS = 2, 7

_CHILD = r"""
import json, sys
import torch
import nvembed_ext
from nvembed_ext.reference import infonce_ref

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

variant, B, G, D, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
fn = torch.ops.nvembed.infonce if variant == "ours" else infonce_ref
torch.manual_seed(0)
q = torch.randn(64, D, requires_grad=True)
d = torch.randn(64 * G, D, requires_grad=True)
torch.autograd.grad(fn(q, d, G, t, True), (q, d))  # warm-up: thread pools, MKL, dispatcher caches
q = torch.randn(B, D, requires_grad=True)
d = torch.randn(B * G, D, requires_grad=True)
base = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    method = "VmHWM after clear_refs"
except OSError:
    method = "VmHWM (not resettable: includes import-time peak)"
grads = torch.autograd.grad(fn(q, d, G, t, True), (q, d))
peak = status("VmHWM")
print(json.dumps({"peak_delta_bytes": peak - base, "method": method}))
"""


def peak_memory_bytes(variant: str) -> dict:
    env = dict(os.environ)
    # the child imports nvembed_ext exactly as this process did (installed package or in-place build)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", _CHILD, variant, str(B), str(G), str(D), str(TEMPERATURE)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_inputs():
    torch.manual_seed(0)
    q = torch.randn(B, D, requires_grad=True)
    d = torch.randn(B * G, D, requires_grad=True)
    return q, d


def fwd_bwd_fn(variant: str):
    import nvembed_ext  # noqa: F401
    from nvembed_ext.reference import infonce_ref

    fn = torch.ops.nvembed.infonce if variant == "ours" else infonce_ref

    def run(q, d):
        return torch.autograd.grad(fn(q, d, G, TEMPERATURE, True), (q, d))

    return run


def time_interleaved(variants=("naive", "ours")) -> dict[str, list[float]]:
    """Rounds alternate between the variants, so drifting load on a shared runner (and the naive variant's
    allocator state, whose fwd+bwd time drifts by up to 2x within one process) hits both alike."""
    runs = {v: fwd_bwd_fn(v) for v in variants}
    q, d = make_inputs()
    for _ in range(WARMUP):
        for v in variants:
            runs[v](q, d)
    times = {v: [] for v in variants}
    for _ in range(ROUNDS):
        for v in variants:
            t0 = time.perf_counter()
            runs[v](q, d)
            times[v].append(time.perf_counter() - t0)
    return times


def result_row(times: dict, mems: dict) -> dict:
    row = {
        **environment(), "B": B, "G": G, "d": D, "dtype": "float32", "temperature": TEMPERATURE,
        "in_batch_negatives": True, "rounds": ROUNDS, "warmup_rounds": WARMUP,
    }
    for v in ("ours", "naive"):
        for p in (0.2, 0.5, 0.8):
            row[f"{v}_time_p{int(p * 100)}_s"] = round(quantile(times[v], p), 5)
        row[f"{v}_peak_mem_mb"] = round(mems[v]["peak_delta_bytes"] / 2**20, 2)
    row["time_ratio"] = round(row["ours_time_p50_s"] / row["naive_time_p50_s"], 4)
    row["mem_ratio"] = round(mems["ours"]["peak_delta_bytes"] / mems["naive"]["peak_delta_bytes"], 4)
    row["mem_method"] = mems["ours"]["method"]
    return row


# ---- pytest-benchmark -------------------------------------------------------------------------------------------

try:
    import pytest

    # nvembed: the CPU default (tile kernels, forward then backward). nvembed-gemm / nvembed-fused: the CUDA GEMM
    # paths' loops on CPU tensors (ATen GEMMs + elementwise passes): the GEMM forward + blocked backward (four GEMMs of
    # 2 B N d) and the gradients formed in the forward (three), the algorithms the GPU benchmark compares.
    PATHS = {"naive": {}, "nvembed": {},
             "nvembed-gemm": {"NVEMBED_INFONCE_FWD": "gemm", "NVEMBED_INFONCE_BWD": "gemm"},
             "nvembed-fused": {"NVEMBED_INFONCE_GRAD": "fused"}}

    @pytest.mark.parametrize("variant", list(PATHS))
    def test_infonce_cpu_fwd_bwd(benchmark, variant, monkeypatch):
        for k, v in PATHS[variant].items():
            monkeypatch.setenv(k, v)  # read by the op on every call, and by the memory run's child process
        benchmark.group = f"infonce fwd+bwd fp32 B{B} G{G} d{D}"
        ours = "ours" if variant != "naive" else "naive"
        run = fwd_bwd_fn(ours)
        q, d = make_inputs()
        benchmark.pedantic(lambda: run(q, d), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        mem = peak_memory_bytes(ours)
        benchmark.extra_info.update(variant=variant, anchor="naive",
                                    peak_mem_mb=round(mem["peak_delta_bytes"] / 2**20, 2))
except ImportError:  # plain script use without pytest installed
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", help="append one result row to this CSV file")
    args = ap.parse_args()
    times = time_interleaved()
    mems = {v: peak_memory_bytes(v) for v in ("naive", "ours")}
    row = result_row(times, mems)
    for k, v in row.items():
        print(f"{k:>22}: {v}")
    if args.csv:
        write_csv(args.csv, [row])


if __name__ == "__main__":
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    main()
