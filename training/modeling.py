"""The model side of training: a latent-attention head added to a mean-pooling model, LoRA through PEFT, the
tokenization of instruction-prefixed queries (instruction tokens excluded from pooling, as encode() does) and the
export of a trained model as a plain NV-Embed folder (LoRA merged) that `nvembed.load(DIR)` reads.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from nvembed import checkpoint
from nvembed.encode import tokenize_batch
from nvembed.layers import LatentAttentionPooling

# LoRA targets: every linear layer of the attention and MLP blocks, as in NV-Embed (which adapts all of Mistral's
# projections). Names of the supported backbones' modules; the PEFT config only keeps those that exist.
LORA_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "decoder": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def add_latent_head(model, num_latents: int = 512, num_heads: int = 8, dim_head: Optional[int] = None,
                    init: str = "identity", seed: int = 0) -> LatentAttentionPooling:
    """Replace mean pooling by NV-Embed's latent-attention layer (released proportions by default: 512 latents,
    8 heads of dim_head = hidden size, GEGLU feed-forward ×4).

    init="identity" zeroes the two projections that write into the residual stream (to_out and the feed-forward's
    output Linear with its bias): the untrained layer is then exactly the identity on the token states, so the
    model with the new head embeds exactly like the mean-pooling model it came from (masked mean + L2 normalize),
    and training starts from the base model's quality instead of from a random projection. Everything else keeps
    PyTorch's default init (latents ~ N(0, 1) as released), so the gradients into the zeroed matrices are not zero.
    """
    if model.config["pooling"] != "mean":
        raise ValueError("add_latent_head: the model already has a latent-attention head")
    if init not in ("identity", "random"):
        raise ValueError(f"add_latent_head: init must be 'identity' or 'random', got {init!r}")
    d = model.embedding_dim
    dim_head = d if dim_head is None else dim_head
    cfg = {"model_type": "latent_attention", "num_latents_value": num_latents, "num_cross_heads": num_heads,
           "cross_dim_head": dim_head, "hidden_dim": d, "latent_dim": d,
           "output_normalize": bool(model.config.get("normalize", True))}
    with torch.random.fork_rng(devices=[]):  # the head's init does not move the caller's RNG stream
        torch.manual_seed(seed)
        head = LatentAttentionPooling.from_config(cfg)
    if init == "identity":
        attn, ff = head.cross_attend_blocks
        with torch.no_grad():
            attn.fn.to_out.weight.zero_()
            ff.fn.net[2].weight.zero_()
            ff.fn.net[2].bias.zero_()
    head.to(device=model.device, dtype=model.dtype)
    model.latent_attention_model = head
    model.config["pooling"] = "latent"
    model.config["latent_attention_config"] = cfg
    model.config["normalize"] = cfg["output_normalize"]
    return head


def backbone_kind(model) -> str:
    from transformers import BertModel
    return "bert" if isinstance(model.embedding_model, BertModel) else "decoder"


def apply_lora(model, rank: int = 16, alpha: int = 32, dropout: float = 0.1) -> int:
    """Inject PEFT LoRA adapters into the backbone in place (module classes stay, so NVEmbedModel runs as before);
    freeze the backbone's base weights. Returns the number of trainable backbone parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {n for n, _ in model.embedding_model.named_modules()}
    targets = [t for t in LORA_TARGETS[backbone_kind(model)] if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise ValueError("apply_lora: no LoRA target modules found in the backbone")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model.embedding_model)
    n = 0
    for name, p in model.embedding_model.named_parameters():
        p.requires_grad_("lora_" in name)
        n += p.numel() if p.requires_grad else 0
    return n


def _lora_layers(module: nn.Module):
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model) -> Dict[str, torch.Tensor]:
    """The model's state_dict with LoRA merged into the base weights and PEFT's wrapper names removed: exactly
    the keys of an NVEmbedModel without adapters (W + scale·B·A computed out of place; training state untouched)."""
    state = model.state_dict()
    lora = _lora_layers(model)
    if not lora:
        return dict(state)
    out = {}
    for key, t in state.items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = t
    for name, layer in lora.items():
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
        wkey = f"{name}.weight"
        # merged on the CPU, one weight at a time: on a GPU the merged copies of every targeted weight would sit
        # beside the model (~28 GB in fp32 for a 7B backbone); the export writes CPU tensors anyway
        out[wkey] = (out[wkey].detach().to("cpu", torch.float32)
                     + delta.detach().to("cpu", torch.float32)).to(out[wkey].dtype)
    return out


def export_model(model, path: str) -> List[str]:
    """Write `model` (LoRA merged) into the folder `path` as an NV-Embed model: config.json, safetensors, tokenizer
    files. Other files in `path` (a training run's checkpoints/ and logs) are left alone. Every file is written
    under a temporary name and renamed into place, config.json last, so a crash never leaves a half-written file;
    weight files of an earlier export that the new one does not have (a sharded -> single switch) are removed."""
    import json
    import shutil
    import tempfile

    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=path)
    try:
        files = checkpoint.save_state_dict(merged_state_dict(model), tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config_dict(), f, indent=2)
        for name in os.listdir(tmp):
            if name != "config.json":
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
        index = [] if len(files) == 1 else [checkpoint.INDEX_FILE]
        for stale in os.listdir(path):
            if (stale.endswith(".safetensors") or stale == checkpoint.INDEX_FILE) and stale not in files + index:
                os.remove(os.path.join(path, stale))
        os.replace(os.path.join(tmp, "config.json"), os.path.join(path, "config.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def tokenize(model, texts: Sequence[str], instructions: Optional[Sequence[str]], max_length: int,
             device=None) -> Dict[str, torch.Tensor]:
    """input_ids / attention_mask / pool_mask of a training batch, built exactly as encode() builds them
    (nvembed.encode.tokenize_batch: instruction + text + eos, instruction tokens out of the pool mask), one
    instruction per row; None = no instructions (documents)."""
    if model.tokenizer is None:
        raise ValueError("tokenize: the model has no tokenizer")
    instructions = list(instructions) if instructions is not None else [""] * len(texts)
    return tokenize_batch(model, texts, instructions, max_length, device)


class EmbeddingWrapper(nn.Module):
    """One nn.Module call per step for DDP: embeds the query and the document inputs (either may be None) with the
    same NVEmbedModel, fp32 embeddings out (bf16 autocast inside on CUDA when asked)."""

    def __init__(self, model, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def _embed(self, inputs):
        if inputs is None:
            return None
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=inputs["input_ids"].device.type, dtype=self.autocast_dtype):
                emb = self.model(inputs["input_ids"], inputs["attention_mask"], inputs["pool_mask"])
        else:
            emb = self.model(inputs["input_ids"], inputs["attention_mask"], inputs["pool_mask"])
        return emb["sentence_embeddings"].float()

    def forward(self, query_inputs=None, doc_inputs=None):
        return self._embed(query_inputs), self._embed(doc_inputs)


def trainable_parameters(model) -> Iterable:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
