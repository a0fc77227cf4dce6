"""Accuracy of InfoNCE's gradients formed in the forward (NVEMBED_INFONCE_GRAD=fused) by dD accumulator, bf16.

The fused forward's row blocks add their dD updates either into an fp32 accumulator or, past its memory budget,
into the output itself in the input dtype (one rounding per block; csrc/infonce_gemm.h, InfoNCEFusedAcc). This
measures what that costs: ||grad - grad_fp64|| / ||grad_fp64|| for the docs' and the queries' gradients, per plan
(one block; fp32 accumulator; output accumulation with fewer and fewer rows per block), beside PyTorch's own loss
computed in bf16 (nvembed_ext.reference.infonce_ref on the bf16 inputs) as the anchor. Unit-norm rows, t = 0.05,
in-batch negatives plus extra negative rows; one CSV row per plan and seed.

  python bench/infonce_fused_accuracy.py --out bench/results                  # CPU tensors, B = 512
  python bench/infonce_fused_accuracy.py --device cuda --B 4096 --d 1024 --out DIR   # the CUDA kernels
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import device_name, env_vars, git_commit, write_csv  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def plans(B: int) -> list[tuple[str, dict]]:
    """(label, environment) per plan: one block, the fp32 accumulator in 2 blocks, the output in 2 .. B blocks."""
    out = [("one block", {"NVEMBED_INFONCE_FUSED_ACC": "auto", "NVEMBED_INFONCE_ROW_BLOCK": str(B)}),
           (f"fp32 accumulator, {2} blocks", {"NVEMBED_INFONCE_FUSED_ACC": "fp32",
                                               "NVEMBED_INFONCE_ROW_BLOCK": str((B + 1) // 2)})]
    for blocks in (2, 8, 32, 128, 512):
        if blocks <= B:
            out.append((f"output, {blocks} blocks", {"NVEMBED_INFONCE_FUSED_ACC": "output",
                                                     "NVEMBED_INFONCE_ROW_BLOCK": str(-(-B // blocks))}))
    return out


def run(args) -> list[dict]:
    import nvembed_ext  # noqa: F401  (registers torch.ops.nvembed.*)
    from nvembed_ext.reference import infonce_ref

    dev, B, G, E, d, t = args.device, args.B, args.G, args.extra, args.d, args.temperature
    env = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": device_name(dev),
           "torch": torch.__version__, "dtype": "bfloat16", "B": B, "G": G, "extra": E, "d": d, "temperature": t}
    rows = []
    for seed in range(args.seeds):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = F.normalize(torch.randn(B, d, dtype=torch.float64, generator=gen), dim=-1).to(dev)
        docs = F.normalize(torch.randn(B * G + E, d, dtype=torch.float64, generator=gen), dim=-1).to(dev)
        qr, dr = q.clone().requires_grad_(), docs.clone().requires_grad_()
        infonce_ref(qr, dr, G, t, True).backward()
        qb, db = q.bfloat16().requires_grad_(), docs.bfloat16().requires_grad_()
        infonce_ref(qb, db, G, t, True).backward()
        rows.append({**env, "seed": seed, "variant": "torch bf16 (anchor)", "rows_per_block": "",
                     "accumulator": "", "grad_docs_rel_err": f"{rel(db.grad, dr.grad):.3e}",
                     "grad_queries_rel_err": f"{rel(qb.grad, qr.grad):.3e}"})
        for label, variables in plans(B):
            with env_vars({"NVEMBED_INFONCE_GRAD": "fused", **variables}):
                plan = nvembed_ext._C.infonce_fused_plan(B, B * G + E, d, 2)
                _, gq, gd = torch.ops.nvembed._infonce_fwd_grad(q.bfloat16(), docs.bfloat16(), G, t, True)
            rows.append({**env, "seed": seed, "variant": f"nvembed fused: {label}", "rows_per_block": plan["rows"],
                         "accumulator": plan["accumulator"], "grad_docs_rel_err": f"{rel(gd, dr.grad):.3e}",
                         "grad_queries_rel_err": f"{rel(gq, qr.grad):.3e}"})
        for r in rows[-len(plans(B)) - 1:]:
            print(f"seed {seed}  {r['variant']:38s} dD {r['grad_docs_rel_err']}  dQ {r['grad_queries_rel_err']}",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--extra", type=int, default=33)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = run(args)
    name = "infonce_fused_accumulation_cpu.csv" if args.device == "cpu" else "infonce_fused_accumulation.csv"
    path = os.path.join(args.out, name)
    write_csv(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
