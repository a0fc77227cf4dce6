"""NV-Embed's two-stage contrastive instruction tuning on the nvembed ops.

Stage 1 trains on retrieval data: queries carry their task instruction (excluded from pooling), each query comes
with a group of G documents (1 positive + G-1 mined hard negatives), and the loss is InfoNCE over the positives
against every document in the batch (in-batch + hard negatives; with several processes, the documents of all
ranks). Stage 2 trains on a blend of the stage-1 data and the stage-2 data (retrieval and non-retrieval tasks);
every batch holds one task type, and non-retrieval batches switch in-batch negatives off (their other examples
may share the label), as in the NV-Embed paper. The loss is `torch.ops.nvembed.infonce` (tiled, the B × N logits
never exist) through `nvembed.losses.InfoNCELoss`.

A run writes into its output folder: the trained model (LoRA merged; `nvembed.load(DIR)`, `nvembed encode/search/
eval --model DIR` read it), checkpoints/step-N/ (trainable weights, optimizer, scheduler, RNG states, step: a
killed run restarts from the newest one and reproduces the uninterrupted losses), train_log.jsonl (one line per
step), train_config.json, and eval.json when --eval-data is given.

Multi-process: launch with torchrun; each rank takes its slice of every global batch (batch_size must divide by
the world size), DDP averages the gradients, and the cross-rank loss makes the result equal to one process
training on the whole batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .data import Example, atomic_write_text, check_group_size, iterate_batches, read_jsonl
from .modeling import (EmbeddingWrapper, add_latent_head, apply_lora, export_model, tokenize,
                       trainable_parameters)

STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
LOG_FILE = "train_log.jsonl"
# Test hook: the process exits abruptly (os._exit, no cleanup) right after this step, as a killed run would.
EXIT_AFTER_STEP_ENV = "NVEMBED_TRAIN_EXIT_AFTER_STEP"


class TrainError(ValueError):
    """A bad training setting or input (the CLI prints it as one line)."""


# Settings a resumed run may change: where and how often it logs, evaluates and saves, and how it computes the same
# steps (device, bf16 autocast, activation checkpointing, GradCache). Every other setting must equal the
# checkpoint's, or resuming would continue another run's trajectory under this run's name.
RESUME_MAY_CHANGE = frozenset({"output", "resume", "progress", "log_every", "save_every", "keep_checkpoints",
                               "eval_data", "eval_every", "eval_instruction", "eval_batch_size", "device", "bf16",
                               "gradient_checkpointing", "grad_cache_chunk"})


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass
class TrainConfig:
    """Every setting of a run (CLI flags and YAML keys have these names, with '-' for '_' on the command line)."""
    data: str = ""
    output: str = ""
    model: str = "default"
    stage2_data: Optional[str] = None
    max_steps: int = 100               # stage-1 steps
    stage2_steps: Optional[int] = None  # stage-2 steps (default: max_steps when stage2_data is given)
    batch_size: int = 32               # queries per step, over all processes
    group_size: int = 4                # documents per query: 1 positive + group_size-1 hard negatives
    temperature: float = 0.02
    lr: float = 2e-5
    head_lr: Optional[float] = None    # latent-attention head (default: lr)
    stage2_lr: Optional[float] = None  # peak learning rate of stage 2 (default: lr); the schedule restarts there
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0         # 0 = no clipping
    lora: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    backbone_dropout: Optional[float] = None  # override the backbone's dropout probability (None: keep its own)
    pooling: str = "latent"            # "latent": give a mean-pooling model NV-Embed's latent head; "keep"
    num_latents: int = 512
    latent_heads: int = 8
    latent_dim_head: Optional[int] = None  # default: the hidden size (the release's proportions)
    head_init: str = "identity"        # "identity": the new head starts as exactly the base model's mean pooling
    mask_instruction: bool = True      # exclude instruction tokens from pooling (NV-Embed), in training and encode
    query_max_length: int = 128
    doc_max_length: int = 256
    gradient_checkpointing: bool = False
    grad_cache_chunk: Optional[int] = None  # GradCache: embed in chunks of this many texts
    cross_rank: bool = True            # documents of all ranks are negatives (multi-process)
    bf16: bool = True                  # bf16 autocast on CUDA (CPU trains in fp32)
    device: str = "auto"
    seed: int = 0
    save_every: int = 0                # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    eval_data: Optional[str] = None    # BEIR folder evaluated before training, every eval_every steps and at the end
    eval_every: int = 0
    eval_instruction: Optional[str] = None  # default: the most common instruction of the stage-1 data
    eval_batch_size: int = 64
    log_every: int = 10
    progress: bool = True
    resume: bool = True                # continue from the newest checkpoint in output/checkpoints

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise TrainError(f"train: {msg}")
        import typing
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # the types first (a TrainConfig built in Python is not from_dict's)
            tp, v = hints[f.name], getattr(self, f.name)
            if typing.get_origin(tp) is typing.Union:
                if v is None:
                    continue
                tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            ok = {bool: isinstance(v, bool), int: number and isinstance(v, int), float: number,
                  str: isinstance(v, str)}.get(tp, True)
            need(ok, f"{f.name} must be {_TYPE_WORDS.get(tp, tp.__name__)}, got {v!r} ({type(v).__name__})")
        need(bool(self.data), "data is required (a JSONL file)")
        need(bool(self.output), "output is required (a folder)")
        need(bool(self.stage2_data) or (self.stage2_steps is None and self.stage2_lr is None),
             "stage2_steps and stage2_lr need stage2_data (there is no stage 2 without it)")
        for name in ("max_steps", "batch_size", "group_size", "num_latents", "latent_heads", "query_max_length",
                     "doc_max_length", "lora_rank", "keep_checkpoints", "eval_batch_size", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("save_every", "eval_every", "warmup_steps"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        need(self.stage2_steps is None or self.stage2_steps >= 0, "stage2_steps must be >= 0")
        need(math.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be finite and > 0, got {self.temperature}")
        for name in ("lr", "head_lr", "stage2_lr"):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), f"{name} must be > 0, got {v}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.backbone_dropout is None or 0.0 <= self.backbone_dropout < 1.0,
             f"backbone_dropout must be in [0, 1), got {self.backbone_dropout}")
        need(self.pooling in ("latent", "keep"), f"pooling must be 'latent' or 'keep', got {self.pooling!r}")
        need(self.head_init in ("identity", "random"), f"head_init must be 'identity' or 'random', got {self.head_init!r}")
        need(self.grad_cache_chunk is None or self.grad_cache_chunk >= 1, "grad_cache_chunk must be >= 1")
        need(math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
             f"max_grad_norm must be finite and >= 0, got {self.max_grad_norm}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        need(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(self.latent_dim_head is None or (isinstance(self.latent_dim_head, int) and self.latent_dim_head >= 1),
             f"latent_dim_head must be an integer >= 1 (or unset), got {self.latent_dim_head!r}")

    @property
    def total_steps(self) -> int:
        return self.max_steps + self.num_stage2_steps

    @property
    def num_stage2_steps(self) -> int:
        if not self.stage2_data:
            return 0
        return self.max_steps if self.stage2_steps is None else self.stage2_steps

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        import typing
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise TrainError(f"train: unknown setting(s) in {source}: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        out = {}
        for name, value in values.items():
            tp = hints[name]
            if typing.get_origin(tp) is typing.Union:
                if value is None:
                    out[name] = None
                    continue
                tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            try:
                if tp is bool:
                    if not isinstance(value, bool):
                        raise ValueError("expected true or false")
                elif tp is int:
                    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                        raise ValueError("expected an integer")
                    value = int(value)
                elif tp is float:
                    if isinstance(value, bool):
                        raise ValueError("expected a number")
                    value = float(value)  # YAML reads 2e-5 (no dot) as a string
                elif tp is str and not isinstance(value, str):
                    raise ValueError("expected a string")
            except (TypeError, ValueError) as e:
                raise TrainError(f"train: setting {name} in {source}: {value!r}: {e}") from None
            out[name] = value
        return cls(**out)

    @classmethod
    def from_yaml(cls, path: str) -> Dict[str, Any]:
        """The settings of a YAML file (keys = field names, '-' or '_'), as a dict to merge with CLI flags."""
        import yaml
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            raise TrainError(f"train: cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise TrainError(f"train: {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise TrainError(f"train: {path} must hold a mapping of settings, got {type(values).__name__}")
        return {str(k).replace("-", "_"): v for k, v in values.items()}


# ------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def same_on_all_ranks(self, value, what: str) -> None:
        """Raise on every rank (no hang) unless every rank holds the same `value` (picklable)."""
        if self.world == 1:
            return
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise TrainError(f"train: the processes disagree on {what}: {values}")

    def on_main(self, fn, what: str):
        """fn() on rank 0 (file writes: the output folder, checkpoints, the export), then every rank raises TrainError
        together if it failed with an OSError (the other ranks waited in the next collective while rank 0 exited:
        a traceback there, or on NCCL a wait of NVEMBED_DIST_TIMEOUT_MIN). Also a barrier. Returns fn's result on
        rank 0, None elsewhere."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except OSError as e:
                error = f"train: {what}: {e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None)
                                                                  else "")
        if self.world > 1:
            errors = [None] * self.world
            torch.distributed.all_gather_object(errors, error)
            error = errors[0]
        if error is not None:
            raise TrainError(error)
        return result

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world


