"""nvembed::latent_pool (CPU): against the fp64 reference, a port of the released layer, opcheck, gradcheck,
torch.compile, the module's state-dict layout, and argument checks."""
import os
import zlib
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nvembed
import nvembed_ext  # noqa: F401
from nvembed_ext.reference import latent_pool_ref

OP = torch.ops.nvembed.latent_pool
WEIGHT_NAMES = ("latents", "norm_weight", "norm_bias", "norm_context_weight", "norm_context_bias", "to_q_weight",
                "to_kv_weight", "to_out_weight", "ff_norm_weight", "ff_norm_bias", "ff_in_weight", "ff_in_bias",
                "ff_out_weight", "ff_out_bias")
# relative error (Frobenius) of the op in each dtype against the fp64 reference
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ---- a port of NV-Embed-v2's released layer (modeling_nvembed.py; einops replaced by reshape) ------------------
def exists(val):
    return val is not None


def default(val, d):
    return val if exists(val) else d


class GEGLU(nn.Module):
    def forward(self, x):
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class PreNorm(nn.Module):
    def __init__(self, dim, fn, context_dim=None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if exists(context_dim) else None

    def forward(self, x, **kwargs):
        x = self.norm(x)
        if exists(self.norm_context):
            context = kwargs["context"]
            normed_context = self.norm_context(context)
            kwargs.update(context=normed_context)
        return self.fn(x, **kwargs)


class Attention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim, bias=False)

    def forward(self, x, context=None, mask=None):
        h = self.heads
        q = self.to_q(x)
        context = default(context, x)
        k, v = self.to_kv(context).chunk(2, dim=-1)

        def split(t):  # rearrange 'b n (h d) -> (b h) n d'
            b, n, hd = t.shape
            return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)

        q, k, v = map(split, (q, k, v))
        # (the release wraps this in torch.backends.cuda.sdp_kernel(...), which only matters on CUDA)
        out = F.scaled_dot_product_attention(q, k, v)
        bh, n, dh = out.shape  # rearrange '(b h) n d -> b n (h d)'
        out = out.reshape(bh // h, h, n, dh).permute(0, 2, 1, 3).reshape(bh // h, n, h * dh)
        return self.to_out(out)


class LatentAttentionModel(nn.Module):
    def __init__(self, num_latents_value=512, num_cross_heads=8, output_normalize=True, hidden_dim=4096,
                 latent_dim=4096, cross_dim_head=4096):
        super().__init__()
        self.cross_attend_blocks = nn.ModuleList([
            PreNorm(latent_dim, Attention(latent_dim, hidden_dim, heads=num_cross_heads, dim_head=cross_dim_head),
                    context_dim=hidden_dim),
            PreNorm(latent_dim, FeedForward(latent_dim)),
        ])
        self.output_normalize = output_normalize
        self.register_parameter("latents", torch.nn.Parameter(torch.randn(num_latents_value, latent_dim)))

    def forward(self, hiddens, attention_mask=None):
        cross_attn, cross_ff = self.cross_attend_blocks
        b, *_, device = *hiddens.shape, hiddens.device
        x = self.latents.unsqueeze(0).expand(b, -1, -1)  # repeat(self.latents, 'n d -> b n d', b=b)
        hiddens = cross_attn(hiddens, context=x, mask=None) + hiddens
        hiddens = cross_ff(hiddens) + hiddens
        if attention_mask is not None:
            s = torch.sum(hiddens * attention_mask.unsqueeze(-1).float(), dim=1)
            d = attention_mask.sum(dim=1, keepdim=True).float()
            hiddens = s / d
            if self.output_normalize:
                hiddens = torch.nn.functional.normalize(hiddens, p=2, dim=-1)
        return hiddens


# ---- helpers ------------------------------------------------------------------------------------------------
@contextmanager
def _env(name, value):
    """Set (or, with None, unset) environment variable `name` for the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def fold_path(value):
    """Force the kernel's folded (\"1\") or plain (\"0\") attention path; None = its cost model."""
    return _env("NVEMBED_LATENT_POOL_FOLD", value)


@contextmanager
def impl_path(impl):
    """Run the op through the CPU kernel or through the device-generic ATen implementation that the CUDA build
    registers for CUDA tensors (csrc/latent_pool_aten.cpp), on CPU tensors, each with a backward that recomputes
    every activation ("kernel", "aten") or reads those its forward kept ("saved", "aten-saved":
    _latent_pool_fwd_save / _latent_pool_bwd_saved, picked when gradients are needed and the activations fit
    NVEMBED_LATENT_POOL_SAVE_MB; by default the CPU kernel keeps them and the ATen path does not)."""
    aten = impl.startswith("aten")
    save = {"kernel": "0", "saved": None, "aten": None, "aten-saved": "1024"}[impl]
    with _env("NVEMBED_LATENT_POOL_ATEN", "1" if aten else "0"), _env("NVEMBED_LATENT_POOL_SAVE_MB", save):
        yield


IMPLS = ["kernel", "saved", "aten", "aten-saved"]


def make_weights(d, N, H, dh, F_, dtype=torch.float64, gen=None):
    """Random weights on the scales a trained layer has (LayerNorm weights near 1, Linear ~ 1/sqrt(fan_in))."""
    inner = H * dh

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, dtype=torch.float64, generator=gen) * scale + shift

    w = [r(N, d), r(d, scale=0.2, shift=1.0), r(d, scale=0.2), r(d, scale=0.2, shift=1.0), r(d, scale=0.2),
         r(inner, d, scale=d ** -0.5), r(2 * inner, d, scale=d ** -0.5), r(d, inner, scale=inner ** -0.5),
         r(d, scale=0.2, shift=1.0), r(d, scale=0.2), r(2 * F_, d, scale=d ** -0.5), r(2 * F_, scale=0.2),
         r(d, F_, scale=F_ ** -0.5), r(d, scale=0.2)]
    return [t.to(dtype) for t in w]


