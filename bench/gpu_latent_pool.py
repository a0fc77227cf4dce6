"""GPU benchmark of nvembed::latent_pool (NV-Embed-v2's latent-attention layer + masked mean + L2 normalize)
against the released eager layer and torch.compile of it, forward and forward+backward, side by side in one run
(issue 7).

Layer (NVEMBED_FACTS (a)-(c), the released LatentAttentionConfig): d = 4096, N = 512 latents, 8 cross heads x
dim_head 4096 (inner I = 32768), GEGLU feed-forward with mult 4 (4096 -> 32768 -> GEGLU -> 16384 -> 4096, F = 16384),
bf16, B = 32 rows x L = 512 tokens. Random weights on a trained layer's scales (tests/released_nvembed.py's
random_state_dict), hidden states N(0, 1).

Providers (every one computes the same [B, d] embeddings from the same tensors; fwd+bwd differentiates with respect
to the hidden states and all 14 weights):
  eager    the released layer: tests/released_nvembed.py port_latent_attention(attention="sdpa") (the tests' parity
           reference and bench/gpu_model_e2e.py's baseline, imported, not copied) - LayerNorms, to_q on the tokens,
           the latents repeated over the batch (`repeat(latents, 'n d -> b n d')`; an expand here, so the release's
           extra 128 MB copy is not paid) then norm_context and to_kv per batch row, `(b h) n d` heads,
           F.scaled_dot_product_attention without mask, to_out, residual, GEGLU feed-forward, residual, masked mean
           in float32 (its output is float32, as released), F.normalize. The release's
           torch.autocast("cuda") around NVEmbedModel.forward is not reproduced: all providers run plainly in bf16.
  compile  torch.compile(port_latent_attention, mode=--compile-mode (default), backend=--compile-backend (inductor),
           dynamic=False). A compile failure is recorded in the note column ("unavailable: ..."), not fatal. The
           first call per grad mode (the compilation) is reported in the note.
  nvembed  nvembed.LatentAttentionPooling (its forward: torch.ops.nvembed.latent_pool on the module's parameters),
           on CUDA the ATen implementation (csrc/latent_pool_aten.cpp) with its elementwise stages (LayerNorms,
           softmax, GEGLU + masked mean) on ATen ops (NVEMBED_LATENT_POOL_KERNELS=aten).
  nvembed-fused  the same with those stages on the fused kernels of csrc/cuda/latent_pool.cu
           (NVEMBED_LATENT_POOL_KERNELS=fused; on CPU tensors both run ATen ops).
  nvembed-saved  nvembed whose forward keeps y1 and u = LN_ff(y1) W_in^T for the backward
           (NVEMBED_LATENT_POOL_SAVE_MB=8192; ~1.25 GiB at v2 size in bf16), so the backward skips the attention
           output and the ff_in GEMM of its recomputation. nvembed and nvembed-fused run with
           NVEMBED_LATENT_POOL_SAVE_MB=0 (recompute everything), whatever the op's default is then.
Masks: "all" (every token pooled) and "padded" (right-padded rows of uniform random length in [L/4, L], the first
row full, and the first 16 positions - an instruction - left out of pooling, as encode() builds them). The eager
layer computes every token either way; ours skips the tokens with pool weight 0.

FLOPs (the `gflop` column; the same number for every provider of a configuration): the eager (unfolded) layer with
T = B*L tokens, I = heads*dim_head, F = mult*d, K/V of the latents computed once:
    forward = 2*T*d*I (to_q) + 2*N*d*2I (to_kv) + 2*T*N*I (Q K^T) + 2*T*N*I (P V) + 2*T*I*d (to_out)
              + 2*T*d*2F (ff in) + 2*T*F*d (ff out)
            = 2*T*(2*d*I + 2*N*I + 3*d*F) + 4*N*d*I
    fwd+bwd = 3 * forward   (each GEMM's backward is two GEMMs of its size: input and weight gradients)
LayerNorm, softmax, GELU, the mean and the normalization are not counted. At v2 size: forward 16.77 TFLOP, fwd+bwd
50.30 TFLOP. The released code executes more than it is credited with: to_kv on each of the B repeated latent copies,
4*(B-1)*N*d*I more forward FLOPs (8.52 TFLOP at v2 size). Ours executes fewer: with the projections folded into the
latents and the last feed-forward matrix after the mean it does about 6.1 TFLOP forward / 24 TFLOP fwd+bwd at v2
size (csrc/latent_pool_aten.cpp at the time of writing; the backward recomputes the token activations and runs its
latent-side GEMMs in fp32), so its `tflops` is an effective rate that can exceed the GEMM rate.
`tflops` = gflop / median time; `gemm_tflops` = a cuBLAS bf16 GEMM measured in the same run (torch.matmul of
--gemm-size^3, default 8192^3, median of CUDA-event times); `gemm_fraction` = tflops / gemm_tflops.

Timing: per (mask, mode, provider) --warmup untimed calls (default 3) then --iters timed calls (default 10), each
between two CUDA events (perf_counter on a CPU); the median is `ms` (p20 / p80 beside it). fwd = one forward under
torch.no_grad(); fwd+bwd = torch.autograd.grad(f(hidden_states, mask), [hidden_states, *weights], grad_out).
Memory (CUDA only), measured in one separate call after the timing, with the peak statistics reset and the cache
emptied before it: `peak_mb` = torch.cuda.max_memory_allocated() minus the memory allocated before the call
(weights, inputs, grad_out), so for fwd+bwd it includes the returned gradients (`grads_mb`, the same for every
provider); `saved_mb` (fwd+bwd only) = what one forward with grad enabled keeps alive for the backward (saved
activations + output). `mem_vs_eager` = peak_mb / eager's peak_mb; `act_mb` = peak_mb - grads_mb, the activation
and workspace memory (the returned gradients, which every provider allocates alike, left out) and `act_vs_eager`
its ratio to eager's: the issue's "activation memory" target; speedup_vs_eager / speedup_vs_compile = their
median time / this row's median time (> 1: this row is faster). The note column of the nvembed rows repeats the
issue's targets (fwd+bwd >= 3x eager and >= 2x compile, >= 70% of the GEMM rate, activation memory <= 1/4 of
eager); nothing here judges them.

Agreement, checked before any timing and written to <name>_agreement.csv (relative Frobenius error of the
embeddings and, for fwd+bwd, of each of the 15 gradients - the worst one is named - with the tests' floor for
near-zero references; grad_out random; padded mask):
  small-fp64  ours vs the eager layer, both float64, on a small case (B3 L33 d128 N32 H4x128; --tiny: B2 L9 d32 N8
              H2x32): <= 1e-10 (outputs) / 1e-9 (gradients). The op takes no float64 on CUDA, so a CUDA run does
              this one on CPU tensors through the same ATen implementation (NVEMBED_LATENT_POOL_ATEN=1;
              "small-fp64-cpu-aten").
  small-fp32  ours and eager in float32 vs eager in float64 on the same rounded values: ours <= max(2 x eager's
              error, 1e-5 / 1e-4).
  bench       the benchmark size in its dtype (bf16; --tiny: fp32): eager, compile and ours vs eager in float32
              (--tiny: float64) on the same rounded values: <= max(2 x eager's error, 2e-2) for bf16 (1e-5 / 1e-4
              for fp32). At v2 size the float32 reference peaks near 21 GB above its 2.8 GB of weights (estimated
              on meta tensors): ~25 GB with its kept gradients; --no-bench-check skips it.
A provider that fails its check is not timed ("skipped: ..." in the note). Exit status 1 when ours disagrees,
2 on a usage error, 0 otherwise (also when the compiled provider could not run).

  python bench/gpu_latent_pool.py --out DIR     # DIR/gpu_latent_pool.csv, DIR/gpu_latent_pool_agreement.csv and,
                                                # with matplotlib, DIR/gpu_latent_pool.png
  python bench/gpu_latent_pool.py --tiny --out DIR [--device cpu]
                                                # d=64, N=16, H=2x64, B=2, L=17, fp32: every code path in seconds on
                                                # a CPU (tests/test_bench_gpu_latent_pool.py). On a CPU the compiled
                                                # provider defaults to backend aot_eager (inductor's C++ build of the
                                                # graphs takes minutes on a small machine)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import (describe, env_vars, gpu_environment, pyplot, quantile, save_figure,  # noqa: E402
                    select_device, time_calls, write_csv)

COLUMNS = ["gpu", "torch", "cuda", "commit", "date", "provider", "mode", "mask", "dtype", "batch", "seqlen",
           "pooled_tokens", "d", "latents", "heads", "dim_head", "ff_hidden", "gflop", "ms", "ms_p20", "ms_p80",
           "tflops", "gemm_tflops", "gemm_fraction", "peak_mb", "saved_mb", "grads_mb", "mem_vs_eager",
           "act_mb", "act_vs_eager", "speedup_vs_eager", "speedup_vs_compile", "agreement", "note"]
CHECK_COLUMNS = ["gpu", "torch", "cuda", "commit", "date", "check", "provider", "dtype", "reference_dtype", "batch",
                 "seqlen", "d", "latents", "heads", "dim_head", "out_err", "grad_err", "grad_err_worst", "tol_out",
                 "tol_grad", "status"]
PROVIDERS = ("eager", "compile", "nvembed", "nvembed-fused", "nvembed-saved")
# our providers and the environment each runs under (the op reads it on every call, backward included)
OURS = {"nvembed": {"NVEMBED_LATENT_POOL_KERNELS": "aten", "NVEMBED_LATENT_POOL_SAVE_MB": "0"},
        "nvembed-fused": {"NVEMBED_LATENT_POOL_KERNELS": "fused", "NVEMBED_LATENT_POOL_SAVE_MB": "0"},
        "nvembed-saved": {"NVEMBED_LATENT_POOL_KERNELS": "aten", "NVEMBED_LATENT_POOL_SAVE_MB": "8192"}}
MODES = ("fwd", "fwd+bwd")
MASKS = ("all", "padded")
PREFIX = "latent_attention_model."
INSTRUCTION_TOKENS = 16
# floors of the agreement tolerances (outputs, gradients) per dtype: the tests' TOL, gradients x 10 for fp32 / fp64
TOL_FLOOR = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
TARGETS = ("targets (issue 7): fwd+bwd >= 3x eager and >= 2x compile; >= 70% of the GEMM rate; activation memory "
           "<= 1/4 of eager")


@dataclasses.dataclass
class Shape:
    batch: int
    seqlen: int
    d: int
    latents: int
    heads: int
    dim_head: int
    ff_mult: int = 4

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head

    @property
    def ff_hidden(self) -> int:  # F: ff_in is d -> 2F (GEGLU), ff_out F -> d
        return self.ff_mult * self.d

    def latent_config(self) -> dict:
        """The released latent_attention_config for this shape."""
        return {"model_type": "latent_attention", "num_latents_value": self.latents, "num_cross_heads": self.heads,
                "cross_dim_head": self.dim_head, "latent_dim": self.d, "hidden_dim": self.d, "output_normalize": True}

    def fwd_flops(self) -> float:
        """The eager (unfolded) layer's forward FLOPs, K/V of the latents once (see the module docstring)."""
        T, d, N, I, F = self.batch * self.seqlen, self.d, self.latents, self.inner, self.ff_hidden
        return 2.0 * T * (2 * d * I + 2 * N * I + 3 * d * F) + 4.0 * N * d * I

    def release_extra_kv_flops(self) -> float:
        """Forward FLOPs the released code spends on to_kv of the B - 1 further latent copies (not credited)."""
        return 4.0 * (self.batch - 1) * self.latents * self.d * self.inner

    def label(self) -> str:
        return (f"B{self.batch} L{self.seqlen} d{self.d} N{self.latents} H{self.heads}x{self.dim_head} "
                f"F{self.ff_hidden}")


