"""A port of NV-Embed-v2's released modeling code (modeling_nvembed.py on transformers 4.42, NVEMBED_FACTS (c),
backbone section): the parity reference of tests/test_model.py and the baseline of bench/gpu_model_e2e.py, one
copy for both (Liger-Kernel style: benchmarks import the tests' references).

Plain functions over a state dict with the released key names, so no remote code and no old transformers are
needed. The arithmetic follows the release step by step:
- BidirectionalMistralModel: position_ids = arange(L) for every row, a [B, 1, L, L] additive mask that hides padded
  keys only (no causal part, no sliding window), Mistral layers (RMSNorm with fp32 statistics, RoPE with fp32
  angles, GQA by repeat_kv, SiLU-gated MLP), final norm.
- LatentAttentionModel: the latents repeated over the batch (`repeat(latents, 'n d -> b n d')`) before
  norm_context and to_kv, token states as queries, `(b h) n d` heads, SDPA with no mask, GEGLU feed-forward, masked
  mean in float32 (the release multiplies by `mask.float()`), L2 normalization.

`attention="eager"` forms softmax(QK^T / sqrt(d) + mask) V explicitly (exact in float64, for the parity tests);
`attention="sdpa"` calls F.scaled_dot_product_attention as the release's MistralSdpaAttention and its latent layer
do (for the benchmark, in bf16 on CUDA). All arithmetic runs in the dtype of the given tensors; the release's
`torch.autocast("cuda")` around its forward is not reproduced (see bench/gpu_model_e2e.py).
"""
import math

import torch
import torch.nn.functional as F

ATTENTIONS = ("eager", "sdpa")


def released_config(text, latent):
    """config.json of a released-layout NV-Embed folder with these text_config / latent_attention_config."""
    return {"_name_or_path": "nvidia/NV-Embed-v2", "model_type": "nvembed", "architectures": ["NVEmbedModel"],
            "auto_map": {"AutoConfig": "configuration_nvembed.NVEmbedConfig",
                         "AutoModel": "modeling_nvembed.NVEmbedModel"},
            "hidden_size": text["hidden_size"], "padding_side": "right", "add_pad_token": True,
            "is_mask_instruction": True, "add_eos": True, "mask_type": "b", "torch_dtype": "float32",
            "transformers_version": "4.42.4", "latent_attention_config": latent, "text_config": text}


def released_shapes(text, latent):
    """Key -> shape of NVEmbedModel.state_dict() as NVEMBED_FACTS (b) lists it (release order)."""
    d, N = latent["latent_dim"], latent["num_latents_value"]
    inner = latent["num_cross_heads"] * latent["cross_dim_head"]
    D, hd = text["hidden_size"], text["hidden_size"] // text["num_attention_heads"]
    H, KV, I = text["num_attention_heads"], text["num_key_value_heads"], text["intermediate_size"]
    p = "latent_attention_model.cross_attend_blocks."
    s = {"latent_attention_model.latents": (N, d),
         p + "0.fn.to_q.weight": (inner, d), p + "0.fn.to_kv.weight": (2 * inner, d),
         p + "0.fn.to_out.weight": (d, inner), p + "0.norm.weight": (d,), p + "0.norm.bias": (d,),
         p + "0.norm_context.weight": (d,), p + "0.norm_context.bias": (d,),
         p + "1.fn.net.0.weight": (8 * d, d), p + "1.fn.net.0.bias": (8 * d,),
         p + "1.fn.net.2.weight": (d, 4 * d), p + "1.fn.net.2.bias": (d,),
         p + "1.norm.weight": (d,), p + "1.norm.bias": (d,),
         "embedding_model.embed_tokens.weight": (text["vocab_size"], D)}
    for i in range(text["num_hidden_layers"]):
        q = f"embedding_model.layers.{i}."
        s.update({q + "self_attn.q_proj.weight": (H * hd, D), q + "self_attn.k_proj.weight": (KV * hd, D),
                  q + "self_attn.v_proj.weight": (KV * hd, D), q + "self_attn.o_proj.weight": (D, H * hd),
                  q + "mlp.gate_proj.weight": (I, D), q + "mlp.up_proj.weight": (I, D),
                  q + "mlp.down_proj.weight": (D, I),
                  q + "input_layernorm.weight": (D,), q + "post_attention_layernorm.weight": (D,)})
    s["embedding_model.norm.weight"] = (D,)
    return s


def random_state_dict(shapes, seed=0, device="cpu", dtype=torch.float32):
    """Random weights that keep activations O(1) through the layers: norm weights ~1, latents and token
    embeddings N(0, 1), every other tensor N(0, 1/fan_in). Drawn in float32 on `device`, then cast."""
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if k.endswith(("norm.weight", "layernorm.weight", "norm_context.weight")):
            t = t.mul_(0.1).add_(1.0)
        elif not (k.endswith("latents") or "embed_tokens" in k):
            t = t.div_(math.sqrt(shape[-1]))
        sd[k] = t.to(dtype)
    return sd


