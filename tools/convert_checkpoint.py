"""Convert between goku-train checkpoints and one safetensors file in the reference layout.

    python tools/convert_checkpoint.py export runs/goku8b out/goku8b.safetensors
    python tools/convert_checkpoint.py import out/goku8b.safetensors runs/finetune

Export loads a checkpoint of any TP/PP layout into one unsharded model and writes every weight
under its global name, transformer blocks as ``blocks.{i}.<name>`` with the authors' reference
block parameter names (GOKU.md: norm1.linear.*, attn1.{q,k,v,o}_proj.weight, attn1.{q,k}_norm.weight,
norm2.weight, attn2.*, norm3.weight, mlp.fc1.*, mlp.fc2.*); the embedders and final layer keep
their goku-megatron names. The run's config rides along as JSON in the file's metadata.
Import writes a step-0 goku-train checkpoint (run directory with checkpoints/latest) from such a
file, to sample from or to fine-tune (``goku-train checkpoint.init_from=RUN_DIR``); any TP/PP
layout can then read it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

BLOCK = re.compile(r"^layers\.(\d+)\.")
REFERENCE_BLOCK = re.compile(r"^blocks\.(\d+)\.")
CONFIG_KEY = "goku_config"


def to_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our global names -> the export layout (``layers.i.`` -> ``blocks.i.``); the blocks' own
    parameter names already are the reference block's. megatron's ``_extra_state`` is dropped."""
    return {BLOCK.sub(r"blocks.\1.", name): tensor for name, tensor in state.items()
            if not name.endswith("_extra_state")}


def from_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {REFERENCE_BLOCK.sub(r"layers.\1.", name): tensor for name, tensor in state.items()}


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Writes the checkpoint's weights (float32, unsharded) and config to ``out`` (.safetensors)."""
    from safetensors.torch import save_file

    from goku_megatron.sample import Sampler

    sampler = Sampler(checkpoint)
    state = {name: t.detach().float().cpu().contiguous() for name, t in sampler.model.state_dict().items()
             if isinstance(t, torch.Tensor)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_reference_names(state), str(out),
              metadata={CONFIG_KEY: json.dumps(sampler.cfg.to_dict()), "step": str(sampler.step)})
    return out


def import_checkpoint(weights: Path, run_dir: Path) -> Path:
    """A goku-train run directory holding ``weights`` as its step-0 checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from goku_megatron.checkpoint import save_checkpoint
    from goku_megatron.sample import config_for_one_process, unsharded_model

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{weights}: no {CONFIG_KEY} metadata; export it with this tool")
    saved: dict[str, Any] = json.loads(meta[CONFIG_KEY])
    stage, _ = unsharded_model(config_for_one_process(saved))
    missing, unexpected = stage.load_state_dict(from_reference_names(load_file(str(weights))), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit the model in its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return save_checkpoint(run_dir, 0, [stage], saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint -> one safetensors file")
    exp.add_argument("checkpoint", type=Path, help="run directory or checkpoints/iter_N")
    exp.add_argument("out", type=Path)
    imp = sub.add_parser("import", help="safetensors file -> goku-train run directory (step 0)")
    imp.add_argument("weights", type=Path)
    imp.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
        else:
            print(f"wrote {import_checkpoint(args.weights, args.run_dir)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
