"""Whether a checkpoint can be trusted, and which one a run resumes from.

A checkpoint is complete when its manifest lists every file at its size (``validate_checkpoint``,
from the manifest alone) and sound when every file's CRC32 matches and its common state and tensor
metadata load (``verify_checkpoint``, the ranks splitting the files). Each rank's writer hashes
the files it wrote (``record_checksums``) for the manifest. ``choose_resume_checkpoint`` picks
the checkpoint a run starts from, moving aside (``iter_N.invalid-<time>``) any of the run's own
that fails and falling back to the newest that passes, with one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from megatron.core import dist_checkpointing

from goku_megatron.checkpoint.layout import (CHECKSUMS, FORMAT, FORMATS, LATEST, MANIFEST, checkpoint_step,
                                             complete_checkpoints, read_manifest, write_atomically)
from goku_megatron.config import Config, ConfigError, LoraConfig
from goku_megatron.platform import barrier

log = logging.getLogger(__name__)

_HASH_CHUNK = 8 << 20
# model.* fields that fix the weights' shapes: a checkpoint loads only into a model with the same.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "in_channels", "patch_size",
                "text_dim", "timestep_freq_dim", "i2v")
# Shape fields added after checkpoints began, with the value a checkpoint that predates them had.
NEWER_SHAPE_FIELDS = {"i2v": False}
# lora.* fields that fix a LoRA checkpoint's adapters (checkpoints from before LoRA have rank 0).
LORA_SHAPE_FIELDS = ("rank", "targets")


def file_crc32(path: Path) -> str:
    """CRC32 of a file's bytes (zlib's, the fast hash the standard library has), as 8 hex digits.
    Reads into one reused buffer; zlib releases the GIL while it hashes, so files hash in parallel
    threads."""
    crc = 0
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def record_checksums(directory: Path, rank: int) -> None:
    """Write the CRC32 of the tensor files ``rank`` wrote (torch_dist names them
    ``__<rank>_<n>.distcp``, one per writer thread) to its CHECKSUMS file, for the manifest."""
    files = sorted(directory.glob(f"__{rank}_*.distcp"))
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        hashes = dict(zip((p.name for p in files), pool.map(file_crc32, files)))
    write_atomically(directory / CHECKSUMS.format(rank=rank), json.dumps(hashes))


def validate_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is), from its manifest alone: the
    manifest is missing or unreadable, or a file it lists is missing or has another size
    (truncated). ``verify_checkpoint`` checks the contents too."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete save)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err.__class__.__name__})"
    if manifest.get("format") not in FORMATS or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is not a {FORMAT} manifest"
    for name, entry in manifest["files"].items():
        size = entry["size"] if isinstance(entry, dict) else entry
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size} (truncated)"
    return None


def _verify_share(path: Path, rank: int, world: int) -> str | None:
    """Contents check of this rank's share of a complete checkpoint's files (every ``world``-th,
    from ``rank``): their CRC32 against the manifest; rank 0 also reads common.pt and .metadata
    back (a checkpoint of format /1 has no checksums)."""
    files = read_manifest(path)["files"]
    for name in sorted(files)[rank::world]:
        entry = files[name]
        if isinstance(entry, dict) and file_crc32(path / name) != entry["crc32"]:
            return f"{name} does not match its checksum (corrupt)"
    if rank == 0:
        try:
            dist_checkpointing.load_common_state_dict(str(path))
        except Exception as err:  # noqa: BLE001 - any failure to unpickle means unusable
            return f"common.pt does not load ({err.__class__.__name__})"
        try:
            dist_checkpointing.load_tensors_metadata(str(path))
        except Exception as err:  # noqa: BLE001
            return f".metadata does not load ({err.__class__.__name__})"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """Why the complete checkpoint ``path`` cannot be trusted (None when it can): a file whose
    contents do not match the manifest's checksum, or common state or tensor metadata that does
    not load. Collective: the ranks split the files and agree on the answer."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    reasons: list[str | None] = [None] * world
    torch.distributed.all_gather_object(reasons, _verify_share(Path(path), rank, world))
    return next((r for r in reasons if r is not None), None)


def check_compatible(manifest: dict[str, Any], cfg: Config, path: Path,
                     fields: Sequence[str] = SHAPE_FIELDS) -> None:
    """Refuse, in one line, a checkpoint saved for a model of another shape (``fields`` differ)."""
    saved = {**NEWER_SHAPE_FIELDS, **manifest.get("config", {}).get("model", {})}
    current = dataclasses.asdict(cfg.model)
    diffs = [f"{k} {saved.get(k)} (checkpoint) vs {current[k]} (this run)" for k in fields
             if saved.get(k) != current[k]]
    if diffs:
        raise ConfigError(f"{path}: saved for another model: model.{'; model.'.join(diffs)}; resume it with "
                          f"the same model.* shape, or start a new train.run_dir")


