"""End-to-end inference benchmark: NVEmbedModel on our kernels (backbone attention through the "nvembed" attention
interface = torch.ops.nvembed.flash_attn, pooling = torch.ops.nvembed.latent_pool) against the released NV-Embed
modeling code path (tests/released_nvembed.py, the tests' parity reference) with SDPA attention and its
non-causal padding mask. Same random weights, same batches, both in one run.

    python bench/gpu_model_e2e.py --out DIR                     # GPU: Mistral-7B-shaped, 4 layers, B32 L512, bf16
    python bench/gpu_model_e2e.py --tiny --device cpu --out DIR  # seconds on a CPU (keeps the script honest)

Model (randomly initialized, NVEMBED_FACTS (a)/(b) shapes): hidden 4096, 32 query heads / 8 KV heads of dim 128,
MLP 14336, vocab 32000, --layers of them (default 4; the release has 32), then the latent layer (512 latents,
8 cross heads x dim_head 4096, GEGLU FF mult 4). Batches: --batch rows right-padded to --seq-len, row lengths
uniform in [L/4, L] (the first row full), fresh random token ids for every forward, the first 16 positions (an
instruction) left out of pooling as NV-Embed's encode() does.

Method: torch.inference_mode(); both paths first run one batch and must agree (per-row cosine > 0.99) before any
timing; then --warmup forwards and --iters timed ones per path, CUDA events around each forward (perf_counter on
the CPU), median reported (p20/p80/min too) with texts/s and the speedup over the released path. Before that, a
tiny call of every op the nvembed path needs (on the real model's shapes) tells which ops have a kernel for this
device and dtype; when one is missing (today: no CUDA kernels for flash_attn and latent_pool) the nvembed row
says "not run: ..." and the released path is still measured.

Notes for reading the numbers: the release runs its forward under torch.autocast("cuda") (fp16); here both paths
run plainly in --dtype with the same bf16 weights, so neither pays weight casts. The released latent layer
recomputes the latents' K/V for every batch row (512 x 65536 per row) while ours computes them once; with 2-4
layers that layer is a much larger share of the forward than in the 32-layer model, so the end-to-end ratio
measured here is not the 32-layer one.

Writes DIR/gpu_model_e2e.csv (DIR/gpu_model_e2e_tiny.csv with --tiny): one row per path with the device name,
torch / CUDA versions, commit, shapes, ms, texts/s, speedup, cosine, peak memory above the weights (peak_mem_mb,
MiB; the committed H200 CSV of 2026-11-26 counted the weights too) and the op probe. Exit status 1 when the two paths
disagree, 0 otherwise (also when the nvembed path could not run).
"""
import argparse
import datetime
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402

from common import device_name, first_line, git_commit, quantile, write_csv  # noqa: E402
from released_nvembed import port_nvembed, random_state_dict, released_config, released_shapes  # noqa: E402

FULL_TEXT = {"model_type": "bidir_mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0}
FULL_LATENT = {"model_type": "latent_attention", "num_latents_value": 512, "num_cross_heads": 8,
               "cross_dim_head": 4096, "latent_dim": 4096, "hidden_dim": 4096, "output_normalize": True}
TINY_TEXT = {**FULL_TEXT, "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY_LATENT = {**FULL_LATENT, "num_latents_value": 64, "num_cross_heads": 2, "cross_dim_head": 256,
               "latent_dim": 256, "hidden_dim": 256}
FULL_RUN = {"batch": 32, "seq_len": 512, "warmup": 3, "iters": 10}
TINY_RUN = {"batch": 4, "seq_len": 64, "warmup": 1, "iters": 3}
INSTRUCTION_TOKENS = 16
MIN_COSINE = 0.99
TARGET_SPEEDUP = 1.3  # the end-to-end target
REFERENCE = "released-sdpa"
OURS = "nvembed"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the CSV (default bench/results)")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, B4 L64: runs in seconds on a CPU")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--layers", type=int, default=None, help="backbone layers (default 4; --tiny 2)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run = TINY_RUN if args.tiny else FULL_RUN
    for key in ("batch", "seq_len", "warmup", "iters"):
        if getattr(args, key) is None:
            setattr(args, key, run[key])
    for key in ("batch", "seq_len", "iters"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if args.seq_len <= INSTRUCTION_TOKENS:
        ap.error(f"--seq-len must be > {INSTRUCTION_TOKENS} (the instruction prefix), got {args.seq_len}")
    return args


# ------------------------------------------------------------------------------------------------------ inputs
def make_batch(gen, batch, seq_len, vocab, device):
    """Right-padded token ids with uneven lengths: BOS, random ids, EOS, then EOS padding (mask 0), as encode()
    builds them. The pool mask leaves the first INSTRUCTION_TOKENS positions out."""
    lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), generator=gen)
    lengths[0] = seq_len
    lengths.clamp_(min=INSTRUCTION_TOKENS + 2)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)
    pos = torch.arange(seq_len)[None, :]
    mask = (pos < lengths[:, None]).long()
    ids[:, 0] = 1
    ids[pos == (lengths[:, None] - 1)] = 2
    ids[mask == 0] = 2
    pool = mask.clone()
    pool[:, :INSTRUCTION_TOKENS] = 0
    return ids.to(device), mask.to(device), pool.to(device)


