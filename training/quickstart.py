"""Training quickstart on real offline data: Python standard-library docstrings split by package.

    python -m nvembed.training.quickstart OUT_DIR [--max-steps N] [--batch-size B] ...

1. `write_stdlib_train_test`: documented functions, classes and methods of the stdlib; query = first docstring
   line, document = "qualified name + rest of the docstring"; whole packages are held out for the test split
   (OUT_DIR/data/test, BEIR layout), so the test functions are unseen in training.
2. Hard negatives mined with the untrained default model as the teacher (TopK-PercPos, 95% of the positive).
3. nDCG@10 / Recall@100 / MRR@10 of the untrained default model (all-MiniLM-L6-v2, mean pooling) on the test
   split, with and without the query instruction.
4. Stage-1 training from the default model with NV-Embed's latent-attention head (identity start) and LoRA.
5. The same metrics for the trained model; everything goes to OUT_DIR/quickstart.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _eval(model, data_dir: str, instruction: str, batch_size: int = 64):
    from .trainer import evaluate_beir
    return evaluate_beir(model, data_dir, instruction, batch_size=batch_size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nvembed.training.quickstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--max-steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--num-latents", type=int, default=128)
    ap.add_argument("--doc-max-length", type=int, default=128,
                    help="documents are cut to this many tokens in training (most stdlib documents are shorter)")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="backbone and LoRA dropout (0: dropout's random masks cost ~20%% of a CPU step)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    import nvembed

    from .data import atomic_write_text, read_jsonl, write_jsonl
    from .mining import corpus_from_examples, mine_hard_negatives
    from .stdlib_split import write_stdlib_train_test
    from .trainer import TrainConfig, train

    t_all = time.perf_counter()
    out = os.path.abspath(args.out_dir)
    data_dir = os.path.join(out, "data")
    test_dir = os.path.join(data_dir, "test")
    timings = {}

    t = time.perf_counter()
    counts = write_stdlib_train_test(data_dir, seed=args.seed)
    timings["split"] = time.perf_counter() - t
    print(f"quickstart: stdlib split -> {data_dir}: {counts}", file=sys.stderr)

    teacher = nvembed.load("default")
    train_examples = read_jsonl(os.path.join(data_dir, "train.jsonl"))
    instruction = train_examples[0].instruction
    mined_path = os.path.join(data_dir, "train_mined.jsonl")
    t = time.perf_counter()
    mined = mine_hard_negatives(train_examples, corpus_from_examples(train_examples), teacher,
                                top_k=max(args.group_size - 1, 1), max_candidates=len(train_examples) + 1,
                                instruction="")  # the teacher (all-MiniLM-L6-v2) was trained without instructions
    mined = [e for e in mined if e.neg]  # the few whose positive ranks below every candidate's threshold
    write_jsonl(mined_path, mined)
    timings["mine"] = time.perf_counter() - t
    print(f"quickstart: mined hard negatives for {len(mined)} examples in {timings['mine']:.0f} s", file=sys.stderr)

    t = time.perf_counter()
    before = {"no_instruction": _eval(teacher, test_dir, ""), "instruction": _eval(teacher, test_dir, instruction)}
    timings["eval_before"] = time.perf_counter() - t
    del teacher

    cfg = TrainConfig(data=mined_path, output=os.path.join(out, "model"), model="default",
                      max_steps=args.max_steps, batch_size=args.batch_size, group_size=args.group_size,
                      lr=args.lr, head_lr=args.head_lr, temperature=args.temperature, num_latents=args.num_latents,
                      lora=args.lora, lora_dropout=args.dropout, backbone_dropout=args.dropout, warmup_steps=max(args.max_steps // 10, 1), seed=args.seed,
                      query_max_length=64, doc_max_length=args.doc_max_length, resume=False, device="cpu"
                      if not torch.cuda.is_available() else "auto")
    t = time.perf_counter()
    summary = train(cfg)
    timings["train"] = time.perf_counter() - t

    trained = nvembed.load(cfg.output)
    t = time.perf_counter()
    after = {"instruction": _eval(trained, test_dir, instruction)}
    timings["eval_after"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    result = {"data": counts, "instruction": instruction, "train": {
        "steps": summary["steps"], "batch_size": args.batch_size, "group_size": args.group_size, "lr": args.lr,
        "temperature": args.temperature, "lora": args.lora, "num_latents": args.num_latents,
        "first_loss": summary["losses"][0], "last_loss": summary["losses"][-1],
        "examples_per_s": summary["examples_per_s"]},
        "before_default_mean_pooling": before, "after_trained_latent_head": after,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads()}
    atomic_write_text(os.path.join(out, "quickstart.json"), json.dumps(result, indent=2))

    rows = [("default (mean pooling), no instruction", before["no_instruction"]),
            ("default (mean pooling), instruction", before["instruction"]),
            ("trained (latent head + LoRA), instruction", after["instruction"])]
    names = list(before["no_instruction"])
    print(f"{'model':<44}" + "".join(f"{n:>12}" for n in names))
    for label, m in rows:
        print(f"{label:<44}" + "".join(f"{m[n]:>12.4f}" for n in names))
    print(f"train: {summary['steps']} steps, loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}, "
          f"{summary['examples_per_s']} examples/s; total {timings['total']:.0f} s; details in "
          f"{os.path.join(out, 'quickstart.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
