"""nvembed.losses: InfoNCELoss (local and across ranks on a real gloo process group), all_gather_with_grad,
CachedInfoNCE (GradCache) against the whole batch in one graph, and argument errors."""
import os
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import nvembed
from nvembed.losses import CachedInfoNCE, InfoNCELoss, all_gather_with_grad
from nvembed_ext.reference import infonce_ref

ops = torch.ops.nvembed
ERR = (RuntimeError, ValueError, TypeError)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / max(ref.norm().item(), 1e-30)).item()


def unit_rows(n, d, dtype, gen=None):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


# ---- InfoNCELoss, one process -------------------------------------------------------------------------------------

@pytest.mark.parametrize("inb", [True, False], ids=["inbatch", "owngroup"])
@pytest.mark.parametrize("B,G,d", [(1, 1, 8), (1, 4, 16), (7, 3, 33), (130, 2, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_infonce_loss_matches_op_and_reference(B, G, d, inb, dtype):
    t = 0.05
    q, docs = unit_rows(B, d, dtype).requires_grad_(), unit_rows(B * G, d, dtype).requires_grad_()
    loss_fn = InfoNCELoss(temperature=t, in_batch_negatives=inb)
    loss = loss_fn(q, docs)  # group_size inferred
    loss.backward()
    gq, gd = q.grad.clone(), docs.grad.clone()
    q.grad = docs.grad = None
    op = ops.infonce(q, docs, G, t, inb)
    op.backward()
    assert loss.item() == op.item()  # the module is the op
    torch.testing.assert_close(gq, q.grad, rtol=0, atol=0)
    torch.testing.assert_close(gd, docs.grad, rtol=0, atol=0)
    qr, dr = q.detach().double().requires_grad_(), docs.detach().double().requires_grad_()
    ref = infonce_ref(qr, dr, G, t, inb)
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - ref.item()) <= tol * max(abs(ref.item()), 1.0)
    if B * G > 1:  # a single logit has zero gradients
        assert rel_err(gq, qr.grad) <= tol and rel_err(gd, dr.grad) <= tol
    assert loss_fn(q, docs, group_size=G).item() == loss.item()


def test_cross_rank_without_process_group_is_local():
    assert not dist.is_initialized()
    q, docs = unit_rows(6, 16, torch.float64), unit_rows(18, 16, torch.float64)
    assert InfoNCELoss(0.05, cross_rank=True)(q, docs).item() == InfoNCELoss(0.05)(q, docs).item()
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


def test_lazy_exports():
    assert nvembed.InfoNCELoss is InfoNCELoss and nvembed.CachedInfoNCE is CachedInfoNCE
    assert {"InfoNCELoss", "CachedInfoNCE"} <= set(nvembed.__all__)


# ---- across ranks: 2 CPU processes on gloo -------------------------------------------------------------------------

WORLD = 2
IN_DIM, EMB_DIM, T = 6, 8, 0.05


def make_encoder(seed, dtype):
    """A tiny trainable encoder, identical for the same seed in every process."""
    gen = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, EMB_DIM)).to(dtype)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return enc


def make_batch(seed, sizes, G, dtype):
    """Query and doc features of the concatenated batch: rank r's queries are rows offs[r]:offs[r+1]."""
    gen = torch.Generator().manual_seed(seed + 1)
    xq = torch.randn(sum(sizes), IN_DIM, generator=gen, dtype=torch.float64).to(dtype)
    xd = torch.randn(sum(sizes) * G, IN_DIM, generator=gen, dtype=torch.float64).to(dtype)
    return xq, xd


def embed(enc, x):
    return F.normalize(enc(x), dim=-1)


def rank_rows(sizes, rank, G=1):
    b = sum(sizes[:rank])
    return slice(b * G, (b + sizes[rank]) * G)


def _grads(module):
    return [p.grad.detach().clone() for p in module.parameters()]


