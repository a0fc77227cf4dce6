"""NVEmbedModel: a Hugging Face backbone made bidirectional on our attention kernel + NV-Embed's latent-attention
pooling (or mean pooling), loading and saving NV-Embed-v1/v2 checkpoint folders without trust_remote_code."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from transformers import (AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel, MistralConfig,
                          MistralModel, Qwen2Config, Qwen2Model)

from . import checkpoint
from .attention import ATTN_IMPLEMENTATION, make_bidirectional
from .config import backbone_config, normalize_top_config, text_config_dict
from .encode import encode_texts
from .layers import LatentAttentionPooling

CONFIG_FILE = "config.json"


def build_backbone(config) -> nn.Module:
    """The bare transformers backbone (no LM head, no BERT pooler) on the nvembed attention backend."""
    config._attn_implementation = ATTN_IMPLEMENTATION
    if isinstance(config, MistralConfig):
        model = MistralModel(config)
    elif isinstance(config, Qwen2Config):
        model = Qwen2Model(config)
    elif isinstance(config, LlamaConfig):
        model = LlamaModel(config)
    elif isinstance(config, BertConfig):
        model = BertModel(config, add_pooling_layer=False)
    else:
        raise ValueError(f"nvembed: no backbone for config class {type(config).__name__}")
    return make_bidirectional(model)


def _materialize_meta_buffers(model: nn.Module, config) -> None:
    """After a meta-device build + assign-load, the non-persistent buffers (rotary inv_freq, BERT position ids)
    are still meta: rebuild the modules that own them from the backbone config on the CPU, take their buffers."""
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta:
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(getattr(module, "config", config))
        except Exception as e:
            raise RuntimeError(f"nvembed: cannot materialize buffers {meta} of {name} ({type(module).__name__}) "
                               f"by rebuilding it from the backbone config: {e}") from e
        for b in meta:
            module.register_buffer(b, getattr(fresh, b), persistent=b not in module._non_persistent_buffers_set)


def load_tokenizer(path: str, config: Dict[str, Any]):
    """The folder's tokenizer. The backbone config is handed to AutoTokenizer so that it never reads the folder's
    config.json: the release's has an auto_map, and transformers would ask (on stdin) to run remote code."""
    text_config = backbone_config(normalize_top_config(config)["text_config"])
    return AutoTokenizer.from_pretrained(path, config=text_config, trust_remote_code=False)


