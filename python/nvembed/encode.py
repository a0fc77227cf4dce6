"""encode(): NV-Embed's released text -> embedding recipe, batched like sentence-transformers.

Per row (NVEMBED_FACTS (d)): text = instruction + text + eos_token (string concatenation; the release always appends
the eos token whatever its config's add_eos says; ours skips it only where the package-only config key append_eos is
false, as for sentence-transformers imports, or the tokenizer has none), tokenized with padding, truncation and
max_length; pool_mask = attention_mask with the first len(tokenizer.tokenize(instruction)) positions zeroed (right
padding, is_mask_instruction, non-empty instruction) — a positional rule that starts at BOS, as released. Inputs are
sorted longest first, batched, and the original order restored.

Models imported from sentence-transformers folders keep that library's rules through package-only config keys:
do_lower_case (the texts, instruction included, are lowercased before tokenizing) and instruction_count
"sentence_transformers" (a Pooling with include_prompt false: the instruction tokenized with its special tokens, less
the closing one, i.e. [CLS] and every instruction token).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import torch


def _check_texts(texts) -> list:
    if isinstance(texts, str):
        raise TypeError("encode: texts must be a list of strings, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode: texts[{i}] is {type(t).__name__}, expected str")
    return texts


def _prepare(model, text: str) -> str:
    return text.lower() if model.config.get("do_lower_case") else text


def instruction_length(model, instruction: str) -> int:
    """Leading positions of a row that pooling leaves out for `instruction` (module docstring)."""
    cfg = model.config
    if not (instruction and cfg["padding_side"] == "right" and cfg["is_mask_instruction"]):
        return 0
    return prompt_positions(model, instruction, cfg.get("instruction_count", "nvembed"))


def prompt_positions(model, instruction: str, rule: str) -> int:
    """The leading positions `instruction` takes, counted by the release's rule ("nvembed": its tokens without
    special tokens, the window starting at BOS) or sentence-transformers' ("sentence_transformers": tokenized with
    the special tokens, less the closing one)."""
    text = _prepare(model, instruction)
    if rule == "sentence_transformers":
        return len(model.tokenizer(text)["input_ids"]) - 1
    if rule != "nvembed":
        raise ValueError(f"encode: config instruction_count must be 'nvembed' or 'sentence_transformers', got {rule!r}")
    return len(model.tokenizer.tokenize(text))


def _effective_max_length(model, max_length: int, cap_at_config: bool = True) -> int:
    """max_length capped at the model's max_seq_length (unless not `cap_at_config`: the sentence-transformers
    wrapper's own max_seq_length may be raised past it, as in that library) and, for backbones with absolute
    positions (BERT), its position table (longer inputs would index past it; rotary backbones encode longer texts as
    the release does); an error where it leaves no room for one text token next to the tokenizer's special tokens
    (the tokenizer would then not truncate at all)."""
    cfg = model.config
    text_config = cfg.get("text_config") or {}
    caps = [cfg.get("max_seq_length") if cap_at_config else None]
    if text_config.get("model_type") == "bert":
        caps.append(text_config.get("max_position_embeddings"))
    for cap in caps:
        if isinstance(cap, int) and cap > 0:
            max_length = min(max_length, cap)
    special = model.tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise ValueError(f"encode: max_length={max_length} leaves no room for text: the tokenizer adds {special} "
                         f"special token(s), so max_length must be at least {special + 1}")
    return max_length


def check_instruction_fits(model, instruction: str, max_length: int, where: str = "encode",
                           cap_at_config: bool = True) -> None:
    """An error where `instruction` alone fills the max_length - special tokens a row holds: truncation would cut
    every text to nothing, and all rows would embed the instruction alone (or, with it masked, nothing)."""
    if not instruction:
        return
    room = (_effective_max_length(model, max_length, cap_at_config)
            - model.tokenizer.num_special_tokens_to_add(pair=False))
    n = len(model.tokenizer.tokenize(_prepare(model, instruction)))
    if n >= room:
        raise ValueError(f"{where}: the instruction {instruction[:60]!r} takes {n} tokens, so max_length={max_length} "
                         f"({room} tokens beside the special tokens) leaves no room for the text: raise max_length "
                         "or shorten the instruction")


def row_texts(model, texts: Sequence[str], instructions: Sequence[str]) -> list:
    """The strings the tokenizer sees: instruction + text + eos (module docstring)."""
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token if (model.config.get("append_eos", True) and tokenizer.eos_token is not None) else ""
    return [_prepare(model, i + t) + eos for i, t in zip(instructions, texts)]


def tokenize_batch(model, texts: Sequence[str], instructions: Sequence[str], max_length: int, device=None):
    """input_ids / attention_mask / pool_mask of one batch with the release's recipe (module docstring), one
    instruction per row (encode() passes the same one for every row; training data may mix them)."""
    tokenizer = model.tokenizer
    max_length = _effective_max_length(model, max_length)
    for ins in dict.fromkeys(instructions):
        check_instruction_fits(model, ins, max_length)
    batch = tokenizer(row_texts(model, texts, instructions), max_length=max_length, padding=True, truncation=True,
                      return_token_type_ids=False, return_tensors="pt")
    attention_mask = batch["attention_mask"]
    pool_mask = attention_mask.clone()
    lengths = {}
    for row, ins in enumerate(instructions):
        if ins not in lengths:
            lengths[ins] = instruction_length(model, ins)
        if lengths[ins]:
            pool_mask[row, :lengths[ins]] = 0
    out = {"input_ids": batch["input_ids"].long(), "attention_mask": attention_mask, "pool_mask": pool_mask}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


_MODE_LOCK = threading.Lock()


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode (no dropout) while any encode() on it runs, its own mode restored when the last one
    ends: concurrent encodes on one model (threads) no longer restore train mode under each other, nor leave it in
    eval mode. (A training forward in another thread during an encode still sees eval mode: the mode is the
    module's.)"""
    with _MODE_LOCK:
        state = model.__dict__.setdefault("_nvembed_encode_state", {"active": 0, "training": False})
        if state["active"] == 0:
            state["training"] = model.training
            model.eval()
        state["active"] += 1
    try:
        yield
    finally:
        with _MODE_LOCK:
            state["active"] -= 1
            if state["active"] == 0:
                model.train(state["training"])


@torch.inference_mode()
def encode_texts(model, texts: Sequence[str], instruction: str = "", max_length: int = 4096, batch_size: int = 32,
                 normalize: bool = False, convert_to_numpy: bool = True, show_progress_bar: bool = False):
    texts = _check_texts(texts)
    if not isinstance(instruction, str):
        raise TypeError(f"encode: instruction is {type(instruction).__name__}, expected str")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"encode: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"encode: max_length must be an int >= 1, got {max_length!r}")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("encode: the model has no tokenizer (load it with from_pretrained / nvembed.load)")
    device = model.device

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), model.embedding_dim, dtype=torch.float32)
    starts = range(0, len(texts), batch_size)
    if show_progress_bar:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="encode")
    with _eval_mode(model):
        for start in starts:
            idx = order[start:start + batch_size]
            batch = tokenize_batch(model, [texts[i] for i in idx], [instruction] * len(idx), max_length, device)
            emb = model(batch["input_ids"], batch["attention_mask"], batch["pool_mask"])["sentence_embeddings"]
            out[idx] = emb.float().cpu()
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
    return out.numpy() if convert_to_numpy else out