def make_mask(kind, B, L, gen=None):
    if kind == "none":
        return None
    m = torch.rand(B, L, generator=gen) < 0.7
    m[:, 0] = True  # every row has a token ...
    if kind == "zero_row":
        m[B // 2] = False  # ... except this one
    return m


def rel_err(a, b):
    a, b = a.double(), b.double()
    nb = b.norm()
    if nb == 0:
        return a.abs().max().item()
    return ((a - b).norm() / nb).item()


def run_with_grads(fn, hs, mask, weights, H, normalize, grad_out_seed=0):
    hs = hs.detach().clone().requires_grad_()
    weights = [w.detach().clone().requires_grad_() for w in weights]
    out = fn(hs, mask, *weights, H, normalize, 1e-5)
    go = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_out_seed))
    grads = torch.autograd.grad(out, [hs, *weights], go.to(device=out.device, dtype=out.dtype))
    return out, grads


# ---- the op against the fp64 reference -------------------------------------------------------------------------
SHAPES = [  # B, L, d, N, H, dh, F
    (1, 1, 16, 1, 1, 16, 64),
    (3, 17, 16, 7, 4, 8, 64),
    (2, 33, 32, 7, 4, 32, 128),  # dim_head = d as in the release
    (4, 9, 32, 5, 1, 24, 48),    # dim_head != d, F != 4d
    (2, 70, 24, 9, 4, 6, 96),    # tokens split over threads
    (3, 401, 16, 5, 2, 8, 32),   # several blocks per thread
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}d{}N{}H{}dh{}F{}".format(*s))
@pytest.mark.parametrize("mask_kind", ["none", "random", "zero_row"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("path", ["0", "1"], ids=["plain", "folded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(shape, mask_kind, normalize, path, dtype, impl):
    B, L, d, N, H, dh, F_ = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, mask_kind, normalize, path)).encode()))
    weights = make_weights(d, N, H, dh, F_, dtype=dtype, gen=gen)
    hs = torch.randn(B, L, d, generator=gen).to(dtype)
    mask = make_mask(mask_kind, B, L, gen)
    ref, ref_grads = run_with_grads(latent_pool_ref, hs.double(), mask, [w.double() for w in weights], H,
                                    normalize)
    with fold_path(path), impl_path(impl):
        out, grads = run_with_grads(OP, hs, mask, weights, H, normalize)
    assert out.dtype == dtype and out.shape == (B, d)
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol, ("out", rel_err(out, ref))
    for name, g, rg in zip(("hidden_states",) + WEIGHT_NAMES, grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, rg) <= tol, (name, rel_err(g, rg))
    if mask_kind == "zero_row":
        assert torch.equal(out[B // 2], torch.zeros_like(out[B // 2]))
        assert torch.equal(grads[0][B // 2], torch.zeros_like(grads[0][B // 2]))
    if mask is not None:  # tokens outside the pool mask get exactly zero gradient
        assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_weights_summing_to_zero(impl):
    """A row whose pool weights cancel (1 and -1) still pools tokens: its gradients are the reference's, not the
    zeros of a row without pooled tokens (the ATen path once keyed that on the weight sum)."""
    B, L, d, N, H, dh, F_ = 2, 4, 16, 5, 2, 8, 64
    gen = torch.Generator().manual_seed(5)
    weights = make_weights(d, N, H, dh, F_, gen=gen)
    hs = torch.randn(B, L, d, dtype=torch.float64, generator=gen)
    mask = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.5, 0.5, 1.0, 0.0]], dtype=torch.float64)
    ref, ref_grads = run_with_grads(latent_pool_ref, hs, mask, weights, H, True)
    with impl_path(impl):
        out, grads = run_with_grads(OP, hs, mask, weights, H, True)
    assert rel_err(out, ref) <= 1e-10
    assert grads[0][0].abs().max() > 0
    for name, g, rg in zip(("hidden_states",) + WEIGHT_NAMES, grads, ref_grads):
        assert rel_err(g, rg) <= 1e-9, name


def test_masked_mean_error_does_not_grow_with_length():
    """With the attention output and feed-forward projections zero the layer passes tokens through, so the output is
    the masked mean of the hidden states: in fp32 over 32768 tokens it stays at fp32 rounding (the token-by-token
    fp32 sum it replaced was 2.6e-6 off, ~40x PyTorch's mean)."""
    B, L, d, N, H, dh, F_ = 1, 32768, 16, 4, 2, 8, 32
    gen = torch.Generator().manual_seed(7)
    w = make_weights(d, N, H, dh, F_, dtype=torch.float32, gen=gen)
    w[7].zero_(), w[12].zero_(), w[13].zero_()  # to_out_weight, ff_out_weight, ff_out_bias
    hs = 10 + torch.randn(B, L, d, generator=gen)
    for impl in ("kernel", "saved"):
        with impl_path(impl):
            out = OP(hs, None, *w, H, False, 1e-5)
        exact = hs.double().mean(1)
        assert rel_err(out, exact) <= 2e-7, (impl, rel_err(out, exact))


def test_pool_mask_requiring_grad_is_an_error():
    """The op gives no gradient for pool_mask: a mask that asks for one is refused, not silently left at None."""
    B, L, d, N, H, dh, F_ = 2, 4, 16, 5, 2, 8, 64
    weights = make_weights(d, N, H, dh, F_, dtype=torch.float32)
    hs = torch.randn(B, L, d, requires_grad=True)
    mask = torch.rand(B, L, requires_grad=True)
    with pytest.raises(RuntimeError, match="nvembed::latent_pool: pool_mask requires grad"):
        OP(hs, mask, *weights, H, True, 1e-5)
    OP(hs, mask.detach(), *weights, H, True, 1e-5).sum().backward()
    assert hs.grad is not None


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32, torch.float64])
def test_mask_dtypes(mask_dtype):
    B, L, d, N, H, dh, F_ = 3, 11, 16, 5, 2, 8, 64
    weights = make_weights(d, N, H, dh, F_)
    hs = torch.randn(B, L, d, dtype=torch.float64)
    mask = make_mask("zero_row", B, L)
    ref = latent_pool_ref(hs, mask, *weights, H)
    out = OP(hs, mask.to(mask_dtype), *weights, H)
    assert rel_err(out, ref) <= 1e-12


