"""NV-Embed's config.json (the released remote-code layout, read and written without trust_remote_code).

Top level: model_type "nvembed", latent_attention_config, text_config, padding_side, add_pad_token,
is_mask_instruction, add_eos, mask_type, hidden_size (NVEMBED_FACTS (a)). Our own additions, absent from the
release and defaulted when missing: "pooling" ("latent" | "mean"), "normalize" (mean pooling only),
"max_seq_length" (the backbone's position limit for encode; null = none), and the text rules of sentence-transformers
imports (nvembed.encode): "append_eos" (default true: the eos token is appended to every text, as the release does
whatever its add_eos says), "do_lower_case" (default false) and "instruction_count" ("nvembed", the release's count,
or "sentence_transformers").
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from transformers import BertConfig, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

# text_config.model_type -> transformers config class; "bidir_mistral" is the release's BidirectionalMistralConfig.
BACKBONE_CONFIGS = {
    "bidir_mistral": MistralConfig,
    "mistral": MistralConfig,
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "bert": BertConfig,
}

RELEASED_DEFAULTS = {
    "padding_side": "right",
    "add_pad_token": True,
    "is_mask_instruction": True,
    "add_eos": True,
    "mask_type": "b",
}

# Config fields that are bookkeeping, not architecture.
_DROP_FROM_TEXT_CONFIG = ("model_type", "auto_map", "_name_or_path", "architectures", "transformers_version")


def backbone_config(text_config: Dict[str, Any]) -> PretrainedConfig:
    """A transformers config for the backbone described by the release's `text_config` dict."""
    model_type = text_config.get("model_type", "llama")  # NVEmbedConfig's default for a dict without one
    if model_type not in BACKBONE_CONFIGS:
        raise ValueError(f"nvembed: text_config.model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(BACKBONE_CONFIGS)})")
    fields = {k: v for k, v in text_config.items() if k not in _DROP_FROM_TEXT_CONFIG}
    config = BACKBONE_CONFIGS[model_type](**fields)
    # Our attention kernel has no dropout; embeddings are computed in eval mode anyway.
    for name in ("attention_dropout", "attention_probs_dropout_prob"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


def text_config_dict(config: PretrainedConfig, original: Dict[str, Any] = None) -> Dict[str, Any]:
    """The `text_config` dict to write: the loaded one when there was one (keeps the release's fields), else the
    backbone config's own fields (a Mistral backbone is written as the release's "bidir_mistral")."""
    if original is not None:
        return copy.deepcopy(original)
    d = config.to_dict()
    for key in ("transformers_version", "_attn_implementation_autoset", "is_causal"):
        d.pop(key, None)
    if d.get("model_type") == "mistral":
        d["model_type"] = "bidir_mistral"
    rope = d.get("rope_parameters") or {}
    if "rope_theta" in rope:  # the release (transformers 4.42) reads rope_theta
        d["rope_theta"] = rope["rope_theta"]
    return d


def normalize_top_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Validate a loaded config.json and fill the release's defaults and ours."""
    if config.get("model_type") != "nvembed":
        raise ValueError(f"nvembed: config.json model_type is {config.get('model_type')!r}, expected 'nvembed'")
    if "text_config" not in config:
        raise ValueError("nvembed: config.json has no text_config")
    out = copy.deepcopy(config)
    for key, value in RELEASED_DEFAULTS.items():
        out.setdefault(key, value)
    out.setdefault("pooling", "latent")
    if out["pooling"] not in ("latent", "mean"):
        raise ValueError(f"nvembed: pooling must be 'latent' or 'mean', got {out['pooling']!r}")
    if out["pooling"] == "latent":
        out["latent_attention_config"] = {"model_type": "latent_attention",
                                          **(out.get("latent_attention_config") or {})}
    out.setdefault("normalize", out["pooling"] == "latent")
    out.setdefault("max_seq_length", None)
    out.setdefault("append_eos", True)
    out.setdefault("do_lower_case", False)
    out.setdefault("instruction_count", "nvembed")
    for key in ("append_eos", "do_lower_case"):
        if not isinstance(out[key], bool):
            raise ValueError(f"nvembed: config.json {key} must be true or false, got {out[key]!r}")
    if out["instruction_count"] not in ("nvembed", "sentence_transformers"):
        raise ValueError("nvembed: config.json instruction_count must be 'nvembed' or 'sentence_transformers', got "
                         f"{out['instruction_count']!r}")
    return out