def _acc(dtype):
    """The dtype the release keeps statistics and angles in: float32, or float64 for a float64 port."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms(x, w, eps):
    h = x.to(_acc(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rope(x, theta):
    L, hd = x.shape[-2], x.shape[-1]
    acc = _acc(x.dtype)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=acc) / hd)
    freqs = torch.arange(L, device=x.device, dtype=acc)[:, None] * inv[None]  # position_ids = arange(L), every row
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + rot * sin


def _attend(q, k, v, bias, attention):
    """softmax(q k^T / sqrt(d) + bias) v over the last two dims; bias None = no mask."""
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = (q @ k.transpose(-1, -2)).to(_acc(q.dtype)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, -1).to(q.dtype) @ v


def _check_attention(attention):
    if attention not in ATTENTIONS:
        raise ValueError(f"released_nvembed: attention must be one of {ATTENTIONS}, got {attention!r}")


def port_bidirectional_mistral(sd, cfg, ids, mask, attention="eager"):
    """BidirectionalMistralModel.forward -> last_hidden_state [B, L, D] in the dtype of sd's tensors."""
    _check_attention(attention)
    B, L = ids.shape
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, eps = D // H, cfg["rms_norm_eps"]
    h = sd["embedding_model.embed_tokens.weight"][ids]
    dtype = h.dtype
    # _prepare_4d_attention_mask(attention_mask, dtype): a materialized [B, 1, L, L], finfo(dtype).min on padded keys
    bias = ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).expand(B, 1, L, L).contiguous()
    for i in range(cfg["num_hidden_layers"]):
        p = lambda n: sd[f"embedding_model.layers.{i}.{n}.weight"]  # noqa: E731
        x = _rms(h, p("input_layernorm"), eps)
        q = (x @ p("self_attn.q_proj").T).view(B, L, H, hd).transpose(1, 2)
        k = (x @ p("self_attn.k_proj").T).view(B, L, KV, hd).transpose(1, 2)
        v = (x @ p("self_attn.v_proj").T).view(B, L, KV, hd).transpose(1, 2)
        q, k = _rope(q, cfg["rope_theta"]), _rope(k, cfg["rope_theta"])
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # repeat_kv
        a = _attend(q, k, v, bias, attention)
        h = h + a.transpose(1, 2).reshape(B, L, D) @ p("self_attn.o_proj").T
        x = _rms(h, p("post_attention_layernorm"), eps)
        h = h + (F.silu(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return _rms(h, sd["embedding_model.norm.weight"], eps)


def port_latent_attention(sd, cfg, hiddens, pool_mask, attention="eager"):
    """LatentAttentionModel.forward(hiddens, pool_mask) -> [B, d]: tokens are queries over the latents (repeated
    over the batch, as released), GEGLU FF, masked mean in float32, L2 normalization."""
    _check_attention(attention)
    p = lambda n: sd["latent_attention_model." + n]  # noqa: E731
    b = "cross_attend_blocks."
    heads, dh = cfg["num_cross_heads"], cfg["cross_dim_head"]
    B, L, d = hiddens.shape
    latents = p("latents").unsqueeze(0).expand(B, -1, -1)  # repeat(self.latents, 'n d -> b n d', b=B)
    N = latents.shape[1]
    x = F.layer_norm(hiddens, (d,), p(b + "0.norm.weight"), p(b + "0.norm.bias"), 1e-5)
    ctx = F.layer_norm(latents, (d,), p(b + "0.norm_context.weight"), p(b + "0.norm_context.bias"), 1e-5)
    q = x @ p(b + "0.fn.to_q.weight").T
    k, v = (ctx @ p(b + "0.fn.to_kv.weight").T).chunk(2, -1)
    # rearrange 'b n (h d) -> (b h) n d'
    q, k, v = (t.reshape(B, n, heads, dh).transpose(1, 2).reshape(B * heads, n, dh)
               for t, n in ((q, L), (k, N), (v, N)))
    a = _attend(q, k, v, None, attention)
    a = a.reshape(B, heads, L, dh).transpose(1, 2).reshape(B, L, heads * dh)  # '(b h) n d -> b n (h d)'
    hiddens = a @ p(b + "0.fn.to_out.weight").T + hiddens
    y = F.layer_norm(hiddens, (d,), p(b + "1.norm.weight"), p(b + "1.norm.bias"), 1e-5)
    y = y @ p(b + "1.fn.net.0.weight").T + p(b + "1.fn.net.0.bias")
    y, gates = y.chunk(2, -1)
    y = (y * F.gelu(gates)) @ p(b + "1.fn.net.2.weight").T + p(b + "1.fn.net.2.bias")
    hiddens = hiddens + y
    m = pool_mask[..., None].to(torch.float64 if hiddens.dtype == torch.float64 else torch.float32)
    out = (hiddens * m).sum(1) / m.sum(1)
    return F.normalize(out, p=2, dim=-1) if cfg["output_normalize"] else out


def port_nvembed(sd, text_cfg, latent_cfg, ids, attention_mask, pool_mask, attention="eager"):
    """NVEmbedModel.forward(...)["sentence_embeddings"]: the backbone sees attention_mask, pooling pool_mask."""
    h = port_bidirectional_mistral(sd, text_cfg, ids, attention_mask, attention)
    return port_latent_attention(sd, latent_cfg, h, pool_mask, attention)