def test_cost_model_path_and_defaults():
    """No override: the cost model picks a path; defaults normalize=True, eps=1e-5 match the reference."""
    for (d, N, H, dh) in [(32, 16, 4, 32), (32, 64, 8, 4)]:  # folded / plain expected
        weights = make_weights(d, N, H, dh, 4 * d)
        hs = torch.randn(2, 10, d, dtype=torch.float64)
        with fold_path(None):
            out = OP(hs, None, *weights, H)
        assert rel_err(out, latent_pool_ref(hs, None, *weights, H)) <= 1e-12


# ---- the released layer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cfg", [dict(num_latents_value=16, num_cross_heads=4, cross_dim_head=32, latent_dim=32,
                                      hidden_dim=32, output_normalize=True),
                                 dict(num_latents_value=7, num_cross_heads=2, cross_dim_head=12, latent_dim=24,
                                      hidden_dim=24, output_normalize=False)], ids=["dh=d", "dh!=d"])
def test_matches_released_layer(cfg, dtype):
    torch.manual_seed(1)
    module = nvembed.LatentAttentionPooling.from_config(cfg).to(dtype)
    with torch.no_grad():  # move LayerNorms off their trivial init so their gradients are tested too
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    release = LatentAttentionModel(**cfg).to(dtype)
    release.load_state_dict(module.state_dict())
    B, L, d = 3, 13, cfg["hidden_dim"]
    hs = torch.randn(B, L, d, dtype=dtype)
    mask = make_mask("random", B, L).long()
    hs1 = hs.clone().requires_grad_()
    hs2 = hs.clone().requires_grad_()
    ours = module(hs1, mask)
    theirs = release(hs2, mask)
    tol = TOL[dtype]
    assert rel_err(ours, theirs.double()) <= tol
    go = torch.randn_like(ours)
    (ours * go).sum().backward()
    (theirs * go).sum().backward()
    assert rel_err(hs1.grad, hs2.grad) <= tol * 10
    theirs_params = dict(release.named_parameters())
    for name, p in module.named_parameters():
        assert rel_err(p.grad, theirs_params[name].grad) <= tol * 10, name


