"""GPU benchmark of nvembed::infonce against the naive loss, forward + backward, bf16, in-batch negatives.

Protocol (the CUDA InfoNCE issue): d in {1024, 4096}, B in {4096, 16384, 65536} queries, G = 8 docs each
(N = 8 B), temperature 0.05.
  naive    nvembed_ext.reference.infonce_ref: cross_entropy(q @ docs.T / t), the bf16 B x N logits upcast to fp32
           for the softmax (the tests' reference, so benchmark and tests cannot drift). Skipped, with the reason
           in the CSV, where its logits would not fit in the free GPU memory.
  nvembed  torch.ops.nvembed.infonce with NVEMBED_INFONCE_KERNEL=sm80 (the sm80 tensor-core kernels for bf16).
  nvembed-sm90  the same with NVEMBED_INFONCE_KERNEL=sm90: the Hopper forward (TMA + wgmma), sm80 backward; on
           CUDA only, "skipped" where it does not apply (not a compute capability 9.0 device, no sm_90a code).
  nvembed-gemm  the automatic forward (the Hopper one on compute capability 9.0) and the blocked-GEMM backward
           (NVEMBED_INFONCE_BWD=gemm: cuBLAS GEMMs over column blocks of the logits, csrc/infonce_gemm.h).
  nvembed-gemm-fwd  the GEMM forward (NVEMBED_INFONCE_FWD=gemm: cuBLAS GEMMs over column chunks of the logits and an
           online log-sum-exp kernel) and the blocked-GEMM backward.
  nvembed-fused  the gradients formed in the forward (NVEMBED_INFONCE_GRAD=fused, csrc/infonce_gemm.h: row blocks of
           queries against all docs, three cuBLAS GEMMs of 2 B N d in all, no recomputation in the backward, which
           only scales them), through the public op; its row blocks and dD accumulator are the default plan (the
           CSV's fused_plan column).
  nvembed-auto  the public op with every choice at auto: what a user gets (since the H100 run of 2026-11-28 the fused
           gradients for bf16 / fp16; the tile forward with the blocked-GEMM backward for calls that do not form
           them), so a run shows the default's own row.
  (nvembed and nvembed-sm90 pin the tile backward, NVEMBED_INFONCE_BWD=tiles; all but nvembed-gemm-fwd,
  nvembed-fused and nvembed-auto the tile forward, NVEMBED_INFONCE_FWD=tiles.)
Per configuration: one warm-up round, then timed rounds, each on fresh random inputs; the time of a round is the
CUDA-event time of loss = f(q, docs); loss.backward(). Reported: median (p20, p80) time, TFLOP/s counting
2 B N d (forward) + 4 B N d (backward) flops, and the peak memory one fwd+bwd adds above its inputs
(torch.cuda.max_memory_allocated minus the allocation before the call, over the timed rounds; the gradients are
included for both; MiB). Our rows carry speedup_vs_naive / mem_reduction_vs_naive (naive / ours) and, from one extra
fwd+bwd of each on the same inputs, the relative differences of the loss and both gradients from the naive ones
(the naive row, the anchor, has none). The fused variant is timed with loss.backward() (an upstream gradient of 1:
its backward hands the forward's gradients over; a scaled loss adds one multiply pass over them).

  python bench/gpu_infonce.py --out DIR                        # writes DIR/gpu_infonce.csv and, with matplotlib,
                                                               # DIR/gpu_infonce.png
  python bench/gpu_infonce.py --smoke --device cpu --out DIR   # tiny sizes on the CPU (keeps the script working)
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import device_name, env_vars, first_line, git_commit, pyplot, quantile, save_figure, write_csv  # noqa: E402

TEMPERATURE = 0.05
G = 8
# our variants: the op's kernel choices around its forward and backward (the fourth variant is "naive")
OURS = {"nvembed": {"NVEMBED_INFONCE_KERNEL": "sm80", "NVEMBED_INFONCE_FWD": "tiles", "NVEMBED_INFONCE_BWD": "tiles"},
        "nvembed-sm90": {"NVEMBED_INFONCE_KERNEL": "sm90", "NVEMBED_INFONCE_FWD": "tiles",
                         "NVEMBED_INFONCE_BWD": "tiles"},
        "nvembed-gemm": {"NVEMBED_INFONCE_KERNEL": "auto", "NVEMBED_INFONCE_FWD": "tiles",
                         "NVEMBED_INFONCE_BWD": "gemm"},
        "nvembed-gemm-fwd": {"NVEMBED_INFONCE_KERNEL": "auto", "NVEMBED_INFONCE_FWD": "gemm",
                             "NVEMBED_INFONCE_BWD": "gemm"},
        "nvembed-fused": {"NVEMBED_INFONCE_GRAD": "fused"},
        "nvembed-auto": {"NVEMBED_INFONCE_KERNEL": "auto", "NVEMBED_INFONCE_FWD": "auto", "NVEMBED_INFONCE_BWD": "auto",
                         "NVEMBED_INFONCE_GRAD": "auto"}}


def environment(device: str) -> dict:
    import nvembed_ext

    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "nvembed_archs": nvembed_ext.build_info().get("cuda_archs", ""),
        "device": device_name(device),
    }


def sm90_unavailable() -> str | None:
    """Why the Hopper InfoNCE forward cannot run here, or None."""
    import nvembed_ext

    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    with env_vars({"NVEMBED_INFONCE_KERNEL": "sm90"}):
        if nvembed_ext._C.infonce_fwd_kernel_for(major, minor) != "sm90":
            return (f"the Hopper forward does not apply (compute capability {major}.{minor}, build archs "
                    f"{nvembed_ext.build_info()['cuda_archs']!r})")
        return None


def loss_fn(variant: str):
    import nvembed_ext  # noqa: F401
    from nvembed_ext.reference import infonce_ref

    if variant not in OURS:
        return infonce_ref
    settings = OURS[variant]
    if settings.get("NVEMBED_INFONCE_GRAD") in ("fused", "auto"):
        # the public op: with inputs that need gradients its forward calls _infonce_fwd_grad where the variable
        # picks it (it is read there only; the backward scales the saved gradients); nvembed-auto: whatever auto picks
        def fused(q, docs, group_size, t, inb):
            with env_vars(settings):
                return torch.ops.nvembed.infonce(q, docs, group_size, t, inb)
        return fused

    class Ours(torch.autograd.Function):
        # The op reads the variables on every call, forward and backward: they are set around both.
        @staticmethod
        def forward(ctx, q, docs, group_size, t, inb):
            with env_vars(settings):
                loss, lse = torch.ops.nvembed._infonce_fwd(q, docs, group_size, t, inb)
            ctx.save_for_backward(q, docs, lse)
            ctx.args = (group_size, t, inb)
            return loss

        @staticmethod
        def backward(ctx, grad):
            q, docs, lse = ctx.saved_tensors
            with env_vars(settings):
                gq, gd = torch.ops.nvembed._infonce_bwd(grad, q, docs, lse, *ctx.args)
            return gq, gd, None, None, None

    return Ours.apply


def fresh_inputs(B: int, d: int, dtype, device):
    # rows of norm ~1, as trained embeddings: logits / t stay O(1 / t)
    q = (torch.randn(B, d, device=device, dtype=dtype) * (1.0 / math.sqrt(d))).requires_grad_()
    docs = (torch.randn(B * G, d, device=device, dtype=dtype) * (1.0 / math.sqrt(d))).requires_grad_()
    return q, docs


def naive_bytes(B: int, d: int) -> int:
    """What the naive fwd+bwd allocates beyond its inputs, conservatively: bf16 logits and their scaled copy, fp32
    logits, fp32 log-softmax (saved), fp32 and bf16 gradients of the logits: 2 + 2 + 4 + 4 + 4 + 2 bytes per logit,
    plus the input gradients."""
    N = B * G
    return 18 * B * N + 2 * (B + N) * d


def nvembed_bytes(B: int, d: int) -> int:
    """Input gradients, their padded / fp32 workspaces and the backward scratch (bounded at about 0.6 GB)."""
    N = B * G
    return 2 * (B + N) * d + (600 << 20)


def gemm_bytes(B: int, d: int) -> int:
    """Input gradients, the fp32 dQ / target-row accumulators, a block's bf16 probabilities (256 MiB, at least 4096
    columns), a chunk's fp32 scores (256 MiB) and a GEMM's fp32 row block (64 MiB)."""
    N = B * G
    return 2 * (B + N) * d + 8 * B * d + max(256 << 20, 2 * B * min(4096, N)) + (320 << 20)


def fused_bytes(B: int, d: int) -> int:
    """Input gradients, a row block's fp32 scores (the bf16 probabilities are written over them), the fp32 dD
    accumulator where the plan has one, a GEMM's fp32 part (64 MiB): the library's own plan
    (nvembed_ext._C.infonce_fused_plan, under the current NVEMBED_INFONCE_FUSED_MB and
    NVEMBED_INFONCE_FUSED_ACC)."""
    import nvembed_ext

    N = B * G
    plan = nvembed_ext._C.infonce_fused_plan(B, N, d, 2)
    return 2 * (B + N) * d + 4 * plan["rows"] * N + (4 * N * d if plan["accumulator"] == "fp32" else 0) + (64 << 20)


def measure(variant: str, B: int, d: int, dtype, device: str, rounds: int, max_seconds: float) -> dict:
    fn = loss_fn(variant)
    on_cuda = device == "cuda"
    times, peaks = [], []
    t_start = time.perf_counter()
    for r in range(rounds + 1):  # round 0 is the warm-up
        q, docs = fresh_inputs(B, d, dtype, device)
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        loss = fn(q, docs, G, TEMPERATURE, True)
        loss.backward()
        if on_cuda:
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
            if r > 0:  # the warm-up's one-time allocations (cuBLAS workspace, ...) are not the variant's
                peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            elapsed = time.perf_counter() - t0
        del q, docs, loss
        if r > 0:
            times.append(elapsed)
            if time.perf_counter() - t_start > max_seconds and len(times) >= 3:
                break
    return {"time_ms": statistics.median(times) * 1e3, "time_p20_ms": quantile(times, 0.2) * 1e3,
            "time_p80_ms": quantile(times, 0.8) * 1e3,
            "rounds": len(times), "peak_mem_mb": (max(peaks) / 2**20) if peaks else float("nan")}


def _empty_cache(device: str) -> None:
    if device == "cuda":
        try:  # after an illegal memory access the context is gone: that must not end the script
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def run(args, on_rows=None) -> list[dict]:
    """Every (d, B, variant) row; on_rows(rows) after each (d, B) configuration (main writes the CSV there, so a
    step killed at its limit keeps what it measured). A variant that raises gets status "failed: ..." and the
    others still run."""
    device = args.device
    dtype = torch.bfloat16
    env = environment(device)
    rows = []
    variants = args.variants or ((*OURS, "naive") if device == "cuda" else ("nvembed", "naive"))
    sm90_why = sm90_unavailable() if device == "cuda" else None
    if device == "cuda":  # cuBLAS's handle and workspace exist before the first measured variant (no one pays them)
        warm = torch.randn(256, 256, device=device, dtype=dtype)
        torch.mm(warm, warm, out_dtype=torch.float32).sum().item()
        (warm @ warm).sum().item()
    for d in args.d:
        for B in args.B:
            N = B * G
            flops = 6 * B * N * d  # 2 BNd forward + 4 BNd backward
            results = {}
            for variant in variants:
                row = {**env, "variant": variant, "dtype": "bfloat16", "B": B, "G": G, "N": N, "d": d,
                       "temperature": TEMPERATURE, "in_batch_negatives": True, "status": "ok", "fused_plan": ""}
                if variant in ("nvembed-fused", "nvembed-auto"):
                    import nvembed_ext

                    plan = nvembed_ext._C.infonce_fused_plan(B, N, d, 2)
                    row["fused_plan"] = f"rows {plan['rows']}, dD accumulator {plan['accumulator']}"
                need = {"naive": naive_bytes, "nvembed-gemm": gemm_bytes, "nvembed-gemm-fwd": gemm_bytes,
                        "nvembed-fused": fused_bytes, "nvembed-auto": fused_bytes}.get(variant, nvembed_bytes)(B, d)
                free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
                if variant == "nvembed-sm90" and sm90_why is not None:
                    row["status"] = f"skipped: {sm90_why}"
                elif free is not None and need > 0.9 * free:
                    row["status"] = (f"skipped: needs ~{need / 2**30:.1f} GiB beyond its inputs, "
                                     f"{free / 2**30:.1f} GiB free")
                else:
                    try:
                        res = measure(variant, B, d, dtype, device, args.rounds, args.max_seconds)
                    except torch.cuda.OutOfMemoryError as e:  # reported, not retried
                        row["status"] = f"skipped: out of memory ({str(e).splitlines()[0][:120]})"
                        _empty_cache(device)
                    except Exception as e:  # noqa: BLE001 -- an unverified path's error is a result, not the end
                        row["status"] = "failed: " + first_line(e, 200)
                        _empty_cache(device)
                    else:
                        results[variant] = res
                        row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()})
                        row["tflops"] = round(flops / (res["time_ms"] / 1e3) / 1e12, 2)
                rows.append(row)
                print(f"d={d:5d} B={B:6d} {variant:8s} " + (
                    f"{row['time_ms']:10.2f} ms  {row['tflops']:8.2f} TFLOP/s  peak {row['peak_mem_mb']:10.1f} MiB"
                    if row["status"] == "ok" else row["status"]), flush=True)
                _empty_cache(device)
            if "naive" in results:
                try:
                    agree = agreement([v for v in variants if v != "naive" and v in results], B, d, dtype, device)
                except Exception as e:  # noqa: BLE001 -- reported in the rows, not the end of the run
                    agree = {v: {"agreement": "failed: " + first_line(e, 120)} for v in results if v != "naive"}
                naive = results["naive"]
                for row in rows[-len(variants):]:  # our variants' rows only: the naive row is the anchor
                    ours = results.get(row["variant"]) if row["variant"] != "naive" else None
                    if ours is None:
                        continue
                    row["speedup_vs_naive"] = round(naive["time_ms"] / ours["time_ms"], 3)
                    if naive["peak_mem_mb"] == naive["peak_mem_mb"] and ours["peak_mem_mb"] > 0:
                        row["mem_reduction_vs_naive"] = round(naive["peak_mem_mb"] / ours["peak_mem_mb"], 2)
                    row.update(agree.get(row["variant"], {}))
            if on_rows is not None:
                on_rows(rows)
    return rows


def agreement(variants: list, B: int, d: int, dtype, device: str) -> dict:
    """Per variant, on one set of inputs that need gradients (the fused variant takes its own path only then): the
    relative differences of its loss and of both gradients from the naive loss's, a sanity check beside the timings
    (both sides are bf16 computations; the float64 comparisons are the CUDA tests' job)."""
    q, docs = fresh_inputs(B, d, dtype, device)
    naive_loss = loss_fn("naive")(q, docs, G, TEMPERATURE, True)
    naive_loss.backward()
    ref = (naive_loss.item(), q.grad.float(), docs.grad.float())
    del naive_loss
    out = {}
    for variant in variants:
        q.grad = docs.grad = None
        try:
            loss = loss_fn(variant)(q, docs, G, TEMPERATURE, True)
            loss.backward()
        except Exception as e:  # noqa: BLE001
            out[variant] = {"agreement": "failed: " + first_line(e, 120)}
            continue
        out[variant] = {
            "loss_rel_diff_same_inputs": f"{abs(loss.item() - ref[0]) / abs(ref[0]):.2e}",
            "grad_q_rel_diff_vs_naive": f"{((q.grad.float() - ref[1]).norm() / ref[1].norm()).item():.2e}",
            "grad_docs_rel_diff_vs_naive": f"{((docs.grad.float() - ref[2]).norm() / ref[2].norm()).item():.2e}"}
        del loss
    _empty_cache(device)
    return out


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for d in sorted({r["d"] for r in ok}):
        for variant, style in (("nvembed", "-o"), ("nvembed-sm90", "-^"), ("nvembed-gemm", "-D"),
                               ("nvembed-gemm-fwd", "-v"), ("nvembed-fused", "-P"), ("naive", "--s")):
            pts = sorted((r["B"], r) for r in ok if r["d"] == d and r["variant"] == variant)
            if not pts:
                continue
            bs = [b for b, _ in pts]
            label = f"{variant} d={d}"
            axes[0].plot(bs, [r["time_ms"] for _, r in pts], style, label=label)
            axes[1].plot(bs, [r["tflops"] for _, r in pts], style, label=label)
            axes[2].plot(bs, [r["peak_mem_mb"] / 1024 for _, r in pts], style, label=label)
    for ax, title in zip(axes, ("fwd+bwd time (ms, median)", "TFLOP/s (6 B N d / time)", "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("B (queries), N = 8 B docs")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    # peak memory is NaN off CUDA (the --smoke run on a CPU): a log axis needs a positive value
    if any(r["peak_mem_mb"] > 0 for r in ok):
        axes[2].set_yscale("log")
    r0 = rows[0]
    fig.suptitle(f"nvembed::infonce vs naive, bf16, in-batch negatives - {r0['device']}, torch {r0['torch']}, "
                 f"CUDA {r0['cuda']}, commit {r0['commit']}")
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for gpu_infonce.csv / .png")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (B = 64, d = 32), for checking the script")
    ap.add_argument("--d", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    ap.add_argument("--B", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 65536])
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per configuration (at most)")
    ap.add_argument("--variants", type=lambda s: tuple(s.split(",")), default=None,
                    help=f"comma-separated subset of {','.join([*OURS, 'naive'])} (default: all that apply to the "
                         "device)")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="stop timing a configuration after this long (at least 3 timed rounds)")
    args = ap.parse_args(argv)
    unknown = set(args.variants or ()) - {*OURS, "naive"}
    if unknown:
        ap.error(f"unknown --variants {sorted(unknown)}")
    if args.smoke:
        args.d, args.B, args.rounds = [32], [64], 3
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --smoke --device cpu")
        return 2
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    os.makedirs(args.out, exist_ok=True)
    name = "gpu_infonce_smoke" if args.smoke else "gpu_infonce"
    csv_path = os.path.join(args.out, f"{name}.csv")
    rows = run(args, on_rows=lambda rows: write_csv(csv_path, rows))
    write_csv(csv_path, rows)
    print(f"wrote {csv_path}")
    plot(rows, os.path.join(args.out, f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