def dist_timeout_minutes() -> float:
    """NVEMBED_DIST_TIMEOUT_MIN (default 60): how long a collective may wait. The other ranks wait in a barrier
    while rank 0 alone evaluates, saves a checkpoint or exports the model, which for a 7B model can take longer
    than NCCL's default of 10 minutes (the watchdog would end the job)."""
    raw = os.environ.get("NVEMBED_DIST_TIMEOUT_MIN", "") or "60"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise TrainError(f"train: NVEMBED_DIST_TIMEOUT_MIN must be a positive number of minutes, got {raw!r}")
    return value


def init_distributed(device: str) -> Dist:
    """torch.distributed from torchrun's environment (WORLD_SIZE > 1): NCCL on CUDA (each process on
    cuda:LOCAL_RANK, set before the process group starts), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import datetime

    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and torch.cuda.is_available() and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=dist_timeout_minutes()))
        here = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, initialized_here=here)


def resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "auto":  # cuda only where this build has CUDA kernels for the model ops (nvembed.device)
        from nvembed.device import resolve_device as resolve
        name = resolve("auto").type
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"train: device {name!r} requested but CUDA is not available")
        if name == "cuda" and dist.world > 1:
            name = f"cuda:{dist.local_rank}"
        dev = torch.device(name)
        if dist.world > 1 and dev.index != dist.local_rank:
            raise TrainError(f"train: device {name!r} with {dist.world} processes would put ranks on one GPU: use "
                             f"--device cuda (each process takes cuda:LOCAL_RANK; this one is {dist.local_rank})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainError(f"train: device {name!r} does not exist ({torch.cuda.device_count()} GPUs)")
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise TrainError(f"train: device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- the model
def _normalize_output(model) -> None:
    """InfoNCE's temperature scales cosine similarities (NV-Embed trains L2-normalized embeddings; mining compares
    normalized ones): a base model whose output is not normalized (a sentence-transformers folder without a Normalize
    module, and a latent head added to it) is trained, and exported, with its output normalized. Dot products of raw
    embeddings ~5 long under t = 0.02 gave losses and gradients unrelated to the intended ones."""
    if model.config["pooling"] == "latent":
        head = model.latent_attention_model
        changed = not head.normalize
        head.normalize = True
        model.config["latent_attention_config"]["output_normalize"] = True
    else:
        changed = not model.config["normalize"]
        model.config["normalize"] = True
    if changed:
        print("nvembed train: the base model's embeddings are not L2-normalized; training (and the exported model) "
              "normalizes them, as InfoNCE with a temperature expects", file=sys.stderr)


def build_model(cfg: TrainConfig, device: torch.device):
    """The base model (a named model or folder) + latent head + LoRA, on `device`, fp32 master weights."""
    import nvembed
    try:
        model = nvembed.load(cfg.model, dtype=torch.float32)
    except (ValueError, OSError, ImportError) as e:
        raise TrainError(f"train: cannot load model {cfg.model!r}: {e}") from None
    model.to(device)
    if cfg.pooling == "latent" and model.config["pooling"] == "mean":
        add_latent_head(model, num_latents=cfg.num_latents, num_heads=cfg.latent_heads,
                        dim_head=cfg.latent_dim_head, init=cfg.head_init, seed=cfg.seed)
    _normalize_output(model)
    model.config["is_mask_instruction"] = bool(cfg.mask_instruction)
    if cfg.backbone_dropout is not None:
        for module in model.embedding_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.backbone_dropout
    if cfg.lora:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    else:
        for p in model.embedding_model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs (LoRA) and with DDP.
        model.embedding_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "latent_attention_model"):
        for p in model.latent_attention_model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def _param_groups(model, cfg: TrainConfig):
    head, body = [], []
    for name, p in trainable_parameters(model):
        (head if name.startswith("latent_attention_model.") else body).append(p)
    groups = []
    if body:
        groups.append({"params": body, "lr": cfg.lr, "name": "backbone"})
    if head:
        groups.append({"params": head, "lr": cfg.head_lr or cfg.lr, "name": "head"})
    if not groups:
        raise TrainError("train: nothing to train (no parameter requires grad)")
    return groups


def _lr_lambda(cfg: TrainConfig):
    """Linear warm-up then linear decay to 0, per stage (stage 2 restarts the schedule at stage2_lr, like NV-Embed's
    two separate runs); returns the factor applied to each group's base lr."""
    s1, s2 = cfg.max_steps, cfg.num_stage2_steps
    ratio2 = (cfg.stage2_lr or cfg.lr) / cfg.lr

    def factor(step: int) -> float:
        if step < s1:
            k, n, peak = step, s1, 1.0
        else:
            k, n, peak = step - s1, max(s2, 1), ratio2
        if cfg.warmup_steps and k < cfg.warmup_steps:
            return peak * (k + 1) / (cfg.warmup_steps + 1)
        rest = max(n - cfg.warmup_steps, 1)
        return peak * max(0.0, (n - k) / rest) if k >= cfg.warmup_steps else peak

    return factor


