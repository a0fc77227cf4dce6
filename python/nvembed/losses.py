"""Contrastive training losses on the tiled InfoNCE op (torch.ops.nvembed.infonce).

- :func:`all_gather_with_grad`: autograd-aware all_gather along dim 0 (ranks may hold different batch sizes).
- :class:`InfoNCELoss`: InfoNCE over grouped docs, optionally with every other rank's docs as extra negatives.
- :class:`CachedInfoNCE`: GradCache (Gao et al. 2021, https://arxiv.org/abs/2101.06983; sentence-transformers'
  CachedMultipleNegativesRankingLoss) for batches whose encoder activations do not fit in memory at once.

Batch layout, as in FlagEmbedding: queries [B, d]; docs [B*G, d] where docs[i*G] is query i's positive and
docs[i*G+1:(i+1)*G] its hard negatives. The op scores each query against all B*G docs (in-batch negatives) or
its own G docs, plus, across ranks, the E docs of the other ranks placed after the B*G own ones.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CachedInfoNCE", "InfoNCELoss", "all_gather_with_grad"]


# ---- cross-rank gather -------------------------------------------------------------------------------------------

def _distributed_world(group) -> int:
    """World size of `group`, or 1 when torch.distributed is not initialized (the losses then act locally)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


# all_gather needs the same shape on every rank: a fixed-length header (ndim, dtype, shape) is exchanged first.
_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def _exchange_shapes(tensor: torch.Tensor, group, what: str) -> List[int]:
    """Every rank's dim-0 size. Checks, identically on every rank (so all raise together, none hangs), that the
    ranks agree on ndim, dtype and the trailing dims."""
    # a rank whose tensor cannot be described (too many dims, a dtype outside _DTYPES) says so in its header, so that
    # every rank raises after the exchange instead of one raising before it and the others waiting
    fits = tensor.dim() <= _MAX_DIMS
    code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else len(_DTYPES)
    header = torch.full((2 + _MAX_DIMS,), -1, dtype=torch.int64, device=tensor.device)
    header[0], header[1] = (tensor.dim() if fits else -2), code
    if fits:
        header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    headers = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(headers, header, group=group)
    headers = [h.tolist() for h in headers]
    for r, h in enumerate(headers):
        if h[0] == -2:
            raise ValueError(f"{what}: rank {r} holds a tensor of more than {_MAX_DIMS} dims (at most {_MAX_DIMS})")
        if h[1] == len(_DTYPES):
            raise ValueError(f"{what}: rank {r} holds a tensor of a dtype that cannot be gathered (one of "
                             f"{', '.join(str(d) for d in _DTYPES)})")
    shapes = [tuple(h[2:2 + h[0]]) for h in headers]
    dtypes = [str(_DTYPES[h[1]]) for h in headers]
    for r in range(len(headers)):
        if len(shapes[r]) != len(shapes[0]) or dtypes[r] != dtypes[0] or shapes[r][1:] != shapes[0][1:]:
            raise ValueError(f"{what}: rank {r} holds a tensor of shape {shapes[r]} and {dtypes[r]}, rank 0 one of "
                             f"shape {shapes[0]} and {dtypes[0]}: only dim 0 may differ across ranks")
    if tensor.dim() == 0:
        raise ValueError(f"{what}: tensor must have at least one dim (gathered along dim 0), got a 0-dim tensor")
    return [s[0] for s in shapes]


