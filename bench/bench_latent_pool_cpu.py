"""CPU benchmark: torch.ops.nvembed.latent_pool vs the eager reference (nvembed_ext.reference.latent_pool_ref),
forward and forward+backward (gradients for hidden_states and every weight), float32, side by side in one run.

    PYTHONPATH=$PWD:$PWD/python pytest -q bench/bench_latent_pool_cpu.py

Rows go to the session CSV written by bench/conftest.py (speedup of the op over the eager layer). In fwdbwd the op
runs twice: as it picks by default (variant "nvembed": its forward keeps y1 and u, see csrc/cpu/latent_pool.h) and
with NVEMBED_LATENT_POOL_SAVE_MB=0 ("nvembed-recompute": the backward recomputes every activation). Configs:
  * minilm:         d=384, 512 latents, 8 heads x dim_head 48, F=4d   (a MiniLM-sized backbone; plain path)
  * nvembed_scaled: d=256, 64 latents, 8 heads x dim_head=d, F=4d     (the release's shape, scaled down; folded)
both with B=8, L=128. Masks: "padded" = right padding to lengths uniform in [L/4, L] with the first 8 positions
(the instruction) excluded from pooling, as NV-Embed's encode() builds pool_mask; "all" = pool_mask None.
"""

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
IMPLS = {"op": torch.ops.nvembed.latent_pool, "op-recompute": torch.ops.nvembed.latent_pool, "ref": latent_pool_ref}
VARIANTS = {"op": "nvembed", "op-recompute": "nvembed-recompute", "ref": "eager"}
ROUNDS, WARMUP = 9, 1


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


# (the forward is the same with or without saved activations: no recompute variant there)
@pytest.mark.parametrize("mode,impl", [(m, i) for m in MODES for i in IMPLS if (m, i) != ("fwd", "op-recompute")])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_latent_pool_cpu(benchmark, monkeypatch, config, mask_kind, mode, impl):
    if impl == "op-recompute":
        monkeypatch.setenv("NVEMBED_LATENT_POOL_SAVE_MB", "0")
    else:
        monkeypatch.delenv("NVEMBED_LATENT_POOL_SAVE_MB", raising=False)
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

    B, L, d, N, H, dh, F_ = CONFIGS[config]
    benchmark.group = f"latent_pool {mode} fp32 {config} (B{B} L{L} d{d} N{N} H{H}x{dh} F{F_}) mask={mask_kind}"
    benchmark.extra_info.update(variant=VARIANTS[impl], anchor="eager",
                                active_tokens=int(mask.sum()) if mask is not None else B * L)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
