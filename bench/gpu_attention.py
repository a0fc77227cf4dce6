"""GPU benchmark of nvembed::flash_attn (non-causal) against PyTorch SDPA (flash and cuDNN backends) and
FlashAttention-4, following the FlashAttention-3 paper's protocol, plus a GQA row, a padded-batch row and the
Mistral-shaped training-step row.

Protocol (FA3 paper, non-causal): 16k tokens in total, hidden size 2048 (head dim 64 -> 32 heads, 128 -> 16 heads),
seqlen 512, 1k, 2k, 4k, 8k, 16k with batch = 16384 // seqlen, bf16. FLOPs: forward 4 * B * S^2 * H * D, backward
2.5 x forward, fwd+bwd 3.5 x forward; TFLOP/s = FLOPs / median time. Per (configuration, provider, mode): fresh
random inputs (standard normal), 5 warm-up calls, then 20 timed calls, each between two CUDA events (CPU: a
perf_counter pair); the median is reported.
  gqa         32 q heads, 8 kv heads, head dim 128, seqlen 2k (batch 8).
  padded      16 sequences of uneven lengths (128..2048, fixed seed) at 16 heads x 128: our varlen op on the packed
              tokens, our dense op on the padded batch with the key mask, SDPA (its default backend choice) on the
              padded batch with a bool mask [B, 1, 1, L] — the anchor, as PyTorch has no varlen SDPA —, cuDNN SDPA
              with the same mask, FA4's varlen function. TFLOP/s count useful FLOPs only (4 * sum(len^2) * H * D),
              the same number for every provider, so padded providers pay for their padding in the rate.
  train-step  the training microbenchmark: Mistral-7B-shaped attention (32 q heads, 8 kv heads, head dim 128),
              seqlen 512, batch 64, fwd+bwd, no mask.

Providers and what one timed call includes (the same for all; inputs are created, and agreement-checked, outside
the timed region). Every provider reads the same [B, L, H, D] tensors (the layout a projection produces):
  nvembed      torch.ops.nvembed.flash_attn(q, k, v) with NVEMBED_FLASH_KERNEL=sm80, the sm80 kernels
               (flash_attn_varlen on packed [T, H, D] for nvembed-varlen); GQA native. nvembed-sm90 / nvembed-varlen-sm90: the same with NVEMBED_FLASH_KERNEL=sm90, the
               Hopper kernels (TMA + wgmma, forward and backward, head dims 64 / 128; "unavailable" off sm_90).
  sdpa-flash   F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION) on q.transpose(1, 2)
               (a view, no copy: SDPA takes [B, H, L, D]); the output is transposed back as a view. GQA through
               enable_gqa=True; where a backend refuses it, k / v are repeat_interleave'd inside the timed call
               (and their gradient summed back by autograd) — the CSV note says which.
  sdpa-cudnn   the same under SDPBackend.CUDNN_ATTENTION.
  sdpa         the same without a backend restriction (padded row only, with the mask).
  fa4          flash_attn.cute.flash_attn_func (PyPI flash-attn-4), [B, L, H, D] native, GQA native;
               fa4-varlen: flash_attn.cute.flash_attn_varlen_func on the packed tokens.
  fwd      out = f(q, k, v) under torch.no_grad().
  bwd      torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) on one forward made before the timing:
           the provider's whole backward (including any preprocessing kernels it launches and, for repeated k / v,
           the reduction of their gradients).
  fwd+bwd  torch.autograd.grad(f(q, k, v), (q, k, v), dout).
Before timing, each provider is checked once per kind of configuration (layout, GQA or not, head dim, mask) on a
small case against SDPA's math backend in float64 on the same rounded inputs (output and gradients; max |err| /
max |ref| <= 2e-2 forward, 4e-2 backward for bf16); a provider that disagrees is not timed ("skipped: ..."), one
that raises (not installed, unsupported shape, no CUDA kernel in this build) gets "unavailable: <error>" in the
note column. Exit status 1 when an nvembed provider disagrees with the reference, else 0.

  python bench/gpu_attention.py --out DIR      # DIR/gpu_attention.csv and, with matplotlib, DIR/gpu_attention.png
  python bench/gpu_attention.py --tiny --out DIR [--device cpu]
                                               # tiny shapes, seconds, also on CPU-only machines (the CPU op vs
                                               # SDPA): keeps the script working between GPU sessions
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import statistics
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import (describe, env_vars, first_line, gpu_environment, pyplot, save_figure,  # noqa: E402
                    select_device, time_calls, write_csv)

COLUMNS = ["gpu", "torch", "cuda", "commit", "date", "provider", "mode", "batch", "seqlen", "heads_q", "heads_kv",
           "head_dim", "ms", "tflops", "note"]
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DENSE_PROVIDERS = ("nvembed", "nvembed-sm90", "sdpa-flash", "sdpa-cudnn", "fa4")
PADDED_PROVIDERS = ("nvembed-varlen", "nvembed-varlen-sm90", "nvembed", "sdpa", "sdpa-cudnn", "fa4-varlen")
PACKED = {"nvembed-varlen", "nvembed-varlen-sm90", "fa4-varlen"}
# nvembed-sm90 / nvembed-varlen-sm90: the same ops with NVEMBED_FLASH_KERNEL=sm90, i.e. the Hopper kernels
# (TMA + wgmma, forward and backward) where they apply.
SM90_SUFFIX = "-sm90"
# max |got - ref| / max(|ref|, 1e-2) for the agreement check, as tests/test_flash_attn_cuda.py
AGREE_TOL = {torch.bfloat16: (2e-2, 4e-2), torch.float16: (4e-3, 8e-3)}


@dataclasses.dataclass
class Case:
    kind: str  # "fa3", "gqa", "padded", "train-step"
    batch: int
    seqlen: int  # the (longest) sequence length
    heads_q: int
    heads_kv: int
    head_dim: int
    modes: tuple = MODES
    lengths: Optional[list] = None  # padded: per-sequence lengths; None = all `seqlen`
    note: str = ""

    @property
    def providers(self):
        return PADDED_PROVIDERS if self.lengths is not None else DENSE_PROVIDERS

    def seq_lengths(self):
        return self.lengths if self.lengths is not None else [self.seqlen] * self.batch

    def fwd_flops(self) -> float:
        return 4.0 * sum(n * n for n in self.seq_lengths()) * self.heads_q * self.head_dim


def build_cases(tiny: bool, seqlens=None, head_dims=None) -> list:
    total, hidden = (128, 128) if tiny else (16384, 2048)
    seqlens = seqlens or ([32, 64] if tiny else [512, 1024, 2048, 4096, 8192, 16384])
    head_dims = head_dims or ([32, 64] if tiny else [64, 128])
    cases = []
    for D in head_dims:
        H = hidden // D
        for S in seqlens:
            cases.append(Case("fa3", max(total // S, 1), S, H, H, D))
    if tiny:
        cases.append(Case("gqa", 2, 48, 4, 2, 32, note="gqa"))
        lengths = [5, 17, 30, 1]
        cases.append(Case("padded", len(lengths), max(lengths), 2, 2, 32, lengths=lengths))
        cases.append(Case("train-step", 2, 32, 4, 2, 32, modes=("fwd+bwd",)))
    else:
        cases.append(Case("gqa", 8, 2048, 32, 8, 128, note="gqa"))
        g = torch.Generator().manual_seed(1234)
        lengths = torch.randint(128, 2049, (16,), generator=g).tolist()
        cases.append(Case("padded", len(lengths), max(lengths), 16, 16, 128, lengths=lengths))
        cases.append(Case("train-step", 64, 512, 32, 8, 128, modes=("fwd+bwd",)))
    for c in cases:
        if c.kind == "padded":
            c.note = (f"padded: {len(c.lengths)} sequences, lengths {min(c.lengths)}..{max(c.lengths)} "
                      f"(sum {sum(c.lengths)}), useful FLOPs; anchor sdpa (mask)")
        elif c.kind == "train-step":
            c.note = "train-step: Mistral-shaped attention, no mask"
    return cases


# ---- inputs ------------------------------------------------------------------------------------------------------

class Inputs:
    """Padded base tensors [B, L, H, D] (positions past a sequence's length are zero) and the provider's view of
    them: `leaves` (the dense tensors, or the packed valid rows for varlen providers)."""

    def __init__(self, case: Case, packed: bool, device, dtype, requires_grad: bool, gen: torch.Generator):
        B, S, D = case.batch, case.seqlen, case.head_dim
        self.case, self.packed = case, packed
        self.lengths = case.seq_lengths()

        def rnd(h):
            return torch.randn(B, S, h, D, generator=gen, device=device).to(dtype)

        q, k, v = rnd(case.heads_q), rnd(case.heads_kv), rnd(case.heads_kv)
        self.mask = None
        if case.lengths is not None:
            self.mask = (torch.arange(S)[None, :] < torch.tensor(self.lengths)[:, None]).to(device)
            keep = self.mask[:, :, None, None]
            q, k, v = (t * keep for t in (q, k, v))
            cu = [0]
            for n in self.lengths:
                cu.append(cu[-1] + n)
            self.cu = torch.tensor(cu, dtype=torch.int32, device=device)
        self.padded = (q, k, v)
        base = tuple(self.pack(t) for t in (q, k, v)) if packed else (q, k, v)
        self.leaves = tuple(t.detach().clone().requires_grad_(requires_grad) for t in base)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H, D] -> the valid rows [T, H, D]."""
        if self.case.lengths is None:
            return x.reshape(-1, *x.shape[2:])
        return torch.cat([x[b, :n] for b, n in enumerate(self.lengths)])

    def as_packed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.packed else self.pack(x)


# ---- providers ---------------------------------------------------------------------------------------------------

def _fa4_module():
    import flash_attn.cute as fa4  # PyPI flash-attn-4 (CuTe DSL; sm90 / sm100)
    return fa4


def _call_kwargs(fn, **kw):
    """Keep only the keyword arguments `fn` accepts (FA4's signature moves between releases)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kw
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kw
    return {k: v for k, v in kw.items() if k in params}


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-math": SDPBackend.MATH}.get(name)


@contextlib.contextmanager
def _fwd_kernel_env(kind: str):
    """NVEMBED_FLASH_KERNEL=kind inside (read by the op on every call); a device or build where the Hopper
    kernels do not apply makes the provider unavailable instead of silently timing the sm80 kernels."""
    import nvembed_ext
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    with env_vars({"NVEMBED_FLASH_KERNEL": kind}):
        if kind == "sm90" and nvembed_ext._C.flash_kernel_for(major, minor, 128) != "sm90":
            raise RuntimeError(f"the Hopper kernels do not apply here (compute capability {major}.{minor}, "
                               f"build archs {nvembed_ext.build_info()['cuda_archs']!r})")
        yield


def provider_context(name: str):
    if name.endswith(SM90_SUFFIX):
        return _fwd_kernel_env("sm90")
    if name.startswith("nvembed"):
        return _fwd_kernel_env("sm80")  # auto would pick the Hopper kernels on an H100 / H200
    backend = _sdpa_backend(name)
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(backend)


def _sdpa(q, k, v, mask, gqa_mode: str):
    """SDPA on [B, L, H, D] tensors through [B, H, L, D] views; returns a [B, L, H, D] view."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw = {}
    if qt.shape[1] != kt.shape[1]:
        if gqa_mode == "enable_gqa":
            kw["enable_gqa"] = True
        else:
            g = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
    attn_mask = mask[:, None, None, :] if mask is not None else None
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, **kw).transpose(1, 2)