# ------------------------------------------------------------------------------------------------------ probing
def probe_ops(model, device):
    """{op: "ok" | "<error>"}: one tiny call of each op the nvembed path runs, on this model's shapes, dtype and
    device. A missing kernel shows up as the dispatcher's NotImplementedError ("Could not run ... with arguments
    from the 'CUDA' backend"), an unsupported dtype as the op's own error."""
    cfg = model.embedding_model.config
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    dtype = model.dtype
    g = torch.Generator().manual_seed(0)
    status = {}
    q = torch.randn(1, 8, heads, hd, generator=g).to(device, dtype)
    k = torch.randn(1, 8, kv, hd, generator=g).to(device, dtype)
    v = torch.randn(1, 8, kv, hd, generator=g).to(device, dtype)
    mask = torch.tensor([[True] * 6 + [False] * 2], device=device)
    pool = model.latent_attention_model
    h = torch.randn(1, 8, pool.hidden_dim, generator=g).to(device, dtype)
    calls = {"flash_attn": lambda: torch.ops.nvembed.flash_attn(q, k, v, mask, None),
             "latent_pool": lambda: pool(h, mask)}
    for name, call in calls.items():
        try:
            with torch.inference_mode():
                out = call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            status[name] = "ok" if torch.isfinite(out.float()).all() else "non-finite output"
        except Exception as e:  # any failure means this path cannot run here; the message says which
            status[name] = first_line(e).strip()
    return status


# ------------------------------------------------------------------------------------------------------ timing
def time_forwards(fn, batches, warmup, device):
    """Milliseconds of each forward after `warmup` untimed ones; `batches` yields fresh inputs (made outside the
    timed region)."""
    times = []
    for i, inputs in enumerate(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(*inputs)
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(*inputs)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times


def measure(name, fn, args, device, vocab):
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batch sequence for every path
    batches = (make_batch(gen, args.batch, args.seq_len, vocab, device) for _ in range(args.warmup + args.iters))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)  # the weights (shared by both paths) and anything else held
    with torch.inference_mode():
        times = time_forwards(fn, batches, args.warmup, device)
    median = statistics.median(times)
    row = {"variant": name, "status": "ok", "median_ms": round(median, 3), "p20_ms": round(quantile(times, 0.2), 3),
           "p80_ms": round(quantile(times, 0.8), 3), "min_ms": round(min(times), 3),
           "texts_per_s": round(args.batch / (median / 1e3), 1)}
    if device.type == "cuda":
        # above what was allocated before the forwards (the weights), as the other GPU benchmarks count it; MiB
        row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    print(f"  {name:<14} {median:10.2f} ms median (p20 {row['p20_ms']}, p80 {row['p80_ms']}, min {row['min_ms']}) "
          f"{row['texts_per_s']:>9.1f} texts/s", flush=True)
    return row


# ------------------------------------------------------------------------------------------------------ main
def build(args, device, dtype):
    from nvembed.model import NVEmbedModel
    text = dict(TINY_TEXT if args.tiny else FULL_TEXT)
    latent = dict(TINY_LATENT if args.tiny else FULL_LATENT)
    if args.layers is not None:
        text["num_hidden_layers"] = args.layers
    sd = random_state_dict(released_shapes(text, latent), seed=args.seed, device=device, dtype=dtype)
    model = NVEmbedModel.from_state_dict(released_config(text, latent), sd, dtype=None).to(device)
    # the reference reads the very tensors the model holds (no second copy of the weights)
    return model, model.state_dict(), text, latent


def environment(device, dtype, args):
    import nvembed_ext
    info = nvembed_ext.build_info()
    return {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": device_name(device),
            "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda or "",
            "nvembed_with_cuda": info.get("with_cuda"), "nvembed_cuda_archs": info.get("cuda_archs", ""),
            "mode": "tiny" if args.tiny else "full", "dtype": str(dtype).replace("torch.", "")}


