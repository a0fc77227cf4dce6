"""Safetensors checkpoints in the Hugging Face layout (single `model.safetensors` or shards + index) and the
strict name/shape check used when loading them."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Buffers that older transformers versions saved but current modules no longer keep in their state_dict.
IGNORABLE_SUFFIXES = (".position_ids", "rotary_emb.inv_freq")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model's parameters (names and/or shapes)."""


def check_state_dict_shapes(expected: Mapping[str, Iterable[int]], found: Mapping[str, Iterable[int]],
                            source: str = "checkpoint") -> None:
    """Raise one CheckpointMismatchError listing every missing key, unexpected key and shape mismatch.

    `expected` / `found` map names to shapes (torch.Size, tuples, or tensors, meta tensors included)."""
    def shape(v):
        return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)

    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not k.endswith(IGNORABLE_SUFFIXES))
    mismatched = sorted((k, shape(expected[k]), shape(found[k])) for k in expected
                        if k in found and shape(expected[k]) != shape(found[k]))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} shape mismatches):"]
    lines += [f"  missing: {k}" for k in missing]
    lines += [f"  unexpected: {k}" for k in unexpected]
    lines += [f"  shape mismatch: {k}: model {list(e)}, checkpoint {list(f)}" for k, e, f in mismatched]
    raise CheckpointMismatchError("\n".join(lines))


@contextmanager
def _open_safetensors(path: str):
    """safe_open, with a truncated or corrupt file reported as a ValueError naming it."""
    from safetensors import SafetensorError
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _weight_map(folder: str) -> Optional[Dict[str, str]]:
    """The index's {tensor name: shard file name}, or None without an index."""
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        try:
            weight_map = json.load(f)["weight_map"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError("names and files must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read {index}: not a safetensors index with a 'weight_map' ({e!r})") from None
    return weight_map


def checkpoint_files(folder: str) -> list:
    weight_map = _weight_map(folder)
    if weight_map is not None:
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {folder}")


def _each_tensor(folder: str):
    """(open file, tensor name) for every tensor of the checkpoint, each once: with an index, a tensor is read from
    the shard the index names (as transformers does; a copy in another shard is not a second value), and a tensor the
    index names but its shard lacks is an error."""
    weight_map = _weight_map(folder)
    for path in checkpoint_files(folder):
        with _open_safetensors(path) as f:
            keys = set(f.keys())
            if weight_map is None:
                names = sorted(keys)
            else:
                shard = os.path.basename(path)
                names = sorted(k for k, v in weight_map.items() if v == shard)
                absent = [k for k in names if k not in keys]
                if absent:
                    raise ValueError(f"{path} lacks {len(absent)} tensor(s) that {INDEX_FILE} puts there: "
                                     f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
            for name in names:
                yield f, name


def read_shapes(folder: str) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of every tensor in the folder's checkpoint, without reading the data."""
    return {name: tuple(f.get_slice(name).get_shape()) for f, name in _each_tensor(folder)}


def load_state_dict(folder: str, names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Tensors of the folder's checkpoint (only `names` when given)."""
    wanted = None if names is None else set(names)
    return {name: f.get_tensor(name) for f, name in _each_tensor(folder) if wanted is None or name in wanted}


def save_state_dict(state_dict: Mapping[str, torch.Tensor], folder: str, max_shard_bytes: int = 5 * 2**30,
                    metadata: Optional[dict] = None) -> list:
    """Write `state_dict` (in its order) as one `model.safetensors`, or as shards
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when it exceeds max_shard_bytes."""
    shards, current, size = [], {}, 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    shards.append(current)
    meta = {"format": "pt", **(metadata or {})}
    # The weight files of an earlier save into this folder go first: an index left beside a new single file would be
    # read instead of it (checkpoint_files prefers the index), and stale shards would be loaded as the model.
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
            os.remove(os.path.join(folder, name))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=meta)
        files.append(name)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