def make_fn(name: str, inp: Inputs, gqa_mode: str = "enable_gqa") -> Callable:
    """f(q, k, v) -> out for provider `name` on `inp` (the provider's layout)."""
    case = inp.case
    name = name.removesuffix(SM90_SUFFIX)  # the kernel choice is provider_context's
    if name == "nvembed":
        import nvembed_ext  # noqa: F401
        op, mask = torch.ops.nvembed.flash_attn, inp.mask
        return lambda q, k, v: op(q, k, v, mask, None)
    if name == "nvembed-varlen":
        import nvembed_ext  # noqa: F401
        op, cu, L = torch.ops.nvembed.flash_attn_varlen, inp.cu, case.seqlen
        return lambda q, k, v: op(q, k, v, cu, cu, L, L)
    if name in ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-math"):
        mask = inp.mask
        return lambda q, k, v: _sdpa(q, k, v, mask, gqa_mode)
    if name == "fa4":
        fn = _fa4_module().flash_attn_func
        kw = _call_kwargs(fn, causal=False)

        def fa4(q, k, v):
            out = fn(q, k, v, **kw)
            return out[0] if isinstance(out, (tuple, list)) else out
        return fa4
    if name == "fa4-varlen":
        fn = _fa4_module().flash_attn_varlen_func
        kw = _call_kwargs(fn, cu_seqlens_q=inp.cu, cu_seqlens_k=inp.cu, max_seqlen_q=case.seqlen,
                          max_seqlen_k=case.seqlen, causal=False)

        def fa4v(q, k, v):
            out = fn(q, k, v, **kw)
            return out[0] if isinstance(out, (tuple, list)) else out
        return fa4v
    raise ValueError(f"unknown provider {name!r}")


