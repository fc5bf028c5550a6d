"""Fault-tolerant distributed checkpoints: megatron-core dist_checkpointing (torch_dist format).

A checkpoint holds everything an exact resume needs: the weights, the optimizer (in megatron's
``fully_reshardable`` format whatever the optimizer), the fp32 EMA of the weights, every rank's
RNG states, the data-loader state, step and consumed samples, and the resolved config. Tensors are
stored by global name and offset, so a checkpoint loads into any TP/PP/DP layout; only the RNG
states and the loader state belong to one layout. docs/checkpointing.md has the whole story.

One concept per module, imports pointing one way (each imports only those above it):

- ``layout``: the run directory's ``checkpoints/`` (names, paths, ``latest``, the manifest),
  discovery of checkpoints, atomic small-file writes.
- ``state``: what a checkpoint holds of a process (``TrainingState``), the weights by global name
  (FSDP rows included) and the per-rank RNG states.
- ``optimizer_state``: the optimizer's state in megatron's ``fully_reshardable`` format for every
  optimizer, Adam's step, megatron's older plain-optimizer format.
- ``integrity``: checksums, completeness and soundness checks, and the choice of the checkpoint a
  run resumes from (moving bad ones aside).
- ``writer``: the async save's snapshot and writer thread (megatron-core's writers, in a thread).
- ``save``: the ``Checkpointer``: sync or async, atomic publishing, keep-K, write failures.
- ``reference``: one safetensors file in the authors' reference block layout (names, config, each
  rank's shards of its weights).
- ``load``: resuming a training state, loading weights alone, starting a finetune or a LoRA run
  from its base.

The names below are the package's public interface; callers import them from
``goku_megatron.checkpoint``.
"""

from goku_megatron.checkpoint.integrity import (NEWER_SHAPE_FIELDS, SHAPE_FIELDS, check_compatible,
                                                choose_resume_checkpoint, file_crc32, newest_valid_checkpoint,
                                                validate_checkpoint, verify_checkpoint)
from goku_megatron.checkpoint.layout import (CHECKSUMS, CHECKSUMS_GLOB, FORMAT, FORMATS, LATEST, MANIFEST,
                                             PARTIAL_SUFFIX, checkpoint_dir, checkpoint_step, latest_checkpoint,
                                             load_loader_state, loader_state_path, read_manifest,
                                             resolve_checkpoint)
from goku_megatron.checkpoint.load import (NEW_LAYERS, base_of, init_weights_from, load_checkpoint,
                                           load_model_weights, restore, start_from_base)
from goku_megatron.checkpoint.optimizer_state import flat_range_boxes
from goku_megatron.checkpoint.save import WRITE_TIMEOUT_S, Checkpointer, free_bytes, save_checkpoint
from goku_megatron.checkpoint.state import TrainingState, gather_weights

__all__ = [
    "CHECKSUMS", "CHECKSUMS_GLOB", "FORMAT", "FORMATS", "LATEST", "MANIFEST", "NEWER_SHAPE_FIELDS", "NEW_LAYERS",
    "PARTIAL_SUFFIX", "SHAPE_FIELDS", "WRITE_TIMEOUT_S", "Checkpointer", "TrainingState", "base_of", "check_compatible",
    "checkpoint_dir", "checkpoint_step", "choose_resume_checkpoint", "file_crc32", "flat_range_boxes",
    "free_bytes", "gather_weights", "init_weights_from", "latest_checkpoint", "load_checkpoint",
    "load_loader_state", "load_model_weights", "loader_state_path", "newest_valid_checkpoint", "read_manifest",
    "resolve_checkpoint", "restore", "save_checkpoint", "start_from_base", "validate_checkpoint", "verify_checkpoint",
]