RELEASE_SHAPES = {  # NVEMBED_FACTS.md (b), v2, prefix latent_attention_model. stripped, in state_dict order
    "latents": (512, 4096),
    "cross_attend_blocks.0.fn.to_q.weight": (32768, 4096),
    "cross_attend_blocks.0.fn.to_kv.weight": (65536, 4096),
    "cross_attend_blocks.0.fn.to_out.weight": (4096, 32768),
    "cross_attend_blocks.0.norm.weight": (4096,),
    "cross_attend_blocks.0.norm.bias": (4096,),
    "cross_attend_blocks.0.norm_context.weight": (4096,),
    "cross_attend_blocks.0.norm_context.bias": (4096,),
    "cross_attend_blocks.1.fn.net.0.weight": (32768, 4096),
    "cross_attend_blocks.1.fn.net.0.bias": (32768,),
    "cross_attend_blocks.1.fn.net.2.weight": (4096, 16384),
    "cross_attend_blocks.1.fn.net.2.bias": (4096,),
    "cross_attend_blocks.1.norm.weight": (4096,),
    "cross_attend_blocks.1.norm.bias": (4096,),
}


def test_state_dict_layout_matches_release():
    with torch.device("meta"):
        ours = nvembed.LatentAttentionPooling()
        theirs = LatentAttentionModel()
    sd = ours.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == list(RELEASE_SHAPES.items())
    assert [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()] == list(RELEASE_SHAPES.items())


def test_loads_release_state_dict():
    cfg = dict(num_latents_value=8, num_cross_heads=2, cross_dim_head=16, latent_dim=16, hidden_dim=16,
               output_normalize=True)
    release = LatentAttentionModel(**cfg).double()
    full = {"latent_attention_model." + k: v for k, v in release.state_dict().items()}
    stripped = {k[len("latent_attention_model."):]: v for k, v in full.items()}
    module = nvembed.LatentAttentionPooling.from_config(cfg).double()
    module.load_state_dict(stripped, strict=True)
    hs = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.long)
    assert rel_err(module(hs, mask), release(hs, mask)) <= 1e-12
    # pool_mask None pools all tokens (the release would return per-token states instead)
    assert rel_err(module(hs), release(hs, mask)) <= 1e-12


def test_module_init_and_config():
    m = nvembed.LatentAttentionPooling(hidden_dim=16, num_latents=4, num_heads=2, dim_head=8)
    assert m.cross_attend_blocks[0].norm.weight.eq(1).all() and m.cross_attend_blocks[0].norm.bias.eq(0).all()
    assert m.latents.shape == (4, 16) and m.latents.std() > 0.3  # randn, like the release
    assert m.cross_attend_blocks[1].fn.net[0].bias is not None and m.cross_attend_blocks[0].fn.to_q.bias is None
    with pytest.raises(ValueError, match="latent_dim"):
        nvembed.LatentAttentionPooling.from_config(dict(latent_dim=16, hidden_dim=32))
    m = nvembed.LatentAttentionPooling.from_config(dict(num_latents_value=3, num_cross_heads=1, cross_dim_head=5,
                                                        latent_dim=8, hidden_dim=8, output_normalize=False))
    assert (m.num_latents, m.num_heads, m.dim_head, m.hidden_dim, m.normalize) == (3, 1, 5, 8, False)
    # keyword arguments override the config's fields (they raised "multiple values for keyword argument")
    m = nvembed.LatentAttentionPooling.from_config(dict(num_latents_value=3, latent_dim=8, hidden_dim=8),
                                                   normalize=False, num_heads=2, dim_head=4)
    assert (m.num_latents, m.num_heads, m.dim_head, m.normalize) == (3, 2, 4, False)
    # bad arguments name the class and the argument when the module is built, not at its first forward
    for kwargs, match in ((dict(num_heads=0), "num_heads must be an int >= 1"),
                          (dict(num_heads=-1), "num_heads must be an int >= 1"),
                          (dict(num_heads=2.0), "num_heads must be an int >= 1"),
                          (dict(hidden_dim=True), "hidden_dim must be an int >= 1"),
                          (dict(normalize=1), "normalize must be True or False"),
                          (dict(eps=0.0), "eps must be a finite number > 0"),
                          (dict(eps=float("nan")), "eps must be a finite number > 0")):
        with pytest.raises((ValueError, TypeError), match="LatentAttentionPooling: " + match):
            nvembed.LatentAttentionPooling(**{**dict(hidden_dim=16, num_latents=4, num_heads=2, dim_head=8), **kwargs})