# ---- agreement with SDPA math -------------------------------------------------------------------------------------

def small_case(case: Case, tiny: bool) -> Case:
    g = case.heads_q // case.heads_kv
    if case.lengths is not None:
        lengths = [5, 17, 3] if tiny else [37, 1, 200, 64]
        return Case(case.kind, len(lengths), max(lengths), 2 * g, 2, case.head_dim, lengths=lengths)
    S = 19 if tiny else 257
    return Case(case.kind, 2, S, 2 * g, 2, case.head_dim)


def _max_rel(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-2)


def check_agreement(name: str, case: Case, device, dtype, tiny: bool, seed: int, gqa_mode: str) -> Optional[str]:
    """None when provider `name` matches SDPA-math (float64, same rounded inputs) on a small case like `case`,
    forward and backward; else why not."""
    small = small_case(case, tiny)
    gen = torch.Generator(device=device).manual_seed(seed)
    inp = Inputs(small, name in PACKED, device, dtype, True, gen)
    fn = make_fn(name, inp, gqa_mode)
    with provider_context(name):  # forward and backward under the provider's settings (the op reads them in both)
        out = fn(*inp.leaves)
        dout = torch.randn(out.shape, generator=gen, device=device).to(dtype)
        if inp.mask is not None and not inp.packed:
            dout = dout * inp.mask[:, :, None, None]  # padded query rows: no gradient, so dk / dv are comparable
        grads = torch.autograd.grad(out, inp.leaves, dout)
    # reference: SDPA math in float64 on the padded tensors (k / v repeated for GQA), compared on valid rows
    ref_leaves = [t.detach().double().requires_grad_() for t in inp.padded]
    rq, rk, rv = ref_leaves
    g = small.heads_q // small.heads_kv
    with provider_context("sdpa-math"):
        ref = _sdpa(rq, rk.repeat_interleave(g, dim=2), rv.repeat_interleave(g, dim=2), inp.mask, "repeat")
    if inp.packed:
        ref_dout = torch.zeros_like(ref)
        for b, n in enumerate(inp.lengths):
            s = int(inp.cu[b])
            ref_dout[b, :n] = dout[s:s + n].double()
    else:
        ref_dout = dout.double()
    ref_grads = torch.autograd.grad(ref, ref_leaves, ref_dout)
    fwd_tol, bwd_tol = AGREE_TOL[dtype]
    errs = {"out": (_max_rel(inp.as_packed(out), inp.pack(ref)), fwd_tol)}
    for gname, got, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        errs[gname] = (_max_rel(inp.as_packed(got), inp.pack(r)), bwd_tol)
    bad = {k: e for k, (e, tol) in errs.items() if not (e <= tol)}  # `not <=` also catches NaN
    if bad:
        return "disagrees with sdpa-math: " + ", ".join(f"{k} max|err|/max|ref| {e:.2e} > {errs[k][1]:.0e}"
                                                       for k, e in bad.items())
    return None


