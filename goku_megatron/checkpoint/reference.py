"""One safetensors file in the authors' reference block layout: its names, the config it carries,
and reading its weights into a model of any layout.

Transformer blocks are ``blocks.{i}.<name>`` with the reference block's parameter names
(docs/model.md, "The block"), which are our layers' own; the embedders and final layer keep
goku-megatron's names; the run's config rides along as JSON in the file's metadata
(``CONFIG_KEY``). ``goku-data convert-checkpoint`` writes and imports such files (convert.py), and
a LoRA run may take one as its frozen base (lora.base): every rank then reads only its own shard of
each weight (``read_shards``), whatever the TP/PP/FSDP layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from safetensors import SafetensorError, safe_open

BLOCK = re.compile(r"^layers\.(\d+)\.")
REFERENCE_BLOCK = re.compile(r"^blocks\.(\d+)\.")
CONFIG_KEY = "goku_config"


def to_reference_name(name: str) -> str:
    """Our global name -> the reference layout's (``layers.i.`` -> ``blocks.i.``)."""
    return BLOCK.sub(r"blocks.\1.", name)


def to_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our global names -> the export layout; megatron's ``_extra_state`` is dropped."""
    return {to_reference_name(name): tensor for name, tensor in state.items() if not name.endswith("_extra_state")}


def from_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {REFERENCE_BLOCK.sub(r"layers.\1.", name): tensor for name, tensor in state.items()}


def read_metadata(path: Path) -> dict[str, str]:
    """The file's metadata, with its saved config (``CONFIG_KEY``) present; one-line errors for a
    missing file, a file that is not safetensors, or one without a goku config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass a .safetensors file written by "
                                "'goku-data convert-checkpoint export'")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err}); pass a file written by "
                         "'goku-data convert-checkpoint export'") from err
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: no {CONFIG_KEY} metadata; export it with 'goku-data convert-checkpoint export'")
    return meta


def saved_config(path: Path) -> dict[str, Any]:
    """The run config a reference file carries (a ``Config.to_dict()``)."""
    return json.loads(read_metadata(path)[CONFIG_KEY])


def read_shards(path: Path, template: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """This rank's shard of every weight ``template`` describes (ShardedTensors keyed
    ``<prefix><global name>``, each with its global offset and local shape), read from the
    reference file at ``path``: only those bytes are read. Weights the file lacks are left out."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for entry in template.values():
            if not isinstance(entry, ShardedTensor) or not entry.key.startswith(prefix):
                continue
            name = to_reference_name(entry.key[len(prefix):])
            if name not in names:
                continue
            if entry.prepend_axis_num:
                raise ValueError(f"{entry.key} has prepended axes, which goku's weights never have")
            rows = tuple(slice(o, o + n) for o, n in zip(entry.global_offset, entry.local_shape))
            out[entry.key] = f.get_slice(name)[rows]
    return out