def newest_valid_checkpoint(root: Path, quarantine: bool = False) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` (a run dir or its ``checkpoints/``) and one
    line per newer one that is not. ``quarantine`` renames those to ``iter_N.invalid-<time>`` so
    that keep_last never counts them (done only in the run's own directory)."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    notes = []
    for candidate in complete_checkpoints(root):
        reason = validate_checkpoint(candidate)
        if reason is None:
            return candidate, notes
        if quarantine:
            reason += f", moved to {_quarantine(candidate).name}"
        notes.append(f"{candidate.name}: {reason}")
    return None, notes


def choose_resume_checkpoint(run_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint this run starts from (None: from scratch), per ``checkpoint.resume``.

    The run directory's own newest sound checkpoint always wins when resuming is on (so a run
    restarted by torchrun or requeued by SLURM continues where it stopped); otherwise ``auto``
    starts fresh and a path names the checkpoint (or the run directory) to start from. A
    checkpoint of the run's own that is incomplete or fails ``verify_checkpoint`` is moved aside
    and the next older one is tried; one line says which were passed over and where the run
    falls back to. A named checkpoint that fails is refused in one line. Collective: rank 0
    chooses, all ranks verify.
    """
    notes: list[str] = []
    while True:
        decision: list[Any] = [None, None]  # (path, error)
        if torch.distributed.get_rank() == 0:
            try:
                chosen, passed_over = _choose(Path(run_dir), cfg)
                decision[0] = chosen
                notes += passed_over
            except ConfigError as err:
                decision[1] = str(err)
        torch.distributed.broadcast_object_list(decision, src=0)
        if decision[1] is not None:
            raise ConfigError(decision[1])
        chosen = None if decision[0] is None else Path(decision[0])
        reason = None if chosen is None else verify_checkpoint(chosen)
        if reason is None:
            break
        if chosen.parent != Path(run_dir) / "checkpoints":
            raise ConfigError(f"checkpoint.resume={chosen}: {reason}; pass a sound checkpoint")
        if torch.distributed.get_rank() == 0:
            notes.append(f"{chosen.name}: {reason}, moved to {_quarantine(chosen).name}")
        barrier()
    if notes:
        where = f"falling back to {chosen}" if chosen is not None else f"starting from scratch ({run_dir} has none left)"
        log.warning("%s; %s", "; ".join(f"checkpoint {n}" for n in notes), where)
    if chosen is not None:
        check_compatible(read_manifest(chosen), cfg, chosen)
        _check_same_adapters(read_manifest(chosen), cfg, chosen)
    return chosen


def _check_same_adapters(manifest: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse, in one line, resuming a checkpoint whose LoRA adapters (lora.rank, lora.targets) are
    not this run's: its weights and optimizer state would not fit."""
    saved = {**dataclasses.asdict(LoraConfig()), **manifest.get("config", {}).get("lora", {})}
    diffs = [f"{k} {saved[k]} (checkpoint) vs {getattr(cfg.lora, k)} (this run)" for k in LORA_SHAPE_FIELDS
             if (saved[k] if saved["rank"] else None) != (getattr(cfg.lora, k) if cfg.lora.rank else None)]
    if diffs:
        raise ConfigError(f"{path}: saved with other LoRA adapters: lora.{'; lora.'.join(diffs)}; resume it with the "
                          f"same lora.* settings, or start a new train.run_dir")


def _quarantine(checkpoint: Path) -> Path:
    """Move a checkpoint that must not be loaded aside (keep_last never counts it, nothing loads
    it) and point ``latest`` at the newest checkpoint left."""
    moved = checkpoint.with_name(f"{checkpoint.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}")
    checkpoint.rename(moved)
    remaining = complete_checkpoints(checkpoint.parent)
    if remaining:
        write_atomically(checkpoint.parent / LATEST, remaining[0].name + "\n")
    else:
        (checkpoint.parent / LATEST).unlink(missing_ok=True)
    return moved


def _choose(run_dir: Path, cfg: Config) -> tuple[str | None, list[str]]:
    """Rank 0's choice for choose_resume_checkpoint, by the manifests alone: the checkpoint and
    one note per newer checkpoint of the run's own that was incomplete (moved aside)."""
    resume = cfg.checkpoint.resume
    if resume == "":
        if complete_checkpoints(run_dir / "checkpoints"):
            log.warning("checkpoint.resume='': starting from scratch although %s holds checkpoints",
                        run_dir / "checkpoints")
        return None, []
    own, notes = newest_valid_checkpoint(run_dir, quarantine=True)
    if own is not None or resume == "auto":
        if own is not None and resume != "auto":
            log.info("%s holds checkpoints of its own: continuing from %s (not checkpoint.resume=%s)",
                     run_dir, own.name, resume)
        return (None if own is None else str(own)), notes
    given = Path(resume)
    if checkpoint_step(given) is not None or (given / MANIFEST).is_file():
        reason = validate_checkpoint(given)
        if reason is not None:
            raise ConfigError(f"checkpoint.resume={given}: {reason}; pass a complete checkpoint")
        return str(given), notes
    chosen, others = newest_valid_checkpoint(given)
    if chosen is None:
        raise ConfigError(f"checkpoint.resume={given}: no complete checkpoint there"
                          + (f" ({'; '.join(others)})" if others else ""))
    return str(chosen), notes