FULL = Shape(batch=32, seqlen=512, d=4096, latents=512, heads=8, dim_head=4096)
TINY = Shape(batch=2, seqlen=17, d=64, latents=16, heads=2, dim_head=64)
SMALL = Shape(batch=3, seqlen=33, d=128, latents=32, heads=4, dim_head=128)
SMALL_TINY = Shape(batch=2, seqlen=9, d=32, latents=8, heads=2, dim_head=32)


# ---- the layer ---------------------------------------------------------------------------------------------------

def released():
    """tests/released_nvembed.py (the tests' port of the released modeling code)."""
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import released_nvembed

    return released_nvembed


def latent_shapes(shape: Shape) -> dict:
    """The released latent_attention_model.* keys and shapes (NVEMBED_FACTS (b)) for this shape."""
    no_backbone = {"hidden_size": shape.d, "num_attention_heads": 1, "num_key_value_heads": 1,
                   "intermediate_size": 1, "vocab_size": 1, "num_hidden_layers": 0}
    return {k: v for k, v in released().released_shapes(no_backbone, shape.latent_config()).items()
            if k.startswith(PREFIX)}


def random_values(shape: Shape, seed: int, device, dtype) -> dict:
    """Released-key state dict of random weights on a trained layer's scales, drawn on `device` (fast at 0.74B)."""
    return released().random_state_dict(latent_shapes(shape), seed=seed, device=device, dtype=dtype)