# ---- torch.library / autograd / compile ---------------------------------------------------------------------------
def _tiny_args(dtype=torch.float64, mask_kind="zero_row", requires_grad=True, B=3, L=6, d=8, N=3, H=2, dh=4, F_=12):
    gen = torch.Generator().manual_seed(7)
    weights = make_weights(d, N, H, dh, F_, dtype=dtype, gen=gen)
    hs = torch.randn(B, L, d, generator=gen).to(dtype)
    if requires_grad:
        hs.requires_grad_()
        for w in weights:
            w.requires_grad_()
    return hs, make_mask(mask_kind, B, L, gen), weights, H


@pytest.mark.parametrize("mask_kind", ["none", "zero_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(mask_kind, dtype, impl):
    hs, mask, weights, H = _tiny_args(dtype, mask_kind)
    with impl_path(impl):
        _opcheck_all(hs, mask, weights, H)


def _opcheck_all(hs, mask, weights, H):
    torch.library.opcheck(torch.ops.nvembed._latent_pool_fwd.default, (hs, mask, *weights, H, True, 1e-5))
    torch.library.opcheck(torch.ops.nvembed.latent_pool.default, (hs, mask, *weights, H, False, 1e-5))
    with torch.no_grad():
        out, pooled = torch.ops.nvembed._latent_pool_fwd(hs, mask, *weights, H, True, 1e-5)
    args = (torch.randn_like(out), pooled, hs.detach(), mask, *[w.detach() for w in weights], H, True, 1e-5)
    torch.library.opcheck(torch.ops.nvembed._latent_pool_bwd.default, args)
    if hs.device.type == "cpu":  # the saved-activation pair is CPU-only
        torch.library.opcheck(torch.ops.nvembed._latent_pool_fwd_save.default, (hs, mask, *weights, H, True, 1e-5))
        with torch.no_grad():
            out, pooled, *acts = torch.ops.nvembed._latent_pool_fwd_save(hs, mask, *weights, H, True, 1e-5)
        args = (torch.randn_like(out), pooled, *acts, hs.detach(), mask, *[w.detach() for w in weights], H, True,
                1e-5)
        torch.library.opcheck(torch.ops.nvembed._latent_pool_bwd_saved.default, args)


@pytest.mark.parametrize("path", ["0", "1"], ids=["plain", "folded"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(path, normalize, impl):
    hs, mask, weights, H = _tiny_args()
    with fold_path(path), impl_path(impl):
        assert torch.autograd.gradcheck(lambda x, *w: OP(x, mask, *w, H, normalize, 1e-5), (hs, *weights),
                                        eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_raises(impl):
    """create_graph=True gives the right first-order gradients; differentiating them again is an error naming the op
    (the backward op has no derivative: torch warned and handed back None)."""
    hs, mask, weights, H = _tiny_args()
    ref = torch.autograd.grad(latent_pool_ref(hs, mask, *weights, H, True, 1e-5).sum(), (hs, weights[0]))
    with impl_path(impl):
        grads = torch.autograd.grad(OP(hs, mask, *weights, H, True, 1e-5).sum(), (hs, weights[0]), create_graph=True)
        for g, r in zip(grads, ref):
            assert rel_err(g.detach(), r) <= 1e-10
        with pytest.raises(NotImplementedError, match=r"nvembed::latent_pool: second derivatives are not implemented"):
            (grads[0].square().sum() + grads[1].sum()).backward()


@pytest.mark.parametrize("path", ["0", "1"], ids=["plain", "folded"])
def test_aten_path_chunks_and_determinism(path):
    """More active tokens than one chunk of the ATen implementation (4096 at this width): chunked recomputation and
    the per-chunk pooling GEMMs give the reference's output and gradients, and the same bits twice."""
    B, L, d, N, H, dh, F_ = 2, 2600, 8, 3, 2, 4, 12
    gen = torch.Generator().manual_seed(11)
    weights = make_weights(d, N, H, dh, F_, gen=gen)
    hs = torch.randn(B, L, d, dtype=torch.float64, generator=gen)
    mask = make_mask("random", B, L, gen)
    mask[1, :] = True  # ~1820 + 2600 active tokens: two chunks
    ref, ref_grads = run_with_grads(latent_pool_ref, hs, mask, weights, H, True)
    with fold_path(path), impl_path("aten"):
        out, grads = run_with_grads(OP, hs, mask, weights, H, True)
        out2, grads2 = run_with_grads(OP, hs, mask, weights, H, True)
    assert rel_err(out, ref) <= 1e-10
    for name, g, rg in zip(("hidden_states",) + WEIGHT_NAMES, grads, ref_grads):
        assert rel_err(g, rg) <= 1e-10, (name, rel_err(g, rg))
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_kernels_variable_cpu(monkeypatch):
    """NVEMBED_LATENT_POOL_KERNELS picks the CUDA elementwise stages (aten | fused | auto) and is checked on the ATen path
    on CPU tensors too, where both values run ATen's ops; anything else is an error naming the op and the variable."""
    hs, mask, weights, H = _tiny_args()
    with impl_path("aten"):
        outs = []
        for value in ("auto", "aten", "fused", ""):
            monkeypatch.setenv("NVEMBED_LATENT_POOL_KERNELS", value)
            outs.append(OP(hs, mask, *weights, H, True, 1e-5))
        assert all(torch.equal(o, outs[0]) for o in outs)
        monkeypatch.setenv("NVEMBED_LATENT_POOL_KERNELS", "cutlass")
        with pytest.raises(ValueError, match=r"nvembed::latent_pool: NVEMBED_LATENT_POOL_KERNELS must be auto, aten "
                                             r"or fused, got 'cutlass'"):
            OP(hs, mask, *weights, H, True, 1e-5)


def test_torch_compile_module():
    torch._dynamo.reset()
    torch.manual_seed(3)
    module = nvembed.LatentAttentionPooling(hidden_dim=16, num_latents=5, num_heads=2, dim_head=16)
    compiled = torch.compile(module, fullgraph=True)
    hs = torch.randn(3, 7, 16)
    mask = make_mask("zero_row", 3, 7)
    hs1, hs2 = hs.clone().requires_grad_(), hs.clone().requires_grad_()
    eager = module(hs1, mask)
    eager.square().sum().backward()
    g_eager = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    comp = compiled(hs2, mask)
    comp.square().sum().backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(hs2.grad, hs1.grad)
    for p, g in zip(module.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g)


# ---- argument checks ------------------------------------------------------------------------------------------
def _bad_cases():
    d, N, H, dh, F_ = 8, 3, 2, 4, 12
    B, L = 2, 5

    def base():
        return dict(hs=torch.randn(B, L, d), mask=None, w=make_weights(d, N, H, dh, F_, dtype=torch.float32), H=H,
                    eps=1e-5)

    def with_w(i, t):
        def f():
            a = base()
            a["w"][i] = t
            return a
        return f

    def with_(**kw):
        def f():
            a = base()
            a.update(kw)
            return a
        return f

    idx = {n: i for i, n in enumerate(WEIGHT_NAMES)}
    return [
        ("hidden_states", with_(hs=torch.randn(B * L, d))),
        ("hidden_states", with_(hs=torch.randn(B, L, d).half())),
        ("hidden_states", with_(hs=torch.randn(B, L, d).to(torch.int32))),
        ("hidden_states", with_(hs=torch.randn(0, L, d))),
        ("latents", with_w(idx["latents"], torch.randn(N, d + 1))),
        ("latents", with_w(idx["latents"], torch.randn(N, d, dtype=torch.float64))),
        ("latents", with_w(idx["latents"], torch.randn(N, d, device="meta"))),
        ("to_q_weight", with_w(idx["to_q_weight"], torch.randn(H * dh, d + 1))),
        ("to_q_weight", with_w(idx["to_q_weight"], torch.randn(H * dh + 1, d))),  # I % num_heads != 0
        ("to_kv_weight", with_w(idx["to_kv_weight"], torch.randn(H * dh, d))),
        ("to_out_weight", with_w(idx["to_out_weight"], torch.randn(d, H * dh + 1))),
        ("norm_weight", with_w(idx["norm_weight"], torch.randn(d + 1))),
        ("norm_context_bias", with_w(idx["norm_context_bias"], torch.randn(d, 1))),
        ("ff_in_weight", with_w(idx["ff_in_weight"], torch.randn(2 * F_ + 1, d))),
        ("ff_in_bias", with_w(idx["ff_in_bias"], torch.randn(F_))),
        ("ff_out_weight", with_w(idx["ff_out_weight"], torch.randn(d, 2 * F_))),
        ("ff_out_bias", with_w(idx["ff_out_bias"], torch.randn(d + 2))),
        ("ff_norm_weight", with_w(idx["ff_norm_weight"], torch.randn(d).double())),
        ("pool_mask", with_(mask=torch.ones(B, L + 1, dtype=torch.bool))),
        ("pool_mask", with_(mask=torch.ones(B * L, dtype=torch.bool))),
        ("num_heads", with_(H=0)),
        ("eps", with_(eps=0.0)),
        ("eps", with_(eps=-1e-5)),
        ("eps", with_(eps=1e-300)),  # 0 in float32: a constant token's LayerNorm would be NaN
    ]


@pytest.mark.parametrize("arg,make", _bad_cases(), ids=[f"{a}-{i}" for i, (a, _) in enumerate(_bad_cases())])
def test_bad_input(arg, make):
    a = make()
    with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"nvembed::latent_pool: .*{arg}"):
        OP(a["hs"], a["mask"], *a["w"], a["H"], True, a["eps"])
    a = make()  # the autograd path and the internal op check the same way
    hs = a["hs"].requires_grad_() if a["hs"].is_floating_point() else a["hs"]
    for op in (OP, torch.ops.nvembed._latent_pool_fwd, torch.ops.nvembed._latent_pool_fwd_save):
        with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"nvembed::latent_pool: .*{arg}"):
            op(hs, a["mask"], *a["w"], a["H"], True, a["eps"])


def _saved_bwd_args(dtype=torch.float32):
    hs, mask, weights, H = _tiny_args(dtype, requires_grad=False)
    out, pooled, *acts = torch.ops.nvembed._latent_pool_fwd_save(hs, mask, *weights, H, True, 1e-5)
    return [torch.randn_like(out), pooled, *acts, hs, mask, *weights, H, True, 1e-5]


@pytest.mark.parametrize("which,bad", [
    ("geglu_mean", lambda t: t[:, :-1]),
    ("resid", lambda t: t.reshape(3, 6, -1)),
    ("ff_hidden", lambda t: t[:-1]),
    ("resid", lambda t: t.double()),
    ("ff_hidden", lambda t: t.to("meta")),
])
def test_bad_saved_activations(which, bad):
    """_latent_pool_bwd_saved checks the activations it is handed (shape, dtype, device), naming the argument."""
    args = _saved_bwd_args()
    i = 2 + ("geglu_mean", "resid", "ff_hidden").index(which)
    args[i] = bad(args[i])
    with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"nvembed::latent_pool: .*{which}"):
        torch.ops.nvembed._latent_pool_bwd_saved(*args)


# ---- the saved-activation path (CPU) -------------------------------------------------------------------------
class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).split(".")[-1])
        return func(*args, **(kwargs or {}))