def _all_gather_rows(tensor: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenation of every rank's `tensor` along dim 0, given every rank's dim-0 size."""
    world = len(sizes)
    x = tensor.contiguous()
    longest = max(sizes)
    if any(s != longest for s in sizes):  # pad to a common size, trim after the exchange
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[:x.shape[0]] = x
        x = padded
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group, sizes):
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.begin = sum(sizes[:rank])
        ctx.end = ctx.begin + sizes[rank]
        return _all_gather_rows(tensor, sizes, group)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the in-place all_reduce has no derivative: double backward
    def backward(ctx, grad):                      # raises instead of silently treating it as the identity
        # Every rank's loss may read every rank's rows: this rank's rows get the sum of all ranks' gradients for
        # them (see all_gather_with_grad for why a sum, not a mean).
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming gradient may be shared
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.begin:ctx.end], None, None


def _gather_with_sizes(tensor: torch.Tensor, group, what: str) -> Tuple[torch.Tensor, List[int]]:
    sizes = _exchange_shapes(tensor, group, what)
    return _AllGatherWithGrad.apply(tensor, group, sizes), sizes


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (rank order), differentiably. Ranks may hold different
    dim-0 sizes; ndim, dtype and the other dims must agree (ValueError on every rank otherwise). Without an
    initialized process group, or with one rank, returns `tensor` itself.

    Backward: this rank receives the SUM over ranks of the gradients with respect to its rows (an all_reduce of the
    gathered gradient, then this rank's slice). Why a sum: with per-rank losses L_r, the training objective is their
    mean L = (1/W) sum_r L_r, and DDP averages parameter gradients over the W ranks. The rows x_s of rank s feed
    every L_r, so dL/dx_s = (1/W) sum_r dL_r/dx_s. Rank s backpropagates sum_r dL_r/dx_s into its own encoder, and
    DDP's average over ranks supplies the 1/W: the averaged parameter gradient is exactly dL/dtheta, the
    single-process gradient of the mean loss over the concatenated batch (when that mean is the mean of the
    per-rank losses; see InfoNCELoss for unequal batch sizes). Returning only this rank's own dL_s/dx_s, as a
    plain all_gather would, loses the other ranks' terms.

    The backward's all_reduce is a collective: every rank must run it (every rank backpropagates its loss).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_gather_with_grad: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if _distributed_world(group) == 1:
        return tensor
    return _gather_with_sizes(tensor, group, "all_gather_with_grad")[0]


# ---- InfoNCE -------------------------------------------------------------------------------------------------------

def _check_2d(name: str, what: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: {what} must be 2-D [{'B' if what == 'queries' else 'B*G'}, d], got shape "
                         f"{tuple(t.shape)}")


def _check_group_size(name: str, group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: group_size must be an int >= 1, got {group_size!r}")
    return group_size


class InfoNCELoss(nn.Module):
    """InfoNCE over grouped docs on the tiled op (never materializes the B x N logits).

    forward(queries [B, d], docs [B*G, d], group_size=None) -> scalar: the mean over this rank's B queries of
    -log softmax(q_i . docs / temperature)[positive]. docs[i*G] is query i's positive, docs[i*G+1:(i+1)*G] its
    hard negatives; group_size defaults to docs.size(0) // B. The embeddings are used as given (normalize them
    first for cosine similarity, as NV-Embed trains).

    in_batch_negatives: softmax over all docs of the batch (else over the query's own G docs only).

    cross_rank (with torch.distributed initialized and world size > 1; otherwise local): every rank's docs are
    gathered with all_gather_with_grad and ordered [this rank's B*G docs, then the other ranks' docs in rank
    order]; the other ranks' docs are extra negatives of the op, so its target i*G still points at the positive.
    Each rank scores only its own queries against the global docs (B x N tiles, never (sum B) x N). The loss is the
    mean over this rank's queries. With equal per-rank batch sizes and DDP's gradient averaging, the mean of the
    rank losses and the averaged gradients equal the single-process loss and gradients on the concatenated batch
    (whose docs are the same set, in another column order: the softmax does not care). With unequal sizes B_r,
    each query of rank r is weighted 1 / (W * B_r) instead of 1 / sum(B): the objective is the mean of per-rank
    means; to get the global mean, scale rank r's loss by W * B_r / sum(B) before backward. Docs per rank may
    differ in count too (only the embedding dim must agree), and group_size may differ across ranks.
    With in_batch_negatives=False the loss reads only each query's own G docs, so there is nothing to gather:
    cross_rank is then a no-op (the per-rank loss is already its share of the global one).
    """

    def __init__(self, temperature: float = 0.02, in_batch_negatives: bool = True, cross_rank: bool = False,
                 group=None):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"InfoNCELoss: temperature must be finite and > 0, got {temperature!r}")
        for name, v in (("in_batch_negatives", in_batch_negatives), ("cross_rank", cross_rank)):
            if not isinstance(v, bool):
                raise TypeError(f"InfoNCELoss: {name} must be a bool, got {v!r}")
        self.temperature = float(temperature)
        self.in_batch_negatives = in_batch_negatives
        self.cross_rank = cross_rank
        self.group = group

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, in_batch_negatives={self.in_batch_negatives}, "
                f"cross_rank={self.cross_rank}")

    def resolve_group_size(self, queries: torch.Tensor, docs: torch.Tensor, group_size: Optional[int] = None) -> int:
        """Checks the shapes of (queries, docs, group_size); returns G."""
        _check_2d("InfoNCELoss", "queries", queries)
        _check_2d("InfoNCELoss", "docs", docs)
        B, N = queries.shape[0], docs.shape[0]
        if B == 0:
            raise ValueError("InfoNCELoss: queries is empty (queries.size(0) = 0)")
        if docs.shape[1] != queries.shape[1]:
            raise ValueError(f"InfoNCELoss: docs.size(1)={docs.shape[1]} is not queries.size(1)={queries.shape[1]}")
        if group_size is None:
            if N % B != 0 or N == 0:
                raise ValueError(f"InfoNCELoss: docs.size(0)={N} is not a positive multiple of queries.size(0)={B}, "
                                 "so group_size cannot be inferred: docs must be [B*G, d] (each query's positive, "
                                 "then its G-1 hard negatives)")
            return N // B
        group_size = _check_group_size("InfoNCELoss", group_size)
        if N != B * group_size:
            raise ValueError(f"InfoNCELoss: docs.size(0)={N} is not queries.size(0)*group_size={B * group_size}")
        return group_size

    def _agree_across_ranks(self, queries, error: Optional[Exception]) -> None:
        """One small all_gather before anything can raise on one rank only (cross_rank, world > 1): every rank's
        inputs passed their checks, and the ranks agree on temperature and in_batch_negatives. Otherwise every rank
        raises (a rank whose own inputs failed raises its own error), where a local raise would leave the other
        ranks waiting in the docs gather until the process group's timeout."""
        if isinstance(queries, torch.Tensor):
            device = queries.device
        elif dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        temp_bits = torch.tensor([self.temperature], dtype=torch.float64).view(torch.int64).item()
        header = torch.tensor([error is None, self.in_batch_negatives, temp_bits], dtype=torch.int64, device=device)
        headers = [torch.empty_like(header) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(headers, header, group=self.group)
        rows = [h.tolist() for h in headers]
        if error is not None:
            raise error
        bad = [r for r, h in enumerate(rows) if not h[0]]
        if bad:
            raise ValueError(f"InfoNCELoss (cross_rank): the inputs of rank(s) {bad} failed their checks (see the "
                             "error raised there); every rank stops here instead of waiting for them")
        if any(h[1:] != rows[0][1:] for h in rows):
            def temp(h):
                return torch.tensor([h[2]], dtype=torch.int64).view(torch.float64).item()
            listed = ", ".join(f"rank {r}: temperature {temp(h)}, in_batch_negatives {bool(h[1])}"
                               for r, h in enumerate(rows))
            raise ValueError(f"InfoNCELoss (cross_rank): the ranks disagree ({listed}); every rank must compute the "
                             "same loss")

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
        if self.cross_rank and _distributed_world(self.group) > 1:
            try:
                G = self.resolve_group_size(queries, docs, group_size)
                error = None
            except (TypeError, ValueError) as e:
                error = e
            self._agree_across_ranks(queries, error)
        else:
            G = self.resolve_group_size(queries, docs, group_size)
        if self.cross_rank and self.in_batch_negatives and _distributed_world(self.group) > 1:
            gathered, sizes = _gather_with_sizes(docs, self.group, "InfoNCELoss (cross_rank docs)")
            rank = dist.get_rank(self.group)
            begin = sum(sizes[:rank])
            end = begin + sizes[rank]
            # own docs first: the op's target for query i is row i*G
            docs = torch.cat([gathered[begin:end], gathered[:begin], gathered[end:]])
        return torch.ops.nvembed.infonce(queries, docs, G, self.temperature, self.in_batch_negatives)


# ---- GradCache -----------------------------------------------------------------------------------------------------

class _RandContext:
    """Snapshot of the CPU RNG and of the CUDA RNG of every device in use, restored (inside fork_rng, so the
    caller's RNG stream is left as it was) on enter: the re-encoding draws the same dropout masks."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.cpu_state = torch.get_rng_state()
        devices = {t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.device.type == "cuda"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # the encoder may live on a GPU while its inputs are still on the CPU
            devices.add(torch.cuda.current_device())
        self.devices = sorted(devices)
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for d, s in zip(self.devices, self.cuda_states):
            torch.cuda.set_rng_state(s, d)

    def __exit__(self, *exc):
        fork, self._fork = self._fork, None
        return fork.__exit__(*exc)


Inputs = Dict[str, Union[torch.Tensor, object]]


def _batch_size(inputs, what: str) -> int:
    if not isinstance(inputs, dict) or not inputs:
        raise TypeError(f"CachedInfoNCE: {what} must be a non-empty dict of tensors with the batch in dim 0, got "
                        f"{type(inputs).__name__}{' (empty)' if isinstance(inputs, dict) else ''}")
    sizes = {k: v.shape[0] for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    if not sizes:
        raise ValueError(f"CachedInfoNCE: {what} holds no tensor with a batch dim: {sorted(inputs)}")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"CachedInfoNCE: the tensors of {what} disagree on the batch size (dim 0): {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"CachedInfoNCE: {what} is an empty batch")
    return n


def _slice(inputs: Inputs, begin: int, end: int) -> Inputs:
    """Rows begin:end of every batched tensor; anything else (flags, 0-dim tensors) is passed through."""
    return {k: v[begin:end] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in inputs.items()}


class CachedInfoNCE:
    """GradCache for InfoNCELoss: the loss of a batch larger than the encoder's activations allow, with the same
    value and gradients as the whole batch in one graph.

    embed_fn(inputs) -> [n, d] runs the (trainable) encoder on a chunk of tokenized inputs (a dict of tensors with
    the batch in dim 0, e.g. input_ids / attention_mask), with gradients when they are enabled. chunk_size: rows
    per encoder call; only one chunk's activations are alive at a time.

    forward_backward(query_inputs, doc_inputs, group_size, no_sync=None, loss_scale=1.0) -> the loss (detached):
      (a) embed every chunk of queries and docs without a graph, saving each chunk's RNG state (CPU and CUDA);
      (b) the loss on the cached embeddings (leaf tensors, the tiled op; across ranks with a cross_rank loss, whose
          gather and its backward's all_reduce happen here, once) and its backward down to the embeddings;
      (c) re-encode each chunk with gradients under its saved RNG state (the same dropout masks) and backpropagate
          the cached embedding gradients through it into the parameters (which accumulate, as after a plain
          loss.backward(); zero them as usual).
    The encoder runs forward twice per chunk (once without a graph): with a backward costing ~2 forwards, about 4/3
    the compute of one forward + backward, for the activation memory of one chunk instead of the whole batch. The
    chunks are plain row slices (no trimming of padding columns), so each chunk is encoded exactly as in the batch.

    no_sync: a callable returning a context manager, e.g. DDP's `model.no_sync`; chunks but the last are
    re-encoded and backpropagated inside it, so DDP all-reduces the accumulated gradients once, after the last.
    Under DDP every rank must run forward_backward the same number of times; with DDP's broadcast_buffers and a
    module that has buffers each encoder call is a collective too, so then the ranks must also have the same
    number of chunks (equal batch sizes), or pass broadcast_buffers=False.

    loss_scale: the gradients are those of loss_scale * loss (e.g. 1/k for k gradient-accumulation steps, or an
    AMP GradScaler's scale); the returned loss is unscaled.
    """

    def __init__(self, embed_fn: Callable[[Inputs], torch.Tensor], loss: InfoNCELoss, chunk_size: int):
        if not callable(embed_fn):
            raise TypeError(f"CachedInfoNCE: embed_fn must be callable, got {type(embed_fn).__name__}")
        if not isinstance(loss, InfoNCELoss):
            raise TypeError(f"CachedInfoNCE: loss must be an InfoNCELoss, got {type(loss).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"CachedInfoNCE: chunk_size must be an int >= 1, got {chunk_size!r}")
        self.embed_fn = embed_fn
        self.loss = loss
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"CachedInfoNCE(chunk_size={self.chunk_size}, loss={self.loss!r})"

    def _embed(self, inputs: Inputs, begin: int, end: int, what: str, dim: Optional[int]) -> torch.Tensor:
        emb = self.embed_fn(_slice(inputs, begin, end))
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"CachedInfoNCE: embed_fn must return a tensor, got {type(emb).__name__} for {what} "
                            f"rows {begin}:{end}")
        expected = f"[{end - begin}, {dim if dim is not None else 'd'}]"
        if emb.dim() != 2 or emb.shape[0] != end - begin or (dim is not None and emb.shape[1] != dim):
            raise ValueError(f"CachedInfoNCE: embed_fn returned shape {tuple(emb.shape)} for {what} rows "
                             f"{begin}:{end}; expected {expected}")
        if not emb.is_floating_point():
            raise TypeError(f"CachedInfoNCE: embed_fn returned dtype {emb.dtype} for {what} rows {begin}:{end}; "
                            "expected floating-point embeddings")
        return emb

    def _ranges(self, n: int) -> List[Tuple[int, int]]:
        return [(b, min(b + self.chunk_size, n)) for b in range(0, n, self.chunk_size)]

    def forward_backward(self, query_inputs: Inputs, doc_inputs: Inputs, group_size: int,
                         no_sync: Optional[Callable[[], ContextManager]] = None,
                         loss_scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        B = _batch_size(query_inputs, "query_inputs")
        N = _batch_size(doc_inputs, "doc_inputs")
        G = _check_group_size("CachedInfoNCE", group_size)
        if N != B * G:
            raise ValueError(f"CachedInfoNCE: doc_inputs holds {N} docs, not query_inputs' {B} queries * "
                             f"group_size {G} = {B * G}")
        if no_sync is not None and not callable(no_sync):
            raise TypeError(f"CachedInfoNCE: no_sync must be a callable returning a context manager (e.g. DDP's "
                            f"model.no_sync), got {type(no_sync).__name__}")
        if isinstance(loss_scale, torch.Tensor):
            if loss_scale.numel() != 1:
                raise ValueError(f"CachedInfoNCE: loss_scale must be a scalar, got shape {tuple(loss_scale.shape)}")
        elif isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale):
            raise ValueError(f"CachedInfoNCE: loss_scale must be a finite number, got {loss_scale!r}")

        # (a) embeddings without a graph, and the RNG state each chunk's encoding started from
        chunks = [(inputs, what, r) for inputs, what, n in ((query_inputs, "query_inputs", B), (doc_inputs,
                                                                                              "doc_inputs", N))
                  for r in self._ranges(n)]
        cached, states = [], []
        dim = None
        with torch.no_grad():
            for inputs, what, (b, e) in chunks:
                states.append(_RandContext([v for v in inputs.values() if isinstance(v, torch.Tensor)]))
                emb = self._embed(inputs, b, e, what, dim)
                dim = emb.shape[1]
                cached.append(emb.detach())
        nq = len(self._ranges(B))

        # (b) the loss on the cached embeddings, backpropagated to them only
        with torch.enable_grad():
            q = torch.cat(cached[:nq]).requires_grad_()
            d = torch.cat(cached[nq:]).requires_grad_()
            loss = self.loss(q, d, G)
            (loss * loss_scale).backward()
        grads = list(q.grad.split([e - b for _, _, (b, e) in chunks[:nq]])) + list(
            d.grad.split([e - b for _, _, (b, e) in chunks[nq:]]))
        del q, d, cached

        # (c) re-encode chunk by chunk with a graph and push the cached gradients through it. Input tensors that are
        # outputs of a graph (e.g. inputs_embeds from a trainable module) are re-encoded from detached leaf copies, and
        # their gradients go up that graph once at the end (each chunk's backward would free the shared graph).
        upstream = {}  # id(original input tensor) -> (original, leaf copy)

        def leafed(inputs):
            out = {}
            for key, v in inputs.items():
                if isinstance(v, torch.Tensor) and v.requires_grad and v.grad_fn is not None:
                    if id(v) not in upstream:
                        upstream[id(v)] = (v, v.detach().requires_grad_())
                    v = upstream[id(v)][1]
                out[key] = v
            return out

        leaf_inputs = {"query_inputs": leafed(query_inputs), "doc_inputs": leafed(doc_inputs)}
        frozen = []  # chunks whose embeddings need no gradient (e.g. a frozen query tower): nothing to push
        with torch.enable_grad():
            for k, ((_, what, (b, e)), state, grad) in enumerate(zip(chunks, states, grads)):
                last = k == len(chunks) - 1
                sync = nullcontext() if (last or no_sync is None) else no_sync()
                with sync:  # DDP prepares its reduction in forward: the forward belongs inside too
                    with state:
                        emb = self._embed(leaf_inputs[what], b, e, what, dim)
                    if not emb.requires_grad:
                        frozen.append(f"{what} rows {b}:{e}")
                        if last and no_sync is not None and len(frozen) < len(chunks):
                            raise RuntimeError(f"CachedInfoNCE: embed_fn's output for {what} rows {b}:{e}, the last "
                                               "chunk, does not require grad, so the gradient synchronization that "
                                               "no_sync defers to it never happens: give the trainable inputs last")
                        continue
                    emb.backward(grad.to(emb.dtype))
        if len(frozen) == len(chunks):
            raise RuntimeError(f"CachedInfoNCE: embed_fn's output for {frozen[0]} does not require grad (nor does any "
                               "other chunk's): the encoder has no trainable parameters in use, or embed_fn disables "
                               "gradients")
        pairs = [(orig, leaf.grad) for orig, leaf in upstream.values() if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return loss.detach()