# ---- timing ------------------------------------------------------------------------------------------------------

def measure(name: str, case: Case, mode: str, device, dtype, args, seed: int, gqa_mode: str) -> float:
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: 16k x 2048 inputs in microseconds
    inp = Inputs(case, name in PACKED, device, dtype, mode != "fwd", gen)
    fn = make_fn(name, inp, gqa_mode)
    leaves = inp.leaves
    with provider_context(name):
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    fn(*leaves)
        else:
            out = fn(*leaves)
            dout = torch.randn(out.shape, generator=gen, device=device).to(dtype)
            if mode == "bwd":
                def call():
                    torch.autograd.grad(out, leaves, dout, retain_graph=True)
            else:
                def call():
                    torch.autograd.grad(fn(*leaves), leaves, dout)
        return statistics.median(time_calls(call, args.warmup, args.iters, device.type == "cuda"))


# ---- driver ------------------------------------------------------------------------------------------------------

def gqa_key(case: Case):
    return (case.lengths is not None, case.heads_q != case.heads_kv, case.head_dim)


def run(args, device, dtype, on_rows=None) -> tuple:
    """(rows, mismatch); on_rows(rows) after each case, so a step killed at its limit keeps what it measured."""
    env = gpu_environment(device)
    print(f"gpu_attention: {describe(env)}, {str(dtype).replace('torch.', '')}, {'tiny' if args.tiny else 'full'} "
          f"run, warm-up {args.warmup}, timed {args.iters}", flush=True)
    cases = build_cases(args.tiny, args.seqlens, args.head_dims)
    only = set(args.providers) if args.providers else None
    agreement = {}  # (provider, key) -> (error or None, gqa_mode, note)
    rows, mismatch = [], False
    seed = args.seed
    for case in cases:
        for name in case.providers:
            if only is not None and name not in only:
                continue
            key = (name, gqa_key(case))
            if key not in agreement:
                agreement[key] = agree(name, case, device, dtype, args, seed)
                seed += 1
                err, _, _ = agreement[key]
                # ours disagreeing ("skipped: ...") or failing to run ("unavailable: ...", other than the Hopper
                # kernels on a device or build they do not apply to) ends the run with status 1
                if (err is not None and name.startswith("nvembed") and err.startswith(("skipped", "unavailable"))
                        and "do not apply here" not in err):
                    mismatch = True
                print(f"  check {name:<15} {'ok' if err is None else err}", flush=True)
            err, gqa_mode, pnote = agreement[key]
            for mode in case.modes:
                row = {**env, "_kind": case.kind, "provider": name, "mode": mode, "batch": case.batch,
                       "seqlen": case.seqlen, "heads_q": case.heads_q, "heads_kv": case.heads_kv, "head_dim": case.head_dim,
                       "ms": "", "tflops": ""}
                notes = [n for n in (case.note, pnote) if n]
                if err is not None:
                    notes.append(err)
                else:
                    try:
                        ms = measure(name, case, mode, device, dtype, args, seed, gqa_mode)
                        row["ms"] = round(ms, 4)
                        row["tflops"] = float(f"{MODE_FLOPS[mode] * case.fwd_flops() / (ms * 1e-3) / 1e12:.4g}")
                    except Exception as e:  # recorded, not fatal: the other providers still run
                        notes.append("unavailable: " + first_line(e, 300))
                    seed += 1
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                row["note"] = "; ".join(notes)
                rows.append(row)
                shown = f"{row['ms']:10.3f} ms {row['tflops']:9.2f} TFLOP/s" if row["ms"] != "" else row["note"]
                print(f"  {case.kind:<10} B={case.batch:<3} S={case.seqlen:<5} H={case.heads_q}/{case.heads_kv} "
                      f"D={case.head_dim:<3} {name:<15} {mode:<7} {shown}", flush=True)
        if on_rows is not None:
            on_rows(rows)
    return rows, mismatch


