"""sentence-transformers integration: an NVEmbedModel as a one-module `SentenceTransformer`.

    st_model = nvembed.to_sentence_transformer(nvembed.load("default"))
    st_model.encode(texts, prompt="Instruct: ...\\nQuery: ")   # == model.encode(texts, instruction=...)

The single module (`NVEmbedSTModule`, an ST input module) tokenizes exactly like `NVEmbedModel.encode`
(`prompt + text + eos` as one string, right padding, truncation at `max_seq_length`) and its forward runs the whole
model (backbone on our attention kernel + latent-attention / mean pooling) and returns "sentence_embedding".

Prompts (`encode(prompt=...)`, `prompt_name=...`, `encode_query` with a "query" prompt): the prompt is prepended
to the text and, like ST's `Pooling(include_prompt=False)`, its positions are left out of pooling while still taking
part in attention. How many positions is the model's own rule, the released NV-Embed one (NVEMBED_FACTS (d)): the
first `len(tokenizer.tokenize(prompt))` positions (counted from BOS) when the config says is_mask_instruction with
right padding. With `include_prompt=None` (default) the module follows the model's config, so an ST encode equals
`model.encode(texts, instruction=prompt)`; a model imported from a sentence-transformers folder keeps that folder's
Pooling include_prompt (the default all-MiniLM-L6-v2's is true: the prompt is pooled). `include_prompt=False` forces the
exclusion whatever the config says (right padding only) and counts the positions as sentence-transformers does
(the tokenized prompt less its closing special token: [CLS] and every prompt token for BERT; for a BOS-only
tokenizer like Mistral's this equals the released rule); `include_prompt=True` always pools the prompt.

Save / load: `st_model.save(folder)` writes the NV-Embed folder (config.json, safetensors, tokenizer) plus
ST's modules.json and prompts; `SentenceTransformer(folder, trust_remote_code=True)` loads it back through
`NVEmbedSTModule.load` (ST asks trust_remote_code for any module class outside sentence_transformers; here that
class is nvembed.st from the installed package, nothing is downloaded), and `nvembed.load(folder)` still works.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.input_module import InputModule

from .encode import (_check_texts, _effective_max_length, check_instruction_fits, instruction_length,
                     prompt_positions, row_texts)
from .model import NVEmbedModel

DEFAULT_MAX_LENGTH = 4096  # NVEmbedModel.encode's default (capped by the config's max_seq_length)
ST_CONFIG_FILE = "nvembed_sentence_transformers.json"


class NVEmbedSTModule(InputModule):
    """A sentence-transformers input module wrapping a whole NVEmbedModel: preprocess(texts, prompt) ->
    input_ids / attention_mask / pool_mask; forward(features) -> features + "sentence_embedding"."""

    save_in_root = True
    config_keys = ["include_prompt", "max_seq_length"]

    def __init__(self, model: NVEmbedModel, include_prompt: Optional[bool] = None,
                 max_seq_length: Optional[int] = None):
        super().__init__()
        if model.tokenizer is None:
            raise ValueError("to_sentence_transformer: the model has no tokenizer (load it with "
                             "NVEmbedModel.from_pretrained / nvembed.load)")
        if include_prompt not in (None, True, False):
            raise TypeError(f"include_prompt must be None, True or False, got {include_prompt!r}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.include_prompt = include_prompt
        if max_seq_length is None:
            max_seq_length = min(DEFAULT_MAX_LENGTH, model.config.get("max_seq_length") or DEFAULT_MAX_LENGTH)
        self.max_seq_length = int(max_seq_length)

    # ------------------------------------------------------------------ preprocessing
    def prompt_length(self, prompt: Optional[str]) -> int:
        """Leading positions left out of pooling for this prompt (see the module docstring)."""
        if not prompt or self.include_prompt is True:
            return 0
        if self.include_prompt is None:
            return instruction_length(self.model, prompt)
        if self.model.config["padding_side"] != "right":
            raise ValueError("include_prompt=False needs right padding (the prompt is a fixed number of leading "
                             f"positions); the model pads on the {self.model.config['padding_side']}")
        # sentence-transformers' own count (SentenceTransformer.encode's prompt_length): the tokenized prompt with its
        # special tokens, less the one that closes it ([SEP] / EOS) -- [CLS] / BOS and every prompt token
        return prompt_positions(self.model, prompt, "sentence_transformers")

    def preprocess(self, inputs: Sequence[str], prompt: Optional[str] = None, **kwargs) -> Dict[str, Any]:
        texts = _check_texts(inputs)
        prompt = prompt or ""
        # the strings encode() tokenizes (eos, lowercasing), checked to leave room for text; the length is this
        # module's max_seq_length, which may be raised past the config's (as in sentence-transformers): only a BERT
        # position table caps it
        check_instruction_fits(self.model, prompt, self.max_seq_length, "NVEmbedSTModule", cap_at_config=False)
        batch = self.tokenizer(row_texts(self.model, texts, [prompt] * len(texts)),
                               max_length=_effective_max_length(self.model, self.max_seq_length, cap_at_config=False),
                               padding=True, truncation=True, return_token_type_ids=False, return_tensors="pt")
        attention_mask = batch["attention_mask"]
        pool_mask = attention_mask.clone()
        n = self.prompt_length(prompt)
        if n > 0:
            pool_mask[:, :n] = 0
        return {"input_ids": batch["input_ids"].long(), "attention_mask": attention_mask, "pool_mask": pool_mask}

    def tokenize(self, texts: Sequence[str], **kwargs) -> Dict[str, Any]:
        """The pre-6.x name of preprocess (ST < 6 calls tokenize; the prompt is then already in the texts and
        pooled, as ST's own Transformer module does without prompt_length)."""
        return self.preprocess(texts, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, features: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        out = self.model(features["input_ids"], features["attention_mask"], features.get("pool_mask"),
                         return_token_embeddings=True)
        features["sentence_embedding"] = out["sentence_embeddings"]
        features["token_embeddings"] = out["token_embeddings"]  # encode(output_value="token_embeddings")
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.embedding_dim

    get_sentence_embedding_dimension = get_embedding_dimension

    # ------------------------------------------------------------------ save / load
    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path)
        with open(os.path.join(output_path, ST_CONFIG_FILE), "w") as f:
            json.dump(self.get_config_dict(), f, indent=2)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "NVEmbedSTModule":
        folder = os.path.join(model_name_or_path, subfolder)
        if not os.path.isdir(folder):
            raise ValueError(f"NVEmbedSTModule.load: {folder} is not a local folder (nothing is downloaded)")
        cfg_path = os.path.join(folder, ST_CONFIG_FILE)
        config = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        return cls(NVEmbedModel.from_pretrained(folder, dtype=_load_dtype(folder, kwargs.get("model_kwargs"))),
                   **config)

    def __repr__(self) -> str:
        return (f"NVEmbedSTModule(pooling={self.model.config['pooling']!r}, dim={self.model.embedding_dim}, "
                f"max_seq_length={self.max_seq_length}, include_prompt={self.include_prompt})")


def _load_dtype(folder: str, model_kwargs: Optional[Dict[str, Any]]):
    """The weights' dtype for SentenceTransformer(folder, model_kwargs={"torch_dtype" or "dtype": ...}): a torch
    dtype or its name, "auto" = the saved config's torch_dtype; float32 without one (transformers' default)."""
    import torch

    from .device import DTYPES
    model_kwargs = model_kwargs or {}
    dtype = model_kwargs.get("torch_dtype", model_kwargs.get("dtype"))
    if dtype == "auto":
        with open(os.path.join(folder, "config.json")) as f:
            dtype = json.load(f).get("torch_dtype") or "float32"
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype not in DTYPES.values():
        raise ValueError(f"NVEmbedSTModule.load: model_kwargs dtype must be one of {', '.join(DTYPES)} or 'auto', "
                         f"got {dtype!r}")
    return dtype


def to_sentence_transformer(model: NVEmbedModel, prompts: Optional[Dict[str, str]] = None,
                            default_prompt_name: Optional[str] = None, include_prompt: Optional[bool] = None,
                            max_seq_length: Optional[int] = None) -> SentenceTransformer:
    """A SentenceTransformer whose single module runs `model` (shared, not copied). `prompts` / `default_prompt_name`
    are ST's (e.g. {"query": "Instruct: ...\\nQuery: ", "document": ""} for encode_query / encode_document);
    `include_prompt`: see the module docstring (None = the model's own rule, equal to model.encode)."""
    module = NVEmbedSTModule(model, include_prompt=include_prompt, max_seq_length=max_seq_length)
    return SentenceTransformer(modules=[module], device=str(model.device), prompts=prompts,
                               default_prompt_name=default_prompt_name)