# ------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> Dict[str, Any]:
    import numpy as np
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own device only: the state restores on a machine with another number or layout of GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints written before: every visible device's state
            here = torch.cuda.current_device()
            if here >= len(cuda):
                return
            cuda = cuda[here]
        torch.cuda.set_rng_state(cuda)


_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dirs(output: str) -> List[str]:
    """Complete checkpoints (trainer_state.pt is written last), oldest first; a step-N.tmp folder that a killed save
    left behind is not one."""
    found = []
    for d in glob.glob(os.path.join(output, "checkpoints", "step-*")):
        m = _STEP_DIR.fullmatch(os.path.basename(d))
        if m and os.path.isfile(os.path.join(d, STATE_FILE)):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _clear_stale_checkpoints(output: str, resume: bool) -> int:
    """Remove the step-N.tmp folders of killed saves and, for a run that does not resume, every checkpoint and the
    eval.json of an earlier run in this folder (kept, they would be resumed from later or mixed into this run's
    retention); returns how many checkpoints were removed."""
    removed = 0
    for d in glob.glob(os.path.join(output, "checkpoints", "step-*")):
        is_tmp = _STEP_DIR.fullmatch(os.path.basename(d)) is None
        if is_tmp or not resume:
            shutil.rmtree(d, ignore_errors=True)
            removed += not is_tmp
    if not resume and os.path.isfile(os.path.join(output, "eval.json")):
        os.remove(os.path.join(output, "eval.json"))
    return removed


