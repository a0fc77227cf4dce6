"""torch.compile(fullgraph=True) of a small embedding model that uses all three ops end to end: a bidirectional
attention block (flash_attn), latent-attention pooling (latent_pool) and the contrastive loss (infonce). Loss and
every parameter gradient match eager."""
import torch

import nvembed
from conftest import rel_err

ops = torch.ops.nvembed


class TinyEmbedder(torch.nn.Module):
    def __init__(self, vocab=50, d=32, hq=4, hkv=2):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.emb = torch.nn.Embedding(vocab, d)
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * hkv * self.hd)
        self.o = torch.nn.Linear(d, d)
        self.pool = nvembed.LatentAttentionPooling(hidden_dim=d, num_latents=8, num_heads=2, dim_head=d)

    def forward(self, ids, mask, pool_mask):
        x = self.emb(ids)
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.hq, self.hd)
        k, v = self.kv(x).view(B, L, 2, self.hkv, self.hd).unbind(2)
        x = x + self.o(ops.flash_attn(q, k, v, mask).reshape(B, L, -1))
        return self.pool(x, pool_mask)


def _loss(model, q_ids, q_mask, q_pool, d_ids, d_mask, group):
    qe = model(q_ids, q_mask, q_pool)
    de = model(d_ids, d_mask, d_mask)
    return ops.infonce(qe, de, group, 0.05, True)


def _batch(n, L, vocab=50):
    ids = torch.randint(0, vocab, (n, L))
    lengths = torch.randint(2, L + 1, (n,))
    mask = torch.arange(L)[None, :] < lengths[:, None]
    pool = mask.clone()
    pool[:, :1] = False  # an "instruction" token excluded from pooling
    return ids, mask, pool


def test_compile_fullgraph_all_ops():
    torch._dynamo.reset()
    model = TinyEmbedder()
    B, G = 3, 2
    q_ids, q_mask, q_pool = _batch(B, 7)
    d_ids, d_mask, _ = _batch(B * G, 9)
    args = (q_ids, q_mask, q_pool, d_ids, d_mask, G)

    eager = _loss(model, *args)
    eager.backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(_loss, fullgraph=True)
    out = compiled(model, *args)
    out.backward()
    assert rel_err(out, eager) < 1e-5
    for n, p in model.named_parameters():
        assert rel_err(p.grad, g_eager[n]) < 1e-4, n
