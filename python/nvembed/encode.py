"""encode(): NV-Embed's released text -> embedding recipe, batched like sentence-transformers.

Per row (NVEMBED_FACTS (d)): text = instruction + text + eos_token (string concatenation; eos only when the
config's add_eos and the tokenizer has one — the release always appends it and its config has add_eos true),
tokenized with padding, truncation and max_length; pool_mask = attention_mask with the first
len(tokenizer.tokenize(instruction)) positions zeroed (right padding, is_mask_instruction, non-empty
instruction) — a positional rule that starts at BOS, as released. Inputs are sorted longest first, batched, and
the original order restored.
"""
from __future__ import annotations

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


def instruction_length(model, instruction: str) -> int:
    cfg = model.config
    if instruction and cfg["padding_side"] == "right" and cfg["is_mask_instruction"]:
        return len(model.tokenizer.tokenize(instruction))
    return 0


def _effective_max_length(model, max_length: int) -> int:
    """max_length capped at the model's max_seq_length and its backbone's position table (longer inputs would index
    past it); an error where it leaves no room for one text token next to the tokenizer's special tokens (the
    tokenizer would then not truncate at all)."""
    cfg = model.config
    for cap in (cfg.get("max_seq_length"), (cfg.get("text_config") or {}).get("max_position_embeddings")):
        if isinstance(cap, int) and cap > 0:
            max_length = min(max_length, cap)
    special = model.tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise ValueError(f"encode: max_length={max_length} leaves no room for text: the tokenizer adds {special} "
                         f"special token(s), so max_length must be at least {special + 1}")
    return max_length


def tokenize_batch(model, texts: Sequence[str], instructions: Sequence[str], max_length: int, device=None):
    """input_ids / attention_mask / pool_mask of one batch with the release's recipe (module docstring), one
    instruction per row (encode() passes the same one for every row; training data may mix them)."""
    tokenizer = model.tokenizer
    max_length = _effective_max_length(model, max_length)
    eos = tokenizer.eos_token if (model.config["add_eos"] and tokenizer.eos_token is not None) else ""
    batch = tokenizer([i + t + eos for i, t in zip(instructions, texts)], max_length=max_length, padding=True,
                      truncation=True, return_token_type_ids=False, return_tensors="pt")
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


@torch.inference_mode()
def encode_texts(model, texts: Sequence[str], instruction: str = "", max_length: int = 4096, batch_size: int = 32,
                 normalize: bool = False, convert_to_numpy: bool = True, show_progress_bar: bool = False):
    texts = _check_texts(texts)
    if not isinstance(instruction, str):
        raise TypeError(f"encode: instruction is {type(instruction).__name__}, expected str")
    if batch_size < 1:
        raise ValueError(f"encode: batch_size must be >= 1, got {batch_size}")
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
    was_training = model.training
    model.eval()
    try:
        for start in starts:
            idx = order[start:start + batch_size]
            batch = tokenize_batch(model, [texts[i] for i in idx], [instruction] * len(idx), max_length, device)
            emb = model(batch["input_ids"], batch["attention_mask"], batch["pool_mask"])["sentence_embeddings"]
            out[idx] = emb.float().cpu()
    finally:
        model.train(was_training)
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
    return out.numpy() if convert_to_numpy else out
