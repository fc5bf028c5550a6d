"""Reading a W&B offline run back, for the tests: what wandb wrote to run-<id>.wandb.

wandb 0.2x/0.3x has no public reader for its offline files (the Python one,
wandb.sdk.internal.datastore, went with the move to the Go wandb-core), so this reads the format
itself: a 7-byte header (":W&B", magic 0xBEE1, version 0) and then LevelDB's log format (32 KiB
blocks of records: CRC32, length, type FULL/FIRST/MIDDLE/LAST), each record one
``wandb_internal_pb2.Record`` protobuf, parsed with wandb's own schema. The CRC (zlib's CRC32 of
the payload seeded with that of the type byte, as wandb writes it) is checked, so a misread frame
fails loudly instead of yielding garbage.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
FRAME = 7  # CRC32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every protobuf Record of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:len(HEADER)] == HEADER, f"{path}: not a W&B transaction log"
    pos, pending = len(HEADER), b""
    while pos + FRAME <= len(data):
        if BLOCK - pos % BLOCK < FRAME:  # a block's tail too short for a frame is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + FRAME])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + FRAME:pos + FRAME + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at byte {pos}"
        pos += FRAME + length
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """One offline-run-*/ folder: the run's id, its config, its history rows by step and how it
    ended (the exit code, and whether it was marked preempting first)."""

    folder: Path
    run_id: str = ""
    exit_code: int | None = None
    preempting: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)


def read_offline_run(folder: Path) -> OfflineRun:
    """The run in ``folder``, which must be complete: wandb-core writes the file in the background
    and may still be writing when run.finish() returns; wandb.teardown() waits for it."""
    (log_file,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    kinds = []
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "run":
            run.run_id = record.run.run_id
            run.config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            run.history.setdefault(record.history.step.num, {}).update(row)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "preempting":
            run.preempting = True
    assert kinds[-1:] == ["exit"], f"{log_file}: no exit record at the end (still being written?)"
    return run


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """The W&B offline runs that goku-train wrote under ``run_dir/wandb/``, oldest first."""
    return [read_offline_run(folder) for folder in sorted((run_dir / "wandb").glob("offline-run-*"))]
