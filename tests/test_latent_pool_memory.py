"""Peak memory of nvembed::latent_pool's ATen implementation (csrc/latent_pool_aten.cpp, the CUDA path; here on CPU
tensors through NVEMBED_LATENT_POOL_ATEN=1): fwd + bwd in bfloat16 on the folded path, measured with the
profiler's allocation events, must stay under `model_peak_bytes`, a sum of the tensors the implementation keeps alive
at its two high-water marks. `python tests/test_latent_pool_memory.py` prints the model at NV-Embed-v2 size (an
estimate, not a measurement) and model vs measured at the test shapes."""
import os
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import nvembed_ext  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_latent_pool import fold_path, impl_path, make_mask, make_weights  # noqa: E402

MiB = 2 ** 20
# latent_pool_aten.cpp's chunking constants
CHUNK_ELEMS, MIN_ROWS, MAX_CHUNK = 64 * MiB, 1024, 4096


def fold_is_cheaper(T, d, N, H, dh):
    """cpu::latent_pool::fold_is_cheaper (csrc/cpu/latent_pool.h)."""
    inner = H * dh
    return T * 2.0 * H * N * d + 2.0 * N * inner * d < T * (2.0 * inner * d + 2.0 * N * inner)


def model_peak_bytes(B, L, d, N, H, dh, F, T, io=2, fold=True):
    """Bytes above weights + inputs that fwd + bwd holds at its peak, with io = bytes of the input dtype (2: bf16 /
    fp16) and fp32 accumulation; T = active tokens. The backward dominates; its high-water marks:

    loop (per chunk of t tokens, t = min(T, clamp(64 Mi / max(2F, I, H*N), 1024, 4096))):
        kept all along: K / V of the latents (io, 2 N I), the folded Kx / Cx (io, 2 H*N d), dx (io, B L d), the fp32
        accumulators d_ff_in_w [2F, d] and d_Kx / d_Cx [H*N, d] (plain path: d_wq, d_wo [I, d], dK, dV [N, I]), the
        chunk's fp32 token rows x, xn, y1, z, dy1 [t, d] and p, its softmax-backward [t, H*N] (plain: q, o, dq [t, I]),
        plus the larger of
          GEGLU backward: u [t, 2F] fp32 with gelu(gate) and dg, [t, F] fp32 each = 2 x [t, 2F] fp32;
          d_ff_in_w += du^T z: du [t, 2F] io and one row block of the GEMM output, io, plus its fp32 copy where the
          mixed-dtype add_ makes one (CPU; CUDA casts on the fly), rows = min(2F, max(1024, 64 Mi / d)).
    end: the returned gradients (io, the size of all inputs), K / V, and dK, dV plus their [N, 2I] concatenation.
    Small terms: LN(latents) and the latents in fp32 (2 N d), the active-token index / batch / weight (20 T)."""
    inner, hn = H * dh, H * N
    t = min(T, max(MIN_ROWS, min(MAX_CHUNK, CHUNK_ELEMS // max(2 * F, inner, hn))))
    grads = io * (B * L * d + N * d + 6 * d + 4 * inner * d + 2 * F * d + 2 * F + d * F + d)
    setup = io * 2 * N * inner + 4 * 2 * N * d + 20 * T
    if fold:
        kept = io * 2 * hn * d + 4 * 2 * hn * d
        rows = 4 * t * (5 * d + 2 * hn)
    else:
        kept = 4 * (2 * inner * d + 2 * N * inner)
        rows = 4 * t * (5 * d + 2 * hn + 3 * inner)
    block = min(2 * F, max(MIN_ROWS, CHUNK_ELEMS // d))
    ff = max(4 * 2 * t * 2 * F, io * t * 2 * F + (io + 4) * block * d)
    loop = setup + kept + io * B * L * d + 4 * 2 * F * d + rows + ff
    end = grads + setup + io * 2 * 2 * N * inner
    return max(loop, end)


def measure_peak_bytes(B, L, d, N, H, dh, F, mask_kind="random", dtype=torch.bfloat16):
    """Peak of the bytes allocated during one fwd + bwd (weights, inputs and grad_out allocated before), from the
    profiler's allocation / free events summed in time order. Returns (peak, T, bytes of the returned gradients)."""
    gen = torch.Generator().manual_seed(0)
    weights = [w.to(dtype).requires_grad_() for w in make_weights(d, N, H, dh, F, gen=gen)]
    hs = torch.randn(B, L, d, generator=gen).to(dtype).requires_grad_()
    mask = make_mask(mask_kind, B, L, gen)
    go = torch.randn(B, d, generator=gen).to(dtype)
    T = B * L if mask is None else int(mask.sum())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = torch.ops.nvembed.latent_pool(hs, mask, *weights, H, True, 1e-5)
        grads = torch.autograd.grad(out, [hs, *weights], go)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU)
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak, T, sum(g.numel() * g.element_size() for g in grads)


SHAPES = [  # B, L, d, N, H, dh, F
    (4, 256, 256, 64, 4, 256, 1024),    # dim_head = d as in the release, one chunk
    (4, 1024, 128, 32, 4, 128, 8192),   # 2F = 16384: chunks of 2048 + 839 tokens (the fixed 4096 took all 2887)
    (2, 64, 256, 64, 8, 256, 1024),     # few tokens, big I: the end (returned gradients) is the peak
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}d{}N{}H{}dh{}F{}".format(*s))
def test_aten_fwd_bwd_peak_bf16(shape):
    B, L, d, N, H, dh, F = shape
    with impl_path("aten"), fold_path(None):
        peak, T, grad_bytes = measure_peak_bytes(*shape)
    assert fold_is_cheaper(T, d, N, H, dh)
    # the gradients are allocated inside the profiled region: an empty or partial event stream fails here
    assert peak >= grad_bytes > 0
    bound = model_peak_bytes(B, L, d, N, H, dh, F, T) * 1.05
    assert peak <= bound, f"peak {peak / MiB:.2f} MiB > bound {bound / MiB:.2f} MiB (T = {T})"


def saved_bytes(B, L, d, F, io=2, cuda=False):
    """What _latent_pool_fwd_save keeps from the forward to the backward: geglu_mean [B, F] and resid [B*L, d] in fp32,
    ff_hidden [B*L, 2F] in the dtype of its GEMM on CUDA (io), in fp32 on CPU tensors (latent_pool_saved_empty)."""
    return 4 * (B * F + B * L * d) + (io if cuda else 4) * B * L * 2 * F


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}d{}N{}H{}dh{}F{}".format(*s))
def test_aten_saved_fwd_bwd_peak_bf16(shape):
    """With saved activations the ATen path holds them from the forward to the end of the backward and otherwise
    what the recomputing path holds (the copy of a chunk's saved u takes the place of the ff_in GEMM's output)."""
    B, L, d, N, H, dh, F = shape
    with impl_path("aten-saved"), fold_path(None):
        peak, T, grad_bytes = measure_peak_bytes(*shape)
    assert peak >= grad_bytes + saved_bytes(B, L, d, F) > 0  # the saved path ran (its buffers are in the peak)
    bound = model_peak_bytes(B, L, d, N, H, dh, F, T) * 1.05 + saved_bytes(B, L, d, F)
    assert peak <= bound, f"peak {peak / MiB:.2f} MiB > bound {bound / MiB:.2f} MiB (T = {T})"


def test_kernel_saved_peak_adds_only_the_activations():
    """The CPU kernel (nvembed's default on CPU): keeping y1 and u costs their bytes and nothing more. In particular
    autograd hands the backward no zero-filled gradients for the saved outputs (they are marked non-differentiable;
    a materialized zero gradient of ff_hidden alone would be as large as ff_hidden)."""
    shape = (4, 512, 128, 32, 4, 128, 2048)
    B, L, d, N, H, dh, F = shape
    with impl_path("kernel"):
        recompute, _, _ = measure_peak_bytes(*shape)
    with impl_path("saved"):
        saved, _, _ = measure_peak_bytes(*shape)
    extra = saved_bytes(B, L, d, F)
    assert extra <= saved - recompute <= extra * 1.05, (saved / MiB, recompute / MiB, extra / MiB)


def test_aten_fwd_bwd_peak_bf16_plain():
    B, L, d, N, H, dh, F = 2, 128, 64, 8, 8, 64, 4096  # forced plain path: q, o [t, I] per chunk
    with impl_path("aten"), fold_path("0"):
        peak, T, grad_bytes = measure_peak_bytes(B, L, d, N, H, dh, F)
    assert peak >= grad_bytes > 0
    bound = model_peak_bytes(B, L, d, N, H, dh, F, T, fold=False) * 1.05
    assert peak <= bound, f"peak {peak / MiB:.2f} MiB > bound {bound / MiB:.2f} MiB (T = {T})"


if __name__ == "__main__":
    v2 = (32, 512, 4096, 512, 8, 4096, 16384)
    print(f"NV-Embed-v2 size {v2}, all tokens, bf16: model (estimate) "
          f"{model_peak_bytes(*v2, T=32 * 512) / MiB:.0f} MiB above weights + inputs; with saved activations on "
          f"CUDA + {saved_bytes(32, 512, 4096, 16384, cuda=True) / MiB:.0f} MiB")
    with impl_path("aten"), fold_path(None):
        for shape in SHAPES:
            peak, T, _ = measure_peak_bytes(*shape)
            m = model_peak_bytes(*shape, T=T)
            print(f"{shape} T={T}: measured {peak / MiB:.2f} MiB, model {m / MiB:.2f} MiB ({peak / m:.3f})")