def _dist_scenarios(rank, world, seed):
    """Everything the cross-rank tests check, in one process group (a spawn costs seconds on 2 cores)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    # (1) InfoNCELoss cross_rank under DDP, equal per-rank batches; both negatives modes; fp32 and fp64
    for dtype, inb in ((torch.float32, True), (torch.float64, True), (torch.float64, False)):
        sizes, G = (4, 4), 3
        enc = make_encoder(seed, dtype)
        ddp = DDP(enc)
        xq, xd = make_batch(seed, sizes, G, dtype)
        xq, xd = xq[rank_rows(sizes, rank)], xd[rank_rows(sizes, rank, G)]
        emb = embed(ddp, torch.cat([xq, xd]))  # one DDP forward per backward
        loss = InfoNCELoss(T, in_batch_negatives=inb, cross_rank=True)(emb[:len(xq)], emb[len(xq):], G)
        loss.backward()
        out[("ddp", str(dtype), inb)] = (loss.item(), _grads(enc))
    # (2) unequal per-rank batch sizes through InfoNCELoss (documented: the mean of the per-rank means)
    sizes, G = (2, 3), 2
    enc = make_encoder(seed, torch.float64)
    ddp = DDP(enc)
    xq, xd = make_batch(seed, sizes, G, torch.float64)
    xq, xd = xq[rank_rows(sizes, rank)], xd[rank_rows(sizes, rank, G)]
    emb = embed(ddp, torch.cat([xq, xd]))
    loss = InfoNCELoss(T, cross_rank=True)(emb[:len(xq)], emb[len(xq):], G)
    loss.backward()
    out["ddp_unequal"] = (loss.item(), _grads(enc))
    # (3) CachedInfoNCE + cross_rank + DDP.no_sync: one all-reduce after the last chunk
    sizes, G = (5, 5), 2
    enc = make_encoder(seed, torch.float64)
    ddp = DDP(enc)
    xq, xd = make_batch(seed, sizes, G, torch.float64)
    xq, xd = xq[rank_rows(sizes, rank)], xd[rank_rows(sizes, rank, G)]
    cached = CachedInfoNCE(lambda b: embed(ddp, b["x"]), InfoNCELoss(T, cross_rank=True), chunk_size=3)
    loss = cached.forward_backward({"x": xq}, {"x": xd}, G, no_sync=ddp.no_sync)
    out["cached_ddp"] = (loss.item(), _grads(enc))
    # (4) all_gather_with_grad, unequal sizes, 3-D rows, a different function of the gathered tensor per rank
    sizes = (3, 5)
    gen = torch.Generator().manual_seed(seed + 2)
    xs = [torch.randn(n, 2, 3, generator=gen, dtype=torch.float64) for n in sizes]
    ws = [torch.randn(sum(sizes), 2, 3, generator=gen, dtype=torch.float64) for _ in sizes]
    x = xs[rank].clone().requires_grad_()
    y = all_gather_with_grad(x)
    ((ws[rank] * y).sum() + (rank + 1) * (y ** 3).sum()).backward()
    out["gather"] = (y.detach(), x.grad)
    # (5) shape disagreement: every rank raises (none hangs)
    try:
        all_gather_with_grad(torch.zeros(2, 3 + rank))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # a tensor only one rank cannot describe (more than 8 dims; a dtype outside the list): every rank raises after the
    # header exchange (the one rank raised before it and the other waited)
    for key, t in (("too_many_dims", torch.zeros([2] + [1] * (7 if rank == 0 else 8))),
                   ("odd_dtype", torch.zeros(2, 3, dtype=torch.complex64 if rank == 1 else torch.float32))):
        try:
            all_gather_with_grad(t)
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    # (6) bad inputs on one rank only, or ranks that disagree on the loss's settings: every rank raises at once
    # (before, the other rank waited in the docs gather until the process group's timeout)
    q, d = torch.randn(3, 4), torch.randn(6, 4)
    for key, loss_fn, args in (
            ("empty_queries", InfoNCELoss(T, cross_rank=True), (q[:0] if rank == 1 else q, d)),
            ("bad_docs", InfoNCELoss(T, cross_rank=True), (q, d[:5] if rank == 0 else d)),
            ("temperature", InfoNCELoss(T * (1 + rank), cross_rank=True), (q, d)),
            ("in_batch", InfoNCELoss(T, in_batch_negatives=rank == 0, cross_rank=True), (q, d))):
        t0 = time.perf_counter()
        try:
            loss_fn(*args, 2)
            out[key] = (None, time.perf_counter() - t0)
        except ValueError as e:
            out[key] = (str(e), time.perf_counter() - t0)
    # (7) double backward through the gather raises (its backward's all_reduce has no derivative)
    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad((all_gather_with_grad(x) ** 3).sum(), x, create_graph=True)
    try:
        (g ** 2).sum().backward()
        out["double_backward"] = None
    except RuntimeError as e:
        out["double_backward"] = str(e)
    return out


def _dist_child(rank, world, tmp, fn, args):
    try:
        torch.set_num_threads(1)  # 2 processes on 2 cores
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        path = os.path.join(tmp, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException:
        with open(os.path.join(tmp, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    # Done: leave without interpreter finalization, where gloo's worker threads can be torn down in an order that
    # aborts the process ("terminate called without an active exception"; once with torch 2.11 a rank ended by
    # SIGABRT with no traceback), which would fail the test on a result already written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(tmp_path, fn, *args, world=WORLD, timeout=180):
    """Runs fn(rank, world, *args) in `world` spawned processes on one gloo group; returns their results. A child's
    exception fails the test with its traceback; a child that fails or hangs gets the others killed."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_child, args=(r, world, str(tmp_path), fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # the others would wait in a collective until gloo's timeout
            time.sleep(0.05)
    finally:
        exitcodes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10)
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(world) if (tmp_path / f"rank{r}.err").exists()]
    if errors:
        pytest.fail("a distributed child failed:\n" + "\n".join(errors), pytrace=False)
    if any(c not in (None, 0) for c in exitcodes):
        pytest.fail(f"distributed children exited with codes {exitcodes} (None: killed) without a traceback; "
                    "see the captured stderr", pytrace=False)
    if None in exitcodes:
        pytest.fail(f"ranks {[r for r, c in enumerate(exitcodes) if c is None]} did not finish within {timeout} s "
                    "(killed)", pytrace=False)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    seed = int.from_bytes(os.urandom(4), "little")
    start = time.perf_counter()
    results = run_distributed(tmp_path_factory.mktemp("dist"), _dist_scenarios, seed)
    print(f"[dist] seed {seed}, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return seed, results


def single_process(seed, sizes, G, dtype, inb=True, compute_dtype=None):
    """The reference: the whole concatenated batch in one process (the mean loss over all queries). The encoder
    and inputs are made in `dtype`, then (compute_dtype) upcast: the fp64 answer to the fp32 problem."""
    compute_dtype = compute_dtype or dtype
    enc = make_encoder(seed, dtype).to(compute_dtype)
    xq, xd = (x.to(compute_dtype) for x in make_batch(seed, sizes, G, dtype))
    emb = embed(enc, torch.cat([xq, xd]))
    q, d = emb[:len(xq)], emb[len(xq):]
    loss = InfoNCELoss(T, in_batch_negatives=inb)(q, d, G)
    loss.backward()
    return loss.item(), _grads(enc), q.detach(), d.detach()


@pytest.mark.parametrize("dtype,inb", [(torch.float32, True), (torch.float64, True), (torch.float64, False)],
                         ids=["fp32-inbatch", "fp64-inbatch", "fp64-owngroup"])
def test_cross_rank_ddp_equals_single_process(dist_results, dtype, inb):
    seed, results = dist_results
    sizes, G = (4, 4), 3
    ref_loss, ref_grads, q, d = single_process(seed, sizes, G, dtype, inb, compute_dtype=torch.float64)
    # fp32: within 1e-6 of the fp64 answer, or (FA2's rule) twice the error of the fp32 single-process run
    same_loss, same_grads, _, _ = single_process(seed, sizes, G, dtype, inb)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    loss_tol = max(tol, 2 * abs(same_loss - ref_loss) / abs(ref_loss))
    grad_tol = [max(tol, 2 * rel_err(s, r)) for s, r in zip(same_grads, ref_grads)]
    rank_losses = [res[("ddp", str(dtype), inb)][0] for res in results]
    assert abs(sum(rank_losses) / WORLD - ref_loss) <= loss_tol * abs(ref_loss)
    for rank, res in enumerate(results):
        # each rank's own queries against [own docs, the other rank's docs]: the ordering keeps target i*G right
        own, other = rank_rows(sizes, rank, G), rank_rows(sizes, 1 - rank, G)
        rank_docs = torch.cat([d[own], d[other]]) if inb else d[own]  # own-group: nothing gathered
        expect = infonce_ref(q[rank_rows(sizes, rank)], rank_docs, G, T, inb).item()
        assert abs(rank_losses[rank] - expect) <= max(tol, 4 * torch.finfo(dtype).eps) * abs(expect)
        for g, ref, gt in zip(res[("ddp", str(dtype), inb)][1], ref_grads, grad_tol):
            assert rel_err(g, ref) <= gt, (rank, rel_err(g, ref), gt)


def test_cross_rank_unequal_batches(dist_results):
    """Documented semantics with B_0 != B_1: DDP's average of per-rank means, (1/W) sum_r mean_{i in r} loss_i."""
    seed, results = dist_results
    sizes, G = (2, 3), 2
    enc = make_encoder(seed, torch.float64)
    xq, xd = make_batch(seed, sizes, G, torch.float64)
    emb = embed(enc, torch.cat([xq, xd]))
    q, d = emb[:len(xq)], emb[len(xq):]
    per_rank = [infonce_ref(q[rank_rows(sizes, r)], torch.cat([d[rank_rows(sizes, r, G)],
                                                               d[rank_rows(sizes, 1 - r, G)]]), G, T)
                for r in range(WORLD)]
    (sum(per_rank) / WORLD).backward()
    for rank, res in enumerate(results):
        loss, grads = res["ddp_unequal"]
        assert abs(loss - per_rank[rank].item()) <= 1e-10 * abs(loss)
        for g, p in zip(grads, enc.parameters()):
            assert rel_err(g, p.grad) <= 1e-10
    # and that differs from the global mean over the 5 queries (the weights are 1/4, 1/6 instead of 1/5)
    global_mean = infonce_ref(q, d, G, T)
    assert abs(sum(r.item() for r in per_rank) / WORLD - global_mean.item()) > 1e-6


def test_cross_rank_errors_reach_every_rank(dist_results):
    _, results = dist_results
    for key, mine in (("empty_queries", {1: "queries is empty"}), ("bad_docs", {0: "docs.size(0)=5"}),
                      ("temperature", {}), ("in_batch", {})):
        for rank, res in enumerate(results):
            msg, seconds = res[key]
            assert msg is not None and seconds < 10, (key, rank, res[key])
            expect = mine.get(rank, "failed their checks" if mine else "the ranks disagree")
            assert expect in msg, (key, rank, msg)
    assert "temperature 0.05" in results[0]["temperature"][0] and "temperature 0.1" in results[0]["temperature"][0]
    for res in results:
        assert res["double_backward"] is not None and "once_differentiable" in res["double_backward"]


def test_cached_infonce_cross_rank_ddp(dist_results):
    seed, results = dist_results
    ref_loss, ref_grads, _, _ = single_process(seed, (5, 5), 2, torch.float64)
    losses = [res["cached_ddp"][0] for res in results]
    assert abs(sum(losses) / WORLD - ref_loss) <= 1e-10 * abs(ref_loss)
    for res in results:
        for g, ref in zip(res["cached_ddp"][1], ref_grads):
            assert rel_err(g, ref) <= 1e-10


def test_all_gather_with_grad_unequal_sizes(dist_results):
    seed, results = dist_results
    sizes = (3, 5)
    gen = torch.Generator().manual_seed(seed + 2)
    xs = [torch.randn(n, 2, 3, generator=gen, dtype=torch.float64) for n in sizes]
    ws = [torch.randn(sum(sizes), 2, 3, generator=gen, dtype=torch.float64) for _ in sizes]
    y = torch.cat(xs).requires_grad_()
    # gradient of the sum of every rank's function: what each rank's rows must receive
    sum((ws[r] * y).sum() + (r + 1) * (y ** 3).sum() for r in range(WORLD)).backward()
    for rank, res in enumerate(results):
        gathered, grad = res["gather"]
        assert torch.equal(gathered, torch.cat(xs))
        torch.testing.assert_close(grad, y.grad[rank_rows(sizes, rank)], rtol=1e-12, atol=1e-12)


def test_all_gather_with_grad_shape_mismatch(dist_results):
    _, results = dist_results
    for res in results:
        assert res["mismatch"] is not None and res["mismatch"].startswith("all_gather_with_grad: rank 1 holds")
        assert "only dim 0 may differ" in res["mismatch"]
        assert res["too_many_dims"] == "all_gather_with_grad: rank 1 holds a tensor of more than 8 dims (at most 8)"
        assert res["odd_dtype"].startswith("all_gather_with_grad: rank 1 holds a tensor of a dtype that cannot be")


# ---- CachedInfoNCE -------------------------------------------------------------------------------------------------

class DropoutEncoder(nn.Module):
    def __init__(self, in_dim=6, hidden=24, out=16, p=0.3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Dropout(p), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.Dropout(p), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, x, scale):
        # two inputs per row, as tokenized inputs have (input_ids, attention_mask)
        return F.normalize(self.net(x) * scale, dim=-1)


def embed_fn_for(model):
    return lambda b: model(b["x"], b["scale"])


def make_inputs(B, G, in_dim=6, dtype=torch.float32):
    q = {"x": torch.randn(B, in_dim, dtype=dtype), "scale": torch.rand(B, 1, dtype=dtype) + 0.5}
    d = {"x": torch.randn(B * G, in_dim, dtype=dtype), "scale": torch.rand(B * G, 1, dtype=dtype) + 0.5}
    return q, d


def chunked_full_graph(embed_fn, loss_fn, q_in, d_in, G, chunk):
    """The whole batch in one graph, encoded chunk by chunk in the order GradCache encodes it (so dropout draws
    the same masks from the same seed): the value and gradients GradCache must reproduce."""
    def enc(inputs):
        n = next(iter(inputs.values())).shape[0]
        return torch.cat([embed_fn({k: v[b:b + chunk] for k, v in inputs.items()}) for b in range(0, n, chunk)])
    loss = loss_fn(enc(q_in), enc(d_in), G)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("inb", [True, False], ids=["inbatch", "owngroup"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cached_matches_whole_batch_with_dropout(chunk, inb, dtype):
    B, G = 5, 3
    model = DropoutEncoder().to(dtype).train()
    embed_fn, loss_fn = embed_fn_for(model), InfoNCELoss(0.05, in_batch_negatives=inb)
    q_in, d_in = make_inputs(B, G, dtype=dtype)
    seed = int(torch.randint(0, 2 ** 31, ()).item())

    torch.manual_seed(seed)
    loss = CachedInfoNCE(embed_fn, loss_fn, chunk).forward_backward(q_in, d_in, G)
    after_cached = torch.rand(())  # (c) replays inside fork_rng: the caller's RNG stream is as after (a)
    grads = _grads(model)
    model.zero_grad()

    torch.manual_seed(seed)
    ref = chunked_full_graph(embed_fn, loss_fn, q_in, d_in, G, chunk)
    assert torch.rand(()) == after_cached
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert not loss.requires_grad
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for g, p in zip(grads, model.parameters()):
        assert rel_err(g, p.grad) <= tol, rel_err(g, p.grad)

    # the dropout masks matter: another seed gives other gradients (so the replay above was really tested)
    model.zero_grad()
    torch.manual_seed(seed + 1)
    chunked_full_graph(embed_fn, loss_fn, q_in, d_in, G, chunk)
    assert max(rel_err(g, p.grad) for g, p in zip(grads, model.parameters())) > 1e-3


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_cached_matches_unchunked_without_dropout(chunk):
    """Deterministic encoder: GradCache equals one forward of the whole batch."""
    B, G = 6, 2
    model = DropoutEncoder().eval()
    embed_fn, loss_fn = embed_fn_for(model), InfoNCELoss(0.05)
    q_in, d_in = make_inputs(B, G)
    loss = CachedInfoNCE(embed_fn, loss_fn, chunk).forward_backward(q_in, d_in, G)
    grads = _grads(model)
    model.zero_grad()
    ref = loss_fn(embed_fn(q_in), embed_fn(d_in), G)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g, p in zip(grads, model.parameters()):
        assert rel_err(g, p.grad) <= 1e-5


def test_cached_loss_scale_and_accumulation():
    B, G = 4, 2
    model = DropoutEncoder().eval()
    embed_fn, loss_fn = embed_fn_for(model), InfoNCELoss(0.05)
    q_in, d_in = make_inputs(B, G)
    cached = CachedInfoNCE(embed_fn, loss_fn, 3)
    loss1 = cached.forward_backward(q_in, d_in, G)
    g1 = _grads(model)
    model.zero_grad()
    loss_a = cached.forward_backward(q_in, d_in, G, loss_scale=0.25)
    loss_b = cached.forward_backward(q_in, d_in, G, loss_scale=torch.tensor(0.25))  # accumulates, like backward()
    assert loss_a.item() == loss_b.item() == loss1.item()  # the returned loss is unscaled
    for g, p in zip(g1, model.parameters()):
        assert rel_err(p.grad, 0.5 * g) <= 1e-6


def test_cached_no_sync_wraps_all_chunks_but_the_last():
    B, G, chunk = 5, 2, 2  # 3 query chunks + 5 doc chunks
    model = DropoutEncoder().eval()
    calls = []

    class Recorder:
        def __init__(self):
            self.active = False

        def __call__(self):
            return self

        def __enter__(self):
            self.active = True
            calls.append("enter")

        def __exit__(self, *exc):
            self.active = False

    rec = Recorder()
    grad_calls = []

    def embed_fn(b):
        if torch.is_grad_enabled():
            grad_calls.append(rec.active)
        return model(b["x"], b["scale"])

    q_in, d_in = make_inputs(B, G)
    CachedInfoNCE(embed_fn, InfoNCELoss(0.05), chunk).forward_backward(q_in, d_in, G, no_sync=rec)
    assert grad_calls == [True] * 7 + [False]
    assert len(calls) == 7


def test_cached_real_default_model():
    """The bundled all-MiniLM-L6-v2 through NVEmbedModel in train mode (hidden dropout 0.1): GradCache with chunk 2
    equals the whole batch in one graph."""
    pytest.importorskip("transformers")
    model = nvembed.load("default").train()
    tok = model.tokenizer
    queries = ["how do I sort a list", "what is a tensor", "capital of france", "fast matrix multiply"]
    docs = ["sorted() returns a new sorted list", "list.sort sorts in place",
            "a tensor is an n-dimensional array", "tensors live on devices",
            "Paris is the capital of France", "Lyon is a city in France",
            "BLAS gemm multiplies matrices", "Strassen's algorithm is sub-cubic"]
    q_in = dict(tok(queries, padding=True, return_tensors="pt"))
    d_in = dict(tok(docs, padding=True, return_tensors="pt"))

    def embed_fn(b):
        return model(b["input_ids"], b["attention_mask"])["sentence_embeddings"]

    loss_fn = InfoNCELoss(0.05)
    seed = int(torch.randint(0, 2 ** 31, ()).item())
    torch.manual_seed(seed)
    loss = CachedInfoNCE(embed_fn, loss_fn, 2).forward_backward(q_in, d_in, 2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    ref = chunked_full_graph(embed_fn, loss_fn, q_in, d_in, 2, 2)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 90
    worst = max(rel_err(grads[n], ref_grads[n]) for n in grads)
    assert worst <= 1e-5, worst


# ---- bad inputs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"in_batch_negatives": 1}, "in_batch_negatives"), ({"cross_rank": "yes"}, "cross_rank"),
])
def test_infonce_loss_bad_init(kwargs, match):
    with pytest.raises(ERR, match="InfoNCELoss: " + match):
        InfoNCELoss(**kwargs)


@pytest.mark.parametrize("case,match", [
    ("queries_1d", r"queries must be 2-D"), ("docs_3d", r"docs must be 2-D"),
    ("queries_not_tensor", "queries must be a torch.Tensor"), ("empty", "queries is empty"),
    ("d_mismatch", r"docs\.size\(1\)=5 is not queries\.size\(1\)=4"),
    ("not_divisible", r"docs\.size\(0\)=7 is not a positive multiple of queries\.size\(0\)=2"),
    ("group_size_mismatch", r"docs\.size\(0\)=6 is not queries\.size\(0\)\*group_size=4"),
    ("group_size_zero", "group_size must be an int >= 1"), ("group_size_float", "group_size must be an int >= 1"),
])
def test_infonce_loss_bad_inputs(case, match):
    q, docs, G = torch.randn(2, 4), torch.randn(6, 4), None
    if case == "queries_1d":
        q = q[0]
    elif case == "docs_3d":
        docs = docs.view(2, 3, 4)
    elif case == "queries_not_tensor":
        q = q.tolist()
    elif case == "empty":
        q = q[:0]
    elif case == "d_mismatch":
        docs = torch.randn(6, 5)
    elif case == "not_divisible":
        docs = torch.randn(7, 4)
    elif case == "group_size_mismatch":
        G = 2
    elif case == "group_size_zero":
        G = 0
    elif case == "group_size_float":
        G = 3.0
    with pytest.raises(ERR, match="InfoNCELoss: " + match):
        InfoNCELoss()(q, docs, G)


def test_infonce_loss_op_errors_pass_through():
    with pytest.raises(ERR, match=r"nvembed::infonce: queries has dtype"):
        InfoNCELoss()(torch.randn(2, 4, dtype=torch.float16), torch.randn(4, 4, dtype=torch.float16))


def test_cached_bad_init():
    loss = InfoNCELoss()
    with pytest.raises(TypeError, match="CachedInfoNCE: embed_fn must be callable"):
        CachedInfoNCE(None, loss, 2)
    with pytest.raises(TypeError, match="CachedInfoNCE: loss must be an InfoNCELoss"):
        CachedInfoNCE(lambda b: b["x"], nn.CrossEntropyLoss(), 2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="CachedInfoNCE: chunk_size must be an int >= 1"):
            CachedInfoNCE(lambda b: b["x"], loss, bad)


def test_cached_partly_frozen_and_upstream_graphs():
    """GradCache equals the unchunked loss where only some chunks' embeddings need gradients (a frozen query tower; a
    frozen encoder whose query inputs require grad) and where the inputs are outputs of a trainable graph (each
    chunk's backward freed that shared graph before)."""
    torch.manual_seed(0)
    B, G, D = 4, 2, 6
    qenc, denc = nn.Linear(D, 5).double(), nn.Linear(D, 5).double()
    xq, xd = torch.randn(B, D, dtype=torch.float64), torch.randn(B * G, D, dtype=torch.float64)
    loss_fn = InfoNCELoss(0.1)

    def towers(b):
        return F.normalize((denc if b["doc"] else qenc)(b["x"]), dim=-1)

    qenc.requires_grad_(False)
    ref = loss_fn(towers({"x": xq, "doc": False}), towers({"x": xd, "doc": True}), G)
    ref.backward()
    g_ref, denc.weight.grad = denc.weight.grad.clone(), None
    loss = CachedInfoNCE(towers, loss_fn, 2).forward_backward({"x": xq, "doc": False}, {"x": xd, "doc": True}, G)
    assert abs(loss - ref).item() < 1e-12 and torch.allclose(denc.weight.grad, g_ref, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"doc_inputs rows 6:8, the last chunk, does not require grad"):
        qenc.requires_grad_(True), denc.requires_grad_(False)
        CachedInfoNCE(towers, loss_fn, 2).forward_backward({"x": xq, "doc": False}, {"x": xd, "doc": True}, G,
                                                           no_sync=nullcontext)
    denc.requires_grad_(True)

    def single(b):
        return F.normalize(denc(b["x"]), dim=-1)

    for frozen_encoder in (True, False):
        denc.requires_grad_(not frozen_encoder)
        denc.zero_grad()
        W = torch.randn(D, D, dtype=torch.float64, requires_grad=True)
        xq_leaf = xq.clone().requires_grad_()
        ref = loss_fn(single({"x": xq_leaf @ W}), single({"x": xd @ W}), G)
        ref.backward()
        refs = [t.grad.clone() for t in (W, xq_leaf)]
        W.grad = xq_leaf.grad = None
        loss = CachedInfoNCE(single, loss_fn, 3).forward_backward({"x": xq_leaf @ W}, {"x": xd @ W}, G)
        assert abs(loss - ref).item() < 1e-12
        for got, want in zip((W.grad, xq_leaf.grad), refs):
            assert torch.allclose(got, want, atol=1e-12)
    # a frozen encoder, only the queries require grad: the doc chunks have nothing to push back
    xq_leaf = xq.clone().requires_grad_()
    ref = loss_fn(single({"x": xq_leaf}), single({"x": xd}), G)
    ref.backward()
    want, xq_leaf.grad = xq_leaf.grad.clone(), None
    loss = CachedInfoNCE(single, loss_fn, 3).forward_backward({"x": xq_leaf}, {"x": xd}, G)
    assert abs(loss - ref).item() < 1e-12 and torch.allclose(xq_leaf.grad, want, atol=1e-12)
    denc.requires_grad_(True)


@pytest.mark.parametrize("case,match", [
    ("rows", r"embed_fn returned shape \(1, 16\) for query_inputs rows 0:2; expected \[2, d\]"),
    ("rank", r"embed_fn returned shape \(2,\) for query_inputs rows 0:2"),
    ("dim", r"embed_fn returned shape \(2, 15\) for doc_inputs rows 0:2; expected \[2, 16\]"),
    ("not_tensor", r"embed_fn must return a tensor, got list"),
    ("int", r"embed_fn returned dtype torch.int64"),
    ("frozen", r"embed_fn's output for query_inputs rows 0:2 does not require grad"),
])
def test_cached_bad_embed_fn(case, match):
    model = DropoutEncoder().eval()

    def embed_fn(b):
        e = model(b["x"], b["scale"])
        if case == "rows":
            return e[:1]
        if case == "rank":
            return e[:, 0]
        if case == "dim" and b["is_doc"]:  # queries embed to 16 dims, docs to 15
            return e[:, :15]
        if case == "not_tensor":
            return e.tolist()
        if case == "int":
            return e.long()
        if case == "frozen":
            return e.detach()
        return e

    q_in, d_in = make_inputs(2, 2)
    q_in["is_doc"], d_in["is_doc"] = False, True  # not a tensor: passed to every chunk as is
    with pytest.raises(ERR, match="CachedInfoNCE: " + match):
        CachedInfoNCE(embed_fn, InfoNCELoss(), 2).forward_backward(q_in, d_in, 2)


@pytest.mark.parametrize("case,match", [
    ("not_dict", "query_inputs must be a non-empty dict"), ("empty_dict", "query_inputs must be a non-empty dict"),
    ("no_tensor", "query_inputs holds no tensor with a batch dim"),
    ("ragged", "the tensors of doc_inputs disagree on the batch size"),
    ("empty_batch", "query_inputs is an empty batch"),
    ("doc_count", r"doc_inputs holds 8 docs, not query_inputs' 4 queries \* group_size 3 = 12"),
    ("group_size", "group_size must be an int >= 1"),
    ("no_sync", "no_sync must be a callable"), ("loss_scale", "loss_scale must be a finite number"),
])
def test_cached_bad_inputs(case, match):
    model = DropoutEncoder().eval()
    q_in, d_in = make_inputs(4, 2)
    G, kwargs = 2, {}
    if case == "not_dict":
        q_in = [q_in["x"]]
    elif case == "empty_dict":
        q_in = {}
    elif case == "no_tensor":
        q_in = {"x": "text"}
    elif case == "ragged":
        d_in["scale"] = d_in["scale"][:-1]
    elif case == "empty_batch":
        q_in = {k: v[:0] for k, v in q_in.items()}
    elif case == "doc_count":
        G = 3
    elif case == "group_size":
        G = 0
    elif case == "no_sync":
        kwargs["no_sync"] = object()
    elif case == "loss_scale":
        kwargs["loss_scale"] = float("nan")
    with pytest.raises(ERR, match="CachedInfoNCE: " + match):
        CachedInfoNCE(embed_fn_for(model), InfoNCELoss(), 2).forward_backward(q_in, d_in, G, **kwargs)


def test_all_gather_with_grad_bad_input():
    with pytest.raises(TypeError, match="all_gather_with_grad: tensor must be a torch.Tensor"):
        all_gather_with_grad([1, 2])