class Layer:
    """Our module holding the weights, and the released-key view of the very same parameter tensors that the eager
    and compiled providers read (no second copy of 1.5 GB of weights)."""

    def __init__(self, shape: Shape, values: dict):
        from nvembed import LatentAttentionPooling

        self.shape = shape
        self.cfg = shape.latent_config()
        with torch.device("meta"):
            module = LatentAttentionPooling.from_config(self.cfg)
        module.load_state_dict({k[len(PREFIX):]: v for k, v in values.items()}, strict=True, assign=True)
        self.module = module
        self.sd = {PREFIX + name: p for name, p in module.named_parameters()}
        self.weights = list(module.op_weights())
        self.dtype = self.weights[0].dtype

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)


class Compiled:
    """torch.compile of the released layer, with the duration of the first call per grad mode (the compilation)."""

    def __init__(self, backend: str, mode: str):
        kw = {"backend": backend, "dynamic": False}
        if mode != "default":
            kw["mode"] = mode
        self.first_call_s = {}
        self.desc = f"torch.compile(backend={backend}, mode={mode}, dynamic=False)"
        self.error = None
        try:  # an unknown backend / mode raises here already; reported on the first call, like a compile failure
            self.fn = torch.compile(released().port_latent_attention, **kw)
        except Exception as e:
            self.error = e

    def __call__(self, sd, cfg, hs, mask):
        if self.error is not None:
            raise RuntimeError(f"{self.desc} failed: {_first_line(self.error)}") from self.error
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        if key in self.first_call_s:
            return self.fn(sd, cfg, hs, mask, "sdpa")
        _sync(hs.device)
        t0 = time.perf_counter()
        try:
            out = self.fn(sd, cfg, hs, mask, "sdpa")
        except Exception as e:
            if not _is_oom(e):
                self.error = e  # a compile failure: later calls fail at once instead of compiling again
            raise
        _sync(hs.device)
        self.first_call_s[key] = time.perf_counter() - t0
        return out


