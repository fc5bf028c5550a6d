"""The run directory's checkpoint layout: names, paths, discovery and the manifest.

    checkpoints/
        iter_0000100/              one complete checkpoint (docs/checkpointing.md, "Layout")
            __R_0.distcp, .metadata, metadata.json   tensors and their index (torch.distributed.checkpoint)
            common.pt              step, config, LR schedule, trainer state (consumed samples, step guard)
            loader_dp00000.json    each data-parallel rank's data-loader state
            checksums_00000.json   each rank's CRC32 of the tensor files it wrote (by its writer)
            manifest.json          written last: every file with its size and CRC32, the layout, the config
        iter_0000110.partial/      a save in progress or interrupted: never loaded, removed at start-up
        latest                     the name of the newest complete checkpoint

Everything here is file-system work on names and small JSON files: it needs no process group, so
goku-sample, goku-data and the tests find checkpoints with it as training does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

LATEST = "latest"
MANIFEST = "manifest.json"
# /2: files map to {"size", "crc32"}; /1 (sizes only) still loads, checked by size alone.
FORMAT = "goku-megatron-checkpoint/2"
FORMATS = ("goku-megatron-checkpoint/1", FORMAT)
CHECKSUMS = "checksums_{rank:05d}.json"
CHECKSUMS_GLOB = "checksums_*.json"
PARTIAL_SUFFIX = ".partial"
_ITER_NAME = re.compile(r"iter_(\d{7,})")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter_{step:07d}"


def loader_state_path(checkpoint: Path, dp_rank: int) -> Path:
    return checkpoint / f"loader_dp{dp_rank:05d}.json"


def load_loader_state(checkpoint: Path, dp_rank: int) -> dict[str, Any] | None:
    """The loader state DP rank ``dp_rank`` saved with ``checkpoint`` (None if it saved none)."""
    path = loader_state_path(checkpoint, dp_rank)
    return json.loads(path.read_text()) if path.is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names (see ``newest_valid_checkpoint`` for one that is
    also checked for completeness)."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    return Path(run_dir) / "checkpoints" / pointer.read_text().strip()


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` pointer names one."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint (checkpoints/latest missing); "
                                    "train longer or pass a checkpoints/iter_N directory")
        return found
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: not a goku-train checkpoint (no metadata.json); pass a run "
                                "directory or its checkpoints/iter_N")
    return path


def checkpoint_step(path: Path) -> int | None:
    match = _ITER_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """``iter_N`` directories under ``root``, newest first (partial and quarantined ones excluded)."""
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None] if root.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def checkpoint_bytes(manifest: dict[str, Any]) -> int:
    """What a checkpoint takes on disk: the sizes of the files its manifest lists (format 1
    lists bare sizes)."""
    return sum(entry["size"] if isinstance(entry, dict) else entry for entry in manifest["files"].values())


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