def agree(name, case, device, dtype, args, seed) -> tuple:
    """(error or None, gqa_mode, provider note) for provider `name` on configurations like `case`."""
    gqa = case.heads_q != case.heads_kv
    modes = ["enable_gqa", "repeat"] if (gqa and name.startswith("sdpa")) else ["enable_gqa"]
    first_error = None
    for gqa_mode in modes:
        try:
            bad = check_agreement(name, case, device, dtype, args.tiny, seed, gqa_mode)
        except Exception as e:
            if first_error is None:
                first_error = first_line(e, 300)
            continue
        note = ""
        if gqa and name.startswith("sdpa"):
            note = ("GQA via enable_gqa=True" if gqa_mode == "enable_gqa" else
                    f"GQA via repeat_interleave of k/v in the timed call (enable_gqa refused: {first_error})")
        if bad is not None:
            return "skipped: " + bad, gqa_mode, note
        return None, gqa_mode, note
    return "unavailable: " + (first_error or "unknown error"), "enable_gqa", ""


def plot(rows: list, path: str, tiny: bool) -> None:
    plt = pyplot()
    if plt is None:
        return
    sweep = [r for r in rows if r["_kind"] == "fa3" and r["ms"] != ""]
    head_dims = sorted({r["head_dim"] for r in sweep})
    if not head_dims:
        print("no timed FA3-protocol rows: no PNG")
        return
    fig, axes = plt.subplots(len(head_dims), len(MODES), figsize=(5 * len(MODES), 3.8 * len(head_dims)),
                             squeeze=False)
    providers = [p for p in DENSE_PROVIDERS if any(r["provider"] == p for r in sweep)]
    for i, D in enumerate(head_dims):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            seqlens = sorted({r["seqlen"] for r in sweep if r["head_dim"] == D})
            width = 0.8 / max(len(providers), 1)
            for p_i, p in enumerate(providers):
                vals = {r["seqlen"]: r["tflops"] for r in sweep
                        if r["head_dim"] == D and r["mode"] == mode and r["provider"] == p}
                xs = [x + p_i * width for x in range(len(seqlens))]
                ax.bar(xs, [vals.get(s, 0) for s in seqlens], width, label=p)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(seqlens))])
            ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.set_title(f"{mode}, head dim {D}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    r0 = rows[0]
    protocol = "tiny shapes" if tiny else "16k tokens, hidden 2048"
    fig.suptitle(f"non-causal attention, {protocol} — {describe(r0)}")
    save_figure(fig, path)


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for gpu_attention[_tiny].csv / .png")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (seconds; runs on the CPU too)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu (--tiny only)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5; --tiny 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default 20; --tiny 3)")
    ap.add_argument("--seqlens", type=ints, default=None, help="override the FA3 sweep's sequence lengths")
    ap.add_argument("--head-dims", type=ints, default=None, help="override the FA3 sweep's head dims")
    ap.add_argument("--providers", type=lambda s: s.split(","), default=None,
                    help=f"only these (of {', '.join(dict.fromkeys(DENSE_PROVIDERS + PADDED_PROVIDERS))})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 5
    if args.iters is None:
        args.iters = 3 if args.tiny else 20
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    device = select_device("gpu_attention", args.device, args.tiny, "the full sweep")
    if device is None:
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        print("gpu_attention: the CPU op takes bfloat16, not float16")
        return 2
    os.makedirs(args.out, exist_ok=True)
    name = "gpu_attention_tiny" if args.tiny else "gpu_attention"
    csv_path = os.path.join(args.out, f"{name}.csv")
    rows, mismatch = run(args, device, dtype, on_rows=lambda rows: write_csv(csv_path, rows, COLUMNS))
    write_csv(csv_path, rows, COLUMNS)
    print(f"wrote {csv_path} ({len(rows)} rows)")
    plot(rows, os.path.join(args.out, f"{name}.png"), args.tiny)
    if mismatch:
        print("gpu_attention: an nvembed provider disagrees with SDPA math (see the 'skipped' notes)")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