class NVEmbedModel(nn.Module):
    """NV-Embed: `embedding_model` (a bidirectional HF backbone) -> `latent_attention_model` (latent pooling) or
    masked mean pooling -> [B, d]. state_dict() keys equal the released `embedding_model.*` /
    `latent_attention_model.*` names.

    `config` is the config.json dict (see nvembed.config); `tokenizer` a transformers tokenizer (needed by encode).
    """

    def __init__(self, config: Dict[str, Any], tokenizer=None):
        super().__init__()
        self.config = normalize_top_config(config)
        if self.config["pooling"] == "latent":  # registered first: the release's state_dict order
            self.latent_attention_model = LatentAttentionPooling.from_config(self.config["latent_attention_config"])
        self.embedding_model = build_backbone(backbone_config(self.config["text_config"]))
        if self.config["pooling"] == "latent" and self.latent_attention_model.hidden_dim != self.embedding_dim:
            raise ValueError(f"nvembed: latent_attention_config hidden_dim/latent_dim "
                             f"({self.latent_attention_model.hidden_dim}) must equal the backbone's hidden_size "
                             f"({self.embedding_dim})")
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # ---------------------------------------------------------------- tokenizer / sizes
    def set_tokenizer(self, tokenizer) -> None:
        """Apply the release's tokenizer settings: pad = eos when add_pad_token, padding side from the config."""
        if self.config["add_pad_token"] and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = self.config["padding_side"]
        self.tokenizer = tokenizer

    @property
    def embedding_dim(self) -> int:
        return self.embedding_model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_mask: Optional[torch.Tensor] = None,
                return_token_embeddings: bool = False) -> Dict[str, torch.Tensor]:
        """input_ids/attention_mask [B, L] (attention_mask None = no padding); pool_mask [B, L] (1 = pooled;
        None = attention_mask — the release would return per-token states instead). The backbone sees
        attention_mask only (instruction tokens take part in attention, not in pooling). With
        return_token_embeddings, also "token_embeddings": the backbone's last hidden states [B, L, d]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {} if isinstance(self.embedding_model, BertModel) else {"use_cache": False}
        hidden = self.embedding_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if pool_mask is None:
            pool_mask = attention_mask
        if self.config["pooling"] == "latent":
            embeds = self.latent_attention_model(hidden, pool_mask)
        else:
            m = pool_mask.to(hidden.dtype).unsqueeze(-1)
            # the clamp is sentence-transformers' (an all-zero row gives 0)
            embeds = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.config["normalize"]:
                embeds = nn.functional.normalize(embeds, p=2, dim=-1)
        if return_token_embeddings:
            return {"sentence_embeddings": embeds, "token_embeddings": hidden}
        return {"sentence_embeddings": embeds}

    # ---------------------------------------------------------------- encode
    def encode(self, texts: Sequence[str], instruction: str = "", max_length: int = 4096, batch_size: int = 32,
               normalize: bool = False, convert_to_numpy: bool = True, show_progress_bar: bool = False):
        """Embeddings of `texts` [len(texts), d] with the release's encode() semantics (NVEMBED_FACTS (d))."""
        return encode_texts(self, texts, instruction=instruction, max_length=max_length, batch_size=batch_size,
                            normalize=normalize, convert_to_numpy=convert_to_numpy,
                            show_progress_bar=show_progress_bar)

    def encode_queries(self, texts: Sequence[str], instruction: str = "", **kwargs):
        """Queries carry the task instruction (e.g. "Instruct: {task}\\nQuery: "), excluded from pooling."""
        return self.encode(texts, instruction=instruction, **kwargs)

    def encode_corpus(self, texts: Sequence[str], **kwargs):
        """Passages carry no instruction."""
        return self.encode(texts, instruction="", **kwargs)

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_state_dict(cls, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor], tokenizer=None,
                        dtype: Optional[torch.dtype] = torch.float32, source: str = "state_dict") -> "NVEmbedModel":
        """A model holding `state_dict`'s tensors (no copy where they already have `dtype`; None keeps theirs),
        built on the meta device and checked by name and shape first (one error lists every mismatch). The
        non-persistent buffers (rotary inv_freq, BERT position ids) are rebuilt in float32 on the CPU, as
        transformers keeps them: a rotary inv_freq rounded to bf16 would shift the angles of late positions."""
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        checkpoint.check_state_dict_shapes(expected, state_dict, source=source)
        # buffers older transformers versions saved (rotary inv_freq, position ids): accepted above, not loaded
        state_dict = {k: t for k, t in state_dict.items()
                      if k in expected or not k.endswith(checkpoint.IGNORABLE_SUFFIXES)}
        if dtype is not None:
            state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        _materialize_meta_buffers(model, model.embedding_model.config)
        if tokenizer is not None:
            model.set_tokenizer(tokenizer)
        return model.eval()

    @classmethod
    def from_config_dict(cls, config: Dict[str, Any], folder: str, tokenizer=None,
                         dtype: Optional[torch.dtype] = torch.float32, rename=None) -> "NVEmbedModel":
        """Build on the meta device, check the folder's tensors by name and shape (one error lists every
        mismatch), then load them. `rename` maps checkpoint names to ours (None = identity); names it maps to
        None are skipped. dtype None keeps the checkpoint's dtype."""
        with torch.device("meta"):
            expected = cls(config).state_dict()
        found = checkpoint.read_shapes(folder)
        mapping = {k: (rename(k) if rename else k) for k in found}
        found_ours = {mapping[k]: s for k, s in found.items() if mapping[k] is not None}
        checkpoint.check_state_dict_shapes(expected, found_ours, source=f"checkpoint in {folder}")
        wanted = {k for k, v in mapping.items() if v in expected}
        tensors = {mapping[k]: t for k, t in checkpoint.load_state_dict(folder, wanted).items()}
        return cls.from_state_dict(config, tensors, tokenizer=tokenizer, dtype=dtype,
                                   source=f"checkpoint in {folder}")

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = torch.float32,
                        device: Optional[Union[str, torch.device]] = None) -> "NVEmbedModel":
        """Load an NV-Embed-v1/v2 folder (config.json, safetensors single or sharded + index, tokenizer). dtype: a
        torch dtype or its name (float32 / bfloat16 / float16; float16 needs a CUDA device), None = the checkpoint's."""
        if dtype is not None:
            from .device import resolve_dtype
            target = torch.device(device) if device is not None else torch.device("cpu")
            dtype = resolve_dtype(dtype, target, where="NVEmbedModel.from_pretrained: dtype")
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
        has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                            "tokenizer.model"))
        tokenizer = load_tokenizer(path, config) if has_tokenizer else None  # None: forward() only
        model = cls.from_config_dict(config, path, tokenizer=tokenizer, dtype=dtype)
        return model.to(device) if device is not None else model

    def config_dict(self) -> Dict[str, Any]:
        """config.json contents: the release's fields (+ ours: pooling, normalize, max_seq_length)."""
        cfg = dict(self.config)
        cfg["text_config"] = text_config_dict(self.embedding_model.config, self.config.get("text_config"))
        # the dtype the weights are saved in, not the one they were loaded from
        dtype = str(self.dtype).removeprefix("torch.")
        cfg["torch_dtype"] = dtype
        for key in ("torch_dtype", "dtype"):  # transformers 4 / 5 names in the backbone's own config
            if key in cfg["text_config"]:
                cfg["text_config"][key] = dtype
        cfg.setdefault("architectures", ["NVEmbedModel"])
        cfg.setdefault("hidden_size", self.embedding_dim)
        return cfg

    def save_pretrained(self, path: str, max_shard_bytes: int = 5 * 2**30) -> List[str]:
        """Write config.json, safetensors (sharded + index beyond max_shard_bytes) and the tokenizer files."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(self.config_dict(), f, indent=2)
        files = checkpoint.save_state_dict(self.state_dict(), path, max_shard_bytes=max_shard_bytes)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        return files
