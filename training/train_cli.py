"""`nvembed train`: flags generated from TrainConfig's fields (--max-steps for max_steps, --lora/--no-lora for
booleans), optionally on top of a YAML file (--config FILE.yaml); flags win over the file, the file over defaults."""
from __future__ import annotations

import argparse
import dataclasses
import typing

HELP = {
    "data": "stage-1 training data: JSONL, one {\"query\", \"pos\": [...], \"neg\": [...], \"instruction\"?, "
            "\"task_type\"?} per line",
    "output": "output folder: the trained model (nvembed.load-able), checkpoints/, train_log.jsonl, eval.json",
    "model": "'default' (all-MiniLM-L6-v2) or a local model folder to start from",
    "stage2_data": "stage-2 data (retrieval + non-retrieval tasks), blended with the stage-1 data",
    "max_steps": "stage-1 optimizer steps",
    "stage2_steps": "stage-2 optimizer steps (default: --max-steps when --stage2-data is given)",
    "batch_size": "queries per step over all processes",
    "group_size": "documents per query: 1 positive + group_size-1 hard negatives",
    "temperature": "InfoNCE temperature",
    "lr": "peak learning rate (backbone / LoRA)",
    "head_lr": "peak learning rate of the latent-attention head (default: --lr)",
    "pooling": "'latent': add NV-Embed's latent-attention head to a mean-pooling model; 'keep' the model's pooling",
    "head_init": "'identity': the new head starts as exactly the base model's mean pooling",
    "grad_cache_chunk": "GradCache: embed in chunks of this many texts (large batches in little memory)",
    "eval_data": "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) evaluated before/during/after",
    "save_every": "checkpoint every N steps (0: only at the end); a rerun resumes from the newest",
    "device": "auto, cpu, cuda or cuda:N",
}


def _base_type(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_train_parser(sub) -> argparse.ArgumentParser:
    from .trainer import TrainConfig
    p = sub.add_parser("train", help="contrastive training (NV-Embed two-stage recipe, LoRA, multi-process)",
                       description="Train an embedding model with NV-Embed's two-stage contrastive instruction "
                                   "tuning on the nvembed ops. Multi-process: torchrun --nproc-per-node N "
                                   "$(which nvembed) train ...  Settings: flags, or a YAML file (--config) whose "
                                   "keys are the flag names.")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = HELP.get(f.name, f.name.replace("_", " ")) + (f" (default: {default})" if default not in
                                                                    ("", None) else "")
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text)
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args) -> int:
    import json

    from nvembed.cli import CLIError

    from .data import DataError
    from .trainer import TrainConfig, TrainError, train
    values = {}
    try:
        if args.config:
            values.update(TrainConfig.from_yaml(args.config))
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
        try:
            cfg = TrainConfig.from_dict(values, source=args.config or "flags")
        except TypeError as e:  # a YAML value of the wrong type reaching the dataclass
            raise TrainError(f"train: bad setting: {e}") from None
        if not cfg.data or not cfg.output:
            raise TrainError("train: --data and --output are required (as flags or in --config)")
        summary = train(cfg)
    except (TrainError, DataError) as e:
        raise CLIError(str(e)) from None
    import os
    if os.environ.get("RANK", "0") != "0":
        return 0
    losses = summary["losses"]
    line = {"steps": summary["steps"], "resumed_from": summary["resumed_from"],
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "examples_per_s": summary["examples_per_s"]}
    if summary["evals"]:
        line["eval_first"], line["eval_last"] = summary["evals"][0], summary["evals"][-1]
    print(json.dumps(line))
    return 0