def _ops_run(hs, mask, weights, H, backward=True):
    with _OpLog() as log:
        out = OP(hs, mask, *weights, H, True, 1e-5)
        if backward and out.requires_grad:
            out.sum().backward()
    return [op for op in log.ops if op.startswith("_latent_pool")]


def test_saved_path_choice(monkeypatch):
    """The op keeps activations only when gradients are needed and they fit NVEMBED_LATENT_POOL_SAVE_MB (here ~3.7 KB
    of activations: B3 L6, d8, F12, float64; by default 1 GiB on the CPU kernel, nothing on the ATen path)."""
    hs, mask, weights, H = _tiny_args()
    monkeypatch.delenv("NVEMBED_LATENT_POOL_SAVE_MB", raising=False)
    assert _ops_run(hs, mask, weights, H) == ["_latent_pool_fwd_save", "_latent_pool_bwd_saved"]
    with torch.no_grad():
        assert _ops_run(hs, mask, weights, H) == ["_latent_pool_fwd"]
    assert _ops_run(*_tiny_args(requires_grad=False)) == ["_latent_pool_fwd"]
    monkeypatch.setenv("NVEMBED_LATENT_POOL_SAVE_MB", "0")
    assert _ops_run(hs, mask, weights, H) == ["_latent_pool_fwd", "_latent_pool_bwd"]
    monkeypatch.setenv("NVEMBED_LATENT_POOL_SAVE_MB", "1")
    assert _ops_run(hs, mask, weights, H) == ["_latent_pool_fwd_save", "_latent_pool_bwd_saved"]
    # 1 MiB is too little for B1 L8192 d8 F12 in float64: (12 + 8192 * 32) * 8 bytes > 2 MiB
    big = torch.randn(1, 8192, 8, dtype=torch.float64, requires_grad=True)
    assert _ops_run(big, None, weights, H, backward=False) == ["_latent_pool_fwd"]
    with impl_path("aten"):  # the ATen implementation (the CUDA path) keeps nothing unless asked to
        assert _ops_run(hs, mask, weights, H) == ["_latent_pool_fwd", "_latent_pool_bwd"]
    with impl_path("aten-saved"):
        assert _ops_run(hs, mask, weights, H) == ["_latent_pool_fwd_save", "_latent_pool_bwd_saved"]
    for bad in ("-1", "1.5", "lots"):
        monkeypatch.setenv("NVEMBED_LATENT_POOL_SAVE_MB", bad)
        with pytest.raises(ValueError, match=r"nvembed::latent_pool: NVEMBED_LATENT_POOL_SAVE_MB must be a "
                                             r"non-negative integer \(MiB\), got '" + bad):
            OP(hs, mask, *weights, H, True, 1e-5)