def data_digest(examples: Optional[List[Example]]) -> Optional[str]:
    """sha256 of the examples as read (field values, in file order): a resumed run checks it, because the batches of
    a step are a function of the data, and edited data would silently continue in another order."""
    if examples is None:
        return None
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.query, list(ex.pos), list(ex.neg), ex.instruction, ex.task_type]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def save_checkpoint(output: str, step: int, model, optimizer, scheduler, cfg: TrainConfig, dist: Dist,
                    data: Optional[Dict[str, Optional[str]]] = None) -> str:
    """Each rank's RNG state is its own (dropout differs per rank); weights and optimizer are rank 0's (DDP keeps
    them equal). Written into a temporary folder and renamed: a checkpoint folder is complete or absent. `data`:
    the digests of the run's data files (data_digest), checked on resume."""
    from safetensors.torch import save_file
    final = os.path.join(output, "checkpoints", f"step-{step}")
    rng = _rng_state()
    rngs = [None] * dist.world
    if dist.world > 1:
        torch.distributed.all_gather_object(rngs, rng)
    else:
        rngs = [rng]

    def write():
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model)},
                  os.path.join(tmp, TRAINABLE_FILE))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rngs, "world": dist.world, "config": dataclasses.asdict(cfg), "data": data},
                   os.path.join(tmp, STATE_FILE))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.on_main(write, f"cannot save the checkpoint {final}")
    return final