@contextlib.contextmanager
def aten_on_cpu():
    """Route the CPU op through the device-generic ATen implementation (the one the CUDA build registers for CUDA
    tensors, csrc/latent_pool_aten.cpp), as tests/test_latent_pool.py's impl_path("aten") does."""
    with env_vars({"NVEMBED_LATENT_POOL_ATEN": "1"}):
        yield


def provider_fn(name: str, layer: Layer, compiled: Optional[Compiled]) -> Callable:
    """f(hidden_states, pool_mask) -> [B, d] embeddings."""
    if name == "eager":
        port = released().port_latent_attention
        return lambda hs, mask: port(layer.sd, layer.cfg, hs, mask, "sdpa")
    if name == "compile":
        return lambda hs, mask: compiled(layer.sd, layer.cfg, hs, mask)
    if name in OURS:
        import nvembed_ext  # noqa: F401  (registers torch.ops.nvembed)

        return layer.module
    raise ValueError(f"unknown provider {name!r}")


def make_mask(kind: str, shape: Shape, gen: torch.Generator, device) -> torch.Tensor:
    """[B, L] int64 pool mask: all ones, or right padding + an instruction prefix left out (encode()'s pool_mask)."""
    B, L = shape.batch, shape.seqlen
    if kind == "all":
        return torch.ones(B, L, dtype=torch.long, device=device)
    instr = min(INSTRUCTION_TOKENS, L // 8)
    lengths = torch.randint(max(L // 4, instr + 2), L + 1, (B,), generator=gen)
    lengths[0] = L
    pos = torch.arange(L)[None, :]
    mask = (pos < lengths[:, None]).long()
    mask[:, :instr] = 0
    return mask.to(device)


def make_inputs(shape: Shape, mask_kind: str, seed: int, device, dtype):
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    hs = torch.randn(shape.batch, shape.seqlen, shape.d, generator=dev_gen, device=device).to(dtype)
    gout = torch.randn(shape.batch, shape.d, generator=dev_gen, device=device)
    return hs.requires_grad_(), make_mask(mask_kind, shape, gen, device), gout


# ---- helpers -----------------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _first_line(e: BaseException) -> str:
    """The exception's type and first three non-empty lines (inductor's first line alone is "backend='inductor'
    raised:"), at most 400 characters; the full traceback goes to the log."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {' | '.join(lines[:3])}"[:400]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius), in the reference's dtype, the denominator floored at 1e-3 sqrt(numel)
    as tests/conftest.py's rel_err does (near-zero gradients)."""
    got, ref = got.detach(), ref.detach()
    floor = 1e-3 * max(ref.numel(), 1) ** 0.5
    return ((got.to(ref.dtype) - ref).norm() / max(ref.norm().item(), floor)).item()


def fwd_bwd(fn: Callable, layer: Layer, hs: torch.Tensor, mask, gout: torch.Tensor):
    """(out, grads of [hidden_states, *weights]) for one provider."""
    out = fn(hs, mask)
    grads = torch.autograd.grad(out, [hs, *layer.weights], gout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


GRAD_NAMES = ("hidden_states", "latents", "norm_weight", "norm_bias", "norm_context_weight", "norm_context_bias",
              "to_q_weight", "to_kv_weight", "to_out_weight", "ff_norm_weight", "ff_norm_bias", "ff_in_weight",
              "ff_in_bias", "ff_out_weight", "ff_out_bias")


# ---- agreement ---------------------------------------------------------------------------------------------------

def agreement(check: str, layer: Layer, wide, providers, device, seed: int, compiled, env) -> list:
    """Rows of the agreement CSV: each provider on `layer` (its dtype) against the eager layer in dtype `wide` on the
    same rounded weights and inputs (padded mask); tolerance max(2 x the eager layer's error in the low dtype, the
    dtype's floor)."""
    shape, low = layer.shape, layer.dtype
    rows = []
    base = {**env, "check": check, "dtype": _dt(low), "reference_dtype": _dt(wide), "batch": shape.batch,
            "seqlen": shape.seqlen, "d": shape.d, "latents": shape.latents, "heads": shape.heads,
            "dim_head": shape.dim_head}
    hs, mask, gout = make_inputs(shape, "padded", seed, device, low)
    try:
        ref_layer = Layer(shape, {k: v.detach().to(wide) for k, v in layer.sd.items()})
        ref_hs = hs.detach().to(wide).requires_grad_()
        ref_out, ref_grads = fwd_bwd(provider_fn("eager", ref_layer, None), ref_layer, ref_hs, mask, gout)
        del ref_layer, ref_hs
    except Exception as e:
        why = ("skipped: reference out of memory" if _is_oom(e) else "skipped: reference failed") + \
              f" ({_first_line(e)})"
        print(f"  check {check:<10} {why}", flush=True)
        _free(device)
        return [{**base, "provider": p, "status": why} for p in providers]
    _free(device)
    tol_out, tol_grad = TOL_FLOOR[low]
    eager_errs = None
    for name in providers:
        row = {**base, "provider": name}
        try:
            with env_vars(OURS.get(name, {})):
                out, grads = fwd_bwd(provider_fn(name, layer, compiled), layer, hs, mask, gout)
        except Exception as e:
            row["status"] = ("skipped: out of memory" if _is_oom(e) else "unavailable") + f": {_first_line(e)}"
            if not _is_oom(e):
                traceback.print_exc(limit=4, file=sys.stdout)
            rows.append(row)
            print(f"  check {check:<10} {name:<13} {row['status']}", flush=True)
            _free(device)
            continue
        out_err = rel_err(out, ref_out)
        gerrs = [rel_err(g, r) for g, r in zip(grads, ref_grads)]
        del out, grads
        grad_err = max(gerrs, key=lambda e: e if e == e else math.inf)  # NaN counts as the worst
        worst = GRAD_NAMES[gerrs.index(grad_err)]
        t_out, t_grad = tol_out, tol_grad
        if name == "eager" and low != wide:
            eager_errs = (out_err, grad_err)
            verdict = "baseline"  # the eager layer in the low dtype is the yardstick, not under test
        else:
            if eager_errs is not None:
                t_out, t_grad = max(t_out, 2 * eager_errs[0]), max(t_grad, 2 * eager_errs[1])
            verdict = "ok" if (out_err <= t_out and grad_err <= t_grad) else "mismatch"  # NaN: mismatch
        row.update({"out_err": f"{out_err:.3e}", "grad_err": f"{grad_err:.3e}", "grad_err_worst": worst,
                    "tol_out": f"{t_out:.1e}", "tol_grad": f"{t_grad:.1e}", "status": verdict})
        rows.append(row)
        print(f"  check {check:<10} {name:<13} {_dt(low)} vs {_dt(wide)} eager: out {out_err:.2e} (tol {t_out:.0e}), "
              f"grads max {grad_err:.2e} [{worst}] (tol {t_grad:.0e}) {verdict}", flush=True)
        _free(device)
    del hs, ref_out, ref_grads
    _free(device)
    return rows


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- timing ------------------------------------------------------------------------------------------------------

def gemm_rate(n: int, dtype, device, warmup: int, iters: int) -> tuple:
    """(TFLOP/s, ms) of torch.matmul on n x n x n in `dtype`: the achievable cuBLAS rate on this device."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: torch.matmul(a, b, out=c), warmup, iters, torch.device(device).type == "cuda")
    ms = statistics.median(times)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12, ms


def measure(fn: Callable, layer: Layer, hs, mask, gout, mode: str, args, device) -> dict:
    leaves = [hs, *layer.weights]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(hs, mask)
    else:
        def call():
            out = fn(hs, mask)
            torch.autograd.grad(out, leaves, gout.to(out.dtype))
    on_cuda = device.type == "cuda"
    times = time_calls(call, args.warmup, args.iters, on_cuda)
    res = {"ms": statistics.median(times), "ms_p20": quantile(times, 0.2), "ms_p80": quantile(times, 0.8)}
    if on_cuda:
        _free(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        res["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if mode == "fwd+bwd":
            alive = [fn(hs, mask)]  # the output and, through its graph, what the backward would need
            torch.cuda.synchronize()
            res["saved_mb"] = (torch.cuda.memory_allocated() - base) / 2**20
            alive.clear()
        _free(device)
    return res


# ---- driver ------------------------------------------------------------------------------------------------------

def run(args, device, on_rows=None) -> tuple:
    """(rows, agreement checks, mismatch); on_rows(rows, checks) after each (mask, mode) group, so a step killed at
    its limit keeps what it measured."""
    env = gpu_environment(device)
    shape, small = (TINY, SMALL_TINY) if args.tiny else (FULL, SMALL)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    on_cuda = device.type == "cuda"
    import nvembed_ext

    print(f"gpu_latent_pool: {describe(env)}, nvembed_ext with_cuda={nvembed_ext.build_info().get('with_cuda')}; "
          f"{'tiny' if args.tiny else 'full'} run, {_dt(dtype)}, warm-up {args.warmup}, timed {args.iters}", flush=True)
    fwd = shape.fwd_flops()
    print(f"  layer {shape.label()}: eager (unfolded) layer {fwd / 1e12:.4g} TFLOP forward, {3 * fwd / 1e12:.4g} "
          f"fwd+bwd (the released code also spends {shape.release_extra_kv_flops() / 1e12:.4g} TFLOP forward on "
          f"to_kv of the repeated latents, not counted)", flush=True)

    gemm_dtype = dtype
    gemm_tflops, gemm_ms = gemm_rate(args.gemm_size, gemm_dtype, device, args.warmup, max(args.iters, 10))
    print(f"  GEMM {args.gemm_size}^3 {_dt(gemm_dtype)} (torch.matmul): {gemm_ms:.3f} ms, {gemm_tflops:.4g} "
          f"TFLOP/s", flush=True)

    compiled = Compiled(args.compile_backend, args.compile_mode) if "compile" in args.providers else None

    # agreement first: a small case in float64 and float32, then the benchmark's own layer (the one timed below)
    seed = args.seed
    if device.type == "cpu":
        small64 = Layer(small, random_values(small, seed, device, torch.float64))
        checks = agreement("small-fp64", small64, torch.float64, ["nvembed"], device, seed, None, env)
    else:
        # the op takes no float64 on CUDA: the same ATen implementation on CPU tensors (NVEMBED_LATENT_POOL_ATEN=1)
        cpu = torch.device("cpu")
        small64 = Layer(small, random_values(small, seed, cpu, torch.float64))
        with aten_on_cpu():
            checks = agreement("small-fp64-cpu-aten", small64, torch.float64, ["nvembed"], cpu, seed, None, env)
    small32 = Layer(small, random_values(small, seed + 1, device, torch.float32))
    ours = [p for p in OURS if p in args.providers] or ["nvembed"]
    checks += agreement("small-fp32", small32, torch.float64, ["eager", *ours], device, seed + 1, None, env)
    del small64, small32
    layer = Layer(shape, random_values(shape, seed + 2, device, dtype))
    if args.bench_check:
        checks += agreement("bench", layer, wide, list(args.providers), device, seed + 2, compiled, env)
    status = {}  # provider -> why it is not timed: a mismatch anywhere, or failing at the benchmark's size / dtype
    for r in checks:
        if r["status"] == "mismatch":
            status[r["provider"]] = f"skipped: disagrees with eager ({r['check']}: out {r['out_err']}, grads " \
                                    f"{r['grad_err']} [{r['grad_err_worst']}])"
        elif r["check"] == "bench" and r["status"].startswith("unavailable") and r["provider"] not in status:
            status[r["provider"]] = r["status"]
    mismatch = any(r["status"] == "mismatch" and r["provider"] in OURS for r in checks)

    def summary(provider):
        mine = [r for r in checks if r["provider"] == provider]
        if not mine:
            return "not checked"
        parts = []
        for r in mine:
            if r.get("out_err"):
                parts.append(f"{r['check']} {r['status']} (out {r['out_err']}, grads {r['grad_err']})")
            else:
                parts.append(f"{r['check']} {r['status']}")
        return "; ".join(parts)

    # the benchmark
    grads_mb = (layer.nbytes() + shape.batch * shape.seqlen * shape.d * torch.finfo(dtype).bits // 8) / 2**20
    rows = [{**env, "provider": "torch.matmul", "mode": "gemm", "dtype": _dt(gemm_dtype), "gflop":
             float(f"{2 * args.gemm_size ** 3 / 1e9:.6g}"), "ms": round(gemm_ms, 4),
             "tflops": float(f"{gemm_tflops:.4g}"), "gemm_tflops": float(f"{gemm_tflops:.4g}"), "gemm_fraction": 1.0,
             "note": f"{args.gemm_size}x{args.gemm_size}x{args.gemm_size} GEMM: the reference rate"}]
    for mask_kind in args.masks:
        hs, mask, gout = make_inputs(shape, mask_kind, seed + 3, device, dtype)
        pooled = int(mask.sum().item())
        for mode in MODES:
            flops = fwd * (3 if mode == "fwd+bwd" else 1)
            group = []
            for name in args.providers:
                row = {**env, "provider": name, "mode": mode, "mask": mask_kind, "dtype": _dt(dtype),
                       "batch": shape.batch, "seqlen": shape.seqlen, "pooled_tokens": pooled, "d": shape.d,
                       "latents": shape.latents, "heads": shape.heads, "dim_head": shape.dim_head,
                       "ff_hidden": shape.ff_hidden, "gflop": float(f"{flops / 1e9:.6g}"),
                       "gemm_tflops": float(f"{gemm_tflops:.4g}"), "agreement": summary(name)}
                notes = []
                if name == "eager":
                    notes.append("tests/released_nvembed.py port_latent_attention(attention='sdpa'); executes "
                                 f"{shape.release_extra_kv_flops() * (3 if mode == 'fwd+bwd' else 1) / 1e9:.6g} "
                                 "GFLOP of per-row to_kv not counted in gflop")
                elif name == "compile":
                    notes.append(compiled.desc)
                else:
                    notes.append("nvembed.LatentAttentionPooling -> torch.ops.nvembed.latent_pool")
                    if mask_kind == "padded":
                        notes.append(f"skips the {shape.batch * shape.seqlen - pooled} unpooled tokens")
                    notes.append(TARGETS)
                if status.get(name):
                    notes.append(status[name])
                else:
                    try:
                        with env_vars(OURS.get(name, {})):
                            res = measure(provider_fn(name, layer, compiled), layer, hs, mask, gout, mode, args,
                                          device)
                    except Exception as e:  # recorded, not fatal: the other providers still run
                        if _is_oom(e):
                            notes.append(f"skipped: out of memory ({_first_line(e)})")
                        else:
                            notes.append("unavailable: " + _first_line(e))
                            traceback.print_exc(limit=6, file=sys.stdout)
                        _free(device)
                    else:
                        row.update({k: round(v, 4) for k, v in res.items()})
                        row["tflops"] = float(f"{flops / (res['ms'] * 1e-3) / 1e12:.4g}")
                        row["gemm_fraction"] = round(row["tflops"] / gemm_tflops, 3)
                        if on_cuda:
                            row["grads_mb"] = round(grads_mb, 1) if mode == "fwd+bwd" else 0.0
                    if name == "compile" and compiled.first_call_s:
                        key = "grad" if mode == "fwd+bwd" else "no_grad"
                        if key in compiled.first_call_s:
                            notes.append(f"first call (compilation) {compiled.first_call_s[key]:.1f} s")
                row["note"] = "; ".join(notes)
                group.append(row)
                shown = (f"{row['ms']:10.3f} ms {row['tflops']:9.2f} TFLOP/s ({row['gemm_fraction']:.0%} of GEMM)"
                         + (f" peak {row['peak_mb']:9.1f} MiB" if "peak_mb" in row else "")
                         if "ms" in row else row["note"])
                print(f"  {mask_kind:<6} {mode:<7} {name:<13} {shown}", flush=True)
            by = {r["provider"]: r for r in group}
            for r in group:
                if "ms" not in r:
                    continue
                for anchor, col in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
                    if "ms" in by.get(anchor, {}):
                        r[col] = round(by[anchor]["ms"] / r["ms"], 3)
                if "peak_mb" in r and by.get("eager", {}).get("peak_mb"):
                    r["mem_vs_eager"] = round(r["peak_mb"] / by["eager"]["peak_mb"], 3)
                if "peak_mb" in r:
                    r["act_mb"] = round(r["peak_mb"] - float(r.get("grads_mb") or 0.0), 1)
                    eager_act = by.get("eager", {}).get("act_mb")
                    if eager_act:
                        r["act_vs_eager"] = round(r["act_mb"] / eager_act, 3)
            for p in OURS:
                r = by.get(p, {})
                if "ms" in r:
                    print(f"  {mask_kind:<6} {mode:<7} {p}: {r.get('speedup_vs_eager', '-')}x eager, "
                          f"{r.get('speedup_vs_compile', '-')}x compile, {r['gemm_fraction']:.0%} of the GEMM "
                          f"rate, memory {r.get('mem_vs_eager', '-')} of eager", flush=True)
            rows += group
            if on_rows is not None:
                on_rows(rows, checks)
        del hs, mask, gout
        _free(device)
    return rows, checks, mismatch


def plot(rows: list, path: str, tiny: bool) -> None:
    plt = pyplot()
    if plt is None:
        return
    timed = [r for r in rows if r.get("mode") in MODES and r.get("ms", "") != ""]
    if not timed:
        print("no timed rows: no PNG")
        return
    groups = [(mask, mode) for mask in MASKS for mode in MODES
              if any(r["mask"] == mask and r["mode"] == mode for r in timed)]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in timed)]
    metrics = [("ms", "median time (ms)"), ("tflops", "TFLOP/s (eager layer FLOPs / time)"),
               ("peak_mb", "peak memory above weights + inputs (MiB)")]
    if not any(r.get("peak_mb", "") != "" for r in timed):
        metrics = metrics[:2]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, (key, title) in zip(axes[0], metrics):
        for i, p in enumerate(providers):
            vals = []
            for mask, mode in groups:
                match = [r for r in timed if r["provider"] == p and r["mask"] == mask and r["mode"] == mode]
                vals.append(float(match[0][key]) if match and match[0].get(key, "") != "" else 0.0)
            ax.bar([g + i * width for g in range(len(groups))], vals, width, label=p)
        if key == "tflops":
            gemm = float(timed[0]["gemm_tflops"])
            ax.axhline(gemm, color="k", linestyle="--", linewidth=1, label=f"GEMM {gemm:.3g}")
            ax.axhline(0.7 * gemm, color="grey", linestyle=":", linewidth=1, label="70% of GEMM")
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{mode}\nmask={mask}" for mask, mode in groups])
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    r0 = timed[0]
    size = "tiny" if tiny else "NV-Embed-v2 size"
    fig.suptitle(f"latent_pool {size} (B{r0['batch']} L{r0['seqlen']} d{r0['d']} N{r0['latents']} "
                 f"H{r0['heads']}x{r0['dim_head']}, {r0['dtype']}) - {describe(r0)}", fontsize=9)
    save_figure(fig, path)


def parse_args(argv=None):
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for gpu_latent_pool[_tiny].csv / .png")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes in fp32 (seconds; runs on the CPU too)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu (--tiny only)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3; --tiny 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default 10; --tiny 3)")
    ap.add_argument("--providers", type=names, default=list(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    ap.add_argument("--masks", type=names, default=list(MASKS), help=f"subset of {','.join(MASKS)}")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor; --tiny on a CPU: aot_eager)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default: default)")
    ap.add_argument("--gemm-size", type=int, default=None,
                    help="n of the n^3 reference GEMM (default 8192; --tiny 256)")
    ap.add_argument("--no-bench-check", dest="bench_check", action="store_false",
                    help="skip the agreement check at the benchmark size (its float32 reference needs ~25 GB)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for key, full, tiny in (("warmup", 3, 1), ("iters", 10, 3), ("gemm_size", 8192, 256)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.iters < 1 or args.warmup < 0 or args.gemm_size < 1:
        ap.error("--iters and --gemm-size must be >= 1, --warmup >= 0")
    for key, allowed in (("providers", PROVIDERS), ("masks", MASKS)):
        bad = [x for x in getattr(args, key) if x not in allowed]
        if bad or not getattr(args, key):
            ap.error(f"--{key} must name some of {','.join(allowed)}, got {','.join(getattr(args, key))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    device = select_device("gpu_latent_pool", args.device, args.tiny, "the NV-Embed-v2-sized run")
    if device is None:
        return 2
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if (args.tiny and device.type == "cpu") else "inductor"
    os.makedirs(args.out, exist_ok=True)
    name = "gpu_latent_pool_tiny" if args.tiny else "gpu_latent_pool"
    csv_path = os.path.join(args.out, f"{name}.csv")
    check_path = os.path.join(args.out, f"{name}_agreement.csv")

    def write(rows, checks):
        write_csv(csv_path, rows, COLUMNS)
        write_csv(check_path, checks, CHECK_COLUMNS)
    rows, checks, mismatch = run(args, device, on_rows=write)
    write(rows, checks)
    print(f"wrote {csv_path} ({len(rows)} rows) and {check_path} ({len(checks)} rows)")
    plot(rows, os.path.join(args.out, f"{name}.png"), args.tiny)
    if mismatch:
        print("gpu_latent_pool: nvembed disagrees with the eager layer (see the agreement CSV)")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