def shape_fields(text, latent, args):
    return {"layers": text["num_hidden_layers"], "hidden": text["hidden_size"],
            "heads": text["num_attention_heads"], "kv_heads": text["num_key_value_heads"],
            "head_dim": text["hidden_size"] // text["num_attention_heads"],
            "intermediate": text["intermediate_size"], "vocab": text["vocab_size"],
            "latents": latent["num_latents_value"], "cross_heads": latent["num_cross_heads"],
            "cross_dim_head": latent["cross_dim_head"], "ff_mult": 4, "batch": args.batch, "seq_len": args.seq_len,
            "instruction_tokens": INSTRUCTION_TOKENS, "warmup": args.warmup, "iters": args.iters}


def main(argv=None) -> int:
    args = parse_args(argv)
    from nvembed.device import resolve_device
    device = resolve_device(args.device, where="--device")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("gpu_model_e2e: the full Mistral-7B-shaped run is for a GPU; use --tiny on the CPU")
    env = environment(device, dtype, args)
    print(f"gpu_model_e2e: {env['device']} ({device}), torch {env['torch']}, CUDA {env['cuda'] or '-'}, "
          f"nvembed_ext with_cuda={env['nvembed_with_cuda']}, commit {env['commit']}, {env['dtype']}", flush=True)

    model, sd, text, latent = build(args, device, dtype)
    shapes = shape_fields(text, latent, args)
    print(f"  model: {shapes['layers']} layers, hidden {shapes['hidden']}, heads {shapes['heads']}/"
          f"{shapes['kv_heads']}x{shapes['head_dim']}, MLP {shapes['intermediate']}, latents {shapes['latents']}, "
          f"cross heads {shapes['cross_heads']}x{shapes['cross_dim_head']}; batch {args.batch} x {args.seq_len}",
          flush=True)
    probe = probe_ops(model, device)
    kernels = ";".join(f"{k}={'ok' if v == 'ok' else 'missing'}" for k, v in probe.items())
    for k, v in probe.items():
        print(f"  op {k:<12} {v}", flush=True)
    missing = {k: v for k, v in probe.items() if v != "ok"}

    def reference(ids, mask, pool):
        return port_nvembed(sd, text, latent, ids, mask, pool, attention="sdpa")

    def ours(ids, mask, pool):
        return model(ids, mask, pool)["sentence_embeddings"]

    # agreement first, on one batch
    check = make_batch(torch.Generator().manual_seed(args.seed + 2), args.batch, args.seq_len, text["vocab_size"],
                       device)
    with torch.inference_mode():
        ref_emb = reference(*check).float()
    if not torch.isfinite(ref_emb).all():
        raise SystemExit("gpu_model_e2e: the released path gave non-finite embeddings")
    min_cos, not_run = None, None
    if missing:
        not_run = "; ".join(f"{k}: {v}" for k, v in missing.items())
    else:
        try:
            with torch.inference_mode():
                our_emb = ours(*check).float()
            cos = torch.nn.functional.cosine_similarity(our_emb, ref_emb, dim=-1)
            min_cos = round(cos.min().item(), 6)
            print(f"  agreement: per-row cosine min {min_cos:.6f}, max |diff| "
                  f"{(our_emb - ref_emb).abs().max().item():.3e}", flush=True)
        except Exception as e:  # an op the probe did not reach
            not_run = first_line(e).strip()

    base = {**env, **shapes, "cuda_kernels": kernels}
    rows = []
    ref_row = measure(REFERENCE, reference, args, device, text["vocab_size"])
    rows.append({**base, **ref_row, "speedup_vs_released_sdpa": 1.0})
    rc = 0
    if not_run is not None:
        print(f"  {OURS:<14} not run: {not_run}", flush=True)
        rows.append({**base, "variant": OURS, "status": f"not run: {not_run}"})
    elif min_cos is None or min_cos <= MIN_COSINE:
        print(f"  {OURS:<14} MISMATCH: min cosine {min_cos} <= {MIN_COSINE}; not timed", flush=True)
        rows.append({**base, "variant": OURS, "status": f"mismatch: min cosine {min_cos}",
                     "min_cosine_vs_released": min_cos})
        rc = 1
    else:
        row = measure(OURS, ours, args, device, text["vocab_size"])
        speedup = round(ref_row["median_ms"] / row["median_ms"], 3)
        rows.append({**base, **row, "speedup_vs_released_sdpa": speedup, "min_cosine_vs_released": min_cos})
        verdict = "met" if speedup >= TARGET_SPEEDUP else "not met"
        print(f"  speedup {speedup:.2f}x over {REFERENCE} (median; target >= {TARGET_SPEEDUP}x: {verdict}; "
              f"fastest forwards {ref_row['min_ms'] / row['min_ms']:.2f}x)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_model_e2e_tiny.csv" if args.tiny else "gpu_model_e2e.csv")
    write_csv(path, rows)
    print(f"gpu_model_e2e: wrote {len(rows)} rows to {path}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