def check_resumable(state: Dict[str, Any], path: str, cfg: TrainConfig,
                    data: Optional[Dict[str, Optional[str]]] = None) -> None:
    """The checkpoint belongs to a run with this run's settings (all but RESUME_MAY_CHANGE) and data (digests, where
    both sides have them) and lies within it."""
    saved = state.get("config") or {}
    diff = [(k, saved[k], v) for k, v in dataclasses.asdict(cfg).items()
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v]
    if diff:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff[:6])
        raise TrainError(f"train: checkpoint {path} was written by a run with other settings ({listed}): resume "
                         "with the same settings, start over with --no-resume (removes the old checkpoints), or "
                         "write to another --output")
    saved_data = state.get("data") or {}
    changed = [k for k, v in (data or {}).items() if saved_data.get(k) is not None and saved_data[k] != v]
    if changed:
        raise TrainError(f"train: checkpoint {path} was written by a run on other data (the contents of "
                         f"{' and '.join(changed)} changed since): resume with the same data, start over with "
                         "--no-resume (removes the old checkpoints), or write to another --output")
    if int(state["step"]) > cfg.total_steps:
        raise TrainError(f"train: checkpoint {path} is at step {state['step']}, beyond this run's "
                         f"{cfg.total_steps} steps: start over with --no-resume or write to another --output")


def load_checkpoint(path: str, model, optimizer, scheduler, dist: Dist, cfg: Optional[TrainConfig] = None,
                    data: Optional[Dict[str, Optional[str]]] = None) -> int:
    """Restore a checkpoint (with cfg: after check_resumable); returns its step."""
    from safetensors.torch import load_file
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    if cfg is not None:
        check_resumable(state, path, cfg, data)
    tensors = load_file(os.path.join(path, TRAINABLE_FILE))
    params = dict(trainable_parameters(model))
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise TrainError(f"train: checkpoint {path} does not match the model's trainable parameters "
                         f"(missing {missing[:5]}, unexpected {extra[:5]}): resume with the same settings")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world"] == dist.world:
        _set_rng_state(state["rng"][dist.rank])
    else:
        print(f"nvembed train: checkpoint was written by {state['world']} processes, resuming with {dist.world}: "
              "RNG states are not restored (dropout masks differ from the uninterrupted run)", file=sys.stderr)
    return int(state["step"])


# ------------------------------------------------------------------------------------------------- eval
def evaluate_beir(model, data_dir: str, instruction: str = "", batch_size: int = 64,
                  max_length: Optional[int] = None, query_max_length: Optional[int] = None) -> Dict[str, float]:
    """nDCG@10, Recall@100, MRR@10 of `model` on a BEIR folder, computed like `nvembed eval`; documents truncated at
    max_length, queries at query_max_length (default: max_length), as in training."""
    from nvembed import retrieval
    ids, titles, texts, queries, qrels = retrieval.load_beir(data_dir)
    qrels = {q: r for q, r in qrels.items() if q in queries}
    qids = [q for q in queries if q in qrels]
    kw = {"batch_size": batch_size, "normalize": True}
    if max_length:
        kw["max_length"] = max_length
    d_emb = model.encode([retrieval.document_text(a, b) for a, b in zip(titles, texts)], **kw)
    if query_max_length:
        kw["max_length"] = query_max_length
    q_emb = model.encode([queries[q] for q in qids], instruction=instruction, **kw)
    k = max(k for _, _, k in retrieval.METRICS)
    metrics = retrieval.evaluate(retrieval.retrieve(q_emb, d_emb, qids, ids, k), qrels)
    metrics.pop("queries", None)
    return {name: round(float(v), 5) for name, v in metrics.items()}


# ------------------------------------------------------------------------------------------------ trainer
def _most_common_instruction(examples: List[Example]) -> str:
    counts: Dict[str, int] = {}
    for e in examples:
        counts[e.instruction] = counts.get(e.instruction, 0) + 1
    return max(counts, key=counts.get) if counts else ""


def _load_data(path: str, group_size: int, what: str) -> List[Example]:
    from .data import DataError
    try:
        examples = read_jsonl(path)
        check_group_size(examples, group_size)
    except DataError as e:
        raise TrainError(f"train: {what}: {e}") from None
    except OSError as e:
        raise TrainError(f"train: cannot read {what} {path}: {e.strerror or e}") from None
    if not examples:
        raise TrainError(f"train: {what} {path} holds no examples")
    return examples