@pytest.mark.parametrize("impl", ["kernel", "aten"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "zero_row"])
@pytest.mark.parametrize("path", ["0", "1"], ids=["plain", "folded"])
def test_saved_activations_are_the_layers(mask_kind, path, impl):
    """geglu_mean, resid and ff_hidden equal the reference layer's masked mean of GEGLU(u + b_in), y1 = attention + x
    and u = LN_ff(y1) W_in^T (float64), their rows the active tokens in (b, l) order followed by zeros, from the CPU
    kernel and from the ATen implementation alike; the outputs equal _latent_pool_fwd's bit for bit."""
    B, L, d, N, H, dh, F_ = 3, 11, 16, 5, 2, 8, 24
    gen = torch.Generator().manual_seed(5)
    weights = make_weights(d, N, H, dh, F_, gen=gen)
    hs = torch.randn(B, L, d, dtype=torch.float64, generator=gen)
    mask = make_mask(mask_kind, B, L, gen)
    with fold_path(path), impl_path(impl):
        out, pooled, gbar, resid, u = torch.ops.nvembed._latent_pool_fwd_save(hs, mask, *weights, H, True, 1e-5)
        out0, pooled0 = torch.ops.nvembed._latent_pool_fwd(hs, mask, *weights, H, True, 1e-5)
    assert torch.equal(out, out0) and torch.equal(pooled, pooled0)
    (latents, nw, nb, cw, cb, wq, wkv, wo, fw, fb, win, bin_, wff, bff) = weights
    ln = lambda x, w, b: F.layer_norm(x, (d,), w, b, 1e-5)  # noqa: E731
    q = (ln(hs, nw, nb) @ wq.T).view(B, L, H, dh).transpose(1, 2)
    k, v = (ln(latents, cw, cb) @ wkv.T).chunk(2, dim=-1)
    p = torch.softmax(q @ k.view(N, H, dh).permute(1, 2, 0) / dh ** 0.5, dim=-1)
    y1 = (p @ v.view(N, H, dh).transpose(0, 1)).transpose(1, 2).reshape(B, L, H * dh) @ wo.T + hs
    u_ref = ln(y1, fw, fb) @ win.T
    g = (u_ref[..., :F_] + bin_[:F_]) * F.gelu(u_ref[..., F_:] + bin_[F_:])
    m = torch.ones(B, L, dtype=torch.float64) if mask is None else mask.double()
    gbar_ref = (g * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    active = m.reshape(-1) != 0
    T = int(active.sum())
    assert gbar.shape == (B, F_) and resid.shape == (B * L, d) and u.shape == (B * L, 2 * F_)
    torch.testing.assert_close(gbar, gbar_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(resid[:T], y1.reshape(B * L, d)[active], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u[:T], u_ref.reshape(B * L, 2 * F_)[active], rtol=1e-10, atol=1e-12)
    assert not resid[T:].any() and not u[T:].any()


@pytest.mark.parametrize("impls", [("kernel", "saved"), ("aten", "aten-saved")], ids=["kernel", "aten"])
def test_saved_and_recomputed_backward_agree(impls):
    """Float32 with more active tokens than one block of the CPU kernel (512) and one chunk of the ATen path
    (4096 at this width): the saved and the recomputing backward give the same gradients up to float32 rounding
    (different GEMM shapes), and each path repeats its own bits."""
    B, L, d, N, H, dh, F_ = 2, 3000, 32, 9, 4, 8, 64
    gen = torch.Generator().manual_seed(9)
    weights = make_weights(d, N, H, dh, F_, dtype=torch.float32, gen=gen)
    hs = torch.randn(B, L, d, generator=gen)
    mask = make_mask("random", B, L, gen)
    mask[1] = True  # ~2100 + 3000 active tokens
    recompute, saved = impls
    runs = {}
    for impl in (recompute, saved, saved):
        with impl_path(impl):
            runs.setdefault(impl, []).append(run_with_grads(OP, hs, mask, weights, H, True))
    (o_k, g_k), = runs[recompute]
    (o_s, g_s), (o_s2, g_s2) = runs[saved]
    assert torch.equal(o_s, o_s2) and all(torch.equal(a, b) for a, b in zip(g_s, g_s2))
    assert torch.equal(o_s, o_k)
    for name, a, b in zip(("hidden_states",) + WEIGHT_NAMES, g_s, g_k):
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