def _check_streams(cfg: TrainConfig, stage1: List[Example], stage2: Optional[List[Example]]) -> None:
    """Everything the batch streams would raise at their first batch, checked before any training: stage 2's (a blend
    that cannot fill a batch once failed only after stage 1 had trained, with nothing saved when save_every was 0),
    and group_size 1 with non-retrieval examples (they train on their own group without in-batch negatives: a group
    of one document is a loss of exactly 0 with zero gradients)."""
    from .data import DataError
    for what, examples in (("data", stage1), ("stage2_data", stage2)):
        if examples is None:
            continue
        if cfg.group_size == 1:
            other = sorted({ex.task_type for ex in examples if ex.task_type != "retrieval"})
            if other:
                raise TrainError(f"train: {what}: group_size=1 cannot train the {', '.join(other)} examples (they use "
                                 "no in-batch negatives, so a group of one document gives a loss of 0): use "
                                 "group_size >= 2 with negatives (nvembed mine), or leave those examples out")
        try:
            iterate_batches(examples, cfg.batch_size, cfg.group_size, cfg.seed)
        except DataError as e:
            raise TrainError(f"train: {what}{' (blended with data)' if what == 'stage2_data' else ''}: {e}") from None


def _check_eval_data(cfg: TrainConfig) -> None:
    """The evaluation folder reads and has queries to score, checked on every rank before training (rank 0 alone
    evaluates, at step 0 first: a bad folder would fail there while the other ranks wait)."""
    if not cfg.eval_data:
        return
    from nvembed import retrieval
    try:
        _, _, _, queries, qrels = retrieval.load_beir(cfg.eval_data)
        retrieval.evaluate({}, {q: r for q, r in qrels.items() if q in queries})
    except retrieval.InputError as e:
        raise TrainError(f"train: eval_data: {e}") from None


def _check_instructions(model, cfg: TrainConfig, streams, eval_instruction: str) -> None:
    """Every instruction leaves room for query text within query_max_length (checked before training: the batch
    that holds a too-long one may come late in stage 2)."""
    from nvembed.encode import check_instruction_fits
    instructions = dict.fromkeys([ex.instruction for examples in streams for ex in examples] + [eval_instruction])
    try:
        for ins in instructions:
            check_instruction_fits(model, ins, cfg.query_max_length, "train: query_max_length")
    except ValueError as e:
        raise TrainError(str(e)) from None


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        from nvembed.device import resolve_device as resolve
        self.dist = init_distributed(cfg.device if cfg.device != "auto" else resolve("auto").type)
        try:
            self.device = resolve_device(cfg.device, self.dist)
            # before minutes of loading: every rank sees the same filesystem (README), so all raise together
            if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
                raise TrainError(f"train: --output {cfg.output} exists and is not a folder")
            if cfg.batch_size % self.dist.world:
                raise TrainError(f"train: batch_size ({cfg.batch_size}) must be divisible by the number of "
                                 f"processes ({self.dist.world})")
            self.stage1 = _load_data(cfg.data, cfg.group_size, "data")
            self.stage2 = None
            if cfg.stage2_data:
                # The stage-2 blend: the stage-1 retrieval data plus the stage-2 file's tasks.
                self.stage2 = self.stage1 + _load_data(cfg.stage2_data, cfg.group_size, "stage2_data")
            _check_streams(cfg, self.stage1, self.stage2)
            _check_eval_data(cfg)
            self.data_digests = {"data": data_digest(self.stage1),
                                 "stage2_data": data_digest(self.stage2[len(self.stage1):]) if self.stage2 else None}
            self.eval_instruction = (cfg.eval_instruction if cfg.eval_instruction is not None
                                     else _most_common_instruction(self.stage1))
            torch.manual_seed(cfg.seed + self.dist.rank)
            random.seed(cfg.seed)
            self.model = build_model(cfg, self.device)
            _check_instructions(self.model, cfg, [self.stage1, self.stage2 or []], self.eval_instruction)
            autocast = torch.bfloat16 if (cfg.bf16 and self.device.type == "cuda") else None
            self.wrapper = EmbeddingWrapper(self.model, autocast_dtype=autocast)
            self.engine = self.wrapper
            if self.dist.world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP
                self.engine = DDP(self.wrapper, device_ids=[self.device.index] if self.device.type == "cuda"
                                  else None)
            from nvembed.losses import CachedInfoNCE, InfoNCELoss
            self.loss_in_batch = InfoNCELoss(cfg.temperature, in_batch_negatives=True, cross_rank=cfg.cross_rank)
            self.loss_own_group = InfoNCELoss(cfg.temperature, in_batch_negatives=False)
            self.cached = None
            if cfg.grad_cache_chunk:
                embed = lambda inputs: self.engine(inputs, None)[0]  # noqa: E731
                self.cached = {"retrieval": CachedInfoNCE(embed, self.loss_in_batch, cfg.grad_cache_chunk),
                               "other": CachedInfoNCE(embed, self.loss_own_group, cfg.grad_cache_chunk)}
            self.optimizer = torch.optim.AdamW(_param_groups(self.model, cfg), weight_decay=cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.dist.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # -- one optimizer step on one global batch
    def train_step(self, batch) -> float:
        loss = self.forward_backward(batch)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable_parameters(self.model)], self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def forward_backward(self, batch) -> float:
        """Loss of this rank's slice of the global batch and its gradients in .grad (DDP-averaged); returns the
        loss averaged over ranks (= the single-process loss on the whole batch)."""
        cfg, dist = self.cfg, self.dist
        b = len(batch.queries) // dist.world
        G = batch.group_size
        lo = dist.rank * b
        queries, instructions = batch.queries[lo:lo + b], batch.instructions[lo:lo + b]
        docs = batch.docs[lo * G:(lo + b) * G]
        q_in = tokenize(self.model, queries, instructions, cfg.query_max_length, self.device)
        d_in = tokenize(self.model, docs, None, cfg.doc_max_length, self.device)
        retrieval = batch.task_type == "retrieval"
        if self.cached is not None:
            cached = self.cached["retrieval" if retrieval else "other"]
            no_sync = self.engine.no_sync if dist.world > 1 else None
            loss = cached.forward_backward(q_in, d_in, G, no_sync=no_sync)
        else:
            q, d = self.engine(q_in, d_in)
            loss = (self.loss_in_batch if retrieval else self.loss_own_group)(q, d, G)
            loss.backward()
        return dist.mean(float(loss.detach()))

    def _batches(self, start_step: int):
        """(global step, batch) from start_step on: stage 1 steps, then stage 2 steps (its own data stream)."""
        cfg = self.cfg
        if start_step < cfg.max_steps:
            it = iterate_batches(self.stage1, cfg.batch_size, cfg.group_size, cfg.seed, start_step=start_step)
            for s in range(start_step, cfg.max_steps):
                yield s, 1, next(it)
        if self.stage2 is not None and cfg.num_stage2_steps:
            first = max(start_step, cfg.max_steps)
            it = iterate_batches(self.stage2, cfg.batch_size, cfg.group_size, cfg.seed + 1,
                                 start_step=first - cfg.max_steps)
            for s in range(first, cfg.total_steps):
                yield s, 2, next(it)

    def _log(self, record: Dict[str, Any]):
        if self.dist.main:
            with open(os.path.join(self.cfg.output, LOG_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate(self, step: int, evals: List[Dict[str, Any]]):
        if not self.cfg.eval_data:
            return
        if self.dist.main:
            t = time.perf_counter()
            # under the training forward's autocast (bf16 on CUDA): the CUDA attention kernels take bf16 / fp16
            ac = self.wrapper.autocast_dtype
            with (torch.autocast(device_type=self.device.type, dtype=ac) if ac is not None
                  else contextlib.nullcontext()):
                metrics = evaluate_beir(self.model, self.cfg.eval_data, self.eval_instruction,
                                        batch_size=self.cfg.eval_batch_size, max_length=self.cfg.doc_max_length,
                                        query_max_length=self.cfg.query_max_length)
            evals.append({"step": step, **metrics, "seconds": round(time.perf_counter() - t, 2)})
            print(f"nvembed train: eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                  file=sys.stderr)
            atomic_write_text(os.path.join(self.cfg.output, "eval.json"), json.dumps(
                {"data": os.path.abspath(self.cfg.eval_data), "instruction": self.eval_instruction,
                 "evals": evals}, indent=2))
        self.dist.barrier()

    def _earlier_evals(self, upto_step: int) -> List[Dict[str, Any]]:
        """The evaluations a resumed run made up to its checkpoint (eval.json, same data and instruction)."""
        path = os.path.join(self.cfg.output, "eval.json")
        if not (self.cfg.eval_data and os.path.isfile(path)):
            return []
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return []
        if (not isinstance(doc, dict) or doc.get("data") != os.path.abspath(self.cfg.eval_data)
                or doc.get("instruction") != self.eval_instruction):
            return []
        return [e for e in doc.get("evals", []) if isinstance(e, dict) and isinstance(e.get("step"), int)
                and e["step"] <= upto_step]

    def _truncate_log(self, upto_step: int):
        """Drop log lines of steps after the checkpoint a resumed run restarts from."""
        path = os.path.join(self.cfg.output, LOG_FILE)
        if not (self.dist.main and os.path.isfile(path)):
            return
        keep = []
        with open(path) as f:
            for ln in f:
                try:
                    record = json.loads(ln)
                except ValueError:  # a line torn by the kill that ended the run (its step is redone)
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= upto_step:
                    keep.append(ln if ln.endswith("\n") else ln + "\n")
        atomic_write_text(path, "".join(keep))

    def run(self) -> Dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        def prepare_output():
            os.makedirs(cfg.output, exist_ok=True)
            return _clear_stale_checkpoints(cfg.output, cfg.resume)

        removed = dist.on_main(prepare_output, f"cannot use --output {cfg.output}")
        if removed:
            print(f"nvembed train: not resuming: removed {removed} checkpoint(s) of an earlier run in "
                  f"{os.path.join(cfg.output, 'checkpoints')}", file=sys.stderr)
        start = 0
        ckpts = checkpoint_dirs(cfg.output) if cfg.resume else []
        # every rank must resume the same checkpoint (a rank on a node that does not see rank 0's files would
        # start over with other weights: DDP averages gradients, not weights)
        dist.same_on_all_ranks(os.path.basename(ckpts[-1]) if ckpts else None,
                               f"the checkpoint to resume in {cfg.output} (--output must be on a filesystem that "
                               "every process sees)")
        if ckpts:
            start = load_checkpoint(ckpts[-1], self.model, self.optimizer, self.scheduler, dist, cfg,
                                    self.data_digests)
            if dist.main:
                print(f"nvembed train: resumed from {ckpts[-1]} (step {start})", file=sys.stderr)
        elif dist.main and os.path.isfile(os.path.join(cfg.output, LOG_FILE)):
            os.remove(os.path.join(cfg.output, LOG_FILE))
        # after the resume check: a refused resume leaves the earlier run's settings in place
        dist.on_main(lambda: atomic_write_text(os.path.join(cfg.output, "train_config.json"),
                                               json.dumps(dataclasses.asdict(cfg), indent=2)),
                     f"cannot write {os.path.join(cfg.output, 'train_config.json')}")
        self._truncate_log(start)
        evals: List[Dict[str, Any]] = self._earlier_evals(start) if start else []
        if start == 0:
            self._evaluate(0, evals)
        exit_after = int(os.environ.get(EXIT_AFTER_STEP_ENV, "0") or 0)
        bar = None
        if cfg.progress and dist.main:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=cfg.total_steps, initial=start, desc="train", file=sys.stderr)
            except ImportError:
                bar = None
        losses, t_run, n_examples = [], time.perf_counter(), 0
        for step, stage, batch in self._batches(start):
            # the rates this step's optimizer update uses (the scheduler moves them on inside train_step)
            lrs = {g.get("name", str(k)): g["lr"] for k, g in enumerate(self.optimizer.param_groups)}
            t = time.perf_counter()
            loss = self.train_step(batch)
            dt = time.perf_counter() - t
            done = step + 1
            n_examples += len(batch.queries)
            losses.append(loss)
            record = {"step": done, "stage": stage, "task_type": batch.task_type, "loss": round(loss, 6),
                      "lr": next(iter(lrs.values())), "lrs": lrs, "examples_per_s": round(len(batch.queries) / dt, 2),
                      "seconds": round(dt, 3)}
            self._log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{record['examples_per_s']:.1f}")
            elif dist.main and (done % cfg.log_every == 0 or done == cfg.total_steps):
                print(f"nvembed train: step {done}/{cfg.total_steps} stage {stage} loss {loss:.4f} "
                      f"{record['examples_per_s']:.1f} examples/s", file=sys.stderr)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.total_steps:
                save_checkpoint(cfg.output, done, self.model, self.optimizer, self.scheduler, cfg, dist,
                                self.data_digests)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.total_steps:
                self._evaluate(done, evals)
            if exit_after and done == exit_after:
                sys.stderr.flush()
                os._exit(3)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t_run
        save_checkpoint(cfg.output, cfg.total_steps, self.model, self.optimizer, self.scheduler, cfg, dist,
                        self.data_digests)
        dist.on_main(lambda: export_model(self.model, cfg.output), f"cannot export the model to {cfg.output}")
        if not any(e["step"] == cfg.total_steps for e in evals):  # a finished run started again has it already
            self._evaluate(cfg.total_steps, evals)
        summary = {"steps": cfg.total_steps, "resumed_from": start, "losses": losses,
                   "examples_per_s": round(n_examples / elapsed, 2) if n_examples else None, "evals": evals}
        return summary


def train(cfg: TrainConfig) -> Dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
